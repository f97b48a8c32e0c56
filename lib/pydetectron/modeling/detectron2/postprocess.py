"""detectron2's ``detector_postprocess`` and ``paste_masks_in_image``: detections from network-input pixels
to the original image.

``scale_x = width / input_width`` and ``scale_y = height / input_height`` (the input size is ``im_info``'s
scaled height and width), boxes scaled then clipped to ``[0, width] x [0, height]``, empty boxes (a side
<= 0) dropped, soft masks pasted by ``grid_sample`` over each box (pixel centres ``+ 0.5``) and thresholded
``>= MRCNN.THRESH_BINARIZE``, keypoints' x / y scaled.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def paste_masks_in_image(
    probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> torch.Tensor:
    """Soft masks ``(D, M, M)`` in `boxes` ``(D, 4)`` (continuous ``[x1, y1, x2, y2]`` in the target image)
    -> ``(D, height, width)`` uint8 on the CPU, 1 where the bilinearly sampled probability is >= threshold.

    d2's ``_do_paste_mask``: each pixel centre ``(x + 0.5, y + 0.5)`` is mapped into the box's ``[-1, 1]`` grid
    and sampled with ``grid_sample(align_corners=False)`` (zeros outside the mask)."""
    if probs.dim() != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f"mask probabilities must be (D, M, M), got shape {tuple(probs.shape)}")
    if boxes.shape != (probs.shape[0], 4):
        raise ValueError(f"boxes must be ({probs.shape[0]}, 4) for {probs.shape[0]} masks, got {tuple(boxes.shape)}")
    out = torch.zeros((probs.shape[0], int(height), int(width)), dtype=torch.uint8)
    if probs.shape[0] == 0:
        return out
    probs, boxes = probs.detach().float().cpu(), boxes.detach().float().cpu()
    for i in range(probs.shape[0]):  # one mask at a time, as d2 does on the CPU
        # Only the pixels around the box are sampled (d2's skip_empty); the rest stays 0.
        box = boxes[i : i + 1]
        x0, y0 = (int(v) for v in torch.clamp(box.min(dim=0).values.floor()[:2] - 1, min=0))
        x1 = int(torch.clamp(box[:, 2].max().ceil() + 1, max=width))
        y1 = int(torch.clamp(box[:, 3].max().ceil() + 1, max=height))
        if x1 <= x0 or y1 <= y0:
            continue
        bx0, by0, bx1, by1 = box.split(1, dim=1)
        img_y = (torch.arange(y0, y1, dtype=torch.float32) + 0.5 - by0) / (by1 - by0) * 2 - 1
        img_x = (torch.arange(x0, x1, dtype=torch.float32) + 0.5 - bx0) / (bx1 - bx0) * 2 - 1
        gx = img_x[:, None, :].expand(1, img_y.shape[1], img_x.shape[1])
        gy = img_y[:, :, None].expand(1, img_y.shape[1], img_x.shape[1])
        sampled = F.grid_sample(probs[i][None, None], torch.stack([gx, gy], dim=3), align_corners=False)
        out[i, y0:y1, x0:x1] = (sampled[0, 0] >= threshold).to(torch.uint8)
    return out


def detector_postprocess(
    det: Dict[str, torch.Tensor], input_size: Tuple[float, float], output_size: Tuple[int, int],
    mask_threshold: float = 0.5,
) -> Dict[str, torch.Tensor]:
    """One image's detections in network-input pixels -> original pixels (d2's ``detector_postprocess``).

    `det` holds ``boxes`` ``(D, 4)``, ``scores``, ``classes`` and optionally ``mask_probs`` ``(D, M, M)``
    (soft masks, pasted into ``masks``) and ``keypoints`` ``(D, K, 3)``; `input_size` is the network-input
    (height, width), `output_size` the original (height, width). Returns a new dict."""
    out_h, out_w = int(output_size[0]), int(output_size[1])
    scale_x, scale_y = out_w / float(input_size[1]), out_h / float(input_size[0])
    boxes = det["boxes"].clone()
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError("detector_postprocess: a detection box is not finite")
    boxes = torch.stack([boxes[:, 0].clamp(0, out_w), boxes[:, 1].clamp(0, out_h),
                         boxes[:, 2].clamp(0, out_w), boxes[:, 3].clamp(0, out_h)], dim=-1)
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    result = {key: value[keep] for key, value in det.items() if key != "boxes"}
    result["boxes"] = boxes[keep]
    probs = result.pop("mask_probs", None)
    if probs is not None:
        result["masks"] = paste_masks_in_image(probs, result["boxes"], out_h, out_w, mask_threshold)
    if "keypoints" in result:
        keypoints = result["keypoints"].clone()
        keypoints[:, :, 0] *= scale_x
        keypoints[:, :, 1] *= scale_y
        result["keypoints"] = keypoints
    return result
