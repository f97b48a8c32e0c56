"""Our detectron2-mode FPN body and RPN against detectron2 itself, on the same weights and inputs.

Weights go from our modules to detectron2's through the Caffe2 blob names: our ``detectron_weight_mapping``
names each tensor, detectron2's own ``convert_c2_detectron_names`` turns the blob names into its module names.
Skipped without a detectron2 build.
"""

import pytest
import torch

from pydetectron.config import assert_and_infer_cfg, get_cfg
from pydetectron.modeling import registry
from pydetectron.modeling.rpn import build_rpn

d2 = pytest.importorskip("detectron2")
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names  # noqa: E402
from detectron2.config import get_cfg as d2_get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone  # noqa: E402
from detectron2.modeling.backbone.resnet import build_resnet_backbone  # noqa: E402
from detectron2.modeling.proposal_generator.rpn import RPN as D2RPN  # noqa: E402
from detectron2.structures import Boxes, ImageList, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402


def _copy_into_detectron2(ours: torch.nn.Module, theirs: torch.nn.Module, prefixes: dict) -> None:
    """Load `ours`' tensors into `theirs` by blob name; every tensor of `theirs` must be filled."""
    state = ours.state_dict()
    blobs = {blob: state[key] for key, blob in ours.detectron_weight_mapping().items() if blob is not None}
    renamed, _ = convert_c2_detectron_names(blobs)
    target = theirs.state_dict()
    filled = {}
    for name, value in renamed.items():
        for old, new in prefixes.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        assert name in target, f"{name} has no detectron2 counterpart"
        filled[name] = value.clone()
    missing = [k for k in target if k not in filled and not k.endswith("num_batches_tracked")]
    if any(k.endswith(("running_mean", "running_var")) for k in missing):  # FrozenBN from an AffineChannel
        for k in [k for k in missing if k.endswith("running_mean")]:
            filled[k] = torch.zeros_like(target[k])
        for k in [k for k in missing if k.endswith("running_var")]:
            filled[k] = torch.ones_like(target[k]) - 1e-5  # FrozenBN(eps 1e-5) then scales by exactly 1
        missing = [k for k in target if k not in filled and not k.endswith("num_batches_tracked")]
    assert not missing, missing
    theirs.load_state_dict(filled, strict=False)


# d2 body norm -> our RESNETS.NORM; d2 FPN.NORM is ours by name
BODY_NORMS = {"FrozenBN": "AffineChannel", "BN": "BN", "GN": "GN"}


@pytest.mark.parametrize("body_norm,fpn_norm,stride_1x1", [("FrozenBN", "", True), ("GN", "GN", False),
                                                            ("BN", "BN", True)])
def test_fpn_body_equals_detectron2s_resnet_fpn(body_norm, fpn_norm, stride_1x1):
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.MODEL.CONV_BODY = "FPN.fpn_ResNet50_conv5_body"
    cfg.FPN.FPN_ON = cfg.FPN.MULTILEVEL_RPN = cfg.FPN.MULTILEVEL_ROIS = True
    cfg.FPN.NORM = fpn_norm
    cfg.RESNETS.NORM = BODY_NORMS[body_norm]
    cfg.RESNETS.STRIDE_1X1 = stride_1x1
    cfg.TRAIN.FREEZE_AT = 0
    assert_and_infer_cfg(cfg)
    registry.import_builtin_modules()
    torch.manual_seed(0)
    ours = registry.build("body", cfg.MODEL.CONV_BODY, cfg)
    with torch.no_grad():  # random norms so that every affine parameter / statistic matters
        for name, tensor in ours.state_dict().items():
            if name.endswith(("norm.weight", "running_var")):
                tensor.uniform_(0.5, 1.0)
            elif name.endswith(("norm.bias", "running_mean")):
                tensor.uniform_(-0.2, 0.2)
    ours.eval()

    c = d2_get_cfg()
    c.MODEL.RESNETS.DEPTH = 50
    c.MODEL.RESNETS.NORM = body_norm
    c.MODEL.RESNETS.STRIDE_IN_1X1 = stride_1x1
    c.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    c.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    c.MODEL.FPN.NORM = fpn_norm
    c.MODEL.BACKBONE.FREEZE_AT = 0
    theirs = build_resnet_fpn_backbone(c, ShapeSpec(channels=3)).eval()
    _copy_into_detectron2(ours, theirs, {"res": "bottom_up.res", "stem.": "bottom_up.stem."})

    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours(images)
        ref = theirs(images)
    assert list(ref) == ["p2", "p3", "p4", "p5", "p6"] and len(mine) == 5
    for level, (a, b) in enumerate(zip(mine, ref.values())):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=f"P{level + 2}")


