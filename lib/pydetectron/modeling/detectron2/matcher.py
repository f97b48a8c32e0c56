"""detectron2's ``Matcher``: each prediction gets the gt it overlaps most and a label by IoU band.

``thresholds = [t_1, ..., t_k]`` (increasing, ``t_1 > 0``) split ``[-inf, t_1, ..., t_k, inf)`` into
``k + 1`` half-open bands; ``labels`` (each -1 ignore, 0 negative, 1 positive) name them. With
``allow_low_quality_matches`` every prediction whose IoU with some gt equals that gt's highest IoU (ties
included, even when that highest IoU is 0) is labelled 1, keeping its own best gt as its match.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class Matcher:
    """``matcher(quality (M gt, N predictions)) -> (matches (N,) int64, labels (N,) int8)``."""

    def __init__(
        self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False
    ) -> None:
        thresholds = [float(t) for t in thresholds]
        if not thresholds or thresholds[0] <= 0:
            raise ValueError(f"Matcher thresholds must be non-empty and start above 0, got {thresholds}")
        bounds = [-float("inf"), *thresholds, float("inf")]
        if any(low > high for low, high in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"Matcher thresholds must be increasing, got {thresholds}")
        if any(label not in (-1, 0, 1) for label in labels) or len(labels) != len(bounds) - 1:
            raise ValueError(f"Matcher needs {len(bounds) - 1} labels from {{-1, 0, 1}}, got {list(labels)}")
        self.thresholds = bounds
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, match_quality_matrix: Tensor) -> tuple[Tensor, Tensor]:
        if match_quality_matrix.dim() != 2:
            raise ValueError(f"Matcher needs a (gt, predictions) matrix, got {tuple(match_quality_matrix.shape)}")
        num_pred = match_quality_matrix.shape[1]
        device = match_quality_matrix.device
        if match_quality_matrix.numel() == 0:
            # No gt (or no predictions): IoU 0 everywhere, so every prediction takes the lowest band's label.
            return (torch.zeros(num_pred, dtype=torch.int64, device=device),
                    torch.full((num_pred,), self.labels[0], dtype=torch.int8, device=device))
        if bool((match_quality_matrix < 0).any()):
            raise ValueError("Matcher needs match qualities >= 0 (IoUs)")
        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = torch.ones(num_pred, dtype=torch.int8, device=device)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            match_labels[(matched_vals >= low) & (matched_vals < high)] = label
        if self.allow_low_quality_matches:
            highest_per_gt = match_quality_matrix.max(dim=1).values
            _, best_preds = torch.nonzero(match_quality_matrix == highest_per_gt[:, None], as_tuple=True)
            match_labels[best_preds] = 1
        return matches, match_labels
