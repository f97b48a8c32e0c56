"""RPN pieces: FPN level mapping and collection, anchor labelling, proposals, the RPN module."""

import math

import pytest
import torch

from pydetectron.boxes import encode_boxes
from pydetectron.modeling.fpn_levels import collect_proposals, distribute_rois, map_rois_to_fpn_levels
from pydetectron.modeling.proposals import (
    ProposalParams,
    flatten_deltas,
    flatten_scores,
    generate_proposals,
    proposals_as_detections,
)
from pydetectron.modeling.rpn import build_rpn
from pydetectron.modeling.targets.rpn import RPNSampling, label_anchors, rpn_gt_boxes, rpn_targets


def _square(side):
    return [0.0, 0.0, side - 1.0, side - 1.0]  # inclusive pixels: `side` wide


@pytest.mark.parametrize(
    "side,level",
    [(224, 4), (112, 3), (448, 5), (223, 3), (447, 4), (8, 2), (2000, 5), (1, 2)],
)
def test_level_table(side, level):
    boxes = torch.tensor([_square(side)])
    assert map_rois_to_fpn_levels(boxes, 2, 5, 224, 4).tolist() == [level]


def test_level_formula_vs_float64_reference():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    wh = torch.rand(200, 2, generator=g) * 600
    boxes = torch.cat((xy, xy + wh), 1)
    expected = []
    for b in boxes.double().tolist():
        s = math.sqrt((b[2] - b[0] + 1) * (b[3] - b[1] + 1))
        expected.append(min(max(math.floor(4 + math.log2(s / 224 + 1e-6)), 2), 5))
    assert map_rois_to_fpn_levels(boxes, 2, 5).tolist() == expected


def test_distribute_and_restore():
    sides = [300, 10, 224, 500, 100, 30]
    rois = torch.tensor([[float(i % 2)] + _square(s) for i, s in enumerate(sides)])
    levels = map_rois_to_fpn_levels(rois[:, 1:], 2, 5)
    per_level, restore = distribute_rois(rois, levels, 2, 5)
    # levels: 300 -> 4, 10 -> 2, 224 -> 4, 500 -> 5, 100 -> 2, 30 -> 2
    assert [p.shape[0] for p in per_level] == [3, 0, 2, 1]
    assert per_level[0][:, 0].tolist() == [1.0, 0.0, 1.0]  # input order kept inside a level
    torch.testing.assert_close(torch.cat(per_level)[restore], rois)


def test_collect_is_over_the_whole_batch():
    rois = [torch.tensor([[0.0, 0, 0, 5, 5], [1.0, 0, 0, 6, 6]]), torch.tensor([[0.0, 1, 1, 9, 9]])]
    scores = [torch.tensor([0.2, 0.9]), torch.tensor([0.5])]
    got_rois, got_scores = collect_proposals(rois, scores, top_n=2)
    assert got_scores.tolist() == pytest.approx([0.9, 0.5])
    assert got_rois[:, 0].tolist() == [1.0, 0.0]
    assert collect_proposals(rois, scores, top_n=0)[0].shape[0] == 3


# ---------------------------------------------------------------------------------------------------------
# Anchor labelling (targets/rpn.py)

ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 9.0, 9.0],  # IoU 1 with gt0 -> positive
        [1.0, 0.0, 10.0, 9.0],  # IoU 90/110 = 0.82 with gt0 -> positive
        [5.0, 0.0, 14.0, 9.0],  # IoU 50/150 = 0.33 with gt0 -> ignored (between thresholds)
        [20.0, 20.0, 29.0, 29.0],  # IoU 100/196 = 0.51 with gt1: gt1's best anchor -> positive
        [30.0, 30.0, 39.0, 39.0],  # IoU 4/292 with gt1 -> negative
        [35.0, 35.0, 44.0, 44.0],  # sticks out of the 40 x 40 image
    ]
)
GT = torch.tensor([[0.0, 0.0, 9.0, 9.0], [18.0, 18.0, 31.0, 31.0]])


