"""``assert_and_infer_cfg``: Detectron's (and Detectron.pytorch's) inferred values, then sanity checks.

Inference follows the originals: ``MODEL.RPN_ONLY`` / ``MODEL.FASTER_RCNN`` turn ``RPN.RPN_ON`` on, an RPN or
RetinaNet turns ``TEST.PRECOMPUTED_PROPOSALS`` off, a 'v0upshare' mask head sets ``MODEL.SHARE_RES5``. It also
reconciles the keys that two projects spell differently (``TRAIN.FREEZE_AT`` / ``RESNETS.FREEZE_AT``;
``RESNETS.USE_GN``, '*_gn_*' function names and ``RESNETS.NORM``). The checks turn values that would otherwise
fail deep inside a model or a data loader into an error naming the key.
"""

from __future__ import annotations

from typing import Any, Iterable

from pydetectron.config.merge import ConfigError
from pydetectron.config.names import normalize_module_name
from pydetectron.config.node import CfgNode

# Mask / keypoint heads that reuse the box head's res5 stage (Detectron.pytorch's _SHARE_RES5_HEADS).
SHARE_RES5_HEADS = frozenset({"mask_rcnn_fcn_head_v0upshare"})

NORMS = ("AffineChannel", "GN", "BN", "SyncBN")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
LAYER_DECAY_GROUPS = ("spark", "per_block")  # SOLVER.LAYER_WISE_LR_DECAY_GROUPS (see solver.layer_decay_factors)
LR_POLICIES = ("step", "steps_with_decay", "steps_with_lrs", "cosine_decay")  # Detectron's lr_policy.py
WARM_UP_METHODS = ("constant", "linear")
ROI_XFORM_METHODS = ("RoIPoolF", "RoIPool", "RoIAlign")
COLOR_ORDERS = ("BGR", "RGB")
CONVENTIONS = ("detectron", "detectron2")
SCALE_SAMPLINGS = ("choice", "range")  # TRAIN.SCALE_SAMPLING
RPN_BOX_LOSS_TYPES = ("smooth_l1", "giou")  # RPN.BBOX_REG_LOSS_TYPE
# detectron2's get_norm names (FPN.NORM, FAST_RCNN.NORM, MRCNN.NORM) -> our norm layer kind; '' = no norm, and
# detectron2's FrozenBN is our AffineChannel (after the exact fold)
D2_NORM_KINDS = {"": None, "GN": "GN", "BN": "BN", "SyncBN": "SyncBN", "FrozenBN": "AffineChannel"}
_DEFAULT_FREEZE_AT = 2
DISTILL_METHODS = ("", "mgd", "feature_l2")
DISTILL_STAGES = ("C2", "C3", "C4", "C5")  # DISTILL.LOSS_FACTORS / IGNORE_INDS order
MGD_REDUCERS = ("amp", "sp", "rd", "sm")
D2_ROI_HEADS = ("StandardROIHeads", "Res5ROIHeads", "Res5ROIHeadsExtraNorm")  # detectron2's cascades
DETECTRON_ROI_HEADS = "DetectronROIHeads"
BOX_REG_LOSS_TYPES = ("smooth_l1", "giou")  # detectron2's 'diou' / 'ciou' are not built
# d2 head-only keys and the head that reads them (Detectron's heads have fixed layouts): key -> (default, head)
_D2_HEAD_KEYS = {
    "FAST_RCNN.NUM_FC": (2, "FAST_RCNN.ROI_BOX_HEAD", "FastRCNNConvFCHead"),
    "FAST_RCNN.NORM": ("", "FAST_RCNN.ROI_BOX_HEAD", "FastRCNNConvFCHead"),
    "MRCNN.NUM_CONV": (4, "MRCNN.ROI_MASK_HEAD", "MaskRCNNConvUpsampleHead"),
    "MRCNN.NORM": ("", "MRCNN.ROI_MASK_HEAD", "MaskRCNNConvUpsampleHead"),
}
RETINANET_NORMS = ("", "GN")


def _fail(message: str) -> None:
    raise ConfigError(message)


def canonical_optimizer(name: str) -> str:
    """'SGD' | 'Adam' | 'AdamW' for any spelling case (SparK writes 'ADAMW'); ConfigError otherwise."""
    spellings = {o.lower(): o for o in OPTIMIZERS}
    if str(name).lower() not in spellings:
        _fail(f"SOLVER.TYPE / SOLVER.OPTIMIZER = {name!r} is not one of {', '.join(OPTIMIZERS)} (any case)")
    return spellings[str(name).lower()]


