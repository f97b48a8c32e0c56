"""RoIPool vs torchvision, vs a float64 reference of Caffe2's op written here, and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch.autograd import gradcheck

from pydetectron.ops._extension import OPS
from pydetectron.ops.roi_pool import RoIPool, roi_pool

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests need a visible GPU")


def random_rois(num: int, batch: int, extent: float, generator: torch.Generator, scale: float = 1.0):
    """(num, 5) rois: some off the map, some tiny, some inverted, some with corners at exact halves of a
    feature-map pixel once scaled (round() ties)."""
    corners = torch.rand(num, 2, generator=generator, dtype=torch.float64) * extent * 1.4 - 0.2 * extent
    sizes = torch.rand(num, 2, generator=generator, dtype=torch.float64) * extent * 0.6
    sizes[::4] *= 0.01
    sizes[1::5] *= -1
    boxes = torch.cat([corners, corners + sizes], 1)
    boxes[2::6] = ((boxes[2::6] * scale).round() + 0.5) / scale
    index = torch.randint(batch, (num, 1), generator=generator).to(torch.float64)
    return torch.cat([index, boxes], 1)


def round_half_away(value: float) -> int:
    """C's round(): halves go away from zero (Python's round() would go to even)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def reference_roi_pool(features, rois, out_h, out_w, scale):
    """Float64 loops over RoIs and bins, straight from Caffe2's RoIPool; returns (output, argmax)."""
    num_rois, channels, height, width = rois.shape[0], *features.shape[1:]
    out = torch.zeros(num_rois, channels, out_h, out_w, dtype=torch.float64)
    argmax = torch.full(out.shape, -1, dtype=torch.int32)
    for k, (b, *box) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (round_half_away(v * scale) for v in box)
        bin_h, bin_w = max(y2 - y1 + 1, 1) / out_h, max(x2 - x1 + 1, 1) / out_w
        for ph in range(out_h):
            top = min(max(math.floor(ph * bin_h) + y1, 0), height)
            bottom = min(max(math.ceil((ph + 1) * bin_h) + y1, 0), height)
            for pw in range(out_w):
                left = min(max(math.floor(pw * bin_w) + x1, 0), width)
                right = min(max(math.ceil((pw + 1) * bin_w) + x1, 0), width)
                if bottom <= top or right <= left:
                    continue
                window = features[int(b), :, top:bottom, left:right].reshape(channels, -1)
                values, flat = window.max(1)  # ties: the first maximum in row-major order
                out[k, :, ph, pw] = values
                rows, cols = flat // (right - left) + top, flat % (right - left) + left
                argmax[k, :, ph, pw] = (rows * width + cols).to(torch.int32)
    return out, argmax


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("out_hw", [(3, 4), (7, 7)])
def test_forward_argmax_and_backward_match_torchvision(scale, out_hw):
    g = torch.Generator().manual_seed(int(scale * 10) + out_hw[0])
    features = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64)
    rois = random_rois(30, 2, 13 / scale, g, scale)
    out, argmax = OPS.roi_pool_forward(features, rois, scale, *out_hw)
    expected, expected_argmax = torch.ops.torchvision.roi_pool(features, rois, scale, *out_hw)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(argmax, expected_argmax)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    tail = (scale, *out_hw, *features.shape)
    torch.testing.assert_close(
        OPS.roi_pool_backward(grad, rois, argmax, *tail),
        torch.ops.torchvision._roi_pool_backward(grad, rois, expected_argmax, *tail),
        rtol=1e-12, atol=1e-12,
    )


def test_matches_float64_reference():
    g = torch.Generator().manual_seed(21)
    features = torch.randn(2, 2, 9, 10, generator=g, dtype=torch.float64)
    features[0, 0, :3, :3] = 1.0  # ties: the first maximum wins
    rois = torch.cat([random_rois(14, 2, 20.0, g, 0.5), torch.tensor([[0.0, 0.0, 0.0, 5.0, 5.0]])])
    out, argmax = OPS.roi_pool_forward(features, rois, 0.5, 3, 2)
    expected, expected_argmax = reference_roi_pool(features, rois, 3, 2, 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(argmax, expected_argmax)


def test_hand_computed_bins():
    # Map values = 10 * y + x. The box [1, 1, 4, 4] covers 4x4 pixels: 2x2 bins of 2x2 pixels whose
    # maxima are their bottom-right corners (2, 2), (2, 4), (4, 2), (4, 4). A box off the map is all zeros.
    features = (10 * torch.arange(6.0)[:, None] + torch.arange(6.0)).expand(1, 1, 6, 6)
    rois = torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0], [0.0, 20.0, 20.0, 30.0, 30.0]])
    out, argmax = OPS.roi_pool_forward(features, rois, 1.0, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[22.0, 24.0], [42.0, 44.0]]))
    assert argmax[0, 0].tolist() == [[2 * 6 + 2, 2 * 6 + 4], [4 * 6 + 2, 4 * 6 + 4]]
    assert out[1].abs().sum() == 0 and (argmax[1] == -1).all()


def test_gradcheck_and_off_map_bins_get_no_gradient():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(6, 2, 14.0, g)
    assert gradcheck(lambda x: roi_pool(x, rois, (2, 3), 0.5), (features,))
    off_map = torch.tensor([[1.0, 40.0, 40.0, 60.0, 60.0]], dtype=torch.float64)
    roi_pool(features, off_map, 2, 0.5).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() == 0


