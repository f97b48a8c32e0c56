"""detectron2's primitives (box coder, Matcher, subsample_labels, losses) against hand and float64 values."""

import math

import pytest
import torch

from pydetectron.modeling.detectron2.box_transform import D2_SCALE_CLAMP, Box2BoxTransform
from pydetectron.modeling.detectron2.losses import dense_box_regression_loss, giou_loss, smooth_l1_loss
from pydetectron.modeling.detectron2.matcher import Matcher
from pydetectron.modeling.detectron2.sampling import subsample_labels


def _deltas_f64(src, dst, weights):
    """R-CNN deltas in plain Python, detectron2's formulas (no +1)."""
    wx, wy, ww, wh = weights
    out = []
    for (a1, b1, a2, b2), (c1, d1, c2, d2) in zip(src, dst):
        w, h, gw, gh = a2 - a1, b2 - b1, c2 - c1, d2 - d1
        cx, cy, gcx, gcy = a1 + w / 2, b1 + h / 2, c1 + gw / 2, d1 + gh / 2
        out.append([wx * (gcx - cx) / w, wy * (gcy - cy) / h, ww * math.log(gw / w), wh * math.log(gh / h)])
    return torch.tensor(out, dtype=torch.float64)


def test_box_transform_hand_values_and_round_trip():
    coder = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 9.0, 7.0]], dtype=torch.float64)
    dst = torch.tensor([[1.0, 2.0, 13.0, 18.0], [4.0, 4.0, 12.0, 8.0]], dtype=torch.float64)
    deltas = coder.get_deltas(src, dst)
    # box 0: w 10, h 20, centre (5, 10); gt w 12, h 16, centre (7, 10)
    torch.testing.assert_close(deltas[0], torch.tensor([10 * 2 / 10, 0.0, 5 * math.log(1.2), 5 * math.log(0.8)],
                                                       dtype=torch.float64))
    torch.testing.assert_close(deltas, _deltas_f64(src.tolist(), dst.tolist(), coder.weights))
    torch.testing.assert_close(coder.apply_deltas(deltas, src), dst)


def test_box_transform_class_specific_layout_and_clamp():
    coder = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    assert coder.scale_clamp == pytest.approx(math.log(1000 / 16))
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    # two classes: class 0 shifts right by one width, class 1 asks for a huge scale (clamped)
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 50.0, 50.0]])
    out = coder.apply_deltas(deltas, boxes)
    assert out.shape == (1, 8)
    torch.testing.assert_close(out[0, :4], torch.tensor([16.0, 0.0, 32.0, 16.0]))
    side = 16 * math.exp(D2_SCALE_CLAMP)  # 1000
    torch.testing.assert_close(out[0, 4:], torch.tensor([8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]))
    half = coder.apply_deltas(deltas.half(), boxes)
    assert half.dtype == torch.float32


def test_box_transform_refuses_empty_source_boxes():
    with pytest.raises(ValueError, match="positive width"):
        Box2BoxTransform((1, 1, 1, 1)).get_deltas(torch.tensor([[3.0, 0.0, 3.0, 5.0]]), torch.ones(1, 4))


def _match_f64(iou, thresholds, labels, low_quality):
    """Plain-Python Matcher: best gt per prediction, band label, then detectron2's low-quality rule."""
    num_gt, num_pred = len(iou), len(iou[0])
    bounds = [-math.inf, *thresholds, math.inf]
    matches, out = [], []
    for j in range(num_pred):
        col = [iou[i][j] for i in range(num_gt)]
        best = max(col)
        matches.append(col.index(best))  # first maximum, as torch.max
        out.append(next(lab for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]) if lo <= best < hi))
    if low_quality:
        for i in range(num_gt):
            for j in range(num_pred):
                if iou[i][j] == max(iou[i]):
                    out[j] = 1
    return matches, out


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_bands_and_low_quality_rule(low_quality):
    iou = torch.tensor([
        [0.80, 0.50, 0.20, 0.00, 0.10, 0.35],
        [0.10, 0.60, 0.35, 0.00, 0.10, 0.20],
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # a gt overlapping nothing: every 0 ties for its best
    ])
    matcher = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=low_quality)
    matches, labels = matcher(iou)
    ref_matches, ref_labels = _match_f64(iou.tolist(), [0.3, 0.7], [0, -1, 1], low_quality)
    assert matches.tolist() == ref_matches and labels.tolist() == ref_labels
    assert labels.dtype == torch.int8
    if low_quality:  # gt 1's best (0.60) makes prediction 1 positive; gt 2 makes every prediction positive
        assert labels.tolist() == [1, 1, 1, 1, 1, 1]
    else:
        assert labels.tolist() == [1, -1, -1, 0, 0, -1]


def test_matcher_low_quality_keeps_the_better_gt_as_match():
    iou = torch.tensor([[0.4, 0.1], [0.5, 0.05]])  # gt 0's best is prediction 0, which matches gt 1 better
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], True)(iou)
    assert matches.tolist() == [1, 0] and labels.tolist() == [1, 0]


def test_matcher_without_gt_labels_everything_with_the_lowest_band():
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], True)(torch.zeros(0, 4))
    assert matches.tolist() == [0, 0, 0, 0] and labels.tolist() == [0, 0, 0, 0]
    _, labels = Matcher([0.5], [-1, 1])(torch.zeros(0, 2))
    assert labels.tolist() == [-1, -1]


