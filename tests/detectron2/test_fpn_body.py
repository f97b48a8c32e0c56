"""FPN.NORM (detectron2's FPN norms) and the body's detectron2-mode init."""

import math

import pytest
import torch
from torch import nn

from pydetectron.config import assert_and_infer_cfg, get_cfg
from pydetectron.config.merge import ConfigError
from pydetectron.modeling import registry
from pydetectron.modeling.layers import AffineChannel2d, ConvNorm, SyncBatchNorm2d


def _cfg(**keys):
    cfg = get_cfg()
    cfg.MODEL.CONV_BODY = "FPN.fpn_ResNet18_conv5_body"
    cfg.RESNETS.TRANS_FUNC = "basic_transformation"
    cfg.FPN.FPN_ON = cfg.FPN.MULTILEVEL_RPN = True
    cfg.FPN.DIM = 64
    for key, value in keys.items():
        node, name = key.split("__")
        setattr(getattr(cfg, node), name, value)
    return assert_and_infer_cfg(cfg)


def _fpn(cfg):
    registry.import_builtin_modules()
    return registry.build("body", cfg.MODEL.CONV_BODY, cfg)


@pytest.mark.parametrize("norm,layer,suffix", [
    ("GN", nn.GroupNorm, "_gn"), ("BN", nn.BatchNorm2d, "_bn"), ("SyncBN", SyncBatchNorm2d, "_bn"),
    ("FrozenBN", AffineChannel2d, "_bn"),
])
def test_fpn_norm_drops_the_conv_bias_and_names_the_norm(norm, layer, suffix):
    fpn = _fpn(_cfg(FPN__NORM=norm))
    for conv in list(fpn.inner) + list(fpn.out):
        assert isinstance(conv, ConvNorm) and conv.conv.bias is None and isinstance(conv.norm, layer)
    assert all(conv.bias is not None for conv in fpn.extra)  # extra levels never take the norm
    mapping = fpn.detectron_weight_mapping()
    assert mapping["inner.0.conv.weight"] == "fpn_inner_res5_1_sum_w"
    assert mapping["inner.1.norm.weight"] == f"fpn_inner_res4_1_sum_lateral{suffix}_s"
    assert mapping["out.0.norm.bias"] == f"fpn_res5_1_sum{suffix}_b"
    if norm in ("BN", "SyncBN"):
        assert mapping["out.0.norm.running_var"] == "fpn_res5_1_sum_bn_riv"
    maps = fpn.eval()(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2, 1]


def test_fpn_without_norm_keeps_biases():
    fpn = _fpn(_cfg())
    assert all(isinstance(conv, nn.Conv2d) and conv.bias is not None for conv in list(fpn.inner) + list(fpn.out))


def test_use_gn_means_fpn_norm_gn_and_contradictions_fail():
    cfg = _cfg(FPN__USE_GN=True)
    assert cfg.FPN.NORM == "GN"
    assert _cfg(FPN__NORM="GN").FPN.USE_GN
    with pytest.raises(ConfigError, match="contradicts FPN.USE_GN"):
        _cfg(FPN__USE_GN=True, FPN__NORM="BN")
    with pytest.raises(ConfigError, match="FPN.NORM"):
        _cfg(FPN__NORM="LN")


def test_detectron2_mode_body_convs_start_with_msra_fill():
    torch.manual_seed(0)
    d2 = _fpn(_cfg(MODEL__CONVENTIONS="detectron2"))
    torch.manual_seed(0)
    detectron = _fpn(_cfg())
    conv = d2.body.res4[1].branch2a.conv.weight  # 3x3, 256 -> 256: MSRA std sqrt(2 / fan_out) = sqrt(2 / 2304)
    assert conv.std().item() == pytest.approx(math.sqrt(2 / 2304), rel=0.05)
    xavier = detectron.body.res4[1].branch2a.conv.weight  # XavierFill: std sqrt(1 / fan_in) = sqrt(1 / 2304)
    assert xavier.std().item() == pytest.approx(math.sqrt(1 / 2304), rel=0.05)
    # the FPN's own convs are c2_xavier_fill in detectron2 too: U(-sqrt(3 / fan_in), sqrt(3 / fan_in))
    lateral = d2.inner[0].weight
    assert lateral.abs().max().item() <= math.sqrt(3 / lateral[0].numel())


def test_resnets_norm_frozenbn_is_affine_channel():
    cfg = _cfg(RESNETS__NORM="FrozenBN")
    assert cfg.RESNETS.NORM == "AffineChannel"
    assert isinstance(_fpn(cfg).body.stem.conv1.norm, AffineChannel2d)
