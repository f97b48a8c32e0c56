"""Detectron .pkl loading/saving by blob name, and unwrapping ResNets from training checkpoints."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from detectron_names import (
    imagenet_r50_blobs,
    imagenet_r50_gn_blobs,
    imagenet_x101_32x8d_blobs,
    mask_rcnn_r50_fpn_1x_blobs,
)
from torch import nn

from pydetectron.config import get_cfg
from pydetectron.modeling import registry
from pydetectron.modeling.backbones import ResNet
from pydetectron.modeling.layers import NormSpec
from pydetectron.weights import (
    WeightMismatchError,
    load_detectron_weights,
    load_pretrained,
    model_weight_mapping,
    read_detectron_pickle,
    save_detectron_weights,
)

registry.import_builtin_modules()


def _synthetic(names_and_shapes, seed=0):
    """Random float32 blobs with the given names/shapes; conv biases zero as in the Caffe conversion."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, shape in names_and_shapes.items():
        zero_bias = re.match(r"^(conv1|res\d+_\d+_branch\w+)_b$", name) and not name.endswith(("_bn_b", "_gn_b"))
        blobs[name] = np.zeros(shape, np.float32) if zero_bias else rng.standard_normal(shape, dtype=np.float32)
    return blobs


def _write_py2_style(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cfg(**overrides):
    cfg = get_cfg()
    for key, value in overrides.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    return cfg


def _assert_loaded(model, blobs):
    mapping = model_weight_mapping(model)
    state = model.state_dict()
    for key, blob in mapping.items():
        if blob is not None:
            np.testing.assert_array_equal(state[key].numpy(), blobs[blob], err_msg=key)


@pytest.mark.parametrize(
    "names, body, cfg",
    [
        (imagenet_r50_blobs, "ResNet50_conv5_body", {}),
        (imagenet_r50_gn_blobs, "ResNet50_conv5_body", {"RESNETS.NORM": "GN"}),
        pytest.param(imagenet_x101_32x8d_blobs, "ResNet101_conv5_body",
                     {"RESNETS.NUM_GROUPS": 32, "RESNETS.WIDTH_PER_GROUP": 8}, marks=pytest.mark.slow),
    ],
    ids=["R-50.pkl", "R-50-GN.pkl", "X-101-32x8d.pkl"],
)
def test_imagenet_pkl_loads_with_nothing_left_over(tmp_path, names, body, cfg):
    blobs = _synthetic(names())
    path = tmp_path / "imagenet.pkl"
    _write_py2_style(path, blobs)  # flat dict, as the ImageNet files are
    model = registry.build("body", body, _cfg(**cfg))
    report = load_detectron_weights(model, path, strict=True)
    assert report.unused == [] and report.missing == [] and report.unmapped == [] and report.skipped == []
    expected_ignored = {"fc1000_w", "fc1000_b"} | {
        n for n in blobs if n.endswith("_b") and n[:-2] + "_w" in blobs and "_bn_" not in n and "_gn_" not in n
    }
    assert set(report.ignored) == expected_ignored
    assert set(report.loaded) == set(blobs) - expected_ignored
    _assert_loaded(model, blobs)


def test_model_zoo_pkl_into_fpn_body_leaves_only_head_blobs():
    heads = ("conv_rpn_", "rpn_", "fc6_", "fc7_", "cls_score_", "bbox_pred_", "_[mask]_", "conv5_mask_",
             "mask_fcn_logits_")
    names = mask_rcnn_r50_fpn_1x_blobs()
    # random values where they are loaded; zeros (cheap) for the heads and momentum nobody reads here
    blobs = _synthetic({n: s for n, s in names.items() if not n.startswith(heads) and "_momentum" not in n})
    blobs.update({n: np.zeros(s, np.float32) for n, s in names.items() if n not in blobs})
    path = {"blobs": blobs, "cfg": "MODEL:\n  NUM_CLASSES: 81\n"}
    model = registry.build("body", "fpn_ResNet50_conv5_body", get_cfg())
    report = load_detectron_weights(model, path)
    assert report.missing == [] and report.unmapped == []
    assert set(report.unused) == {n for n in blobs if n.startswith(heads) and not n.endswith("_momentum")}
    assert all(n.endswith("_momentum") or n.startswith("fc1000") or n.endswith("_b") for n in report.ignored)
    assert sum(n.endswith("_momentum") for n in report.ignored) == sum(n.endswith("_momentum") for n in blobs)
    _assert_loaded(model, blobs)
    with pytest.raises(KeyError, match="unused blobs"):
        load_detectron_weights(model, path, strict=True)


def test_save_then_load_round_trips_bit_exactly(tmp_path):
    cfg = _cfg(**{"FPN.USE_GN": True, "RESNETS.NORM": "BN", "FPN.MULTILEVEL_RPN": True,
                  "FPN.RPN_MIN_LEVEL": 3, "FPN.RPN_MAX_LEVEL": 7, "FPN.EXTRA_CONV_LEVELS": True})
    torch.manual_seed(0)
    src = registry.build("body", "fpn_ResNet18_conv5_body", cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "out.pkl"
    written = save_detectron_weights(src, path, cfg_yaml="MODEL:\n  CONV_BODY: x\n")
    data = read_detectron_pickle(path)
    assert set(data) == {"blobs", "cfg"} and data["cfg"] == "MODEL:\n  CONV_BODY: x\n"
    assert set(data["blobs"]) == set(written)
    assert all(v.dtype == np.float32 for v in data["blobs"].values())
    torch.manual_seed(1)
    dst = registry.build("body", "fpn_ResNet18_conv5_body", cfg)
    report = load_detectron_weights(dst, path, strict=False)
    assert report.unused == [] and report.missing == [] and report.skipped == []
    mapping = model_weight_mapping(dst)
    for key, value in src.state_dict().items():
        if mapping[key] is not None:
            assert torch.equal(dst.state_dict()[key], value), key


def test_shape_mismatch_names_the_blob():
    model = ResNet(18, num_stages=4)
    blobs = {"res3_0_branch2a_w": np.zeros((128, 65, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"res3_0_branch2a_w.*\(128, 65, 3, 3\).*\(128, 64, 3, 3\)"):
        load_detectron_weights(model, blobs)


class _TinyOutputs(nn.Module):
    """A stand-in box/mask output module written here, mapped with Detectron's names."""

    def __init__(self, num_classes: int, agnostic: bool = False):
        super().__init__()
        self.cls_score = nn.Linear(8, num_classes)
        self.bbox_pred = nn.Linear(8, 4 * (2 if agnostic else num_classes))
        self.mask_fcn_logits = nn.Conv2d(8, num_classes, 1)
        self.fc6 = nn.Linear(4, 8)

    def detectron_weight_mapping(self):
        return {f"{n}.{p}": f"{n}_{p[0]}" for n in ("cls_score", "bbox_pred", "mask_fcn_logits", "fc6")
                for p in ("weight", "bias")}


def test_class_count_mismatch_is_skipped_when_allowed():
    rng = np.random.default_rng(0)
    file_model = _TinyOutputs(81, agnostic=True)
    blobs = {b: rng.standard_normal(tuple(file_model.state_dict()[k].shape)).astype(np.float32)
             for k, b in file_model.detectron_weight_mapping().items()}
    blobs["cls_score_w_momentum"] = blobs["cls_score_w"]
    model = _TinyOutputs(3)
    report = load_detectron_weights(model, {"blobs": blobs, "cfg": ""}, num_classes=3)
    assert report.loaded == ["fc6_b", "fc6_w"]
    assert len(report.skipped) == 6
    bbox_msg = next(m for m in report.skipped if m.startswith("bbox_pred_w"))
    assert "classes in file: 81, in model: 3" in bbox_msg and "class-agnostic" in bbox_msg
    assert report.ignored == ["cls_score_w_momentum"]
    with pytest.raises(ValueError, match="cls_score_w"):
        load_detectron_weights(model, blobs, allow_skip_class_layers=False)


def test_missing_and_prefixed_fallback():
    # Detectron's '_[mask]_res5...' params initialise from 'res5...' blobs when the file lacks them
    from pydetectron.modeling.backbones import make_res_stage

    stage = make_res_stage(get_cfg(), "_[mask]_res5", num_blocks=1, dim_in=8, dim_out=16, dim_inner=4)
    rng = np.random.default_rng(0)
    blobs = {}
    for key, blob in stage.detectron_weight_mapping().items():
        blobs[blob.replace("_[mask]_", "")] = rng.standard_normal(tuple(stage.state_dict()[key].shape),
                                                                  dtype=np.float32)
    del blobs["res5_0_branch1_bn_b"]
    report = load_detectron_weights(stage, blobs)
    assert report.missing == ["_[mask]_res5_0_branch1_bn_b"]
    assert len(report.loaded) == len(blobs) and report.unused == []
    np.testing.assert_array_equal(stage[0].branch2a.conv.weight.detach().numpy(), blobs["res5_0_branch2a_w"])
    with pytest.raises(KeyError, match="missing blobs"):
        load_detectron_weights(stage, blobs, strict=True)


def test_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_detectron_weights(ResNet(18), tmp_path / "nope.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.pkl"):
        load_detectron_weights(ResNet(18), bad)


def test_torchvision_into_wrong_body_fails_clearly(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightMismatchError, match="matches only part of the backbone"):
        load_pretrained(ResNet(34, stride_1x1=False), path, get_cfg())
    with pytest.raises(WeightMismatchError, match="GroupNorm"):
        load_pretrained(ResNet(18, norm=NormSpec("GN")), path, get_cfg())


def test_rgb_model_reverses_conv1_channels_both_ways(tmp_path):
    torch.manual_seed(0)
    rgb_model = ResNet(18, num_stages=4)
    conv1 = rgb_model.stem.conv1.conv.weight.detach().clone()
    path = tmp_path / "rgb.pkl"
    blobs = save_detectron_weights(rgb_model, path, input_order="RGB")
    np.testing.assert_array_equal(blobs["conv1_w"], conv1.flip(1).numpy())  # files stay BGR
    bgr_model = ResNet(18, num_stages=4)
    load_detectron_weights(bgr_model, path)
    torch.testing.assert_close(bgr_model.stem.conv1.conv.weight, conv1.flip(1), rtol=0, atol=0)
    other = ResNet(18, num_stages=4)
    load_detectron_weights(other, path, input_order="RGB")
    torch.testing.assert_close(other.stem.conv1.conv.weight, conv1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="INPUT_COLOR_ORDER"):
        load_detectron_weights(other, path, input_order="BRG")


def _wrapped_checkpoints(state):
    """The same ResNet as saved by a plain DataParallel run, MoCo (query + key encoders, a projection head, the
    queue), DINO (teacher and student) and a detectron2-style {'model': ...} file."""
    moco = {f"module.encoder_q.{k}": v for k, v in state.items()}
    moco.update({f"module.encoder_k.{k}": v + 1 for k, v in state.items()})
    moco.update({"module.encoder_q.fc.0.weight": torch.zeros(4, 4), "module.queue": torch.zeros(4, 8)})
    return {
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
        "moco": {"epoch": 200, "arch": "resnet18", "state_dict": moco, "optimizer": {"state": {}}},
        "dino": {"teacher": {f"backbone.{k}": v for k, v in state.items()},
                 "student": {f"module.backbone.{k}": v + 1 for k, v in state.items()}, "epoch": 100},
        "detectron2_style": {"model": dict(state), "iteration": 5},
    }


@pytest.mark.parametrize("kind", ["data_parallel", "moco", "dino", "detectron2_style"])
def test_pretrained_checkpoints_of_every_kind_give_the_plain_weights(kind, tmp_path):
    from pydetectron.weights.torchvision import resnet_state_dict

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / f"{kind}.pth"
    torch.save(_wrapped_checkpoints(state)[kind], path)
    plain_path = tmp_path / "plain.pth"
    torch.save(state, plain_path)
    plain, wrapped = ResNet(18, stride_1x1=False).eval(), ResNet(18, stride_1x1=False).eval()
    load_pretrained(plain, plain_path, get_cfg())
    load_pretrained(wrapped, str(path), get_cfg())
    for (name, a), (_, b) in zip(plain.state_dict().items(), wrapped.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    found = resnet_state_dict(torch.load(path, weights_only=True))
    assert {k for k in found if not k.startswith("fc.")} == {k for k in state if not k.startswith("fc.")}


def test_checkpoints_without_one_clear_resnet_are_refused():
    from pydetectron.weights.torchvision import resnet_state_dict

    state = torchvision.models.resnet18(weights=None).state_dict()
    byol = {"online.encoder." + k: v for k, v in state.items()}
    byol.update({"target.encoder." + k: v for k, v in state.items()})
    with pytest.raises(KeyError, match="several networks"):
        resnet_state_dict(byol, "byol.pth")
    with pytest.raises(KeyError, match="byol.pth holds no ResNet weights"):
        resnet_state_dict({"epoch": 3, "optimizer": {}}, "byol.pth")
