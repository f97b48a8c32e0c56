"""RetinaNet against hand values and references written here from Detectron's retinanet code: anchors, anchor
labels and targets, the sigmoid focal loss, decoding at inference, and the model-zoo blob names."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from test_detector import SHRINK, synthetic_batch, train_step

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.modeling.detector import build_detector, total_loss
from pydetectron.modeling.retinanet import (
    RetinaNet,
    RetinaNetSettings,
    cell_anchors,
    retinanet_losses,
    retinanet_targets,
    sigmoid_focal_loss,
)

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "baselines", "retinanet_R-50-FPN_1x.yaml")


def _cfg(extra=()):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, CONFIG)
    merge_cfg_from_list(cfg, SHRINK + list(extra))
    return assert_and_infer_cfg(cfg)


def test_cell_anchors_are_detectrons_octave_major_anchors():
    settings = RetinaNetSettings.from_cfg(_cfg())
    anchors = cell_anchors(settings, 3)  # stride 8, sizes 32 * 2^(o/3), ratios (1, 2, 0.5) within each octave
    assert anchors.shape == (9, 4)
    torch.testing.assert_close(anchors[0], torch.tensor([-12.0, -12.0, 19.0, 19.0]))  # 32 x 32, ratio 1
    torch.testing.assert_close(anchors[1], torch.tensor([-8.0, -20.0, 15.0, 27.0]))  # base 6 x 12 scaled by 4
    half = 0.5 * (32 * 2 ** (1 / 3) - 1)  # octave 1, ratio 1: x_ctr 3.5 -/+ (ws - 1) / 2
    torch.testing.assert_close(anchors[3], torch.tensor([3.5 - half, 3.5 - half, 3.5 + half, 3.5 + half]))
    torch.testing.assert_close(cell_anchors(settings, 7)[0], torch.tensor([-192.0, -192.0, 319.0, 319.0]))


def _reference_labels(anchors, gt_boxes, gt_classes, pos, neg):
    """Detectron's _get_retinanet_blobs, written out in float64 numpy."""
    def iou(a, b):
        iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
        ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
        return inter / (area(a)[:, None] + area(b)[None, :] - inter)

    overlaps = iou(anchors, gt_boxes)
    labels = -np.ones(len(anchors))
    argmax, best = overlaps.argmax(1), overlaps.max(1)
    with_max = np.where(overlaps == overlaps.max(0))[0]
    labels[with_max] = gt_classes[argmax[with_max]]
    labels[best >= pos] = gt_classes[argmax[best >= pos]]
    fg_num = (labels >= 1).sum() + 1
    labels[best < neg] = 0
    return labels, fg_num


