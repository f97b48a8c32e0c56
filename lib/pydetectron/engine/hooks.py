"""Trainer hooks: code that attaches to the training loop without editing it (PreciseBN, EMA, distillation).

A hook overrides any of the methods of :class:`TrainerHook`; the trainer calls them in every process, in the
order the hooks were given. ``after_forward`` may return extra losses, which join the model's before the
total is taken: a distillation hook (``engine/distillation.py``) runs its teacher on ``batch`` there (forward
hooks it registered on the student give it the student's features) and returns ``{"loss_distill_c2": ...}``. Every
rank must return the same loss names. ``state_dict`` is saved in each checkpoint (under ``hooks``, by the
hook's ``name``) and handed back to ``load_state_dict`` on resume.
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from pydetectron.engine.trainer import Trainer


class TrainerHook:
    """The points of the loop a hook can act at; every method does nothing by default."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_train(self, trainer: Trainer) -> None: ...

    def before_step(self, trainer: Trainer, step: int) -> None: ...

    def after_forward(self, trainer: Trainer, step: int, batch: dict,
                      outputs: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor] | None:
        """Extra losses to add to the model's outputs (under autocast when AMP is on), or None."""
        return None

    def after_backward(self, trainer: Trainer, step: int) -> None:
        """After the last backward pass of `step`, before its gradients are clipped and applied (e.g. to
        average over the ranks the gradients of parameters outside the DistributedDataParallel wrapper)."""

    def after_step(self, trainer: Trainer, step: int, losses: Mapping[str, float]) -> None:
        """After the optimizer step (skipped or not) of 0-based `step`; `losses` averaged over the ranks."""

    def after_checkpoint(self, trainer: Trainer, next_step: int, path: str | None) -> None:
        """After a checkpoint of `next_step` was saved (`path` on rank 0, None on the others)."""

    def before_evaluation(self, trainer: Trainer, step: int) -> None: ...

    def after_evaluation(self, trainer: Trainer, step: int, metrics: Mapping[str, float] | None) -> None:
        """`metrics` on rank 0 (the others get None)."""

    def after_train(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None: ...


BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that normalise with batch statistics in training (SyncBN included)."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats and m.training]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[dict], run: Callable[[dict], object], num_iter: int) -> int:
    """Set every BN layer's running mean / var to their true average over `num_iter` batches (fvcore's
    ``update_bn_stats``, which detectron2's PreciseBN uses): each batch's statistics weigh equally, instead of
    the exponential average with momentum the training kept. `run(batch)` runs `model` in training mode.
    Returns the number of layers updated."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    momenta = [bn.momentum for bn in layers]
    means = [torch.zeros_like(bn.running_mean) for bn in layers]
    variances = [torch.zeros_like(bn.running_var) for bn in layers]
    for bn in layers:
        bn.momentum = 1.0  # the running buffers then hold this batch's statistics only
    done = 0
    try:
        for done, batch in enumerate(itertools.islice(batches, num_iter), start=1):
            run(batch)
            for i, bn in enumerate(layers):
                means[i] += (bn.running_mean - means[i]) / done
                variances[i] += (bn.running_var - variances[i]) / done
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
    if done != num_iter:
        raise RuntimeError(f"PreciseBN needed {num_iter} batches but the data gave {done}")
    for bn, mean, var in zip(layers, means, variances):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return len(layers)


class PreciseBN(TrainerHook):
    """TEST.PRECISE_BN: before each evaluation, BN statistics recomputed over NUM_ITER fresh training batches.

    `make_batches(step)` returns a new batch iterator (its own seed, so the training stream is untouched);
    `run(batch)` is a training-mode forward of the bare model (not the DDP wrapper, whose buffer broadcast
    would overwrite the statistics). Every rank runs it, so SyncBN layers stay in step."""

    def __init__(self, model: nn.Module, make_batches: Callable[[int], Iterator[dict]],
                 run: Callable[[dict], object], num_iter: int, print_fn: Callable[[str], None] = print):
        self.model = model
        self.make_batches = make_batches
        self.run = run
        self.num_iter = num_iter
        self.print = print_fn

    def before_evaluation(self, trainer: Trainer, step: int) -> None:
        was_training = self.model.training
        self.model.train()
        with torch.random.fork_rng(devices=[]):  # RoI sampling here must not shift the training's draws
            updated = update_bn_stats(self.model, self.make_batches(step), self.run, self.num_iter)
        self.model.train(was_training)
        if updated:
            self.print(f"PreciseBN: statistics of {updated} BatchNorm layers recomputed over {self.num_iter} batches")
        else:
            self.print("PreciseBN: the model has no BatchNorm layer in training mode; nothing recomputed")


class EMA(TrainerHook):
    """An exponential moving average of the weights (``decay`` per step), evaluated in place of the trained
    weights and saved in the checkpoints. The trained weights are put back after each evaluation."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.average = copy.deepcopy(model.state_dict())
        self._trained: dict | None = None

    @torch.no_grad()
    def after_step(self, trainer: Trainer, step: int, losses: Mapping[str, float]) -> None:
        for key, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                self.average[key].mul_(self.decay).add_(value, alpha=1.0 - self.decay)
            else:
                self.average[key].copy_(value)

    def before_evaluation(self, trainer: Trainer, step: int) -> None:
        self._trained = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(self.average)

    def after_evaluation(self, trainer: Trainer, step: int, metrics: Mapping[str, float] | None) -> None:
        if self._trained is not None:
            self.model.load_state_dict(self._trained)
            self._trained = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "average": self.average}

    def load_state_dict(self, state: Mapping) -> None:
        self.average = {k: v.clone() for k, v in state["average"].items()}
