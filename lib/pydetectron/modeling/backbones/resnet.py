"""ResNet / ResNeXt bodies in Detectron's MSRA/Caffe2 layout (Detectron's ``modeling/ResNet.py``).

Stem: conv1 7x7/2 (no bias) -> norm -> ReLU -> max-pool 3x3/2 pad 1. Stages res2..res5 of bottleneck
blocks (1x1 -> 3x3 (grouped for ResNeXt) -> 1x1, stride in the 1x1 when ``STRIDE_1X1``) or, for
ResNet-18/34, basic blocks (3x3 with the stride -> 3x3). A block gets a 1x1 conv + norm shortcut
(``branch1``) when its width or stride changes. Blob names follow Caffe2: ``res3_0_branch2b_w``,
``res3_0_branch2b_bn_s`` (``_gn_s`` with GroupNorm), stem ``conv1_w`` + ``res_conv1_bn_*`` (``conv1_gn_*``).

This is also detectron2's ``ResNet`` layer for layer (stem pool 3x3/2 pad 1, stride in the 1x1 with
``STRIDE_1X1`` = d2's ``STRIDE_IN_1X1``, ``RES5_DILATION``, shortcut exactly when the width changes, FrozenBN =
AffineChannel after the exact fold); in detectron2 mode the convs start with detectron2's ``c2_msra_fill``
instead of Caffe2's XavierFill.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.layers import ConvNorm, NormSpec, compose_weight_mapping, group_count, msra_fill_
from pydetectron.modeling.registry import register

BLOCK_COUNTS: Dict[int, Sequence[int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
BASIC_BLOCK_DEPTHS = (18, 34)
BLOCK_KINDS = ("bottleneck", "basic")
DEFAULT_NORM = NormSpec()  # AffineChannel, Detectron's frozen BN
_GN_FUNCS = ("bottleneck_gn_transformation", "basic_gn_stem", "basic_gn_shortcut")
MGD_STAGE_NORM_GROUPS = 32  # detectron2's get_norm('GN', C) = GroupNorm(32, C), in MGD's stage-last norms


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block; input ``(N, dim_in, H, W)`` -> ``(N, dim_out, H/stride, W/stride)``."""

    def __init__(
        self,
        prefix: str,
        dim_in: int,
        dim_out: int,
        dim_inner: int,
        *,
        stride: int,
        dilation: int,
        groups: int,
        stride_1x1: bool,
        norm: NormSpec,
    ) -> None:
        super().__init__()
        str1x1, str3x3 = (stride, 1) if stride_1x1 else (1, stride)
        self.branch2a = ConvNorm(dim_in, dim_inner, 1, norm=norm, conv_blob=f"{prefix}_branch2a", stride=str1x1)
        self.branch2b = ConvNorm(
            dim_inner, dim_inner, 3, norm=norm, conv_blob=f"{prefix}_branch2b", stride=str3x3,
            dilation=dilation, groups=groups,
        )
        self.branch2c = ConvNorm(dim_inner, dim_out, 1, norm=norm, conv_blob=f"{prefix}_branch2c")
        self.branch1 = _shortcut(prefix, dim_in, dim_out, stride, norm)
        self.out_relu = nn.ReLU(inplace=True)  # a module so that its input (the pre-ReLU sum) can be hooked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.branch2a(x), inplace=True)
        out = F.relu(self.branch2b(out), inplace=True)
        out = self.branch2c(out)
        return self.out_relu(out + (x if self.branch1 is None else self.branch1(x)))

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)


