"""detectron2's ``Box2BoxTransform``: the R-CNN box coder without +1, with its ``log(1000 / 16)`` clamp.

The formulas are ``pydetectron.boxes.encode_boxes`` / ``decode_boxes`` with ``legacy_plus_one=False``
(width ``x2 - x1``, centre ``x1 + w / 2``, far corner ``ctr + w / 2``): the same operations in the same order
as detectron2's ``get_deltas`` / ``apply_deltas``, so the results are bit-identical.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from pydetectron.boxes import decode_boxes, encode_boxes

# detectron2's _DEFAULT_SCALE_CLAMP: dw, dh at most what turns a 16 px box into a 1000 px one.
D2_SCALE_CLAMP = math.log(1000.0 / 16)


class Box2BoxTransform:
    """Deltas ``(dx, dy, dw, dh)`` between boxes, scaled by ``weights`` ``(wx, wy, ww, wh)``.

    ``apply_deltas`` takes class-specific deltas ``(R, K * 4)`` against boxes ``(R, 4)`` and returns
    ``(R, K * 4)``; ``dw`` / ``dh`` (after dividing by the weights) are clamped to ``scale_clamp``.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = D2_SCALE_CLAMP) -> None:
        if len(weights) != 4:
            raise ValueError(f"Box2BoxTransform needs 4 weights (wx, wy, ww, wh), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """Deltas ``(N, 4)`` taking ``src_boxes`` to ``target_boxes`` (both ``(N, 4)``)."""
        if src_boxes.numel() and not bool(((src_boxes[:, 2] > src_boxes[:, 0]) &
                                           (src_boxes[:, 3] > src_boxes[:, 1])).all()):
            raise ValueError("Box2BoxTransform.get_deltas: source boxes must have positive width and height")
        return encode_boxes(src_boxes, target_boxes, self.weights, legacy_plus_one=False)

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Boxes ``(N, K * 4)`` from ``deltas`` ``(N, K * 4)`` applied to ``boxes`` ``(N, 4)``.

        Half-precision deltas are decoded in float32, as detectron2 does (float64 stays float64).
        """
        if deltas.dtype in (torch.float16, torch.bfloat16):
            deltas = deltas.float()
        return decode_boxes(boxes, deltas, self.weights, clip=self.scale_clamp, legacy_plus_one=False)
