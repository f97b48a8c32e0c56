"""Solver: Detectron's lr policies, Detectron.pytorch's auto-scaling, parameter groups, Caffe2's SGD."""

import math

import pytest
import torch
from torch import nn

from pydetectron.solver import (
    LRSchedule,
    build_optimizer,
    current_learning_rate,
    layer_decay_factors,
    parameter_groups,
    scale_schedule,
    set_learning_rate,
)


def test_linear_warm_up_then_steps_with_decay_by_hand():
    schedule = LRSchedule("steps_with_decay", base_lr=0.02, max_iter=90, steps=(0, 60, 80), gamma=0.1,
                          warm_up_iters=10, warm_up_factor=1 / 3, warm_up_method="linear")
    # it < 10: lr * (f (1 - it/10) + it/10), f = 1/3
    assert schedule(0) == pytest.approx(0.02 / 3)
    assert schedule(5) == pytest.approx(0.02 * (1 / 3 * 0.5 + 0.5))
    assert schedule(10) == pytest.approx(0.02)
    assert schedule(59) == pytest.approx(0.02)
    assert schedule(60) == pytest.approx(0.002)
    assert schedule(79) == pytest.approx(0.002)
    assert schedule(80) == pytest.approx(0.0002)
    assert schedule(1000) == pytest.approx(0.0002)


def test_other_policies_by_hand():
    constant_warm_up = LRSchedule("step", base_lr=0.1, max_iter=100, step_size=30, gamma=0.5,
                                  warm_up_iters=5, warm_up_factor=0.1, warm_up_method="constant")
    assert [constant_warm_up(i) for i in (0, 4, 5, 29, 30, 61)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.05, 0.025])
    lrs = LRSchedule("steps_with_lrs", base_lr=1.0, max_iter=90, steps=(0, 60, 80), lrs=(0.02, 0.002, 0.0002))
    assert [lrs(i) for i in (0, 59, 60, 80)] == [0.02, 0.02, 0.002, 0.0002]
    cosine = LRSchedule("cosine_decay", base_lr=1e-3, max_iter=200)
    assert cosine(0) == pytest.approx(1e-3)
    assert cosine(100) == pytest.approx(0.5e-3)
    assert cosine(50) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(200) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="poly"), "LR_POLICY"),
    (dict(policy="steps_with_decay", steps=(10, 20)), "STEPS must start at 0"),
    (dict(policy="steps_with_lrs", steps=(0, 20), lrs=(0.1,)), "LRS"),
    (dict(policy="step", warm_up_method="exp"), "WARM_UP_METHOD"),
])
def test_bad_schedule_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule(base_lr=0.1, max_iter=10, **kwargs)


# Config written for 8 GPUs x 2 images, lr 0.02, steps (0, 60k, 80k), 90k iterations (a Detectron 1x schedule).
@pytest.mark.parametrize("num_gpus, batch_size, iter_size, lr, steps, max_iter", [
    (8, 16, 1, 0.02, [0, 60000, 80000], 90000),
    (1, 2, 1, 0.0025, [0, 480000, 640000], 720000),
    (2, 4, 2, 0.005, [0, 120000, 160000], 180000),
    (4, 8, 4, 0.01, [0, 30000, 40000], 45000),
    (1, 1, 16, 0.00125, [0, 60000, 80000], 90000),
    (3, 6, 1, 0.0075, [0, 160000, 213333], 240000),
])
def test_auto_scaling_table(num_gpus, batch_size, iter_size, lr, steps, max_iter):
    scaled = scale_schedule(0.02, [0, 60000, 80000], 90000, cfg_num_gpus=8, cfg_ims_per_batch=2,
                            num_gpus=num_gpus, batch_size=batch_size, iter_size=iter_size)
    assert scaled.base_lr == pytest.approx(lr)
    assert scaled.steps == steps
    assert scaled.max_iter == max_iter
    assert scaled.ims_per_batch == batch_size // num_gpus
    assert "BASE_LR" in scaled.summary and "MAX_ITER" in scaled.summary


def test_auto_scaling_rejects_uneven_batches():
    with pytest.raises(ValueError, match="not divisible"):
        scale_schedule(0.02, [0], 10, 8, 2, num_gpus=2, batch_size=3)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Conv2d(3, 4, 1)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(4, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)


def test_parameter_groups_follow_detectron_rules():
    groups = parameter_groups(_Tiny(), weight_decay=1e-4, weight_decay_norm=0.0, bias_lr_factor=2.0)
    by_name = {name: (g["lr_scale"], g["weight_decay"]) for g in groups for name in g["names"]}
    assert by_name == {
        "conv.weight": (1.0, 1e-4), "fc.weight": (1.0, 1e-4),
        "conv.bias": (2.0, 0.0), "fc.bias": (2.0, 0.0),
        "gn.weight": (1.0, 0.0), "gn.bias": (1.0, 0.0),
    }


