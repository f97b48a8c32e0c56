"""RPN pieces: FPN level mapping and collection, anchor labelling, proposals, the RPN module."""

import math

import pytest
import torch

from pydetectron.boxes import encode_boxes
from pydetectron.modeling.fpn_levels import collect_proposals, distribute_rois, map_rois_to_fpn_levels
from pydetectron.modeling.targets.rpn import RPNSampling, label_anchors, rpn_gt_boxes, rpn_targets


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


# ---------------------------------------------------------------------------------------------------------
# Anchor labelling (targets/rpn.py)

ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 9.0, 9.0],  # IoU 1 with gt0 -> positive
        [1.0, 0.0, 10.0, 9.0],  # IoU 90/110 = 0.82 with gt0 -> positive
        [5.0, 0.0, 14.0, 9.0],  # IoU 50/150 = 0.33 with gt0 -> ignored (between thresholds)
        [20.0, 20.0, 29.0, 29.0],  # IoU 100/196 = 0.51 with gt1: gt1's best anchor -> positive
        [30.0, 30.0, 39.0, 39.0],  # IoU 4/292 with gt1 -> negative
        [35.0, 35.0, 44.0, 44.0],  # sticks out of the 40 x 40 image
    ]
)
GT = torch.tensor([[0.0, 0.0, 9.0, 9.0], [18.0, 18.0, 31.0, 31.0]])


def test_label_anchors_hand_made():
    labels, targets, inside, outside = label_anchors(ANCHORS, GT, 40, 40, RPNSampling())
    assert labels.tolist() == [1, 1, -1, 1, 0, -1]
    expected_targets = torch.zeros(6, 4)
    expected_targets[[0, 1, 3]] = encode_boxes(ANCHORS[[0, 1, 3]], GT[[0, 0, 1]], (1, 1, 1, 1))
    torch.testing.assert_close(targets, expected_targets)
    assert inside[:, 0].tolist() == [1, 1, 0, 1, 0, 0]
    # 4 labelled anchors in this image: outside weight 1/4 on positives
    torch.testing.assert_close(outside[:, 0], torch.tensor([0.25, 0.25, 0, 0.25, 0, 0]))


def test_label_anchors_keeps_straddling_anchors_with_minus_one():
    labels, _, _, outside = label_anchors(ANCHORS, GT, 40, 40, RPNSampling(straddle_thresh=-1))
    assert labels.tolist() == [1, 1, -1, 1, 0, 0]
    assert outside[0, 0].item() == pytest.approx(0.2)


def test_label_anchors_subsamples_with_seeded_generator():
    params = RPNSampling(batch_size_per_im=2, fg_fraction=0.5)  # at most 1 positive, 1 negative
    runs = [label_anchors(ANCHORS, GT, 40, 40, params, torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()
    assert (runs[0] == 1).sum() == 1 and (runs[0] == 0).sum() == 1
    assert runs[0][[2, 5]].tolist() == [-1, -1]
    seen = {int(torch.nonzero(label_anchors(ANCHORS, GT, 40, 40, params, torch.Generator().manual_seed(s))[0] == 1))
            for s in range(30)}
    assert seen == {0, 1, 3}  # every positive can be the one kept


def test_negatives_are_drawn_with_replacement_up_to_the_budget():
    anchors = torch.tensor([[x, 0.0, x + 3, 3.0] for x in range(0, 400, 4)], dtype=torch.float32)
    params = RPNSampling(batch_size_per_im=64)
    labels = label_anchors(anchors, torch.zeros(0, 4), 10, 1000, params, torch.Generator().manual_seed(0))[0]
    negatives = int((labels == 0).sum())
    assert (labels == 1).sum() == 0
    assert 40 < negatives <= 64  # 64 draws from 100 candidates, some repeated


def test_rpn_targets_drop_crowd_boxes():
    entry = {"boxes": GT.numpy(), "gt_classes": [1, 2], "is_crowd": [False, True]}
    assert rpn_gt_boxes(entry, 0, torch.device("cpu")).tolist() == [GT[0].tolist()]
    im_info = torch.tensor([[40.0, 40.0, 1.0], [40.0, 40.0, 1.0]])
    t = rpn_targets(ANCHORS, [entry, {"boxes": GT, "gt_classes": [1, 1], "is_crowd": [0, 0]}], im_info,
                    RPNSampling())
    assert t.labels.tolist() == [[1, 1, -1, 0, 0, -1], [1, 1, -1, 1, 0, -1]]
    with pytest.raises(KeyError, match="is_crowd"):
        rpn_targets(ANCHORS, [{"boxes": GT, "gt_classes": [1, 1]}], im_info[:1], RPNSampling())
