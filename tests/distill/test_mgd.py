"""MGD against values worked out by hand: costs, assignments (tiled, shaved, sparse), reducers, margins,
the loss, the update schedule and the state_dict of the matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pydetectron.distill import MGD, bn_margins, channel_cost, distillation_loss, solve_matching
from pydetectron.distill.reducers import absolute_max_pooling, random_drop, simple_max_pooling, sparse_matching

R2 = math.sqrt(2.0)


def _maps(*rows):
    """(1, C, 1, W) features: one spatial row per channel."""
    return torch.tensor(rows, dtype=torch.float32).reshape(1, len(rows), 1, -1)


# Student channels point along x and y; teacher channels along x, y, x+y and x-y (then, shaved, x again).
STUDENT = _maps((1.0, 0.0), (0.0, 1.0))
TEACHER = _maps((1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, -1.0))
# 2 - 2 cos: s_x vs (t_x, t_y, t_x+y, t_x-y) and s_y vs the same
HAND_COST = np.array([[0.0, 2.0, 2 - R2, 2 - R2],
                      [2.0, 0.0, 2 - R2, 2 + R2]])


def _pairs(matching, sc=2):
    """Teacher channels taken by each student channel (rows g * sc + j belong to student channel j)."""
    m = np.asarray(matching).reshape(-1, sc)
    return [sorted(m[:, j].tolist()) for j in range(sc)]


def test_channel_cost_is_two_minus_two_cosine_summed_over_images():
    cost = channel_cost(torch.cat([STUDENT, 3 * STUDENT]), torch.cat([TEACHER, TEACHER]))
    np.testing.assert_allclose(cost.numpy(), 2 * HAND_COST, atol=1e-12)  # scale-free, summed over 2 images


def test_tiled_matching_gives_each_student_channel_tc_over_sc_teacher_channels():
    # Totals by hand: {x: t_x, t_x-y; y: t_y, t_x+y} = 4 - 2 sqrt2 beats {x: t_x, t_x+y; y: t_y, t_x-y} = 4
    matching = solve_matching(2 * HAND_COST, num_images=2, tiled=True)
    assert matching.shape == (4,)
    assert _pairs(matching) == [[0, 3], [1, 2]]


def test_tiled_matching_shaves_teacher_channels_beyond_a_multiple_of_the_student():
    # t4 (along x) would be the perfect second partner of s_x, but 5 // 2 * 2 = 4 rows only see t0..t3 (MGD's shave)
    teacher = torch.cat([TEACHER, _maps((1.0, 0.0))], dim=1)
    matching = solve_matching(channel_cost(STUDENT, teacher).numpy(), num_images=1, tiled=True)
    assert _pairs(matching) == [[0, 3], [1, 2]]


def test_sparse_matching_pairs_each_student_channel_once():
    assert solve_matching(HAND_COST, num_images=1, tiled=False).tolist() == [0, 1]


def test_matching_refuses_a_wider_student_and_no_images():
    with pytest.raises(ValueError, match="more than the teacher"):
        solve_matching(HAND_COST.T, num_images=1, tiled=True)
    with pytest.raises(ValueError, match="at least one image"):
        solve_matching(HAND_COST, num_images=0, tiled=True)


def test_bn_margins_by_hand():
    def phi(x):
        return 0.5 * (1 + math.erf(x / R2))

    gamma = torch.tensor([1.0, -2.0, 1.0])
    beta = torch.tensor([0.0, 1.0, 5.0])
    # N(0, 1): -E[x | x < 0]... MGD's value m - s pdf(m/s) / Phi(-m/s): -(1/sqrt(2 pi)) / 0.5
    expected = [
        -2 / math.sqrt(2 * math.pi),
        1 - 2 * math.exp(-0.125) / math.sqrt(2 * math.pi) / phi(-0.5),  # |gamma| = 2, m / s = 0.5
        -3.0,  # Phi(-5) < 0.001: MGD's -3 s
    ]
    np.testing.assert_allclose(bn_margins(gamma, beta).numpy(), expected, rtol=1e-6)


TEACHER_VALUES = _maps((1.0, -4.0), (-0.5, 0.2), (3.0, -0.1), (-2.0, 0.5))
MATCHING = torch.tensor([0, 1, 3, 2])  # s0 <- {t0, t3}, s1 <- {t1, t2}
MARGINS = torch.tensor([-3.0, -1.5, -6.0, -1.0]).reshape(1, 4, 1, 1)


def test_absolute_max_pooling_by_hand():
    target, margins = absolute_max_pooling(TEACHER_VALUES, MARGINS, MATCHING, 2)
    # s0: |1| < |-2| -> -2, |-4| > |0.5| -> -4; s1: |-0.5| < |3| -> 3, |0.2| > |-0.1| -> 0.2; margins averaged
    torch.testing.assert_close(target, _maps((-2.0, -4.0), (3.0, 0.2)))
    torch.testing.assert_close(margins.flatten(), torch.tensor([-2.0, -3.75]))


def test_simple_max_pooling_by_hand():
    target, margins = simple_max_pooling(TEACHER_VALUES, MARGINS, MATCHING, 2)
    torch.testing.assert_close(target, _maps((1.0, 0.5), (3.0, 0.2)))
    torch.testing.assert_close(margins.flatten(), torch.tensor([-1.0, -1.5]))


def test_random_drop_picks_among_the_matched_channels():
    torch.manual_seed(0)
    teacher = TEACHER_VALUES.expand(64, -1, -1, -1)
    target, margins = random_drop(teacher, MARGINS, MATCHING, 2)
    # s0 <- {t0, t3}, s1 <- {t1, t2}: the values each position may take
    allowed = [[{1.0, -2.0}, {-4.0, 0.5}], [{-0.5, 3.0}, {0.2, -0.1}]]
    for j in range(2):
        for p in range(2):
            values = {round(v, 5) for v in target[:, j, 0, p].tolist()}
            assert values == allowed[j][p], (j, p)  # 64 images: both choices drawn
    assert margins[0, 0].item() in (-3.0, -1.0) and margins[0, 1].item() in (-1.5, -6.0)


def test_sparse_matching_reducer_takes_the_matched_channel():
    target, margins = sparse_matching(TEACHER_VALUES, MARGINS, torch.tensor([2, 0]), 2)
    torch.testing.assert_close(target, _maps((3.0, -0.1), (1.0, -4.0)))
    torch.testing.assert_close(margins.flatten(), torch.tensor([-6.0, -3.0]))


def test_distillation_loss_counts_above_target_or_positive_target():
    student = _maps((-1.0, -3.0))
    # target max(-2, m=-2), max(-4, -2) = (-2, -2): -1 > -2 counts 1; -3 < -2 and target <= 0 does not
    assert distillation_loss(student, _maps((-2.0, -4.0)), torch.tensor(-2.0).reshape(1, 1, 1, 1)).item() == 1.0
    # a positive target always counts, even above the student: 1.5^2 + 3.25^2
    loss = distillation_loss(student, _maps((0.5, 0.25)), torch.tensor(-9.0).reshape(1, 1, 1, 1))
    assert loss.item() == 2.25 + 10.5625


def _mgd(reducer="amp", **kwargs):
    # Teacher BN with beta = 10: margins -3 |gamma| = (-3, -1.5, -6, -1), as MARGINS
    gamma = torch.tensor([1.0, 0.5, 2.0, 1.0 / 3.0])
    return MGD([4], [2], [4], [(gamma, torch.full((4,), 10.0))], reducer=reducer, loss_factors=[2.0],
               batch_divisor=3, student_norm_groups=2, **kwargs)


def _matched(reducer="amp"):
    method = _mgd(reducer)
    method.track([STUDENT], [TEACHER])
    method.track([2 * STUDENT], [TEACHER])
    method.update_matching()
    return method


def test_mgd_matching_margins_and_loss_by_hand():
    method = _matched()
    assert _pairs(method.matching(4)) == [[0, 3], [1, 2]]
    torch.testing.assert_close(method.margins(4).flatten(), MARGINS.flatten())
    with torch.no_grad():
        method.student_norms["c4"].bias.copy_(torch.tensor([-2.0, 0.0]))
    # GroupNorm over (100, -100) gives (1, -1) up to eps: student s0 = (-1, -3), s1 = (-1, 1)
    student = _maps((100.0, -100.0), (-100.0, 100.0))
    losses = method.loss([student], [TEACHER_VALUES])
    assert list(losses) == ["loss_distill_c4"]
    # s0 vs target (-2, -2): 1 + 0 (masked); s1 vs (3, 0.2), both counted: 16 + 0.64; / factor 2 / divisor 3
    assert losses["loss_distill_c4"].item() == pytest.approx(17.64 / 6, rel=1e-6)


def test_mgd_loss_needs_a_matching_and_matching_features():
    method = _mgd()
    with pytest.raises(RuntimeError, match="no channel matching"):
        method.loss([STUDENT], [TEACHER])
    with pytest.raises(ValueError, match="C4"):
        _matched().loss([STUDENT], [TEACHER[:, :3]])


def test_mgd_sparse_reducer_matches_one_teacher_channel_each():
    method = _matched("sm")
    assert method.matching(4).tolist() == [0, 1]


def test_mgd_update_schedule():
    method = _mgd(update_freq=(5, 31), update_slow_step=20, update_iter=7)
    assert method.batches_per_matching == 8
    assert method.matching_due(0) and method.matching_due(3)  # no matching yet: before the first step / resume
    method.track([STUDENT], [TEACHER])
    method.update_matching()
    due = [it for it in range(0, 70) if method.matching_due(it)]
    assert due == [5, 10, 15, 31, 62]


def test_mgd_state_dict_round_trip_restores_the_matching():
    method = _matched()
    state = method.state_dict()
    assert {"margin_c4", "matching_c4", "matched", "student_norms.c4.weight"} <= set(state)
    fresh = _mgd()
    assert fresh.matching_due(0) and fresh.matching(4).tolist() == [-1] * 4
    fresh.load_state_dict(state)
    assert torch.equal(fresh.matching(4), method.matching(4)) and bool(fresh.matched)
    assert not fresh.matching_due(1)
    student = _maps((100.0, -100.0), (-100.0, 100.0))
    assert fresh.loss([student], [TEACHER_VALUES]) == method.loss([student], [TEACHER_VALUES])


def test_mgd_refuses_bad_arguments():
    gamma_beta = [(torch.ones(4), torch.zeros(4))]
    with pytest.raises(ValueError, match="unknown MGD reducer 'max'"):
        MGD([4], [2], [4], gamma_beta, reducer="max", loss_factors=[1.0], batch_divisor=1)
    with pytest.raises(ValueError, match="teacher BN has 4 channels"):
        MGD([4], [2], [8], gamma_beta, loss_factors=[1.0], batch_divisor=1)
    with pytest.raises(ValueError, match="must align"):
        MGD([4], [2], [4], gamma_beta, loss_factors=[1.0, 2.0], batch_divisor=1)
