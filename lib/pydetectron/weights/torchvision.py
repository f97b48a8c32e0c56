"""torchvision ResNet/ResNeXt ``.pth`` -> Detectron-named blobs for our bodies.

torchvision's layout (``conv1``/``bn1``, ``layer1.0.conv1``..., ``downsample.0/1``) maps one to one onto
Caffe2's (``conv1_w``, ``res_conv1_bn``, ``res2_0_branch2a``..., ``branch1``). Batch norms are folded into
the ``*_bn_s``/``*_bn_b`` pair Detectron's AffineChannel uses: ``s = gamma / sqrt(var + eps)``,
``b = beta - mean * s``. torchvision models put the stride in the 3x3 conv, so build the body with
``RESNETS.STRIDE_1X1 = False``.

The input: torchvision nets expect RGB ``(x / 255 - mean) / std`` with ImageNet's mean/std; ours get
``(x - PIXEL_MEANS) / PIXEL_STDS`` in ``MODEL.INPUT_COLOR_ORDER``. conv1's input channels are reordered to
that order and scaled by ``PIXEL_STDS / (255 * std)``, so with ``PIXEL_MEANS = 255 * mean`` (in the same
order) the converted body computes exactly what torchvision's does on the same picture.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pydetectron.weights.detectron_pkl import COLOR_ORDERS, LoadReport, load_detectron_weights

logger = logging.getLogger(__name__)

TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)
BN_EPS = 1e-5  # torchvision's BatchNorm2d default; the state_dict does not store it

_BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)$")
_BODY_BLOB = re.compile(r"^(conv1|res_conv1|res\d+_\d+)_")
_BRANCH = {"1": "branch2a", "2": "branch2b", "3": "branch2c"}


def _blob_prefix(key: str) -> tuple[str, str] | None:
    """('res3_1_branch2b', 'conv'|'bn') for a torchvision key, or None for the classifier ``fc``."""
    if key.startswith("fc."):
        return None
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


def _fold_input(
    weight: np.ndarray, input_order: str, pixel_means: Sequence[float] | None, pixel_stds: Sequence[float] | None
) -> np.ndarray:
    """conv1 weights ``(64, 3, 7, 7)`` in Detectron's BGR channel order, scaled for our normalisation given
    in `input_order` (see the module docstring); the loader reverses them again for an RGB model."""
    if input_order not in COLOR_ORDERS:
        raise ValueError(f"MODEL.INPUT_COLOR_ORDER must be one of {COLOR_ORDERS}, got {input_order!r}")
    to_bgr = [2, 1, 0] if input_order == "RGB" else [0, 1, 2]
    tv_mean = np.array(TORCHVISION_MEAN_RGB)[::-1] * 255.0
    tv_std = np.array(TORCHVISION_STD_RGB)[::-1] * 255.0
    stds = np.ones(3) if pixel_stds is None else np.asarray(pixel_stds, dtype=np.float64).reshape(3)[to_bgr]
    if pixel_means is not None:
        means = np.asarray(pixel_means, dtype=np.float64).reshape(3)[to_bgr]
        if not np.allclose(means, tv_mean, atol=1e-3):
            logger.warning(
                "PIXEL_MEANS %s (BGR) differ from the torchvision model's %s: features will not match "
                "torchvision's exactly", means.tolist(), tv_mean.round(4).tolist(),
            )
    scale = (stds / tv_std).reshape(1, 3, 1, 1)
    return (weight[:, ::-1].astype(np.float64) * scale).astype(np.float32)


def torchvision_resnet_to_blobs(
    state_dict: Mapping[str, Any],
    *,
    input_order: str = "BGR",
    pixel_means: Sequence[float] | None = None,
    pixel_stds: Sequence[float] | None = None,
) -> Dict[str, np.ndarray]:
    """Detectron-named blobs (``{'conv1_w': ..., 'res_conv1_bn_s': ...}``) from a torchvision ResNet state_dict.

    `pixel_means`/`pixel_stds` are ours, 3 values in `input_order`; ``conv1_w`` comes out in BGR order like
    every Detectron file (load it with the same `input_order`); the classifier ``fc`` is dropped.
    """
    groups: Dict[tuple[str, str], Dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        target = _blob_prefix(key)
        if target is None:
            continue
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        groups.setdefault(target, {})[key.rsplit(".", 1)[1]] = array
    blobs: Dict[str, np.ndarray] = {}
    for (prefix, kind), params in groups.items():
        if kind == "conv":
            weight = params["weight"]
            if prefix == "conv1":
                weight = _fold_input(weight, input_order, pixel_means, pixel_stds)
            blobs[f"{prefix}_w"] = weight.astype(np.float32)
            continue
        missing = {"weight", "bias", "running_mean", "running_var"} - set(params)
        if missing:
            raise KeyError(f"batch norm {prefix!r} lacks {sorted(missing)} in the torchvision state_dict")
        scale = params["weight"].astype(np.float64) / np.sqrt(params["running_var"].astype(np.float64) + BN_EPS)
        blobs[f"{prefix}_bn_s"] = scale.astype(np.float32)
        blobs[f"{prefix}_bn_b"] = (params["bias"] - params["running_mean"] * scale).astype(np.float32)
    return blobs


# Where training checkpoints keep their weights: MoCo / timm 'state_dict', detectron2 / DeiT-style 'model',
# DINO 'teacher' (the network its authors evaluate), timm's EMA copy 'state_dict_ema'.
CHECKPOINT_WEIGHT_KEYS = ("state_dict", "model", "teacher", "state_dict_ema")
# A ResNet's weights are found by this key, whatever prefix a training wrapper put before it.
_ANCHOR_KEY = "layer1.0.conv1.weight"
# With several ResNets in one file, the one a self-supervised method's authors transfer: MoCo's query encoder.
_PREFERRED_PREFIX_PARTS = ("encoder_q",)
_RESNET_KEY = re.compile(r"^(conv1|bn1|layer\d|fc)\.")


def resnet_state_dict(checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> Dict[str, Any]:
    """The torchvision-layout ResNet weights inside a checkpoint: a plain torchvision / timm state_dict, or a
    self-supervised or training checkpoint (MoCo ``{'state_dict': {'module.encoder_q.conv1.weight': ...}}``,
    DINO ``{'teacher': {'backbone.conv1.weight': ...}}``, ...): unwrapped from ``CHECKPOINT_WEIGHT_KEYS``,
    with the wrapper's key prefix removed and every other network in the file left out. Errors name
    `source` and what was found."""
    weights: Mapping[str, Any] = checkpoint
    while _ANCHOR_KEY not in weights and not any(k.endswith("." + _ANCHOR_KEY) for k in weights):
        inner = next((k for k in CHECKPOINT_WEIGHT_KEYS if isinstance(weights.get(k), Mapping)), None)
        if inner is None:
            raise KeyError(f"{source} holds no ResNet weights (no '{_ANCHOR_KEY}' under any prefix; top-level keys: "
                           f"{sorted(weights)[:12]})")
        weights = weights[inner]
    prefixes = sorted(k[: -len(_ANCHOR_KEY)] for k in weights if k.endswith(_ANCHOR_KEY))
    if len(prefixes) > 1:
        preferred = [p for p in prefixes if any(part in p for part in _PREFERRED_PREFIX_PARTS)]
        if len(preferred) != 1:
            raise KeyError(f"{source} holds several ResNets (key prefixes {prefixes}); save the one to fine-tune "
                           "as a plain torchvision state_dict")
        prefixes = preferred
    prefix = prefixes[0]
    if prefix and not prefix.endswith("."):
        raise KeyError(f"{source}: '{prefix}{_ANCHOR_KEY}' is not a ResNet key under a module prefix")
    return {k[len(prefix):]: v for k, v in weights.items()
            if k.startswith(prefix) and _RESNET_KEY.match(k[len(prefix):])}


def load_torchvision_resnet(
    body: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    input_order: str = "BGR",
    pixel_means: Sequence[float] | None = None,
    pixel_stds: Sequence[float] | None = None,
    strict: bool = True,
) -> LoadReport:
    """Initialise `body` (a ResNet, or a model containing one) from a torchvision ResNet ``.pth``/state_dict,
    or any checkpoint :func:`resnet_state_dict` finds one in (timm, MoCo, DINO, detectron2-style files).

    The body must use a batch-norm family normalisation (AffineChannel, BN, SyncBN): a GroupNorm body
    has no torchvision counterpart. Trainable BN layers receive the folded scale/shift with zero mean and
    unit variance (their eval output then differs by the factor ``1/sqrt(1 + eps)``).
    """
    if any(isinstance(m, nn.GroupNorm) for m in body.modules()):
        raise ValueError("torchvision ResNets use batch norm; they cannot initialise a GroupNorm body")
    if isinstance(source, (str, os.PathLike)):
        state_dict = resnet_state_dict(torch.load(source, map_location="cpu", weights_only=True), os.fspath(source))
    else:
        state_dict = resnet_state_dict(source)
    blobs = torchvision_resnet_to_blobs(
        state_dict, input_order=input_order, pixel_means=pixel_means, pixel_stds=pixel_stds
    )
    report = load_detectron_weights(body, blobs, strict=False, input_order=input_order)
    missing_body = [b for b in report.missing if _BODY_BLOB.match(b)]
    if strict and (report.unused or missing_body):
        raise KeyError(
            f"torchvision weights do not fit the body: blobs without a place {report.unused}, body blobs "
            f"not in the file {missing_body} (check the depth and RESNETS.STRIDE_1X1=False)"
        )
    return report
