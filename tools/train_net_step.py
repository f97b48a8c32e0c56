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

A detectron2 config runs as detectron2 runs it (detectron2 mode; SOLVER.IMS_PER_BATCH is the total batch, the
schedule is not rescaled; output in OUTPUT_DIR; initial weights MODEL.WEIGHTS):

    python tools/train_net_step.py --num-gpus 8 \
        --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml OUTPUT_DIR out
    python tools/train_net_step.py --config-file ... --resume              # from the last checkpoint in OUTPUT_DIR
    python tools/train_net_step.py --config-file ... --eval-only MODEL.WEIGHTS out/ckpt/model_final.pth
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydetectron.config.checks import canonical_optimizer
from pydetectron.engine.dataset_cfg import DatasetMismatchError
from pydetectron.engine.launch import add_launch_args, launch, settings_from_args
from pydetectron.engine.predictor import weights_flags
from pydetectron.engine.test_engine import TestOptions, run_test
from pydetectron.engine.training import TrainOptions, last_checkpoint, run_training
from pydetectron.utils.cli import add_config_args, add_register_arg, check_config_args, config_path, load_cfg
from pydetectron.utils.distributed import is_main_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="dataset short name (coco2017, keypoints_coco2017, shapes, ...) or any "
                        "catalog name, e.g. one added with --register")
    add_register_arg(parser)
    add_config_args(parser, "config YAML (Detectron or Detectron.pytorch; --config-file for detectron2's)",
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
                        help="restore step, optimizer, lr, RNG and data position too: from --load_ckpt, else from the "
                             "last checkpoint in the output dir (detectron2's meaning; without one, training starts "
                             "from the initial weights)")
    parser.add_argument("--eval-only", dest="eval_only", action="store_true",
                        help="detectron2's flag: evaluate the weights (--load_ckpt / --load_detectron, the last "
                             "checkpoint with --resume, else MODEL.WEIGHTS / TEST.WEIGHTS) on TEST.DATASETS and exit; "
                             "results in <output dir>/inference")
    parser.add_argument("--no_save", action="store_true", help="write no checkpoints")
    parser.add_argument("--use_tfboard", action="store_true", help="log scalars to tensorboard under output_dir")
    parser.add_argument("--disp_interval", type=int, default=20, help="print a progress line every N steps")
    parser.add_argument("--no_cuda", dest="cuda", action="store_false", help="train on the CPU")
    parser.add_argument("--output_dir", help="where checkpoints, metrics.json and curves go "
                        "(default: OUTPUT_DIR with --config-file, else Outputs/<cfg name>/<date-time>)")
    parser.add_argument("--seed", type=int, help="RNG_SEED (data order, sampling, initialisation)")
    parser.add_argument("--keep_checkpoints", type=int, default=3,
                        help="keep the newest N model_step*.pth in <output_dir>/ckpt (model_final.pth is always kept)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision (SOLVER.AMP.ENABLED): float16 + GradScaler on CUDA, bfloat16 on the CPU")
    add_launch_args(parser)
    args = parser.parse_args(argv)
    if args.resume and not (args.load_ckpt or args.output_dir or args.config_file):
        parser.error("--resume needs --load_ckpt <checkpoint>, or the --output_dir whose last checkpoint to resume")
    if args.load_ckpt and args.load_detectron:
        parser.error("give one of --load_ckpt or --load_detectron, not both")
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
    output_dir = args.output_dir or (cfg.OUTPUT_DIR if args.config_file else None)
    if args.eval_only:
        evaluate_only(cfg, args, output_dir)
        return
    options = TrainOptions(
        dataset=args.dataset, register=args.register, batch_size=args.batch_size, num_workers=args.num_workers,
        iter_size=args.iter_size, optimizer=args.optimizer, lr=args.lr, lr_decay_gamma=args.lr_decay_gamma,
        start_step=args.start_step, load_ckpt=args.load_ckpt, load_detectron=args.load_detectron,
        resume=args.resume, no_save=args.no_save, use_tfboard=args.use_tfboard,
        disp_interval=args.disp_interval, use_cuda=args.cuda, output_dir=output_dir, seed=args.seed,
        cfg_name=Path(config_path(args)).stem, keep_checkpoints=args.keep_checkpoints, amp=args.amp,
    )
    output_dir = run_training(cfg, options, lambda line: print(line, flush=True))
    if is_main_process():
        print(f"Done. Checkpoints: {output_dir / 'ckpt'}; metrics: {output_dir / 'metrics.json'}; "
              f"log: {output_dir / 'log.txt'}")


def evaluate_only(cfg, args: argparse.Namespace, output_dir: str | None) -> None:
    """detectron2's --eval-only: test the weights on TEST.DATASETS into <output dir>/inference, no training."""
    checkpoint = last_checkpoint(output_dir) if args.resume and output_dir else None
    if checkpoint is not None:
        load_ckpt, load_detectron = str(checkpoint), None
    elif args.load_ckpt or args.load_detectron:
        load_ckpt, load_detectron = args.load_ckpt, args.load_detectron
    elif cfg.TEST.WEIGHTS:
        load_ckpt, load_detectron = weights_flags(cfg.TEST.WEIGHTS)
    else:
        sys.exit("error: --eval-only has no weights: give MODEL.WEIGHTS (or --set TEST.WEIGHTS), --load_ckpt, or "
                 "--resume with an output dir holding checkpoints")
    options = TestOptions(
        dataset=args.dataset, register=args.register, load_ckpt=load_ckpt, load_detectron=load_detectron,
        output_dir=str(Path(output_dir) / "inference") if output_dir else None, use_cuda=args.cuda, amp=args.amp)
    try:
        run_test(cfg, options, lambda line: print(line, flush=True))
    except DatasetMismatchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
