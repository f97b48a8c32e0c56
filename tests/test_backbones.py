"""ResNet / FPN bodies: shapes, strides and levels of every registered body, Detectron's blob names,
FREEZE_AT, GroupNorm, ResNeXt, dilation, and FPN's arithmetic against a reference written here."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron_names import R50_BLOCKS, fpn_blobs, resnet_body_blobs
from torch import nn

from pydetectron.config import get_cfg
from pydetectron.modeling import registry
from pydetectron.modeling.backbones import FPN, ResNet, make_res_stage
from pydetectron.modeling.layers import AffineChannel2d, NormSpec
from pydetectron.weights import model_weight_mapping

registry.import_builtin_modules()
BODY_NAMES = [n for n in registry.registered("body") if "ResNet" in n]
DEEP = ("ResNet101", "ResNet152")
FAST_BODIES = [n for n in BODY_NAMES if not any(d in n for d in DEEP)]
SLOW_BODIES = [n for n in BODY_NAMES if any(d in n for d in DEEP)]


def _cfg(**overrides):
    cfg = get_cfg()
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


def _check_body(name: str, cfg, size: int = 64) -> nn.Module:
    """Build `name`, run it on a (1, 3, size, size) image and check the Bodies contract; returns the body."""
    torch.manual_seed(0)
    body = registry.build("body", name, cfg).eval()
    with torch.no_grad():
        outs = body(torch.randn(1, 3, size, size))
    assert len(outs) == len(body.levels) == len(body.spatial_scales)
    for out, level, scale in zip(outs, body.levels, body.spatial_scales):
        assert scale == 1.0 / 2**level
        assert out.shape == (1, body.dim_out, size >> level, size >> level), (name, level)
        assert torch.isfinite(out).all()
    assert body.levels == sorted(body.levels)  # finest first
    return body


def _expected_levels(name: str):
    if "fpn" not in name:
        return [4] if "conv4" in name else [5]
    return [2] if "P2only" in name else [2, 3, 4, 5]


@pytest.mark.parametrize("name", FAST_BODIES)
def test_registered_body_shapes(name):
    expected_dim = 256 if "fpn" in name else {
        ("ResNet18", "4"): 256, ("ResNet18", "5"): 512, ("ResNet34", "4"): 256, ("ResNet34", "5"): 512,
        ("ResNet50", "4"): 1024, ("ResNet50", "5"): 2048,
    }[(name.split("_")[0], name.split("conv")[1][0])]
    body = _check_body(name, get_cfg())
    assert body.dim_out == expected_dim
    assert body.levels == _expected_levels(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_BODIES)
def test_registered_deep_body_shapes(name):
    assert _check_body(name, get_cfg()).levels == _expected_levels(name)


def test_detectron_spellings_and_all_variants_registered():
    for depth in (18, 34, 50, 101, 152):
        for suffix in ("conv4_body", "conv5_body"):
            assert f"ResNet{depth}_{suffix}" in BODY_NAMES
        assert f"fpn_ResNet{depth}_conv5_body" in BODY_NAMES
        assert f"fpn_ResNet{depth}_conv5_P2only_body" in BODY_NAMES
    assert registry.lookup("body", "FPN.add_fpn_ResNet50_conv5_body") is registry.lookup(
        "body", "fpn_ResNet50_conv5_body"
    )


def test_rpn_levels_give_p6_by_subsampling():
    cfg = _cfg(**{"FPN.MULTILEVEL_RPN": True, "FPN.MULTILEVEL_ROIS": True})
    body = registry.build("body", "fpn_ResNet18_conv5_body", cfg).eval()
    assert body.levels == [2, 3, 4, 5, 6]
    with torch.no_grad():
        outs = body(torch.randn(1, 3, 96, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(24, 16), (12, 8), (6, 4), (3, 2), (2, 1)]
    # P6 = P5 subsampled by a 1x1 / stride-2 max-pool, i.e. every other pixel from the first
    torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2], rtol=0, atol=0)
    _check_body("fpn_ResNet18_conv5_body", cfg)


def test_retinanet_levels_p3_to_p7_from_conv():
    cfg = _cfg(**{"FPN.MULTILEVEL_RPN": True, "FPN.RPN_MIN_LEVEL": 3, "FPN.RPN_MAX_LEVEL": 7,
                  "FPN.EXTRA_CONV_LEVELS": True})
    body = registry.build("body", "fpn_ResNet18_conv5_body", cfg).eval()
    assert body.levels == [3, 4, 5, 6, 7]
    names = set(model_weight_mapping(body).values())
    assert {"fpn_6_w", "fpn_6_b", "fpn_7_w", "fpn_7_b"} <= names
    assert "fpn_inner_res2_1_sum_lateral_w" not in names  # C2 is not used from level 3 up
    _check_body("fpn_ResNet18_conv5_body", cfg, size=128)


def _reference_fpn(body: FPN, images: torch.Tensor):
    """Detectron's FPN arithmetic on the body's stage outputs, written with F.conv2d directly."""

    def conv(module, x, stride=1):
        if not isinstance(module, nn.Conv2d):
            raise AssertionError("reference covers the non-GN FPN only")
        return F.conv2d(x, module.weight, module.bias, stride=stride, padding=module.kernel_size[0] // 2)

    stages = body.body.forward_stages(images)
    levels = body.backbone_levels  # coarsest first
    inner = conv(body.inner[0], stages[levels[0]])
    outs = {levels[0]: conv(body.out[0], inner)}
    for i, level in enumerate(levels[1:], start=1):
        up = inner.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        inner = conv(body.inner[i], stages[level]) + up
        outs[level] = conv(body.out[i], inner)
    x = stages[5]
    for i, extra in enumerate(body.extra):
        x = conv(extra, torch.relu(x) if i > 0 else x, stride=2)
        outs[6 + i] = x
    return [outs[k] for k in sorted(outs)]


@pytest.mark.parametrize("extra", [False, True])
def test_fpn_matches_reference(extra):
    torch.manual_seed(1)
    body = ResNet(18, freeze_at=0)
    fpn = FPN(body, dim=32, min_level=3 if extra else 2, max_level=7 if extra else 5, extra_conv_levels=extra)
    for p in fpn.parameters():  # non-zero biases so that a dropped bias would show
        nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        got, want = fpn.eval()(x), _reference_fpn(fpn, x)
    assert len(got) == len(want) == len(fpn.levels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fpn_rejects_unpadded_input():
    body = registry.build("body", "fpn_ResNet18_conv5_body", get_cfg())
    with pytest.raises(ValueError, match="multiple of FPN.COARSEST_STRIDE"):
        body(torch.randn(1, 3, 80, 64))


def test_fpn_zero_init_lateral_and_xavier():
    cfg = _cfg(**{"FPN.ZERO_INIT_LATERAL": True})
    fpn = registry.build("body", "fpn_ResNet50_conv5_body", cfg)
    assert fpn.inner[0].weight.abs().sum() > 0  # the coarsest 1x1 only seeds the path: Xavier
    for lateral in fpn.inner[1:]:
        assert lateral.weight.abs().sum() == 0
    for conv in [*fpn.inner, *fpn.out]:
        assert conv.bias.abs().sum() == 0
    # XavierFill: U(-a, a), a = sqrt(3 / fan_in)
    w = fpn.out[0].weight
    bound = (3.0 / (w.shape[1] * 9)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_r50_fpn_blob_names_are_detectrons():
    fpn = registry.build("body", "fpn_ResNet50_conv5_body", get_cfg())
    mapping = model_weight_mapping(fpn)
    assert set(k for k, v in mapping.items() if v is None) == set()  # AffineChannel: no stats
    expected = resnet_body_blobs(R50_BLOCKS)
    expected.update(fpn_blobs())
    state = fpn.state_dict()
    got = {blob: tuple(state[key].shape) for key, blob in mapping.items()}
    assert got == expected
    assert set(mapping) == set(state)


def test_gn_body_names_groups_and_fpn_gn():
    cfg = _cfg(**{"RESNETS.TRANS_FUNC": "bottleneck_gn_transformation", "RESNETS.STEM_FUNC": "basic_gn_stem",
                  "RESNETS.SHORTCUT_FUNC": "basic_gn_shortcut", "FPN.USE_GN": True})
    fpn = registry.build("body", "fpn_ResNet50_conv5_body", cfg)
    mapping = model_weight_mapping(fpn)
    state = fpn.state_dict()
    got = {blob: tuple(state[key].shape) for key, blob in mapping.items()}
    body_expected = resnet_body_blobs(R50_BLOCKS, norm="gn")
    assert {k: v for k, v in got.items() if not k.startswith("fpn")} == body_expected
    fpn_names = {k for k in got if k.startswith("fpn")}
    assert "fpn_inner_res5_2_sum_gn_s" in fpn_names and "fpn_inner_res4_5_sum_lateral_gn_b" in fpn_names
    assert "fpn_res2_2_sum_gn_s" in fpn_names
    assert not any(n.endswith("_b") and "_gn_" not in n for n in fpn_names)  # GN convs have no bias
    gns = [m for m in fpn.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 32 and m.eps == 1e-5 for m in gns)
    assert not any(isinstance(m, AffineChannel2d) for m in fpn.modules())
    # DIM_PER_GP instead of NUM_GROUPS
    cfg = _cfg(**{"RESNETS.NORM": "GN", "GROUP_NORM.DIM_PER_GP": 16, "GROUP_NORM.NUM_GROUPS": -1})
    body = registry.build("body", "ResNet18_conv5_body", cfg)
    assert all(m.num_groups == m.num_channels // 16 for m in body.modules() if isinstance(m, nn.GroupNorm))
    # GN makes the trainable layers trainable (not frozen AffineChannel) beyond FREEZE_AT
    assert body.res3[0].branch2a.norm.weight.requires_grad


def test_gn_settings_errors():
    cfg = _cfg(**{"RESNETS.USE_GN": True, "GROUP_NORM.DIM_PER_GP": 16})
    with pytest.raises(ValueError, match="exactly one of GROUP_NORM.DIM_PER_GP"):
        registry.build("body", "ResNet18_conv5_body", cfg)
    cfg = _cfg(**{"RESNETS.USE_GN": True, "GROUP_NORM.NUM_GROUPS": 48})
    with pytest.raises(ValueError, match="not divisible by GROUP_NORM.NUM_GROUPS=48"):
        registry.build("body", "ResNet18_conv5_body", cfg)
    with pytest.raises(ValueError, match="conflicts with GroupNorm"):
        registry.build("body", "ResNet18_conv5_body", _cfg(**{"RESNETS.USE_GN": True, "RESNETS.NORM": "BN"}))
    with pytest.raises(ValueError, match="unknown normalisation 'LN'"):
        registry.build("body", "ResNet18_conv5_body", _cfg(**{"RESNETS.NORM": "LN"}))


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 4, 5])
def test_freeze_at(freeze_at):
    cfg = _cfg(**{"TRAIN.FREEZE_AT": freeze_at, "RESNETS.NORM": "BN"})
    body = registry.build("body", "ResNet18_conv5_body", cfg).train()
    frozen = {"stem": freeze_at >= 1, **{f"res{s}": s <= freeze_at for s in range(2, 6)}}
    for part, is_frozen in frozen.items():
        module = getattr(body, part)
        assert all(p.requires_grad != is_frozen for p in module.parameters()), part
        bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.training != is_frozen for m in bns), part
    if freeze_at < 5:  # the frozen part gets no gradient, the rest does
        body(torch.randn(2, 3, 32, 32))[0].sum().backward()
        assert (body.stem.conv1.conv.weight.grad is None) == (freeze_at >= 1)
        assert (body.res2[0].branch2a.conv.weight.grad is None) == (freeze_at >= 2)
        assert body.res5[0].branch2a.conv.weight.grad is not None


def test_freeze_at_invalid():
    with pytest.raises(ValueError, match="TRAIN.FREEZE_AT"):
        registry.build("body", "ResNet18_conv5_body", _cfg(**{"TRAIN.FREEZE_AT": 6}))


def test_affine_channel_is_frozen_everywhere():
    body = registry.build("body", "ResNet50_conv4_body", _cfg(**{"TRAIN.FREEZE_AT": 0}))
    affine = [m for m in body.modules() if isinstance(m, AffineChannel2d)]
    assert len(affine) == 1 + 3 * (3 + 4 + 6) + 3  # stem, 3 per block, one shortcut per stage
    assert all(not p.requires_grad for m in affine for p in m.parameters())
    assert all(p.requires_grad for n, p in body.named_parameters() if n.endswith("conv.weight"))


def test_resnext_groups_and_widths():
    cfg = _cfg(**{"RESNETS.NUM_GROUPS": 32, "RESNETS.WIDTH_PER_GROUP": 4})
    body = registry.build("body", "ResNet50_conv4_body", cfg)
    for stage, inner in (("res2", 128), ("res3", 256), ("res4", 512)):
        conv = getattr(body, stage)[0].branch2b.conv
        assert conv.groups == 32 and conv.in_channels == inner and conv.out_channels == inner
        assert conv.weight.shape == (inner, inner // 32, 3, 3)


@pytest.mark.parametrize("stride_1x1", [True, False])
def test_stride_placement(stride_1x1):
    body = registry.build("body", "ResNet50_conv5_body", _cfg(**{"RESNETS.STRIDE_1X1": stride_1x1}))
    for stage in ("res3", "res4", "res5"):
        block = getattr(body, stage)[0]
        assert block.branch2a.conv.stride == ((2, 2) if stride_1x1 else (1, 1))
        assert block.branch2b.conv.stride == ((1, 1) if stride_1x1 else (2, 2))
        assert block.branch1.conv.stride == (2, 2)
    assert body.res2[0].branch1.conv.stride == (1, 1)  # max-pool already halved the map
    assert all(b.branch1 is None for s in ("res2", "res3", "res4", "res5") for b in getattr(body, s)[1:])


def test_res5_dilation():
    body = registry.build("body", "ResNet18_conv5_body", _cfg(**{"RESNETS.RES5_DILATION": 2}))
    assert body.spatial_scales == [1.0 / 16]
    conv = body.res5[0].branch2a.conv
    assert conv.dilation == (2, 2) and conv.stride == (1, 1) and conv.padding == (2, 2)
    with torch.no_grad():
        assert body.eval()(torch.randn(1, 3, 64, 64))[0].shape == (1, 512, 4, 4)
    with pytest.raises(ValueError, match="RES5_DILATION"):
        registry.build("body", "fpn_ResNet18_conv5_body", _cfg(**{"RESNETS.RES5_DILATION": 2}))


def test_basic_blocks_for_r18_only():
    body = registry.build("body", "ResNet34_conv5_body", get_cfg())
    assert [len(getattr(body, f"res{s}")) for s in range(2, 6)] == [3, 4, 6, 3]
    assert not hasattr(body.res3[0], "branch2c")
    with pytest.raises(ValueError, match="basic_transformation"):
        registry.build("body", "ResNet50_conv5_body", _cfg(**{"RESNETS.TRANS_FUNC": "basic_transformation"}))
    with pytest.raises(ValueError, match="unknown RESNETS.TRANS_FUNC 'bottleneck'"):
        registry.build("body", "ResNet18_conv5_body", _cfg(**{"RESNETS.TRANS_FUNC": "bottleneck"}))


def test_make_res_stage_for_c4_head():
    stage = make_res_stage(get_cfg(), "res5", num_blocks=3, dim_in=1024, dim_out=2048, dim_inner=512,
                           stride_init=2)
    x = torch.randn(3, 1024, 14, 14)
    with torch.no_grad():
        assert stage.eval()(x).shape == (3, 2048, 7, 7)
    names = set(stage.detectron_weight_mapping().values())
    expected = {k for k in resnet_body_blobs(R50_BLOCKS) if k.startswith("res5_")}
    assert names == expected
    mask = make_res_stage(get_cfg(), "_[mask]_res5", num_blocks=3, dim_in=1024, dim_out=2048, dim_inner=512)
    assert "_[mask]_res5_0_branch1_bn_s" in set(mask.detectron_weight_mapping().values())


def test_bn_and_syncbn_bodies_are_trainable_and_map_stats_to_caffe2_spatialbn_names():
    for norm, cls in (("BN", nn.BatchNorm2d), ("SyncBN", nn.SyncBatchNorm)):
        body = registry.build("body", "ResNet18_conv5_body", _cfg(**{"RESNETS.NORM": norm}))
        assert isinstance(body.res3[0].branch2a.norm, cls)
        mapping = model_weight_mapping(body)
        assert mapping["res3.0.branch2a.norm.weight"] == "res3_0_branch2a_bn_s"
        assert mapping["res3.0.branch2a.norm.running_mean"] == "res3_0_branch2a_bn_rm"
        assert mapping["res3.0.branch2a.norm.running_var"] == "res3_0_branch2a_bn_riv"
        assert mapping["res3.0.branch2a.norm.num_batches_tracked"] is None
        assert mapping["stem.conv1.norm.bias"] == "res_conv1_bn_b"


def test_affine_channel_matches_float64_and_keeps_memory_format():
    torch.manual_seed(3)
    layer = AffineChannel2d(5)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    w, b = layer.weight.double()[:, None, None], layer.bias.double()[:, None, None]
    torch.testing.assert_close(y.double(), x.double() * w + b, rtol=1e-6, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight[:, None, None].expand(2, 5, 3, 4))


@pytest.mark.parametrize("norm", ["AffineChannel", "GN"])
def test_body_stages_are_channels_last_and_match_float64(norm):
    """The body computes in channels-last memory; values must be those of a float64 NCHW run."""
    torch.manual_seed(4)
    spec = NormSpec(kind=norm, gn_num_groups=8)
    body = ResNet(18, freeze_at=0, norm=spec).eval()
    for name, p in body.named_parameters():
        if "norm" in name:
            nn.init.normal_(p, mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = body.forward_stages(x)
        want = copy.deepcopy(body).double().forward_stages(x.double())
    for level, g in got.items():
        assert g.is_contiguous(memory_format=torch.channels_last), level
        torch.testing.assert_close(g.double(), want[level], rtol=1e-4, atol=1e-4)


def test_cpu_training_body_stages_are_channels_last_with_float64_values_and_gradients():
    """In CPU training the body computes channels-last too (its 3x3 weight gradients in NCHW: pydetectron.ops.conv);
    values, input and weight gradients must be those of a float64 run."""
    torch.manual_seed(5)
    body = ResNet(18, freeze_at=0).train()
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    got = body.forward_stages(x)
    body64 = copy.deepcopy(body).double()
    want = body64.forward_stages(x64)
    for level, g in got.items():
        assert g.is_contiguous(memory_format=torch.channels_last), level
        torch.testing.assert_close(g.double(), want[level], rtol=1e-4, atol=1e-4)
    sum(g.square().mean() for g in got.values()).backward()
    sum(w.square().mean() for w in want.values()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=5e-3 * x64.grad.abs().max().item())
    for (name, p), p64 in zip(body.named_parameters(), body64.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-3, atol=5e-3 * p64.grad.abs().max().item(),
                                       msg=name)


# Detectron's ResNet.py: add_ResNet101_conv5_body / add_ResNet152_conv5_body block counts, written here.
DETECTRON_BLOCK_COUNTS = {101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@pytest.mark.parametrize("config, depth, groups, width, stride_1x1", [
    ("baselines/e2e_faster_rcnn_R-101-FPN_1x.yaml", 101, 1, 64, True),
    ("baselines/e2e_mask_rcnn_X-101-32x8d-FPN_1x.yaml", 101, 32, 8, False),
    ("baselines/e2e_mask_rcnn_X-101-64x4d-FPN_1x.yaml", 101, 64, 4, False),
    ("baselines/e2e_mask_rcnn_X-152-32x8d-FPN-IN5k_1.44x.yaml", 152, 32, 8, False),
    (None, 152, 1, 64, True),  # ResNet152_conv5_body with Detectron's defaults
], ids=["R-101", "X-101-32x8d", "X-101-64x4d", "X-152-32x8d", "R-152"])
def test_deep_bodies_have_detectrons_blocks_and_widths(config, depth, groups, width, stride_1x1):
    """Built on the meta device (no memory, no init, no forward): per stage, Detectron's block count; per block
    the bottleneck width groups * width_per_group * 2^(stage - 2), output 256 * 2^(stage - 2), the groups on
    the 3x3, the stride on the 1x1 (MSRA) or the 3x3 (ResNeXt) of res3-res5's first block, a projection
    shortcut on the first block only."""
    from pydetectron.config import merge_cfg_from_file

    cfg = get_cfg()
    if config is not None:
        merge_cfg_from_file(cfg, str(Path(__file__).resolve().parents[1] / "configs" / config))
    name = cfg.MODEL.CONV_BODY if config is not None else f"ResNet{depth}_conv5_body"
    with torch.device("meta"):
        body = registry.build("body", name, cfg)
    resnet = body.body if isinstance(body, FPN) else body
    for stage, count in zip(range(2, 6), DETECTRON_BLOCK_COUNTS[depth]):
        blocks = list(getattr(resnet, f"res{stage}"))
        assert len(blocks) == count, (stage, len(blocks))
        inner, dim_out = groups * width * 2 ** (stage - 2), 256 * 2 ** (stage - 2)
        for i, block in enumerate(blocks):
            dim_in = dim_out if i > 0 else (64 if stage == 2 else dim_out // 2)
            stride = 2 if i == 0 and stage > 2 else 1
            a, b, c = block.branch2a.conv, block.branch2b.conv, block.branch2c.conv
            assert tuple(a.weight.shape) == (inner, dim_in, 1, 1)
            assert tuple(b.weight.shape) == (inner, inner // groups, 3, 3) and b.groups == groups
            assert tuple(c.weight.shape) == (dim_out, inner, 1, 1)
            assert (a.stride[0], b.stride[0]) == ((stride, 1) if stride_1x1 else (1, stride)), (stage, i)
            assert (block.branch1 is not None) == (i == 0)
