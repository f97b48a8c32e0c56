"""Functions the distributed tests run in every spawned process (spawned processes import them by name).

Each writes what it computed to a file in the folder it is given; the tests compare those files with a
reference computed in the pytest process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pydetectron.config import get_cfg
from pydetectron.data.loader import build_train_loader
from pydetectron.data.minibatch import BlobSettings
from pydetectron.engine.hooks import TrainerHook
from pydetectron.engine.logger import TrainingLogger
from pydetectron.engine.trainer import Trainer, TrainLoopSettings
from pydetectron.engine.training import wrap_for_training
from pydetectron.modeling.layers import SyncBatchNorm2d
from pydetectron.solver import LRSchedule, parameter_groups
from pydetectron.utils.distributed import get_rank, get_world_size

# The stride must be the cfg's (the one split_per_device pads to): without FPN, images are not padded further.
SETTINGS = BlobSettings(scales=(48, 64), max_size=96, pixel_means=(102.9801, 115.9465, 122.7717),
                        stride=BlobSettings.from_cfg(get_cfg(), train=True).stride)


class CountingDetector(nn.Module):
    """A stand-in with the detector's interface: forward(data, im_info, roidb) -> losses; it learns to count
    each image's boxes from its pixels. Its loss is a mean over images, as the detector's losses are per image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 1)

    def forward(self, data, im_info, roidb):
        features = torch.relu(self.conv(data / 64.0)).mean(dim=(2, 3))
        counts = torch.tensor([float(len(entry["boxes"])) for entry in roidb])
        error = self.fc(features).squeeze(1) - counts
        return {"loss_count": (error ** 2).mean(), "mean_error": error.detach().abs().mean()}


class LoggedLosses(TrainerHook):
    """Keeps the losses each step logged (averaged over the ranks by the trainer)."""

    def __init__(self):
        self.steps: list[dict] = []

    def after_step(self, trainer, step, losses) -> None:
        self.steps.append(dict(losses))


def train_counting_detector(roidb: list, steps: int, iter_size: int, batch_per_process: int, devices: int,
                            seed: int = 5, logged: LoggedLosses | None = None) -> nn.Module:
    """`steps` SGD steps of a CountingDetector through the training glue: DDP when a group is up (one device per
    process), else the DataParallel over `devices` sub-batches of each minibatch."""
    torch.manual_seed(0)
    model = CountingDetector()
    cfg = get_cfg()
    forward, accumulate = wrap_for_training(model, cfg, torch.device("cpu"), devices)
    loader = build_train_loader(roidb, SETTINGS, batch_size=batch_per_process, num_workers=0, seed=seed,
                                num_replicas=get_world_size(), rank=get_rank())
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay=1e-4), lr=0.01, momentum=0.9)
    for group in optimizer.param_groups:
        group["lr"] = 0.01 * group["lr_scale"]
    settings = TrainLoopSettings(max_iter=steps, iter_size=iter_size, snapshot_iters=10**6, save_checkpoints=False)
    trainer = Trainer(model, optimizer, LRSchedule("step", 0.01, steps, step_size=10**6), loader, forward, settings,
                      TrainingLogger(None, steps, print_fn=lambda _: None), print_fn=lambda _: None,
                      hooks=[logged] if logged else [], accumulate_context=accumulate)
    trainer.train()
    return model


def ddp_training(out_dir: str, roidb: list, steps: int, iter_size: int) -> None:
    logged = LoggedLosses()
    model = train_counting_detector(roidb, steps, iter_size, batch_per_process=1, devices=1, logged=logged)
    torch.save({"params": model.state_dict(), "logged": logged.steps}, Path(out_dir) / f"rank{get_rank()}.pt")


def sync_batch_norm(out_dir: str, images: torch.Tensor, upstream: torch.Tensor) -> None:
    """This rank's slice of `images` through a SyncBatchNorm2d; its output, input gradient, parameter gradients
    and running statistics are saved."""
    rank = get_rank()
    share = images.shape[0] // get_world_size()
    x = images[rank * share:(rank + 1) * share].clone().requires_grad_(True)
    bn = SyncBatchNorm2d(images.shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, images.shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, images.shape[1]))
    out = bn(x)
    (out * upstream[rank * share:(rank + 1) * share]).sum().backward()
    torch.save({"out": out.detach(), "grad_x": x.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var},
               Path(out_dir) / f"bn_rank{rank}.pt")


def raise_on_rank_one(out_dir: str) -> None:
    """Rank 1 raises; rank 0 waits in a collective that can never complete."""
    if get_rank() == 1:
        raise RuntimeError("rank one broke on purpose")
    (Path(out_dir) / f"waiting{get_rank()}").write_text(str(os.getpid()))
    dist.barrier()


def all_reduce_until_killed(out_dir: str) -> None:
    """Both ranks all_reduce in a loop; each writes a 'ready' file once the loop runs (the test kills one)."""
    ready = Path(out_dir) / f"ready{get_rank()}"
    for step in range(10**6):
        dist.all_reduce(torch.ones(1))
        if step == 3:
            ready.write_text(str(os.getpid()))
