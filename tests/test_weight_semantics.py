"""Detectron blobs land where they act: each module, loaded from random blobs by name, computes what a float64
forward written here from the Caffe2 formulas computes with the same blobs read by name.

The names and shapes come from ``detectron_names`` (written from Detectron's model code, independent of
pydetectron) or are spelled out here; nothing is read back through the mapping under test. Every test also
swaps same-shaped blobs in the reference and checks that the answer changes, so a mapping that swapped them
(``_gn_s`` / ``_gn_b``, fc6 / fc7, two tower convs, ...) would fail it.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron_names import (
    box_head_blobs,
    fpn_blobs,
    fpn_rpn_blobs,
    keypoint_head_blobs,
    mask_head_blobs,
    resnet_body_blobs,
    retinanet_head_blobs,
)

from pydetectron.config import get_cfg
from pydetectron.modeling import registry
from pydetectron.modeling.backbones import ResNet
from pydetectron.modeling.backbones.fpn import FPN
from pydetectron.modeling.box_head import build_box_outputs
from pydetectron.modeling.layers import ConvNorm, NormSpec
from pydetectron.modeling.retinanet import RetinaNetHead
from pydetectron.modeling.rpn import build_rpn
from pydetectron.weights import load_detectron_weights

registry.import_builtin_modules()

Blobs = Dict[str, np.ndarray]
GN_GROUPS = 4  # GROUP_NORM.NUM_GROUPS for the small heads here


def _random_blobs(shapes: Dict[str, Tuple[int, ...]], seed: int = 0) -> Blobs:
    """Weights ~ N(0, 1 / fan_in) (activations stay O(1) through deep bodies), norm scales in [0.5, 1.5],
    biases ~ N(0, 0.5): every blob differs from every other, so no swap can go unnoticed by chance."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) > 1:
            blobs[name] = (rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))).astype(np.float32)
        elif name.endswith("_s"):
            blobs[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            blobs[name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return blobs


def _with_gn(shapes: Dict[str, Tuple[int, ...]], convs: Iterable[str], keep_bias: bool = False
             ) -> Dict[str, Tuple[int, ...]]:
    """Detectron's ConvGN for each conv prefix in `convs`: no ``_b`` (unless `keep_bias`: the RetinaNet GN towers,
    as detectron2's, keep theirs), plus ``_gn_s`` / ``_gn_b``."""
    shapes = dict(shapes)
    for prefix in convs:
        if not keep_bias:
            del shapes[f"{prefix}_b"]
        shapes[f"{prefix}_gn_s"] = shapes[f"{prefix}_gn_b"] = (shapes[f"{prefix}_w"][0],)
    return shapes


# --- Caffe2 ops in float64, reading blobs by name ------------------------------------------------------------

def _t(blobs: Blobs, name: str) -> torch.Tensor:
    return torch.from_numpy(blobs[name]).double()


def _conv(x, blobs: Blobs, prefix: str, *, stride=1, pad=None, dilation=1, groups=1):
    """Caffe2 Conv: ``<prefix>_w`` (out, in/groups, k, k), ``<prefix>_b`` when the blob exists."""
    w = _t(blobs, f"{prefix}_w")
    bias = _t(blobs, f"{prefix}_b") if f"{prefix}_b" in blobs else None
    pad = dilation * (w.shape[-1] // 2) if pad is None else pad
    return F.conv2d(x, w, bias, stride=stride, padding=pad, dilation=dilation, groups=groups)


def _deconv(x, blobs: Blobs, prefix: str, *, stride: int, pad: int):
    """Caffe2 ConvTranspose: weight (in, out, k, k)."""
    return F.conv_transpose2d(x, _t(blobs, f"{prefix}_w"), _t(blobs, f"{prefix}_b"), stride=stride, padding=pad)


def _fc(x, blobs: Blobs, prefix: str):
    return x.flatten(1) @ _t(blobs, f"{prefix}_w").T + _t(blobs, f"{prefix}_b")


def _affine(x, blobs: Blobs, prefix: str):
    """AffineChannel: x * s + b per channel."""
    return x * _t(blobs, f"{prefix}_s")[None, :, None, None] + _t(blobs, f"{prefix}_b")[None, :, None, None]


def _group_norm(x, blobs: Blobs, prefix: str, groups: int, eps: float = 1e-5):
    """Caffe2 GroupNorm: (x - mean) / sqrt(var + eps) over each group's channels and pixels, then * s + b."""
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    normalised = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps))
    return _affine(normalised.reshape(x.shape), blobs, prefix)


def _conv_gn(x, blobs, prefix, groups, **conv):
    return _group_norm(_conv(x, blobs, prefix, **conv), blobs, f"{prefix}_gn", groups)


def _roi_align(feature, rois, resolution: int, scale: float):
    """torchvision's RoIAlign with aligned=False is Caffe2's (sampling ratio 2, as Detectron's configs)."""
    return torchvision.ops.roi_align(feature, rois, (resolution, resolution), scale, 2, aligned=False)


# --- the check ------------------------------------------------------------------------------------------------

def _load(module: torch.nn.Module, blobs: Blobs, strict: bool = True):
    report = load_detectron_weights(module, {"blobs": blobs}, strict=strict)
    assert report.skipped == []
    return report


def _outputs(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _outputs(v)]


def _assert_same(got, want, what: str) -> None:
    got, want = _outputs(got), _outputs(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        scale = w.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(g.double() / scale, w / scale, rtol=0, atol=1e-4, msg=what)


def _check(got, reference: Callable[[Blobs], object], blobs: Blobs, swaps: Sequence[Tuple[str, str]]) -> None:
    """`got` equals the reference forward with `blobs`, and differs from it with each pair in `swaps` swapped."""
    _assert_same(got, reference(blobs), "model vs float64 reference")
    for a, b in swaps:
        assert blobs[a].shape == blobs[b].shape, (a, b)
        swapped = dict(blobs, **{a: blobs[b], b: blobs[a]})
        with pytest.raises(AssertionError):
            _assert_same(got, reference(swapped), f"swapped {a} / {b}")


# --- norms ------------------------------------------------------------------------------------------------------

def test_groupnorm_blobs_are_scale_then_shift_on_zero_and_nonzero_inputs():
    """A zero input normalises to zero, so the output is exactly ``_gn_b``; a random one checks the formula."""
    layer = ConvNorm(4, 8, 3, norm=NormSpec("GN", gn_num_groups=GN_GROUPS), conv_blob="head_conv1").eval()
    blobs = _random_blobs({"head_conv1_w": (8, 4, 3, 3), "head_conv1_gn_s": (8,), "head_conv1_gn_b": (8,)})
    _load(layer, blobs)
    with torch.no_grad():
        zero = layer(torch.zeros(2, 4, 5, 5))
        x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
        out = layer(x)
    torch.testing.assert_close(zero, torch.from_numpy(blobs["head_conv1_gn_b"]).view(1, 8, 1, 1).expand(2, 8, 5, 5))
    _check(out, lambda b: _conv_gn(x.double(), b, "head_conv1", GN_GROUPS), blobs,
           [("head_conv1_gn_s", "head_conv1_gn_b")])


# --- bodies -----------------------------------------------------------------------------------------------------

def _resnet_reference(x, blobs: Blobs, block_counts, norm: str, groups: int, stride_1x1: bool) -> Dict[int, object]:
    """Detectron's add_ResNet_convX_body: basic stem, then bottleneck blocks (stride in the first block of
    res3+, on the 1x1 for MSRA models or the 3x3 for ResNeXt), projection shortcuts where the width changes."""
    def normed(x, conv_prefix, norm_prefix=None, n_groups=32, **conv):
        y = _conv(x, blobs, conv_prefix, **conv)
        norm_prefix = norm_prefix or f"{conv_prefix}_{norm}"
        return _group_norm(y, blobs, norm_prefix, n_groups) if norm == "gn" else _affine(y, blobs, norm_prefix)

    x = F.relu(normed(x, "conv1", "conv1_gn" if norm == "gn" else "res_conv1_bn", stride=2))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    dim_in, outputs = 64, {}
    for stage, count in enumerate(block_counts, start=2):
        dim_out = 256 * 2 ** (stage - 2)
        for i in range(count):
            name, stride = f"res{stage}_{i}", 2 if i == 0 and stage > 2 else 1
            a = F.relu(normed(x, f"{name}_branch2a", stride=stride if stride_1x1 else 1))
            b = F.relu(normed(a, f"{name}_branch2b", stride=1 if stride_1x1 else stride, groups=groups))
            c = normed(b, f"{name}_branch2c")
            shortcut = normed(x, f"{name}_branch1", stride=stride) if dim_in != dim_out else x
            x, dim_in = F.relu(c + shortcut), dim_out
        outputs[stage] = x
    return outputs


@pytest.mark.parametrize("norm, groups, width, stride_1x1", [
    ("bn", 1, 64, True),  # R-50.pkl: AffineChannel ``_bn_s`` / ``_bn_b``
    ("gn", 1, 64, True),  # R-50-GN.pkl: ``_gn_s`` / ``_gn_b``, stem ``conv1_gn``
    ("bn", 4, 8, False),  # ResNeXt (X-101-32x8d's layout, narrower): grouped 3x3, stride on the 3x3
], ids=["affine", "gn", "resnext"])
def test_resnet_conv4_body_computes_detectrons_body(norm, groups, width, stride_1x1):
    cfg = get_cfg()
    cfg.RESNETS.NORM = "GN" if norm == "gn" else "AffineChannel"
    cfg.RESNETS.NUM_GROUPS, cfg.RESNETS.WIDTH_PER_GROUP, cfg.RESNETS.STRIDE_1X1 = groups, width, stride_1x1
    body = registry.build("body", "ResNet50_conv4_body", cfg).eval()
    blocks = (3, 4, 6)
    blobs = _random_blobs(resnet_body_blobs(blocks, groups=groups, width_per_group=width, norm=norm))
    _load(body, blobs)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = body.forward_stages(x)
    swaps = [("res2_0_branch2a_bn_s" if norm == "bn" else "res2_0_branch2a_gn_s",
              "res2_0_branch2a_bn_b" if norm == "bn" else "res2_0_branch2a_gn_b"),
             ("res4_1_branch2a_w", "res4_2_branch2a_w"), ("res3_1_branch2b_w", "res3_2_branch2b_w"),
             ("res2_0_branch2c_w", "res2_0_branch1_w") if width == 64 else ("res3_0_branch2c_w", "res3_1_branch2c_w")]
    _check([got[s] for s in (2, 3, 4)],
           lambda b: [v for _, v in sorted(_resnet_reference(x.double(), b, blocks, norm, groups, stride_1x1).items())],
           blobs, swaps)


def _fpn_reference(stages, blobs: Blobs, sums: Dict[int, str], min_level: int, max_level: int,
                   extra_convs: bool, gn: bool):
    """Detectron's add_fpn: 1x1 laterals + 2x nearest top-down, 3x3 outputs; P6 by a 1x1/2 max-pool, or
    with EXTRA_CONV_LEVELS ``fpn_6`` (3x3/2 on C5) and ``fpn_7`` (3x3/2 on ReLU(P6))."""
    def conv(x, prefix, **kw):
        return _conv_gn(x, blobs, prefix, GN_GROUPS, **kw) if gn else _conv(x, blobs, prefix, **kw)

    inner = conv(stages[5], f"fpn_inner_{sums[5]}")
    outputs = [conv(inner, f"fpn_{sums[5]}")]
    for level in range(4, min_level - 1, -1):
        inner = conv(stages[level], f"fpn_inner_{sums[level]}_lateral") + F.interpolate(inner, scale_factor=2)
        outputs.insert(0, conv(inner, f"fpn_{sums[level]}"))
    if extra_convs:
        p6 = _conv(stages[5], blobs, "fpn_6", stride=2)
        outputs += [p6, _conv(F.relu(p6), blobs, "fpn_7", stride=2)]
    elif max_level == 6:
        outputs.append(F.max_pool2d(outputs[-1], 1, stride=2))
    return outputs


@pytest.mark.parametrize("min_level, max_level, extra_convs, gn", [(2, 6, False, False), (3, 7, True, True)],
                         ids=["P2-P6", "retinanet-P3-P7-gn"])
def test_fpn_laterals_and_outputs_compute_detectrons_fpn(min_level, max_level, extra_convs, gn):
    """FPN blobs only (the body keeps its init; its stage maps feed both sides). A ResNet-18 trunk keeps it
    cheap: Detectron's FPN names follow each stage's last ``res<l>_<n-1>_sum``."""
    dim = 8
    fpn = FPN(ResNet(18), dim=dim, min_level=min_level, max_level=max_level, extra_conv_levels=extra_convs,
              norm=NormSpec("GN", gn_num_groups=GN_GROUPS) if gn else None).eval()
    sums = {lvl: f"res{lvl}_1_sum" for lvl in range(2, 6)}
    shapes = fpn_blobs(stage_dims=(64, 128, 256, 512), stage_blocks=(2, 2, 2, 2), dim=dim, min_level=min_level)
    if gn:
        shapes = _with_gn(shapes, [n[:-2] for n in shapes if n.endswith("_w")])
    if extra_convs:
        shapes.update({"fpn_6_w": (dim, 512, 3, 3), "fpn_6_b": (dim,), "fpn_7_w": (dim, dim, 3, 3), "fpn_7_b": (dim,)})
    blobs = _random_blobs(shapes, seed=1)
    report = _load(fpn, blobs, strict=False)
    assert set(report.loaded) == set(blobs) and report.unused == []
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = fpn(x)
        stages = {lvl: s.double() for lvl, s in fpn.body.forward_stages(x).items()}
    swaps = [(f"fpn_{sums[4]}_w", f"fpn_{sums[3]}_w"), (f"fpn_{sums[5]}_w", f"fpn_{sums[4]}_w")]  # output convs
    if gn:
        swaps += [(f"fpn_inner_{sums[5]}_gn_s", f"fpn_inner_{sums[5]}_gn_b"),
                  (f"fpn_inner_{sums[4]}_lateral_gn_b", f"fpn_{sums[4]}_gn_b")]
    else:
        swaps.append((f"fpn_inner_{sums[5]}_b", f"fpn_inner_{sums[4]}_lateral_b"))  # a top and a lateral bias
    if extra_convs:
        swaps.append(("fpn_7_w", f"fpn_{sums[3]}_w"))
    _check(got, lambda b: _fpn_reference(stages, b, sums, min_level, max_level, extra_convs, gn), blobs, swaps)


# --- RPN and RetinaNet heads ------------------------------------------------------------------------------------

def test_fpn_rpn_head_computes_detectrons_rpn_outputs():
    """One head stored at fpn2 and applied to every level: 3x3 conv + ReLU, then 1x1 logits and deltas.
    Width 12 = 4 x 3 anchors makes ``conv_rpn_fpn2_b`` and ``rpn_bbox_pred_fpn2_b`` the same shape."""
    cfg = get_cfg()
    cfg.FPN.FPN_ON = cfg.FPN.MULTILEVEL_RPN = True
    rpn = build_rpn(cfg, 12, [1.0 / 2**lvl for lvl in range(2, 7)]).eval()
    blobs = _random_blobs(fpn_rpn_blobs(dim=12, num_anchors=3), seed=2)
    _load(rpn, blobs)
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, 12, 8, 8, generator=g), torch.randn(1, 12, 4, 4, generator=g)]
    with torch.no_grad():
        got = rpn.head(maps)

    def reference(b):
        hidden = [F.relu(_conv(m.double(), b, "conv_rpn_fpn2")) for m in maps]
        return [_conv(h, b, "rpn_cls_logits_fpn2") for h in hidden], [_conv(h, b, "rpn_bbox_pred_fpn2") for h in hidden]

    _check(got, reference, blobs, [("conv_rpn_fpn2_b", "rpn_bbox_pred_fpn2_b")])


