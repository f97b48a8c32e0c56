"""MGD: Matching Guided Distillation (Yue et al., ECCV 2020), as ``MGDistiller`` / ``SMDistiller`` in
KaiyuYue/mgd's ``mgd/builder.py`` with ``det=True`` and its detectron2 trainer (``d2/train_net.py``).

Per distilled stage: the student's pre-ReLU features pass a trainable GroupNorm(32, sc) (their ``BNs``,
GroupNorm in detection), the teacher's are reduced to the student's channels through the matching
(``reducers.py``), clipped below by the teacher's margins (``margins.py``) and compared with MGD's partial
L2 (``distillation_loss``). The matching is refreshed on their schedule (``matching_due``): before the
first step, then every ``update_freq[0]`` iterations before ``update_slow_step`` and every
``update_freq[1]`` after, each time from features of ``update_iter + 1`` batches (their loop breaks after
the batch that reaches ``UPDATE_ITER``). Margins and matching are buffers: a checkpoint holds them and a
resumed run continues with the same matching (their trainer recomputed both on resume).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.distill.base import DistillMethod
from pydetectron.distill.features import MGD_STAGE_NORM_GROUPS, stage_name
from pydetectron.distill.margins import bn_margins
from pydetectron.distill.matching import channel_cost, matched_rows, solve_matching
from pydetectron.distill.reducers import REDUCERS, TILED_REDUCERS


def distillation_loss(student: torch.Tensor, target: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """MGD's ``distillation_loss``: squared error to ``max(target, margin)``, counted where the student is
    above that target or the target is positive (a negative target only pulls the student down to the
    margin), summed. ``student``/``target`` ``(N, C, H, W)``, ``margins`` ``(1, C, 1, 1)``; returns a scalar."""
    target = torch.max(target, margins)
    loss = F.mse_loss(student, target, reduction="none")
    return (loss * ((student > target) | (target > 0)).to(loss.dtype)).sum()


class MGD(DistillMethod):
    """MGD over stages `levels`; `teacher_bn` gives each stage's teacher ``(gamma, beta)`` for the margins.

    `student_norm_groups` is the group count of the student-side GroupNorms (MGD's 32; small tests use less).
    """

    def __init__(
        self,
        levels: Sequence[int],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        teacher_bn: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        *,
        reducer: str = "amp",
        loss_factors: Sequence[float],
        batch_divisor: int,
        update_freq: Tuple[int, int] = (5000, 31000),
        update_slow_step: int = 20000,
        update_iter: int = 1000,
        student_norm_groups: int = MGD_STAGE_NORM_GROUPS,
    ) -> None:
        super().__init__(levels, student_channels, teacher_channels, loss_factors, batch_divisor)
        if reducer not in REDUCERS:
            raise ValueError(f"unknown MGD reducer {reducer!r}; valid: {', '.join(REDUCERS)}")
        if len(teacher_bn) != len(self.levels):
            raise ValueError(f"teacher BN gamma/beta given for {len(teacher_bn)} stages, expected {len(self.levels)}")
        if len(update_freq) != 2 or min(update_freq) <= 0 or update_slow_step < 0 or update_iter < 0:
            raise ValueError(f"update_freq {update_freq} must be two positive counts, update_slow_step "
                             f"{update_slow_step} and update_iter {update_iter} non-negative")
        self.reducer = reducer
        self.tiled = reducer in TILED_REDUCERS
        self.update_freq = (int(update_freq[0]), int(update_freq[1]))
        self.update_slow_step = int(update_slow_step)
        self.update_iter = int(update_iter)
        self.student_norms = nn.ModuleDict()
        for level, sc, tc, (gamma, beta) in zip(self.levels, self.student_channels, self.teacher_channels, teacher_bn):
            name = stage_name(level)
            if gamma.numel() != tc:
                raise ValueError(f"C{level}: teacher BN has {gamma.numel()} channels, the teacher features {tc}")
            self.register_buffer(f"margin_{name}", bn_margins(gamma, beta).reshape(1, tc, 1, 1).cpu())
            rows = matched_rows(sc, tc, self.tiled)
            self.register_buffer(f"matching_{name}", torch.full((rows,), -1, dtype=torch.long))
            self.student_norms[name] = nn.GroupNorm(student_norm_groups, sc)
        self.register_buffer("matched", torch.tensor(False))
        self.reset_tracking()

    # ---- the matching ------------------------------------------------------------------------------

    @property
    def batches_per_matching(self) -> int:
        """Batches whose features make one matching (``update_iter + 1``, as MGD's ``mgd_update_flow`` loop)."""
        return self.update_iter + 1

    def matching_due(self, iteration: int) -> bool:
        """Whether to refresh the matching before `iteration` (MGD's ``mgd_update_step``): when there is none
        yet (the first step), then at multiples of the update frequency of the current phase."""
        if not bool(self.matched):
            return True
        freq = self.update_freq[0] if iteration < self.update_slow_step else self.update_freq[1]
        return iteration > 0 and iteration % freq == 0

    def reset_tracking(self) -> None:
        """Forget the gathered costs (MGD's ``init_flow``)."""
        self._cost_sums = [np.zeros((sc, tc)) for sc, tc in zip(self.student_channels, self.teacher_channels)]
        self._tracked_images = 0

    @torch.no_grad()
    def track(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> None:
        """Add one batch's channel costs (MGD's ``track_running_stats``; raw student features, no norm)."""
        self._check_features(student_feats, teacher_feats)
        for index, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            self._cost_sums[index] += channel_cost(s, t).cpu().numpy()
        self._tracked_images += student_feats[0].shape[0]

    def update_matching(self) -> None:
        """Solve every stage's assignment from the tracked costs, store it, and reset the tracking
        (MGD's ``update_flow``)."""
        for level, cost_sum in zip(self.levels, self._cost_sums):
            buffer = getattr(self, f"matching_{stage_name(level)}")
            buffer.copy_(torch.from_numpy(solve_matching(cost_sum, self._tracked_images, self.tiled)))
        self.matched.fill_(True)
        self.reset_tracking()

    def matching(self, level: int) -> torch.Tensor:
        """The matched teacher channel of each (tiled) student row of stage `level`."""
        return getattr(self, f"matching_{stage_name(level)}")

    def margins(self, level: int) -> torch.Tensor:
        """The teacher margins ``(1, tc, 1, 1)`` of stage `level`."""
        return getattr(self, f"margin_{stage_name(level)}")

    # ---- the loss ----------------------------------------------------------------------------------

    def stage_loss(self, index: int, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if not bool(self.matched):
            raise RuntimeError("MGD has no channel matching yet: track features and call update_matching() "
                               "before the first loss (matching_due(iteration) says when)")
        level = self.levels[index]
        student = self.student_norms[stage_name(level)](student)
        target, margins = REDUCERS[self.reducer](
            teacher, self.margins(level), self.matching(level), self.student_channels[index]
        )
        return distillation_loss(student, target, margins)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, reducer={self.reducer!r}, update_freq={self.update_freq}, "
                f"update_slow_step={self.update_slow_step}, update_iter={self.update_iter}")

