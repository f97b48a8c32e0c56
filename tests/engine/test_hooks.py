"""PreciseBN (detectron2's TEST.PRECISE_BN) and the EMA hook."""

import torch
from torch import nn

from pydetectron.engine.hooks import EMA, PreciseBN, update_bn_stats


def _batches(count: int):
    generator = torch.Generator().manual_seed(0)
    return [{"data": torch.randn(3, 2, 4, 4, generator=generator) * (i + 1) + i} for i in range(count)]


def test_precise_bn_sets_the_true_average_of_the_batch_statistics():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).train()
    batches = _batches(5)
    updated = update_bn_stats(model, iter(batches), lambda b: model(b["data"]), 5)
    assert updated == 1
    with torch.no_grad():  # reference: each batch's mean and unbiased variance after the conv, averaged
        outs = [model[0](b["data"]) for b in batches]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)
    torch.testing.assert_close(model[1].running_var, variances)
    assert model[1].momentum == 0.1  # restored


def test_precise_bn_hook_runs_before_evaluation_and_leaves_the_rng_alone():
    model = nn.Sequential(nn.BatchNorm2d(2))
    lines = []
    hook = PreciseBN(model, lambda step: iter(_batches(3)), lambda b: model(b["data"]), 3, lines.append)
    state = torch.get_rng_state()
    hook.before_evaluation(None, 10)
    assert torch.equal(state, torch.get_rng_state())
    assert lines == ["PreciseBN: statistics of 1 BatchNorm layers recomputed over 3 batches"]
    torch.testing.assert_close(model[0].running_mean,
                               torch.stack([b["data"].mean(dim=(0, 2, 3)) for b in _batches(3)]).mean(0))


def test_ema_averages_weights_and_is_evaluated_in_their_place():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    for value in (1.0, 2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.after_step(None, 0, {})
    expected = (0.0 * 0.5 + 1.0 * 0.5) * 0.5 + 2.0 * 0.5
    ema.before_evaluation(None, 2)
    assert model.weight.item() == expected
    ema.after_evaluation(None, 2, None)
    assert model.weight.item() == 2.0
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.average["weight"].item() == expected
