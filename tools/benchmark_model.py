#!/usr/bin/env python3
"""R-50-FPN Mask R-CNN, ours vs. torchvision's maskrcnn_resnet50_fpn, in one run (../shared/BENCHMARKING.md).

    python tools/benchmark_model.py [--threads 2] [--height 800 --width 1067] [--repeats 3] [--device cpu] [--amp]

Same image, same size, same threads. Both models have random weights, so before timing every normalisation
layer is calibrated on the benchmark image (one forward pass sets its statistics to the batch's), and score
thresholds are 0 so both keep 1000 proposals and 100 detections: the printed workload shows it. Training
iterations run at learning rate 0 (the optimizer step still runs) on a fixed batch with the same ground truth.
Peak memory is measured in a process of its own for each model. --amp runs both sides' training iterations
under autocast (float16 + GradScaler on CUDA, bfloat16 on the CPU), as `--amp` trains.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.data.minibatch import BlobSettings, input_size, prepare_test_image
from pydetectron.engine.checkpoint import atomic_save
from pydetectron.engine.trainer import AmpSettings
from pydetectron.modeling.detector import build_detector, total_loss
from pydetectron.modeling.layers import AffineChannel2d
from pydetectron.utils.benchmark import TABLE_HEADER, compare, machine_description, model_benchmark_parser

CONFIG = Path(__file__).resolve().parents[1] / "configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml"
NUM_OBJECTS = 8


def synthetic_scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A photograph-like BGR image (smooth texture plus objects) with its object boxes and masks."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(128, 60, (height // 8, width // 8, 3)).astype(np.float32)
    image = cv2.resize(cv2.GaussianBlur(noise, (5, 5), 0), (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    boxes, masks = [], []
    for _ in range(NUM_OBJECTS):
        w, h = rng.integers(60, width // 3), rng.integers(60, height // 3)
        x1, y1 = rng.integers(0, width - w), rng.integers(0, height - h)
        mask = np.zeros((height, width), np.uint8)
        cv2.ellipse(mask, (int(x1 + w // 2), int(y1 + h // 2)), (int(w // 2), int(h // 2)), 0, 0, 360, 1, -1)
        image[mask.astype(bool)] = rng.integers(0, 255, 3)
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
        masks.append(mask)
    return image, np.array(boxes, np.float32), np.stack(masks)


class _Calibrating:
    """During one forward pass, set each normalisation layer to standardise its own input, then stop."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, (AffineChannel2d, FrozenBatchNorm2d))]

    @staticmethod
    def _hook(module, inputs):
        x = inputs[0].detach()
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        inv_std = torch.rsqrt(var + 1e-5)
        with torch.no_grad():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.copy_(mean)
                module.running_var.copy_(var + 1e-5 - module.eps)
                module.weight.fill_(1.0)
                module.bias.zero_()
            else:
                module.weight.copy_(inv_std)
                module.bias.copy_(-mean * inv_std)

    def __enter__(self):
        self.handles = [layer.register_forward_pre_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def ours_cfg(height: int, num_classes: int = 81):
    """The R-50-FPN Mask R-CNN baseline at the benchmark size, thresholds 0 (see the module docstring)."""
    cfg = get_cfg()
    merge_cfg_from_file(cfg, str(CONFIG))
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", num_classes, "TEST.SCALE", height, "TEST.MAX_SIZE", 1333,
                              "TRAIN.SCALES", (height,), "TRAIN.MAX_SIZE", 1333, "TEST.SCORE_THRESH", 0.0,
                              "MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS", False])
    return assert_and_infer_cfg(cfg)


def build_ours(cfg, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_detector(cfg).to(device)


def build_peer(height: int, num_classes: int, device: torch.device) -> nn.Module:
    """torchvision's maskrcnn_resnet50_fpn as it is fine-tuned: frozen BN, conv1 + layer1 frozen (as FREEZE_AT 2)."""
    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), trainable_layers=3)
    return MaskRCNN(backbone, num_classes=num_classes, min_size=height, max_size=1333, box_score_thresh=0.0).to(device)


