"""Proposal recall as Detectron's evaluate_box_proposals computes it, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pydetectron.evaluation.proposal_eval import box_proposal_recall, evaluate_proposals, greedy_coverage


def test_greedy_matching_retires_each_proposal_once():
    # P0 covers G0 at 0.9 and G1 at 0.8; P1 covers G1 at 0.6. G0 is matched first (best), taking P0 with it,
    # so G1 gets 0.6, not the 0.8 a per-gt maximum would give.
    overlaps = np.array([[0.9, 0.8], [0.0, 0.6]])
    np.testing.assert_allclose(greedy_coverage(overlaps), [0.9, 0.6])
    np.testing.assert_allclose(greedy_coverage(np.array([[0.7, 0.2, 0.1]])), [0.7, 0.0, 0.0])


def _roidb():
    """Image 1: a small gt (area 100) and a large one (area 10 000); three proposals covering them at IoU 1.0,
    0.92 and 0.5. A crowd box and a proposal row are not gt. Image 2: one more gt, no proposals."""
    image1 = {
        "boxes": np.array([[0, 0, 9, 9], [20, 20, 119, 119], [50, 0, 59, 9]], np.float32),
        "gt_classes": np.array([1, 2, 1]), "is_crowd": np.array([False, False, True]),
        "seg_areas": np.array([100.0, 10000.0, 100.0]),
        "proposals": np.array([[0, 0, 9, 9], [20, 20, 119, 111], [0, 0, 4, 9]], np.float32),
    }
    image2 = {"boxes": np.array([[0, 0, 49, 49]], np.float32), "gt_classes": np.array([1]),
              "is_crowd": np.array([False]), "seg_areas": np.array([2500.0]), "proposals": np.zeros((0, 4))}
    return [image1, image2]


def test_average_recall_by_area_and_limit():
    roidb = _roidb()
    # covered IoUs 1.0 and 0.92 out of 3 gt: 2/3 at thresholds 0.50..0.90, 1/3 at 0.95
    assert box_proposal_recall(roidb)["ar"] == pytest.approx((9 * 2 / 3 + 1 / 3) / 10)
    assert box_proposal_recall(roidb)["num_pos"] == 3
    assert box_proposal_recall(roidb, limit=1)["ar"] == pytest.approx(1 / 3)  # only the IoU-1 proposal
    assert box_proposal_recall(roidb, area="small")["ar"] == pytest.approx(1.0)
    assert box_proposal_recall(roidb, area="medium")["ar"] == pytest.approx(0.0)  # image 2's gt, no proposals
    assert box_proposal_recall(roidb, area="large")["ar"] == pytest.approx(0.9)
    assert np.isnan(box_proposal_recall(roidb[1:], area="large")["ar"])  # no gt in the range, as Detectron


def test_detectron_figure_names_and_bad_area():
    lines = []
    metrics = evaluate_proposals(_roidb(), "toy", lines.append)
    assert list(metrics) == ["AR@100", "ARs@100", "ARm@100", "ARl@100", "AR@1000", "ARs@1000", "ARm@1000",
                             "ARl@1000"]
    assert any(line.startswith("AR@100  : 0.633") for line in lines)
    with pytest.raises(ValueError, match="unknown area range 'tiny'"):
        box_proposal_recall(_roidb(), area="tiny")
