"""RoIAlign vs torchvision, vs a float64 reference of Caffe2's op written here, and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch.autograd import gradcheck

from pydetectron.ops._extension import OPS
from pydetectron.ops.roi_align import RoIAlign, roi_align

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests need a visible GPU")


def random_rois(num: int, batch: int, extent: float, generator: torch.Generator, inverted: bool = False):
    """(num, 5) rois over an image of `extent` pixels: some off the map, some tiny (<1 px), some inverted."""
    corners = torch.rand(num, 2, generator=generator, dtype=torch.float64) * extent * 1.4 - 0.2 * extent
    sizes = torch.rand(num, 2, generator=generator, dtype=torch.float64) * extent * 0.6
    sizes[::4] *= 0.01  # tiny boxes
    if inverted:
        sizes[1::5] *= -1
    index = torch.randint(batch, (num, 1), generator=generator).to(torch.float64)
    return torch.cat([index, corners, corners + sizes], 1)


def bilinear(plane: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Caffe2's bilinear read of (C, H, W) at (y, x): 0 beyond one pixel off the map, edges clamped."""
    _, height, width = plane.shape
    if y < -1 or y > height or x < -1 or x > width:
        return torch.zeros(plane.shape[0], dtype=plane.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= height - 1:
        y0, y = height - 1, float(height - 1)
    if x0 >= width - 1:
        x0, x = width - 1, float(width - 1)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * plane[:, y0, x0] + (1 - ly) * lx * plane[:, y0, x1]
            + ly * (1 - lx) * plane[:, y1, x0] + ly * lx * plane[:, y1, x1])


def reference_roi_align(features, rois, out_h, out_w, scale, sampling_ratio, aligned):
    """Float64 loops over RoIs, bins and samples, straight from Caffe2's / detectron2's definition."""
    num_rois, channels = rois.shape[0], features.shape[1]
    out = torch.zeros(num_rois, channels, out_h, out_w, dtype=torch.float64)
    shift = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (v * scale - shift for v in (x1, y1, x2, y2))
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        plane = features[int(b)].double()
        for ph in range(out_h):
            for pw in range(out_w):
                total = torch.zeros(channels, dtype=torch.float64)
                for iy in range(max(grid_h, 0)):
                    for ix in range(max(grid_w, 0)):
                        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += bilinear(plane, y, x)
                out[k, :, ph, pw] = total / count
    return out


def tv_backward(grad, rois, shape, out_hw, scale, sampling_ratio, aligned):
    return torch.ops.torchvision._roi_align_backward(grad, rois, scale, *out_hw, *shape, sampling_ratio, aligned)


