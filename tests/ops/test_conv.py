"""pydetectron.ops.conv.Conv2d against torch's own conv2d with autograd in float64 (an independent reference):
values and every gradient, for the geometries the models use (strides, dilation, groups, bias or none)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pydetectron.ops.conv import Conv2d


def _reference(conv: Conv2d, x: torch.Tensor):
    """float64 output and gradients of plain F.conv2d (torch's own backward) for the loss sum(out * weights)."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    w64 = conv.weight.detach().double().requires_grad_(conv.weight.requires_grad)
    b64 = None if conv.bias is None else conv.bias.detach().double().requires_grad_()
    out = F.conv2d(x64, w64, b64, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out, x64, w64, b64


@pytest.mark.parametrize("kernel,stride,dilation,groups,bias", [
    (3, 1, 1, 1, True), (3, 2, 1, 1, False), (3, 1, 2, 1, True), (3, 1, 1, 4, False), (1, 2, 1, 1, False),
    (7, 2, 1, 1, False), (1, 1, 1, 1, True)])
def test_values_and_gradients_equal_float64_conv2d(kernel, stride, dilation, groups, bias):
    torch.manual_seed(kernel * 10 + stride + dilation + groups)
    conv = Conv2d(8, 12, kernel, stride=stride, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                  groups=groups, bias=bias)
    x = torch.randn(2, 8, 19, 23, requires_grad=True)
    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    want, x64, w64, b64 = _reference(conv, x)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    mix = torch.randn(want.shape, dtype=torch.float64)
    (out * mix.float()).sum().backward()
    (want * mix).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    assert conv.weight.grad.is_contiguous()  # the parameter's own layout
    if bias:
        torch.testing.assert_close(conv.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


def test_frozen_weight_or_input_without_gradient():
    """Only what needs a gradient gets one: a frozen conv still passes the input gradient, a conv on a
    gradient-free input still trains its weight."""
    torch.manual_seed(1)
    frozen = Conv2d(4, 6, 3, padding=1)
    frozen.weight.requires_grad_(False)
    frozen.bias.requires_grad_(False)
    x = torch.randn(1, 4, 9, 11, requires_grad=True)
    frozen(x).square().sum().backward()
    want, x64, _, _ = _reference(frozen, x)
    want.square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    assert frozen.weight.grad is None

    trained = Conv2d(4, 6, 3, padding=1)
    plain = torch.randn(1, 4, 9, 11)
    trained(plain).square().sum().backward()
    want, _, w64, b64 = _reference(trained, plain)
    want.square().sum().backward()
    torch.testing.assert_close(trained.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trained.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


def test_inference_and_cpu_bfloat16_autocast():
    torch.manual_seed(2)
    conv = Conv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(conv(x).double(), _reference(conv, x)[0], rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # SOLVER.AMP on the CPU: torch's own conv path
        out = conv(x.requires_grad_())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("stride,dilation,kernel", [(1, 1, 3), (2, 1, 3), (1, 2, 3), (2, 1, 5)])
def test_sparse_output_gradient_equals_float64_conv2d(stride, dilation, kernel):
    """An RPN-like loss on a few output positions (corners and borders included, where the patch leaves the
    image): the gathered backward gives torch's float64 gradients."""
    torch.manual_seed(stride * 7 + dilation + kernel)
    conv = Conv2d(6, 10, kernel, stride=stride, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                  sparse_output_grad=True)
    x = torch.randn(2, 6, 23, 29, requires_grad=True)
    out = conv(x)
    want, x64, w64, b64 = _reference(conv, x)
    mix = torch.zeros(want.shape, dtype=torch.float64)
    h, w = want.shape[2:]
    for n, y, x_pos in [(0, 0, 0), (0, h - 1, w - 1), (1, 0, w - 1), (1, h // 2, 3), (1, h // 2, 4), (0, 5, 0)]:
        mix[n, :, y, x_pos] = torch.randn(want.shape[1], dtype=torch.float64)
    mix[1, 2, 1, 1] = 0.5  # one position with a single nonzero channel
    assert (mix.ne(0).any(1).sum() <= 0.05 * 2 * h * w)  # the gathered path is taken
    (out * mix.float()).sum().backward()
    (want * mix).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)


def test_sparse_output_gradient_that_is_zero_everywhere():
    """A map with no sampled anchor (an FPN level the RPN loss did not reach): zero gradients, no error."""
    conv = Conv2d(4, 5, 3, padding=1, sparse_output_grad=True)
    x = torch.randn(1, 4, 6, 7, requires_grad=True)
    (conv(x) * 0).sum().backward()
    assert x.grad.abs().sum() == 0 and conv.weight.grad.abs().sum() == 0 and conv.bias.grad.abs().sum() == 0
    assert x.grad.shape == x.shape and conv.weight.grad.shape == conv.weight.shape


def test_sparse_output_gradient_that_is_dense_falls_back():
    torch.manual_seed(3)
    conv = Conv2d(4, 5, 3, padding=1, sparse_output_grad=True)
    x = torch.randn(1, 4, 12, 14, requires_grad=True)
    conv(x).square().sum().backward()
    want, x64, w64, _ = _reference(conv, x)
    want.square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_rpn_losses_reach_the_rpn_conv_through_sampled_anchors_only(monkeypatch):
    """The RPN conv is built for sparse output gradients; an RPN-style loss (a few sampled anchors) takes the
    gathered backward through the ReLU and the 1x1 predictors and gives the gradients of a float64 copy that
    runs torch's dense conv backward."""
    from pydetectron.modeling.rpn_head import RPNHead
    from pydetectron.ops import conv as conv_module

    gathered = []
    original = conv_module._sparse_conv_backward
    monkeypatch.setattr(conv_module, "_sparse_conv_backward", lambda *a: gathered.append(a[3]) or original(*a))

    torch.manual_seed(6)
    head = RPNHead(8, 8, 3, softmax=False)
    assert head.conv_rpn.sparse_output_grad
    for conv in (head.conv_rpn, head.rpn_cls_logits, head.rpn_bbox_pred):
        torch.nn.init.normal_(conv.weight, std=0.3)
    features = [torch.randn(1, 8, 32, 40), torch.randn(1, 8, 16, 20)]
    head64 = RPNHead(8, 8, 3, softmax=False).double()
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    head64.conv_rpn.sparse_output_grad = False
    sampled = [torch.zeros(1, 3, 32, 40), torch.zeros(1, 3, 16, 20)]
    sampled[0][0, 1, 5, 7] = sampled[0][0, 0, 31, 39] = sampled[1][0, 2, 0, 0] = 1.0
    for model, feats in ((head, features), (head64, [f.double() for f in features])):
        logits, deltas = model(feats)
        loss = sum((F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg), reduction="none") * s.to(lg)).sum()
                   + (d.reshape(1, 3, 4, *d.shape[2:]).abs().sum(2) * s.to(d)).sum()
                   for lg, d, s in zip(logits, deltas, sampled))
        loss.backward()
    assert [len(positions) for positions in gathered] == [1, 2]  # per map, in backward order (P3, then P2)
    torch.testing.assert_close(head.conv_rpn.weight.grad.double(), head64.conv_rpn.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.conv_rpn.bias.grad.double(), head64.conv_rpn.bias.grad, rtol=1e-4, atol=1e-6)
