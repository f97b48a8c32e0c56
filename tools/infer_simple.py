#!/usr/bin/env python3
"""Run a trained model on images and save pictures of what it finds, as Detectron's infer_simple.py does.

    python tools/infer_simple.py --cfg configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml \\
        --load_detectron model_final.pkl --image_dir demo --output_dir infer_outputs --output_ext pdf

Each image is written as <output_dir>/<image file name>.<output_ext> with boxes, class names and scores,
translucent masks with contours, and keypoint skeletons (the dataset's skeleton when it has one). Files that
are not images are skipped; an image that cannot be read is reported and skipped. Class names come from
--dataset, or else follow the cfg and the weights: the cfg's own dataset when its json is here, otherwise COCO's
names by class count (81 classes: COCO's 80; a 2-class keypoint model: 'person' with COCO's skeleton).
--output_json FILE also saves every detection (all scores, not only those drawn) as COCO result entries, each
with the image's "file_name", to compare or post-process without re-running the model.

A detectron2 config and checkpoint run in detectron2 mode (images read with PIL and their EXIF orientation, as
detectron2's demo reads them); detectron2's KEY VALUE opts follow the flags (before --images, which takes
every name after it):

    python tools/infer_simple.py --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
        --image_dir demo MODEL.WEIGHTS model_final.pth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from pydetectron.config.detectron2_defaults import D2_DEFAULTS
from pydetectron.data.catalog import register_from_string
from pydetectron.data.minibatch import load_image
from pydetectron.engine.dataset_cfg import DatasetMismatchError
from pydetectron.engine.predictor import Predictor
from pydetectron.evaluation.coco_results import image_results
from pydetectron.utils.cli import (
    add_config_args,
    add_register_arg,
    add_weights_args,
    check_config_args,
    load_cfg,
    weights_of,
)
from pydetectron.vis import draw_detections, save_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, "config YAML the model was trained with (--config-file for a detectron2 YAML)",
                    "TEST.SCALE 600")
    add_weights_args(parser)
    parser.add_argument("--dataset",
                        help="where class names (and the keypoint skeleton) come from: 'coco' (COCO's 80 classes), "
                             "'keypoints_coco', a --dataset short name or a catalog dataset (default: the cfg's "
                             "datasets when their json is here, else COCO's names by the model's class count)")
    add_register_arg(parser)
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--image_dir", help="folder of images (non-image files are skipped)")
    images.add_argument("--images", nargs="+", help="image files")
    parser.add_argument("--output_dir", default="infer_outputs", help="where the pictures go (default infer_outputs)")
    parser.add_argument("--thresh", type=float, default=0.7, help="draw detections scoring at least this (0.7)")
    parser.add_argument("--kp_thresh", type=float, default=2.0, help="draw keypoints whose logit exceeds this (2)")
    parser.add_argument("--output_ext", default="jpg", choices=["jpg", "png", "pdf"], help="picture format")
    parser.add_argument("--output_json", metavar="FILE",
                        help="also write every detection as a COCO result entry (bbox [x, y, w, h], score, json "
                             "category_id of the class names' dataset, segmentation RLE, keypoints) with the "
                             "image's file_name and its index as image_id")
    parser.add_argument("--no_cuda", dest="cuda", action="store_false", help="run on the CPU")
    args = parser.parse_args(argv)
    if args.load_ckpt and args.load_detectron:
        parser.error("give one of --load_ckpt or --load_detectron, not both")
    check_config_args(parser, args)
    swallowed = [name for name in args.images or [] if name in D2_DEFAULTS]
    if args.config_file and swallowed:
        parser.error(f"--images took the detectron2 key(s) {swallowed} as image names: put detectron2 KEY VALUE "
                     "opts before --images (or use --image_dir)")
    return args


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
    cfg = load_cfg(args)
    device = torch.device("cuda", 0) if args.cuda and torch.cuda.is_available() else torch.device("cpu")
    try:
        predictor = Predictor.from_flags(cfg, *weights_of(args, cfg), device, args.dataset)
    except DatasetMismatchError as err:
        sys.exit(f"error: {err}")
    if args.output_json and cfg.MODEL.RPN_ONLY:
        sys.exit("error: --output_json writes class detections; an RPN-only model has no classes")
    skeleton = [list(pair) for pair in predictor.meta.skeleton or []]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    results: list[dict] = []
    for index, path in enumerate(list_images(args.image_dir, args.images)):
        try:
            image = load_image(str(path), predictor.settings)  # cv2, or PIL + EXIF in detectron2 mode
        except OSError:
            print(f"Skipping {path}: cannot be read as an image")
            continue
        tic = time.perf_counter()
        detections = predictor(image)
        elapsed = time.perf_counter() - tic
        shown = int((detections["scores"] >= args.thresh).sum())
        out_path = output_dir / f"{path.name}.{args.output_ext}"
        picture = draw_detections(image, detections, predictor.class_names, args.thresh, args.kp_thresh, skeleton)
        save_image(picture, out_path)
        written += 1
        print(f"{path.name}: {elapsed:.3f} s, {shown} detections >= {args.thresh} -> {out_path}")
        if args.output_json:
            results += coco_entries(index, path.name, detections, predictor)
    print(f"Wrote {written} pictures to {output_dir}")
    if args.output_json:
        write_json(args.output_json, results)
        print(f"Wrote {len(results)} results to {args.output_json}")


def coco_entries(index: int, file_name: str, detections: dict, predictor: Predictor) -> list[dict]:
    """One image's detections as COCO result entries, one per detection as detectron2's ``instances_to_coco_json``
    writes them (bbox, score and, where the model has them, segmentation and keypoints), tagged with the file name."""
    to_json = predictor.meta.contiguous_category_id_to_json_id
    category_ids = [0] + [to_json[c] for c in range(1, predictor.meta.num_classes)]
    detectron2 = predictor.cfg.MODEL.CONVENTIONS == "detectron2"
    per_task = image_results(index, detections, category_ids, predictor.cfg.KRCNN.KEYPOINT_CONFIDENCE, detectron2)
    entries = [dict(entry, file_name=file_name) for entry in per_task["bbox"]]
    for task, field in (("segm", "segmentation"), ("keypoints", "keypoints")):
        for entry, extra in zip(entries, per_task.get(task, [])):
            entry[field] = extra[field]
    return entries


def write_json(path: str, results: list[dict]) -> None:
    """`results` to `path` through a temporary file, so a reader never sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(results))
    partial.replace(target)


if __name__ == "__main__":
    main()
