#!/usr/bin/env python3
"""Test a trained model on a dataset and print its COCO AP, with Detectron.pytorch's flags.

    python tools/test_net.py --dataset coco2017 --cfg configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml \\
        --load_detectron model_final.pkl

Writes detections.pkl, the COCO result jsons (bbox, segm as RLE, keypoints) and the metrics (evaluation.json) to
the output dir (default: <checkpoint dir>/../test), and prints the 12-line summary per task, Detectron's copypaste
lines and images/second. Parallel testing: --multi-gpu-testing (one process per GPU) or --num_workers N
split the dataset into N ranges, run this tool once per range (--range START END), and merge.
Re-evaluate earlier results without inference: --eval_only <output dir>/detections.pkl.
A detectron2 config and checkpoint (detectron2 mode): --config-file mask_rcnn_R_50_FPN_1x.yaml MODEL.WEIGHTS
model_final.pth (detectron2's KEY VALUE opts follow the flags; results in OUTPUT_DIR/inference).
Distributed: `torchrun --nproc_per_node N tools/test_net.py ...` (or --num-gpus N): each process tests its
share of the images, rank 0 gathers them, writes detections.pkl and evaluates once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydetectron.engine.dataset_cfg import DatasetMismatchError
from pydetectron.engine.launch import add_launch_args, launch, settings_from_args
from pydetectron.engine.test_engine import TestOptions, run_test
from pydetectron.utils.cli import (
    add_config_args,
    add_register_arg,
    add_weights_args,
    check_config_args,
    load_cfg,
    weights_of,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="dataset short name (coco2017, keypoints_coco2017, shapes, ...) or any "
                        "catalog name, e.g. one added with --register (default: the cfg's TEST.DATASETS)")
    add_register_arg(parser)
    add_config_args(parser, "config YAML the model was trained with (--config-file for a detectron2 YAML)",
                    "TEST.SCALE 800 TEST.BBOX_AUG.ENABLED True")
    add_weights_args(parser)
    parser.add_argument("--output_dir", help="where detections.pkl, result jsons and pictures go "
                        "(default: <weights dir>/../test, or OUTPUT_DIR/inference with --config-file; with "
                        "--eval_only: beside the pickle)")
    parser.add_argument("--multi-gpu-testing", dest="multi_gpu_testing", action="store_true",
                        help="one test process per visible GPU (or per --num_workers), results merged")
    parser.add_argument("--num_workers", type=int,
                        help="number of test processes the dataset is split over (default: 1, or the GPU count "
                             "with --multi-gpu-testing); on CPU they share the cores")
    parser.add_argument("--range", nargs=2, type=int, metavar=("START", "END"),
                        help="test only roidb images START..END-1 and write detections_range_START_END.pkl "
                             "(what the parallel processes run; no evaluation)")
    parser.add_argument("--vis", action="store_true",
                        help="also draw detections scoring >= VIS_TH into <output_dir>/vis")
    parser.add_argument("--eval_only", metavar="DETECTIONS_PKL",
                        help="evaluate a detections.pkl written earlier again, without inference (no weights needed)")
    parser.add_argument("--no_cuda", dest="cuda", action="store_false", help="test on the CPU")
    parser.add_argument("--amp", action="store_true",
                        help="mixed-precision inference (SOLVER.AMP.ENABLED): float16 on CUDA, bfloat16 on the CPU")
    add_launch_args(parser)
    args = parser.parse_args(argv)
    check_config_args(parser, args)
    if args.eval_only:
        if args.load_ckpt or args.load_detectron or args.range:
            parser.error("--eval_only evaluates a saved pickle: it takes no weights and no --range")
    elif args.load_ckpt and args.load_detectron:
        parser.error("give one of --load_ckpt or --load_detectron, not both")
    if args.range and (args.multi_gpu_testing or (args.num_workers or 1) > 1):
        parser.error("--range is one process's share; it cannot be combined with --multi-gpu-testing/--num_workers")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch(test_process, settings_from_args(args), (args,))


def test_process(args: argparse.Namespace) -> None:
    """What every process of the run does."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    cfg = load_cfg(args)
    load_ckpt, load_detectron = (None, None) if args.eval_only else weights_of(args, cfg)
    output_dir = args.output_dir
    if output_dir is None and args.config_file and not args.eval_only:  # detectron2 writes to OUTPUT_DIR/inference
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
    options = TestOptions(
        cfg_file=args.cfg_file, set_cfgs=args.set_cfgs, config_file=args.config_file, opts=args.opts,
        dataset=args.dataset, register=args.register,
        load_ckpt=load_ckpt, load_detectron=load_detectron, output_dir=output_dir,
        range=tuple(args.range) if args.range else None, multi_gpu_testing=args.multi_gpu_testing,
        num_workers=args.num_workers, vis=args.vis, eval_only=args.eval_only, use_cuda=args.cuda, amp=args.amp,
        child_command=[sys.executable, os.path.abspath(__file__)],
    )
    try:
        run_test(cfg, options, lambda line: print(line, flush=True))
    except DatasetMismatchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
