#!/usr/bin/env python3
"""Run detectron2 and pydetectron's detectron2 mode on the same config, weights and images; print how far apart
their detections are. Needs a detectron2 build (CPU is enough); without one it stops and says how to build it.

    python tools/compare_detectron2.py \\
        --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \\
        --weights model_final.pth --images a.jpg b.jpg
    python tools/compare_detectron2.py --config-file configs/detectron2/COCO-Detection/retinanet_R_50_FPN_1x.yaml \\
        --random-init --seed 0 --generated 2 --size 480x640 [MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.3 ...]

The config is a detectron2 YAML (ours under configs/detectron2/, or detectron2's own model-zoo name); trailing
``KEY VALUE`` pairs are detectron2 options given to both. detectron2 runs as its ``DefaultPredictor`` (its own
test-time resize and weights loader); pydetectron as ``pydetectron.Predictor`` on the translated config, the
path ``tools/infer_simple.py`` takes. ``--random-init`` builds detectron2's model with every tensor drawn from
``--seed``, calibrates its frozen norms on the images and biases its classifier towards the foreground (random
weights otherwise detect nothing: ../shared/BENCHMARKING.md), and saves it with detectron2's
DetectionCheckpointer (``--save-weights``, else a temporary file) for both to load.

Per image: detections of each, pairs (same class, IoU >= --min-iou, greedy by detectron2's score), unpaired
counts, and over the pairs the max box-corner and score differences, the min mask IoU, the max fraction of
pixels where paired masks disagree, and the max keypoint x/y difference. Keypoints that detectron2's decoding
cannot place within float32 noise (boxes that straddle an integer size in the network input, so their heatmaps
are resized to different ``ceil`` sizes; or ours on a point of detectron2's resized heatmap within 1e-3 of its
maximum, a tie) are shown apart ("ambiguous kps: px", pydetectron.utils.detection_diff) and do not count
against the keypoint tolerance. Exit status 1 when anything is unpaired or a difference exceeds
its tolerance.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import List, Sequence, Tuple

import numpy as np

from pydetectron.data.detectron2_transforms import resize_output_shape
from pydetectron.utils.detection_diff import DetectionDiff, compare_detections
from pydetectron.utils.detectron2_peer import (
    Detectron2Missing,
    calibrate_d2_model,
    d2_cfg,
    d2_predictions,
    generated_images,
    random_d2_model,
    require_detectron2,
    save_d2_checkpoint,
)

COLUMNS = ("image", "d2", "ours", "unpaired d2/ours", "box px", "score", "mask IoU min", "mask px frac",
           "keypoint px", "ambiguous kps: px")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a detectron2 YAML or model-zoo config name")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", help="a detectron2 checkpoint (model_final.pth, model-zoo .pkl, ...)")
    weights.add_argument("--random-init", action="store_true", help="seeded random weights, calibrated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-weights", help="with --random-init: where to keep the generated checkpoint")
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--images", nargs="+", help="image files (read as BGR)")
    images.add_argument("--generated", type=int, help="this many generated images (seeded by --seed)")
    parser.add_argument("--size", default="480x640", help="HxW of generated images")
    parser.add_argument("--min-iou", type=float, default=0.5)
    parser.add_argument("--box-tol", type=float, default=0.1, help="pixels")
    parser.add_argument("--score-tol", type=float, default=1e-3)
    parser.add_argument("--mask-tol", type=float, default=1e-3, help="fraction of the image's pixels")
    parser.add_argument("--keypoint-tol", type=float, default=0.5, help="pixels")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="detectron2 KEY VALUE pairs, given to both")
    return parser.parse_args(argv)


def _read_images(args: argparse.Namespace) -> List[np.ndarray]:
    if args.generated is not None:
        height, width = (int(v) for v in args.size.lower().split("x"))
        return generated_images(args.generated, height, width, seed=args.seed)
    import cv2

    images = []
    for path in args.images:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read image {path}")
        images.append(image)
    return images


def random_checkpoint(cfg, images: Sequence[np.ndarray], seed: int, path: str) -> str:
    """detectron2's model of `cfg`, randomised from `seed` and calibrated on `images`, saved at `path` (.pth)."""
    model = random_d2_model(cfg, seed)
    calibrate_d2_model(model, images)
    folder, name = os.path.split(os.path.abspath(path))
    return save_d2_checkpoint(model, folder, os.path.splitext(name)[0])


def our_predictions(config_file: str, opts: Sequence[str], weights: str, images: Sequence[np.ndarray]) -> list:
    """pydetectron's detectron2 mode on each image, through ``pydetectron.Predictor`` (as infer_simple)."""
    from pydetectron.config import load_detectron2_config
    from pydetectron.engine.predictor import Predictor

    cfg = load_detectron2_config(config_file, list(opts) + ["MODEL.WEIGHTS", weights])
    predictor = Predictor(cfg, weights, device="cpu", print_fn=lambda _: None)
    return [{k: v.numpy() for k, v in predictor(image).items()} for image in images]


def input_scale(cfg, image: np.ndarray) -> Tuple[float, float]:
    """Network-input pixels per image pixel (x, y) of detectron2's test-time ResizeShortestEdge on `image`."""
    height, width = image.shape[:2]
    new_h, new_w = resize_output_shape(height, width, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return new_w / width, new_h / height


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def format_table(diffs: Sequence[DetectionDiff], names: Sequence[str]) -> str:
    rows = [COLUMNS] + [(name, str(d.reference), str(d.ours), f"{d.unpaired_reference}/{d.unpaired_ours}",
                         _cell(d.box), _cell(d.score), _cell(d.mask_iou), _cell(d.mask_pixels), _cell(d.keypoint),
                         f"{d.keypoint_ambiguous}: {_cell(d.keypoint_ambiguous_px)}")
                        for name, d in zip(names, diffs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def failures(diffs: Sequence[DetectionDiff], args: argparse.Namespace) -> List[str]:
    """What exceeds a tolerance, one line per kind (empty: the detectors agree)."""
    def worst(attr):
        values = [getattr(d, attr) for d in diffs if not math.isnan(getattr(d, attr))]
        return max(values) if values else 0.0

    found = []
    if any(d.unpaired_reference or d.unpaired_ours for d in diffs):
        found.append("unpaired detections")
    for attr, tol, what in (("box", args.box_tol, "box px"), ("score", args.score_tol, "score"),
                            ("mask_pixels", args.mask_tol, "mask pixel fraction"),
                            ("keypoint", args.keypoint_tol, "keypoint px")):
        if worst(attr) > tol:
            found.append(f"{what} {worst(attr):.3g} > {tol}")
    if not sum(d.reference for d in diffs):
        found.append("detectron2 detected nothing: nothing was compared")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_detectron2()
    except Detectron2Missing as err:
        sys.exit(f"error: {err}")
    images = _read_images(args)
    names = args.images or [f"generated{i}" for i in range(len(images))]
    cfg = d2_cfg(args.config_file, args.opts)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if args.random_init:
            weights = random_checkpoint(cfg, images, args.seed, args.save_weights or os.path.join(tmp, "random.pth"))
        reference = d2_predictions(cfg, weights, images)
        ours = our_predictions(args.config_file, args.opts, weights, images)
    diffs = [compare_detections(r, o, args.min_iou, input_scale(cfg, image))
             for r, o, image in zip(reference, ours, images)]
    print(format_table(diffs, names))
    problems = failures(diffs, args)
    print("AGREE" if not problems else "DIFFER: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
