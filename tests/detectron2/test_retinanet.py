"""RetinaNet in detectron2 mode against hand values and float64 references written here from detectron2's
``meta_arch/retinanet.py`` / ``dense_detector.py``: anchor labels, focal and box losses, the loss normaliser,
inference (threshold, top-k per level, NMS per class, detections per image, detector_postprocess), and a
whole d2-mode model that trains, resumes exactly and infers."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch
from test_detector import SHRINK, synthetic_batch, train_step

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.config.merge import ConfigError
from pydetectron.modeling.detector import build_detector
from pydetectron.modeling.detectron2.matcher import Matcher
from pydetectron.modeling.detectron2.postprocess import detector_postprocess
from pydetectron.modeling.detectron2.retinanet import (
    D2RetinaNetRules,
    LossNormalizer,
    label_anchors,
    permute_to_n_hwa_k,
)
from pydetectron.modeling.retinanet import RetinaNet, RetinaNetSettings

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "baselines", "retinanet_R-50-FPN_1x.yaml")
D2 = ["MODEL.CONVENTIONS", "detectron2"]


def _cfg(extra=()):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, CONFIG)
    merge_cfg_from_list(cfg, SHRINK + D2 + list(extra))
    return assert_and_infer_cfg(cfg)


def _rules(**changes) -> D2RetinaNetRules:
    settings = dataclasses.replace(RetinaNetSettings.from_cfg(_cfg()), **changes)
    return D2RetinaNetRules(settings, anchor_offset=0.0)


def _entry(boxes, classes, crowd=None):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "gt_classes": torch.tensor(classes),
            "is_crowd": torch.tensor(crowd if crowd is not None else [False] * len(classes))}


def test_labels_follow_detectron2s_matcher_on_a_hand_case():
    """IoUs (no +1) with g0 = [0, 0, 10, 10]: a0 1, a1 1/3, a3 1/2, a5 100/240; a2 with g1 81/119. Image 1's gt
    overlaps only a1 (30/190) and takes it as a low-quality match; the crowd box matches nothing."""
    anchors = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 20],
                            [100, 100, 110, 110], [0, 0, 10, 24]], dtype=torch.float32)
    roidb = [_entry([[0, 0, 10, 10], [21, 21, 31, 31], [100, 100, 110, 110]], [3, 1, 2], [False, False, True]),
             _entry([[12, 0, 24, 10]], [2]),
             _entry([], [])]
    matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
    labels, matched = label_anchors(anchors, roidb, matcher, num_classes=3)
    k = 3  # background
    assert labels.tolist() == [[2, k, 0, 2, k, -1], [k, 1, k, k, k, k], [k] * 6]
    assert matched[0, 2].tolist() == [21, 21, 31, 31] and matched[0, 3].tolist() == [0, 0, 10, 10]
    assert matched[1, 1].tolist() == [12, 0, 24, 10]
    assert not matched[2].any()


def test_channel_layout_is_detectrons_a_outer_k_inner():
    """permute_to_n_hwa_k reads channel a * K + k at (y, x) as row (y * W + x) * A + a, column k: the layout
    Detectron's head has (its reshape (A, K, H, W)), so the same weights serve both conventions."""
    n, a, k, h, w = 2, 3, 4, 2, 5
    x = torch.randn(n, a * k, h, w)
    rows = permute_to_n_hwa_k(x, k)
    detectron = x.reshape(n, a, k, h, w)
    for yy, xx, aa, kk in [(0, 0, 0, 0), (1, 3, 2, 1), (0, 4, 1, 3)]:
        assert rows[1, (yy * w + xx) * a + aa, kk] == detectron[1, aa, kk, yy, xx]


