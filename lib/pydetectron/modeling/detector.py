"""The generalized R-CNN: body -> RPN -> box head -> mask / keypoint heads, wired from cfg.

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

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from pydetectron.boxes import unique_boxes
from pydetectron.modeling import registry
from pydetectron.modeling.box_head import build_box_outputs, classification_accuracy, fast_rcnn_losses
from pydetectron.modeling.fpn_levels import level_indices
from pydetectron.modeling.keypoint_head import (
    COCO_PERSON_OKS_SIGMAS,
    heatmaps_to_keypoints,
    keypoint_rcnn_loss,
    nms_oks,
)
from pydetectron.modeling.layers import compose_weight_mapping
from pydetectron.modeling.mask_head import mask_probs, mask_rcnn_loss
from pydetectron.modeling.paste_masks import paste_masks_in_image
from pydetectron.modeling.postprocess import BoxInference, detect_boxes, original_image_size
from pydetectron.modeling.retinanet import RetinaNet
from pydetectron.modeling.rpn import build_rpn
from pydetectron.modeling.targets.fast_rcnn import FastRCNNSampling, FastRCNNTargets, fast_rcnn_targets
from pydetectron.modeling.targets.keypoint import keypoint_rcnn_targets
from pydetectron.modeling.targets.mask import mask_rcnn_targets

Detections = Dict[str, torch.Tensor]
LOSS_PREFIX = "loss"  # training outputs named loss* are optimised; the others (accuracy_cls) are only logged
NMS_OKS_THRESH = 0.3  # Detectron's keypoint_results


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


@dataclass(frozen=True)
class MaskSettings:
    """The ``MRCNN.*`` values the detector reads for mask targets, loss and pasting."""

    resolution: int
    cls_specific: bool
    loss_weight: float
    thresh: float

    @classmethod
    def from_cfg(cls, cfg) -> MaskSettings:
        m = cfg.MRCNN
        return cls(int(m.RESOLUTION), bool(m.CLS_SPECIFIC_MASK), float(m.WEIGHT_LOSS_MASK), float(m.THRESH_BINARIZE))


@dataclass(frozen=True)
class KeypointSettings:
    """The ``KRCNN.*`` values the detector reads for keypoint targets, loss and decoding."""

    num_keypoints: int
    heatmap_size: int
    loss_weight: float
    by_visible: bool  # NORMALIZE_BY_VISIBLE_KEYPOINTS
    min_count: int  # MIN_KEYPOINT_COUNT_FOR_VALID_MINIBATCH
    inference_min_size: int
    normalizer_denominator: float  # Detectron's finalize_keypoint_minibatch: IMS * BATCH_SIZE_PER_IM * FG_FRACTION * K
    nms_oks_sigmas: Tuple[float, ...] = ()  # KRCNN.NMS_OKS on: the OKS sigmas it measures with; () = off

    @classmethod
    def from_cfg(cls, cfg) -> KeypointSettings:
        k, t = cfg.KRCNN, cfg.TRAIN
        num = int(k.NUM_KEYPOINTS)
        return cls(
            num, int(k.HEATMAP_SIZE), float(k.LOSS_WEIGHT), bool(k.NORMALIZE_BY_VISIBLE_KEYPOINTS),
            int(k.MIN_KEYPOINT_COUNT_FOR_VALID_MINIBATCH), int(k.INFERENCE_MIN_SIZE),
            float(t.IMS_PER_BATCH * t.BATCH_SIZE_PER_IM * t.FG_FRACTION * max(num, 1)),
            _nms_oks_sigmas(cfg) if cfg.MODEL.KEYPOINTS_ON and k.NMS_OKS else (),
        )


def _nms_oks_sigmas(cfg) -> Tuple[float, ...]:
    """KRCNN.OKS_SIGMAS, or COCO's person sigmas for a 17-keypoint model (what Detectron's nms_oks uses)."""
    k = cfg.KRCNN
    if k.OKS_SIGMAS:
        if len(k.OKS_SIGMAS) != int(k.NUM_KEYPOINTS):
            raise ValueError(f"KRCNN.OKS_SIGMAS has {len(k.OKS_SIGMAS)} values for KRCNN.NUM_KEYPOINTS "
                             f"{k.NUM_KEYPOINTS}")
        return tuple(float(v) for v in k.OKS_SIGMAS)
    if int(k.NUM_KEYPOINTS) == len(COCO_PERSON_OKS_SIGMAS):
        return tuple(COCO_PERSON_OKS_SIGMAS.tolist())
    raise ValueError(f"KRCNN.NMS_OKS needs KRCNN.OKS_SIGMAS for a {k.NUM_KEYPOINTS}-keypoint model (COCO's "
                     "person sigmas fit 17 keypoints only)")


def _rpn_on(cfg) -> bool:
    return bool(cfg.RPN.RPN_ON or cfg.MODEL.FASTER_RCNN or cfg.MODEL.RPN_ONLY)


def _float32(*tensors: torch.Tensor) -> tuple:
    """Head outputs in float32 (a no-op without AMP): under autocast the heads run in float16 / bfloat16, but
    losses and box decoding keep Detectron's float32 numerics."""
    return tuple(t.float() for t in tensors)


