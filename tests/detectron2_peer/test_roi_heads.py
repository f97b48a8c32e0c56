"""pydetectron's detectron2-mode ROI heads against detectron2's own (skipped without a detectron2 build): the same
weights, features and proposals into d2's StandardROIHeads / Res5ROIHeads (and MoCo/HPT's Res5ROIHeadsExtraNorm)
and ours; training losses (same RNG draws) and postprocessed detections (boxes, scores, classes, masks, keypoints)
must agree."""

import numpy as np
import pytest
import torch

d2 = pytest.importorskip("detectron2")
from detectron2.config import get_cfg as d2_get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec, get_norm  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess as d2_postprocess  # noqa: E402
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads, build_roi_heads  # noqa: E402
from detectron2.structures import Boxes, Instances, Keypoints, PolygonMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from pydetectron.config import get_cfg  # noqa: E402
from pydetectron.modeling import registry  # noqa: E402

K = 3  # foreground classes
NUM_KPS = 3
SIZES = [(96, 128), (80, 112)]  # network-input (h, w)
ORIGINAL = [(120, 160), (100, 140)]
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """MoCo's / HPT's definition (detection/train_net.py): res5, then a RESNETS.NORM layer."""

        def _build_res5_block(self, cfg):
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels


def _d2_cfg(kind):
    c = d2_get_cfg()
    m = c.MODEL
    m.ROI_HEADS.NUM_CLASSES = K
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    m.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    m.ROI_BOX_HEAD.POOLER_TYPE = m.ROI_MASK_HEAD.POOLER_TYPE = m.ROI_KEYPOINT_HEAD.POOLER_TYPE = "ROIAlignV2"
    if kind in ("c4", "c4_extra_norm"):
        m.ROI_HEADS.NAME = "Res5ROIHeads" if kind == "c4" else "Res5ROIHeadsExtraNorm"
        m.ROI_HEADS.IN_FEATURES = ["res4"]
        m.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
        m.MASK_ON = True
        m.ROI_MASK_HEAD.CONV_DIM = 32
        return c
    m.ROI_HEADS.NAME = "StandardROIHeads"
    m.ROI_HEADS.IN_FEATURES = list(STRIDES)
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC, m.ROI_BOX_HEAD.FC_DIM = 2, 64
    m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.CONV_DIM, m.ROI_BOX_HEAD.NORM = 1, 32, "GN"
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    if kind == "mask":
        m.MASK_ON = True
        m.ROI_MASK_HEAD.NUM_CONV, m.ROI_MASK_HEAD.CONV_DIM, m.ROI_MASK_HEAD.NORM = 2, 32, ""
        m.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    else:
        m.KEYPOINT_ON = True
        m.ROI_KEYPOINT_HEAD.CONV_DIMS = (32, 32)
        m.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = NUM_KPS
        m.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION = 14
    return c


def _our_cfg(kind):
    c = get_cfg()
    c.MODEL.CONVENTIONS = "detectron2"
    c.MODEL.NUM_CLASSES = K + 1
    c.TRAIN.BATCH_SIZE_PER_IM = 32
    c.FAST_RCNN.SMOOTH_L1_BETA = 0.0
    c.TEST.NMS = 0.5  # d2's NMS_THRESH_TEST (Detectron's default is 0.3)
    for section in (c.FAST_RCNN, c.MRCNN, c.KRCNN):
        section.ROI_XFORM_METHOD, section.ROI_XFORM_ALIGNED, section.ROI_XFORM_SAMPLING_RATIO = "RoIAlign", True, 0
    if kind in ("c4", "c4_extra_norm"):
        c.FAST_RCNN.ROI_BOX_HEAD = ""
        c.FAST_RCNN.ROI_XFORM_RESOLUTION = 14
        c.MODEL.MASK_ON = True
        c.MRCNN.ROI_MASK_HEAD, c.MRCNN.NUM_CONV, c.MRCNN.DIM_REDUCED, c.MRCNN.RESOLUTION = \
            "MaskRCNNConvUpsampleHead", 0, 32, 14
        return c
    c.FAST_RCNN.ROI_BOX_HEAD = "FastRCNNConvFCHead"
    c.FAST_RCNN.NUM_FC, c.FAST_RCNN.MLP_HEAD_DIM = 2, 64
    c.FAST_RCNN.NUM_STACKED_CONVS, c.FAST_RCNN.CONV_HEAD_DIM, c.FAST_RCNN.NORM = 1, 32, "GN"
    c.FAST_RCNN.ROI_XFORM_RESOLUTION = 7
    if kind == "mask":
        c.MODEL.MASK_ON = True
        c.MRCNN.ROI_MASK_HEAD, c.MRCNN.NUM_CONV, c.MRCNN.DIM_REDUCED = "MaskRCNNConvUpsampleHead", 2, 32
        c.MRCNN.ROI_XFORM_RESOLUTION, c.MRCNN.RESOLUTION = 14, 28
    else:
        c.MODEL.KEYPOINTS_ON = True
        c.KRCNN.ROI_KEYPOINTS_HEAD, c.KRCNN.NUM_STACKED_CONVS, c.KRCNN.CONV_HEAD_DIM = \
            "KRCNNConvDeconvUpsampleHead", 2, 32
        c.KRCNN.NUM_KEYPOINTS, c.KRCNN.ROI_XFORM_RESOLUTION, c.KRCNN.HEATMAP_SIZE = NUM_KPS, 14, 56
    return c


