"""tools/compare_detectron2.py without detectron2, and the detection differences it reports (hand values)."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

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
