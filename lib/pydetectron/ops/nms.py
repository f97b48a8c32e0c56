"""Non-maximum suppression: greedy NMS, per-label NMS and Detectron's soft-NMS, on CPU and CUDA.

Boxes are ``(N, 4)`` ``[x1, y1, x2, y2]`` tensors, scores ``(N,)`` of the same dtype and device (float32 or
float64; float16 too on CUDA). Inputs need not be contiguous.

``legacy_plus_one`` picks between the two IoU conventions in use:

* ``False`` (torchvision's): width = x2 - x1; a box is suppressed when IoU > ``iou_threshold``. The kept
  indices equal ``torchvision.ops.nms``'s exactly.
* ``True`` (Detectron's ``utils/cython_nms.pyx`` / ``box_utils.nms``): inclusive pixels, width = x2 - x1 + 1,
  and a box is suppressed when IoU >= ``iou_threshold``, as Detectron's ``ovr >= thresh`` (for float32
  boxes against the threshold rounded to float32, as Detectron's ``np.float32_t thresh``).

Ties: boxes are visited in stable descending score order, so among equal scores the lower index comes first
(torchvision's CPU order). Detectron sorts with numpy's unstable ``argsort()[::-1]``, whose order among equal
scores is unspecified; stable order is the deterministic choice closest to it.

NaN: NaN scores sort before every number (``torch.sort``'s rule), so those boxes are visited first. A box with
a NaN coordinate has a NaN IoU with every box, so it neither suppresses nor is suppressed. Both as torchvision.
``soft_nms`` rejects NaN scores, because its arg-max step has no defined answer for them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pydetectron.ops._extension import _C, OPS

SOFT_NMS_METHODS = {"hard": 0, "linear": 1, "gaussian": 2}  # Detectron's TEST.SOFT_NMS.METHOD codes

# Above this many box coordinates, per-label NMS loops over labels instead of offsetting boxes per label.
# These are torchvision's cut-offs, so batched_nms returns exactly what torchvision.ops.batched_nms does;
# with our kernels they also pick the faster way (1 CPU thread: 1000 boxes / 20 labels 0.13 ms shifted vs
# 0.33 ms looped; 12000 boxes / 80 labels 29 ms vs 7 ms).
_OFFSET_TRICK_MAX_NUMEL = {"cpu": 4000, "cuda": 20000}


def _check_boxes_and_scores(fn: str, boxes: Tensor, scores: Tensor) -> None:
    for name, value in (("boxes", boxes), ("scores", scores)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"{fn}: boxes must have shape (N, 4) as [x1, y1, x2, y2], got {tuple(boxes.shape)}")
    if scores.dim() != 1:
        raise ValueError(f"{fn}: scores must have shape (N,), got {tuple(scores.shape)}")
    if scores.size(0) != boxes.size(0):
        raise ValueError(f"{fn}: {boxes.size(0)} boxes but {scores.size(0)} scores")
    if boxes.device != scores.device:
        raise ValueError(f"{fn}: boxes are on {boxes.device} but scores on {scores.device}")
    if boxes.dtype != scores.dtype:
        raise TypeError(f"{fn}: boxes are {boxes.dtype} but scores {scores.dtype}; use one dtype")
    supported = (torch.float32, torch.float64, torch.float16) if boxes.is_cuda else (torch.float32, torch.float64)
    if boxes.dtype not in supported:
        names = ", ".join(str(t) for t in supported)
        raise TypeError(f"{fn}: {boxes.dtype} is not supported on {boxes.device.type} (use one of {names})")
    if boxes.is_cuda and not _C.with_cuda():
        raise RuntimeError(f"{fn}: got CUDA tensors, but pydetectron._C was built without its CUDA kernels")


def _check_number(fn: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{fn}: {name} must be a real number, got {value!r}")
    return float(value)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, legacy_plus_one: bool = False) -> Tensor:
    """Greedy NMS. Returns the kept indices into ``boxes`` (int64, ``(K,)``) by decreasing score.

    boxes: ``(N, 4)`` x1y1x2y2; scores: ``(N,)``. See the module docstring for the two IoU conventions
    (``legacy_plus_one``), tie order and NaN. N = 0 gives an empty tensor.
    """
    _check_boxes_and_scores("nms", boxes, scores)
    iou_threshold = _check_number("nms", "iou_threshold", iou_threshold)
    return OPS.nms(boxes, scores, iou_threshold, bool(legacy_plus_one))


def batched_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, legacy_plus_one: bool = False
) -> Tensor:
    """NMS within each label: boxes with different ``idxs`` never suppress each other.

    boxes: ``(N, 4)`` x1y1x2y2; scores: ``(N,)``; idxs: ``(N,)`` integer labels (e.g. class or image index).
    Returns kept indices (int64) by decreasing score, equal to ``torchvision.ops.batched_nms`` when
    ``legacy_plus_one`` is False. Small inputs shift each label's boxes apart and run one NMS (fastest);
    large ones loop over labels. As in torchvision, the shift rounds float32 coordinates slightly, so an IoU
    lying within rounding of the threshold may decide differently than a per-label loop would.
    """
    _check_boxes_and_scores("batched_nms", boxes, scores)
    iou_threshold = _check_number("batched_nms", "iou_threshold", iou_threshold)
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
        shape = tuple(idxs.shape) if isinstance(idxs, Tensor) else type(idxs).__name__
        raise ValueError(f"batched_nms: idxs must be a tensor of shape {tuple(scores.shape)}, got {shape}")
    if idxs.is_floating_point() or idxs.is_complex() or idxs.device != boxes.device:
        raise TypeError(f"batched_nms: idxs must be an integer tensor on {boxes.device}, got {idxs.dtype} "
                        f"on {idxs.device}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # Legacy IoU of two disjoint boxes is 0, which a threshold <= 0 suppresses: shifting cannot separate labels.
    offset_ok = not (legacy_plus_one and iou_threshold <= 0)
    if offset_ok and boxes.numel() <= _OFFSET_TRICK_MAX_NUMEL.get(boxes.device.type, 20000):
        return _batched_nms_shifted(boxes, scores, idxs, iou_threshold, legacy_plus_one)
    return _batched_nms_per_label(boxes, scores, idxs, iou_threshold, legacy_plus_one)


def _batched_nms_shifted(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, legacy_plus_one: bool
) -> Tensor:
    # Shifting label k by k * (extent + 1) (+ 2 with inclusive widths) keeps labels disjoint. For
    # non-negative coordinates the extent is boxes.max(), torchvision's choice, so results match it.
    gap = 2 if legacy_plus_one else 1
    extent = boxes.max() - boxes.min().clamp(max=0)
    offsets = idxs.to(boxes) * (extent + gap)
    return nms(boxes + offsets[:, None], scores, iou_threshold, legacy_plus_one)


def _batched_nms_per_label(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, legacy_plus_one: bool
) -> Tensor:
    # Group labels into contiguous runs once, then one kernel call per run on a slice (no per-label masks).
    by_label = torch.sort(idxs, stable=True)[1]
    counts = torch.unique_consecutive(idxs[by_label], return_counts=True)[1].tolist()
    sorted_boxes, sorted_scores = boxes[by_label], scores[by_label]
    kept, start = [], 0
    for count in counts:
        run = slice(start, start + count)
        kept.append(OPS.nms(sorted_boxes[run], sorted_scores[run], iou_threshold, legacy_plus_one) + start)
        start += count
    kept = by_label[torch.cat(kept)]
    return kept[scores[kept].sort(descending=True, stable=True)[1]]


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    sigma: float = 0.5,
    overlap_thresh: float = 0.3,
    score_thresh: float = 0.001,
    method: str = "linear",
    legacy_plus_one: bool = True,
) -> tuple[Tensor, Tensor]:
    """Detectron's soft-NMS (``box_utils.soft_nms``, TEST.SOFT_NMS): decay, don't drop, overlapping scores.

    boxes: ``(N, 4)`` x1y1x2y2; scores: ``(N,)``. ``method``: ``'linear'`` (score *= 1 - IoU when
    IoU > ``overlap_thresh``), ``'gaussian'`` (score *= exp(-IoU^2 / ``sigma``)) or ``'hard'`` (score = 0 when
    IoU > ``overlap_thresh``). A box is dropped once its decayed score falls below ``score_thresh``; a box is
    only decayed, and so only dropped, when it overlaps a selected box. Widths are inclusive (+1) as in
    Detectron unless ``legacy_plus_one`` is False.

    Returns ``(keep, new_scores)``: int64 indices into the input of the surviving boxes and their decayed
    scores (input dtype), both ``(K,)`` in Detectron's order, i.e. the order Detectron's cython soft_nms leaves
    its rows in, where row k holds the k-th box selected; Detectron's returned ``dets`` equal
    ``torch.cat([boxes[keep], new_scores[:, None]], 1)``. float32 inputs reproduce Detectron's float32
    arithmetic exactly; float64 inputs are computed in float64 (Detectron always casts to float32).
    """
    _check_boxes_and_scores("soft_nms", boxes, scores)
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft_nms: unknown method {method!r}; expected one of {sorted(SOFT_NMS_METHODS)}")
    sigma = _check_number("soft_nms", "sigma", sigma)
    overlap_thresh = _check_number("soft_nms", "overlap_thresh", overlap_thresh)
    score_thresh = _check_number("soft_nms", "score_thresh", score_thresh)
    if method == "gaussian" and sigma <= 0:
        raise ValueError(f"soft_nms: gaussian sigma must be > 0, got {sigma}")
    if torch.isnan(scores).any():
        raise ValueError("soft_nms: scores contain NaN")
    return OPS.soft_nms(
        boxes, scores, sigma, overlap_thresh, score_thresh, SOFT_NMS_METHODS[method], bool(legacy_plus_one)
    )
