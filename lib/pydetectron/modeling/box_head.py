"""Fast R-CNN box heads, the box output layer, and the Fast R-CNN losses (Detectron's fast_rcnn_heads.py).

A box head turns RoIs into one feature vector each: ``forward(features, rois) -> (K, dim_out)``. The
output layer maps it to class logits and box deltas. Heads are registered as ``box_head`` builders
``(cfg, dim_in, spatial_scales) -> nn.Module``; `spatial_scales` are those of the maps the head pools
from, finest first.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.backbones.resnet import get_group_gn, make_res_stage
from pydetectron.modeling.layers import compose_weight_mapping, msra_fill_, xavier_fill_
from pydetectron.modeling.losses import smooth_l1_loss, softmax_cross_entropy_loss
from pydetectron.modeling.registry import register
from pydetectron.modeling.roi_features import RoIFeatureExtractor, build_roi_feature_extractor
from pydetectron.ops.conv import Conv2d


def _fc(dim_in: int, dim_out: int) -> nn.Linear:
    """A Detectron ``model.FC`` with its default init: Caffe2's XavierFill weight, zero bias."""
    fc = nn.Linear(dim_in, dim_out)
    xavier_fill_(fc.weight)
    nn.init.zeros_(fc.bias)
    return fc


def _flat_mapping(module: nn.Module, names: Dict[str, str]) -> Dict[str, str]:
    """``{'fc6.weight': 'fc6_w', ...}`` for each child `name` -> Detectron prefix in `names`."""
    mapping = {}
    for child, blob in names.items():
        layer = getattr(module, child)
        mapping[f"{child}.weight"] = f"{blob}_w"
        if getattr(layer, "bias", None) is not None:
            mapping[f"{child}.bias"] = f"{blob}_b"
    return mapping


class Roi2MLPHead(nn.Module):
    """RoI transform, then fc6 -> ReLU -> fc7 -> ReLU (Detectron's ``roi_2mlp_head``)."""

    def __init__(self, roi_xform: RoIFeatureExtractor, dim_in: int, hidden_dim: int) -> None:
        super().__init__()
        self.roi_xform = roi_xform
        res = roi_xform.resolution
        self.fc6 = _fc(dim_in * res * res, hidden_dim)
        self.fc7 = _fc(hidden_dim, hidden_dim)
        self.dim_out = hidden_dim

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """rois ``(K, 5)`` in input pixels -> ``(K, hidden_dim)``."""
        x = self.roi_xform(features, rois).flatten(1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))

    def detectron_weight_mapping(self) -> Dict[str, str]:
        return _flat_mapping(self, {"fc6": "fc6", "fc7": "fc7"})


