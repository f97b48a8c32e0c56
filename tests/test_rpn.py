"""RPN pieces: FPN level mapping, collecting proposals over levels."""

import math

import pytest
import torch

from pydetectron.modeling.fpn_levels import collect_proposals, distribute_rois, map_rois_to_fpn_levels


def _square(side):
    return [0.0, 0.0, side - 1.0, side - 1.0]  # inclusive pixels: `side` wide


@pytest.mark.parametrize(
    "side,level",
    [(224, 4), (112, 3), (448, 5), (223, 3), (447, 4), (8, 2), (2000, 5), (1, 2)],
)
def test_level_table(side, level):
    boxes = torch.tensor([_square(side)])
    assert map_rois_to_fpn_levels(boxes, 2, 5, 224, 4).tolist() == [level]


def test_level_formula_vs_float64_reference():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    wh = torch.rand(200, 2, generator=g) * 600
    boxes = torch.cat((xy, xy + wh), 1)
    expected = []
    for b in boxes.double().tolist():
        s = math.sqrt((b[2] - b[0] + 1) * (b[3] - b[1] + 1))
        expected.append(min(max(math.floor(4 + math.log2(s / 224 + 1e-6)), 2), 5))
    assert map_rois_to_fpn_levels(boxes, 2, 5).tolist() == expected


def test_distribute_and_restore():
    sides = [300, 10, 224, 500, 100, 30]
    rois = torch.tensor([[float(i % 2)] + _square(s) for i, s in enumerate(sides)])
    levels = map_rois_to_fpn_levels(rois[:, 1:], 2, 5)
    per_level, restore = distribute_rois(rois, levels, 2, 5)
    # levels: 300 -> 4, 10 -> 2, 224 -> 4, 500 -> 5, 100 -> 2, 30 -> 2
    assert [p.shape[0] for p in per_level] == [3, 0, 2, 1]
    assert per_level[0][:, 0].tolist() == [1.0, 0.0, 1.0]  # input order kept inside a level
    torch.testing.assert_close(torch.cat(per_level)[restore], rois)


def test_collect_is_over_the_whole_batch():
    rois = [torch.tensor([[0.0, 0, 0, 5, 5], [1.0, 0, 0, 6, 6]]), torch.tensor([[0.0, 1, 1, 9, 9]])]
    scores = [torch.tensor([0.2, 0.9]), torch.tensor([0.5])]
    got_rois, got_scores = collect_proposals(rois, scores, top_n=2)
    assert got_scores.tolist() == pytest.approx([0.9, 0.5])
    assert got_rois[:, 0].tolist() == [1.0, 0.0]
    assert collect_proposals(rois, scores, top_n=0)[0].shape[0] == 3
