"""The training loop: gradient accumulation, exact resume after an interruption, NaN stop."""

import os
import signal

import pytest
import torch
from torch import nn

from pydetectron.engine.checkpoint import CheckpointManager, load_checkpoint
from pydetectron.engine.hooks import TrainerHook
from pydetectron.engine.logger import TrainingLogger
from pydetectron.engine.trainer import AmpSettings, NonFiniteLossError, Trainer, TrainLoopSettings
from pydetectron.solver import LRSchedule, parameter_groups


class _Regressor(nn.Module):
    """A model with randomness in its forward (like RoI sampling) and per-image-mean losses."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, data, target):
        pred = self.fc(self.drop(data)).squeeze(1)
        return {"loss_l2": ((pred - target) ** 2).mean(), "loss_l1": (pred - target).abs().mean()}


def _batch(index: int, size: int) -> dict:
    g = torch.Generator().manual_seed(index)
    return {"data": torch.randn(size, 4, generator=g), "target": torch.randn(size, generator=g)}


def _batches(start: int, size: int = 2):
    index = start
    while True:
        yield _batch(index, size)
        index += 1


def _trainer(model, tmp_path, max_iter, batches, iter_size=1, lines=None, forward=None, **settings):
    """A Trainer; `forward(model, batch)` (default: the model on the batch's keywords)."""
    torch.manual_seed(123)
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay=1e-4), lr=0.1, momentum=0.9)
    for group in optimizer.param_groups:
        group["lr"] = 0.1 * group["lr_scale"]
    schedule = LRSchedule("steps_with_decay", base_lr=0.1, max_iter=max_iter, steps=(0, 5), warm_up_iters=3)
    records = lines if lines is not None else []
    logger = TrainingLogger(tmp_path, max_iter=max_iter, disp_interval=1, print_fn=records.append)
    run = forward or (lambda m, b: m(**b))
    hooks = settings.pop("hooks", ())
    return Trainer(model, optimizer, schedule, batches, lambda batch: run(model, batch),
                   TrainLoopSettings(max_iter=max_iter, iter_size=iter_size, snapshot_iters=1000, **settings),
                   logger, CheckpointManager(tmp_path / "ckpt"), print_fn=records.append, hooks=hooks)


def _recording(log, interrupt_at=None, sig=signal.SIGINT):
    """A forward that records every pass's losses (and can send `sig` to itself during pass N)."""
    def forward(model, batch):
        losses = model(**batch)
        log.append({k: float(v.detach()) for k, v in losses.items()})
        if len(log) == interrupt_at:
            os.kill(os.getpid(), sig)
        return losses
    return forward


def _seeded_model():
    torch.manual_seed(7)
    return _Regressor()


def test_iter_size_two_of_one_image_equals_one_pass_of_two(tmp_path):
    def grads(batch_size, iter_size):
        model = _Regressor().eval()  # no dropout: batch-independent
        torch.manual_seed(0)
        model.fc.reset_parameters()
        images = _batch(0, 2)
        halves = iter([{k: v[i:i + 1] for k, v in images.items()} for i in range(2)])
        source = halves if iter_size == 2 else iter([images])
        trainer = _trainer(model, tmp_path / f"{iter_size}", 1, source, iter_size=iter_size,
                           forward=lambda m, b: m(**b))
        trainer.optimizer.step = lambda: None  # keep the accumulated gradient for inspection
        trainer.model.train = lambda mode=True: trainer.model  # stay in eval mode
        trainer.train()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(2, 1), grads(1, 2)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_resumes_with_identical_losses(tmp_path, sig):
    """Ctrl-C and a scheduler's SIGTERM (SLURM, Kubernetes) both save the step and stop cleanly."""
    full = []
    _trainer(_seeded_model(), tmp_path / "full", 8, _batches(0), forward=_recording(full)).train()

    first, lines = [], []
    interrupted = _trainer(_seeded_model(), tmp_path / "cut", 8, _batches(0), lines=lines,
                           forward=_recording(first, interrupt_at=4, sig=sig))

    def not_caught(signum, frame):  # the trainer's own handler replaces this while it trains
        raise AssertionError(f"{signal.Signals(signum).name} was not caught by the trainer")

    previous = signal.signal(sig, not_caught)
    try:
        assert interrupted.train() == 4
    finally:
        signal.signal(sig, previous)
    assert any(f"{sig.name} received" in line for line in lines)
    checkpoint = load_checkpoint(CheckpointManager(tmp_path / "cut" / "ckpt").latest())
    assert checkpoint["step"] == 4

    second = []
    resumed = _trainer(_Regressor(), tmp_path / "cut", 8, None, forward=_recording(second))
    start = resumed.restore(checkpoint)
    resumed.batches = _batches(start)
    assert resumed.train() == 8  # from the step restore() returned
    assert len(full) == 8 and first + second == full


def test_non_finite_loss_stops_with_its_name_and_step(tmp_path):
    def nan_at_step_3(model, batch, calls=[0]):  # noqa: B006
        calls[0] += 1
        losses = model(**batch)
        if calls[0] == 3:
            losses["loss_l1"] = losses["loss_l1"] * float("nan")
        return losses

    trainer = _trainer(_Regressor(), tmp_path, 10, _batches(0), forward=nan_at_step_3)
    trainer.settings.snapshot_iters = 2
    with pytest.raises(NonFiniteLossError, match="loss_l1 is nan at step 3"):
        trainer.train()
    saved = CheckpointManager(tmp_path / "ckpt").checkpoints()
    assert [step for step, _ in saved] == [2]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(saved[0][1])["model"].values())