@pytest.mark.parametrize("use_gn", [False, True], ids=["detectron", "gn"])
def test_retinanet_head_computes_detectrons_towers(use_gn):
    """cls and box towers (3x3 conv + ReLU, with GN after each conv under RETINANET.USE_GN), then 3x3 predictors;
    4 classes and one anchor make both predictors the same shape."""
    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = 5
    cfg.RETINANET.NUM_CONVS, cfg.RETINANET.SCALES_PER_OCTAVE, cfg.RETINANET.ASPECT_RATIOS = 2, 1, (1.0,)
    cfg.RETINANET.USE_GN = use_gn
    cfg.GROUP_NORM.NUM_GROUPS = GN_GROUPS
    head = RetinaNetHead(cfg, 8, min_level=3).eval()
    shapes = retinanet_head_blobs(num_classes=5, dim=8, num_anchors=1, num_convs=2)
    if use_gn:
        shapes = _with_gn(shapes, [f"retnet_{t}_conv_n{n}_fpn3" for t in ("cls", "bbox") for n in range(2)],
                          keep_bias=True)
    blobs = _random_blobs(shapes, seed=3)
    _load(head, blobs)
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, 8, 6, 6, generator=g), torch.randn(1, 8, 3, 3, generator=g)]
    with torch.no_grad():
        got = head(maps)

    def tower(x, b, kind):
        for n in range(2):
            prefix = f"retnet_{kind}_conv_n{n}_fpn3"
            x = F.relu(_conv_gn(x, b, prefix, GN_GROUPS) if use_gn else _conv(x, b, prefix))
        return x

    def reference(b):
        return ([_conv(tower(m.double(), b, "cls"), b, "retnet_cls_pred_fpn3") for m in maps],
                [_conv(tower(m.double(), b, "bbox"), b, "retnet_bbox_pred_fpn3") for m in maps])

    swaps = [("retnet_cls_conv_n0_fpn3_w", "retnet_cls_conv_n1_fpn3_w"),
             ("retnet_cls_conv_n0_fpn3_w", "retnet_bbox_conv_n0_fpn3_w"),
             ("retnet_cls_pred_fpn3_w", "retnet_bbox_pred_fpn3_w")]
    if use_gn:
        swaps.append(("retnet_bbox_conv_n1_fpn3_gn_s", "retnet_bbox_conv_n1_fpn3_gn_b"))
    _check(got, reference, blobs, swaps)