def our_backward(grad, rois, shape, out_hw, scale, sampling_ratio, aligned):
    return OPS.roi_align_backward(grad, rois, scale, *out_hw, *shape, sampling_ratio, aligned)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_forward_and_backward_match_torchvision(aligned, sampling_ratio, scale):
    g = torch.Generator().manual_seed(int(scale * 100) + sampling_ratio)
    features = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64)
    # torchvision cannot take inverted boxes with aligned=True and adaptive sampling (it sizes a buffer by
    # a negative grid); those are covered against the reference below.
    rois = random_rois(24, 2, 13 / scale, g, inverted=not (aligned and sampling_ratio == 0))
    out = roi_align(features, rois, (3, 4), scale, sampling_ratio, aligned)
    expected = torchvision.ops.roi_align(features, rois, (3, 4), scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    args = (grad, rois, features.shape, (3, 4), scale, sampling_ratio, aligned)
    torch.testing.assert_close(our_backward(*args), tv_backward(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_forward_matches_float64_reference(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(7 + sampling_ratio)
    features = torch.randn(2, 2, 9, 10, generator=g, dtype=torch.float64)
    rois = random_rois(10, 2, 20.0, g, inverted=True)
    out = roi_align(features, rois, 2, 0.5, sampling_ratio, aligned)
    expected = reference_roi_align(features, rois, 2, 2, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_linear_ramp_by_hand():
    # f(y, x) = x is reproduced exactly by bilinear sampling; box x in [1, 5], 2 bins of 2 px, 2 samples
    # per bin at x = 1.5, 2.5 (mean 2) and 3.5, 4.5 (mean 4). With aligned=True everything shifts by -0.5.
    ramp = torch.arange(8, dtype=torch.float32).expand(1, 1, 8, 8)
    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]])
    legacy = roi_align(ramp, rois, 2, 1.0, 2, aligned=False)
    torch.testing.assert_close(legacy, torch.tensor([[[[2.0, 4.0], [2.0, 4.0]]]]))
    shifted = roi_align(ramp, rois, 2, 1.0, 2, aligned=True)
    torch.testing.assert_close(shifted, torch.tensor([[[[1.5, 3.5], [1.5, 3.5]]]]))


def test_tiny_box_is_clamped_to_one_pixel_without_aligned():
    # A zero-size box at (2, 3) on a ramp f = x: Caffe2 widens it to 1 px, so the one bin averages
    # samples at x = 2.25, 2.75 -> 2.5; aligned=True keeps it empty-sized and samples x = 1.5 only.
    ramp = torch.arange(6, dtype=torch.float64).expand(1, 1, 6, 6)
    rois = torch.tensor([[0.0, 2.0, 3.0, 2.0, 3.0]], dtype=torch.float64)
    assert roi_align(ramp, rois, 1, 1.0, 2, aligned=False).item() == pytest.approx(2.5)
    assert roi_align(ramp, rois, 1, 1.0, 2, aligned=True).item() == pytest.approx(1.5)
    assert roi_align(ramp, rois, 1, 1.0, 0, aligned=True).item() == 0.0  # no samples at all


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradcheck(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(5, 2, 14.0, g)
    assert gradcheck(lambda x: roi_align(x, rois, (2, 3), 0.5, sampling_ratio, aligned), (features,))


def test_planar_and_channels_last_paths_agree_with_torchvision():
    # Few RoIs for the map take the planar kernels (300 RoIs: more than one block of RoIs); many RoIs on a
    # small map, or a channels-last input, take the channels-last ones.
    g = torch.Generator().manual_seed(5)
    for features, num_rois in ((torch.randn(1, 20, 64, 64, generator=g), 1),
                               (torch.randn(1, 2, 160, 160, generator=g), 300),
                               (torch.randn(2, 20, 8, 8, generator=g), 64)):
        rois = random_rois(num_rois, features.shape[0], 8.0 * features.shape[-1], g)
        expected = torchvision.ops.roi_align(features, rois.float(), 5, 0.125, 2)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = roi_align(features.contiguous(memory_format=layout), rois.float(), 5, 0.125, 2)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn(expected.shape, generator=g)
        args = (grad, rois.float(), features.shape, (5, 5), 0.125, 2, False)
        torch.testing.assert_close(our_backward(*args), tv_backward(*args), rtol=1e-5, atol=1e-5)


def test_autograd_matches_raw_backward_and_is_contiguous():
    g = torch.Generator().manual_seed(9)
    features = torch.randn(2, 3, 10, 10, generator=g, requires_grad=True)
    rois = random_rois(40, 2, 40.0, g).float()
    out = RoIAlign((2, 2), 0.25, 2)(features, rois)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    assert features.grad.is_contiguous()
    torch.testing.assert_close(features.grad, tv_backward(grad, rois, features.shape, (2, 2), 0.25, 2, False))


def test_empty_rois_give_empty_output_and_zero_grad():
    features = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = roi_align(features, torch.zeros(0, 5), (3, 2), 1.0, 2)
    assert out.shape == (0, 4, 3, 2)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(11)
    features = torch.randn(2, 6, 9, 3, generator=g).transpose(1, 3)[:, ::2]  # (2, 2, 9, 6), strided
    rois = random_rois(7, 2, 12.0, g).float().t().contiguous().t()
    assert not features.is_contiguous() and not rois.is_contiguous()
    out = roi_align(features, rois, 3, 0.5, 0)
    expected = roi_align(features.contiguous(), rois.contiguous(), 3, 0.5, 0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn(7, 2, 3, 3, generator=g).transpose(2, 3)
    args = (rois, features.shape, (3, 3), 0.5, 0, False)
    torch.testing.assert_close(our_backward(grad, *args), our_backward(grad.contiguous(), *args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_cpu_follow_float32(dtype):
    g = torch.Generator().manual_seed(13)
    features = torch.randn(1, 3, 8, 8, generator=g)
    rois = random_rois(6, 1, 16.0, g).float()
    out = roi_align(features.to(dtype), rois.to(dtype), 2, 0.5, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), roi_align(features, rois.to(dtype).float(), 2, 0.5, 2),
                               rtol=2e-2, atol=2e-2)


def test_module_repr_and_forward():
    module = RoIAlign(7, 1 / 16, sampling_ratio=2, aligned=True)
    assert repr(module) == "RoIAlign(output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=2, aligned=True)"
    features, rois = torch.randn(1, 2, 6, 6), torch.tensor([[0.0, 0.0, 0.0, 40.0, 50.0]])
    torch.testing.assert_close(module(features, rois), roi_align(features, rois, (7, 7), 1 / 16, 2, True))


@pytest.mark.parametrize(
    "features, rois, kwargs, error, match",
    [
        (torch.zeros(2, 5, 5), torch.zeros(1, 5), {}, RuntimeError, "4-D"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 4), {}, RuntimeError, r"\(K, 5\)"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5, dtype=torch.float64), {}, RuntimeError, "dtype"),
        (torch.zeros(2, 2, 5, 5), torch.tensor([[2.0, 0, 0, 1, 1]]), {}, RuntimeError, "batch index 2"),
        (torch.zeros(2, 2, 5, 5), torch.tensor([[-1.0, 0, 0, 1, 1]]), {}, RuntimeError, "batch index -1"),
        (torch.zeros(1, 2, 5, 5), torch.tensor([[0.0, 0, float("nan"), 1, 1]]), {}, RuntimeError, "NaN"),
        (torch.zeros(1, 2, 0, 5), torch.zeros(1, 5), {}, RuntimeError, "height and width"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5), {"output_size": 0}, ValueError, "output_size"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5), {"output_size": (2, 2, 2)}, ValueError, "output_size"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5), {"spatial_scale": 0.0}, ValueError, "spatial_scale"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5), {"sampling_ratio": 1.5}, ValueError, "sampling_ratio"),
        (torch.zeros(1, 2, 5, 5), torch.zeros(1, 5), {"sampling_ratio": True}, ValueError, "sampling_ratio"),
        (torch.zeros(1, 2, 5, 5), [[0.0, 0, 0, 1, 1]], {}, TypeError, "tensors"),
    ],
)
def test_bad_input_raises_clear_errors(features, rois, kwargs, error, match):
    args = {"output_size": 2, "spatial_scale": 1.0, "sampling_ratio": 2, **kwargs}
    with pytest.raises(error, match=match):
        roi_align(features, rois, **args)