class RoiXconv1fcHead(nn.Module):
    """RoI transform, `num_convs` 3x3 convs (+ GroupNorm when `use_gn`), then fc6 -> ReLU
    (Detectron's ``roi_Xconv1fc_head`` / ``roi_Xconv1fc_gn_head``)."""

    def __init__(
        self,
        roi_xform: RoIFeatureExtractor,
        dim_in: int,
        conv_dim: int,
        num_convs: int,
        fc_dim: int,
        gn_groups: int = 0,
        gn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FAST_RCNN.NUM_STACKED_CONVS must be >= 1, got {num_convs}")
        self.roi_xform = roi_xform
        self.use_gn = gn_groups > 0
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(num_convs):
            conv = Conv2d(dim_in if i == 0 else conv_dim, conv_dim, 3, padding=1, bias=not self.use_gn)
            msra_fill_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.convs.append(conv)
            if self.use_gn:
                self.norms.append(nn.GroupNorm(gn_groups, conv_dim, eps=gn_eps))
        res = roi_xform.resolution
        self.fc6 = _fc(conv_dim * res * res, fc_dim)
        self.dim_out = fc_dim

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """rois ``(K, 5)`` in input pixels -> ``(K, fc_dim)``."""
        x = self.roi_xform(features, rois)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.use_gn:
                x = self.norms[i](x)
            x = F.relu(x)
        return F.relu(self.fc6(x.flatten(1)))

    def detectron_weight_mapping(self) -> Dict[str, str]:
        mapping = _flat_mapping(self, {"fc6": "fc6"})
        for i, conv in enumerate(self.convs):
            mapping[f"convs.{i}.weight"] = f"head_conv{i + 1}_w"
            if conv.bias is not None:
                mapping[f"convs.{i}.bias"] = f"head_conv{i + 1}_b"
        for i in range(len(self.norms)):
            mapping[f"norms.{i}.weight"] = f"head_conv{i + 1}_gn_s"
            mapping[f"norms.{i}.bias"] = f"head_conv{i + 1}_gn_b"
        return mapping


class ResNetRoiConv5Head(nn.Module):
    """RoI transform at 1/16, the res5 stage (3 blocks, first stride R/7), 7x7 average pool (Detectron's
    ``ResNet_roi_conv5_head``, the C4 box head). ``forward(..., return_res5=True)`` also gives the
    ``(K, dim_out, 7, 7)`` res5 map, which a SHARE_RES5 mask head reuses in training."""

    def __init__(self, roi_xform: RoIFeatureExtractor, res5: nn.Module, dim_out: int) -> None:
        super().__init__()
        self.roi_xform = roi_xform
        self.res5 = res5
        self.dim_out = dim_out

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor, return_res5: bool = False):
        """rois ``(K, 5)`` in input pixels -> ``(K, dim_out)`` (and the res5 map when `return_res5`)."""
        res5 = self.res5(self.roi_xform(features, rois))
        pooled = F.avg_pool2d(res5, kernel_size=7, stride=1).flatten(1)
        return (pooled, res5) if return_res5 else pooled

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)


