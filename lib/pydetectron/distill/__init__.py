"""Teacher/student distillation methods over ResNet stage features: MGD and a plain L2 baseline.

``build_distill_method(cfg, teacher, student)`` gives the method ``DISTILL.METHOD`` names; a trainer reads
both networks' pre-ReLU stage ends with ``PreReluCapture`` and adds ``method.loss(...)`` to the student's
losses (see ``base.py`` for the contract). ``enable_stage_last_norms`` prepares an MGD student's body.
"""

from pydetectron.distill.base import DistillMethod
from pydetectron.distill.build import METHODS, build_distill_method, distilled_levels
from pydetectron.distill.feature_l2 import FeatureL2
from pydetectron.distill.features import (
    STAGE_LEVELS,
    PreReluCapture,
    enable_stage_last_norms,
    resnet_body_of,
    stage_channels,
    stage_end_norm,
)
from pydetectron.distill.margins import bn_margins, stage_end_bn_affine, stage_end_bn_from_torchvision
from pydetectron.distill.matching import channel_cost, solve_matching
from pydetectron.distill.mgd import MGD, distillation_loss
from pydetectron.distill.reducers import REDUCERS

__all__ = [
    "DistillMethod", "METHODS", "build_distill_method", "distilled_levels", "FeatureL2", "STAGE_LEVELS",
    "PreReluCapture", "enable_stage_last_norms", "resnet_body_of", "stage_channels", "stage_end_norm",
    "bn_margins", "stage_end_bn_affine", "stage_end_bn_from_torchvision", "channel_cost", "solve_matching",
    "MGD", "distillation_loss", "REDUCERS",
]
