"""RetinaNet's labels, losses and inference as detectron2 computes them (``meta_arch/retinanet.py``,
``dense_detector.py``), for ``modeling.retinanet.RetinaNet`` in ``MODEL.CONVENTIONS: detectron2``.

- Layout: the head's ``(N, A * K, H, W)`` maps are read as ``(N, H * W * A, K)`` (``permute_to_n_hwa_k``):
  channel ``a * K + k``, the layout Detectron's head has too; neither has a background class.
- Anchors: detectron2's ``DefaultAnchorGenerator`` with, at level l (stride 2^l), the sizes
  ``ANCHOR_SCALE * 2^l * 2^(o / SCALES_PER_OCTAVE)`` for each octave o (detectron2's
  ``[x, x * 2^(1/3), x * 2^(2/3)]``) and ``ASPECT_RATIOS`` within each size, offset ``MODEL.ANCHOR_OFFSET``.
- Labels (per image, all levels at once): ``Matcher([NEGATIVE_OVERLAP, POSITIVE_OVERLAP], [0, -1, 1],
  allow_low_quality_matches=True)`` on the IoU (no +1) of the image's non-crowd gt boxes with every anchor;
  labels ``0..K-1`` (our class ``c`` is ``c - 1``), ``K`` background, ``-1`` ignored.
- Losses: the sigmoid focal loss (``LOSS_ALPHA``, ``LOSS_GAMMA``; alpha < 0 weighs nothing) summed over
  every class of every non-ignored anchor, and detectron2's dense box loss (smooth-L1 with ``BBOX_REG_BETA``,
  or GIoU: ``BBOX_REG_LOSS_TYPE``) summed over the foreground anchors, times ``BBOX_REG_WEIGHT``; both divided
  by the loss normaliser (``LossNormalizer``).
- Inference per image: at each level the sigmoid scores above ``INFERENCE_TH``, the best ``PRE_NMS_TOP_N``
  of them, decoded against their anchors (not clipped); then all levels together: NMS per class
  (``TEST.NMS``, no +1), the ``TEST.DETECTIONS_PER_IM`` best, and ``detector_postprocess`` to the original size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydetectron.boxes import box_iou
from pydetectron.modeling.detectron2.anchors import DefaultAnchorGenerator, retinanet_anchor_sizes
from pydetectron.modeling.detectron2.box_transform import Box2BoxTransform
from pydetectron.modeling.detectron2.losses import dense_box_regression_loss
from pydetectron.modeling.detectron2.matcher import Matcher
from pydetectron.modeling.detectron2.postprocess import detector_postprocess
from pydetectron.ops.nms import batched_nms
from pydetectron.utils.distributed import average_scalars, collective_device, get_world_size

if TYPE_CHECKING:
    from pydetectron.modeling.retinanet import RetinaNetSettings


def permute_to_n_hwa_k(tensor: Tensor, k: int) -> Tensor:
    """``(N, A * k, H, W)`` -> ``(N, H * W * A, k)``, rows ordered (y, x, a) as the anchors are."""
    if tensor.dim() != 4 or tensor.shape[1] % k:
        raise ValueError(f"expected (N, A * {k}, H, W) predictions, got {tuple(tensor.shape)}")
    n, _, h, w = tensor.shape
    return tensor.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """The summed sigmoid focal loss of `logits` against 0/1 `targets` (same shape), in fvcore's form:
    ``alpha_t * BCE * (1 - p_t)^gamma`` with ``p_t = p`` on positives, ``1 - p`` on negatives and ``alpha_t``
    alpha / 1 - alpha (no weighting when alpha < 0)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


def label_anchors(anchors: Tensor, roidb: Sequence[dict], matcher: Matcher,
                  num_classes: int) -> Tuple[Tensor, Tensor]:
    """Labels ``(N, R)`` int64 (``0..K-1`` class, ``K`` background, ``-1`` ignored) and each anchor's matched gt
    box ``(N, R, 4)`` (zeros where there is no gt) for the ``(R, 4)`` anchors of all levels; crowd boxes and
    background entries of the roidb play no part (detectron2's data never gives them to the model)."""
    labels, matched = [], []
    for entry in roidb:
        gt_classes = torch.as_tensor(entry["gt_classes"]).to(anchors.device)
        keep = (gt_classes > 0) & ~torch.as_tensor(entry["is_crowd"]).bool().to(anchors.device)
        gt_boxes = torch.as_tensor(entry["boxes"]).to(anchors)[keep]
        if gt_boxes.shape[0] == 0:
            labels.append(torch.full((anchors.shape[0],), num_classes, dtype=torch.int64, device=anchors.device))
            matched.append(torch.zeros_like(anchors))
            continue
        matches, match_labels = matcher(box_iou(gt_boxes, anchors, legacy_plus_one=False))
        image_labels = gt_classes[keep][matches] - 1
        image_labels[match_labels == 0] = num_classes
        image_labels[match_labels == -1] = -1
        labels.append(image_labels)
        matched.append(gt_boxes[matches])
    return torch.stack(labels), torch.stack(matched)