class BasicBlock(nn.Module):
    """3x3 (with the stride) -> 3x3 residual block of ResNet-18/34 (torchvision's layout, Caffe2 names
    ``branch2a``/``branch2b``); input ``(N, dim_in, H, W)`` -> ``(N, dim_out, H/stride, W/stride)``."""

    def __init__(self, prefix: str, dim_in: int, dim_out: int, *, stride: int, dilation: int, norm: NormSpec):
        super().__init__()
        self.branch2a = ConvNorm(
            dim_in, dim_out, 3, norm=norm, conv_blob=f"{prefix}_branch2a", stride=stride, dilation=dilation
        )
        self.branch2b = ConvNorm(dim_out, dim_out, 3, norm=norm, conv_blob=f"{prefix}_branch2b", dilation=dilation)
        self.branch1 = _shortcut(prefix, dim_in, dim_out, stride, norm)
        self.out_relu = nn.ReLU(inplace=True)  # a module so that its input (the pre-ReLU sum) can be hooked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.branch2a(x), inplace=True)
        out = self.branch2b(out)
        return self.out_relu(out + (x if self.branch1 is None else self.branch1(x)))

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)


def _shortcut(prefix: str, dim_in: int, dim_out: int, stride: int, norm: NormSpec) -> ConvNorm | None:
    """Detectron's ``basic_bn_shortcut`` / ``basic_gn_shortcut``: identity unless the shape changes."""
    if dim_in == dim_out and stride == 1:
        return None
    return ConvNorm(dim_in, dim_out, 1, norm=norm, conv_blob=f"{prefix}_branch1", stride=stride)


class ResStage(nn.Sequential):
    """`num_blocks` residual blocks named ``<prefix>_<i>`` (Detectron's ``add_stage``).

    Only the first block may change resolution: it gets stride `stride_init` when it changes the width
    and `dilation` is 1 (Detectron's rule; a dilated stage keeps the resolution). `dim_inner` is the
    bottleneck width (ignored by basic blocks). Input ``(N, dim_in, H, W)`` -> ``(N, dim_out, H', W')``.
    """

    def __init__(
        self,
        prefix: str,
        num_blocks: int,
        dim_in: int,
        dim_out: int,
        dim_inner: int,
        *,
        stride_init: int = 2,
        dilation: int = 1,
        block: str = "bottleneck",
        groups: int = 1,
        stride_1x1: bool = True,
        norm: NormSpec = DEFAULT_NORM,
    ) -> None:
        if block not in BLOCK_KINDS:
            raise ValueError(f"unknown residual block kind {block!r}; valid: {', '.join(BLOCK_KINDS)}")
        if block == "basic" and groups != 1:
            raise ValueError(f"basic (ResNet-18/34) blocks do not support grouped convs (NUM_GROUPS={groups})")
        blocks = []
        for i in range(num_blocks):
            stride = stride_init if (i == 0 and dim_in != dim_out and dilation == 1) else 1
            name = f"{prefix}_{i}"
            if block == "basic":
                blocks.append(BasicBlock(name, dim_in, dim_out, stride=stride, dilation=dilation, norm=norm))
            else:
                blocks.append(
                    BottleneckBlock(
                        name, dim_in, dim_out, dim_inner, stride=stride, dilation=dilation, groups=groups,
                        stride_1x1=stride_1x1, norm=norm,
                    )
                )
            dim_in = dim_out
        super().__init__(*blocks)
        self.prefix = prefix
        self.dim_out = dim_out
        self.sum_blob = f"{prefix}_{num_blocks - 1}_sum"  # Detectron's name of the stage output

    def __getitem__(self, idx):
        """A block, or for a slice a plain ``nn.Sequential`` of blocks (a ResStage needs its build args)."""
        if isinstance(idx, slice):
            return nn.Sequential(*list(self)[idx])
        return super().__getitem__(idx)

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)


class ResNetStem(nn.Module):
    """conv1 7x7/2 -> norm -> ReLU -> max-pool 3x3/2 pad 1 (``basic_bn_stem`` / ``basic_gn_stem``).

    ``(N, 3, H, W)`` -> ``(N, 64, ceil(ceil(H / 2) / 2), ceil(ceil(W / 2) / 2))`` (Caffe2's floor formula).
    """

    def __init__(self, norm: NormSpec, dim_out: int = 64) -> None:
        super().__init__()
        norm_blob = "conv1_gn" if norm.kind == "GN" else "res_conv1_bn"
        self.conv1 = ConvNorm(3, dim_out, 7, norm=norm, conv_blob="conv1", norm_blob=norm_blob, stride=2)
        self.dim_out = dim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x), inplace=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)


