"""tools/compare_detectron2.py against a detectron2 build (skipped without one): detectron2's DefaultPredictor and
pydetectron's detectron2 mode on the same YAML (configs/detectron2/), the same seeded random weights calibrated so
that detections exist, and two small generated images must give the same detections."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("detectron2")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import compare_detectron2  # noqa: E402

pytestmark = pytest.mark.slow
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "detectron2")
SMALL = ["--generated", "2", "--size", "224x288", "INPUT.MIN_SIZE_TEST", "224", "INPUT.MAX_SIZE_TEST", "320"]


@pytest.mark.parametrize("config", [
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
    "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
])
def test_detections_equal_detectron2s(config, tmp_path, capsys):
    weights = tmp_path / "random.pth"
    code = compare_detectron2.main(["--config-file", os.path.join(CONFIGS, config), "--random-init", "--seed", "3",
                                    "--save-weights", str(weights)] + SMALL)
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().endswith("AGREE") and weights.is_file()
    rows = [line.split() for line in out.splitlines() if line.startswith("generated")]
    assert len(rows) == 2 and all(int(row[1]) > 0 for row in rows), out  # detectron2 detected something
