"""COCO metrics with pycocotools: the standard 12-line summary and Detectron's copy-paste CSV lines."""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pydetectron.modeling.keypoint_head import COCO_PERSON_OKS_SIGMAS

STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
    "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl"],
}
DETECTRON_TASK_NAMES = {"bbox": "box", "segm": "mask", "keypoints": "keypoint", "box_proposal": "box_proposal"}


def resolve_oks_sigmas(coco_gt: COCO, configured: Sequence[float] = ()) -> np.ndarray:
    """Per-keypoint OKS sigmas: KRCNN.OKS_SIGMAS if set, else the json category's `oks_sigmas`, else COCO's
    person sigmas when the category has COCO's 17 keypoints. Any other keypoint category must state its own."""
    keypoint_cats = [c for c in coco_gt.loadCats(coco_gt.getCatIds()) if c.get("keypoints")]
    if not keypoint_cats:
        raise ValueError("keypoint evaluation needs a category with 'keypoints' in the ground-truth json")
    category = keypoint_cats[0]
    num_keypoints = len(category["keypoints"])
    if configured:
        sigmas, source = np.asarray(configured, dtype=np.float64), "KRCNN.OKS_SIGMAS"
    elif category.get("oks_sigmas"):
        sigmas, source = np.asarray(category["oks_sigmas"], dtype=np.float64), f"category {category['name']!r}"
    elif num_keypoints == len(COCO_PERSON_OKS_SIGMAS):
        return COCO_PERSON_OKS_SIGMAS
    else:
        raise ValueError(
            f"category {category['name']!r} has {num_keypoints} keypoints, so COCO's person OKS sigmas do not "
            "apply: set KRCNN.OKS_SIGMAS or an 'oks_sigmas' list in the json category"
        )
    if len(sigmas) != num_keypoints:
        raise ValueError(f"{source} gives {len(sigmas)} OKS sigmas for {num_keypoints} keypoints")
    return sigmas


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO with no detections (pycocotools' loadRes cannot take an empty list)."""
    empty = COCO()
    empty.dataset = {"images": copy.deepcopy(coco_gt.dataset["images"]),
                     "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    empty.createIndex()
    return empty


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    iou_type: str,
    oks_sigmas: np.ndarray | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """Run COCOeval for `iou_type` ('bbox', 'segm', 'keypoints'); print its summary; return the AP figures.

    With no detections every AP is 0 (COCOeval's answer for categories that have ground truth).
    """
    if iou_type not in STAT_NAMES:
        raise ValueError(f"iou_type {iou_type!r} is unknown; valid: {', '.join(STAT_NAMES)}")
    coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if iou_type == "keypoints":
        sigmas = resolve_oks_sigmas(coco_gt) if oks_sigmas is None else np.asarray(oks_sigmas, dtype=np.float64)
        evaluator.params.kpt_oks_sigmas = sigmas
        # Only categories with keypoints take part (a dataset may mix in categories without them).
        evaluator.params.catIds = [c["id"] for c in coco_gt.loadCats(coco_gt.getCatIds()) if c.get("keypoints")]
        print_fn(f"Keypoint OKS sigmas used: {np.round(sigmas, 4).tolist()}")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {name: float(evaluator.stats[i]) for i, name in enumerate(STAT_NAMES[iou_type])}


def copypaste_lines(dataset_name: str, metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Detectron's compact CSV lines ('copypaste: ...') for each task's AP figures."""
    lines = [f"copypaste: Dataset: {dataset_name}"]
    for iou_type, figures in metrics.items():
        lines.append(f"copypaste: Task: {DETECTRON_TASK_NAMES.get(iou_type, iou_type)}")
        lines.append("copypaste: " + ",".join(figures))
        lines.append("copypaste: " + ",".join(f"{v:.4f}" for v in figures.values()))
    return lines
