"""Mask R-CNN heads (Detectron's ``mask_rcnn_heads.py``): RoI features -> per-class mask logits.

How the detector calls a mask head (``head = registry.build('mask_head', cfg.MRCNN.ROI_MASK_HEAD, cfg,
dim_in, spatial_scales)``, `dim_in` / `spatial_scales` those of the maps it pools from, finest first):

- ``logits = head(features, mask_rois)``: `features` the body maps, `mask_rois` ``(F, 5)`` =
  [batch, x1, y1, x2, y2] in network-input pixels -> ``(F, C, M, M)`` logits, ``M = MRCNN.RESOLUTION``,
  ``C = MODEL.NUM_CLASSES`` (``MRCNN.CLS_SPECIFIC_MASK``) or 1. RoI pooling uses ``MRCNN.ROI_XFORM_*``.
- ``mask_rcnn_fcn_head_v0upshare`` (C4, ``head.shares_res5``) owns no res5. Once after building, call
  ``head.share_res5(box_head.res5)``; then ``head(features, mask_rois)`` works as above (inference).
  In training Detectron shares the computation: pass the box head's res5 output rows of the RoIs that
  have a mask, ``head.predict(res5_map[roi_has_mask])`` (``roi_has_mask`` from ``mask_rcnn_targets``).

Training: targets from ``targets.mask.mask_rcnn_targets``, loss from :func:`mask_rcnn_loss`.
Inference: :func:`mask_probs` picks each detection's class channel, then
``pydetectron.modeling.paste_masks.paste_masks_in_image`` pastes them into the original image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.backbones.resnet import make_res_stage
from pydetectron.modeling.layers import group_count, msra_fill_
from pydetectron.modeling.registry import register
from pydetectron.modeling.roi_features import build_roi_feature_extractor
from pydetectron.ops.conv import Conv2d

CONV_INITS = ("GaussianFill", "MSRAFill")


def init_conv(module: nn.Module, conv_init: str, std: float) -> None:
    """Detectron's fills for a conv / deconv / linear weight (``GaussianFill`` with `std`, or Caffe2's
    ``MSRAFill``); bias 0."""
    if conv_init == "GaussianFill":
        nn.init.normal_(module.weight, std=std)
    elif conv_init == "MSRAFill":
        msra_fill_(module.weight)
    else:
        raise ValueError(f"CONV_INIT {conv_init!r} is not one of {CONV_INITS}")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class BilinearUpsample2d(nn.Module):
    """Detectron's ``BilinearInterpolation``: a fixed (never trained) per-channel transposed conv with the
    FCN bilinear kernel; ``(N, C, H, W) -> (N, C, s*H, s*W)`` for an even factor s. Detectron saves its
    kernel and zero bias as blobs ``<blob>_w`` / ``<blob>_b``, so they are kept as (loadable) buffers."""

    def __init__(self, channels: int, factor: int, blob: str) -> None:
        super().__init__()
        if factor % 2:
            raise ValueError(f"bilinear up-sampling factor must be even, got {factor}")
        size = 2 * factor
        center = factor - 0.5  # (size + 1) // 2 - 0.5 for an even size
        og = np.arange(size, dtype=np.float64)
        filt1d = 1 - np.abs(og - center) / factor
        kernel = torch.zeros(channels, channels, size, size)
        kernel[range(channels), range(channels)] = torch.from_numpy(np.outer(filt1d, filt1d)).float()
        self.register_buffer("weight", kernel)
        self.register_buffer("bias", torch.zeros(channels))
        self.factor = factor
        self.blob = blob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            x, self.weight.to(x.dtype), self.bias.to(x.dtype), stride=self.factor, padding=self.factor // 2
        )

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        return {"weight": f"{self.blob}_w", "bias": f"{self.blob}_b"}


class MaskRCNNHead(nn.Module):
    """A mask body (convs / res5 + 2x deconv, ReLU) followed by Detectron's ``mask_fcn_logits`` output.

    `body` maps ``(F, dim_in, R, R)`` to ``(F, body.dim_out, M / UPSAMPLE_RATIO, M / UPSAMPLE_RATIO)`` and
    provides ``detectron_weight_mapping()``.
    """

    def __init__(self, cfg, body: nn.Module, spatial_scales: list[float], shares_res5: bool = False) -> None:
        super().__init__()
        m = cfg.MRCNN
        self.body = body
        self.shares_res5 = shares_res5
        self.roi_xform = build_roi_feature_extractor(cfg, m, spatial_scales)
        self.resolution = int(m.RESOLUTION)
        self.num_outputs = int(cfg.MODEL.NUM_CLASSES) if m.CLS_SPECIFIC_MASK else 1
        self.use_fc_output = bool(m.USE_FC_OUTPUT)
        ratio = int(m.UPSAMPLE_RATIO)
        if self.resolution % ratio:
            raise ValueError(f"MRCNN.UPSAMPLE_RATIO {ratio} does not divide MRCNN.RESOLUTION {self.resolution}")
        side = self.resolution // ratio
        if self.use_fc_output:
            self.logits = nn.Linear(body.dim_out * side * side, self.num_outputs * self.resolution**2)
            init_conv(self.logits, "GaussianFill", 0.001)
        else:
            self.logits = Conv2d(body.dim_out, self.num_outputs, 1)
            # Fan-in fills are too large for a class-agnostic output (Detectron), so Gaussian there.
            init_conv(self.logits, m.CONV_INIT if m.CLS_SPECIFIC_MASK else "GaussianFill", 0.001)
        use_upsample = ratio > 1 and not self.use_fc_output
        self.upsample = BilinearUpsample2d(self.num_outputs, ratio, "mask_fcn_logits_up") if use_upsample else None
        self._body_side = side
        self.shared_res5: nn.Module | None = None

    def share_res5(self, res5: nn.Module) -> None:
        """v0upshare: use the box head's res5 stage at inference. It is registered here too (so DataParallel
        replicas share it with the box head's), but its blobs are the box head's: mapped to None here."""
        if not self.shares_res5:
            raise ValueError("only mask_rcnn_fcn_head_v0upshare shares the box head's res5")
        self.shared_res5 = res5

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """features: body maps, finest first; rois: ``(F, 5)`` = [batch, x1, y1, x2, y2] in network-input
        pixels -> logits ``(F, C, M, M)``."""
        x = self.roi_xform(features, rois)
        if self.shares_res5:
            if self.shared_res5 is None:
                raise RuntimeError("mask_rcnn_fcn_head_v0upshare: call share_res5(box_head.res5) before inference")
            x = self.shared_res5(x)
        return self.predict(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(F, dim_in, R, R)`` pooled RoI features (for v0upshare: the res5 map ``(F, 2 * dim_in, 7, 7)``,
        in training the box head's own) -> logits ``(F, C, M, M)``.

        The convs run channels-last (pydetectron.ops.conv); the logits keep that memory format, which only
        changes strides, never values or shape.
        """
        x = self.body(x)
        if x.shape[-1] != self._body_side or x.shape[-2] != self._body_side:
            raise ValueError(
                f"mask body gives {tuple(x.shape[-2:])} maps but MRCNN.RESOLUTION {self.resolution} / "
                f"UPSAMPLE_RATIO needs {self._body_side}; check MRCNN.ROI_XFORM_RESOLUTION"
            )
        if self.use_fc_output:
            out = self.logits(x.flatten(1))
            return out.view(-1, self.num_outputs, self.resolution, self.resolution)
        out = self.logits(x)
        return self.upsample(out) if self.upsample is not None else out

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        mapping = {f"body.{k}": v for k, v in self.body.detectron_weight_mapping().items()}
        mapping.update({"logits.weight": "mask_fcn_logits_w", "logits.bias": "mask_fcn_logits_b"})
        if self.upsample is not None:
            mapping.update({f"upsample.{k}": v for k, v in self.upsample.detectron_weight_mapping().items()})
        if self.shared_res5 is not None:
            mapping.update({f"shared_res5.{k}": None for k in self.shared_res5.state_dict()})
        return mapping


