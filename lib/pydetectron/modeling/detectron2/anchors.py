"""detectron2's ``DefaultAnchorGenerator``: cell anchors centred on 0, shifted by ``(x + offset) * stride``.

Cell anchors are listed sizes outer, aspect ratios inner: for size ``s`` and ratio ``a`` (height / width),
``w = sqrt(s^2 / a)``, ``h = a * w``, box ``[-w/2, -h/2, w/2, h/2]`` (computed in float64, stored float32, as
detectron2). Sizes come from Detectron's keys: the FPN RPN one size per level (``FPN.RPN_ANCHOR_START_SIZE``
doubling), the single-map RPN ``RPN.SIZES``, RetinaNet ``ANCHOR_SCALE`` octaves (``retinanet_anchor_sizes``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from pydetectron.modeling.anchors import GridAnchorGenerator, fpn_anchor_sizes


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """detectron2's ``generate_cell_anchors``: ``(len(sizes) * len(aspect_ratios), 4)`` float32, size-major."""
    if not sizes or not aspect_ratios or any(s <= 0 for s in sizes) or any(a <= 0 for a in aspect_ratios):
        raise ValueError(f"anchors need positive sizes and aspect ratios, got {list(sizes)}, {list(aspect_ratios)}")
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for aspect_ratio in aspect_ratios:
            w = math.sqrt(area / aspect_ratio)
            h = aspect_ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float64).to(torch.float32)


class DefaultAnchorGenerator(GridAnchorGenerator):
    """detectron2's anchors for maps of ``strides``: ``sizes[l]`` per level, ``aspect_ratios`` shared by all
    levels, ``offset`` in ``[0, 1)`` (``MODEL.ANCHOR_OFFSET``; detectron2's default config has 0.0).

    Call it with the maps' ``(H, W)`` and a device: per level ``(H * W * A, 4)`` float32, rows ``(H, W, A)``.
    """

    def __init__(
        self,
        strides: Sequence[float],
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[float],
        offset: float = 0.0,
    ) -> None:
        if len(strides) != len(sizes):
            raise ValueError(f"need one size list per stride, got {len(strides)} strides and {len(sizes)} sizes")
        super().__init__(strides, [generate_cell_anchors(s, aspect_ratios) for s in sizes], offset)


def retinanet_anchor_sizes(
    min_level: int, max_level: int, anchor_scale: float, scales_per_octave: int
) -> list[tuple[float, ...]]:
    """RetinaNet's sizes per level from Detectron's keys: ``x * 2^(o / S)`` for ``x = 2^l * ANCHOR_SCALE``,
    o in ``0..S-1`` (detectron2's ``[[x, x * 2**(1.0/3), x * 2**(2.0/3)] for x in [32, ..., 512]]``)."""
    if scales_per_octave < 1:
        raise ValueError(f"RETINANET.SCALES_PER_OCTAVE must be >= 1, got {scales_per_octave}")
    sizes = []
    for level in range(min_level, max_level + 1):
        base = 2.0**level * anchor_scale
        sizes.append(tuple(base * 2 ** (octave / scales_per_octave) for octave in range(scales_per_octave)))
    return sizes


def rpn_anchor_generator(cfg, strides: Sequence[float]) -> DefaultAnchorGenerator:
    """The d2-mode RPN's anchors for maps of ``strides`` (finest first): one size per FPN level
    (``FPN.RPN_ANCHOR_START_SIZE`` doubling, ``FPN.RPN_ASPECT_RATIOS``), or ``RPN.SIZES`` /
    ``RPN.ASPECT_RATIOS`` on a single map; ``MODEL.ANCHOR_OFFSET``."""
    if cfg.FPN.FPN_ON and cfg.FPN.MULTILEVEL_RPN:
        sizes = fpn_anchor_sizes(cfg.FPN.RPN_MIN_LEVEL, cfg.FPN.RPN_MAX_LEVEL, cfg.FPN.RPN_ANCHOR_START_SIZE)
        aspect_ratios = cfg.FPN.RPN_ASPECT_RATIOS
    else:
        sizes, aspect_ratios = [tuple(cfg.RPN.SIZES)], cfg.RPN.ASPECT_RATIOS
    if len(sizes) != len(strides):
        raise ValueError(f"{len(sizes)} anchor levels for {len(strides)} RPN maps")
    return DefaultAnchorGenerator(strides, sizes, aspect_ratios, cfg.MODEL.ANCHOR_OFFSET)