# --- RoI heads ----------------------------------------------------------------------------------------------------

SCALE = 1.0 / 8
ROIS = torch.tensor([[0, 4.0, 6.0, 50.0, 40.0], [0, 20.0, 2.0, 60.0, 61.0], [0, 0.0, 0.0, 30.0, 20.0]])


def _feature(channels: int) -> torch.Tensor:
    return torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(5))


def test_box_head_fc6_fc7_and_outputs_compute_detectrons_box_branch():
    """roi_2mlp_head + class-agnostic outputs, sized so that fc6 / fc7 and cls_score / bbox_pred pair up in
    shape (4 channels x 2 x 2 = 16 = MLP dim; 8 classes = 4 x 2 agnostic deltas)."""
    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES, cfg.MODEL.CLS_AGNOSTIC_BBOX_REG = 8, True
    cfg.FAST_RCNN.ROI_XFORM_METHOD, cfg.FAST_RCNN.ROI_XFORM_RESOLUTION = "RoIAlign", 2
    cfg.FAST_RCNN.ROI_XFORM_SAMPLING_RATIO, cfg.FAST_RCNN.MLP_HEAD_DIM = 2, 16
    head = registry.build("box_head", "roi_2mlp_head", cfg, 4, [SCALE]).eval()
    outputs = build_box_outputs(cfg, 16).eval()
    blobs = _random_blobs(box_head_blobs(8, dim_in=4, resolution=2, hidden=16, cls_agnostic=True), seed=4)
    model = torch.nn.ModuleDict({"head": head, "outputs": outputs})
    _load(model, blobs)
    feature = _feature(4)
    with torch.no_grad():
        got = outputs(head([feature], ROIS))

    def reference(b):
        x = F.relu(_fc(F.relu(_fc(_roi_align(feature.double(), ROIS.double(), 2, SCALE), b, "fc6")), b, "fc7"))
        return _fc(x, b, "cls_score"), _fc(x, b, "bbox_pred")

    _check(got, reference, blobs, [("fc6_w", "fc7_w"), ("fc6_b", "fc7_b"), ("cls_score_w", "bbox_pred_w")])


