"""Building blocks shared by the bodies: AffineChannel, the normalisation factory, conv + norm, Caffe2 fills.

Every module here that holds parameters also says which Caffe2 blob each of them is
(``detectron_weight_mapping()``, see ARCHITECTURE.md), so Detectron ``.pkl`` files load by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from pydetectron.ops.conv import Conv2d

NORM_KINDS = ("AffineChannel", "GN", "BN", "SyncBN")


class AffineChannel2d(nn.Module):
    """Per-channel ``y = x * weight + bias`` (Caffe2's AffineChannel): a batch norm frozen into an affine map.

    Detectron fine-tunes ImageNet models with BN replaced by this op and never updates it, so both
    parameters are created with ``requires_grad=False``. Input/output ``(N, C, H, W)``.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused multiply-add pass (half the memory traffic of ``x * w + b``); keeps x's memory format.
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_features}"


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """RESNETS.NORM SyncBN: batch statistics over the whole process group in training.

    On GPUs this is torch's SyncBatchNorm (NCCL). torch's kernel refuses CPU tensors, so on the CPU (gloo) the
    statistics are gathered as detectron2's NaiveSyncBatchNorm gathers them: each rank's per-channel sums of x
    and x^2 and its element count go through one differentiable all_reduce, and the result is exactly batch
    norm over the global batch, gradients included (ranks with different batch sizes weigh by their counts).
    Outside a process group, or in eval mode, it is plain batch norm.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if input.device.type != "cpu" or not (self.training and distributed):
            if input.device.type == "cpu":  # torch's SyncBatchNorm refuses CPU tensors even without a group
                return nn.functional.batch_norm(
                    input, self.running_mean, self.running_var, self.weight, self.bias,
                    self.training or not self.track_running_stats, self._momentum(), self.eps)
            return super().forward(input)
        return self._gathered_batch_norm(input)

    def _momentum(self) -> float:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return 0.0 if self.momentum is None else self.momentum

    def _gathered_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        sums = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        sums = all_reduce(sums)  # SUM over the ranks, and its backward sums the gradients back
        total = sums[-1]
        mean = sums[:channels] / total
        var = sums[channels:2 * channels] / total - mean * mean
        momentum = self._momentum()
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def group_count(dim: int, dim_per_gp: int, num_groups: int) -> int:
    """Number of GroupNorm groups for `dim` channels, as Detectron's ``get_group_gn``.

    Exactly one of `dim_per_gp` (GROUP_NORM.DIM_PER_GP) and `num_groups` (GROUP_NORM.NUM_GROUPS) must be
    positive (the other -1); the channel count must divide evenly.
    """
    if (dim_per_gp > 0) == (num_groups > 0):
        raise ValueError(
            f"GroupNorm: set exactly one of GROUP_NORM.DIM_PER_GP ({dim_per_gp}) and "
            f"GROUP_NORM.NUM_GROUPS ({num_groups}); the other must be -1"
        )
    if dim_per_gp > 0:
        if dim % dim_per_gp:
            raise ValueError(f"GroupNorm: {dim} channels are not divisible by GROUP_NORM.DIM_PER_GP={dim_per_gp}")
        return dim // dim_per_gp
    if dim % num_groups:
        raise ValueError(f"GroupNorm: {dim} channels are not divisible by GROUP_NORM.NUM_GROUPS={num_groups}")
    return num_groups


@dataclass(frozen=True)
class NormSpec:
    """Which normalisation follows each conv, with the GroupNorm settings (plain values read from cfg).

    `kind` is one of ``AffineChannel`` (frozen BN, Detectron's default), ``GN``, ``BN`` (trainable
    batch norm) or ``SyncBN`` (batch norm synchronised over the process group).
    """

    kind: str = "AffineChannel"
    gn_dim_per_gp: int = -1
    gn_num_groups: int = 32
    gn_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"unknown normalisation {self.kind!r}; valid: {', '.join(NORM_KINDS)}")

    @property
    def blob_suffix(self) -> str:
        """Caffe2 suffix of the norm blobs: ``_gn`` for GroupNorm, ``_bn`` for the batch-norm family."""
        return "_gn" if self.kind == "GN" else "_bn"

    def make(self, dim: int) -> nn.Module:
        """A fresh norm layer over `dim` channels (scale 1, shift 0 as Detectron initialises them)."""
        if self.kind == "AffineChannel":
            return AffineChannel2d(dim)
        if self.kind == "GN":
            return nn.GroupNorm(group_count(dim, self.gn_dim_per_gp, self.gn_num_groups), dim, eps=self.gn_eps)
        if self.kind == "BN":
            return nn.BatchNorm2d(dim)
        return SyncBatchNorm2d(dim)


# Caffe2's SpatialBN names its running statistics ``<blob>_rm`` / ``<blob>_riv`` (the latter holds the
# variance, as detectron2's Caffe2 name conversion reads it).
RUNNING_STAT_SUFFIXES = {"running_mean": "_rm", "running_var": "_riv"}


def norm_weight_mapping(norm: nn.Module, blob: str) -> Dict[str, str | None]:
    """Mapping of a norm layer's state_dict to ``<blob>_s`` / ``<blob>_b`` (and a batch norm's running
    statistics to ``<blob>_rm`` / ``<blob>_riv``); ``num_batches_tracked`` has no blob."""
    mapping: Dict[str, str | None] = {"weight": f"{blob}_s", "bias": f"{blob}_b"}
    for key, suffix in RUNNING_STAT_SUFFIXES.items():
        if key in norm.state_dict():
            mapping[key] = blob + suffix
    for key in norm.state_dict():
        mapping.setdefault(key, None)
    return mapping


def xavier_fill_(weight: torch.Tensor) -> None:
    """Caffe2's XavierFill: U(-a, a) with a = sqrt(3 / fan_in), fan_in = numel / shape[0]."""
    bound = math.sqrt(3.0 / weight[0].numel())
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def msra_fill_(weight: torch.Tensor) -> None:
    """Caffe2's MSRAFill: N(0, std^2) with std = sqrt(2 / fan_out), fan_out = numel / shape[1]."""
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


