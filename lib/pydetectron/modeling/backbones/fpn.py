"""Feature Pyramid Network on a ResNet body (Detectron's ``modeling/FPN.py``).

Top-down from the coarsest backbone stage: a 1x1 lateral ``fpn_inner_<stage blob>`` seeds the path, each
finer stage adds its 1x1 lateral ``fpn_inner_<blob>_lateral`` to the nearest-2x upsampled coarser map, and
a 3x3 ``fpn_<blob>`` smooths every level. Above C5: P6 by max-pool subsampling of P5 (kernel 1, stride 2)
when ``RPN_MAX_LEVEL`` is 6, or RetinaNet's 3x3/2 convs ``fpn_6``, ``fpn_7`` on C5 (ReLU before P7)
when ``FPN.EXTRA_CONV_LEVELS``. With a norm (``FPN.NORM``: 'GN' (= ``FPN.USE_GN``), 'BN', 'SyncBN',
'FrozenBN' = AffineChannel) the lateral and output convs lose their bias and get that norm
(``..._gn_s/_b``, ``..._bn_s/_b``), as in detectron2; the extra convs never do. Convs start with Caffe2's
XavierFill, which is detectron2's ``c2_xavier_fill`` too, so both conventions build the same FPN.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.config.checks import D2_NORM_KINDS
from pydetectron.modeling.backbones.resnet import BLOCK_COUNTS, ResNet, norm_spec_from_cfg, resnet_from_cfg
from pydetectron.modeling.layers import ConvNorm, NormSpec, compose_weight_mapping, xavier_fill_
from pydetectron.modeling.registry import register
from pydetectron.ops.conv import Conv2d

LOWEST_BACKBONE_LVL = 2
HIGHEST_BACKBONE_LVL = 5


def _conv(dim_in: int, dim_out: int, kernel: int, stride: int, norm: NormSpec | None, blob: str) -> nn.Module:
    """An FPN conv: bias + XavierFill, or (with a norm) a bias-free ConvNorm."""
    if norm is not None:
        return ConvNorm(dim_in, dim_out, kernel, norm=norm, conv_blob=blob, stride=stride)
    conv = Conv2d(dim_in, dim_out, kernel, stride=stride, padding=kernel // 2)
    xavier_fill_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _mapping(module: nn.Module, blob: str) -> Dict[str, str | None]:
    if isinstance(module, ConvNorm):
        return module.detectron_weight_mapping()
    return {"weight": f"{blob}_w", "bias": f"{blob}_b"}


class FPN(nn.Module):
    """FPN over `body`'s stages ``min_level..5`` plus levels 6..`max_level` above them.

    ``forward(images (N, 3, H, W)) -> [P_min, ..., P_max]``, finest first, each ``(N, dim, H/2^l, W/2^l)``;
    H and W must be multiples of 2^5 (``FPN.COARSEST_STRIDE``). `p2_only` returns only the finest map
    (Detectron's ``*_P2only_body``). Attributes ``dim_out``, ``spatial_scales``, ``levels`` (Bodies contract).
    """

    def __init__(
        self,
        body: ResNet,
        *,
        dim: int = 256,
        min_level: int = 2,
        max_level: int = 6,
        extra_conv_levels: bool = False,
        norm: NormSpec | None = None,
        zero_init_lateral: bool = False,
        p2_only: bool = False,
    ) -> None:
        super().__init__()
        if not LOWEST_BACKBONE_LVL <= min_level <= HIGHEST_BACKBONE_LVL:
            raise ValueError(f"FPN min level must be in [2, 5], got {min_level}")
        if HIGHEST_BACKBONE_LVL not in body.stage_dims or body.stage_scales[5] != 1.0 / 32:
            raise ValueError("FPN needs a conv5 body without res5 dilation (RESNETS.RES5_DILATION = 1)")
        if max_level > HIGHEST_BACKBONE_LVL + 1 and not extra_conv_levels:
            raise ValueError(
                f"FPN max level {max_level} > 6 needs FPN.EXTRA_CONV_LEVELS (P6 alone comes from subsampling)"
            )
        self.body = body
        self.backbone_levels = list(range(HIGHEST_BACKBONE_LVL, min_level - 1, -1))  # coarsest first
        self.inner_blobs = []
        self.out_blobs = []
        inner, out = [], []
        for i, level in enumerate(self.backbone_levels):
            stage_blob = body.stage_blobs[level]
            inner_blob = f"fpn_inner_{stage_blob}" + ("_lateral" if i > 0 else "")
            lateral = _conv(body.stage_dims[level], dim, 1, 1, norm, inner_blob)
            if i > 0 and zero_init_lateral:
                nn.init.zeros_(lateral.conv.weight if norm is not None else lateral.weight)
            inner.append(lateral)
            out.append(_conv(dim, dim, 3, 1, norm, f"fpn_{stage_blob}"))
            self.inner_blobs.append(inner_blob)
            self.out_blobs.append(f"fpn_{stage_blob}")
        self.inner = nn.ModuleList(inner)
        self.out = nn.ModuleList(out)

        self.subsample_p6 = not extra_conv_levels and max_level == HIGHEST_BACKBONE_LVL + 1
        extra_levels = range(HIGHEST_BACKBONE_LVL + 1, max_level + 1) if extra_conv_levels else range(0)
        self.extra_blobs = [f"fpn_{lvl}" for lvl in extra_levels]
        dims_in = [body.stage_dims[HIGHEST_BACKBONE_LVL]] + [dim] * len(self.extra_blobs)
        self.extra = nn.ModuleList(
            _conv(d, dim, 3, 2, None, blob) for d, blob in zip(dims_in, self.extra_blobs)
        )

        levels = list(range(min_level, HIGHEST_BACKBONE_LVL + 1))
        if self.subsample_p6:
            levels.append(HIGHEST_BACKBONE_LVL + 1)
        levels += list(extra_levels)
        self.p2_only = p2_only
        self.levels = levels[:1] if p2_only else levels
        self.spatial_scales = [1.0 / 2**lvl for lvl in self.levels]
        self.dim_out = dim

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        stages = self.body.forward_stages(images)
        top = self.inner[0](stages[self.backbone_levels[0]])
        outputs = [self.out[0](top)]
        for level, lateral, smooth in zip(self.backbone_levels[1:], self.inner[1:], self.out[1:]):
            lat = lateral(stages[level])
            if lat.shape[-2:] != (2 * top.shape[-2], 2 * top.shape[-1]):
                raise ValueError(
                    f"FPN: level {level} map {tuple(lat.shape[-2:])} is not twice level {level + 1} "
                    f"{tuple(top.shape[-2:])}; pad the input to a multiple of FPN.COARSEST_STRIDE (at least 32), "
                    f"got {tuple(images.shape[-2:])}"
                )
            top = lat + F.interpolate(top, scale_factor=2, mode="nearest")
            outputs.insert(0, smooth(top))
        if self.p2_only:
            return outputs[:1]
        if self.subsample_p6:
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        x = stages[HIGHEST_BACKBONE_LVL]
        for i, conv in enumerate(self.extra):
            x = conv(F.relu(x) if i > 0 else x)
            outputs.append(x)
        return outputs

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        mapping = {f"body.{k}": v for k, v in compose_weight_mapping(self.body).items()}
        for group, blobs in (("inner", self.inner_blobs), ("out", self.out_blobs), ("extra", self.extra_blobs)):
            for i, blob in enumerate(blobs):
                for key, name in _mapping(getattr(self, group)[i], blob).items():
                    mapping[f"{group}.{i}.{key}"] = name
        return mapping


def get_min_max_levels(cfg) -> tuple[int, int]:
    """The pyramid levels needed by RPN and/or the RoI heads (Detectron's ``get_min_max_levels``)."""
    f = cfg.FPN
    min_level, max_level = LOWEST_BACKBONE_LVL, HIGHEST_BACKBONE_LVL
    if f.MULTILEVEL_RPN and not f.MULTILEVEL_ROIS:
        min_level, max_level = f.RPN_MIN_LEVEL, f.RPN_MAX_LEVEL
    if not f.MULTILEVEL_RPN and f.MULTILEVEL_ROIS:
        min_level, max_level = f.ROI_MIN_LEVEL, f.ROI_MAX_LEVEL
    if f.MULTILEVEL_RPN and f.MULTILEVEL_ROIS:
        min_level = min(f.RPN_MIN_LEVEL, f.ROI_MIN_LEVEL)
        max_level = max(f.RPN_MAX_LEVEL, f.ROI_MAX_LEVEL)
    return min_level, max_level


def fpn_norm_spec(cfg) -> NormSpec | None:
    """The lateral / output convs' norm: ``FPN.NORM`` (``FPN.USE_GN`` = 'GN'; GroupNorm with GROUP_NORM.*)."""
    name = "GN" if cfg.FPN.USE_GN and not cfg.FPN.NORM else cfg.FPN.NORM
    if name not in D2_NORM_KINDS:
        raise ValueError(f"FPN.NORM = {name!r} is not one of {', '.join(map(repr, D2_NORM_KINDS))}")
    kind = D2_NORM_KINDS[name]
    return None if kind is None else norm_spec_from_cfg(cfg, kind=kind)


def fpn_from_cfg(cfg, body: ResNet, p2_only: bool = False) -> FPN:
    """An FPN over `body` with FPN.DIM, FPN.NORM / FPN.USE_GN (GROUP_NORM.*), FPN.ZERO_INIT_LATERAL,
    FPN.EXTRA_CONV_LEVELS and the levels of :func:`get_min_max_levels`."""
    min_level, max_level = get_min_max_levels(cfg)
    return FPN(
        body,
        dim=cfg.FPN.DIM,
        min_level=min_level,
        max_level=max_level,
        extra_conv_levels=cfg.FPN.EXTRA_CONV_LEVELS,
        norm=fpn_norm_spec(cfg),
        zero_init_lateral=cfg.FPN.ZERO_INIT_LATERAL,
        p2_only=p2_only,
    )


def _register_fpn_bodies() -> None:
    """``fpn_ResNet<depth>_conv5_body`` and ``fpn_ResNet<depth>_conv5_P2only_body`` for every depth."""
    for depth in BLOCK_COUNTS:
        for p2_only in (False, True):
            name = f"fpn_ResNet{depth}_conv5_{'P2only_' if p2_only else ''}body"

            def build(cfg, depth=depth, p2_only=p2_only) -> FPN:
                return fpn_from_cfg(cfg, resnet_from_cfg(cfg, depth, 5), p2_only=p2_only)

            build.__name__ = build.__qualname__ = name
            register("body", name)(build)


_register_fpn_bodies()
