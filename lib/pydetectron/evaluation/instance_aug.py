"""Test-time augmentation of masks (TEST.MASK_AUG) and keypoints (TEST.KPS_AUG), as Detectron's ``core/test.py``
does it (``im_detect_mask_aug``, ``im_detect_keypoints_aug`` and their helpers).

The final boxes (original-image pixels) are pooled again from the features of every transformation of the
image (``tta_passes``), after the identity: flips mirror the boxes and undo themselves on the predictions
(left/right keypoint channels swapped too), aspect ratios stretch the boxes' x. The per-detection predictions
are then combined element-wise:
- soft masks ``(D, M, M)`` (each detection's class): SOFT_AVG (mean), SOFT_MAX (max) or LOGIT_AVG (sigmoid of
  the mean logit);
- heatmap logits ``(D, K, S, S)``: HM_AVG (mean) or HM_MAX (max); with SCALE_SIZE_DEP, a box under AREA_TH
  (``(w + 1)(h + 1)``) ignores the passes scaled below TEST.SCALE, a larger one those scaled above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import numpy as np
import torch

from pydetectron.boxes import box_area, flip_boxes
from pydetectron.data.minibatch import BlobSettings, prepare_test_image
from pydetectron.evaluation.tta_passes import Transformations, augmented_passes, scale_box_widths
from pydetectron.modeling.mask_head import mask_probs

MASK_HEURISTICS = ("SOFT_AVG", "SOFT_MAX", "LOGIT_AVG")
KEYPOINT_HEURISTICS = ("HM_AVG", "HM_MAX")


@dataclass(frozen=True)
class InstanceAugmentation:
    """One TEST.MASK_AUG / TEST.KPS_AUG section: its transformations and how predictions are combined."""

    heur: str
    transforms: Transformations = Transformations()
    scale_size_dep: bool = False
    area_th: float = 180.0**2

    @classmethod
    def masks_from_cfg(cls, cfg) -> InstanceAugmentation | None:
        """TEST.MASK_AUG when it is ENABLED on a mask model, else None."""
        if not (cfg.MODEL.MASK_ON and cfg.TEST.MASK_AUG.ENABLED):
            return None
        if cfg.TEST.MASK_AUG.SCALE_SIZE_DEP:
            raise ValueError("TEST.MASK_AUG.SCALE_SIZE_DEP is not implemented (nor is it in Detectron)")
        return cls._from_section(cfg.TEST.MASK_AUG, "TEST.MASK_AUG", MASK_HEURISTICS)

    @classmethod
    def keypoints_from_cfg(cls, cfg) -> InstanceAugmentation | None:
        """TEST.KPS_AUG when it is ENABLED on a keypoint model, else None."""
        if not (cfg.MODEL.KEYPOINTS_ON and cfg.TEST.KPS_AUG.ENABLED):
            return None
        return cls._from_section(cfg.TEST.KPS_AUG, "TEST.KPS_AUG", KEYPOINT_HEURISTICS)

    @classmethod
    def _from_section(cls, section, key: str, heuristics: Sequence[str]) -> InstanceAugmentation:
        if section.HEUR not in heuristics:
            raise ValueError(f"{key}.HEUR {section.HEUR!r} is not one of {tuple(heuristics)}")
        return cls(str(section.HEUR), Transformations.from_section(section, key), bool(section.SCALE_SIZE_DEP),
                   float(section.AREA_TH))


@dataclass
class _InstancePass:
    """The final boxes pooled from one transformation: the RoI features and the RoIs, and how to map the
    predictions back (hflip) and which way the image was rescaled (for SCALE_SIZE_DEP)."""

    roi_feats: list
    rois: torch.Tensor  # (D, 5) network-input pixels of the transformed image
    hflip: bool
    scale: int  # the shorter-side target of this pass


def _instance_passes(model, aug: InstanceAugmentation, image: np.ndarray, settings: BlobSettings,
                     boxes: torch.Tensor, device: torch.device) -> List[_InstancePass]:
    out = []
    for im, blob_settings, hflip, width_factor in augmented_passes(aug.transforms, image, settings):
        boxes_t = scale_box_widths(boxes, 1.0 / width_factor) if width_factor != 1.0 else boxes
        if hflip:
            im = np.ascontiguousarray(im[:, ::-1])
            boxes_t = flip_boxes(boxes_t, im.shape[1])
        blob, im_scale = prepare_test_image(im, blob_settings)
        features = model.body(blob.to(device))
        rois = torch.cat([boxes_t.new_zeros((boxes_t.shape[0], 1)), boxes_t * im_scale], dim=1).to(device)
        out.append(_InstancePass([features[i] for i in model.roi_indices], rois, hflip, blob_settings.scales[0]))
    return out


def combine_masks(masks_ts: Sequence[torch.Tensor], heur: str) -> torch.Tensor:
    """Soft masks of every transformation, ``(D, M, M)`` each, combined by TEST.MASK_AUG.HEUR."""
    stacked = torch.stack(list(masks_ts))
    if heur == "SOFT_AVG":
        return stacked.mean(dim=0)
    if heur == "SOFT_MAX":
        return stacked.amax(dim=0)
    if heur == "LOGIT_AVG":
        logits = -torch.log((1.0 - stacked) / stacked.clamp(min=1e-20))
        return torch.sigmoid(logits.mean(dim=0))
    raise ValueError(f"TEST.MASK_AUG.HEUR {heur!r} is not one of {MASK_HEURISTICS}")


def combine_heatmaps(heatmaps_ts: Sequence[torch.Tensor], scales: Sequence[int], test_scale: int,
                     aug: InstanceAugmentation, boxes: torch.Tensor) -> torch.Tensor:
    """Heatmap logits of every transformation, ``(D, K, S, S)`` each (scales: each pass's shorter-side target),
    combined by TEST.KPS_AUG.HEUR, per box when SCALE_SIZE_DEP."""
    reduce: Callable[[torch.Tensor], torch.Tensor]
    if aug.heur == "HM_AVG":
        def reduce(x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=0)
    elif aug.heur == "HM_MAX":
        def reduce(x: torch.Tensor) -> torch.Tensor:
            return x.amax(dim=0)
    else:
        raise ValueError(f"TEST.KPS_AUG.HEUR {aug.heur!r} is not one of {KEYPOINT_HEURISTICS}")
    stacked = torch.stack(list(heatmaps_ts))
    if not aug.scale_size_dep:
        return reduce(stacked)
    scales_t = torch.tensor(list(scales))
    small = box_area(boxes) < aug.area_th
    combined = torch.empty_like(stacked[0])
    for i in range(stacked.shape[1]):
        use = scales_t >= test_scale if small[i] else scales_t <= test_scale
        combined[i] = reduce(stacked[use.to(stacked.device), i])
    return combined


def augmented_mask_probs(model, aug: InstanceAugmentation, image: np.ndarray, settings: BlobSettings,
                         boxes: torch.Tensor, classes: torch.Tensor, identity: torch.Tensor,
                         device: torch.device) -> torch.Tensor:
    """Detectron's ``im_detect_mask_aug``: `identity` soft masks ``(D, M, M)`` and those of every transformation
    of `image` for the final `boxes` ``(D, 4)`` (original pixels) of `classes`, combined."""
    masks_ts = [identity]
    for p in _instance_passes(model, aug, image, settings, boxes, device):
        probs = mask_probs(model.mask_head(p.roi_feats, p.rois), classes)
        masks_ts.append(probs.flip(-1) if p.hflip else probs)
    return combine_masks(masks_ts, aug.heur)


def augmented_heatmaps(model, aug: InstanceAugmentation, image: np.ndarray, settings: BlobSettings,
                       boxes: torch.Tensor, identity: torch.Tensor, keypoint_flip_perm: np.ndarray | None,
                       device: torch.device) -> torch.Tensor:
    """Detectron's ``im_detect_keypoints_aug``: `identity` heatmaps ``(D, K, S, S)`` and those of every
    transformation, flipped ones mirrored back with left/right channels swapped by `keypoint_flip_perm`
    (``flipped[:, k] = heatmaps[:, perm[k]]``), combined."""
    test_scale = settings.scales[0]
    heatmaps_ts, scales = [identity], [test_scale]
    for p in _instance_passes(model, aug, image, settings, boxes, device):
        heatmaps = model.keypoint_head(p.roi_feats, p.rois)
        if p.hflip:
            if keypoint_flip_perm is None:
                raise ValueError("TEST.KPS_AUG flips need the dataset's keypoint flip map (its keypoint names)")
            heatmaps = heatmaps[:, torch.as_tensor(keypoint_flip_perm, device=heatmaps.device)].flip(-1)
        heatmaps_ts.append(heatmaps)
        scales.append(p.scale)
    return combine_heatmaps(heatmaps_ts, scales, test_scale, aug, boxes)