def test_per_block_layer_wise_decay():
    names = ["body.stem.conv1.weight", "body.res2.0.conv1.weight", "body.res2.1.conv1.weight",
             "body.res3.0.conv1.weight", "rpn.conv.weight"]
    assert layer_decay_factors(names, 0.5, "per_block") == {
        names[0]: 0.5 ** 4, names[1]: 0.5 ** 3, names[2]: 0.5 ** 2, names[3]: 0.5, names[4]: 1.0}

    model = nn.Module()
    model.body = nn.Module()
    model.body.res2 = nn.ModuleList([nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)])
    model.head = nn.Linear(2, 2, bias=False)
    groups = parameter_groups(model, weight_decay=0.05, layer_decay=0.5, layer_grouping="per_block")
    scales = {name: g["lr_scale"] for g in groups for name in g["names"]}
    assert scales == {"body.res2.0.weight": 0.25, "body.res2.1.weight": 0.5, "head.weight": 1.0}


def _spark_table_r50(decay):
    """SparK's lr_factor_func for ResNet-50 (N = 5), written out by hand: decay ** (6 - layer_id)."""
    table = {"body.stem.conv1.conv.weight": decay ** 6, "body.stem.conv1.norm.weight": decay ** 6}
    for block in range(3):
        table[f"body.res2.{block}.branch2a.conv.weight"] = decay ** 5
    for block in range(4):
        table[f"body.res3.{block}.branch2b.norm.bias"] = decay ** 4
    for block in (0, 1, 2):
        table[f"body.res4.{block}.branch2c.conv.weight"] = decay ** 3  # layer 3
    for block in (3, 4, 5):
        table[f"body.res4.{block}.branch1.conv.weight"] = decay ** 2  # layer 4
    for block in range(3):
        table[f"body.res5.{block}.branch2a.conv.weight"] = decay ** 1  # layer N = 5
    table["box_head.res5.0.branch2a.conv.weight"] = decay ** 1  # a C4 head's res5 is res5 too
    table.update({"fpn.fpn_inner_res5_0_sum.weight": 1.0, "rpn.conv_rpn.weight": 1.0, "box_outs.cls_score.bias": 1.0})
    return table


def test_spark_layer_decay_matches_the_hand_table():
    table = _spark_table_r50(0.6)
    assert layer_decay_factors(table, 0.6, "spark") == pytest.approx(table, rel=1e-12)
    # ResNet-101 (SparK's N = 11): res4 blocks 0..22 in groups of three -> layers 3..10
    names = [f"res4.{b}.branch2a.conv.weight" for b in range(23)] + ["res5.2.branch2c.conv.weight", "head.w"]
    factors = layer_decay_factors(names, 0.5, "spark")
    assert [round(math.log(factors[n], 0.5)) for n in names[:23]] == [12 - (3 + b // 3) for b in range(23)]
    assert factors["res5.2.branch2c.conv.weight"] == 0.5 and factors["head.w"] == 1.0


def test_spark_layer_decay_on_a_real_body():
    from pydetectron.modeling.backbones import ResNet
    from pydetectron.modeling.layers import NormSpec

    model = nn.Module()
    model.body = ResNet(50, norm=NormSpec("GN"), freeze_at=0)
    groups = parameter_groups(model, weight_decay=1e-4, bias_lr_factor=1.0, layer_decay=0.6)
    scales = {name: g["lr_scale"] for g in groups for name in g["names"]}
    table = _spark_table_r50(0.6)
    for name, factor in table.items():
        if name in scales:
            assert scales[name] == pytest.approx(factor, rel=1e-12), name
    assert scales["body.res4.5.branch2c.norm.weight"] == pytest.approx(0.6 ** 2)
    assert len(scales) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("spelling, expected", [("ADAMW", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                                ("sgd", torch.optim.SGD), ("AdamW", torch.optim.AdamW)])
def test_optimizer_names_as_spark_writes_them(spelling, expected):
    from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_str

    cfg = get_cfg()
    merge_cfg_from_str(cfg, f"SOLVER:\n  OPTIMIZER: {spelling}\n  LR_DECAY: 0.6\n")
    assert_and_infer_cfg(cfg)
    assert cfg.SOLVER.TYPE == expected.__name__ and cfg.SOLVER.LAYER_WISE_LR_DECAY == 0.6
    assert isinstance(build_optimizer(nn.Linear(2, 2), cfg), expected)


def test_unknown_optimizer_is_refused_with_the_choices():
    from pydetectron.config import assert_and_infer_cfg, get_cfg

    cfg = get_cfg()
    cfg.SOLVER.TYPE = "LAMB"
    with pytest.raises(ValueError, match="'LAMB' is not one of SGD, Adam, AdamW"):
        assert_and_infer_cfg(cfg)


def _caffe2_sgd_trajectory(w0, grads, lrs, momentum, weight_decay, scale_momentum, threshold):
    """Caffe2's MomentumSGDUpdate (v = m v + lr g; w -= v) with Detectron's _CorrectMomentum, in float64."""
    w, v, lr_prev = w0.clone(), torch.zeros_like(w0), lrs[0]
    out = []
    for grad, lr in zip(grads, lrs):
        if lr != lr_prev:
            ratio = max(lr / lr_prev, lr_prev / lr)
            if scale_momentum and lr_prev > 1e-7 and ratio > threshold:
                v = v * (lr / lr_prev)
            lr_prev = lr
        g = grad + weight_decay * w
        v = momentum * v + lr * g
        w = w - v
        out.append(w.clone())
    return out


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scale_momentum", [True, False])
def test_sgd_matches_caffe2_momentum_update_through_lr_changes(scale_momentum, fused):
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(12)]
    schedule = LRSchedule("steps_with_decay", base_lr=0.1, max_iter=12, steps=(0, 8), gamma=0.1,
                          warm_up_iters=4, warm_up_factor=1 / 3)
    lrs = [schedule(i) for i in range(12)]
    expected = _caffe2_sgd_trajectory(w0, grads, lrs, 0.9, 1e-2, scale_momentum, threshold=1.1)

    param = nn.Parameter(w0.clone())
    model = nn.Module()
    model.weight = param
    groups = parameter_groups(model, weight_decay=1e-2)
    optimizer = torch.optim.SGD(groups, lr=lrs[0], momentum=0.9, fused=fused)
    for group in optimizer.param_groups:
        group["lr"] = lrs[0] * group["lr_scale"]
    for step, (grad, lr) in enumerate(zip(grads, lrs)):
        set_learning_rate(optimizer, lr, scale_momentum=scale_momentum, scale_momentum_threshold=1.1)
        assert current_learning_rate(optimizer) == pytest.approx(lr)
        param.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(param.detach(), expected[step], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimizer_type, expected_class", [("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)])