def _one_of(cfg: CfgNode, key: str, choices: Iterable[str]) -> None:
    value = _get(cfg, key)
    if value not in choices:
        _fail(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")


def _get(cfg: CfgNode, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _infer_heads(cfg: CfgNode) -> None:
    if cfg.MODEL.RPN_ONLY or cfg.MODEL.FASTER_RCNN:
        cfg.RPN.RPN_ON = True
    if cfg.RPN.RPN_ON or cfg.RETINANET.RETINANET_ON:
        cfg.TEST.PRECOMPUTED_PROPOSALS = False
    heads = {cfg.MRCNN.ROI_MASK_HEAD, cfg.KRCNN.ROI_KEYPOINTS_HEAD} - {""}
    if {normalize_module_name(name) for name in heads} & SHARE_RES5_HEADS:
        cfg.MODEL.SHARE_RES5 = True


def _infer_freeze_at(cfg: CfgNode) -> None:
    """Detectron reads TRAIN.FREEZE_AT, Detectron.pytorch RESNETS.FREEZE_AT: the one a YAML changed wins."""
    train, resnets = cfg.TRAIN.FREEZE_AT, cfg.RESNETS.FREEZE_AT
    if train == resnets:
        value = train
    elif resnets == _DEFAULT_FREEZE_AT:
        value = train
    elif train == _DEFAULT_FREEZE_AT:
        value = resnets
    else:
        _fail(f"TRAIN.FREEZE_AT = {train} and RESNETS.FREEZE_AT = {resnets} disagree; they are the same "
              "option in Detectron and Detectron.pytorch, set only one")
    if not 0 <= value <= 5:
        _fail(f"RESNETS.FREEZE_AT / TRAIN.FREEZE_AT = {value} must be in 0..5 (0 = train every stage, 1 = freeze "
              "the stem only, k >= 2 = the stem and res2..res<k>)")
    cfg.TRAIN.FREEZE_AT = cfg.RESNETS.FREEZE_AT = value


def _infer_norm(cfg: CfgNode) -> None:
    """One answer to 'which normalisation does the ResNet use': RESNETS.NORM."""
    r = cfg.RESNETS
    if r.NORM == "FrozenBN":  # detectron2's name of the frozen batch norm: our AffineChannel (after the exact fold)
        r.NORM = "AffineChannel"
    _one_of(cfg, "RESNETS.NORM", NORMS)
    gn_funcs = [key for key in ("TRANS_FUNC", "STEM_FUNC", "SHORTCUT_FUNC") if "_gn_" in f"_{r[key]}_"]
    gn_reasons = [f"RESNETS.{key} = {r[key]!r}" for key in gn_funcs] + (["RESNETS.USE_GN = True"] if r.USE_GN else [])
    if gn_reasons and r.NORM == "AffineChannel":
        r.NORM = "GN"
    if gn_reasons and r.NORM != "GN":
        _fail(f"RESNETS.NORM = {r.NORM!r} contradicts {', '.join(gn_reasons)} (which select GroupNorm)")
    r.USE_GN = r.NORM == "GN"


def _infer_fpn_norm(cfg: CfgNode) -> None:
    """One answer to 'which norm do the FPN convs use': FPN.NORM, with FPN.USE_GN meaning 'GN'."""
    f = cfg.FPN
    _one_of(cfg, "FPN.NORM", tuple(D2_NORM_KINDS))
    if f.USE_GN and f.NORM not in ("", "GN"):
        _fail(f"FPN.NORM = {f.NORM!r} contradicts FPN.USE_GN = True (which selects GroupNorm)")
    if f.USE_GN:
        f.NORM = "GN"
    f.USE_GN = f.NORM == "GN"


def _check_solver(cfg: CfgNode) -> None:
    s = cfg.SOLVER
    s.TYPE = canonical_optimizer(s.TYPE)
    _one_of(cfg, "SOLVER.LAYER_WISE_LR_DECAY_GROUPS", LAYER_DECAY_GROUPS)
    _one_of(cfg, "SOLVER.LR_POLICY", LR_POLICIES)
    _one_of(cfg, "SOLVER.WARM_UP_METHOD", WARM_UP_METHODS)
    if s.LR_POLICY in ("steps_with_decay", "steps_with_lrs"):
        steps = list(s.STEPS)
        if not steps or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            _fail(f"SOLVER.STEPS = {steps} must start at 0 and increase strictly for LR_POLICY {s.LR_POLICY!r}, "
                  "e.g. [0, 60000, 80000]")
        if s.LR_POLICY == "steps_with_lrs" and len(s.LRS) != len(steps):
            _fail(f"SOLVER.LRS has {len(s.LRS)} values but SOLVER.STEPS has {len(steps)}; they must match")
    if len(s.BETAS) != 2 or not all(0.0 <= b < 1.0 for b in s.BETAS):
        _fail(f"SOLVER.BETAS = {s.BETAS} must be two numbers in [0, 1)")
    if not 0.0 < s.LAYER_WISE_LR_DECAY <= 1.0:
        _fail(f"SOLVER.LAYER_WISE_LR_DECAY = {s.LAYER_WISE_LR_DECAY} must be in (0, 1] (1.0 = off)")
    _one_of(cfg, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", ("value", "norm"))
    if s.CLIP_GRADIENTS.CLIP_VALUE <= 0 or s.CLIP_GRADIENTS.NORM_TYPE <= 0:
        _fail(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE ({s.CLIP_GRADIENTS.CLIP_VALUE}) and NORM_TYPE "
              f"({s.CLIP_GRADIENTS.NORM_TYPE}) must be positive")
    if s.IMS_PER_BATCH < 0:
        _fail(f"SOLVER.IMS_PER_BATCH = {s.IMS_PER_BATCH} must be >= 0 (0 = NUM_GPUS x TRAIN.IMS_PER_BATCH; > 0 = "
              "the total batch over all processes, detectron2's meaning)")
    if cfg.TEST.PRECISE_BN.NUM_ITER < 1:
        _fail(f"TEST.PRECISE_BN.NUM_ITER = {cfg.TEST.PRECISE_BN.NUM_ITER} must be >= 1")


def _check_input(cfg: CfgNode) -> None:
    _one_of(cfg, "MODEL.INPUT_COLOR_ORDER", COLOR_ORDERS)
    _one_of(cfg, "MODEL.CONVENTIONS", CONVENTIONS)
    if (cfg.PIXEL_STDS <= 0).any():
        _fail(f"PIXEL_STDS = {cfg.PIXEL_STDS.ravel().tolist()} must be positive")
    scales = cfg.TRAIN.SCALES
    if not scales or not all(isinstance(x, int) and x > 0 for x in scales):
        _fail(f"TRAIN.SCALES = {scales!r} must be a non-empty tuple of positive integers, e.g. (800,)")
    _one_of(cfg, "TRAIN.SCALE_SAMPLING", SCALE_SAMPLINGS)
    if cfg.TRAIN.SCALE_SAMPLING == "range" and (len(scales) != 2 or scales[0] > scales[1]):
        _fail(f"TRAIN.SCALES = {scales!r} must be (lo, hi) with lo <= hi for TRAIN.SCALE_SAMPLING 'range'")
    for key in ("TRAIN.MAX_SIZE", "TEST.SCALE", "TEST.MAX_SIZE", "TRAIN.IMS_PER_BATCH", "NUM_GPUS"):
        if _get(cfg, key) <= 0:
            _fail(f"{key} = {_get(cfg, key)} must be positive")
    for key in ("TRAIN.FG_FRACTION", "TRAIN.RPN_FG_FRACTION"):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            _fail(f"{key} = {_get(cfg, key)} must be in [0, 1]")


def _check_heads(cfg: CfgNode) -> None:
    for section in ("FAST_RCNN", "MRCNN", "KRCNN"):
        _one_of(cfg, f"{section}.ROI_XFORM_METHOD", ROI_XFORM_METHODS)
    f = cfg.FPN
    for kind in ("ROI", "RPN"):
        low, high = f[f"{kind}_MIN_LEVEL"], f[f"{kind}_MAX_LEVEL"]
        if low > high:
            _fail(f"FPN.{kind}_MIN_LEVEL = {low} is above FPN.{kind}_MAX_LEVEL = {high}")
    g = cfg.GROUP_NORM
    if (g.DIM_PER_GP == -1) == (g.NUM_GROUPS == -1):
        _fail(f"exactly one of GROUP_NORM.DIM_PER_GP ({g.DIM_PER_GP}) and GROUP_NORM.NUM_GROUPS "
              f"({g.NUM_GROUPS}) must be -1")
    k = cfg.KRCNN
    if cfg.MODEL.KEYPOINTS_ON:
        for key in ("NUM_KEYPOINTS", "HEATMAP_SIZE"):
            if k[key] <= 0:
                _fail(f"MODEL.KEYPOINTS_ON is True but KRCNN.{key} = {k[key]}; set it (e.g. 17 / 56 for COCO)")
    if k.OKS_SIGMAS:
        if k.NUM_KEYPOINTS > 0 and len(k.OKS_SIGMAS) != k.NUM_KEYPOINTS:
            _fail(f"KRCNN.OKS_SIGMAS has {len(k.OKS_SIGMAS)} values but KRCNN.NUM_KEYPOINTS = {k.NUM_KEYPOINTS}")
        if not all(isinstance(x, (int, float)) and x > 0 for x in k.OKS_SIGMAS):
            _fail(f"KRCNN.OKS_SIGMAS = {k.OKS_SIGMAS!r} must be positive numbers")


def _infer_roi_heads(cfg: CfgNode) -> None:
    """In detectron2 mode the default cascade is detectron2's: StandardROIHeads with FPN, else Res5ROIHeads."""
    if cfg.MODEL.CONVENTIONS == "detectron2" and cfg.MODEL.ROI_HEADS_NAME == DETECTRON_ROI_HEADS:
        cfg.MODEL.ROI_HEADS_NAME = "StandardROIHeads" if cfg.FPN.FPN_ON else "Res5ROIHeads"


def _check_roi_heads(cfg: CfgNode) -> None:
    """The detectron2 ROI-head keys: valid values, and refused where the convention in force cannot apply them."""
    f = cfg.FAST_RCNN
    _one_of(cfg, "FAST_RCNN.BBOX_REG_LOSS_TYPE", BOX_REG_LOSS_TYPES)
    _one_of(cfg, "FAST_RCNN.NORM", tuple(D2_NORM_KINDS))
    _one_of(cfg, "MRCNN.NORM", tuple(D2_NORM_KINDS))
    for key in ("FAST_RCNN.NUM_FC", "MRCNN.NUM_CONV", "FAST_RCNN.SMOOTH_L1_BETA", "FAST_RCNN.BBOX_REG_LOSS_WEIGHT"):
        if _get(cfg, key) < 0:
            _fail(f"{key} = {_get(cfg, key)} must be >= 0")
    d2_cascade = normalize_module_name(cfg.MODEL.ROI_HEADS_NAME) in D2_ROI_HEADS
    two_stage = not (cfg.MODEL.RPN_ONLY or cfg.RETINANET.RETINANET_ON or cfg.MODEL.TYPE == "retinanet")
    augmented = [f"TEST.{s}.ENABLED" for s in ("BBOX_AUG", "MASK_AUG", "KPS_AUG") if cfg.TEST[s].ENABLED]
    if d2_cascade and two_stage and augmented:
        _fail(f"{augmented[0]} is on, but test-time augmentation runs Detectron's cascade (DetectronROIHeads), not "
              f"MODEL.ROI_HEADS_NAME {cfg.MODEL.ROI_HEADS_NAME!r}")
    if d2_cascade and two_stage:
        detectron_only = {"TEST.SOFT_NMS.ENABLED": cfg.TEST.SOFT_NMS.ENABLED,
                          "TEST.BBOX_VOTE.ENABLED": cfg.TEST.BBOX_VOTE.ENABLED,
                          "KRCNN.NMS_OKS": cfg.KRCNN.NMS_OKS, "KRCNN.INFERENCE_MIN_SIZE": cfg.KRCNN.INFERENCE_MIN_SIZE}
        for key, value in detectron_only.items():
            if value:
                _fail(f"{key} = {value!r} is Detectron's inference; MODEL.ROI_HEADS_NAME "
                      f"{cfg.MODEL.ROI_HEADS_NAME!r} follows detectron2's (fast_rcnn_inference, heatmaps_to_keypoints)")
    if cfg.MODEL.CONVENTIONS == "detectron2":
        return
    if d2_cascade:
        _fail(f"MODEL.ROI_HEADS_NAME = {cfg.MODEL.ROI_HEADS_NAME!r} is a detectron2 cascade: it needs "
              "MODEL.CONVENTIONS 'detectron2' (boxes without +1, background last)")
    if f.BBOX_REG_LOSS_TYPE != "smooth_l1":
        _fail(f"FAST_RCNN.BBOX_REG_LOSS_TYPE = {f.BBOX_REG_LOSS_TYPE!r} is detectron2 mode only (MODEL.CONVENTIONS "
              "'detectron2'); Detectron's Fast R-CNN loss is smooth-L1")
    if f.SMOOTH_L1_BETA <= 0:
        _fail(f"FAST_RCNN.SMOOTH_L1_BETA = {f.SMOOTH_L1_BETA} must be > 0 with Detectron's conventions (beta 0, "
              "detectron2's L1 loss, needs MODEL.CONVENTIONS 'detectron2')")
    if not cfg.TRAIN.PROPOSAL_APPEND_GT:
        _fail("TRAIN.PROPOSAL_APPEND_GT = False is detectron2 mode only: Detectron always adds the gt boxes to the "
              "RoI candidates")
    for key, (default, head_key, head) in _D2_HEAD_KEYS.items():
        if _get(cfg, key) != default and normalize_module_name(_get(cfg, head_key)) != head:
            _fail(f"{key} = {_get(cfg, key)!r} is read only by {head}, but {head_key} = {_get(cfg, head_key)!r} "
                  "(Detectron's heads have a fixed layout)")


def _check_rpn_keys(cfg: CfgNode) -> None:
    """The RPN / anchor keys detectron2 mode brought: valid values, and the ones only detectron2's numerics
    implement refused in Detectron mode."""
    r = cfg.RPN
    d2 = cfg.MODEL.CONVENTIONS == "detectron2"
    detectron_only = "only in detectron2 mode (MODEL.CONVENTIONS: detectron2)"
    offset = cfg.MODEL.ANCHOR_OFFSET
    if not 0.0 <= offset < 1.0:
        _fail(f"MODEL.ANCHOR_OFFSET = {offset} must be in [0, 1) (detectron2's ANCHOR_GENERATOR.OFFSET)")
    if offset != 0.0 and not d2:
        _fail(f"MODEL.ANCHOR_OFFSET = {offset} applies {detectron_only}: Detectron's anchors have a fixed placement")
    _one_of(cfg, "RPN.BBOX_REG_LOSS_TYPE", RPN_BOX_LOSS_TYPES)
    if r.BBOX_REG_LOSS_TYPE != "smooth_l1" and not d2:
        _fail(f"RPN.BBOX_REG_LOSS_TYPE = {r.BBOX_REG_LOSS_TYPE!r} is available {detectron_only}; Detectron's RPN "
              "loss is smooth-L1")
    weights = tuple(r.BBOX_REG_WEIGHTS)
    if len(weights) != 4 or not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        _fail(f"RPN.BBOX_REG_WEIGHTS = {r.BBOX_REG_WEIGHTS!r} must be 4 positive numbers (wx, wy, ww, wh)")
    if weights != (1.0, 1.0, 1.0, 1.0) and not d2:
        _fail(f"RPN.BBOX_REG_WEIGHTS = {weights} applies {detectron_only}; Detectron's RPN box coder uses (1, 1, 1, 1)")
    for key in ("SMOOTH_L1_BETA", "LOSS_WEIGHT", "BBOX_REG_LOSS_WEIGHT"):
        if r[key] < 0:
            _fail(f"RPN.{key} = {r[key]} must be >= 0")
    if d2 and r.CLS_ACTIVATION != "sigmoid":
        _fail(f"RPN.CLS_ACTIVATION = {r.CLS_ACTIVATION!r} has no detectron2 counterpart (its RPN uses a sigmoid)")


def _check_distill(cfg: CfgNode) -> None:
    d = cfg.DISTILL
    _one_of(cfg, "DISTILL.METHOD", DISTILL_METHODS)
    if not d.METHOD:
        return
    if not d.TEACHER_CFG:
        _fail(f"DISTILL.METHOD = {d.METHOD!r} needs DISTILL.TEACHER_CFG, the teacher detector's YAML")
    stages = len(DISTILL_STAGES)
    if len(d.LOSS_FACTORS) != stages or not all(isinstance(f, (int, float)) and f > 0 for f in d.LOSS_FACTORS):
        _fail(f"DISTILL.LOSS_FACTORS = {d.LOSS_FACTORS!r} must be {stages} positive numbers, one per stage "
              f"{', '.join(DISTILL_STAGES)}")
    ignored = list(d.IGNORE_INDS)
    if not all(isinstance(i, int) and 0 <= i < stages for i in ignored) or len(set(ignored)) != len(ignored):
        _fail(f"DISTILL.IGNORE_INDS = {d.IGNORE_INDS!r} must be distinct stage indices in 0..{stages - 1} "
              f"({', '.join(f'{i} = {n}' for i, n in enumerate(DISTILL_STAGES))})")
    if len(ignored) == stages:
        _fail(f"DISTILL.IGNORE_INDS = {d.IGNORE_INDS!r} ignores every stage: nothing would be distilled")
    if d.METHOD != "mgd":
        return
    m = d.MGD
    _one_of(cfg, "DISTILL.MGD.REDUCER", MGD_REDUCERS)
    if len(m.UPDATE_FREQ) != 2 or not all(isinstance(f, int) and f > 0 for f in m.UPDATE_FREQ):
        _fail(f"DISTILL.MGD.UPDATE_FREQ = {m.UPDATE_FREQ!r} must be two positive iteration counts (before and "
              "after DISTILL.MGD.UPDATE_SLOW_STEP)")
    for key in ("UPDATE_SLOW_STEP", "UPDATE_ITER"):
        if not isinstance(m[key], int) or m[key] < 0:
            _fail(f"DISTILL.MGD.{key} = {m[key]!r} must be a non-negative integer")


def _check_retinanet(cfg: CfgNode) -> None:
    """RETINANET.NORM and USE_GN (one answer: NORM), the box loss type and the box coder weights."""
    r = cfg.RETINANET
    if r.NORM in ("BN", "SyncBN"):
        _fail(f"RETINANET.NORM = {r.NORM!r} is not supported: detectron2 gives its RetinaNet head one {r.NORM} per "
              "FPN level (CycleBatchNormList), which pydetectron does not build; use '' or 'GN'")
    if r.NORM not in RETINANET_NORMS:
        _fail(f"RETINANET.NORM = {r.NORM!r} is not one of {RETINANET_NORMS} (detectron2's shared FrozenBN / other "
              "norms in the RetinaNet towers are not built)")
    if r.USE_GN:
        r.NORM = "GN"
    r.USE_GN = r.NORM == "GN"
    _one_of(cfg, "RETINANET.BBOX_REG_LOSS_TYPE", BOX_REG_LOSS_TYPES)
    if r.BBOX_REG_LOSS_TYPE != "smooth_l1" and cfg.MODEL.CONVENTIONS != "detectron2":
        _fail(f"RETINANET.BBOX_REG_LOSS_TYPE = {r.BBOX_REG_LOSS_TYPE!r} needs MODEL.CONVENTIONS 'detectron2' "
              "(Detectron's RetinaNet has the smooth-L1 box loss only)")
    weights = list(r.BBOX_REG_WEIGHTS)
    if len(weights) != 4 or not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        _fail(f"RETINANET.BBOX_REG_WEIGHTS = {r.BBOX_REG_WEIGHTS!r} must be four positive numbers (wx, wy, ww, wh)")
    if cfg.MODEL.CONVENTIONS == "detectron2" and not 0 < r.NEGATIVE_OVERLAP <= r.POSITIVE_OVERLAP:
        _fail(f"RETINANET.NEGATIVE_OVERLAP = {r.NEGATIVE_OVERLAP} and POSITIVE_OVERLAP = {r.POSITIVE_OVERLAP} are "
              "detectron2's IOU_THRESHOLDS [bg, fg]: they need 0 < bg <= fg")


def assert_and_infer_cfg(cfg: CfgNode, make_immutable: bool = True) -> CfgNode:
    """Fill in the inferred keys, check the values, and (by default) freeze ``cfg``. Returns ``cfg``.

    Call it once, after all merges. Raises ``ConfigError`` naming the offending key.
    """
    if cfg.is_frozen():
        raise ConfigError("assert_and_infer_cfg() needs an unfrozen config (it was already called on this one?)")
    _infer_heads(cfg)
    _infer_freeze_at(cfg)
    _infer_norm(cfg)
    _infer_fpn_norm(cfg)
    _infer_roi_heads(cfg)
    _check_solver(cfg)
    _check_input(cfg)
    _check_heads(cfg)
    _check_rpn_keys(cfg)
    _check_roi_heads(cfg)
    _check_distill(cfg)
    _check_retinanet(cfg)
    if make_immutable:
        cfg.freeze()
    return cfg
