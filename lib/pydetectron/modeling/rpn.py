"""Region Proposal Network: losses and the module the detector calls (the head is ``rpn_head.py``);
``build_rpn`` builds detectron2's RPN (``modeling/detectron2/rpn.py``) when ``MODEL.CONVENTIONS`` is
``'detectron2'``.

Detectron's ``rpn_heads.py`` (single feature map, e.g. C4) and ``FPN.add_fpn_rpn_outputs`` (one head
shared by all pyramid levels, stored once under the finest level's blob names). Objectness is a sigmoid
over ``A`` logits per location, or with ``RPN.CLS_ACTIVATION = 'softmax'`` (Detectron.pytorch) a softmax
over ``2A`` logits laid out ``[background x A, foreground x A]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from pydetectron.modeling.anchors import AnchorGenerator, fpn_anchor_generator
from pydetectron.modeling.detectron2.anchors import rpn_anchor_generator
from pydetectron.modeling.detectron2.rpn import Detectron2RPN
from pydetectron.modeling.fpn_levels import collect_proposals, level_indices
from pydetectron.modeling.losses import sigmoid_cross_entropy_loss, smooth_l1_loss, softmax_cross_entropy_loss
from pydetectron.modeling.proposals import ProposalParams, flatten_deltas, flatten_scores, generate_proposals
from pydetectron.modeling.rpn_head import RPNHead, RPNOutput, one_cpu_thread
from pydetectron.modeling.targets.rpn import RPNSampling, RPNTargets, rpn_targets

CLS_ACTIVATIONS = ("sigmoid", "softmax")


def _flatten_logits(logits: Tensor, softmax: bool) -> Tensor:
    """Logits to ``(N, HWA)`` (sigmoid) or ``(N, HWA, 2)`` (softmax, ``[background, foreground]``)."""
    if not softmax:
        return flatten_scores(logits)
    n, c, h, w = logits.shape
    return logits.reshape(n, 2, c // 2, h, w).permute(0, 3, 4, 2, 1).reshape(n, -1, 2)


def rpn_losses(
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    targets: RPNTargets,
    levels: Sequence[int] | None,
    softmax: bool,
    batch_size_per_im: int,
    weights: RPNLossWeights,
) -> dict[str, Tensor]:
    """Detectron's RPN losses.

    Single map (``levels=None``): ``loss_rpn_cls`` = sigmoid cross-entropy averaged over the labelled
    anchors of the minibatch; ``loss_rpn_bbox`` = smooth-L1 (beta ``RPN.SMOOTH_L1_BETA``, Detectron's 1/9)
    weighted by the outside weights, divided by the number of images. FPN: one pair per level,
    ``loss_rpn_cls_fpn<l>`` divided by ``RPN_BATCH_SIZE_PER_IM * images`` and ``loss_rpn_bbox_fpn<l>`` as above.
    With softmax objectness the classification loss is the mean over labelled anchors (per level with FPN),
    as Detectron.pytorch. ``RPN.LOSS_WEIGHT`` multiplies every loss and ``RPN.BBOX_REG_LOSS_WEIGHT`` the box
    losses too (1 = Detectron).
    """
    num_images = targets.labels.shape[0]
    sizes = [d.shape[1] // 4 * d.shape[2] * d.shape[3] for d in deltas]
    split = [t.split(sizes, dim=1) for t in (targets.labels, targets.bbox_targets,
                                            targets.bbox_inside_weights, targets.bbox_outside_weights)]
    names = [""] if levels is None else [f"_fpn{lvl}" for lvl in levels]
    if len(names) != len(logits):
        raise ValueError(f"{len(logits)} RPN outputs for levels {levels}")
    losses = {}
    for i, name in enumerate(names):
        labels, box_targets, inside_w, outside_w = (s[i] for s in split)
        flat_logits, flat_deltas = _flatten_logits(logits[i], softmax), flatten_deltas(deltas[i])
        if softmax:
            cls = softmax_cross_entropy_loss(flat_logits.reshape(-1, 2), labels.reshape(-1))
        else:
            normalizer = None if levels is None else batch_size_per_im * num_images
            cls = sigmoid_cross_entropy_loss(flat_logits, labels, normalizer)
        losses[f"loss_rpn_cls{name}"] = cls * weights.cls
        losses[f"loss_rpn_bbox{name}"] = weights.box * smooth_l1_loss(
            flat_deltas, box_targets, inside_w, outside_w, beta=weights.beta, normalizer=num_images
        )
    return losses


@dataclass(frozen=True)
class RPNLossWeights:
    """The RPN loss keys as plain values: ``cls`` = ``RPN.LOSS_WEIGHT``, ``box`` = ``RPN.LOSS_WEIGHT *
    RPN.BBOX_REG_LOSS_WEIGHT`` (detectron2's ``loss_weight`` dict), ``beta`` = ``RPN.SMOOTH_L1_BETA``."""

    cls: float
    box: float
    beta: float

    @classmethod
    def from_cfg(cls, cfg) -> RPNLossWeights:
        r = cfg.RPN
        return cls(float(r.LOSS_WEIGHT), float(r.BBOX_REG_LOSS_WEIGHT) * float(r.LOSS_WEIGHT), float(r.SMOOTH_L1_BETA))


class RPN(nn.Module):
    """The RPN the detector calls: ``forward(features, im_info, roidb=None) -> RPNOutput``.

    ``features`` are the body's maps, finest first, matching the ``spatial_scales`` given at build time;
    the RPN reads the maps of its own levels. In training (``roidb`` given) it returns the losses and,
    when ``generate_in_training`` (Faster R-CNN), proposals from TRAIN settings; in inference proposals
    from TEST settings. With FPN the proposals of all levels are collected into the best
    ``RPN_POST_NMS_TOP_N`` (times ``FPN.RPN_COLLECT_SCALE`` in training) over the whole minibatch.
    """

    def __init__(
        self,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        feature_indices: Sequence[int],
        levels: Sequence[int] | None,
        train_params: ProposalParams,
        test_params: ProposalParams,
        sampling: RPNSampling,
        loss_weights: RPNLossWeights,
        collect_scale: float,
        generate_in_training: bool,
        bbox_xform_clip: float,
    ) -> None:
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.feature_indices = list(feature_indices)
        self.levels = None if levels is None else list(levels)
        self.train_params = train_params
        self.test_params = test_params
        self.sampling = sampling
        self.loss_weights = loss_weights
        self.collect_scale = float(collect_scale)
        self.generate_in_training = generate_in_training
        self.bbox_xform_clip = float(bbox_xform_clip)
        self.generator: torch.Generator | None = None  # set to seed the anchor subsampling

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        return {f"head.{k}": v for k, v in self.head.detectron_weight_mapping().items()}

    def forward(self, features: Sequence[Tensor], im_info: Tensor, roidb: Sequence[dict] | None = None) -> RPNOutput:
        maps = [features[i] for i in self.feature_indices]
        logits, deltas = self.head(maps)
        # float32 for the losses and the decoding even when autocast ran the head in float16 / bfloat16
        logits, deltas = [x.float() for x in logits], [d.float() for d in deltas]
        anchors = self.anchor_generator([m.shape[-2:] for m in maps], maps[0].device)
        losses: dict[str, Tensor] = {}
        if roidb is not None:
            with one_cpu_thread(maps[0].device):
                targets = rpn_targets(torch.cat(anchors), roidb, im_info, self.sampling, self.generator)
            losses = rpn_losses(logits, deltas, targets, self.levels, self.head.softmax,
                                self.sampling.batch_size_per_im, self.loss_weights)
            if not self.generate_in_training:
                return RPNOutput(None, None, losses)
        params = self.train_params if roidb is not None else self.test_params
        # Proposals are not differentiated and are decoded in float32 even under mixed precision.
        probs = [self.head.objectness(x.detach().float()) for x in logits]
        with one_cpu_thread(maps[0].device):
            rois, scores = generate_proposals(
                anchors, probs, [d.detach().float() for d in deltas], im_info, params, self.bbox_xform_clip
            )
        if self.levels is None:
            return RPNOutput(rois[0], scores[0], losses)
        scale = self.collect_scale if roidb is not None else 1.0
        # Detectron.pytorch: int(RPN_POST_NMS_TOP_N * RPN_COLLECT_SCALE + 0.5) over the whole minibatch
        rois_all, scores_all = collect_proposals(rois, scores, int(params.post_nms_top_n * scale + 0.5),
                                                 per_image=roidb is None)
        return RPNOutput(rois_all, scores_all, losses)


def _level_of_scale(scale: float) -> int:
    level = -math.log2(scale)
    if abs(level - round(level)) > 1e-6:
        raise ValueError(f"spatial scale {scale} is not a power of 1/2")
    return int(round(level))


def build_rpn(cfg, dim_in: int, spatial_scales: Sequence[float]) -> nn.Module:
    """The RPN of ``cfg``: FPN multi-level when ``FPN.FPN_ON and FPN.MULTILEVEL_RPN``, else one map; Detectron's
    ``RPN`` or, with ``MODEL.CONVENTIONS: detectron2``, detectron2's (``Detectron2RPN``). Both take the same
    head (weights, init and Caffe2 names) and return ``RPNOutput``.

    ``spatial_scales`` are the body's, finest first (``[1/16]`` for C4, ``[1/4 .. 1/64]`` for FPN P2-P6).
    """
    activation = cfg.RPN.CLS_ACTIVATION
    if activation not in CLS_ACTIVATIONS:
        raise ValueError(f"RPN.CLS_ACTIVATION must be one of {CLS_ACTIVATIONS}, got {activation!r}")
    softmax = activation == "softmax"
    body_levels = [_level_of_scale(s) for s in spatial_scales]
    if cfg.FPN.FPN_ON and cfg.FPN.MULTILEVEL_RPN:
        levels = list(range(cfg.FPN.RPN_MIN_LEVEL, cfg.FPN.RPN_MAX_LEVEL + 1))
        feature_indices = level_indices(body_levels, cfg.FPN.RPN_MIN_LEVEL, cfg.FPN.RPN_MAX_LEVEL,
                                        "FPN.RPN_MIN_LEVEL..RPN_MAX_LEVEL")
        dim_out = dim_in  # Detectron's FPN RPN keeps the width of the pyramid
        suffix = f"_fpn{levels[0]}"
        loss_levels: list[int] | None = levels
    else:
        feature_indices = [len(spatial_scales) - 1]
        stride = 1.0 / spatial_scales[-1]
        if abs(stride - cfg.RPN.STRIDE) > 1e-6:
            raise ValueError(f"RPN.STRIDE = {cfg.RPN.STRIDE} but the RPN's feature map has stride {stride:g}")
        dim_out = dim_in if cfg.RPN.OUT_DIM_AS_IN_DIM else cfg.RPN.OUT_DIM
        suffix = ""
        loss_levels = None
    if cfg.MODEL.CONVENTIONS == "detectron2":
        if softmax:
            raise ValueError("RPN.CLS_ACTIVATION = 'softmax' has no detectron2 counterpart (its RPN is sigmoid)")
        strides = [2.0 ** body_levels[i] for i in feature_indices]
        d2_generator = rpn_anchor_generator(cfg, strides)
        head = RPNHead(dim_in, dim_out, d2_generator.num_cell_anchors, False, suffix)
        return Detectron2RPN.from_cfg(cfg, head, d2_generator, feature_indices)
    if loss_levels is not None:
        generator = fpn_anchor_generator(
            loss_levels[0], loss_levels[-1], cfg.FPN.RPN_ANCHOR_START_SIZE, cfg.FPN.RPN_ASPECT_RATIOS
        )
    else:
        generator = AnchorGenerator([stride], [cfg.RPN.SIZES], cfg.RPN.ASPECT_RATIOS)
    head = RPNHead(dim_in, dim_out, generator.num_cell_anchors, softmax, suffix)
    return RPN(
        head,
        generator,
        feature_indices,
        loss_levels,
        ProposalParams.from_cfg(cfg, training=True),
        ProposalParams.from_cfg(cfg, training=False),
        RPNSampling.from_cfg(cfg),
        RPNLossWeights.from_cfg(cfg),
        collect_scale=cfg.FPN.RPN_COLLECT_SCALE,
        generate_in_training=bool(cfg.MODEL.FASTER_RCNN),
        bbox_xform_clip=cfg.BBOX_XFORM_CLIP,
    )
