"""Keypoint R-CNN training targets (Detectron's ``roi_data/keypoint_rcnn.py`` and ``utils/keypoints.py``).

Keypoint RoIs are drawn independently of the Fast R-CNN sample, from every labelled candidate box of the
image (gt boxes + proposals, ``targets.fast_rcnn.LabelledBoxes``): a box qualifies when its overlap
with its gt is >= ``TRAIN.FG_THRESH`` and at least one visible keypoint of that gt lies inside it (edges
included); at most ``fg_rois_per_image`` of them are drawn at random without replacement. Each keypoint
becomes the index of a heatmap cell (``y * S + x``, ``S = KRCNN.HEATMAP_SIZE``) with weight 1, or weight 0
when it is invisible or falls outside the RoI.

The detector calls :func:`keypoint_rcnn_targets` with ``FastRCNNTargets.labelled`` and the roidb, pools
``KeypointTargets.rois`` with the keypoint head and feeds the rest to ``keypoint_head.keypoint_rcnn_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class KeypointTargets:
    """rois ``(F, 5)`` = [batch, x1, y1, x2, y2] network-input pixels; locations ``(F, K)`` int64 heatmap
    cell index; weights ``(F, K)`` float32 (1 = visible keypoint inside its RoI); normalizer: Detectron's
    ``keypoint_loss_normalizer`` = visible count / (IMS_PER_BATCH * BATCH_SIZE_PER_IM * FG_FRACTION * K);
    valid: Detectron's ``finalize_keypoint_minibatch`` verdict (more than
    ``KRCNN.MIN_KEYPOINT_COUNT_FOR_VALID_MINIBATCH`` visible keypoints)."""

    rois: torch.Tensor
    locations: torch.Tensor
    weights: torch.Tensor
    normalizer: float
    valid: bool


def keypoints_to_heatmap_labels(
    keypoints: torch.Tensor, rois: torch.Tensor, heatmap_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detectron's ``keypoints_to_heatmap_labels``.

    keypoints ``(F, K, 3)`` = (x, y, visibility), rois ``(F, 4)`` inclusive ``[x1, y1, x2, y2]``, same
    coordinates. A keypoint maps to cell ``floor((x - x1) * S / (x2 - x1))`` (same for y); one exactly on
    the right / bottom edge goes to cell S - 1. Returns locations ``(F, K)`` int64 (``y * S + x``, 0 where
    invalid) and weights ``(F, K)`` float32 (1 where visible and inside ``[0, S)^2``).
    """
    s = heatmap_size
    kps = keypoints.to(torch.float32)
    rois = rois.to(torch.float32)
    x, y, vis = kps[..., 0], kps[..., 1], kps[..., 2]
    x1, y1, x2, y2 = (rois[:, i : i + 1] for i in range(4))
    cx = torch.floor((x - x1) * (s / (x2 - x1)))
    cy = torch.floor((y - y1) * (s / (y2 - y1)))
    cx = torch.where(x == x2, torch.full_like(cx, s - 1), cx)
    cy = torch.where(y == y2, torch.full_like(cy, s - 1), cy)
    valid = (cx >= 0) & (cy >= 0) & (cx < s) & (cy < s) & (vis > 0)
    locations = torch.where(valid, cy * s + cx, torch.zeros_like(cx)).to(torch.int64)
    return locations, valid.to(torch.float32)


def _keypoints_of(entry: dict, index: int, device: torch.device) -> torch.Tensor:
    kps = entry.get("gt_keypoints")
    if kps is None:
        raise ValueError(f"roidb[{index}] has no gt_keypoints; keypoint training needs (G, K, 3) keypoints")
    kps = torch.as_tensor(kps, dtype=torch.float32, device=device)
    if kps.dim() != 3 or kps.shape[2] != 3:
        raise ValueError(f"roidb[{index}] gt_keypoints must be (G, K, 3), got {tuple(kps.shape)}")
    return kps


