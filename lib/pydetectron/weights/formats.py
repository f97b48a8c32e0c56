"""Reading a weights file and recognising its format by content, never by its extension.

:func:`read_weights` opens a file (through ``files.read_object``, the one place a weights path is opened)
and returns a :class:`WeightFile`: the format, the network's entries in the file's own names, the file's input
channel order where the format says it, and how to turn the entries into Caffe2 blob names for a model
(:meth:`WeightFile.blobs_for`). Formats:

- ``detectron``: Detectron ``.pkl``, flat ``{blob: array}`` (ImageNet models) or ``{'blobs': ..., 'cfg': ...}``
  (model zoo). Caffe2 blob names; BGR input.
- ``detectron2``: ``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ``res2.0.shortcut.*`` (optionally
  under ``backbone.bottom_up.`` or another prefix), usually ``{'model': ..., '__author__': ...}``. Channel
  order known only from metadata: ``'__author__': 'torchvision'`` (detectron2's
  ``convert-torchvision-to-d2.py``) is RGB, and files this project writes say it in ``'pydetectron'``.
- ``torchvision``: a torchvision / timm ResNet state dict, possibly wrapped (``state_dict``, ``model``,
  ``module.``, ``module.encoder_q.``, ``backbone.``, DINO's ``teacher``). Channel order unknown: the same keys
  hold torchvision's RGB models and Detectron.pytorch's BGR Caffe ``resnet50_caffe.pth``.
- ``pydetectron``: our own state dict (``stem.conv1.conv.weight``, ...), a training checkpoint or a converted
  backbone; channel order and body norm kind (GroupNorm and AffineChannel have the same keys) from its ``cfg``
  or ``pydetectron`` metadata.
- ``merged``: a teacher and a student in one file (``t_net.`` / ``s_net.`` keys, MGD's layout).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

import torch
import yaml
from torch import nn

from pydetectron.modeling.layers import RUNNING_STAT_SUFFIXES
from pydetectron.weights.detectron2 import (
    DETECTRON2_ANCHOR,
    DetectorNames,
    blob_to_detector_key,
    blob_to_detectron2_key,
    detectron2_detector_to_blobs,
    detectron2_to_blobs,
)
from pydetectron.weights.detectron_pkl import check_color_order, model_weight_mapping
from pydetectron.weights.files import read_object_and_serializer
from pydetectron.weights.torchvision import (
    CHECKPOINT_WEIGHT_KEYS,
    TORCHVISION_ANCHOR,
    blob_to_torchvision_key,
    find_network,
    resnet_state_dict,
    to_numpy,
    torchvision_resnet_to_blobs,
)

PYDETECTRON_ANCHOR = "stem.conv1.conv.weight"
DETECTRON_STEM_BLOBS = ("conv1_w", "res_conv1_bn_s", "conv1_gn_s")
C4_HEAD_PREFIX = "roi_heads."
MERGED_PARTS = {"teacher": "t_net.", "student": "s_net."}
# A body norm tensor's blob: conv1's (res_conv1_bn_* / conv1_gn_*) or a block conv's (<conv>_bn_* / <conv>_gn_*).
_BODY_NORM_BLOB = re.compile(r"^(?:res_conv1_bn|conv1_gn|(res\d_\d+_branch(?:1|2a|2b|2c))_(?:bn|gn))_(s|b|rm|riv)$")
FORMAT_NAMES = {
    "detectron": "Detectron .pkl (Caffe2 blob names)",
    "detectron2": "detectron2-style ResNet (stem.*, resN.i.*)",
    "torchvision": "torchvision / timm ResNet state dict",
    "pydetectron": "pydetectron state dict",
    "merged": "teacher + student file (t_net.* / s_net.*)",
}
# Our own files say how they were written: {'model': state, 'pydetectron': {'input_color_order': ...}}.
METADATA_KEY = "pydetectron"


class UnknownWeightsFormat(ValueError):
    """The file holds no network in any format pydetectron reads."""


def _parse_order(value: Any) -> str | None:
    return check_color_order(str(value)) if value else None


def _cfg_section(cfg_yaml: Any, section: str) -> Mapping[str, Any] | None:
    """One section of a checkpoint's cfg YAML ({} when the cfg leaves it out), None without a readable cfg."""
    if not isinstance(cfg_yaml, str):
        return None
    try:
        cfg = yaml.safe_load(cfg_yaml) or {}
    except yaml.YAMLError:
        return None
    if not isinstance(cfg, dict):
        return None
    value = cfg.get(section) or {}
    return value if isinstance(value, Mapping) else None


def _order_from_cfg(cfg_yaml: Any) -> str | None:
    """MODEL.INPUT_COLOR_ORDER of a checkpoint's cfg (our default, BGR, when the cfg leaves it out)."""
    model = _cfg_section(cfg_yaml, "MODEL")
    return None if model is None else _parse_order(model.get("INPUT_COLOR_ORDER", "BGR"))


