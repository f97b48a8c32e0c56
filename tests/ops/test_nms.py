"""NMS family: nms / batched_nms against torchvision, legacy (Detectron) NMS and soft-NMS against float64
references of Detectron's cython_nms written here, hand-computed cases, edge cases and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from pydetectron.ops.nms import batched_nms, nms, soft_nms

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests need a visible GPU")


# ----------------------------------------------------------------------------------------------- inputs
def clustered_boxes(n: int, seed: int, dtype=torch.float32, centers: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN-proposal-like boxes: jittered around a few objects, so many pairs overlap near any threshold."""
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(centers, 2, generator=g, dtype=torch.float64) * 600
    wh = torch.rand(centers, 2, generator=g, dtype=torch.float64) * 150 + 8
    pick = torch.randint(centers, (n,), generator=g)
    c = ctr[pick] + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.15 * wh[pick]
    size = wh[pick] * torch.exp(0.2 * torch.randn(n, 2, generator=g, dtype=torch.float64))
    boxes = torch.cat([c - size / 2, c + size / 2], 1).clamp(0, 799)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    return boxes.to(dtype), scores.to(dtype)


def uniform_boxes(n: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60
    return torch.cat([xy, xy + wh], 1).to(dtype), torch.rand(n, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------- references
def detectron_greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> list[int]:
    """Detectron's cython_nms.nms, in the input dtype: inclusive widths, suppress when IoU >= thresh,
    boxes visited by descending score (ties: lower index first)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = sorted(range(len(scores)), key=lambda k: -scores[k].item())
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = torch.tensor(order[pos + 1:], dtype=torch.long)
        if len(rest) == 0:
            break
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr >= thresh]] = True
    return keep


def detectron_soft_nms(boxes, scores, sigma, nt, threshold, method, np_float=np.float64, plus_one=True):
    """Detectron's cython_nms.soft_nms step for step, on scalars of type ``np_float`` (np.float64 for the
    float64 kernel, np.float32 to reproduce Detectron's own float32 arithmetic). Returns (indices, scores)."""
    f = np_float
    one = f(1) if plus_one else f(0)
    rows = [[f(v) for v in box] + [f(s)] for box, s in zip(boxes.tolist(), scores.tolist())]
    inds = list(range(len(rows)))
    sigma, nt, threshold = f(sigma), f(nt), f(threshold)
    n = len(rows)
    i = 0
    while i < n:
        maxpos = i
        for pos in range(i + 1, n):
            if rows[maxpos][4] < rows[pos][4]:
                maxpos = pos
        rows[i], rows[maxpos] = rows[maxpos], rows[i]
        inds[i], inds[maxpos] = inds[maxpos], inds[i]
        tx1, ty1, tx2, ty2, _ = rows[i]
        pos = i + 1
        while pos < n:
            x1, y1, x2, y2, s = rows[pos]
            area = (x2 - x1 + one) * (y2 - y1 + one)
            iw = min(tx2, x2) - max(tx1, x1) + one
            if iw > 0:
                ih = min(ty2, y2) - max(ty1, y1) + one
                if ih > 0:
                    ua = (tx2 - tx1 + one) * (ty2 - ty1 + one) + area - iw * ih
                    ov = iw * ih / ua
                    if method == "linear":
                        weight = f(1) - ov if ov > nt else f(1)
                    elif method == "gaussian":
                        weight = f(math.exp(float(-(ov * ov) / sigma)))
                    else:
                        weight = f(0) if ov > nt else f(1)
                    rows[pos][4] = f(weight * s)
                    if rows[pos][4] < threshold:
                        rows[pos] = rows[n - 1]
                        inds[pos] = inds[n - 1]
                        n -= 1
                        pos -= 1
            pos += 1
        i += 1
    return inds[:n], [float(r[4]) for r in rows[:n]]


# ------------------------------------------------------------------------------------ nms vs torchvision
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [clustered_boxes, uniform_boxes])
@pytest.mark.parametrize("n", [1, 7, 300, 2000])
@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_equals_torchvision(dtype, make, n, thresh):
    boxes, scores = make(n, seed=n, dtype=dtype)
    assert torch.equal(nms(boxes, scores, thresh), torchvision.ops.nms(boxes, scores, thresh))


def test_nms_threaded_sweeps_equal_torchvision_and_single_thread():
    # Spread-out boxes keep most of 6000: each sweep then has ~256 kept rows x thousands of columns, which
    # is split into chunks claimed by helper threads.
    boxes, scores = uniform_boxes(6000, seed=3)
    boxes[:, 2:] = boxes[:, :2] + (boxes[:, 2:] - boxes[:, :2]) / 3
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    assert len(expected) > 4000
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = nms(boxes, scores, 0.5)
        torch.set_num_threads(max(threads, 2))
        multi = [nms(boxes, scores, 0.5) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, expected) and all(torch.equal(m, expected) for m in multi)


def test_nms_non_contiguous_inputs():
    boxes, scores = clustered_boxes(500, seed=5)
    wide = torch.zeros(500, 8)
    wide[:, ::2] = boxes
    strided_scores = torch.stack([scores, scores], 1)[:, 0]
    assert not wide[:, ::2].is_contiguous() and not strided_scores.is_contiguous()
    assert torch.equal(nms(wide[:, ::2], strided_scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))


def test_nms_threshold_not_representable_in_float32_matches_torchvision():
    # torchvision compares the float IoU with the double threshold; so must we, for every threshold.
    boxes, scores = clustered_boxes(1500, seed=11)
    for thresh in (0.1, 0.3, 0.45, 0.6, 0.65, 0.9):
        assert torch.equal(nms(boxes, scores, thresh), torchvision.ops.nms(boxes, scores, thresh))


def test_nms_nan_matches_torchvision():
    boxes, scores = clustered_boxes(200, seed=2)
    scores[[3, 50]] = float("nan")
    boxes[[7, 80], 2] = float("nan")
    assert torch.equal(nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))


