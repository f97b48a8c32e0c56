"""How far two detectors' detections of one image are apart (a reference's and ours), for peer comparisons.

Detections are dicts of numpy arrays or tensors in original-image pixels: ``boxes (D, 4)`` x1, y1, x2, y2,
``scores (D,)``, ``classes (D,)``, optional ``masks (D, H, W)`` and ``keypoints (D, K, 3)``. Each reference
detection is paired greedily, by descending score, with the unpaired detection of the same class whose box
overlaps it most (IoU >= `min_iou`); what stays unpaired on either side is counted.

Keypoints have two discontinuities that are not numerical differences, both in detectron2's heatmap decoding
(the argmax of each heatmap resized bicubically to ``ceil(box width) x ceil(box height)`` pixels of the network
input): two boxes 0.0003 px apart on either side of an integer size are decoded on different grids, and a
resized heatmap whose two highest points differ by less than the float32 noise of the heatmaps (1e-4-1e-3
logits after 8 convs) may put its argmax at either. Given the input's scale (network-input pixels per image
pixel), keypoints of pairs whose input-frame box sizes straddle an integer, and (when the reference carries its
``keypoint_heatmaps`` ``(D, K, S, S)``) keypoints where the reference's resized heatmap at our keypoint is within
``tie_tolerance`` of its maximum, are counted in ``keypoint_ambiguous`` and their differences reported apart, in
``keypoint_ambiguous_px``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Tuple

import numpy as np
import torch
import torch.nn.functional as F


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
    keypoint_ambiguous: int = 0  # keypoints decoded on different grids or at tied maxima (module docstring)
    keypoint_ambiguous_px: float = float("nan")  # max |x or y difference| over those keypoints, pixels

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


def decoding_grids_differ(ref_boxes: np.ndarray, our_boxes: np.ndarray, input_scale: Tuple[float, float],
                          tolerance: float = 1e-3) -> np.ndarray:
    """``(P,)`` bool: paired boxes (original-image pixels) whose widths or heights in the network input
    (times `input_scale` = (x, y)) have an integer within `tolerance` px of the span between them, so that
    ``ceil`` may give them different heatmap decoding grids (the tolerance covers the rounding of the rescale)."""
    scale = np.array(input_scale, dtype=np.float64)
    sizes = [(boxes[:, 2:4].astype(np.float64) - boxes[:, 0:2]) * scale for boxes in (ref_boxes, our_boxes)]
    low, high = np.minimum(*sizes) - tolerance, np.maximum(*sizes) + tolerance
    return (np.floor(high) >= np.ceil(low)).any(axis=1)


def heatmap_ties(heatmaps: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, tolerance: float) -> np.ndarray:
    """``(P, K)`` bool: the other detector's network-input keypoint ``(P, K, 2)`` lies on another pixel than the
    maximum of the reference heatmap ``(P, K, S, S)`` decoded over its network-input box ``(P, 4)`` as detectron2
    decodes it (bicubic resize to the ceil'd box size), where that heatmap is within `tolerance` of its maximum."""
    ties = np.zeros(heatmaps.shape[:2], dtype=bool)
    for i, (maps, box, points) in enumerate(zip(heatmaps, boxes.astype(np.float64), keypoints.astype(np.float64))):
        width, height = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
        cols, rows = int(np.ceil(width)), int(np.ceil(height))
        resized = F.interpolate(torch.as_tensor(maps, dtype=torch.float32)[None], size=(rows, cols),
                                mode="bicubic", align_corners=False)[0].numpy()
        # detectron2: x = (x_int + 0.5) * width / ceil(width) + x1, inverted and rounded to a pixel of the map
        x = np.clip(np.rint((points[:, 0] - box[0]) * cols / width - 0.5), 0, cols - 1).astype(int)
        y = np.clip(np.rint((points[:, 1] - box[1]) * rows / height - 0.5), 0, rows - 1).astype(int)
        flat = resized.reshape(len(points), -1)
        at_ours = flat[np.arange(len(points)), y * cols + x]
        ties[i] = (flat.argmax(axis=1) != y * cols + x) & (flat.max(axis=1) - at_ours <= tolerance)
    return ties


def compare_detections(ref: Mapping[str, Any], ours: Mapping[str, Any], min_iou: float = 0.5,
                       input_scale: Tuple[float, float] | None = None,
                       tie_tolerance: float = 1e-3) -> DetectionDiff:
    """The :class:`DetectionDiff` of `ours` against `ref` (see the module docstring). `input_scale`: network-input
    pixels per image pixel (x, y) of the keypoint decoding; None compares every keypoint as one."""
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
        apart = np.abs(kr.astype(np.float64) - ko).max(axis=2)  # (P, K)
        ambiguous = np.zeros(apart.shape, dtype=bool)
        if input_scale is not None:
            ref_boxes = _numpy(ref["boxes"])[i]
            ambiguous |= decoding_grids_differ(ref_boxes, _numpy(ours["boxes"])[j], input_scale)[:, None]
            if "keypoint_heatmaps" in ref:
                scale = np.array(input_scale, dtype=np.float64)
                ambiguous |= heatmap_ties(_numpy(ref["keypoint_heatmaps"])[i], ref_boxes * np.tile(scale, 2),
                                          ko * scale, tie_tolerance)
        diff.keypoint_ambiguous = int(ambiguous.sum())
        diff.keypoint = float(apart[~ambiguous].max()) if (~ambiguous).any() else float("nan")
        if ambiguous.any():
            diff.keypoint_ambiguous_px = float(apart[ambiguous].max())
    return diff