def test_gn_conv_box_head_computes_detectrons_roi_xconv1fc_gn_head():
    cfg = get_cfg()
    cfg.FAST_RCNN.ROI_XFORM_METHOD, cfg.FAST_RCNN.ROI_XFORM_RESOLUTION = "RoIAlign", 2
    cfg.FAST_RCNN.ROI_XFORM_SAMPLING_RATIO = 2
    cfg.FAST_RCNN.CONV_HEAD_DIM, cfg.FAST_RCNN.NUM_STACKED_CONVS, cfg.FAST_RCNN.MLP_HEAD_DIM = 8, 2, 16
    cfg.GROUP_NORM.NUM_GROUPS = GN_GROUPS
    head = registry.build("box_head", "roi_Xconv1fc_gn_head", cfg, 8, [SCALE]).eval()
    shapes = {"head_conv1_w": (8, 8, 3, 3), "head_conv2_w": (8, 8, 3, 3), "fc6_w": (16, 8 * 2 * 2), "fc6_b": (16,)}
    for i in (1, 2):
        shapes[f"head_conv{i}_gn_s"] = shapes[f"head_conv{i}_gn_b"] = (8,)
    blobs = _random_blobs(shapes, seed=5)
    _load(head, blobs)
    feature = _feature(8)
    with torch.no_grad():
        got = head([feature], ROIS)

    def reference(b):
        x = _roi_align(feature.double(), ROIS.double(), 2, SCALE)
        for i in (1, 2):
            x = F.relu(_conv_gn(x, b, f"head_conv{i}", GN_GROUPS))
        return F.relu(_fc(x, b, "fc6"))

    _check(got, reference, blobs, [("head_conv1_w", "head_conv2_w"), ("head_conv1_gn_s", "head_conv1_gn_b"),
                                   ("head_conv1_gn_b", "head_conv2_gn_b")])


