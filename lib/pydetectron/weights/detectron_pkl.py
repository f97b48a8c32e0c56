"""Detectron ``.pkl`` weights <-> our parameters, by Caffe2 blob name.

Two layouts are read (pickles from Python 2, so unpickled with ``encoding='latin1'``):
- ImageNet models (``R-50.pkl``, ``X-101-32x8d.pkl``, ``R-50-GN.pkl``): a flat ``{blob: array}`` dict with
  BN folded into ``*_bn_s``/``*_bn_b``, zero ``*_b`` biases on every conv (Caffe2 convs needed one) and the
  ``fc1000_*`` classifier, which no detector uses;
- model-zoo detectors: ``{'blobs': {...}, 'cfg': yaml}``, where trained blobs have ``*_momentum`` twins.

The model says which blob each tensor is through ``detectron_weight_mapping()`` (ARCHITECTURE.md); the
mapping of the whole model is composed by walking its modules, so no blob name is hard-coded here. Every
other format is turned into these blob names (``formats.py``) and loaded by :func:`load_detectron_weights`;
``pretrained.load_pretrained`` is the entry point that reads a file of any format.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
from torch import nn

from pydetectron.modeling.layers import compose_weight_mapping
from pydetectron.weights.class_layout import blobs_in_layout
from pydetectron.weights.files import read_object, write_object

logger = logging.getLogger(__name__)

# Output layers whose size depends on the dataset (classes / keypoints), skippable on a size mismatch.
CLASS_LAYER_PATTERN = re.compile(
    r"^(cls_score|bbox_pred|mask_fcn_logits|kps_score|kps_score_lowres|retnet_cls_pred_fpn\d+|"
    r"retnet_bbox_pred_fpn\d+)_[wb]$"
)
IMAGENET_CLASSIFIER_BLOBS = ("fc1000_w", "fc1000_b")
# The conv that sees the image. A file whose channel order is known (Detectron files are BGR) gets conv1's
# input channels reversed on load when the model's MODEL.INPUT_COLOR_ORDER differs; Detectron files are
# written back in BGR.
IMAGE_CONV_BLOB = "conv1_w"
COLOR_ORDERS = ("BGR", "RGB")
BN_EPS = 1e-5  # torchvision's, timm's and detectron2's batch-norm epsilon; state dicts do not store it


def check_color_order(order: str) -> str:
    if order not in COLOR_ORDERS:
        raise ValueError(f"MODEL.INPUT_COLOR_ORDER must be one of {COLOR_ORDERS}, got {order!r}")
    return order


def _to_order(blob: str, array: np.ndarray, input_order: str, file_order: str | None = "BGR") -> np.ndarray:
    """`array` of `blob` converted from the file's channel order to `input_order` (an involution); a file of
    unknown order (`file_order` None) is taken as it is."""
    if blob != IMAGE_CONV_BLOB or file_order is None or input_order == file_order:
        return array
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"blob {blob!r} with shape {array.shape} is not a 3-channel image conv")
    return np.ascontiguousarray(array[:, ::-1])


@dataclass
class LoadReport:
    """What :func:`load_detectron_weights` did. Names are blob names unless said otherwise."""

    loaded: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)  # in the file, used by no tensor of the model
    ignored: List[str] = field(default_factory=list)  # known extras: momentum, fc1000, zero conv biases
    missing: List[str] = field(default_factory=list)  # mapped blobs the file lacks
    skipped: List[str] = field(default_factory=list)  # class-count layers left at their init (messages)
    unmapped: List[str] = field(default_factory=list)  # our state_dict keys with no Detectron blob at all
    folded: List[str] = field(default_factory=list)  # batch norms folded exactly into a frozen AffineChannel
    derived: List[str] = field(default_factory=list)  # BN statistics set to identity for a folded file's norm

    def summary(self) -> str:
        text = (
            f"loaded {len(self.loaded)} blobs, {len(self.unused)} unused, {len(self.ignored)} ignored, "
            f"{len(self.missing)} missing, {len(self.skipped)} skipped, {len(self.unmapped)} unmapped tensors"
        )
        if self.folded:
            text += f"; {len(self.folded)} batch norms folded into AffineChannel"
        if self.derived:
            text += f"; {len(self.derived)} BN layers given identity statistics (the file's norm is folded)"
        return text


def model_weight_mapping(model: nn.Module) -> Dict[str, str | None]:
    """``{state_dict key: blob name or None}`` for the whole model, from its modules' own mappings."""
    if hasattr(model, "detectron_weight_mapping"):
        return dict(model.detectron_weight_mapping())
    return compose_weight_mapping(model)


