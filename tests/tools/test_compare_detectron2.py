"""tools/compare_detectron2.py without detectron2, and the detection differences it reports (hand values)."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from pydetectron.utils.detection_diff import box_iou, compare_detections

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import compare_detectron2  # noqa: E402


def test_without_detectron2_it_stops_saying_how_to_build_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # import detectron2 -> ImportError
    with pytest.raises(SystemExit) as err:
        compare_detectron2.main(["--config-file", "x.yaml", "--random-init", "--generated", "1"])
    assert "detectron2 is not importable" in str(err.value) and "FORCE_CUDA=0 pip install" in str(err.value)


def test_box_iou_without_plus_one():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[50 / 150, 0.0]])


def test_differences_over_pairs_and_unpaired_counts():
    mask = np.zeros((3, 4, 4), np.uint8)
    mask[0, :2], mask[1, 2:], mask[2, 0] = 1, 1, 1
    ref = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32),
           "scores": np.array([0.9, 0.8, 0.7]), "classes": np.array([1, 2, 3]), "masks": mask,
           "keypoints": np.zeros((3, 2, 3))}
    ours_mask = mask[[1, 0]].copy()
    ours_mask[1, 0, 0] = 0  # one of 16 pixels differs for the first reference detection
    ours = {"boxes": np.array([[20, 20, 30.5, 30], [0.25, 0, 10, 10]], np.float32), "scores": np.array([0.8, 0.85]),
            "classes": np.array([2, 1]), "masks": ours_mask, "keypoints": np.full((2, 2, 3), 0.75)}
    diff = compare_detections(ref, ours)
    assert (diff.reference, diff.ours, diff.unpaired_reference, diff.unpaired_ours, diff.paired) == (3, 2, 1, 0, 2)
    assert diff.box == pytest.approx(0.5) and diff.score == pytest.approx(0.05)
    assert diff.mask_iou == pytest.approx(7 / 8) and diff.mask_pixels == pytest.approx(1 / 16)
    assert diff.keypoint == pytest.approx(0.75)
    other_class = dict(ours, classes=np.array([1, 2]))  # a box over the right place with the wrong class
    assert compare_detections(ref, other_class).paired == 0 and math.isnan(compare_detections(ref, other_class).box)


def test_keypoints_decoded_on_different_grids_are_reported_apart():
    # Heights 54.0002 vs 53.9999 px at scale 1: detectron2 decodes on 55 vs 54 rows (ceil), the argmax may jump.
    # Heights 20.2 vs 20.3 share ceil 21 and stay an ordinary pair, at scale 2 too (40.4 vs 40.6); 10.25 vs 10.75
    # share ceil 11 at scale 1 but become 20.5 vs 21.5 at scale 2: different grids. Widths are 10.3 (20.6) in all.
    ref = {"boxes": np.array([[0, 0, 10.3, 54.0002], [100, 100, 110.3, 120.2], [200, 200, 210.3, 210.25]], np.float32),
           "scores": np.array([0.9, 0.8, 0.7]), "classes": np.array([1, 1, 1]), "keypoints": np.zeros((3, 2, 3))}
    ours = {"boxes": np.array([[0, 0, 10.3, 53.9999], [100, 100, 110.3, 120.3], [200, 200, 210.3, 210.75]], np.float32),
            "scores": np.array([0.9, 0.8, 0.7]), "classes": np.array([1, 1, 1]),
            "keypoints": np.array([[[23.0, 0, 1]] * 2, [[0.25, 0, 1]] * 2, [[0, 0.5, 1]] * 2])}
    diff = compare_detections(ref, ours, input_scale=(1.0, 1.0))
    assert diff.keypoint_ambiguous == 2 and diff.keypoint_ambiguous_px == pytest.approx(23.0)  # 2 keypoints
    assert diff.keypoint == pytest.approx(0.5)
    doubled = compare_detections(ref, ours, input_scale=(2.0, 2.0))
    assert doubled.keypoint_ambiguous == 4 and doubled.keypoint_ambiguous_px == pytest.approx(23.0)
    assert doubled.keypoint == pytest.approx(0.25)
    together = compare_detections(ref, ours)  # no scale given: every keypoint counts as one
    assert together.keypoint_ambiguous == 0 and together.keypoint == pytest.approx(23.0)


def test_keypoints_at_tied_heatmap_maxima_are_reported_apart():
    """A heatmap symmetric about its box's vertical centre line has its maximum twice; detectron2's argmax takes
    the left one. Ours at the mirrored (right) peak is a tie, reported apart; ours on a low point is not."""
    from pydetectron.modeling.detectron2.keypoint_head import heatmaps_to_keypoints

    row = torch.tensor([0.0, 3.0, 1.0, 1.0, 3.0, 0.0])
    heatmap = (row[None, :] + torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, -1.0])[:, None])[None, None]  # (1, 1, 6, 6)
    box = torch.tensor([[10.0, 20.0, 40.5, 50.5]])  # 30.5 px: ceil 31, no grid edge
    ref_point = heatmaps_to_keypoints(heatmap, box)[0, 0, :2].double().numpy()
    mirrored = np.array([box[0, 0] + box[0, 2] - ref_point[0], ref_point[1]])
    assert abs(mirrored[0] - ref_point[0]) > 10  # two distinct peaks
    ref = {"boxes": box.numpy(), "scores": np.array([0.9]), "classes": np.array([1]),
           "keypoints": np.array([[[*ref_point, 1.0]]]), "keypoint_heatmaps": heatmap.numpy()}
    tied = dict(ref, keypoints=np.array([[[*mirrored, 1.0]]]))
    diff = compare_detections(ref, tied, input_scale=(1.0, 1.0))
    assert diff.keypoint_ambiguous == 1 and diff.keypoint_ambiguous_px == pytest.approx(abs(mirrored[0] - ref_point[0]))
    assert math.isnan(diff.keypoint)
    low = dict(ref, keypoints=np.array([[[box[0, 0] + 2.0, box[0, 3] - 2.0, 1.0]]]))
    off = compare_detections(ref, low, input_scale=(1.0, 1.0))
    assert off.keypoint_ambiguous == 0 and off.keypoint > 10


def test_input_scale_is_detectron2s_test_resize():
    class Cfg:
        class INPUT:
            MIN_SIZE_TEST, MAX_SIZE_TEST = 800, 1333

    # 480x640 -> 800x1067 (ResizeShortestEdge: 640 * 800 / 480 = 1066.67 rounds half up to 1067)
    sx, sy = compare_detectron2.input_scale(Cfg, np.zeros((480, 640, 3), np.uint8))
    assert sx == pytest.approx(1067 / 640) and sy == pytest.approx(800 / 480)
