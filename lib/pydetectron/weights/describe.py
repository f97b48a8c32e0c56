"""What a weights file's ResNet is (depth, block type, groups, norm) and the cfg lines its input needs.

The file's tensors give the architecture; they do not give the input the network was trained on (colour
order, mean/std) nor where its stride sits (both a 1x1 and a 3x3 conv have the same shape either way). For
formats that say it (Detectron ``.pkl``: BGR, Caffe2 means, std 1) or files with metadata, the lines are
certain; for torchvision-layout and detectron2-layout files they are given per known source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from pydetectron.modeling.backbones.resnet import BLOCK_COUNTS

_BLOCK_BLOB = re.compile(r"^res(\d)_(\d+)_branch")

# The input each known source was trained on, as the cfg lines that state it.
TORCHVISION_INPUT = {
    "MODEL.INPUT_COLOR_ORDER": "RGB",
    "PIXEL_MEANS": "[[[123.675, 116.28, 103.53]]]",
    "PIXEL_STDS": "[[[58.395, 57.12, 57.375]]]",
    "RESNETS.STRIDE_1X1": "False",
}
CAFFE_INPUT = {  # Detectron's MSRA ResNets and Detectron.pytorch's resnet*_caffe.pth
    "MODEL.INPUT_COLOR_ORDER": "BGR",
    "PIXEL_MEANS": "[[[102.9801, 115.9465, 122.7717]]]",
    "PIXEL_STDS": "[[[1.0, 1.0, 1.0]]]",
    "RESNETS.STRIDE_1X1": "True",
}

D2_FAIR_RESNEXT_INPUT = {  # detectron2's mask_rcnn_X_101_32x8d_FPN_3x.yaml (its PIXEL_MEAN default, BGR)
    "MODEL.INPUT_COLOR_ORDER": "BGR",
    "PIXEL_MEANS": "[[[103.53, 116.28, 123.675]]]",
    "PIXEL_STDS": "[[[57.375, 57.12, 58.395]]]",
    "RESNETS.STRIDE_1X1": "False",
}


@dataclass(frozen=True)
class BackboneFacts:
    """A ResNet as its tensors show it."""

    depth: int | None  # None when the block counts match no standard depth
    block: str  # 'bottleneck' | 'basic'
    stage_blocks: Tuple[int, ...]  # blocks in res2, res3, ...
    groups: int
    width_per_group: int
    norm: str  # 'BN' (statistics in the file) | 'AffineChannel' (BN folded) | 'GN'

    def __str__(self) -> str:
        name = f"ResNet-{self.depth}" if self.depth else f"ResNet with stage blocks {list(self.stage_blocks)}"
        if self.groups > 1:
            name = f"ResNeXt ({name[7:] if self.depth else name}, {self.groups}x{self.width_per_group}d)"
        norm = {"BN": "batch norm with statistics", "AffineChannel": "folded batch norm (affine)",
                "GN": "GroupNorm"}[self.norm]
        return f"{name}, {self.block} blocks, {norm}"


def backbone_facts(blobs: Mapping[str, Any]) -> BackboneFacts | None:
    """The ResNet in Caffe2-named `blobs`, or None when they hold no residual blocks."""
    blocks: Dict[int, set] = {}
    for name in blobs:
        match = _BLOCK_BLOB.match(name)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not blocks:
        return None
    stage_blocks = tuple(len(blocks.get(stage, ())) for stage in range(2, max(blocks) + 1))
    bottleneck = "res2_0_branch2c_w" in blobs
    depth = next((d for d, counts in BLOCK_COUNTS.items()
                  if tuple(counts[: len(stage_blocks)]) == stage_blocks and (d >= 50) == bottleneck), None)
    groups, width = 1, 64
    inner = blobs.get("res2_0_branch2b_w")
    if inner is not None:
        shape = np.shape(inner)
        groups = max(1, shape[0] // shape[1])
        width = shape[0] // groups
    if "res_conv1_bn_rm" in blobs:
        norm = "BN"
    elif "conv1_gn_s" in blobs:
        norm = "GN"
    else:
        norm = "AffineChannel"
    return BackboneFacts(depth, "bottleneck" if bottleneck else "basic", stage_blocks, groups, width, norm)


def architecture_lines(facts: BackboneFacts) -> List[str]:
    """cfg lines that build a body with this file's shape and a word on the norm choices it allows."""
    depth = facts.depth or "<depth>"
    # the C4 box head (ResNet_roi_conv5_head) builds Detectron's 3-block res5: ResNet-18's has 2
    c4 = (f" (or ResNet{depth}_conv4_body for C4)"
          if len(facts.stage_blocks) == 4 and facts.stage_blocks[3] == 3 else "")
    lines = [f"MODEL.CONV_BODY: FPN.add_fpn_ResNet{depth}_conv5_body{c4}"]
    if facts.groups > 1 or facts.width_per_group != 64:
        lines += [f"RESNETS.NUM_GROUPS: {facts.groups}", f"RESNETS.WIDTH_PER_GROUP: {facts.width_per_group}"]
    lines.append({
        "BN": "RESNETS.NORM: AffineChannel (frozen: the statistics are folded in exactly), or BN / SyncBN "
              "(trainable: they start from the file's own statistics)",
        "AffineChannel": "RESNETS.NORM: AffineChannel (as trained), or BN / SyncBN (start at mean 0, var 1 - eps: "
                         "the same function)",
        "GN": "RESNETS.NORM: GN, with the GROUP_NORM.* settings it was trained with",
    }[facts.norm])
    return lines