class Workloads:
    """The same image and ground truth, in each model's input format."""

    def __init__(self, height: int, width: int, device: torch.device, ims_per_batch: int,
                 models: tuple[str, ...] = ("ours", "peer"), num_classes: int = 81, amp: bool = False):
        self.amp = AmpSettings(amp, device.type)
        self.image, self.boxes, self.masks = synthetic_scene(height, width)
        self.device = device
        self.ims_per_batch = ims_per_batch
        self.num_classes = num_classes
        cfg = ours_cfg(height, num_classes)
        self.settings = BlobSettings.from_cfg(cfg, train=False)
        self.ours_model = build_ours(cfg, device) if "ours" in models else None
        self.peer_model = build_peer(height, num_classes, device) if "peer" in models else None
        rgb = torch.from_numpy(cv2.cvtColor(self.image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255
        self.peer_image = rgb.to(device)
        blob, self.im_scale = prepare_test_image(self.image, self.settings)
        self.blob = blob.to(device)
        h, w = input_size(height, width, self.im_scale, self.settings)
        self.im_info = torch.tensor([[h, w, self.im_scale]], device=device)

    def ours_detect(self) -> dict:
        blob, im_scale = prepare_test_image(self.image, self.settings)
        h, w = input_size(self.image.shape[0], self.image.shape[1], im_scale, self.settings)
        with torch.no_grad():
            return self.ours_model(blob.to(self.device), torch.tensor([[h, w, im_scale]], device=self.device))[0]

    def peer_detect(self) -> dict:
        with torch.no_grad():
            return self.peer_model([self.peer_image])[0]

    def calibrate(self) -> None:
        for model, run in ((self.ours_model, self.ours_detect), (self.peer_model, self.peer_detect)):
            if model is None:
                continue
            model.eval()
            with _Calibrating(model):
                run()

    def gt_labels(self) -> torch.Tensor:
        """Classes 1, 2, ... of the ground-truth objects, cycling through the model's classes."""
        return torch.arange(len(self.boxes)) % (self.num_classes - 1) + 1

    def _ours_roidb(self) -> dict:
        polygons = []
        for mask in self.masks:
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            polygons.append([c.reshape(-1).astype(np.float64) * self.im_scale for c in contours if len(c) >= 3])
        n = len(self.boxes)
        return {"boxes": torch.from_numpy(self.boxes * self.im_scale), "gt_classes": self.gt_labels(),
                "is_crowd": torch.zeros(n, dtype=torch.bool), "segms": polygons, "gt_keypoints": None,
                "image_id": 0, "flipped": False, "height": self.image.shape[0], "width": self.image.shape[1]}

    def training_steps(self):
        """(ours_step, peer_step) closures running forward + backward + SGD step at lr 0."""
        k = self.ims_per_batch
        roidb = [self._ours_roidb() for _ in range(k)]
        data, im_info = self.blob.expand(k, -1, -1, -1).contiguous(), self.im_info.expand(k, -1).contiguous()
        target = {"boxes": torch.from_numpy(self.boxes).to(self.device),
                  "labels": self.gt_labels().to(self.device),
                  "masks": torch.from_numpy(self.masks).to(self.device)}

        def step_fn(model, loss_fn):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)
            scaler = self.amp.grad_scaler()

            def step():
                optimizer.zero_grad(set_to_none=True)
                with self.amp.autocast():
                    losses = loss_fn()
                total = total_loss({k: v.float() for k, v in losses.items()})
                if scaler is None:
                    total.backward()
                    optimizer.step()
                else:
                    scaler.scale(total).backward()
                    scaler.step(optimizer)
                    scaler.update()
            return step

        ours = peer = None
        if self.ours_model is not None:
            self.ours_model.train()
            ours = step_fn(self.ours_model, lambda: self.ours_model(data, im_info, roidb))
        if self.peer_model is not None:
            self.peer_model.train()
            peer = step_fn(self.peer_model, lambda: self.peer_model([self.peer_image] * k, [target] * k))
        return ours, peer


def measure_memory(which: str, args) -> None:
    """Child-process mode: only the model measured is built; a few training iterations, then the peak RSS
    (CPU) or max_memory_allocated (CUDA) of this process."""
    device = torch.device(args.device)
    work = Workloads(args.height, args.width, device, args.ims_per_batch, models=(which,), num_classes=args.num_classes,
                     amp=args.amp)
    work.calibrate()
    ours, peer = work.training_steps()
    step = ours if which == "ours" else peer
    for _ in range(2):
        step()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"which": which, "peak_mb": peak}))


def peak_memory_of(which: str, args) -> float:
    """Peak memory (MB) of a few training iterations of `which` ('ours' / 'peer'), in a process of its own."""
    cmd = [sys.executable, __file__, "--_memory_of", which] + [
        f"--{k}={v}" for k, v in vars(args).items() if k in ("threads", "height", "width", "device", "ims_per_batch",
                                                               "num_classes")] + (["--amp"] if args.amp else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["peak_mb"])


def main() -> None:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip_memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--num_classes", type=int, default=81, help="classes of both models, background included")
    parser.add_argument("--save_calibrated", metavar="PATH",
                        help="also write our calibrated model as a checkpoint (--load_ckpt of tools/test_net.py, to "
                             "time it on a dataset with --num_classes classes)")
    parser.add_argument("--amp", action="store_true", help="training iterations under autocast (both models)")
    parser.add_argument("--_memory_of", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory_of:
        measure_memory(args._memory_of, args)
        return

    device = torch.device(args.device)
    print(machine_description(args.threads) + f"; device {device}")
    # Children first: a child forked from a parent holding both models would report the parent's peak RSS.
    peaks = {} if args.skip_memory else {which: peak_memory_of(which, args) for which in ("ours", "peer")}
    work = Workloads(args.height, args.width, device, args.ims_per_batch, num_classes=args.num_classes, amp=args.amp)
    work.calibrate()
    if args.save_calibrated:
        atomic_save({"model": work.ours_model.state_dict(), "step": 0}, args.save_calibrated)
        print(f"Wrote our calibrated random-weight model to {args.save_calibrated}")
    ours_out, peer_out = work.ours_detect(), work.peer_detect()
    size = f"{args.height}x{args.width}"
    print(f"\n{TABLE_HEADER}")
    inference = compare(
        "inference / image", f"{size}, detections ours {len(ours_out['boxes'])} / peer {len(peer_out['boxes'])}",
        work.ours_detect, work.peer_detect, device, repeats=args.repeats, warmup=1)
    print(inference.row(), flush=True)
    ours_step, peer_step = work.training_steps()
    title = "training iteration (lr 0)" + (f" AMP {work.amp.dtype}" if args.amp else "")
    training = compare(title, f"{args.ims_per_batch} x {size}, {NUM_OBJECTS} gt objects",
                       ours_step, peer_step, device, repeats=args.repeats, warmup=1)
    print(training.row(), flush=True)
    if peaks:
        unit = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
        print(f"| training {unit} (MB) | {args.ims_per_batch} x {size} | {peaks['ours']:.0f} | {peaks['peer']:.0f} "
              f"| {peaks['ours'] / peaks['peer']:.2f} |")


if __name__ == "__main__":
    main()
