"""detectron2's RPN (labels, sampling, losses, proposals per level and image) against hand and float64 values."""

import math

import pytest
import torch

from pydetectron.config import assert_and_infer_cfg, get_cfg
from pydetectron.config.merge import ConfigError
from pydetectron.modeling.detectron2.box_transform import Box2BoxTransform
from pydetectron.modeling.detectron2.matcher import Matcher
from pydetectron.modeling.detectron2.rpn import Detectron2RPN, find_top_rpn_proposals, label_and_sample_anchors
from pydetectron.modeling.proposals import ProposalParams
from pydetectron.modeling.rpn import RPN, build_rpn

# No +1: anchor 1 overlaps gt 0 by 90 / 110; anchor 3 is gt 1's best (100 / 196, below 0.7); anchor 5 leaves
# the 40 x 40 image.
ANCHORS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],
    [1.0, 0.0, 11.0, 10.0],
    [5.0, 0.0, 15.0, 10.0],
    [20.0, 20.0, 30.0, 30.0],
    [30.0, 30.0, 40.0, 40.0],
    [35.0, 35.0, 45.0, 45.0],
])
GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [18.0, 18.0, 32.0, 32.0]])
MATCHER = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)


@pytest.mark.parametrize("boundary,expect", [
    (-1.0, [1, 1, -1, 1, 0, 0]),
    (0.0, [1, 1, -1, 1, -1, -1]),  # inside means x2 < W + t: anchor 4 ends exactly at 40
    (5.0, [1, 1, -1, 1, 0, -1]),
    (5.5, [1, 1, -1, 1, 0, 0]),
])
def test_anchor_labels_and_boundary_threshold(boundary, expect):
    labels, matched = label_and_sample_anchors(ANCHORS, [GT], [(40.0, 40.0)], MATCHER, boundary, 256, 0.5)
    assert labels.tolist() == [expect]
    torch.testing.assert_close(matched[0, :5], GT[[0, 0, 0, 1, 1]])


def test_image_without_gt_is_all_background_with_zero_boxes():
    labels, matched = label_and_sample_anchors(ANCHORS, [torch.zeros(0, 4)], [(40.0, 40.0)], MATCHER, -1, 4, 0.5)
    assert sorted(labels[0].tolist()) == [-1, -1, 0, 0, 0, 0]  # 4 sampled negatives
    assert matched.abs().sum().item() == 0


def test_sampled_counts_per_image():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    anchors = torch.cat((xy, xy + 20), 1)
    gt = [anchors[:6] + 0.5, anchors[:0]]  # image 0: 6 gt boxes, each IoU 0.9 with an anchor; image 1: none
    labels, _ = label_and_sample_anchors(anchors, gt, [(300.0, 300.0)] * 2, MATCHER, -1, 16, 0.25,
                                         generator=torch.Generator().manual_seed(1))
    _, before = MATCHER(torch.stack([torch.tensor([
        (min(a[2], b[2]) - max(a[0], b[0])) * (min(a[3], b[3]) - max(a[1], b[1]))
        / (800 - (min(a[2], b[2]) - max(a[0], b[0])) * (min(a[3], b[3]) - max(a[1], b[1])))
        if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]) else 0.0
        for a in anchors.tolist()]) for b in gt[0].tolist()]))  # float64 IoUs of 20 x 20 boxes
    assert int((before == 1).sum()) > 4
    assert int((labels[0] == 1).sum()) == 4  # int(16 * 0.25)
    assert int((labels[0] >= 0).sum()) == 16 and int((labels[1] == 0).sum()) == 16
    assert int((labels[1] == 1).sum()) == 0


def _rpn(**overrides):
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.MODEL.FASTER_RCNN = True
    cfg.RPN.SIZES = (10,)
    cfg.RPN.ASPECT_RATIOS = (1.0,)
    for key, value in overrides.items():
        node, name = key.split("__")
        setattr(getattr(cfg, node), name, value)
    return cfg


def _bce(x, y):
    return max(x, 0) - x * y + math.log1p(math.exp(-abs(x)))


def _smooth_l1(x, beta):
    return abs(x) if beta < 1e-5 else (0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta)


