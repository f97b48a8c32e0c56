"""Box inference: from the box head's outputs to per-image detections in original-image coordinates.

Detectron's ``core/test.py``: ``im_detect_bbox`` (softmax, RoIs / im_scale, decode with
``MODEL.BBOX_REG_WEIGHTS`` and ``BBOX_XFORM_CLIP``, clip to the original image) followed by
``box_results_with_nms_and_limit`` (per class: score > ``TEST.SCORE_THRESH``, NMS at ``TEST.NMS`` or
soft-NMS, then ``TEST.DETECTIONS_PER_IM`` over all classes, ties at the cut kept). Box voting
(``TEST.BBOX_VOTE``) and test-time augmentation live in ``evaluation/bbox_aug.py``. Boxes are
inclusive-pixel ``[x1, y1, x2, y2]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from pydetectron.boxes import clip_boxes, decode_boxes
from pydetectron.ops.nms import nms, soft_nms

SOFT_NMS_METHODS = ("linear", "gaussian", "hard")
# Detectron drops soft-NMS'd boxes whose score falls below this (core/test.py).
SOFT_NMS_SCORE_THRESH = 0.0001


@dataclass(frozen=True)
class BoxInference:
    """The plain values box inference reads from cfg."""

    num_classes: int
    score_thresh: float = 0.05
    nms: float = 0.5
    detections_per_im: int = 100
    bbox_reg: bool = True
    bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    bbox_xform_clip: float = 4.135166556742356
    cls_agnostic_bbox_reg: bool = False
    soft_nms: bool = False
    soft_nms_method: str = "linear"
    soft_nms_sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.soft_nms and self.soft_nms_method not in SOFT_NMS_METHODS:
            raise ValueError(
                f"TEST.SOFT_NMS.METHOD {self.soft_nms_method!r} is not one of {SOFT_NMS_METHODS}"
            )

    @classmethod
    def from_cfg(cls, cfg) -> BoxInference:
        return cls(
            num_classes=cfg.MODEL.NUM_CLASSES,
            score_thresh=float(cfg.TEST.SCORE_THRESH),
            nms=float(cfg.TEST.NMS),
            detections_per_im=int(cfg.TEST.DETECTIONS_PER_IM),
            bbox_reg=bool(cfg.TEST.BBOX_REG),
            bbox_reg_weights=tuple(float(w) for w in cfg.MODEL.BBOX_REG_WEIGHTS),
            bbox_xform_clip=float(cfg.BBOX_XFORM_CLIP),
            cls_agnostic_bbox_reg=bool(cfg.MODEL.CLS_AGNOSTIC_BBOX_REG),
            soft_nms=bool(cfg.TEST.SOFT_NMS.ENABLED),
            soft_nms_method=str(cfg.TEST.SOFT_NMS.METHOD),
            soft_nms_sigma=float(cfg.TEST.SOFT_NMS.SIGMA),
        )


def original_image_size(im_info_row: torch.Tensor) -> Tuple[int, int]:
    """(height, width) of the original image from one ``im_info`` row (scaled h, scaled w, scale)."""
    scale = float(im_info_row[2])
    return int(round(float(im_info_row[0]) / scale)), int(round(float(im_info_row[1]) / scale))


def predict_boxes(
    rois: torch.Tensor,
    bbox_deltas: torch.Tensor,
    num_classes: int,
    im_scale: float,
    image_size: Tuple[int, int],
    params: BoxInference,
) -> torch.Tensor:
    """Class-tiled boxes ``(R, 4 * num_classes)`` in original-image pixels from `rois` ``(R, 4)`` in input
    pixels and `bbox_deltas` ``(R, 4 * C')`` (Detectron's ``im_detect_bbox``)."""
    boxes = rois / im_scale
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, 4 * num_classes))
    if not params.bbox_reg:
        return boxes.repeat(1, num_classes)
    if params.cls_agnostic_bbox_reg:
        bbox_deltas = bbox_deltas[:, -4:]  # the fg column of (bg, fg)
    pred = decode_boxes(boxes, bbox_deltas, params.bbox_reg_weights, clip=params.bbox_xform_clip)
    pred = clip_boxes(pred, image_size[0], image_size[1])
    return pred.repeat(1, num_classes) if params.cls_agnostic_bbox_reg else pred


def _suppress(boxes: torch.Tensor, scores: torch.Tensor, params: BoxInference):
    """One class's NMS or soft-NMS: kept (boxes, scores), best first."""
    if params.soft_nms:
        keep, new_scores = soft_nms(
            boxes, scores, params.soft_nms_sigma, params.nms, SOFT_NMS_SCORE_THRESH, params.soft_nms_method,
            legacy_plus_one=True,
        )
        return boxes[keep], new_scores
    keep = nms(boxes, scores, params.nms, legacy_plus_one=True)
    return boxes[keep], scores[keep]


