"""detectron2 ResNet names <-> Caffe2 blob names.

detectron2 names a ResNet ``stem.conv1.weight``, ``stem.conv1.norm.{weight,bias,running_mean,running_var}``,
``res2.0.conv1.weight``, ``res2.0.conv1.norm.*``, ``res2.0.shortcut.weight``, ``res2.0.shortcut.norm.*``
(inside a detector prefixed ``backbone.bottom_up.``). That is what its ``convert-torchvision-to-d2.py``,
SparK's ``convert-timm-to-d2.py`` and OpenSelfSup's converter write, as
``pickle({'model': {name: numpy array}, '__author__': ..., 'matching_heuristics': True})``.

A norm with running statistics is a batch norm (``_bn_s/_b/_rm/_riv``, unfolded; detectron2's
FrozenBatchNorm2d keeps them too); one without is a GroupNorm (``_gn_s/_b``). Written the other way, a
folded AffineChannel becomes detectron2's FrozenBatchNorm2d with mean 0 and variance ``1 - eps``, exactly
the affine map it is.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from pydetectron.weights.detectron_pkl import BN_EPS
from pydetectron.weights.torchvision import to_numpy

DETECTRON2_ANCHOR = "res2.0.conv1.weight"
_KEY = re.compile(r"^(?:stem\.conv1|res(\d)\.(\d+)\.(conv[123]|shortcut))(\.norm)?"
                  r"\.(weight|bias|running_mean|running_var)$")
_BRANCH_OF = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
_CONV_OF = {v: k for k, v in _BRANCH_OF.items()}
_NORM_SUFFIX = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_NORM_PARAM = {v: k for k, v in _NORM_SUFFIX.items()}
_BLOB = re.compile(r"^(?:(conv1)|res_conv1_bn|conv1_gn|res(\d)_(\d+)_(branch1|branch2a|branch2b|branch2c))"
                   r"(?:_(bn|gn))?_(w|b|s|rm|riv)$")
IGNORED_KEYS = re.compile(r"(^|\.)(num_batches_tracked$|fc\.(weight|bias)$)")  # counters; SparK's 'stem.fc'


def is_detectron2_key(key: str) -> bool:
    return _KEY.match(key) is not None


def detectron2_to_blobs(state: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, str], list]:
    """(``{blob: array}``, ``{blob: the file's key}``, keys left out) of a detectron2 ResNet state dict whose
    backbone prefix is already removed. Keys that are not ResNet body names are returned as left out;
    batch-norm counters and a classifier (SparK's ``stem.fc``) are dropped."""
    norms_with_stats = {k.rsplit(".", 1)[0] for k in state if k.endswith(".norm.running_mean")}
    blobs: Dict[str, np.ndarray] = {}
    names: Dict[str, str] = {}
    left_out = []
    for key, value in state.items():
        if IGNORED_KEYS.search(key):
            continue
        match = _KEY.match(key)
        if match is None:
            left_out.append(key)
            continue
        stage, block, part, norm, param = match.groups()
        prefix = "conv1" if stage is None else f"res{stage}_{block}_{_BRANCH_OF[part]}"
        if norm:
            is_bn = key.rsplit(".", 1)[0] in norms_with_stats
            if prefix == "conv1":
                prefix = "res_conv1" if is_bn else "conv1"
            blob = f"{prefix}_{'bn' if is_bn else 'gn'}_{_NORM_SUFFIX[param]}"
        elif param in ("weight", "bias"):
            blob = f"{prefix}_{param[0]}"
        else:
            left_out.append(key)
            continue
        blobs[blob] = to_numpy(value)
        names[blob] = key
    return blobs, names, left_out


def blob_to_detectron2_key(blob: str) -> str | None:
    """detectron2's name of a Caffe2 body blob (``res3_1_branch2b_bn_riv`` -> ``res3.1.conv2.norm.running_var``),
    or None for blobs outside the ResNet body."""
    match = _BLOB.match(blob)
    if match is None:
        return None
    stem_conv, stage, block, branch, norm, suffix = match.groups()
    if blob.startswith(("res_conv1_bn_", "conv1_gn_")):
        head, norm = "stem.conv1", "bn"
    elif stem_conv:
        head = "stem.conv1"
    else:
        head = f"res{stage}.{block}.{_CONV_OF[branch]}"
    if norm:
        return f"{head}.norm.{_NORM_PARAM[suffix]}" if suffix in _NORM_PARAM else None
    return {"w": f"{head}.weight", "b": f"{head}.bias"}.get(suffix)


def blobs_to_detectron2(blobs: Mapping[str, np.ndarray], bn_eps: float = BN_EPS) -> Tuple[Dict[str, np.ndarray], list]:
    """(detectron2 ResNet state dict, blobs left out) from Caffe2 blobs. A batch-norm-named norm without
    statistics (a folded AffineChannel) gets mean 0 and variance ``1 - eps``, as detectron2's
    FrozenBatchNorm2d initialises them, so it reads back as a batch norm."""
    state: Dict[str, np.ndarray] = {}
    left_out = []
    for blob, value in blobs.items():
        key = blob_to_detectron2_key(blob)
        if key is None:
            left_out.append(blob)
            continue
        state[key] = np.asarray(value)
    for blob, value in blobs.items():
        if blob.endswith("_bn_s") and blob[:-2] + "_rm" not in blobs and blob_to_detectron2_key(blob):
            norm = blob_to_detectron2_key(blob)[: -len(".weight")]
            state[f"{norm}.running_mean"] = np.zeros(np.shape(value), np.float32)
            state[f"{norm}.running_var"] = np.full(np.shape(value), 1.0 - bn_eps, np.float32)
    return state, left_out
