"""detectron2's ROI-heads cascades: ``StandardROIHeads`` (FPN / C5: each head pools for itself) and
``Res5ROIHeads`` / ``Res5ROIHeadsExtraNorm`` (C4: res5 on 14x14 pooled RoIs, shared by box and mask).

Same contract as ``roi_heads.DetectronROIHeads`` (``roi_heads.ROIHeads``); what differs is d2's:

- training (``label_and_sample_proposals``): crowd gt dropped (d2's data never keeps them), gt boxes appended to
  the proposals (``TRAIN.PROPOSAL_APPEND_GT``), IoU without +1, d2's ``Matcher`` (``TRAIN.FG_THRESH``; IoU below
  ``TRAIN.BG_THRESH_HI`` background, between them ignored; below ``BG_THRESH_LO`` ignored when it is > 0),
  ``subsample_labels`` (``BATCH_SIZE_PER_IM``, ``FG_FRACTION``), background label K. Losses ``loss_cls``,
  ``loss_box_reg``, ``loss_mask``, ``loss_keypoint`` (``fast_rcnn.py``, ``mask_head.py``, ``keypoint_head.py``);
- inference: ``fast_rcnn_inference`` per image, masks and keypoints on the final boxes, then
  ``detector_postprocess`` to the original size (``postprocess.py``).
Classes come out as pydetectron's contiguous ids ``1..K`` (d2's class c is c + 1); keypoints are (x, y, d2's score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.boxes import box_iou
from pydetectron.config.names import normalize_module_name
from pydetectron.modeling import registry
from pydetectron.modeling.backbones.resnet import make_res_stage, norm_spec_from_cfg
from pydetectron.modeling.box_head import classification_accuracy
from pydetectron.modeling.detectron2.box_transform import Box2BoxTransform
from pydetectron.modeling.detectron2.fast_rcnn import (
    FastRCNNLossSettings,
    FastRCNNOutputLayers,
    FastRCNNTestSettings,
    fast_rcnn_inference_single_image,
    fast_rcnn_losses,
)
from pydetectron.modeling.detectron2.keypoint_head import heatmaps_to_keypoints, keypoint_rcnn_loss
from pydetectron.modeling.detectron2.mask_head import build_mask_head, mask_probs, mask_rcnn_loss, mask_targets
from pydetectron.modeling.detectron2.matcher import Matcher
from pydetectron.modeling.detectron2.postprocess import detector_postprocess
from pydetectron.modeling.detectron2.sampling import subsample_labels
from pydetectron.modeling.layers import compose_weight_mapping, norm_weight_mapping
from pydetectron.modeling.roi_features import RoIFeatureExtractor, build_roi_feature_extractor
from pydetectron.modeling.roi_heads import Detections, ROIHeads, float32

RES5_STRIDE = 2  # d2's res5 head: stride 2 on the pooled map (14 -> 7)


@dataclass(frozen=True)
class D2Sampling:
    """The ``TRAIN.*`` values of d2's proposal labelling and sampling."""

    batch_size_per_image: int
    positive_fraction: float
    thresholds: Tuple[float, ...]
    labels: Tuple[int, ...]
    append_gt: bool

    @classmethod
    def from_cfg(cls, cfg) -> D2Sampling:
        """d2's ``ROI_HEADS.IOU_THRESHOLDS`` / ``IOU_LABELS`` from Detectron's keys: [BG_THRESH_LO (> 0:
        below it ignored), BG_THRESH_HI (< FG_THRESH: between it and FG_THRESH ignored), FG_THRESH]."""
        t = cfg.TRAIN
        fg, hi, lo = float(t.FG_THRESH), float(t.BG_THRESH_HI), float(t.BG_THRESH_LO)
        if not 0.0 <= lo <= hi <= fg:
            raise ValueError(f"need 0 <= TRAIN.BG_THRESH_LO ({lo}) <= TRAIN.BG_THRESH_HI ({hi}) <= TRAIN.FG_THRESH "
                             f"({fg}) for detectron2's proposal matcher")
        thresholds: List[float] = []
        labels: List[int] = []
        if lo > 0:
            thresholds.append(lo)
            labels.append(-1)
        labels.append(0)
        if hi < fg:
            thresholds.append(hi)
            labels.append(-1)
        thresholds.append(fg)
        labels.append(1)
        return cls(int(t.BATCH_SIZE_PER_IM), float(t.FG_FRACTION), tuple(thresholds), tuple(labels),
                   bool(t.PROPOSAL_APPEND_GT))


