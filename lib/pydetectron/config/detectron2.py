"""``load_detectron2_config``: a detectron2 YAML (with ``_BASE_``) translated into pydetectron's option tree.

Every detectron2 key is accounted for, in one of three ways:
- translated into the Detectron key of the same meaning (or one of pydetectron's keys where Detectron has none),
  by the ``_translate_*`` functions below;
- ``NO_EFFECT``: accepted with any value, with the reason it changes nothing here (it is read only by an
  architecture or option that is refused, or it is not about the computation: ``VIS_PERIOD``...);
- ``ONLY_DEFAULT``: features pydetectron does not implement; detectron2's default is accepted, any other value
  fails naming the key, the file that set it and why.
``check_table_complete`` (and a test) asserts the three cover detectron2's whole table. The tree it returns has
``MODEL.CONVENTIONS: detectron2`` and is not yet checked (``assert_and_infer_cfg`` is the caller's, as after
any merge).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from pydetectron.config.defaults import build_defaults
from pydetectron.config.detectron2_defaults import D2_DEFAULTS
from pydetectron.config.detectron2_yaml import D2Values, Detectron2ConfigError, read_detectron2_values
from pydetectron.config.node import CfgNode

logger = logging.getLogger(__name__)

_ARCHITECTURES = ("GeneralizedRCNN", "ProposalNetwork", "RetinaNet")

NO_EFFECT: dict[str, str] = {
    "MODEL.DEVICE": "the device is chosen by the tools (--no_cuda, CUDA availability); results are the same",
    "MODEL.ANCHOR_GENERATOR.ANGLES": "read only by RotatedAnchorGenerator (refused)",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN": "read only with MODEL.LOAD_PROPOSALS (refused)",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST": "read only with MODEL.LOAD_PROPOSALS (refused)",
    "DATALOADER.REPEAT_THRESHOLD": "read only by RepeatFactorTrainingSampler (refused)",
    "DATALOADER.REPEAT_SQRT": "read only by RepeatFactorTrainingSampler (refused)",
    "INPUT.CROP.TYPE": "read only with INPUT.CROP.ENABLED (refused)",
    "INPUT.CROP.SIZE": "read only with INPUT.CROP.ENABLED (refused)",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": "read only with ROI_BOX_HEAD.USE_FED_LOSS (refused)",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": "read only with ROI_BOX_HEAD.USE_FED_LOSS (refused)",
    "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS": "read only by CascadeROIHeads (refused)",
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS": "read only by CascadeROIHeads (refused)",
    "SOLVER.NUM_DECAYS": "read only by LR_SCHEDULER_NAME WarmupStepWithFixedGammaLR (refused)",
    "SOLVER.RESCALE_INTERVAL": "read only by LR_SCHEDULER_NAME WarmupStepWithFixedGammaLR (refused)",
    "TEST.AUG.MIN_SIZES": "read only with TEST.AUG.ENABLED (refused)",
    "TEST.AUG.MAX_SIZE": "read only with TEST.AUG.ENABLED (refused)",
    "TEST.AUG.FLIP": "read only with TEST.AUG.ENABLED (refused)",
    "CUDNN_BENCHMARK": "cuDNN's algorithm search: speed only",
    "VIS_PERIOD": "detectron2's training visualisations in tensorboard: no effect on the model",
    "GLOBAL.HACK": "detectron2's placeholder key; nothing reads it",
    **{key: "read only by SemanticSegmentor / PanopticFPN (refused)"
       for key in D2_DEFAULTS if key.startswith(("MODEL.SEM_SEG_HEAD.", "MODEL.PANOPTIC_FPN."))},
}

ONLY_DEFAULT: dict[str, str] = {
    "MODEL.LOAD_PROPOSALS": "precomputed proposals are not supported in detectron2 mode (use an RPN)",
    "DATASETS.PROPOSAL_FILES_TRAIN": "precomputed proposals are not supported in detectron2 mode",
    "DATASETS.PROPOSAL_FILES_TEST": "precomputed proposals are not supported in detectron2 mode",
    "DATALOADER.SAMPLER_TRAIN": "only TrainingSampler is implemented (RepeatFactorTrainingSampler is not)",
    "INPUT.CROP.ENABLED": "random crops are not implemented in detectron2 mode",
    "INPUT.MASK_FORMAT": "masks are trained from polygons (detectron2's 'polygon'); 'bitmask' is not implemented",
    "MODEL.FPN.FUSE_TYPE": "only the 'sum' top-down fusion is implemented",
    "MODEL.ANCHOR_GENERATOR.NAME": "only DefaultAnchorGenerator is implemented",
    "MODEL.PROPOSAL_GENERATOR.NAME": "only the RPN proposal generator is implemented",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": "detectron2 measures it at the network input, Detectron's RPN_MIN_SIZE "
                                         "at the original image; only 0 (no filtering) means the same in both",
    "MODEL.RPN.HEAD_NAME": "only StandardRPNHead is implemented",
    "MODEL.RPN.IOU_LABELS": "the RPN labels are detectron2's default [0, -1, 1] only",
    "MODEL.RPN.CONV_DIMS": "the RPN conv has the input's channels ([-1]) only",
    "MODEL.ROI_HEADS.IOU_LABELS": "the RoI labels are detectron2's default [0, 1] only",
    "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": "training on predicted boxes is not implemented",
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": "the federated loss is not implemented",
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": "the sigmoid box classifier is not implemented",
    "MODEL.RETINANET.IOU_LABELS": "the RetinaNet labels are detectron2's default [0, -1, 1] only",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": "the stem has 64 channels only",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": "deformable convolutions are not implemented",
    "MODEL.RESNETS.DEFORM_MODULATED": "deformable convolutions are not implemented",
    "MODEL.RESNETS.DEFORM_NUM_GROUPS": "deformable convolutions are not implemented",
    "SOLVER.BASE_LR_END": "the cosine schedule ends at 0 only",
    "SOLVER.NESTEROV": "Nesterov momentum is not implemented",
    "SOLVER.REFERENCE_WORLD_SIZE": "detectron2's automatic rescaling to a reference world size is not implemented"
                                   " (SOLVER.IMS_PER_BATCH is the total batch, as detectron2 reads it with 0)",
    "TEST.EXPECTED_RESULTS": "detectron2's result verification is not implemented",
    "TEST.AUG.ENABLED": "detectron2's test-time augmentation (GeneralizedRCNNWithTTA) is not implemented; "
                        "TEST.BBOX_AUG is Detectron's, which combines the passes differently",
    "FLOAT32_PRECISION": "float32 matmul precision settings are not implemented",
}

# The detectron2 body names and what they build.
_BACKBONES = {
    "build_resnet_backbone": "C4",
    "build_resnet_fpn_backbone": "FPN",
    "build_retinanet_resnet_fpn_backbone": "FPN-P3P7",
}
_NORMS = {"FrozenBN": "AffineChannel", "BN": "BN", "SyncBN": "SyncBN", "GN": "GN"}
_HEAD_NORMS = ("", "GN", "BN", "SyncBN", "FrozenBN")
_ROI_HEADS = ("StandardROIHeads", "Res5ROIHeads", "Res5ROIHeadsExtraNorm")
_POOLERS = {"ROIAlignV2": ("RoIAlign", True), "ROIAlign": ("RoIAlign", False), "ROIPool": ("RoIPoolF", False)}
_SCHEDULERS = {"WarmupMultiStepLR": "steps_with_decay", "WarmupCosineLR": "cosine_decay"}
_RES5_BOX_HEAD = "ResNet.add_ResNet_roi_conv5_head"


D2_URL_PREFIX = "detectron2://"
D2_URL_ROOT = "https://dl.fbaipublicfiles.com/detectron2/"


def weights_url(path: str) -> str:
    """detectron2's ``detectron2://`` model-zoo names as the https URL its path handler opens."""
    return D2_URL_ROOT + path[len(D2_URL_PREFIX):] if path.startswith(D2_URL_PREFIX) else path


