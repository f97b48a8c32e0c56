"""The transformed copies of an image that Detectron's test-time augmentations run (``core/test.py``), shared by
box augmentation (TEST.BBOX_AUG) and mask / keypoint augmentation (TEST.MASK_AUG, TEST.KPS_AUG).

A section lists: a horizontal flip at TEST.SCALE (H_FLIP), each of SCALES with the section's MAX_SIZE (and
its flip with SCALE_H_FLIP), each width-relative aspect ratio at TEST.SCALE (and its flip with
ASPECT_RATIO_H_FLIP). The identity is not among them: each caller runs it where Detectron does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Tuple

import cv2
import numpy as np
import torch

from pydetectron.data.minibatch import BlobSettings


@dataclass(frozen=True)
class Transformations:
    """The transformation fields every TEST.*_AUG section has (H_FLIP, SCALES, MAX_SIZE, SCALE_H_FLIP,
    ASPECT_RATIOS, ASPECT_RATIO_H_FLIP)."""

    h_flip: bool = False
    scales: Tuple[int, ...] = ()
    max_size: int = 4000
    scale_h_flip: bool = False
    aspect_ratios: Tuple[float, ...] = ()
    aspect_ratio_h_flip: bool = False

    @classmethod
    def from_section(cls, section, key: str) -> Transformations:
        """The transformations of cfg section `key` (e.g. 'TEST.BBOX_AUG'); bad values name the key."""
        ratios = tuple(float(r) for r in section.ASPECT_RATIOS)
        if any(r <= 0 for r in ratios):
            raise ValueError(f"{key}.ASPECT_RATIOS must be positive, got {ratios}")
        return cls(bool(section.H_FLIP), tuple(int(s) for s in section.SCALES), int(section.MAX_SIZE),
                   bool(section.SCALE_H_FLIP), ratios, bool(section.ASPECT_RATIO_H_FLIP))


def aspect_ratio_image(image: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """The image with its width scaled by `aspect_ratio` (Detectron's ``aspect_ratio_rel``)."""
    height, width = image.shape[:2]
    return cv2.resize(image, (int(round(aspect_ratio * width)), height), interpolation=cv2.INTER_LINEAR)


def scale_box_widths(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """x coordinates of (class-tiled) boxes ``(R, 4C)`` times `factor` (Detectron's ``aspect_ratio``)."""
    out = boxes.clone()
    out[:, 0::4] *= factor
    out[:, 2::4] *= factor
    return out


def augmented_passes(aug: Transformations, image: np.ndarray, settings: BlobSettings
                     ) -> List[Tuple[np.ndarray, BlobSettings, bool, float]]:
    """(image, blob settings, hflip, width factor back to the original) of every transformation of `aug`, in
    Detectron's order; `settings` are TEST.SCALE / TEST.MAX_SIZE's."""
    out = []
    if aug.h_flip:
        out.append((image, settings, True, 1.0))
    for scale in aug.scales:
        scaled = dataclasses.replace(settings, scales=(scale,), max_size=aug.max_size)
        out.append((image, scaled, False, 1.0))
        if aug.scale_h_flip:
            out.append((image, scaled, True, 1.0))
    for ratio in aug.aspect_ratios:
        stretched = aspect_ratio_image(image, ratio)
        out.append((stretched, settings, False, 1.0 / ratio))
        if aug.aspect_ratio_h_flip:
            out.append((stretched, settings, True, 1.0 / ratio))
    return out