@dataclass
class SampledRoIs:
    """The sampled RoIs of a minibatch, images in order: ``rois`` ``(R, 5)``, d2 ``gt_classes`` ``(R,)``
    (0..K-1, K background), the matched gt ``gt_boxes`` ``(R, 4)`` and ``gt_index`` ``(R,)`` (into the image's
    roidb gt; -1 when the image has no gt)."""

    rois: torch.Tensor
    gt_classes: torch.Tensor
    gt_boxes: torch.Tensor
    gt_index: torch.Tensor

    @property
    def image(self) -> torch.Tensor:
        return self.rois[:, 0].long()


def label_and_sample_proposals(proposals: torch.Tensor, roidb: Sequence[dict], num_classes: int,
                               sampling: D2Sampling, generator: torch.Generator | None = None) -> SampledRoIs:
    """d2's ``ROIHeads.label_and_sample_proposals`` over RoIs ``(P, 5)`` and the roidb's gt (network-input
    pixels; ``gt_classes`` 1..K become d2's 0..K-1). `num_classes` = K foreground classes."""
    matcher = Matcher(sampling.thresholds, sampling.labels, allow_low_quality_matches=False)
    parts: List[Tuple[torch.Tensor, ...]] = []
    device = proposals.device
    for i, entry in enumerate(roidb):
        boxes = proposals[proposals[:, 0] == i, 1:5]
        gt_all = torch.as_tensor(entry["boxes"], dtype=boxes.dtype, device=device).reshape(-1, 4)
        crowd = torch.as_tensor(entry["is_crowd"], dtype=torch.bool, device=device).reshape(-1)
        keep = torch.nonzero(~crowd).squeeze(1)
        gt_boxes = gt_all[keep]
        gt_classes = torch.as_tensor(entry["gt_classes"], dtype=torch.int64, device=device).reshape(-1)[keep] - 1
        if sampling.append_gt:
            boxes = torch.cat([boxes, gt_boxes])
        matched_idxs, matched_labels = matcher(box_iou(gt_boxes, boxes, legacy_plus_one=False))
        has_gt = gt_classes.numel() > 0
        if has_gt:
            labels = gt_classes[matched_idxs]
            labels[matched_labels == 0] = num_classes
            labels[matched_labels == -1] = -1
        else:
            labels = torch.zeros_like(matched_idxs) + num_classes
        fg, bg = subsample_labels(labels, sampling.batch_size_per_image, sampling.positive_fraction, num_classes,
                                  generator)
        sampled = torch.cat([fg, bg])
        rois = torch.cat([boxes.new_full((sampled.numel(), 1), float(i)), boxes[sampled]], dim=1)
        if has_gt:
            matched = matched_idxs[sampled]
            parts.append((rois, labels[sampled], gt_boxes[matched], keep[matched]))
        else:  # d2 has no gt boxes then: its box loss reads the proposals (only background is sampled)
            parts.append((rois, labels[sampled], boxes[sampled], torch.full_like(sampled, -1)))
    rois, classes, gt_boxes, gt_index = (torch.cat(items) for items in zip(*parts))
    return SampledRoIs(rois, classes, gt_boxes, gt_index)


def _fg_rows(sampled: SampledRoIs, num_classes: int) -> torch.Tensor:
    """d2's ``select_foreground_proposals``: rows with a class in 0..K-1."""
    return torch.nonzero((sampled.gt_classes >= 0) & (sampled.gt_classes < num_classes)).squeeze(1)


