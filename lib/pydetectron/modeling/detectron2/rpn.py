"""detectron2's RPN (``proposal_generator/rpn.py`` and ``find_top_rpn_proposals``), behind our RPN contract.

Training labels, per image: the image's non-crowd gt boxes (detectron2's mapper drops crowd boxes) are
matched to all anchors by IoU (no +1) with ``Matcher([TRAIN.RPN_NEGATIVE_OVERLAP, RPN_POSITIVE_OVERLAP],
[0, -1, 1], allow_low_quality_matches=True)``; with ``TRAIN.RPN_STRADDLE_THRESH >= 0`` (detectron2's
``BOUNDARY_THRESH``) anchors reaching further outside the image are then ignored (-1 keeps all, detectron2's
default); ``subsample_labels`` keeps ``TRAIN.RPN_BATCH_SIZE_PER_IM`` anchors with ``RPN_FG_FRACTION``
positives. Losses: ``loss_rpn_cls`` = summed sigmoid cross-entropy over the sampled anchors and
``loss_rpn_loc`` = summed smooth-L1 (``RPN.SMOOTH_L1_BETA``) or GIoU (``RPN.BBOX_REG_LOSS_TYPE``) over the
positives, both divided by ``RPN_BATCH_SIZE_PER_IM * images``, times ``RPN.LOSS_WEIGHT`` (the box loss also
times ``RPN.BBOX_REG_LOSS_WEIGHT``).

Proposals, per image: the ``RPN_PRE_NMS_TOP_N`` best logits of each level, decoded with
``Box2BoxTransform(RPN.BBOX_REG_WEIGHTS)``; non-finite ones raise in training and are dropped in inference;
boxes are clipped to the image (``[0, W] x [0, H]``), those with a side ``<= RPN_MIN_SIZE`` dropped (network-
input pixels), NMS (``RPN_NMS_THRESH``) runs per level, and the ``RPN_POST_NMS_TOP_N`` best over all levels
are kept, by decreasing logit. TRAIN.* values apply in training, TEST.* in inference. Proposals are not
differentiated (detectron2 detaches them).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydetectron.boxes import box_iou, clip_boxes, filter_small_boxes
from pydetectron.modeling.anchors import GridAnchorGenerator
from pydetectron.modeling.detectron2.box_transform import Box2BoxTransform
from pydetectron.modeling.detectron2.losses import BOX_REG_LOSS_TYPES, dense_box_regression_loss
from pydetectron.modeling.detectron2.matcher import Matcher
from pydetectron.modeling.detectron2.sampling import subsample_labels
from pydetectron.modeling.proposals import ProposalParams, flatten_deltas, flatten_scores
from pydetectron.modeling.rpn_head import RPNHead, RPNOutput, one_cpu_thread
from pydetectron.modeling.targets.rpn import anchors_inside_image, rpn_gt_boxes
from pydetectron.ops.nms import batched_nms


def label_and_sample_anchors(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    image_sizes: Sequence[tuple[float, float]],
    matcher: Matcher,
    boundary_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """detectron2's ``label_and_sample_anchors``: labels ``(N, R)`` int8 (1 sampled positive, 0 sampled
    negative, -1 otherwise) and each anchor's matched gt box ``(N, R, 4)`` (zeros for an image without gt)."""
    labels, matched = [], []
    for boxes, (height, width) in zip(gt_boxes, image_sizes):
        matched_idxs, labels_i = matcher(box_iou(boxes, anchors, legacy_plus_one=False))
        if boundary_thresh >= 0:
            labels_i[~anchors_inside_image(anchors, height, width, boundary_thresh)] = -1
        pos_idx, neg_idx = subsample_labels(labels_i, batch_size_per_image, positive_fraction, 0, generator)
        labels_i.fill_(-1)
        labels_i[pos_idx] = 1
        labels_i[neg_idx] = 0
        labels.append(labels_i)
        matched.append(boxes[matched_idxs] if boxes.shape[0] else torch.zeros_like(anchors))
    return torch.stack(labels), torch.stack(matched)