def _body_norm_from_cfg(cfg_yaml: Any) -> str | None:
    """The body's norm kind in a checkpoint's cfg (RESNETS.NORM; GroupNorm when RESNETS.USE_GN or a '*_gn_*'
    TRANS_FUNC / STEM_FUNC / SHORTCUT_FUNC says so, as the body builder reads them)."""
    resnets = _cfg_section(cfg_yaml, "RESNETS")
    if resnets is None:
        return None
    funcs = (str(resnets.get(key, "")) for key in ("TRANS_FUNC", "STEM_FUNC", "SHORTCUT_FUNC"))
    if resnets.get("USE_GN") or any("_gn_" in func for func in funcs):
        return "GN"
    return str(resnets.get("NORM", "AffineChannel"))


@dataclass
class WeightFile:
    """One weights file, recognised. `weights` are the network's entries in the file's own names, with the
    wrapper prefix removed (except ``pydetectron``: the whole state dict, whose body sits under `prefix`)."""

    path: str
    format: str
    weights: Mapping[str, Any]
    color_order: str | None
    container: Mapping[str, Any]
    location: Tuple[str, ...] = ()  # keys from `container` to the dict holding the weights
    prefix: str = ""  # the network's key prefix in that dict
    left_out: List[str] = field(default_factory=list)  # entries of that dict outside the network
    serializer: str = "pickle"  # how the file was written: 'pickle' | 'torch'
    body_norm: str | None = None  # ``pydetectron``: the body's RESNETS.NORM kind, from the file's cfg / metadata
    network: Mapping[str, Any] = field(default_factory=dict)  # ``detectron2`` detector: every entry, heads included
    _names: Dict[str, str] = field(default_factory=dict)
    _detector_names: DetectorNames | None = None

    @property
    def class_layout(self) -> str | None:
        """Where the file's box classifier keeps the background and whether its box / mask predictors have
        background rows: 'detectron' (first; (K+1)*4 boxes, K+1 masks) or 'detectron2' (last; K*4, K); None
        when the file does not say (a pydetectron file without cfg: taken as the model's)."""
        if self.format in ("detectron", "detectron2"):
            return self.format
        if self.format == "pydetectron":
            meta = self.container.get(METADATA_KEY)
            if isinstance(meta, Mapping) and meta.get("class_layout"):
                return str(meta["class_layout"])
            model = _cfg_section(self.container.get("cfg"), "MODEL")
            return None if model is None else str(model.get("CONVENTIONS", "detectron"))
        return None

    @property
    def description(self) -> str:
        text = FORMAT_NAMES[self.format]
        if self.location:
            text += f", in '{'/'.join(self.location)}'"
        if self.prefix:
            text += f", key prefix '{self.prefix}'"
        return text

    def blobs_for(self, model: nn.Module | None = None) -> Dict[str, Any]:
        """The entries under Caffe2 blob names (for ``pydetectron`` files, named by `model`'s mapping)."""
        if self.format == "merged":
            raise ValueError(f"{self.path} holds a teacher and a student ({', '.join(MERGED_PARTS.values())} keys); "
                             "take one out with: python tools/convert_weights.py split FILE OUT --part student|teacher")
        if self.format == "detectron":
            blobs, self._names = dict(self.weights), {}
        elif self.format == "detectron2" and model is not None and self.network and has_heads(model):
            blobs, self._names, left_out, self._detector_names = detectron2_detector_to_blobs(self.network, self.prefix)
            self.left_out = sorted(left_out)
        elif self.format == "detectron2":
            blobs, self._names, left_out = detectron2_to_blobs(self.weights)
            self.left_out = sorted(set(self.left_out) | {self.prefix + k for k in left_out})
        elif self.format == "torchvision":
            try:
                blobs, self._names = torchvision_resnet_to_blobs(self.weights)
            except KeyError as err:  # a ResNet variant without a Detectron counterpart (deep stem, SE blocks)
                raise UnknownWeightsFormat(f"{self.path} ({self.description}): {err.args[0]}") from None
        else:
            if model is None:
                raise ValueError(f"{self.path}: naming a pydetectron state dict's tensors needs the model")
            blobs, self._names = own_state_to_blobs(self.weights, self.prefix, model, self.body_norm)
        return blobs

    def file_name(self, blob: str, model_key: str | None = None) -> str:
        """What the file calls (or would call) `blob`, for messages."""
        if blob in self._names:
            return self._names[blob]
        if self.format == "detectron2" and self._detector_names is not None:
            return blob_to_detector_key(blob, self._detector_names) or blob
        if self.format == "detectron2":
            return self.prefix + (blob_to_detectron2_key(blob) or blob)
        if self.format == "torchvision":
            return self.prefix + (blob_to_torchvision_key(blob) or blob)
        if self.format == "pydetectron" and model_key:
            return model_key
        return blob


