"""The L2 baseline by hand, the DISTILL config keys and their checks, and a method built from them driving
real bodies: capture, matching, loss, gradients to the student only."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pydetectron.config import ConfigError, assert_and_infer_cfg, get_cfg, merge_cfg_from_list
from pydetectron.config.checks import DISTILL_METHODS, MGD_REDUCERS
from pydetectron.distill import (
    METHODS,
    MGD,
    REDUCERS,
    FeatureL2,
    PreReluCapture,
    build_distill_method,
    distilled_levels,
    enable_stage_last_norms,
)
from pydetectron.modeling.backbones import ResNet
from pydetectron.modeling.layers import NormSpec


def test_feature_l2_loss_by_hand():
    method = FeatureL2([3], [1], [2], loss_factors=[3.0], batch_divisor=2)
    with torch.no_grad():
        method.adapters["c3"].weight.copy_(torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1))
        method.adapters["c3"].bias.copy_(torch.tensor([0.0, 1.0]))
    student = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2)  # adapted: (2, 6) and (0, -2)
    teacher = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    losses = method.loss([student], [teacher])
    # (1 + 25) + (0 + 4) = 30, / factor 3 / divisor 2
    assert list(losses) == ["loss_distill_c3"] and losses["loss_distill_c3"].item() == pytest.approx(5.0)
    assert not method.matching_due(0)
    losses["loss_distill_c3"].backward()
    assert method.adapters["c3"].weight.grad is not None


def _cfg(*pairs: str):
    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["DISTILL.TEACHER_CFG", "teacher.yaml", *pairs])
    return assert_and_infer_cfg(cfg)


def test_config_names_match_the_library():
    assert set(DISTILL_METHODS) == {""} | set(METHODS)
    assert set(MGD_REDUCERS) == set(REDUCERS)
    d = get_cfg().DISTILL
    assert d.METHOD == "" and d.MGD.REDUCER == "amp" and d.MGD.UPDATE_FREQ == (5000, 31000)
    assert d.LOSS_FACTORS == (5e7, 5e7, 5e6, 5e6)  # MGD's det factors [1, 1, .1, .1] x 5e7 for C2..C5


@pytest.mark.parametrize("pairs, key", [
    (("DISTILL.METHOD", "kd"), "DISTILL.METHOD"),
    (("DISTILL.METHOD", "mgd", "DISTILL.TEACHER_CFG", ""), "DISTILL.TEACHER_CFG"),
    (("DISTILL.METHOD", "mgd", "DISTILL.LOSS_FACTORS", "[1, 1, 1]"), "DISTILL.LOSS_FACTORS"),
    (("DISTILL.METHOD", "feature_l2", "DISTILL.LOSS_FACTORS", "[1, 1, 0, 1]"), "DISTILL.LOSS_FACTORS"),
    (("DISTILL.METHOD", "mgd", "DISTILL.IGNORE_INDS", "[4]"), "DISTILL.IGNORE_INDS"),
    (("DISTILL.METHOD", "mgd", "DISTILL.IGNORE_INDS", "[0, 0]"), "DISTILL.IGNORE_INDS"),
    (("DISTILL.METHOD", "mgd", "DISTILL.IGNORE_INDS", "[0, 1, 2, 3]"), "DISTILL.IGNORE_INDS"),
    (("DISTILL.METHOD", "mgd", "DISTILL.MGD.REDUCER", "avg"), "DISTILL.MGD.REDUCER"),
    (("DISTILL.METHOD", "mgd", "DISTILL.MGD.UPDATE_FREQ", "[5000]"), "DISTILL.MGD.UPDATE_FREQ"),
    (("DISTILL.METHOD", "mgd", "DISTILL.MGD.UPDATE_FREQ", "[0, 10]"), "DISTILL.MGD.UPDATE_FREQ"),
    (("DISTILL.METHOD", "mgd", "DISTILL.MGD.UPDATE_ITER", "-1"), "DISTILL.MGD.UPDATE_ITER"),
])
def test_distill_checks_name_the_key(pairs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(*pairs)


def test_distill_valid_values_pass():
    cfg = _cfg("DISTILL.METHOD", "mgd", "DISTILL.IGNORE_INDS", "[0]", "DISTILL.MGD.REDUCER", "sm",
               "DISTILL.LOSS_FACTORS", "[1, 2, 3, 4]", "TRAIN.FREEZE_AT", "1")
    assert cfg.DISTILL.IGNORE_INDS == (0,) and cfg.TRAIN.FREEZE_AT == 1
    assert distilled_levels(cfg.DISTILL.IGNORE_INDS) == [3, 4, 5]


def _bodies():
    torch.manual_seed(0)
    teacher = ResNet(34, norm=NormSpec("BN"), freeze_at=0).eval()  # same widths as R-18, BN gamma/beta
    for m in teacher.modules():  # as a trained teacher's (margins refuse the initial gamma 1 / beta 0)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias)
    student = ResNet(18, freeze_at=1)
    enable_stage_last_norms(student)
    return teacher, student


def test_built_mgd_drives_real_bodies():
    teacher, student = _bodies()
    cfg = _cfg("DISTILL.METHOD", "mgd", "DISTILL.IGNORE_INDS", "[0, 2]", "DISTILL.LOSS_FACTORS", "[9, 2, 9, 3]",
               "TRAIN.IMS_PER_BATCH", "2", "NUM_GPUS", "4")
    method = build_distill_method(cfg, teacher, student)
    assert isinstance(method, MGD) and method.levels == [3, 5] and method.loss_factors == [2.0, 3.0]
    assert method.batch_divisor == 8 and method.reducer == "amp" and method.update_iter == 1000
    teacher.requires_grad_(False)
    t_capture, s_capture = PreReluCapture(teacher, method.levels), PreReluCapture(student, method.levels)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        teacher.forward_stages(images)
        student.eval().forward_stages(images)
    method.track(s_capture.pop(), t_capture.pop())
    method.update_matching()
    assert all(sorted(method.matching(lvl).tolist()) == list(range(dim)) for lvl, dim in ((3, 128), (5, 512)))
    with torch.no_grad():
        teacher.forward_stages(images)
    student.train().forward_stages(images)
    losses = method.loss(s_capture.pop(), t_capture.pop())
    assert sorted(losses) == ["loss_distill_c3", "loss_distill_c5"]
    sum(losses.values()).backward()
    assert student.res5[1].branch2b.norm.weight.grad.abs().sum() > 0  # MGD's trainable stage-last norm
    assert method.student_norms["c3"].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_built_feature_l2_and_teacher_bn_file(tmp_path):
    teacher, student = _bodies()
    cfg = _cfg("DISTILL.METHOD", "feature_l2")
    method = build_distill_method(cfg, teacher, student)
    assert isinstance(method, FeatureL2) and method.levels == [2, 3, 4, 5] and method.batch_divisor == 2
    affine_teacher = ResNet(34, freeze_at=0)
    mgd_cfg = _cfg("DISTILL.METHOD", "mgd")
    with pytest.raises(ValueError, match="AffineChannel"):
        build_distill_method(mgd_cfg, affine_teacher, student)
    tv = torchvision.models.resnet34()
    torch.nn.init.constant_(tv.layer4[-1].bn2.weight, 1.0)
    torch.nn.init.constant_(tv.layer4[-1].bn2.bias, 5.0)  # margins -3 |gamma| = -3
    path = tmp_path / "r34.pth"
    torch.save(tv.state_dict(), path)
    method = build_distill_method(_cfg("DISTILL.METHOD", "mgd", "DISTILL.MGD.TEACHER_BN_WEIGHTS", str(path)),
                                  affine_teacher, student)
    assert torch.equal(method.margins(5), torch.full((1, 512, 1, 1), -3.0))
    with pytest.raises(FileNotFoundError, match="TEACHER_BN_WEIGHTS"):
        build_distill_method(_cfg("DISTILL.METHOD", "mgd", "DISTILL.MGD.TEACHER_BN_WEIGHTS", str(tmp_path / "x")),
                             affine_teacher, student)