class ResNet(nn.Module):
    """A ResNet/ResNeXt trunk up to res4 (``num_stages=4``, C4 body) or res5 (``num_stages=5``).

    ``forward(images (N, 3, H, W)) -> [C_last]`` (one map, per the Bodies contract);
    ``forward_stages(images) -> {2: C2, 3: C3, ...}`` gives every stage output for FPN.
    With `freeze_at` k >= 1 the stem and stages res2..res<k> get ``requires_grad=False`` and keep their norm
    layers in eval mode, like Detectron's StopGradient after ``res<k>``; k = 1 freezes the stem only
    (detectron2's meaning, what MGD's students train with); 0 trains everything.
    """

    def __init__(
        self,
        depth: int,
        *,
        num_stages: int = 5,
        norm: NormSpec = DEFAULT_NORM,
        groups: int = 1,
        width_per_group: int = 64,
        stride_1x1: bool = True,
        res5_dilation: int = 1,
        freeze_at: int = 2,
    ) -> None:
        super().__init__()
        if depth not in BLOCK_COUNTS:
            raise ValueError(f"unsupported ResNet depth {depth}; valid: {sorted(BLOCK_COUNTS)}")
        if num_stages not in (4, 5):
            raise ValueError(f"num_stages must be 4 (conv4 body) or 5 (conv5 body), got {num_stages}")
        if freeze_at not in range(6):
            raise ValueError(f"TRAIN.FREEZE_AT must be one of 0 (nothing), 1 (the stem), 2..5 (the stem and "
                             f"res2..res<k>), got {freeze_at}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"RESNETS.RES5_DILATION must be 1 or 2, got {res5_dilation}")
        basic = depth in BASIC_BLOCK_DEPTHS
        self.stem = ResNetStem(norm)
        dim_in = self.stem.dim_out
        self.stage_dims: Dict[int, int] = {}
        self.stage_blobs: Dict[int, str] = {}
        for level, count in zip(range(2, num_stages + 1), BLOCK_COUNTS[depth]):
            factor = 2 ** (level - 2)
            dim_out = 64 * factor if basic else 256 * factor
            stage = ResStage(
                f"res{level}", count, dim_in, dim_out, groups * width_per_group * factor,
                stride_init=1 if level == 2 else 2,
                dilation=res5_dilation if level == 5 else 1,
                block="basic" if basic else "bottleneck",
                groups=groups, stride_1x1=stride_1x1, norm=norm,
            )
            self.add_module(f"res{level}", stage)
            self.stage_dims[level] = dim_out
            self.stage_blobs[level] = stage.sum_blob
            dim_in = dim_out
        self.stage_scales = {lvl: 1.0 / 2**lvl for lvl in self.stage_dims}
        if num_stages == 5:
            self.stage_scales[5] = 1.0 / 32 * res5_dilation
        self.dim_out = dim_in
        self.levels = [num_stages]
        self.spatial_scales = [self.stage_scales[num_stages]]
        self.freeze_at = freeze_at
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def _frozen_modules(self) -> List[nn.Module]:
        if self.freeze_at == 0:
            return []
        return [self.stem] + [getattr(self, f"res{lvl}") for lvl in self.stage_dims if lvl <= self.freeze_at]

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen batch-norm layers keep their running statistics
        return self

    def forward_stages(self, images: torch.Tensor) -> Dict[int, torch.Tensor]:
        """``(N, 3, H, W)`` -> ``{level: (N, stage_dims[level], ~H*scale, ~W*scale)}`` for levels 2..last.

        The maps are channels-last in memory (same values and shape): the convs run channels-last
        (pydetectron.ops.conv: oneDNN convolves NHWC without reordering every call), and the RoI ops read
        channels-last maps directly.
        """
        x = self.stem(images)
        outputs = {}
        for level in self.stage_dims:
            x = getattr(self, f"res{level}")(x)
            outputs[level] = x
        return outputs

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        return [self.forward_stages(images)[self.levels[0]]]

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        return compose_weight_mapping(self)


def enable_stage_last_norms(body: ResNet) -> List[str]:
    """Make every norm of the last block of each stage a trainable GroupNorm(32, C), as MGD's d2
    ``build_resnet_backbone`` does for its students with ``RESNETS.ENABLE_STAGE_LAST_NORM`` (``make_stage``
    gives that block norm 'GN': branch2a/b(/c) and the shortcut alike), except in the stage numbered
    ``FREEZE_AT`` (their ``stage_idx == freeze_at``). Stages below ``FREEZE_AT`` get the GroupNorms frozen, as
    their ``ResNet.freeze`` leaves them. Each GroupNorm starts from the replaced norm's scale and shift and keeps
    its blob name, so weights loaded later land in it (a BN file's gamma/beta, as detectron2 loads them).
    Returns the names of the replaced norm modules.
    """
    replaced = []
    for level in body.stage_dims:
        if level == body.freeze_at:
            continue
        stage = getattr(body, f"res{level}")
        block_name = f"res{level}.{len(stage) - 1}"
        trainable = level > body.freeze_at
        for name, conv_norm in stage[-1].named_children():
            if not isinstance(conv_norm, ConvNorm):
                continue
            old = conv_norm.norm
            dim = old.weight.numel()
            if dim % MGD_STAGE_NORM_GROUPS:
                raise ValueError(f"{block_name}.{name}: {dim} channels are not divisible into "
                                 f"{MGD_STAGE_NORM_GROUPS} GroupNorm groups")
            new = nn.GroupNorm(MGD_STAGE_NORM_GROUPS, dim).to(old.weight.device)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
            new.requires_grad_(trainable)
            conv_norm.norm = new
            replaced.append(f"{block_name}.{name}.norm")
    return replaced


# --------------------------------------------------------------------------------------------------
# cfg -> plain values
# --------------------------------------------------------------------------------------------------


def get_group_gn(cfg, dim: int) -> int:
    """GroupNorm group count for `dim` channels from ``GROUP_NORM.DIM_PER_GP`` / ``GROUP_NORM.NUM_GROUPS``."""
    return group_count(dim, cfg.GROUP_NORM.DIM_PER_GP, cfg.GROUP_NORM.NUM_GROUPS)


def norm_spec_from_cfg(cfg, kind: str | None = None) -> NormSpec:
    """The body's normalisation: ``RESNETS.NORM``, with ``RESNETS.USE_GN`` or Detectron's ``*_gn_*``
    ``TRANS_FUNC``/``STEM_FUNC``/``SHORTCUT_FUNC`` meaning GroupNorm; `kind` forces one (FPN asks 'GN')."""
    r = cfg.RESNETS
    g = cfg.GROUP_NORM
    if kind is None:
        gn_implied = bool(r.USE_GN) or any(f in _GN_FUNCS for f in (r.TRANS_FUNC, r.STEM_FUNC, r.SHORTCUT_FUNC))
        kind = r.NORM
        if gn_implied and kind not in ("GN", "AffineChannel"):
            raise ValueError(
                f"RESNETS.NORM={kind!r} conflicts with GroupNorm asked by RESNETS.USE_GN/TRANS_FUNC/STEM_FUNC/"
                "SHORTCUT_FUNC"
            )
        kind = "GN" if gn_implied else kind
    return NormSpec(kind, gn_dim_per_gp=g.DIM_PER_GP, gn_num_groups=g.NUM_GROUPS, gn_eps=g.EPSILON)


_TRANS_FUNCS = {
    "bottleneck_transformation": "bottleneck",
    "bottleneck_gn_transformation": "bottleneck",
    "basic_transformation": "basic",
}


def _block_kind_from_cfg(cfg) -> str:
    name = cfg.RESNETS.TRANS_FUNC
    if name not in _TRANS_FUNCS:
        raise ValueError(f"unknown RESNETS.TRANS_FUNC {name!r}; valid: {', '.join(_TRANS_FUNCS)}")
    return _TRANS_FUNCS[name]


def make_res_stage(
    cfg,
    prefix: str,
    *,
    num_blocks: int,
    dim_in: int,
    dim_out: int,
    dim_inner: int,
    dilation: int = 1,
    stride_init: int = 2,
) -> ResStage:
    """One res stage (e.g. ``res5`` of the C4 box head ``ResNet_roi_conv5_head``, or ``_[mask]_res5``).

    Block kind (``RESNETS.TRANS_FUNC``), groups, ``STRIDE_1X1`` and the normalisation come from cfg;
    the rest are Detectron's ``add_stage`` arguments. The blob names start with `prefix`.
    """
    stage = ResStage(
        prefix, num_blocks, dim_in, dim_out, dim_inner,
        stride_init=stride_init, dilation=dilation, block=_block_kind_from_cfg(cfg),
        groups=cfg.RESNETS.NUM_GROUPS, stride_1x1=cfg.RESNETS.STRIDE_1X1, norm=norm_spec_from_cfg(cfg),
    )
    return _convention_init(cfg, stage)


def _convention_init(cfg, module: nn.Module) -> nn.Module:
    """detectron2 mode: every conv of `module` restarts with ``c2_msra_fill`` (MSRAFill), as detectron2's
    ResNet blocks and stem; Detectron mode keeps XavierFill. Returns `module`."""
    if cfg.MODEL.CONVENTIONS == "detectron2":
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d):
                msra_fill_(conv.weight)
    return module