def has_heads(model: nn.Module) -> bool:
    """Whether `model` holds tensors outside a ResNet body (a detector, not a bare body)."""
    return any(blob and blob_to_detectron2_key(blob) is None for blob in model_weight_mapping(model).values())


def _anchor_prefix(keys, anchor: str) -> str | None:
    return next((k[: -len(anchor)] for k in keys if k == anchor or k.endswith("." + anchor)), None)


def _file_norm_blob(blob: str, module: str, norms_with_stats: set, body_norm: str | None) -> str:
    """`blob` (the model's name of a body norm tensor) as the file's own norm names it: a batch norm when the
    file has statistics for `module`, else its body norm kind (GroupNorm and AffineChannel state dicts have the
    same keys; only the file's cfg or metadata tells them apart). Unknown kind: the model's name."""
    match = _BODY_NORM_BLOB.match(blob)
    if match is None:
        return blob
    if module in norms_with_stats:
        is_gn = False
    elif body_norm is None:
        return blob
    else:
        is_gn = body_norm == "GN"
    conv, suffix = match.group(1) or "conv1", match.group(2)
    if conv == "conv1":
        return f"{'conv1_gn' if is_gn else 'res_conv1_bn'}_{suffix}"
    return f"{conv}_{'gn' if is_gn else 'bn'}_{suffix}"


