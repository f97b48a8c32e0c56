"""ROI heads: the box / mask / keypoint cascade on proposals, from training targets to final detections.

The detector (``detector.py``) makes proposals (RPN, or precomputed) and hands them with the maps the heads pool
from to an ``ROIHeads``, built by name from the registry (kind ``roi_heads``, ``MODEL.ROI_HEADS_NAME``, builders
``(cfg, dim_in, spatial_scales) -> ROIHeads``). ``DetectronROIHeads`` is Detectron's cascade
(``fast_rcnn_heads`` + ``mask_rcnn_heads`` + ``keypoint_rcnn_heads`` and ``core/test.py:im_detect_all``); the
detector holds no convention of its own, so another cascade (detectron2's) registers beside it.

Why an ROIHeads is not an ``nn.Module``: its head modules are registered on the detector, under the names of
``head_modules()`` (``box_head``, ``box_outputs``, ``mask_head``, ``keypoint_head``), so the state_dict keys and
the Detectron blob mapping are those of the modules themselves (``box_head.fc6.weight`` -> ``fc6_w``) and every
checkpoint and Detectron ``.pkl`` loads as before; registered under both, they would appear twice. The cascade
holds references to those modules, and ``bind`` puts it on other objects of the same names: a DataParallel
replica of the detector holds replicas of the modules (see ``GeneralizedRCNN.roi_heads``).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from pydetectron.boxes import unique_boxes
from pydetectron.modeling import registry
from pydetectron.modeling.box_head import build_box_outputs, classification_accuracy, fast_rcnn_losses
from pydetectron.modeling.keypoint_head import (
    COCO_PERSON_OKS_SIGMAS,
    heatmaps_to_keypoints,
    keypoint_rcnn_loss,
    nms_oks,
)
from pydetectron.modeling.mask_head import mask_probs, mask_rcnn_loss
from pydetectron.modeling.paste_masks import paste_masks_in_image
from pydetectron.modeling.postprocess import BoxInference, detect_boxes
from pydetectron.modeling.targets.fast_rcnn import FastRCNNSampling, FastRCNNTargets, fast_rcnn_targets
from pydetectron.modeling.targets.keypoint import keypoint_rcnn_targets
from pydetectron.modeling.targets.mask import mask_rcnn_targets

Detections = Dict[str, torch.Tensor]
NMS_OKS_THRESH = 0.3  # Detectron's keypoint_results
DEFAULT_ROI_HEADS = "DetectronROIHeads"


def float32(*tensors: torch.Tensor) -> tuple:
    """Head outputs in float32 (a no-op without AMP): under autocast the heads run in float16 / bfloat16, but
    losses and box decoding keep Detectron's float32 numerics."""
    return tuple(t.float() for t in tensors)


class ROIHeads(ABC):
    """What the detector calls. ``features`` are the maps the heads pool from (finest first), ``proposals``
    ``(P, 5)`` RoIs in network-input pixels, ``im_info`` ``(N, 3)`` as the detector's, ``roidb`` the minibatch's
    (network-input coordinates), ``sizes`` each image's original (height, width)."""

    @abstractmethod
    def head_modules(self) -> Dict[str, nn.Module | None]:
        """Attribute name -> head module (None when absent), in order: the detector registers them as its own."""

    @abstractmethod
    def forward_train(self, features: Sequence[torch.Tensor], proposals: torch.Tensor, im_info: torch.Tensor,
                      roidb: Sequence[dict]) -> Dict[str, torch.Tensor]:
        """Samples RoIs from the proposals and returns the heads' losses (``loss*``) and logged metrics."""

    @abstractmethod
    def forward_inference(self, features: Sequence[torch.Tensor], proposals: torch.Tensor, im_info: torch.Tensor,
                          sizes: Sequence[Tuple[int, int]], precomputed: bool) -> List[Detections]:
        """One dict of detections per image in original pixels (ARCHITECTURE.md, "Detector outputs").
        `precomputed`: the proposals were read from files, not made by an RPN."""

    def bind(self, modules: Mapping[str, nn.Module | None]) -> ROIHeads:
        """The same cascade (settings shared) on `modules`, named as ``head_modules()``."""
        bound = copy.copy(self)
        for name in self.head_modules():
            setattr(bound, name, modules[name])
        return bound


@dataclass(frozen=True)
class MaskSettings:
    """The ``MRCNN.*`` values the cascade reads for mask targets, loss and pasting."""

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
    """The ``KRCNN.*`` values the cascade reads for keypoint targets, loss and decoding."""

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


