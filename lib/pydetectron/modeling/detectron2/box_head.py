"""detectron2's ``FastRCNNConvFCHead``: pooled RoI features -> ``FAST_RCNN.NUM_STACKED_CONVS`` 3x3 convs of
``CONV_HEAD_DIM`` (each conv -> ``FAST_RCNN.NORM`` -> ReLU) -> ``FAST_RCNN.NUM_FC`` fcs of ``MLP_HEAD_DIM`` (each
-> ReLU). d2's init: convs ``c2_msra_fill``, fcs ``c2_xavier_fill``, biases 0.

Caffe2 names (what detectron2's converter maps from): convs ``head_conv<i>`` with norms ``head_conv<i>_<gn|bn>``
(Detectron's ``roi_Xconv1fc_gn_head`` names), fcs ``fc6``, ``fc7``, ... in order.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pydetectron.modeling.detectron2.norms import d2_norm_spec
from pydetectron.modeling.layers import NormSpec, msra_fill_, norm_weight_mapping, xavier_fill_
from pydetectron.modeling.registry import register
from pydetectron.modeling.roi_features import RoIFeatureExtractor, build_roi_feature_extractor
from pydetectron.ops.conv import Conv2d

FIRST_FC_BLOB = 6  # fc6, fc7, ...


class D2Conv(nn.Module):
    """d2's ``Conv2d(bias=not norm, norm=norm)`` with ``c2_msra_fill`` (no activation): ``conv``, then ``norm``
    when there is one. Caffe2 names ``<blob>_w`` / ``_b`` and the norm's ``<blob>_<gn|bn>_s`` and friends."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int, norm: NormSpec | None, blob: str) -> None:
        super().__init__()
        self.conv = Conv2d(dim_in, dim_out, kernel, padding=kernel // 2, bias=norm is None)
        msra_fill_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        self.norm = norm.make(dim_out) if norm is not None else None
        self.blob = blob
        self.norm_blob = blob + norm.blob_suffix if norm is not None else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.norm(x) if self.norm is not None else x

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        mapping: Dict[str, str | None] = {"conv.weight": f"{self.blob}_w"}
        if self.conv.bias is not None:
            mapping["conv.bias"] = f"{self.blob}_b"
        if self.norm is not None:
            for key, name in norm_weight_mapping(self.norm, self.norm_blob).items():
                mapping[f"norm.{key}"] = name
        return mapping


class FastRCNNConvFCHead(nn.Module):
    """``forward(features, rois) -> (R, dim_out)`` (``(R, C, S, S)`` flattened when there is no fc)."""

    def __init__(self, pooler: RoIFeatureExtractor, dim_in: int, num_convs: int, conv_dim: int, num_fcs: int,
                 fc_dim: int, norm: NormSpec | None) -> None:
        super().__init__()
        if num_convs < 0 or num_fcs < 0 or num_convs + num_fcs == 0:
            raise ValueError(f"FastRCNNConvFCHead needs convs or fcs (FAST_RCNN.NUM_STACKED_CONVS={num_convs}, "
                             f"FAST_RCNN.NUM_FC={num_fcs})")
        self.roi_xform = pooler
        self.convs = nn.ModuleList(
            D2Conv(dim_in if i == 0 else conv_dim, conv_dim, 3, norm, f"head_conv{i + 1}") for i in range(num_convs))
        side = pooler.resolution
        dim = (conv_dim if num_convs else dim_in) * side * side
        self.fcs = nn.ModuleList()
        for _ in range(num_fcs):
            fc = nn.Linear(dim, fc_dim)
            xavier_fill_(fc.weight)  # c2_xavier_fill: kaiming_uniform(a=1) = U(+-sqrt(3 / fan_in))
            nn.init.zeros_(fc.bias)
            self.fcs.append(fc)
            dim = fc_dim
        self.dim_out = dim

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        x = self.roi_xform(features, rois)
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x

    def detectron_weight_mapping(self) -> Dict[str, str | None]:
        mapping: Dict[str, str | None] = {}
        for i, conv in enumerate(self.convs):
            mapping.update({f"convs.{i}.{key}": blob for key, blob in conv.detectron_weight_mapping().items()})
        for i in range(len(self.fcs)):
            mapping[f"fcs.{i}.weight"] = f"fc{FIRST_FC_BLOB + i}_w"
            mapping[f"fcs.{i}.bias"] = f"fc{FIRST_FC_BLOB + i}_b"
        return mapping


@register("box_head", "FastRCNNConvFCHead")
def build_fast_rcnn_conv_fc_head(cfg, dim_in: int, spatial_scales: Sequence[float]) -> FastRCNNConvFCHead:
    f = cfg.FAST_RCNN
    return FastRCNNConvFCHead(
        build_roi_feature_extractor(cfg, f, spatial_scales), dim_in, int(f.NUM_STACKED_CONVS), int(f.CONV_HEAD_DIM),
        int(f.NUM_FC), int(f.MLP_HEAD_DIM), d2_norm_spec(f.NORM, "FAST_RCNN.NORM"),
    )