def box_results_with_nms_and_limit(
    scores: torch.Tensor, boxes: torch.Tensor, params: BoxInference
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold, per-class NMS and the per-image limit on one image's `scores` ``(R, C)`` and class-tiled
    `boxes` ``(R, 4 * C)`` (class 0 = background, skipped). Returns boxes ``(D, 4)``, scores ``(D,)``
    and classes ``(D,)`` int64, grouped by class in increasing order as Detectron stacks them."""
    num_classes = scores.shape[1]
    if num_classes < 2:
        raise ValueError(f"scores need a background and at least one object class, got {num_classes} columns")
    if boxes.shape != (scores.shape[0], 4 * num_classes):
        raise ValueError(f"boxes {tuple(boxes.shape)} do not tile 4 columns per class of scores {tuple(scores.shape)}")
    kept_boxes, kept_scores, kept_classes = [], [], []
    for j in range(1, num_classes):
        inds = torch.nonzero(scores[:, j] > params.score_thresh).squeeze(1)
        boxes_j, scores_j = _suppress(boxes[inds, 4 * j : 4 * j + 4], scores[inds, j], params)
        kept_boxes.append(boxes_j)
        kept_scores.append(scores_j)
        kept_classes.append(torch.full((scores_j.numel(),), j, dtype=torch.int64, device=scores.device))
    det_boxes, det_scores, det_classes = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_classes)
    limit = params.detections_per_im
    if limit > 0 and det_scores.numel() > limit:
        image_thresh = torch.topk(det_scores, limit).values[-1]
        keep = det_scores >= image_thresh
        det_boxes, det_scores, det_classes = det_boxes[keep], det_scores[keep], det_classes[keep]
    return det_boxes, det_scores, det_classes


def detect_boxes(
    cls_score: torch.Tensor,
    bbox_pred: torch.Tensor,
    rois: torch.Tensor,
    im_info: torch.Tensor,
    params: BoxInference,
    image_sizes: Sequence[Tuple[int, int]] | None = None,
) -> List[Dict[str, torch.Tensor]]:
    """Per-image detections ``{'boxes', 'scores', 'classes'}`` in original-image pixels.

    cls_score ``(R, C)`` logits, bbox_pred ``(R, 4 * C')``, rois ``(R, 5)`` = [batch, x1, y1, x2, y2] in
    input pixels, im_info ``(N, 3)``. `image_sizes` gives each original (height, width) to clip to; by
    default it is recovered from im_info as round(scaled size / im_scale).
    """
    cls_prob = F.softmax(cls_score, dim=1)
    num_classes = cls_prob.shape[1]
    results = []
    for i in range(im_info.shape[0]):
        mine = rois[:, 0] == i
        size = tuple(image_sizes[i]) if image_sizes is not None else original_image_size(im_info[i])
        boxes = predict_boxes(rois[mine, 1:5], bbox_pred[mine], num_classes, float(im_info[i, 2]), size, params)
        det_boxes, det_scores, det_classes = box_results_with_nms_and_limit(cls_prob[mine], boxes, params)
        results.append({"boxes": det_boxes, "scores": det_scores, "classes": det_classes})
    return results
