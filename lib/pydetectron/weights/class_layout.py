"""Class layouts of the box classifier and the box / mask predictors, and the exact change between them.

- ``detectron`` (Detectron, our Detectron-mode heads): ``cls_score`` has K+1 rows with the background FIRST;
  class-specific ``bbox_pred`` has (K+1)*4 rows (class-agnostic: 8), background box first; a class-specific
  ``mask_fcn_logits`` has K+1 channels, background first (class-agnostic: 1).
- ``detectron2`` (detectron2, our d2-mode heads, which say so with ``class_layout = 'detectron2'``):
  ``cls_score`` K+1 rows with the background LAST; ``bbox_pred`` K*4 (class-agnostic: 4); mask predictor K
  channels (class-agnostic: 1).

Detectron -> detectron2 is what detectron2 does when it loads a Detectron model (``c2_model_loading``): the
background row of ``cls_score`` moves from index 0 to the end, the background box rows (the first 4) and
mask channel (the first) are dropped. One difference, on purpose: a class-agnostic Detectron mask predictor (one
channel) is kept, where detectron2's ``[1:]`` would leave it empty.

detectron2 -> Detectron (exporting a d2-mode model to a Detectron ``.pkl``, or a d2 file into a Detectron-mode
model) is the inverse: the last ``cls_score`` row moves to the front, and the background gets ZERO box rows
and a ZERO mask channel. Detectron never reads them (its box and mask results start at class 1, its losses give
them no gradient), and going back to detectron2 drops them again, so the round trip is bit-exact. A one-channel
d2 mask predictor (class-agnostic, or class-specific with a single class) stays one channel, Detectron's
class-agnostic predictor, unless the target layer has two.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import numpy as np
from torch import nn

CLASS_LAYOUTS = ("detectron", "detectron2")
CLASSIFIER_BLOBS = ("cls_score_w", "cls_score_b")
BOX_BLOBS = ("bbox_pred_w", "bbox_pred_b")
MASK_BLOBS = ("mask_fcn_logits_w", "mask_fcn_logits_b")
LAYOUT_BLOBS = CLASSIFIER_BLOBS + BOX_BLOBS + MASK_BLOBS
_BOX_DIM = 4


def check_class_layout(layout: str, where: str) -> str:
    if layout not in CLASS_LAYOUTS:
        raise ValueError(f"{where}: class_layout must be one of {CLASS_LAYOUTS}, got {layout!r}")
    return layout


def model_class_layouts(model: nn.Module, mapping: Mapping[str, str | None]) -> Dict[str, str]:
    """``{blob: layout}`` for each class-layout blob the model maps (`mapping`: its ``{key: blob}``): the
    ``class_layout`` attribute of the innermost module holding the tensor ('detectron' when none says)."""
    layouts = {blob: "detectron" for blob in mapping.values() if blob in LAYOUT_BLOBS}
    for name, module in model.named_modules():  # parents first: an inner module's attribute wins
        layout = getattr(module, "class_layout", None)
        if layout is None:
            continue
        check_class_layout(layout, f"module {name or type(module).__name__}")
        prefix = f"{name}." if name else ""
        for key, blob in mapping.items():
            if blob in layouts and key.startswith(prefix):
                layouts[blob] = layout
    return layouts


def _to_detectron2(blob: str, value: np.ndarray) -> np.ndarray:
    if blob in CLASSIFIER_BLOBS:
        return np.concatenate([value[1:], value[:1]])
    if blob in BOX_BLOBS:
        return value[_BOX_DIM:]
    return value[1:] if value.shape[0] > 1 else value


def _to_detectron(blob: str, value: np.ndarray, target_rows: int | None) -> np.ndarray:
    if blob in CLASSIFIER_BLOBS:
        return np.concatenate([value[-1:], value[:-1]])
    background = _BOX_DIM if blob in BOX_BLOBS else 1
    if blob in MASK_BLOBS and (target_rows == value.shape[0] or (target_rows is None and value.shape[0] == 1)):
        return value
    return np.concatenate([np.zeros((background,) + value.shape[1:], value.dtype), value])


def convert_class_layout(
    blobs: Mapping[str, np.ndarray],
    source: str,
    targets: Mapping[str, str],
    target_rows: Mapping[str, int] | None = None,
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """(`blobs` with each class-layout blob in its target layout, a line per blob changed). `source`: the
    blobs' layout; `targets`: ``{blob: layout}`` (blobs absent keep theirs); `target_rows`: the first dimension
    of the receiving tensors, where known (decides a one-channel mask predictor)."""
    check_class_layout(source, "weights")
    out = dict(blobs)
    lines = []
    for blob, target in targets.items():
        if blob not in blobs or check_class_layout(target, blob) == source:
            continue
        value = np.asarray(blobs[blob])
        if value.ndim == 0:
            raise ValueError(f"blob {blob!r} is a scalar; expected a row per class")
        rows = None if target_rows is None else target_rows.get(blob)
        out[blob] = _to_detectron2(blob, value) if target == "detectron2" else _to_detectron(blob, value, rows)
        lines.append(f"{blob}: {source} -> {target} class layout, {tuple(value.shape)} -> {tuple(out[blob].shape)}")
    return out, lines


def model_target_rows(model: nn.Module, mapping: Mapping[str, str | None]) -> Dict[str, int]:
    """``{blob: first dimension of the model's tensor}`` for the model's class-layout blobs."""
    state = model.state_dict()
    return {blob: int(state[key].shape[0]) for key, blob in mapping.items()
            if blob in LAYOUT_BLOBS and state[key].dim() > 0}


def adapt_to_model(
    model: nn.Module, mapping: Mapping[str, str | None], blobs: Mapping[str, np.ndarray], source: str | None
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """A file's blobs (in its `source` layout; None = unknown, taken as the model's) in the layouts of the
    model's modules."""
    if source is None:
        return dict(blobs), []
    return convert_class_layout(blobs, source, model_class_layouts(model, mapping), model_target_rows(model, mapping))


def blobs_in_layout(
    model: nn.Module, mapping: Mapping[str, str | None], blobs: Mapping[str, np.ndarray], layout: str
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """The model's own blobs (each in its module's layout) written in one `layout`, for a file of that kind."""
    check_class_layout(layout, "target file")
    out = dict(blobs)
    lines: List[str] = []
    for source in CLASS_LAYOUTS:
        if source == layout:
            continue
        mine = {b: layout for b, lay in model_class_layouts(model, mapping).items() if lay == source}
        converted, changed = convert_class_layout({b: out[b] for b in mine if b in out}, source, mine)
        out.update(converted)
        lines += changed
    return out, lines
