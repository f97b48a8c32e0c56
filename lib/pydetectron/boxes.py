"""Box arithmetic with Detectron's conventions: pure tensor functions, no model knowledge.

Boxes are ``[x1, y1, x2, y2]`` in pixels. Detectron treats coordinates as *inclusive* pixel indices, so a
box's width is ``x2 - x1 + 1``; every function takes ``legacy_plus_one`` (default ``True``, Detectron) and
with ``False`` uses the continuous convention of detectron2 / torchvision (width ``x2 - x1``).

Box-coder ``weights`` are ``(wx, wy, ww, wh)``: ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for Fast R-CNN.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "BBOX_XFORM_CLIP",
    "box_area",
    "box_iou",
    "box_overlaps_with_gt",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "expand_boxes",
    "filter_small_boxes",
    "flip_boxes",
    "unique_boxes",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]

# Detectron's cfg.BBOX_XFORM_CLIP: largest log-scale change a decoded box may take (avoids exp overflow).
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def _offset(legacy_plus_one: bool) -> float:
    return 1.0 if legacy_plus_one else 0.0


def _check_boxes(boxes: Tensor, name: str, tiled: bool = False) -> None:
    if boxes.dim() != 2 or (boxes.shape[1] != 4 and not (tiled and boxes.shape[1] % 4 == 0)):
        want = "(N, 4*C)" if tiled else "(N, 4)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(boxes.shape)}")


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    if len(weights) != 4 or any(float(w) <= 0 for w in weights):
        raise ValueError(f"box coder weights must be 4 positive numbers (wx, wy, ww, wh), got {weights!r}")
    wx, wy, ww, wh = (float(w) for w in weights)
    return wx, wy, ww, wh


def _sizes_and_centers(boxes: Tensor, offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    widths = boxes[:, 2] - boxes[:, 0] + offset
    heights = boxes[:, 3] - boxes[:, 1] + offset
    return widths, heights, boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights


def box_area(boxes: Tensor, legacy_plus_one: bool = True) -> Tensor:
    """Areas of ``boxes`` ``(N, 4)`` -> ``(N,)`` (Detectron's ``boxes_area``)."""
    _check_boxes(boxes, "boxes")
    off = _offset(legacy_plus_one)
    return (boxes[:, 2] - boxes[:, 0] + off) * (boxes[:, 3] - boxes[:, 1] + off)


def box_iou(boxes_a: Tensor, boxes_b: Tensor, legacy_plus_one: bool = True) -> Tensor:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes -> ``(N, M)`` (Detectron's ``bbox_overlaps``).

    Boxes that do not intersect (intersection width or height <= 0) have IoU exactly 0.
    """
    _check_boxes(boxes_a, "boxes_a")
    _check_boxes(boxes_b, "boxes_b")
    off = _offset(legacy_plus_one)
    ax1, ay1, ax2, ay2 = (boxes_a[:, i, None] for i in range(4))
    bx1, by1, bx2, by2 = (boxes_b[None, :, i] for i in range(4))
    inter_w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1) + off).clamp(min=0)
    inter_h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1) + off).clamp(min=0)
    inter = inter_w * inter_h
    union = box_area(boxes_a, legacy_plus_one)[:, None] + box_area(boxes_b, legacy_plus_one)[None, :] - inter
    # Non-intersecting pairs give 0 / union = 0; the clamp only guards two zero-area boxes (0 / 0).
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def box_overlaps_with_gt(
    boxes: Tensor, gt_boxes: Tensor, gt_is_crowd: Tensor, crowd_filter_thresh: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Each box's best IoU with the gt boxes (crowd ones included) and that gt's index, as Detectron's
    ``_merge_proposal_boxes_into_roidb`` records them: IoU 0 and index -1 where no gt overlaps. With
    ``crowd_filter_thresh`` > 0, a box covered by a crowd region beyond it (intersection over the box's own
    area, COCO's IoU against crowds) gets overlap -1 (Detectron's ``_filter_crowd_proposals``).

    boxes ``(P, 4)``, gt_boxes ``(G, 4)``, gt_is_crowd ``(G,)`` bool -> overlaps ``(P,)``, gt index ``(P,)``."""
    _check_boxes(boxes, "boxes")
    _check_boxes(gt_boxes, "gt_boxes")
    overlaps = boxes.new_zeros(boxes.shape[0])
    best = torch.full((boxes.shape[0],), -1, dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return overlaps, best
    maxes, argmaxes = box_iou(boxes, gt_boxes).max(dim=1)
    hit = maxes > 0
    overlaps, best = torch.where(hit, maxes, overlaps), torch.where(hit, argmaxes, best)
    if crowd_filter_thresh > 0 and bool(gt_is_crowd.any()):
        crowds = gt_boxes[gt_is_crowd]
        top_left = torch.maximum(boxes[:, None, :2], crowds[None, :, :2])
        bottom_right = torch.minimum(boxes[:, None, 2:], crowds[None, :, 2:])
        inter = (bottom_right - top_left + 1).clamp(min=0).prod(dim=2)
        covered = (inter / box_area(boxes).clamp(min=1e-12)[:, None]).max(dim=1).values > crowd_filter_thresh
        overlaps = torch.where(covered, -1.0, overlaps)
    return overlaps, best


def encode_boxes(
    boxes: Tensor, gt_boxes: Tensor, weights: Sequence[float], legacy_plus_one: bool = True
) -> Tensor:
    """Regression targets taking ``boxes`` to ``gt_boxes``, both ``(N, 4)`` -> ``(N, 4)`` deltas.

    Detectron's ``bbox_transform_inv``: ``dx = wx * (gt_cx - cx) / w``, ``dw = ww * log(gt_w / w)``.
    """
    _check_boxes(boxes, "boxes")
    _check_boxes(gt_boxes, "gt_boxes")
    if boxes.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f"encode_boxes needs as many boxes as gt_boxes, got {boxes.shape[0]} and {gt_boxes.shape[0]}")
    wx, wy, ww, wh = _check_weights(weights)
    off = _offset(legacy_plus_one)
    w, h, cx, cy = _sizes_and_centers(boxes, off)
    gw, gh, gcx, gcy = _sizes_and_centers(gt_boxes, off)
    return torch.stack(
        (
            wx * (gcx - cx) / w,
            wy * (gcy - cy) / h,
            ww * torch.log(gw / w),
            wh * torch.log(gh / h),
        ),
        dim=1,
    )


def decode_boxes(
    boxes: Tensor,
    deltas: Tensor,
    weights: Sequence[float],
    clip: float = BBOX_XFORM_CLIP,
    legacy_plus_one: bool = True,
) -> Tensor:
    """Apply ``deltas`` ``(N, 4*C)`` to ``boxes`` ``(N, 4)`` -> predicted boxes ``(N, 4*C)``.

    Detectron's ``bbox_transform``: class-tiled deltas decode against the same box; ``dw``/``dh`` are
    clamped to ``clip`` before ``exp``; with ``legacy_plus_one`` the far corner is ``ctr + w/2 - 1``.
    """
    _check_boxes(boxes, "boxes")
    _check_boxes(deltas, "deltas", tiled=True)
    if boxes.shape[0] != deltas.shape[0]:
        raise ValueError(f"decode_boxes needs one box per row of deltas, got {boxes.shape[0]} and {deltas.shape[0]}")
    wx, wy, ww, wh = _check_weights(weights)
    off = _offset(legacy_plus_one)
    boxes = boxes.to(deltas.dtype)
    w, h, cx, cy = (t[:, None] for t in _sizes_and_centers(boxes, off))
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=clip)
    dh = (deltas[:, 3::4] / wh).clamp(max=clip)
    pred_cx = dx * w + cx
    pred_cy = dy * h + cy
    pred_w = torch.exp(dw) * w
    pred_h = torch.exp(dh) * h
    pred = torch.stack(
        (
            pred_cx - 0.5 * pred_w,
            pred_cy - 0.5 * pred_h,
            pred_cx + 0.5 * pred_w - off,
            pred_cy + 0.5 * pred_h - off,
        ),
        dim=2,
    )
    return pred.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, height: float, width: float, legacy_plus_one: bool = True) -> Tensor:
    """Clip boxes ``(N, 4*C)`` (plain or class-tiled) into the image; returns a new tensor.

    With ``legacy_plus_one`` the range is ``[0, W - 1] x [0, H - 1]`` (Detectron's ``clip_tiled_boxes``),
    otherwise ``[0, W] x [0, H]``.
    """
    _check_boxes(boxes, "boxes", tiled=True)
    off = _offset(legacy_plus_one)
    x_max = float(width) - off
    y_max = float(height) - off
    tiled = boxes.reshape(boxes.shape[0], boxes.shape[1] // 4, 4)  # explicit: also right for zero rows
    clipped = torch.stack(
        (
            tiled[..., 0].clamp(0, x_max),
            tiled[..., 1].clamp(0, y_max),
            tiled[..., 2].clamp(0, x_max),
            tiled[..., 3].clamp(0, y_max),
        ),
        dim=2,
    )
    return clipped.reshape(boxes.shape)


def flip_boxes(boxes: Tensor, width: float, legacy_plus_one: bool = True) -> Tensor:
    """Mirror boxes ``(N, 4*C)`` left-right in an image ``width`` wide: ``x1' = W - x2 - 1``."""
    _check_boxes(boxes, "boxes", tiled=True)
    off = _offset(legacy_plus_one)
    flipped = boxes.clone()
    flipped[:, 0::4] = width - boxes[:, 2::4] - off
    flipped[:, 2::4] = width - boxes[:, 0::4] - off
    return flipped


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale boxes ``(N, 4)`` about their centres by ``scale`` (Detectron's ``expand_boxes``, no +1)."""
    _check_boxes(boxes, "boxes")
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=1)


def filter_small_boxes(
    boxes: Tensor, min_size: float, im_info: Tensor | None = None, legacy_plus_one: bool = True
) -> Tensor:
    """Boolean keep-mask ``(N,)`` for boxes ``(N, 4)`` big enough to keep.

    Without ``im_info`` this is Detectron's ``filter_small_boxes``: keep width and height ``> min_size``.
    With ``im_info = (height, width, scale)`` it is ``_filter_boxes`` of Detectron's proposal generator:
    sides measured at the *original* image scale must be ``>= max(min_size, 1)`` and the box centre must
    lie inside the (scaled) image.
    """
    _check_boxes(boxes, "boxes")
    off = _offset(legacy_plus_one)
    widths = boxes[:, 2] - boxes[:, 0] + off
    heights = boxes[:, 3] - boxes[:, 1] + off
    if im_info is None:
        return (widths > min_size) & (heights > min_size)
    if im_info.numel() != 3:
        raise ValueError(f"im_info must be (height, width, scale), got shape {tuple(im_info.shape)}")
    im_h, im_w, scale = (float(v) for v in im_info.reshape(3).tolist())
    min_size = max(float(min_size), 1.0)
    w_orig = (boxes[:, 2] - boxes[:, 0]) / scale + off
    h_orig = (boxes[:, 3] - boxes[:, 1]) / scale + off
    ctr_x = boxes[:, 0] + widths / 2.0
    ctr_y = boxes[:, 1] + heights / 2.0
    return (w_orig >= min_size) & (h_orig >= min_size) & (ctr_x < im_w) & (ctr_y < im_h)


def unique_boxes(boxes: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Boxes ``(N, 4)`` grouped as Detectron's ``unique_boxes`` (``scale`` 1) and test-time ``DEDUP_BOXES``
    (``scale`` 1/16) group them: by the hash ``round(boxes * scale) . (1, 1e3, 1e6, 1e9)`` (which, as in
    Detectron, can join different boxes once rounded coordinates reach 1000). Returns ``(index, inverse)``
    int64: ``index`` the first box of each group in input order, ``boxes[index][inverse]`` each box's group
    representative."""
    _check_boxes(boxes, "boxes")
    if boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=boxes.device)
        return empty, empty
    weights = torch.tensor([1.0, 1e3, 1e6, 1e9], dtype=torch.float64, device=boxes.device)
    hashes = torch.round(boxes.double() * scale) @ weights
    _, group, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    order = torch.arange(boxes.shape[0], device=boxes.device)
    first = torch.full((counts.shape[0],), boxes.shape[0], dtype=torch.int64, device=boxes.device)
    first = first.scatter_reduce(0, group, order, reduce="amin")
    index, rank = torch.sort(first)
    inverse = torch.empty_like(rank).scatter_(0, rank, torch.arange(rank.shape[0], device=boxes.device))[group]
    return index, inverse


def xywh_to_xyxy(boxes: Tensor, legacy_plus_one: bool = True) -> Tensor:
    """``(N, 4)`` ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` (Detectron: ``x2 = x + max(0, w - 1)``)."""
    _check_boxes(boxes, "boxes")
    off = _offset(legacy_plus_one)
    return torch.cat((boxes[:, :2], boxes[:, :2] + (boxes[:, 2:] - off).clamp(min=0)), dim=1)


def xyxy_to_xywh(boxes: Tensor, legacy_plus_one: bool = True) -> Tensor:
    """``(N, 4)`` ``[x1, y1, x2, y2]`` -> ``[x, y, w, h]`` with ``w = x2 - x1 + 1`` (Detectron)."""
    _check_boxes(boxes, "boxes")
    off = _offset(legacy_plus_one)
    return torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + off), dim=1)
