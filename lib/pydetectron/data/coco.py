"""COCO-format json -> roidb (one dict per image), as Detectron's ``datasets/json_dataset.py`` builds it.

An entry holds, in ORIGINAL image coordinates:
  ``image`` (path), ``id``, ``width``, ``height``, ``flipped`` (False here),
  ``boxes`` float32 (G, 4) inclusive [x1, y1, x2, y2] clipped to the image,
  ``gt_classes`` int64 (G,) contiguous ids 1..C, ``is_crowd`` bool (G,), ``seg_areas`` float32 (G,),
  ``segms`` length-G list: a list of flat float32 polygon arrays, or a compressed RLE dict (``size``, ``counts``),
  ``gt_keypoints`` float32 (G, K, 3) (x, y, visibility) or None, ``has_visible_keypoints``.
Crowd boxes are kept with ``is_crowd`` True (Detectron's gt_overlaps of -1): the model must never sample them
as foreground. Annotations with zero area or a box not larger than one pixel after clipping are dropped, and
counted in ``CocoDataset.num_invalid``. Parsed roidbs are cached as pickles keyed by the json's path, mtime and
size, so a big json is parsed once.

With ``conventions='detectron2'`` the entry follows detectron2's ``load_coco_json`` instead: boxes
``[x, y, x + w, y + h]`` clipped to ``[0, W] x [0, H]`` (no -1), kept when wider and taller than zero (the
``area`` field is not read), and keypoint x / y + 0.5 (detectron2 reads COCO's integer keypoints as pixel
indices and moves them to pixel centres).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

from pydetectron.boxes import xywh_to_xyxy
from pydetectron.data.cache import read_cache, write_cache
from pydetectron.data.catalog import DatasetSpec, data_dir, get_dataset

logger = logging.getLogger(__name__)

ENV_CACHE_DIR = "PYDETECTRON_CACHE"
_CACHE_VERSION = 4
CONVENTIONS = ("detectron", "detectron2")


class AnnotationError(ValueError):
    """A COCO json that does not have the content we need; the message names file, image id and field."""


@dataclass
class DatasetMeta:
    """Category and keypoint facts of a dataset, needed to train and to write results back in json ids."""

    classes: List[str]  # index 0 is '__background__'
    json_category_id_to_contiguous_id: Dict[int, int]
    contiguous_category_id_to_json_id: Dict[int, int]
    keypoint_names: List[str] | None = None
    keypoint_flip_map: Dict[str, str] = field(default_factory=dict)
    oks_sigmas: List[float] | None = None
    skeleton: List[List[int]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names) if self.keypoint_names else 0

    def keypoint_flip_permutation(self) -> np.ndarray | None:
        """perm such that flipped_keypoints[:, k] = keypoints[:, perm[k]] (left/right pairs swapped)."""
        if not self.keypoint_names:
            return None
        index = {n: i for i, n in enumerate(self.keypoint_names)}
        perm = np.arange(len(self.keypoint_names))
        for a, b in self.keypoint_flip_map.items():
            perm[index[a]], perm[index[b]] = index[b], index[a]
        return perm


def keypoint_flip_map(names: Sequence[str]) -> Dict[str, str]:
    """Left/right pairs by name: 'left_eye' <-> 'right_eye', 'left' <-> 'right' (each pair listed once)."""
    present = set(names)
    pairs = {}
    for name in names:
        if "left" in name and name.replace("left", "right") in present:
            pairs[name] = name.replace("left", "right")
    return pairs


def default_cache_dir() -> Path:
    """``$PYDETECTRON_CACHE``, else ``<data dir>/cache`` (Detectron's DATA_DIR/cache)."""
    return Path(os.environ.get(ENV_CACHE_DIR, str(data_dir() / "cache"))).expanduser()


# ---------------------------------------------------------------------------------------------- parsing
class _Reader:
    """Validates fields with errors naming the file, the image id and the field."""

    def __init__(self, ann_file: str):
        self.ann_file = ann_file

    def fail(self, what: str, image_id: Any = None, field_name: str | None = None) -> AnnotationError:
        where = f"{self.ann_file}"
        if image_id is not None:
            where += f", image id {image_id!r}"
        if field_name is not None:
            where += f", field {field_name!r}"
        return AnnotationError(f"{where}: {what}")

    def get(self, record: dict, key: str, kind: type | tuple, image_id: Any = None, context: str = "") -> Any:
        if not isinstance(record, dict):
            raise self.fail(f"{context}expected an object, got {type(record).__name__}", image_id, key)
        if key not in record:
            raise self.fail(f"{context}missing field", image_id, key)
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(f"{context}has type {type(value).__name__}", image_id, key)
        return value


def _load_json(ann_file: str) -> dict:
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file {ann_file!r} does not exist")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{ann_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AnnotationError(f"{ann_file}: top level must be an object with 'images' and 'categories'")
    return data


def _parse_skeleton(cat: dict, num_keypoints: int, r: _Reader, context: str) -> List[List[int]] | None:
    """COCO's skeleton: pairs of 1-based keypoint indices (optional)."""
    if cat.get("skeleton") is None:
        return None
    skeleton = r.get(cat, "skeleton", list, context=context)
    for pair in skeleton:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= num_keypoints for v in pair)):
            raise r.fail(f"{context}{pair!r} is not a pair of 1-based keypoint indices in 1..{num_keypoints}",
                         field_name="skeleton")
    return skeleton


