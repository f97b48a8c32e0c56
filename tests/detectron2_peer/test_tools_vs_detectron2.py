"""tools/test_net.py and tools/infer_simple.py in detectron2 mode against a detectron2 build (skipped without one).

detectron2's R-50-FPN Mask R-CNN of our shipped YAML (with ``_BASE_``), seeded random weights calibrated so that
detections exist, saved by detectron2's DetectionCheckpointer as model_final.pth; detectron2's DefaultPredictor
on the images of a tiny generated shapes dataset (read as its DatasetMapper reads them) with its results written by
its own ``instances_to_coco_json``; then our two tools run as a user runs them (subprocesses, the YAML + KEY VALUE
opts + MODEL.WEIGHTS, the dataset through --register) and their result jsons must hold the same detections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest

pytest.importorskip("detectron2")

from pydetectron.data.shapes import generate_split  # noqa: E402
from pydetectron.utils.detection_diff import compare_detections, pair_detections  # noqa: E402
from pydetectron.utils.detectron2_peer import (  # noqa: E402
    calibrate_d2_model,
    d2_cfg,
    random_d2_model,
    save_d2_checkpoint,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "detectron2" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"
DATASET = "d2_tools_shapes_val"
# the same opts on both sides: the shapes' 3 classes, small test images (the shapes are 160-320 px a side), and a
# score threshold that the calibrated random model's scores straddle, so that it decides how many detections some
# images keep while others stay at TEST.DETECTIONS_PER_IMAGE (100)
OPTS = ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "256",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.7"]
BOX_TOL, SCORE_TOL, MIN_MASK_IOU = 1e-2, 1e-4, 0.99


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The dataset, detectron2's checkpoint and detectron2's COCO results (per image id) on it."""
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    root = tmp_path_factory.mktemp("d2_tools")
    ann_file = generate_split(root, "val", 3, seed=5)["instances"]
    gt = json.loads(ann_file.read_text())
    category_ids = sorted(c["id"] for c in gt["categories"])  # detectron2's contiguous ids follow sorted json ids
    images = {im["id"]: read_image(str(root / "val" / im["file_name"]), format="BGR") for im in gt["images"]}
    cfg = d2_cfg(str(CONFIG), OPTS)
    model = random_d2_model(cfg, seed=11)
    calibrate_d2_model(model, list(images.values()))
    weights = save_d2_checkpoint(model, root / "d2_model")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    predictor = DefaultPredictor(cfg)
    reference = {}
    for image_id, image in images.items():
        entries = instances_to_coco_json(predictor(image)["instances"].to("cpu"), image_id)
        for entry in entries:
            entry["category_id"] = category_ids[entry["category_id"]]
        reference[image_id] = entries
    return {"root": root, "ann_file": ann_file, "gt": gt, "weights": weights, "reference": reference}


def _run_tool(tool: str, args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]),
               PYDETECTRON_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def _as_detections(entries: list[dict], height: int, width: int) -> dict:
    """COCO result entries of one image (bbox and segmentation in each) as a detections dict, boxes xyxy."""
    xywh = np.array([e["bbox"] for e in entries], dtype=np.float64).reshape(-1, 4)
    masks = [mask_util.decode(e["segmentation"]) for e in entries]
    return {"xywh": xywh, "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            "scores": np.array([e["score"] for e in entries], dtype=np.float64),
            "classes": np.array([e["category_id"] for e in entries], dtype=np.int64),
            "masks": np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)}


