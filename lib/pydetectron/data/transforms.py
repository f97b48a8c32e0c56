"""Image and annotation transforms: reading, flipping, Detectron's scaling, padding, aspect cropping.

Boxes are inclusive-pixel [x1, y1, x2, y2]; a horizontal flip maps x -> width - 1 - x (Detectron).
"""

from __future__ import annotations

import math
import os
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch


# ---------------------------------------------------------------------------------------------- reading
def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR image; a missing or undecodable file raises an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is None:
        raise OSError(f"image file {path!r} could not be decoded by cv2.imread (corrupt or unsupported format)")
    return im


# ---------------------------------------------------------------------------------------------- flipping
def flip_boxes_np(boxes: np.ndarray, width: int, legacy_plus_one: bool = True) -> np.ndarray:
    """(N, 4) xyxy boxes mirrored in an image of ``width``: x1' = W - 1 - x2, x2' = W - 1 - x1 (Detectron's
    inclusive boxes), or x1' = W - x2, x2' = W - x1 without ``legacy_plus_one`` (detectron2)."""
    right = width - (1 if legacy_plus_one else 0)
    out = boxes.copy()
    out[:, 0] = right - boxes[:, 2]
    out[:, 2] = right - boxes[:, 0]
    return out


def flip_polygons(polys: Sequence[np.ndarray], width: int, legacy_plus_one: bool = True) -> List[np.ndarray]:
    """Flat [x0, y0, x1, y1, ...] polygons mirrored: x -> width - 1 - x (Detectron's flip_segms), or
    x -> width - x without ``legacy_plus_one`` (detectron2's HFlipTransform)."""
    right = width - (1 if legacy_plus_one else 0)
    out = []
    for poly in polys:
        flipped = np.array(poly, dtype=np.float32)
        flipped[0::2] = right - flipped[0::2]
        out.append(flipped)
    return out


def flip_rle(rle: dict) -> dict:
    """A compressed RLE of an (H, W) mask, mirrored left-right."""
    mask = mask_util.decode(rle)
    flipped = mask_util.encode(np.asfortranarray(mask[:, ::-1]))
    return {"size": list(flipped["size"]), "counts": flipped["counts"]}


def flip_segms(segms: Sequence, width: int, legacy_plus_one: bool = True) -> list:
    """Each segm (polygon list or compressed RLE dict) mirrored left-right."""
    return [flip_rle(s) if isinstance(s, dict) else flip_polygons(s, width, legacy_plus_one) for s in segms]


def flip_keypoints(keypoints: np.ndarray, flip_perm: np.ndarray, width: int, legacy_plus_one: bool = True
                   ) -> np.ndarray:
    """(G, K, 3) keypoints mirrored: left/right names swapped by ``flip_perm``, x -> W - 1 - x; x = 0 where v = 0
    (Detectron). Without ``legacy_plus_one``: x -> W - x only (detectron2 zeroes unlabelled points after all its
    transforms, ``detectron2_transforms.clean_targets``)."""
    out = keypoints[:, flip_perm, :].copy()
    if not legacy_plus_one:
        out[:, :, 0] = width - out[:, :, 0]
        return out
    out[:, :, 0] = width - 1 - out[:, :, 0]
    out[:, :, 0][out[:, :, 2] == 0] = 0  # COCO convention kept by Detectron's flip_keypoints
    return out


# ---------------------------------------------------------------------------------------------- scaling
def compute_im_scale(height: int, width: int, target_size: int, max_size: int) -> float:
    """Detectron's scale: shortest side to ``target_size`` unless the longest would exceed ``max_size``."""
    im_scale = float(target_size) / float(min(height, width))
    if np.round(im_scale * max(height, width)) > max_size:
        im_scale = float(max_size) / float(max(height, width))
    return im_scale