def _parse_categories(data: dict, r: _Reader) -> DatasetMeta:
    cats = r.get(data, "categories", list)
    names, ids = [], []
    kp_names = oks_sigmas = skeleton = None
    for i, cat in enumerate(cats):
        ctx = f"category #{i}: "
        ids.append(r.get(cat, "id", int, context=ctx))
        names.append(str(r.get(cat, "name", str, context=ctx)))
        if "keypoints" in cat:
            this = list(r.get(cat, "keypoints", list, context=ctx))
            if kp_names is not None and this != kp_names:
                raise r.fail(f"{ctx}keypoint names differ between categories", field_name="keypoints")
            kp_names = this
            skeleton = _parse_skeleton(cat, len(kp_names), r, ctx)
            if "oks_sigmas" in cat:
                oks_sigmas = r.get(cat, "oks_sigmas", list, context=ctx)
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in oks_sigmas):
                    raise r.fail(f"{ctx}sigmas must be positive numbers, got {oks_sigmas!r}", field_name="oks_sigmas")
                oks_sigmas = [float(v) for v in oks_sigmas]
                if len(oks_sigmas) != len(kp_names):
                    raise r.fail(f"{ctx}{len(oks_sigmas)} sigmas for {len(kp_names)} keypoints",
                                 field_name="oks_sigmas")
    if len(set(ids)) != len(ids):
        raise r.fail("duplicate category ids", field_name="categories")
    # Detectron: contiguous ids follow the json's category order, starting at 1.
    to_contiguous = {cid: i + 1 for i, cid in enumerate(ids)}
    return DatasetMeta(
        classes=["__background__"] + names,
        json_category_id_to_contiguous_id=to_contiguous,
        contiguous_category_id_to_json_id={v: k for k, v in to_contiguous.items()},
        keypoint_names=kp_names,
        keypoint_flip_map=keypoint_flip_map(kp_names) if kp_names else {},
        oks_sigmas=oks_sigmas,
        skeleton=skeleton,
    )


