"""detectron2 ResNet names <-> Caffe2 blob names.

detectron2 names a ResNet ``stem.conv1.weight``, ``stem.conv1.norm.{weight,bias,running_mean,running_var}``,
``res2.0.conv1.weight``, ``res2.0.conv1.norm.*``, ``res2.0.shortcut.weight``, ``res2.0.shortcut.norm.*``
(inside a detector prefixed ``backbone.bottom_up.``). That is what its ``convert-torchvision-to-d2.py``,
SparK's ``convert-timm-to-d2.py`` and OpenSelfSup's converter write, as
``pickle({'model': {name: numpy array}, '__author__': ..., 'matching_heuristics': True})``.

A norm with running statistics is a batch norm (``_bn_s/_b/_rm/_riv``, unfolded; detectron2's
FrozenBatchNorm2d keeps them too); one without is a GroupNorm (``_gn_s/_b``). Written the other way, a
folded AffineChannel becomes detectron2's FrozenBatchNorm2d with mean 0 and variance ``1 - eps``, exactly
the affine map it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from pydetectron.weights.detectron_pkl import BN_EPS
from pydetectron.weights.torchvision import to_numpy

DETECTRON2_ANCHOR = "res2.0.conv1.weight"
_KEY = re.compile(r"^(?:stem\.conv1|res(\d)\.(\d+)\.(conv[123]|shortcut))(\.norm)?"
                  r"\.(weight|bias|running_mean|running_var)$")
_BRANCH_OF = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
_CONV_OF = {v: k for k, v in _BRANCH_OF.items()}
_NORM_SUFFIX = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_NORM_PARAM = {v: k for k, v in _NORM_SUFFIX.items()}
_BLOB = re.compile(r"^(?:(conv1)|res_conv1_bn|conv1_gn|res(\d)_(\d+)_(branch1|branch2a|branch2b|branch2c))"
                   r"(?:_(bn|gn))?_(w|b|s|rm|riv)$")
IGNORED_KEYS = re.compile(r"(^|\.)(num_batches_tracked$|fc\.(weight|bias)$)")  # counters; SparK's 'stem.fc'


def is_detectron2_key(key: str) -> bool:
    return _KEY.match(key) is not None


def detectron2_to_blobs(state: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, str], list]:
    """(``{blob: array}``, ``{blob: the file's key}``, keys left out) of a detectron2 ResNet state dict whose
    backbone prefix is already removed. Keys that are not ResNet body names are returned as left out;
    batch-norm counters and a classifier (SparK's ``stem.fc``) are dropped."""
    norms_with_stats = {k.rsplit(".", 1)[0] for k in state if k.endswith(".norm.running_mean")}
    blobs: Dict[str, np.ndarray] = {}
    names: Dict[str, str] = {}
    left_out = []
    for key, value in state.items():
        if IGNORED_KEYS.search(key):
            continue
        match = _KEY.match(key)
        if match is None:
            left_out.append(key)
            continue
        stage, block, part, norm, param = match.groups()
        prefix = "conv1" if stage is None else f"res{stage}_{block}_{_BRANCH_OF[part]}"
        if norm:
            is_bn = key.rsplit(".", 1)[0] in norms_with_stats
            if prefix == "conv1":
                prefix = "res_conv1" if is_bn else "conv1"
            blob = f"{prefix}_{'bn' if is_bn else 'gn'}_{_NORM_SUFFIX[param]}"
        elif param in ("weight", "bias"):
            blob = f"{prefix}_{param[0]}"
        else:
            left_out.append(key)
            continue
        blobs[blob] = to_numpy(value)
        names[blob] = key
    return blobs, names, left_out


def blob_to_detectron2_key(blob: str) -> str | None:
    """detectron2's name of a Caffe2 body blob (``res3_1_branch2b_bn_riv`` -> ``res3.1.conv2.norm.running_var``),
    or None for blobs outside the ResNet body."""
    match = _BLOB.match(blob)
    if match is None:
        return None
    stem_conv, stage, block, branch, norm, suffix = match.groups()
    if blob.startswith(("res_conv1_bn_", "conv1_gn_")):
        head, norm = "stem.conv1", "bn"
    elif stem_conv:
        head = "stem.conv1"
    else:
        head = f"res{stage}.{block}.{_CONV_OF[branch]}"
    if norm:
        return f"{head}.norm.{_NORM_PARAM[suffix]}" if suffix in _NORM_PARAM else None
    return {"w": f"{head}.weight", "b": f"{head}.bias"}.get(suffix)


def blobs_to_detectron2(blobs: Mapping[str, np.ndarray], bn_eps: float = BN_EPS) -> Tuple[Dict[str, np.ndarray], list]:
    """(detectron2 ResNet state dict, blobs left out) from Caffe2 blobs (see :func:`blobs_to_detectron2_detector`)."""
    return blobs_to_detectron2_detector(blobs, DetectorNames(body_prefix=""), bn_eps)

# ---- whole detectors ------------------------------------------------------------------------------------------
# detectron2 names a detector's other modules as below; each maps to the Caffe2 blob base that detectron2's own
# ``convert_c2_detectron_names`` renames into it (its suffix matching supplies the ``backbone.`` / ``roi_heads.``
# prefixes), and back. Modules Detectron lacks get Caffe2-style names: box-head fc3.. -> ``fc8``..; RetinaNet
# subnet norms ``retnet_*_conv_n{i}_fpn{l}_gn_*``; Res5ROIHeadsExtraNorm's ``roi_heads.res5.norm`` ->
# ``res5_extra_<bn|gn>_*``.
# A module's norm is ``<base>_bn_*`` when the file has its running statistics, else ``<base>_gn_*``.
DETECTOR_IGNORED_KEYS = re.compile(
    r"(^|\.)num_batches_tracked$|^pixel_(mean|std)$|(^|\.)anchor_generator\.cell_anchors\.")  # d2 skips them too
_D2_PARAM = re.compile(r"^(?P<module>.+?)(?P<norm>\.norm)?\.(?P<param>weight|bias|running_mean|running_var)$")
_BLOB_PARTS = re.compile(r"^(?P<base>.+?)(?:_(?P<norm>bn|gn))?_(?P<suffix>w|b|s|rm|riv)$")
_RPN_PARTS = {"conv": "conv_rpn", "objectness_logits": "rpn_cls_logits", "anchor_deltas": "rpn_bbox_pred"}
_RPN_MODULES = {v: k for k, v in _RPN_PARTS.items()}
_FC_OFFSET = 5  # d2 box_head.fc1 is Detectron's fc6
RES5_NORM_BASE = "res5_extra"
# Fixed (never trained) bilinear up-sampling kernels of Detectron's heads; detectron2 up-samples by interpolation.
FIXED_UPSAMPLE_BLOBS = re.compile(r"^(kps_score|mask_fcn_logits_up)_[wb]$")


@dataclass(frozen=True)
class DetectorNames:
    """What a detectron2 detector's names depend on beyond the key itself.

    `body_prefix`: ``backbone.bottom_up.`` (FPN) or ``backbone.`` (C4, whose res5 sits in ``roi_heads.res5``);
    `last_blocks`: {stage: index of its last block} (Caffe2's FPN names carry it: ``fpn_res4_5_sum``);
    `rpn_level` / `retina_level`: the FPN level Caffe2 names a shared head after (None: a C4 RPN);
    `res5_in_head`: res5 sits in ``roi_heads.res5`` (a C4 detector);
    `mask_norm`, `retina_norm`: whether the mask convs / RetinaNet subnets have norms (their naming depends on it).
    """

    body_prefix: str = "backbone.bottom_up."
    res5_in_head: bool = False
    last_blocks: Mapping[int, int] = field(default_factory=dict)
    rpn_level: int | None = 2
    retina_level: int = 3
    mask_norm: bool = False
    retina_norm: bool = False


def detector_names_of_keys(keys, body_prefix: str) -> DetectorNames:
    """The :class:`DetectorNames` of a detectron2 state dict's keys (`body_prefix`: where its ResNet sits)."""
    keys = list(keys)
    last: Dict[int, int] = {}
    for key in keys:
        match = re.match(r"^(?:.*\.)?res(\d)\.(\d+)\.", key)
        if match:
            last[int(match.group(1))] = max(last.get(int(match.group(1)), 0), int(match.group(2)))
    levels = sorted(int(m.group(1)) for m in map(re.compile(r"^backbone\.fpn_lateral(\d)\.").match, keys) if m)
    fpn = body_prefix == "backbone.bottom_up." or bool(levels)
    return DetectorNames(
        body_prefix=body_prefix, last_blocks=last,
        res5_in_head=not fpn and any(k.startswith("roi_heads.res5.") for k in keys),
        rpn_level=(levels[0] if levels else 2) if fpn else None, retina_level=levels[0] if levels else 3,
        mask_norm=any(re.match(r"^roi_heads\.mask_head\.mask_fcn\d+\.norm\.", k) for k in keys),
        retina_norm=any(re.match(r"^head\.(cls|bbox)_subnet\.1\.", k) for k in keys))


def _stage_block(names: DetectorNames, stage: int, key: str) -> int:
    if stage not in names.last_blocks:
        raise KeyError(f"{key}: the file holds no res{stage} stage, whose last block Caffe2's FPN names carry")
    return names.last_blocks[stage]


def _head_base(module: str, names: DetectorNames, key: str) -> Tuple[str, bool] | None:
    """(Caffe2 blob base, whether `module` is itself a norm) of a detectron2 module outside the ResNet body."""
    m = re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)", module)
    if m:
        stage = int(m.group(2))
        stage_blob = f"res{stage}_{_stage_block(names, stage, key)}_sum"
        if m.group(1) == "output":
            return f"fpn_{stage_blob}", False
        return f"fpn_inner_{stage_blob}" + ("" if stage == 5 else "_lateral"), False
    m = re.fullmatch(r"backbone\.top_block\.p([67])", module)
    if m:
        return f"fpn_{m.group(1)}", False
    m = re.fullmatch(r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)", module)
    if m:
        level = "" if names.rpn_level is None else f"_fpn{names.rpn_level}"
        return _RPN_PARTS[m.group(1)] + level, False
    m = re.fullmatch(r"roi_heads\.box_head\.(conv|fc)(\d+)", module)
    if m:
        n = int(m.group(2))
        return (f"head_conv{n}" if m.group(1) == "conv" else f"fc{n + _FC_OFFSET}"), False
    m = re.fullmatch(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)", module)
    if m:
        return m.group(1), False
    m = re.fullmatch(r"roi_heads\.mask_head\.(mask_fcn(\d+)|deconv|predictor)", module)
    if m:
        if m.group(2):
            return f"{'_mask_fcn' if names.mask_norm else '_[mask]_fcn'}{m.group(2)}", False
        return {"deconv": "conv5_mask", "predictor": "mask_fcn_logits"}[m.group(1)], False
    m = re.fullmatch(r"roi_heads\.keypoint_head\.(conv_fcn\d+|score_lowres)", module)
    if m:
        return ("kps_score_lowres" if m.group(1) == "score_lowres" else m.group(1)), False
    m = re.fullmatch(r"head\.(cls|bbox)_subnet\.(\d+)", module)
    if m:
        step = 3 if names.retina_norm else 2
        index = int(m.group(2))
        if index % step not in (0, 1) or (index % step == 1 and not names.retina_norm):
            return None
        return f"retnet_{m.group(1)}_conv_n{index // step}_fpn{names.retina_level}", index % step == 1
    m = re.fullmatch(r"head\.(cls_score|bbox_pred)", module)
    if m:
        return f"retnet_{'cls' if m.group(1) == 'cls_score' else 'bbox'}_pred_fpn{names.retina_level}", False
    if module == "roi_heads.res5":  # Res5ROIHeadsExtraNorm's norm after res5 (key roi_heads.res5.norm.*)
        return RES5_NORM_BASE, True
    return None


def detector_key_to_blob(key: str, names: DetectorNames, norms_with_stats: set) -> str | None:
    """The Caffe2 blob of a detectron2 detector key outside the ResNet body, or None when it names none.
    `norms_with_stats`: the file's norm modules that have running statistics (batch norms)."""
    match = _D2_PARAM.match(key)
    if match is None:
        return None
    module, norm, param = match.group("module", "norm", "param")
    found = _head_base(module, names, key)
    if found is None:
        return None
    base, is_norm = found
    if norm or is_norm:
        norm_module = module + (norm or "")
        kind = "bn" if norm_module in norms_with_stats else "gn"
        return f"{base}_{kind}_{_NORM_SUFFIX[param]}"
    return {"weight": f"{base}_w", "bias": f"{base}_b"}.get(param)


def detectron2_detector_to_blobs(
    state: Mapping[str, Any], body_prefix: str
) -> Tuple[Dict[str, np.ndarray], Dict[str, str], list, DetectorNames]:
    """(``{blob: array}``, ``{blob: the file's key}``, keys that name nothing, :class:`DetectorNames`) of a whole
    detectron2 detector state dict whose ResNet sits under `body_prefix` (C4: res5 under ``roi_heads.res5.``).
    Batch-norm counters, ``pixel_mean`` / ``pixel_std`` and old anchor buffers are dropped, as detectron2
    drops them."""
    names = detector_names_of_keys(state, body_prefix)
    body_keys = {}
    others = {}
    for key, value in state.items():
        if DETECTOR_IGNORED_KEYS.search(key):
            continue
        if key.startswith(body_prefix) and _KEY.match(key[len(body_prefix):]):
            body_keys[key[len(body_prefix):]] = (key, value)
        elif names.res5_in_head and key.startswith("roi_heads.res5.") and _KEY.match(key[len("roi_heads."):]):
            body_keys[key[len("roi_heads."):]] = (key, value)
        else:
            others[key] = value
    blobs, body_names, left_out = detectron2_to_blobs({k: v for k, (_, v) in body_keys.items()})
    file_names = {blob: body_keys[k][0] for blob, k in body_names.items()}
    left_out = [body_keys[k][0] for k in left_out]
    norms_with_stats = {k.rsplit(".", 1)[0] for k in others if k.endswith(".running_mean")}
    for key, value in others.items():
        blob = detector_key_to_blob(key, names, norms_with_stats)
        if blob is None:
            left_out.append(key)
            continue
        if blob in blobs:
            raise KeyError(f"detectron2 keys {file_names[blob]!r} and {key!r} both name Caffe2 blob {blob!r}")
        blobs[blob] = to_numpy(value)
        file_names[blob] = key
    return blobs, file_names, left_out, names


def _module_of_base(base: str, names: DetectorNames) -> Tuple[str, bool] | None:
    """(detectron2 module, whether the norm is the module itself) of a Caffe2 blob base outside the body."""
    m = re.fullmatch(r"fpn_inner_res(\d)_\d+_sum(?:_lateral)?", base)
    if m:
        return f"backbone.fpn_lateral{m.group(1)}", False
    m = re.fullmatch(r"fpn_res(\d)_\d+_sum", base)
    if m:
        return f"backbone.fpn_output{m.group(1)}", False
    m = re.fullmatch(r"fpn_([67])", base)
    if m:
        return f"backbone.top_block.p{m.group(1)}", False
    m = re.fullmatch(r"(conv_rpn|rpn_cls_logits|rpn_bbox_pred)(?:_fpn\d)?", base)
    if m:
        return f"proposal_generator.rpn_head.{_RPN_MODULES[m.group(1)]}", False
    m = re.fullmatch(r"head_conv(\d+)", base)
    if m:
        return f"roi_heads.box_head.conv{m.group(1)}", False
    m = re.fullmatch(r"fc(\d+)", base)
    if m and int(m.group(1)) > _FC_OFFSET:
        return f"roi_heads.box_head.fc{int(m.group(1)) - _FC_OFFSET}", False
    if base in ("cls_score", "bbox_pred"):
        return f"roi_heads.box_predictor.{base}", False
    m = re.fullmatch(r"(?:_\[mask\]_|_mask_|mask_)fcn(\d+)", base)
    if m:
        return f"roi_heads.mask_head.mask_fcn{m.group(1)}", False
    if base in ("conv5_mask", "mask_fcn_logits"):
        return f"roi_heads.mask_head.{'deconv' if base == 'conv5_mask' else 'predictor'}", False
    m = re.fullmatch(r"conv_fcn(\d+)", base)
    if m:
        return f"roi_heads.keypoint_head.conv_fcn{m.group(1)}", False
    if base == "kps_score_lowres":
        return "roi_heads.keypoint_head.score_lowres", False
    m = re.fullmatch(r"retnet_(cls|bbox)_conv_n(\d+)_fpn\d", base)
    if m:
        return f"head.{m.group(1)}_subnet.{int(m.group(2)) * (3 if names.retina_norm else 2)}", False
    m = re.fullmatch(r"retnet_(cls|bbox)_pred_fpn\d", base)
    if m:
        return f"head.{'cls_score' if m.group(1) == 'cls' else 'bbox_pred'}", False
    if base == RES5_NORM_BASE:
        return "roi_heads.res5.norm", True
    return None


def blob_to_detector_key(blob: str, names: DetectorNames) -> str | None:
    """detectron2's name of any Caffe2 blob of a detector (body included), or None when it has none."""
    body_key = blob_to_detectron2_key(blob)
    if body_key is not None:
        in_head = names.res5_in_head and body_key.startswith("res5.")
        return ("roi_heads." if in_head else names.body_prefix) + body_key
    match = _BLOB_PARTS.match(blob)
    if match is None:
        return None
    base, norm, suffix = match.group("base", "norm", "suffix")
    found = _module_of_base(base, names)
    if found is None:
        return None
    module, is_norm = found
    if norm is None and not is_norm:
        param = {"w": "weight", "b": "bias"}.get(suffix)
        return f"{module}.{param}" if param else None
    if suffix not in _NORM_PARAM:
        return None
    if module.startswith("head.") and norm:  # a RetinaNet subnet's norm is the module after its conv
        stem, index = module.rsplit(".", 1)
        return f"{stem}.{int(index) + 1}.{_NORM_PARAM[suffix]}"
    return f"{module}{'' if is_norm else '.norm'}.{_NORM_PARAM[suffix]}"


def detector_names_of_blobs(blobs, res5_in_head: bool) -> DetectorNames:
    """The :class:`DetectorNames` to write `blobs` with (`res5_in_head`: a C4 detector's box head owns res5). The
    ResNet sits under ``backbone.bottom_up.`` below an FPN, else (C4, DC5) directly under ``backbone.``."""
    fpn = any(blob.startswith("fpn_") for blob in blobs)
    return DetectorNames(body_prefix="backbone.bottom_up." if fpn else "backbone.", res5_in_head=res5_in_head,
                         retina_norm=any(re.match(r"^retnet_\w+_conv_n\d+_fpn\d+_(gn|bn)_s$", b) for b in blobs))


def blobs_to_detectron2_detector(
    blobs: Mapping[str, np.ndarray], names: DetectorNames, bn_eps: float = BN_EPS
) -> Tuple[Dict[str, np.ndarray], list]:
    """(detectron2 detector state dict, blobs without a detectron2 name) from a detector's Caffe2 blobs. A
    batch-norm-named norm without statistics (a folded AffineChannel, Detectron's frozen BN) becomes
    detectron2's FrozenBatchNorm2d with mean 0 and variance ``1 - eps``: the same affine map."""
    state: Dict[str, np.ndarray] = {}
    left_out = []
    for blob, value in blobs.items():
        key = blob_to_detector_key(blob, names)
        if key is None:
            left_out.append(blob)
            continue
        state[key] = np.asarray(value)
    for blob, value in blobs.items():
        key = blob_to_detector_key(blob, names) if re.search(r"_bn_s$", blob) else None
        if key is not None and blob[:-2] + "_rm" not in blobs:
            norm = key[: -len(".weight")]
            state[f"{norm}.running_mean"] = np.zeros(np.shape(value), np.float32)
            state[f"{norm}.running_var"] = np.full(np.shape(value), 1.0 - bn_eps, np.float32)
    return state, left_out