_RES5_CONVS = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3", "branch1": "shortcut"}


def _d2_name(ours: str) -> str:
    """Our state_dict key -> d2's (detectron2's module names)."""
    parts = ours.split(".")
    head, rest = parts[0], parts[1:]
    if head == "box_outputs":
        return "box_predictor." + ".".join(rest)
    if head == "box_head" and rest[0] == "res5":  # res5.<b>.<branch>.<conv|norm>.<param>
        tail = rest[4:] if rest[3] == "conv" else rest[3:]
        return ".".join(["res5", rest[1], _RES5_CONVS[rest[2]], *tail])
    if head == "box_head" and rest[0] == "extra_norm":
        return "res5.norm." + rest[1]
    if rest[0] == "convs":  # convs.<i>[.conv|.norm].<param>
        layer = {"box_head": "conv", "mask_head": "mask_fcn", "keypoint_head": "conv_fcn"}[head]
        tail = rest[3:] if rest[2] == "conv" else rest[2:]
        return ".".join([head, f"{layer}{int(rest[1]) + 1}", *tail])
    if rest[0] == "fcs":
        return f"{head}.fc{int(rest[1]) + 1}.{rest[2]}"
    return ours


# (d2 key, value, our key, value) variants of the loss settings
LOSS_VARIANTS = {
    "giou": [("ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou", "FAST_RCNN.BBOX_REG_LOSS_TYPE", "giou")],
    "beta_weight": [("ROI_BOX_HEAD.SMOOTH_L1_BETA", 0.5, "FAST_RCNN.SMOOTH_L1_BETA", 0.5),
                    ("ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 2.0, "FAST_RCNN.BBOX_REG_LOSS_WEIGHT", 2.0),
                    ("ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True, "MODEL.CLS_AGNOSTIC_BBOX_REG", True),
                    ("ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True, "MRCNN.CLS_SPECIFIC_MASK", False)],
    "kps_normalizer": [("ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS", False,
                        "KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS", False)],
}


def _set(cfg, key, value):
    node, leaf = key.rsplit(".", 1)
    for part in node.split("."):
        cfg = cfg[part]
    setattr(cfg, leaf, value)


def _pair(kind, variant=None):
    """(our ROI heads, d2's ROI heads) with the same weights (ours randomised, copied into d2's)."""
    registry.import_builtin_modules()
    d2_cfg, cfg = _d2_cfg(kind), _our_cfg(kind)
    for d2_key, d2_value, key, value in LOSS_VARIANTS.get(variant, []):
        _set(d2_cfg.MODEL, d2_key, d2_value)
        _set(cfg, key, value)
    if kind.startswith("c4"):
        d2_heads = build_roi_heads(d2_cfg, {"res4": ShapeSpec(channels=1024, stride=16)})
        ours = registry.build("roi_heads", d2_cfg.MODEL.ROI_HEADS.NAME, cfg, 1024, [1 / 16])
    else:
        d2_heads = build_roi_heads(d2_cfg, {k: ShapeSpec(channels=16, stride=s) for k, s in STRIDES.items()})
        ours = registry.build("roi_heads", "StandardROIHeads", cfg, 16, [1 / s for s in STRIDES.values()])
    modules = torch.nn.ModuleDict({k: v for k, v in ours.head_modules().items() if v is not None})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in modules.state_dict().items():
            if tensor.is_floating_point() and "running" not in name:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * (0.5 if "cls_score" in name else 0.05)
                             + (1.0 if name.endswith("norm.weight") else 0.0))
    theirs = d2_heads.state_dict()
    ours_sd = modules.state_dict()
    copied = set()
    for name, tensor in ours_sd.items():
        target = _d2_name(name)
        if target not in theirs:
            raise KeyError(f"{name} -> {target} is not a detectron2 key; d2 has e.g. {sorted(theirs)[:8]}")
        theirs[target].copy_(tensor)
        copied.add(target)
    left = [k for k in theirs if k not in copied and "running" not in k and "num_batches" not in k]
    assert not left, left
    d2_heads.load_state_dict(theirs)
    return ours, d2_heads, modules


def _inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    pad_h, pad_w = 96, 128
    if kind.startswith("c4"):
        features = {"res4": torch.randn(2, 1024, pad_h // 16, pad_w // 16, generator=g)}
    else:
        features = {k: torch.randn(2, 16, pad_h // s, pad_w // s, generator=g) for k, s in STRIDES.items()}
    proposals, targets, roidb, rois = [], [], [], []
    for i, (h, w) in enumerate(SIZES):
        xy = torch.rand(60, 2, generator=g) * torch.tensor([w - 20.0, h - 20.0])
        wh = 4 + torch.rand(60, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], dim=1)
        gt = boxes[:3] + torch.randn(3, 4, generator=g)
        gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 8)
        classes = torch.tensor([0, 2, 1])
        polys = [[np.array([b[0], b[1], b[2], b[1], (b[0] + b[2]) / 2, b[3]], dtype=np.float64)] for b in gt.tolist()]
        kps = torch.stack([gt[:, 0] + (gt[:, 2] - gt[:, 0]) * f for f in (0.2, 0.5, 0.8)], dim=1)
        kps = torch.stack([kps, gt[:, 1:2].expand(3, NUM_KPS) + 3, torch.full((3, NUM_KPS), 2.0)], dim=2)
        p = Instances((h, w))
        p.proposal_boxes, p.objectness_logits = Boxes(boxes.clone()), torch.randn(60, generator=g)
        proposals.append(p)
        t = Instances((h, w))
        t.gt_boxes, t.gt_classes, t.gt_masks = Boxes(gt.clone()), classes, PolygonMasks(polys)
        t.gt_keypoints = Keypoints(kps.clone())
        targets.append(t)
        roidb.append({"boxes": gt.clone(), "gt_classes": classes + 1, "is_crowd": torch.zeros(3, dtype=torch.bool),
                      "segms": [[q.astype(np.float32) for q in poly] for poly in polys], "gt_keypoints": kps.clone()})
        rois.append(torch.cat([torch.full((60, 1), float(i)), boxes], dim=1))
    im_info = torch.tensor([[h, w, h / oh] for (h, w), (oh, _) in zip(SIZES, ORIGINAL)])
    return features, proposals, targets, roidb, torch.cat(rois), im_info


KINDS = ["mask", "keypoint", "c4", "c4_extra_norm"]


@pytest.mark.parametrize("kind,variant", [(kind, None) for kind in KINDS] + [("mask", "beta_weight")])
def test_inference_equals_detectron2(kind, variant):
    ours, theirs, _ = _pair(kind, variant)  # beta_weight: class-agnostic boxes and masks
    features, proposals, _, _, rois, im_info = _inputs(kind)
    theirs.eval()
    with torch.no_grad():
        d2_out, _ = theirs(None, features, proposals)
        got = ours.forward_inference(list(features.values()), rois, im_info, ORIGINAL, False)
    for det, inst, (oh, ow) in zip(got, d2_out, ORIGINAL):
        ref = d2_postprocess(inst, oh, ow)
        assert len(ref) > 0 and det["boxes"].shape[0] == len(ref)
        torch.testing.assert_close(det["boxes"], ref.pred_boxes.tensor, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(det["scores"], ref.scores, rtol=1e-3, atol=1e-4)
        assert torch.equal(det["classes"], ref.pred_classes + 1)
        if ref.has("pred_masks"):
            differ = (det["masks"].bool() != ref.pred_masks).float().mean().item()
            assert differ <= 1e-5, differ  # a pixel whose probability sits at the 0.5 threshold may flip
        if ref.has("pred_keypoints"):
            torch.testing.assert_close(det["keypoints"], ref.pred_keypoints, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,variant", [(kind, None) for kind in KINDS] + [
    ("mask", "giou"), ("mask", "beta_weight"), ("keypoint", "kps_normalizer")])
def test_training_losses_equal_detectron2(kind, variant):
    ours, theirs, modules = _pair(kind, variant)
    features, proposals, targets, roidb, rois, im_info = _inputs(kind)
    theirs.train()
    modules.train()
    with EventStorage():
        torch.manual_seed(5)
        _, d2_losses = theirs(None, features, proposals, targets)
    torch.manual_seed(5)
    got = ours.forward_train(list(features.values()), rois, im_info, roidb)
    for name, value in d2_losses.items():
        assert got[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
    assert set(d2_losses) == {k for k in got if k.startswith("loss")}
