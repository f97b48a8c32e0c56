"""The training loop: iter_size accumulation, lr schedule, AMP, gradient clipping, checks, snapshots, hooks,
graceful interruption, in one process or in each process of a distributed run.

One *step* is one optimizer update made of `iter_size` forward/backward passes, each on one minibatch from
the loader; losses are divided by `iter_size` so the gradient equals one pass over `iter_size` times the
images. Under DistributedDataParallel the inner passes run in `accumulate_context` (DDP's ``no_sync``): the
gradients are averaged over the ranks once, in the last pass. A checkpoint stores the next step to run, the
data stream's position and every rank's random generators, so a resumed run sees exactly the images and random
draws an uninterrupted one would.

Distributed: every rank runs this loop; the losses are averaged over the ranks (one all_reduce per step, which
also carries a stop request that reached any rank, so all stop at the same step); the checkpoint state is
gathered from all ranks and only the process given a `CheckpointManager` (rank 0) writes it.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from pydetectron.engine.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from pydetectron.engine.hooks import TrainerHook
from pydetectron.engine.logger import TrainingLogger
from pydetectron.modeling.detector import total_loss
from pydetectron.solver import GradientClipper, LRSchedule, current_learning_rate, set_learning_rate
from pydetectron.utils.distributed import (
    all_gather_object,
    average_scalars,
    collective_device,
    get_rank,
    get_world_size,
)

STOP_KEY = "_stop_requested"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; raised before the bad gradient touches the weights or a checkpoint."""


@dataclass
class AmpSettings:
    """SOLVER.AMP: autocast with float16 and a GradScaler on CUDA, bfloat16 (no scaler needed) on the CPU."""

    enabled: bool = False
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.device_type == "cuda" else torch.bfloat16

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cuda") if self.enabled and self.device_type == "cuda" else None


@dataclass
class TrainLoopSettings:
    max_iter: int
    iter_size: int = 1
    snapshot_iters: int = 20000
    scale_momentum: bool = True
    scale_momentum_threshold: float = 1.1
    lr_in_momentum: bool = True  # SOLVER.LR_IN_MOMENTUM: Caffe2's SGD (Detectron); False = torch's (detectron2)
    log_lr_change_threshold: float = 1.1
    eval_period: int = 0
    save_checkpoints: bool = True  # every rank must agree (saving gathers every rank's random state)
    amp: AmpSettings = field(default_factory=AmpSettings)
    clip_gradients: GradientClipper | None = None  # SOLVER.CLIP_GRADIENTS (solver.build_gradient_clipper)
    extra_state: dict = field(default_factory=dict)  # saved in every checkpoint (cfg, train size, batch size)


def check_finite(losses: Mapping[str, torch.Tensor], step: int) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(f"loss {name} is {value.item()} at step {step + 1}; training stopped "
                                     "(no checkpoint was written with it)")


