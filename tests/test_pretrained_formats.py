"""`load_pretrained`: a file in each source's exact layout, random weights and BN statistics, gives a body that
computes what the source network computes on the same normalised input; mismatches are refused by name."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from pydetectron.config import get_cfg
from pydetectron.data.minibatch import BlobSettings, prepare_test_image
from pydetectron.modeling.backbones import ResNet
from pydetectron.modeling.layers import NormSpec
from pydetectron.weights import WeightMismatchError, load_pretrained, read_weights
from pydetectron.weights.formats import UnknownWeightsFormat

TV_MEAN = np.array([0.485, 0.456, 0.406])
TV_STD = np.array([0.229, 0.224, 0.225])
CAFFE_MEANS_BGR = [102.9801, 115.9465, 122.7717]


def _randomize_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return net.eval()


def _torchvision_net(arch: str = "resnet50", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn(getattr(torchvision.models, arch)(weights=None), seed)


def _caffe_style(net: nn.Module) -> nn.Module:
    """The same torchvision net with the stride in the first 1x1 conv (MSRA / Caffe ResNets)."""
    for layer in (net.layer2, net.layer3, net.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return net


def _tv_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _cfg(order: str = "RGB", means=None, stds=None, stride_1x1: bool = False):
    cfg = get_cfg()
    cfg.MODEL.INPUT_COLOR_ORDER = order
    cfg.RESNETS.STRIDE_1X1 = stride_1x1
    if means is not None:
        cfg.PIXEL_MEANS = np.asarray(means, dtype=np.float64).reshape(1, 1, 3).tolist()
    if stds is not None:
        cfg.PIXEL_STDS = np.asarray(stds, dtype=np.float64).reshape(1, 1, 3).tolist()
    cfg.TEST.SCALE = cfg.TEST.MAX_SIZE = 64
    return cfg


def _body(depth: int, cfg, norm: str = "AffineChannel") -> ResNet:
    return ResNet(depth, norm=NormSpec(norm), stride_1x1=cfg.RESNETS.STRIDE_1X1).eval()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _image(seed: int = 0) -> np.ndarray:
    """A BGR uint8 image, as cv2 reads one."""
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _our_output(body: ResNet, cfg, image_bgr: np.ndarray) -> torch.Tensor:
    """The body on the image as the data pipeline normalises it (PIXEL_MEANS / PIXEL_STDS / colour order)."""
    data, scale = prepare_test_image(image_bgr, BlobSettings.from_cfg(cfg, train=False))
    assert scale == 1.0
    with torch.no_grad():
        return body.forward_stages(data)[5]


def _source_input(image_bgr: np.ndarray, order: str, mean255, std255) -> torch.Tensor:
    """The image normalised as the source network was trained: channel order, then (x - mean) / std."""
    im = image_bgr.astype(np.float64)
    if order == "RGB":
        im = im[:, :, ::-1]
    im = (im - np.asarray(mean255)) / np.asarray(std255)
    return torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))[None]).float()


def _d2_keys(state: dict) -> dict:
    """torchvision/timm keys renamed as detectron2's convert-torchvision-to-d2.py and SparK's
    convert-timm-to-d2.py rename them, values as numpy arrays (what both write)."""
    out = {}
    for key, value in state.items():
        if "layer" not in key:
            key = "stem." + key
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[key] = value.detach().numpy()
    return out


def _check_torchvision_equivalence(path, net, depth, norm="AffineChannel", order="RGB", cfg_order=None):
    """Load `path` into a body and compare with `net` (a torchvision-normalised RGB network)."""
    cfg_order = cfg_order or order
    mean, std = TV_MEAN * 255, TV_STD * 255
    perm = slice(None) if cfg_order == "RGB" else slice(None, None, -1)
    cfg = _cfg(cfg_order, mean[perm], std[perm])
    body = _body(depth, cfg, norm)
    report = load_pretrained(body, path, cfg, print_fn=lambda _: None)
    image = _image()
    with torch.no_grad():
        want = _tv_features(net, _source_input(image, "RGB", mean, std))
    assert _rel_err(_our_output(body, cfg, image), want) < 1e-4
    return report


@pytest.mark.parametrize("norm", ["AffineChannel", "BN", "SyncBN"])
def test_torchvision_pth(tmp_path, norm):
    net = _torchvision_net("resnet50")
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    report = _check_torchvision_equivalence(path, net, 50, norm)
    assert report.missing == [] and report.unused == []
    assert (len(report.folded) == 53) == (norm == "AffineChannel")


def test_bn_target_receives_the_files_statistics_unfolded(tmp_path):
    net = _torchvision_net("resnet18")
    path = tmp_path / "r18"  # no extension
    torch.save(net.state_dict(), path)
    body = _body(18, _cfg(), "BN")
    load_pretrained(body, path, _cfg(), print_fn=lambda _: None)
    assert torch.equal(body.res3[1].branch2a.norm.running_var, net.layer2[1].bn1.running_var)
    assert torch.equal(body.res3[1].branch2a.norm.weight, net.layer2[1].bn1.weight)
    assert torch.equal(body.stem.conv1.conv.weight, net.conv1.weight)  # nothing rescales conv1


@pytest.mark.parametrize("arch, depth", [("resnet18", 18), ("resnet50", 50)])
def test_timm_checkpoint(tmp_path, arch, depth):
    torch.manual_seed(1)
    net = _randomize_bn(timm.create_model(arch, pretrained=False), 1)
    path = tmp_path / f"{arch}.pth.tar"
    torch.save({"epoch": 3, "arch": arch, "state_dict": net.state_dict(), "version": 2}, path)  # timm's saver
    mean, std = TV_MEAN * 255, TV_STD * 255
    cfg = _cfg("RGB", mean, std)
    body = _body(depth, cfg)
    load_pretrained(body, path, cfg, print_fn=lambda _: None)
    image = _image(1)
    with torch.no_grad():
        want = net.forward_features(_source_input(image, "RGB", mean, std))
    assert _rel_err(_our_output(body, cfg, image), want) < 1e-4


def test_moco_backbone_with_its_own_dataset_mean_std(tmp_path):
    """HPT / OpenSelfSup: pretrained on a dataset normalised with its own mean/std; PIXEL_STDS takes effect."""
    net = _torchvision_net("resnet50", seed=2)
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v + 1 for k, v in net.state_dict().items()})
    state["module.queue"] = torch.zeros(8, 4)
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {}}, path)
    mean, std = np.array([0.31, 0.52, 0.44]) * 255, np.array([0.11, 0.17, 0.23]) * 255  # a dataset's own (RGB)
    cfg = _cfg("RGB", mean, std)
    body = _body(50, cfg)
    report = load_pretrained(body, path, cfg, print_fn=lambda _: None)
    assert report.unused == []
    image = _image(2)
    with torch.no_grad():
        want = _tv_features(net, _source_input(image, "RGB", mean, std))
    assert _rel_err(_our_output(body, cfg, image), want) < 1e-4
    assert read_weights(path).left_out  # the key encoder and the queue are named as left out


def test_dino_teacher(tmp_path):
    net = _torchvision_net("resnet18", seed=3)
    path = tmp_path / "dino_resnet.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()},
                "student": {f"module.backbone.{k}": v + 1 for k, v in net.state_dict().items()}, "epoch": 100}, path)
    _check_torchvision_equivalence(path, net, 18)


def test_caffe_pth_bgr_std1_stride_in_1x1(tmp_path):
    """Detectron.pytorch's resnet50_caffe.pth: torchvision key names, Caffe semantics. Loaded as it is."""
    net = _caffe_style(_torchvision_net("resnet50", seed=4))
    path = tmp_path / "resnet50_caffe.pth"
    torch.save(net.state_dict(), path)
    cfg = _cfg("BGR", CAFFE_MEANS_BGR, [1.0, 1.0, 1.0], stride_1x1=True)
    body = _body(50, cfg)
    load_pretrained(body, path, cfg, print_fn=lambda _: None)
    image = _image(4)
    with torch.no_grad():
        want = _tv_features(net, _source_input(image, "BGR", CAFFE_MEANS_BGR, [1.0, 1.0, 1.0]))
    assert _rel_err(_our_output(body, cfg, image), want) < 1e-4


