"""torchvision / timm ResNet state dicts -> Caffe2-named blobs, and finding a ResNet inside a checkpoint.

torchvision's layout (``conv1``/``bn1``, ``layer1.0.conv1``..., ``downsample.0/1``; timm's ResNets use the
same names) maps one to one onto Caffe2's (``conv1_w``, ``res_conv1_bn``, ``res2_0_branch2a``...,
``branch1``). Batch norms come out unfolded in Caffe2's SpatialBN names (``_bn_s`` = gamma, ``_bn_b`` = beta,
``_bn_rm`` = running mean, ``_bn_riv`` = running variance); the loader folds them only into a frozen
AffineChannel. A norm without running statistics is a GroupNorm (timm's ``resnet50_gn`` keeps torchvision's
``bn1``... names for its GroupNorms) and gets Detectron's GN names (``_gn_s``/``_gn_b``, stem ``conv1_gn``), so it
loads into a GN body only. Nothing else changes: conv1 stays as trained (its channel order and the input normalisation
are not in the file; the cfg states them, see README "Fine-tune your own backbone").
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import torch

_BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)$")
_BRANCH = {"1": "branch2a", "2": "branch2b", "3": "branch2c"}
_BN_SUFFIX = {"weight": "_s", "bias": "_b", "running_mean": "_rm", "running_var": "_riv"}

# Where training checkpoints keep their weights: MoCo / timm 'state_dict', detectron2 / DeiT-style 'model',
# DINO 'teacher' (the network its authors evaluate), timm's EMA copy 'state_dict_ema'.
CHECKPOINT_WEIGHT_KEYS = ("state_dict", "model", "teacher", "state_dict_ema")
# A torchvision-layout ResNet is found by this key, whatever prefix a training wrapper put before it.
TORCHVISION_ANCHOR = "layer1.0.conv1.weight"
# With several networks in one file, the one a self-supervised method's authors transfer: MoCo's query encoder.
_PREFERRED_PREFIX_PARTS = ("encoder_q",)
_RESNET_KEY = re.compile(r"^(conv1|bn1|layer\d|fc)\.")


def _blob_prefix(key: str) -> tuple[str, str] | None:
    """('res3_1_branch2b', 'conv'|'bn') for a torchvision key, or None for the classifier ``fc``."""
    if key.startswith("fc."):
        return None
    if re.match(r"^conv1\.\d+\.", key):
        raise KeyError(f"{key!r}: a deep-stem ResNet (timm's ResNet-C/D 'conv1.0/1/...' stem) has no Detectron "
                       "counterpart; use a ResNet with the plain 7x7 stem")
    if key.startswith("conv1."):
        return "conv1", "conv"
    if key.startswith("bn1."):
        return "res_conv1", "bn"
    match = _BLOCK_KEY.match(key)
    if match is None:
        raise KeyError(f"unexpected key {key!r} in a torchvision ResNet state_dict")
    layer, block, part, _ = match.groups()
    stage = f"res{int(layer) + 1}_{block}"
    if part.startswith("downsample"):
        return f"{stage}_branch1", "conv" if part.endswith("0") else "bn"
    return f"{stage}_{_BRANCH[part[-1]]}", part[:-1]


def to_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def torchvision_resnet_to_blobs(state_dict: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(``{blob: array}``, ``{blob: the file's key}``) from a torchvision / timm ResNet state_dict.

    Values are copied unchanged (conv1 in the file's channel order, batch norms unfolded); the classifier
    ``fc`` and ``num_batches_tracked`` are left out. A norm without running statistics is named as a GroupNorm.
    """
    norms_with_stats = {k.rsplit(".", 1)[0] for k in state_dict if k.endswith(".running_mean")}
    blobs: Dict[str, np.ndarray] = {}
    names: Dict[str, str] = {}
    for key, value in state_dict.items():
        target = _blob_prefix(key)
        if target is None or key.endswith("num_batches_tracked"):
            continue
        prefix, kind = target
        param = key.rsplit(".", 1)[1]
        if kind == "conv":
            if param != "weight":
                raise KeyError(f"unexpected conv parameter {key!r} (torchvision ResNet convs have no bias)")
            blob = f"{prefix}_w"
        else:
            if param not in _BN_SUFFIX:
                raise KeyError(f"unexpected batch-norm entry {key!r}")
            is_bn = key.rsplit(".", 1)[0] in norms_with_stats
            if prefix == "res_conv1" and not is_bn:
                prefix = "conv1"  # Detectron's GN stem: conv1_gn_*
            blob = f"{prefix}_{'bn' if is_bn else 'gn'}{_BN_SUFFIX[param]}"
        blobs[blob] = to_numpy(value)
        names[blob] = key
    return blobs, names


