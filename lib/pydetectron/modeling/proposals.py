"""RPN proposal generation: Detectron's ``GenerateProposals`` op, for one or several pyramid levels.

Per image and level: take the ``pre_nms_top_n`` highest objectness scores, decode their anchors with the
box coder at weights (1, 1, 1, 1), clip to the image, drop boxes smaller than ``min_size`` at the
*original* image scale (or centred outside the image), run NMS (legacy +1 areas) and keep the best
``post_nms_top_n``. The top-N cut and box decoding are batched over images; clipping, filtering and NMS
are batched over levels (one NMS call per image, levels kept apart by ``batched_nms``).

RoIs are ``(K, 5)`` = ``[batch_index, x1, y1, x2, y2]``, inclusive-pixel, network-input coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pydetectron.boxes import clip_boxes, decode_boxes, filter_small_boxes
from pydetectron.ops.nms import batched_nms

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ProposalParams:
    """``TRAIN.RPN_*`` or ``TEST.RPN_*`` as plain values (``<= 0`` top-N means no limit)."""

    pre_nms_top_n: int
    post_nms_top_n: int
    nms_thresh: float
    min_size: float

    @classmethod
    def from_cfg(cls, cfg, training: bool) -> ProposalParams:
        node = cfg.TRAIN if training else cfg.TEST
        return cls(
            pre_nms_top_n=int(node.RPN_PRE_NMS_TOP_N),
            post_nms_top_n=int(node.RPN_POST_NMS_TOP_N),
            nms_thresh=float(node.RPN_NMS_THRESH),
            min_size=float(node.RPN_MIN_SIZE),
        )


def flatten_scores(scores: Tensor) -> Tensor:
    """One level's ``(N, A, H, W)`` per-anchor values -> ``(N, H*W*A)`` in anchor order."""
    return scores.permute(0, 2, 3, 1).reshape(scores.shape[0], -1)


def flatten_deltas(deltas: Tensor) -> Tensor:
    """One level's ``(N, 4A, H, W)`` deltas -> ``(N, H*W*A, 4)``; channel ``4a + k`` is coordinate k of
    anchor a, as Detectron lays out ``rpn_bbox_pred``."""
    n, c, h, w = deltas.shape
    if c % 4 != 0:
        raise ValueError(f"bbox deltas need 4A channels, got {c}")
    return deltas.reshape(n, c // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)


def _rank_within_groups(groups: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of ``groups`` and the 0-based rank of each element inside its group."""
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.arange(groups.numel(), device=groups.device) - starts[sorted_groups]
    return order, ranks


@torch.no_grad()
def generate_proposals(
    anchors: Sequence[Tensor],
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    im_info: Tensor,
    params: ProposalParams,
    bbox_xform_clip: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """Proposals of every level for a minibatch.

    Args:
        anchors: per level ``(H*W*A, 4)``, ``(H, W, A)`` order.
        objectness: per level ``(N, A, H, W)`` probabilities.
        deltas: per level ``(N, 4A, H, W)`` box deltas.
        im_info: ``(N, 3)`` = (scaled height, scaled width, im_scale).
    Returns:
        per level, RoIs ``(K_l, 5)`` and their scores ``(K_l,)``; inside a level the RoIs are grouped by
        image, each image's sorted by decreasing score (Detectron's ``rpn_rois_fpn<l>`` / ``rpn_roi_probs``).
    """
    if not (len(anchors) == len(objectness) == len(deltas)) or len(anchors) == 0:
        raise ValueError(
            f"need anchors, objectness and deltas for the same levels, got {len(anchors)}, {len(objectness)}, "
            f"{len(deltas)}"
        )
    num_images = im_info.shape[0]
    top_scores, top_boxes = [], []
    for level_anchors, level_obj, level_deltas in zip(anchors, objectness, deltas):
        if level_obj.shape[0] != num_images:
            raise ValueError(f"objectness has {level_obj.shape[0]} images but im_info has {num_images} rows")
        n, a, h, w = level_obj.shape
        if level_deltas.shape != (n, 4 * a, h, w) or level_anchors.shape[0] != h * w * a:
            raise ValueError(
                f"objectness {tuple(level_obj.shape)}, deltas {tuple(level_deltas.shape)} and "
                f"{level_anchors.shape[0]} anchors do not describe the same level"
            )
        # Top-k straight from the (A, H, W)-ordered map (no transposed copy), then index in (H, W, A) order.
        k = h * w * a
        if 0 < params.pre_nms_top_n < k:
            k = params.pre_nms_top_n
        scores, idx = level_obj.reshape(n, -1).topk(k, dim=1, sorted=True)
        a_idx, hw_idx = idx // (h * w), idx % (h * w)
        batch = torch.arange(n, device=idx.device)[:, None]
        picked_deltas = level_deltas.reshape(n, a, 4, h * w)[batch, a_idx, :, hw_idx]  # (N, k, 4)
        picked_anchors = level_anchors[(hw_idx * a + a_idx).reshape(-1)]
        boxes = decode_boxes(picked_anchors, picked_deltas.reshape(-1, 4), RPN_BOX_WEIGHTS, bbox_xform_clip)
        top_scores.append(scores)
        top_boxes.append(boxes.reshape(num_images, k, 4))

    num_levels = len(anchors)
    level_of = torch.cat(
        [torch.full((s.shape[1],), lvl, dtype=torch.int64, device=s.device) for lvl, s in enumerate(top_scores)]
    )
    rois_out: list[list[Tensor]] = [[] for _ in range(num_levels)]
    scores_out: list[list[Tensor]] = [[] for _ in range(num_levels)]
    for i in range(num_images):
        height, width = (float(v) for v in im_info[i, :2].tolist())
        boxes = clip_boxes(torch.cat([b[i] for b in top_boxes]), height, width)
        scores = torch.cat([s[i] for s in top_scores])
        keep = filter_small_boxes(boxes, params.min_size, im_info[i])
        boxes, scores, levels = boxes[keep], scores[keep], level_of[keep]
        if params.nms_thresh > 0:
            keep = batched_nms(boxes, scores, levels, params.nms_thresh, legacy_plus_one=True)
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            order, ranks = _rank_within_groups(levels)
            if params.post_nms_top_n > 0:
                order = order[ranks < params.post_nms_top_n]
        else:  # Detectron skips both NMS and the post-NMS cut
            order, _ = _rank_within_groups(levels)
        boxes, scores, levels = boxes[order], scores[order], levels[order]
        counts = torch.bincount(levels, minlength=num_levels).tolist()
        batch_col = boxes.new_full((boxes.shape[0], 1), float(i))
        for lvl, (r, s) in enumerate(zip(torch.cat((batch_col, boxes), 1).split(counts), scores.split(counts))):
            rois_out[lvl].append(r)
            scores_out[lvl].append(s)
    return [torch.cat(r) for r in rois_out], [torch.cat(s) for s in scores_out]


def proposals_as_detections(rois: Tensor, scores: Tensor, im_info: Tensor) -> list[dict[str, Tensor]]:
    """RPN-only inference output: per image ``boxes`` ``(D, 4)`` in original-image pixels and objectness
    ``scores`` ``(D,)``, highest first (Detectron's ``rpn_generator.im_proposals``)."""
    out = []
    for i in range(im_info.shape[0]):
        mine = rois[:, 0] == i
        img_scores = scores[mine]
        order = torch.argsort(img_scores, descending=True, stable=True)
        out.append({"boxes": rois[mine][order, 1:5] / im_info[i, 2], "scores": img_scores[order]})
    return out
