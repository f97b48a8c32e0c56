"""The generalized R-CNN: body -> RPN -> ROI heads (box head -> mask / keypoint heads, ``roi_heads.py``), wired
from cfg.

Detectron's ``model_builder.build_generic_detection_model`` as one ``nn.Module``. Training returns
Detectron's named losses (``loss_rpn_cls[_fpnX]``, ``loss_rpn_bbox[_fpnX]``, ``loss_cls``,
``loss_bbox``, ``loss_mask``, ``loss_kps``) and Detectron's logged ``accuracy_cls`` (``total_loss`` sums
the losses only); inference cascades like ``core/test.py:im_detect_all``
(boxes, then masks and keypoints on the final detections) and returns one dict per image in original
image coordinates (ARCHITECTURE.md, "Detector outputs").

Without an RPN (Fast R-CNN on precomputed proposals) each roidb entry must carry ``proposals``:
float ``(P, 4)`` in network-input pixels (already scaled and flipped like ``boxes``); in inference they are
de-duplicated as Detectron does (``DEDUP_BOXES``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from pydetectron.modeling import registry
from pydetectron.modeling.detector_inputs import checked_im_info, original_sizes
from pydetectron.modeling.detectron2.postprocess import detector_postprocess
from pydetectron.modeling.fpn_levels import level_indices
from pydetectron.modeling.layers import compose_weight_mapping
from pydetectron.modeling.retinanet import RetinaNet
from pydetectron.modeling.roi_heads import Detections, ROIHeads
from pydetectron.modeling.rpn import build_rpn

LOSS_PREFIX = "loss"  # training outputs named loss* are optimised; the others (accuracy_cls) are only logged


def total_loss(outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of a training forward's losses (its ``loss*`` entries), the quantity to backpropagate."""
    return sum(value for name, value in outputs.items() if name.startswith(LOSS_PREFIX))


def _roi_feature_indices(cfg, body_levels: Sequence[int]) -> List[int]:
    """Which body maps the RoI heads pool from: FPN levels ``ROI_MIN_LEVEL..ROI_MAX_LEVEL``, or the
    single (coarsest) map of a C4-style body (Detectron's ``_narrow_to_fpn_roi_levels``)."""
    if not cfg.FPN.FPN_ON:
        return [len(body_levels) - 1]
    return level_indices(body_levels, cfg.FPN.ROI_MIN_LEVEL, cfg.FPN.ROI_MAX_LEVEL,
                         "FPN.ROI_MIN_LEVEL..ROI_MAX_LEVEL")


def _rpn_on(cfg) -> bool:
    return bool(cfg.RPN.RPN_ON or cfg.MODEL.FASTER_RCNN or cfg.MODEL.RPN_ONLY)


