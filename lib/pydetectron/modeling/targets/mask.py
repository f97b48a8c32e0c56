"""Mask R-CNN training targets (Detectron's ``roi_data/mask_rcnn.py`` and ``utils/segms.py``).

For every foreground RoI of the Fast R-CNN minibatch, the ground-truth instance whose tight box overlaps
it most (IoU of the RoI with the boxes enclosing each non-crowd segmentation) is rasterised inside the
RoI on an M x M grid, ``M = MRCNN.RESOLUTION``. Polygons are scaled into the box and rasterised by
pycocotools as Detectron's ``polys_to_mask_wrt_box``; a ``uint8 (H, W)`` mask (RLE annotations) is
sampled bilinearly at the centres of the M x M cells and thresholded at 0.5.

The detector calls :func:`mask_rcnn_targets` with the sampled RoIs and their labels, pools
``MaskTargets.rois`` with the mask head and feeds ``MaskTargets.targets`` to ``mask_head.mask_rcnn_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

from pydetectron.boxes import box_iou


@dataclass
class MaskTargets:
    """rois ``(F, 5)`` = [batch, x1, y1, x2, y2] network-input pixels, in the order of the input RoIs;
    targets ``(F, C*M*M)`` int32 of 1 / 0 / -1 (ignore), C = NUM_CLASSES or 1 (class-agnostic);
    roi_has_mask ``(R,)`` bool over the input RoIs (the rows of ``rois``)."""

    rois: torch.Tensor
    targets: torch.Tensor
    roi_has_mask: torch.Tensor


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _bitmap(segm) -> np.ndarray | None:
    """The segmentation as a ``(H, W)`` array if it is a mask (numpy or tensor), else None (polygons)."""
    if isinstance(segm, (np.ndarray, torch.Tensor)) and segm.ndim == 2:
        return _numpy(segm)
    return None


def _check_polygons(polys, gt_index: int) -> list[np.ndarray]:
    if not isinstance(polys, (list, tuple)) or len(polys) == 0:
        raise ValueError(f"roidb segms[{gt_index}] must be a non-empty list of flat polygons or a uint8 mask")
    out = []
    for p in polys:
        arr = np.asarray(p, dtype=np.float32).reshape(-1)
        if arr.size < 6 or arr.size % 2:
            raise ValueError(
                f"roidb segms[{gt_index}] has a polygon with {arr.size} coordinates; need an even number >= 6"
            )
        out.append(arr)
    return out


def segm_box(segm, gt_index: int) -> np.ndarray:
    """Tight ``[x1, y1, x2, y2]`` of one segmentation: min / max polygon coordinates (Detectron's
    ``polys_to_boxes``), or the first / last on pixel of a uint8 mask (all zeros for an empty mask)."""
    bitmap = _bitmap(segm)
    if bitmap is not None:
        ys, xs = np.nonzero(bitmap)
        if xs.size == 0:
            return np.zeros(4, dtype=np.float32)
        return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
    polys = _check_polygons(segm, gt_index)
    xs = np.concatenate([p[0::2] for p in polys])
    ys = np.concatenate([p[1::2] for p in polys])
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def polygons_to_mask_in_box(polys: Sequence[np.ndarray], box: np.ndarray, resolution: int) -> np.ndarray:
    """Rasterise polygons (flat ``[x0, y0, x1, y1, ...]``) inside `box` ``[x1, y1, x2, y2]`` to a
    ``(M, M)`` uint8 0/1 mask: coordinates are shifted to the box corner and scaled by M / max(x2 - x1, 1)
    (resp. y) in float32, then pycocotools rasterises each polygon and the union is taken."""
    m = resolution
    box = np.asarray(box, dtype=np.float32)
    w = np.maximum(box[2] - box[0], np.float32(1))
    h = np.maximum(box[3] - box[1], np.float32(1))
    scaled = []
    for poly in polys:
        p = np.array(poly, dtype=np.float32)
        p[0::2] = (p[0::2] - box[0]) * m / w
        p[1::2] = (p[1::2] - box[1]) * m / h
        scaled.append(p.astype(np.float64))
    rles = mask_util.frPyObjects(scaled, m, m)
    return (mask_util.decode(rles).sum(axis=2) > 0).astype(np.uint8)


def bitmap_to_mask_in_boxes(bitmap: np.ndarray, boxes: np.ndarray, resolution: int) -> np.ndarray:
    """Sample a uint8 ``(H, W)`` mask inside boxes ``(F, 4)`` on the same M x M cells as
    :func:`polygons_to_mask_in_box` (cell j spans ``x1 + [j, j+1) * max(x2 - x1, 1) / M``), bilinearly at
    the cell centres (pixel p spans [p, p+1)), and threshold at 0.5 -> ``(F, M, M)`` uint8."""
    m = resolution
    h_img, w_img = bitmap.shape
    b = torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    w = (b[:, 2] - b[:, 0]).clamp(min=1)
    h = (b[:, 3] - b[:, 1]).clamp(min=1)
    centres = (torch.arange(m, dtype=torch.float32) + 0.5) / m
    xs = b[:, 0:1] + centres[None] * w[:, None]  # (F, M) continuous x of the cell centres
    ys = b[:, 1:2] + centres[None] * h[:, None]
    grid = torch.stack(
        (
            (2 * xs / w_img - 1)[:, None, :].expand(-1, m, -1),
            (2 * ys / h_img - 1)[:, :, None].expand(-1, -1, m),
        ),
        dim=-1,
    )
    image = torch.from_numpy(np.ascontiguousarray(bitmap, dtype=np.float32))[None, None].expand(len(b), -1, -1, -1)
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled[:, 0] >= 0.5).to(torch.uint8).numpy()


def expand_to_class_specific(masks: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Detectron's ``_expand_to_class_specific_mask_targets``: masks ``(F, M*M)`` and classes ``(F,)`` ->
    ``(F, num_classes*M*M)`` holding each mask in its class's block and -1 (ignore) elsewhere; a row of
    class 0 (the background stand-in RoI) stays all -1."""
    num, mm = masks.shape
    out = torch.full((num, num_classes, mm), -1, dtype=masks.dtype, device=masks.device)
    fg = classes > 0
    rows = torch.nonzero(fg).squeeze(1)
    out[rows, classes[fg]] = masks[fg]
    return out.view(num, num_classes * mm)