@pytest.mark.parametrize("beta,loss_weight,box_weight", [(0.0, 1.0, 1.0), (1 / 9, 2.0, 0.5)])
def test_losses_against_float64_reference(beta, loss_weight, box_weight):
    cfg = _rpn(RPN__SMOOTH_L1_BETA=beta, RPN__LOSS_WEIGHT=loss_weight, RPN__BBOX_REG_LOSS_WEIGHT=box_weight,
               TRAIN__RPN_BATCH_SIZE_PER_IM=64, TRAIN__RPN_STRADDLE_THRESH=-1)
    rpn = build_rpn(cfg, 4, [1 / 16])
    assert isinstance(rpn, Detectron2RPN)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 6, generator=g, dtype=torch.float64)]
    deltas = [torch.randn(2, 6, 4, generator=g, dtype=torch.float64) * 0.2]
    roidb = [{"boxes": GT, "gt_classes": [1, 2], "is_crowd": [False, False]},
             {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 40.0]]), "gt_classes": [1, 1],
              "is_crowd": [False, True]}]  # the crowd box plays no part
    anchors = [ANCHORS.double()]
    losses = rpn.losses(anchors, logits, deltas, roidb, [(40.0, 40.0), (40.0, 40.0)])
    # every anchor is sampled (64 slots): image 0 labels as above, image 1 only anchor 0 positive (IoU 1),
    # anchor 1 positive too (0.82), anchor 2 ignored (0.33), the rest negative
    labels = [[1, 1, -1, 1, 0, 0], [1, 1, -1, 0, 0, 0]]
    gts = [GT[[0, 0, 0, 1, 1, 1]], GT[[0] * 6]]
    cls, loc = 0.0, 0.0
    coder = Box2BoxTransform((1, 1, 1, 1))
    for img in range(2):
        target = coder.get_deltas(ANCHORS.double(), gts[img].double())
        for a in range(6):
            if labels[img][a] >= 0:
                cls += _bce(logits[0][img, a].item(), labels[img][a])
            if labels[img][a] == 1:
                loc += sum(_smooth_l1(p - t, beta) for p, t in zip(deltas[0][img, a].tolist(), target[a].tolist()))
    assert losses["loss_rpn_cls"].item() == pytest.approx(cls / 128 * loss_weight)
    assert losses["loss_rpn_loc"].item() == pytest.approx(loc / 128 * loss_weight * box_weight)


def test_giou_loss_type():
    cfg = _rpn(RPN__BBOX_REG_LOSS_TYPE="giou", TRAIN__RPN_STRADDLE_THRESH=-1)
    rpn = build_rpn(cfg, 4, [1 / 16])
    deltas = [torch.zeros(1, 6, 4, dtype=torch.float64)]
    losses = rpn.losses([ANCHORS.double()], [torch.zeros(1, 6, dtype=torch.float64)], deltas,
                        [{"boxes": GT, "gt_classes": [1, 2], "is_crowd": [False, False]}], [(40.0, 40.0)])
    # positives 0, 1, 3 predict their anchors: GIoU loss 0 (identical), 1 - 90/110 + 0 (hull = union 110... )
    expect = 0.0 + (1 - 90 / 110 + (110 - 110) / 110) + (1 - 100 / 196 + (196 - 196) / 196)
    assert losses["loss_rpn_loc"].item() == pytest.approx(expect / 256)


# Proposals: two levels, two images, zero deltas (proposal = anchor).
LEVEL0 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0],
                       [-5.0, -5.0, 3.0, 3.0]])
LEVEL1 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
LOGITS = [torch.tensor([[5.0, 4.0, 1.0, 3.0], [0.0, 1.0, 2.0, -1.0]]), torch.tensor([[2.0, 0.5], [3.0, -2.0]])]
ZERO = [torch.zeros(2, 4, 4), torch.zeros(2, 2, 4)]


def _proposals(pre, post, min_size=3.5, logits=LOGITS, training=False):
    params = ProposalParams(pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=0.5, min_size=min_size)
    return find_top_rpn_proposals([LEVEL0, LEVEL1], logits, ZERO, Box2BoxTransform((1, 1, 1, 1)),
                                  [(100.0, 100.0), (100.0, 100.0)], params, training)


def test_top_k_per_level_and_image_then_nms_per_level_then_top_k_per_image():
    (boxes0, scores0), (boxes1, scores1) = _proposals(pre=3, post=0)
    # image 0: level 0 top-3 = a(5), b(4), d(3); d clipped to 3 x 3 <= 3.5 is dropped; b loses NMS to a;
    # level 1's e equals a but NMS runs per level, so it stays
    assert scores0.tolist() == [5.0, 2.0, 0.5]
    assert boxes0.tolist() == [LEVEL0[0].tolist(), LEVEL1[0].tolist(), LEVEL1[1].tolist()]
    # image 1: level 0 top-3 = c(2), b(1), a(0); a loses to b
    assert scores1.tolist() == [3.0, 2.0, 1.0, -2.0]
    (_, scores0), (_, scores1) = _proposals(pre=3, post=2)
    assert scores0.tolist() == [5.0, 2.0] and scores1.tolist() == [3.0, 2.0]
    (_, scores0), _ = _proposals(pre=1, post=0, min_size=0.0)
    assert scores0.tolist() == [5.0, 2.0]


