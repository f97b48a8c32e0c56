"""Teacher/student training (``DISTILL.*``) attached to the trainer as one hook, never a fork of its loop.

``build_distillation(cfg, student, ...)`` builds the teacher from its own cfg file (``DISTILL.TEACHER_CFG``
merged onto the defaults and checked), loads its weights (``DISTILL.TEACHER_WEIGHTS``, or the teacher part of
a merged ``TRAIN.WEIGHTS`` whose student part the student loads: ``student_weights_part``), freezes it (no
parameter requires a gradient; eval mode, which the trainer's ``model.train()`` never reaches since the teacher
is not part of the student), and builds the method (``pydetectron.distill``). The hook then:

- ``before_step``: refreshes MGD's matching when ``matching_due`` says so, from ``batches_per_matching``
  batches read in eval mode without gradient, as MGD's ``mgd_update_flow``. They come from a second loader
  seeded by the step (as PreciseBN's), not from the training stream MGD reads them from, so that the training
  batches and a resumed run are exactly those of an uninterrupted one;
- ``after_forward``: runs the teacher's ResNet body without gradient on exactly the tensor the student just
  read (``batch['data']`` on the student's device) and returns the method's ``loss_distill_c<level>``, which
  the trainer adds to the student's losses, logs and draws like the others;
- ``after_backward``: in a distributed run, averages the method's gradients over the ranks (its parameters
  live outside the DistributedDataParallel wrapper, which averages only the student's);
- ``state_dict``: the method's parameters and buffers (MGD's margins and matching) go into every checkpoint.
  The teacher's weights do not: they never change, and a resumed run rebuilds the teacher from the cfg.

The method's parameters train with the student: ``solver.build_optimizer(model, cfg, extra={"distill":
method})`` gives them the student's lr / weight-decay rules. Only the teacher's and the student's ResNet
bodies run for the method (C2..C5 are all it reads), the teacher's FPN and head never do.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from pydetectron.config import assert_and_infer_cfg, get_cfg
from pydetectron.config.merge import ConfigError, merge_cfg_from_file
from pydetectron.distill import DistillMethod, PreReluCapture, build_distill_method, resnet_body_of
from pydetectron.engine.hooks import TrainerHook
from pydetectron.modeling.detector import build_detector
from pydetectron.parallel import to_device
from pydetectron.utils.distributed import broadcast_object, get_world_size
from pydetectron.weights import load_pretrained
from pydetectron.weights.convert import DISTILLATION_HOOK
from pydetectron.weights.download import cached_weights_path

Print = Callable[[str], None]
# What the teacher's and the student's cfgs must agree on: both bodies read the same input tensor.
SHARED_INPUT_KEYS = ("PIXEL_MEANS", "PIXEL_STDS", "MODEL.INPUT_COLOR_ORDER")


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node.tolist() if hasattr(node, "tolist") else node


def student_weights_part(cfg) -> str | None:
    """'student' when the student's initial weights are the student part of a merged ``TRAIN.WEIGHTS`` (a
    distillation whose ``DISTILL.TEACHER_WEIGHTS`` is empty), else None."""
    return "student" if cfg.DISTILL.METHOD and not cfg.DISTILL.TEACHER_WEIGHTS else None


def teacher_cfg(cfg):
    """``DISTILL.TEACHER_CFG`` merged onto the defaults, checked and frozen. The teacher detects the student's
    classes (same dataset: ``MODEL.NUM_CLASSES`` is the student's) and must read the student's input."""
    path = cfg.DISTILL.TEACHER_CFG
    teacher = get_cfg()
    merge_cfg_from_file(teacher, path)
    if teacher.DISTILL.METHOD:
        raise ConfigError(f"{path} (DISTILL.TEACHER_CFG) sets DISTILL.METHOD = {teacher.DISTILL.METHOD!r}: "
                          "a teacher is a plain detector")
    teacher.MODEL.NUM_CLASSES = cfg.MODEL.NUM_CLASSES
    assert_and_infer_cfg(teacher)
    for key in SHARED_INPUT_KEYS:
        if _value(teacher, key) != _value(cfg, key):
            raise ConfigError(f"{key}: the teacher's cfg {path} has {_value(teacher, key)}, the student's "
                              f"{_value(cfg, key)}; the teacher runs on the student's input tensors, so both must "
                              "describe the same input")
    return teacher


def build_teacher(cfg, device: torch.device, print_fn: Print = print, output_dir=None) -> nn.Module:
    """The teacher detector of ``DISTILL.TEACHER_CFG`` with its weights loaded strictly, frozen, in eval mode."""
    tcfg = teacher_cfg(cfg)
    d = cfg.DISTILL
    if d.TEACHER_WEIGHTS:
        path, origin, part = d.TEACHER_WEIGHTS, "DISTILL.TEACHER_WEIGHTS", None
    elif cfg.TRAIN.WEIGHTS:
        path, origin, part = cfg.TRAIN.WEIGHTS, "TRAIN.WEIGHTS (its teacher part)", "teacher"
    else:
        raise ConfigError(f"DISTILL.METHOD = {d.METHOD!r} needs the teacher's weights: DISTILL.TEACHER_WEIGHTS, or "
                          "a merged teacher + student TRAIN.WEIGHTS (tools/convert_weights.py merge)")
    teacher = build_detector(tcfg)
    print_fn(f"Teacher ({d.TEACHER_CFG}) weights from {origin}:")
    load_pretrained(teacher, cached_weights_path(path, cfg.DOWNLOAD_CACHE, origin), tcfg, training=False,
                    output_dir=output_dir, print_fn=print_fn, part=part)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


@dataclass
class Distillation:
    """What ``build_distillation`` gives the training: the frozen teacher, the method (its parameters go into
    the optimizer) and the hook to hand the trainer."""

    teacher: nn.Module
    method: DistillMethod
    hook: DistillationHook


class DistillationHook(TrainerHook):
    """Adds the method's losses to the student's and keeps MGD's matching up to date (module docstring).

    `tracking_batches(step)` gives a fresh iterator of training-style batches for a matching before `step`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, method: DistillMethod, device: torch.device,
                 tracking_batches: Callable[[int], Iterator[dict]], print_fn: Print = print):
        self.student = student
        self.teacher = teacher
        self.method = method
        self.device = device
        self.tracking_batches = tracking_batches
        self.print = print_fn
        self.teacher_body = resnet_body_of(teacher)
        self.student_body = resnet_body_of(student)
        self.student_features = PreReluCapture(self.student_body, method.levels)
        self.teacher_features = PreReluCapture(self.teacher_body, method.levels)

    @property
    def name(self) -> str:
        return DISTILLATION_HOOK  # split finds a distillation checkpoint by it

    @torch.no_grad()
    def _teacher_stages(self, data: torch.Tensor) -> list:
        self.teacher.eval()
        self.teacher_body.forward_stages(data)
        return self.teacher_features.pop()

    def update_matching(self, step: int) -> None:
        """MGD's ``mgd_update_flow``: track ``batches_per_matching`` batches with both bodies in eval mode and
        solve the assignment; in a distributed run rank 0's matching is every rank's."""
        was_training = self.student.training
        self.student.eval()
        self.method.reset_tracking()
        tracked = 0
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for batch in itertools.islice(self.tracking_batches(step), self.method.batches_per_matching):
                data = to_device(batch["data"], self.device)
                self.student_body.forward_stages(data)
                self.method.track(self.student_features.pop(), self._teacher_stages(data))
                tracked += 1
        self.student.train(was_training)
        if tracked == 0:
            raise RuntimeError("MGD's matching got no batch to track features on")
        self.method.update_matching()
        matchings = {k: v for k, v in self.method.state_dict().items() if k.startswith("matching_")}
        self.method.load_state_dict({**self.method.state_dict(), **broadcast_object(matchings)})
        self.print(f"MGD: channel matching updated before step {step + 1} from {tracked} batches")

    def before_step(self, trainer, step: int) -> None:
        if self.method.matching_due(step):
            self.update_matching(step)

    def after_forward(self, trainer, step: int, batch: dict,
                      outputs: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        student = self.student_features.pop()
        teacher = self._teacher_stages(to_device(batch["data"], self.device))
        return self.method.loss(student, teacher)

    def after_backward(self, trainer, step: int) -> None:
        world = get_world_size()
        if world == 1:
            return
        for p in self.method.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.method.load_state_dict(state["method"])


def build_distillation(cfg, student: nn.Module, device: torch.device,
                       tracking_batches: Callable[[int], Iterator[dict]], print_fn: Print = print,
                       output_dir=None) -> Distillation:
    """``DISTILL.*`` -> teacher, method and hook, for a `student` whose weights are already loaded (MGD reads
    its margins from the loaded teacher). The random draws of building them (the teacher's initialisation, the
    L2 adapters) do not shift the training's: the run sees the random stream the student trained alone would."""
    with torch.random.fork_rng(devices=[]):
        teacher = build_teacher(cfg, device, print_fn, output_dir)
        method = build_distill_method(cfg, teacher, student).to(device)
    print_fn(f"Distillation: {cfg.DISTILL.METHOD} from {cfg.DISTILL.TEACHER_CFG}, stages "
             f"{', '.join(f'C{lvl}' for lvl in method.levels)}")
    hook = DistillationHook(student, teacher, method, device, tracking_batches, print_fn)
    return Distillation(teacher, method, hook)
