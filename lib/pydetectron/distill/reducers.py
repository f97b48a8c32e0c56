"""MGD's channel reducers: the matched teacher channels of each student channel -> one target map.

Each takes the teacher features ``(N, tc, H, W)``, the teacher margins ``(1, tc, 1, 1)``, the matching
(teacher channel per matched row, see ``matching.solve_matching``) and the student's channel count ``sc``,
and returns the target ``(N, sc, H, W)`` and its margins ``(1, sc, 1, 1)``. They follow ``MGDistiller.amp``,
``.sp``, ``.rd`` and ``SMDistiller.sm`` in MGD's ``mgd/builder.py``.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

Reduced = Tuple[torch.Tensor, torch.Tensor]


def _grouped(teacher: torch.Tensor, margins: torch.Tensor, matching: torch.Tensor, sc: int) -> Reduced:
    """``(N, sc, G, H, W)`` and ``(1, sc, G, 1, 1)``: copy g of student channel j is matched row ``g * sc + j``."""
    groups = matching.numel() // sc
    if groups == 0 or matching.numel() != groups * sc:
        raise ValueError(f"a matching of {matching.numel()} rows does not tile {sc} student channels")
    chunks = [matching[g * sc:(g + 1) * sc] for g in range(groups)]
    t = torch.stack([teacher[:, idx] for idx in chunks], dim=2)
    m = torch.stack([margins[:, idx] for idx in chunks], dim=2)
    return t, m


def absolute_max_pooling(teacher: torch.Tensor, margins: torch.Tensor, matching: torch.Tensor, sc: int) -> Reduced:
    """'amp': at each position the matched teacher value of largest magnitude (sign kept); margins averaged
    over the matched channels (``MGDistiller.amp``)."""
    t, m = _grouped(teacher, margins, matching, sc)
    n, _, groups, h, w = t.shape
    t = t.reshape(n, sc, groups, h * w)
    picked = t.gather(2, t.abs().argmax(dim=2, keepdim=True))
    return picked.reshape(n, sc, h, w), m.reshape(1, sc, groups, 1).mean(dim=2).reshape(1, sc, 1, 1)


def simple_max_pooling(teacher: torch.Tensor, margins: torch.Tensor, matching: torch.Tensor, sc: int) -> Reduced:
    """'sp': the largest matched teacher value at each position and the largest margin (``MGDistiller.sp``,
    whose ``adaptive_max_pool3d`` pools over the matched channels only; its 'avg' kernel is never used)."""
    t, m = _grouped(teacher, margins, matching, sc)
    return t.amax(dim=2), m.amax(dim=2)


def random_drop(teacher: torch.Tensor, margins: torch.Tensor, matching: torch.Tensor, sc: int) -> Reduced:
    """'rd': at each position of each image one matched teacher channel drawn uniformly; the margin of one
    matched channel drawn independently per student channel (``MGDistiller.rd``). Uses torch's RNG."""
    t, m = _grouped(teacher, margins, matching, sc)
    n, _, groups, h, w = t.shape
    t = t.reshape(n, sc, groups, h * w).permute(0, 1, 3, 2)
    m = m.reshape(1, sc, groups, 1).permute(0, 1, 3, 2)
    t_pick = torch.randint(0, groups, (n, sc, h * w, 1), dtype=torch.long, device=t.device)
    m_pick = torch.randint(0, groups, (1, sc, 1, 1), dtype=torch.long, device=m.device)
    return t.gather(3, t_pick).reshape(n, sc, h, w), m.gather(3, m_pick).reshape(1, sc, 1, 1)


def sparse_matching(teacher: torch.Tensor, margins: torch.Tensor, matching: torch.Tensor, sc: int) -> Reduced:
    """'sm': the one teacher channel matched to each student channel (``SMDistiller.sm``)."""
    if matching.numel() != sc:
        raise ValueError(f"sparse matching needs one teacher channel per student channel ({sc}), "
                         f"got {matching.numel()}")
    return teacher[:, matching], margins[:, matching]


REDUCERS: Dict[str, Callable[..., Reduced]] = {
    "amp": absolute_max_pooling,
    "sp": simple_max_pooling,
    "rd": random_drop,
    "sm": sparse_matching,
}
TILED_REDUCERS = ("amp", "sp", "rd")  # the MGDistiller reducers; 'sm' is SMDistiller's