def test_clipping_without_plus_one_and_min_size():
    (boxes0, scores0), _ = _proposals(pre=0, post=0, min_size=2.9)
    assert scores0.tolist() == [5.0, 3.0, 2.0, 1.0, 0.5]  # d kept (3 > 2.9), clipped to [0, 0, 3, 3]
    assert boxes0[1].tolist() == [0.0, 0.0, 3.0, 3.0]


def test_non_finite_logits_raise_in_training_and_are_dropped_in_inference():
    bad = [LOGITS[0].clone(), LOGITS[1]]
    bad[0][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        _proposals(pre=0, post=0, logits=bad, training=True)
    (_, scores0), _ = _proposals(pre=0, post=0, logits=bad)
    assert not torch.isnan(scores0).any() and scores0.tolist()[0] == 4.0


FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]


def test_fpn_rpn_builds_detectron2s_rpn_with_detectron_names():
    cfg = _rpn(FPN__FPN_ON=True, FPN__MULTILEVEL_RPN=True, TRAIN__RPN_PRE_NMS_TOP_N=30, TRAIN__RPN_POST_NMS_TOP_N=7,
               TEST__RPN_PRE_NMS_TOP_N=20, TEST__RPN_POST_NMS_TOP_N=5)
    rpn = build_rpn(cfg, 8, FPN_SCALES)
    assert isinstance(rpn, Detectron2RPN)
    assert rpn.detectron_weight_mapping() == {
        "head.conv_rpn.weight": "conv_rpn_fpn2_w", "head.conv_rpn.bias": "conv_rpn_fpn2_b",
        "head.rpn_cls_logits.weight": "rpn_cls_logits_fpn2_w", "head.rpn_cls_logits.bias": "rpn_cls_logits_fpn2_b",
        "head.rpn_bbox_pred.weight": "rpn_bbox_pred_fpn2_w", "head.rpn_bbox_pred.bias": "rpn_bbox_pred_fpn2_b",
    }
    assert 0.007 < rpn.head.conv_rpn.weight.std().item() < 0.013 and rpn.head.conv_rpn.bias.abs().max() == 0
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 8, int(64 * s), int(64 * s), generator=g) for s in FPN_SCALES]
    im_info = torch.tensor([[64.0, 64.0, 1.0], [60.0, 50.0, 0.5]])
    roidb = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "gt_classes": [1], "is_crowd": [False]},
             {"boxes": torch.zeros(0, 4), "gt_classes": [], "is_crowd": []}]
    out = rpn(features, im_info, roidb)
    assert set(out.losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    out.losses["loss_rpn_cls"].backward()
    assert rpn.head.conv_rpn.weight.grad is not None and not out.rois.requires_grad
    for img, post in ((0, 7), (1, 7)):
        mine = out.rois[:, 0] == img
        assert 0 < int(mine.sum()) <= post
        scores = out.scores[mine]
        assert bool((scores[:-1] >= scores[1:]).all())  # best first per image
        boxes = out.rois[mine, 1:]
        h, w = im_info[img, :2].tolist()
        assert bool((boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (boxes >= 0).all())
    with torch.no_grad():
        test_out = rpn(features, im_info)
    assert test_out.losses == {} and int((test_out.rois[:, 0] == 1).sum()) <= 5


def test_c4_rpn_anchor_sizes_and_names():
    cfg = _rpn(RPN__SIZES=(32, 64, 128, 256, 512), RPN__ASPECT_RATIOS=(0.5, 1, 2))
    rpn = build_rpn(cfg, 16, [1 / 16])
    assert rpn.head.rpn_cls_logits.out_channels == 15 and rpn.head.rpn_bbox_pred.out_channels == 60
    assert rpn.detectron_weight_mapping()["head.rpn_bbox_pred.weight"] == "rpn_bbox_pred_w"


def test_rpn_only_training_returns_losses_only():
    rpn = build_rpn(_rpn(MODEL__FASTER_RCNN=False, MODEL__RPN_ONLY=True), 4, [1 / 16])
    out = rpn([torch.randn(1, 4, 4, 4)], torch.tensor([[64.0, 64.0, 1.0]]),
              [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]), "gt_classes": [1], "is_crowd": [False]}])
    assert out.rois is None and set(out.losses) == {"loss_rpn_cls", "loss_rpn_loc"}


