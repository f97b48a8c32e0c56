"""RoIAlign: Caffe2/Detectron's op (``aligned=False``) and detectron2's half-pixel variant (``aligned=True``).

The kernels live in ``pydetectron._C`` (``torch.ops.pydetectron.roi_align_forward/backward``); this module
adds the argument checks, autograd and the ``nn.Module``. The argument helpers
(``output_size_pair``, ``check_spatial_scale``, ``check_tensors``) are shared with ``roi_pool``.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from pydetectron.ops._extension import OPS

OutputSize = Union[int, Tuple[int, int]]


def output_size_pair(output_size: OutputSize) -> tuple[int, int]:
    """``7`` or ``(7, 7)`` -> ``(7, 7)``; both sizes must be positive ints."""
    pair = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"output_size must be a positive int or a pair of positive ints, got {output_size!r}")
    return pair


def check_spatial_scale(spatial_scale: float) -> float:
    """The scale from input-image pixels to feature-map pixels (e.g. 1/16): a finite positive number."""
    scale = float(spatial_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"spatial_scale must be a finite positive number, got {spatial_scale!r}")
    return scale


def check_sampling_ratio(sampling_ratio: int) -> int:
    """Bilinear samples per bin along each axis: an int, <= 0 meaning adaptive (Caffe2's rule; torchvision's
    default is -1), passed to the kernels as 0."""
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int (<= 0 = adaptive), got {sampling_ratio!r}")
    return max(sampling_ratio, 0)


def check_tensors(input: Tensor, rois: Tensor) -> None:
    """Type check before the kernels check shapes, dtypes and devices."""
    if not isinstance(input, Tensor) or not isinstance(rois, Tensor):
        raise TypeError(f"input and rois must be tensors, got {type(input).__name__} and {type(rois).__name__}")


class RoIAlignFunction(torch.autograd.Function):
    """Autograd for RoIAlign: the backward scatters each bin's gradient onto its bilinear samples.

    Gradients flow to ``input`` only (``rois`` are treated as constants, as in Detectron).
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        rois: Tensor,
        output_size: tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (output_size, spatial_scale, sampling_ratio, aligned)
        ctx.input_shape = tuple(input.shape)
        return OPS.roi_align_forward(input, rois, spatial_scale, *output_size, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (rois,) = ctx.saved_tensors
        (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned = ctx.args
        grad_input = OPS.roi_align_backward(
            grad_output, rois, spatial_scale, pooled_h, pooled_w, *ctx.input_shape, sampling_ratio, aligned
        )
        return grad_input, None, None, None, None, None


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = False,
) -> Tensor:
    """Bilinearly pooled features of each region, ``(K, C, out_h, out_w)``.

    Args:
        input: feature map ``(N, C, H, W)``, float (float16/bfloat16 too).
        rois: ``(K, 5)`` = ``[batch_index, x1, y1, x2, y2]`` in input-image pixels, same dtype and device
            as ``input``; boxes may lie partly or wholly off the map.
        output_size: ``out`` or ``(out_h, out_w)``.
        spatial_scale: feature-map pixels per input pixel (1/stride).
        sampling_ratio: bilinear samples per bin along each axis; 0 or negative (torchvision's -1) = adaptive,
            ``ceil(roi_size / out)``.
        aligned: False is Caffe2/Detectron's RoIAlign (corners used as given, box at least 1x1 on the map);
            True shifts the box by -0.5 pixel first (detectron2 / torchvision ``aligned=True``).
    """
    check_tensors(input, rois)
    return RoIAlignFunction.apply(
        input, rois, output_size_pair(output_size), check_spatial_scale(spatial_scale),
        check_sampling_ratio(sampling_ratio), bool(aligned),
    )


class RoIAlign(nn.Module):
    """``roi_align`` with fixed parameters, as a layer: ``forward(input (N,C,H,W), rois (K,5)) -> (K,C,h,w)``."""

    def __init__(
        self, output_size: OutputSize, spatial_scale: float, sampling_ratio: int = 0, aligned: bool = False
    ) -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.sampling_ratio = check_sampling_ratio(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )
