"""RPN training targets: label anchors, subsample a minibatch, build box targets and loss weights.

Detectron's ``roi_data/rpn.py`` (``add_rpn_blobs`` / ``_get_rpn_blobs``), on tensors, per image:

1. anchors reaching more than ``RPN_STRADDLE_THRESH`` pixels outside the image are ignored
   (``-1`` keeps all);
2. ground truth is the image's non-crowd boxes (Detectron drops crowd boxes from RPN training entirely);
3. positives: for every gt box, the anchors with its highest IoU (ties included), and every anchor with
   IoU >= ``RPN_POSITIVE_OVERLAP``; at most ``int(RPN_FG_FRACTION * RPN_BATCH_SIZE_PER_IM)`` are kept,
   chosen at random without replacement;
4. negatives: the remaining minibatch slots are filled by drawing anchors with max IoU
   < ``RPN_NEGATIVE_OVERLAP`` uniformly *with* replacement (all of them if there are too few). As in
   Detectron this runs after step 3 and may relabel a positive whose best IoU is still below the
   negative threshold;
5. positives regress to their best gt with weights (1, 1, 1, 1); inside weights are 1 on positives, and
   outside weights ``1 / (number of labelled anchors of the image)`` so that a loss summed over anchors
   and divided by the number of images averages over the minibatch.

One deliberate difference: a gt box that overlaps no kept anchor at all contributes no "best anchor"
positives (Detectron would mark every zero-IoU anchor as a tie and thus positive).
Anchors are the concatenation over RPN levels of ``(H, W, A)``-ordered grids; boxes are inclusive-pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pydetectron.boxes import box_iou, encode_boxes

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class RPNSampling:
    """The plain values RPN labelling reads from cfg (``TRAIN.RPN_*``)."""

    batch_size_per_im: int = 256
    fg_fraction: float = 0.5
    positive_overlap: float = 0.7
    negative_overlap: float = 0.3
    straddle_thresh: float = 0.0

    @classmethod
    def from_cfg(cls, cfg) -> RPNSampling:
        return cls(
            batch_size_per_im=int(cfg.TRAIN.RPN_BATCH_SIZE_PER_IM),
            fg_fraction=float(cfg.TRAIN.RPN_FG_FRACTION),
            positive_overlap=float(cfg.TRAIN.RPN_POSITIVE_OVERLAP),
            negative_overlap=float(cfg.TRAIN.RPN_NEGATIVE_OVERLAP),
            straddle_thresh=float(cfg.TRAIN.RPN_STRADDLE_THRESH),
        )

    @property
    def num_fg(self) -> int:
        """Most positives per image: ``int(fg_fraction * batch_size_per_im)`` (truncated, as Detectron)."""
        return int(self.fg_fraction * self.batch_size_per_im)


@dataclass
class RPNTargets:
    """Targets for a minibatch of N images over R anchors (all levels concatenated)."""

    labels: Tensor  # (N, R) int64: 1 positive, 0 negative, -1 ignored
    bbox_targets: Tensor  # (N, R, 4) float32 deltas, zero off the positives
    bbox_inside_weights: Tensor  # (N, R, 4)
    bbox_outside_weights: Tensor  # (N, R, 4)


def rpn_gt_boxes(entry: dict, index: int, device: torch.device) -> Tensor:
    """The non-crowd, non-background gt boxes ``(G, 4)`` of a roidb entry (network-input pixels)."""
    for key in ("boxes", "gt_classes", "is_crowd"):
        if key not in entry:
            raise KeyError(f"roidb[{index}] has no {key!r}; RPN targets need boxes, gt_classes and is_crowd")
    boxes = torch.as_tensor(entry["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
    classes = torch.as_tensor(entry["gt_classes"], device=device).reshape(-1)
    crowd = torch.as_tensor(entry["is_crowd"], device=device).reshape(-1).bool()
    if not (boxes.shape[0] == classes.shape[0] == crowd.shape[0]):
        raise ValueError(
            f"roidb[{index}]: boxes {tuple(boxes.shape)}, gt_classes {tuple(classes.shape)} and is_crowd "
            f"{tuple(crowd.shape)} disagree in length"
        )
    return boxes[(classes > 0) & ~crowd]


def anchors_inside_image(anchors: Tensor, height: float, width: float, straddle: float) -> Tensor:
    """Anchors reaching at most ``straddle`` pixels outside a ``height x width`` image (``x1 >= -t``,
    ``x2 < W + t``, ...; Detectron's and detectron2's ``inside_box`` test); all of them when ``straddle < 0``."""
    if straddle < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    return (
        (anchors[:, 0] >= -straddle)
        & (anchors[:, 1] >= -straddle)
        & (anchors[:, 2] < width + straddle)
        & (anchors[:, 3] < height + straddle)
    )


def label_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    height: float,
    width: float,
    params: RPNSampling,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One image's RPN targets (steps 1-5 of the module docstring).

    Args:
        anchors: ``(R, 4)`` all anchors of the image, every level.
        gt_boxes: ``(G, 4)`` non-crowd gt boxes, network-input pixels.
        height, width: the scaled image size (``im_info[:2]``).
        generator: CPU generator for the random subsampling (seed it for reproducible draws).
    Returns:
        labels ``(R,)`` int64, bbox targets, inside weights and outside weights ``(R, 4)`` float32.
    """
    device = anchors.device
    num_anchors = anchors.shape[0]
    inside = torch.nonzero(anchors_inside_image(anchors, height, width, params.straddle_thresh)).squeeze(1)
    inner = anchors[inside]
    labels = torch.full((inside.numel(),), -1, dtype=torch.int64, device=device)

    if gt_boxes.numel() > 0 and inside.numel() > 0:
        overlaps = box_iou(inner, gt_boxes.to(inner.dtype))  # (R_in, G)
        max_overlap, argmax_gt = overlaps.max(dim=1)
        gt_best = overlaps.max(dim=0).values  # (G,)
        is_best = (overlaps == gt_best[None, :]) & (gt_best[None, :] > 0)
        labels[is_best.any(dim=1)] = 1
        labels[max_overlap >= params.positive_overlap] = 1
    else:
        max_overlap = inner.new_zeros(inside.numel())
        argmax_gt = torch.zeros(inside.numel(), dtype=torch.int64, device=device)

    fg_inds = torch.nonzero(labels == 1).squeeze(1)
    if fg_inds.numel() > params.num_fg:
        perm = torch.randperm(fg_inds.numel(), generator=generator).to(device)
        labels[fg_inds[perm[params.num_fg :]]] = -1
        fg_inds = fg_inds[perm[: params.num_fg]]

    num_bg = params.batch_size_per_im - fg_inds.numel()
    bg_candidates = torch.nonzero(max_overlap < params.negative_overlap).squeeze(1)
    if bg_candidates.numel() > num_bg:
        draws = torch.randint(bg_candidates.numel(), (num_bg,), generator=generator).to(device)
        bg_candidates = bg_candidates[draws]
    labels[bg_candidates] = 0

    targets = inner.new_zeros((inside.numel(), 4))
    if fg_inds.numel() > 0:
        targets[fg_inds] = encode_boxes(inner[fg_inds], gt_boxes[argmax_gt[fg_inds]].to(inner.dtype), RPN_BOX_WEIGHTS)
    positive = (labels == 1).to(inner.dtype)[:, None].expand(-1, 4)
    num_examples = int((labels >= 0).sum())
    outside = positive / max(num_examples, 1)

    def unmap(values: Tensor, fill: float) -> Tensor:
        full = values.new_full((num_anchors,) + values.shape[1:], fill)
        full[inside] = values
        return full

    return unmap(labels, -1), unmap(targets, 0.0), unmap(positive.contiguous(), 0.0), unmap(outside, 0.0)


def rpn_targets(
    anchors: Tensor,
    roidb: Sequence[dict],
    im_info: Tensor,
    params: RPNSampling,
    generator: torch.Generator | None = None,
) -> RPNTargets:
    """Targets for every image of the minibatch; ``anchors`` ``(R, 4)`` are shared by all images."""
    if len(roidb) != im_info.shape[0]:
        raise ValueError(f"roidb has {len(roidb)} entries but im_info has {im_info.shape[0]} rows")
    per_image = []
    for i, entry in enumerate(roidb):
        height, width = (float(v) for v in im_info[i, :2].tolist())
        gt = rpn_gt_boxes(entry, i, anchors.device)
        per_image.append(label_anchors(anchors, gt, height, width, params, generator))
    labels, targets, inside_w, outside_w = (torch.stack(t) for t in zip(*per_image))
    return RPNTargets(labels, targets, inside_w, outside_w)
