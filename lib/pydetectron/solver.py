"""Learning-rate policy, schedule auto-scaling and optimizers, with Detectron's exact rules.

Momentum SGD. Caffe2 keeps the learning rate inside its momentum buffer (v = m v + lr g; w -= v) and Detectron
rescales that buffer by new_lr / old_lr when the lr jumps by more than `SCALE_MOMENTUM_THRESHOLD`. PyTorch's
SGD keeps lr outside (v = m v + g; w -= lr v), which equals Caffe2 *with* that correction applied at every
change. So `set_learning_rate` leaves the PyTorch buffer alone when Detectron would correct, and scales it by
old_lr / new_lr when Detectron would not (small warm-up steps, or `SCALE_MOMENTUM: False`): the trajectory is
then Caffe2's, step for step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pydetectron.config.checks import LAYER_DECAY_GROUPS, canonical_optimizer

LR_POLICIES = ("step", "steps_with_decay", "steps_with_lrs", "cosine_decay")
_NORM_TYPES = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@dataclass(frozen=True)
class LRSchedule:
    """Detectron's `lr_policy.get_lr_at_iter`, from plain values (see `from_cfg`)."""

    policy: str
    base_lr: float
    max_iter: int
    gamma: float = 0.1
    step_size: int = 30000
    steps: Sequence[int] = (0,)
    lrs: Sequence[float] = ()
    warm_up_iters: int = 0
    warm_up_factor: float = 1.0 / 3.0
    warm_up_method: str = "linear"

    def __post_init__(self) -> None:
        if self.policy not in LR_POLICIES:
            raise ValueError(f"SOLVER.LR_POLICY {self.policy!r} is unknown; valid: {', '.join(LR_POLICIES)}")
        if self.warm_up_method not in ("linear", "constant"):
            raise ValueError(f"SOLVER.WARM_UP_METHOD {self.warm_up_method!r} is unknown; valid: linear, constant")
        if self.policy.startswith("steps_with") and (not self.steps or self.steps[0] != 0):
            raise ValueError(f"SOLVER.STEPS must start at 0 for {self.policy!r}, got {list(self.steps)}")
        if self.policy == "steps_with_lrs" and len(self.lrs) != len(self.steps):
            raise ValueError(f"SOLVER.LRS {list(self.lrs)} needs one value per SOLVER.STEPS {list(self.steps)}")

    @classmethod
    def from_cfg(cls, cfg: Any) -> LRSchedule:
        s = cfg.SOLVER
        return cls(
            policy=s.LR_POLICY, base_lr=s.BASE_LR, max_iter=s.MAX_ITER, gamma=s.GAMMA, step_size=s.STEP_SIZE,
            steps=tuple(s.STEPS), lrs=tuple(s.LRS), warm_up_iters=s.WARM_UP_ITERS,
            warm_up_factor=s.WARM_UP_FACTOR, warm_up_method=s.WARM_UP_METHOD,
        )

    def step_index(self, it: int) -> int:
        """Index of the last entry of `steps` that `it` has reached (Detectron's get_step_index)."""
        return sum(1 for step in self.steps if step <= it) - 1

    def base_lr_at(self, it: int) -> float:
        if self.policy == "step":
            return self.base_lr * self.gamma ** (it // self.step_size)
        if self.policy == "steps_with_decay":
            return self.base_lr * self.gamma ** self.step_index(it)
        if self.policy == "steps_with_lrs":
            return self.lrs[self.step_index(it)]
        return self.base_lr * 0.5 * (math.cos(math.pi * it / self.max_iter) + 1.0)  # cosine_decay

    def __call__(self, it: int) -> float:
        """Learning rate at optimizer step `it` (0-based), warm-up included."""
        lr = self.base_lr_at(it)
        if it < self.warm_up_iters:
            if self.warm_up_method == "constant":
                lr *= self.warm_up_factor
            else:
                alpha = it / self.warm_up_iters
                lr *= self.warm_up_factor * (1 - alpha) + alpha
        return lr


@dataclass(frozen=True)
class ScheduleScaling:
    """Detectron.pytorch's adaptation of a schedule written for one batch size to another."""

    base_lr: float
    steps: list[int]
    max_iter: int
    num_gpus: int
    ims_per_batch: int
    summary: str


def scale_schedule(
    base_lr: float,
    steps: Sequence[int],
    max_iter: int,
    cfg_num_gpus: int,
    cfg_ims_per_batch: int,
    num_gpus: int,
    batch_size: int | None = None,
    iter_size: int = 1,
) -> ScheduleScaling:
    """Scale lr with the batch size and STEPS / MAX_ITER inversely with the effective batch size.

    The config's schedule was written for `cfg_num_gpus x cfg_ims_per_batch` images per step. We run
    `batch_size` images per forward pass on `num_gpus` devices and accumulate `iter_size` passes per step.
    lr follows `batch_size` (accumulated gradients are averaged), steps follow `batch_size x iter_size`.
    """
    original = cfg_num_gpus * cfg_ims_per_batch
    batch_size = original if batch_size is None else batch_size
    if num_gpus < 1 or batch_size < 1 or iter_size < 1:
        raise ValueError(f"need num_gpus, batch size and iter_size >= 1, got {num_gpus}, {batch_size}, {iter_size}")
    if batch_size % num_gpus:
        raise ValueError(f"batch size {batch_size} is not divisible by the number of devices {num_gpus}")
    effective = batch_size * iter_size
    step_scale = original / effective
    new = ScheduleScaling(
        base_lr=base_lr * batch_size / original,
        steps=[int(s * step_scale + 0.5) for s in steps],
        max_iter=int(max_iter * step_scale + 0.5),
        num_gpus=num_gpus,
        ims_per_batch=batch_size // num_gpus,
        summary="",
    )
    summary = "\n".join([
        f"effective batch size = batch size x iter_size = {batch_size} x {iter_size} = {effective}",
        "Adaptive config changes:",
        f"    effective batch size: {original} --> {effective}",
        f"    NUM_GPUS:             {cfg_num_gpus} --> {num_gpus}",
        f"    IMS_PER_BATCH:        {cfg_ims_per_batch} --> {new.ims_per_batch}",
        f"    BASE_LR:              {base_lr} --> {new.base_lr}  (linear in batch size)",
        f"    STEPS:                {list(steps)} --> {new.steps}",
        f"    MAX_ITER:             {max_iter} --> {new.max_iter}",
    ])
    return ScheduleScaling(new.base_lr, new.steps, new.max_iter, num_gpus, new.ims_per_batch, summary)


def _norm_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


_RES_BLOCK = re.compile(r"(?:^|\.)res(\d)\.(\d+)\.")
_STEM = re.compile(r"(?:^|\.)(stem|conv1|res1|res_conv1)[._]")


def _per_block_layers(names: Sequence[str]) -> tuple[dict[str, int], int]:
    """Stem 0, then one layer per residual block in (stage, block) order; everything else one above."""
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for n in names if (m := _RES_BLOCK.search(n))})
    depth_of_block = {block: i + 1 for i, block in enumerate(blocks)}
    top = len(blocks) + 1
    layers = {}
    for name in names:
        match = _RES_BLOCK.search(name)
        if match:
            layers[name] = depth_of_block[(int(match.group(1)), int(match.group(2)))]
        else:
            layers[name] = 0 if _STEM.search(name) else top
    return layers, top


