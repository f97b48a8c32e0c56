"""Box inference against hand-made cases and a plain-Python reference of Detectron's core/test.py."""

import math

import pytest
import torch

from pydetectron.modeling.postprocess import BoxInference, box_results_with_nms_and_limit, detect_boxes


def iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter)


def ref_nms(dets, thresh):
    order = sorted(range(len(dets)), key=lambda i: -dets[i][4])
    keep = []
    for i in order:
        if all(iou(dets[i], dets[k]) <= thresh for k in keep):
            keep.append(i)
    return [dets[i] for i in keep]


def ref_soft_nms(dets, sigma, thresh, score_thresh, method):
    dets = [list(d) for d in dets]
    out = []
    while dets:
        best = max(range(len(dets)), key=lambda i: dets[i][4])
        top = dets.pop(best)
        out.append(top)
        for d in dets:
            ov = iou(top, d)
            if method == "linear":
                d[4] *= (1 - ov) if ov > thresh else 1.0
            else:
                d[4] *= math.exp(-ov * ov / sigma)
        dets = [d for d in dets if d[4] >= score_thresh]
    return out


def ref_results(scores, boxes, params, soft=None):
    """Detectron's box_results_with_nms_and_limit on lists."""
    per_class = {}
    for j in range(1, len(scores[0])):
        dets = [boxes[i][4 * j : 4 * j + 4] + [scores[i][j]] for i in range(len(scores))
                if scores[i][j] > params.score_thresh]
        per_class[j] = ref_soft_nms(dets, *soft) if soft else ref_nms(dets, params.nms)
    all_scores = sorted((d[4] for ds in per_class.values() for d in ds), reverse=True)
    if len(all_scores) > params.detections_per_im:
        cut = all_scores[params.detections_per_im - 1]
        per_class = {j: [d for d in ds if d[4] >= cut] for j, ds in per_class.items()}
    return [(j, d) for j in sorted(per_class) for d in per_class[j]]


def random_case(num_rois, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_rois, 2, generator=g) * 80
    wh = torch.rand(num_rois, 2, generator=g) * 40 + 5
    base = torch.cat([xy, xy + wh], dim=1)
    boxes = torch.cat([base + torch.randn(num_rois, 4, generator=g) for _ in range(num_classes)], dim=1)
    scores = torch.softmax(3 * torch.randn(num_rois, num_classes, generator=g), dim=1)
    return scores, boxes