class GeneralizedRCNN(nn.Module):
    """``forward(data, im_info, roidb=None)``: losses in ``train()`` mode, detections in ``eval()`` mode.

    data ``(N, 3, H, W)``, im_info ``(N, 3)`` = (scaled height, scaled width, im_scale), roidb a list of
    N entries in network-input coordinates (required in training). In inference the roidb is optional and
    read only for ``proposals`` and the original ``height`` / ``width`` that boxes are clipped to and masks
    pasted into; pass at least ``[{'height': h, 'width': w}, ...]``: without it the size is recovered as
    round(scaled size / im_scale), which can be a pixel off when im_scale < 1.
    Masks come back on the CPU (full-image uint8), everything else on the input's device.
    ``generator`` (a ``torch.Generator``, default None = global RNG) seeds the RoI sampling.
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
        self.mask_on = bool(cfg.MODEL.MASK_ON) and not self.rpn_only
        self.keypoints_on = bool(cfg.MODEL.KEYPOINTS_ON) and not self.rpn_only
        self.roi_indices = _roi_feature_indices(cfg, self.body.levels)
        roi_scales = [scales[i] for i in self.roi_indices]
        self.box_head = self.box_outputs = self.mask_head = self.keypoint_head = None
        if not self.rpn_only:
            self.box_head = registry.build("box_head", cfg.FAST_RCNN.ROI_BOX_HEAD, cfg, dim, roi_scales)
            self.box_outputs = build_box_outputs(cfg, self.box_head.dim_out)
        if self.mask_on:
            self.mask_head = registry.build("mask_head", cfg.MRCNN.ROI_MASK_HEAD, cfg, dim, roi_scales)
            if self.mask_head.shares_res5:
                if not hasattr(self.box_head, "res5"):
                    raise ValueError(
                        f"MRCNN.ROI_MASK_HEAD {cfg.MRCNN.ROI_MASK_HEAD!r} shares res5 with the box head, but "
                        f"FAST_RCNN.ROI_BOX_HEAD {cfg.FAST_RCNN.ROI_BOX_HEAD!r} has none (use ResNet_roi_conv5_head)"
                    )
                self.mask_head.share_res5(self.box_head.res5)
        if self.keypoints_on:
            self.keypoint_head = registry.build("keypoint_head", cfg.KRCNN.ROI_KEYPOINTS_HEAD, cfg, dim, roi_scales)
        self.sampling = FastRCNNSampling.from_cfg(cfg)
        self.box_inference = BoxInference.from_cfg(cfg)
        self.dedup_scale = float(cfg.DEDUP_BOXES)
        self.mask_settings = MaskSettings.from_cfg(cfg)
        self.keypoint_settings = KeypointSettings.from_cfg(cfg)
        self.num_classes = int(cfg.MODEL.NUM_CLASSES)
        self.freeze_conv_body = bool(cfg.TRAIN.FREEZE_CONV_BODY)
        self.generator: torch.Generator | None = None

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)

    # ---------------------------------------------------------------------------------------------- #

    def forward(self, data: torch.Tensor, im_info: torch.Tensor, roidb: Sequence[dict] | None = None):
        if data.dim() != 4 or im_info.shape != (data.shape[0], 3):
            raise ValueError(
                f"data must be (N, 3, H, W) and im_info (N, 3); got {tuple(data.shape)} and {tuple(im_info.shape)}"
            )
        if roidb is not None and len(roidb) != data.shape[0]:
            raise ValueError(f"{len(roidb)} roidb entries for {data.shape[0]} images")
        im_info = im_info.to(device=data.device, dtype=torch.float32)
        features = self.body(data)
        if self.training:
            if roidb is None:
                raise ValueError("GeneralizedRCNN needs the minibatch roidb in training mode")
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
        targets = fast_rcnn_targets(proposals.detach(), im_info, roidb, self.sampling, self.generator)
        roi_feats = [features[i] for i in self.roi_indices]
        share_res5 = self.mask_on and self.mask_head.shares_res5
        if share_res5:
            box_feat, res5 = self.box_head(roi_feats, targets.rois, return_res5=True)
        else:
            box_feat = self.box_head(roi_feats, targets.rois)
        cls_score, bbox_pred = _float32(*self.box_outputs(box_feat))
        losses.update(fast_rcnn_losses(
            cls_score, bbox_pred, targets.labels, targets.bbox_targets,
            targets.bbox_inside_weights, targets.bbox_outside_weights,
        ))
        losses["accuracy_cls"] = classification_accuracy(cls_score, targets.labels)
        if self.mask_on:
            losses["loss_mask"] = self._mask_loss(roi_feats, targets, im_info, roidb, res5 if share_res5 else None)
        if self.keypoints_on:
            losses["loss_kps"] = self._keypoint_loss(roi_feats, targets, roidb)
        return losses

    def _mask_loss(self, roi_feats, targets: FastRCNNTargets, im_info, roidb, res5) -> torch.Tensor:
        s = self.mask_settings
        mt = mask_rcnn_targets(
            targets.rois, targets.labels, roidb, im_info[:, 2].tolist(), s.resolution, self.num_classes,
            s.cls_specific,
        )
        # SHARE_RES5: Detectron's SampleAs picks the box head's res5 rows of the RoIs that have a mask.
        if res5 is not None:
            logits = self.mask_head.predict(res5[mt.roi_has_mask])
        else:
            logits = self.mask_head(roi_feats, mt.rois)
        return mask_rcnn_loss(logits.float(), mt.targets, s.loss_weight)

    def _keypoint_loss(self, roi_feats, targets: FastRCNNTargets, roidb) -> torch.Tensor:
        s = self.keypoint_settings
        kt = keypoint_rcnn_targets(
            targets.labelled, roidb, s.heatmap_size, self.sampling.fg_thresh, self.sampling.fg_rois_per_image,
            s.normalizer_denominator, s.min_count, self.generator,
        )
        heatmaps = self.keypoint_head(roi_feats, kt.rois).float()
        normalizer = None if s.by_visible else kt.normalizer
        return keypoint_rcnn_loss(heatmaps, kt.locations, kt.weights, s.loss_weight, normalizer)

    # ---------------------------------------------------------------------------------------------- #

    def _image_sizes(self, im_info: torch.Tensor, roidb) -> List[tuple]:
        """Original (height, width) per image: the roidb's when given, else recovered from im_info."""
        sizes = []
        for i in range(im_info.shape[0]):
            entry = roidb[i] if roidb is not None else {}
            if "height" in entry and "width" in entry:
                sizes.append((int(entry["height"]), int(entry["width"])))
            else:
                sizes.append(original_image_size(im_info[i]))
        return sizes

    @torch.no_grad()
    def _detect(self, features, im_info, roidb) -> List[Detections]:
        sizes = self._image_sizes(im_info, roidb)
        if self.rpn is not None:
            rpn_out = self.rpn(features, im_info)
            proposals = rpn_out.rois
            if self.rpn_only:
                return [_proposal_results(rpn_out.rois, rpn_out.scores, im_info, i) for i in range(im_info.shape[0])]
        else:
            if roidb is None:
                raise ValueError("a model without RPN needs the roidb (with 'proposals') at inference")
            proposals = self._proposals(roidb, im_info.device)
        roi_feats = [features[i] for i in self.roi_indices]
        if self.rpn is None and self.dedup_scale > 0:
            proposals, cls_score, bbox_pred = self._deduplicated_box_outputs(roi_feats, proposals)
        else:
            cls_score, bbox_pred = _float32(*self.box_outputs(self.box_head(roi_feats, proposals)))
        results = detect_boxes(cls_score, bbox_pred, proposals, im_info, self.box_inference, sizes)
        det_rois = self.detection_rois(results, im_info)
        if self.mask_on:
            self.add_masks(results, roi_feats, det_rois, sizes)
        if self.keypoints_on:
            self.add_keypoints(results, roi_feats, det_rois)
        return results

    def _deduplicated_box_outputs(self, roi_feats, proposals: torch.Tensor):
        """Detectron's ``DEDUP_BOXES`` for precomputed proposals: proposals equal after ``round(box *
        DEDUP_BOXES)`` are scored once, through the first of them, and every member of the group takes that
        proposal's box and outputs. Returns (proposals, cls_score, bbox_pred) for all proposals."""
        index = torch.zeros(0, dtype=torch.int64, device=proposals.device)
        inverse = torch.zeros(proposals.shape[0], dtype=torch.int64, device=proposals.device)
        for image in torch.unique(proposals[:, 0]):
            rows = torch.nonzero(proposals[:, 0] == image).squeeze(1)
            first, group = unique_boxes(proposals[rows, 1:5], self.dedup_scale)
            inverse[rows] = group + index.shape[0]
            index = torch.cat([index, rows[first]])
        unique = proposals[index]
        cls_score, bbox_pred = _float32(*self.box_outputs(self.box_head(roi_feats, unique)))
        return unique[inverse], cls_score[inverse], bbox_pred[inverse]

    # The cascade's instance steps, public because test-time augmentation (evaluation/bbox_aug.py) runs them on
    # its own final boxes.

    @staticmethod
    def detection_rois(results: List[Detections], im_info: torch.Tensor) -> torch.Tensor:
        """The detections of every image as ``(D, 5)`` RoIs in network-input pixels (boxes * im_scale)."""
        rois = []
        for i, det in enumerate(results):
            boxes = det["boxes"] * im_info[i, 2]
            rois.append(torch.cat([boxes.new_full((boxes.shape[0], 1), float(i)), boxes], dim=1))
        return torch.cat(rois)

    def detection_mask_probs(self, results: List[Detections], roi_feats, det_rois: torch.Tensor) -> torch.Tensor:
        """Detectron's ``im_detect_mask``: each detection's soft mask ``(D, M, M)`` for its class."""
        classes = torch.cat([det["classes"] for det in results])
        if det_rois.shape[0] == 0:
            return det_rois.new_zeros((0, self.mask_settings.resolution, self.mask_settings.resolution))
        return mask_probs(self.mask_head(roi_feats, det_rois).float(), classes)

    def add_masks(self, results: List[Detections], roi_feats, det_rois: torch.Tensor, sizes) -> None:
        """Detectron's ``im_detect_mask`` + ``segm_results``: ``masks`` ``(D, height, width)`` uint8."""
        self.paste_masks(results, self.detection_mask_probs(results, roi_feats, det_rois), sizes)

    def paste_masks(self, results: List[Detections], probs: torch.Tensor, sizes) -> None:
        """Detectron's ``segm_results``: soft masks ``(D, M, M)`` of all images' detections, in order, become
        each image's ``masks`` ``(D_i, height, width)`` uint8."""
        start = 0
        for det, (height, width) in zip(results, sizes):
            count = det["boxes"].shape[0]
            if count == 0:
                det["masks"] = torch.zeros((0, height, width), dtype=torch.uint8)
            else:
                det["masks"] = paste_masks_in_image(
                    probs[start : start + count], det["boxes"], height, width, self.mask_settings.thresh
                )
            start += count

    def add_keypoints(self, results: List[Detections], roi_feats, det_rois: torch.Tensor) -> None:
        """Detectron's ``im_detect_keypoints`` + ``keypoint_results``: ``keypoints`` ``(D, K, 3)`` =
        (x, y, heatmap logit) in original pixels. With KRCNN.NMS_OKS, detections whose keypoints overlap a
        better one's (OKS > 0.3) are dropped and the rest ordered by mean keypoint logit, as Detectron does."""
        heatmaps = self.keypoint_head(roi_feats, det_rois).float() if det_rois.shape[0] else None
        self.decode_keypoints(results, heatmaps)

    def decode_keypoints(self, results: List[Detections], heatmaps: torch.Tensor | None) -> None:
        """Detectron's ``keypoint_results``: heatmap logits ``(D, K, S, S)`` of all images' detections, in order,
        become each image's ``keypoints`` (KRCNN.NMS_OKS applied)."""
        s = self.keypoint_settings
        start = 0
        for det in results:
            count = det["boxes"].shape[0]
            if count == 0:
                det["keypoints"] = torch.zeros((0, s.num_keypoints, 3))
            else:
                kps = heatmaps_to_keypoints(heatmaps[start : start + count], det["boxes"], s.inference_min_size)
                det["keypoints"] = kps[..., :3].to(det["boxes"].device)
                if s.nms_oks_sigmas:
                    keep = nms_oks(kps, det["boxes"], NMS_OKS_THRESH, s.nms_oks_sigmas)
                    det.update({key: value[keep.to(value.device)] for key, value in det.items()})
            start += count


def _proposal_results(rois: torch.Tensor, scores: torch.Tensor, im_info: torch.Tensor, i: int) -> Detections:
    """RPN-only inference (Detectron's ``generate_rpn_on_dataset``): image `i`'s proposals as ``boxes``
    ``(P, 4)`` in original pixels with their objectness ``scores`` ``(P,)``; no ``classes``."""
    mine = rois[:, 0] == i
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