def _check_same_detections(reference: dict, ours: dict, gt: dict) -> dict:
    """Per image: as many detections, paired ones equal within the tolerances; returns the worst differences."""
    worst = {"box_xywh": 0.0, "score": 0.0, "min_mask_iou": 1.0, "detections": []}
    for image in gt["images"]:
        image_id = image["id"]
        ref = _as_detections(reference[image_id], image["height"], image["width"])
        got = _as_detections(ours.get(image_id, []), image["height"], image["width"])
        assert len(got["scores"]) == len(ref["scores"]) > 0, (image_id, len(ref["scores"]), len(got["scores"]))
        diff = compare_detections(ref, got)
        assert diff.unpaired_reference == diff.unpaired_ours == 0, (image_id, diff)
        i, j = (np.array(index) for index in zip(*pair_detections(ref, got)))
        box = float(np.abs(ref["xywh"][i] - got["xywh"][j]).max())
        assert box <= BOX_TOL and diff.score <= SCORE_TOL and diff.mask_iou >= MIN_MASK_IOU, (image_id, box, diff)
        worst = {"box_xywh": max(worst["box_xywh"], box), "score": max(worst["score"], diff.score),
                 "min_mask_iou": min(worst["min_mask_iou"], diff.mask_iou),
                 "detections": worst["detections"] + [len(ref["scores"])]}
    print(f"detections per image and worst differences: {worst}")
    return worst


def _by_image(entries: list[dict], key: str = "image_id") -> dict:
    grouped = defaultdict(list)
    for entry in entries:
        grouped[entry[key]].append(entry)
    return grouped


def test_test_net_gives_detectron2s_detections(setup, tmp_path):
    register = f"{DATASET}:{setup['root'] / 'val'}:{setup['ann_file']}"
    out = tmp_path / "out"
    _run_tool("test_net.py", ["--config-file", str(CONFIG), "--register", register, "--dataset", DATASET,
                              "--no_cuda", "MODEL.WEIGHTS", setup["weights"], "OUTPUT_DIR", str(out), *OPTS], tmp_path)
    inference = out / "inference"
    boxes = json.loads((inference / f"bbox_{DATASET}_results.json").read_text())
    segms = json.loads((inference / f"segmentations_{DATASET}_results.json").read_text())
    assert len(boxes) == len(segms)
    ours = {}
    for image_id, entries in _by_image(boxes).items():  # both files list an image's detections in one order
        masks = _by_image(segms)[image_id]
        assert [m["score"] for m in masks] == [e["score"] for e in entries]
        ours[image_id] = [dict(e, segmentation=m["segmentation"]) for e, m in zip(entries, masks)]
    _check_same_detections(setup["reference"], ours, setup["gt"])
    ours_ap = json.loads((inference / "evaluation.json").read_text())[DATASET]
    for task, d2_ap in _d2_coco_ap(setup).items():  # the metrics detectron2's COCOEvaluator gets on its results
        assert [ours_ap[task][name] for name in AP_NAMES] == pytest.approx(d2_ap, abs=1e-3), (task, d2_ap)


AP_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def _d2_coco_ap(setup: dict) -> dict:
    """detectron2's COCOEvaluator metrics (its ``_evaluate_predictions_on_coco``) of its own results, as fractions."""
    import copy

    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
    from pycocotools.coco import COCO

    coco_gt = COCO(str(setup["ann_file"]))
    results = [entry for entries in setup["reference"].values() for entry in entries]
    return {task: list(_evaluate_predictions_on_coco(coco_gt, copy.deepcopy(results), task).stats[:6])
            for task in ("bbox", "segm")}


def test_infer_simple_gives_detectron2s_detections(setup, tmp_path):
    register = f"{DATASET}:{setup['root'] / 'val'}:{setup['ann_file']}"
    results = tmp_path / "detections.json"
    out = _run_tool("infer_simple.py", ["--config-file", str(CONFIG), "--register", register, "--dataset", DATASET,
                                        "--no_cuda", "--output_dir", str(tmp_path / "pictures"), "--output_json",
                                        str(results), "MODEL.WEIGHTS", setup["weights"], *OPTS,
                                        "--image_dir", str(setup["root"] / "val")], tmp_path)
    assert f"Wrote {len(setup['gt']['images'])} pictures" in out
    by_name = _by_image(json.loads(results.read_text()), "file_name")
    ours = {image["id"]: by_name.get(image["file_name"], []) for image in setup["gt"]["images"]}
    _check_same_detections(setup["reference"], ours, setup["gt"])
