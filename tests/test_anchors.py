"""Anchors against hand-computed Detectron values and a plain-Python reference of generate_anchors."""

import math

import pytest
import torch

from pydetectron.modeling.anchors import AnchorGenerator, fpn_anchor_generator, generate_anchors, shift_anchors


def _reference_cell_anchors(stride, sizes, ratios):
    """Detectron's recipe in plain Python floats (Python's round() also rounds half to even)."""
    ctr = 0.5 * (stride - 1)
    out = []
    for r in ratios:
        w = round(math.sqrt(stride * stride / r))
        h = round(w * r)
        for s in sizes:
            ws, hs = w * s / stride, h * s / stride
            out.append([ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)])
    return torch.tensor(out, dtype=torch.float32)


def test_fpn_p2_anchors_by_hand():
    # stride 4, size 32: window [0, 0, 3, 3] (centre 1.5). Ratio 0.5: w = round(sqrt(32)) = 6, h = 3,
    # scaled x8 -> 48 x 24. Ratio 1: 4 x 4 -> 32 x 32. Ratio 2: w = round(sqrt(8)) = 3, h = 6 -> 24 x 48.
    expected = torch.tensor(
        [
            [1.5 - 23.5, 1.5 - 11.5, 1.5 + 23.5, 1.5 + 11.5],
            [1.5 - 15.5, 1.5 - 15.5, 1.5 + 15.5, 1.5 + 15.5],
            [1.5 - 11.5, 1.5 - 23.5, 1.5 + 11.5, 1.5 + 23.5],
        ]
    )
    torch.testing.assert_close(generate_anchors(4, (32,), (0.5, 1, 2)), expected, rtol=0, atol=0)


def test_fpn_p6_anchors_by_hand():
    # stride 64, size 512: window centre 31.5. Ratio 0.5: w = round(sqrt(8192)) = 91, h = round(45.5) = 46
    # (half to even), scaled x8 -> 728 x 368. Ratio 1: 512 x 512. Ratio 2: w = round(sqrt(2048)) = 45,
    # h = 90 -> 360 x 720.
    expected = torch.tensor(
        [
            [31.5 - 363.5, 31.5 - 183.5, 31.5 + 363.5, 31.5 + 183.5],
            [31.5 - 255.5, 31.5 - 255.5, 31.5 + 255.5, 31.5 + 255.5],
            [31.5 - 179.5, 31.5 - 359.5, 31.5 + 179.5, 31.5 + 359.5],
        ]
    )
    torch.testing.assert_close(generate_anchors(64, (512,), (0.5, 1, 2)), expected, rtol=0, atol=0)


def test_stride16_detectron_documented_values():
    # py-faster-rcnn's documented anchors (stride 16, sizes 128/256/512, ratios 0.5/1/2), e.g.
    # [-83, -39, 100, 56], shifted by -1 because Detectron's reference window is [0, 0, 15, 15].
    got = generate_anchors(16, (128, 256, 512), (0.5, 1, 2))
    assert got[0].tolist() == [-84.0, -40.0, 99.0, 55.0]
    assert got[1].tolist() == [-176.0, -88.0, 191.0, 103.0]
    assert got[3].tolist() == [-56.0, -56.0, 71.0, 71.0]
    assert got[8].tolist() == [-168.0, -344.0, 183.0, 359.0]
    torch.testing.assert_close(got, _reference_cell_anchors(16, (128, 256, 512), (0.5, 1, 2)), rtol=0, atol=0)


@pytest.mark.parametrize("stride,sizes", [(16, (32, 64, 128, 256, 512)), (8, (24, 40)), (32, (256,))])
def test_matches_plain_python_reference(stride, sizes):
    ratios = (0.25, 0.5, 1.0, 2.0, 4.0)
    got = generate_anchors(stride, sizes, ratios)
    torch.testing.assert_close(got, _reference_cell_anchors(stride, sizes, ratios), rtol=0, atol=1e-5)


def test_shift_order_is_h_w_a():
    cell = generate_anchors(4, (8,), (0.5, 1, 2))
    grid = shift_anchors(cell, 4, height=2, width=3)
    assert grid.shape == (2 * 3 * 3, 4)
    grid = grid.reshape(2, 3, 3, 4)
    for y in range(2):
        for x in range(3):
            shift = torch.tensor([4.0 * x, 4.0 * y, 4.0 * x, 4.0 * y])
            torch.testing.assert_close(grid[y, x], cell + shift)


def test_fpn_generator_levels_and_cache():
    gen = fpn_anchor_generator(2, 6, 32, (0.5, 1, 2))
    assert gen.strides == [4.0, 8.0, 16.0, 32.0, 64.0]
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    levels = gen(shapes, torch.device("cpu"))
    assert [a.shape[0] for a in levels] == [h * w * 3 for h, w in shapes]
    # The square anchor of level l has side 32 * 2^(l-2).
    for lvl, anchors in zip(range(2, 7), levels):
        side = anchors[1, 2] - anchors[1, 0] + 1
        assert side.item() == 32 * 2 ** (lvl - 2)
    assert gen(shapes, torch.device("cpu"))[0] is levels[0]


def test_cache_is_bounded():
    gen = AnchorGenerator([16.0], [(32.0,)], (1.0,))
    gen.max_cached = 3
    first = gen([(1, 1)], torch.device("cpu"))[0]
    for w in range(2, 6):
        grid = gen([(1, w)], torch.device("cpu"))[0]
        assert grid.shape == (w, 4)
    assert len(gen._cache) == 3
    again = gen([(1, 1)], torch.device("cpu"))[0]
    assert again is not first and torch.equal(again, first)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="stride"):
        generate_anchors(0, (32,), (1,))
    with pytest.raises(ValueError, match="same number"):
        AnchorGenerator([4, 8], [(32,), (64, 128)], (1,))
    with pytest.raises(ValueError, match="feature maps"):
        fpn_anchor_generator(2, 3, 32, (1,))([(2, 2)], torch.device("cpu"))