@torch.no_grad()
def find_top_rpn_proposals(
    anchors: Sequence[Tensor],
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    box2box_transform: Box2BoxTransform,
    image_sizes: Sequence[tuple[float, float]],
    params: ProposalParams,
    training: bool,
) -> list[tuple[Tensor, Tensor]]:
    """Each image's proposals ``(P, 4)`` and their logits ``(P,)``, best first (see the module docstring).

    Args:
        anchors: per level ``(R_l, 4)``; logits per level ``(N, R_l)``; deltas per level ``(N, R_l, 4)``.
        image_sizes: each image's (height, width) in network-input pixels, without padding.
    ``params.pre_nms_top_n`` is per level and image, ``post_nms_top_n`` per image (``<= 0``: no limit).
    """
    num_images = len(image_sizes)
    top_logits, top_boxes, level_ids = [], [], []
    for level, (level_anchors, level_logits, level_deltas) in enumerate(zip(anchors, logits, deltas)):
        k = level_logits.shape[1]
        if params.pre_nms_top_n > 0:
            k = min(k, params.pre_nms_top_n)
        # detectron2 decodes every anchor and then picks; decoding only the picked ones gives the same boxes.
        scores, idx = level_logits.topk(k, dim=1)
        batch = torch.arange(num_images, device=idx.device)[:, None]
        picked = box2box_transform.apply_deltas(level_deltas[batch, idx].reshape(-1, 4),
                                                level_anchors[idx.reshape(-1)])
        top_logits.append(scores)
        top_boxes.append(picked.reshape(num_images, k, 4))
        level_ids.append(torch.full((k,), level, dtype=torch.int64, device=idx.device))
    all_logits, all_boxes, all_levels = torch.cat(top_logits, 1), torch.cat(top_boxes, 1), torch.cat(level_ids)
    results = []
    for i, (height, width) in enumerate(image_sizes):
        boxes, scores, levels = all_boxes[i], all_logits[i], all_levels
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(valid.all()):
            if training:
                raise FloatingPointError("RPN predicted boxes or scores contain Inf/NaN: training has diverged")
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        boxes = clip_boxes(boxes, height, width, legacy_plus_one=False)
        keep = filter_small_boxes(boxes, params.min_size, legacy_plus_one=False)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes, scores, levels, params.nms_thresh, legacy_plus_one=False)
        if params.post_nms_top_n > 0:
            keep = keep[: params.post_nms_top_n]
        results.append((boxes[keep], scores[keep]))
    return results