@pytest.mark.parametrize("use_gn", [False, True], ids=["v1up4convs", "v1up4convs_gn"])
def test_mask_head_computes_detectrons_mask_branch(use_gn):
    """4 x (3x3 conv, [GN], ReLU), ``conv5_mask`` 2x2/2 ConvTranspose + ReLU, 1x1 ``mask_fcn_logits``; all widths 8
    so the four convs (and the deconv's in/out) are interchangeable in shape. MRCNN.DILATION is Detectron's
    default 2 for the plain head and 1 for the GN head, as the gn_baselines set it."""
    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = 3
    cfg.MRCNN.DIM_REDUCED, cfg.MRCNN.ROI_XFORM_RESOLUTION, cfg.MRCNN.RESOLUTION = 8, 4, 8
    dilation = 1 if use_gn else 2
    cfg.MRCNN.ROI_XFORM_METHOD, cfg.MRCNN.ROI_XFORM_SAMPLING_RATIO, cfg.MRCNN.DILATION = "RoIAlign", 2, dilation
    cfg.GROUP_NORM.NUM_GROUPS = GN_GROUPS
    name = "mask_rcnn_fcn_head_v1up4convs" + ("_gn" if use_gn else "")
    head = registry.build("mask_head", name, cfg, 8, [SCALE]).eval()
    shapes = mask_head_blobs(3, dim_in=8, dim=8)
    conv = "_mask_fcn" if use_gn else "_[mask]_fcn"
    if use_gn:  # Detectron's ConvGN prefixes are '_mask_fcn<i>'
        shapes = {n.replace("_[mask]_fcn", "_mask_fcn"): s for n, s in shapes.items()}
        shapes = _with_gn(shapes, [f"_mask_fcn{i}" for i in range(1, 5)])
    blobs = _random_blobs(shapes, seed=6)
    _load(head, blobs)
    feature = _feature(8)
    with torch.no_grad():
        got = head([feature], ROIS)

    def reference(b):
        x = _roi_align(feature.double(), ROIS.double(), 4, SCALE)
        for i in range(1, 5):
            x = F.relu(_conv_gn(x, b, f"{conv}{i}", GN_GROUPS, dilation=dilation) if use_gn
                       else _conv(x, b, f"{conv}{i}", dilation=dilation))
        x = F.relu(_deconv(x, b, "conv5_mask", stride=2, pad=0))
        return _conv(x, b, "mask_fcn_logits")

    swaps = [(f"{conv}1_w", f"{conv}2_w"), (f"{conv}3_w", f"{conv}4_w"), (f"{conv}4_w", f"{conv}1_w")]
    swaps.append((f"{conv}2_gn_s", f"{conv}2_gn_b") if use_gn else (f"{conv}2_b", "conv5_mask_b"))
    _check(got, reference, blobs, swaps)
    # the deconv's (in, out, k, k) layout: its transpose is the same shape and must not fit
    transposed = dict(blobs, conv5_mask_w=np.ascontiguousarray(blobs["conv5_mask_w"].transpose(1, 0, 2, 3)))
    with pytest.raises(AssertionError):
        _assert_same(got, reference(transposed), "conv5_mask as (out, in, k, k)")


