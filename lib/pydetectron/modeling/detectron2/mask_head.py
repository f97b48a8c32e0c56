"""detectron2's ``MaskRCNNConvUpsampleHead``, its training targets, loss and inference.

Head: ``MRCNN.NUM_CONV`` 3x3 convs of ``MRCNN.DIM_REDUCED`` (conv -> ``MRCNN.NORM`` -> ReLU), a 2x2 stride-2
deconv + ReLU, a 1x1 predictor of K masks (background excluded; 1 when class-agnostic). d2's init:
``c2_msra_fill`` convs and deconv, predictor normal std 0.001, biases 0. Caffe2 names (Detectron's, which d2's converter
maps from): ``_[mask]_fcn<i>`` (with a norm ``_mask_fcn<i>`` + ``_gn`` / ``_bn``), ``conv5_mask``, ``mask_fcn_logits``.

Targets (d2's ``crop_and_resize``): a polygon gt is rasterised inside the RoI (``rasterize_polygons_within_box``:
shift by the box corner, scale by ``M / max(side, 0.1)``, pycocotools); a bitmap gt is cut by aligned RoIAlign
(sampling 0) and thresholded ``>= 0.5``. Loss: BCE-with-logits of the gt class's channel, averaged.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.detectron2.box_head import D2Conv
from pydetectron.modeling.detectron2.norms import d2_norm_spec
from pydetectron.modeling.layers import NormSpec, msra_fill_
from pydetectron.modeling.registry import register
from pydetectron.modeling.roi_features import RoIFeatureExtractor, build_roi_feature_extractor
from pydetectron.ops.conv import Conv2d
from pydetectron.ops.roi_align import roi_align


class MaskRCNNConvUpsampleHead(nn.Module):
    """``forward(features, rois) -> (F, C, 2S, 2S)`` logits (S the pooled side); ``predict(x)`` runs the
    layers on pooled ``(F, dim_in, S, S)`` features (Res5ROIHeads feeds it res5 maps; then `pooler` is None)."""

    class_layout = "detectron2"

    def __init__(self, pooler: RoIFeatureExtractor | None, dim_in: int, num_convs: int, conv_dim: int,
                 norm: NormSpec | None, num_outputs: int) -> None:
        super().__init__()
        self.roi_xform = pooler
        prefix = "_[mask]_fcn" if norm is None else "_mask_fcn"  # Detectron's FPN mask-head blob names
        self.convs = nn.ModuleList(
            D2Conv(dim_in if i == 0 else conv_dim, conv_dim, 3, norm, f"{prefix}{i + 1}") for i in range(num_convs))
        self.deconv = nn.ConvTranspose2d(conv_dim if num_convs else dim_in, conv_dim, 2, stride=2)
        msra_fill_(self.deconv.weight)
        nn.init.zeros_(self.deconv.bias)
        self.predictor = Conv2d(conv_dim, num_outputs, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)
        self.num_outputs = num_outputs

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.predictor(F.relu(self.deconv(x)))

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        if self.roi_xform is None:
            raise RuntimeError("this mask head reads res5 maps (Res5ROIHeads): call predict(res5_features)")
        return self.predict(self.roi_xform(features, rois))

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        mapping: Dict[str, str | None] = {}
        for i, conv in enumerate(self.convs):
            mapping.update({f"convs.{i}.{key}": blob for key, blob in conv.detectron_weight_mapping().items()})
        for layer, blob in (("deconv", "conv5_mask"), ("predictor", "mask_fcn_logits")):
            mapping[f"{layer}.weight"], mapping[f"{layer}.bias"] = f"{blob}_w", f"{blob}_b"
        return mapping


def build_mask_head(cfg, dim_in: int, pooler: RoIFeatureExtractor | None, num_convs: int) -> MaskRCNNConvUpsampleHead:
    m = cfg.MRCNN
    num_outputs = int(cfg.MODEL.NUM_CLASSES) - 1 if m.CLS_SPECIFIC_MASK else 1
    return MaskRCNNConvUpsampleHead(pooler, dim_in, num_convs, int(m.DIM_REDUCED),
                                    d2_norm_spec(m.NORM, "MRCNN.NORM"), num_outputs)


@register("mask_head", "MaskRCNNConvUpsampleHead")
def build_mask_rcnn_conv_upsample_head(cfg, dim_in: int, spatial_scales: Sequence[float]) -> MaskRCNNConvUpsampleHead:
    pooler = build_roi_feature_extractor(cfg, cfg.MRCNN, spatial_scales)
    return build_mask_head(cfg, dim_in, pooler, int(cfg.MRCNN.NUM_CONV))


def rasterize_polygons_within_box(polygons: Sequence[np.ndarray], box: np.ndarray, mask_size: int) -> torch.Tensor:
    """d2's ``rasterize_polygons_within_box``: bool ``(M, M)`` of the polygons (flat ``[x0, y0, x1, ...]`` in
    image pixels) cut to `box` (float32 ``[x1, y1, x2, y2]``) and scaled to M x M, in d2's dtypes."""
    w, h = box[2] - box[0], box[3] - box[1]
    shifted = []
    for poly in polygons:
        p = np.array(poly, dtype=np.float64)  # d2's PolygonMasks hold float64
        p[0::2] = p[0::2] - box[0]
        p[1::2] = p[1::2] - box[1]
        shifted.append(p)
    ratio_h = mask_size / max(h, 0.1)
    ratio_w = mask_size / max(w, 0.1)
    for p in shifted:
        if ratio_h == ratio_w:
            p *= ratio_h
        else:
            p[0::2] *= ratio_w
            p[1::2] *= ratio_h
    if not shifted:
        return torch.zeros((mask_size, mask_size), dtype=torch.bool)
    rle = mask_util.merge(mask_util.frPyObjects(shifted, mask_size, mask_size))
    return torch.from_numpy(mask_util.decode(rle).astype(bool))