@pytest.mark.parametrize("cfg_order", ["RGB", "BGR"])
def test_detectron2_pkl_from_convert_torchvision_to_d2(tmp_path, cfg_order):
    """'__author__': 'torchvision' says RGB: a BGR cfg gets conv1's channels reversed, nothing else."""
    net = _torchvision_net("resnet50", seed=5)
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _d2_keys(net.state_dict()), "__author__": "torchvision", "matching_heuristics": True}, f)
    assert read_weights(path).color_order == "RGB"
    _check_torchvision_equivalence(path, net, 50, cfg_order=cfg_order)


def test_spark_timm_to_d2_pkl(tmp_path):
    torch.manual_seed(6)
    net = _randomize_bn(timm.create_model("resnet50", pretrained=False), 6)
    path = tmp_path / "spark_res50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _d2_keys(net.state_dict()), "__author__": "https://github.com/keyu-tian/SparK",
                     "matching_heuristics": True}, f)
    weights = read_weights(path)
    assert weights.format == "detectron2" and weights.color_order is None
    mean, std = TV_MEAN * 255, TV_STD * 255
    cfg = _cfg("RGB", mean, std)
    body = _body(50, cfg, "SyncBN")
    report = load_pretrained(body, path, cfg, print_fn=lambda _: None)
    assert report.unused == [] and report.missing == []
    image = _image(6)
    with torch.no_grad():
        want = net.forward_features(_source_input(image, "RGB", mean, std))
    assert _rel_err(_our_output(body, cfg, image), want) < 1e-4