class _Translation:
    """One translation: detectron2's values in, pydetectron's tree out, every read key remembered."""

    def __init__(self, d2: D2Values, cfg: CfgNode):
        self.d2 = d2
        self.cfg = cfg
        self.read: set[str] = set()

    def get(self, key: str) -> Any:
        self.read.add(key)
        return self.d2.values[key]

    def skip(self, prefix: str) -> None:
        """Keys detectron2 does not read for this model (another architecture's section)."""
        self.read.update(key for key in D2_DEFAULTS if key.startswith(prefix))

    def fail(self, key: str, why: str) -> None:
        raise Detectron2ConfigError(f"{key} = {self.d2.values[key]!r} (in {self.d2.where(key)}): {why}")

    def choose(self, key: str, choices: dict[str, Any] | Sequence[str], why: str = "") -> Any:
        value = self.get(key)
        if value not in choices:
            self.fail(key, f"{why or 'not supported'}; pydetectron takes {', '.join(map(repr, choices))}")
        return choices[value] if isinstance(choices, dict) else value

    def set(self, target: str, value: Any) -> None:
        node = self.cfg
        *parents, leaf = target.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"pydetectron has no key {target} (the translation of detectron2 keys needs it)")
        node[leaf] = _plain(value, node[leaf])

    def copy(self, d2_key: str, target: str, convert: Callable[[Any], Any] = lambda v: v) -> None:
        self.set(target, convert(self.get(d2_key)))