def test_matcher_refuses_bad_thresholds():
    with pytest.raises(ValueError, match="start above 0"):
        Matcher([0.0, 0.5], [0, -1, 1])
    with pytest.raises(ValueError, match="increasing"):
        Matcher([0.7, 0.3], [0, -1, 1])
    with pytest.raises(ValueError, match="labels"):
        Matcher([0.3, 0.7], [0, 1])


@pytest.mark.parametrize("num_pos,num_neg,expect_pos,expect_neg", [
    (200, 500, 128, 128),  # enough of both
    (10, 500, 10, 246),  # too few positives: negatives fill
    (10, 20, 10, 20),  # too few of both
])
def test_subsample_labels_counts(num_pos, num_neg, expect_pos, expect_neg):
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), torch.full((7,), -1.0)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    pos, neg = subsample_labels(labels, 256, 0.5, 0, generator=torch.Generator().manual_seed(2))
    assert (pos.numel(), neg.numel()) == (expect_pos, expect_neg)
    assert bool((labels[pos] == 1).all()) and bool((labels[neg] == 0).all())
    assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()


def test_subsample_labels_draws_detectron2s_permutations_from_the_global_rng():
    labels = torch.tensor([1, 0, 0, -1, 1, 0, 1, 0, 0, 1])
    torch.manual_seed(5)
    pos, neg = subsample_labels(labels, 4, 0.5, bg_label=0)
    torch.manual_seed(5)
    positive, negative = torch.tensor([0, 4, 6, 9]), torch.tensor([1, 2, 5, 7, 8])
    expect_pos = positive[torch.randperm(4)[:2]]
    expect_neg = negative[torch.randperm(5)[:2]]
    assert pos.tolist() == expect_pos.tolist() and neg.tolist() == expect_neg.tolist()


def test_subsample_labels_with_class_labels_and_background_index():
    labels = torch.tensor([3, 5, 5, -1, 5, 0])  # d2's ROI layout: background = K = 5
    pos, neg = subsample_labels(labels, 10, 0.25, bg_label=5)
    assert sorted(pos.tolist()) == [0, 5] and sorted(neg.tolist()) == [1, 2, 4]


def _smooth_l1_f64(x, beta):
    if beta < 1e-5:
        return abs(x)
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


@pytest.mark.parametrize("beta", [0.0, 1e-6, 1.0 / 9, 0.5, 1.0])
def test_smooth_l1_loss_matches_fvcore_formula(beta):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    expect = [_smooth_l1_f64(x - y, beta) for x, y in zip(a.flatten().tolist(), b.flatten().tolist())]
    torch.testing.assert_close(smooth_l1_loss(a, b, beta).flatten(), torch.tensor(expect, dtype=torch.float64))
    assert smooth_l1_loss(a, b, beta, "sum").item() == pytest.approx(sum(expect))
    assert smooth_l1_loss(a, b, beta, "mean").item() == pytest.approx(sum(expect) / 20)
    assert smooth_l1_loss(a[:0], b[:0], beta, "mean").item() == 0.0


def _giou_f64(p, g):
    inter_w, inter_h = min(p[2], g[2]) - max(p[0], g[0]), min(p[3], g[3]) - max(p[1], g[1])
    inter = inter_w * inter_h if inter_w > 0 and inter_h > 0 else 0.0
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    hull = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    return 1 - (inter / union - (hull - union) / hull)


def test_giou_loss_hand_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    gt = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    got = giou_loss(pred, gt, eps=0.0)
    # identical: 0; disjoint unit squares 1 apart: 1 - (0 - (3 - 2) / 3) = 4/3; overlap 1 of union 7, hull 9
    torch.testing.assert_close(got, torch.tensor([0.0, 4 / 3, 1 - (1 / 7 - 2 / 9)], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([_giou_f64(p, g) for p, g in zip(pred.tolist(), gt.tolist())],
                                                 dtype=torch.float64))
    with pytest.raises(ValueError, match="x1 > x2"):
        giou_loss(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), gt[:1].float())


def test_dense_box_regression_loss_sums_foreground_only():
    coder = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    anchors = [torch.tensor([[0.0, 0.0, 4.0, 4.0], [4.0, 4.0, 8.0, 8.0]], dtype=torch.float64),
               torch.tensor([[0.0, 0.0, 8.0, 8.0]], dtype=torch.float64)]
    gt = [torch.tensor([[1.0, 1.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 8.0, 10.0]], dtype=torch.float64)]
    pred = [torch.full((1, 2, 4), 0.05, dtype=torch.float64), torch.zeros(1, 1, 4, dtype=torch.float64)]
    fg = torch.tensor([[True, False, True]])
    target = _deltas_f64([anchors[0][0].tolist(), anchors[1][0].tolist()], [gt[0][0].tolist(), gt[0][2].tolist()],
                         (1, 1, 1, 1))
    preds = [0.05] * 4 + [0.0] * 4
    expect = sum(_smooth_l1_f64(p - t, 0.1) for p, t in zip(preds, target.flatten().tolist()))
    got = dense_box_regression_loss(anchors, coder, pred, gt, fg, "smooth_l1", 0.1)
    assert got.item() == pytest.approx(expect)
    boxes = [coder.apply_deltas(pred[0][0, :1], anchors[0][:1])[0].tolist(), anchors[1][0].tolist()]
    expect_giou = _giou_f64(boxes[0], gt[0][0].tolist()) + _giou_f64(boxes[1], gt[0][2].tolist())
    assert dense_box_regression_loss(anchors, coder, pred, gt, fg, "giou").item() == pytest.approx(expect_giou)
    with pytest.raises(ValueError, match="loss type"):
        dense_box_regression_loss(anchors, coder, pred, gt, fg, "diou")
