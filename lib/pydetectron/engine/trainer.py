"""The training loop: iter_size accumulation, lr schedule, checks, snapshots, graceful interruption.

One *step* is one optimizer update made of `iter_size` forward/backward passes, each on one minibatch from
the loader; losses are divided by `iter_size` so the gradient equals one pass over `iter_size` times the
images. A checkpoint stores the next step to run; the loader is rebuilt at `step * iter_size` minibatches, so
a resumed run sees exactly the images and random draws an uninterrupted one would.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from pydetectron.engine.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from pydetectron.engine.logger import TrainingLogger
from pydetectron.modeling.detector import total_loss
from pydetectron.solver import LRSchedule, current_learning_rate, set_learning_rate


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; raised before the bad gradient touches the weights or a checkpoint."""


@dataclass
class TrainLoopSettings:
    max_iter: int
    iter_size: int = 1
    snapshot_iters: int = 20000
    scale_momentum: bool = True
    scale_momentum_threshold: float = 1.1
    log_lr_change_threshold: float = 1.1
    eval_period: int = 0
    extra_state: dict = field(default_factory=dict)  # saved in every checkpoint (cfg, train size, batch size)


def check_finite(losses: Mapping[str, torch.Tensor], step: int) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(f"loss {name} is {value.item()} at step {step + 1}; training stopped "
                                     "(no checkpoint was written with it)")


class _StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (then it saves and exits)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their current handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs steps `start_step` .. `max_iter - 1` of `model` (returning a dict of losses, plus figures such as
    accuracy_cls that are logged, not optimised) on `batches`.

    `forward` maps a minibatch dict to the model's output dict (e.g. splitting it for the DataParallel).
    `evaluate(step)` (optional) returns metrics to log every `eval_period` steps and at the end.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        batches: Iterable[dict],
        forward: Callable[[nn.Module, dict], Mapping[str, torch.Tensor]],
        settings: TrainLoopSettings,
        logger: TrainingLogger,
        checkpoints: CheckpointManager | None = None,
        evaluate: Callable[[int], Mapping[str, float]] | None = None,
        print_fn: Callable[[str], None] = print,
    ):
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.batches = batches
        self.forward = forward
        self.settings = settings
        self.logger = logger
        self.checkpoints = checkpoints
        self.evaluate = evaluate
        self.print = print_fn

    def state(self, next_step: int) -> dict:
        return {
            "step": next_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": current_learning_rate(self.optimizer),
            "rng": capture_rng_state(),
            **self.settings.extra_state,
        }

    def restore(self, checkpoint: Mapping) -> int:
        """Load model, optimizer and RNG state from a checkpoint written by `save`; returns its next step."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint["rng"])
        return int(checkpoint["step"])

    def save(self, next_step: int) -> None:
        if self.checkpoints is not None:
            path = self.checkpoints.save(next_step, self.state(next_step))
            self.print(f"Saved checkpoint {path}")

    def _update_lr(self, step: int) -> float:
        new_lr = self.schedule(step)
        old_lr = current_learning_rate(self.optimizer)
        if old_lr > 0 and new_lr > 0 and max(new_lr / old_lr, old_lr / new_lr) > self.settings.log_lr_change_threshold:
            self.print(f"Changing learning rate {old_lr:.6f} -> {new_lr:.6f} at step {step + 1}")
        set_learning_rate(self.optimizer, new_lr, self.settings.scale_momentum, self.settings.scale_momentum_threshold)
        return new_lr

    def _one_step(self, step: int, batches: Iterator[dict]) -> tuple[dict[str, float], float]:
        iter_size = self.settings.iter_size
        self.optimizer.zero_grad(set_to_none=True)
        summed: dict[str, float] = {}
        data_time = 0.0
        for _ in range(iter_size):
            tic = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - tic
            losses = dict(self.forward(self.model, batch))
            check_finite(losses, step)
            total = total_loss(losses)
            (total / iter_size).backward()
            for name, value in {"loss": total, **losses}.items():
                summed[name] = summed.get(name, 0.0) + float(value.detach()) / iter_size
        self.optimizer.step()
        return summed, data_time

    def train(self, start_step: int = 0) -> int:
        """Train to `max_iter`, or until SIGINT/SIGTERM; returns the next step to run."""
        self.model.train()
        batches = iter(self.batches)
        max_iter = self.settings.max_iter
        next_step = start_step
        with _StopRequest() as stop:
            for step in range(start_step, max_iter):
                tic = time.perf_counter()
                lr = self._update_lr(step)
                losses, data_time = self._one_step(step, batches)
                next_step = step + 1
                self.logger.log_step(step, losses, lr, time.perf_counter() - tic, data_time)
                if next_step % self.settings.snapshot_iters == 0 and next_step < max_iter:
                    self.save(next_step)
                if self.evaluate and self.settings.eval_period and next_step % self.settings.eval_period == 0:
                    self.logger.log_eval(next_step, self.evaluate(next_step))
                    self.model.train()
                if stop.signal_name:
                    self.print(f"{stop.signal_name} received: saving step {next_step} and stopping")
                    self.save(next_step)
                    return next_step
        if next_step > start_step:
            self.save(next_step)
        if self.evaluate and (not self.settings.eval_period or next_step % self.settings.eval_period):
            self.logger.log_eval(next_step, self.evaluate(next_step))
        return next_step
