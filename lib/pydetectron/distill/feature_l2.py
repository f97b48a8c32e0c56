"""The plain feature-distillation baseline: L2 between adapted student features and the teacher's.

Each stage's student features (pre-ReLU, as MGD's) go through a 1x1 conv adapter to the teacher's channel
count (FitNets' regressor); the loss is the squared error to the teacher's features summed over the batch,
divided by the stage's loss factor and the batch divisor, exactly as MGD's loss is normalised, so that the
two methods differ only in what they compare.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pydetectron.distill.base import DistillMethod
from pydetectron.distill.features import stage_name
from pydetectron.modeling.layers import msra_fill_
from pydetectron.ops.conv import Conv2d


class FeatureL2(DistillMethod):
    """L2 on 1x1-adapted student features, stages `levels`."""

    def __init__(
        self,
        levels: Sequence[int],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        *,
        loss_factors: Sequence[float],
        batch_divisor: int,
    ) -> None:
        super().__init__(levels, student_channels, teacher_channels, loss_factors, batch_divisor)
        self.adapters = nn.ModuleDict()
        for level, sc, tc in zip(self.levels, self.student_channels, self.teacher_channels):
            adapter = Conv2d(sc, tc, 1)
            msra_fill_(adapter.weight)
            nn.init.zeros_(adapter.bias)
            self.adapters[stage_name(level)] = adapter

    def stage_loss(self, index: int, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        adapted = self.adapters[stage_name(self.levels[index])](student)
        return (adapted - teacher).pow(2).sum()
