#!/usr/bin/env python3
"""Train a Detectron model, step by step, with Detectron.pytorch's flags.

    python tools/train_net_step.py --dataset coco2017 --cfg configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml

The schedule in the config (written for NUM_GPUS x TRAIN.IMS_PER_BATCH images per step) is adapted to the
batch size and devices you run with; the changes are printed at start. Ctrl-C or SIGTERM saves a checkpoint
before exiting; `--resume --load_ckpt <ckpt>` continues exactly where it stopped.

Several devices, one process each (DistributedDataParallel; NCCL on GPUs, gloo on the CPU):

    torchrun --nproc_per_node 8 tools/train_net_step.py --dataset coco2017 --cfg ...
    python tools/train_net_step.py --num-gpus 8 --dataset coco2017 --cfg ...          # detectron2-style

Several machines: torchrun's --nnodes/--node_rank/--master_addr/--master_port, or --num-machines M
--machine-rank R --dist-url tcp://HOST0:PORT on every machine. Only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydetectron.config.checks import canonical_optimizer
from pydetectron.engine.launch import add_launch_args, launch, settings_from_args
from pydetectron.engine.training import TrainOptions, run_training
from pydetectron.utils.cli import add_config_args, add_register_arg, check_config_args, load_cfg
from pydetectron.utils.distributed import is_main_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="dataset short name (coco2017, keypoints_coco2017, shapes, ...) or any "
                        "catalog name, e.g. one added with --register")
    add_register_arg(parser)
    add_config_args(parser, "config YAML (Detectron or Detectron.pytorch)",
                    "SOLVER.MAX_ITER 1000 TRAIN.SCALES '(600,)'")
    parser.add_argument("--bs", dest="batch_size", type=int,
                        help="total images per forward pass over all devices (default: the config's "
                             "NUM_GPUS x TRAIN.IMS_PER_BATCH); lr scales with it")
    parser.add_argument("--nw", dest="num_workers", type=int, help="data loader workers (DATA_LOADER.NUM_THREADS)")
    parser.add_argument("--iter_size", type=int, default=1,
                        help="forward/backward passes accumulated per optimizer step (steps scale with it)")
    parser.add_argument("--o", dest="optimizer", type=canonical_optimizer, metavar="{SGD,Adam,AdamW}",
                        help="SOLVER.TYPE, any case (SparK's ADAMW)")
    parser.add_argument("--lr", type=float, help="base learning rate, set after the batch-size scaling")
    parser.add_argument("--lr_decay_gamma", type=float, help="SOLVER.GAMMA")
    parser.add_argument("--start_step", type=int, default=0, help="step to start at (without --resume)")
    parser.add_argument("--load_ckpt", help="checkpoint to start from (its model part unless --resume); any "
                        "weights format pydetectron reads")
    parser.add_argument("--load_detectron", help="Detectron weights (.pkl) to start from; any format "
                        "pydetectron reads")
    parser.add_argument("--resume", action="store_true",
                        help="with --load_ckpt: restore step, optimizer, lr, RNG and data position too")
    parser.add_argument("--no_save", action="store_true", help="write no checkpoints")
    parser.add_argument("--use_tfboard", action="store_true", help="log scalars to tensorboard under output_dir")
    parser.add_argument("--disp_interval", type=int, default=20, help="print a progress line every N steps")
    parser.add_argument("--no_cuda", dest="cuda", action="store_false", help="train on the CPU")
    parser.add_argument("--output_dir", help="where checkpoints, metrics.json and curves go "
                        "(default Outputs/<cfg name>/<date-time>)")
    parser.add_argument("--seed", type=int, help="RNG_SEED (data order, sampling, initialisation)")
    parser.add_argument("--keep_checkpoints", type=int, default=3,
                        help="keep the newest N model_step*.pth in <output_dir>/ckpt (model_final.pth is always kept)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision (SOLVER.AMP.ENABLED): float16 + GradScaler on CUDA, bfloat16 on the CPU")
    add_launch_args(parser)
    args = parser.parse_args(argv)
    if args.resume and not args.load_ckpt:
        parser.error("--resume needs --load_ckpt <checkpoint>")
    if args.keep_checkpoints < 1:
        parser.error(f"--keep_checkpoints must be >= 1, got {args.keep_checkpoints}")
    check_config_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch(train, settings_from_args(args), (args,))


def train(args: argparse.Namespace) -> None:
    """What every process of the run does."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    cfg = load_cfg(args)
    options = TrainOptions(
        dataset=args.dataset, register=args.register, batch_size=args.batch_size, num_workers=args.num_workers,
        iter_size=args.iter_size, optimizer=args.optimizer, lr=args.lr, lr_decay_gamma=args.lr_decay_gamma,
        start_step=args.start_step, load_ckpt=args.load_ckpt, load_detectron=args.load_detectron,
        resume=args.resume, no_save=args.no_save, use_tfboard=args.use_tfboard,
        disp_interval=args.disp_interval, use_cuda=args.cuda, output_dir=args.output_dir, seed=args.seed,
        cfg_name=Path(args.cfg_file).stem, keep_checkpoints=args.keep_checkpoints, amp=args.amp,
    )
    output_dir = run_training(cfg, options, lambda line: print(line, flush=True))
    if is_main_process():
        print(f"Done. Checkpoints: {output_dir / 'ckpt'}; metrics: {output_dir / 'metrics.json'}; "
              f"log: {output_dir / 'log.txt'}")


if __name__ == "__main__":
    main()
