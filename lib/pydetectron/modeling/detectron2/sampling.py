"""detectron2's ``subsample_labels``: a random balanced sample of positives and negatives.

Draws ``torch.randperm`` twice (positives, then negatives) on the labels' device, from the global RNG as
detectron2 does, so one seed gives detectron2's sample; or from ``generator`` (on its own device).
"""

from __future__ import annotations

import torch
from torch import Tensor


def subsample_labels(
    labels: Tensor,
    num_samples: int,
    positive_fraction: float,
    bg_label: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Indices of the sampled positives and negatives of ``labels`` ``(N,)`` (-1 ignore, ``bg_label``
    negative, anything else positive): ``min(#pos, int(num_samples * positive_fraction))`` positives, then
    negatives up to ``num_samples`` in all (fewer when there are not enough)."""
    if labels.dim() != 1:
        raise ValueError(f"subsample_labels needs labels (N,), got {tuple(labels.shape)}")
    if num_samples < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"need num_samples >= 0 and positive_fraction in [0, 1], got {num_samples}, {positive_fraction}"
        )
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    device = labels.device if generator is None else generator.device
    perm_pos = torch.randperm(positive.numel(), device=device, generator=generator)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), device=device, generator=generator)[:num_neg]
    return positive[perm_pos.to(labels.device)], negative[perm_neg.to(labels.device)]