# ------------------------------------------------------------------------------------ legacy (Detectron)
@pytest.mark.parametrize("make", [clustered_boxes, uniform_boxes])
@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_legacy_nms_equals_detectron_reference_float64(make, thresh):
    boxes, scores = make(400, seed=int(thresh * 10), dtype=torch.float64)
    assert nms(boxes, scores, thresh, legacy_plus_one=True).tolist() == detectron_greedy_nms(boxes, scores, thresh)


def test_legacy_nms_float32_equals_float32_reference():
    boxes, scores = clustered_boxes(800, seed=9)
    # 0.7 is not a float32: Detectron compares the float32 IoU with np.float32(0.7).
    for thresh in (0.5, 0.7):
        ref = detectron_greedy_nms(boxes, scores, float(np.float32(thresh)))
        assert nms(boxes, scores, thresh, legacy_plus_one=True).tolist() == ref


def test_iou_exactly_at_threshold():
    # IoU = 50 / 100 = 0.5 exactly in both conventions: torchvision keeps (>), Detectron suppresses (>=).
    scores = torch.tensor([0.9, 0.8])
    exclusive = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])
    inclusive = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 4.0]])
    assert nms(exclusive, scores, 0.5).tolist() == [0, 1]
    assert nms(inclusive, scores, 0.5, legacy_plus_one=True).tolist() == [0]
    # The +1 convention changes the IoU itself: these exclusive boxes have inclusive IoU 66/121 > 0.5.
    assert nms(exclusive, scores, 0.5, legacy_plus_one=True).tolist() == [0]


# ------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("legacy", [False, True])
def test_empty_and_single(legacy):
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5, legacy)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    assert nms(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.3]), 0.5, legacy).tolist() == [0]


def test_identical_boxes_and_ties():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0]] * 4)
    scores = torch.tensor([0.5, 0.9, 0.9, 0.5])
    # Equal scores keep input order (stable sort): index 1 first.
    assert nms(boxes, scores, 0.5).tolist() == [1] == torchvision.ops.nms(boxes, scores, 0.5).tolist()
    # IoU 1 is not > 1: torchvision keeps all; Detectron's >= drops all but the first.
    assert nms(boxes, scores, 1.0).tolist() == [1, 2, 0, 3] == torchvision.ops.nms(boxes, scores, 1.0).tolist()
    assert nms(boxes, scores, 1.0, legacy_plus_one=True).tolist() == [1]


