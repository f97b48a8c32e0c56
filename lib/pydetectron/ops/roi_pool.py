"""RoIPool with Caffe2/Detectron's semantics (rounded boxes, floor/ceil bins, max per bin).

The kernels live in ``pydetectron._C`` (``torch.ops.pydetectron.roi_pool_forward/backward``); this module
adds the argument checks, autograd and the ``nn.Module``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from pydetectron.ops._extension import OPS
from pydetectron.ops.roi_align import OutputSize, check_spatial_scale, check_tensors, output_size_pair


class RoIPoolFunction(torch.autograd.Function):
    """Autograd for RoIPool: each bin's gradient goes to the input element that was its maximum.

    Gradients flow to ``input`` only; ``rois`` are constants.
    """

    @staticmethod
    def forward(
        ctx, input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float
    ) -> Tensor:
        output, argmax = OPS.roi_pool_forward(input, rois, spatial_scale, *output_size)
        ctx.save_for_backward(rois, argmax)
        ctx.args = (output_size, spatial_scale)
        ctx.input_shape = tuple(input.shape)
        ctx.mark_non_differentiable(argmax)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        rois, argmax = ctx.saved_tensors
        (pooled_h, pooled_w), spatial_scale = ctx.args
        grad_input = OPS.roi_pool_backward(
            grad_output, rois, argmax, spatial_scale, pooled_h, pooled_w, *ctx.input_shape
        )
        return grad_input, None, None, None


def roi_pool(input: Tensor, rois: Tensor, output_size: OutputSize, spatial_scale: float = 1.0) -> Tensor:
    """Max-pooled features of each region, ``(K, C, out_h, out_w)``.

    Args:
        input: feature map ``(N, C, H, W)``, float (float16/bfloat16 too).
        rois: ``(K, 5)`` = ``[batch_index, x1, y1, x2, y2]`` in input-image pixels, inclusive corners, same
            dtype and device as ``input``.
        output_size: ``out`` or ``(out_h, out_w)``.
        spatial_scale: feature-map pixels per input pixel (1/stride). Corners are rounded after scaling;
            a bin that falls off the map gives 0.
    """
    check_tensors(input, rois)
    return RoIPoolFunction.apply(input, rois, output_size_pair(output_size), check_spatial_scale(spatial_scale))


class RoIPool(nn.Module):
    """``roi_pool`` with fixed parameters, as a layer: ``forward(input (N,C,H,W), rois (K,5)) -> (K,C,h,w)``."""

    def __init__(self, output_size: OutputSize, spatial_scale: float) -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"