@pytest.mark.parametrize("aligned", [False, True])
def test_negative_sampling_ratio_is_adaptive_like_zero_and_torchvision(aligned):
    """Caffe2: '<= 0 is adaptive'; torchvision's default is -1. Forward and backward equal sampling_ratio=0's,
    and torchvision's own -1."""
    g = torch.Generator().manual_seed(11)
    features = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(9, 2, 24.0, g).double()
    grads = []
    outputs = []
    for ratio in (-1, -3, 0):
        features.grad = None
        out = roi_align(features, rois, (3, 2), 0.5, ratio, aligned)
        out.sum().backward()
        outputs.append(out.detach())
        grads.append(features.grad.clone())
    for out, grad in zip(outputs[:2], grads[:2]):
        torch.testing.assert_close(out, outputs[2], rtol=0, atol=0)
        torch.testing.assert_close(grad, grads[2], rtol=0, atol=0)
    expected = torchvision.ops.roi_align(features.detach(), rois, (3, 2), 0.5, -1, aligned)
    torch.testing.assert_close(outputs[0], expected)
    assert RoIAlign(2, 0.5, sampling_ratio=-1).sampling_ratio == 0


def test_huge_coordinates_are_refused_before_an_int_cast_overflows():
    with pytest.raises(RuntimeError, match=r"beyond \+-2\^30"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 1e10, 3]]), 2, 1.0, 0)