def _parse_segmentation(seg: Any, height: int, width: int, r: _Reader, image_id: Any, context: str = "") -> Any:
    """Polygons -> list of float32 arrays; RLE -> compressed RLE.

    As Detectron, a polygon with fewer than 3 points is dropped when the object has other polygons; an object
    whose polygons all have fewer than 3 points, or a polygon that is not flat (x, y) pairs, is an error."""
    if isinstance(seg, list):
        polys = []
        for k, poly in enumerate(seg):
            try:
                array = np.asarray(poly, dtype=np.float32) if isinstance(poly, list) else None
            except (TypeError, ValueError):
                array = None
            if array is None or array.ndim != 1:
                raise r.fail(f"{context}polygon #{k} must be a flat list of numbers [x1, y1, x2, y2, ...], got "
                             f"{poly!r:.80}", image_id, "segmentation")
            if len(array) % 2:
                raise r.fail(f"{context}polygon #{k} has an odd number of coordinates ({len(array)}), not (x, y) "
                             "pairs", image_id, "segmentation")
            if len(array) >= 6:
                polys.append(array)
        if seg and not polys:
            raise r.fail(f"{context}no polygon has at least 3 points (coordinates per polygon: "
                         f"{[len(p) for p in seg]}), so the object has no mask", image_id, "segmentation")
        return polys
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if not isinstance(seg["size"], list) or list(seg["size"]) != [height, width]:
            raise r.fail(f"{context}RLE size {seg['size']!r} differs from image size [{height}, {width}]",
                         image_id, "segmentation")
        try:
            rle = mask_util.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else dict(seg)
        except Exception as e:  # pycocotools raises bare Exceptions on malformed RLE
            raise r.fail(f"{context}malformed RLE ({e})", image_id, "segmentation") from e
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        return {"size": [height, width], "counts": rle["counts"]}
    raise r.fail(f"{context}must be a list of polygons or an RLE {{size, counts}}, got {type(seg).__name__}",
                 image_id, "segmentation")


def _parse_image(img: dict, image_dir: str, r: _Reader, index: int) -> dict:
    image_id = r.get(img, "id", int, context=f"image #{index}: ")
    entry = {
        "image": os.path.join(image_dir, r.get(img, "file_name", str, image_id)),
        "id": image_id,
        "width": r.get(img, "width", int, image_id),
        "height": r.get(img, "height", int, image_id),
        "flipped": False,
    }
    if entry["width"] <= 0 or entry["height"] <= 0:
        raise r.fail("width and height must be positive", image_id, "width/height")
    return entry


def _clean_boxes(bboxes: np.ndarray, heights: np.ndarray, widths: np.ndarray, detectron2: bool = False
                 ) -> np.ndarray:
    """(A, 4) COCO [x, y, w, h] -> xyxy clipped to each box's own image, float64: inclusive and inside
    [0, W - 1] (Detectron's xywh_to_xyxy + clip_xyxy_to_image), or detectron2's [x, y, x + w, y + h] inside
    [0, W] (its XYWH_ABS -> XYXY_ABS conversion and ``Boxes.clip``)."""
    if detectron2:
        xyxy = np.concatenate([bboxes[:, :2], bboxes[:, :2] + bboxes[:, 2:]], axis=1)
    else:
        xyxy = xywh_to_xyxy(torch.from_numpy(bboxes)).numpy()
    off = 0.0 if detectron2 else 1.0
    xyxy[:, 0::2] = np.minimum(np.maximum(xyxy[:, 0::2], 0.0), widths[:, None] - off)
    xyxy[:, 1::2] = np.minimum(np.maximum(xyxy[:, 1::2], 0.0), heights[:, None] - off)
    return xyxy