def _spark_layers(names: Sequence[str]) -> tuple[dict[str, int], int]:
    """SparK's ``lr_factor_func`` (downstream_d2/lr_decay.py): stem 0, res2 1, res3 2, res4 ``3 + block // 3``,
    res5 (the body's, or a C4 head's) N, everything else N + 1, where N follows res4's last group (5 for
    ResNet-50, 11 for ResNet-101, as SparK hard-codes them)."""
    res4_blocks = [int(m.group(2)) for n in names if (m := _RES_BLOCK.search(n)) and m.group(1) == "4"]
    res5 = 4 + max(res4_blocks, default=0) // 3
    layers = {}
    for name in names:
        match = _RES_BLOCK.search(name)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            layers[name] = {2: 1, 3: 2, 4: 3 + block // 3}.get(stage, res5)
        else:
            layers[name] = 0 if re.search(r"(?:^|\.)stem\.", name) else res5 + 1
    return layers, res5 + 1


def layer_decay_factors(names: Iterable[str], decay: float, grouping: str = "spark") -> dict[str, float]:
    """lr factor of each parameter name for layer-wise lr decay: ``decay ** (top - layer)``.

    `grouping` says what a layer is: 'spark' (SparK's: stem; res2; res3; res4 in groups of three blocks; res5;
    everything else, FPN and heads, at full lr) or 'per_block' (stem, then one layer per residual block).
    Residual blocks are recognised by ``res<stage>.<block>.`` in the name, the stem by ``stem.``.
    """
    if grouping not in LAYER_DECAY_GROUPS:
        raise ValueError(f"SOLVER.LAYER_WISE_LR_DECAY_GROUPS {grouping!r} is unknown; valid: "
                         f"{', '.join(LAYER_DECAY_GROUPS)}")
    names = list(names)
    layers, top = (_spark_layers if grouping == "spark" else _per_block_layers)(names)
    return {name: decay ** (top - layer) for name, layer in layers.items()}


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    bias_lr_factor: float = 2.0,
    bias_weight_decay: bool = False,
    layer_decay: float = 1.0,
    layer_grouping: str = "spark",
) -> list[dict]:
    """Optimizer groups with Detectron's rules; each group carries an `lr_scale` applied by set_learning_rate.

    Trainable parameters only (frozen stages and AffineChannel layers have requires_grad False). Biases get
    `bias_lr_factor` x lr and no weight decay (unless `bias_weight_decay`); normalisation weights and biases
    (GN, trainable BN) get `weight_decay_norm` and 1x lr (Detectron's WEIGHT_DECAY_GN). With `layer_decay` < 1,
    lr is also multiplied by :func:`layer_decay_factors` (`layer_grouping`).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"SOLVER.LAYER_WISE_LR_DECAY must be in (0, 1], got {layer_decay}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norm_names = _norm_parameter_names(model)
    factors = layer_decay_factors((n for n, _ in named), layer_decay, layer_grouping)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        if name in norm_names:
            scale, decay = 1.0, weight_decay_norm
        elif name.endswith("bias"):
            scale, decay = bias_lr_factor, (weight_decay if bias_weight_decay else 0.0)
        else:
            scale, decay = 1.0, weight_decay
        scale *= factors[name]
        group = groups.setdefault((scale, decay), {"params": [], "names": [], "lr_scale": scale,
                                                   "weight_decay": decay})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def _merge_groups(groups: Sequence[dict], more: Sequence[dict], prefix: str) -> list[dict]:
    """`groups` with `more`'s parameters added to the group of the same (lr_scale, weight_decay), names prefixed."""
    merged = {(g["lr_scale"], g["weight_decay"]): g for g in groups}
    for group in more:
        target = merged.setdefault((group["lr_scale"], group["weight_decay"]),
                                   {"params": [], "names": [], "lr_scale": group["lr_scale"],
                                    "weight_decay": group["weight_decay"]})
        target["params"] += group["params"]
        target["names"] += [f"{prefix}.{n}" for n in group["names"]]
    return list(merged.values())