class FCNMaskBody(nn.Module):
    """Detectron's v1upXconvs (optionally with GroupNorm): X x (3x3 conv, [GN], ReLU), 2x2 deconv, ReLU.
    Blob names ``_[mask]_fcn{i}`` (``_mask_fcn{i}`` + ``_gn_s/_gn_b`` with GN) and ``conv5_mask``."""

    def __init__(self, cfg, dim_in: int, num_convs: int, use_gn: bool) -> None:
        super().__init__()
        m = cfg.MRCNN
        dim, dilation = int(m.DIM_REDUCED), int(m.DILATION)
        self.use_gn = use_gn
        layers: list[nn.Module] = []
        for i in range(num_convs):
            conv = Conv2d(dim_in if i == 0 else dim, dim, 3, padding=dilation, dilation=dilation, bias=not use_gn)
            init_conv(conv, m.CONV_INIT, 0.001)
            layers.append(conv)
            if use_gn:
                groups = group_count(dim, cfg.GROUP_NORM.DIM_PER_GP, cfg.GROUP_NORM.NUM_GROUPS)
                layers.append(nn.GroupNorm(groups, dim, eps=cfg.GROUP_NORM.EPSILON))
            layers.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*layers)
        self.upconv = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        init_conv(self.upconv, m.CONV_INIT, 0.001)
        self.dim_out = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.upconv(self.convs(x)))

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        mapping: dict[str, str | None] = {}
        prefix = "_mask_fcn" if self.use_gn else "_[mask]_fcn"
        convs = [i for i, layer in enumerate(self.convs) if isinstance(layer, nn.Conv2d)]
        for n, i in enumerate(convs, start=1):
            mapping[f"convs.{i}.weight"] = f"{prefix}{n}_w"
            if self.use_gn:
                mapping[f"convs.{i + 1}.weight"] = f"{prefix}{n}_gn_s"
                mapping[f"convs.{i + 1}.bias"] = f"{prefix}{n}_gn_b"
            else:
                mapping[f"convs.{i}.bias"] = f"{prefix}{n}_b"
        mapping.update({"upconv.weight": "conv5_mask_w", "upconv.bias": "conv5_mask_b"})
        return mapping