def test_fractional_batch_indices_are_truncated_as_the_kernels_read_them():
    """-1 < b < N is accepted (the kernels truncate toward zero); the check's fast path must agree."""
    features = torch.randn(2, 3, 6, 6)
    box = [0.0, 0.0, 4.0, 4.0]
    fractional = roi_align(features, torch.tensor([[-0.5, *box], [1.9, *box]]), 2, 1.0, 2)
    whole = roi_align(features, torch.tensor([[0.0, *box], [1.0, *box]]), 2, 1.0, 2)
    torch.testing.assert_close(fractional, whole, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="batch index 2"):
        roi_align(features, torch.tensor([[0.0, *box], [2.0, *box]]), 2, 1.0, 2)


def test_raw_ops_validate_their_arguments():
    features, rois = torch.zeros(1, 2, 5, 5), torch.tensor([[0.0, 0, 0, 3, 3]])
    with pytest.raises(RuntimeError, match="pooled_height and pooled_width must be positive"):
        OPS.roi_align_forward(features, rois, 1.0, 0, 2, 2, False)
    with pytest.raises(RuntimeError, match="sampling_ratio"):
        OPS.roi_align_forward(features, rois, 1.0, 2, 2, -2, False)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        OPS.roi_align_backward(torch.zeros(1, 3, 2, 2), rois, 1.0, 2, 2, 1, 2, 5, 5, 2, False)
    with pytest.raises(RuntimeError, match="batch index 1"):
        OPS.roi_align_backward(torch.zeros(1, 2, 2, 2), rois + torch.tensor([1.0, 0, 0, 0, 0]),
                               1.0, 2, 2, 1, 2, 5, 5, 2, False)


@needs_cuda
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5),
                                        (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_cuda_matches_cpu(aligned, dtype, tol):
    g = torch.Generator().manual_seed(17)
    # the float64 reference takes the inputs as rounded to `dtype`: rounding the rois alone moves a half-precision
    # result by more than the tolerance
    features = torch.randn(2, 5, 12, 14, generator=g, dtype=torch.float64).to(dtype).double()
    rois = random_rois(30, 2, 28.0, g).to(dtype).double()
    grad = torch.randn(30, 5, 3, 3, generator=g, dtype=torch.float64).to(dtype).double()
    for sampling_ratio in (0, 2):
        expected = roi_align(features, rois, 3, 0.5, sampling_ratio, aligned)
        x = features.to(dtype).cuda()
        out = roi_align(x, rois.to(dtype).cuda(), 3, 0.5, sampling_ratio, aligned)
        torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol)
        args = (rois, features.shape, (3, 3), 0.5, sampling_ratio, aligned)
        expected_grad = our_backward(grad, *args)
        cuda_grad = our_backward(grad.to(dtype).cuda(), rois.to(dtype).cuda(), *args[1:])
        torch.testing.assert_close(cuda_grad.double().cpu(), expected_grad, rtol=tol, atol=tol)


@needs_cuda
def test_cuda_rejects_bad_batch_index_and_handles_empty():
    features = torch.zeros(1, 2, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match="batch index 3"):
        roi_align(features, torch.tensor([[3.0, 0, 0, 1, 1]], device="cuda"), 2, 1.0, 2)
    assert roi_align(features, torch.zeros(0, 5, device="cuda"), 2, 1.0, 2).shape == (0, 2, 2, 2)