def test_dilated_c5_body_equals_detectron2s_resnet():
    """DC5: res5 with dilation 2 and stride 1 (detectron2's RES5_DILATION), one map at stride 16."""
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.MODEL.CONV_BODY = "ResNet50_conv5_body"
    cfg.RESNETS.RES5_DILATION = 2
    cfg.TRAIN.FREEZE_AT = 0
    assert_and_infer_cfg(cfg)
    registry.import_builtin_modules()
    torch.manual_seed(0)
    ours = registry.build("body", cfg.MODEL.CONV_BODY, cfg).eval()
    assert ours.spatial_scales == [1 / 16]
    c = d2_get_cfg()
    c.MODEL.RESNETS.DEPTH = 50
    c.MODEL.RESNETS.RES5_DILATION = 2
    c.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    c.MODEL.BACKBONE.FREEZE_AT = 0
    theirs = build_resnet_backbone(c, ShapeSpec(channels=3)).eval()
    _copy_into_detectron2(ours, theirs, {})
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (mine,), ref = ours(images), theirs(images)["res5"]
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _rpn_pair(training_topk=(2000, 1000), test_topk=(1000, 1000), beta=0.0, loss_type="smooth_l1", c4=False,
              boundary=-1):
    """Our d2-mode RPN and detectron2's, same head weights: FPN on P2..P6 of 16 channels, or C4 on one
    stride-16 map (5 sizes x 3 ratios)."""
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.MODEL.FASTER_RCNN = True
    cfg.FPN.FPN_ON = cfg.FPN.MULTILEVEL_RPN = not c4
    cfg.RPN.SIZES = (32, 64, 128, 256, 512)
    cfg.TRAIN.RPN_STRADDLE_THRESH = boundary
    cfg.TRAIN.RPN_PRE_NMS_TOP_N, cfg.TRAIN.RPN_POST_NMS_TOP_N = training_topk
    cfg.TEST.RPN_PRE_NMS_TOP_N, cfg.TEST.RPN_POST_NMS_TOP_N = test_topk
    cfg.RPN.SMOOTH_L1_BETA = beta
    cfg.RPN.BBOX_REG_LOSS_TYPE = loss_type
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    ours = build_rpn(cfg, 16, [1 / 16] if c4 else [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64])
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.3)  # large enough for varied scores and boxes

    c = d2_get_cfg()
    c.MODEL.RPN.IN_FEATURES = ["res4"] if c4 else ["p2", "p3", "p4", "p5", "p6"]
    c.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]] if c4 else [[32], [64], [128], [256], [512]]
    c.MODEL.RPN.BOUNDARY_THRESH = boundary
    c.MODEL.RPN.PRE_NMS_TOPK_TRAIN, c.MODEL.RPN.POST_NMS_TOPK_TRAIN = training_topk
    c.MODEL.RPN.PRE_NMS_TOPK_TEST, c.MODEL.RPN.POST_NMS_TOPK_TEST = test_topk
    c.MODEL.RPN.SMOOTH_L1_BETA = beta
    c.MODEL.RPN.BBOX_REG_LOSS_TYPE = loss_type
    shapes = ({"res4": ShapeSpec(channels=16, stride=16)} if c4 else
              {f"p{lvl}": ShapeSpec(channels=16, stride=2**lvl) for lvl in range(2, 7)})
    theirs = D2RPN(c, shapes)
    _copy_into_detectron2(ours, theirs, {"proposal_generator.": ""})
    return ours, theirs


SIZES = [(120, 160), (96, 128)]  # (h, w) of two images padded to 128 x 160


def _inputs(c4=False):
    g = torch.Generator().manual_seed(2)
    levels = [4] if c4 else range(2, 7)
    features = [torch.randn(2, 16, 128 // 2**lvl, 160 // 2**lvl, generator=g) for lvl in levels]
    im_info = torch.tensor([[h, w, 1.0] for h, w in SIZES])
    gt = [torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 20.0, 150.0, 110.0], [5.0, 5.0, 20.0, 15.0]]),
          torch.tensor([[30.0, 30.0, 100.0, 80.0]])]
    return features, im_info, gt


def _d2_call(theirs, features, gt=None):
    images = ImageList(torch.zeros(2, 3, 128, 160), SIZES)
    names = ["res4"] if len(features) == 1 else [f"p{lvl}" for lvl in range(2, 7)]
    feats = dict(zip(names, features))
    instances = None if gt is None else [Instances(s, gt_boxes=Boxes(b)) for s, b in zip(SIZES, gt)]
    return theirs(images, feats, instances)


def _assert_same_proposals(out, proposals):
    for img, inst in enumerate(proposals):
        mine = out.rois[:, 0] == img
        assert int(mine.sum()) == len(inst) > 0
        # float32 rounding only: our head convs run channels-last (another summation order than detectron2's NCHW)
        torch.testing.assert_close(out.rois[mine, 1:], inst.proposal_boxes.tensor, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out.scores[mine], inst.objectness_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("test_topk,c4", [((1000, 1000), False), ((50, 30), False), ((6000, 1000), True)])
def test_inference_proposals_equal_detectron2s(test_topk, c4):
    ours, theirs = _rpn_pair(test_topk=test_topk, c4=c4)
    features, im_info, _ = _inputs(c4)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        out = ours(features, im_info)
        proposals, _ = _d2_call(theirs, features)
    _assert_same_proposals(out, proposals)


@pytest.mark.parametrize("beta,loss_type,c4,boundary", [
    (0.0, "smooth_l1", False, -1), (1 / 9, "smooth_l1", False, 0), (0.0, "giou", False, -1),
    (0.0, "smooth_l1", True, 0),
])
def test_training_losses_and_proposals_equal_detectron2s(beta, loss_type, c4, boundary):
    ours, theirs = _rpn_pair(training_topk=(300, 100), beta=beta, loss_type=loss_type, c4=c4, boundary=boundary)
    features, im_info, gt = _inputs(c4)
    roidb = [{"boxes": b, "gt_classes": torch.ones(len(b), dtype=torch.int64),
              "is_crowd": torch.zeros(len(b), dtype=torch.bool)} for b in gt]
    ours.train(), theirs.train()
    torch.manual_seed(7)  # both draw subsample_labels' randperms in the same order: same sampled anchors
    out = ours(features, im_info, roidb)
    torch.manual_seed(7)
    with EventStorage():
        proposals, losses = _d2_call(theirs, features, gt)
    for name in ("loss_rpn_cls", "loss_rpn_loc"):
        torch.testing.assert_close(out.losses[name], losses[name], rtol=1e-5, atol=1e-7, msg=name)
    _assert_same_proposals(out, proposals)