def test_detectron2_detector_checkpoint_gives_its_backbone(tmp_path):
    net = _torchvision_net("resnet18", seed=7)
    model = {f"backbone.bottom_up.{k}": torch.from_numpy(v) for k, v in _d2_keys(net.state_dict()).items()}
    model["backbone.fpn_lateral2.weight"] = torch.zeros(4, 4, 1, 1)
    model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 4)
    path = tmp_path / "model_final.pth"
    torch.save({"model": model, "iteration": 90000}, path)
    weights = read_weights(path)
    assert weights.prefix == "backbone.bottom_up."
    report = _check_torchvision_equivalence(path, net, 18)
    assert report.unused == []
    assert {"backbone.fpn_lateral2.weight", "roi_heads.box_predictor.cls_score.weight"} <= set(weights.left_out)


def test_detectron_pkl_is_bgr_and_an_rgb_cfg_reverses_conv1(tmp_path):
    """A Detectron ImageNet .pkl (BN folded, Caffe2 names, BGR, stride in 1x1) into an RGB body."""
    net = _caffe_style(_torchvision_net("resnet50", seed=8))
    blobs = {}
    for key, value in net.state_dict().items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        blobs[key] = value.numpy()
    from pydetectron.weights.torchvision import torchvision_resnet_to_blobs

    unfolded, _ = torchvision_resnet_to_blobs(blobs)
    detectron = {}
    for name, value in unfolded.items():  # fold as the Caffe -> Caffe2 conversion did
        if name.endswith("_bn_s"):
            prefix = name[:-2]
            scale = value / np.sqrt(unfolded[prefix + "_riv"] + 1e-5)
            detectron[prefix + "_s"] = scale.astype(np.float32)
            detectron[prefix + "_b"] = (unfolded[prefix + "_b"] - unfolded[prefix + "_rm"] * scale).astype(np.float32)
        elif not name.endswith(("_bn_b", "_bn_rm", "_bn_riv")):
            detectron[name] = value
    detectron["fc1000_w"] = np.zeros((1000, 2048), np.float32)
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(detectron, f, protocol=2)
    rgb_means = CAFFE_MEANS_BGR[::-1]
    cfg = _cfg("RGB", rgb_means, [1.0, 1.0, 1.0], stride_1x1=True)
    body = _body(50, cfg, "BN")  # a BN target of a folded file: mean 0, var 1 - eps
    report = load_pretrained(body, path, cfg, print_fn=lambda _: None)
    assert len(report.derived) == 53 and report.ignored == ["fc1000_w"]
    image = _image(8)
    with torch.no_grad():
        want = _tv_features(net, _source_input(image, "BGR", CAFFE_MEANS_BGR, [1.0, 1.0, 1.0]))
    assert _rel_err(_our_output(body, cfg, image), want) < 1e-4


