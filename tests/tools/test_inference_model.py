"""Strict weight loading for testing / inference: every missing, unexpected or mis-shaped name is listed."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from pydetectron.engine.checkpoint import atomic_save
from pydetectron.engine.inference_model import WeightMismatchError, build_inference_model
from pydetectron.weights import load_pretrained


class TinyHead(nn.Module):
    """A conv and a class-count output layer, with Detectron blob names."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.cls_score = nn.Linear(4, num_classes)

    def detectron_weight_mapping(self):
        return {"conv.weight": "conv1_w", "conv.bias": "conv1_b", "cls_score.weight": "cls_score_w",
                "cls_score.bias": "cls_score_b"}


class Cfg:  # only what the loaders read
    DOWNLOAD_CACHE = "/nonexistent-download-cache"  # local paths only: nothing is downloaded

    class MODEL:
        NUM_CLASSES = 5
        INPUT_COLOR_ORDER = "BGR"


def _load_strict(model: nn.Module, path) -> None:
    load_pretrained(model, path, Cfg, training=False)


def _blobs(model: nn.Module) -> dict:
    mapping = model.detectron_weight_mapping()
    return {mapping[k]: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_checkpoint_with_every_key_loads_exactly(tmp_path):
    source, target = TinyHead(5), TinyHead(5)
    atomic_save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    _load_strict(target, tmp_path / "ckpt.pth")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_mismatch_lists_missing_unexpected_and_class_count(tmp_path):
    state = TinyHead(7).state_dict()
    del state["conv.bias"]
    state["extra.weight"] = torch.zeros(2)
    atomic_save({"model": state}, tmp_path / "run" / "model.pth")
    with pytest.raises(WeightMismatchError) as err:
        _load_strict(TinyHead(5), tmp_path / "run" / "model.pth")
    text = str(err.value)
    assert "run/model.pth" in text
    assert "missing in the weights (1): conv.bias" in text
    assert "unexpected (not in the model) (1): extra.weight" in text
    assert "'cls_score_w' has shape (7, 4) in the weights file but the model expects (5, 4)" in text
    assert "'cls_score_b' has shape (7,)" in text
    assert "trained for 7 classes" in text and "MODEL.NUM_CLASSES is 5" in text


def test_detectron_pickle_loads_strictly(tmp_path):
    source, target = TinyHead(5), TinyHead(5)
    path = tmp_path / "w.pkl"
    blobs = _blobs(source)
    blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])  # training leftovers are ignored
    path.write_bytes(pickle.dumps({"blobs": blobs}))
    _load_strict(target, path)
    torch.testing.assert_close(target.conv.weight, source.conv.weight, rtol=0, atol=0)


def test_detectron_pickle_missing_and_unused_blobs_are_listed(tmp_path):
    blobs = _blobs(TinyHead(5))
    del blobs["conv1_w"]
    blobs["fpn_extra_w"] = np.ones((2, 2), np.float32)
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}))
    with pytest.raises(WeightMismatchError) as err:
        _load_strict(TinyHead(5), path)
    assert "missing in the weights (1): conv1_w" in str(err.value)
    assert "unexpected (not in the model) (1): fpn_extra_w" in str(err.value)


def test_detectron_pickle_with_another_class_count_is_refused(tmp_path):
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"blobs": _blobs(TinyHead(81))}))
    with pytest.raises(WeightMismatchError) as err:
        _load_strict(TinyHead(5), path)
    assert "cls_score_w" in str(err.value)
    assert "trained for 81 classes" in str(err.value) and "MODEL.NUM_CLASSES is 5" in str(err.value)


def test_build_inference_model_needs_exactly_one_source(tmp_path, monkeypatch):
    import pydetectron.engine.inference_model as inference_model

    monkeypatch.setattr(inference_model, "build_detector", lambda cfg: TinyHead(cfg.MODEL.NUM_CLASSES))

    with pytest.raises(ValueError, match="exactly one of --load_ckpt"):
        build_inference_model(Cfg)
    source = TinyHead(5)
    atomic_save({"model": source.state_dict()}, tmp_path / "m.pth")
    model = build_inference_model(Cfg, load_ckpt=str(tmp_path / "m.pth"))
    assert not model.training
    torch.testing.assert_close(model.cls_score.weight, source.cls_score.weight, rtol=0, atol=0)
