"""Keypoint R-CNN heads (Detectron's ``keypoint_rcnn_heads.py``: ``roi_pose_head_v1convX`` and the C4
``ResNet_roi_conv5_head_for_keypoints``): RoI features -> per-keypoint heatmaps.

How the detector calls it (``head = registry.build('keypoint_head', cfg.KRCNN.ROI_KEYPOINTS_HEAD, cfg,
dim_in, spatial_scales)``, `dim_in` / `spatial_scales` those of the maps it pools from, finest first):

- ``heatmaps = head(features, keypoint_rois)``: `keypoint_rois` ``(F, 5)`` = [batch, x1, y1, x2, y2] in
  network-input pixels -> logits ``(F, K, S, S)``, ``K = KRCNN.NUM_KEYPOINTS``, ``S = KRCNN.HEATMAP_SIZE``
  (checked against the layer stack when the head is built). RoI pooling uses ``KRCNN.ROI_XFORM_*``.
- Training: ``targets.keypoint.keypoint_rcnn_targets`` gives the RoIs and labels, :func:`keypoint_rcnn_loss`
  the loss (its `normalizer` argument only when ``KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS`` is False).
- Inference: pool the final detections (scaled to the input), then :func:`heatmaps_to_keypoints` with the
  same detections in original-image coordinates gives ``(D, K, 4)`` = (x, y, logit, prob); the detector's
  ``keypoints`` output ``(D, K, 3)`` is ``[..., :3]`` (score = heatmap logit, as Detectron's results).
  With ``KRCNN.NMS_OKS``, Detectron then keeps only :func:`nms_oks` ``(keypoints, boxes, 0.3, sigmas)``.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.mask_head import BilinearUpsample2d, init_conv, roi_res5_stage
from pydetectron.modeling.registry import register
from pydetectron.modeling.roi_features import build_roi_feature_extractor
from pydetectron.ops.conv import Conv2d

# COCO's person sigmas (17 keypoints; COCOeval's default, Detectron's nms_oks), which only fit that category.
COCO_PERSON_OKS_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
) / 10.0


def _deconv_out(size: int, kernel: int, pad: int) -> int:
    return (size - 1) * 2 - 2 * pad + kernel


class PoseConvBody(nn.Module):
    """``roi_pose_head_v1convX``'s body: ``NUM_STACKED_CONVS`` x (conv ``conv_fcn{i}`` + ReLU), same size."""

    def __init__(self, cfg, dim_in: int) -> None:
        super().__init__()
        k = cfg.KRCNN
        kernel, hidden = int(k.CONV_HEAD_KERNEL), int(k.CONV_HEAD_DIM)
        layers: list[nn.Module] = []
        for i in range(int(k.NUM_STACKED_CONVS)):
            conv = Conv2d(dim_in if i == 0 else hidden, hidden, kernel, padding=kernel // 2)
            init_conv(conv, k.CONV_INIT, 0.01)
            layers += [conv, nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.dim_out = hidden if layers else dim_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        mapping: dict[str, str | None] = {}
        convs = [i for i, layer in enumerate(self.convs) if isinstance(layer, nn.Conv2d)]
        for n, i in enumerate(convs, start=1):
            mapping[f"convs.{i}.weight"] = f"conv_fcn{n}_w"
            mapping[f"convs.{i}.bias"] = f"conv_fcn{n}_b"
        return mapping


class KeypointRCNNHead(nn.Module):
    """A keypoint body (`body`: ``(F, dim_in, R, R) -> (F, body.dim_out, body_size, body_size)``) and
    Detectron's keypoint outputs: optional ``kps_deconv`` (2x transposed conv + ReLU), ``kps_score`` (1x1
    conv, or a 2x transposed conv with ``USE_DECONV_OUTPUT``; named ``kps_score_lowres`` when followed by
    the fixed bilinear ``UP_SCALE`` up-sampling ``kps_score``)."""

    def __init__(self, cfg, body: nn.Module, body_size: int, spatial_scales: Sequence[float]) -> None:
        super().__init__()
        k = cfg.KRCNN
        self.num_keypoints = int(k.NUM_KEYPOINTS)
        if self.num_keypoints < 1:
            raise ValueError(f"KRCNN.NUM_KEYPOINTS must be >= 1, got {self.num_keypoints}")
        self.roi_xform = build_roi_feature_extractor(cfg, k, spatial_scales)
        self.body = body
        dim, size = body.dim_out, body_size
        dk = int(k.DECONV_KERNEL)
        dpad = int(dk / 2 - 1)
        self.deconv = None
        if k.USE_DECONV:
            self.deconv = nn.ConvTranspose2d(dim, int(k.DECONV_DIM), dk, stride=2, padding=dpad)
            init_conv(self.deconv, "GaussianFill", 0.01)
            dim = int(k.DECONV_DIM)
            size = _deconv_out(size, dk, dpad)
        if k.USE_DECONV_OUTPUT:
            self.score = nn.ConvTranspose2d(dim, self.num_keypoints, dk, stride=2, padding=dpad)
            size = _deconv_out(size, dk, dpad)
        else:
            self.score = Conv2d(dim, self.num_keypoints, 1)
        init_conv(self.score, k.CONV_INIT, 0.001)
        up = int(k.UP_SCALE)
        self.upsample = BilinearUpsample2d(self.num_keypoints, up, "kps_score") if up > 1 else None
        size = size * up if up > 1 else size
        if int(k.HEATMAP_SIZE) != size:
            raise ValueError(
                f"KRCNN.HEATMAP_SIZE is {k.HEATMAP_SIZE} but the head (ROI_XFORM_RESOLUTION "
                f"{k.ROI_XFORM_RESOLUTION}, USE_DECONV {k.USE_DECONV}, USE_DECONV_OUTPUT {k.USE_DECONV_OUTPUT}, "
                f"UP_SCALE {k.UP_SCALE}) makes {size}x{size} heatmaps"
            )
        self.heatmap_size = size

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """features: body maps, finest first; rois ``(F, 5)`` -> heatmap logits ``(F, K, S, S)``.

        The convs run channels-last (pydetectron.ops.conv); the heatmaps are returned in the default
        contiguous layout.
        """
        x = self.body(self.roi_xform(features, rois))
        if self.deconv is not None:
            x = F.relu(self.deconv(x))
        x = self.score(x)
        return (self.upsample(x) if self.upsample is not None else x).contiguous()

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        mapping = {f"body.{k}": v for k, v in self.body.detectron_weight_mapping().items()}
        if self.deconv is not None:
            mapping.update({"deconv.weight": "kps_deconv_w", "deconv.bias": "kps_deconv_b"})
        score = "kps_score_lowres" if self.upsample is not None else "kps_score"
        mapping.update({"score.weight": f"{score}_w", "score.bias": f"{score}_b"})
        if self.upsample is not None:
            mapping.update({f"upsample.{k}": v for k, v in self.upsample.detectron_weight_mapping().items()})
        return mapping


@register("keypoint_head", "roi_pose_head_v1convX")
def roi_pose_head_v1convX(cfg, dim_in: int, spatial_scales: Sequence[float]) -> KeypointRCNNHead:
    """v1convX design: ``KRCNN.NUM_STACKED_CONVS`` convs, then the keypoint outputs."""
    return KeypointRCNNHead(cfg, PoseConvBody(cfg, dim_in), int(cfg.KRCNN.ROI_XFORM_RESOLUTION), spatial_scales)


@register("keypoint_head", "ResNet_roi_conv5_head_for_keypoints")
def resnet_roi_conv5_head_for_keypoints(cfg, dim_in: int, spatial_scales: Sequence[float]) -> KeypointRCNNHead:
    """C4 design: a res5 stage of its own (``_[pose]_res5``, ``KRCNN.DILATION``), then the keypoint outputs."""
    k = cfg.KRCNN
    res5, side = roi_res5_stage(cfg, "_[pose]_res5", dim_in, int(k.ROI_XFORM_RESOLUTION), int(k.DILATION))
    return KeypointRCNNHead(cfg, res5, side, spatial_scales)


def keypoint_rcnn_loss(
    heatmaps: torch.Tensor,
    locations: torch.Tensor,
    weights: torch.Tensor,
    loss_weight: float = 1.0,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Detectron's keypoint loss: a softmax over the S*S cells of each heatmap, cross-entropy with the
    target cell, weighted by the keypoint weights and divided by their sum (the visible keypoints), times
    ``KRCNN.LOSS_WEIGHT``; times `normalizer` (``KeypointTargets.normalizer``) when given.

    heatmaps ``(F, K, S, S)`` logits; locations ``(F, K)`` int64 cell indices; weights ``(F, K)``.
    """
    if heatmaps.shape[:2] != locations.shape or locations.shape != weights.shape:
        raise ValueError(
            f"heatmaps {tuple(heatmaps.shape)}, locations {tuple(locations.shape)} and weights "
            f"{tuple(weights.shape)} disagree"
        )
    if heatmaps.numel() == 0:
        return heatmaps.sum() * 0.0
    scores = heatmaps.reshape(-1, heatmaps.shape[2] * heatmaps.shape[3])
    w = weights.reshape(-1).to(scores.dtype)
    ce = F.cross_entropy(scores, locations.reshape(-1), reduction="none")
    loss = (ce * w).sum() / w.sum().clamp(min=1.0) * loss_weight
    return loss * normalizer if normalizer is not None else loss


def heatmaps_to_keypoints(heatmaps: torch.Tensor, boxes: torch.Tensor, min_size: int = 0) -> torch.Tensor:
    """Detectron's ``heatmaps_to_keypoints``: keypoint coordinates from heatmap logits.

    Each RoI's heatmaps are resized bicubically (OpenCV) to ``ceil(w) x ceil(h)`` cells, at least
    ``min_size`` (``KRCNN.INFERENCE_MIN_SIZE``), with ``w = max(x2 - x1, 1)``; the arg-max cell (x_int,
    y_int) maps to ``x1 + (x_int + 0.5) * w / cells_w`` (same for y).

    heatmaps ``(D, K, S, S)``; boxes ``(D, 4)`` ``[x1, y1, x2, y2]`` in the target (original) image.
    Returns ``(D, K, 4)`` float32 = (x, y, logit at the arg-max, spatial-softmax probability there).
    """
    if heatmaps.dim() != 4 or boxes.shape != (heatmaps.shape[0], 4):
        raise ValueError(f"heatmaps must be (D, K, S, S) and boxes (D, 4), got {tuple(heatmaps.shape)}, "
                         f"{tuple(boxes.shape)}")
    maps = heatmaps.detach().float().cpu().numpy().transpose(0, 2, 3, 1)  # (D, S, S, K) for OpenCV
    rois = boxes.detach().float().cpu().numpy()
    num, num_kps = heatmaps.shape[0], heatmaps.shape[1]
    out = np.zeros((num, num_kps, 4), dtype=np.float32)
    widths = np.maximum(rois[:, 2] - rois[:, 0], np.float32(1))
    heights = np.maximum(rois[:, 3] - rois[:, 1], np.float32(1))
    for i in range(num):
        map_w = int(max(np.ceil(widths[i]), min_size))
        map_h = int(max(np.ceil(heights[i]), min_size))
        roi_map = cv2.resize(maps[i], (map_w, map_h), interpolation=cv2.INTER_CUBIC).reshape(map_h, map_w, -1)
        flat = roi_map.reshape(-1, num_kps)
        pos = flat.argmax(axis=0)
        logits = flat[pos, np.arange(num_kps)]
        probs = 1.0 / np.exp(flat - logits[None, :]).sum(axis=0)
        x_int, y_int = pos % map_w, pos // map_w
        out[i, :, 0] = (x_int + 0.5) * (widths[i] / map_w) + rois[i, 0]
        out[i, :, 1] = (y_int + 0.5) * (heights[i] / map_h) + rois[i, 1]
        out[i, :, 2] = logits
        out[i, :, 3] = probs
    return torch.from_numpy(out)


def nms_oks(keypoints: torch.Tensor, boxes: torch.Tensor, thresh: float, sigmas: Sequence[float]) -> torch.Tensor:
    """Detectron's ``nms_oks`` (``KRCNN.NMS_OKS``, threshold 0.3 there): greedy suppression of detections
    whose keypoints have OKS > `thresh` with a better one; better = higher mean keypoint logit.

    keypoints ``(D, K, >=3)`` = (x, y, logit, ...) from :func:`heatmaps_to_keypoints`; boxes ``(D, 4)``
    inclusive, same coordinates; sigmas: K per-keypoint OKS sigmas (COCO person: 0.026 ... 0.089).
    OKS of j against the kept i uses i's box area (w + 1)(h + 1) as the scale. Returns kept indices
    ``(D',)`` int64, best first.
    """
    if keypoints.dim() != 3 or boxes.shape != (keypoints.shape[0], 4) or len(sigmas) != keypoints.shape[1]:
        raise ValueError(
            f"nms_oks needs keypoints (D, K, 3+), boxes (D, 4) and K sigmas; got {tuple(keypoints.shape)}, "
            f"{tuple(boxes.shape)}, {len(sigmas)} sigmas"
        )
    kps = keypoints.detach().double().cpu()
    rois = boxes.detach().double().cpu()
    variances = (2 * torch.as_tensor(sigmas, dtype=torch.float64)) ** 2
    areas = (rois[:, 2] - rois[:, 0] + 1) * (rois[:, 3] - rois[:, 1] + 1)
    order = torch.argsort(kps[:, :, 2].mean(dim=1), descending=True, stable=True)
    keep = []
    while order.numel() > 0:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        d2 = ((kps[rest, :, :2] - kps[i, :, :2]) ** 2).sum(dim=2)
        oks = torch.exp(-d2 / variances / (areas[i] + np.spacing(1)) / 2).mean(dim=1)
        order = rest[oks <= thresh]
    return torch.tensor(keep, dtype=torch.int64)
