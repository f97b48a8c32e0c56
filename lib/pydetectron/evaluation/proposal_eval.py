"""Proposal recall (RPN-only models), as Detectron's ``evaluate_box_proposals`` computes it.

Detectron does not use COCOeval here: for each image it matches proposals to gt greedily (repeatedly the
best-covered gt box with the proposal covering it, both then used up), and the average recall is the mean,
over IoU thresholds 0.50:0.05:0.95, of the fraction of non-crowd gt boxes covered at that IoU. Gt boxes are
binned by their annotation ``area`` (``seg_areas``). Figures: ``AR{,s,m,l}@{100,1000}`` (Detectron's
``task_evaluation.evaluate_box_proposals``), slightly different from COCOeval's AR by design.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence

import numpy as np
import torch

from pydetectron.boxes import box_iou
from pydetectron.data.proposals import clean_proposals

AREA_RANGES = {"all": (0.0, 1e5**2), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2),
               "large": (96.0**2, 1e5**2)}
AREA_SUFFIXES = {"all": "", "small": "s", "medium": "m", "large": "l"}
LIMITS = (100, 1000)
IOU_THRESHOLDS = np.arange(0.5, 0.95 + 1e-5, 0.05)


def greedy_coverage(overlaps: np.ndarray) -> np.ndarray:
    """IoU at which each matched gt box is covered, for a ``(proposals, gt)`` overlap matrix: take the
    best-covered gt and its best proposal, record the IoU, retire both; ``min(P, G)`` rounds (unmatched
    gt boxes stay at 0)."""
    overlaps = overlaps.copy()
    covered = np.zeros(overlaps.shape[1])
    for j in range(min(overlaps.shape)):
        best_box = overlaps.argmax(axis=0)
        best = overlaps.max(axis=0)
        gt = int(best.argmax())
        covered[j] = best[gt]
        overlaps[best_box[gt], :] = -1
        overlaps[:, gt] = -1
    return covered


def box_proposal_recall(roidb: Sequence[Mapping], area: str = "all", limit: int | None = None) -> Dict[str, object]:
    """Detectron's ``evaluate_box_proposals`` for one area range and proposal limit.

    roidb entries need ``boxes`` / ``gt_classes`` / ``is_crowd`` / ``seg_areas`` (gt) and ``proposals``
    ``(P, 4)`` (best first), same coordinates. Returns ``ar``, ``recalls`` per threshold, ``num_pos``.
    """
    if area not in AREA_RANGES:
        raise ValueError(f"unknown area range {area!r}; valid: {', '.join(AREA_RANGES)}")
    lo, hi = AREA_RANGES[area]
    coverage, num_pos = [], 0
    for entry in roidb:
        gt = (np.asarray(entry["gt_classes"]) > 0) & ~np.asarray(entry["is_crowd"], dtype=bool)
        areas = np.asarray(entry["seg_areas"])[gt]
        gt_boxes = np.asarray(entry["boxes"], dtype=np.float32)[gt][(areas >= lo) & (areas <= hi)]
        num_pos += len(gt_boxes)
        proposals = np.asarray(entry["proposals"], dtype=np.float32).reshape(-1, 4)
        if limit is not None:
            proposals = proposals[:limit]
        if len(proposals) == 0:
            continue
        overlaps = box_iou(torch.from_numpy(proposals), torch.from_numpy(gt_boxes)).numpy()
        coverage.append(greedy_coverage(overlaps))
    covered = np.concatenate(coverage) if coverage else np.zeros(0)
    # no gt in the range: NaN, as Detectron's division by zero gives (not a recall of 0)
    recalls = np.array([(covered >= t).sum() / num_pos if num_pos else np.nan for t in IOU_THRESHOLDS])
    return {"ar": float(recalls.mean()), "recalls": recalls, "thresholds": IOU_THRESHOLDS, "num_pos": num_pos}


def evaluate_proposals(roidb: Sequence[Mapping], dataset_name: str,
                       print_fn: Callable[[str], None] = print) -> Dict[str, float]:
    """``AR@100, ARs@100, ARm@100, ARl@100, AR@1000, ...`` of the proposals, printed as Detectron logs them."""
    metrics = {f"AR{AREA_SUFFIXES[area]}@{limit}": box_proposal_recall(roidb, area, limit)["ar"]
               for limit in LIMITS for area in AREA_RANGES}
    pad = max(len(k) for k in metrics)
    print_fn(f"Proposal recall on {dataset_name}:")
    for key, value in metrics.items():
        print_fn(f"{key.ljust(pad)}: {value:.3f}")
    return metrics


def evaluate_rpn_detections(entries: Sequence[Mapping], detections: Mapping[int, Mapping], dataset_name: str,
                            print_fn: Callable[[str], None] = print) -> Dict[str, float]:
    """Recall of an RPN-only model's per-image ``boxes`` (best first), cleaned as Detectron cleans them when
    it reads its ``rpn_proposals.pkl`` back (clipped, de-duplicated, small ones out)."""
    roidb = [dict(entry, proposals=clean_proposals(detections[int(entry["id"])]["boxes"], entry["height"],
                                                   entry["width"]))
             for entry in entries]
    return evaluate_proposals(roidb, dataset_name, print_fn)