def gradients_are_finite(parameters: Iterable[nn.Parameter]) -> bool:
    grads = [p.grad for p in parameters if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


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
    """Runs steps `start_step` .. `max_iter - 1` of `model` on `batches`.

    `forward(batch)` maps a minibatch dict to the model's output dict (losses ``loss*``, plus figures such as
    accuracy_cls that are logged, not optimised); it is where the batch is split for the DataParallel or
    handed to the DistributedDataParallel wrapper. `model` is the bare module whose state is checkpointed.
    `accumulate_context()` (DDP's ``no_sync``) wraps the inner passes of an iter_size step.
    `evaluate(step)` (optional) runs on every rank and returns metrics on rank 0 (None elsewhere), every
    `eval_period` steps and at the end. `hooks` attach at the points of :class:`TrainerHook`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        batches: Iterable[dict] | None,
        forward: Callable[[dict], Mapping[str, torch.Tensor]],
        settings: TrainLoopSettings,
        logger: TrainingLogger,
        checkpoints: CheckpointManager | None = None,
        evaluate: Callable[[int], Mapping[str, float] | None] | None = None,
        print_fn: Callable[[str], None] = print,
        hooks: Sequence[TrainerHook] = (),
        accumulate_context: Callable[[], ContextManager] | None = None,
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
        self.hooks = list(hooks)
        names = [hook.name for hook in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"hook names must be unique (they key the checkpoint's hook states): {names}")
        self.accumulate_context = accumulate_context or contextlib.nullcontext
        self.scaler = settings.amp.grad_scaler()
        self.start_step = 0
        self.skipped_steps = 0  # AMP steps whose non-finite gradients were not applied

    # ------------------------------------------------------------------------------------- checkpoints
    def state(self, next_step: int) -> dict:
        """The checkpoint of `next_step`; a collective in a distributed run (every rank's RNG is gathered)."""
        state = {
            "step": next_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": current_learning_rate(self.optimizer),
            "rng_per_rank": all_gather_object(capture_rng_state()),
            "skipped_steps": self.skipped_steps,
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
            **self.settings.extra_state,
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        if hasattr(self.batches, "state_dict"):
            state["data"] = self.batches.state_dict()
        return state

    def restore(self, checkpoint: Mapping) -> int:
        """Load model, optimizer, hook, scaler and this rank's RNG state from a checkpoint written by `save`;
        returns its next step, which `train()` then starts from."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        rng = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
        if len(rng) == get_world_size():
            restore_rng_state(rng[get_rank()])
        else:
            self.print(f"The checkpoint was written by {len(rng)} processes and this run has {get_world_size()}: "
                       "random generators start afresh (the run continues, but not bit for bit)")
        if self.scaler is not None and "grad_scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["grad_scaler"])
        saved_hooks = checkpoint.get("hooks", {})
        for hook in self.hooks:
            if hook.name in saved_hooks:
                hook.load_state_dict(saved_hooks[hook.name])
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self.start_step = int(checkpoint["step"])
        return self.start_step

    def save(self, next_step: int, final: bool = False) -> None:
        if not self.settings.save_checkpoints:
            return
        state = self.state(next_step)
        path = None
        if self.checkpoints is not None:
            path = self.checkpoints.save(next_step, state, final=final)
            self.print(f"Saved checkpoint {path}" + (f" (and {self.checkpoints.final_path()})" if final else ""))
        for hook in self.hooks:
            hook.after_checkpoint(self, next_step, str(path) if path else None)

    # ------------------------------------------------------------------------------------------ steps
    def _update_lr(self, step: int) -> float:
        new_lr = self.schedule(step)
        old_lr = current_learning_rate(self.optimizer)
        if old_lr > 0 and new_lr > 0 and max(new_lr / old_lr, old_lr / new_lr) > self.settings.log_lr_change_threshold:
            self.print(f"Changing learning rate {old_lr:.6f} -> {new_lr:.6f} at step {step + 1}")
        set_learning_rate(self.optimizer, new_lr, self.settings.scale_momentum, self.settings.scale_momentum_threshold,
                          self.settings.lr_in_momentum)
        return new_lr

    def _outputs(self, step: int, batch: dict) -> dict[str, torch.Tensor]:
        """The model's outputs plus the hooks' extra losses, losses in float32."""
        with self.settings.amp.autocast():
            outputs = dict(self.forward(batch))
            for hook in self.hooks:
                outputs.update(hook.after_forward(self, step, batch, outputs) or {})
        return {name: value.float() for name, value in outputs.items()}

    def _one_step(self, step: int, batches: Iterator[dict]) -> tuple[dict[str, float], float, bool]:
        """One optimizer update; returns (losses summed over the passes, data time, whether it was applied)."""
        iter_size = self.settings.iter_size
        amp = self.settings.amp.enabled
        self.optimizer.zero_grad(set_to_none=True)
        summed: dict[str, float] = {}
        data_time = 0.0
        for inner in range(iter_size):
            tic = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - tic
            sync = inner == iter_size - 1
            with contextlib.nullcontext() if sync else self.accumulate_context():
                outputs = self._outputs(step, batch)
                if not amp:
                    check_finite(outputs, step)
                total = total_loss(outputs) / iter_size
                (self.scaler.scale(total) if self.scaler is not None else total).backward()
            for name, value in {"loss": total * iter_size, **outputs}.items():
                summed[name] = summed.get(name, 0.0) + float(value.detach()) / iter_size
        for hook in self.hooks:
            hook.after_backward(self, step)
        return summed, data_time, self._apply_gradients(step)

    def _apply_gradients(self, step: int) -> bool:
        """Clip and step; under AMP a step with non-finite gradients is skipped (as GradScaler skips it),
        counted and logged. The gradients are the same on every rank, so every rank decides alike."""
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.settings.clip_gradients is not None:
            self.settings.clip_gradients(parameters)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale
        elif self.settings.amp.enabled and not gradients_are_finite(parameters):
            applied = False
        else:
            self.optimizer.step()
            applied = True
        if not applied:
            self.skipped_steps += 1
            self.print(f"[step {step + 1}] non-finite gradients under AMP: update skipped "
                       f"({self.skipped_steps} skipped so far)")
        return applied

    # ------------------------------------------------------------------------------------------ loop
    def _evaluate(self, step: int) -> None:
        for hook in self.hooks:
            hook.before_evaluation(self, step)
        with torch.random.fork_rng(devices=[]):  # evaluation draws nothing from the training's stream
            metrics = self.evaluate(step)
        if metrics is not None:
            self.logger.log_eval(step, metrics)
        for hook in self.hooks:
            hook.after_evaluation(self, step, metrics)
        self.model.train()

    def train(self, start_step: int | None = None) -> int:
        """Train from `start_step` (default: the step `restore()` returned, else 0) to `max_iter`, or until
        SIGINT/SIGTERM; returns the next step to run."""
        start_step = self.start_step if start_step is None else start_step
        self.model.train()
        batches = iter(self.batches)
        max_iter = self.settings.max_iter
        eval_period = self.settings.eval_period
        next_step = start_step
        for hook in self.hooks:
            hook.before_train(self)
        device = collective_device()
        with _StopRequest() as stop:
            for step in range(start_step, max_iter):
                tic = time.perf_counter()
                for hook in self.hooks:
                    hook.before_step(self, step)
                lr = self._update_lr(step)
                losses, data_time, applied = self._one_step(step, batches)
                next_step = step + 1
                averaged = average_scalars({**losses, STOP_KEY: float(stop.signal_name is not None)}, device)
                stop_requested = averaged.pop(STOP_KEY) > 0
                for hook in self.hooks:
                    hook.after_step(self, step, averaged)
                if self.settings.amp.enabled:
                    averaged["amp_skipped_steps"] = float(self.skipped_steps)
                self.logger.log_step(step, averaged, lr, time.perf_counter() - tic, data_time)
                if next_step % self.settings.snapshot_iters == 0 and next_step < max_iter:
                    self.save(next_step)
                if self.evaluate and eval_period and next_step % eval_period == 0 and next_step < max_iter:
                    self._evaluate(next_step)
                if stop_requested:
                    self.print(f"{stop.signal_name or 'A stop request on another rank'} received: saving step "
                               f"{next_step} and stopping")
                    self.save(next_step)
                    return next_step
        if next_step > start_step:
            self.save(next_step, final=next_step == max_iter)
        if self.evaluate:
            self._evaluate(next_step)
        for hook in self.hooks:
            hook.after_train(self)
        return next_step