def test_iou_threshold_zero():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [30, 30, 40, 40], [10, 0, 20, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # Any positive overlap suppresses; box 3 only touches box 0 (zero-width intersection).
    assert nms(boxes, scores, 0.0).tolist() == [0, 2, 3] == torchvision.ops.nms(boxes, scores, 0.0).tolist()
    # Detectron's IoU >= 0 suppresses even disjoint boxes: only the top box survives.
    assert nms(boxes, scores, 0.0, legacy_plus_one=True).tolist() == [0]


def test_zero_area_boxes_match_torchvision():
    boxes = torch.tensor([[5.0, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10], [5, 5, 5, 20], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    for thresh in (0.0, 0.5):
        assert torch.equal(nms(boxes, scores, thresh), torchvision.ops.nms(boxes, scores, thresh))
    # Inclusive widths give a point box area 1, so identical point boxes overlap fully there.
    assert nms(boxes, scores, 0.5, legacy_plus_one=True).tolist() == detectron_greedy_nms(boxes.double(), scores, 0.5)


# -------------------------------------------------------------------------------------------- batched
@pytest.mark.parametrize("n", [300, 3000])  # below / above the size where per-label loops take over
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_nms_equals_torchvision(n, dtype):
    boxes, scores = clustered_boxes(n, seed=n, dtype=dtype)
    labels = torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(1))
    expected = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)
    assert torch.equal(batched_nms(boxes, scores, labels, 0.5), expected)


@pytest.mark.parametrize("n", [300, 3000])
@pytest.mark.parametrize("thresh", [0.0, 0.6])
def test_batched_legacy_nms_equals_per_label_reference(n, thresh):
    boxes, scores = clustered_boxes(n, seed=7, dtype=torch.float64)
    labels = torch.randint(-2, 3, (n,), generator=torch.Generator().manual_seed(2))
    keep = []
    for label in labels.unique().tolist():
        members = torch.where(labels == label)[0]
        keep += members[detectron_greedy_nms(boxes[members], scores[members], thresh)].tolist()
    expected = sorted(keep, key=lambda k: -scores[k].item())
    assert batched_nms(boxes, scores, labels, thresh, legacy_plus_one=True).tolist() == expected


def test_batched_nms_separates_labels_with_negative_coordinates():
    boxes = torch.tensor([[-100.0, -100, 10, 10], [-100, -100, 10, 10]])
    scores = torch.tensor([0.9, 0.8])
    assert batched_nms(boxes, scores, torch.tensor([0, 1]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([1, 1]), 0.5).tolist() == [0]
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)


# -------------------------------------------------------------------------------------------- soft-NMS
def test_soft_nms_hand_computed_three_boxes():
    # A and B overlap in a 10 x 5 strip (inclusive pixels): IoU = 50 / (100 + 100 - 50) = 1/3. C is apart.
    boxes = torch.tensor([[0.0, 0, 9, 9], [0, 5, 9, 14], [20, 20, 29, 29]])
    scores = torch.tensor([0.9, 0.8, 0.6])
    keep, new = soft_nms(boxes, scores, method="linear")  # 0.8 * (1 - 1/3) = 0.5333 drops below C
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.6, 0.8 * 2 / 3]))
    keep, new = soft_nms(boxes, scores, sigma=0.5, method="gaussian")  # 0.8 * exp(-(1/9) / 0.5) = 0.6406
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8 * math.exp(-2 / 9), 0.6]))
    keep, new = soft_nms(boxes, scores, method="hard")  # IoU 1/3 > 0.3: B's score becomes 0 and B is dropped
    assert keep.tolist() == [0, 2] and new.tolist() == pytest.approx([0.9, 0.6])
    keep, _ = soft_nms(boxes, scores, overlap_thresh=0.4, method="linear")  # 1/3 <= 0.4: no decay
    assert keep.tolist() == [0, 1, 2]


def test_soft_nms_keeps_low_scores_that_nothing_overlaps():
    # Detectron only checks score_thresh after decaying an overlapping box.
    boxes = torch.tensor([[0.0, 0, 9, 9], [50, 50, 60, 60]])
    keep, new = soft_nms(boxes, torch.tensor([0.9, 0.0001]), score_thresh=0.001)
    assert keep.tolist() == [0, 1] and new[1].item() == pytest.approx(0.0001)