def check_against_reference(scores, boxes, params, soft=None):
    det_boxes, det_scores, det_classes = box_results_with_nms_and_limit(scores, boxes, params)
    ref = ref_results(scores.double().tolist(), boxes.double().tolist(), params, soft)
    assert det_scores.numel() == len(ref)
    for k, (j, d) in enumerate(ref):
        assert det_classes[k].item() == j
        assert det_boxes[k].tolist() == pytest.approx(d[:4], abs=1e-4)
        assert det_scores[k].item() == pytest.approx(d[4], rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_scores(seed):
    scores, boxes = random_case(60, 4, seed)
    check_against_reference(scores, boxes, BoxInference(num_classes=4, score_thresh=0.05, nms=0.5))


def test_top_k_limit_over_all_classes_keeps_ties():
    # 70 disjoint boxes, two classes, every score distinct: 140 candidates, keep 100 best overall.
    n = 70
    base = torch.stack([torch.tensor([10.0 * i, 0.0, 10.0 * i + 5, 5.0]) for i in range(n)])
    boxes = torch.cat([base, base, base], dim=1)
    scores = torch.zeros(n, 3)
    scores[:, 1] = torch.linspace(0.10, 0.80, n)
    scores[:, 2] = torch.linspace(0.105, 0.805, n)
    params = BoxInference(num_classes=3, detections_per_im=100)
    _, det_scores, det_classes = box_results_with_nms_and_limit(scores, boxes, params)
    assert det_scores.numel() == 100
    cut = torch.sort(torch.cat([scores[:, 1], scores[:, 2]]), descending=True).values[99]
    assert det_scores.min().item() == cut.item()
    assert (det_classes[:-1] <= det_classes[1:]).all()  # grouped by class, increasing
    # A tie at the cut keeps both boxes, as Detectron's `>= image_thresh`: limit 3 gives 4 detections.
    scores = torch.tensor([[0.0, 0.9, 0.8], [0.0, 0.7, 0.7], [0.0, 0.6, 0.1]])
    _, tied, tied_classes = box_results_with_nms_and_limit(
        scores, base[:3].repeat(1, 3), BoxInference(num_classes=3, detections_per_im=3)
    )
    assert tied.tolist() == pytest.approx([0.9, 0.7, 0.8, 0.7]) and tied_classes.tolist() == [1, 1, 2, 2]


def test_threshold_is_strict_and_nms_is_per_class():
    boxes_one = torch.tensor([[0.0, 0.0, 20.0, 20.0], [1.0, 1.0, 21.0, 21.0], [50.0, 50.0, 60.0, 60.0]])
    boxes = boxes_one.repeat(1, 3)
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.05, 0.7, 0.25], [0.9, 0.05, 0.05]])
    det_boxes, det_scores, det_classes = box_results_with_nms_and_limit(
        scores, boxes, BoxInference(num_classes=3, score_thresh=0.05, nms=0.5)
    )
    # class 1: rois 0 and 1 overlap (IoU > 0.5): only roi 1 (0.7) survives; roi 2 at exactly 0.05 is dropped.
    # class 2: the same suppression, roi 0 (0.3) survives.
    assert det_classes.tolist() == [1, 2]
    assert det_scores.tolist() == pytest.approx([0.7, 0.3])
    assert torch.equal(det_boxes, boxes_one[[1, 0]])


def test_detect_boxes_maps_back_by_im_scale_and_clips():
    # One image, 60x80 original, scaled by 2; zero deltas decode to the RoI itself.
    im_info = torch.tensor([[120.0, 160.0, 2.0]])
    rois = torch.tensor([[0, 20.0, 40.0, 59.0, 99.0], [0, 100.0, 10.0, 190.0, 130.0]])
    cls_score = torch.log(torch.tensor([[0.12, 0.85, 0.03], [0.25, 0.04, 0.71]]))
    out = detect_boxes(cls_score, torch.zeros(2, 12), rois, im_info, BoxInference(num_classes=3))
    assert len(out) == 1
    det = out[0]
    assert det["classes"].tolist() == [1, 2]
    assert det["scores"].tolist() == pytest.approx([0.85, 0.71], rel=1e-5)
    # roi / 2 = [10, 20, 29.5, 49.5]; zero deltas keep it (inclusive widths); the second is clipped to 79/59.
    assert det["boxes"][0].tolist() == pytest.approx([10.0, 20.0, 29.5, 49.5], abs=1e-4)
    assert det["boxes"][1].tolist() == pytest.approx([50.0, 5.0, 79.0, 59.0], abs=1e-4)