class Detectron2RPN(nn.Module):
    """detectron2's RPN with our contract: ``forward(features, im_info, roidb=None) -> RPNOutput``.

    ``rois`` ``(P, 5)`` are every image's proposals in turn (network-input pixels, best first per image),
    ``scores`` their objectness logits; in training with ``generate_in_training`` False (an RPN-only model)
    only the losses are computed. The head is Detectron's (same layers, init and Caffe2 names).
    """

    def __init__(
        self,
        head: RPNHead,
        anchor_generator: GridAnchorGenerator,
        feature_indices: Sequence[int],
        matcher: Matcher,
        box2box_transform: Box2BoxTransform,
        batch_size_per_image: int,
        positive_fraction: float,
        boundary_thresh: float,
        train_params: ProposalParams,
        test_params: ProposalParams,
        loss_weights: tuple[float, float],
        box_reg_loss_type: str,
        smooth_l1_beta: float,
        generate_in_training: bool,
    ) -> None:
        super().__init__()
        if box_reg_loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(f"RPN.BBOX_REG_LOSS_TYPE must be one of {BOX_REG_LOSS_TYPES}, got {box_reg_loss_type!r}")
        self.head = head
        self.anchor_generator = anchor_generator
        self.feature_indices = list(feature_indices)
        self.matcher = matcher
        self.box2box_transform = box2box_transform
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.boundary_thresh = float(boundary_thresh)
        self.train_params = train_params
        self.test_params = test_params
        self.cls_loss_weight, self.box_loss_weight = (float(w) for w in loss_weights)
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.generate_in_training = bool(generate_in_training)
        self.generator: torch.Generator | None = None  # set to seed the anchor subsampling

    @classmethod
    def from_cfg(cls, cfg, head: RPNHead, anchor_generator: GridAnchorGenerator,
                 feature_indices: Sequence[int]) -> Detectron2RPN:
        t, r = cfg.TRAIN, cfg.RPN
        return cls(
            head,
            anchor_generator,
            feature_indices,
            Matcher([t.RPN_NEGATIVE_OVERLAP, t.RPN_POSITIVE_OVERLAP], [0, -1, 1], allow_low_quality_matches=True),
            Box2BoxTransform(r.BBOX_REG_WEIGHTS),
            batch_size_per_image=t.RPN_BATCH_SIZE_PER_IM,
            positive_fraction=t.RPN_FG_FRACTION,
            boundary_thresh=t.RPN_STRADDLE_THRESH,
            train_params=ProposalParams.from_cfg(cfg, training=True),
            test_params=ProposalParams.from_cfg(cfg, training=False),
            loss_weights=(r.LOSS_WEIGHT, r.LOSS_WEIGHT * r.BBOX_REG_LOSS_WEIGHT),
            box_reg_loss_type=r.BBOX_REG_LOSS_TYPE,
            smooth_l1_beta=r.SMOOTH_L1_BETA,
            generate_in_training=bool(cfg.MODEL.FASTER_RCNN),
        )

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        return {f"head.{k}": v for k, v in self.head.detectron_weight_mapping().items()}

    def forward(self, features: Sequence[Tensor], im_info: Tensor, roidb: Sequence[dict] | None = None) -> RPNOutput:
        maps = [features[i] for i in self.feature_indices]
        logits, deltas = self.head(maps)
        # (N, A, H, W) -> (N, HWA) and (N, 4A, H, W) -> (N, HWA, 4), detectron2's layout; float32 under autocast
        logits = [flatten_scores(x.float()) for x in logits]
        deltas = [flatten_deltas(d.float()) for d in deltas]
        anchors = self.anchor_generator([m.shape[-2:] for m in maps], maps[0].device)
        image_sizes = [(float(h), float(w)) for h, w in im_info[:, :2].tolist()]
        training = roidb is not None
        losses: dict[str, Tensor] = {}
        if training:
            if len(roidb) != len(image_sizes):
                raise ValueError(f"roidb has {len(roidb)} entries but im_info has {len(image_sizes)} rows")
            losses = self.losses(anchors, logits, deltas, roidb, image_sizes)
            if not self.generate_in_training:
                return RPNOutput(None, None, losses)
        params = self.train_params if training else self.test_params
        with one_cpu_thread(maps[0].device):
            proposals = find_top_rpn_proposals(anchors, [x.detach() for x in logits], [d.detach() for d in deltas],
                                               self.box2box_transform, image_sizes, params, training)
        rois = [torch.cat((boxes.new_full((boxes.shape[0], 1), float(i)), boxes), dim=1)
                for i, (boxes, _) in enumerate(proposals)]
        return RPNOutput(torch.cat(rois), torch.cat([scores for _, scores in proposals]), losses)

    def losses(self, anchors: Sequence[Tensor], logits: Sequence[Tensor], deltas: Sequence[Tensor],
               roidb: Sequence[dict], image_sizes: Sequence[tuple[float, float]]) -> dict[str, Tensor]:
        """``loss_rpn_cls`` and ``loss_rpn_loc`` of a minibatch (logits ``(N, R_l)``, deltas ``(N, R_l, 4)``)."""
        device = logits[0].device
        gt_boxes = [rpn_gt_boxes(entry, i, device) for i, entry in enumerate(roidb)]
        with torch.no_grad(), one_cpu_thread(device):
            labels, matched = label_and_sample_anchors(
                torch.cat(list(anchors)), gt_boxes, image_sizes, self.matcher, self.boundary_thresh,
                self.batch_size_per_image, self.positive_fraction, self.generator,
            )
        loc = dense_box_regression_loss(anchors, self.box2box_transform, deltas, list(matched), labels == 1,
                                        self.box_reg_loss_type, self.smooth_l1_beta)
        valid = labels >= 0
        cls = F.binary_cross_entropy_with_logits(torch.cat(list(logits), dim=1)[valid],
                                                 labels[valid].to(torch.float32), reduction="sum")
        normalizer = self.batch_size_per_image * len(roidb)
        return {"loss_rpn_cls": cls / normalizer * self.cls_loss_weight,
                "loss_rpn_loc": loc / normalizer * self.box_loss_weight}
