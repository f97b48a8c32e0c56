"""The detector of a frozen cfg with trained weights, for testing and inference (tools/test_net.py,
tools/infer_simple.py).

At test time no layer may keep its random initialisation, so loading is strict: any parameter the weights
lack, any weight the model does not use, and any shape difference (typically a class count that differs
from MODEL.NUM_CLASSES) raises :class:`WeightMismatchError` listing every offender. Training, by contrast,
lets class-dependent layers of another size be fine-tuned (``engine/training.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pydetectron.modeling.detector import build_detector
from pydetectron.weights import WeightMismatchError, load_pretrained, read_weights
from pydetectron.weights.download import cached_weights_path

__all__ = ["WeightMismatchError", "build_inference_model", "weights_num_classes"]


def _weights_source(load_ckpt: str | None, load_detectron: str | None, cache_dir: str) -> str:
    """The local file of exactly one of `load_ckpt` / `load_detectron` (a path, or a URL downloaded once)."""
    if bool(load_ckpt) == bool(load_detectron):
        raise ValueError("give exactly one of --load_ckpt (pydetectron .pth) or --load_detectron (Detectron .pkl); "
                         f"got load_ckpt={load_ckpt!r}, load_detectron={load_detectron!r}")
    return cached_weights_path(load_ckpt or load_detectron, cache_dir,
                               "--load_ckpt" if load_ckpt else "--load_detectron")


def weights_num_classes(load_ckpt: str | None, load_detectron: str | None, cache_dir: str) -> int | None:
    """The class count (with background) the weights were trained for, read from their box classifier
    (``cls_score``); None when they have none (RetinaNet, RPN-only, a bare backbone)."""
    found = read_weights(_weights_source(load_ckpt, load_detectron, cache_dir))
    weights = {**found.weights, **found.network}  # a detectron2 detector's heads sit outside its body
    return next((int(np.shape(value)[0]) for key, value in weights.items()
                 if key == "cls_score_w" or key.endswith("cls_score.weight")), None)


def build_inference_model(cfg, load_ckpt: str | None = None, load_detectron: str | None = None,
                          device: torch.device | str = "cpu") -> nn.Module:
    """The detector of frozen `cfg`, in eval mode on `device`, with weights loaded strictly
    (`weights.load_pretrained` with ``training=False``) from exactly one of `load_ckpt` (a pydetectron
    checkpoint) or `load_detectron` (a Detectron ``.pkl``); either may be any format the loader reads, and a
    path or an http(s) URL (downloaded once into cfg.DOWNLOAD_CACHE)."""
    path = _weights_source(load_ckpt, load_detectron, cfg.DOWNLOAD_CACHE)
    model = build_detector(cfg)
    load_pretrained(model, path, cfg, training=False, print_fn=lambda _: None)
    return model.to(device).eval()
