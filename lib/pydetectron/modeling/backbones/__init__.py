"""Bodies: ResNet/ResNeXt (C4 / C5) and FPN on top of them, registered as ``body`` builders."""

from pydetectron.modeling.backbones.fpn import FPN, fpn_from_cfg, get_min_max_levels
from pydetectron.modeling.backbones.resnet import (
    ResNet,
    ResStage,
    get_group_gn,
    make_res_stage,
    norm_spec_from_cfg,
    resnet_from_cfg,
)

__all__ = [
    "FPN",
    "ResNet",
    "ResStage",
    "fpn_from_cfg",
    "get_group_gn",
    "get_min_max_levels",
    "make_res_stage",
    "norm_spec_from_cfg",
    "resnet_from_cfg",
]