def test_label_anchors_hand_made():
    labels, targets, inside, outside = label_anchors(ANCHORS, GT, 40, 40, RPNSampling())
    assert labels.tolist() == [1, 1, -1, 1, 0, -1]
    expected_targets = torch.zeros(6, 4)
    expected_targets[[0, 1, 3]] = encode_boxes(ANCHORS[[0, 1, 3]], GT[[0, 0, 1]], (1, 1, 1, 1))
    torch.testing.assert_close(targets, expected_targets)
    assert inside[:, 0].tolist() == [1, 1, 0, 1, 0, 0]
    # 4 labelled anchors in this image: outside weight 1/4 on positives
    torch.testing.assert_close(outside[:, 0], torch.tensor([0.25, 0.25, 0, 0.25, 0, 0]))


def test_label_anchors_keeps_straddling_anchors_with_minus_one():
    labels, _, _, outside = label_anchors(ANCHORS, GT, 40, 40, RPNSampling(straddle_thresh=-1))
    assert labels.tolist() == [1, 1, -1, 1, 0, 0]
    assert outside[0, 0].item() == pytest.approx(0.2)


def test_label_anchors_subsamples_with_seeded_generator():
    params = RPNSampling(batch_size_per_im=2, fg_fraction=0.5)  # at most 1 positive, 1 negative
    runs = [label_anchors(ANCHORS, GT, 40, 40, params, torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()
    assert (runs[0] == 1).sum() == 1 and (runs[0] == 0).sum() == 1
    assert runs[0][[2, 5]].tolist() == [-1, -1]
    seen = {int(torch.nonzero(label_anchors(ANCHORS, GT, 40, 40, params, torch.Generator().manual_seed(s))[0] == 1))
            for s in range(30)}
    assert seen == {0, 1, 3}  # every positive can be the one kept


def test_negatives_are_drawn_with_replacement_up_to_the_budget():
    anchors = torch.tensor([[x, 0.0, x + 3, 3.0] for x in range(0, 400, 4)], dtype=torch.float32)
    params = RPNSampling(batch_size_per_im=64)
    labels = label_anchors(anchors, torch.zeros(0, 4), 10, 1000, params, torch.Generator().manual_seed(0))[0]
    negatives = int((labels == 0).sum())
    assert (labels == 1).sum() == 0
    assert 40 < negatives <= 64  # 64 draws from 100 candidates, some repeated


def _reference_labels(anchors, gts, height, width, pos=0.7, neg=0.3, straddle=0.0):
    """Detectron's _get_rpn_blobs without subsampling, in plain Python float64 loops."""
    def iou(a, b):
        iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
        ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
        if iw <= 0 or ih <= 0:
            return 0.0
        area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
        return iw * ih / (area - iw * ih)

    inside = [i for i, a in enumerate(anchors) if straddle < 0 or (
        a[0] >= -straddle and a[1] >= -straddle and a[2] < width + straddle and a[3] < height + straddle)]
    ov = {i: [iou(anchors[i], g) for g in gts] for i in inside}
    labels = [-1] * len(anchors)
    best_per_gt = [max(ov[i][j] for i in inside) for j in range(len(gts))]
    for i in inside:
        if any(ov[i][j] == best_per_gt[j] > 0 for j in range(len(gts))) or max(ov[i]) >= pos:
            labels[i] = 1
    for i in inside:
        if max(ov[i]) < neg:
            labels[i] = 0
    return labels


@pytest.mark.parametrize("straddle", [0.0, -1.0])
def test_label_anchors_match_reference_without_subsampling(straddle):
    from pydetectron.modeling.anchors import fpn_anchor_generator

    anchors = torch.cat(fpn_anchor_generator(2, 4, 16, (0.5, 1, 2))([(8, 10), (4, 5), (2, 3)], torch.device("cpu")))
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(5, 2, generator=g) * 30
    gts = torch.cat((xy, xy + 4 + torch.rand(5, 2, generator=g) * 20), 1).round()  # integer coords: real ties
    params = RPNSampling(batch_size_per_im=10**6, straddle_thresh=straddle)
    labels, targets, inside, outside = label_anchors(anchors, gts, 32, 40, params)
    expected = _reference_labels(anchors.double().tolist(), gts.double().tolist(), 32, 40, straddle=straddle)
    assert labels.tolist() == expected
    assert (labels == 1).sum() >= 5  # every gt has at least one positive anchor here
    num_examples = sum(1 for v in expected if v >= 0)
    torch.testing.assert_close(outside[labels == 1], torch.full_like(outside[labels == 1], 1 / num_examples))


def test_rpn_targets_drop_crowd_boxes():
    entry = {"boxes": GT.numpy(), "gt_classes": [1, 2], "is_crowd": [False, True]}
    assert rpn_gt_boxes(entry, 0, torch.device("cpu")).tolist() == [GT[0].tolist()]
    im_info = torch.tensor([[40.0, 40.0, 1.0], [40.0, 40.0, 1.0]])
    t = rpn_targets(ANCHORS, [entry, {"boxes": GT, "gt_classes": [1, 1], "is_crowd": [0, 0]}], im_info,
                    RPNSampling())
    assert t.labels.tolist() == [[1, 1, -1, 0, 0, -1], [1, 1, -1, 1, 0, -1]]
    with pytest.raises(KeyError, match="is_crowd"):
        rpn_targets(ANCHORS, [{"boxes": GT, "gt_classes": [1, 1]}], im_info[:1], RPNSampling())


# ---------------------------------------------------------------------------------------------------------
# Proposal generation (proposals.py)

def _reference_proposals(anchors, scores, deltas, im_info, pre_n, post_n, nms_thresh, min_size):
    """Detectron's proposals_for_one_image in plain Python float64 (one image, one level)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if 0 < pre_n < len(order):
        order = order[:pre_n]
    h_im, w_im, scale = im_info
    props = []
    for i in order:
        a, d = anchors[i], deltas[i]
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        cx, cy = a[0] + 0.5 * w, a[1] + 0.5 * h
        px, py = d[0] * w + cx, d[1] * h + cy
        pw = math.exp(min(d[2], math.log(1000 / 16))) * w
        ph = math.exp(min(d[3], math.log(1000 / 16))) * h
        box = [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - 1, py + 0.5 * ph - 1]
        box = [min(max(box[0], 0), w_im - 1), min(max(box[1], 0), h_im - 1),
               min(max(box[2], 0), w_im - 1), min(max(box[3], 0), h_im - 1)]
        bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
        ok = ((box[2] - box[0]) / scale + 1 >= max(min_size, 1) and (box[3] - box[1]) / scale + 1 >= max(min_size, 1)
              and box[0] + bw / 2 < w_im and box[1] + bh / 2 < h_im)
        if ok:
            props.append((box, scores[i]))
    kept = []
    for box, s in props:  # greedy NMS, inclusive-pixel IoU
        suppressed = False
        for k, _ in kept:
            iw = min(box[2], k[2]) - max(box[0], k[0]) + 1
            ih = min(box[3], k[3]) - max(box[1], k[1]) + 1
            if iw > 0 and ih > 0:
                inter = iw * ih
                union = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (k[2] - k[0] + 1) * (k[3] - k[1] + 1) - inter
                suppressed |= inter / union >= nms_thresh
        if not suppressed:
            kept.append((box, s))
    return kept[:post_n] if post_n > 0 else kept


def test_proposals_hand_made_top_n_min_size_and_nms():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 15.0, 15.0],  # a0
            [2.0, 0.0, 17.0, 15.0],  # a1: IoU 224/288 = 0.78 with a0
            [40.0, 40.0, 55.0, 55.0],  # a2
            [60.0, 0.0, 61.0, 1.0],  # a3: 2 x 2, below min_size 3
        ]
    )
    obj = torch.tensor([0.8, 0.9, 0.7, 0.95]).reshape(1, 1, 1, 4)  # (N, A, H, W), anchors in (H, W, A) order
    deltas = torch.zeros(1, 4, 1, 4)
    deltas[0, 0, 0, 2] = 1.0  # a2 moves right by its width: [56, 40, 71, 55]
    im_info = torch.tensor([[100.0, 100.0, 1.0]])

    def run(pre, post, thresh=0.7, info=im_info, o=obj, d=deltas):
        params = ProposalParams(pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=thresh, min_size=3)
        rois, scores = generate_proposals([anchors], [o], [d], info, params, math.log(1000 / 16))
        return rois[0], scores[0]

    rois, scores = run(pre=0, post=0)
    assert rois.tolist() == [[0.0, 2.0, 0.0, 17.0, 15.0], [0.0, 56.0, 40.0, 71.0, 55.0]]  # a3 small, a0 by NMS
    assert scores.tolist() == pytest.approx([0.9, 0.7])
    assert run(pre=3, post=0)[0][:, 1].tolist() == [2.0]  # pre-NMS top-3 is a3, a1, a0: a2 never considered
    assert run(pre=0, post=1)[0][:, 1].tolist() == [2.0]
    assert run(pre=0, post=1, thresh=0)[0].shape[0] == 3  # no NMS: no post-NMS cut either (Detectron)
    # Two images: the second is 50 x 60 so a2's box is clipped to x <= 59, y <= 49.
    two = torch.tensor([[100.0, 100.0, 1.0], [50.0, 60.0, 1.0]])
    rois, _ = run(pre=0, post=0, info=two, o=obj.repeat(2, 1, 1, 1), d=deltas.repeat(2, 1, 1, 1))
    assert rois.tolist()[2:] == [[1.0, 2.0, 0.0, 17.0, 15.0], [1.0, 56.0, 40.0, 59.0, 49.0]]


def test_proposals_match_reference_on_two_levels_two_images():
    from pydetectron.modeling.anchors import fpn_anchor_generator

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    anchors = fpn_anchor_generator(3, 4, 16, (0.5, 1, 2))(shapes, torch.device("cpu"))
    obj = [torch.rand(2, 3, h, w, generator=g) for h, w in shapes]
    deltas = [torch.randn(2, 12, h, w, generator=g) * 0.3 for h, w in shapes]
    im_info = torch.tensor([[40.0, 36.0, 1.5], [30.0, 40.0, 0.8]])
    params = ProposalParams(pre_nms_top_n=25, post_nms_top_n=8, nms_thresh=0.5, min_size=6)
    rois, scores = generate_proposals(anchors, obj, deltas, im_info, params, math.log(1000 / 16))
    for lvl in range(2):
        for img in range(2):
            ref = _reference_proposals(
                anchors[lvl].double().tolist(),
                flatten_scores(obj[lvl])[img].double().tolist(),
                flatten_deltas(deltas[lvl])[img].double().tolist(),
                im_info[img].tolist(), 25, 8, 0.5, 6,
            )
            mine = rois[lvl][:, 0] == img
            assert len(ref) > 0
            torch.testing.assert_close(rois[lvl][mine, 1:].double(), torch.tensor([b for b, _ in ref]).double(),
                                       rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(scores[lvl][mine].double(), torch.tensor([s for _, s in ref]).double())


def test_proposals_as_detections_rescales_to_original_image():
    rois = torch.tensor([[0.0, 10, 10, 20, 20], [1.0, 4, 4, 8, 8], [0.0, 0, 0, 4, 4]])
    scores = torch.tensor([0.5, 0.9, 0.7])
    out = proposals_as_detections(rois, scores, torch.tensor([[100.0, 100.0, 2.0], [50.0, 50.0, 0.5]]))
    assert out[0]["boxes"].tolist() == [[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 10.0, 10.0]]
    assert out[0]["scores"].tolist() == pytest.approx([0.7, 0.5])
    assert out[1]["boxes"].tolist() == [[8.0, 8.0, 16.0, 16.0]]


# ---------------------------------------------------------------------------------------------------------
# The RPN module built from cfg

FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]


def _cfg(fpn, **overrides):
    from pydetectron.config import get_cfg

    cfg = get_cfg()
    cfg.FPN.FPN_ON = fpn
    cfg.FPN.MULTILEVEL_RPN = fpn
    cfg.MODEL.FASTER_RCNN = True
    cfg.TRAIN.RPN_PRE_NMS_TOP_N = 40
    cfg.TRAIN.RPN_POST_NMS_TOP_N = 30
    cfg.TEST.RPN_PRE_NMS_TOP_N = 40
    cfg.TEST.RPN_POST_NMS_TOP_N = 20
    for key, value in overrides.items():
        node, name = key.split("__")
        setattr(getattr(cfg, node), name, value)
    return cfg


def _features(scales, size=64, channels=8, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, int(size * s), int(size * s), generator=g) for s in scales]


ROIDB = [
    {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]]), "gt_classes": [1, 2],
     "is_crowd": [False, False]},
    {"boxes": torch.tensor([[10.0, 10.0, 20.0, 25.0]]), "gt_classes": [1], "is_crowd": [False]},
]
IM_INFO = torch.tensor([[64.0, 64.0, 1.0], [60.0, 50.0, 0.5]])


def test_fpn_rpn_weight_names_and_init():
    rpn = build_rpn(_cfg(True), 8, FPN_SCALES)
    mapping = rpn.detectron_weight_mapping()
    assert set(mapping) == set(rpn.state_dict())
    assert mapping["head.conv_rpn.weight"] == "conv_rpn_fpn2_w"
    assert mapping["head.rpn_cls_logits.bias"] == "rpn_cls_logits_fpn2_b"
    assert mapping["head.rpn_bbox_pred.weight"] == "rpn_bbox_pred_fpn2_w"
    assert rpn.head.rpn_cls_logits.out_channels == 3 and rpn.head.rpn_bbox_pred.out_channels == 12
    assert rpn.head.conv_rpn.out_channels == 8  # FPN RPN keeps the pyramid width
    assert 0.007 < rpn.head.conv_rpn.weight.std().item() < 0.013
    assert rpn.head.conv_rpn.bias.abs().max().item() == 0.0


def test_single_level_rpn_names_and_softmax_objectness():
    rpn = build_rpn(_cfg(False, RPN__CLS_ACTIVATION="softmax"), 16, [1 / 16])
    assert rpn.detectron_weight_mapping()["head.conv_rpn.weight"] == "conv_rpn_w"
    assert rpn.head.rpn_cls_logits.out_channels == 2 * 12  # 4 sizes x 3 ratios, bg and fg
    logits = torch.randn(1, 24, 3, 3)
    # softmax over (bg, fg) is the sigmoid of fg - bg
    torch.testing.assert_close(rpn.head.objectness(logits), torch.sigmoid(logits[:, 12:] - logits[:, :12]))
    with pytest.raises(ValueError, match="RPN.STRIDE"):
        build_rpn(_cfg(False), 16, [1 / 8])


def test_missing_fpn_levels_raise():
    with pytest.raises(ValueError, match="body levels"):
        build_rpn(_cfg(True), 8, [1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128])


def test_fpn_training_losses_follow_detectron_normalisation():
    rpn = build_rpn(_cfg(True), 8, FPN_SCALES)
    features = _features(FPN_SCALES)
    rpn.generator = torch.Generator().manual_seed(3)
    out = rpn(features, IM_INFO, ROIDB)
    assert sorted(out.losses) == sorted([f"loss_rpn_{k}_fpn{lvl}" for k in ("cls", "bbox") for lvl in range(2, 7)])

    # Independent recomputation: same seed -> same targets; reshape labels (N, H*W*A) -> (N, A, H, W).
    anchors = torch.cat(rpn.anchor_generator([f.shape[-2:] for f in features], torch.device("cpu")))
    targets = rpn_targets(anchors, ROIDB, IM_INFO, rpn.sampling, torch.Generator().manual_seed(3))
    logits, deltas = rpn.head(features)
    start, total = 0, 0.0
    for lvl, lg, dl in zip(range(2, 7), logits, deltas):
        n, a, h, w = lg.shape
        labels = targets.labels[:, start:start + h * w * a].reshape(n, h, w, a).permute(0, 3, 1, 2)
        valid = labels >= 0
        bce = torch.nn.functional.binary_cross_entropy_with_logits(lg[valid], labels[valid].float(), reduction="sum")
        torch.testing.assert_close(out.losses[f"loss_rpn_cls_fpn{lvl}"], bce / (256 * 2))
        total += float(valid.sum())

        # (N, H*W*A, 4) -> Detectron's (N, 4A, H, W) blob layout
        tgt, w_in, w_out = (
            t[:, start:start + h * w * a].reshape(n, h, w, a * 4).permute(0, 3, 1, 2)
            for t in (targets.bbox_targets, targets.bbox_inside_weights, targets.bbox_outside_weights)
        )
        x = (w_in * (dl - tgt)).abs()
        huber = torch.where(x < 1 / 9, 4.5 * x * x, x - 1 / 18)
        torch.testing.assert_close(out.losses[f"loss_rpn_bbox_fpn{lvl}"], (w_out * huber).sum() / 2)
        start += h * w * a
    assert total == float((targets.labels >= 0).sum())
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert rpn.head.rpn_bbox_pred.weight.grad.abs().sum() > 0
    assert out.rois.shape[1] == 5 and 0 < out.rois.shape[0] <= int(30 * 1 + 0.5)
    assert out.scores.shape == out.rois.shape[:1]
    assert torch.all(out.scores[:-1] >= out.scores[1:])


def test_inference_and_rpn_only_training():
    rpn = build_rpn(_cfg(False), 16, [1 / 16])
    features = _features([1 / 16], size=128, channels=16)
    with torch.no_grad():
        out = rpn(features, IM_INFO)
    assert out.losses == {}
    for img in range(2):  # single-level RPN: post-NMS top-N is per image
        assert 0 < int((out.rois[:, 0] == img).sum()) <= 20
    assert float(out.rois[:, 3].max()) <= 63.0
    rpn_only = build_rpn(_cfg(False, MODEL__FASTER_RCNN=False, MODEL__RPN_ONLY=True), 16, [1 / 16])
    out = rpn_only(features, IM_INFO, ROIDB)
    assert out.rois is None and sorted(out.losses) == ["loss_rpn_bbox", "loss_rpn_cls"]


def test_rpn_bookkeeping_runs_on_one_cpu_thread_and_restores_the_count():
    from pydetectron.modeling.rpn_head import one_cpu_thread

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), one_cpu_thread(torch.device("cpu")):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_inference_collects_top_n_per_image_training_over_the_batch():
    from pydetectron.modeling.fpn_levels import collect_proposals

    # image 0 has the 3 best scores; with a batch-wide cut of 2, image 1 would get nothing
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 1, 1, 9, 9], [0, 2, 2, 9, 9], [1, 3, 3, 9, 9], [1, 4, 4, 9, 9]],
                        dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    batch_rois, _ = collect_proposals([rois], [scores], top_n=2)
    assert batch_rois[:, 0].tolist() == [0, 0]
    image_rois, image_scores = collect_proposals([rois[:2], rois[2:]], [scores[:2], scores[2:]], 2, per_image=True)
    assert image_rois[:, 0].tolist() == [0, 0, 1, 1] and image_scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.5])
