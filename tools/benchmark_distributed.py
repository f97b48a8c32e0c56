#!/usr/bin/env python3
"""Training images/s of one process, of 2 DistributedDataParallel processes and of the one-process DataParallel,
on the same model, data and global batch (a script, not a test; figures go to BENCHMARK.md).

    python tools/benchmark_distributed.py --no_cuda --steps 10

Each case trains a shapes Mask R-CNN (configs/getting_started, images scaled to --scale) for --warmup + --steps
optimizer steps of a global batch of --images images and reports images/s over the timed steps:
  * one process: the whole batch in one forward;
  * DataParallel: one process, the batch cut into 2 sub-batches (on the CPU they run one after the other, on
    GPUs one per device);
  * DDP: 2 processes (gloo on the CPU, NCCL on GPUs), each with half of the batch and half of the CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.data.loader import build_train_loader_from_cfg
from pydetectron.data.roidb import combined_roidb_from_cfg
from pydetectron.data.shapes import generate_split
from pydetectron.engine.hooks import TrainerHook
from pydetectron.engine.launch import LaunchSettings, launch
from pydetectron.engine.logger import TrainingLogger
from pydetectron.engine.trainer import Trainer, TrainLoopSettings
from pydetectron.engine.training import wrap_for_training
from pydetectron.modeling.detector import build_detector
from pydetectron.solver import LRSchedule, build_optimizer
from pydetectron.utils.distributed import get_rank, get_world_size, is_main_process

CFG = Path(__file__).resolve().parents[1] / "configs/getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml"


class StepClock(TrainerHook):
    """Times the steps after the warm-up ones."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.end = 0.0

    def before_step(self, trainer, step: int) -> None:
        if step == self.warmup:
            self.start = time.perf_counter()

    def after_step(self, trainer, step: int, losses) -> None:
        self.end = time.perf_counter()


def _cfg(args: argparse.Namespace, dataset: str, per_process_images: int):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, str(CFG))
    merge_cfg_from_list(cfg, ["TRAIN.DATASETS", (dataset,), "TRAIN.IMS_PER_BATCH", per_process_images,
                              "TRAIN.SCALES", (args.scale,), "TRAIN.MAX_SIZE", int(args.scale * 5 / 3),
                              "DATA_LOADER.NUM_THREADS", 0, "MODEL.NUM_CLASSES", 4,
                              "SOLVER.MAX_ITER", args.warmup + args.steps])
    assert_and_infer_cfg(cfg)
    return cfg


def run_case(args: argparse.Namespace, dataset_spec: str, images_per_process: int, devices: int,
             result_file: str) -> None:
    """Train warmup + steps steps in this process (one rank of a DDP run, or the whole run)."""
    from pydetectron.data.catalog import register_from_string

    name = register_from_string(dataset_spec).name
    cfg = _cfg(args, name, images_per_process)
    cuda = args.cuda and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    roidb, _ = combined_roidb_from_cfg(cfg)
    torch.manual_seed(0)
    model = build_detector(cfg).to(device)
    forward, accumulate = wrap_for_training(model, cfg, device, devices)
    loader = build_train_loader_from_cfg(cfg, roidb, devices_per_process=1, num_replicas=get_world_size(),
                                         rank=get_rank())
    clock = StepClock(args.warmup)
    max_iter = args.warmup + args.steps
    trainer = Trainer(model, build_optimizer(model, cfg), LRSchedule.from_cfg(cfg), loader, forward,
                      TrainLoopSettings(max_iter=max_iter, snapshot_iters=10**9, save_checkpoints=False),
                      TrainingLogger(None, max_iter, print_fn=lambda _: None), print_fn=lambda _: None,
                      hooks=[clock], accumulate_context=accumulate)
    trainer.train()
    if is_main_process():
        seconds = clock.end - clock.start
        Path(result_file).write_text(json.dumps({"seconds": seconds, "steps": args.steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--images", type=int, default=2, help="global batch (images per step, even)")
    parser.add_argument("--scale", type=int, default=192, help="shortest image side")
    parser.add_argument("--no_cuda", dest="cuda", action="store_false")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PYDETECTRON_CACHE"] = str(Path(tmp) / "cache")  # the spawned processes inherit it
        paths = generate_split(tmp, "train", 16, seed=0)
        spec = f"bench_shapes:{Path(tmp) / 'train'}:{paths['instances']}"
        cases = [("one process", dict(images_per_process=args.images, devices=1), None),
                 ("DataParallel, 2 sub-batches", dict(images_per_process=args.images, devices=2), None),
                 ("DDP, 2 processes", dict(images_per_process=args.images // 2, devices=1),
                  LaunchSettings(num_gpus=2, use_cuda=args.cuda))]
        rows = []
        for title, kwargs, launch_settings in cases:
            result = Path(tmp) / "result.json"
            if launch_settings is None:
                run_case(args, spec, kwargs["images_per_process"], kwargs["devices"], str(result))
            else:
                launch(run_case, launch_settings, (args, spec, kwargs["images_per_process"], kwargs["devices"],
                                                   str(result)))
            figures = json.loads(result.read_text())
            rate = args.images * figures["steps"] / figures["seconds"]
            rows.append((title, figures["seconds"] / figures["steps"], rate))
            print(f"{title}: {rows[-1][1]:.3f} s/step, {rate:.2f} images/s", flush=True)
    device = torch.cuda.get_device_name(0) if args.cuda and torch.cuda.is_available() else f"CPU, {threads} threads"
    print(f"\n{device}; global batch {args.images} images at scale {args.scale}; {args.steps} timed steps\n")
    print("| case | s/step | images/s | vs one process |\n|---|---|---|---|")
    for title, per_step, rate in rows:
        print(f"| {title} | {per_step:.3f} | {rate:.2f} | {rate / rows[0][2]:.2f} |")


if __name__ == "__main__":
    main()
