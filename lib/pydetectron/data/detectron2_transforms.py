"""detectron2's input conventions (MODEL.CONVENTIONS 'detectron2'): reading, resizing, flipping, targets.

As detectron2's ``DatasetMapper`` prepares an image: read with PIL and its EXIF orientation applied
(``detection_utils.read_image``), resized by ``ResizeShortestEdge`` (output size rounded as its
``get_output_shape``; PIL bilinear on the uint8 image, before normalisation), then flipped (``RandomFlip`` comes
after the resize); the annotations are scaled per axis (``ResizeTransform`` has separate x / y factors),
clipped to the image, empty boxes dropped (``filter_empty_instances``), keypoints outside the image made
unlabelled, and crowd objects left out of training (``DatasetMapper`` drops ``iscrowd`` annotations). The flip of
the annotations themselves (x -> W - x) is made when the roidb is built (``roidb.flip_entry``).
"""

from __future__ import annotations

import os
from typing import Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EMPTY_BOX = 1e-5  # detectron2's Boxes.nonempty threshold


def _exif_oriented(image: Image.Image) -> Image.Image:
    """The image as its EXIF orientation tag says it is displayed (detectron2's _apply_exif_orientation)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 (PIL raises many kinds on broken EXIF; detectron2 ignores them too)
        return image
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def read_image_pil(path: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR image read as detectron2 reads it: PIL, EXIF orientation applied, converted to RGB
    (then reversed to BGR, pydetectron's in-memory order); an unreadable file raises an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(_exif_oriented(image).convert("RGB"))
    except (OSError, Image.UnidentifiedImageError, ValueError) as exc:
        raise OSError(f"image file {path!r} could not be decoded by PIL ({exc})") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


def resize_output_shape(height: int, width: int, short_edge: int, max_size: int) -> Tuple[int, int]:
    """(new height, new width) of detectron2's ResizeShortestEdge.get_output_shape: the short side to
    ``short_edge`` unless the long side would pass ``max_size``; each side rounded half up on its own."""
    size = float(short_edge)
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        shrink = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_scale(height: int, width: int, short_edge: int, max_size: int) -> float:
    """The scale factor ResizeShortestEdge aims at before rounding (im_info's third column in detectron2 mode;
    coordinates use the exact per-axis factors new / old instead)."""
    scale = float(short_edge) / min(height, width)
    longest = scale * max(height, width)
    return scale * (max_size / longest) if longest > max_size else scale


def resize_image(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """detectron2's ResizeTransform.apply_image on a uint8 (H, W, 3) image: PIL bilinear."""
    if image.dtype != np.uint8:
        raise ValueError(f"detectron2 mode resizes uint8 images (as read), got {image.dtype}")
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def prepare_image(image: np.ndarray, short_edge: int, max_size: int, flipped: bool = False
                  ) -> Tuple[np.ndarray, Tuple[int, int], float]:
    """(resized uint8 image, its (height, width), nominal scale): ResizeShortestEdge then the flip."""
    height, width = image.shape[:2]
    new_h, new_w = resize_output_shape(height, width, short_edge, max_size)
    resized = resize_image(image, new_h, new_w)
    if flipped:
        resized = resized[:, ::-1]
    return resized, (new_h, new_w), resize_scale(height, width, short_edge, max_size)


def _scale_segm(segm, sx: float, sy: float, size_hw: Tuple[int, int]):
    if isinstance(segm, dict):  # an RLE object: its mask resized (nearest), as pydetectron's Detectron mode
        return cv2.resize(mask_util.decode(segm), (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST)
    out = []
    for poly in segm:
        p = np.array(poly, dtype=np.float64)
        p[0::2] *= sx
        p[1::2] *= sy
        out.append(p.astype(np.float32))
    return out


def scale_targets(entry: dict, size_hw: Tuple[int, int]) -> dict:
    """A roidb entry's training targets in network-input coordinates, detectron2's way: crowd objects left
    out; boxes, polygons and keypoints scaled by new / old per axis; boxes clipped to [0, w] x [0, h] and empty
    ones (side <= 1e-5) dropped with their class, mask and keypoints; keypoints outside the image unlabelled and
    unlabelled ones (0, 0, 0)."""
    if entry.get("proposals") is not None:
        raise ValueError("precomputed proposals are not supported in detectron2 mode (MODEL.CONVENTIONS)")
    h, w = size_hw
    sx, sy = w / entry["width"], h / entry["height"]
    factors = np.array([sx, sy, sx, sy])  # float64 products, cast once (detectron2's transforms run in float64)
    boxes = (np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4) * factors).astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = ~np.asarray(entry["is_crowd"], dtype=bool)
    keep &= (boxes[:, 2] - boxes[:, 0] > EMPTY_BOX) & (boxes[:, 3] - boxes[:, 1] > EMPTY_BOX)
    kps = entry["gt_keypoints"]
    if kps is not None:
        kps = kps[keep].astype(np.float64)
        kps[:, :, 0] *= sx
        kps[:, :, 1] *= sy
        inside = (kps[:, :, 0] >= 0) & (kps[:, :, 0] <= w) & (kps[:, :, 1] >= 0) & (kps[:, :, 1] <= h)
        kps[:, :, 2][~inside] = 0
        kps[kps[:, :, 2] == 0] = 0
        kps = kps.astype(np.float32)
    out = {k: entry[k] for k in ("image", "id", "width", "height", "flipped")}
    out.update(
        boxes=boxes[keep],
        gt_classes=np.asarray(entry["gt_classes"])[keep],
        is_crowd=np.zeros(int(keep.sum()), dtype=bool),
        segms=[_scale_segm(s, sx, sy, size_hw) for s, k in zip(entry["segms"], keep) if k],
        gt_keypoints=kps,
        image_id=entry["id"],
    )
    return out