def _image_mask_targets(
    rois: torch.Tensor, labels: torch.Tensor, entry: dict, im_scale: float, resolution: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: (indices into `rois` that get a mask, their classes, their ``(F, M*M)`` targets)."""
    m = resolution
    gt_classes = _numpy(entry["gt_classes"]).reshape(-1)
    is_crowd = _numpy(entry["is_crowd"]).reshape(-1).astype(bool)
    segms = entry["segms"]
    if len(segms) != len(gt_classes):
        raise ValueError(f"roidb entry has {len(segms)} segms for {len(gt_classes)} gt boxes")
    labels_np = labels.cpu().numpy()
    fg_inds = np.nonzero(labels_np > 0)[0]
    if fg_inds.size == 0:
        # Detectron keeps the head in the graph with one background RoI whose targets are all ignored.
        bg = np.nonzero(labels_np == 0)[0][:1]
        return bg, np.zeros(bg.size, dtype=np.int64), -np.ones((bg.size, m * m), dtype=np.int32)
    gt_inds = np.nonzero((gt_classes > 0) & ~is_crowd)[0]
    if gt_inds.size == 0:
        raise ValueError(f"image {entry.get('image_id')}: foreground RoIs but no non-crowd gt segmentation")
    gt_boxes = np.stack([segm_box(segms[g], int(g)) for g in gt_inds])
    rois_fg = rois[fg_inds].detach().float().cpu()
    overlaps = box_iou(rois_fg / im_scale, torch.from_numpy(gt_boxes) / im_scale)
    matched = gt_inds[overlaps.argmax(dim=1).numpy()]
    rois_np = rois_fg.numpy()
    masks = np.zeros((fg_inds.size, m * m), dtype=np.int32)
    for g in np.unique(matched):
        rows = np.nonzero(matched == g)[0]
        bitmap = _bitmap(segms[g])
        if bitmap is not None:
            masks[rows] = bitmap_to_mask_in_boxes(bitmap, rois_np[rows], m).reshape(rows.size, -1)
        else:
            polys = _check_polygons(segms[g], int(g))
            for r in rows:
                masks[r] = polygons_to_mask_in_box(polys, rois_np[r], m).reshape(-1)
    return fg_inds, labels_np[fg_inds].astype(np.int64), masks


def mask_rcnn_targets(
    rois: torch.Tensor,
    labels: torch.Tensor,
    roidb: Sequence[dict],
    im_scales: Sequence[float],
    resolution: int,
    num_classes: int,
    cls_specific: bool = True,
) -> MaskTargets:
    """Mask targets for a minibatch of sampled RoIs.

    Args:
        rois: ``(R, 5)`` = [batch, x1, y1, x2, y2] sampled RoIs in network-input pixels (inclusive).
        labels: ``(R,)`` int64 Fast R-CNN labels (0 = background).
        roidb: the minibatch's roidb entries (``gt_classes``, ``is_crowd``, ``segms`` in network-input
            coordinates, see ARCHITECTURE.md).
        im_scales: per image, the input / original scale (``im_info[:, 2]``): RoI-to-segmentation IoUs are
            taken at the original scale, as Detectron (its +1 box widths make IoU scale-dependent).
        resolution: ``MRCNN.RESOLUTION``; num_classes: ``MODEL.NUM_CLASSES``;
        cls_specific: ``MRCNN.CLS_SPECIFIC_MASK``.
    An image without foreground RoIs contributes its first background RoI with all-ignore targets.
    """
    if rois.dim() != 2 or rois.shape[1] != 5 or labels.shape != (rois.shape[0],):
        raise ValueError(f"rois must be (R, 5) and labels (R,), got {tuple(rois.shape)} and {tuple(labels.shape)}")
    batch = rois[:, 0].round().long()
    if batch.numel() and (batch.min() < 0 or batch.max() >= len(roidb)):
        raise ValueError(
            f"RoI batch indices span {batch.min().item()}..{batch.max().item()} but roidb has {len(roidb)} entries"
        )
    if len(im_scales) != len(roidb):
        raise ValueError(f"{len(im_scales)} im_scales for {len(roidb)} roidb entries")
    keep, classes, masks = [], [], []
    for b, entry in enumerate(roidb):
        idx = torch.nonzero(batch == b).squeeze(1)
        if idx.numel() == 0:
            continue
        sel, cls, m = _image_mask_targets(rois[idx, 1:], labels[idx], entry, float(im_scales[b]), resolution)
        keep.append(idx.cpu().numpy()[sel])
        classes.append(cls)
        masks.append(m)
    mm = resolution * resolution
    keep_np = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    order = np.argsort(keep_np, kind="stable")
    keep_t = torch.from_numpy(keep_np[order]).to(rois.device)
    targets = torch.from_numpy(np.concatenate(masks)[order] if masks else np.zeros((0, mm), np.int32))
    cls_t = torch.from_numpy(np.concatenate(classes)[order] if classes else np.zeros(0, np.int64))
    if cls_specific:
        targets = expand_to_class_specific(targets, cls_t, num_classes)
    roi_has_mask = torch.zeros(rois.shape[0], dtype=torch.bool, device=rois.device)
    roi_has_mask[keep_t] = True
    return MaskTargets(rois=rois[keep_t], targets=targets.to(rois.device), roi_has_mask=roi_has_mask)
