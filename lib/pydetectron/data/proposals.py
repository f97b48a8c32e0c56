"""Precomputed proposals in Detectron's pickle layout, read into roidb entries and written by RPN-only testing.

A proposal file is a pickle of ``{'boxes': [(P, 4) float per image], 'scores': [(P,) per image],
'ids': [image id per image], 'cfg': yaml}`` (older files say 'indexes' for 'ids'), boxes inclusive
``[x1, y1, x2, y2]`` in original-image pixels, best first. Detectron's ``rpn_proposals.pkl`` files (Python 2
pickles) and the ones ``tools/test_net.py`` writes for ``MODEL.RPN_ONLY`` models are read alike.

Reading follows Detectron's ``JsonDataset._add_proposals_from_file``: each image's boxes are clipped to the
image, exact duplicates (after rounding) dropped, boxes not wider and taller than ``min_size`` pixels
(``+1`` widths) dropped, then the first ``limit`` kept. They go to ``entry['proposals']`` (original pixels,
unflipped); flipping, scaling and cropping move them with the gt boxes.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch

from pydetectron.boxes import clip_boxes, filter_small_boxes, unique_boxes

DEFAULT_MIN_PROPOSAL_SIZE = 2  # Detectron's get_roidb(min_proposal_size=2)


def read_proposal_file(path: str | os.PathLike) -> Dict[int, np.ndarray]:
    """{image id: (P, 4) float32 boxes} of a proposal pickle; errors name the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"cannot read proposal file {os.fspath(path)!r}: {err}") from err
    if not isinstance(data, Mapping) or "boxes" not in data:
        raise ValueError(f"proposal file {os.fspath(path)!r} is not a dict with 'boxes' and 'ids' (Detectron's layout)")
    id_field = "indexes" if "indexes" in data else "ids"
    if id_field not in data:
        raise ValueError(f"proposal file {os.fspath(path)!r} has no 'ids' (or 'indexes') list")
    ids, boxes = list(data[id_field]), list(data["boxes"])
    if len(ids) != len(boxes):
        raise ValueError(f"proposal file {os.fspath(path)!r} has {len(boxes)} box arrays for {len(ids)} ids")
    out = {}
    for image_id, image_boxes in zip(ids, boxes):
        if int(image_id) in out:
            raise ValueError(f"proposal file {os.fspath(path)!r} lists image {image_id} twice")
        array = np.asarray(image_boxes, dtype=np.float32)
        array = array.reshape(0, 4) if array.size == 0 else array
        if array.ndim != 2 or array.shape[1] != 4:
            raise ValueError(f"proposal file {os.fspath(path)!r}: image {image_id} has boxes of shape "
                             f"{tuple(np.shape(image_boxes))}, expected (P, 4)")
        out[int(image_id)] = array
    return out


def write_proposal_file(path: str | os.PathLike, ids: Sequence[int], boxes: Sequence[np.ndarray],
                        scores: Sequence[np.ndarray], cfg_yaml: str = "") -> None:
    """Detectron's ``rpn_proposals.pkl``, written atomically (temp file + rename)."""
    data = {"boxes": [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes],
            "scores": [np.asarray(s, dtype=np.float32).reshape(-1) for s in scores],
            "ids": [int(i) for i in ids], "cfg": cfg_yaml}
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=2)  # Detectron's save_object: readable by Python 2 tools too
    os.replace(tmp, path)


def clean_proposals(boxes: np.ndarray, height: int, width: int, min_size: int = DEFAULT_MIN_PROPOSAL_SIZE,
                    limit: int = -1) -> np.ndarray:
    """One image's proposals as Detectron keeps them: clipped, de-duplicated, small ones out, first `limit`."""
    kept = clip_boxes(torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)), height, width)
    kept = kept[unique_boxes(kept)[0]]
    kept = kept[filter_small_boxes(kept, min_size)].numpy()
    return kept[:limit] if limit > 0 else kept


def attach_proposals(roidb: List[dict], path: str | os.PathLike, min_size: int = DEFAULT_MIN_PROPOSAL_SIZE,
                     limit: int = -1) -> None:
    """Set ``entry['proposals']`` of every (unflipped) roidb entry from the proposal file at `path`.

    Every entry's image id must be in the file (Detectron asserts the same); extra images are ignored.
    """
    proposals = read_proposal_file(path)
    missing = [entry["id"] for entry in roidb if int(entry["id"]) not in proposals]
    if missing:
        raise ValueError(f"proposal file {os.fspath(path)!r} has no proposals for {len(missing)} of {len(roidb)} "
                         f"images, e.g. image ids {missing[:5]}")
    for entry in roidb:
        entry["proposals"] = clean_proposals(proposals[int(entry["id"])], entry["height"], entry["width"],
                                             min_size, limit)