class ConvNorm(nn.Module):
    """A bias-free conv followed by a norm layer (Detectron's ``ConvAffine`` / ``ConvGN``); no activation.

    `conv_blob` names the conv weight (``<conv_blob>_w``); the norm blobs are ``<norm_blob>_s/_b``, which
    defaults to ``conv_blob + spec.blob_suffix`` (the stem is the exception: ``res_conv1_bn``).
    Weights start with Caffe2's XavierFill, Detectron's default for the body convs.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        kernel: int,
        *,
        norm: NormSpec,
        conv_blob: str,
        norm_blob: str | None = None,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel - 1) // 2
        self.conv = Conv2d(
            dim_in, dim_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False
        )
        self.norm = norm.make(dim_out)
        self.conv_blob = conv_blob
        self.norm_blob = norm_blob if norm_blob is not None else conv_blob + norm.blob_suffix
        xavier_fill_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        mapping: Dict[str, str | None] = {"conv.weight": f"{self.conv_blob}_w"}
        for key, blob in norm_weight_mapping(self.norm, self.norm_blob).items():
            mapping[f"norm.{key}"] = blob
        return mapping


def compose_weight_mapping(module: nn.Module) -> Dict[str, str | None]:
    """The Detectron mapping of `module`'s state_dict, composed from its descendants' own mappings.

    Each child that defines ``detectron_weight_mapping()`` answers for its whole subtree; other children
    are searched recursively. Keys of tensors that no descendant maps are left out (the loader reports
    them as unmapped). The module's own direct parameters are not included.
    """
    mapping: Dict[str, str | None] = {}
    for name, child in module.named_children():
        sub = (
            child.detectron_weight_mapping()
            if hasattr(child, "detectron_weight_mapping")
            else compose_weight_mapping(child)
        )
        for key, blob in sub.items():
            mapping[f"{name}.{key}"] = blob
    return mapping