def test_detectron_rpn_reads_the_loss_keys():
    def losses(**overrides):
        cfg = get_cfg()
        cfg.MODEL.RPN_ONLY = True
        for key, value in overrides.items():
            node, name = key.split("__")
            setattr(getattr(cfg, node), name, value)
        rpn = build_rpn(cfg, 4, [1 / 16])
        assert isinstance(rpn, RPN)
        torch.manual_seed(0)
        for p in rpn.parameters():
            torch.nn.init.normal_(p, std=0.1)
        rpn.generator = torch.Generator().manual_seed(3)
        out = rpn([torch.ones(1, 4, 6, 6)], torch.tensor([[96.0, 96.0, 1.0]]),
                  [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "gt_classes": [1], "is_crowd": [False]}])
        return {k: v.item() for k, v in out.losses.items()}

    base = losses()
    weighted = losses(RPN__LOSS_WEIGHT=2.0, RPN__BBOX_REG_LOSS_WEIGHT=3.0)
    assert weighted["loss_rpn_cls"] == pytest.approx(2 * base["loss_rpn_cls"])
    assert weighted["loss_rpn_bbox"] == pytest.approx(6 * base["loss_rpn_bbox"])
    assert losses(RPN__SMOOTH_L1_BETA=0.0)["loss_rpn_bbox"] > base["loss_rpn_bbox"]  # L1 >= smooth-L1


@pytest.mark.parametrize("key,value,match", [
    ("MODEL.ANCHOR_OFFSET", 0.5, "detectron2 mode"),
    ("RPN.BBOX_REG_LOSS_TYPE", "giou", "detectron2 mode"),
    ("RPN.BBOX_REG_WEIGHTS", (2.0, 2.0, 1.0, 1.0), "detectron2 mode"),
    ("RPN.BBOX_REG_LOSS_TYPE", "diou", "is not one of"),
    ("RPN.SMOOTH_L1_BETA", -1.0, ">= 0"),
])
def test_checks_refuse_detectron2_only_values_in_detectron_mode(key, value, match):
    cfg = get_cfg()
    node, name = key.split(".")
    setattr(getattr(cfg, node), name, value)
    with pytest.raises(ConfigError, match=match):
        assert_and_infer_cfg(cfg)
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    setattr(getattr(cfg, node), name, value)
    if match == "detectron2 mode":
        assert_and_infer_cfg(cfg)  # accepted in detectron2 mode


def test_checks_refuse_bad_offset_and_softmax_in_detectron2_mode():
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.MODEL.ANCHOR_OFFSET = 1.0
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        assert_and_infer_cfg(cfg)
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.RPN.CLS_ACTIVATION = "softmax"
    with pytest.raises(ConfigError, match="sigmoid"):
        assert_and_infer_cfg(cfg)


@pytest.mark.parametrize("yaml", ["baselines/e2e_faster_rcnn_R-50-FPN_1x.yaml",
                                  pytest.param("baselines/rpn_R-50-C4_1x.yaml", marks=pytest.mark.slow)])
def test_detector_wires_the_detectron2_rpn(yaml):
    from test_detector import load_cfg, synthetic_batch

    from pydetectron.modeling.detector import build_detector, total_loss

    cfg = load_cfg(yaml, ["MODEL.CONVENTIONS", "detectron2", "TRAIN.RPN_STRADDLE_THRESH", "-1"])
    model = build_detector(cfg)
    assert isinstance(model.rpn, Detectron2RPN)
    data, im_info, roidb = synthetic_batch()
    torch.manual_seed(0)
    losses = model(data, im_info, roidb)
    assert {"loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    total_loss(losses).backward()
    model.eval()
    with torch.no_grad():
        results = model(data, im_info, roidb)
    assert len(results) == 2 and all(r["boxes"].shape[1] == 4 for r in results)


def test_rpn_only_results_in_original_pixels_per_convention():
    from pydetectron.modeling.detector import _proposal_results

    rois = torch.tensor([[0.0, 10.0, 10.0, 70.0, 40.0], [0.0, 75.0, 0.0, 75.0, 10.0], [1.0, 1.0, 1.0, 2.0, 2.0]])
    scores = torch.tensor([3.0, 2.0, 1.0])
    im_info = torch.tensor([[50.0, 75.0, 0.5], [50.0, 75.0, 0.5]])
    sizes = [(101, 150), (101, 150)]
    d2 = _proposal_results(rois, scores, im_info, sizes, 0, detectron2_mode=True)
    # detectron2's detector_postprocess: x * 150/75, y * 101/50, clipped; the zero-width proposal is dropped
    assert torch.allclose(d2["boxes"], torch.tensor([[20.0, 20.2, 140.0, 80.8]]))
    assert d2["scores"].tolist() == [3.0]
    detectron = _proposal_results(rois, scores, im_info, sizes, 0, detectron2_mode=False)
    assert torch.equal(detectron["boxes"], rois[:2, 1:] / 0.5) and detectron["scores"].tolist() == [3.0, 2.0]
