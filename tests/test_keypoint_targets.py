"""Keypoint R-CNN targets: heatmap cell labels for hand-picked keypoints, keypoint RoI selection."""

import pytest
import torch

from pydetectron.modeling.targets.fast_rcnn import LabelledBoxes
from pydetectron.modeling.targets.keypoint import keypoint_rcnn_targets, keypoints_to_heatmap_labels


def test_heatmap_labels_by_hand():
    # RoI [0, 0, 16, 16] on an 8x8 heatmap: cell = floor(coordinate / 2).
    roi = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    kps = torch.tensor(
        [
            [
                [0.0, 0.0, 2],  # top-left corner -> cell (0, 0)
                [5.9, 3.0, 1],  # x cell 2, y cell 1 -> 1 * 8 + 2
                [16.0, 7.0, 2],  # exactly on the right edge -> x cell 7
                [9.0, 16.0, 2],  # exactly on the bottom edge -> y cell 7
                [15.99, 15.99, 2],  # just inside -> (7, 7)
                [-0.01, 4.0, 2],  # left of the RoI -> invalid
                [16.5, 4.0, 2],  # right of the RoI -> invalid
                [4.0, 4.0, 0],  # not labelled -> invalid
            ]
        ]
    )
    loc, w = keypoints_to_heatmap_labels(kps, roi, 8)
    assert w.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert loc.tolist() == [[0, 10, 3 * 8 + 7, 7 * 8 + 4, 63, 0, 0, 0]]


def test_heatmap_labels_scale_with_the_roi_size():
    rois = torch.tensor([[10.0, 20.0, 66.0, 48.0]])  # 56 x 28 -> x scale 1, y scale 2 on a 56 heatmap
    kps = torch.tensor([[[30.2, 25.4, 1], [65.99, 47.9, 1]]])
    loc, w = keypoints_to_heatmap_labels(kps, rois, 56)
    assert w.tolist() == [[1, 1]]
    assert loc.tolist() == [[10 * 56 + 20, 55 * 56 + 55]]


def _labelled(boxes, overlaps, gt_inds):
    return LabelledBoxes(
        boxes=torch.tensor(boxes, dtype=torch.float32),
        max_overlaps=torch.tensor(overlaps, dtype=torch.float32),
        max_classes=torch.ones(len(boxes), dtype=torch.int64),
        gt_inds=torch.tensor(gt_inds),
        im_scale=1.0,
    )


def test_keypoint_rois_need_fg_overlap_and_a_visible_keypoint_inside():
    gt_kps = torch.tensor([[[12.0, 12.0, 2], [30.0, 30.0, 2], [50.0, 50.0, 0]]])
    lab = _labelled(
        [
            [10, 10, 40, 40],  # gt box: both visible keypoints inside -> kept
            [20, 20, 60, 60],  # overlap 0.6, keypoint (30, 30) inside -> kept
            [45, 45, 60, 60],  # overlap 0.7 but only the invisible keypoint inside -> dropped
            [10, 10, 30, 30],  # overlap 0.4 < FG_THRESH -> dropped
            [0, 0, 5, 5],  # no gt -> dropped
        ],
        [1.0, 0.6, 0.7, 0.4, 0.0],
        [0, 0, 0, 0, -1],
    )
    entry = {"gt_keypoints": gt_kps.numpy()}
    t = keypoint_rcnn_targets([lab], [entry], 4, 0.5, 16, loss_normalizer_denominator=6.0, min_keypoint_count=2)
    assert sorted(t.rois.tolist()) == [[0, 10, 10, 40, 40], [0, 20, 20, 60, 60]]
    # gt box: (12, 12) -> cell (0, 0); (30, 30) -> floor(20 * 4 / 30) = 2 -> 2 * 4 + 2; third invisible.
    rows = {tuple(r[1:].tolist()): i for i, r in enumerate(t.rois)}
    assert t.locations[rows[(10.0, 10.0, 40.0, 40.0)]].tolist() == [0, 10, 0]
    assert t.weights[rows[(10.0, 10.0, 40.0, 40.0)]].tolist() == [1, 1, 0]
    # Second RoI: (12, 12) lies outside it -> weight 0; (30, 30) -> floor(10 * 4 / 40) = 1 -> 1 * 4 + 1.
    assert t.locations[rows[(20.0, 20.0, 60.0, 60.0)]].tolist() == [0, 5, 0]
    assert t.weights[rows[(20.0, 20.0, 60.0, 60.0)]].tolist() == [0, 1, 0]
    assert t.normalizer == pytest.approx(3 / 6.0)
    assert t.valid  # 3 visible > 2


def test_keypoint_rois_are_capped_per_image_and_batched():
    gt_kps = torch.tensor([[[5.0, 5.0, 1]]])
    boxes = [[0, 0, 10 + i, 10 + i] for i in range(6)]
    lab = _labelled(boxes, [0.9] * 6, [0] * 6)
    entry = {"gt_keypoints": gt_kps.numpy()}
    gen = torch.Generator().manual_seed(0)
    t = keypoint_rcnn_targets([lab, lab], [entry, entry], 4, 0.5, 4, 8.0, 20, generator=gen)
    assert t.rois.shape == (8, 5) and t.locations.shape == (8, 1) and t.weights.shape == (8, 1)
    assert t.rois[:, 0].tolist() == [0.0] * 4 + [1.0] * 4
    assert len({tuple(r) for r in t.rois[:4, 1:].tolist()}) == 4  # drawn without replacement
    assert not t.valid  # 8 visible keypoints are not more than 20


def test_missing_keypoints_are_reported():
    lab = _labelled([[0, 0, 10, 10]], [1.0], [0])
    with pytest.raises(ValueError, match=r"roidb\[0\] has no gt_keypoints"):
        keypoint_rcnn_targets([lab], [{"gt_keypoints": None}], 4, 0.5, 4, 1.0, 0)