def _inter_union64(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter, (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter


def _iou64(a, b):
    inter, union = _inter_union64(a, b)
    return inter / union if inter > 0 else 0.0


def _reference_losses(anchors, logits, deltas, roidb, num_classes, alpha, gamma, beta, loss_type):
    """detectron2's RetinaNet losses (before the normaliser) in plain float64 Python: Matcher with
    low-quality matches, focal loss per class of each non-ignored anchor, box loss per foreground anchor."""
    anchors = [a.tolist() for a in torch.cat(anchors).double()]
    focal, box, num_fg, branches = 0.0, 0.0, 0, set()
    for img, entry in enumerate(roidb):
        gts = [(b, c) for b, c, crowd in zip(entry["boxes"].tolist(), entry["gt_classes"].tolist(),
                                              entry["is_crowd"].tolist()) if not crowd]
        ious = [[_iou64(g, a) for a in anchors] for g, _ in gts]
        best_of_gt = [max(row) for row in ious]
        for r, a in enumerate(anchors):
            label, gt = num_classes, None
            if gts:
                column = [row[r] for row in ious]
                best = max(range(len(gts)), key=lambda i: (column[i], -i))
                iou = column[best]
                label = -1 if 0.4 <= iou < 0.5 else (num_classes if iou < 0.4 else gts[best][1] - 1)
                if any(ious[i][r] == best_of_gt[i] for i in range(len(gts))):
                    label = gts[best][1] - 1
                gt = gts[best][0]
            if label == -1:
                continue
            for c in range(num_classes):
                z = float(logits[img, r, c])
                p = 1 / (1 + math.exp(-z))
                if c == label:
                    focal -= alpha * (1 - p) ** gamma * math.log(p)
                else:
                    focal -= (1 - alpha) * p**gamma * math.log(1 - p)
            if label == num_classes:
                continue
            num_fg += 1
            aw, ah = a[2] - a[0], a[3] - a[1]
            acx, acy = a[0] + aw / 2, a[1] + ah / 2
            d = [float(v) for v in deltas[img, r]]
            if loss_type == "smooth_l1":
                gw, gh = gt[2] - gt[0], gt[3] - gt[1]
                target = [(gt[0] + gw / 2 - acx) / aw, (gt[1] + gh / 2 - acy) / ah, math.log(gw / aw),
                          math.log(gh / ah)]
                for v, t in zip(d, target):
                    x = abs(v - t)
                    box += 0.5 * x * x / beta if x < beta else x - 0.5 * beta
                    branches.add(x < beta)
            else:
                cx, cy, pw, ph = acx + d[0] * aw, acy + d[1] * ah, aw * math.exp(d[2]), ah * math.exp(d[3])
                p = [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2]
                inter, union = _inter_union64(p, gt)
                hull = (max(p[2], gt[2]) - min(p[0], gt[0])) * (max(p[3], gt[3]) - min(p[1], gt[1]))
                box += 1 - (inter / union - (hull - union) / hull)
    assert loss_type == "giou" or branches == {True, False}  # both sides of the smooth-L1 beta are exercised
    return focal, box, num_fg


@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou"])
def test_focal_and_box_losses_equal_a_float64_loop(loss_type):
    """Two levels (2 x 3 and 1 x 2 maps), A = 2, K = 3, two images (one with a crowd box), float64 throughout."""
    rules = _rules(scales_per_octave=1, aspect_ratios=(1.0, 2.0), min_level=3, max_level=4, bbox_loss_type=loss_type,
                   bbox_beta=0.1)
    features = [torch.zeros(2, 1, 2, 3), torch.zeros(2, 1, 1, 2)]
    anchors = [a.double() for a in rules.anchor_generator([f.shape[-2:] for f in features], torch.device("cpu"))]
    roidb = [_entry([[2, 3, 30, 26], [20, 0, 40, 14]], [2, 3]),
             _entry([[8, 8, 40, 30], [0, 0, 8, 8]], [1, 2], [False, True])]
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 2 * 3, f.shape[2], f.shape[3], generator=g, dtype=torch.float64) for f in features]
    deltas = [torch.randn(2, 2 * 4, f.shape[2], f.shape[3], generator=g, dtype=torch.float64) * 0.3
              for f in features]
    loss_cls, loss_box, num_fg = rules.summed_losses(anchors, logits, deltas, roidb)
    flat_logits = torch.cat([permute_to_n_hwa_k(x, 3) for x in logits], dim=1)
    flat_deltas = torch.cat([permute_to_n_hwa_k(d, 4) for d in deltas], dim=1)
    focal, box, want_fg = _reference_losses(anchors, flat_logits, flat_deltas, roidb, 3, 0.25, 2.0, 0.1, loss_type)
    assert num_fg == want_fg >= 3
    assert loss_cls.item() == pytest.approx(focal, rel=1e-10)
    assert loss_box.item() == pytest.approx(box, rel=1e-10)


