"""What a distillation method offers a teacher/student trainer.

A method is an ``nn.Module`` (its parameters train with the student's; its ``state_dict`` goes into the
checkpoint) over the stages ``levels`` (C<level> pre-ReLU features of both bodies, see ``features.py``):

- ``loss(student_feats, teacher_feats) -> {'loss_distill_c<level>': scalar}``: each stage's loss summed over
  the images, divided by the stage's loss factor and by ``batch_divisor`` (MGD's ``loss_factors`` and its
  d2 ``train_net.py`` dividing by ``SOLVER.IMS_PER_BATCH``, the images of all GPUs of one iteration);
- ``matching_due(iteration)``: whether the trainer must refresh a matching before this iteration's step.
  Methods with a matching (MGD) then expose ``batches_per_matching``, ``reset_tracking()``,
  ``track(student_feats, teacher_feats)`` (features computed in eval mode without gradient) and
  ``update_matching()``.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from pydetectron.distill.features import stage_name


class DistillMethod(nn.Module):
    """The common part: stages, channels, loss factors and the normalisation of the loss."""

    def __init__(
        self,
        levels: Sequence[int],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        loss_factors: Sequence[float],
        batch_divisor: int,
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("distillation needs at least one stage (every stage is ignored)")
        if not len(levels) == len(student_channels) == len(teacher_channels) == len(loss_factors):
            raise ValueError(f"levels {list(levels)}, student channels {list(student_channels)}, teacher channels "
                             f"{list(teacher_channels)} and loss factors {list(loss_factors)} must align")
        if any(f <= 0 for f in loss_factors) or batch_divisor <= 0:
            raise ValueError(f"loss factors {list(loss_factors)} and batch divisor {batch_divisor} must be positive")
        self.levels = list(levels)
        self.student_channels = list(student_channels)
        self.teacher_channels = list(teacher_channels)
        self.loss_factors = [float(f) for f in loss_factors]
        self.batch_divisor = int(batch_divisor)

    def stage_loss(self, index: int, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Summed loss of stage ``levels[index]`` (before the factor and the batch divisor)."""
        raise NotImplementedError

    def _check_features(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> None:
        if len(student_feats) != len(self.levels) or len(teacher_feats) != len(self.levels):
            raise ValueError(f"expected features of stages {self.levels}, got {len(student_feats)} student and "
                             f"{len(teacher_feats)} teacher maps")
        for level, s, t, sc, tc in zip(self.levels, student_feats, teacher_feats, self.student_channels,
                                       self.teacher_channels):
            if s.dim() != 4 or t.dim() != 4 or s.shape[1] != sc or t.shape[1] != tc or s.shape[0] != t.shape[0] \
                    or s.shape[2:] != t.shape[2:]:
                raise ValueError(f"C{level}: student {tuple(s.shape)} / teacher {tuple(t.shape)} features do not "
                                 f"match (N, {sc}, H, W) / (N, {tc}, H, W)")

    def loss(
        self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """``{'loss_distill_c<level>': scalar}`` from per-stage features ``(N, C, H, W)``, in ``levels`` order.
        The teacher's features are detached."""
        self._check_features(student_feats, teacher_feats)
        losses = {}
        for index, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            stage = self.stage_loss(index, s, t.detach())
            losses[f"loss_distill_{stage_name(self.levels[index])}"] = (
                stage / self.loss_factors[index] / self.batch_divisor
            )
        return losses

    def matching_due(self, iteration: int) -> bool:
        """No matching to refresh (methods with one override this)."""
        return False

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, student_channels={self.student_channels}, teacher_channels="
                f"{self.teacher_channels}, loss_factors={self.loss_factors}, batch_divisor={self.batch_divisor}")

