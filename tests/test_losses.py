"""Losses against plain-Python float64 computations of Detectron's formulas."""

import math

import pytest
import torch

from pydetectron.modeling.losses import sigmoid_cross_entropy_loss, smooth_l1_loss, softmax_cross_entropy_loss


def _huber(x, beta):
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


@pytest.mark.parametrize("beta", [1.0, 1.0 / 9.0])
def test_smooth_l1_matches_reference(beta):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 8, generator=g, dtype=torch.float64)
    target = torch.randn(3, 8, generator=g, dtype=torch.float64)
    inside = (torch.rand(3, 8, generator=g) > 0.3).double()
    outside = torch.rand(3, 8, generator=g, dtype=torch.float64)
    expected = 0.0
    for p, t, wi, wo in zip(pred.flatten().tolist(), target.flatten().tolist(), inside.flatten().tolist(),
                            outside.flatten().tolist()):
        expected += wo * _huber(wi * (p - t), beta)
    got = smooth_l1_loss(pred, target, inside, outside, beta=beta)
    assert got.item() == pytest.approx(expected / 3)  # Caffe2 divides by the first dimension
    assert smooth_l1_loss(pred, target, inside, outside, beta, normalizer=7).item() == pytest.approx(expected / 7)


def test_smooth_l1_gradient_is_continuous_at_beta():
    beta = 1.0 / 9.0
    x = torch.tensor([beta - 1e-7, beta + 1e-7], dtype=torch.float64, requires_grad=True)
    ones = torch.ones(2, dtype=torch.float64)
    smooth_l1_loss(x, torch.zeros(2, dtype=torch.float64), ones, ones, beta, normalizer=1).backward()
    torch.testing.assert_close(x.grad, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sigmoid_ce_ignores_minus_one_and_normalises():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, -1, 0])

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    total = bce(2.0, 1) + bce(-1.0, 0) + bce(3.0, 0)
    assert sigmoid_cross_entropy_loss(logits, labels).item() == pytest.approx(total / 3)
    assert sigmoid_cross_entropy_loss(logits, labels, normalizer=256).item() == pytest.approx(total / 256)
    assert sigmoid_cross_entropy_loss(logits, torch.full((4,), -1)).item() == 0.0


def test_softmax_ce_ignores_minus_one():
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0], [5.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([1, -1, 0])

    def ce(row, y):
        return -(row[y] - math.log(sum(math.exp(v) for v in row)))

    expected = (ce([1.0, 2.0], 1) + ce([5.0, 5.0], 0)) / 2
    assert softmax_cross_entropy_loss(logits, labels).item() == pytest.approx(expected)
    empty = softmax_cross_entropy_loss(logits, torch.full((3,), -1))
    assert empty.item() == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        smooth_l1_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shape"):
        sigmoid_cross_entropy_loss(torch.zeros(3), torch.zeros(4))