def read_detectron_pickle(path: str | os.PathLike) -> Dict[str, Any]:
    """The dict in a Detectron weights file; errors name the file."""
    data = read_object(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of blobs, got {type(data).__name__}")
    return data


def _blobs_of(source: str | os.PathLike | Mapping[str, Any]) -> Dict[str, Any]:
    data = read_detectron_pickle(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    blobs = data["blobs"] if "blobs" in data else data
    if not isinstance(blobs, Mapping):
        raise ValueError(f"'blobs' of {source if isinstance(source, (str, os.PathLike)) else 'dict'} is not a dict")
    return {k: v for k, v in blobs.items() if k != "cfg" and v is not None}


# One mask-head conv, three spellings: Detectron's ``_[mask]_fcn<i>`` (``_mask_fcn<i>`` with GN) and the plain
# ``mask_fcn<i>`` some heads use; detectron2's converter reads the first two as the same ``mask_fcn<i>``.
_MASK_CONV = re.compile(r"^(?:_\[mask\]_|_mask_|mask_)(fcn\d+_.*)$")
_MASK_CONV_SPELLINGS = ("_[mask]_", "_mask_", "mask_")


def _source_name(blob: str, blobs: Mapping[str, Any]) -> str:
    """The file's blob for the model's `blob`: itself; another spelling of a mask-head conv; or Detectron's
    fallback, a missing ``_[mask]_res5_...`` blob initialises from ``res5_...``."""
    if blob in blobs:
        return blob
    match = _MASK_CONV.match(blob)
    if match:
        found = [p + match.group(1) for p in _MASK_CONV_SPELLINGS if p + match.group(1) in blobs]
        if found:
            return found[0]
    if blob.startswith("_[") and "]_" in blob:
        return blob[blob.index("]_") + 2:]
    return blob


def _as_tensor(blob: str, value: Any, target: torch.Tensor) -> torch.Tensor:
    """The blob as a tensor of `target`'s shape; only unit dimensions may differ (Caffe biases)."""
    array = np.asarray(value)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"blob {blob!r}: expected a numeric array, got dtype {array.dtype}")
    src_shape = tuple(array.shape)
    if src_shape != tuple(target.shape):
        squeeze = tuple(d for d in src_shape if d != 1) == tuple(d for d in target.shape if d != 1)
        if not squeeze:
            raise _ShapeMismatch(blob, src_shape, tuple(target.shape))
        array = array.reshape(tuple(target.shape))
    # ascontiguousarray makes 0-d arrays 1-d (a batch norm's counter): reshape back
    return torch.from_numpy(np.ascontiguousarray(array)).reshape(target.shape).to(dtype=target.dtype)


class _ShapeMismatch(ValueError):
    def __init__(self, blob: str, src: tuple, dst: tuple) -> None:
        super().__init__(f"blob {blob!r} has shape {src} in the weights file but the model expects {dst}")
        self.blob, self.src, self.dst = blob, src, dst


def _class_count_message(err: _ShapeMismatch, blobs: Mapping[str, Any], num_classes: int | None) -> str:
    file_classes = np.asarray(blobs["cls_score_w"]).shape[0] if "cls_score_w" in blobs else None
    detail = f"file {err.src} vs model {err.dst}"
    if file_classes is not None or num_classes is not None:
        detail += f"; classes in file: {file_classes}, in model: {num_classes}"
    if err.blob.startswith("bbox_pred") and err.src[0] == 8 and err.dst[0] != 8:
        detail += " (the file's box regression is class-agnostic)"
    return f"{err.blob}: skipped, class-count layer ({detail})"


def _is_ignorable(name: str, value: Any, used: set) -> bool:
    """Extras a Detectron loader also passes over: momentum, ImageNet classifier, zero conv biases; and batch-norm
    counters of a checkpoint loaded into a model without batch norms."""
    if name.endswith(("_momentum", "num_batches_tracked")) or name in IMAGENET_CLASSIFIER_BLOBS:
        return True
    if name.endswith("_b") and name[:-2] + "_w" in used:
        return not np.any(np.asarray(value))  # Caffe1->Caffe2 conversion added zero biases to all convs
    return False


class ShapeMismatchError(ValueError):
    """Blobs whose shape differs from the model's tensor (class-count layers excepted when skippable)."""

    def __init__(self, mismatches: List[str], report: LoadReport) -> None:
        super().__init__("; ".join(mismatches))
        self.mismatches = mismatches
        self.report = report  # what loading found besides the mismatches


def _norm_prefixes(mapping: Mapping[str, str | None]) -> Dict[str, str]:
    """``{norm blob prefix: state_dict key of its weight}`` for every norm layer of the model."""
    targets = {blob: key for key, blob in mapping.items() if blob}
    return {blob[:-2]: key for blob, key in targets.items()
            if blob.endswith("_s") and blob[:-2] + "_b" in targets and key.endswith(".weight")}


def _resolve_norms(
    model: nn.Module, mapping: Mapping[str, str | None], blobs: Dict[str, Any], bn_eps: float, report: LoadReport
) -> set:
    """Fit the file's norm layers to the model's, in place in `blobs`; returns the blob names consumed.

    A frozen AffineChannel fed from a file with statistics gets the exact fold ``s = gamma / sqrt(var + eps)``,
    ``b = beta - mean * s`` (computed in float64); a GroupNorm in a batch norm's place (MGD's stage-last norms,
    which keep the BN's blob names) gets gamma and beta as they are, as detectron2 loads them, the statistics
    having no counterpart. A batch norm
    fed from a folded file (Detectron's ``_bn_s``/``_bn_b`` only) gets mean 0 and variance ``1 - eps``, so
    its eval output is the file's affine map. Everything else is copied as it is.
    """
    consumed = set()
    targets = {blob for blob in mapping.values() if blob}
    for prefix, weight_key in _norm_prefixes(mapping).items():
        src = _source_name(prefix + "_s", blobs)[:-2]
        stats = (src + "_rm", src + "_riv")
        has_stats = all(name in blobs for name in stats)
        if has_stats and isinstance(model.get_submodule(weight_key[: -len(".weight")]), nn.GroupNorm):
            consumed.update(stats)  # a GroupNorm in a BN's place (MGD's stage-last norms): gamma/beta as they are
        elif prefix + "_rm" not in targets and has_stats and src + "_s" in blobs and src + "_b" in blobs:
            if src not in report.folded:
                gamma, beta, mean, var = (np.asarray(blobs[src + sfx], np.float64)
                                          for sfx in ("_s", "_b", "_rm", "_riv"))
                scale = gamma / np.sqrt(var + bn_eps)
                blobs[src + "_s"] = scale.astype(np.float32)
                blobs[src + "_b"] = (beta - mean * scale).astype(np.float32)
                report.folded.append(src)
            consumed.update(stats)
        elif prefix + "_rm" in targets and not has_stats and src + "_s" in blobs:
            norm = model.get_submodule(weight_key[: -len(".weight")])
            size = np.asarray(blobs[src + "_s"]).shape
            blobs[src + "_rm"] = np.zeros(size, np.float32)
            blobs[src + "_riv"] = np.full(size, 1.0 - getattr(norm, "eps", BN_EPS), np.float32)
            report.derived.append(prefix)
    return consumed


def load_detectron_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = False,
    allow_skip_class_layers: bool = True,
    num_classes: int | None = None,
    input_order: str = "BGR",
    file_order: str | None = "BGR",
    bn_eps: float = BN_EPS,
) -> LoadReport:
    """Copy Caffe2-named blobs (a Detectron ``.pkl`` path, its unpickled dict, or blobs converted from another
    format) into `model`, by blob name; tensors without a blob name are looked up by their state_dict key.

    A blob mapped by several tensors is copied to each. Norm layers are fitted as :func:`_resolve_norms`
    says (the only numeric change besides conv1's channel order). Shape mismatches raise
    :class:`ShapeMismatchError` naming every blob, except class-count layers (``cls_score``, ``bbox_pred``,
    ``mask_fcn_logits``, ``kps_score``, RetinaNet outputs) when `allow_skip_class_layers`: those keep their
    initialisation and are reported in ``skipped`` (`num_classes`, the model's, enriches that message). With
    `strict`, anything missing, unused or unmapped raises ``KeyError`` listing it. conv1's input channels are
    reversed when `file_order` (the file's channel order, None = unknown) differs from `input_order`
    (``MODEL.INPUT_COLOR_ORDER``). `bn_eps` is the epsilon of the file's batch norms.
    """
    check_color_order(input_order)
    blobs = _blobs_of(source)
    mapping = model_weight_mapping(model)
    state = model.state_dict(keep_vars=True)
    report = LoadReport()
    used = _resolve_norms(model, mapping, blobs, bn_eps, report)
    loaded = set()
    mismatches = []
    for key, tensor in state.items():
        blob = mapping.get(key)
        if blob is None:
            if key in blobs:  # a pydetectron state dict: tensors without a Caffe2 name keep their key
                blob = key
            else:
                if key not in mapping:
                    report.unmapped.append(key)
                continue
        src = _source_name(blob, blobs)
        used.add(blob)
        used.add(src)
        if src not in blobs:
            report.missing.append(blob)
            continue
        try:
            value = _as_tensor(src, _to_order(src, np.asarray(blobs[src]), input_order, file_order), tensor)
        except _ShapeMismatch as err:
            if allow_skip_class_layers and CLASS_LAYER_PATTERN.match(src):
                report.skipped.append(_class_count_message(err, blobs, num_classes))
            else:
                mismatches.append(f"{err} (model tensor {key!r})")
            continue
        with torch.no_grad():
            tensor.copy_(value)
        loaded.add(src)
    report.loaded = sorted(loaded)
    for name in sorted(blobs):
        if name in used:
            continue
        (report.ignored if _is_ignorable(name, blobs[name], used) else report.unused).append(name)
    report.missing = sorted(set(report.missing))
    if mismatches:
        raise ShapeMismatchError(mismatches, report)
    for line in report.skipped:
        logger.warning(line)
    logger.info("weights: %s", report.summary())
    if strict and (report.missing or report.unused or report.unmapped):
        raise KeyError(
            f"strict Detectron weight loading failed: missing blobs {report.missing}, unused blobs "
            f"{report.unused}, model tensors without a blob {report.unmapped}"
        )
    return report