def build_optimizer(model: nn.Module, cfg: Any, optimizer_name: str | None = None,
                    extra: Mapping[str, nn.Module] | None = None) -> torch.optim.Optimizer:
    """SOLVER.TYPE (SGD as Detectron, Adam, AdamW; any case) over `parameter_groups`, lr set to step 0 of the
    schedule. `extra` modules (a distillation method's norms and adapters, by name) train along with the model
    under the same rules (no layer-wise decay: they are not backbone layers)."""
    s = cfg.SOLVER
    name = canonical_optimizer(optimizer_name or s.TYPE)
    rules = dict(
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_GN,
        bias_lr_factor=2.0 if (s.BIAS_DOUBLE_LR and name == "SGD") else 1.0,
        bias_weight_decay=s.BIAS_WEIGHT_DECAY,
    )
    groups = parameter_groups(model, **rules, layer_decay=s.LAYER_WISE_LR_DECAY,
                              layer_grouping=s.LAYER_WISE_LR_DECAY_GROUPS)
    for prefix, module in (extra or {}).items():
        groups = _merge_groups(groups, parameter_groups(module, **rules), prefix)
    if not groups:
        raise ValueError("the model has no trainable parameters (check RESNETS.FREEZE_AT and the norm layers)")
    lr = LRSchedule.from_cfg(cfg)(0)
    # Fused kernels update all tensors in one pass (3x faster than the per-tensor loop on CPU), same numbers.
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if name == "SGD":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=s.MOMENTUM, fused=fused)
    elif name == "Adam":
        optimizer = torch.optim.Adam(groups, lr=lr, betas=tuple(s.BETAS), fused=fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(s.BETAS), fused=fused)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return optimizer


