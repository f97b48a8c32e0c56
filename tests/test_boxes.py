"""Box functions against torchvision and float64 references written here from Detectron's formulas."""

import math

import numpy as np
import pytest
import torch
import torchvision

from pydetectron import boxes as B


def _random_boxes(n, size=100.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = 1.0 + torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 2
    return torch.cat((xy, xy + wh), dim=1).to(dtype)


def _iou_reference(a, b, plus_one):
    """Loop over pairs in float64, as Detectron's cython bbox_overlaps does."""
    off = 1.0 if plus_one else 0.0
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, p in enumerate(a.double().tolist()):
        for j, q in enumerate(b.double().tolist()):
            iw = min(p[2], q[2]) - max(p[0], q[0]) + off
            ih = min(p[3], q[3]) - max(p[1], q[1]) + off
            if iw > 0 and ih > 0:
                area_p = (p[2] - p[0] + off) * (p[3] - p[1] + off)
                area_q = (q[2] - q[0] + off) * (q[3] - q[1] + off)
                out[i, j] = iw * ih / (area_p + area_q - iw * ih)
    return out


def test_area_plus_one():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 4.0], [2.0, 3.0, 2.0, 3.0]])
    assert B.box_area(boxes).tolist() == [50.0, 1.0]
    assert B.box_area(boxes, legacy_plus_one=False).tolist() == [36.0, 0.0]


def test_iou_matches_torchvision_without_plus_one():
    a, b = _random_boxes(13, seed=1), _random_boxes(7, seed=2)
    torch.testing.assert_close(B.box_iou(a, b, legacy_plus_one=False), torchvision.ops.box_iou(a, b))


@pytest.mark.parametrize("plus_one", [True, False])
def test_iou_matches_float64_reference(plus_one):
    a, b = _random_boxes(11, seed=3), _random_boxes(9, seed=4)
    b[0] = a[0]  # an exact match must give 1
    b[1] = torch.tensor([500.0, 500.0, 510.0, 510.0])  # far away: 0
    got = B.box_iou(a, b, legacy_plus_one=plus_one).double()
    torch.testing.assert_close(got, _iou_reference(a, b, plus_one), rtol=1e-5, atol=1e-6)
    assert got[0, 0] == pytest.approx(1.0)


def test_iou_touching_boxes_plus_one():
    # With inclusive pixels, boxes sharing the column x=4 overlap by one pixel column.
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[4.0, 0.0, 8.0, 4.0]])
    assert B.box_iou(a, b).item() == pytest.approx(5.0 / 45.0)
    assert B.box_iou(a, b, legacy_plus_one=False).item() == 0.0


def _decode_reference(boxes, deltas, weights, clip):
    """Detectron's bbox_transform in float64 with plain Python arithmetic."""
    out = []
    for box, row in zip(boxes.double().tolist(), deltas.double().tolist()):
        w = box[2] - box[0] + 1.0
        h = box[3] - box[1] + 1.0
        cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
        pred = []
        for k in range(len(row) // 4):
            dx, dy, dw, dh = (row[4 * k + i] / weights[i] for i in range(4))
            dw, dh = min(dw, clip), min(dh, clip)
            px, py, pw, ph = dx * w + cx, dy * h + cy, math.exp(dw) * w, math.exp(dh) * h
            pred += [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - 1, py + 0.5 * ph - 1]
        out.append(pred)
    return torch.tensor(out, dtype=torch.float64)


def test_decode_matches_reference_with_class_tiled_deltas_and_clip():
    boxes = _random_boxes(6, seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    deltas = torch.randn(6, 12, generator=g, dtype=torch.float64)
    deltas[0, 2] = 80.0  # must be clipped to log(1000/16) * ww
    weights = (10.0, 10.0, 5.0, 5.0)
    got = B.decode_boxes(boxes, deltas, weights)
    torch.testing.assert_close(got, _decode_reference(boxes, deltas, weights, B.BBOX_XFORM_CLIP))
    assert got[0, 2] - got[0, 0] + 1 == pytest.approx((boxes[0, 2] - boxes[0, 0] + 1).item() * 1000 / 16)


@pytest.mark.parametrize("plus_one", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(plus_one, weights):
    anchors = _random_boxes(50, seed=7, dtype=torch.float64)
    gt = _random_boxes(50, seed=8, dtype=torch.float64)
    deltas = B.encode_boxes(anchors, gt, weights, legacy_plus_one=plus_one)
    back = B.decode_boxes(anchors, deltas, weights, legacy_plus_one=plus_one)
    torch.testing.assert_close(back, gt)


def test_encode_known_value():
    # anchor 10x10 at (0..9), gt 20x10 shifted by 5 in x: centre moves 10 -> dx = 1, dw = log 2.
    anchor = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    gt = torch.tensor([[5.0, 0.0, 24.0, 9.0]])
    d = B.encode_boxes(anchor, gt, (1, 1, 1, 1))
    torch.testing.assert_close(d, torch.tensor([[1.0, 0.0, math.log(2.0), 0.0]]))


def test_clip_tiled():
    boxes = torch.tensor([[-5.0, -1.0, 120.0, 30.0, 3.0, 4.0, 5.0, 90.0]])
    got = B.clip_boxes(boxes, height=50, width=100)
    assert got.tolist() == [[0.0, 0.0, 99.0, 30.0, 3.0, 4.0, 5.0, 49.0]]
    assert B.clip_boxes(boxes, 50, 100, legacy_plus_one=False)[0, 2].item() == 100.0


def test_flip_is_involution_and_detectron_formula():
    boxes = _random_boxes(5, seed=9)
    flipped = B.flip_boxes(boxes, 200)
    torch.testing.assert_close(flipped[:, 0], 200 - boxes[:, 2] - 1)
    torch.testing.assert_close(flipped[:, 2], 200 - boxes[:, 0] - 1)
    torch.testing.assert_close(B.flip_boxes(flipped, 200), boxes)
    torch.testing.assert_close(B.box_area(flipped), B.box_area(boxes))


def test_expand_boxes():
    got = B.expand_boxes(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 1.5)
    assert got.tolist() == [[5.0, 10.0, 35.0, 70.0]]


def test_xywh_round_trip():
    xyxy = torch.tensor([[3.0, 4.0, 12.0, 24.0], [1.0, 1.0, 1.0, 1.0]])
    xywh = B.xyxy_to_xywh(xyxy)
    assert xywh.tolist() == [[3.0, 4.0, 10.0, 21.0], [1.0, 1.0, 1.0, 1.0]]
    torch.testing.assert_close(B.xywh_to_xyxy(xywh), xyxy)
    # Detectron clamps w - 1 at 0: an empty box maps to a single pixel.
    assert B.xywh_to_xyxy(torch.tensor([[5.0, 5.0, 0.0, 0.0]])).tolist() == [[5.0, 5.0, 5.0, 5.0]]


def test_filter_small_boxes_plain_and_proposal_semantics():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 9.0, 9.0],  # 10x10
            [0.0, 0.0, 4.0, 9.0],  # 5 wide
            [95.0, 0.0, 120.0, 9.0],  # centre x = 108 beyond the 100-wide image
            [0.0, 0.0, 0.0, 0.0],  # one pixel
        ]
    )
    assert B.filter_small_boxes(boxes, 5).tolist() == [True, False, True, False]
    im_info = torch.tensor([50.0, 100.0, 2.0])
    # At scale 2 the 10-pixel box measures 9/2 + 1 = 5.5 original pixels, the 5-pixel one 3.
    assert B.filter_small_boxes(boxes, 4, im_info).tolist() == [True, False, False, False]
    # min_size 0 still requires one original pixel: the 1-pixel box has 0/2 + 1 = 1 -> kept.
    assert B.filter_small_boxes(boxes, 0, im_info).tolist() == [True, True, False, True]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="boxes"):
        B.box_area(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="weights"):
        B.encode_boxes(torch.zeros(1, 4), torch.zeros(1, 4), (1, 1, 1))
    with pytest.raises(ValueError, match="deltas"):
        B.decode_boxes(torch.zeros(2, 4), torch.zeros(2, 6), (1, 1, 1, 1))