def test_detect_boxes_decodes_deltas_and_splits_images():
    torch.manual_seed(3)
    im_info = torch.tensor([[100.0, 100.0, 1.0], [50.0, 60.0, 0.5]])
    rois = torch.tensor([[0, 10.0, 10.0, 40.0, 50.0], [1, 5.0, 5.0, 30.0, 20.0], [1, 20.0, 8.0, 40.0, 30.0]])
    deltas = 0.5 * torch.randn(3, 12)
    cls_score = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 4.0], [0.0, 2.0, 0.0]])
    out = detect_boxes(cls_score, deltas, rois, im_info, BoxInference(num_classes=3, score_thresh=0.5))
    assert [d["classes"].tolist() for d in out] == [[1], [1, 2]]

    def ref_decode(roi, d, size, scale):
        x1, y1, x2, y2 = (c / scale for c in roi)
        w, h = x2 - x1 + 1, y2 - y1 + 1
        cx, cy = x1 + 0.5 * w, y1 + 0.5 * h
        pcx, pcy = d[0] / 10 * w + cx, d[1] / 10 * h + cy
        pw, ph = math.exp(min(d[2] / 5, math.log(1000 / 16))) * w, math.exp(min(d[3] / 5, math.log(1000 / 16))) * h
        box = [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw - 1, pcy + 0.5 * ph - 1]
        return [min(max(box[0], 0), size[1] - 1), min(max(box[1], 0), size[0] - 1),
                min(max(box[2], 0), size[1] - 1), min(max(box[3], 0), size[0] - 1)]

    expected = ref_decode(rois[2, 1:].tolist(), deltas[2, 4:8].tolist(), (100, 120), 0.5)
    assert out[1]["boxes"][0].tolist() == pytest.approx(expected, abs=1e-3)
    expected = ref_decode(rois[1, 1:].tolist(), deltas[1, 8:12].tolist(), (100, 120), 0.5)
    assert out[1]["boxes"][1].tolist() == pytest.approx(expected, abs=1e-3)


def test_class_agnostic_regression_uses_fg_column_for_every_class():
    im_info = torch.tensor([[100.0, 100.0, 1.0]])
    rois = torch.tensor([[0, 10.0, 10.0, 40.0, 50.0]])
    deltas = torch.tensor([[9.0, 9.0, 9.0, 9.0, 1.0, -1.0, 0.5, 0.2]])  # bg column must be ignored
    cls_score = torch.log(torch.tensor([[0.1, 0.45, 0.45]]))
    agnostic = BoxInference(num_classes=3, cls_agnostic_bbox_reg=True)
    out = detect_boxes(cls_score, deltas, rois, im_info, agnostic)[0]
    specific = BoxInference(num_classes=3)
    ref = detect_boxes(cls_score, torch.cat([deltas, deltas[:, 4:]], dim=1), rois, im_info, specific)[0]
    assert out["classes"].tolist() == [1, 2]
    assert torch.allclose(out["boxes"], ref["boxes"]) and torch.allclose(out["boxes"][0], out["boxes"][1])


def test_without_box_regression_the_rois_are_the_boxes():
    im_info = torch.tensor([[100.0, 100.0, 2.0]])
    rois = torch.tensor([[0, 10.0, 10.0, 40.0, 50.0], [0, 60.0, 10.0, 90.0, 30.0]])
    cls_score = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    out = detect_boxes(cls_score, torch.full((2, 12), 5.0), rois, im_info,
                       BoxInference(num_classes=3, score_thresh=0.5, bbox_reg=False))[0]
    assert torch.equal(out["boxes"], rois[:, 1:] / 2) and out["classes"].tolist() == [1, 2]


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_matches_reference(method):
    scores, boxes = random_case(40, 3, 7)
    params = BoxInference(num_classes=3, nms=0.3, soft_nms=True, soft_nms_method=method, soft_nms_sigma=0.5)
    check_against_reference(scores, boxes, params, soft=(0.5, 0.3, 0.0001, method))


def test_image_without_rois_gives_no_detections():
    im_info = torch.tensor([[100.0, 100.0, 1.0], [80.0, 60.0, 1.0]])
    rois = torch.tensor([[1, 10.0, 10.0, 40.0, 50.0]])
    out = detect_boxes(torch.zeros(1, 3), torch.zeros(1, 12), rois, im_info, BoxInference(num_classes=3))
    assert out[0]["boxes"].shape == (0, 4) and out[0]["scores"].shape == (0,) and out[0]["classes"].shape == (0,)
    assert out[1]["classes"].tolist() == [1, 2]


def test_bad_settings_are_reported():
    with pytest.raises(ValueError, match="SOFT_NMS.METHOD"):
        BoxInference(num_classes=3, soft_nms=True, soft_nms_method="cubic")
    with pytest.raises(ValueError, match="tile"):
        box_results_with_nms_and_limit(torch.rand(4, 3), torch.rand(4, 8), BoxInference(num_classes=3))
