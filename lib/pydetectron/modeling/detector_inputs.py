"""What every detector (GeneralizedRCNN, RetinaNet) checks of its ``forward(data, im_info, roidb)`` inputs, and
how it finds each image's original size: one place, so the two models cannot drift apart."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from pydetectron.modeling.postprocess import original_image_size


def checked_im_info(model: str, data: torch.Tensor, im_info: torch.Tensor, roidb: Sequence[dict] | None,
                    training: bool) -> torch.Tensor:
    """Refuses inputs that do not fit together, naming what came; returns im_info as float32 on data's device.

    data ``(N, 3, H, W)``, im_info ``(N, 3)``, roidb None or N entries (required when `training`)."""
    if data.dim() != 4 or im_info.shape != (data.shape[0], 3):
        raise ValueError(
            f"data must be (N, 3, H, W) and im_info (N, 3); got {tuple(data.shape)} and {tuple(im_info.shape)}"
        )
    if roidb is not None and len(roidb) != data.shape[0]:
        raise ValueError(f"{len(roidb)} roidb entries for {data.shape[0]} images")
    if training and roidb is None:
        raise ValueError(f"{model} needs the minibatch roidb in training mode")
    return im_info.to(device=data.device, dtype=torch.float32)


def original_sizes(im_info: torch.Tensor, roidb: Sequence[dict] | None) -> List[Tuple[int, int]]:
    """Original (height, width) per image: the roidb entry's when it has both, else round(scaled size /
    im_scale) from im_info, which can be a pixel off when im_scale < 1."""
    sizes = []
    for i in range(im_info.shape[0]):
        entry = roidb[i] if roidb is not None else {}
        if "height" in entry and "width" in entry:
            sizes.append((int(entry["height"]), int(entry["width"])))
        else:
            sizes.append(original_image_size(im_info[i]))
    return sizes
