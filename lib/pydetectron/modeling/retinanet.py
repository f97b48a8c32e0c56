"""RetinaNet (``MODEL.TYPE: retinanet``), as Detectron builds, trains and tests it (``retinanet_heads.py``,
``roi_data/retinanet.py``, ``core/test_retinanet.py``).

- Anchors: at FPN level l (stride 2^l, levels ``FPN.RPN_MIN_LEVEL..RPN_MAX_LEVEL``), for each octave o of
  ``SCALES_PER_OCTAVE`` and then each of ``ASPECT_RATIOS``, ``generate_anchors(2^l, (2^l * 2^(o/S) *
  ANCHOR_SCALE,), (ratio,))``: anchor index ``a = o * len(ASPECT_RATIOS) + r``.
- Head: a classification tower and a box tower of ``NUM_CONVS`` 3x3 convs + ReLU (+ GroupNorm with
  pydetectron's ``RETINANET.USE_GN``), shared by all levels
  (Caffe2 names them at the finest level: ``retnet_cls_conv_n{i}_fpn3``), then ``retnet_cls_pred`` (A * (C - 1)
  sigmoid logits, channel ``a * (C - 1) + c``, bias ``-log((1 - PRIOR_PROB) / PRIOR_PROB)``) and
  ``retnet_bbox_pred`` (A * 4 class-agnostic deltas, box coder weights 1).
- Training labels (per image, all levels at once): an anchor takes the class of the gt it overlaps most when
  that IoU is >= ``POSITIVE_OVERLAP`` or when it is (one of) the best anchor(s) of some gt; then every anchor
  whose best IoU is < ``NEGATIVE_OVERLAP`` becomes background (even such a best anchor); the rest are
  ignored. Crowd boxes play no part. ``fg_num`` = sum over images of (foreground anchors before that
  background pass + 1).
- Losses per level: sigmoid focal loss (``LOSS_ALPHA``, ``LOSS_GAMMA``) over every class of every non-ignored
  anchor, and smooth-L1 (``BBOX_REG_BETA``, times ``BBOX_REG_WEIGHT``) over foreground anchors, both divided
  by ``fg_num``.
- Inference per level: sigmoid scores above ``INFERENCE_TH`` (0 at the coarsest level), the best
  ``PRE_NMS_TOP_N`` of them decoded against their anchors and clipped; then per-class NMS (``TEST.NMS``) over
  all levels and the ``TEST.DETECTIONS_PER_IM`` best.

Detectron labels a square field of anchors sized for ``TRAIN.MAX_SIZE`` and crops it to the padded image;
here the anchors are those of the padded image's feature maps, which differs only in which anchor is a gt's
best when that best lies beyond the padded image.

``MODEL.CONVENTIONS: detectron2`` keeps this body and head (the towers' convs Gaussian(0.01) with GN too, as
detectron2's) and takes anchors, labels, losses (``loss_cls``, ``loss_box_reg``, over the loss normaliser) and
inference from ``modeling/detectron2/retinanet.py``. The box coder weights are ``RETINANET.BBOX_REG_WEIGHTS``
in both conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.boxes import box_iou, clip_boxes, decode_boxes, encode_boxes
from pydetectron.modeling import registry
from pydetectron.modeling.anchors import generate_anchors, shift_anchors
from pydetectron.modeling.backbones.resnet import get_group_gn
from pydetectron.modeling.detector_inputs import checked_im_info, original_sizes
from pydetectron.modeling.detectron2.retinanet import D2RetinaNetRules, LossNormalizer
from pydetectron.modeling.layers import compose_weight_mapping, msra_fill_
from pydetectron.modeling.losses import smooth_l1_loss
from pydetectron.ops.conv import Conv2d
from pydetectron.ops.nms import nms

BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class RetinaNetSettings:
    """The ``RETINANET.*`` / ``FPN`` / ``TEST`` values RetinaNet reads."""

    min_level: int
    max_level: int
    scales_per_octave: int
    aspect_ratios: Tuple[float, ...]
    anchor_scale: float
    positive_overlap: float
    negative_overlap: float
    alpha: float
    gamma: float
    bbox_beta: float
    bbox_weight: float
    inference_th: float
    pre_nms_top_n: int
    nms: float
    detections_per_im: int
    bbox_reg: bool
    box_weights: Tuple[float, float, float, float] = BOX_WEIGHTS
    bbox_loss_type: str = "smooth_l1"
    detectron2: bool = False  # MODEL.CONVENTIONS 'detectron2': labels, losses and inference as detectron2's

    @classmethod
    def from_cfg(cls, cfg) -> RetinaNetSettings:
        r, f, t = cfg.RETINANET, cfg.FPN, cfg.TEST
        if r.SOFTMAX:
            raise ValueError("RETINANET.SOFTMAX is not supported (Detectron's baselines use sigmoid focal loss)")
        if r.CLASS_SPECIFIC_BBOX:
            raise ValueError("RETINANET.CLASS_SPECIFIC_BBOX is not supported (Detectron's own test code for it "
                             "indexes the predictions inconsistently); use class-agnostic boxes")
        detectron2 = cfg.MODEL.CONVENTIONS == "detectron2"
        if r.BBOX_REG_LOSS_TYPE != "smooth_l1" and not detectron2:
            raise ValueError(f"RETINANET.BBOX_REG_LOSS_TYPE = {r.BBOX_REG_LOSS_TYPE!r} needs MODEL.CONVENTIONS "
                             "'detectron2' (Detectron's RetinaNet has the smooth-L1 box loss only)")
        return cls(int(f.RPN_MIN_LEVEL), int(f.RPN_MAX_LEVEL), int(r.SCALES_PER_OCTAVE),
                   tuple(float(a) for a in r.ASPECT_RATIOS), float(r.ANCHOR_SCALE), float(r.POSITIVE_OVERLAP),
                   float(r.NEGATIVE_OVERLAP), float(r.LOSS_ALPHA), float(r.LOSS_GAMMA), float(r.BBOX_REG_BETA),
                   float(r.BBOX_REG_WEIGHT), float(r.INFERENCE_TH), int(r.PRE_NMS_TOP_N), float(t.NMS),
                   int(t.DETECTIONS_PER_IM), bool(t.BBOX_REG), tuple(float(w) for w in r.BBOX_REG_WEIGHTS),
                   str(r.BBOX_REG_LOSS_TYPE), detectron2)

    @property
    def levels(self) -> List[int]:
        return list(range(self.min_level, self.max_level + 1))

    @property
    def num_anchors(self) -> int:
        return self.scales_per_octave * len(self.aspect_ratios)


def cell_anchors(settings: RetinaNetSettings, level: int) -> torch.Tensor:
    """Level `level`'s ``(A, 4)`` cell anchors, octave-major (Detectron's ``_create_cell_anchors``)."""
    stride = 2.0**level
    rows = [generate_anchors(stride, (stride * 2.0 ** (octave / settings.scales_per_octave) * settings.anchor_scale,),
                             (ratio,))
            for octave in range(settings.scales_per_octave) for ratio in settings.aspect_ratios]
    return torch.cat(rows)


class RetinaNetHead(nn.Module):
    """``forward(features) -> (logits, deltas)``: per level ``(N, A * (C - 1), H, W)`` and ``(N, A * 4, H, W)``."""

    def __init__(self, cfg, dim: int, min_level: int) -> None:
        super().__init__()
        r = cfg.RETINANET
        num_anchors = int(r.SCALES_PER_OCTAVE) * len(r.ASPECT_RATIOS)
        self.min_level = min_level
        groups = get_group_gn(cfg, dim) if r.USE_GN or r.NORM == "GN" else 0
        msra = bool(groups) and cfg.MODEL.CONVENTIONS != "detectron2"  # detectron2 keeps Gaussian(0.01) with GN
        self.cls_tower = self._tower(dim, int(r.NUM_CONVS), groups, msra)
        self.bbox_tower = None if r.SHARE_CLS_BBOX_TOWER else self._tower(dim, int(r.NUM_CONVS), groups, msra)
        self.cls_pred = Conv2d(dim, num_anchors * (int(cfg.MODEL.NUM_CLASSES) - 1), 3, padding=1)
        self.bbox_pred = Conv2d(dim, num_anchors * 4, 3, padding=1)
        for conv in (self.cls_pred, self.bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        prior = float(r.PRIOR_PROB)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - prior) / prior))

    @staticmethod
    def _tower(dim: int, num_convs: int, gn_groups: int = 0, msra: bool = False) -> nn.Sequential:
        """``num_convs`` x (3x3 conv, [GroupNorm of `gn_groups`,] ReLU): Gaussian(0.01) convs (Detectron's, and
        detectron2's with or without GN), or MSRA convs with `msra` (RETINANET.USE_GN in Detectron mode: trains
        far faster from scratch)."""
        layers: List[nn.Module] = []
        for _ in range(num_convs):
            conv = Conv2d(dim, dim, 3, padding=1)
            if msra:
                msra_fill_(conv.weight)
            else:
                nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.GroupNorm(gn_groups, dim)] if gn_groups else [conv]
            layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        logits, deltas = [], []
        for x in features:
            cls_feat = self.cls_tower(x)
            bbox_feat = cls_feat if self.bbox_tower is None else self.bbox_tower(x)
            logits.append(self.cls_pred(cls_feat))
            deltas.append(self.bbox_pred(bbox_feat))
        return logits, deltas

    def detectron_weight_mapping(self) -> Dict[str, str]:
        suffix = f"fpn{self.min_level}"
        mapping = {}
        towers = [("cls_tower", "retnet_cls_conv")] + ([("bbox_tower", "retnet_bbox_conv")] if self.bbox_tower else [])
        for attr, name in towers:
            layers = list(getattr(self, attr))
            convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
            for n, i in enumerate(convs):
                mapping[f"{attr}.{i}.weight"] = f"{name}_n{n}_{suffix}_w"
                mapping[f"{attr}.{i}.bias"] = f"{name}_n{n}_{suffix}_b"
                if isinstance(layers[i + 1], nn.GroupNorm):  # Detectron's GN blob names
                    mapping[f"{attr}.{i + 1}.weight"] = f"{name}_n{n}_{suffix}_gn_s"
                    mapping[f"{attr}.{i + 1}.bias"] = f"{name}_n{n}_{suffix}_gn_b"
        for attr, name in (("cls_pred", "retnet_cls_pred"), ("bbox_pred", "retnet_bbox_pred")):
            mapping[f"{attr}.weight"] = f"{name}_{suffix}_w"
            mapping[f"{attr}.bias"] = f"{name}_{suffix}_b"
        return mapping


@dataclass
class RetinaNetTargets:
    """Per level: labels ``(N, A, H, W)`` int64 (-1 ignore, 0 background, k class) and box targets
    ``(N, A, 4, H, W)``; `fg_num` the loss normaliser."""

    labels: List[torch.Tensor]
    bbox_targets: List[torch.Tensor]
    fg_num: float


def _level_anchors(settings: RetinaNetSettings, feature: torch.Tensor, level: int) -> torch.Tensor:
    """``(H * W * A, 4)`` anchors of one level's map, rows ordered (y, x, a)."""
    cells = cell_anchors(settings, level).to(feature.device)
    return shift_anchors(cells, 2.0**level, feature.shape[-2], feature.shape[-1])