def own_state_to_blobs(
    state: Mapping[str, Any], prefix: str, model: nn.Module, body_norm: str | None = None
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """A pydetectron state dict named by `model`'s Caffe2 mapping; `prefix` (where the file's ResNet stem sits)
    is replaced by the model's, so a detector's body loads into a bare body and the other way round. A batch
    norm's statistics are named ``<blob>_rm`` / ``<blob>_riv`` even when the model's norm (a frozen
    AffineChannel) has none, so the loader can fold them. Body norms are named as the file's own kind
    (`body_norm`, the file's RESNETS.NORM), so a GroupNorm file never fills an AffineChannel or batch-norm body.
    Tensors without a blob keep their key."""
    mapping = model_weight_mapping(model)
    target_prefix = _anchor_prefix(model.state_dict().keys(), PYDETECTRON_ANCHOR)
    norm_blob = {k[: -len(".weight")]: b[:-2] for k, b in mapping.items()
                 if b and k.endswith(".weight") and b.endswith("_s")}
    norms_with_stats = {k.rsplit(".", 1)[0] for k in state if k.endswith(".running_mean")}
    blobs: Dict[str, Any] = {}
    names: Dict[str, str] = {}
    for key, value in state.items():
        translated = key
        if target_prefix is not None and key.startswith(prefix):
            translated = target_prefix + key[len(prefix):]
        blob = mapping.get(translated)
        module, _, leaf = translated.rpartition(".")
        if blob is None:
            blob = norm_blob[module] + RUNNING_STAT_SUFFIXES[leaf] if (
                leaf in RUNNING_STAT_SUFFIXES and module in norm_blob) else translated
        blob = _file_norm_blob(blob, key.rpartition(".")[0], norms_with_stats, body_norm)
        blobs[blob] = to_numpy(value)
        names[blob] = key
    return blobs, names


def recognise(obj: Any, path: str) -> WeightFile:
    """The :class:`WeightFile` of an unpickled object; :class:`UnknownWeightsFormat` naming what was found."""
    if not isinstance(obj, Mapping):
        raise UnknownWeightsFormat(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    if isinstance(obj.get("blobs"), Mapping):
        blobs = {k: v for k, v in obj["blobs"].items() if k != "cfg" and v is not None}
        return WeightFile(path, "detectron", blobs, "BGR", obj, ("blobs",))
    if any(k in obj for k in DETECTRON_STEM_BLOBS):
        blobs = {k: v for k, v in obj.items() if k != "cfg" and v is not None}
        return WeightFile(path, "detectron", blobs, "BGR", obj)
    model = obj.get("model")
    if isinstance(model, Mapping) and all(any(str(k).startswith(p) for k in model) for p in MERGED_PARTS.values()):
        return WeightFile(path, "merged", model, None, obj, ("model",))
    found = find_network(obj, PYDETECTRON_ANCHOR, path)
    if found is not None:
        weights, prefix, location = found
        meta = obj.get(METADATA_KEY) if isinstance(obj.get(METADATA_KEY), Mapping) else {}
        order = _parse_order(meta.get("input_color_order")) or _order_from_cfg(obj.get("cfg"))
        norm = (meta.get("body") or {}).get("norm") or _body_norm_from_cfg(obj.get("cfg"))
        return WeightFile(path, "pydetectron", weights, order, obj, location, prefix, body_norm=norm)
    found = find_network(obj, DETECTRON2_ANCHOR, path)
    if found is not None:
        weights, prefix, location = found
        author = str(obj.get("__author__", "")).lower()
        meta = obj.get(METADATA_KEY) if isinstance(obj.get(METADATA_KEY), Mapping) else {}
        order = _parse_order(meta.get("input_color_order")) or ("RGB" if author == "torchvision" else None)
        body = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        # a detectron2 C4 detector keeps res5 in its box head, as ours does (same blob names)
        body.update({k[len(C4_HEAD_PREFIX):]: v for k, v in weights.items() if k.startswith(C4_HEAD_PREFIX + "res5.")})
        left_out = [k for k in weights if not k.startswith(prefix) and not k.startswith(C4_HEAD_PREFIX + "res5.")]
        network = weights if left_out else {}
        return WeightFile(path, "detectron2", body, order, obj, location, prefix, left_out, network=network)
    found = find_network(obj, TORCHVISION_ANCHOR, path)
    if found is not None:
        weights, prefix, location = found
        body = resnet_state_dict(weights, path)
        left_out = [k for k in weights if not (k.startswith(prefix) and k[len(prefix):] in body)]
        return WeightFile(path, "torchvision", body, None, obj, location, prefix, left_out)
    if isinstance(model, Mapping) and model and all(isinstance(v, torch.Tensor) for v in model.values()):
        # our checkpoint of a model without a ResNet: its tensors load by state_dict key
        return WeightFile(path, "pydetectron", model, _order_from_cfg(obj.get("cfg")), obj, ("model",))
    raise UnknownWeightsFormat(
        f"{path} holds no ResNet in any format pydetectron reads (Detectron .pkl blobs such as 'conv1_w', "
        f"detectron2 '{DETECTRON2_ANCHOR}', torchvision '{TORCHVISION_ANCHOR}', pydetectron "
        f"'{PYDETECTRON_ANCHOR}', under any prefix or in 'state_dict' / 'model' / 'teacher'); {_key_listing(obj)}")


def _key_listing(obj: Mapping[str, Any]) -> str:
    """The file's top-level keys and those inside the wrappers checkpoints keep their weights in."""
    parts = [f"top-level keys: {sorted(map(str, obj))[:12]}"]
    node, path = obj, []
    for _ in CHECKPOINT_WEIGHT_KEYS:
        inner = next((k for k in CHECKPOINT_WEIGHT_KEYS if isinstance(node.get(k), Mapping)), None)
        if inner is None:
            break
        node, path = node[inner], path + [inner]
        parts.append(f"keys in '{'/'.join(path)}': {sorted(map(str, node))[:12]}")
    return "; ".join(parts)


def merged_part(weights: WeightFile, part: str) -> Tuple[Any, str, int]:
    """``(object, serializer, tensor count)`` of the `part` ('teacher' | 'student') of a merged file: the part's
    own container (cfg, metadata) with its tensors put back, as it was before ``merge``; a part merged by
    MGD's script becomes a detectron2-style file keeping MGD's ``__author__`` (its 'TORCHVISION' says the RGB
    input its students and teachers are trained on)."""
    if part not in MERGED_PARTS:
        raise ValueError(f"the part of a merged file must be one of {', '.join(MERGED_PARTS)}, got {part!r}")
    if weights.format != "merged":
        raise ValueError(f"{weights.path} ({weights.description}) is not a merged teacher + student file, so it "
                         f"has no {part} part (tools/convert_weights.py merge --teacher T --student S OUT writes one; "
                         "a distillation without one names its teacher's weights in DISTILL.TEACHER_WEIGHTS)")
    info = weights.container.get("parts", {}).get(part)
    prefix = info["prefix"] if info else MERGED_PARTS[part]
    tensors = {k[len(prefix):]: v for k, v in weights.weights.items() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"{weights.path} holds no {part} tensors (no '{prefix}' keys)")
    if info is None:
        author = weights.container.get("__author__", "pydetectron")
        return {"model": tensors, "__author__": author, "matching_heuristics": True}, "pickle", len(tensors)
    obj = copy.deepcopy(info["container"])
    node = obj
    for key in info["location"]:
        node = node[key]
    node.update(tensors)
    return obj, info["serializer"], len(tensors)


def read_weights(path: str | os.PathLike, part: str | None = None) -> WeightFile:
    """Open and recognise a weights file (see the module docstring for the formats); `part` ('teacher' |
    'student') takes that part of a merged file, recognised as the file it was merged from."""
    path = os.fspath(path)
    obj, serializer = read_object_and_serializer(path)
    weights = recognise(obj, path)
    weights.serializer = serializer
    if part is None:
        return weights
    obj, serializer, _ = merged_part(weights, part)
    weights = recognise(obj, f"{path} [{part} part]")
    weights.serializer = serializer
    return weights