def mask_targets(segms: Sequence, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
    """Bool ``(F, M, M)`` targets for RoIs `boxes` ``(F, 4)`` whose matched gt masks are `segms` (each a list of
    flat polygons or a ``uint8 (H, W)`` bitmap, network-input pixels): d2's ``PolygonMasks`` / ``BitMasks``
    ``crop_and_resize``."""
    if len(segms) != boxes.shape[0]:
        raise ValueError(f"{len(segms)} gt masks for {boxes.shape[0]} RoIs")
    out = torch.zeros((boxes.shape[0], mask_size, mask_size), dtype=torch.bool)
    cpu_boxes = boxes.detach().float().cpu()
    for i, segm in enumerate(segms):
        if isinstance(segm, np.ndarray) and segm.ndim == 2:
            bitmap = torch.from_numpy(np.ascontiguousarray(segm)).float()[None, None]
            roi = torch.cat([torch.zeros(1), cpu_boxes[i]])[None]
            out[i] = roi_align(bitmap, roi, (mask_size, mask_size), 1.0, 0, True)[0, 0] >= 0.5
        else:
            out[i] = rasterize_polygons_within_box(list(segm), cpu_boxes[i].numpy(), mask_size)
    return out.to(boxes.device)


def mask_rcnn_loss(logits: torch.Tensor, gt_classes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d2's ``mask_rcnn_loss``: mean BCE-with-logits of each RoI's gt-class channel (channel 0 when
    class-agnostic) against its ``(M, M)`` target; 0 (with a graph) when there is no RoI."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    if logits.shape[1] == 1:
        picked = logits[:, 0]
    else:
        picked = logits[torch.arange(logits.shape[0], device=logits.device), gt_classes]
    return F.binary_cross_entropy_with_logits(picked, targets.to(torch.float32), reduction="mean")


def mask_probs(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """d2's ``mask_rcnn_inference``: sigmoid of each detection's class channel (d2 class ids) -> ``(D, M, M)``."""
    if logits.shape[1] == 1:
        return logits[:, 0].sigmoid()
    return logits[torch.arange(logits.shape[0], device=logits.device), classes].sigmoid()

