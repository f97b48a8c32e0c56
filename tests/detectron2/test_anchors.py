"""detectron2's DefaultAnchorGenerator against hand-computed anchors."""

import math

import pytest
import torch

from pydetectron.config import get_cfg
from pydetectron.modeling.detectron2.anchors import (
    DefaultAnchorGenerator,
    generate_cell_anchors,
    retinanet_anchor_sizes,
    rpn_anchor_generator,
)


def test_cell_anchors_sizes_outer_aspect_ratios_inner():
    got = generate_cell_anchors((32, 64), (0.5, 1.0, 2.0))
    rows = []
    for size in (32.0, 64.0):
        for ratio in (0.5, 1.0, 2.0):
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    torch.testing.assert_close(got, torch.tensor(rows, dtype=torch.float64).float(), rtol=0, atol=0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    # ratio 0.5 (h / w) for size 32: w = 32 sqrt 2, h = 16 sqrt 2
    torch.testing.assert_close(got[0], torch.tensor([-16 * 2**0.5, -8 * 2**0.5, 16 * 2**0.5, 8 * 2**0.5]))


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_grid_shifts_with_offset(offset):
    gen = DefaultAnchorGenerator([4.0, 8.0], [(8,), (16,)], (1.0,), offset=offset)
    fine, coarse = gen([(2, 3), (1, 2)], torch.device("cpu"))
    assert fine.shape == (6, 4) and coarse.shape == (2, 4)
    expect = [[x * 4 + offset * 4 - 4, y * 4 + offset * 4 - 4, x * 4 + offset * 4 + 4, y * 4 + offset * 4 + 4]
              for y in range(2) for x in range(3)]  # rows (H, W, A)
    torch.testing.assert_close(fine, torch.tensor(expect))
    torch.testing.assert_close(coarse, torch.tensor([[offset * 8 - 8, offset * 8 - 8, offset * 8 + 8, offset * 8 + 8],
                                                     [offset * 8, offset * 8 - 8, offset * 8 + 16, offset * 8 + 8]]))


def test_anchor_order_is_location_major_then_cell_anchor():
    gen = DefaultAnchorGenerator([16.0], [(32, 64)], (0.5, 1.0, 2.0))
    (anchors,) = gen([(2, 2)], torch.device("cpu"))
    assert gen.num_cell_anchors == 6 and anchors.shape == (24, 4)
    cells = generate_cell_anchors((32, 64), (0.5, 1.0, 2.0))
    torch.testing.assert_close(anchors[6:12], cells + torch.tensor([16.0, 0.0, 16.0, 0.0]))  # (y 0, x 1)


def test_offset_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"offset must be in \[0, 1\)"):
        DefaultAnchorGenerator([4.0], [(8,)], (1.0,), offset=1.0)


def test_retinanet_sizes_are_detectron2s_octaves():
    sizes = retinanet_anchor_sizes(3, 7, anchor_scale=4, scales_per_octave=3)
    expect = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]
    assert [list(s) for s in sizes] == expect  # exactly detectron2's RetinaNet YAML values


def test_rpn_sizes_from_detectron_keys():
    cfg = get_cfg()
    cfg.FPN.FPN_ON = cfg.FPN.MULTILEVEL_RPN = True
    cfg.MODEL.ANCHOR_OFFSET = 0.5
    gen = rpn_anchor_generator(cfg, [4.0, 8.0, 16.0, 32.0, 64.0])
    assert gen.offset == 0.5 and gen.num_cell_anchors == 3
    for level, cell in enumerate(gen.cell_anchors):  # d2's SIZES [[32], [64], [128], [256], [512]]
        torch.testing.assert_close(cell, generate_cell_anchors((32 * 2**level,), (0.5, 1, 2)))
    cfg.FPN.FPN_ON = False
    cfg.RPN.SIZES = (32, 64, 128, 256, 512)
    gen = rpn_anchor_generator(cfg, [16.0])
    torch.testing.assert_close(gen.cell_anchors[0], generate_cell_anchors((32, 64, 128, 256, 512), (0.5, 1, 2)))
    with pytest.raises(ValueError, match="anchor levels"):
        rpn_anchor_generator(cfg, [8.0, 16.0])