def input_lines(fmt: str, color_order: str | None, facts: BackboneFacts | None, cfg_yaml: Any = None) -> List[str]:
    """The cfg lines describing the input the file's network was trained on, per format (see module doc)."""
    def render(settings: Mapping[str, str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in settings.items())

    if fmt == "detectron":
        # MSRA's ResNets have the stride in the 1x1 conv; Detectron's ResNeXt and GN (R-50-GN.pkl) models in the 3x3
        stride = "False" if facts is not None and (facts.groups > 1 or facts.norm == "GN") else "True"
        caffe = dict(CAFFE_INPUT, **{"RESNETS.STRIDE_1X1": stride})
        lines = ["Detectron file: BGR (conv1 is reversed on load for MODEL.INPUT_COLOR_ORDER RGB; give PIXEL_MEANS / "
                 "PIXEL_STDS in that order)",
                 f"  Detectron's own ImageNet models: {render(caffe)}"
                 + (" (ResNeXt and GN models: stride in the 3x3 conv)" if stride == "False" else "")]
        if facts is not None and facts.groups > 1:  # same Caffe2 names, trained with a std (its d2 configs)
            lines.append(f"  detectron2's ImageNetPretrained/FAIR/X-101-32x8d.pkl: {render(D2_FAIR_RESNEXT_INPUT)}")
        return lines + ["  a file converted from another source: that source's mean/std and stride placement"]
    if fmt == "pydetectron" and isinstance(cfg_yaml, str):
        return ["pydetectron checkpoint: use the PIXEL_MEANS, PIXEL_STDS, MODEL.INPUT_COLOR_ORDER and "
                "RESNETS.STRIDE_1X1 of the cfg stored in it"]
    if color_order == "RGB" and fmt == "detectron2":
        return [f"torchvision ResNet converted by detectron2 (RGB): {render(TORCHVISION_INPUT)}"]
    return [
        "the file does not say which input its network was trained on; state the source's:",
        f"  torchvision / timm / SparK / MoCo on ImageNet: {render(TORCHVISION_INPUT)}",
        f"  Detectron.pytorch Caffe .pth (resnet50_caffe.pth): {render(CAFFE_INPUT)}",
        "  pretrained with a dataset's own mean/std (HPT, OpenSelfSup): that mean/std x 255 as PIXEL_MEANS / "
        "PIXEL_STDS, in the colour order it was trained with",
    ]