def test_anchor_labels_follow_detectron_including_its_quirks():
    settings = RetinaNetSettings.from_cfg(_cfg())
    features = [torch.zeros(1, 1, 128 // 2**lvl, 160 // 2**lvl) for lvl in settings.levels]
    gt = np.array([[10, 12, 60, 50], [70, 20, 150, 120], [5, 90, 20, 110]], np.float32)
    entry = {"boxes": torch.from_numpy(gt), "gt_classes": torch.tensor([1, 3, 2]),
             "is_crowd": torch.tensor([False, False, False])}
    crowded = dict(entry, is_crowd=torch.tensor([False, False, True]))
    targets = retinanet_targets(settings, features, [entry, crowded])
    anchors = []  # rows ordered (level, y, x, anchor), as Detectron concatenates its fields of anchors
    for level, f in zip(settings.levels, features):
        cell = cell_anchors(settings, level).double().numpy()
        for y in range(f.shape[2]):
            for x in range(f.shape[3]):
                anchors.append(cell + np.array([x, y, x, y]) * 2.0**level)
    anchors = np.concatenate(anchors)
    ours = [torch.cat([lab[i].permute(1, 2, 0).reshape(-1) for lab in targets.labels]).numpy() for i in range(2)]
    want0, fg0 = _reference_labels(anchors, gt.astype(np.float64), np.array([1, 3, 2]), 0.5, 0.4)
    want1, fg1 = _reference_labels(anchors, gt[:2].astype(np.float64), np.array([1, 3]), 0.5, 0.4)  # no crowd
    np.testing.assert_array_equal(ours[0], want0)
    np.testing.assert_array_equal(ours[1], want1)
    assert targets.fg_num == fg0 + fg1
    assert (ours[0] > 0).sum() > 3 and (ours[0] == -1).sum() > 0  # foreground and ignored anchors both occur


def test_sigmoid_focal_loss_equals_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    num_anchors, num_classes = 2, 3
    logits = torch.randn(2, num_anchors * num_classes, 3, 4, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(-1, num_classes + 1, (2, num_anchors, 3, 4), generator=g)
    alpha, gamma, normalizer = 0.25, 2.0, 7.0
    want = 0.0
    for n, a, y, x in np.ndindex(2, num_anchors, 3, 4):
        label = int(labels[n, a, y, x])
        for c in range(num_classes):
            p = 1 / (1 + math.exp(-float(logits[n, a * num_classes + c, y, x])))
            if label == c + 1:
                want -= alpha * (1 - p) ** gamma * math.log(p)
            elif label != -1:
                want -= (1 - alpha) * p**gamma * math.log(1 - p)
    got = sigmoid_focal_loss(logits, labels, alpha, gamma, normalizer)
    assert got.item() == pytest.approx(want / normalizer, rel=1e-12)


def test_inference_decodes_the_best_anchor_and_its_deltas():
    """A head made to score one anchor type of one class and to shift its boxes by dx = 0.25: every detection
    is that class, and its box is an anchor of that type, moved by a quarter of its width, in original pixels."""
    torch.manual_seed(0)
    model = build_detector(_cfg(["TEST.DETECTIONS_PER_IM", "1000"])).eval()
    head, k = model.head, 3
    with torch.no_grad():
        for conv in (head.cls_pred, head.bbox_pred):
            conv.weight.zero_()
        head.cls_pred.bias.fill_(-20.0)
        head.cls_pred.bias[0 * k + 1] = 5.0  # anchor 0 (octave 0, ratio 1), class 2
        head.bbox_pred.bias.zero_()
        head.bbox_pred.bias[0] = 0.25  # its dx
    data, im_info, roidb = synthetic_batch(sizes=((128, 160),), scales=(2.0,), stride=128, seed=1)
    det = model(data, im_info, roidb)[0]
    # (the coarsest level keeps every score above 0, as Detectron's: those of the other classes are ~2e-9)
    confident = det["scores"] > 0.5
    assert det["classes"][confident].unique().tolist() == [2] and confident.sum() > 10
    det = {key: value[confident] for key, value in det.items()}
    candidates = []
    for level in model.settings.levels:
        cell = cell_anchors(model.settings, level)[0]
        h, w = (-(-data.shape[2] // 2**level), -(-data.shape[3] // 2**level))  # the padded input's map
        for y in range(h):
            for x in range(w):
                a = cell + torch.tensor([x, y, x, y], dtype=torch.float32) * 2**level
                a = a + torch.tensor([0.25, 0, 0.25, 0]) * (a[2] - a[0] + 1)
                candidates.append((a / 2.0).clamp(min=0).minimum(torch.tensor([79.0, 63.0, 79.0, 63.0])))
    candidates = torch.stack(candidates)
    distance = (det["boxes"][:, None, :] - candidates[None]).abs().amax(dim=2).amin(dim=1)
    assert distance.max() < 1e-3


def test_trains_a_step_and_loads_the_model_zoo_names():
    import detectron_names

    from pydetectron.weights.detectron_pkl import load_detectron_weights

    torch.manual_seed(0)
    model = build_detector(_cfg(["MODEL.NUM_CLASSES", "81"]))
    assert isinstance(model, RetinaNet)
    batch = synthetic_batch(stride=128, seed=2)
    losses = train_step(model, batch)
    assert set(losses) == {f"loss_retnet_{kind}_fpn{lvl}" for kind in ("cls", "bbox") for lvl in range(3, 8)}
    assert all(np.isfinite(v) for v in losses.values()) and losses["loss_retnet_bbox_fpn3"] > 0
    full = build_detector(_cfg(["MODEL.NUM_CLASSES", "81", "FPN.DIM", "256"]))
    rng = np.random.RandomState(0)
    blobs = {name: (rng.randn(*shape) * 0.01).astype(np.float32)
             for name, shape in detectron_names.retinanet_r50_fpn_1x_blobs().items()}
    for name in set(detectron_names.imagenet_r50_blobs()) - set(full.detectron_weight_mapping().values()):
        if name.endswith("_b") and name in blobs:
            blobs[name][...] = 0
    report = load_detectron_weights(full, {"blobs": blobs})
    assert report.missing == [] and report.unused == [] and report.unmapped == [] and report.skipped == []
    assert torch.equal(full.head.cls_pred.bias, torch.from_numpy(blobs["retnet_cls_pred_fpn3_b"]))
    results = full.eval()(*synthetic_batch(sizes=((96, 128),), stride=128, seed=3)[:2])
    assert set(results[0]) == {"boxes", "scores", "classes"}


def test_unsupported_variants_are_named():
    with pytest.raises(ValueError, match="RETINANET.SOFTMAX"):
        RetinaNetSettings.from_cfg(_cfg(["RETINANET.SOFTMAX", "True"]))
    with pytest.raises(ValueError, match="FPN levels"):
        build_detector(_cfg(["FPN.MULTILEVEL_ROIS", "True"]))  # the body would start at P2


def test_overfits_one_batch():
    """The losses and their gradients fit together: a few AdamW steps on one batch cut the loss well down."""
    torch.manual_seed(0)
    model = build_detector(_cfg(["RESNETS.FREEZE_AT", "5"])).train()
    batch = synthetic_batch(stride=128, seed=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    totals = []
    for _ in range(25):
        total = total_loss(model(*batch))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert np.mean(totals[-3:]) < 0.5 * totals[0], totals


def test_groupnorm_towers_keep_detectrons_names_and_add_gn_blobs():
    model = build_detector(_cfg(["RETINANET.USE_GN", "True"]))
    towers = [m for m in model.head.cls_tower if isinstance(m, torch.nn.GroupNorm)]
    assert len(towers) == 4
    mapping = model.head.detectron_weight_mapping()
    assert mapping["cls_tower.0.weight"] == "retnet_cls_conv_n0_fpn3_w"
    assert mapping["cls_tower.1.weight"] == "retnet_cls_conv_n0_fpn3_gn_s"
    assert mapping["bbox_tower.10.bias"] == "retnet_bbox_conv_n3_fpn3_gn_b"
    assert set(mapping) == set(model.head.state_dict())  # every parameter has a blob name


def _huber(x: float, beta: float) -> float:
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def test_targets_and_losses_on_a_hand_made_case():
    """One level (stride 8), one 32 x 32 anchor per cell on a 2 x 3 map: a(y, x) = [-12 + 8x, -12 + 8y,
    19 + 8x, 19 + 8y]. Image 0 holds gt1 = a(0, 0) (class 2) and gt2 = [6, 4, 29, 35] (24 x 32, class 1); image 1
    only a small box whose best anchor overlaps it by 0.14. Labels, targets, fg_num and both losses are worked
    out by hand / in float64 from Detectron's retinanet.py, SigmoidFocalLoss and SelectSmoothL1Loss."""
    settings = dataclasses.replace(RetinaNetSettings.from_cfg(_cfg()), min_level=3, max_level=3,
                                   scales_per_octave=1, aspect_ratios=(1.0,), anchor_scale=4.0, bbox_weight=2.0)
    assert (settings.bbox_beta, settings.alpha, settings.gamma) == (0.11, 0.25, 2.0)  # Detectron's defaults
    torch.testing.assert_close(cell_anchors(settings, 3), torch.tensor([[-12.0, -12.0, 19.0, 19.0]]))
    roidb = [{"boxes": torch.tensor([[-12.0, -12.0, 19.0, 19.0], [6.0, 4.0, 29.0, 35.0]]),
              "gt_classes": torch.tensor([2, 1]), "is_crowd": torch.tensor([False, False])},
             {"boxes": torch.tensor([[26.0, 6.0, 41.0, 21.0]]), "gt_classes": torch.tensor([3]),
              "is_crowd": torch.tensor([False])}]
    targets = retinanet_targets(settings, [torch.zeros(2, 8, 2, 3)], roidb)

    # IoUs with gt1: a00 1, a01 0.6, a02 1/3, a10 0.6, a11 0.391, a12 0.231; with gt2: a02 0.273, a11 0.418,
    # a12 0.474 (gt2's best, so foreground below POSITIVE_OVERLAP; a11 is in [0.4, 0.5): ignored). Image 1's
    # best anchor (a12, IoU 0.143) is foreground first, then background: it still counts in fg_num.
    assert targets.labels[0].tolist() == [[[[2, 2, 0], [2, -1, 1]]], [[[0, 0, 0], [0, 0, 0]]]]
    assert targets.fg_num == (4 + 1) + (1 + 1)
    want_targets = torch.zeros(2, 1, 4, 2, 3)
    want_targets[0, 0, :, 0, 1] = torch.tensor([-0.25, 0.0, 0.0, 0.0])  # gt1 centre 8 px left of a01's
    want_targets[0, 0, :, 1, 0] = torch.tensor([0.0, -0.25, 0.0, 0.0])
    want_targets[0, 0, :, 1, 2] = torch.tensor([-2 / 32, 8 / 32, math.log(24 / 32), 0.0])  # gt2 from a12
    fg = targets.labels[0] > 0
    torch.testing.assert_close(targets.bbox_targets[0].permute(0, 1, 3, 4, 2)[fg],
                               want_targets.permute(0, 1, 3, 4, 2)[fg], rtol=0, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64) * 2
    deltas = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64) * 0.2
    losses = retinanet_losses(settings, [logits], [deltas], targets)
    labels = targets.labels[0][:, 0].tolist()
    focal, box, branches = 0.0, 0.0, set()
    for n, y, x in np.ndindex(2, 2, 3):
        label = labels[n][y][x]
        for c in range(3):
            p = 1 / (1 + math.exp(-float(logits[n, c, y, x])))
            if label == c + 1:
                focal -= 0.25 * (1 - p) ** 2 * math.log(p)
            elif label != -1:
                focal -= 0.75 * p**2 * math.log(1 - p)
        if label > 0:
            for k in range(4):
                diff = float(deltas[n, k, y, x]) - float(want_targets[n, 0, k, y, x])
                box += 2.0 * _huber(diff, 0.11)
                branches.add(abs(diff) < 0.11)
    assert branches == {True, False}  # both sides of the smooth-L1 beta are exercised
    assert losses["loss_retnet_cls_fpn3"].item() == pytest.approx(focal / 7, rel=1e-6)
    assert losses["loss_retnet_bbox_fpn3"].item() == pytest.approx(box / 7, rel=1e-6)


def test_box_coder_weights_scale_the_targets():
    """RETINANET.BBOX_REG_WEIGHTS (pydetectron's key; Detectron's RetinaNet has them all 1) scale dx, dy, dw, dh."""
    settings = RetinaNetSettings.from_cfg(_cfg())
    weighted = RetinaNetSettings.from_cfg(_cfg(["RETINANET.BBOX_REG_WEIGHTS", "(10.0, 10.0, 5.0, 5.0)"]))
    assert weighted.box_weights == (10.0, 10.0, 5.0, 5.0)
    features = [torch.zeros(1, 1, 128 // 2**lvl, 160 // 2**lvl) for lvl in settings.levels]
    roidb = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 20.0, 150.0, 120.0]]),
              "gt_classes": torch.tensor([1, 3]), "is_crowd": torch.tensor([False, False])}]
    plain, scaled = retinanet_targets(settings, features, roidb), retinanet_targets(weighted, features, roidb)
    scale = torch.tensor([10.0, 10.0, 5.0, 5.0]).view(1, 1, 4, 1, 1)
    for a, b in zip(plain.bbox_targets, scaled.bbox_targets):
        torch.testing.assert_close(b, a * scale)
    assert sum(int((labels > 0).sum()) for labels in plain.labels) > 0