def current_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The unscaled lr the groups were last set from (each group's lr / lr_scale)."""
    group = optimizer.param_groups[0]
    if "lr_scale" not in group:
        raise ValueError("optimizer was not built by pydetectron.solver.build_optimizer (no lr_scale)")
    return group["lr"] / group["lr_scale"]


def set_learning_rate(
    optimizer: torch.optim.Optimizer,
    new_lr: float,
    scale_momentum: bool = True,
    scale_momentum_threshold: float = 1.1,
    lr_in_momentum: bool = True,
) -> None:
    """Set every group's lr to new_lr x its lr_scale, keeping SGD's trajectory equal to Caffe2's.

    See the module docstring: the momentum buffer is rescaled by old/new exactly when Detectron would *not*
    apply its own momentum correction. ``lr_in_momentum`` False (SOLVER.LR_IN_MOMENTUM, detectron2's
    torch.optim.SGD): the buffer is never touched.
    """
    old_lr = current_learning_rate(optimizer)
    if new_lr == old_lr:
        return
    if not lr_in_momentum:
        for group in optimizer.param_groups:
            group["lr"] = new_lr * group["lr_scale"]
        return
    ratio = max(new_lr / max(old_lr, 1e-12), old_lr / max(new_lr, 1e-12))
    caffe2_corrects = scale_momentum and old_lr > 1e-7 and ratio > scale_momentum_threshold
    if isinstance(optimizer, torch.optim.SGD) and not caffe2_corrects and new_lr > 0:
        for group in optimizer.param_groups:
            for param in group["params"]:
                buffer = optimizer.state.get(param, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.mul_(old_lr / new_lr)
    for group in optimizer.param_groups:
        group["lr"] = new_lr * group["lr_scale"]


GradientClipper = Callable[[Iterable[nn.Parameter]], None]


def build_gradient_clipper(cfg: Any) -> GradientClipper | None:
    """SOLVER.CLIP_GRADIENTS as detectron2 applies it (``maybe_add_gradient_clipping``): each parameter's gradient
    on its own, before the optimizer step: 'value' clamps every element to [-CLIP_VALUE, CLIP_VALUE], 'norm'
    rescales a gradient whose NORM_TYPE-norm exceeds CLIP_VALUE. None when disabled."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    value, norm_type, kind = float(clip.CLIP_VALUE), float(clip.NORM_TYPE), clip.CLIP_TYPE
    if kind not in ("value", "norm"):
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {kind!r} is unknown; valid: 'value', 'norm'")

    def clip_each(parameters: Iterable[nn.Parameter]) -> None:
        for p in parameters:
            if p.grad is None:
                continue
            if kind == "value":
                torch.nn.utils.clip_grad_value_(p, value)
            else:
                torch.nn.utils.clip_grad_norm_(p, value, norm_type)

    return clip_each
