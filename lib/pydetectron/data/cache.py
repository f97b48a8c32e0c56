"""Roidb cache: the per-image lists of small arrays packed into a few big columns for pickling.

A COCO roidb holds hundreds of thousands of tiny arrays (boxes, polygons); pickling them one by one makes the
cache as slow to load as parsing the json. Packed, the cache is a handful of arrays plus offsets, and the
entries are rebuilt as views into them.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, List

import numpy as np

_ENTRY_FIELDS = ("image", "id", "width", "height", "flipped", "has_visible_keypoints")
_ANN_FIELDS = ("boxes", "gt_classes", "is_crowd", "seg_areas")


def _split(array: np.ndarray, counts: np.ndarray) -> List[np.ndarray]:
    return np.split(array, np.cumsum(counts)[:-1]) if len(counts) else []


def pack_roidb(roidb: List[dict]) -> dict:
    """Columns of a gt roidb (entries as built by pydetectron.data.coco, segms polygons or RLE dicts)."""
    num_anns = np.array([len(e["boxes"]) for e in roidb], dtype=np.int64)
    packed: dict[str, Any] = {f: [e[f] for e in roidb] for f in _ENTRY_FIELDS}
    packed["num_anns"] = num_anns
    for f in _ANN_FIELDS:
        packed[f] = np.concatenate([e[f] for e in roidb]) if roidb else np.zeros(0)
    has_kps = bool(roidb) and roidb[0]["gt_keypoints"] is not None
    packed["gt_keypoints"] = np.concatenate([e["gt_keypoints"] for e in roidb]) if has_kps else None
    segms = [s for e in roidb for s in e["segms"]]
    packed["rles"] = {i: s for i, s in enumerate(segms) if isinstance(s, dict)}
    polys = [p for s in segms if not isinstance(s, dict) for p in s]
    packed["polys_per_segm"] = np.array([0 if isinstance(s, dict) else len(s) for s in segms], dtype=np.int64)
    packed["poly_lengths"] = np.array([len(p) for p in polys], dtype=np.int64)
    packed["poly_coords"] = np.concatenate(polys).astype(np.float32) if polys else np.zeros(0, np.float32)
    return packed


def unpack_roidb(packed: dict) -> List[dict]:
    """The roidb ``pack_roidb`` was given (arrays are views into the packed columns)."""
    counts = packed["num_anns"]
    columns = {f: _split(packed[f], counts) for f in _ANN_FIELDS}
    kps = _split(packed["gt_keypoints"], counts) if packed["gt_keypoints"] is not None else None
    polys = _split(packed["poly_coords"], packed["poly_lengths"])
    segms, next_poly = [], 0
    for i, n in enumerate(packed["polys_per_segm"].tolist()):
        if i in packed["rles"]:
            segms.append(packed["rles"][i])
        else:
            segms.append(polys[next_poly: next_poly + n])
            next_poly += n
    per_entry = _split_list(segms, counts)
    roidb = []
    for i in range(len(counts)):
        entry = {f: packed[f][i] for f in _ENTRY_FIELDS}
        entry.update({f: columns[f][i] for f in _ANN_FIELDS})
        entry["segms"] = per_entry[i]
        entry["gt_keypoints"] = kps[i] if kps is not None else None
        roidb.append(entry)
    return roidb


def _split_list(items: list, counts: np.ndarray) -> List[list]:
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def write_cache(path: Path, meta: Any, roidb: List[dict], num_invalid: int) -> None:
    """Atomically write (meta, packed roidb, num_invalid) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump((meta, pack_roidb(roidb), num_invalid), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def read_cache(path: Path) -> tuple:
    """(meta, roidb, num_invalid) from a cache written by ``write_cache``."""
    with open(path, "rb") as f:
        meta, packed, num_invalid = pickle.load(f)
    return meta, unpack_roidb(packed), num_invalid
