"""Loss functions with the normalisation of Detectron's Caffe2 operators.

Detectron folds most of its normalisation into per-element weights and the operators' own divisors:
``SmoothL1Loss`` divides the weighted sum by the batch dimension of its input, and
``SigmoidCrossEntropyLoss`` by the number of labelled (target >= 0) elements unless told otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_l1_loss(
    pred: Tensor,
    target: Tensor,
    inside_weights: Tensor,
    outside_weights: Tensor,
    beta: float = 1.0,
    normalizer: float | None = None,
) -> Tensor:
    """Detectron's ``SmoothL1Loss``: ``sum(w_out * huber_beta(w_in * (pred - target))) / normalizer``.

    ``huber_beta(x) = 0.5 x^2 / beta`` where ``|x| < beta`` else ``|x| - 0.5 beta``. All four tensors share
    one shape; ``normalizer`` (at least 1) defaults to ``pred.shape[0]`` (Caffe2 divides by the input's
    first dimension: the number of images for the RPN blobs, the number of RoIs for Fast R-CNN). The RPN uses
    ``beta = 1/9`` (``RPN.SMOOTH_L1_BETA``), Fast R-CNN and the other heads ``beta = 1``; ``beta < 1e-5`` is
    the L1 loss (detectron2's meaning, see ``smooth_l1``).
    """
    if not (pred.shape == target.shape == inside_weights.shape == outside_weights.shape):
        raise ValueError(
            "smooth_l1_loss needs equal shapes, got pred "
            f"{tuple(pred.shape)}, target {tuple(target.shape)}, inside {tuple(inside_weights.shape)}, "
            f"outside {tuple(outside_weights.shape)}"
        )
    if beta < 0:
        raise ValueError(f"smooth_l1_loss beta must be >= 0, got {beta}")
    if normalizer is None:
        normalizer = pred.shape[0] if pred.dim() > 0 else 1
    per_elem = smooth_l1(inside_weights * (pred - target), beta)
    return (outside_weights * per_elem).sum() / max(float(normalizer), 1.0)


def smooth_l1(diff: Tensor, beta: float) -> Tensor:
    """Elementwise smooth-L1 of differences ``diff`` (fvcore's / detectron2's formula, which Detectron's
    operator shares): ``0.5 x^2 / beta`` where ``|x| < beta`` else ``|x| - 0.5 beta``; plain ``|x|`` when
    ``beta < 1e-5`` (detectron2's L1 case, also the limit of the formula)."""
    abs_diff = diff.abs()
    if beta < 1e-5:
        return abs_diff
    return torch.where(abs_diff < beta, 0.5 * abs_diff**2 / beta, abs_diff - 0.5 * beta)


def sigmoid_cross_entropy_loss(logits: Tensor, labels: Tensor, normalizer: float | None = None) -> Tensor:
    """Detectron's ``SigmoidCrossEntropyLoss`` over elements with ``labels >= 0`` (``-1`` = ignore).

    Returns the summed binary cross-entropy divided by ``normalizer``, or, when it is ``None``, by the
    number of labelled elements (Caffe2's ``normalize=1``; at least 1).
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    valid = labels >= 0
    per_elem = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype), reduction="none")
    total = (per_elem * valid.to(logits.dtype)).sum()
    if normalizer is None:
        return total / valid.sum().clamp(min=1).to(logits.dtype)
    return total / float(normalizer)


def softmax_cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(M, C)`` over rows with ``labels >= 0`` (``-1`` = ignore).

    Zero (still differentiable) when no row is labelled, instead of the NaN ``F.cross_entropy`` gives.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (M, C) and labels (M,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    valid = labels >= 0
    per_row = F.cross_entropy(logits, labels.clamp(min=0).long(), reduction="none")
    return (per_row * valid.to(logits.dtype)).sum() / valid.sum().clamp(min=1).to(logits.dtype)