class FastRCNNOutputs(nn.Module):
    """The box output layer: ``cls_score`` (K, num_classes) logits and ``bbox_pred`` (K, 4 * C') deltas,
    C' = 2 when class-agnostic (bg, fg) else num_classes."""

    def __init__(self, dim_in: int, num_classes: int, cls_agnostic_bbox_reg: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_agnostic_bbox_reg = cls_agnostic_bbox_reg
        self.cls_score = nn.Linear(dim_in, num_classes)
        self.bbox_pred = nn.Linear(dim_in, 4 * (2 if cls_agnostic_bbox_reg else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor):
        """x ``(K, dim_in)`` -> (cls logits ``(K, num_classes)``, box deltas ``(K, 4 * C')``)."""
        return self.cls_score(x), self.bbox_pred(x)

    def detectron_weight_mapping(self) -> Dict[str, str]:
        return _flat_mapping(self, {"cls_score": "cls_score", "bbox_pred": "bbox_pred"})


def fast_rcnn_losses(
    cls_score: torch.Tensor,
    bbox_pred: torch.Tensor,
    labels: torch.Tensor,
    bbox_targets: torch.Tensor,
    bbox_inside_weights: torch.Tensor,
    bbox_outside_weights: torch.Tensor,
    beta: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """Detectron's Fast R-CNN losses: softmax cross-entropy averaged over the R sampled RoIs (``loss_cls``)
    and smooth-L1 (`beta` 1, Detectron's; ``FAST_RCNN.SMOOTH_L1_BETA``) summed and divided by R (``loss_bbox``),
    Caffe2's ``SoftmaxWithLoss`` and ``SmoothL1Loss``. labels ``(R,)`` int64 in ``0..num_classes-1``; bbox tensors
    ``(R, 4 * C')`` from ``targets.fast_rcnn``."""
    if bbox_pred.shape != bbox_targets.shape:
        raise ValueError(
            f"bbox_pred {tuple(bbox_pred.shape)} and bbox_targets {tuple(bbox_targets.shape)} differ: "
            "check MODEL.NUM_CLASSES and MODEL.CLS_AGNOSTIC_BBOX_REG"
        )
    return {
        "loss_cls": softmax_cross_entropy_loss(cls_score, labels),
        "loss_bbox": smooth_l1_loss(bbox_pred, bbox_targets, bbox_inside_weights, bbox_outside_weights, beta=beta),
    }


def classification_accuracy(cls_score: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Detectron's ``accuracy_cls`` (Caffe2's ``Accuracy``): the fraction of sampled RoIs whose top-scoring
    class is their label; a logged figure, not a loss (no gradient)."""
    if labels.numel() == 0:
        return cls_score.new_zeros(())
    return (cls_score.detach().argmax(dim=1) == labels).float().mean()


def build_box_outputs(cfg, dim_in: int) -> FastRCNNOutputs:
    return FastRCNNOutputs(dim_in, cfg.MODEL.NUM_CLASSES, cfg.MODEL.CLS_AGNOSTIC_BBOX_REG)


@register("box_head", "roi_2mlp_head")
def build_roi_2mlp_head(cfg, dim_in: int, spatial_scales: Sequence[float]) -> Roi2MLPHead:
    xform = build_roi_feature_extractor(cfg, cfg.FAST_RCNN, spatial_scales)
    return Roi2MLPHead(xform, dim_in, cfg.FAST_RCNN.MLP_HEAD_DIM)


def _build_xconv1fc(cfg, dim_in: int, spatial_scales: Sequence[float], use_gn: bool) -> RoiXconv1fcHead:
    conv_dim = cfg.FAST_RCNN.CONV_HEAD_DIM
    return RoiXconv1fcHead(
        build_roi_feature_extractor(cfg, cfg.FAST_RCNN, spatial_scales),
        dim_in,
        conv_dim=conv_dim,
        num_convs=cfg.FAST_RCNN.NUM_STACKED_CONVS,
        fc_dim=cfg.FAST_RCNN.MLP_HEAD_DIM,
        gn_groups=get_group_gn(cfg, conv_dim) if use_gn else 0,
        gn_eps=cfg.GROUP_NORM.EPSILON,
    )


@register("box_head", "roi_Xconv1fc_head")
def build_roi_xconv1fc_head(cfg, dim_in: int, spatial_scales: Sequence[float]) -> RoiXconv1fcHead:
    return _build_xconv1fc(cfg, dim_in, spatial_scales, use_gn=False)


@register("box_head", "roi_Xconv1fc_gn_head")
def build_roi_xconv1fc_gn_head(cfg, dim_in: int, spatial_scales: Sequence[float]) -> RoiXconv1fcHead:
    return _build_xconv1fc(cfg, dim_in, spatial_scales, use_gn=True)


@register("box_head", "ResNet_roi_conv5_head")
def build_resnet_roi_conv5_head(cfg, dim_in: int, spatial_scales: Sequence[float]) -> ResNetRoiConv5Head:
    resolution = cfg.FAST_RCNN.ROI_XFORM_RESOLUTION
    stride_init = resolution // 7
    if stride_init < 1 or (resolution - 1) // stride_init + 1 != 7:
        raise ValueError(
            f"FAST_RCNN.ROI_XFORM_RESOLUTION={resolution} does not give the 7x7 res5 map the C4 head "
            "pools (use 7 or 14)"
        )
    dim_inner = cfg.RESNETS.NUM_GROUPS * cfg.RESNETS.WIDTH_PER_GROUP * 8
    # res5 doubles the width of res4: 1024 -> 2048 as Detectron hard-codes (512 for basic-block ResNets).
    dim_out = 2 * dim_in
    res5 = make_res_stage(
        cfg, "res5", num_blocks=3, dim_in=dim_in, dim_out=dim_out, dim_inner=dim_inner, dilation=1,
        stride_init=stride_init,
    )
    xform = build_roi_feature_extractor(cfg, cfg.FAST_RCNN, spatial_scales)
    return ResNetRoiConv5Head(xform, res5, dim_out)
