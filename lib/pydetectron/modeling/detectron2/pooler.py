"""detectron2's ``ROIPooler``: RoI features from one map or an FPN pyramid, with d2's level assignment.

The pooling itself is ``roi_features.RoIFeatureExtractor`` (RoIAlign with ``aligned=True`` is d2's
``ROIAlignV2``; sampling ratio ``*.ROI_XFORM_SAMPLING_RATIO``, 0 = adaptive), which uses this level rule in
``MODEL.CONVENTIONS: 'detectron2'`` (``build_roi_feature_extractor``). Only the level of each RoI differs
from Detectron: ``floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))`` with the area
``(x2 - x1) * (y2 - y1)`` (no +1), computed in the boxes' own dtype as d2 does.
"""

from __future__ import annotations

import torch

from pydetectron.boxes import box_area

LEVEL_EPS = 1e-8  # d2's assign_boxes_to_levels


def assign_boxes_to_levels(
    boxes: torch.Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0, canonical_level: int = 4
) -> torch.Tensor:
    """Pyramid level (``k_min..k_max``, int64 ``(K,)``) of each box ``(K, 4)``, d2's ``assign_boxes_to_levels``
    (which returns the offset from ``k_min``; this returns the level itself)."""
    if k_min > k_max:
        raise ValueError(f"FPN level range is empty: k_min={k_min} > k_max={k_max}")
    sizes = torch.sqrt(box_area(boxes, legacy_plus_one=False))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_scale + LEVEL_EPS))
    return levels.clamp(min=k_min, max=k_max).to(torch.int64)