def _read_annotations(data: dict, index_of: Dict[int, int], meta: DatasetMeta, r: _Reader) -> dict:
    """Every annotation's fields, validated, as arrays indexed by annotation (plus the raw json records)."""
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise r.fail("must be a list", field_name="annotations")
    image_index = np.empty(len(anns), dtype=np.int64)
    bboxes = np.zeros((len(anns), 4), dtype=np.float64)
    areas = np.zeros(len(anns), dtype=np.float64)
    ignore = np.zeros(len(anns), dtype=bool)
    for i, ann in enumerate(anns):
        image_id = r.get(ann, "image_id", int, context=f"annotation #{i}: ")
        if image_id not in index_of:
            raise r.fail(f"annotation #{i} refers to an image that is not in 'images'", image_id, "image_id")
        image_index[i] = index_of[image_id]
        bbox = r.get(ann, "bbox", list, image_id)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise r.fail(f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}", image_id, "bbox")
        bboxes[i] = bbox
        areas[i] = r.get(ann, "area", (int, float), image_id)
        if r.get(ann, "category_id", int, image_id) not in meta.json_category_id_to_contiguous_id:
            raise r.fail(f"category_id {ann['category_id']} is not in 'categories'", image_id, "category_id")
        for flag in ("iscrowd", "ignore"):
            if ann.get(flag, 0) not in (0, 1):  # also refuses "0", which bool() would read as True
                raise r.fail(f"annotation #{i}: must be 0 or 1, got {ann[flag]!r}", image_id, flag)
        ignore[i] = ann.get("ignore", 0) == 1
    return {"records": anns, "image_index": image_index, "bboxes": bboxes, "areas": areas, "ignore": ignore}


def _fill_entry(entry: dict, anns: List[dict], boxes: np.ndarray, meta: DatasetMeta, r: _Reader,
                detectron2: bool = False) -> None:
    """The gt fields of one image from its kept annotations (Detectron's _add_gt_annotations)."""
    height, width, image_id = entry["height"], entry["width"], entry["id"]
    entry["boxes"] = boxes.astype(np.float32).reshape(-1, 4)
    entry["gt_classes"] = np.array(
        [meta.json_category_id_to_contiguous_id[a["category_id"]] for a in anns], dtype=np.int64
    )
    entry["is_crowd"] = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    entry["seg_areas"] = np.array([a["area"] for a in anns], dtype=np.float32)
    entry["segms"] = [_parse_segmentation(a.get("segmentation", []), height, width, r, image_id,
                                          f"annotation id {a.get('id')!r}: ") for a in anns]
    entry["gt_keypoints"] = None
    entry["has_visible_keypoints"] = False
    num_kps = meta.num_keypoints
    if num_kps:
        kps = np.zeros((len(anns), num_kps, 3), dtype=np.float32)
        for i, ann in enumerate(anns):
            if "keypoints" not in ann:
                continue  # a category without keypoints, or a crowd region: no visible keypoint
            context = f"annotation id {ann.get('id')!r}: "
            values = r.get(ann, "keypoints", list, image_id, context)
            if len(values) != 3 * num_kps:
                raise r.fail(f"{context}{len(values)} values, expected 3 x {num_kps} keypoints", image_id,
                             "keypoints")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise r.fail(f"{context}values must be numbers (x, y, visibility per keypoint)", image_id,
                             "keypoints")
            kps[i] = np.asarray(values, dtype=np.float32).reshape(num_kps, 3)
            if detectron2:
                kps[i, :, :2] += 0.5  # detectron2's load_coco_json: pixel indices -> pixel centres
        entry["gt_keypoints"] = kps
        entry["has_visible_keypoints"] = bool((kps[:, :, 2] > 0).any())


