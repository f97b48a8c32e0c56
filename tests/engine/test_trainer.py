"""The training loop: gradient accumulation, exact resume after an interruption, NaN stop."""

import os
import signal

import pytest
import torch
from torch import nn

from pydetectron.engine.checkpoint import CheckpointManager, load_checkpoint
from pydetectron.engine.logger import TrainingLogger
from pydetectron.engine.trainer import NonFiniteLossError, Trainer, TrainLoopSettings
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


def _trainer(model, tmp_path, max_iter, batches, iter_size=1, lines=None, forward=None):
    torch.manual_seed(123)
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay=1e-4), lr=0.1, momentum=0.9)
    for group in optimizer.param_groups:
        group["lr"] = 0.1 * group["lr_scale"]
    schedule = LRSchedule("steps_with_decay", base_lr=0.1, max_iter=max_iter, steps=(0, 5), warm_up_iters=3)
    records = lines if lines is not None else []
    logger = TrainingLogger(tmp_path, max_iter=max_iter, disp_interval=1, print_fn=records.append)
    return Trainer(model, optimizer, schedule, batches, forward or (lambda m, b: m(**b)),
                   TrainLoopSettings(max_iter=max_iter, iter_size=iter_size, snapshot_iters=1000),
                   logger, CheckpointManager(tmp_path / "ckpt"), print_fn=records.append)


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
    resumed.train(start)
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