def resnet_from_cfg(cfg, depth: int, num_stages: int) -> ResNet:
    """A ``ResNet<depth>_conv<num_stages>_body`` with the RESNETS.*, GROUP_NORM.* and TRAIN.FREEZE_AT options
    (``RESNETS.ENABLE_STAGE_LAST_NORM``: MGD's student, see :func:`enable_stage_last_norms`)."""
    if _block_kind_from_cfg(cfg) == "basic" and depth not in BASIC_BLOCK_DEPTHS:
        raise ValueError(
            f"RESNETS.TRANS_FUNC='basic_transformation' is for ResNet-18/34 bodies, not ResNet-{depth}"
        )
    body = ResNet(
        depth,
        num_stages=num_stages,
        norm=norm_spec_from_cfg(cfg),
        groups=cfg.RESNETS.NUM_GROUPS,
        width_per_group=cfg.RESNETS.WIDTH_PER_GROUP,
        stride_1x1=cfg.RESNETS.STRIDE_1X1,
        res5_dilation=cfg.RESNETS.RES5_DILATION,
        freeze_at=cfg.TRAIN.FREEZE_AT,
    )
    if cfg.RESNETS.ENABLE_STAGE_LAST_NORM:
        enable_stage_last_norms(body)
    return _convention_init(cfg, body)


def _register_resnet_bodies() -> None:
    """``ResNet<depth>_conv4_body`` and ``ResNet<depth>_conv5_body`` for every depth."""
    for depth in BLOCK_COUNTS:
        for num_stages in (4, 5):
            name = f"ResNet{depth}_conv{num_stages}_body"

            def build(cfg, depth=depth, num_stages=num_stages) -> ResNet:
                return resnet_from_cfg(cfg, depth, num_stages)

            build.__name__ = build.__qualname__ = name
            register("body", name)(build)


_register_resnet_bodies()
