"""Detectron's files were pickled by Python 2: byte-string keys and array buffers (``SHORT_BINSTRING`` /
``BINSTRING``). The weights and proposal readers must load such streams (the ``encoding='latin1'`` path)."""

from __future__ import annotations

import pickle
import pickletools

import numpy as np
import py2_pickle
import pytest
import torch

from pydetectron.data.proposals import read_proposal_file
from pydetectron.modeling.box_head import FastRCNNOutputs
from pydetectron.weights import load_detectron_weights, read_detectron_pickle


def _write(path, obj) -> bytes:
    stream = py2_pickle.dumps(obj)
    ops = [op.name for op, _, _ in pickletools.genops(stream)]
    assert ops[0] == "PROTO" and {"SHORT_BINSTRING", "BINSTRING"} <= set(ops)
    assert not {"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES"} & set(ops)  # Python 3 writes these
    with pytest.raises(UnicodeDecodeError):  # a plain Python 3 load fails on the raw buffers: latin1 is needed
        pickle.loads(stream)
    path.write_bytes(stream)
    return stream


def test_model_zoo_weights_pickled_by_python2_load(tmp_path):
    rng = np.random.default_rng(0)
    blobs = {"cls_score_w": rng.standard_normal((3, 40)).astype(np.float32),  # 480 bytes: BINSTRING
             "cls_score_b": rng.standard_normal(3).astype(np.float32),
             "bbox_pred_w": rng.standard_normal((12, 40)).astype(np.float32),
             "bbox_pred_b": rng.standard_normal(12).astype(np.float32),
             "cls_score_w_momentum": np.zeros((3, 40), np.float32)}
    path = tmp_path / "model_final.pkl"
    _write(path, {"blobs": blobs, "cfg": "MODEL:\n  NUM_CLASSES: 3\n"})

    data = read_detectron_pickle(path)
    assert set(data) == {"blobs", "cfg"} and data["cfg"] == "MODEL:\n  NUM_CLASSES: 3\n"
    assert all(isinstance(k, str) for k in data["blobs"])
    model = FastRCNNOutputs(40, 3)
    report = load_detectron_weights(model, path, strict=True)
    assert report.loaded == sorted(set(blobs) - {"cls_score_w_momentum"})
    for layer in ("cls_score", "bbox_pred"):
        assert torch.equal(getattr(model, layer).weight, torch.from_numpy(blobs[f"{layer}_w"]))
        assert torch.equal(getattr(model, layer).bias, torch.from_numpy(blobs[f"{layer}_b"]))


def test_imagenet_flat_dict_pickled_by_python2_loads(tmp_path):
    rng = np.random.default_rng(1)
    blobs = {"cls_score_w": rng.standard_normal((2, 64)).astype(np.float32),
             "cls_score_b": np.zeros(2, np.float32), "fc1000_w": rng.standard_normal((10, 64)).astype(np.float32)}
    path = tmp_path / "R-50.pkl"
    _write(path, blobs)
    model = torch.nn.Module()
    model.cls_score = torch.nn.Linear(64, 2)
    model.detectron_weight_mapping = lambda: {"cls_score.weight": "cls_score_w", "cls_score.bias": "cls_score_b"}
    report = load_detectron_weights(model, path)
    assert report.loaded == ["cls_score_b", "cls_score_w"] and report.ignored == ["fc1000_w"]
    assert torch.equal(model.cls_score.weight, torch.from_numpy(blobs["cls_score_w"]))


@pytest.mark.parametrize("id_field", ["ids", "indexes"])
def test_proposal_file_pickled_by_python2_loads(tmp_path, id_field):
    rng = np.random.default_rng(2)
    boxes = [np.sort(rng.uniform(0, 300, (70, 4)).astype(np.float32).reshape(70, 2, 2), axis=1).reshape(70, 4),
             np.zeros((0, 4), np.float32)]
    path = tmp_path / "rpn_proposals.pkl"
    _write(path, {"boxes": boxes, "scores": [rng.uniform(size=70).astype(np.float32), np.zeros(0, np.float32)],
                  id_field: [139, 70000], "cfg": "MODEL:\n  RPN_ONLY: True\n"})
    read = read_proposal_file(path)
    assert sorted(read) == [139, 70000]
    np.testing.assert_array_equal(read[139], boxes[0])
    assert read[70000].shape == (0, 4)
