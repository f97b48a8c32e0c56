"""``DISTILL.*`` -> a distillation method over the teacher's and student's ResNet bodies."""

from __future__ import annotations

from typing import List, Sequence

from torch import nn

from pydetectron.distill.base import DistillMethod
from pydetectron.distill.feature_l2 import FeatureL2
from pydetectron.distill.features import STAGE_LEVELS, resnet_body_of, stage_channels
from pydetectron.distill.margins import stage_end_bn_affine, stage_end_bn_from_torchvision
from pydetectron.distill.mgd import MGD
from pydetectron.weights.download import cached_weights_path
from pydetectron.weights.files import read_object

METHODS = ("mgd", "feature_l2")


def distilled_levels(ignore_inds: Sequence[int]) -> List[int]:
    """The stages left after ``DISTILL.IGNORE_INDS`` (MGD's indices: 0 = C2 ... 3 = C5)."""
    return [level for index, level in enumerate(STAGE_LEVELS) if index not in set(ignore_inds)]


def build_distill_method(cfg, teacher: nn.Module, student: nn.Module) -> DistillMethod:
    """The method ``DISTILL.METHOD`` names, for the ResNet bodies inside `teacher` and `student`.

    The loss is divided by the images of one iteration over all GPUs (``TRAIN.IMS_PER_BATCH * NUM_GPUS``,
    MGD's ``SOLVER.IMS_PER_BATCH``). MGD's margins come from the teacher body's norms, or from
    ``DISTILL.MGD.TEACHER_BN_WEIGHTS`` (the torchvision ``.pth`` the teacher was converted from) when given:
    build it after the teacher's weights are loaded (MGD's trainer reads the margins at iteration 0).
    """
    d = cfg.DISTILL
    if d.METHOD not in METHODS:
        raise ValueError(f"DISTILL.METHOD = {d.METHOD!r} is not one of {', '.join(map(repr, METHODS))}")
    teacher_body, student_body = resnet_body_of(teacher), resnet_body_of(student)
    levels = distilled_levels(d.IGNORE_INDS)
    factors = [f for index, f in enumerate(d.LOSS_FACTORS) if index not in set(d.IGNORE_INDS)]
    common = dict(loss_factors=factors, batch_divisor=cfg.TRAIN.IMS_PER_BATCH * cfg.NUM_GPUS)
    student_channels = stage_channels(student_body, levels)
    teacher_channels = stage_channels(teacher_body, levels)
    if d.METHOD == "feature_l2":
        return FeatureL2(levels, student_channels, teacher_channels, **common)
    m = d.MGD
    if m.TEACHER_BN_WEIGHTS:
        path = cached_weights_path(m.TEACHER_BN_WEIGHTS, cfg.DOWNLOAD_CACHE, "DISTILL.MGD.TEACHER_BN_WEIGHTS")
        checkpoint = read_object(path)
        teacher_bn = stage_end_bn_from_torchvision(checkpoint, teacher_body, levels, source=path)
    else:
        teacher_bn = stage_end_bn_affine(teacher_body, levels)
    return MGD(
        levels, student_channels, teacher_channels, teacher_bn,
        reducer=m.REDUCER, update_freq=tuple(m.UPDATE_FREQ), update_slow_step=m.UPDATE_SLOW_STEP,
        update_iter=m.UPDATE_ITER, **common,
    )