def _image_keypoint_rois(
    labelled, kps: torch.Tensor, fg_thresh: float, fg_rois_per_image: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Indices into the labelled boxes of the sampled keypoint RoIs of one image."""
    gt_inds = labelled.gt_inds
    has_gt = gt_inds >= 0
    if kps.shape[0] == 0 or not bool(has_gt.any()):
        return torch.zeros(0, dtype=torch.int64, device=gt_inds.device)
    matched = kps[gt_inds.clamp(min=0)]  # (B, K, 3)
    boxes = labelled.boxes
    inside = (
        (matched[..., 0] >= boxes[:, 0:1])
        & (matched[..., 0] <= boxes[:, 2:3])
        & (matched[..., 1] >= boxes[:, 1:2])
        & (matched[..., 1] <= boxes[:, 3:4])
    )
    visible_inside = (inside & (matched[..., 2] > 0)).any(dim=1)
    cand = torch.nonzero(has_gt & (labelled.max_overlaps >= fg_thresh) & visible_inside).squeeze(1)
    if cand.numel() > fg_rois_per_image:
        perm = torch.randperm(cand.numel(), generator=generator, device="cpu").to(cand.device)
        cand = cand[perm[:fg_rois_per_image]]
    return cand


def keypoint_rcnn_targets(
    labelled: Sequence,
    roidb: Sequence[dict],
    heatmap_size: int,
    fg_thresh: float,
    fg_rois_per_image: int,
    loss_normalizer_denominator: float,
    min_keypoint_count: int,
    generator: torch.Generator | None = None,
) -> KeypointTargets:
    """Keypoint RoIs and heatmap labels for a minibatch.

    Args:
        labelled: per image, the candidate boxes (``targets.fast_rcnn.LabelledBoxes``: ``boxes`` ``(B, 4)``
            network-input pixels, ``max_overlaps`` ``(B,)``, ``gt_inds`` ``(B,)`` roidb gt index or -1).
        roidb: the minibatch's entries; ``gt_keypoints`` ``(G, K, 3)`` in network-input coordinates.
        heatmap_size: ``KRCNN.HEATMAP_SIZE``; fg_thresh: ``TRAIN.FG_THRESH``;
        fg_rois_per_image: ``int(TRAIN.FG_FRACTION * TRAIN.BATCH_SIZE_PER_IM)``;
        loss_normalizer_denominator: ``TRAIN.IMS_PER_BATCH * TRAIN.BATCH_SIZE_PER_IM * TRAIN.FG_FRACTION * K``;
        min_keypoint_count: ``KRCNN.MIN_KEYPOINT_COUNT_FOR_VALID_MINIBATCH``.
    """
    if len(labelled) != len(roidb):
        raise ValueError(f"{len(labelled)} labelled images for {len(roidb)} roidb entries")
    rois, locations, weights = [], [], []
    num_kps = None
    for b, (lab, entry) in enumerate(zip(labelled, roidb)):
        kps = _keypoints_of(entry, b, lab.boxes.device)
        if num_kps is not None and kps.shape[1] != num_kps:
            raise ValueError(f"roidb[{b}] has {kps.shape[1]} keypoints per instance, earlier images {num_kps}")
        num_kps = kps.shape[1]
        sel = _image_keypoint_rois(lab, kps, fg_thresh, fg_rois_per_image, generator)
        boxes = lab.boxes[sel].to(torch.float32)
        loc, w = keypoints_to_heatmap_labels(kps[lab.gt_inds[sel]], boxes, heatmap_size)
        rois.append(torch.cat([boxes.new_full((boxes.shape[0], 1), float(b)), boxes], dim=1))
        locations.append(loc)
        weights.append(w)
    device = labelled[0].boxes.device if labelled else torch.device("cpu")
    k = num_kps or 0
    weights_t = torch.cat(weights) if weights else torch.zeros((0, k), device=device)
    num_visible = float(weights_t.sum())
    return KeypointTargets(
        rois=torch.cat(rois) if rois else torch.zeros((0, 5), device=device),
        locations=torch.cat(locations) if locations else torch.zeros((0, k), dtype=torch.int64, device=device),
        weights=weights_t,
        normalizer=num_visible / loss_normalizer_denominator,
        valid=weights_t.numel() > 0 and num_visible > min_keypoint_count,
    )