def test_keypoint_head_computes_detectrons_keypoint_branch():
    """v1convX: 3 x (3x3 conv + ReLU), ``kps_score_lowres`` 4x4/2 ConvTranspose, then the bilinear ``kps_score``
    4x4/2 ConvTranspose; 8 keypoints at width 8 give both deconvs the same shape."""
    cfg = get_cfg()
    k = cfg.KRCNN
    k.NUM_KEYPOINTS, k.CONV_HEAD_DIM, k.NUM_STACKED_CONVS, k.ROI_XFORM_RESOLUTION = 8, 8, 3, 4
    k.ROI_XFORM_METHOD = "RoIAlign"
    k.ROI_XFORM_SAMPLING_RATIO, k.USE_DECONV_OUTPUT, k.UP_SCALE, k.HEATMAP_SIZE = 2, True, 2, 16
    head = registry.build("keypoint_head", "roi_pose_head_v1convX", cfg, 8, [SCALE]).eval()
    blobs = _random_blobs(keypoint_head_blobs(num_keypoints=8, dim_in=8, dim=8, num_convs=3), seed=7)
    _load(head, blobs)
    feature = _feature(8)
    with torch.no_grad():
        got = head([feature], ROIS)

    def reference(b):
        x = _roi_align(feature.double(), ROIS.double(), 4, SCALE)
        for i in range(1, 4):
            x = F.relu(_conv(x, b, f"conv_fcn{i}"))
        return _deconv(_deconv(x, b, "kps_score_lowres", stride=2, pad=1), b, "kps_score", stride=2, pad=1)

    _check(got, reference, blobs, [("conv_fcn1_w", "conv_fcn2_w"), ("conv_fcn2_b", "conv_fcn3_b"),
                                   ("kps_score_lowres_w", "kps_score_w"), ("kps_score_lowres_b", "kps_score_b")])