class LossNormalizer(nn.Module):
    """detectron2's RetinaNet loss normaliser: an exponential moving average (start 100, momentum 0.9) of
    ``max(foreground anchors in the batch, 1)``, updated before each step's losses are divided by it.

    detectron2 keeps it as a Python attribute, so it restarts at 100 when training resumes; here it is a
    float64 buffer (``value``), so checkpoints and exact resume carry it. detectron2 updates each rank's own
    average with the rank's own count (nothing is all-reduced); here the count is averaged over the ranks
    first, so every rank holds the same value (DistributedDataParallel broadcasts rank 0's buffers each step,
    and the checkpoint, written by rank 0, is every rank's state). One process: detectron2's numbers exactly.
    """

    initial_value = 100.0
    momentum = 0.9

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(self.initial_value, dtype=torch.float64))

    def update(self, num_foreground: int) -> float:
        """The new average after a batch with `num_foreground` foreground anchors."""
        if getattr(self, "_is_replica", False):
            raise RuntimeError(
                "detectron2-mode RetinaNet keeps its loss normaliser as state, which DataParallel replicas cannot "
                "update: train with one GPU per process (tools/train_net_step.py --num-gpus N or torchrun, "
                "DistributedDataParallel)")
        count = float(max(int(num_foreground), 1))
        if get_world_size() > 1:
            count = average_scalars({"num_foreground": count}, collective_device())["num_foreground"]
        new = float(self.value) * self.momentum + count * (1 - self.momentum)
        self.value.fill_(new)
        return new

    def detectron_weight_mapping(self) -> Dict[str, None]:
        return {"value": None}  # training state, no Caffe2 blob


class D2RetinaNetRules:
    """detectron2's anchors, labels, losses and inference over the head's per-level outputs (see the module
    docstring)."""

    def __init__(self, settings: RetinaNetSettings, anchor_offset: float) -> None:
        self.settings = settings
        sizes = retinanet_anchor_sizes(settings.min_level, settings.max_level, settings.anchor_scale,
                                       settings.scales_per_octave)
        self.anchor_generator = DefaultAnchorGenerator([2.0**level for level in settings.levels], sizes,
                                                       settings.aspect_ratios, anchor_offset)
        self.box_transform = Box2BoxTransform(settings.box_weights)
        self.matcher = Matcher([settings.negative_overlap, settings.positive_overlap], [0, -1, 1],
                               allow_low_quality_matches=True)

    def anchors(self, features: Sequence[Tensor]) -> List[Tensor]:
        """Each level's ``(H * W * A, 4)`` anchors for the maps `features` (finest first)."""
        return self.anchor_generator([tuple(f.shape[-2:]) for f in features], features[0].device)

    def summed_losses(self, anchors: Sequence[Tensor], logits: Sequence[Tensor], deltas: Sequence[Tensor],
                      roidb: Sequence[dict]) -> Tuple[Tensor, Tensor, int]:
        """(focal loss sum, box loss sum, foreground anchors in the batch), before the normaliser."""
        s = self.settings
        num_classes = logits[0].shape[1] // s.num_anchors
        pred_logits = torch.cat([permute_to_n_hwa_k(x, num_classes) for x in logits], dim=1)
        pred_deltas = [permute_to_n_hwa_k(d, 4) for d in deltas]
        with torch.no_grad():
            labels, matched = label_anchors(torch.cat(list(anchors)), roidb, self.matcher, num_classes)
        valid = labels >= 0
        foreground = valid & (labels != num_classes)
        targets = F.one_hot(labels[valid], num_classes=num_classes + 1)[:, :-1].to(pred_logits.dtype)
        loss_cls = sigmoid_focal_loss(pred_logits[valid], targets, s.alpha, s.gamma)
        loss_box = dense_box_regression_loss(list(anchors), self.box_transform, pred_deltas, list(matched),
                                             foreground, box_reg_loss_type=s.bbox_loss_type,
                                             smooth_l1_beta=s.bbox_beta)
        return loss_cls, loss_box, int(foreground.sum())

    def detections(self, anchors: Sequence[Tensor], logits: Sequence[Tensor], deltas: Sequence[Tensor],
                   image: int, input_size: Tuple[float, float], output_size: Tuple[int, int]) -> Dict[str, Tensor]:
        """detectron2's ``inference_single_image`` for image `image`, then ``detector_postprocess`` from
        `input_size` (im_info's scaled ``(h, w)``) to `output_size` ``(height, width)``; classes are ours (1..K)."""
        s = self.settings
        num_classes = logits[0].shape[1] // s.num_anchors
        boxes, scores, classes = [], [], []
        for level_anchors, x, d in zip(anchors, logits, deltas):
            level_scores = permute_to_n_hwa_k(x[image:image + 1], num_classes)[0].sigmoid()
            keep = level_scores > s.inference_th
            kept_scores = level_scores[keep]
            candidates = torch.nonzero(keep)  # (anchor, class) rows
            kept_scores, order = kept_scores.topk(min(candidates.shape[0], s.pre_nms_top_n))
            anchor_index, class_index = candidates[order].unbind(dim=1)
            level_deltas = permute_to_n_hwa_k(d[image:image + 1], 4)[0]
            boxes.append(self.box_transform.apply_deltas(level_deltas[anchor_index], level_anchors[anchor_index])
                         if s.bbox_reg else level_anchors[anchor_index])
            scores.append(kept_scores)
            classes.append(class_index)
        boxes_t, scores_t, classes_t = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        keep = batched_nms(boxes_t, scores_t, classes_t, s.nms, legacy_plus_one=False)[: s.detections_per_im]
        result = {"boxes": boxes_t[keep], "scores": scores_t[keep], "classes": classes_t[keep] + 1}
        return detector_postprocess(result, input_size, output_size)
