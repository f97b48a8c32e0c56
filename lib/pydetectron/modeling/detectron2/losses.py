"""detectron2's box losses (fvcore's ``smooth_l1_loss`` and ``giou_loss``) and its dense box-regression loss.

``beta`` follows detectron2: the smooth-L1 turns quadratic below ``beta``, and ``beta < 1e-5`` is the plain
L1 loss (detectron2's RetinaNet and ``SMOOTH_L1_BETA: 0``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pydetectron.modeling.detectron2.box_transform import Box2BoxTransform
from pydetectron.modeling.losses import smooth_l1

BOX_REG_LOSS_TYPES = ("smooth_l1", "giou")
_REDUCTIONS = ("none", "mean", "sum")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    return loss


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float, reduction: str = "none") -> Tensor:
    """fvcore's smooth-L1 of ``input - target`` (any equal shapes), reduced ``'none' | 'mean' | 'sum'``."""
    if input.shape != target.shape:
        raise ValueError(f"smooth_l1_loss needs equal shapes, got {tuple(input.shape)} and {tuple(target.shape)}")
    if beta < 0:
        raise ValueError(f"smooth_l1_loss beta must be >= 0, got {beta}")
    return _reduce(smooth_l1(input - target, beta), reduction)


def giou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """fvcore's generalized-IoU loss ``1 - GIoU`` of paired boxes ``(..., 4)`` (no +1)."""
    if boxes1.shape != boxes2.shape or boxes1.shape[-1:] != (4,):
        raise ValueError(f"giou_loss needs paired (..., 4) boxes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    if not bool(((x2 >= x1) & (y2 >= y1)).all()):
        raise ValueError("giou_loss: a predicted box has x1 > x2 or y1 > y2")
    ix1, iy1 = torch.max(x1, x1g), torch.max(y1, y1g)
    ix2, iy2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (iy2 > iy1) & (ix2 > ix1)
    intersection = torch.where(overlap, (ix2 - ix1) * (iy2 - iy1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    giou = iou - (enclosing - union) / (enclosing + eps)
    return _reduce(1 - giou, reduction)


def dense_box_regression_loss(
    anchors: Sequence[Tensor],
    box2box_transform: Box2BoxTransform,
    pred_anchor_deltas: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    fg_mask: Tensor,
    box_reg_loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> Tensor:
    """detectron2's ``_dense_box_regression_loss``: the summed box loss over the foreground anchors.

    Args:
        anchors: per level ``(R_l, 4)``; ``R = sum R_l``.
        pred_anchor_deltas: per level ``(N, R_l, 4)``.
        gt_boxes: per image ``(R, 4)``, the matched gt box of every anchor.
        fg_mask: ``(N, R)`` bool, the anchors the loss covers.
        box_reg_loss_type: ``'smooth_l1'`` (on deltas, with ``smooth_l1_beta``) or ``'giou'`` (on boxes).
    """
    all_anchors = torch.cat(list(anchors))
    pred = torch.cat(list(pred_anchor_deltas), dim=1)
    if box_reg_loss_type == "smooth_l1":
        gt_deltas = torch.stack([box2box_transform.get_deltas(all_anchors, g) for g in gt_boxes])
        return smooth_l1_loss(pred[fg_mask], gt_deltas[fg_mask], smooth_l1_beta, reduction="sum")
    if box_reg_loss_type == "giou":
        pred_boxes = torch.stack([box2box_transform.apply_deltas(d, all_anchors) for d in pred])
        return giou_loss(pred_boxes[fg_mask], torch.stack(list(gt_boxes))[fg_mask], reduction="sum")
    raise ValueError(f"box regression loss type must be one of {BOX_REG_LOSS_TYPES}, got {box_reg_loss_type!r}")
