"""A small synthetic COCO-format dataset (circles, squares, triangles) to train and test on a CPU.

Deterministic: image ``i`` of a split depends only on (seed, split, i). Each image is 160-320 px per side
(portrait and landscape), on a textured, noisy background, with 2-6 shapes of random size, colour and
rotation; triangles also vary their width/height ratio. Some images hold a crowd region: a cluster of small
dots annotated once with ``iscrowd=1`` (uncompressed RLE, category 'circle').

Occlusion: later shapes are drawn over earlier ones, but a placement that would hide more than 40 % of an
earlier shape is redrawn elsewhere. Every annotation describes what is VISIBLE: ``area`` is the visible pixel
count and ``bbox`` its tight box; the segmentation is the shape's polygon when nothing covers it, and a
compressed RLE of the visible pixels when something does. Pixels are painted from the same pycocotools
rasterisation of the polygon, so polygon and image agree exactly.

Categories use the non-contiguous ids 1 (circle), 3 (square), 7 (triangle) to exercise id mapping.
The keypoint variant annotates triangles only, with keypoints 'top' (apex), 'left', 'right' (base corners,
left = smaller x before the +-25 degree tilt), flip pairs left <-> right, a triangle skeleton, and the per-keypoint
OKS sigmas stored in the category under 'oks_sigmas' (0.07 each: wide enough for 1-2 pixel labelling error on
shapes of 16-170 px). Visibility is 1 when the vertex pixel is covered by a later shape, else 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]
KEYPOINT_NAMES = ["top", "left", "right"]
SKELETON = [[1, 2], [2, 3], [3, 1]]
OKS_SIGMA = 0.07
MAX_OCCLUDED_FRACTION = 0.4
_SPLIT_CODES = {"train": 0, "val": 1}


@dataclass
class _Shape:
    category_id: int
    polygon: np.ndarray  # flat [x0, y0, x1, y1, ...] float64
    mask: np.ndarray  # (H, W) uint8, the full shape
    keypoints: np.ndarray | None = None  # (3, 2) for triangles: top, left, right


def _rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    rles = mask_util.frPyObjects([polygon.tolist()], height, width)
    return mask_util.decode(mask_util.merge(rles))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradient + blotchy low-frequency texture, float32 (H, W, 3)."""
    base = rng.uniform(40, 215, size=3)
    slope = rng.uniform(-50, 50, size=(2, 3))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    grad = ys[..., None] / height * slope[0] + xs[..., None] / width * slope[1]
    coarse = rng.normal(0, 25, size=(height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return (base + grad + texture).astype(np.float32)


def _shape_polygon(rng: np.random.Generator, category_id: int, size: float) -> Tuple[np.ndarray, np.ndarray | None]:
    """Vertices (V, 2) centred at the origin, and the triangle's (top, left, right) rows if any."""
    if category_id == 1:  # circle
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1) * size / 2, None
    angle = rng.uniform(0, np.pi / 2) if category_id == 3 else rng.uniform(-1, 1) * math.radians(25)
    if category_id == 3:  # square
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * size / 2
    else:  # triangle: apex up, base width/height ratio 0.6-1.4
        base = size * rng.uniform(0.6, 1.4)
        pts = np.array([[0, -2 * size / 3], [-base / 2, size / 3], [base / 2, size / 3]])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = pts @ rot.T
    return pts, (pts if category_id == 7 else None)


def _place(rng: np.random.Generator, height: int, width: int, min_side: int) -> _Shape:
    category_id = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"]
    size = rng.uniform(16, 0.55 * min_side)
    pts, kps = _shape_polygon(rng, category_id, size)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = np.array([rng.uniform(1 - lo[0], width - 2 - hi[0]), rng.uniform(1 - lo[1], height - 2 - hi[1])])
    pts = np.round(pts + centre, 2)
    return _Shape(category_id, pts.reshape(-1), _rasterize(pts.reshape(-1), height, width),
                  None if kps is None else np.round(kps + centre, 2))


def _crowd_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluster of 8-15 small dots, as one (H, W) uint8 mask."""
    mask = np.zeros((height, width), np.uint8)
    cx, cy = rng.uniform(30, width - 30), rng.uniform(30, height - 30)
    for _ in range(int(rng.integers(8, 16))):
        x, y = cx + rng.uniform(-25, 25), cy + rng.uniform(-25, 25)
        cv2.circle(mask, (int(round(x)), int(round(y))), int(rng.integers(3, 7)), 1, thickness=-1)
    return mask


def _tight_box(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.nonzero(np.diff(flat))[0] + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def render_image(seed: int, split: str, index: int) -> Tuple[np.ndarray, List[dict]]:
    """One image (H, W, 3) uint8 BGR and its annotations (COCO fields, without ids) of split/index."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    width, height = (int(v) for v in rng.integers(160, 321, size=2))
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)  # which annotation shows at each pixel
    objects: List[dict] = []
    if rng.uniform() < 0.15:
        crowd = _crowd_mask(rng, height, width)
        image[crowd > 0] = rng.uniform(0, 255, size=3)
        owner[crowd > 0] = 0
        objects.append({"category_id": 1, "iscrowd": 1, "full": crowd})
    for _ in range(int(rng.integers(2, 7))):
        for _attempt in range(10):
            shape = _place(rng, height, width, min(height, width))
            if _occlusion_ok(shape.mask, owner, objects):
                break
        else:
            continue
        k = len(objects)
        image[shape.mask > 0] = rng.uniform(0, 255, size=3)
        owner[shape.mask > 0] = k
        objects.append({"category_id": shape.category_id, "iscrowd": 0, "full": shape.mask,
                        "polygon": shape.polygon, "keypoints": shape.keypoints})
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    anns = [_annotation(k, obj, owner) for k, obj in enumerate(objects)]
    return np.clip(image, 0, 255).astype(np.uint8), [a for a in anns if a is not None]