@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
@pytest.mark.parametrize("seed", [0, 1])
def test_soft_nms_equals_detectron_reference_float64(method, seed):
    boxes, scores = clustered_boxes(150, seed=seed, dtype=torch.float64, centers=8)
    # A high score threshold makes many boxes drop, exercising Detectron's swap-with-last removal order.
    for score_thresh in (0.001, 0.3):
        keep, new = soft_nms(boxes, scores, 0.5, 0.3, score_thresh, method)
        ref_keep, ref_scores = detectron_soft_nms(boxes, scores, 0.5, 0.3, score_thresh, method)
        assert keep.tolist() == ref_keep
        assert keep.dtype == torch.int64 and new.dtype == torch.float64
        torch.testing.assert_close(new, torch.tensor(ref_scores, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_float32_reproduces_detectron_float32_arithmetic(method):
    boxes, scores = clustered_boxes(120, seed=4, centers=6)
    keep, new = soft_nms(boxes, scores, 0.5, 0.3, 0.05, method)
    ref_keep, ref_scores = detectron_soft_nms(boxes, scores, 0.5, 0.3, 0.05, method, np_float=np.float32)
    assert keep.tolist() == ref_keep
    assert new.tolist() == ref_scores  # bit-exact


def test_soft_nms_exclusive_widths_and_empty():
    boxes, scores = clustered_boxes(80, seed=6, dtype=torch.float64, centers=4)
    keep, new = soft_nms(boxes, scores, method="linear", legacy_plus_one=False)
    ref_keep, ref_scores = detectron_soft_nms(boxes, scores, 0.5, 0.3, 0.001, "linear", plus_one=False)
    assert keep.tolist() == ref_keep and new.tolist() == pytest.approx(ref_scores, rel=1e-12)
    keep, new = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == (0,) and keep.dtype == torch.int64 and new.shape == (0,)


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "boxes, scores, error, match",
    [
        (torch.zeros(3, 5), torch.zeros(3), ValueError, r"boxes must have shape \(N, 4\)"),
        (torch.zeros(4), torch.zeros(1), ValueError, r"boxes must have shape \(N, 4\)"),
        (torch.zeros(3, 4), torch.zeros(3, 1), ValueError, r"scores must have shape \(N,\)"),
        (torch.zeros(3, 4), torch.zeros(2), ValueError, "3 boxes but 2 scores"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64), TypeError, "same|one dtype"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), TypeError, "not supported"),
        (torch.zeros(3, 4, dtype=torch.float16), torch.zeros(3, dtype=torch.float16), TypeError, "not supported"),
        ([[0, 0, 1, 1]], torch.zeros(1), TypeError, "boxes must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(boxes, scores, error, match):
    for call in (lambda: nms(boxes, scores, 0.5), lambda: soft_nms(boxes, scores)):
        with pytest.raises(error, match=match):
            call()


def test_bad_arguments_raise_clear_errors():
    boxes, scores = uniform_boxes(5, seed=0)
    with pytest.raises(ValueError, match="iou_threshold must be a real number"):
        nms(boxes, scores, float("nan"))
    with pytest.raises(ValueError, match="unknown method 'soft'"):
        soft_nms(boxes, scores, method="soft")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        soft_nms(boxes, scores, sigma=0.0, method="gaussian")
    with pytest.raises(ValueError, match="scores contain NaN"):
        soft_nms(boxes, torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match=r"idxs must be a tensor of shape \(5,\)"):
        batched_nms(boxes, scores, torch.zeros(4, dtype=torch.long), 0.5)
    with pytest.raises(TypeError, match="idxs must be an integer tensor"):
        batched_nms(boxes, scores, torch.zeros(5), 0.5)


# ------------------------------------------------------------------------------------------ CUDA = CPU
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("n", [0, 1, 100, 5000])
def test_cuda_nms_equals_cpu(dtype, legacy, n):
    boxes, scores = clustered_boxes(n, seed=n, dtype=dtype)
    for thresh in (0.3, 0.7):
        cpu = nms(boxes, scores, thresh, legacy)
        assert torch.equal(nms(boxes.cuda(), scores.cuda(), thresh, legacy).cpu(), cpu)


@needs_cuda
def test_cuda_nms_half_and_batched():
    boxes, scores = clustered_boxes(3000, seed=1)
    boxes = boxes.round()  # integer coordinates are exact in float16 at this range
    half = nms(boxes.cuda().half(), scores.cuda().half(), 0.6).cpu()
    assert torch.equal(half, nms(boxes, scores.half().float(), 0.6))
    labels = torch.randint(0, 5, (3000,))
    expected = batched_nms(boxes, scores, labels, 0.5)
    assert torch.equal(batched_nms(boxes.cuda(), scores.cuda(), labels.cuda(), 0.5).cpu(), expected)


@needs_cuda
@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_soft_nms_equals_cpu(method, dtype):
    boxes, scores = clustered_boxes(700, seed=2, dtype=dtype, centers=20)
    for score_thresh in (0.001, 0.2):
        keep, new = soft_nms(boxes, scores, 0.5, 0.3, score_thresh, method)
        keep_cuda, new_cuda = soft_nms(boxes.cuda(), scores.cuda(), 0.5, 0.3, score_thresh, method)
        assert torch.equal(keep_cuda.cpu(), keep)
        torch.testing.assert_close(new_cuda.cpu(), new, rtol=1e-6, atol=0)


@needs_cuda
def test_cuda_soft_nms_leaves_column_major_boxes_untouched():
    """A (4, N)^T float tensor is already what the kernel works on: it must still work on a copy."""
    boxes, scores = clustered_boxes(300, seed=4, centers=10)
    column_major = boxes.t().contiguous().t().cuda()
    before = column_major.clone()
    keep, _ = soft_nms(column_major, scores.cuda(), 0.5, 0.3, 0.001, "linear")
    assert torch.equal(column_major, before)
    assert torch.equal(keep.cpu(), soft_nms(boxes, scores, 0.5, 0.3, 0.001, "linear")[0])