def test_planar_and_channels_last_paths_agree_with_torchvision():
    g = torch.Generator().manual_seed(6)
    for features, num_rois in ((torch.randn(1, 20, 64, 64, generator=g), 1),
                               (torch.randn(2, 20, 8, 8, generator=g), 64)):
        rois = random_rois(num_rois, features.shape[0], 8.0 * features.shape[-1], g).float()
        expected, expected_argmax = torch.ops.torchvision.roi_pool(features, rois, 0.125, 5, 5)
        for layout in (torch.contiguous_format, torch.channels_last):
            out, argmax = OPS.roi_pool_forward(features.contiguous(memory_format=layout), rois, 0.125, 5, 5)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert torch.equal(argmax, expected_argmax)


def test_autograd_routes_gradient_to_the_maxima():
    g = torch.Generator().manual_seed(8)
    features = torch.randn(2, 3, 10, 10, generator=g, requires_grad=True)
    rois = random_rois(12, 2, 40.0, g).float()
    out = RoIPool(2, 0.25)(features, rois)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    _, argmax = torch.ops.torchvision.roi_pool(features.detach(), rois, 0.25, 2, 2)
    expected = torch.ops.torchvision._roi_pool_backward(grad, rois, argmax, 0.25, 2, 2, 2, 3, 10, 10)
    torch.testing.assert_close(features.grad, expected)


def test_empty_rois_give_empty_output_and_zero_grad():
    features = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = roi_pool(features, torch.zeros(0, 5), (3, 2), 1.0)
    assert out.shape == (0, 4, 3, 2)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(12)
    features = torch.randn(2, 6, 9, 3, generator=g).transpose(1, 3)[:, ::2]
    rois = random_rois(7, 2, 12.0, g).float().t().contiguous().t()
    assert not features.is_contiguous() and not rois.is_contiguous()
    torch.testing.assert_close(roi_pool(features, rois, 3, 0.5),
                               roi_pool(features.contiguous(), rois.contiguous(), 3, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_cpu_follow_float32(dtype):
    g = torch.Generator().manual_seed(14)
    features = torch.randn(1, 3, 8, 8, generator=g).to(dtype)
    rois = random_rois(6, 1, 16.0, g).to(dtype)
    out = roi_pool(features, rois, 2, 0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, roi_pool(features.float(), rois.float(), 2, 0.5).to(dtype), rtol=0, atol=0)


def test_module_repr_and_forward():
    module = RoIPool((7, 5), 0.25)
    assert repr(module) == "RoIPool(output_size=(7, 5), spatial_scale=0.25)"
    features, rois = torch.randn(1, 2, 6, 6), torch.tensor([[0.0, 0.0, 0.0, 20.0, 22.0]])
    torch.testing.assert_close(module(features, rois), roi_pool(features, rois, (7, 5), 0.25))


@pytest.mark.parametrize(
    "features, rois, kwargs, error, match",
    [
        (torch.zeros(2, 5, 5), torch.zeros(1, 5), {}, RuntimeError, "4-D"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(3), {}, RuntimeError, r"\(K, 5\)"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5, dtype=torch.float64), {}, RuntimeError, "dtype"),
        (torch.zeros(1, 2, 5, 5), torch.tensor([[1.0, 0, 0, 1, 1]]), {}, RuntimeError, "batch index 1"),
        (torch.zeros(1, 2, 5, 5), torch.tensor([[0.0, 0, 0, float("inf"), 1]]), {}, RuntimeError, "infinite"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5), {"output_size": (2, -1)}, ValueError, "output_size"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5), {"spatial_scale": float("nan")}, ValueError, "spatial_scale"),
        ("map", torch.zeros(1, 5), {}, TypeError, "tensors"),
    ],
)
def test_bad_input_raises_clear_errors(features, rois, kwargs, error, match):
    with pytest.raises(error, match=match):
        roi_pool(features, rois, **{"output_size": 2, "spatial_scale": 1.0, **kwargs})


def test_raw_backward_validates_argmax():
    rois = torch.tensor([[0.0, 0, 0, 3, 3]])
    grad = torch.ones(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match="argmax must be an int32"):
        OPS.roi_pool_backward(grad, rois, torch.zeros(1, 2, 2, 2, dtype=torch.int64), 1.0, 2, 2, 1, 2, 5, 5)
    with pytest.raises(RuntimeError, match=r"argmax values must lie in \[-1, H\*W\)"):
        OPS.roi_pool_backward(grad, rois, torch.full((1, 2, 2, 2), 25, dtype=torch.int32), 1.0, 2, 2, 1, 2, 5, 5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(18)
    features = torch.randn(2, 5, 12, 14, generator=g).to(dtype)
    rois = random_rois(30, 2, 28.0, g).to(dtype)
    out, argmax = OPS.roi_pool_forward(features, rois, 0.5, 3, 3)
    cuda_out, cuda_argmax = OPS.roi_pool_forward(features.cuda(), rois.cuda(), 0.5, 3, 3)
    torch.testing.assert_close(cuda_out.cpu(), out, rtol=0, atol=0)
    assert torch.equal(cuda_argmax.cpu(), argmax)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    expected = OPS.roi_pool_backward(grad, rois, argmax, 0.5, 3, 3, 2, 5, 12, 14)
    result = OPS.roi_pool_backward(grad.cuda(), rois.cuda(), cuda_argmax, 0.5, 3, 3, 2, 5, 12, 14)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
    torch.testing.assert_close(result.cpu(), expected, rtol=tol, atol=tol)
