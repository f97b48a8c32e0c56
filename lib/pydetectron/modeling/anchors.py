"""RPN anchors with Detectron's exact values: cell anchors from ``generate_anchors`` shifted over a map.

Anchors are inclusive-pixel ``[x1, y1, x2, y2]`` in network-input pixels. A map's anchors are ordered
``(H, W, A)`` (slowest to fastest), matching the ``(N, A, H, W)`` → ``(N, H, W, A)`` flattening of the
RPN outputs.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor


def _whctrs(anchor: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = anchor[..., 2] - anchor[..., 0] + 1
    h = anchor[..., 3] - anchor[..., 1] + 1
    return w, h, anchor[..., 0] + 0.5 * (w - 1), anchor[..., 1] + 0.5 * (h - 1)


def _mkanchors(ws: Tensor, hs: Tensor, x_ctr: Tensor, y_ctr: Tensor) -> Tensor:
    return torch.stack(
        (x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)), dim=-1
    )


@functools.lru_cache(maxsize=64)
def _cell_anchors_f64(stride: float, sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> Tensor:
    base = torch.tensor([0.0, 0.0, stride - 1, stride - 1], dtype=torch.float64)
    w, h, x_ctr, y_ctr = _whctrs(base)
    ratios = torch.tensor(aspect_ratios, dtype=torch.float64)
    # Ratio enumeration keeps the area of the stride x stride box, rounding half to even like numpy.
    ws = torch.round(torch.sqrt(w * h / ratios))
    hs = torch.round(ws * ratios)
    by_ratio = _mkanchors(ws, hs, x_ctr, y_ctr)  # (R, 4)
    # Scale enumeration: every ratio anchor times every size / stride, ratio-major order.
    scales = torch.tensor(sizes, dtype=torch.float64) / stride
    rw, rh, rx, ry = _whctrs(by_ratio)
    return _mkanchors(rw[:, None] * scales, rh[:, None] * scales, rx[:, None], ry[:, None]).reshape(-1, 4)


def generate_anchors(
    stride: float = 16, sizes: Sequence[float] = (32, 64, 128, 256, 512), aspect_ratios: Sequence[float] = (0.5, 1, 2)
) -> Tensor:
    """Detectron's ``generate_anchors``: ``(len(ratios) * len(sizes), 4)`` float32 cell anchors.

    The reference window is ``[0, 0, stride - 1, stride - 1]``; for each aspect ratio (h / w) the width is
    ``round(sqrt(stride^2 / ratio))`` and the height ``round(width * ratio)``, then each is scaled by
    ``size / stride`` about the window centre ``((stride - 1) / 2, (stride - 1) / 2)``.
    """
    if stride <= 0 or not sizes or not aspect_ratios:
        raise ValueError(f"anchors need stride > 0 and some sizes and ratios, got {stride}, {sizes}, {aspect_ratios}")
    if any(s <= 0 for s in sizes) or any(r <= 0 for r in aspect_ratios):
        raise ValueError(f"anchor sizes and aspect ratios must be positive, got {sizes}, {aspect_ratios}")
    key = (float(stride), tuple(float(s) for s in sizes), tuple(float(r) for r in aspect_ratios))
    return _cell_anchors_f64(*key).to(torch.float32)


def shift_anchors(cell_anchors: Tensor, stride: float, height: int, width: int, offset: float = 0.0) -> Tensor:
    """Cell anchors ``(A, 4)`` placed at every cell of an ``height x width`` map -> ``(H * W * A, 4)``.

    Cell ``(y, x)`` shifts by ``((x + offset) * stride, (y + offset) * stride)``; rows are ordered
    ``(H, W, A)`` as Detectron. The shifts are detectron2's ``arange(offset * stride, W * stride, stride)``,
    made in float32 on the CPU as detectron2 makes them (Detectron's offset is 0: ``x * stride`` exactly).
    """
    device, dtype = cell_anchors.device, cell_anchors.dtype
    shift_x = torch.arange(offset * stride, width * stride, step=stride, dtype=torch.float32)
    shift_y = torch.arange(offset * stride, height * stride, step=stride, dtype=torch.float32)
    if shift_x.numel() != width or shift_y.numel() != height:
        raise ValueError(f"anchor grid of stride {stride} and offset {offset} does not fit a {height}x{width} map")
    sy, sx = torch.meshgrid(shift_y.to(device, dtype), shift_x.to(device, dtype), indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.reshape(1, -1, 4)).reshape(-1, 4)


class GridAnchorGenerator:
    """Anchors for each level from its cell anchors, cached per (level, map shape, device), least recently
    used first out. Subclasses choose the cell anchors (Detectron's here, detectron2's in
    ``modeling.detectron2.anchors``).

    Args:
        strides: one per level.
        cell_anchors: per level ``(A, 4)`` float32, the same ``A`` on every level.
        offset: where in its cell an anchor's shift lies, in strides (detectron2's ``OFFSET``; 0 = Detectron).
    The returned tensors are shared with the cache: treat them as read-only.
    """

    # Grids kept (one per level and shape): a 1333 x 800 FPN input needs about 4 MB over its five levels.
    max_cached = 128

    def __init__(self, strides: Sequence[float], cell_anchors: Sequence[Tensor], offset: float = 0.0) -> None:
        if len(strides) != len(cell_anchors):
            raise ValueError(f"need one set of cell anchors per stride, got {len(strides)} strides and "
                             f"{len(cell_anchors)} sets")
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"anchor offset must be in [0, 1), got {offset}")
        self.strides = [float(s) for s in strides]
        self.cell_anchors = list(cell_anchors)
        self.offset = float(offset)
        counts = {c.shape[0] for c in self.cell_anchors}
        if len(counts) != 1:
            raise ValueError(f"every level needs the same number of anchors per cell, got {sorted(counts)}")
        self.num_cell_anchors = counts.pop()
        self._cache: OrderedDict[tuple[int, int, int, torch.device], Tensor] = OrderedDict()

    def __call__(self, feature_shapes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Anchors ``(H_l * W_l * A, 4)`` float32 for each level's map ``(H_l, W_l)``."""
        if len(feature_shapes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(feature_shapes)}")
        out = []
        for i, (h, w) in enumerate(feature_shapes):
            key = (i, int(h), int(w), torch.device(device))
            if key in self._cache:
                self._cache.move_to_end(key)
            else:
                cell = self.cell_anchors[i].to(device)
                self._cache[key] = shift_anchors(cell, self.strides[i], int(h), int(w), self.offset)
                if len(self._cache) > self.max_cached:  # multi-scale training meets many map shapes
                    self._cache.popitem(last=False)
            out.append(self._cache[key])
        return out