def test_finished_run_keeps_the_last_checkpoints_and_model_final(tmp_path):
    trainer = _trainer(_seeded_model(), tmp_path, 7, _batches(0))
    trainer.settings.snapshot_iters = 2
    trainer.checkpoints.keep = 2
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["model_final.pth", "model_step6.pth", "model_step7.pth"]
    final = load_checkpoint(tmp_path / "ckpt" / "model_final.pth")
    assert final["step"] == 7
    for key, value in load_checkpoint(tmp_path / "ckpt" / "model_step7.pth")["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=0, atol=0)


class _Recorder(TrainerHook):
    def __init__(self):
        self.calls = []

    def before_train(self, trainer):
        self.calls.append("before_train")

    def before_step(self, trainer, step):
        self.calls.append(f"before_step {step}")

    def after_forward(self, trainer, step, batch, outputs):
        self.calls.append(f"after_forward {step}")
        # a distillation-style extra loss, computed from the batch and the student's outputs
        return {"loss_extra": 0.0 * outputs["loss_l2"] + batch["target"].abs().mean()}

    def after_step(self, trainer, step, losses):
        self.calls.append(f"after_step {step} extra={losses['loss_extra']:.3f}")

    def after_checkpoint(self, trainer, next_step, path):
        self.calls.append(f"after_checkpoint {next_step} {path.endswith(f'model_step{next_step}.pth')}")

    def before_evaluation(self, trainer, step):
        self.calls.append(f"before_evaluation {step}")

    def after_evaluation(self, trainer, step, metrics):
        self.calls.append(f"after_evaluation {step} {dict(metrics)}")

    def after_train(self, trainer):
        self.calls.append("after_train")

    def state_dict(self):
        return {"calls": len(self.calls)}


def test_hooks_run_at_their_points_and_add_losses(tmp_path):
    hook = _Recorder()
    trainer = _trainer(_seeded_model(), tmp_path, 2, _batches(0), hooks=[hook], eval_period=1)
    trainer.evaluate = lambda step: {"AP": float(step)}
    trainer.train()
    extra = [_batch(i, 2)["target"].abs().mean().item() for i in range(2)]
    assert hook.calls == [
        "before_train",
        "before_step 0", "after_forward 0", f"after_step 0 extra={extra[0]:.3f}",
        "before_evaluation 1", "after_evaluation 1 {'AP': 1.0}",
        "before_step 1", "after_forward 1", f"after_step 1 extra={extra[1]:.3f}",
        "after_checkpoint 2 True", "before_evaluation 2", "after_evaluation 2 {'AP': 2.0}", "after_train",
    ]
    saved = load_checkpoint(tmp_path / "ckpt" / "model_step2.pth")["hooks"]
    assert saved == {"_Recorder": {"calls": 9}}  # the state is taken before after_checkpoint


def test_bf16_amp_skips_a_non_finite_step_and_counts_it(tmp_path):
    def inf_at_pass_2(model, batch, calls=[0]):  # noqa: B006
        calls[0] += 1
        losses = model(**batch)
        if calls[0] == 2:
            losses["loss_l1"] = losses["loss_l1"] * float("inf")
        return losses

    lines = []
    model = _seeded_model()
    trainer = _trainer(model, tmp_path, 3, _batches(0), lines=lines, forward=inf_at_pass_2,
                       amp=AmpSettings(enabled=True, device_type="cpu"))
    before_step_2 = {}
    trainer.hooks.append(type("Snap", (TrainerHook,), {"before_step": lambda self, t, step: before_step_2.update(
        {k: v.clone() for k, v in model.state_dict().items()}) if step == 1 else None})())
    trainer.hooks.append(type("After", (TrainerHook,), {"after_step": lambda self, t, step, losses: (
        [torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0) for k, v in before_step_2.items()]
        if step == 1 else None)})())
    trainer.train()
    assert trainer.skipped_steps == 1
    assert any("non-finite gradients under AMP: update skipped (1 skipped so far)" in line for line in lines)
    assert load_checkpoint(tmp_path / "ckpt" / "model_step3.pth")["skipped_steps"] == 1


@pytest.mark.parametrize("kind, limit", [("value", 0.01), ("norm", 0.02)])
def test_clip_gradients_per_parameter_as_detectron2(kind, limit):
    from pydetectron.config import get_cfg, merge_cfg_from_list
    from pydetectron.solver import build_gradient_clipper

    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", kind,
                              "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", limit])
    weight, bias = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))
    weight.grad, bias.grad = torch.tensor([3.0, -0.005, 4.0]), torch.tensor([0.001])
    build_gradient_clipper(cfg)([weight, bias])
    if kind == "value":
        expected_w, expected_b = torch.tensor([0.01, -0.005, 0.01]), torch.tensor([0.001])
    else:  # each parameter's own norm: weight 5 -> 0.02, bias under the limit untouched
        expected_w, expected_b = torch.tensor([3.0, -0.005, 4.0]) * 0.02 / 5.0, torch.tensor([0.001])
    torch.testing.assert_close(weight.grad, expected_w, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(bias.grad, expected_b)


def test_inner_passes_of_an_iter_size_step_run_without_gradient_sync(tmp_path):
    """DDP's no_sync() wraps every pass but the last of a step, so gradients are all-reduced once per step."""
    import contextlib

    events = []

    @contextlib.contextmanager
    def no_sync():
        events.append("no_sync enter")
        yield
        events.append("no_sync exit")

    def forward(model, batch):
        events.append("forward")
        return model(**batch)

    trainer = _trainer(_seeded_model(), tmp_path, 2, _batches(0), iter_size=3, forward=forward)
    trainer.accumulate_context = no_sync
    trainer.train()
    one_step = ["no_sync enter", "forward", "no_sync exit"] * 2 + ["forward"]
    assert events == one_step * 2