def test_build_optimizer_from_cfg(optimizer_type, expected_class):
    from pydetectron.config import get_cfg, merge_cfg_from_list

    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["SOLVER.TYPE", optimizer_type, "SOLVER.BASE_LR", 0.01, "SOLVER.WARM_UP_ITERS", 10,
                              "SOLVER.WARM_UP_FACTOR", 0.1, "SOLVER.WEIGHT_DECAY", 1e-4])
    optimizer = build_optimizer(_Tiny(), cfg)
    assert isinstance(optimizer, expected_class) and optimizer.defaults["fused"]
    assert current_learning_rate(optimizer) == pytest.approx(0.001)  # warm-up factor at step 0
    bias_scale = 2.0 if optimizer_type == "SGD" else 1.0
    lr_of = {name: g["lr"] for g in optimizer.param_groups for name in g["names"]}
    assert lr_of == pytest.approx({"conv.weight": 0.001, "fc.weight": 0.001, "gn.weight": 0.001, "gn.bias": 0.001,
                                   "conv.bias": 0.001 * bias_scale, "fc.bias": 0.001 * bias_scale})


@pytest.mark.parametrize("fused", [False, True])
def test_torch_sgd_momentum_of_detectron2_mode_is_never_rescaled(fused):
    """SOLVER.LR_IN_MOMENTUM False (detectron2's torch.optim.SGD): v = m v + (g + wd w); w -= lr v, whatever the
    lr does, through warm-up, a step and lrs below Detectron's 1e-7 guard (float64 reference)."""
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(10)]
    lrs = [0.01, 0.02, 0.05, 0.1, 0.1, 0.01, 1e-8, 5e-9, 0.01, 0.0]
    w, v, expected = w0.clone(), torch.zeros_like(w0), []
    for grad, lr in zip(grads, lrs):
        v = 0.9 * v + grad + 1e-2 * w
        w = w - lr * v
        expected.append(w.clone())
    param = nn.Parameter(w0.clone())
    model = nn.Module()
    model.weight = param
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay=1e-2), lr=lrs[0], momentum=0.9, fused=fused)
    for step, (grad, lr) in enumerate(zip(grads, lrs)):
        set_learning_rate(optimizer, lr, scale_momentum=True, scale_momentum_threshold=1.1, lr_in_momentum=False)
        param.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(param.detach(), expected[step], rtol=1e-12, atol=1e-12)


def test_detectron2_solver_groups(tmp_path):
    """A detectron2 config's optimizer: biases at 1x lr with WEIGHT_DECAY, norm weights and biases with
    WEIGHT_DECAY_NORM (detectron2's get_default_optimizer_params)."""
    from pydetectron.config import load_detectron2_config

    path = tmp_path / "d2.yaml"
    path.write_text("SOLVER: {BASE_LR: 0.02, WEIGHT_DECAY: 0.0001, WEIGHT_DECAY_NORM: 0.001, WARMUP_ITERS: 0}\n")
    cfg = load_detectron2_config(path)
    optimizer = build_optimizer(_Tiny(), cfg)
    lr_of = {name: g["lr"] for g in optimizer.param_groups for name in g["names"]}
    decay_of = {name: g["weight_decay"] for g in optimizer.param_groups for name in g["names"]}
    assert lr_of == pytest.approx(dict.fromkeys(lr_of, 0.02))
    assert decay_of == pytest.approx({"conv.weight": 1e-4, "conv.bias": 1e-4, "fc.weight": 1e-4, "fc.bias": 1e-4,
                                      "gn.weight": 1e-3, "gn.bias": 1e-3})