def retinanet_targets(settings: RetinaNetSettings, features: Sequence[torch.Tensor],
                      roidb: Sequence[dict]) -> RetinaNetTargets:
    """Detectron's ``_get_retinanet_blobs`` for a minibatch (gt boxes already in network-input pixels)."""
    anchors = [_level_anchors(settings, f, lvl) for f, lvl in zip(features, settings.levels)]
    sizes = [a.shape[0] for a in anchors]
    all_anchors = torch.cat(anchors)
    num_a = settings.num_anchors
    labels_out: List[List[torch.Tensor]] = [[] for _ in anchors]
    targets_out: List[List[torch.Tensor]] = [[] for _ in anchors]
    fg_num = 0.0
    for entry in roidb:
        keep = (torch.as_tensor(entry["gt_classes"]) > 0) & ~torch.as_tensor(entry["is_crowd"]).bool()
        gt_boxes = torch.as_tensor(entry["boxes"], dtype=torch.float32)[keep].to(all_anchors.device)
        gt_classes = torch.as_tensor(entry["gt_classes"])[keep].to(all_anchors.device)
        labels = torch.full((all_anchors.shape[0],), -1, dtype=torch.int64, device=all_anchors.device)
        targets = all_anchors.new_zeros(all_anchors.shape)
        if gt_boxes.shape[0] > 0:
            overlaps = box_iou(all_anchors, gt_boxes)
            best_iou, best_gt = overlaps.max(dim=1)
            best_of_gt = (overlaps == overlaps.max(dim=0).values[None, :]).any(dim=1)
            labels[best_of_gt] = gt_classes[best_gt[best_of_gt]]
            positive = best_iou >= settings.positive_overlap
            labels[positive] = gt_classes[best_gt[positive]]
            foreground = labels >= 1
            fg_num += float(foreground.sum()) + 1.0
            targets[foreground] = encode_boxes(all_anchors[foreground], gt_boxes[best_gt[foreground]],
                                               settings.box_weights)
            labels[best_iou < settings.negative_overlap] = 0
        else:
            labels.zero_()
            fg_num += 1.0
        for i, (lab, tgt) in enumerate(zip(labels.split(sizes), targets.split(sizes))):
            h, w = features[i].shape[-2:]
            labels_out[i].append(lab.reshape(h, w, num_a).permute(2, 0, 1))
            targets_out[i].append(tgt.reshape(h, w, num_a, 4).permute(2, 3, 0, 1))
    return RetinaNetTargets([torch.stack(x) for x in labels_out], [torch.stack(x) for x in targets_out], fg_num)


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float,
                       normalizer: float) -> torch.Tensor:
    """Caffe2's ``SigmoidFocalLoss``: logits ``(N, A * K, H, W)``, labels ``(N, A, H, W)`` (-1 ignore, 0
    background, k in 1..K). Each class of each non-ignored anchor is a binary problem: positive when the label
    is that class (weight ``alpha * (1 - p)^gamma``), negative otherwise (``(1 - alpha) * p^gamma``)."""
    n, ak, h, w = logits.shape
    num_a = labels.shape[1]
    x = logits.reshape(n, num_a, ak // num_a, h, w)
    classes = torch.arange(1, ak // num_a + 1, device=logits.device).view(1, 1, -1, 1, 1)
    lab = labels.unsqueeze(2)
    positive = (lab == classes).to(x.dtype)
    negative = ((lab != -1) & (lab != classes)).to(x.dtype)
    p = torch.sigmoid(x)
    positive_term = alpha * (1 - p).pow(gamma) * F.logsigmoid(x)
    negative_term = (1 - alpha) * p.pow(gamma) * F.logsigmoid(-x)
    return -(positive * positive_term + negative * negative_term).sum() / normalizer


def retinanet_losses(settings: RetinaNetSettings, logits: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
                     targets: RetinaNetTargets) -> Dict[str, torch.Tensor]:
    """Detectron's ``fl_fpnX`` and ``retnet_loss_bbox_fpnX``, named ``loss_retnet_cls_fpnX`` /
    ``loss_retnet_bbox_fpnX``."""
    losses = {}
    num_a = settings.num_anchors
    for level, x, d, labels, tgt in zip(settings.levels, logits, deltas, targets.labels, targets.bbox_targets):
        losses[f"loss_retnet_cls_fpn{level}"] = sigmoid_focal_loss(x, labels, settings.alpha, settings.gamma,
                                                                   targets.fg_num)
        n, _, h, w = d.shape
        pred = d.reshape(n, num_a, 4, h, w).permute(0, 1, 3, 4, 2)[labels > 0]
        target = tgt.permute(0, 1, 3, 4, 2)[labels > 0]
        ones = torch.ones_like(pred)
        losses[f"loss_retnet_bbox_fpn{level}"] = settings.bbox_weight * smooth_l1_loss(
            pred, target, ones, ones, beta=settings.bbox_beta, normalizer=targets.fg_num)
    return losses


def retinanet_detections(settings: RetinaNetSettings, logits: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
                         image: int, im_scale: float, height: int, width: int) -> Dict[str, torch.Tensor]:
    """Detectron's ``test_retinanet.im_detect_bbox`` for image `image`: boxes in original pixels (``height`` x
    ``width``), scores, classes (contiguous ids), best first."""
    num_a = settings.num_anchors
    boxes, scores, classes = [], [], []
    for level, x, d in zip(settings.levels, logits, deltas):
        k, h, w = x.shape[1] // num_a, x.shape[-2], x.shape[-1]
        probs = torch.sigmoid(x[image]).reshape(num_a, k, h, w).flatten()
        th = settings.inference_th if level < settings.max_level else 0.0
        candidates = torch.nonzero(probs > th).squeeze(1)
        if candidates.numel() == 0:
            continue
        top = torch.topk(probs[candidates], min(settings.pre_nms_top_n, candidates.numel())).indices
        index = candidates[top]
        a, c = index // (k * h * w), index // (h * w) % k
        y, xs = index // w % h, index % w
        stride = 2.0**level
        anchors = cell_anchors(settings, level).to(x.device)[a]
        anchors = anchors + torch.stack([xs, y, xs, y], dim=1).to(anchors.dtype) * stride
        pred = decode_boxes(anchors, d[image].reshape(num_a, 4, h, w)[a, :, y, xs], settings.box_weights) \
            if settings.bbox_reg else anchors
        boxes.append(clip_boxes(pred / im_scale, height, width))
        scores.append(probs[index])
        classes.append(c + 1)
    if not boxes:
        empty = logits[0].new_zeros(0)
        return {"boxes": empty.reshape(0, 4), "scores": empty, "classes": empty.to(torch.int64)}
    boxes_t, scores_t, classes_t = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
    kept = []
    for cls in torch.unique(classes_t):
        members = torch.nonzero(classes_t == cls).squeeze(1)
        kept.append(members[nms(boxes_t[members], scores_t[members], settings.nms, legacy_plus_one=True)])
    keep = torch.cat(kept)
    keep = keep[torch.argsort(scores_t[keep], descending=True, stable=True)][: settings.detections_per_im]
    return {"boxes": boxes_t[keep], "scores": scores_t[keep], "classes": classes_t[keep]}


class RetinaNet(nn.Module):
    """``forward(data, im_info, roidb=None)``: the named focal / box losses in ``train()`` mode, one dict of
    detections per image (original pixels) in ``eval()`` mode — the same contract as ``GeneralizedRCNN``.

    With ``MODEL.CONVENTIONS: detectron2`` the body and head are the same modules, and anchors, labels, losses
    (``loss_cls``, ``loss_box_reg``) and inference are detectron2's (``modeling/detectron2/retinanet.py``); the
    loss normaliser's running value is the buffer ``loss_normalizer.value``."""

    def __init__(self, cfg) -> None:
        super().__init__()
        if not cfg.FPN.FPN_ON:
            raise ValueError("RetinaNet needs an FPN body (FPN.FPN_ON)")
        if cfg.MODEL.NUM_CLASSES < 2:
            raise ValueError(f"MODEL.NUM_CLASSES must count the background and >= 1 class, got {cfg.MODEL.NUM_CLASSES}")
        self.settings = RetinaNetSettings.from_cfg(cfg)
        self.body = registry.build("body", cfg.MODEL.CONV_BODY, cfg)
        levels = list(self.body.levels)
        if levels != self.settings.levels:
            raise ValueError(f"RetinaNet predicts on FPN levels {self.settings.levels} (FPN.RPN_MIN/MAX_LEVEL) but the "
                             f"body gives {levels}: set FPN.MULTILEVEL_RPN and FPN.EXTRA_CONV_LEVELS as Detectron's "
                             "RetinaNet configs do")
        self.head = RetinaNetHead(cfg, self.body.dim_out, self.settings.min_level)
        self.d2_rules = D2RetinaNetRules(self.settings, float(cfg.MODEL.ANCHOR_OFFSET)) \
            if self.settings.detectron2 else None
        if self.d2_rules is not None:
            self.loss_normalizer = LossNormalizer()

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)

    def forward(self, data: torch.Tensor, im_info: torch.Tensor, roidb: Sequence[dict] | None = None):
        im_info = checked_im_info("RetinaNet", data, im_info, roidb, self.training)
        features = self.body(data)
        logits, deltas = self.head(features)
        # float32 for the losses and the decoding even when autocast ran the head in float16 / bfloat16
        logits, deltas = [x.float() for x in logits], [d.float() for d in deltas]
        if self.d2_rules is not None:
            return self._forward_detectron2(features, logits, deltas, im_info, roidb)
        if self.training:
            with torch.no_grad():
                targets = retinanet_targets(self.settings, features, roidb)
            return retinanet_losses(self.settings, logits, deltas, targets)
        return self._detect(logits, deltas, im_info, roidb)

    @torch.no_grad()
    def _detect(self, logits, deltas, im_info: torch.Tensor, roidb) -> List[Dict[str, torch.Tensor]]:
        return [retinanet_detections(self.settings, logits, deltas, i, float(im_info[i, 2]), height, width)
                for i, (height, width) in enumerate(original_sizes(im_info, roidb))]

    def _forward_detectron2(self, features, logits, deltas, im_info: torch.Tensor, roidb):
        rules = self.d2_rules
        anchors = rules.anchors(features)
        if self.training:
            loss_cls, loss_box, num_foreground = rules.summed_losses(anchors, logits, deltas, roidb)
            normalizer = self.loss_normalizer.update(num_foreground)
            return {"loss_cls": loss_cls / normalizer,
                    "loss_box_reg": self.settings.bbox_weight * loss_box / normalizer}
        with torch.no_grad():
            return [rules.detections(anchors, logits, deltas, i, (float(im_info[i, 0]), float(im_info[i, 1])), size)
                    for i, size in enumerate(original_sizes(im_info, roidb))]
