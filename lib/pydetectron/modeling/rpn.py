"""Region Proposal Network: heads, losses and the module the detector calls.

Detectron's ``rpn_heads.py`` (single feature map, e.g. C4) and ``FPN.add_fpn_rpn_outputs`` (one head
shared by all pyramid levels, stored once under the finest level's blob names). Objectness is a sigmoid
over ``A`` logits per location, or with ``RPN.CLS_ACTIVATION = 'softmax'`` (Detectron.pytorch) a softmax
over ``2A`` logits laid out ``[background x A, foreground x A]``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydetectron.modeling.anchors import AnchorGenerator, fpn_anchor_generator
from pydetectron.modeling.fpn_levels import collect_proposals, level_indices
from pydetectron.modeling.losses import sigmoid_cross_entropy_loss, smooth_l1_loss, softmax_cross_entropy_loss
from pydetectron.modeling.proposals import ProposalParams, flatten_deltas, flatten_scores, generate_proposals
from pydetectron.modeling.targets.rpn import RPNSampling, RPNTargets, rpn_targets

RPN_BBOX_BETA = 1.0 / 9.0
CLS_ACTIVATIONS = ("sigmoid", "softmax")


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for objectness logits and box deltas, applied to every map.

    Args:
        blob_suffix: ``''`` for a single map (``conv_rpn_w`` ...), ``'_fpn2'`` for FPN
            (``conv_rpn_fpn2_w`` ...), naming the Detectron blobs in :meth:`detectron_weight_mapping`.
    """

    def __init__(self, dim_in: int, dim_out: int, num_anchors: int, softmax: bool, blob_suffix: str = "") -> None:
        super().__init__()
        self.blob_suffix = blob_suffix
        self.softmax = softmax
        self.conv_rpn = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.rpn_cls_logits = nn.Conv2d(dim_out, num_anchors * (2 if softmax else 1), 1)
        self.rpn_bbox_pred = nn.Conv2d(dim_out, num_anchors * 4, 1)
        for conv in (self.conv_rpn, self.rpn_cls_logits, self.rpn_bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)  # Detectron's GaussianFill(std=0.01), zero bias
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per map ``(N, C, H, W)``: logits ``(N, A or 2A, H, W)`` and deltas ``(N, 4A, H, W)``."""
        logits, deltas = [], []
        for x in features:
            hidden = F.relu(self.conv_rpn(x))
            logits.append(self.rpn_cls_logits(hidden))
            deltas.append(self.rpn_bbox_pred(hidden))
        return logits, deltas

    def objectness(self, logits: Tensor) -> Tensor:
        """Foreground probability ``(N, A, H, W)`` from a map's logits."""
        if not self.softmax:
            return torch.sigmoid(logits)
        n, c, h, w = logits.shape
        return F.softmax(logits.reshape(n, 2, c // 2, h, w), dim=1)[:, 1]

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        return {
            f"{name}.{param}": f"{name}{self.blob_suffix}_{param[0]}"
            for name in ("conv_rpn", "rpn_cls_logits", "rpn_bbox_pred")
            for param in ("weight", "bias")
        }


class RPNOutput(NamedTuple):
    """``rois`` ``(K, 5)`` ``[batch_index, x1, y1, x2, y2]`` and objectness ``scores`` ``(K,)`` (``None``
    when an RPN-only model trains, as Detectron generates no proposals then); ``losses`` in training."""

    rois: Tensor | None
    scores: Tensor | None
    losses: dict[str, Tensor]


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
) -> dict[str, Tensor]:
    """Detectron's RPN losses.

    Single map (``levels=None``): ``loss_rpn_cls`` = sigmoid cross-entropy averaged over the labelled
    anchors of the minibatch; ``loss_rpn_bbox`` = smooth-L1 (beta 1/9) weighted by the outside weights,
    divided by the number of images. FPN: one pair per level, ``loss_rpn_cls_fpn<l>`` divided by
    ``RPN_BATCH_SIZE_PER_IM * images`` and ``loss_rpn_bbox_fpn<l>`` as above. With softmax
    objectness the classification loss is the mean over labelled anchors (per level with FPN),
    as Detectron.pytorch.
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
        losses[f"loss_rpn_cls{name}"] = cls
        losses[f"loss_rpn_bbox{name}"] = smooth_l1_loss(
            flat_deltas, box_targets, inside_w, outside_w, beta=RPN_BBOX_BETA, normalizer=num_images
        )
    return losses


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when on the CPU (results are identical: same kernels).

    Anchor labelling and proposal generation are dozens of small elementwise ops per image; each one over
    ~30k elements opens a parallel region, and on a busy machine every region waits for a descheduled
    thread. One thread does the same work without those waits: measured on 2 loaded cores, RPN targets
    for 4 images x 20k anchors took 35 ms instead of 136 ms (median), proposals 24 ms instead of 127 ms.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
            with _one_cpu_thread(maps[0].device):
                targets = rpn_targets(torch.cat(anchors), roidb, im_info, self.sampling, self.generator)
            losses = rpn_losses(logits, deltas, targets, self.levels, self.head.softmax,
                                self.sampling.batch_size_per_im)
            if not self.generate_in_training:
                return RPNOutput(None, None, losses)
        params = self.train_params if roidb is not None else self.test_params
        # Proposals are not differentiated and are decoded in float32 even under mixed precision.
        probs = [self.head.objectness(x.detach().float()) for x in logits]
        with _one_cpu_thread(maps[0].device):
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


def build_rpn(cfg, dim_in: int, spatial_scales: Sequence[float]) -> RPN:
    """The RPN of ``cfg``: FPN multi-level when ``FPN.FPN_ON and FPN.MULTILEVEL_RPN``, else one map.

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
        generator = fpn_anchor_generator(
            levels[0], levels[-1], cfg.FPN.RPN_ANCHOR_START_SIZE, cfg.FPN.RPN_ASPECT_RATIOS
        )
        dim_out = dim_in  # Detectron's FPN RPN keeps the width of the pyramid
        suffix = f"_fpn{levels[0]}"
        loss_levels: list[int] | None = levels
    else:
        feature_indices = [len(spatial_scales) - 1]
        stride = 1.0 / spatial_scales[-1]
        if abs(stride - cfg.RPN.STRIDE) > 1e-6:
            raise ValueError(f"RPN.STRIDE = {cfg.RPN.STRIDE} but the RPN's feature map has stride {stride:g}")
        generator = AnchorGenerator([stride], [cfg.RPN.SIZES], cfg.RPN.ASPECT_RATIOS)
        dim_out = dim_in if cfg.RPN.OUT_DIM_AS_IN_DIM else cfg.RPN.OUT_DIM
        suffix = ""
        loss_levels = None
    head = RPNHead(dim_in, dim_out, generator.num_cell_anchors, softmax, suffix)
    return RPN(
        head,
        generator,
        feature_indices,
        loss_levels,
        ProposalParams.from_cfg(cfg, training=True),
        ProposalParams.from_cfg(cfg, training=False),
        RPNSampling.from_cfg(cfg),
        collect_scale=cfg.FPN.RPN_COLLECT_SCALE,
        generate_in_training=bool(cfg.MODEL.FASTER_RCNN),
        bbox_xform_clip=cfg.BBOX_XFORM_CLIP,
    )