def _plain(value: Any, default: Any) -> Any:
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, list) and isinstance(value, tuple):
        return list(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ------------------------------------------------------------------------------------------ the model
def _translate_architecture(t: _Translation) -> tuple[str, str]:
    arch = t.choose("MODEL.META_ARCHITECTURE", _ARCHITECTURES, "this meta-architecture is not implemented")
    if arch == "RetinaNet":
        t.set("MODEL.TYPE", "retinanet")
        t.set("RETINANET.RETINANET_ON", True)
    else:
        t.set("MODEL.TYPE", "generalized_rcnn")
        t.set("MODEL.FASTER_RCNN" if arch == "GeneralizedRCNN" else "MODEL.RPN_ONLY", True)
    backbone = t.choose("MODEL.BACKBONE.NAME", _BACKBONES, "this backbone builder is not implemented")
    expected = ("FPN-P3P7",) if arch == "RetinaNet" else ("C4", "FPN")
    if backbone not in expected:
        needed = "build_retinanet_resnet_fpn_backbone" if arch == "RetinaNet" else "a ResNet or ResNet-FPN backbone"
        t.fail("MODEL.BACKBONE.NAME", f"META_ARCHITECTURE {arch} (in {t.d2.where('MODEL.META_ARCHITECTURE')}) needs "
               f"{needed}")
    t.set("MODEL.CONVENTIONS", "detectron2")
    t.copy("MODEL.WEIGHTS", "TRAIN.WEIGHTS", weights_url)
    t.copy("MODEL.WEIGHTS", "TEST.WEIGHTS", weights_url)
    t.copy("MODEL.MASK_ON", "MODEL.MASK_ON")
    t.copy("MODEL.KEYPOINT_ON", "MODEL.KEYPOINTS_ON")
    if arch != "GeneralizedRCNN" and (t.get("MODEL.MASK_ON") or t.get("MODEL.KEYPOINT_ON")):
        t.fail("MODEL.MASK_ON" if t.get("MODEL.MASK_ON") else "MODEL.KEYPOINT_ON",
               f"META_ARCHITECTURE {arch} has no mask or keypoint head")
    return arch, backbone


def _translate_resnet(t: _Translation, backbone: str) -> None:
    depth = t.choose("MODEL.RESNETS.DEPTH", {d: d for d in (18, 34, 50, 101, 152)}, "unknown ResNet depth")
    expected_res2 = 64 if depth in (18, 34) else 256
    if t.get("MODEL.RESNETS.RES2_OUT_CHANNELS") != expected_res2:
        t.fail("MODEL.RESNETS.RES2_OUT_CHANNELS", f"a ResNet-{depth} has {expected_res2} res2 channels")
    out = list(t.get("MODEL.RESNETS.OUT_FEATURES"))
    wanted = {"C4": ["res4"], "FPN": ["res2", "res3", "res4", "res5"], "FPN-P3P7": ["res3", "res4", "res5"]}[backbone]
    if backbone == "C4":
        t.set("MODEL.CONV_BODY", f"ResNet.add_ResNet{depth}_conv4_body")
    else:
        t.set("MODEL.CONV_BODY", f"FPN.add_fpn_ResNet{depth}_conv5_body")
        fpn_in = list(t.get("MODEL.FPN.IN_FEATURES"))
        if fpn_in != wanted:
            t.fail("MODEL.FPN.IN_FEATURES", f"the {backbone} body is built over {wanted}")
        if not set(fpn_in) <= set(out):
            t.fail("MODEL.RESNETS.OUT_FEATURES", f"it must contain FPN.IN_FEATURES {fpn_in}")
    if backbone == "C4" and out != wanted:
        t.fail("MODEL.RESNETS.OUT_FEATURES", "a C4 model (build_resnet_backbone) uses ['res4']; dilated-C5 "
               "models (['res5'], Base-RCNN-DilatedC5) are not implemented")
    t.read.add("MODEL.FPN.IN_FEATURES")
    if depth in (18, 34) and t.get("MODEL.RESNETS.RES5_DILATION") != 1:
        t.fail("MODEL.RESNETS.RES5_DILATION", f"a ResNet-{depth} has no dilated res5")
    t.copy("MODEL.RESNETS.RES5_DILATION", "RESNETS.RES5_DILATION")
    t.copy("MODEL.RESNETS.NUM_GROUPS", "RESNETS.NUM_GROUPS")
    t.copy("MODEL.RESNETS.WIDTH_PER_GROUP", "RESNETS.WIDTH_PER_GROUP")
    t.copy("MODEL.RESNETS.STRIDE_IN_1X1", "RESNETS.STRIDE_1X1")
    norm = t.choose("MODEL.RESNETS.NORM", _NORMS)
    t.set("RESNETS.NORM", norm)
    t.set("RESNETS.USE_GN", norm == "GN")
    freeze_at = t.get("MODEL.BACKBONE.FREEZE_AT")  # same meaning as ours: 0 none, 1 stem, k stem..res<k>
    t.set("TRAIN.FREEZE_AT", freeze_at)
    t.set("RESNETS.FREEZE_AT", freeze_at)
    t.set("MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS", False)  # detectron2 initialises from MODEL.WEIGHTS only


def _translate_fpn(t: _Translation, backbone: str) -> None:
    if backbone == "C4":
        t.skip("MODEL.FPN.")
        t.set("FPN.COARSEST_STRIDE", 32)  # unused: Detectron pads only with FPN on, as detectron2's C4
        return
    t.set("FPN.FPN_ON", True)
    t.copy("MODEL.FPN.OUT_CHANNELS", "FPN.DIM")
    norm = t.choose("MODEL.FPN.NORM", _HEAD_NORMS)
    t.set("FPN.NORM", norm)
    t.set("FPN.USE_GN", norm == "GN")
    t.set("FPN.COARSEST_STRIDE", 32)  # detectron2 pads to the body's size_divisibility: 32 (P3-P7 too)
    if backbone == "FPN-P3P7":
        t.set("FPN.EXTRA_CONV_LEVELS", True)


def _levels(t: _Translation, key: str, prefix: str, allowed: Sequence[list[int]]) -> tuple[int, int]:
    """('p2', ..., 'p6') -> (2, 6), for the level ranges pydetectron builds."""
    names = list(t.get(key))
    for levels in allowed:
        if names == [f"{prefix}{level}" for level in levels]:
            return levels[0], levels[-1]
    t.fail(key, "pydetectron builds " + " or ".join(str([f"{prefix}{lv}" for lv in levels]) for levels in allowed))
    raise AssertionError  # unreachable


def _aspect_ratios(t: _Translation, num_levels: int) -> tuple[float, ...]:
    key = "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"
    ratios = [list(r) if isinstance(r, (list, tuple)) else r for r in t.get(key)]
    if ratios and not isinstance(ratios[0], list):
        ratios = [ratios]  # detectron2 also takes one flat list for every level
    if len(ratios) not in (1, num_levels) or any(r != ratios[0] for r in ratios):
        t.fail(key, "pydetectron uses one list of aspect ratios for every level")
    return tuple(float(r) for r in ratios[0])


def _sizes(t: _Translation) -> list[list[float]]:
    key = "MODEL.ANCHOR_GENERATOR.SIZES"
    sizes = t.get(key)
    if not sizes or not all(isinstance(s, (list, tuple)) and s for s in sizes):
        t.fail(key, "expected a list of lists of anchor sizes, one list per feature map")
    return [[float(x) for x in s] for s in sizes]


def _translate_rpn_anchors(t: _Translation, backbone: str) -> None:
    key = "MODEL.ANCHOR_GENERATOR.SIZES"
    sizes = _sizes(t)
    if backbone == "C4":
        if len(sizes) != 1:
            t.fail(key, "a C4 RPN has one feature map: one list of sizes")
        t.set("RPN.SIZES", tuple(int(s) if s.is_integer() else s for s in sizes[0]))
        t.set("RPN.ASPECT_RATIOS", _aspect_ratios(t, 1))
        return
    low, high = _levels(t, "MODEL.RPN.IN_FEATURES", "p", [[2, 3, 4, 5, 6]])
    start = sizes[0][0]
    expressible = [[start * 2 ** i] for i in range(high - low + 1)]
    if sizes != expressible:
        t.fail(key, f"pydetectron's FPN anchors are one size per level, doubling from FPN.RPN_ANCHOR_START_SIZE: "
               f"{[[int(s[0])] for s in expressible]} for a start of {int(start)}")
    t.set("FPN.RPN_ANCHOR_START_SIZE", int(start))
    t.set("FPN.RPN_ASPECT_RATIOS", _aspect_ratios(t, high - low + 1))
    t.set("FPN.MULTILEVEL_RPN", True)
    t.set("FPN.RPN_MIN_LEVEL", low)
    t.set("FPN.RPN_MAX_LEVEL", high)


def _translate_rpn(t: _Translation, backbone: str) -> None:
    if backbone == "C4":
        if list(t.get("MODEL.RPN.IN_FEATURES")) != ["res4"]:
            t.fail("MODEL.RPN.IN_FEATURES", "a C4 RPN reads ['res4']")
    _translate_rpn_anchors(t, backbone)
    t.copy("MODEL.ANCHOR_GENERATOR.OFFSET", "MODEL.ANCHOR_OFFSET")
    t.copy("MODEL.RPN.BOUNDARY_THRESH", "TRAIN.RPN_STRADDLE_THRESH")  # -1 keeps all anchors in both
    low, high = t.get("MODEL.RPN.IOU_THRESHOLDS")
    t.set("TRAIN.RPN_NEGATIVE_OVERLAP", low)
    t.set("TRAIN.RPN_POSITIVE_OVERLAP", high)
    t.copy("MODEL.RPN.BATCH_SIZE_PER_IMAGE", "TRAIN.RPN_BATCH_SIZE_PER_IM")
    t.copy("MODEL.RPN.POSITIVE_FRACTION", "TRAIN.RPN_FG_FRACTION")
    t.set("RPN.BBOX_REG_LOSS_TYPE", t.choose("MODEL.RPN.BBOX_REG_LOSS_TYPE", ("smooth_l1", "giou")))
    t.copy("MODEL.RPN.BBOX_REG_WEIGHTS", "RPN.BBOX_REG_WEIGHTS")
    t.copy("MODEL.RPN.SMOOTH_L1_BETA", "RPN.SMOOTH_L1_BETA")
    t.copy("MODEL.RPN.LOSS_WEIGHT", "RPN.LOSS_WEIGHT")
    t.copy("MODEL.RPN.BBOX_REG_LOSS_WEIGHT", "RPN.BBOX_REG_LOSS_WEIGHT")
    # detectron2's meaning in detectron2 mode: pre-NMS top-k per level and image, post-NMS per image
    t.copy("MODEL.RPN.PRE_NMS_TOPK_TRAIN", "TRAIN.RPN_PRE_NMS_TOP_N")
    t.copy("MODEL.RPN.PRE_NMS_TOPK_TEST", "TEST.RPN_PRE_NMS_TOP_N")
    t.copy("MODEL.RPN.POST_NMS_TOPK_TRAIN", "TRAIN.RPN_POST_NMS_TOP_N")
    t.copy("MODEL.RPN.POST_NMS_TOPK_TEST", "TEST.RPN_POST_NMS_TOP_N")
    t.copy("MODEL.RPN.NMS_THRESH", "TRAIN.RPN_NMS_THRESH")
    t.copy("MODEL.RPN.NMS_THRESH", "TEST.RPN_NMS_THRESH")
    t.set("RPN.OUT_DIM_AS_IN_DIM", True)


def _pooler(t: _Translation, d2_section: str, section: str) -> None:
    method, aligned = t.choose(f"MODEL.{d2_section}.POOLER_TYPE", _POOLERS)
    t.set(f"{section}.ROI_XFORM_METHOD", method)
    t.set(f"{section}.ROI_XFORM_ALIGNED", aligned)
    t.copy(f"MODEL.{d2_section}.POOLER_RESOLUTION", f"{section}.ROI_XFORM_RESOLUTION")
    t.copy(f"MODEL.{d2_section}.POOLER_SAMPLING_RATIO", f"{section}.ROI_XFORM_SAMPLING_RATIO")


def _translate_roi_heads(t: _Translation, backbone: str) -> None:
    name = t.choose("MODEL.ROI_HEADS.NAME", _ROI_HEADS, "this ROI-heads class is not implemented")
    res5 = name.startswith("Res5")
    if res5 != (backbone == "C4"):
        t.fail("MODEL.ROI_HEADS.NAME", "Res5ROIHeads* go with build_resnet_backbone (C4), StandardROIHeads with "
               f"an FPN backbone; MODEL.BACKBONE.NAME is {t.d2.values['MODEL.BACKBONE.NAME']!r} (in "
               f"{t.d2.where('MODEL.BACKBONE.NAME')})")
    t.set("MODEL.ROI_HEADS_NAME", name)
    t.set("MODEL.NUM_CLASSES", int(t.get("MODEL.ROI_HEADS.NUM_CLASSES")) + 1)
    if res5:
        if list(t.get("MODEL.ROI_HEADS.IN_FEATURES")) != ["res4"]:
            t.fail("MODEL.ROI_HEADS.IN_FEATURES", "Res5ROIHeads pool from ['res4']")
    else:
        low, high = _levels(t, "MODEL.ROI_HEADS.IN_FEATURES", "p", [[2, 3, 4, 5]])
        t.set("FPN.MULTILEVEL_ROIS", True)
        t.set("FPN.ROI_MIN_LEVEL", low)
        t.set("FPN.ROI_MAX_LEVEL", high)
        t.set("FPN.ROI_CANONICAL_SCALE", 224)  # detectron2's canonical box size and level
        t.set("FPN.ROI_CANONICAL_LEVEL", 4)
    thresholds = list(t.get("MODEL.ROI_HEADS.IOU_THRESHOLDS"))
    if len(thresholds) != 1:
        t.fail("MODEL.ROI_HEADS.IOU_THRESHOLDS", "one threshold (foreground at or above it) is implemented")
    t.set("TRAIN.FG_THRESH", thresholds[0])
    t.set("TRAIN.BG_THRESH_HI", thresholds[0])
    t.set("TRAIN.BG_THRESH_LO", 0.0)
    t.set("TRAIN.BBOX_THRESH", thresholds[0])
    t.copy("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "TRAIN.BATCH_SIZE_PER_IM")
    t.copy("MODEL.ROI_HEADS.POSITIVE_FRACTION", "TRAIN.FG_FRACTION")
    t.copy("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "TEST.SCORE_THRESH")
    t.copy("MODEL.ROI_HEADS.NMS_THRESH_TEST", "TEST.NMS")
    t.copy("MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "TRAIN.PROPOSAL_APPEND_GT")
    _translate_box_head(t, res5)
    _translate_mask_head(t, res5)
    _translate_keypoint_head(t, res5)


def _translate_box_head(t: _Translation, res5: bool) -> None:
    key = "MODEL.ROI_BOX_HEAD.NAME"
    if res5:
        t.read.add(key)  # Res5ROIHeads build their own res5 head; detectron2 does not read the name
        t.set("FAST_RCNN.ROI_BOX_HEAD", _RES5_BOX_HEAD)
    else:
        t.set("FAST_RCNN.ROI_BOX_HEAD", t.choose(key, ("FastRCNNConvFCHead",), "this box head is not implemented"))
    _pooler(t, "ROI_BOX_HEAD", "FAST_RCNN")
    t.set("FAST_RCNN.BBOX_REG_LOSS_TYPE", t.choose("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
                                                   ("smooth_l1", "giou")))
    t.copy("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "FAST_RCNN.BBOX_REG_LOSS_WEIGHT")
    t.copy("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "MODEL.BBOX_REG_WEIGHTS")
    t.copy("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", "FAST_RCNN.SMOOTH_L1_BETA")
    t.copy("MODEL.ROI_BOX_HEAD.NUM_FC", "FAST_RCNN.NUM_FC")
    t.copy("MODEL.ROI_BOX_HEAD.FC_DIM", "FAST_RCNN.MLP_HEAD_DIM")
    t.copy("MODEL.ROI_BOX_HEAD.NUM_CONV", "FAST_RCNN.NUM_STACKED_CONVS")
    t.copy("MODEL.ROI_BOX_HEAD.CONV_DIM", "FAST_RCNN.CONV_HEAD_DIM")
    t.set("FAST_RCNN.NORM", t.choose("MODEL.ROI_BOX_HEAD.NORM", _HEAD_NORMS))
    t.copy("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "MODEL.CLS_AGNOSTIC_BBOX_REG")


def _translate_mask_head(t: _Translation, res5: bool) -> None:
    if not t.get("MODEL.MASK_ON"):
        t.skip("MODEL.ROI_MASK_HEAD.")
        return
    t.set("MRCNN.ROI_MASK_HEAD", t.choose("MODEL.ROI_MASK_HEAD.NAME", ("MaskRCNNConvUpsampleHead",),
                                          "this mask head is not implemented"))
    _pooler(t, "ROI_MASK_HEAD", "MRCNN")
    t.copy("MODEL.ROI_MASK_HEAD.NUM_CONV", "MRCNN.NUM_CONV")
    t.copy("MODEL.ROI_MASK_HEAD.CONV_DIM", "MRCNN.DIM_REDUCED")
    t.set("MRCNN.NORM", t.choose("MODEL.ROI_MASK_HEAD.NORM", _HEAD_NORMS))
    t.copy("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "MRCNN.CLS_SPECIFIC_MASK", lambda agnostic: not agnostic)
    # the head's 2x deconvolution: masks are twice the pooled size (Res5ROIHeads: the box pooler's, halved by res5)
    pooled = t.get("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION") // 2 if res5 else t.get(
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION")
    t.set("MRCNN.RESOLUTION", 2 * pooled)
    t.set("MRCNN.CONV_INIT", "MSRAFill")
    t.set("MRCNN.UPSAMPLE_RATIO", 1)


def _translate_keypoint_head(t: _Translation, res5: bool) -> None:
    if not t.get("MODEL.KEYPOINT_ON"):
        t.skip("MODEL.ROI_KEYPOINT_HEAD.")
        return
    if res5:
        t.fail("MODEL.KEYPOINT_ON", "keypoints with Res5ROIHeads (C4) are not implemented")
    t.set("KRCNN.ROI_KEYPOINTS_HEAD", t.choose("MODEL.ROI_KEYPOINT_HEAD.NAME", ("KRCNNConvDeconvUpsampleHead",),
                                               "this keypoint head is not implemented"))
    _pooler(t, "ROI_KEYPOINT_HEAD", "KRCNN")
    dims = list(t.get("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS"))
    if not dims or any(d != dims[0] for d in dims):
        t.fail("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "the keypoint convs all have one width (KRCNN.CONV_HEAD_DIM)")
    t.set("KRCNN.NUM_STACKED_CONVS", len(dims))
    t.set("KRCNN.CONV_HEAD_DIM", int(dims[0]))
    t.copy("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "KRCNN.NUM_KEYPOINTS")
    if t.get("MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE") not in (0, 1):
        t.fail("MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE", "only 0 or 1 (images without a visible keypoint "
               "are left out of training, as Detectron does) are implemented")
    t.copy("MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS", "KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS")
    t.copy("MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT", "KRCNN.LOSS_WEIGHT")
    # the head's 2x deconvolution then 2x bilinear upsampling: heatmaps are 4x the pooled size
    t.set("KRCNN.HEATMAP_SIZE", 4 * t.get("MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION"))
    t.set("KRCNN.UP_SCALE", 2)
    t.set("KRCNN.USE_DECONV_OUTPUT", True)
    t.set("KRCNN.DECONV_KERNEL", 4)
    t.set("KRCNN.CONV_INIT", "MSRAFill")


def _translate_retinanet(t: _Translation) -> None:
    low, high = _levels(t, "MODEL.RETINANET.IN_FEATURES", "p", [[3, 4, 5, 6, 7]])
    t.set("FPN.MULTILEVEL_RPN", True)
    t.set("FPN.RPN_MIN_LEVEL", low)
    t.set("FPN.RPN_MAX_LEVEL", high)
    key = "MODEL.ANCHOR_GENERATOR.SIZES"
    sizes = _sizes(t)
    per_octave = len(sizes[0])
    scale = sizes[0][0] / 2 ** low
    expressible = [[scale * 2 ** level * 2 ** (i / per_octave) for i in range(per_octave)]
                   for level in range(low, high + 1)]
    close = len(sizes) == len(expressible) and all(
        len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b))
        for a, b in zip(sizes, expressible))
    if not close or not scale.is_integer():
        t.fail(key, "pydetectron's RetinaNet anchors are RETINANET.ANCHOR_SCALE x stride x 2^(i / "
               "SCALES_PER_OCTAVE) on each level, e.g. [[x, x * 2**(1/3), x * 2**(2/3)] for x in [32, 64, 128, "
               "256, 512]]")
    t.set("RETINANET.ANCHOR_SCALE", int(scale))
    t.set("RETINANET.SCALES_PER_OCTAVE", per_octave)
    t.set("RETINANET.ASPECT_RATIOS", _aspect_ratios(t, high - low + 1))
    t.copy("MODEL.ANCHOR_GENERATOR.OFFSET", "MODEL.ANCHOR_OFFSET")
    t.set("MODEL.NUM_CLASSES", int(t.get("MODEL.RETINANET.NUM_CLASSES")) + 1)
    t.copy("MODEL.RETINANET.NUM_CONVS", "RETINANET.NUM_CONVS")
    low_iou, high_iou = t.get("MODEL.RETINANET.IOU_THRESHOLDS")
    t.set("RETINANET.NEGATIVE_OVERLAP", low_iou)
    t.set("RETINANET.POSITIVE_OVERLAP", high_iou)
    t.copy("MODEL.RETINANET.PRIOR_PROB", "RETINANET.PRIOR_PROB")
    t.copy("MODEL.RETINANET.SCORE_THRESH_TEST", "RETINANET.INFERENCE_TH")
    t.copy("MODEL.RETINANET.TOPK_CANDIDATES_TEST", "RETINANET.PRE_NMS_TOP_N")
    t.copy("MODEL.RETINANET.NMS_THRESH_TEST", "TEST.NMS")
    t.copy("MODEL.RETINANET.FOCAL_LOSS_GAMMA", "RETINANET.LOSS_GAMMA")
    t.copy("MODEL.RETINANET.FOCAL_LOSS_ALPHA", "RETINANET.LOSS_ALPHA")
    t.copy("MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", "RETINANET.BBOX_REG_BETA")
    t.copy("MODEL.RETINANET.BBOX_REG_WEIGHTS", "RETINANET.BBOX_REG_WEIGHTS")
    t.set("RETINANET.BBOX_REG_LOSS_TYPE", t.choose("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", ("smooth_l1", "giou")))
    norm = t.choose("MODEL.RETINANET.NORM", ("", "GN"))
    t.set("RETINANET.NORM", norm)
    t.set("RETINANET.USE_GN", norm == "GN")
    for key, value in (("SHARE_CLS_BBOX_TOWER", False), ("CLASS_SPECIFIC_BBOX", False), ("SOFTMAX", False)):
        t.set(f"RETINANET.{key}", value)


# ---------------------------------------------------------------------------------- input, data, solver
def _translate_input(t: _Translation) -> None:
    order = t.choose("INPUT.FORMAT", ("BGR", "RGB"), "pydetectron reads colour images only")
    t.set("MODEL.INPUT_COLOR_ORDER", order)
    # detectron2's PIXEL_MEAN / PIXEL_STD are in INPUT.FORMAT's channel order, as ours are in INPUT_COLOR_ORDER's
    for d2_key, key in (("MODEL.PIXEL_MEAN", "PIXEL_MEANS"), ("MODEL.PIXEL_STD", "PIXEL_STDS")):
        value = list(t.get(d2_key))
        if len(value) != 3:
            t.fail(d2_key, "three values, one per channel, are expected")
        t.cfg[key] = np.asarray(value, dtype=t.cfg[key].dtype).reshape(t.cfg[key].shape)
    sampling = t.choose("INPUT.MIN_SIZE_TRAIN_SAMPLING", ("choice", "range"),
                        "'range_by_clipping' is not implemented")
    sizes = tuple(int(s) for s in t.get("INPUT.MIN_SIZE_TRAIN"))
    if sampling == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
        t.fail("INPUT.MIN_SIZE_TRAIN", "MIN_SIZE_TRAIN_SAMPLING 'range' needs (lo, hi)")
    t.set("TRAIN.SCALE_SAMPLING", sampling)
    t.set("TRAIN.SCALES", sizes)
    t.copy("INPUT.MAX_SIZE_TRAIN", "TRAIN.MAX_SIZE")
    if t.get("INPUT.MIN_SIZE_TEST") <= 0:
        t.fail("INPUT.MIN_SIZE_TEST", "testing without resizing (0) is not implemented")
    t.copy("INPUT.MIN_SIZE_TEST", "TEST.SCALE")
    t.copy("INPUT.MAX_SIZE_TEST", "TEST.MAX_SIZE")
    flip = t.choose("INPUT.RANDOM_FLIP", ("horizontal", "none"), "only horizontal flips are implemented")
    t.set("TRAIN.USE_FLIPPED", flip == "horizontal")


def _translate_data(t: _Translation) -> None:
    t.copy("DATASETS.TRAIN", "TRAIN.DATASETS", tuple)  # detectron2's builtin COCO names are ours too
    t.copy("DATASETS.TEST", "TEST.DATASETS", tuple)
    t.copy("DATALOADER.NUM_WORKERS", "DATA_LOADER.NUM_THREADS")
    t.copy("DATALOADER.ASPECT_RATIO_GROUPING", "TRAIN.ASPECT_GROUPING")
    if not t.get("DATALOADER.FILTER_EMPTY_ANNOTATIONS"):
        t.fail("DATALOADER.FILTER_EMPTY_ANNOTATIONS", "training images without annotations are always left out "
               "(Detectron's filter_for_training); keeping them is not implemented")


def _translate_solver(t: _Translation) -> None:
    policy = t.choose("SOLVER.LR_SCHEDULER_NAME", _SCHEDULERS, "this lr schedule is not implemented")
    t.set("SOLVER.LR_POLICY", policy)
    t.set("SOLVER.TYPE", "SGD")
    t.copy("SOLVER.BASE_LR", "SOLVER.BASE_LR")
    t.copy("SOLVER.MAX_ITER", "SOLVER.MAX_ITER")
    t.copy("SOLVER.GAMMA", "SOLVER.GAMMA")
    steps = [int(s) for s in t.get("SOLVER.STEPS")]
    if any(b <= a for a, b in zip([0, *steps], steps)):
        t.fail("SOLVER.STEPS", "the steps must be positive and increasing")
    t.set("SOLVER.STEPS", [0, *steps])  # Detectron's steps_with_decay lists the start
    t.copy("SOLVER.MOMENTUM", "SOLVER.MOMENTUM")
    t.copy("SOLVER.WEIGHT_DECAY", "SOLVER.WEIGHT_DECAY")
    t.copy("SOLVER.WEIGHT_DECAY_NORM", "SOLVER.WEIGHT_DECAY_GN")  # every trainable norm's weight and bias
    bias_decay = t.get("SOLVER.WEIGHT_DECAY_BIAS")
    if bias_decay is not None and bias_decay not in (0.0, t.get("SOLVER.WEIGHT_DECAY")):
        t.fail("SOLVER.WEIGHT_DECAY_BIAS", "biases decay with SOLVER.WEIGHT_DECAY (None) or not at all (0)")
    t.set("SOLVER.BIAS_WEIGHT_DECAY", bias_decay is None or bias_decay != 0.0)
    factor = t.choose("SOLVER.BIAS_LR_FACTOR", {1.0: False, 2.0: True},
                      "the bias lr is 1x or 2x (Detectron's) the base lr")
    t.set("SOLVER.BIAS_DOUBLE_LR", factor)
    t.copy("SOLVER.WARMUP_FACTOR", "SOLVER.WARM_UP_FACTOR")
    t.copy("SOLVER.WARMUP_ITERS", "SOLVER.WARM_UP_ITERS")
    t.set("SOLVER.WARM_UP_METHOD", t.choose("SOLVER.WARMUP_METHOD", ("linear", "constant")))
    t.set("SOLVER.LR_IN_MOMENTUM", False)  # torch.optim.SGD as detectron2 runs it: lr changes leave the buffer
    t.copy("SOLVER.CHECKPOINT_PERIOD", "TRAIN.SNAPSHOT_ITERS")
    total = t.get("SOLVER.IMS_PER_BATCH")
    if not isinstance(total, int) or total < 1:
        t.fail("SOLVER.IMS_PER_BATCH", "the total batch must be a positive number of images")
    t.set("SOLVER.IMS_PER_BATCH", total)  # divided by the world size at launch (engine/training.adapt_cfg)
    t.set("NUM_GPUS", 1)
    t.set("TRAIN.IMS_PER_BATCH", total)
    t.copy("SOLVER.CLIP_GRADIENTS.ENABLED", "SOLVER.CLIP_GRADIENTS.ENABLED")
    t.set("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", t.choose("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", ("value", "norm")))
    t.copy("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE")
    t.copy("SOLVER.CLIP_GRADIENTS.NORM_TYPE", "SOLVER.CLIP_GRADIENTS.NORM_TYPE")
    t.copy("SOLVER.AMP.ENABLED", "SOLVER.AMP.ENABLED")


def _translate_test_and_misc(t: _Translation) -> None:
    t.copy("TEST.EVAL_PERIOD", "TEST.EVAL_PERIOD")
    t.copy("TEST.KEYPOINT_OKS_SIGMAS", "KRCNN.OKS_SIGMAS", tuple)
    t.copy("TEST.DETECTIONS_PER_IMAGE", "TEST.DETECTIONS_PER_IM")
    t.copy("TEST.PRECISE_BN.ENABLED", "TEST.PRECISE_BN.ENABLED")
    t.copy("TEST.PRECISE_BN.NUM_ITER", "TEST.PRECISE_BN.NUM_ITER")
    t.copy("OUTPUT_DIR", "OUTPUT_DIR")
    seed = t.get("SEED")
    if seed >= 0:
        t.set("RNG_SEED", seed)
    else:  # detectron2 draws a seed per run; every process of a run here must agree, so a fixed one is used
        logger.info("SEED = %d (%s): detectron2 would draw a random seed; pydetectron uses RNG_SEED = %d",
                    seed, t.d2.where("SEED"), t.cfg.RNG_SEED)
    if t.get("VERSION") != 2:
        t.fail("VERSION", "only detectron2's config version 2 is read")


# ----------------------------------------------------------------------------------------- entry point
def check_table_complete() -> None:
    """Every detectron2 key is in exactly one of: translated, NO_EFFECT, ONLY_DEFAULT (a programming check)."""
    both = set(NO_EFFECT) & set(ONLY_DEFAULT)
    unknown = (set(NO_EFFECT) | set(ONLY_DEFAULT)) - set(D2_DEFAULTS)
    if both or unknown:
        raise AssertionError(f"detectron2 key tables overlap {sorted(both)} or name unknown keys {sorted(unknown)}")


def translate_detectron2_values(d2: D2Values, cfg: CfgNode | None = None) -> CfgNode:
    """pydetectron's tree (from Detectron's defaults, or ``cfg``) with detectron2's merged values translated."""
    cfg = build_defaults() if cfg is None else cfg
    t = _Translation(d2, cfg)
    for key, why in ONLY_DEFAULT.items():
        t.read.add(key)
        if not d2.is_default(key):
            t.fail(key, f"{why}; only detectron2's default {D2_DEFAULTS[key]!r} is accepted")
    t.read.update(NO_EFFECT)
    arch, backbone = _translate_architecture(t)
    _translate_resnet(t, backbone)
    _translate_fpn(t, backbone)
    if arch == "RetinaNet":
        t.skip("MODEL.RPN.")
        t.skip("MODEL.ROI_")
        _translate_retinanet(t)
    else:
        t.skip("MODEL.RETINANET.")
        _translate_rpn(t, backbone)
        if arch == "GeneralizedRCNN":
            _translate_roi_heads(t, backbone)
        else:
            t.skip("MODEL.ROI_")
    _translate_input(t)
    _translate_data(t)
    _translate_solver(t)
    _translate_test_and_misc(t)
    unread = sorted(set(D2_DEFAULTS) - t.read)
    if unread:
        raise AssertionError(f"detectron2 keys left untranslated (a pydetectron bug): {unread}")
    return cfg


def load_detectron2_config(path: str | os.PathLike, opts: Sequence[Any] = ()) -> CfgNode:
    """Read a detectron2 YAML (its ``_BASE_`` chain, then ``opts`` in detectron2 key names: ``['MODEL.WEIGHTS',
    'w.pkl', 'OUTPUT_DIR', 'out']``) and return pydetectron's tree in detectron2 mode (not yet frozen).

    Raises ``Detectron2ConfigError`` naming the key, the file that set it and why, for an unknown key, a value
    pydetectron does not implement, a ``_BASE_`` cycle or a LazyConfig (.py) file."""
    return translate_detectron2_values(read_detectron2_values(path, opts))


check_table_complete()
