"""``Conv2d``: torch's conv layer run channels-last, with the weight gradient of spatial kernels taken in NCHW
on the CPU.

On the CPU, oneDNN's channels-last (NHWC) convolutions are faster than its NCHW ones (1x1 kernels 2-3x, a 3x3
kernel's forward ~12% at detection sizes), but its NHWC *weight* gradient of a 3x3 kernel is 3-6x slower than
the NCHW one on AVX2 CPUs (BENCHMARK.md, "Training on the CPU: conv layouts").
So every conv runs channels-last, and in CPU training a spatial kernel's weight gradient is computed from NCHW
copies of its input and output gradient.

A conv whose loss reaches only a few output positions (the RPN's 3x3 conv: its losses count 256 sampled anchors
per image, so its output gradient is exactly zero everywhere else) is built with ``sparse_output_grad=True``:
its backward then gathers the positions where the gradient is nonzero and computes both gradients from them
alone (a few hundred of the 54400 positions of an 800x1088 image's P2), the same sums without the zero terms.
When the gradient is not sparse after all (more than ``SPARSE_GRAD_MAX_FRACTION`` of the positions), it falls
back to the dense backward.

Values are those of ``nn.Conv2d`` up to float rounding; parameters, their names and initialisation are
``nn.Conv2d``'s (this is a subclass), so weights load as before.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SPARSE_GRAD_MAX_FRACTION = 0.05


def _sparse_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
                          stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], need_x: bool,
                          need_weight: bool) -> Tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input and weight gradients of a conv (groups 1) from the output positions ``(P, 3)`` (n, y, x) where
    `grad_out` is nonzero: each position's output gradient times the input patch it was computed from."""
    n, y, x_out = positions.unbind(1)
    grad = grad_out[n, :, y, x_out]  # (P, C_out)
    c_out, c_in, kh, kw = weight.shape
    height, width = x.shape[2:]
    ky, kx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    rows = y[:, None] * stride[0] - padding[0] + ky.reshape(1, -1) * dilation[0]  # (P, kh * kw)
    cols = x_out[:, None] * stride[1] - padding[1] + kx.reshape(1, -1) * dilation[1]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    images = n[:, None].expand_as(rows)
    grad_x = grad_weight = None
    if need_weight:
        patches = x[images, :, rows, cols] * inside[..., None].to(x.dtype)  # (P, kh * kw, C_in)
        grad_weight = (grad.t() @ patches.reshape(len(n), kh * kw * c_in)).reshape(c_out, kh, kw, c_in)
        grad_weight = grad_weight.permute(0, 3, 1, 2).contiguous()
    if need_x:
        spread = (grad @ weight.permute(0, 2, 3, 1).reshape(c_out, -1)).reshape(len(n), kh * kw, c_in)
        flat = torch.zeros(x.shape[0] * height * width, c_in, dtype=grad.dtype, device=grad.device)
        index = (images * height + rows) * width + cols
        flat.index_add_(0, index[inside], spread[inside])
        grad_x = flat.reshape(x.shape[0], height, width, c_in).permute(0, 3, 1, 2)
    return grad_x, grad_weight


class _ConvNCHWWeightGrad(torch.autograd.Function):
    """conv2d whose backward takes the input gradient in the input's layout and the weight gradient in NCHW, or
    both from the nonzero output positions when `sparse_output_grad` and they are few."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Tuple[int, int],
                padding: Tuple[int, int], dilation: Tuple[int, int], groups: int,
                sparse_output_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        ctx.has_bias = bias is not None
        ctx.sparse_output_grad = sparse_output_grad and groups == 1
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        if ctx.sparse_output_grad:
            positions = torch.nonzero(grad_out.ne(0).any(dim=1))
            if len(positions) <= SPARSE_GRAD_MAX_FRACTION * grad_out[:, 0].numel():
                stride, padding, dilation = ctx.geometry[:3]
                grad_x, grad_weight = _sparse_conv_backward(grad_out, x, weight, positions, stride, padding,
                                                            dilation, ctx.needs_input_grad[0],
                                                            ctx.needs_input_grad[1])
                return grad_x, grad_weight, grad_bias, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, *ctx.geometry, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad_out.contiguous(), x.contiguous(), weight.contiguous(), None, *ctx.geometry,
                [False, True, False])[1]
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _weight_grad_in_nchw(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this conv call should take its weight gradient in NCHW (see the module docstring)."""
    return (x.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled()
            and weight.shape[-2:] != (1, 1) and not torch.is_autocast_enabled("cpu"))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that makes its input channels-last; `sparse_output_grad`: its loss reaches only a few
    output positions (see the module docstring)."""

    def __init__(self, *args, sparse_output_grad: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sparse_output_grad = sparse_output_grad

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or input.dim() != 4:
            return super()._conv_forward(input, weight, bias)
        x = input.contiguous(memory_format=torch.channels_last)
        if _weight_grad_in_nchw(x, weight):
            return _ConvNCHWWeightGrad.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                                             self.sparse_output_grad)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
