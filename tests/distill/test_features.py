"""Where distillation reads the bodies: pre-ReLU stage ends, the norms before them, MGD's trainable
stage-last norms, and the teacher BN's gamma/beta (own norms or the torchvision file)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_list
from pydetectron.distill import (
    PreReluCapture,
    enable_stage_last_norms,
    resnet_body_of,
    stage_end_bn_affine,
    stage_end_bn_from_torchvision,
    stage_end_norm,
)
from pydetectron.modeling import registry
from pydetectron.modeling.backbones import FPN, ResNet
from pydetectron.modeling.layers import AffineChannel2d, NormSpec
from pydetectron.weights import load_pretrained


def _randomize_norms(body: nn.Module) -> None:
    """Non-trivial scales and shifts, so that the stage ends have negative values to lose to a ReLU."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, (AffineChannel2d, nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))


def _pre_relu_by_hand(body: ResNet, images: torch.Tensor) -> dict:
    """Stage ends before their ReLU, from the blocks' branches composed here (channels-last like the body)."""
    x = body.stem(images.contiguous(memory_format=torch.channels_last))
    ends = {}
    for level in body.stage_dims:
        stage = getattr(body, f"res{level}")
        for block in list(stage)[:-1]:
            x = block(x)
        last = stage[-1]
        out = F.relu(last.branch2a(x))
        if hasattr(last, "branch2c"):
            out = last.branch2c(F.relu(last.branch2b(out)))
        else:
            out = last.branch2b(out)
        ends[level] = out + (x if last.branch1 is None else last.branch1(x))
        x = F.relu(ends[level])
    return ends


@pytest.mark.parametrize("depth, stages", [(18, 5), (50, 4)])
def test_capture_gives_the_stage_output_before_relu(depth, stages):
    torch.manual_seed(0)
    body = ResNet(depth, num_stages=stages, freeze_at=0).eval()
    _randomize_norms(body)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = body.forward_stages(images)
        expected = _pre_relu_by_hand(body, images)
    levels = list(range(2, stages + 1))
    capture = PreReluCapture(body, levels)
    with torch.no_grad():
        outputs = body.forward_stages(images)
    features = capture.pop()
    for level, feature in zip(levels, features):
        assert (expected[level] < 0).any(), level  # the check can tell pre- from post-ReLU
        assert torch.equal(feature, expected[level]), level
        assert torch.equal(outputs[level], F.relu(expected[level])), level
        assert torch.equal(outputs[level], plain[level])  # capturing changes no output
    with pytest.raises(RuntimeError, match="run the network first"):
        capture.pop()
    capture.remove()
    assert all(getattr(body, f"res{lvl}")[-1].out_relu.inplace for lvl in levels)


def test_captured_features_carry_the_gradient():
    torch.manual_seed(0)
    body = ResNet(18, freeze_at=0, norm=NormSpec("BN")).train()
    capture = PreReluCapture(body)
    body.forward_stages(torch.randn(2, 3, 32, 32))
    sum(f.square().mean() for f in capture.pop()).backward()
    assert body.res5[1].branch2b.conv.weight.grad.abs().sum() > 0


def test_resnet_body_of_finds_the_one_body():
    body = ResNet(18, freeze_at=0)
    fpn = FPN(body, dim=32)
    assert resnet_body_of(fpn) is body and resnet_body_of(body) is body
    with pytest.raises(ValueError, match="found 0"):
        resnet_body_of(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="found 2"):
        resnet_body_of(nn.ModuleList([body, ResNet(18)]))


def test_stage_end_norm_is_the_last_norm_before_the_sum():
    r18, r50 = ResNet(18), ResNet(50, num_stages=4)
    assert stage_end_norm(r18, 3) is r18.res3[1].branch2b.norm
    assert stage_end_norm(r50, 4) is r50.res4[5].branch2c.norm
    with pytest.raises(ValueError, match="asks for \\[5\\]"):
        stage_end_norm(r50, 5)


