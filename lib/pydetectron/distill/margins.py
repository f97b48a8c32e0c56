"""MGD's margins: the expected teacher response where it is negative, from the BN before the ReLU.

A BN output is modelled per channel as N(beta, gamma^2). Its expectation over the negative part is
``m - s * phi(m / s) / Phi(-m / s)`` with ``s = |gamma|``, ``m = beta``; where ``Phi(-m / s) <= 0.001`` (almost
never negative) MGD takes ``-3 s`` (MGD's ``get_margin_from_BN`` in ``mgd/builder.py``).

The formula needs the BN's own ``gamma``/``beta``. A trainable BN or GroupNorm holds them as its weight and
bias. An AffineChannel does not: it holds BN folded with its running statistics
(``gamma / sqrt(var + eps)``, ``beta - mean * scale``), so a teacher with a frozen AffineChannel body needs the
gamma/beta from the torchvision checkpoint it was converted from (``stage_end_bn_from_torchvision``), which is
what MGD's detectron2 teacher (FrozenBN, which keeps gamma and beta) reads.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Sequence, Tuple

import torch
from scipy.stats import norm as normal
from torch import nn

from pydetectron.distill.features import STAGE_LEVELS, stage_end_block, stage_end_norm
from pydetectron.modeling.backbones.resnet import BottleneckBlock, ResNet
from pydetectron.modeling.layers import AffineChannel2d
from pydetectron.weights.torchvision import resnet_state_dict

NEGATIVE_MASS_FLOOR = 0.001  # MGD's threshold on Phi(-m / s)


def bn_margins(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-channel margins ``(C,)`` float32 from a BN's ``gamma`` and ``beta`` ``(C,)`` (``get_margin_from_BN``)."""
    if gamma.shape != beta.shape or gamma.dim() != 1:
        raise ValueError(f"gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must be equal 1-d shapes")
    margins = []
    for g, b in zip(gamma.detach().double().cpu().tolist(), beta.detach().double().cpu().tolist()):
        s, m = abs(g), b
        negative_mass = normal.cdf(-m / s)
        if negative_mass > NEGATIVE_MASS_FLOOR:
            margins.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / negative_mass + m)
        else:
            margins.append(-3 * s)
    return torch.tensor(margins, dtype=torch.float32, device=gamma.device)


def stage_end_bn_affine(body: ResNet, levels: Sequence[int] = STAGE_LEVELS) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(gamma, beta)`` of the norm before each stage's final ReLU (MGD's ``get_bn_before_relu``).

    Raises for an AffineChannel body, whose parameters are folded and not gamma/beta (see the module doc),
    and for norms still at their initial values (margins read before the teacher's weights were loaded).
    """
    pairs = []
    for level in levels:
        layer = stage_end_norm(body, level)
        if isinstance(layer, AffineChannel2d):
            raise ValueError(
                f"res{level}: MGD's margins need the teacher BN's gamma/beta, but the teacher body's norms are "
                "AffineChannel (BN folded with its running statistics). Give the torchvision checkpoint the "
                "teacher was converted from (DISTILL.MGD.TEACHER_BN_WEIGHTS), or use a teacher trained with "
                "RESNETS.NORM 'BN', 'SyncBN' or 'GN'"
            )
        if not isinstance(layer, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)) or layer.weight is None:
            raise TypeError(f"res{level}: cannot read gamma/beta from a {type(layer).__name__}")
        gamma, beta = layer.weight.detach(), layer.bias.detach()
        if bool((gamma == 1).all()) and bool((beta == 0).all()):
            raise ValueError(f"res{level}: the teacher's stage-end norm still has its initial gamma 1 / beta 0; "
                             "load the teacher's weights before reading MGD's margins")
        pairs.append((gamma, beta))
    return pairs


def stage_end_bn_from_torchvision(
    checkpoint: Mapping[str, Any], body: ResNet, levels: Sequence[int] = STAGE_LEVELS, source: str = "the checkpoint"
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(gamma, beta)`` of each stage-end BN of `body`, read from the torchvision ResNet weights in `checkpoint`
    (``layer<level-1>.<last>.bn3`` for bottleneck blocks, ``bn2`` for basic ones); shapes checked against `body`."""
    weights = resnet_state_dict(checkpoint, source)
    pairs = []
    for level in levels:
        block = stage_end_block(body, level)
        bn = f"layer{level - 1}.{len(getattr(body, f'res{level}')) - 1}." + (
            "bn3" if isinstance(block, BottleneckBlock) else "bn2"
        )
        keys = (f"{bn}.weight", f"{bn}.bias")
        missing = [k for k in keys if k not in weights]
        if missing:
            raise KeyError(f"{source} has no {missing}: it is not the torchvision ResNet of this teacher body")
        gamma, beta = (torch.as_tensor(weights[k]).float() for k in keys)
        if gamma.numel() != body.stage_dims[level]:
            raise ValueError(f"{source}: {keys[0]} has {gamma.numel()} channels, the teacher's res{level} "
                             f"has {body.stage_dims[level]}")
        pairs.append((gamma, beta))
    return pairs
