"""Mask R-CNN targets: polygon / bitmap rasterisation inside RoIs, gt matching, class-specific layout."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from pydetectron.modeling.targets.mask import (
    bitmap_to_mask_in_boxes,
    expand_to_class_specific,
    mask_rcnn_targets,
    polygons_to_mask_in_box,
)

M = 14


def _entry(segms, classes, crowd=None):
    g = len(segms)
    return {
        "gt_classes": np.asarray(classes, dtype=np.int64),
        "is_crowd": np.zeros(g, bool) if crowd is None else np.asarray(crowd, bool),
        "segms": segms,
        "boxes": np.zeros((g, 4), np.float32),
        "image_id": 7,
    }


def _reference_raster(polys, box, m):
    """pycocotools rasterisation of the polygons mapped into `box` (float64, computed here)."""
    x1, y1, x2, y2 = box
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    scaled = []
    for p in polys:
        q = np.array(p, dtype=np.float64)
        q[0::2] = (q[0::2] - x1) * m / w
        q[1::2] = (q[1::2] - y1) * m / h
        scaled.append(list(q))
    rle = mask_util.merge(mask_util.frPyObjects(scaled, m, m))
    return mask_util.decode(rle).astype(np.int32)


def test_polygon_target_matches_pycocotools_and_class_block():
    # A triangle and a square hole-free quad of one instance; RoI sides 28 -> exact scale 0.5.
    polys = [[12.0, 22.0, 36.0, 25.0, 20.0, 46.0], [30.0, 40.0, 38.0, 40.0, 38.0, 48.0, 30.0, 48.0]]
    box = (10.0, 20.0, 38.0, 48.0)
    rois = torch.tensor([[0.0, *box], [0.0, 100.0, 100.0, 120.0, 120.0]])
    labels = torch.tensor([2, 0])
    out = mask_rcnn_targets(rois, labels, [_entry([polys], [2])], [1.0], M, num_classes=3)
    expected = _reference_raster(polys, box, M)
    assert expected.sum() > 20  # the test shape really covers cells
    assert out.rois.tolist() == [[0.0, *box]]
    assert out.roi_has_mask.tolist() == [True, False]
    t = out.targets.view(1, 3, M, M)
    assert torch.equal(t[0, 2], torch.from_numpy(expected).to(t.dtype))
    assert (t[0, :2] == -1).all()


def test_rois_match_the_gt_whose_segmentation_box_overlaps_most_ignoring_crowd():
    left = [[0.0, 0.0, 20.0, 0.0, 20.0, 20.0, 0.0, 20.0]]  # tight box [0, 0, 20, 20]
    right = [[30.0, 0.0, 50.0, 0.0, 50.0, 20.0, 30.0, 20.0]]  # [30, 0, 50, 20]
    crowd = [[0.0, 0.0, 50.0, 0.0, 50.0, 20.0, 0.0, 20.0]]  # covers both, but crowd is never a mask target
    entry = _entry([left, right, crowd], [1, 2, 1], crowd=[False, False, True])
    # Image 1 holds the RoIs; image 0 has only a background RoI (no fg -> its first bg stands in).
    rois = torch.tensor(
        [[0.0, 0, 0, 10, 10], [1.0, 28, 0, 50, 20], [1.0, 60, 60, 70, 70], [1.0, 0, 0, 22, 20]]
    )
    labels = torch.tensor([0, 2, 0, 1])
    out = mask_rcnn_targets(rois, labels, [_entry([left], [1]), entry], [1.0, 2.0], M, num_classes=3)
    assert out.roi_has_mask.tolist() == [True, True, False, True]
    assert out.rois[:, 0].tolist() == [0.0, 1.0, 1.0]
    t = out.targets.view(3, 3, M, M)
    assert (t[0] == -1).all()  # background stand-in: everything ignored
    assert torch.equal(t[1, 2], torch.from_numpy(_reference_raster(right, (28, 0, 50, 20), M)).to(t.dtype))
    assert torch.equal(t[2, 1], torch.from_numpy(_reference_raster(left, (0, 0, 22, 20), M)).to(t.dtype))
    assert (t[1, :2] == -1).all() and (t[2, 0] == -1).all() and (t[2, 2] == -1).all()


def test_class_agnostic_targets_keep_one_block():
    polys = [[0.0, 0.0, 14.0, 0.0, 14.0, 14.0]]
    rois = torch.tensor([[0.0, 0, 0, 14, 14]])
    out = mask_rcnn_targets(rois, torch.tensor([3]), [_entry([polys], [3])], [1.0], M, 5, cls_specific=False)
    assert out.targets.shape == (1, M * M)
    assert torch.equal(out.targets.view(M, M), torch.from_numpy(_reference_raster(polys, (0, 0, 14, 14), M)).int())


def test_expand_to_class_specific_by_hand():
    masks = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.int32)
    out = expand_to_class_specific(masks, torch.tensor([2, 1, 0]), num_classes=3)
    n = -1
    assert out.tolist() == [
        [n, n, n, n, n, n, n, n, 1, 0, 0, 1],
        [n, n, n, n, 0, 1, 1, 0, n, n, n, n],
        [n] * 12,
    ]


def test_bitmap_mask_is_sampled_at_cell_centres():
    bitmap = np.zeros((20, 24), np.uint8)
    bitmap[6:14, 4:12] = 1  # pixels x 4..11, y 6..13
    entry = _entry([bitmap], [1])
    # RoI [0, 0, 16, 16] on an 8x8 grid: cells 2 px wide, centres at 1, 3, ..., 15; the centre c reads
    # the pixels floor(c - 0.5) and +1 half each, so x centres 5..11 and y centres 7..13 are on.
    rois = torch.tensor([[0.0, 0, 0, 16, 16], [0.0, 4, 6, 12, 14]])
    out = mask_rcnn_targets(rois, torch.tensor([1, 1]), [entry], [1.0], 8, 2, cls_specific=False)
    expected = np.zeros((8, 8), np.int32)
    expected[3:7, 2:6] = 1
    assert out.targets[0].view(8, 8).tolist() == expected.tolist()
    # The RoI equal to the pixel extent of the rectangle (+1 at the far edges): all on.
    assert (out.targets[1] == 1).all()
    # The same entry held in tensors (as the data loader may give it) gives the same targets.
    tensor_entry = {k: torch.as_tensor(v) if k != "segms" else [torch.from_numpy(bitmap)] for k, v in entry.items()}
    again = mask_rcnn_targets(rois, torch.tensor([1, 1]), [tensor_entry], [1.0], 8, 2, cls_specific=False)
    assert torch.equal(again.targets, out.targets)


def test_bad_polygon_is_reported():
    rois = torch.tensor([[0.0, 0, 0, 14, 14]])
    with pytest.raises(ValueError, match=r"segms\[0\].*4 coordinates"):
        mask_rcnn_targets(rois, torch.tensor([1]), [_entry([[[0.0, 0.0, 5.0, 5.0]]], [1])], [1.0], M, 2)
    with pytest.raises(ValueError, match="batch indices"):
        mask_rcnn_targets(rois + torch.tensor([1.0, 0, 0, 0, 0]), torch.tensor([1]), [_entry([], [])], [1.0], M, 2)


def test_bitmap_and_polygon_targets_share_one_pixel_convention():
    # Rasterise random polygons into full-image masks with pycocotools; inside RoIs, the bitmap path
    # must agree with the polygon path better than with a half-pixel shifted sampling grid.
    rng = np.random.default_rng(0)
    h, w = 160, 200
    agreement = {-0.5: 0.0, 0.0: 0.0, 0.5: 0.0}
    trials = 30
    for _ in range(trials):
        cx, cy = rng.uniform(50, 150), rng.uniform(50, 110)
        ang = np.sort(rng.uniform(0, 2 * np.pi, 8))
        r = rng.uniform(15, 45, 8)
        poly = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).reshape(-1)
        bitmap = mask_util.decode(mask_util.frPyObjects([list(poly)], h, w))[:, :, 0]
        lo = np.array([poly[0::2].min(), poly[1::2].min()]) - rng.uniform(0, 8, 2)
        hi = np.array([poly[0::2].max(), poly[1::2].max()]) + rng.uniform(0, 8, 2)
        box = np.concatenate([lo, hi]).astype(np.float32)
        from_polygon = polygons_to_mask_in_box([poly], box, M * 2)
        for shift in agreement:
            sampled = bitmap_to_mask_in_boxes(bitmap, (box + np.float32(shift))[None], M * 2)[0]
            agreement[shift] += (sampled == from_polygon).mean() / trials
    assert agreement[0.0] > 0.985
    assert agreement[0.0] > max(agreement[-0.5], agreement[0.5]) + 0.005
