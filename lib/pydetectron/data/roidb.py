"""The training roidb: datasets combined, flipped copies appended, unusable images filtered (Detectron's
``datasets/roidb.py``: combined_roidb_for_training, extend_with_flipped_entries, filter_for_training)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from pydetectron.boxes import box_overlaps_with_gt, flip_boxes
from pydetectron.data.coco import AnnotationError, CocoDataset, DatasetMeta
from pydetectron.data.proposals import attach_proposals
from pydetectron.data.transforms import flip_keypoints, flip_segms

logger = logging.getLogger(__name__)


def flip_entry(entry: dict, keypoint_flip_perm: np.ndarray | None, legacy_plus_one: bool = True) -> dict:
    """A roidb entry mirrored left-right: boxes, polygons, RLE masks, keypoints (left/right names swapped);
    x -> W - 1 - x (Detectron), or x -> W - x without ``legacy_plus_one`` (detectron2)."""
    width = entry["width"]
    out = dict(entry)
    out["boxes"] = flip_boxes(torch.from_numpy(entry["boxes"]), width, legacy_plus_one).numpy()
    if entry.get("proposals") is not None:
        out["proposals"] = flip_boxes(torch.from_numpy(entry["proposals"]), width, legacy_plus_one).numpy()
    out["segms"] = flip_segms(entry["segms"], width, legacy_plus_one)
    if entry["gt_keypoints"] is not None:
        out["gt_keypoints"] = flip_keypoints(entry["gt_keypoints"], keypoint_flip_perm, width, legacy_plus_one)
    out["flipped"] = not entry["flipped"]
    return out


def check_masks_present(roidb: List[dict], ann_file: str) -> None:
    """Mask training needs a segmentation for every non-crowd object (a box-only annotation has none)."""
    for entry in roidb:
        for g, (segm, crowd) in enumerate(zip(entry["segms"], entry["is_crowd"])):
            if not crowd and isinstance(segm, list) and not segm:
                raise AnnotationError(
                    f"{ann_file}, image id {entry['id']!r}, field 'segmentation': object #{g} (box "
                    f"{np.round(entry['boxes'][g], 1).tolist()}) has no segmentation, but MODEL.MASK_ON trains "
                    "masks: add its polygons or RLE, or train without masks")


def extend_with_flipped_entries(roidb: List[dict], meta: DatasetMeta, legacy_plus_one: bool = True) -> List[dict]:
    """``roidb`` followed by a mirrored copy of every entry (TRAIN.USE_FLIPPED)."""
    perm = meta.keypoint_flip_permutation()
    return roidb + [flip_entry(e, perm, legacy_plus_one) for e in roidb]


@dataclass(frozen=True)
class OverlapThresholds:
    """The TRAIN.* overlaps that make a box foreground or background (FG_THRESH, BG_THRESH_HI / LO) and the
    crowd coverage that takes a precomputed proposal out of both (CROWD_FILTER_THRESH)."""

    fg: float = 0.5
    bg_hi: float = 0.5
    bg_lo: float = 0.0
    crowd_filter: float = 0.7

    @classmethod
    def from_cfg(cls, cfg) -> OverlapThresholds:
        t = cfg.TRAIN
        return cls(float(t.FG_THRESH), float(t.BG_THRESH_HI), float(t.BG_THRESH_LO), float(t.CROWD_FILTER_THRESH))


def is_valid_for_training(entry: dict, keypoints_on: bool, thresholds: OverlapThresholds = OverlapThresholds()
                          ) -> bool:
    """Detectron's filter_for_training: some box must be foreground or background. Non-crowd gt boxes are
    foreground (overlap 1), crowd ones neither (-1); precomputed proposals count with their best gt IoU, or
    -1 inside a crowd region. With keypoints on, a visible keypoint is needed too."""
    is_crowd = np.asarray(entry["is_crowd"], dtype=bool)
    overlaps = torch.where(torch.from_numpy(is_crowd), -1.0, 1.0)
    proposals = entry.get("proposals")
    if proposals is not None and len(proposals) > 0:
        proposal_overlaps, _ = box_overlaps_with_gt(
            torch.as_tensor(proposals, dtype=torch.float32), torch.as_tensor(entry["boxes"], dtype=torch.float32),
            torch.from_numpy(is_crowd), thresholds.crowd_filter)
        overlaps = torch.cat([overlaps, proposal_overlaps])
    foreground = overlaps >= thresholds.fg
    background = (overlaps < thresholds.bg_hi) & (overlaps >= thresholds.bg_lo)
    valid = bool((foreground | background).any())
    if keypoints_on:
        valid = valid and entry["has_visible_keypoints"]
    return valid


def filter_for_training(roidb: List[dict], keypoints_on: bool = False,
                        thresholds: OverlapThresholds = OverlapThresholds()) -> List[dict]:
    """Drop the entries nothing can be learnt from; logs how many."""
    kept = [e for e in roidb if is_valid_for_training(e, keypoints_on, thresholds)]
    logger.info("filter_for_training: kept %d of %d roidb entries", len(kept), len(roidb))
    return kept


def combined_roidb_for_training(
    dataset_names: Sequence[str],
    use_flipped: bool = True,
    keypoints_on: bool = False,
    gt_min_area: float = -1.0,
    cache_dir: str | None = None,
    proposal_files: Sequence[str] = (),
    thresholds: OverlapThresholds = OverlapThresholds(),
    masks_on: bool = False,
    conventions: str = "detectron",
) -> Tuple[List[dict], DatasetMeta]:
    """The training roidb of one or more catalog datasets (which must share categories) and their meta;
    with `proposal_files` (one per dataset, TRAIN.PROPOSAL_FILES) each entry gets its precomputed proposals;
    with `masks_on` every non-crowd object must have a segmentation. `conventions` 'detectron2': detectron2's
    boxes, keypoints and flips (``CocoDataset.get_roidb``, ``flip_entry``)."""
    if isinstance(dataset_names, str):
        dataset_names = (dataset_names,)
    if not dataset_names:
        raise ValueError("no training dataset given (TRAIN.DATASETS is empty)")
    if proposal_files and len(proposal_files) != len(dataset_names):
        raise ValueError(f"TRAIN.PROPOSAL_FILES has {len(proposal_files)} files for {len(dataset_names)} datasets "
                         f"{tuple(dataset_names)}; give one per dataset")
    roidb: List[dict] = []
    meta = None
    for index, name in enumerate(dataset_names):
        ds = CocoDataset(name, cache_dir=cache_dir)
        part = ds.get_roidb(gt_min_area=gt_min_area, conventions=conventions)
        if masks_on:
            check_masks_present(part, ds.spec.ann_file)
        if proposal_files:
            attach_proposals(part, proposal_files[index])
        if meta is not None and ds.meta.json_category_id_to_contiguous_id != meta.json_category_id_to_contiguous_id:
            raise ValueError(f"dataset {name!r} has categories different from {dataset_names[0]!r}")
        if meta is not None and ds.meta.keypoint_names != meta.keypoint_names:
            raise ValueError(f"dataset {name!r} has keypoints different from {dataset_names[0]!r}")
        meta = ds.meta
        if use_flipped:
            part = extend_with_flipped_entries(part, meta, legacy_plus_one=conventions != "detectron2")
        roidb.extend(part)
    if keypoints_on and not meta.keypoint_names:
        raise ValueError(f"MODEL.KEYPOINTS_ON but datasets {tuple(dataset_names)} define no keypoints")
    return filter_for_training(roidb, keypoints_on, thresholds), meta


def combined_roidb_from_cfg(cfg, cache_dir: str | None = None) -> Tuple[List[dict], DatasetMeta]:
    """``combined_roidb_for_training`` with TRAIN.DATASETS, TRAIN.USE_FLIPPED, MODEL.KEYPOINTS_ON,
    TRAIN.GT_MIN_AREA, TRAIN.PROPOSAL_FILES, the TRAIN overlap thresholds, MODEL.MASK_ON and MODEL.CONVENTIONS."""
    return combined_roidb_for_training(
        tuple(cfg.TRAIN.DATASETS),
        use_flipped=bool(cfg.TRAIN.USE_FLIPPED),
        keypoints_on=bool(cfg.MODEL.KEYPOINTS_ON),
        gt_min_area=float(cfg.TRAIN.GT_MIN_AREA),
        cache_dir=cache_dir,
        proposal_files=tuple(cfg.TRAIN.PROPOSAL_FILES),
        thresholds=OverlapThresholds.from_cfg(cfg),
        masks_on=bool(cfg.MODEL.MASK_ON),
        conventions=str(cfg.MODEL.CONVENTIONS),
    )