def find_network(
    checkpoint: Mapping[str, Any], anchor: str, source: str = "the checkpoint"
) -> Tuple[Mapping[str, Any], str, Tuple[str, ...]] | None:
    """(weights dict, key prefix, path of container keys) of the network whose keys end in `anchor`, unwrapped
    from ``CHECKPOINT_WEIGHT_KEYS`` (MoCo ``{'state_dict': {'module.encoder_q.conv1.weight': ...}}``, DINO
    ``{'teacher': {'backbone.conv1.weight': ...}}``, ...), or None when there is none. Several networks in one
    file raise ``KeyError`` unless one is MoCo's query encoder."""
    weights: Mapping[str, Any] = checkpoint
    path: Tuple[str, ...] = ()
    while not any(isinstance(k, str) and (k == anchor or k.endswith("." + anchor)) for k in weights):
        inner = next((k for k in CHECKPOINT_WEIGHT_KEYS if isinstance(weights.get(k), Mapping)), None)
        if inner is None:
            return None
        weights, path = weights[inner], path + (inner,)
    prefixes = sorted(k[: -len(anchor)] for k in weights if isinstance(k, str) and k.endswith(anchor))
    if len(prefixes) > 1:
        preferred = [p for p in prefixes if any(part in p for part in _PREFERRED_PREFIX_PARTS)]
        if len(preferred) != 1:
            raise KeyError(f"{source} holds several networks (key prefixes {prefixes}); save the one to fine-tune "
                           "on its own, or split it with tools/convert_weights.py split")
        prefixes = preferred
    prefix = prefixes[0]
    if prefix and not prefix.endswith("."):
        raise KeyError(f"{source}: '{prefix}{anchor}' is not a network key under a module prefix")
    return weights, prefix, path


def resnet_state_dict(checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> Dict[str, Any]:
    """The torchvision-layout ResNet weights inside a checkpoint (see :func:`find_network`), with the wrapper's
    key prefix removed and every other network in the file left out. Errors name `source`."""
    found = find_network(checkpoint, TORCHVISION_ANCHOR, source)
    if found is None:
        raise KeyError(f"{source} holds no ResNet weights (no '{TORCHVISION_ANCHOR}' under any prefix; top-level "
                       f"keys: {sorted(map(str, checkpoint))[:12]})")
    weights, prefix, _ = found
    return {k[len(prefix):]: v for k, v in weights.items()
            if k.startswith(prefix) and _RESNET_KEY.match(k[len(prefix):])}


_BODY_BLOB = re.compile(r"^(?:res(\d)_(\d+)_branch(1|2a|2b|2c)|(conv1)|(res_conv1)_bn)(_bn|_gn)?_(w|s|b|rm|riv)$")
_PARAM_OF_SUFFIX = {suffix[1:]: param for param, suffix in _BN_SUFFIX.items()}


def blob_to_torchvision_key(blob: str) -> str | None:
    """The torchvision key of a Caffe2 body blob (``res3_1_branch2b_bn_s`` -> ``layer2.1.bn2.weight``), or None."""
    match = _BODY_BLOB.match(blob)
    if match is None:
        return None
    stage, block, branch, stem_conv, stem_bn, norm, suffix = match.groups()
    is_bn = suffix != "w"
    param = _PARAM_OF_SUFFIX.get(suffix, "weight")
    if stem_conv:
        if norm == "_gn" and is_bn:
            return f"bn1.{param}"
        return None if is_bn or norm else "conv1.weight"
    if stem_bn:
        return f"bn1.{param}" if is_bn else None
    head = f"layer{int(stage) - 1}.{block}"
    if branch == "1":
        return f"{head}.downsample.{1 if is_bn else 0}.{param}"
    index = {"2a": 1, "2b": 2, "2c": 3}[branch]
    return f"{head}.{'bn' if is_bn else 'conv'}{index}.{param}"