def test_clip_accepts_zero_tiled_rows():
    from pydetectron.boxes import clip_boxes

    assert clip_boxes(torch.zeros(0, 12), 10, 10).shape == (0, 12)


def test_unique_boxes_matches_detectrons_hash():
    """Detectron's unique_boxes: np.unique over round(box * scale) . [1, 1e3, 1e6, 1e9], first occurrences."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 300, size=(30, 4)).astype(np.float32)
    boxes = np.concatenate([base, base[:12] + rng.uniform(-0.4, 0.4, size=(12, 4)).astype(np.float32)])[
        rng.permutation(42)]
    for scale in (1.0, 1 / 16):
        hashes = np.round(boxes.astype(np.float64) * scale).dot(np.array([1, 1e3, 1e6, 1e9]))
        _, first, groups = np.unique(hashes, return_index=True, return_inverse=True)
        index, inverse = B.unique_boxes(torch.from_numpy(boxes), scale)
        np.testing.assert_array_equal(index.numpy(), np.sort(first))
        np.testing.assert_array_equal(boxes[index.numpy()][inverse.numpy()], boxes[first][groups])
    # Detectron's hash joins (1000, 0, ...) and (0, 1, ...): so must we, to keep the boxes it keeps
    index, _ = B.unique_boxes(torch.tensor([[1000.0, 0, 1200, 50], [0, 1, 1200, 50]]))
    assert index.tolist() == [0]
    empty_index, empty_inverse = B.unique_boxes(torch.zeros(0, 4))
    assert empty_index.shape == (0,) and empty_inverse.shape == (0,)


def test_overlaps_with_gt_and_the_crowd_filter():
    gt = torch.tensor([[0.0, 0, 9, 9], [20, 20, 39, 39]])
    crowd = torch.tensor([False, True])
    boxes = torch.tensor([[0.0, 0, 4, 9], [22, 22, 29, 29], [50, 50, 59, 59], [15, 15, 34, 34]])
    overlaps, best = B.box_overlaps_with_gt(boxes, gt, crowd)
    # inclusive areas: 50 / 100; 64 / 400; no overlap; 15 x 15 = 225 / (400 + 400 - 225)
    torch.testing.assert_close(overlaps, torch.tensor([0.5, 0.16, 0.0, 225 / 575]))
    assert best.tolist() == [0, 1, -1, 1]
    # the crowd filter: box 1 lies wholly inside the crowd (coverage 1 > 0.7), box 3 is 225/400 covered
    filtered, _ = B.box_overlaps_with_gt(boxes, gt, crowd, crowd_filter_thresh=0.7)
    torch.testing.assert_close(filtered, torch.tensor([0.5, -1.0, 0.0, 225 / 575]))
    empty, none = B.box_overlaps_with_gt(boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool))
    assert empty.tolist() == [0.0] * 4 and none.tolist() == [-1] * 4
