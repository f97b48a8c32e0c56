"""detectron2's ``KRCNNConvDeconvUpsampleHead``, keypoint heatmap targets, loss and decoding.

Head: ``KRCNN.NUM_STACKED_CONVS`` 3x3 convs of ``KRCNN.CONV_HEAD_DIM`` (+ ReLU, no norm: d2 has none), a 4x4
stride-2 deconv to ``KRCNN.NUM_KEYPOINTS`` maps, then a bilinear x2 upsample (align_corners False): heatmaps of
4x the pooled side. d2's init: every weight ``kaiming_normal(fan_out, relu)``, biases 0. Caffe2 names (d2's
converter): ``conv_fcn<i>``, ``kps_score_lowres``.

Targets (d2's ``keypoints_to_heatmap``): a keypoint at x in box [x1, x2) falls in bin
``floor((x - x1) * S / (x2 - x1))``, one on the far edge in bin S - 1; a keypoint counts when visible (v > 0) and
inside. Loss: softmax cross-entropy over the S*S bins summed over the counted keypoints, divided by their
number (``KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS``) or by ``images * K * BATCH_SIZE_PER_IM * FG_FRACTION``, times
``KRCNN.LOSS_WEIGHT``. Decoding (d2's ``heatmaps_to_keypoints``): bicubic resize to the ceil'd box size,
argmax, ``+ 0.5`` pixel centres scaled back by ``size / ceil(size)``; the score is d2's (the resized logit's
softmax against the heatmap's bins).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.registry import register
from pydetectron.modeling.roi_features import RoIFeatureExtractor, build_roi_feature_extractor
from pydetectron.ops.conv import Conv2d

UP_SCALE = 2.0  # d2's fixed bilinear upsampling after the deconv
DECONV_KERNEL = 4


class KRCNNConvDeconvUpsampleHead(nn.Module):
    """``forward(features, rois) -> (F, K, 4S, 4S)`` heatmap logits (S the pooled side)."""

    def __init__(self, pooler: RoIFeatureExtractor, dim_in: int, conv_dims: Sequence[int], num_keypoints: int) -> None:
        super().__init__()
        self.roi_xform = pooler
        self.convs = nn.ModuleList()
        for dim in conv_dims:
            self.convs.append(Conv2d(dim_in, dim, 3, padding=1))
            dim_in = dim
        self.score_lowres = nn.ConvTranspose2d(dim_in, num_keypoints, DECONV_KERNEL, stride=2,
                                               padding=DECONV_KERNEL // 2 - 1)
        for name, param in self.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        x = self.roi_xform(features, rois)
        for conv in self.convs:
            x = F.relu(conv(x))
        x = self.score_lowres(x)
        return F.interpolate(x, scale_factor=UP_SCALE, mode="bilinear", align_corners=False)

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        mapping: Dict[str, str | None] = {}
        for i in range(len(self.convs)):
            mapping[f"convs.{i}.weight"], mapping[f"convs.{i}.bias"] = f"conv_fcn{i + 1}_w", f"conv_fcn{i + 1}_b"
        mapping["score_lowres.weight"], mapping["score_lowres.bias"] = "kps_score_lowres_w", "kps_score_lowres_b"
        return mapping


@register("keypoint_head", "KRCNNConvDeconvUpsampleHead")
def build_krcnn_conv_deconv_upsample_head(cfg, dim_in: int, spatial_scales: Sequence[float]):
    k = cfg.KRCNN
    side = 2 * int(UP_SCALE) * int(k.ROI_XFORM_RESOLUTION)
    if int(k.HEATMAP_SIZE) != side:
        raise ValueError(f"KRCNN.HEATMAP_SIZE = {k.HEATMAP_SIZE}, but KRCNNConvDeconvUpsampleHead makes "
                         f"{side} x {side} heatmaps (4 x KRCNN.ROI_XFORM_RESOLUTION {k.ROI_XFORM_RESOLUTION}): "
                         f"set it to {side}")
    return KRCNNConvDeconvUpsampleHead(build_roi_feature_extractor(cfg, k, spatial_scales), dim_in,
                                       [int(k.CONV_HEAD_DIM)] * int(k.NUM_STACKED_CONVS), int(k.NUM_KEYPOINTS))


def keypoints_to_heatmap(keypoints: torch.Tensor, rois: torch.Tensor, heatmap_size: int
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """d2's ``_keypoints_to_heatmap``: keypoints ``(N, K, 3)``, rois ``(N, 4)`` -> (bin index ``y * S + x``,
    0 where not counted, int64 ``(N, K)``; counted ``(N, K)`` int64 0 / 1)."""
    if rois.numel() == 0:
        empty = rois.new_zeros((0, keypoints.shape[1]), dtype=torch.int64)
        return empty, empty.clone()
    offset_x, offset_y = rois[:, 0][:, None], rois[:, 1][:, None]
    scale_x = (heatmap_size / (rois[:, 2] - rois[:, 0]))[:, None]
    scale_y = (heatmap_size / (rois[:, 3] - rois[:, 1]))[:, None]
    x, y = keypoints[..., 0], keypoints[..., 1]
    x_boundary = x == rois[:, 2][:, None]
    y_boundary = y == rois[:, 3][:, None]
    x = ((x - offset_x) * scale_x).floor().long()
    y = ((y - offset_y) * scale_y).floor().long()
    x[x_boundary] = heatmap_size - 1
    y[y_boundary] = heatmap_size - 1
    inside = (x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size)
    valid = (inside & (keypoints[..., 2] > 0)).long()
    return (y * heatmap_size + x) * valid, valid


def keypoint_rcnn_loss(logits: torch.Tensor, keypoints: torch.Tensor, rois: torch.Tensor,
                       normalizer: float | None) -> torch.Tensor:
    """d2's ``keypoint_rcnn_loss`` on heatmap logits ``(N, K, S, S)`` for RoIs `rois` ``(N, 4)`` with gt
    `keypoints` ``(N, K, 3)``; `normalizer` None = the number of counted keypoints. 0 (with a graph) when no
    keypoint counts."""
    targets, valid = keypoints_to_heatmap(keypoints, rois, logits.shape[2])
    valid = torch.nonzero(valid.reshape(-1)).squeeze(1)
    if valid.numel() == 0:
        return logits.sum() * 0
    n, k, h, w = logits.shape
    loss = F.cross_entropy(logits.reshape(n * k, h * w)[valid], targets.reshape(-1)[valid], reduction="sum")
    return loss / (valid.numel() if normalizer is None else normalizer)


def heatmaps_to_keypoints(maps: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """d2's ``heatmaps_to_keypoints``: logits ``(R, K, S, S)`` over boxes ``(R, 4)`` -> ``(R, K, 4)`` =
    (x, y, logit, score) in the boxes' pixels."""
    offset_x, offset_y = rois[:, 0], rois[:, 1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    num_rois, num_keypoints = maps.shape[:2]
    xy_preds = maps.new_zeros(num_rois, num_keypoints, 4)
    width_corrections = widths / widths_ceil
    height_corrections = heights / heights_ceil
    keypoints_idx = torch.arange(num_keypoints, device=maps.device)
    for i in range(num_rois):
        outsize = (int(heights_ceil[i]), int(widths_ceil[i]))
        roi_map = F.interpolate(maps[[i]], size=outsize, mode="bicubic", align_corners=False)[0]
        max_score = roi_map.view(num_keypoints, -1).max(1)[0].view(num_keypoints, 1, 1)
        full = (roi_map - max_score).exp_()
        pooled = (maps[i] - max_score).exp_()
        roi_map_scores = full / pooled.sum((1, 2), keepdim=True)
        w = roi_map.shape[2]
        pos = roi_map.view(num_keypoints, -1).argmax(1)
        x_int = pos % w
        y_int = (pos - x_int) // w
        xy_preds[i, :, 0] = (x_int.float() + 0.5) * width_corrections[i] + offset_x[i]
        xy_preds[i, :, 1] = (y_int.float() + 0.5) * height_corrections[i] + offset_y[i]
        xy_preds[i, :, 2] = roi_map[keypoints_idx, y_int, x_int]
        xy_preds[i, :, 3] = roi_map_scores[keypoints_idx, y_int, x_int]
    return xy_preds
