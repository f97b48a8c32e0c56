"""detectron2's ``detector_postprocess`` (``modeling/postprocessing.py``): from network-input pixels to the
size the caller asked for.

Boxes are scaled by ``scale_x = width / input_width`` and ``scale_y = height / input_height`` (separately:
detectron2's resize may round the two sides differently), clipped to ``[0, width] x [0, height]`` (no +1) and
those left without area dropped; keypoints' (x, y) are scaled alike.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor


def detector_postprocess(detections: Dict[str, Tensor], input_size: Tuple[float, float],
                         output_size: Tuple[int, int]) -> Dict[str, Tensor]:
    """`detections` (``boxes (D, 4)`` in network-input pixels and other per-detection tensors, e.g. ``scores``,
    ``classes``, ``keypoints (D, K, 3)``) of an image of `input_size` ``(h, w)`` (im_info's scaled size) at
    `output_size` ``(height, width)``; every entry keeps the rows whose box still has an area."""
    height, width = output_size
    in_h, in_w = float(input_size[0]), float(input_size[1])
    if in_h <= 0 or in_w <= 0:
        raise ValueError(f"detector_postprocess: the input size must be positive, got {tuple(input_size)}")
    scale_x, scale_y = width / in_w, height / in_h
    boxes = detections["boxes"]
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"detector_postprocess: boxes must be (D, 4), got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("detector_postprocess: boxes contain inf or NaN")
    boxes = boxes.clone()
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    boxes = torch.stack([boxes[:, 0].clamp(min=0, max=width), boxes[:, 1].clamp(min=0, max=height),
                         boxes[:, 2].clamp(min=0, max=width), boxes[:, 3].clamp(min=0, max=height)], dim=1)
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    out = {key: value[keep] for key, value in detections.items() if key != "boxes"}
    out["boxes"] = boxes[keep]
    if "keypoints" in out:
        keypoints = out["keypoints"].clone()
        keypoints[..., 0] *= scale_x
        keypoints[..., 1] *= scale_y
        out["keypoints"] = keypoints
    return {"boxes": out.pop("boxes"), **out}
