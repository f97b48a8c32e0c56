"""Fast R-CNN RoI sampling and box targets against hand-made cases and a float64 reference."""

import math

import pytest
import torch

from pydetectron.modeling.targets.fast_rcnn import (
    FastRCNNSampling,
    expand_bbox_targets,
    fast_rcnn_targets,
    label_proposals,
)


def ref_iou(a, b):
    """Inclusive-pixel IoU of two boxes, in float64."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def ref_encode(box, gt, weights):
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    gw, gh = gt[2] - gt[0] + 1, gt[3] - gt[1] + 1
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    gcx, gcy = gt[0] + 0.5 * gw, gt[1] + 0.5 * gh
    wx, wy, ww, wh = weights
    return [wx * (gcx - cx) / w, wy * (gcy - cy) / h, ww * math.log(gw / w), wh * math.log(gh / h)]


def entry(boxes, classes, crowd=None):
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "gt_classes": torch.tensor(classes, dtype=torch.int64),
        "is_crowd": torch.tensor(crowd if crowd is not None else [False] * n),
    }


def proposals_for(image, boxes):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([torch.full((b.shape[0], 1), float(image)), b], dim=1)


GT = [[10.0, 10.0, 49.0, 49.0], [100.0, 100.0, 139.0, 159.0]]
# Proposals: 3 foreground on gt 0 (IoU >= 0.5), 1 foreground on gt 1, 6 background (IoU < 0.5).
FG_PROPS = [[12, 12, 50, 50], [8, 10, 47, 49], [10, 14, 49, 53], [102, 98, 140, 160]]
BG_PROPS = [[0, 0, 20, 20], [200, 200, 240, 240], [30, 30, 70, 70], [100, 100, 119, 119],
            [60, 0, 90, 30], [0, 150, 40, 199]]


def test_label_proposals_puts_gt_first_and_labels_by_best_gt():
    props = torch.tensor(FG_PROPS + BG_PROPS, dtype=torch.float32)
    lab = label_proposals(props, entry(GT, [3, 5]), im_scale=1.0)
    assert torch.equal(lab.boxes[:2], torch.tensor(GT))
    assert lab.max_overlaps[:2].tolist() == [1.0, 1.0]
    assert lab.max_classes[:2].tolist() == [3, 5]
    for k, p in enumerate(FG_PROPS + BG_PROPS):
        ious = [ref_iou(p, g) for g in GT]
        best = max(range(2), key=lambda g: ious[g])
        assert lab.max_overlaps[2 + k].item() == pytest.approx(ious[best], rel=1e-5)
        assert lab.max_classes[2 + k].item() == ([3, 5][best] if ious[best] > 0 else 0)
        assert lab.gt_inds[2 + k].item() == (best if ious[best] > 0 else -1)


def test_sampling_counts_with_more_foreground_than_quota():
    params = FastRCNNSampling(num_classes=6, batch_size_per_im=8, fg_fraction=0.25)
    out = fast_rcnn_targets(
        proposals_for(0, FG_PROPS + BG_PROPS), torch.tensor([[300.0, 300.0, 1.0]]), [entry(GT, [3, 5])], params,
        generator=torch.Generator().manual_seed(0),
    )
    # 6 fg candidates (2 gt + 4 proposals) but quota round(0.25 * 8) = 2; 6 of the 6 bg fill the rest.
    assert out.rois.shape == (8, 5)
    assert (out.labels[:2] > 0).all() and (out.labels[2:] == 0).all()
    fg_set = {tuple(b) for b in (GT + [list(map(float, p)) for p in FG_PROPS])}
    assert all(tuple(r[1:].tolist()) in fg_set for r in out.rois[:2])
    assert {tuple(r[1:].tolist()) for r in out.rois[2:]} == {tuple(map(float, p)) for p in BG_PROPS}


def test_sampling_counts_and_gt_added_when_foreground_is_scarce():
    params = FastRCNNSampling(num_classes=6, batch_size_per_im=16, fg_fraction=0.5)
    out = fast_rcnn_targets(
        proposals_for(0, BG_PROPS), torch.tensor([[300.0, 300.0, 1.0]]), [entry(GT, [3, 5])], params,
        generator=torch.Generator().manual_seed(1),
    )
    # Only the two gt boxes are foreground; every background proposal is taken; no duplicates.
    assert out.rois.shape[0] == 2 + len(BG_PROPS)
    assert sorted(out.labels[:2].tolist()) == [3, 5]
    assert sorted(tuple(r) for r in out.rois[:2, 1:].tolist()) == sorted(tuple(g) for g in GT)
    assert (out.labels[2:] == 0).all()
    assert (out.bbox_inside_weights[2:] == 0).all()


def test_crowd_gt_is_never_sampled_but_labels_overlapping_proposals():
    boxes = GT + [[200.0, 200.0, 259.0, 259.0]]
    crowd_prop = [202, 202, 258, 260]  # IoU > 0.5 with the crowd box only
    params = FastRCNNSampling(num_classes=6, batch_size_per_im=64, fg_fraction=0.5)
    ent = entry(boxes, [3, 5, 2], crowd=[False, False, True])
    out = fast_rcnn_targets(
        proposals_for(0, [crowd_prop] + BG_PROPS), torch.tensor([[300.0, 300.0, 1.0]]), [ent], params,
        generator=torch.Generator().manual_seed(2),
    )
    rows = [tuple(r) for r in out.rois[:, 1:].tolist()]
    assert tuple(boxes[2]) not in rows
    crowd_row = rows.index(tuple(map(float, crowd_prop)))
    assert out.labels[crowd_row].item() == 2  # Detectron labels it with the crowd's class
    # Its max overlap (with the crowd) is >= BBOX_THRESH, so it gets a target, towards the non-crowd gt box
    # it overlaps most: here none overlaps, and Detectron's argmax then picks the first.
    best_non_crowd = max(GT, key=lambda g: ref_iou(crowd_prop, g))
    expected = ref_encode(list(map(float, crowd_prop)), best_non_crowd, (10.0, 10.0, 5.0, 5.0))
    assert out.bbox_targets[crowd_row, 8:12].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_crowd_filter_for_precomputed_proposals():
    ent = entry(GT + [[200.0, 200.0, 299.0, 299.0]], [3, 5, 2], crowd=[False, False, True])
    inside_crowd = [210.0, 210.0, 240.0, 240.0]  # fully covered by the crowd region, IoU with it < 0.5
    half_out = [250.0, 250.0, 349.0, 349.0]  # a quarter of it is covered
    props = torch.tensor([inside_crowd, half_out])
    kept = label_proposals(props, ent, 1.0)
    assert kept.max_overlaps[3:].tolist() == pytest.approx([ref_iou(inside_crowd, ent["boxes"][2].tolist()),
                                                            ref_iou(half_out, ent["boxes"][2].tolist())])
    filtered = label_proposals(props, ent, 1.0, crowd_filter_thresh=0.7)
    assert filtered.max_overlaps[3].item() == -1 and filtered.max_classes[3].item() == 0
    assert filtered.max_overlaps[4].item() == kept.max_overlaps[4].item()
    # Never sampled, not even as background.
    params = FastRCNNSampling(num_classes=6, batch_size_per_im=16, crowd_filter_thresh=0.7)
    out = fast_rcnn_targets(proposals_for(0, [inside_crowd]), torch.tensor([[400.0, 400.0, 1.0]]), [ent], params)
    assert inside_crowd not in out.rois[:, 1:].tolist()


@pytest.mark.parametrize("agnostic", [False, True])
def test_box_targets_match_float64_reference_at_original_scale(agnostic):
    scale = 1.6
    gt_orig = [[10.0, 20.0, 60.0, 90.0], [120.0, 40.0, 170.0, 80.0]]
    props_orig = [[12.0, 18.0, 63.0, 85.0], [118.0, 42.0, 168.0, 85.0], [14.0, 25.0, 55.0, 92.0]]
    gt_in = [[c * scale for c in b] for b in gt_orig]
    props_in = [[c * scale for c in b] for b in props_orig]
    params = FastRCNNSampling(num_classes=4, batch_size_per_im=32, cls_agnostic_bbox_reg=agnostic)
    # Two images: the second has no proposals and a single gt; batch column must say 1 there.
    out = fast_rcnn_targets(
        torch.cat([proposals_for(0, props_in), proposals_for(1, [])]),
        torch.tensor([[300.0, 400.0, scale], [200.0, 200.0, 1.0]]),
        [entry(gt_in, [1, 3]), entry([[5.0, 5.0, 30.0, 40.0]], [2])],
        params,
        generator=torch.Generator().manual_seed(3),
    )
    image0 = out.rois[:, 0] == 0
    assert int(image0.sum()) == 5 and int((out.rois[:, 0] == 1).sum()) == 1
    width = 4 * (2 if agnostic else 4)
    assert out.bbox_targets.shape == (6, width)
    for r in range(6):
        box_in = out.rois[r, 1:].double().tolist()
        if out.rois[r, 0] == 0:
            box = [c / scale for c in box_in]
            gts, classes = gt_orig, [1, 3]
        else:
            box, gts, classes = box_in, [[5.0, 5.0, 30.0, 40.0]], [2]
        ious = [ref_iou(box, g) for g in gts]
        best = max(range(len(gts)), key=lambda g: ious[g])
        assert ious[best] >= 0.5  # every roi here is foreground
        assert out.labels[r].item() == classes[best]
        col = 1 if agnostic else classes[best]
        expected = torch.zeros(width, dtype=torch.float64)
        expected[4 * col : 4 * col + 4] = torch.tensor(ref_encode(box, gts[best], (10.0, 10.0, 5.0, 5.0)))
        assert torch.allclose(out.bbox_targets[r].double(), expected, rtol=1e-4, atol=1e-5)
        inside = (torch.arange(width) // 4 == col).float()
        assert torch.equal(out.bbox_inside_weights[r], inside)
        assert torch.equal(out.bbox_outside_weights[r], inside)


def test_image_without_gt_gives_background_only():
    params = FastRCNNSampling(num_classes=3, batch_size_per_im=4)
    out = fast_rcnn_targets(
        proposals_for(0, BG_PROPS), torch.tensor([[300.0, 300.0, 1.0]]), [entry([], [])], params,
        generator=torch.Generator().manual_seed(4),
    )
    assert out.rois.shape == (4, 5)
    assert (out.labels == 0).all() and (out.bbox_targets == 0).all()
    assert (out.gt_inds == -1).all()


def test_expand_bbox_targets_layout():
    targets = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    expanded, inside = expand_bbox_targets(torch.tensor([2, 0, 1]), targets, 3)
    assert expanded.shape == (3, 12)
    assert torch.equal(expanded[0, 8:12], targets[0]) and expanded[0, :8].abs().sum() == 0
    assert expanded[1].abs().sum() == 0 and inside[1].sum() == 0
    assert torch.equal(expanded[2, 4:8], targets[2]) and inside[2].tolist() == [0] * 4 + [1] * 4 + [0] * 4


def test_bad_roidb_is_reported():
    params = FastRCNNSampling(num_classes=3, batch_size_per_im=4)
    with pytest.raises(ValueError, match="gt_classes"):
        fast_rcnn_targets(proposals_for(0, BG_PROPS), torch.tensor([[300.0, 300.0, 1.0]]),
                          [entry(GT, [0, 1])], params)
    with pytest.raises(KeyError, match="is_crowd"):
        fast_rcnn_targets(proposals_for(0, BG_PROPS), torch.tensor([[300.0, 300.0, 1.0]]),
                          [{"boxes": torch.zeros(0, 4), "gt_classes": torch.zeros(0)}], params)
    with pytest.raises(ValueError, match="roidb entries"):
        fast_rcnn_targets(proposals_for(0, BG_PROPS), torch.tensor([[300.0, 300.0, 1.0]] * 2),
                          [entry(GT, [1, 2])], params)


def test_an_image_left_with_no_roi_adds_no_rows():
    """Precomputed proposals inside a crowd region are never sampled (CROWD_FILTER_THRESH); an image whose only
    gt is that crowd then contributes nothing, and the batch's blobs keep their widths."""
    params = FastRCNNSampling(num_classes=4, batch_size_per_im=8, fg_fraction=0.25, crowd_filter_thresh=0.7)
    roidb = [entry([[0, 0, 50, 50]], [1], crowd=[True]), entry([[10, 10, 30, 30]], [2])]
    proposals = torch.tensor([[0, 2.0, 2, 40, 40], [0, 5, 5, 45, 45], [1, 12, 12, 30, 30]])
    targets = fast_rcnn_targets(proposals, torch.tensor([[60.0, 60, 1], [60, 60, 1]]), roidb, params)
    assert targets.rois[:, 0].tolist() == [1.0, 1.0]  # image 1's proposal and its gt box, both class 2
    assert targets.labels.tolist() == [2, 2]
    assert targets.bbox_targets.shape == targets.bbox_inside_weights.shape == (2, 16)
    empty_targets, empty_weights = expand_bbox_targets(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), 4)
    assert empty_targets.shape == empty_weights.shape == (0, 16)