def parse_coco_json(ann_file: str, image_dir: str, gt_min_area: float = -1.0, conventions: str = "detectron"
                    ) -> Tuple[DatasetMeta, List[dict], int]:
    """Parse a COCO json into (meta, roidb, number of invalid annotations dropped). No cache.

    As Detectron: annotations with area < ``gt_min_area`` or ``ignore`` are skipped; the others need a positive
    area and a clipped box wider and taller than one pixel, or they are dropped and counted as invalid.
    ``conventions='detectron2'``: detectron2's boxes and keypoints (module docstring); a box is valid when its
    clipped width and height are positive.
    """
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    detectron2 = conventions == "detectron2"
    data = _load_json(ann_file)
    r = _Reader(ann_file)
    meta = _parse_categories(data, r)
    images = r.get(data, "images", list)
    roidb = [_parse_image(img, image_dir, r, i) for i, img in enumerate(images)]
    index_of = {e["id"]: i for i, e in enumerate(roidb)}
    if len(index_of) != len(roidb):
        raise r.fail("duplicate image ids", field_name="images")
    a = _read_annotations(data, index_of, meta, r)
    heights = np.array([e["height"] for e in roidb], dtype=np.float64)[a["image_index"]]
    widths = np.array([e["width"] for e in roidb], dtype=np.float64)[a["image_index"]]
    xyxy = _clean_boxes(a["bboxes"], heights, widths, detectron2)
    considered = (a["areas"] >= gt_min_area) & ~a["ignore"]
    valid = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    if not detectron2:
        valid &= a["areas"] > 0
    keep = np.nonzero(considered & valid)[0]
    # Group the kept annotations by image, keeping json order within an image (stable sort).
    order = keep[np.argsort(a["image_index"][keep], kind="stable")]
    bounds = np.searchsorted(a["image_index"][order], np.arange(len(roidb) + 1))
    for i, entry in enumerate(roidb):
        idx = order[bounds[i]: bounds[i + 1]]
        _fill_entry(entry, [a["records"][j] for j in idx], xyxy[idx], meta, r, detectron2)
    return meta, roidb, int((considered & ~valid).sum())


# ---------------------------------------------------------------------------------------------- cache + dataset
def _cache_key(ann_file: str, gt_min_area: float, conventions: str = "detectron") -> str:
    st = os.stat(ann_file)
    text = f"{os.path.abspath(ann_file)}|{st.st_mtime_ns}|{st.st_size}|{gt_min_area}|{conventions}|v{_CACHE_VERSION}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class CocoDataset:
    """A catalog dataset: its category mapping (``meta``) and its ground-truth roidb (cached)."""

    def __init__(self, name_or_spec: str | DatasetSpec, cache_dir: str | None = None):
        self.spec = get_dataset(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
        self.name = self.spec.name
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.num_invalid = 0
        self.meta: DatasetMeta | None = None

    def cache_path(self, gt_min_area: float, conventions: str = "detectron") -> Path:
        stem = Path(self.spec.ann_file).stem
        key = _cache_key(self.spec.ann_file, gt_min_area, conventions)
        return self.cache_dir / f"{self.name}_{stem}_{key}_roidb.pkl"

    def get_roidb(self, gt_min_area: float = -1.0, use_cache: bool = True, conventions: str = "detectron"
                  ) -> List[dict]:
        """Ground-truth roidb (original coordinates, unflipped) in Detectron's or detectron2's conventions
        (MODEL.CONVENTIONS); sets ``meta`` and ``num_invalid``."""
        if not os.path.isfile(self.spec.ann_file):
            raise FileNotFoundError(f"dataset {self.name!r}: annotation file {self.spec.ann_file!r} does not exist")
        path = self.cache_path(gt_min_area, conventions)
        if use_cache and path.is_file():
            try:
                self.meta, roidb, self.num_invalid = read_cache(path)
                logger.info("dataset %s: roidb loaded from cache %s", self.name, path)
                return roidb
            except (OSError, pickle.UnpicklingError, EOFError, ValueError, KeyError) as e:
                logger.warning("dataset %s: ignoring unreadable cache %s (%s)", self.name, path, e)
        self.meta, roidb, self.num_invalid = parse_coco_json(self.spec.ann_file, self.spec.image_dir, gt_min_area,
                                                             conventions)
        if self.num_invalid:
            logger.warning("dataset %s: dropped %d annotations with zero area or a box <= 1 pixel",
                           self.name, self.num_invalid)
        if use_cache:
            self._write_cache(path, roidb)
        return roidb

    def _write_cache(self, path: Path, roidb: List[dict]) -> None:
        try:
            write_cache(path, self.meta, roidb, self.num_invalid)
        except OSError as e:
            logger.warning("dataset %s: could not write roidb cache %s (%s)", self.name, path, e)
