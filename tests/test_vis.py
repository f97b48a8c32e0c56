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


def test_single_evaluation_point_is_drawn_where_it_belongs(tmp_path):
    """One evaluation (the usual end-of-training one) draws its dots inside the evaluation panel: before, a
    single step gave an empty frame with an axis '800 800 800'."""
    import cv2

    records = [{"step": s, "loss": 1.0 / s, "lr": 0.01} for s in range(20, 801, 20)]
    records.append({"step": 800, "eval/bbox/AP": 0.4, "eval/bbox/AR": 0.8})
    draw_training_curves(records, tmp_path / "curves.png")
    panel = cv2.imread(str(tmp_path / "curves.png"))[-500:]  # the evaluation panel, 900 x 500
    left, right, top, bottom = 70, 900 - 170, 40, 500 - 40  # the plot frame draw_curves uses
    expected_x = (left + right) / 2  # a lone step is centred
    for colour, value in zip(palette(2), (0.4, 0.8)):  # series sorted by name: AP, AR; y from 0 to 0.8
        inside = np.abs(panel[top:bottom + 1, left + 1:right].astype(int) - colour).sum(axis=2) < 30
        ys, xs = np.nonzero(inside)
        assert len(xs) >= 20, "the point is not drawn"
        assert abs(xs.mean() + left + 1 - expected_x) < 2
        assert abs(ys.mean() + top - (bottom - value / 0.8 * (bottom - top))) < 3


def test_fpn_level_losses_are_drawn_as_their_sums():
    from pydetectron.vis import training_curve_panels

    records = [{"step": s, "loss": 1.0, "loss_rpn_cls_fpn2": 0.1 * s, "loss_rpn_cls_fpn3": 0.2,
                "loss_rpn_bbox_fpn2": 0.3, "loss_rpn_bbox_fpn3": 0.4, "loss_cls": 0.5, "lr": 0.01}
               for s in (20, 40)]
    losses = dict(training_curve_panels(records))["training losses"]
    assert list(losses) == ["loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls"]
    assert np.allclose(losses["loss_rpn_cls"], [(20, 2.2), (40, 4.2)])
    assert np.allclose(losses["loss_rpn_bbox"], [(20, 0.7), (40, 0.7)])