class DetectronROIHeads(ROIHeads):
    """Detectron's cascade: Fast R-CNN box head and outputs, then the mask and keypoint heads when on.

    Training: ``fast_rcnn_targets`` samples RoIs; the box losses (``loss_cls``, ``loss_bbox``) and the logged
    ``accuracy_cls``, then ``loss_mask`` and ``loss_kps`` on their own targets (SHARE_RES5: the mask head reads
    the box head's res5 output, as Detectron's SampleAs). Inference (``core/test.py:im_detect_all``): boxes (with
    ``DEDUP_BOXES`` for precomputed proposals), then masks and keypoints on the final detections.
    ``generator`` (a ``torch.Generator``, default None = global RNG) seeds the RoI sampling.
    """

    def __init__(self, cfg, box_head: nn.Module, box_outputs: nn.Module, mask_head: nn.Module | None = None,
                 keypoint_head: nn.Module | None = None) -> None:
        self.box_head, self.box_outputs = box_head, box_outputs
        self.mask_head, self.keypoint_head = mask_head, keypoint_head
        self.sampling = FastRCNNSampling.from_cfg(cfg)
        self.box_inference = BoxInference.from_cfg(cfg)
        self.dedup_scale = float(cfg.DEDUP_BOXES)
        self.mask_settings = MaskSettings.from_cfg(cfg)
        self.keypoint_settings = KeypointSettings.from_cfg(cfg)
        self.num_classes = int(cfg.MODEL.NUM_CLASSES)
        self.smooth_l1_beta = float(cfg.FAST_RCNN.SMOOTH_L1_BETA)
        self.box_loss_weight = float(cfg.FAST_RCNN.BBOX_REG_LOSS_WEIGHT)
        self.generator: torch.Generator | None = None

    @property
    def mask_on(self) -> bool:
        return self.mask_head is not None

    @property
    def keypoints_on(self) -> bool:
        return self.keypoint_head is not None

    def head_modules(self) -> Dict[str, nn.Module | None]:
        return {"box_head": self.box_head, "box_outputs": self.box_outputs, "mask_head": self.mask_head,
                "keypoint_head": self.keypoint_head}

    # ---------------------------------------------------------------------------------------------- #

    def forward_train(self, features, proposals, im_info, roidb) -> Dict[str, torch.Tensor]:
        targets = fast_rcnn_targets(proposals.detach(), im_info, roidb, self.sampling, self.generator)
        share_res5 = self.mask_on and self.mask_head.shares_res5
        if share_res5:
            box_feat, res5 = self.box_head(features, targets.rois, return_res5=True)
        else:
            box_feat = self.box_head(features, targets.rois)
        cls_score, bbox_pred = float32(*self.box_outputs(box_feat))
        losses = fast_rcnn_losses(
            cls_score, bbox_pred, targets.labels, targets.bbox_targets,
            targets.bbox_inside_weights, targets.bbox_outside_weights, self.smooth_l1_beta,
        )
        losses["loss_bbox"] = losses["loss_bbox"] * self.box_loss_weight
        losses["accuracy_cls"] = classification_accuracy(cls_score, targets.labels)
        if self.mask_on:
            losses["loss_mask"] = self._mask_loss(features, targets, im_info, roidb, res5 if share_res5 else None)
        if self.keypoints_on:
            losses["loss_kps"] = self._keypoint_loss(features, targets, roidb)
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

    @torch.no_grad()
    def forward_inference(self, features, proposals, im_info, sizes, precomputed) -> List[Detections]:
        if precomputed and self.dedup_scale > 0:
            proposals, cls_score, bbox_pred = self._deduplicated_box_outputs(features, proposals)
        else:
            cls_score, bbox_pred = float32(*self.box_outputs(self.box_head(features, proposals)))
        results = detect_boxes(cls_score, bbox_pred, proposals, im_info, self.box_inference, sizes)
        det_rois = self.detection_rois(results, im_info)
        if self.mask_on:
            self.add_masks(results, features, det_rois, sizes)
        if self.keypoints_on:
            self.add_keypoints(results, features, det_rois)
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
        cls_score, bbox_pred = float32(*self.box_outputs(self.box_head(roi_feats, unique)))
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


@registry.register("roi_heads", DEFAULT_ROI_HEADS)
def build_detectron_roi_heads(cfg, dim_in: int, spatial_scales: List[float]) -> DetectronROIHeads:
    """The heads ``FAST_RCNN.ROI_BOX_HEAD``, ``MRCNN.ROI_MASK_HEAD`` (MODEL.MASK_ON) and
    ``KRCNN.ROI_KEYPOINTS_HEAD`` (MODEL.KEYPOINTS_ON) on maps of `dim_in` channels at `spatial_scales`."""
    box_head = registry.build("box_head", cfg.FAST_RCNN.ROI_BOX_HEAD, cfg, dim_in, spatial_scales)
    box_outputs = build_box_outputs(cfg, box_head.dim_out)
    mask_head = keypoint_head = None
    if cfg.MODEL.MASK_ON:
        mask_head = registry.build("mask_head", cfg.MRCNN.ROI_MASK_HEAD, cfg, dim_in, spatial_scales)
        if getattr(mask_head, "class_layout", "detectron") != "detectron":
            raise ValueError(f"MRCNN.ROI_MASK_HEAD {cfg.MRCNN.ROI_MASK_HEAD!r} predicts detectron2's class layout "
                             "(no background mask); Detectron's cascade needs a Detectron mask head")
        if mask_head.shares_res5:
            if not hasattr(box_head, "res5"):
                raise ValueError(
                    f"MRCNN.ROI_MASK_HEAD {cfg.MRCNN.ROI_MASK_HEAD!r} shares res5 with the box head, but "
                    f"FAST_RCNN.ROI_BOX_HEAD {cfg.FAST_RCNN.ROI_BOX_HEAD!r} has none (use ResNet_roi_conv5_head)"
                )
            mask_head.share_res5(box_head.res5)
    if cfg.MODEL.KEYPOINTS_ON:
        keypoint_head = registry.build("keypoint_head", cfg.KRCNN.ROI_KEYPOINTS_HEAD, cfg, dim_in, spatial_scales)
    return DetectronROIHeads(cfg, box_head, box_outputs, mask_head, keypoint_head)
