"""Fast R-CNN training targets: label proposals, sample RoIs, build box regression targets.

Detectron's end-to-end path (``collect_and_distribute_fpn_rpn_proposals`` -> ``json_dataset.add_proposals``
-> ``roidb.compute_bbox_regression_targets`` -> ``roi_data.fast_rcnn._sample_rois``), on tensors:

1. every ground-truth box is put in front of the image's proposals; a non-crowd gt box is labelled with
   its own class at overlap 1, a crowd gt box gets overlap -1 (never sampled);
2. each proposal takes the class of the gt box (crowd ones included, as Detectron) it overlaps most;
   precomputed proposals (Fast R-CNN) covered by a crowd region beyond ``TRAIN.CROWD_FILTER_THRESH``
   are dropped from sampling;
3. up to ``FG_FRACTION * BATCH_SIZE_PER_IM`` foreground RoIs (overlap >= FG_THRESH) and the rest
   background (overlap in [BG_THRESH_LO, BG_THRESH_HI)) are drawn at random without replacement;
4. RoIs with overlap >= BBOX_THRESH regress to the non-crowd gt box they overlap most, encoded with
   ``MODEL.BBOX_REG_WEIGHTS``, expanded into the class-specific ``4 * C'`` layout with inside/outside
   weights.

As in Detectron, overlaps and targets are computed in original-image coordinates (boxes / im_scale);
the returned RoIs are in network-input coordinates. Boxes are inclusive-pixel ``[x1, y1, x2, y2]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from pydetectron.boxes import box_iou, box_overlaps_with_gt, encode_boxes


@dataclass(frozen=True)
class FastRCNNSampling:
    """The plain values the sampler reads from cfg (``TRAIN.*``, ``MODEL.*``)."""

    num_classes: int
    batch_size_per_im: int = 512
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.0
    bbox_thresh: float = 0.5
    bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    cls_agnostic_bbox_reg: bool = False
    crowd_filter_thresh: float = 0.0

    @classmethod
    def from_cfg(cls, cfg) -> FastRCNNSampling:
        return cls(
            num_classes=cfg.MODEL.NUM_CLASSES,
            batch_size_per_im=int(cfg.TRAIN.BATCH_SIZE_PER_IM),
            fg_fraction=float(cfg.TRAIN.FG_FRACTION),
            fg_thresh=float(cfg.TRAIN.FG_THRESH),
            bg_thresh_hi=float(cfg.TRAIN.BG_THRESH_HI),
            bg_thresh_lo=float(cfg.TRAIN.BG_THRESH_LO),
            bbox_thresh=float(cfg.TRAIN.BBOX_THRESH),
            bbox_reg_weights=tuple(float(w) for w in cfg.MODEL.BBOX_REG_WEIGHTS),
            cls_agnostic_bbox_reg=bool(cfg.MODEL.CLS_AGNOSTIC_BBOX_REG),
            # Detectron filters crowd-covered proposals only when they are precomputed (Fast R-CNN);
            # end-to-end training keeps them, "for historical consistency".
            crowd_filter_thresh=0.0 if cfg.MODEL.FASTER_RCNN else float(cfg.TRAIN.CROWD_FILTER_THRESH),
        )

    @property
    def fg_rois_per_image(self) -> int:
        """``round(FG_FRACTION * BATCH_SIZE_PER_IM)`` (numpy's half-to-even rounding, as Detectron)."""
        return int(round(self.fg_fraction * self.batch_size_per_im))

    @property
    def num_bbox_reg_classes(self) -> int:
        return 2 if self.cls_agnostic_bbox_reg else self.num_classes


@dataclass
class LabelledBoxes:
    """One image's gt boxes followed by its proposals, labelled as Detectron's roidb after
    ``add_proposals``. Shapes ``(B, ...)``; boxes in network-input pixels."""

    boxes: torch.Tensor  # (B, 4) float
    max_overlaps: torch.Tensor  # (B,) float: IoU with the best gt; 1 for gt rows, -1 for crowd gt rows
    max_classes: torch.Tensor  # (B,) int64: class of that gt, 0 when max_overlaps <= 0
    gt_inds: torch.Tensor  # (B,) int64: index of that gt in the roidb entry, -1 when none
    im_scale: float


@dataclass
class FastRCNNTargets:
    """The sampled RoIs of a minibatch with their training targets, images concatenated in order.

    rois ``(R, 5)`` = [batch, x1, y1, x2, y2] in input pixels; labels ``(R,)`` int64 (0 = background);
    bbox_targets / bbox_inside_weights / bbox_outside_weights ``(R, 4 * C')``; gt_inds ``(R,)`` int64, the
    roidb index of the gt box each RoI overlaps most (-1 if none); labelled: per image, every candidate box
    (what keypoint targets resample from). In each image the foreground RoIs come first.
    """

    rois: torch.Tensor
    labels: torch.Tensor
    bbox_targets: torch.Tensor
    bbox_inside_weights: torch.Tensor
    bbox_outside_weights: torch.Tensor
    gt_inds: torch.Tensor
    labelled: List[LabelledBoxes]


def _gt_fields(entry: dict, index: int, device: torch.device):
    """The roidb entry's gt boxes, classes and crowd flags as tensors, validated."""
    for key in ("boxes", "gt_classes", "is_crowd"):
        if key not in entry:
            raise KeyError(f"roidb[{index}] has no {key!r}; Fast R-CNN targets need boxes, gt_classes, is_crowd")
    boxes = torch.as_tensor(entry["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
    classes = torch.as_tensor(entry["gt_classes"], dtype=torch.int64, device=device).reshape(-1)
    crowd = torch.as_tensor(entry["is_crowd"], device=device).reshape(-1).bool()
    if not (boxes.shape[0] == classes.shape[0] == crowd.shape[0]):
        raise ValueError(
            f"roidb[{index}]: boxes {tuple(boxes.shape)}, gt_classes {tuple(classes.shape)} and is_crowd "
            f"{tuple(crowd.shape)} disagree in length"
        )
    if classes.numel() > 0 and int(classes.min()) < 1:
        raise ValueError(f"roidb[{index}]: gt_classes must be >= 1 (0 is background), got {classes.tolist()}")
    return boxes, classes, crowd


def label_proposals(
    proposals: torch.Tensor, entry: dict, im_scale: float, index: int = 0, crowd_filter_thresh: float = 0.0
) -> LabelledBoxes:
    """Put the gt boxes of roidb `entry` in front of `proposals` ``(P, 4)`` (input pixels) and label every
    box with its best-overlapping gt (Detectron's ``add_proposals``). With `crowd_filter_thresh` > 0
    (precomputed proposals), a proposal covered by a crowd region beyond it gets overlap -1 (never
    sampled), as Detectron's ``_filter_crowd_proposals``."""
    gt_boxes, gt_classes, is_crowd = _gt_fields(entry, index, proposals.device)
    proposals = proposals.to(torch.float32).reshape(-1, 4)
    num_gt = gt_boxes.shape[0]

    gt_overlaps = torch.where(is_crowd, -1.0, 1.0)
    gt_max_classes = torch.where(is_crowd, 0, gt_classes)
    gt_inds = torch.arange(num_gt, device=proposals.device)

    prop_overlaps, prop_gt_inds = box_overlaps_with_gt(proposals / im_scale, gt_boxes / im_scale, is_crowd,
                                                       crowd_filter_thresh)
    labelled = prop_overlaps > 0
    prop_classes = torch.where(labelled, gt_classes[prop_gt_inds.clamp(min=0)] if num_gt else 0, 0)

    return LabelledBoxes(
        boxes=torch.cat([gt_boxes, proposals]),
        max_overlaps=torch.cat([gt_overlaps, prop_overlaps]),
        max_classes=torch.cat([gt_max_classes, prop_classes]),
        gt_inds=torch.cat([gt_inds, prop_gt_inds]),
        im_scale=float(im_scale),
    )


def _random_subset(inds: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` elements of `inds` drawn without replacement (all of them, shuffled, if fewer)."""
    perm = torch.randperm(inds.numel(), generator=generator, device="cpu").to(inds.device)
    return inds[perm[:count]]


def sample_rois(
    labelled: LabelledBoxes, params: FastRCNNSampling, generator: torch.Generator | None = None
) -> Tuple[torch.Tensor, int]:
    """Indices into `labelled` of the sampled RoIs, foreground first then background, and the number of
    foreground ones (Detectron's ``_sample_rois``)."""
    overlaps = labelled.max_overlaps
    fg_inds = torch.nonzero(overlaps >= params.fg_thresh).squeeze(1)
    fg_inds = _random_subset(fg_inds, min(params.fg_rois_per_image, fg_inds.numel()), generator)
    bg_inds = torch.nonzero((overlaps < params.bg_thresh_hi) & (overlaps >= params.bg_thresh_lo)).squeeze(1)
    num_bg = min(params.batch_size_per_im - fg_inds.numel(), bg_inds.numel())
    bg_inds = _random_subset(bg_inds, num_bg, generator)
    return torch.cat([fg_inds, bg_inds]), fg_inds.numel()


def compute_bbox_targets(
    labelled: LabelledBoxes, keep: torch.Tensor, entry: dict, params: FastRCNNSampling, index: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Regression class ``(R,)`` int64 (0 = none) and targets ``(R, 4)`` for the boxes `keep` of
    `labelled` (Detectron's ``compute_bbox_regression_targets``, restricted to the sampled rows)."""
    gt_boxes, _, is_crowd = _gt_fields(entry, index, labelled.boxes.device)
    num = keep.numel()
    reg_classes = torch.zeros(num, dtype=torch.int64, device=keep.device)
    targets = labelled.boxes.new_zeros((num, 4))
    valid_gt = gt_boxes[~is_crowd] / labelled.im_scale
    ex = torch.nonzero(labelled.max_overlaps[keep] >= params.bbox_thresh).squeeze(1)
    if valid_gt.shape[0] == 0 or ex.numel() == 0:
        return reg_classes, targets
    ex_boxes = labelled.boxes[keep[ex]] / labelled.im_scale
    assignment = box_iou(ex_boxes, valid_gt).argmax(dim=1)
    targets[ex] = encode_boxes(ex_boxes, valid_gt[assignment], params.bbox_reg_weights).to(targets.dtype)
    reg_classes[ex] = 1 if params.cls_agnostic_bbox_reg else labelled.max_classes[keep[ex]]
    return reg_classes, targets


def expand_bbox_targets(
    reg_classes: torch.Tensor, targets: torch.Tensor, num_reg_classes: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Place each ``(4,)`` target in its class's columns of a ``(R, 4 * num_reg_classes)`` blob; inside
    weights are 1 there and 0 elsewhere (Detectron's ``_expand_bbox_targets``)."""
    num = reg_classes.numel()
    expanded = targets.new_zeros((num, num_reg_classes, 4))
    inside = targets.new_zeros((num, num_reg_classes, 4))
    rows = torch.nonzero(reg_classes > 0).squeeze(1)
    if rows.numel() > 0 and int(reg_classes.max()) >= num_reg_classes:
        raise ValueError(f"regression class {int(reg_classes.max())} >= number of classes {num_reg_classes}")
    expanded[rows, reg_classes[rows]] = targets[rows]
    inside[rows, reg_classes[rows]] = 1.0
    return expanded.reshape(num, 4 * num_reg_classes), inside.reshape(num, 4 * num_reg_classes)


def fast_rcnn_targets(
    proposals: torch.Tensor,
    im_info: torch.Tensor,
    roidb: Sequence[dict],
    params: FastRCNNSampling,
    generator: torch.Generator | None = None,
) -> FastRCNNTargets:
    """Sample the training RoIs of a minibatch from the RPN `proposals` ``(P, 5)`` = [batch, x1, y1, x2, y2]
    (input pixels) and the gt of `roidb` (one entry per image, input pixels); `im_info` ``(N, 3)``."""
    if len(roidb) != im_info.shape[0]:
        raise ValueError(f"{len(roidb)} roidb entries for {im_info.shape[0]} images in im_info")
    parts = {k: [] for k in ("rois", "labels", "targets", "inside", "gt_inds")}
    labelled_all = []
    for i, entry in enumerate(roidb):
        labelled = label_proposals(
            proposals[proposals[:, 0] == i, 1:5], entry, float(im_info[i, 2]), i, params.crowd_filter_thresh
        )
        keep, num_fg = sample_rois(labelled, params, generator)
        labels = labelled.max_classes[keep].clone()
        labels[num_fg:] = 0
        reg_classes, targets = compute_bbox_targets(labelled, keep, entry, params, i)
        targets, inside = expand_bbox_targets(reg_classes, targets, params.num_bbox_reg_classes)
        batch_col = labelled.boxes.new_full((keep.numel(), 1), float(i))
        parts["rois"].append(torch.cat([batch_col, labelled.boxes[keep]], dim=1))
        parts["labels"].append(labels)
        parts["targets"].append(targets)
        parts["inside"].append(inside)
        parts["gt_inds"].append(labelled.gt_inds[keep])
        labelled_all.append(labelled)
    inside = torch.cat(parts["inside"])
    return FastRCNNTargets(
        rois=torch.cat(parts["rois"]),
        labels=torch.cat(parts["labels"]),
        bbox_targets=torch.cat(parts["targets"]),
        bbox_inside_weights=inside,
        bbox_outside_weights=(inside > 0).to(inside.dtype),
        gt_inds=torch.cat(parts["gt_inds"]),
        labelled=labelled_all,
    )
