#!/usr/bin/env python3
"""Run a trained model on images and save pictures of what it finds, as Detectron's infer_simple.py does.

    python tools/infer_simple.py --cfg configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml \\
        --load_detectron model_final.pkl --image_dir demo --output_dir infer_outputs --output_ext pdf

Each image is written as <output_dir>/<image file name>.<output_ext> with boxes, class names and scores,
translucent masks with contours, and keypoint skeletons (the dataset's skeleton when it has one). Files that
are not images are skipped; an image that cannot be read is reported and skipped. Class names come from
--dataset (COCO's 80 classes by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import cv2
import torch

from pydetectron.config import assert_and_infer_cfg
from pydetectron.data.catalog import get_dataset, register_from_string, resolve_short_name
from pydetectron.data.coco import CocoDataset, DatasetMeta, keypoint_flip_map
from pydetectron.data.minibatch import BlobSettings
from pydetectron.engine.inference_model import build_inference_model
from pydetectron.evaluation.bbox_aug import detection_function
from pydetectron.evaluation.inference import detect_image
from pydetectron.utils.cli import add_config_args, add_register_arg, check_config_args, load_cfg
from pydetectron.vis import draw_detections, save_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2"}

COCO_CLASSES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
COCO_PERSON_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
]
# COCO person keypoints' skeleton (1-based keypoint pairs, as in the COCO keypoint annotations).
COCO_PERSON_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10], [9, 11],
    [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, "config YAML the model was trained with", "TEST.SCALE 600")
    parser.add_argument("--load_ckpt", help="pydetectron checkpoint (.pth)")
    parser.add_argument("--load_detectron", help="Detectron weights (.pkl)")
    parser.add_argument("--dataset", default="coco",
                        help="where class names (and the keypoint skeleton) come from: 'coco' (COCO's 80 classes, "
                             "default), 'keypoints_coco', a --dataset short name or a catalog dataset")
    add_register_arg(parser)
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--image_dir", help="folder of images (non-image files are skipped)")
    images.add_argument("--images", nargs="+", help="image files")
    parser.add_argument("--output_dir", default="infer_outputs", help="where the pictures go (default infer_outputs)")
    parser.add_argument("--thresh", type=float, default=0.7, help="draw detections scoring at least this (0.7)")
    parser.add_argument("--kp_thresh", type=float, default=2.0, help="draw keypoints whose logit exceeds this (2)")
    parser.add_argument("--output_ext", default="jpg", choices=["jpg", "png", "pdf"], help="picture format")
    parser.add_argument("--no_cuda", dest="cuda", action="store_false", help="run on the CPU")
    args = parser.parse_args(argv)
    if bool(args.load_ckpt) == bool(args.load_detectron):
        parser.error("give exactly one of --load_ckpt or --load_detectron")
    check_config_args(parser, args)
    return args


def dataset_meta(dataset: str) -> DatasetMeta:
    """Class names ('__background__' first), keypoint names with their left/right pairs, and the 1-based
    keypoint skeleton of --dataset.

    A catalog dataset (or short name) whose annotation file exists gives its own categories and keypoints;
    otherwise COCO names ('coco*', 'keypoints_coco*') fall back to the built-in COCO lists."""
    name = resolve_short_name(dataset).test[0] if dataset not in ("coco", "keypoints_coco") else None
    if name is not None and Path(get_dataset(name).ann_file).is_file():
        coco = CocoDataset(name)
        coco.get_roidb()
        return coco.meta
    if dataset.startswith("keypoints_coco"):
        return DatasetMeta(["__background__", "person"], {}, {}, COCO_PERSON_KEYPOINTS,
                           keypoint_flip_map(COCO_PERSON_KEYPOINTS), skeleton=COCO_PERSON_SKELETON)
    if dataset.startswith("coco"):
        return DatasetMeta(list(COCO_CLASSES), {}, {})
    raise FileNotFoundError(f"--dataset {dataset!r}: annotation file {get_dataset(name).ann_file} (for the class "
                            "names) does not exist")


def list_images(image_dir: str | None, images: Sequence[str] | None) -> list[Path]:
    """The image files to run on (sorted for a folder); other files are reported and skipped."""
    if image_dir is not None:
        folder = Path(image_dir)
        if not folder.is_dir():
            raise NotADirectoryError(f"--image_dir {image_dir!r} is not a folder")
        candidates = sorted(p for p in folder.iterdir() if p.is_file())
    else:
        candidates = [Path(p) for p in images]
    chosen = []
    for path in candidates:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            chosen.append(path)
        else:
            print(f"Skipping {path}: not an image file ({path.suffix or 'no extension'})")
    return chosen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for spec in args.register:
        register_from_string(spec)
    meta = dataset_meta(args.dataset)
    class_names, skeleton = meta.classes, [list(pair) for pair in meta.skeleton or []]
    cfg = load_cfg(args)
    if cfg.MODEL.NUM_CLASSES <= 0:
        cfg.MODEL.NUM_CLASSES = len(class_names)
    elif cfg.MODEL.NUM_CLASSES != len(class_names):
        sys.exit(f"error: MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but --dataset {args.dataset!r} names "
                 f"{len(class_names)} classes (with background); pass the dataset the model was trained on")
    if cfg.MODEL.KEYPOINTS_ON and cfg.KRCNN.NUM_KEYPOINTS <= 0:
        cfg.KRCNN.NUM_KEYPOINTS = meta.num_keypoints
    assert_and_infer_cfg(cfg)
    device = torch.device("cuda", 0) if args.cuda and torch.cuda.is_available() else torch.device("cpu")
    model = build_inference_model(cfg, args.load_ckpt, args.load_detectron, device)
    settings = BlobSettings.from_cfg(cfg, train=False)
    detect = detection_function(cfg, meta.keypoint_flip_permutation()) or detect_image
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in list_images(args.image_dir, args.images):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            print(f"Skipping {path}: cannot be read as an image")
            continue
        tic = time.perf_counter()
        detections = detect(model, image, settings, device)
        elapsed = time.perf_counter() - tic
        shown = int((detections["scores"] >= args.thresh).sum())
        out_path = output_dir / f"{path.name}.{args.output_ext}"
        save_image(draw_detections(image, detections, class_names, args.thresh, args.kp_thresh, skeleton), out_path)
        written += 1
        print(f"{path.name}: {elapsed:.3f} s, {shown} detections >= {args.thresh} -> {out_path}")
    print(f"Wrote {written} pictures to {output_dir}")


if __name__ == "__main__":
    main()