def normalize(image: np.ndarray, means: np.ndarray, stds: np.ndarray, to_rgb: bool) -> np.ndarray:
    """uint8 BGR (h, w, 3) -> float32 ``(x - mean) / std`` in the network's channel order (RGB if `to_rgb`);
    `means` / `stds` are in that order. Detectron normalises before its resize, detectron2 after."""
    if to_rgb:
        image = image[:, :, ::-1]
    out = image.astype(np.float32)
    out -= means
    if np.any(stds != 1):
        out /= stds
    return out


def prep_im_for_blob(im: np.ndarray, pixel_means: np.ndarray, pixel_stds: np.ndarray, target_size: int,
                     max_size: int, to_rgb: bool = False) -> Tuple[np.ndarray, float]:
    """BGR uint8 (H, W, 3) -> normalised float32 (h, w, 3) resized with INTER_LINEAR, and its im_scale.

    ``pixel_means`` / ``pixel_stds`` are in the output channel order (BGR unless ``to_rgb``).
    """
    im = normalize(im, pixel_means, pixel_stds, to_rgb)
    im_scale = compute_im_scale(im.shape[0], im.shape[1], target_size, max_size)
    im = cv2.resize(im, None, None, fx=im_scale, fy=im_scale, interpolation=cv2.INTER_LINEAR)
    return im, im_scale


def padded_size(height: int, width: int, stride: int) -> Tuple[int, int]:
    """(height, width) rounded up to a multiple of ``stride`` (0 or 1: unchanged)."""
    if stride <= 1:
        return height, width
    return int(math.ceil(height / stride) * stride), int(math.ceil(width / stride) * stride)


def im_list_to_blob(ims: Sequence[np.ndarray], stride: int, shared: bool = False) -> torch.Tensor:
    """(h_i, w_i, 3) float images -> Tensor[N, 3, H, W] float32, zero-padded bottom/right to a multiple of
    ``stride``. ``shared``: allocate it in shared memory (as torch's default_collate does in a DataLoader
    worker), so sending it to the main process costs no copy."""
    max_h = max(im.shape[0] for im in ims)
    max_w = max(im.shape[1] for im in ims)
    height, width = padded_size(max_h, max_w, stride)
    shape = (len(ims), 3, height, width)
    if shared:
        storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape), device="cpu")
        blob = torch.empty(0).new(storage).view(shape)
    else:
        blob = torch.empty(shape)
    out = blob.numpy()  # every element is written once below, by numpy (torch.zeros is slow on busy cores)
    for i, im in enumerate(ims):
        h, w = im.shape[:2]
        out[i, :, :h, :w] = im.transpose(2, 0, 1)
        out[i, :, h:, :] = 0
        out[i, :, :h, w:] = 0
    return blob


def scale_targets(entry: dict, im_scale: float, scaled_hw: Tuple[int, int]) -> dict:
    """A (possibly flipped) roidb entry with its gt moved to network-input coordinates.

    Boxes, precomputed proposals, polygons and keypoint x/y are multiplied by ``im_scale``; RLE masks become
    uint8 (h, w) arrays at the scaled size ``scaled_hw`` (nearest neighbour).
    """
    h, w = scaled_hw
    segms = []
    for s in entry["segms"]:
        if isinstance(s, dict):
            segms.append(cv2.resize(mask_util.decode(s), (w, h), interpolation=cv2.INTER_NEAREST))
        else:
            segms.append([p * np.float32(im_scale) for p in s])
    kps = entry["gt_keypoints"]
    if kps is not None:
        kps = kps.copy()
        kps[:, :, :2] *= im_scale
    out = {k: entry[k] for k in ("image", "id", "width", "height", "flipped", "gt_classes", "is_crowd")}
    out.update(boxes=entry["boxes"] * np.float32(im_scale), segms=segms, gt_keypoints=kps, image_id=entry["id"])
    if entry.get("proposals") is not None:
        out["proposals"] = entry["proposals"] * np.float32(im_scale)
    return out


