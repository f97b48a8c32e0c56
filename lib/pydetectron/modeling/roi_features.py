"""RoI feature extraction: one fixed-size feature per RoI, from a single map (C4) or from FPN levels.

This is Detectron's ``RoIFeatureTransform``: ``RoIPoolF`` or ``RoIAlign`` at a given resolution and
sampling ratio. With several maps, each RoI is pooled from the level chosen by the FPN heuristic
(``pydetectron.modeling.fpn_levels``), and the pooled features come back in the order of the input RoIs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from pydetectron.modeling.fpn_levels import map_rois_to_fpn_levels
from pydetectron.ops.roi_align import roi_align
from pydetectron.ops.roi_pool import roi_pool

XFORM_METHODS = ("RoIAlign", "RoIPoolF")

# (boxes (K, 4), k_min, k_max, canonical_scale, canonical_level) -> int64 (K,) levels in [k_min, k_max]
LevelAssigner = Callable[[torch.Tensor, int, int, float, int], torch.Tensor]


def level_of_scale(spatial_scale: float) -> int:
    """The pyramid level of a map at `spatial_scale` (1/16 -> 4); the scale must be a power of 1/2."""
    level = -math.log2(spatial_scale)
    if abs(level - round(level)) > 1e-6:
        raise ValueError(f"spatial scale {spatial_scale} is not a power of 1/2; cannot name its FPN level")
    return int(round(level))


class RoIFeatureExtractor(nn.Module):
    """Pools ``(K, C, R, R)`` features for RoIs from one or several feature maps.

    Args:
        method: ``'RoIAlign'`` or ``'RoIPoolF'`` (``FAST_RCNN.ROI_XFORM_METHOD`` and friends).
        resolution: output side R.
        sampling_ratio: RoIAlign samples per bin side (0 = adaptive); ignored by RoIPoolF.
        spatial_scales: one per map, finest first (e.g. ``[1/4, 1/8, 1/16, 1/32]`` or ``[1/16]``).
        canonical_scale, canonical_level: FPN level heuristic (``FPN.ROI_CANONICAL_SCALE/LEVEL``).
        aligned: half-pixel offset for RoIAlign (detectron2 style); False is Detectron's Caffe2 op.
        level_assigner: the FPN level of each RoI; default Detectron's ``map_rois_to_fpn_levels``
            (detectron2 mode passes ``detectron2.pooler.assign_boxes_to_levels``).
    """

    def __init__(
        self,
        method: str,
        resolution: int,
        sampling_ratio: int,
        spatial_scales: Sequence[float],
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
        aligned: bool = False,
        level_assigner: LevelAssigner = map_rois_to_fpn_levels,
    ) -> None:
        super().__init__()
        if method not in XFORM_METHODS:
            raise ValueError(f"ROI_XFORM_METHOD {method!r} is not one of {XFORM_METHODS}")
        if resolution < 1:
            raise ValueError(f"ROI_XFORM_RESOLUTION must be >= 1, got {resolution}")
        if len(spatial_scales) == 0:
            raise ValueError("RoIFeatureExtractor needs at least one spatial scale")
        self.method = method
        self.resolution = int(resolution)
        self.sampling_ratio = int(sampling_ratio)
        self.spatial_scales = [float(s) for s in spatial_scales]
        self.levels = [level_of_scale(s) for s in self.spatial_scales]
        if len(self.levels) > 1 and self.levels != list(range(self.levels[0], self.levels[-1] + 1)):
            raise ValueError(f"FPN spatial scales {self.spatial_scales} are not consecutive levels, finest first")
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)
        self.aligned = bool(aligned)
        self.level_assigner = level_assigner

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, spatial_scale: float) -> torch.Tensor:
        size = (self.resolution, self.resolution)
        if self.method == "RoIAlign":
            return roi_align(feature, rois, size, spatial_scale, self.sampling_ratio, self.aligned)
        return roi_pool(feature, rois, size, spatial_scale)

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """features: maps ``(N, C, H_l, W_l)``, finest first; rois: ``(K, 5)`` = [batch, x1, y1, x2, y2] in
        network-input pixels (inclusive). Returns ``(K, C, R, R)`` in the order of `rois`."""
        if len(features) != len(self.spatial_scales):
            raise ValueError(
                f"got {len(features)} feature maps for {len(self.spatial_scales)} spatial scales "
                f"{self.spatial_scales}"
            )
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois must be (K, 5) = [batch, x1, y1, x2, y2], got shape {tuple(rois.shape)}")
        rois = rois.to(features[0].dtype)
        if len(features) == 1:
            return self._pool(features[0], rois, self.spatial_scales[0])
        target_levels = self.level_assigner(
            rois[:, 1:5], self.levels[0], self.levels[-1], self.canonical_scale, self.canonical_level
        )
        channels = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], channels, self.resolution, self.resolution))
        for feature, scale, level in zip(features, self.spatial_scales, self.levels):
            idx = torch.nonzero(target_levels == level).squeeze(1)
            if idx.numel() > 0:
                out = out.index_put((idx,), self._pool(feature, rois[idx], scale))
        return out


def build_roi_feature_extractor(cfg, head_cfg, spatial_scales: Sequence[float]) -> RoIFeatureExtractor:
    """The extractor a head asks for: `head_cfg` is the head's cfg node holding ``ROI_XFORM_METHOD``,
    ``ROI_XFORM_RESOLUTION``, ``ROI_XFORM_SAMPLING_RATIO`` and ``ROI_XFORM_ALIGNED`` (``cfg.FAST_RCNN``,
    ``cfg.MRCNN``, ``cfg.KRCNN``); the FPN level heuristic comes from ``cfg.FPN``, and its rule from
    ``MODEL.CONVENTIONS`` (detectron2's ``ROIPooler`` rule in 'detectron2' mode, for every head)."""
    from pydetectron.modeling.detectron2.pooler import assign_boxes_to_levels

    d2 = cfg.MODEL.CONVENTIONS == "detectron2"
    return RoIFeatureExtractor(
        method=head_cfg.ROI_XFORM_METHOD,
        resolution=head_cfg.ROI_XFORM_RESOLUTION,
        sampling_ratio=head_cfg.ROI_XFORM_SAMPLING_RATIO,
        spatial_scales=spatial_scales,
        canonical_scale=cfg.FPN.ROI_CANONICAL_SCALE,
        canonical_level=cfg.FPN.ROI_CANONICAL_LEVEL,
        aligned=bool(head_cfg.ROI_XFORM_ALIGNED),
        level_assigner=assign_boxes_to_levels if d2 else map_rois_to_fpn_levels,
    )
