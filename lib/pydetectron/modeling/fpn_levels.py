"""FPN RoI bookkeeping: which pyramid level a RoI is pooled from, and collecting RPN proposals over levels.

These are the two halves of Detectron's ``collect_and_distribute_fpn_rpn_proposals`` plus
``fpn.map_rois_to_fpn_levels``. RoIs are ``(K, 5)`` = ``[batch_index, x1, y1, x2, y2]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pydetectron.boxes import box_area


def map_rois_to_fpn_levels(
    boxes: Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    legacy_plus_one: bool = True,
) -> Tensor:
    """FPN level of each box ``(K, 4)`` -> int64 ``(K,)`` (Eqn. 1 of the FPN paper, as Detectron).

    ``floor(k0 + log2(sqrt(area) / s0 + 1e-6))`` clamped to ``[k_min, k_max]``; the area counts inclusive
    pixels by default, so a 224 x 224 box lands exactly on ``k0``. Computed in float64 so that boxes of
    exactly canonical size never fall to the level below through rounding.
    """
    if k_min > k_max:
        raise ValueError(f"FPN level range is empty: k_min={k_min} > k_max={k_max}")
    scale = torch.sqrt(box_area(boxes.double(), legacy_plus_one).clamp(min=0))
    levels = torch.floor(canonical_level + torch.log2(scale / canonical_scale + 1e-6))
    return levels.clamp(k_min, k_max).to(torch.int64)


def distribute_rois(rois: Tensor, levels: Tensor, k_min: int, k_max: int) -> tuple[list[Tensor], Tensor]:
    """Split RoIs ``(K, 5)`` by their ``levels`` ``(K,)`` into one tensor per level ``k_min..k_max``.

    Returns the per-level RoIs (input order kept inside a level) and ``restore`` ``(K,)`` int64 such that
    ``torch.cat(per_level)[restore]`` is ``rois`` again (Detectron's ``rois_idx_restore``).
    """
    if levels.shape != rois.shape[:1]:
        raise ValueError(f"need one level per RoI, got {tuple(levels.shape)} levels for {tuple(rois.shape)} RoIs")
    order = []
    per_level = []
    for lvl in range(k_min, k_max + 1):
        idx = torch.nonzero(levels == lvl).flatten()
        order.append(idx)
        per_level.append(rois[idx])
    order_cat = torch.cat(order)
    if order_cat.numel() != rois.shape[0]:
        raise ValueError(f"some RoI levels fall outside [{k_min}, {k_max}]")
    restore = torch.empty_like(order_cat)
    restore[order_cat] = torch.arange(order_cat.numel(), device=order_cat.device)
    return per_level, restore


def collect_proposals(
    rois_per_level: Sequence[Tensor], scores_per_level: Sequence[Tensor], top_n: int, per_image: bool = False
) -> tuple[Tensor, Tensor]:
    """Keep the ``top_n`` highest-scoring proposals over all levels *and all images* of the batch.

    This is Detectron's ``collect``: in training the cut is over the whole minibatch, not per image
    (Detectron.pytorch scales ``top_n`` by ``FPN.RPN_COLLECT_SCALE`` for that reason). Detectron tests one
    image at a time, so inference keeps ``top_n`` per image (`per_image`), whatever the batch.
    ``top_n <= 0`` keeps everything. Returns RoIs ``(K, 5)`` and scores ``(K,)`` sorted by decreasing score
    (per image, images in order, when `per_image`).
    """
    rois = torch.cat(list(rois_per_level))
    scores = torch.cat(list(scores_per_level))
    if rois.shape[0] != scores.shape[0]:
        raise ValueError(f"{rois.shape[0]} proposals but {scores.shape[0]} scores")
    order = torch.argsort(scores, descending=True, stable=True)
    if per_image and top_n > 0:
        image_of = rois[order, 0]
        order = torch.cat([order[image_of == image][:top_n] for image in image_of.unique(sorted=True)]
                          or [order[:0]])
    elif top_n > 0:
        order = order[:top_n]
    return rois[order], scores[order]


def level_indices(body_levels: Sequence[int], lowest: int, highest: int, keys: str) -> list[int]:
    """Positions in `body_levels` of levels `lowest..highest`, with an error naming the cfg `keys` if the
    body lacks one (e.g. keys = 'FPN.ROI_MIN_LEVEL..ROI_MAX_LEVEL')."""
    wanted = list(range(lowest, highest + 1))
    missing = [level for level in wanted if level not in body_levels]
    if missing:
        raise ValueError(f"{keys} = {lowest}..{highest} needs body levels {missing}, "
                         f"but the body provides levels {list(body_levels)}")
    return [list(body_levels).index(level) for level in wanted]