def _occlusion_ok(mask: np.ndarray, owner: np.ndarray, objects: List[dict]) -> bool:
    """A new shape may hide at most MAX_OCCLUDED_FRACTION of any earlier shape's full area."""
    covered = owner[mask > 0]
    covered = covered[covered >= 0]
    if covered.size == 0:
        return True
    hidden = np.bincount(covered, minlength=len(objects))
    visible = np.bincount(owner[owner >= 0], minlength=len(objects))
    full = np.array([o["full"].sum() for o in objects])
    return bool(np.all(visible - hidden >= (1 - MAX_OCCLUDED_FRACTION) * full))


def _annotation(k: int, obj: dict, owner: np.ndarray) -> dict | None:
    visible = (owner == k).astype(np.uint8)
    area = int(visible.sum())
    if area == 0:
        return None
    ann = {"category_id": obj["category_id"], "iscrowd": obj["iscrowd"], "area": float(area),
           "bbox": _tight_box(visible)}
    if obj["iscrowd"]:
        ann["segmentation"] = _uncompressed_rle(visible)
    elif area == int(obj["full"].sum()):
        ann["segmentation"] = [obj["polygon"].tolist()]
    else:
        ann["segmentation"] = _compressed_rle(visible)
    if obj.get("keypoints") is not None:
        h, w = owner.shape
        kps = []
        for x, y in obj["keypoints"]:
            xi, yi = int(min(max(round(x), 0), w - 1)), int(min(max(round(y), 0), h - 1))
            kps += [float(x), float(y), 1 if owner[yi, xi] > k else 2]  # 1: a later shape covers it
        ann["keypoints"] = kps
        ann["num_keypoints"] = 3
    return ann


def generate_split(root: str | Path, split: str, num_images: int, seed: int = 0) -> Dict[str, Path]:
    """Write ``root/<split>/*.jpg`` and ``root/annotations/{instances,keypoints}_<split>.json``."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, instances, keypoints = [], [], []
    for i in range(num_images):
        image, anns = render_image(seed, split, i)
        file_name = f"{split}_{i:06d}.jpg"
        if not cv2.imwrite(str(root / split / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {root / split / file_name}")
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for ann in anns:
            ann.update(id=len(instances) + 1, image_id=image_id)
            instances.append({k: v for k, v in ann.items() if k not in ("keypoints", "num_keypoints")})
            if ann["category_id"] == 7 and not ann["iscrowd"]:
                keypoints.append(ann)
    kp_category = dict(CATEGORIES[2], keypoints=KEYPOINT_NAMES, skeleton=SKELETON,
                       oks_sigmas=[OKS_SIGMA] * len(KEYPOINT_NAMES))
    info = {"description": f"pydetectron shapes, split {split}, seed {seed}"}
    paths = {"instances": root / "annotations" / f"instances_{split}.json",
             "keypoints": root / "annotations" / f"keypoints_{split}.json"}
    _write_json(paths["instances"], {"info": info, "images": images, "annotations": instances,
                                     "categories": CATEGORIES})
    _write_json(paths["keypoints"], {"info": info, "images": images, "annotations": keypoints,
                                     "categories": [kp_category]})
    return paths


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    tmp.replace(path)


def make_shapes_dataset(root: str | Path, num_train: int = 1000, num_val: int = 200, seed: int = 0
                        ) -> Dict[str, Dict[str, Path]]:
    """Both splits of the shapes dataset under ``root`` (the catalog's default is ``data/shapes``)."""
    return {"train": generate_split(root, "train", num_train, seed),
            "val": generate_split(root, "val", num_val, seed)}