@pytest.mark.parametrize("target_order", ["RGB", "BGR"])
def test_pydetectron_checkpoint_of_a_detector_into_a_body(tmp_path, target_order):
    torch.manual_seed(9)
    source = _randomize_bn(ResNet(18, norm=NormSpec("BN"), stride_1x1=False), 9)
    state = {f"body.{k}": v for k, v in source.state_dict().items()}
    state["rpn.conv.weight"] = torch.zeros(2, 2)
    path = tmp_path / "model_step100.pth"
    torch.save({"model": state, "step": 100, "cfg": "MODEL:\n  INPUT_COLOR_ORDER: RGB\n",
                "numpy_rng": np.random.default_rng(0).bit_generator.state}, path)
    cfg = _cfg(target_order)
    body = _body(18, cfg)
    report = load_pretrained(body, path, cfg, print_fn=lambda _: None)
    assert report.unused == ["rpn.conv.weight"]
    x = torch.randn(1, 3, 64, 64)
    x_target = x if target_order == "RGB" else x.flip(1)
    with torch.no_grad():
        assert _rel_err(body.forward_stages(x_target)[5], source.forward_stages(x)[5]) < 1e-4


def test_a_file_without_a_resnet_is_refused_with_names(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.vgg11(weights=None).state_dict(), path)
    with pytest.raises(UnknownWeightsFormat, match=r"vgg.pth holds no ResNet.*features.0.weight"):
        load_pretrained(_body(18, _cfg()), path, _cfg())


def test_a_file_matching_only_some_stages_is_refused_with_names(tmp_path):
    state = {k: v for k, v in _torchvision_net("resnet50").state_dict().items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightMismatchError) as err:
        load_pretrained(_body(50, _cfg()), path, _cfg())
    text = str(err.value)
    assert "partial.pth" in text and "torchvision / timm ResNet state dict" in text
    assert "matches only part of the backbone" in text and "layer4.0.conv1.weight" in text


def test_a_deeper_file_is_refused_naming_the_unused_blocks(tmp_path):
    path = tmp_path / "r101.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _d2_keys(_torchvision_net("resnet101").state_dict()), "__author__": "torchvision"}, f)
    with pytest.raises(WeightMismatchError) as err:
        load_pretrained(_body(50, _cfg()), path, _cfg())
    text = str(err.value)
    assert "detectron2-style" in text and "res4.6.conv1.weight" in text and "ResNet-101" in text


def test_shape_mismatch_names_the_blob(tmp_path):
    path = tmp_path / "resnext.pth"
    torch.save(torchvision.models.resnext50_32x4d(weights=None).state_dict(), path)
    with pytest.raises(WeightMismatchError, match=r"resnext.pth.*blob 'res2_0_branch2a_w' has shape \(128, 64, 1, 1\)"):
        load_pretrained(_body(50, _cfg()), path, _cfg())


def test_gn_body_refuses_a_batch_norm_file(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_net("resnet18").state_dict(), path)
    with pytest.raises(WeightMismatchError, match="conv1_gn|bn1.weight"):
        load_pretrained(_body(18, _cfg(), "GN"), path, _cfg())


def test_report_is_written_to_the_output_folder(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_net("resnet18").state_dict(), path)
    lines = []
    load_pretrained(_body(18, _cfg()), path, _cfg(), output_dir=tmp_path / "run", print_fn=lines.append)
    written = (tmp_path / "run" / "weights_report.txt").read_text()
    assert written.strip() == lines[0].strip() and "r18.pth" in written and "does not say its input colour" in written


def test_detectron2_c4_detector_gives_res5_from_its_box_head(tmp_path):
    """detectron2's C4 models keep res5 under roi_heads.res5, where ours keep it in the box head."""
    net = _torchvision_net("resnet50", seed=10)
    d2 = _d2_keys(net.state_dict())
    model = {(f"roi_heads.{k}" if k.startswith("res5.") else f"backbone.{k}"): v for k, v in d2.items()}
    path = tmp_path / "c4_model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, f)
    weights = read_weights(path)
    assert weights.prefix == "backbone." and "res5.2.conv3.weight" in weights.weights
    body = _body(50, _cfg())
    report = load_pretrained(body, path, _cfg(), print_fn=lambda _: None)
    assert report.missing == [] and report.unused == []
    torch.testing.assert_close(body.res5[2].branch2c.conv.weight, net.layer4[2].conv3.weight, rtol=0, atol=0)