class AnchorGenerator(GridAnchorGenerator):
    """Detectron's anchors: ``generate_anchors(stride, sizes, aspect_ratios)`` per level, offset 0.

    Args:
        strides: one per level (``2 ** lvl`` for FPN, ``RPN.STRIDE`` for a single map).
        sizes: per level, the anchor sizes of that level.
        aspect_ratios: shared by all levels.
    """

    def __init__(
        self, strides: Sequence[float], sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float]
    ) -> None:
        if len(strides) != len(sizes):
            raise ValueError(f"need one size list per stride, got {len(strides)} strides and {len(sizes)} sizes")
        super().__init__(strides, [generate_anchors(s, sz, aspect_ratios) for s, sz in zip(strides, sizes)])


def fpn_anchor_sizes(min_level: int, max_level: int, start_size: float) -> list[tuple[float]]:
    """FPN RPN sizes per level: one size, ``start_size * 2^(l - min_level)`` (``FPN.RPN_ANCHOR_START_SIZE``)."""
    return [(start_size * 2.0 ** (lvl - min_level),) for lvl in range(min_level, max_level + 1)]


def fpn_anchor_generator(
    min_level: int, max_level: int, start_size: float, aspect_ratios: Sequence[float]
) -> AnchorGenerator:
    """FPN anchors: level ``l`` has stride ``2^l`` and one size ``start_size * 2^(l - min_level)``."""
    levels = range(min_level, max_level + 1)
    return AnchorGenerator([2.0**lvl for lvl in levels], fpn_anchor_sizes(min_level, max_level, start_size),
                           aspect_ratios)
