"""MGD's channel matching: a student-teacher cost gathered over images, solved as an assignment problem.

The cost of pairing student channel j with teacher channel k is ``2 - 2 cos(s_j, t_k)`` between the two
maps flattened over space (MGD's ``track_running_stats``), summed over images and divided by their count.
With a teacher wider than the student, the student's rows are tiled ``tc // sc`` times so that every
student channel takes ``tc // sc`` teacher channels; teacher channels beyond ``sc * (tc // sc)`` are shaved
(never matched). MGD's ``update_flow`` solves this with OR-tools on ``int(1e5 * cost)``; here
``scipy.optimize.linear_sum_assignment`` solves the float costs (the same optimum, without the 1e-5
quantisation). Sparse matching (``SMDistiller.update_flow``) pairs each student channel with one teacher
channel: the rectangular problem, no tiling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def channel_cost(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``(sc, tc)`` float64 cost summed over the batch, from ``student (N, sc, H, W)`` and ``teacher (N, tc, H, W)``.

    Entry (j, k) is ``sum_n 2 - 2 <s_nj / |s_nj|, t_nk / |t_nk|>`` over the spatial maps (MGD's cost).
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must be "
                         "(N, C, H, W) with the same N, H and W")
    n = student.shape[0]
    s = F.normalize(student.detach().reshape(n, student.shape[1], -1).double(), p=2, dim=2)
    t = F.normalize(teacher.detach().reshape(n, teacher.shape[1], -1).double(), p=2, dim=2)
    return (2 - 2 * torch.bmm(s, t.transpose(1, 2))).sum(dim=0)


def matched_rows(student_channels: int, teacher_channels: int, tiled: bool) -> int:
    """How many (tiled) student rows get a teacher channel: ``sc * (tc // sc)`` tiled, else ``sc``."""
    if student_channels > teacher_channels:
        raise ValueError(f"MGD matches each student channel to teacher channels: the student has "
                         f"{student_channels} channels, more than the teacher's {teacher_channels}")
    return student_channels * (teacher_channels // student_channels) if tiled else student_channels


def solve_matching(cost_sum: np.ndarray, num_images: int, tiled: bool) -> np.ndarray:
    """Teacher channel of each matched row, ``(matched_rows,)`` int64, from a ``(sc, tc)`` summed cost.

    `tiled` (reducers amp / sp / rd): row ``g * sc + j`` is copy g of student channel j and the columns are
    the first ``sc * (tc // sc)`` teacher channels (MGD's ``update_flow`` with its shave). Not tiled (sm): row j
    is student channel j, over all teacher channels (``SMDistiller.update_flow``).
    """
    if num_images <= 0:
        raise ValueError("the matching needs features of at least one image (num_images is 0)")
    sc, tc = cost_sum.shape
    rows = matched_rows(sc, tc, tiled)
    cost = cost_sum / num_images
    if tiled:
        cost = np.tile(cost, (tc // sc, 1))[:, :rows]
    row_ind, col_ind = linear_sum_assignment(cost)
    assert np.array_equal(row_ind, np.arange(rows))  # scipy returns every row of a wide problem, in order
    return col_ind.astype(np.int64)