def _randomize_gn(net: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=gen) * 0.2)
    return net.eval()


def test_timm_groupnorm_resnet_loads_into_a_gn_body_only(tmp_path):
    """timm's resnet50_gn names its GroupNorms 'bn1', 'bn2'... (no running statistics): a GN body computes the
    source network; a batch-norm body would have taken the GN affine parameters for folded BN ones."""
    torch.manual_seed(11)
    net = _randomize_gn(timm.create_model("resnet50_gn", pretrained=False), 11)
    path = tmp_path / "resnet50_gn.pth"
    torch.save(net.state_dict(), path)
    mean, std = TV_MEAN * 255, TV_STD * 255
    cfg = _cfg("RGB", mean, std)
    body = _body(50, cfg, "GN")
    report = load_pretrained(body, path, cfg, print_fn=lambda _: None)
    assert report.missing == [] and report.unused == []
    image = _image(11)
    with torch.no_grad():
        want = net.forward_features(_source_input(image, "RGB", mean, std))
    assert _rel_err(_our_output(body, cfg, image), want) < 1e-4
    for norm in ("AffineChannel", "BN"):
        with pytest.raises(WeightMismatchError, match=r"resnet50_gn.pth.*\n.*missing from the file.*bn1.weight"):
            load_pretrained(_body(50, cfg, norm), path, cfg, print_fn=lambda _: None)


@pytest.mark.parametrize("file_norm, cfg_text, body_norm", [
    ("GN", "RESNETS:\n  USE_GN: true\n", "AffineChannel"),
    ("GN", "RESNETS:\n  TRANS_FUNC: bottleneck_gn_transformation\n", "BN"),
    ("AffineChannel", "RESNETS:\n  NORM: AffineChannel\n", "GN"),
])
def test_pydetectron_checkpoint_of_another_norm_kind_is_refused(tmp_path, file_norm, cfg_text, body_norm):
    """GroupNorm and AffineChannel state dicts have the same keys: the checkpoint's cfg says which it is, and a
    GN body never takes AffineChannel parameters (nor the other way round)."""
    source = ResNet(18, norm=NormSpec(file_norm))
    path = tmp_path / "model_final.pth"
    torch.save({"model": {f"body.{k}": v for k, v in source.state_dict().items()}, "cfg": cfg_text}, path)
    with pytest.raises(WeightMismatchError, match=r"model_final.pth.*matches only part of the backbone(.|\n)*"
                                                  r"missing from the file.*stem.conv1.norm.weight"):
        load_pretrained(_body(18, _cfg(), body_norm), path, _cfg(), print_fn=lambda _: None)
    same = _body(18, _cfg(), file_norm)
    report = load_pretrained(same, path, _cfg(), print_fn=lambda _: None)
    assert report.missing == [] and report.unused == []
    torch.testing.assert_close(same.res3[1].branch2a.norm.weight, source.res3[1].branch2a.norm.weight, rtol=0, atol=0)


def test_a_resnet_variant_without_a_detectron_counterpart_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "resnet18d.pth"
    torch.save(timm.create_model("resnet18d", pretrained=False).state_dict(), path)
    with pytest.raises(UnknownWeightsFormat, match=r"resnet18d.pth \(torchvision / timm.*conv1.0.weight.*deep-stem"):
        load_pretrained(_body(18, _cfg()), path, _cfg())


def test_a_wrapped_file_without_a_resnet_names_the_keys_inside_the_wrapper(tmp_path):
    path = tmp_path / "vgg_checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": torchvision.models.vgg11(weights=None).state_dict()}, path)
    with pytest.raises(UnknownWeightsFormat, match=r"vgg_checkpoint.pth holds no ResNet.*'state_dict'.*features.0.w"):
        load_pretrained(_body(18, _cfg()), path, _cfg())
