"""Pasting M x M mask probabilities into the image, exactly as Detectron's ``core/test.py:segm_results``.

Each mask gets a 1-pixel zero border (so ``cv2.resize`` does not smear border values outwards: the
"top hat" artefact), its box is expanded by ``(M + 2) / M`` to cover that border and truncated to
integers, the padded mask is bilinearly resized to the box size, thresholded and placed in the image.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from pydetectron.boxes import expand_boxes


def paste_masks_in_image(
    probs: torch.Tensor, boxes: torch.Tensor, im_h: int, im_w: int, thresh: float = 0.5
) -> torch.Tensor:
    """Binary image masks from per-box mask probabilities.

    Args:
        probs: ``(D, M, M)`` float mask probabilities (one channel per detection).
        boxes: ``(D, 4)`` inclusive ``[x1, y1, x2, y2]`` in the coordinates of the target image
            (the original image for Detectron's results).
        im_h, im_w: size of the target image.
        thresh: ``MRCNN.THRESH_BINARIZE``; a pixel is on where the resized probability is > thresh.
    Returns:
        ``(D, im_h, im_w)`` uint8 tensor of 0 / 1 on the CPU.
    """
    if probs.dim() != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f"mask probabilities must be (D, M, M), got shape {tuple(probs.shape)}")
    if boxes.shape != (probs.shape[0], 4):
        raise ValueError(f"boxes must be ({probs.shape[0]}, 4) for {probs.shape[0]} masks, got {tuple(boxes.shape)}")
    num, m = probs.shape[0], probs.shape[1]
    out = np.zeros((num, int(im_h), int(im_w)), dtype=np.uint8)
    if num == 0:
        return torch.from_numpy(out)
    ref = expand_boxes(boxes.detach().float().cpu(), (m + 2.0) / m).to(torch.int32).numpy()
    padded = np.zeros((m + 2, m + 2), dtype=np.float32)
    probs_np = probs.detach().float().cpu().numpy()
    for i in range(num):
        x1, y1, x2, y2 = (int(v) for v in ref[i])
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        padded[1:-1, 1:-1] = probs_np[i]
        mask = cv2.resize(padded, (w, h)) > thresh
        x0, x1c = max(x1, 0), min(x2 + 1, im_w)
        y0, y1c = max(y1, 0), min(y2 + 1, im_h)
        if x0 < x1c and y0 < y1c:
            out[i, y0:y1c, x0:x1c] = mask[y0 - y1 : y1c - y1, x0 - x1 : x1c - x1]
    return torch.from_numpy(out)
