"""The detector of a frozen cfg with trained weights, for testing and inference (tools/test_net.py,
tools/infer_simple.py).

At test time no layer may keep its random initialisation, so loading is strict: any parameter the weights
lack, any weight the model does not use, and any shape difference (typically a class count that differs
from MODEL.NUM_CLASSES) raises :class:`WeightMismatchError` listing every offender. Training, by contrast,
loads leniently (``engine/training.py``) so that class-dependent layers can be fine-tuned.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pydetectron.engine.checkpoint import load_checkpoint
from pydetectron.modeling.detector import build_detector
from pydetectron.weights.detectron_pkl import load_detectron_weights, read_detectron_pickle
from pydetectron.weights.download import cached_weights_path


class WeightMismatchError(ValueError):
    """The weights do not fit the cfg's model; the message lists the missing / unexpected / mis-shaped names."""


def _listing(title: str, names: Sequence[str]) -> str:
    return f"  {title} ({len(names)}): " + ", ".join(names) if names else ""


def _mismatch_message(source: str, missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str],
                      hint: str = "") -> str:
    lines = [f"weights {source} do not match the model built from the cfg:"]
    lines += [line for line in (_listing("missing in the weights", missing),
                                _listing("unexpected (not in the model)", unexpected),
                                _listing("shape differs", shapes)) if line]
    if hint:
        lines.append(f"  {hint}")
    return "\n".join(lines)


def _class_hint(file_classes: int | None, num_classes: int) -> str:
    if file_classes is None or file_classes == num_classes:
        return ""
    return (f"the weights were trained for {file_classes} classes (with background) but MODEL.NUM_CLASSES is "
            f"{num_classes}: pass the matching --dataset or --set MODEL.NUM_CLASSES {file_classes}")


def _state_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Rows of the box classifier (cls_score) of a pydetectron state dict, background included."""
    return next((int(v.shape[0]) for k, v in state.items() if k.endswith("cls_score.weight") and v.dim() >= 1), None)


def _blobs_num_classes(blobs: Mapping[str, np.ndarray]) -> int | None:
    """Rows of the box classifier (cls_score_w) of Detectron blobs, background included."""
    return int(np.asarray(blobs["cls_score_w"]).shape[0]) if "cls_score_w" in blobs else None


def weights_num_classes(load_ckpt: str | None, load_detectron: str | None, cache_dir: str) -> int | None:
    """The class count (with background) the weights were trained for, read from their box classifier; None
    when they have none (RetinaNet, RPN-only). Paths or URLs as for :func:`build_inference_model`."""
    if load_ckpt:
        return _state_num_classes(load_checkpoint(cached_weights_path(load_ckpt, cache_dir, "--load_ckpt"))["model"])
    data = read_detectron_pickle(cached_weights_path(load_detectron, cache_dir, "--load_detectron"))
    return _blobs_num_classes(data.get("blobs", data))


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                           num_classes: int) -> None:
    """Copy a pydetectron state dict into `model`; every key and shape must match exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} in the weights vs {tuple(own[k].shape)} in the model"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise WeightMismatchError(_mismatch_message(source, missing, unexpected, shapes,
                                                    _class_hint(_state_num_classes(state), num_classes)))
    model.load_state_dict(state, strict=True)


def load_detectron_strict(model: nn.Module, path: str, num_classes: int) -> None:
    """Copy a Detectron .pkl into `model` by blob name; every mapped tensor must be filled, every non-ignorable
    blob used, and every shape equal (class-count layers are NOT skipped)."""
    data = read_detectron_pickle(path)
    blobs = data.get("blobs", data)
    hint = _class_hint(_blobs_num_classes(blobs), num_classes)
    try:
        report = load_detectron_weights(model, data, strict=False, allow_skip_class_layers=False,
                                        num_classes=num_classes)
    except ValueError as err:  # a shape mismatch, named by the loader
        raise WeightMismatchError(_mismatch_message(path, [], [], [str(err)], hint)) from None
    if report.missing or report.unused or report.unmapped:
        raise WeightMismatchError(_mismatch_message(
            path, report.missing + [f"{k} (model tensor with no Detectron blob)" for k in report.unmapped],
            report.unused, [], hint))


def build_inference_model(cfg, load_ckpt: str | None = None, load_detectron: str | None = None,
                          device: torch.device | str = "cpu") -> nn.Module:
    """The detector of frozen `cfg`, in eval mode on `device`, with weights loaded strictly from exactly one of
    a pydetectron checkpoint (`load_ckpt`, a ``.pth`` with a 'model' state dict) or a Detectron ``.pkl``; either
    may be an http(s) URL, downloaded once into cfg.DOWNLOAD_CACHE."""
    if bool(load_ckpt) == bool(load_detectron):
        raise ValueError("give exactly one of --load_ckpt (pydetectron .pth) or --load_detectron (Detectron .pkl); "
                         f"got load_ckpt={load_ckpt!r}, load_detectron={load_detectron!r}")
    model = build_detector(cfg)
    num_classes = int(cfg.MODEL.NUM_CLASSES)
    if load_ckpt:
        path = cached_weights_path(load_ckpt, cfg.DOWNLOAD_CACHE, "--load_ckpt")
        load_state_dict_strict(model, load_checkpoint(path)["model"], load_ckpt, num_classes)
    else:
        load_detectron_strict(model, cached_weights_path(load_detectron, cfg.DOWNLOAD_CACHE, "--load_detectron"),
                              num_classes)
    return model.to(device).eval()