@pytest.mark.parametrize("freeze_at, replaced, frozen", [
    (1, (2, 3, 4, 5), ()),
    (2, (3, 4, 5), ()),
    (3, (2, 4, 5), (2,)),  # MGD's d2 rule: stage == FREEZE_AT keeps its norms; lower stages get frozen GNs
])
def test_enable_stage_last_norms(freeze_at, replaced, frozen):
    body = ResNet(18, freeze_at=freeze_at)
    _randomize_norms(body)
    keys = set(body.state_dict())
    old = {lvl: getattr(body, f"res{lvl}")[-1].branch2a.norm for lvl in body.stage_dims}
    names = enable_stage_last_norms(body)
    assert set(body.state_dict()) == keys  # same weight names
    assert names == [f"res{lvl}.1.{branch}.norm" for lvl in replaced for branch in ("branch2a", "branch2b")]
    for level in body.stage_dims:
        block = getattr(body, f"res{level}")[-1]
        norms = [block.branch2a.norm, block.branch2b.norm]
        if level not in replaced:
            assert all(isinstance(n, AffineChannel2d) for n in norms), level
            continue
        assert all(isinstance(n, nn.GroupNorm) and n.num_groups == 32 for n in norms), level
        assert all(p.requires_grad == (level not in frozen) for n in norms for p in n.parameters()), level
        assert torch.equal(block.branch2a.norm.weight, old[level].weight)  # starts from the replaced affine
        assert isinstance(getattr(body, f"res{level}")[0].branch2a.norm, AffineChannel2d)  # only the last block


def test_stage_last_norms_built_from_cfg_take_a_torchvision_bn_unfolded(tmp_path):
    """RESNETS.ENABLE_STAGE_LAST_NORM (MGD's student) builds the GroupNorms, and a torchvision file gives them its
    BN gamma/beta as detectron2 does for MGD, while the other (AffineChannel) norms get the exact fold."""
    tv = torchvision.models.resnet18()
    _randomize_norms(tv)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.25, 4.0)
                m.running_mean.normal_()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["TRAIN.FREEZE_AT", 1, "RESNETS.ENABLE_STAGE_LAST_NORM", True,
                              "RESNETS.STRIDE_1X1", False])
    assert_and_infer_cfg(cfg)
    body = registry.build("body", "ResNet18_conv5_body", cfg)
    load_pretrained(body, tmp_path / "r18.pth", cfg, training=True, print_fn=lambda _: None)
    last, first = body.res4[1].branch2a.norm, body.res4[0].branch2a.norm
    assert isinstance(last, nn.GroupNorm) and isinstance(first, AffineChannel2d)
    bn = tv.layer3[1].bn1
    assert torch.equal(last.weight, bn.weight) and torch.equal(last.bias, bn.bias)
    bn = tv.layer3[0].bn1
    torch.testing.assert_close(first.weight, bn.weight / torch.sqrt(bn.running_var + 1e-5))


def test_bn_affine_from_the_teacher_norms_or_its_torchvision_file():
    bn_body = ResNet(50, num_stages=4, norm=NormSpec("BN"))
    with pytest.raises(ValueError, match="load the teacher's weights"):
        stage_end_bn_affine(bn_body, [2])
    _randomize_norms(bn_body)
    pairs = stage_end_bn_affine(bn_body, [2, 4])
    assert pairs[1][0] is not None and torch.equal(pairs[1][0], bn_body.res4[5].branch2c.norm.weight)
    affine_body = ResNet(50, num_stages=4)
    with pytest.raises(ValueError, match="TEACHER_BN_WEIGHTS"):
        stage_end_bn_affine(affine_body, [2])
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
    pairs = stage_end_bn_from_torchvision({"state_dict": tv.state_dict()}, affine_body, [2, 3, 4])
    for (gamma, beta), layer in zip(pairs, (tv.layer1, tv.layer2, tv.layer3)):
        assert torch.equal(gamma, layer[-1].bn3.weight) and torch.equal(beta, layer[-1].bn3.bias)
    with pytest.raises(KeyError, match="not the torchvision ResNet"):
        stage_end_bn_from_torchvision(torchvision.models.resnet18().state_dict(), affine_body, [4])
