"""tools/convert_weights.py: convert / merge / split round trips are bit-exact; inspect names what a file needs."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pydetectron.config import get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.engine.checkpoint import atomic_save
from pydetectron.modeling.backbones import ResNet
from pydetectron.modeling.detector import build_detector
from pydetectron.modeling.layers import NormSpec
from pydetectron.weights import read_weights
from pydetectron.weights.convert import model_of_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_weights  # noqa: E402

SHAPES_CFG = "configs/getting_started/e2e_faster_rcnn_R-18-FPN_shapes.yaml"


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen)
            tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module


def _assert_bit_exact(got: dict, want: dict) -> None:
    floats = {k for k, v in want.items() if v.is_floating_point()}
    assert floats == {k for k, v in got.items() if v.is_floating_point()}
    for key in floats:
        assert torch.equal(got[key], want[key]), key


def _body_file(tmp_path, norm: str, order: str | None, depth: int = 18) -> tuple[Path, ResNet]:
    """Our own backbone file, as `convert --to pydetectron` writes one."""
    body = _randomized(ResNet(depth, norm=NormSpec(norm)))
    facts = {"depth": depth, "block": "basic" if depth < 50 else "bottleneck", "stage_blocks": [2, 2, 2, 2],
             "groups": 1, "width_per_group": 64, "norm": norm}
    path = tmp_path / f"ours_{norm}.pth"
    atomic_save({"model": body.state_dict(), "pydetectron": {"input_color_order": order, "body": facts}}, path)
    return path, body


def _state_of_pydetectron_file(path) -> dict:
    model, _, _ = model_of_file(read_weights(path))
    return model.state_dict()


@pytest.mark.parametrize("norm, order, to", [
    ("BN", "RGB", "detectron"), ("BN", "RGB", "detectron2"), ("AffineChannel", "BGR", "detectron"),
    ("AffineChannel", None, "detectron2"), ("GN", "RGB", "detectron2"), ("SyncBN", "BGR", "detectron2"),
])
def test_ours_to_other_names_and_back_is_bit_exact(tmp_path, norm, order, to):
    src, body = _body_file(tmp_path, norm, order)
    mid, back = tmp_path / f"mid_{to}.pkl", tmp_path / "back.pth"
    convert_weights.main(["convert", str(src), str(mid), "--to", to])
    convert_weights.main(["convert", str(mid), str(back), "--to", "pydetectron"])
    _assert_bit_exact(_state_of_pydetectron_file(back), body.state_dict())
    assert read_weights(back).color_order == order


def test_detectron_output_is_bgr_and_names_caffe2_blobs(tmp_path):
    src, body = _body_file(tmp_path, "BN", "RGB")
    out = tmp_path / "out.pkl"
    convert_weights.main(["convert", str(src), str(out), "--to", "detectron"])
    with open(out, "rb") as f:
        blobs = pickle.load(f)["blobs"]
    np.testing.assert_array_equal(blobs["conv1_w"], body.stem.conv1.conv.weight.detach().flip(1).numpy())
    np.testing.assert_array_equal(blobs["res3_1_branch2b_bn_riv"], body.res3[1].branch2b.norm.running_var.numpy())


def test_detectron2_output_has_detectron2_names(tmp_path):
    src, body = _body_file(tmp_path, "BN", "RGB")
    out = tmp_path / "out.pkl"
    convert_weights.main(["convert", str(src), str(out), "--to", "detectron2"])
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "pydetectron" and data["matching_heuristics"] is True
    assert data["pydetectron"]["input_color_order"] == "RGB"
    model = data["model"]
    np.testing.assert_array_equal(model["res3.1.conv2.norm.running_mean"],
                                  body.res3[1].branch2b.norm.running_mean.numpy())
    assert "res2.0.shortcut.weight" not in model  # ResNet-18's res2 keeps its width: no shortcut conv
    np.testing.assert_array_equal(model["res3.0.shortcut.weight"], body.res3[0].branch1.conv.weight.detach().numpy())
    np.testing.assert_array_equal(model["stem.conv1.weight"], body.stem.conv1.conv.weight.detach().numpy())


def test_detector_checkpoint_to_detectron_and_back_is_bit_exact(tmp_path):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, SHAPES_CFG)
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", 4, "MODEL.INPUT_COLOR_ORDER", "RGB"])
    from pydetectron.config import cfg_to_yaml

    detector = _randomized(build_detector(cfg), 1)
    src = tmp_path / "model_step20.pth"
    atomic_save({"model": detector.state_dict(), "step": 20, "cfg": cfg_to_yaml(cfg)}, src)
    mid, back = tmp_path / "model.pkl", tmp_path / "back.pth"
    convert_weights.main(["convert", str(src), str(mid), "--to", "detectron"])
    convert_weights.main(["convert", str(mid), str(back), "--to", "pydetectron"])
    _assert_bit_exact(torch.load(back, weights_only=False)["model"], detector.state_dict())


def test_unknown_order_to_detectron_needs_input_order(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_randomized(torchvision.models.resnet18()).state_dict(), path)
    with pytest.raises(SystemExit, match="does not say its input channel order.*--input_order"):
        convert_weights.main(["convert", str(path), str(tmp_path / "x.pkl"), "--to", "detectron"])
    convert_weights.main(["convert", str(path), str(tmp_path / "x.pkl"), "--to", "detectron", "--input_order", "RGB"])
    assert read_weights(tmp_path / "x.pkl").color_order == "BGR"


def test_merge_then_split_gives_both_files_back_bit_exactly(tmp_path):
    teacher = _randomized(torchvision.models.resnet50(), 2)
    teacher_path = tmp_path / "model_final.pth"
    torch.save({"model": {f"backbone.bottom_up.{k}": v for k, v in teacher.state_dict().items()},
                "iteration": 90000}, teacher_path)
    student = {k: np.random.default_rng(3).standard_normal(4).astype(np.float32)
               for k in ("stem.conv1.weight", "res2.0.conv1.weight", "res2.0.conv1.norm.weight")}
    student_path = tmp_path / "r-18.pkl"
    with open(student_path, "wb") as f:
        pickle.dump({"model": student, "__author__": "torchvision", "matching_heuristics": True}, f)
    merged = tmp_path / "T50-S18.pkl"
    convert_weights.main(["merge", "--teacher", str(teacher_path), "--student", str(student_path), str(merged)])
    with open(merged, "rb") as f:
        keys = set(pickle.load(f)["model"])
    assert "s_net.backbone.bottom_up.stem.conv1.weight" in keys  # MGD's layout
    assert "t_net.backbone.bottom_up.layer1.0.conv1.weight" in keys
    assert read_weights(merged).format == "merged"
    convert_weights.main(["split", str(merged), str(tmp_path / "s.pkl"), "--part", "student"])
    convert_weights.main(["split", str(merged), str(tmp_path / "t.pth"), "--part", "teacher"])
    with open(tmp_path / "s.pkl", "rb") as f:
        got_student = pickle.load(f)
    assert set(got_student) == {"model", "__author__", "matching_heuristics"}
    assert got_student["__author__"] == "torchvision"
    for key, value in student.items():
        np.testing.assert_array_equal(got_student["model"][key], value)
        assert got_student["model"][key].dtype == value.dtype
    got_teacher = torch.load(tmp_path / "t.pth", weights_only=True)
    assert got_teacher["iteration"] == 90000
    _assert_bit_exact(got_teacher["model"], {f"backbone.bottom_up.{k}": v for k, v in teacher.state_dict().items()})


def test_inspect_names_format_backbone_and_cfg_lines(tmp_path, capsys):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    convert_weights.main(["inspect", str(path)])
    text = capsys.readouterr().out
    assert "torchvision / timm ResNet state dict" in text
    assert "ResNet-50, bottleneck blocks, batch norm with statistics" in text
    assert "tensors: 320" in text
    assert "PIXEL_STDS [[[58.395, 57.12, 57.375]]], RESNETS.STRIDE_1X1 False" in text  # torchvision's input
    assert "PIXEL_STDS [[[1.0, 1.0, 1.0]]], RESNETS.STRIDE_1X1 True" in text  # Detectron.pytorch's Caffe .pth
    x101 = tmp_path / "x101.pth"
    torch.save(torchvision.models.resnext101_32x8d().state_dict(), x101)
    convert_weights.main(["inspect", str(x101)])
    text = capsys.readouterr().out
    assert "ResNeXt (101, 32x8d)" in text and "RESNETS.NUM_GROUPS: 32" in text and "WIDTH_PER_GROUP: 8" in text


def test_inspect_and_convert_refuse_files_without_a_resnet(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({"state_dict": torchvision.models.vgg11().state_dict()}, path)
    with pytest.raises(SystemExit, match="vgg.pth holds no ResNet"):
        convert_weights.main(["inspect", str(path)])


def test_inspect_gives_detectron_gn_files_the_stride_in_the_3x3_conv(tmp_path, capsys):
    """Detectron's R-50-GN.pkl / R-101-GN.pkl were trained with STRIDE_1X1 False (its gn_baselines configs);
    the MSRA R-50.pkl with True."""
    from pydetectron.weights.detectron_pkl import detectron_blobs

    for norm, stride in (("GN", "False"), ("AffineChannel", "True")):
        path = tmp_path / f"R-50-{norm}.pkl"
        with open(path, "wb") as f:
            pickle.dump(detectron_blobs(ResNet(50, norm=NormSpec(norm))), f)
        convert_weights.main(["inspect", str(path)])
        text = capsys.readouterr().out
        assert "Detectron's own ImageNet models: MODEL.INPUT_COLOR_ORDER BGR" in text
        assert f"PIXEL_STDS [[[1.0, 1.0, 1.0]]], RESNETS.STRIDE_1X1 {stride}" in text


def test_converting_a_detectron2_detector_says_what_it_leaves_out(tmp_path, capsys):
    """detectron2 names cover the ResNet body: a d2 detector's heads are not converted, and the summary says so."""
    net = _randomized(torchvision.models.resnet18(), 4)
    model = {}
    for key, value in net.state_dict().items():
        key = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model["backbone.bottom_up." + key] = value
    model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 8)
    src = tmp_path / "model_final.pth"
    torch.save({"model": model, "iteration": 100}, src)
    convert_weights.main(["convert", str(src), str(tmp_path / "body.pth"), "--to", "pydetectron"])
    assert "left out 1 entries that are not this network (first: roi_heads.box_predictor.cls_score.weight)" in (
        capsys.readouterr().out)
    convert_weights.main(["inspect", str(src)])
    text = capsys.readouterr().out
    assert "ResNet-18" in text and "conv4_body" not in text  # the C4 head's res5 has 3 blocks, ResNet-18's 2


