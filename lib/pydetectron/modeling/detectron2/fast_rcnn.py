"""detectron2's Fast R-CNN outputs: ``FastRCNNOutputLayers``, its losses and ``fast_rcnn_inference``.

Class layout (d2's): ``cls_score`` has K + 1 logits with the background LAST (index K), ``bbox_pred`` K * 4
deltas (no background box) or 4 when class-agnostic. Classes here are d2's ``0..K-1``; the ROI heads turn them
into pydetectron's contiguous ids ``1..K``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.box_head import _flat_mapping
from pydetectron.modeling.detectron2.box_transform import Box2BoxTransform
from pydetectron.modeling.detectron2.losses import BOX_REG_LOSS_TYPES, dense_box_regression_loss
from pydetectron.ops.nms import batched_nms


class FastRCNNOutputLayers(nn.Module):
    """``cls_score`` ``(R, K + 1)`` and ``bbox_pred`` ``(R, K * 4)`` (or ``(R, 4)``) from box features
    (flattened when they are maps). d2's init: normal std 0.01 / 0.001, bias 0."""

    class_layout = "detectron2"

    def __init__(self, dim_in: int, num_fg_classes: int, cls_agnostic_bbox_reg: bool = False) -> None:
        super().__init__()
        if num_fg_classes < 1:
            raise ValueError(f"FastRCNNOutputLayers needs >= 1 foreground class, got {num_fg_classes}")
        self.num_classes = num_fg_classes
        self.cls_agnostic_bbox_reg = cls_agnostic_bbox_reg
        self.cls_score = nn.Linear(dim_in, num_fg_classes + 1)
        self.bbox_pred = nn.Linear(dim_in, 4 * (1 if cls_agnostic_bbox_reg else num_fg_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.constant_(layer.bias, 0)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)

    def detectron_weight_mapping(self) -> Dict[str, str]:
        return _flat_mapping(self, {"cls_score": "cls_score", "bbox_pred": "bbox_pred"})


@dataclass(frozen=True)
class FastRCNNLossSettings:
    """``FAST_RCNN.BBOX_REG_LOSS_TYPE`` / ``SMOOTH_L1_BETA`` / ``BBOX_REG_LOSS_WEIGHT``."""

    loss_type: str = "smooth_l1"
    smooth_l1_beta: float = 0.0
    box_reg_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(f"FAST_RCNN.BBOX_REG_LOSS_TYPE {self.loss_type!r} is not one of {BOX_REG_LOSS_TYPES}")

    @classmethod
    def from_cfg(cls, cfg) -> FastRCNNLossSettings:
        f = cfg.FAST_RCNN
        return cls(str(f.BBOX_REG_LOSS_TYPE), float(f.SMOOTH_L1_BETA), float(f.BBOX_REG_LOSS_WEIGHT))


def fast_rcnn_losses(
    cls_score: torch.Tensor, bbox_pred: torch.Tensor, proposal_boxes: torch.Tensor, gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor, box2box: Box2BoxTransform, settings: FastRCNNLossSettings,
) -> Dict[str, torch.Tensor]:
    """d2's ``FastRCNNOutputLayers.losses``: ``loss_cls`` = cross-entropy averaged over the R sampled RoIs,
    ``loss_box_reg`` = the foreground RoIs' box loss (smooth-L1 on deltas or GIoU on boxes) summed, divided by
    R, times ``BBOX_REG_LOSS_WEIGHT``. `gt_classes` ``(R,)`` in ``0..K`` (K = background), `gt_boxes` the
    matched gt box of each RoI ``(R, 4)``."""
    num_classes = cls_score.shape[1] - 1
    loss_cls = F.cross_entropy(cls_score, gt_classes, reduction="mean") if gt_classes.numel() else \
        cls_score.sum() * 0.0
    fg = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes), as_tuple=True)[0]
    if bbox_pred.shape[1] == 4:
        fg_deltas = bbox_pred[fg]
    else:
        fg_deltas = bbox_pred.view(-1, num_classes, 4)[fg, gt_classes[fg]]
    loss_box_reg = dense_box_regression_loss(
        [proposal_boxes[fg]], box2box, [fg_deltas.unsqueeze(0)], [gt_boxes[fg]],
        torch.ones((1, fg.numel()), dtype=torch.bool, device=fg.device), settings.loss_type,
        settings.smooth_l1_beta,
    )
    loss_box_reg = loss_box_reg / max(gt_classes.numel(), 1.0)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg * settings.box_reg_weight}


@dataclass(frozen=True)
class FastRCNNTestSettings:
    """``TEST.SCORE_THRESH``, ``TEST.NMS``, ``TEST.DETECTIONS_PER_IM`` (d2's ``SCORE_THRESH_TEST``,
    ``NMS_THRESH_TEST``, ``DETECTIONS_PER_IMAGE``; < 0 keeps every detection)."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    topk_per_image: int = 100

    @classmethod
    def from_cfg(cls, cfg) -> FastRCNNTestSettings:
        t = cfg.TEST
        return cls(float(t.SCORE_THRESH), float(t.NMS), int(t.DETECTIONS_PER_IM))


def fast_rcnn_inference_single_image(
    boxes: torch.Tensor, scores: torch.Tensor, image_shape: Tuple[int, int], settings: FastRCNNTestSettings
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """d2's ``fast_rcnn_inference_single_image``. boxes ``(R, K * 4)`` or ``(R, 4)`` decoded in input pixels,
    scores ``(R, K + 1)`` probabilities (background last), image_shape the network-input (height, width).

    Rows with a non-finite box or score are dropped; background dropped; boxes clipped to the image; every
    (RoI, class) with score > SCORE_THRESH kept; NMS per class; the best DETECTIONS_PER_IM kept. Returns
    ``{'boxes', 'scores', 'classes'}`` (classes d2's ``0..K-1``) and each detection's RoI index."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    if not bool(valid.all()):
        boxes, scores, rows = boxes[valid], scores[valid], rows[valid]
    scores = scores[:, :-1]
    num_reg = boxes.shape[1] // 4
    height, width = image_shape
    boxes = boxes.reshape(-1, 4)
    boxes = torch.stack([boxes[:, 0].clamp(min=0, max=width), boxes[:, 1].clamp(min=0, max=height),
                         boxes[:, 2].clamp(min=0, max=width), boxes[:, 3].clamp(min=0, max=height)], dim=-1)
    boxes = boxes.view(-1, num_reg, 4)
    filter_mask = scores > settings.score_thresh
    filter_inds = filter_mask.nonzero()
    boxes = boxes[filter_inds[:, 0], 0] if num_reg == 1 else boxes[filter_mask]
    scores = scores[filter_mask]
    keep = batched_nms(boxes, scores, filter_inds[:, 1], settings.nms_thresh)
    if settings.topk_per_image >= 0:
        keep = keep[: settings.topk_per_image]
    boxes, scores, filter_inds = boxes[keep], scores[keep], filter_inds[keep]
    return {"boxes": boxes, "scores": scores, "classes": filter_inds[:, 1]}, rows[filter_inds[:, 0]]