def detectron_blobs(model: nn.Module, input_order: str = "BGR") -> Dict[str, np.ndarray]:
    """``{blob name: float32 array}`` of every mapped tensor, the image conv in BGR order; tensors sharing
    a blob must be equal."""
    check_color_order(input_order)
    mapping = model_weight_mapping(model)
    blobs: Dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        blob = mapping.get(key)
        if blob is None:
            continue
        array = _to_order(blob, tensor.detach().cpu().numpy().astype(np.float32, copy=True), input_order, "BGR")
        if blob in blobs and not np.array_equal(blobs[blob], array):
            raise ValueError(f"tensors mapped to the same blob {blob!r} differ (second one: {key!r})")
        blobs[blob] = array
    return blobs


def save_detectron_weights(
    model: nn.Module, path: str | os.PathLike, cfg_yaml: str | None = None, input_order: str = "BGR"
) -> Dict[str, np.ndarray]:
    """Write `model` as Detectron does: ``pickle({'blobs': {name: float32 array}, 'cfg': yaml})``, atomically.

    Returns the blobs written. Momentum is not written (Detectron loaders treat it as optional). Heads in
    detectron2's class layout are written in Detectron's (``class_layout.py``: background first, zero
    background box rows and mask channel). `input_order` as for :func:`load_detectron_weights`.
    """
    blobs, _ = blobs_in_layout(model, model_weight_mapping(model), detectron_blobs(model, input_order), "detectron")
    write_object({"blobs": blobs, "cfg": cfg_yaml}, path, "pickle")
    return blobs