def test_loss_normalizer_is_detectron2s_ema_and_a_float64_buffer():
    normalizer = LossNormalizer()
    assert normalizer.update(5) == pytest.approx(100 * 0.9 + 5 * 0.1, rel=1e-15)  # 90.5
    assert normalizer.update(0) == pytest.approx(90.5 * 0.9 + 1 * 0.1, rel=1e-15)  # max(0, 1)
    assert normalizer.value.dtype == torch.float64 and normalizer.value.item() == pytest.approx(81.55, rel=1e-15)
    assert list(normalizer.state_dict()) == ["value"] and normalizer.detectron_weight_mapping() == {"value": None}


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_inference_threshold_topk_per_level_nms_per_class_and_postprocess():
    """Level A (1 x 3, stride 8) and B (1 x 3, stride 16), A = 1, K = 2. Scores above 0.05 are candidates, each
    level keeps its best 3, NMS (0.5) works within a class, then the best DETECTIONS_PER_IM, then the boxes go
    from the 100 x 80 input to a 200 x 120 original (scale_y 2, scale_x 1.5), clipped, empty ones dropped."""
    level_a = torch.tensor([[0, 0, 20, 20], [2, 0, 22, 20], [70, 0, 90, 20]], dtype=torch.float32)
    level_b = torch.tensor([[100, 100, 140, 140], [0, 60, 20, 80], [40, 40, 60, 60]], dtype=torch.float32)
    scores_a = [[0.9, 0.04], [0.8, 0.3], [0.7, 0.02]]  # candidates .9 .8 .3 .7 -> top 3: .9 .8 .7
    scores_b = [[0.6, 0.01], [0.55, 0.65], [0.03, 0.02]]  # the coarsest level keeps the threshold (not Detectron's 0)
    logits = [torch.tensor([[_logit(p) for p in column] for column in zip(*s)]).reshape(1, 2, 1, -1)
              for s in (scores_a, scores_b)]
    deltas = [torch.zeros(1, 4, 1, 3), torch.zeros(1, 4, 1, 3)]
    deltas[1][0, 0, 0, 0] = 0.5  # b0 moves right by half its width: [120, 100, 160, 140]
    rules = _rules(scales_per_octave=1, aspect_ratios=(1.0,), min_level=3, max_level=4, pre_nms_top_n=3,
                   detections_per_im=5, inference_th=0.05, nms=0.5)
    det = rules.detections([level_a, level_b], logits, deltas, 0, (100.0, 80.0), (200, 120))
    # a1 (.8) loses to a0 (IoU 0.82, same class); b1 keeps both classes; b0 [180, 200, 240, 280] clips to
    # nothing; a2 [105, 0, 135, 40] clips to x2 = 120.
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.7, 0.65, 0.55]))
    assert det["classes"].tolist() == [1, 1, 2, 1]
    torch.testing.assert_close(det["boxes"], torch.tensor([[0, 0, 30, 40], [105, 0, 120, 40], [0, 120, 30, 160],
                                                           [0, 120, 30, 160]], dtype=torch.float32))
    cut = dataclasses.replace(rules.settings, detections_per_im=3)
    rules.settings = cut
    det = rules.detections([level_a, level_b], logits, deltas, 0, (100.0, 80.0), (200, 120))
    assert det["scores"].tolist() == pytest.approx([0.9, 0.7, 0.65])  # cut before b0 is dropped
    rules.settings = dataclasses.replace(cut, detections_per_im=10, pre_nms_top_n=4)
    det = rules.detections([level_a, level_b], logits, deltas, 0, (100.0, 80.0), (200, 120))
    assert det["scores"].tolist() == pytest.approx([0.9, 0.7, 0.65, 0.55, 0.3])  # a1's class 2 now a candidate


def test_detector_postprocess_scales_keypoints_and_filters_every_entry():
    det = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0], [50.0, 0.0, 60.0, 10.0]]),
           "scores": torch.tensor([0.9, 0.8]),
           "keypoints": torch.tensor([[[12.0, 14.0, 1.0]], [[55.0, 5.0, 1.0]]])}
    out = detector_postprocess(det, (40.0, 50.0), (80, 75))  # scale_x 1.5, scale_y 2; box 1 starts at x 75
    torch.testing.assert_close(out["boxes"], torch.tensor([[15.0, 20.0, 30.0, 60.0]]))
    torch.testing.assert_close(out["keypoints"], torch.tensor([[[18.0, 28.0, 1.0]]]))
    assert out["scores"].tolist() == [pytest.approx(0.9)]


def test_config_keys_are_checked():
    def cfg_with(*pairs):
        cfg = get_cfg()
        merge_cfg_from_file(cfg, CONFIG)
        merge_cfg_from_list(cfg, list(pairs))
        return assert_and_infer_cfg(cfg)

    assert cfg_with("RETINANET.USE_GN", "True").RETINANET.NORM == "GN"
    assert cfg_with(*D2, "RETINANET.NORM", "GN").RETINANET.USE_GN
    for norm in ("BN", "SyncBN", "FrozenBN"):
        with pytest.raises(ConfigError, match="RETINANET.NORM"):
            cfg_with(*D2, "RETINANET.NORM", norm)
    with pytest.raises(ConfigError, match="RETINANET.BBOX_REG_LOSS_TYPE.*detectron2"):
        cfg_with("RETINANET.BBOX_REG_LOSS_TYPE", "giou")
    with pytest.raises(ConfigError, match="RETINANET.BBOX_REG_LOSS_TYPE"):
        cfg_with(*D2, "RETINANET.BBOX_REG_LOSS_TYPE", "ciou")
    with pytest.raises(ConfigError, match="RETINANET.BBOX_REG_WEIGHTS"):
        cfg_with("RETINANET.BBOX_REG_WEIGHTS", "(1.0, 1.0, 1.0)")
    with pytest.raises(ConfigError, match="RETINANET.NEGATIVE_OVERLAP"):
        cfg_with(*D2, "RETINANET.NEGATIVE_OVERLAP", "0.6")