def test_inspect_of_a_caffe2_named_resnext_gives_detectron2s_fair_model_its_std(tmp_path, capsys):
    """detectron2's FAIR/X-101-32x8d.pkl has Detectron's blob names but was trained with a std (its configs)."""
    from pydetectron.weights.detectron_pkl import detectron_blobs

    path = tmp_path / "X-50-32x4d.pkl"
    with open(path, "wb") as f:
        pickle.dump(detectron_blobs(ResNet(50, groups=32, width_per_group=4)), f)
    convert_weights.main(["inspect", str(path)])
    text = capsys.readouterr().out
    assert "RESNETS.NUM_GROUPS: 32" in text and "PIXEL_STDS [[[1.0, 1.0, 1.0]]], RESNETS.STRIDE_1X1 False" in text
    assert "FAIR/X-101-32x8d.pkl: MODEL.INPUT_COLOR_ORDER BGR, PIXEL_MEANS [[[103.53, 116.28, 123.675]]], " \
           "PIXEL_STDS [[[57.375, 57.12, 58.395]]], RESNETS.STRIDE_1X1 False" in text


def test_split_of_a_file_merged_by_mgds_script_keeps_its_author(tmp_path):
    """MGD's merge-models-into-one.py writes '__author__': 'TORCHVISION' (RGB); split keeps it, so the student
    still says its channel order."""
    student = {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
               "res2.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)}
    model = {f"s_net.backbone.bottom_up.{k}": v for k, v in student.items()}
    model["t_net.backbone.bottom_up.res2.0.conv1.weight"] = np.ones((64, 64, 1, 1), np.float32)
    merged = tmp_path / "T50-S18.pkl"
    with open(merged, "wb") as f:
        pickle.dump({"model": model, "__author__": "TORCHVISION", "matching_heuristics": True}, f)
    convert_weights.main(["split", str(merged), str(tmp_path / "s.pkl"), "--part", "student"])
    part = read_weights(tmp_path / "s.pkl")
    assert part.format == "detectron2" and part.prefix == "backbone.bottom_up." and part.color_order == "RGB"
    np.testing.assert_array_equal(part.weights["res2.0.conv1.weight"], student["res2.0.conv1.weight"])