def _gt_keypoints(roidb: Sequence[dict], image: torch.Tensor, gt_index: torch.Tensor, device) -> torch.Tensor:
    rows = []
    for i, g in zip(image.tolist(), gt_index.tolist()):
        kps = roidb[i].get("gt_keypoints")
        if kps is None:
            raise KeyError(f"roidb[{i}] has no 'gt_keypoints', which MODEL.KEYPOINTS_ON training needs")
        rows.append(torch.as_tensor(kps[g], dtype=torch.float32))
    if not rows:
        return torch.zeros((0, 0, 3), device=device)
    return torch.stack(rows).to(device)


def _with_visible_keypoints(keypoints: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """d2's ``select_proposals_with_visible_keypoints``: rows with a visible (v >= 1) keypoint inside the box
    (borders included)."""
    if keypoints.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    xs, ys = keypoints[:, :, 0], keypoints[:, :, 1]
    b = boxes[:, None, :]
    inside = (xs >= b[:, :, 0]) & (xs <= b[:, :, 2]) & (ys >= b[:, :, 1]) & (ys <= b[:, :, 3])
    return torch.nonzero((inside & (keypoints[:, :, 2] >= 1)).any(dim=1)).squeeze(1)


class D2ROIHeadsBase(ROIHeads):
    """What StandardROIHeads and Res5ROIHeads share: sampling, box losses and inference, the mask and keypoint
    steps on given RoIs, postprocessing. Subclasses say how box features and mask logits are computed."""

    def __init__(self, cfg, box_head: nn.Module, box_outputs: FastRCNNOutputLayers,
                 mask_head: nn.Module | None, keypoint_head: nn.Module | None) -> None:
        self.box_head, self.box_outputs = box_head, box_outputs
        self.mask_head, self.keypoint_head = mask_head, keypoint_head
        self.num_classes = int(cfg.MODEL.NUM_CLASSES) - 1
        self.sampling = D2Sampling.from_cfg(cfg)
        self.box2box = Box2BoxTransform(tuple(cfg.MODEL.BBOX_REG_WEIGHTS))
        self.loss_settings = FastRCNNLossSettings.from_cfg(cfg)
        self.test_settings = FastRCNNTestSettings.from_cfg(cfg)
        self.mask_resolution = int(cfg.MRCNN.RESOLUTION)
        self.num_keypoints = int(cfg.KRCNN.NUM_KEYPOINTS)
        self.mask_loss_weight = float(cfg.MRCNN.WEIGHT_LOSS_MASK)
        self.mask_threshold = float(cfg.MRCNN.THRESH_BINARIZE)
        self.keypoint_loss_weight = float(cfg.KRCNN.LOSS_WEIGHT)
        self.keypoint_normalizer = None if cfg.KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS else float(
            cfg.KRCNN.NUM_KEYPOINTS * cfg.TRAIN.BATCH_SIZE_PER_IM * cfg.TRAIN.FG_FRACTION)
        self.generator: torch.Generator | None = None

    def head_modules(self) -> Dict[str, nn.Module | None]:
        return {"box_head": self.box_head, "box_outputs": self.box_outputs, "mask_head": self.mask_head,
                "keypoint_head": self.keypoint_head}

    def _box_features(self, features, rois: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
        """(box features, the per-RoI maps the mask head reads or None)."""
        raise NotImplementedError

    def _mask_logits(self, features, rois: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- #

    def forward_train(self, features, proposals, im_info, roidb) -> Dict[str, torch.Tensor]:
        sampled = label_and_sample_proposals(proposals.detach(), roidb, self.num_classes, self.sampling,
                                             self.generator)
        box_feat, shared = self._box_features(features, sampled.rois)
        cls_score, bbox_pred = float32(*self.box_outputs(box_feat))
        losses = fast_rcnn_losses(cls_score, bbox_pred, sampled.rois[:, 1:5], sampled.gt_boxes, sampled.gt_classes,
                                  self.box2box, self.loss_settings)
        losses["accuracy_cls"] = classification_accuracy(cls_score, sampled.gt_classes)
        fg = _fg_rows(sampled, self.num_classes)
        if self.mask_head is not None:
            rois = sampled.rois[fg]
            logits = self._mask_logits(features, rois, shared[fg] if shared is not None else None).float()
            segms = [roidb[i]["segms"][g] for i, g in zip(sampled.image[fg].tolist(), sampled.gt_index[fg].tolist())]
            targets = mask_targets(segms, rois[:, 1:5], logits.shape[-1])
            losses["loss_mask"] = mask_rcnn_loss(logits, sampled.gt_classes[fg], targets) * self.mask_loss_weight
        if self.keypoint_head is not None:
            keypoints = _gt_keypoints(roidb, sampled.image[fg], sampled.gt_index[fg], proposals.device)
            rows = _with_visible_keypoints(keypoints, sampled.rois[fg, 1:5])
            rois = sampled.rois[fg][rows]
            heatmaps = self.keypoint_head(features, rois).float()
            normalizer = None if self.keypoint_normalizer is None else self.keypoint_normalizer * len(roidb)
            losses["loss_keypoint"] = keypoint_rcnn_loss(
                heatmaps, keypoints[rows], rois[:, 1:5], normalizer) * self.keypoint_loss_weight
        return losses

    # ---------------------------------------------------------------------------------------------- #

    @torch.no_grad()
    def forward_inference(self, features, proposals, im_info, sizes, precomputed) -> List[Detections]:
        box_feat, _ = self._box_features(features, proposals)
        cls_score, bbox_pred = float32(*self.box_outputs(box_feat))
        results = []
        for i in range(im_info.shape[0]):
            rows = proposals[:, 0] == i
            boxes = self.box2box.apply_deltas(bbox_pred[rows], proposals[rows, 1:5])
            probs = F.softmax(cls_score[rows], dim=-1)
            shape = (float(im_info[i, 0]), float(im_info[i, 1]))
            results.append(fast_rcnn_inference_single_image(boxes, probs, shape, self.test_settings)[0])
        self.add_heads_outputs(results, features)
        out = []
        for i, det in enumerate(results):
            det = detector_postprocess(det, (float(im_info[i, 0]), float(im_info[i, 1])), sizes[i],
                                       self.mask_threshold)
            det["classes"] = det["classes"] + 1
            out.append(det)
        return out

    def add_heads_outputs(self, results: List[Detections], features) -> None:
        """d2's ``forward_with_given_boxes``: soft masks (``mask_probs``) and keypoints (x, y, score) of each
        image's detections (network-input pixels, d2 classes)."""
        if self.mask_head is None and self.keypoint_head is None:
            return
        counts = [det["boxes"].shape[0] for det in results]
        rois = torch.cat([torch.cat([det["boxes"].new_full((n, 1), float(i)), det["boxes"]], dim=1)
                          for i, (det, n) in enumerate(zip(results, counts))])
        classes = torch.cat([det["classes"] for det in results])
        if self.mask_head is not None:
            if rois.shape[0]:
                probs = mask_probs(self._mask_logits(features, rois, None).float(), classes)
            else:
                side = self.mask_resolution
                probs = rois.new_zeros((0, side, side))
            for det, p in zip(results, probs.split(counts)):
                det["mask_probs"] = p
        if self.keypoint_head is not None:
            if rois.shape[0]:
                kps = heatmaps_to_keypoints(self.keypoint_head(features, rois).float(), rois[:, 1:5])[:, :, [0, 1, 3]]
            else:
                kps = rois.new_zeros((0, self.num_keypoints, 3))
            for det, k in zip(results, kps.split(counts)):
                det["keypoints"] = k


class StandardROIHeads(D2ROIHeadsBase):
    """d2's ``StandardROIHeads``: box head (``FAST_RCNN.ROI_BOX_HEAD``, e.g. FastRCNNConvFCHead) + d2 box
    predictor, mask head (``MRCNN.ROI_MASK_HEAD``, a d2-layout head), keypoint head (``KRCNN.ROI_KEYPOINTS_HEAD``),
    each pooling its own features."""

    def _box_features(self, features, rois):
        return self.box_head(features, rois), None

    def _mask_logits(self, features, rois, shared):
        return self.mask_head(features, rois)


class Res5Head(nn.Module):
    """The C4 box feature of d2's ``Res5ROIHeads``: pool (``FAST_RCNN.ROI_XFORM_*``, 14x14), res5 (3 bottleneck
    blocks, first stride 2; ``res5_*`` blobs), the extra norm of ``Res5ROIHeadsExtraNorm`` when given, then the
    mean over the 7x7 map. ``forward(features, rois) -> (R, dim_out)``; ``res5_maps`` gives the maps the mask
    head reads."""

    def __init__(self, pooler: RoIFeatureExtractor, res5: nn.Module, dim_out: int,
                 extra_norm: nn.Module | None = None, extra_norm_blob: str = "") -> None:
        super().__init__()
        self.roi_xform = pooler
        self.res5 = res5
        self.extra_norm = extra_norm
        self.extra_norm_blob = extra_norm_blob
        self.dim_out = dim_out

    def res5_maps(self, features, rois: torch.Tensor) -> torch.Tensor:
        x = self.res5(self.roi_xform(features, rois))
        return self.extra_norm(x) if self.extra_norm is not None else x

    def forward(self, features, rois: torch.Tensor) -> torch.Tensor:
        return self.res5_maps(features, rois).mean(dim=[2, 3])

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        mapping = {f"res5.{k}": v for k, v in compose_weight_mapping(self.res5).items()}
        if self.extra_norm is not None:
            mapping.update({f"extra_norm.{k}": v for k, v in
                            norm_weight_mapping(self.extra_norm, self.extra_norm_blob).items()})
        return mapping


class Res5ROIHeads(D2ROIHeadsBase):
    """d2's ``Res5ROIHeads`` (C4): box features are the mean of res5 on the pooled RoIs; in training the mask
    head reads the foreground RoIs' res5 maps, in inference res5 runs again on the final boxes."""

    def __init__(self, cfg, box_head: Res5Head, box_outputs, mask_head) -> None:
        super().__init__(cfg, box_head, box_outputs, mask_head, None)

    def _box_features(self, features, rois):
        maps = self.box_head.res5_maps(features, rois)
        return maps.mean(dim=[2, 3]), maps

    def _mask_logits(self, features, rois, shared):
        return self.mask_head.predict(shared if shared is not None else self.box_head.res5_maps(features, rois))


# ------------------------------------------------------------------------------------------------------ #
# builders


def _check_resolution(key: str, value: int, expected: int, why: str) -> None:
    if int(value) != expected:
        raise ValueError(f"{key} = {value}, but {why} gives {expected} x {expected}: set {key} to {expected}")


def _d2_mask_head(cfg, dim_in: int, spatial_scales) -> nn.Module:
    head = registry.build("mask_head", cfg.MRCNN.ROI_MASK_HEAD, cfg, dim_in, spatial_scales)
    if getattr(head, "class_layout", "detectron") != "detectron2":
        raise ValueError(f"MRCNN.ROI_MASK_HEAD {cfg.MRCNN.ROI_MASK_HEAD!r} predicts Detectron's class layout "
                         "(background first); detectron2's ROI heads need a d2 head (MaskRCNNConvUpsampleHead)")
    _check_resolution("MRCNN.RESOLUTION", cfg.MRCNN.RESOLUTION, 2 * int(cfg.MRCNN.ROI_XFORM_RESOLUTION),
                      "MaskRCNNConvUpsampleHead's 2x deconv of MRCNN.ROI_XFORM_RESOLUTION")
    return head


@registry.register("roi_heads", "StandardROIHeads")
def build_standard_roi_heads(cfg, dim_in: int, spatial_scales: List[float]) -> StandardROIHeads:
    """d2's StandardROIHeads from ``FAST_RCNN.ROI_BOX_HEAD``, ``MRCNN.ROI_MASK_HEAD`` (MODEL.MASK_ON) and
    ``KRCNN.ROI_KEYPOINTS_HEAD`` (MODEL.KEYPOINTS_ON)."""
    box_head = registry.build("box_head", cfg.FAST_RCNN.ROI_BOX_HEAD, cfg, dim_in, spatial_scales)
    box_outputs = FastRCNNOutputLayers(box_head.dim_out, int(cfg.MODEL.NUM_CLASSES) - 1,
                                       bool(cfg.MODEL.CLS_AGNOSTIC_BBOX_REG))
    mask_head = _d2_mask_head(cfg, dim_in, spatial_scales) if cfg.MODEL.MASK_ON else None
    keypoint_head = None
    if cfg.MODEL.KEYPOINTS_ON:
        keypoint_head = registry.build("keypoint_head", cfg.KRCNN.ROI_KEYPOINTS_HEAD, cfg, dim_in, spatial_scales)
    return StandardROIHeads(cfg, box_head, box_outputs, mask_head, keypoint_head)


RES5_BOX_HEADS = ("", "ResNet_roi_conv5_head")
RES5_MASK_HEADS = ("", "MaskRCNNConvUpsampleHead")


def _build_res5_heads(cfg, dim_in: int, spatial_scales: List[float], extra_norm: bool) -> Res5ROIHeads:
    name = "Res5ROIHeadsExtraNorm" if extra_norm else "Res5ROIHeads"
    if cfg.MODEL.KEYPOINTS_ON:
        raise ValueError(f"MODEL.ROI_HEADS_NAME {name} has no keypoint head (detectron2 refuses KEYPOINT_ON too)")
    if len(spatial_scales) != 1:
        raise ValueError(f"{name} pools from one map (C4), got {len(spatial_scales)} scales {spatial_scales}")
    if normalize_module_name(cfg.FAST_RCNN.ROI_BOX_HEAD) not in RES5_BOX_HEADS:
        raise ValueError(f"FAST_RCNN.ROI_BOX_HEAD {cfg.FAST_RCNN.ROI_BOX_HEAD!r} cannot be used by {name}, whose "
                         f"box head is res5; leave it empty or one of {RES5_BOX_HEADS[1:]}")
    pooler = build_roi_feature_extractor(cfg, cfg.FAST_RCNN, spatial_scales)
    dim_out = 2 * dim_in  # res5 doubles res4's width (d2: RES2_OUT_CHANNELS * 8)
    res5 = make_res_stage(cfg, "res5", num_blocks=3, dim_in=dim_in, dim_out=dim_out,
                          dim_inner=cfg.RESNETS.NUM_GROUPS * cfg.RESNETS.WIDTH_PER_GROUP * 8, stride_init=RES5_STRIDE)
    norm = blob = None
    if extra_norm:
        spec = norm_spec_from_cfg(cfg)
        norm, blob = spec.make(dim_out), "res5_extra" + spec.blob_suffix
    box_head = Res5Head(pooler, res5, dim_out, norm, blob or "")
    box_outputs = FastRCNNOutputLayers(dim_out, int(cfg.MODEL.NUM_CLASSES) - 1, bool(cfg.MODEL.CLS_AGNOSTIC_BBOX_REG))
    mask_head = None
    if cfg.MODEL.MASK_ON:
        if normalize_module_name(cfg.MRCNN.ROI_MASK_HEAD) not in RES5_MASK_HEADS:
            raise ValueError(f"MRCNN.ROI_MASK_HEAD {cfg.MRCNN.ROI_MASK_HEAD!r} cannot be used by {name}: its mask "
                             "head is MaskRCNNConvUpsampleHead on the res5 maps")
        _check_resolution("MRCNN.RESOLUTION", cfg.MRCNN.RESOLUTION, 2 * pooler.resolution // RES5_STRIDE,
                          f"{name}'s 2x deconv of the res5 map")
        mask_head = build_mask_head(cfg, dim_out, None, int(cfg.MRCNN.NUM_CONV))
    return Res5ROIHeads(cfg, box_head, box_outputs, mask_head)


@registry.register("roi_heads", "Res5ROIHeads")
def build_res5_roi_heads(cfg, dim_in: int, spatial_scales: List[float]) -> Res5ROIHeads:
    return _build_res5_heads(cfg, dim_in, spatial_scales, extra_norm=False)


@registry.register("roi_heads", "Res5ROIHeadsExtraNorm")
def build_res5_roi_heads_extra_norm(cfg, dim_in: int, spatial_scales: List[float]) -> Res5ROIHeads:
    """HPT's / MoCo's ``Res5ROIHeadsExtraNorm``: res5 followed by a ``RESNETS.NORM`` norm layer."""
    return _build_res5_heads(cfg, dim_in, spatial_scales, extra_norm=True)