def test_d2_model_trains_resumes_exactly_and_infers():
    torch.manual_seed(0)
    cfg = _cfg(["RETINANET.NORM", "GN", "RETINANET.INFERENCE_TH", "0.005", "RESNETS.FREEZE_AT", "5"])
    model = build_detector(cfg)
    assert isinstance(model, RetinaNet) and model.d2_rules is not None
    batch = synthetic_batch(stride=128, seed=2)
    losses = train_step(model, batch)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    # the normaliser after one step: 0.9 * 100 + 0.1 * max(foreground anchors of the batch, 1)
    anchors = torch.cat(model.d2_rules.anchors(model.body(batch[0])))
    labels, _ = label_anchors(anchors, batch[2], model.d2_rules.matcher, cfg.MODEL.NUM_CLASSES - 1)
    num_fg = int(((labels >= 0) & (labels < cfg.MODEL.NUM_CLASSES - 1)).sum())
    assert num_fg > 0
    assert model.loss_normalizer.value.item() == pytest.approx(90 + 0.1 * num_fg, rel=1e-15)
    # exact resume: a copy from the state dict continues with the same normaliser and the same losses
    resumed = build_detector(cfg)
    resumed.load_state_dict(model.state_dict())
    assert resumed.loss_normalizer.value.item() == model.loss_normalizer.value.item()
    assert train_step(resumed, batch) == train_step(model, batch)
    assert resumed.loss_normalizer.value.item() == pytest.approx((90 + 0.1 * num_fg) * 0.9 + 0.1 * num_fg)
    data, im_info, roidb = synthetic_batch(sizes=((96, 128),), scales=(2.0,), stride=128, seed=3)
    det = model.eval()(data, im_info, roidb)[0]
    assert set(det) == {"boxes", "scores", "classes"} and det["boxes"].shape[0] > 0
    assert (det["scores"] > 0.005).all() and det["classes"].min() >= 1
    h, w = roidb[0]["height"], roidb[0]["width"]
    assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()


def test_d2_head_init_and_weight_names():
    """detectron2's towers keep Gaussian(0.01) convs with GN; Caffe2 names as Detectron's, GN's `_gn_s/_b`
    (pydetectron's names: Detectron's RetinaNet has no GN), and the normaliser has no blob."""
    torch.manual_seed(0)
    model = build_detector(_cfg(["RETINANET.NORM", "GN", "FPN.DIM", "256"]))
    conv = model.head.cls_tower[0]
    assert isinstance(model.head.cls_tower[1], torch.nn.GroupNorm) and model.head.cls_tower[1].num_groups == 32
    assert conv.weight.std().item() == pytest.approx(0.01, rel=0.05) and not conv.bias.any()
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(model.head.cls_pred.bias, torch.full_like(model.head.cls_pred.bias, prior))
    mapping = model.detectron_weight_mapping()
    assert mapping["head.cls_tower.0.weight"] == "retnet_cls_conv_n0_fpn3_w"
    assert mapping["head.bbox_tower.1.weight"] == "retnet_bbox_conv_n0_fpn3_gn_s"
    assert mapping["head.cls_pred.weight"] == "retnet_cls_pred_fpn3_w"
    assert mapping["head.bbox_pred.bias"] == "retnet_bbox_pred_fpn3_b"
    assert mapping["loss_normalizer.value"] is None
    assert set(model.state_dict()) == set(mapping)


def test_loss_normalizer_is_one_value_over_the_ranks(tmp_path):
    """Under DistributedDataParallel each update takes the ranks' mean count (of max(n, 1)), so every rank holds
    the value a checkpoint saves: ranks with 10 and 0, then 3 and 7 foreground anchors give 5.5, then 5."""
    from pydetectron.engine.launch import LaunchSettings, launch

    sys.path.insert(0, os.path.dirname(__file__))  # the spawned ranks import the worker by name too
    import retinanet_dist_worker

    launch(retinanet_dist_worker.loss_normalizer_updates, LaunchSettings(num_gpus=2, use_cuda=False, timeout_s=60),
           (str(tmp_path),))
    first = 100 * 0.9 + 5.5 * 0.1
    for rank in (0, 1):
        assert torch.load(tmp_path / f"normalizer_rank{rank}.pt") == pytest.approx([first, first * 0.9 + 5 * 0.1])


def test_loss_normalizer_refuses_dataparallel_replicas():
    """torch's replicate() marks replicas; an update on one would be lost, so it is refused by name."""
    normalizer = LossNormalizer()
    normalizer._is_replica = True
    with pytest.raises(RuntimeError, match="one GPU per process"):
        normalizer.update(3)
