"""The detector of a frozen cfg with trained weights, for testing and inference (tools/test_net.py,
tools/infer_simple.py).

At test time no layer may keep its random initialisation, so loading is strict: any parameter the weights
lack, any weight the model does not use, and any shape difference (typically a class count that differs
from MODEL.NUM_CLASSES) raises :class:`WeightMismatchError` listing every offender. Training, by contrast,
lets class-dependent layers of another size be fine-tuned (``engine/training.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from pydetectron.modeling.detector import build_detector
from pydetectron.weights import WeightMismatchError, load_pretrained

__all__ = ["WeightMismatchError", "build_inference_model"]


def build_inference_model(cfg, load_ckpt: str | None = None, load_detectron: str | None = None,
                          device: torch.device | str = "cpu") -> nn.Module:
    """The detector of frozen `cfg`, in eval mode on `device`, with weights loaded strictly
    (`weights.load_pretrained` with ``training=False``) from exactly one of `load_ckpt` (a pydetectron
    checkpoint) or `load_detectron` (a Detectron ``.pkl``); either may be any format the loader reads."""
    if bool(load_ckpt) == bool(load_detectron):
        raise ValueError("give exactly one of --load_ckpt (pydetectron .pth) or --load_detectron (Detectron .pkl); "
                         f"got load_ckpt={load_ckpt!r}, load_detectron={load_detectron!r}")
    model = build_detector(cfg)
    load_pretrained(model, load_ckpt or load_detectron, cfg, training=False, print_fn=lambda _: None)
    return model.to(device).eval()