class Res5MaskBody(nn.Module):
    """Detectron's v0up / v0upshare bodies: [own res5 stage ``_[mask]_res5``], 2x2 deconv ``conv5_mask``, ReLU.

    With ``res5=None`` (v0upshare) the input is already the box head's res5 output (`dim_res5` channels).
    """

    def __init__(self, cfg, res5: nn.Module | None, dim_res5: int, conv_init: str) -> None:
        super().__init__()
        self.res5 = res5
        self.upconv = nn.ConvTranspose2d(dim_res5, int(cfg.MRCNN.DIM_REDUCED), 2, stride=2)
        init_conv(self.upconv, conv_init, 0.001)
        self.dim_out = int(cfg.MRCNN.DIM_REDUCED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.res5 is not None:
            x = self.res5(x)
        return F.relu(self.upconv(x))

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        mapping: dict[str, str | None] = {}
        if self.res5 is not None:
            mapping.update({f"res5.{k}": v for k, v in self.res5.detectron_weight_mapping().items()})
        mapping.update({"upconv.weight": "conv5_mask_w", "upconv.bias": "conv5_mask_b"})
        return mapping


def _res5_width(dim_in: int) -> int:
    """Width of a C4 res5 stage on a res4 of `dim_in` channels: doubled, as the C4 box head builds it
    (Detectron's hard-coded 2048 on ResNet-50/101's 1024)."""
    return 2 * dim_in


def roi_res5_stage(cfg, prefix: str, dim_in: int, resolution: int, dilation: int) -> tuple[nn.Module, int]:
    """A C4 head's own res5 stage on ``resolution`` x ``resolution`` RoI features (Detectron's
    ``add_ResNet_roi_conv5_head_for_masks/_for_keypoints``): 3 blocks named ``<prefix>_<i>`` (``_[mask]_res5``,
    ``_[pose]_res5``; a weights file without them initialises them from ``res5``), widths as the C4 box
    head's res5 (2 x dim_in out, NUM_GROUPS * WIDTH_PER_GROUP * 8 inner: 2048 / 512 on ResNet-50), first
    stride ``resolution // 7`` unless `dilation` > 1 keeps the size. Returns the stage and its output side."""
    if resolution < 7:
        raise ValueError(f"ROI_XFORM_RESOLUTION must be >= 7 for the res5 head {prefix}, got {resolution}")
    stage = make_res_stage(
        cfg,
        prefix,
        num_blocks=3,
        dim_in=dim_in,
        dim_out=_res5_width(dim_in),
        dim_inner=cfg.RESNETS.NUM_GROUPS * cfg.RESNETS.WIDTH_PER_GROUP * 8,
        dilation=dilation,
        stride_init=resolution // 7,
    )
    stride = resolution // 7 if dilation == 1 else 1
    return stage, (resolution - 1) // stride + 1


@register("mask_head", "mask_rcnn_fcn_head_v1up4convs")
def mask_rcnn_fcn_head_v1up4convs(cfg, dim_in: int, spatial_scales: list[float]) -> MaskRCNNHead:
    """v1up design: 4 x (conv 3x3), convT 2x2."""
    return MaskRCNNHead(cfg, FCNMaskBody(cfg, dim_in, 4, use_gn=False), spatial_scales)


@register("mask_head", "mask_rcnn_fcn_head_v1up4convs_gn")
def mask_rcnn_fcn_head_v1up4convs_gn(cfg, dim_in: int, spatial_scales: list[float]) -> MaskRCNNHead:
    """v1up design with GroupNorm: 4 x (conv 3x3, GN), convT 2x2."""
    return MaskRCNNHead(cfg, FCNMaskBody(cfg, dim_in, 4, use_gn=True), spatial_scales)


@register("mask_head", "mask_rcnn_fcn_head_v1up")
def mask_rcnn_fcn_head_v1up(cfg, dim_in: int, spatial_scales: list[float]) -> MaskRCNNHead:
    """v1up design: 2 x (conv 3x3), convT 2x2."""
    return MaskRCNNHead(cfg, FCNMaskBody(cfg, dim_in, 2, use_gn=False), spatial_scales)


@register("mask_head", "mask_rcnn_fcn_head_v0up")
def mask_rcnn_fcn_head_v0up(cfg, dim_in: int, spatial_scales: list[float]) -> MaskRCNNHead:
    """v0up design (C4): its own res5 stage, convT 2x2 (Gaussian init as in Detectron)."""
    res5, _ = roi_res5_stage(cfg, "_[mask]_res5", dim_in, cfg.MRCNN.ROI_XFORM_RESOLUTION, cfg.MRCNN.DILATION)
    body = Res5MaskBody(cfg, res5, _res5_width(dim_in), "GaussianFill")
    return MaskRCNNHead(cfg, body, spatial_scales)


@register("mask_head", "mask_rcnn_fcn_head_v0upshare")
def mask_rcnn_fcn_head_v0upshare(cfg, dim_in: int, spatial_scales: list[float]) -> MaskRCNNHead:
    """v0upshare design (C4): convT 2x2 on the box head's res5 output (weights and, in training,
    computation shared with the box head; ``MRCNN.ROI_XFORM_RESOLUTION`` must equal the box head's)."""
    if cfg.MRCNN.ROI_XFORM_RESOLUTION != cfg.FAST_RCNN.ROI_XFORM_RESOLUTION:
        raise ValueError(
            f"mask_rcnn_fcn_head_v0upshare shares res5 with the box head: MRCNN.ROI_XFORM_RESOLUTION "
            f"({cfg.MRCNN.ROI_XFORM_RESOLUTION}) must equal FAST_RCNN.ROI_XFORM_RESOLUTION "
            f"({cfg.FAST_RCNN.ROI_XFORM_RESOLUTION})"
        )
    body = Res5MaskBody(cfg, None, _res5_width(dim_in), cfg.MRCNN.CONV_INIT)
    return MaskRCNNHead(cfg, body, spatial_scales, shares_res5=True)


def mask_rcnn_loss(logits: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Detectron's ``SigmoidCrossEntropyLoss`` on mask logits, times ``MRCNN.WEIGHT_LOSS_MASK``.

    logits: ``(F, C, M, M)``; targets: ``(F, C*M*M)`` int with 1 / 0 / -1 (ignore), the layout of
    ``targets.mask.mask_rcnn_targets``. The per-pixel binary cross-entropy is summed over the
    non-ignored entries and divided by their count (at least 1).
    """
    flat = logits.reshape(logits.shape[0], -1)
    if flat.shape != targets.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} do not match mask targets {tuple(targets.shape)}")
    valid = (targets > -1).to(flat.dtype)
    losses = F.binary_cross_entropy_with_logits(flat, targets.clamp(min=0).to(flat.dtype), reduction="none")
    return (losses * valid).sum() / valid.sum().clamp(min=1.0) * weight


def mask_probs(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Inference: sigmoid of each detection's class channel. logits ``(D, C, M, M)`` (C = 1 for
    class-agnostic masks), classes ``(D,)`` int64 contiguous ids -> probabilities ``(D, M, M)``."""
    if logits.shape[0] != classes.shape[0]:
        raise ValueError(f"{logits.shape[0]} mask logits for {classes.shape[0]} detections")
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    index = torch.arange(logits.shape[0], device=logits.device)
    return torch.sigmoid(logits[index, classes.to(logits.device)])
