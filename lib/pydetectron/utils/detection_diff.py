"""How far two detectors' detections of one image are apart (a reference's and ours), for peer comparisons.

Detections are dicts of numpy arrays or tensors in original-image pixels: ``boxes (D, 4)`` x1, y1, x2, y2,
``scores (D,)``, ``classes (D,)``, optional ``masks (D, H, W)`` and ``keypoints (D, K, 3)``. Each reference
detection is paired greedily, by descending score, with the unpaired detection of the same class whose box
overlaps it most (IoU >= `min_iou`); what stays unpaired on either side is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass
class DetectionDiff:
    """Differences between a reference's detections and ours on one image (NaN where nothing was compared)."""

    reference: int  # detections of the reference
    ours: int
    unpaired_reference: int
    unpaired_ours: int
    box: float = float("nan")  # max |coordinate difference| over paired detections, pixels
    score: float = float("nan")  # max |score difference|
    mask_iou: float = float("nan")  # min mask IoU over pairs
    mask_pixels: float = float("nan")  # max fraction of the image's pixels where paired masks disagree
    keypoint: float = float("nan")  # max |x or y difference| over paired keypoints, pixels

    @property
    def paired(self) -> int:
        return self.reference - self.unpaired_reference


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` IoU of boxes without +1 (areas ``(x2 - x1) * (y2 - y1)``), in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def pair_detections(ref: Mapping[str, Any], ours: Mapping[str, Any], min_iou: float = 0.5) -> list:
    """``[(reference index, our index)]``: greedy by the reference's descending score, same class, best IoU."""
    ref_boxes, our_boxes = _numpy(ref["boxes"]), _numpy(ours["boxes"])
    if len(ref_boxes) == 0 or len(our_boxes) == 0:
        return []
    iou = box_iou(ref_boxes, our_boxes)
    iou[_numpy(ref["classes"])[:, None] != _numpy(ours["classes"])[None, :]] = -1.0
    pairs, taken = [], set()
    for i in np.argsort(-_numpy(ref["scores"]), kind="stable"):
        candidates = [(iou[i, j], j) for j in range(len(our_boxes)) if j not in taken and iou[i, j] >= min_iou]
        if candidates:
            j = max(candidates)[1]
            taken.add(j)
            pairs.append((int(i), int(j)))
    return pairs


def compare_detections(ref: Mapping[str, Any], ours: Mapping[str, Any], min_iou: float = 0.5) -> DetectionDiff:
    """The :class:`DetectionDiff` of `ours` against `ref` (see the module docstring)."""
    pairs = pair_detections(ref, ours, min_iou)
    diff = DetectionDiff(len(_numpy(ref["boxes"])), len(_numpy(ours["boxes"])),
                         len(_numpy(ref["boxes"])) - len(pairs), len(_numpy(ours["boxes"])) - len(pairs))
    if not pairs:
        return diff
    i, j = (np.array(index) for index in zip(*pairs))
    diff.box = float(np.abs(_numpy(ref["boxes"])[i].astype(np.float64) - _numpy(ours["boxes"])[j]).max())
    diff.score = float(np.abs(_numpy(ref["scores"])[i].astype(np.float64) - _numpy(ours["scores"])[j]).max())
    if "masks" in ref and "masks" in ours:
        a, b = _numpy(ref["masks"])[i] > 0, _numpy(ours["masks"])[j] > 0
        if a.shape != b.shape:
            raise ValueError(f"mask shapes differ: reference {a.shape[1:]}, ours {b.shape[1:]}")
        inter = (a & b).sum(axis=(1, 2))
        union = (a | b).sum(axis=(1, 2))
        diff.mask_iou = float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).min())
        diff.mask_pixels = float(((a ^ b).sum(axis=(1, 2)) / float(a.shape[1] * a.shape[2])).max())
    if "keypoints" in ref and "keypoints" in ours:
        kr, ko = _numpy(ref["keypoints"])[i][..., :2], _numpy(ours["keypoints"])[j][..., :2]
        diff.keypoint = float(np.abs(kr.astype(np.float64) - ko).max())
    return diff