# ---------------------------------------------------------------------------------------------- aspect cropping
def _crop_start(lo: float, hi: float, size: int, crop: int, rng: np.random.Generator) -> int:
    """Detectron.pytorch's choice of the crop start along one axis, from the gt extent [lo, hi]."""
    lo, hi = int(math.floor(lo)), int(math.floor(hi))
    if lo == 0:
        return 0
    region = hi - lo + 1
    if region < crop:
        s_min, s_max = max(hi - crop, 0), min(lo, size - crop)
        return s_min if s_min >= s_max else int(rng.integers(s_min, s_max + 1))
    extra = int((region - crop) / 2)
    return lo if extra == 0 else int(rng.integers(lo, lo + extra + 1))


def crop_to_aspect(im: np.ndarray, entry: dict, ratio_lo: float, ratio_hi: float,
                   rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
    """Crop a scaled image whose width/height ratio is outside [ratio_lo, ratio_hi] to that bound.

    As Detectron.pytorch's roibatchLoader (TRAIN.ASPECT_CROPPING): the cropped axis keeps as much of the gt as
    possible; gt boxes (and proposals) are shifted and clamped, and boxes left degenerate (x1 == x2 or
    y1 == y2) are dropped along with their classes, masks and keypoints. ``entry`` is in network-input
    coordinates (scale_targets). If no non-crowd box would survive, the image is returned uncropped.
    """
    h, w = im.shape[:2]
    ratio = w / float(h)
    boxes = entry["boxes"]
    if ratio_lo <= ratio <= ratio_hi or len(boxes) == 0:
        return im, entry
    vertical = ratio < ratio_lo  # portrait: crop the height
    axis = 1 if vertical else 0
    size = h if vertical else w
    crop = int(math.ceil(w / ratio_lo)) if vertical else int(math.ceil(h * ratio_hi))
    crop = min(crop, size)
    start = _crop_start(boxes[:, axis].min(), boxes[:, axis + 2].max(), size, crop, rng)
    new_boxes, keep = _crop_boxes(boxes, axis, start, crop)
    if not (keep & ~entry["is_crowd"]).any():
        return im, entry
    out = dict(entry)
    out["boxes"] = new_boxes[keep]
    if entry.get("proposals") is not None:
        proposals, kept = _crop_boxes(entry["proposals"], axis, start, crop)
        out["proposals"] = proposals[kept]
    out["gt_classes"] = entry["gt_classes"][keep]
    out["is_crowd"] = entry["is_crowd"][keep]
    out["segms"] = [_crop_segm(s, axis, start, crop) for s, k in zip(entry["segms"], keep) if k]
    kps = entry["gt_keypoints"]
    if kps is not None:
        kps = kps[keep].copy()
        kps[:, :, axis] -= start
        outside = (kps[:, :, axis] < 0) | (kps[:, :, axis] > crop - 1)
        kps[outside] = 0
        out["gt_keypoints"] = kps
    cropped = im[start: start + crop] if vertical else im[:, start: start + crop]
    return cropped, out


def _crop_boxes(boxes: np.ndarray, axis: int, start: int, crop: int) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes shifted along ``axis`` (0 = x, 1 = y) into the crop window and clamped to it, and which of them
    are still boxes (not flattened to a line)."""
    out = boxes.copy()
    out[:, [axis, axis + 2]] = np.clip(out[:, [axis, axis + 2]] - start, 0, crop - 1)
    return out, (out[:, 0] != out[:, 2]) & (out[:, 1] != out[:, 3])


def _crop_segm(segm, axis: int, start: int, crop: int):
    """Polygons shifted along ``axis`` (0 = x, 1 = y); a mask array sliced to the crop window."""
    if isinstance(segm, np.ndarray):
        return segm[start: start + crop] if axis == 1 else segm[:, start: start + crop]
    out = []
    for p in segm:
        p = p.copy()
        p[axis::2] -= start
        out.append(p)
    return out