class GeneralizedRCNN(nn.Module):
    """``forward(data, im_info, roidb=None)``: losses in ``train()`` mode, detections in ``eval()`` mode.

    data ``(N, 3, H, W)``, im_info ``(N, 3)`` = (scaled height, scaled width, im_scale), roidb a list of
    N entries in network-input coordinates (required in training). In inference the roidb is optional and
    read only for ``proposals`` and the original ``height`` / ``width`` that boxes are clipped to and masks
    pasted into; pass at least ``[{'height': h, 'width': w}, ...]``: without it the size is recovered as
    round(scaled size / im_scale), which can be a pixel off when im_scale < 1.
    Masks come back on the CPU (full-image uint8), everything else on the input's device.

    The body makes the maps, the RPN (or the roidb's ``proposals``) the proposals, and ``roi_heads``
    (``MODEL.ROI_HEADS_NAME``, see ``roi_heads.py``) everything after. The ROI heads' modules are this model's own
    attributes (``box_head``, ``box_outputs``, ``mask_head``, ``keypoint_head``: state_dict keys and Detectron
    names as they always were); an RPN-only model has none and ``roi_heads`` None.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        if cfg.RETINANET.RETINANET_ON:
            raise ValueError("RETINANET.RETINANET_ON is set: GeneralizedRCNN does not build RetinaNet models")
        if cfg.MODEL.NUM_CLASSES < 2 and not cfg.MODEL.RPN_ONLY:
            raise ValueError(f"MODEL.NUM_CLASSES must count the background and >= 1 class, got {cfg.MODEL.NUM_CLASSES}")
        self.body = registry.build("body", cfg.MODEL.CONV_BODY, cfg)
        dim, scales = self.body.dim_out, list(self.body.spatial_scales)
        self.rpn = build_rpn(cfg, dim, scales) if _rpn_on(cfg) else None
        self.rpn_only = bool(cfg.MODEL.RPN_ONLY)
        self.detectron2_mode = cfg.MODEL.CONVENTIONS == "detectron2"
        self.mask_on = bool(cfg.MODEL.MASK_ON) and not self.rpn_only
        self.keypoints_on = bool(cfg.MODEL.KEYPOINTS_ON) and not self.rpn_only
        self.roi_indices = _roi_feature_indices(cfg, self.body.levels)
        roi_scales = [scales[i] for i in self.roi_indices]
        self._roi_heads: ROIHeads | None = None
        if not self.rpn_only:
            self._roi_heads = registry.build("roi_heads", cfg.MODEL.ROI_HEADS_NAME, cfg, dim, roi_scales)
            for name, module in self._roi_heads.head_modules().items():
                setattr(self, name, module)
        self.freeze_conv_body = bool(cfg.TRAIN.FREEZE_CONV_BODY)

    @property
    def roi_heads(self) -> ROIHeads | None:
        """The ROI heads, on this model's own head modules. A DataParallel replica is a shallow copy of this model
        holding replicas of the modules: it gets the cascade bound to those (once) instead of the original's."""
        heads = self._roi_heads
        if heads is not None:
            mine = {name: getattr(self, name) for name in heads.head_modules()}
            if any(module is not mine[name] for name, module in heads.head_modules().items()):
                heads = self._roi_heads = heads.bind(mine)
        return heads

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)

    # ---------------------------------------------------------------------------------------------- #

    def forward(self, data: torch.Tensor, im_info: torch.Tensor, roidb: Sequence[dict] | None = None):
        im_info = checked_im_info("GeneralizedRCNN", data, im_info, roidb, self.training)
        features = self.body(data)
        if self.training:
            if self.freeze_conv_body:  # Detectron's StopGradient on the body outputs
                features = [f.detach() for f in features]
            return self._losses(features, im_info, roidb)
        return self._detect(features, im_info, roidb)

    def _proposals(self, roidb: Sequence[dict], device: torch.device) -> torch.Tensor:
        """``(P, 5)`` precomputed proposals from the roidb entries (no RPN)."""
        rois = []
        for i, entry in enumerate(roidb):
            if entry.get("proposals") is None:
                raise KeyError(
                    f"roidb[{i}] has no 'proposals': a model without RPN (MODEL.FASTER_RCNN False) needs "
                    "precomputed proposals (P, 4) in network-input pixels"
                )
            boxes = torch.as_tensor(entry["proposals"], dtype=torch.float32, device=device).reshape(-1, 4)
            rois.append(torch.cat([boxes.new_full((boxes.shape[0], 1), float(i)), boxes], dim=1))
        return torch.cat(rois)

    def _losses(self, features, im_info, roidb) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        proposals = None
        if self.rpn is not None:
            rpn_out = self.rpn(features, im_info, roidb)
            losses.update(rpn_out.losses)
            proposals = rpn_out.rois
        if self.rpn_only:
            return losses
        if proposals is None:
            proposals = self._proposals(roidb, im_info.device)
        roi_feats = [features[i] for i in self.roi_indices]
        losses.update(self.roi_heads.forward_train(roi_feats, proposals, im_info, roidb))
        return losses

    @torch.no_grad()
    def _detect(self, features, im_info, roidb) -> List[Detections]:
        sizes = original_sizes(im_info, roidb)
        if self.rpn is not None:
            rpn_out = self.rpn(features, im_info)
            proposals = rpn_out.rois
            if self.rpn_only:
                return [_proposal_results(rpn_out.rois, rpn_out.scores, im_info, sizes, i, self.detectron2_mode)
                        for i in range(im_info.shape[0])]
        else:
            if roidb is None:
                raise ValueError("a model without RPN needs the roidb (with 'proposals') at inference")
            proposals = self._proposals(roidb, im_info.device)
        roi_feats = [features[i] for i in self.roi_indices]
        return self.roi_heads.forward_inference(roi_feats, proposals, im_info, sizes, precomputed=self.rpn is None)


def _proposal_results(rois: torch.Tensor, scores: torch.Tensor, im_info: torch.Tensor,
                      sizes: Sequence[Tuple[int, int]], i: int, detectron2_mode: bool) -> Detections:
    """RPN-only inference: image `i`'s proposals as ``boxes`` ``(P, 4)`` in original pixels with their objectness
    ``scores`` ``(P,)``; no ``classes``. Detectron (``generate_rpn_on_dataset``) divides by im_scale; detectron2's
    ProposalNetwork runs ``detector_postprocess`` (per-axis scale, clip, empty boxes dropped)."""
    mine = rois[:, 0] == i
    if detectron2_mode:
        proposals = {"boxes": rois[mine, 1:5], "scores": scores[mine]}
        return detector_postprocess(proposals, (float(im_info[i, 0]), float(im_info[i, 1])), sizes[i])
    return {"boxes": rois[mine, 1:5] / im_info[i, 2], "scores": scores[mine]}


MODEL_TYPES = ("generalized_rcnn", "retinanet", "")


def build_detector(cfg) -> nn.Module:
    """The model of ``cfg``: Detectron's ``generalized_rcnn`` (Fast/Faster/Mask/Keypoint R-CNN, RPN; also an
    empty ``MODEL.TYPE``) or ``retinanet`` (``MODEL.TYPE: retinanet`` or ``RETINANET.RETINANET_ON``)."""
    if cfg.MODEL.TYPE not in MODEL_TYPES:
        raise ValueError(
            f"MODEL.TYPE {cfg.MODEL.TYPE!r} is not supported; pydetectron builds 'generalized_rcnn' and "
            "'retinanet' models (the heads are chosen by MODEL.* and the head names)"
        )
    registry.import_builtin_modules()
    if cfg.MODEL.TYPE == "retinanet" or cfg.RETINANET.RETINANET_ON:
        return RetinaNet(cfg)
    return GeneralizedRCNN(cfg)
