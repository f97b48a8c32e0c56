"""Drawing: pixels change where detections are, and only there; all three output formats are written."""

import numpy as np
import pytest
import torch

from pydetectron.vis import draw_detections, draw_training_curves, palette, save_image


def _detections():
    masks = torch.zeros(2, 60, 80, dtype=torch.uint8)
    masks[0, 12:30, 12:30] = 1
    return {
        "boxes": torch.tensor([[10.0, 10.0, 31.0, 31.0], [50.0, 40.0, 70.0, 55.0]]),
        "scores": torch.tensor([0.95, 0.3]),
        "classes": torch.tensor([1, 2]),
        "masks": masks,
        "keypoints": torch.tensor([[[12.0, 12.0, 5.0], [28.0, 28.0, 5.0], [20.0, 14.0, 0.0]]] * 2),
    }


def test_drawn_pixels_are_where_the_confident_detection_is():
    image = np.full((60, 80, 3), 100, np.uint8)
    drawn = draw_detections(image, _detections(), ["__background__", "square", "circle"], thresh=0.5,
                            skeleton=[[1, 2], [2, 3]])
    assert (image == 100).all(), "the input must not be modified"
    changed = (drawn != image).any(axis=2)
    assert changed[20, 20] and changed[10, 20]  # mask interior and the box edge
    assert not changed[45:55, 52:68].any(), "a detection under the threshold was drawn"
    assert not changed[40:, :45].any()


def test_palette_is_stable_and_distinct():
    assert palette(5) == palette(5)
    assert len(set(palette(20))) == 20


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".pdf"])
def test_save_image_formats(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    save_image(np.zeros((20, 30, 3), np.uint8), path)
    assert path.stat().st_size > 0
    if suffix == ".pdf":
        assert path.read_bytes().startswith(b"%PDF")


def test_training_curves_image(tmp_path):
    records = [{"step": s, "loss": 2.0 / s, "loss_cls": 1.0 / s, "lr": 0.01} for s in range(1, 30)]
    records.append({"step": 29, "eval/bbox/AP": 0.4})
    draw_training_curves(records, tmp_path / "curves.png")
    import cv2

    picture = cv2.imread(str(tmp_path / "curves.png"))
    assert picture.shape[0] == 1500 and (picture < 250).any()


def test_training_accuracy_gets_its_own_panel(tmp_path):
    import cv2

    records = [{"step": s, "loss": 2.0 / s, "accuracy_cls": 1 - 1.0 / s, "lr": 0.01} for s in range(1, 30)]
    draw_training_curves(records, tmp_path / "curves.png")
    assert cv2.imread(str(tmp_path / "curves.png")).shape[0] == 1500  # losses, accuracy, lr
