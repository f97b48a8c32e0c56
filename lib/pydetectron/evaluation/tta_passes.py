"""The transformed copies of an image that Detectron's test-time augmentations run (``core/test.py``), shared by
box augmentation (TEST.BBOX_AUG) and mask / keypoint augmentation (TEST.MASK_AUG, TEST.KPS_AUG).

A section lists: a horizontal flip at TEST.SCALE (H_FLIP), each of SCALES with the section's MAX_SIZE (and
its flip with SCALE_H_FLIP), each width-relative aspect ratio at TEST.SCALE (and its flip with
ASPECT_RATIO_H_FLIP). The identity is not among them: each caller runs it where Detectron does.
"""

from __future__ import annotations

import dataclasses
from typing import List, Protocol, Tuple

import cv2
import numpy as np
import torch

from pydetectron.data.minibatch import BlobSettings


class AugmentationSection(Protocol):
    """The transformation fields every TEST.*_AUG section has."""

    h_flip: bool
    scales: Tuple[int, ...]
    max_size: int
    scale_h_flip: bool
    aspect_ratios: Tuple[float, ...]
    aspect_ratio_h_flip: bool


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


def augmented_passes(aug: AugmentationSection, image: np.ndarray, settings: BlobSettings
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
