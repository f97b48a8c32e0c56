"""detectron2-mode ROI heads: each rule against hand values or a float64 reference, and d2-mode detectors that
build, train a step and infer (tiny inputs)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_detector import load_cfg, synthetic_batch

from pydetectron.config import get_cfg
from pydetectron.modeling.detector import build_detector, total_loss
from pydetectron.modeling.detectron2.box_head import FastRCNNConvFCHead
from pydetectron.modeling.detectron2.box_transform import Box2BoxTransform
from pydetectron.modeling.detectron2.fast_rcnn import (
    FastRCNNLossSettings,
    FastRCNNOutputLayers,
    FastRCNNTestSettings,
    fast_rcnn_inference_single_image,
    fast_rcnn_losses,
)
from pydetectron.modeling.detectron2.keypoint_head import (
    heatmaps_to_keypoints,
    keypoint_rcnn_loss,
    keypoints_to_heatmap,
)
from pydetectron.modeling.detectron2.mask_head import mask_rcnn_loss, mask_targets, rasterize_polygons_within_box
from pydetectron.modeling.detectron2.norms import d2_norm_spec
from pydetectron.modeling.detectron2.pooler import assign_boxes_to_levels
from pydetectron.modeling.detectron2.postprocess import detector_postprocess, paste_masks_in_image
from pydetectron.modeling.detectron2.roi_heads import D2Sampling, label_and_sample_proposals
from pydetectron.modeling.fpn_levels import map_rois_to_fpn_levels
from pydetectron.modeling.roi_features import RoIFeatureExtractor

D2 = ["MODEL.CONVENTIONS", "detectron2", "MODEL.ROI_HEADS_NAME", "StandardROIHeads",
      "FAST_RCNN.ROI_BOX_HEAD", "FastRCNNConvFCHead", "FAST_RCNN.NUM_STACKED_CONVS", "0",
      "FAST_RCNN.ROI_XFORM_METHOD", "RoIAlign", "FAST_RCNN.ROI_XFORM_ALIGNED", "True",
      "FAST_RCNN.SMOOTH_L1_BETA", "0.0"]
D2_MASK = ["MRCNN.ROI_MASK_HEAD", "MaskRCNNConvUpsampleHead", "MRCNN.ROI_XFORM_RESOLUTION", "14",
           "MRCNN.RESOLUTION", "28", "MRCNN.ROI_XFORM_ALIGNED", "True", "MRCNN.NUM_CONV", "2"]
D2_KPS = ["KRCNN.ROI_KEYPOINTS_HEAD", "KRCNNConvDeconvUpsampleHead", "KRCNN.ROI_XFORM_RESOLUTION", "14",
          "KRCNN.HEATMAP_SIZE", "56", "KRCNN.ROI_XFORM_ALIGNED", "True"]
D2_C4 = ["MODEL.CONVENTIONS", "detectron2", "FAST_RCNN.ROI_BOX_HEAD", "", "MRCNN.ROI_MASK_HEAD",
         "MaskRCNNConvUpsampleHead", "MRCNN.NUM_CONV", "0", "MRCNN.RESOLUTION", "14", "FAST_RCNN.ROI_XFORM_ALIGNED",
         "True"]


# --------------------------------------------------------------------------------------------------- pooler


def test_level_assignment_is_d2s_rule_without_plus_one():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [10, 10, 458, 458], [0, 0, 223, 223],
                          [0, 0, 2, 2], [0, 0, 2000, 2000]], dtype=torch.float32)
    assert assign_boxes_to_levels(boxes, 2, 5, 224, 4).tolist() == [4, 3, 5, 3, 2, 5]
    # Detectron's rule counts inclusive pixels: the 223-wide box is 224 pixels there, level 4.
    assert map_rois_to_fpn_levels(boxes, 2, 5, 224, 4)[3].item() == 4


def test_pooler_uses_the_d2_rule_in_d2_mode():
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    from pydetectron.modeling.roi_features import build_roi_feature_extractor

    assert build_roi_feature_extractor(cfg, cfg.FAST_RCNN, [0.25, 0.125]).level_assigner is assign_boxes_to_levels
    cfg.MODEL.CONVENTIONS = "detectron"
    assert build_roi_feature_extractor(cfg, cfg.FAST_RCNN, [0.25, 0.125]).level_assigner is map_rois_to_fpn_levels


# --------------------------------------------------------------------------------------------------- sampling


def _sampling(cfg_changes=()):
    cfg = get_cfg()
    for key, value in cfg_changes:
        node, leaf = key.rsplit(".", 1)
        setattr(cfg[node], leaf, value)
    return D2Sampling.from_cfg(cfg)


def test_matcher_thresholds_from_detectron_keys():
    s = _sampling()
    assert (s.thresholds, s.labels, s.append_gt) == ((0.5,), (0, 1), True)
    s = _sampling([("TRAIN.BG_THRESH_HI", 0.4), ("TRAIN.BG_THRESH_LO", 0.1)])
    assert (s.thresholds, s.labels) == ((0.1, 0.4, 0.5), (-1, 0, -1, 1))
    with pytest.raises(ValueError, match="BG_THRESH_HI"):
        _sampling([("TRAIN.BG_THRESH_HI", 0.6)])


def _entry(boxes, classes, crowd):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "gt_classes": torch.tensor(classes),
            "is_crowd": torch.tensor(crowd)}


def test_label_and_sample_counts_labels_and_matches():
    # gt 0 is crowd (dropped, as d2's data drops it); gt 1 = [0, 0, 10, 10] class 2 -> d2 class 1.
    roidb = [_entry([[50, 50, 60, 60], [0, 0, 10, 10]], [3, 2], [True, False]), _entry([], [], [])]
    props = torch.tensor([[0, 0, 0, 10, 10], [0, 0, 0, 10, 4], [0, 0, 0, 5, 10], [0, 50, 50, 60, 60],
                          [1, 0, 0, 8, 8], [1, 2, 2, 9, 9]], dtype=torch.float32)
    # candidates of image 0: IoU 1, 0.4 (bg), 0.5 (fg: >= threshold), 0 (the crowd box: bg), + the gt (fg).
    s = _sampling([("TRAIN.BATCH_SIZE_PER_IM", 4), ("TRAIN.FG_FRACTION", 0.5)])
    out = label_and_sample_proposals(props, roidb, 5, s, torch.Generator().manual_seed(0))
    im0 = out.rois[:, 0] == 0
    labels0 = out.gt_classes[im0]
    assert labels0.tolist()[:2] == [1, 1] and labels0.tolist()[2:] == [5, 5]  # 2 fg (4 * 0.5), then 2 bg
    assert torch.equal(out.gt_boxes[im0][:2], torch.tensor([[0.0, 0, 10, 10]] * 2))
    assert out.gt_index[im0][:2].tolist() == [1, 1]
    assert {tuple(b) for b in out.rois[im0][2:, 1:].tolist()} <= {(0, 0, 10, 4), (50, 50, 60, 60)}
    # the image without gt: every candidate is background, up to the batch size
    assert out.gt_classes[~im0].tolist() == [5, 5]
    no_append = _sampling([("TRAIN.BATCH_SIZE_PER_IM", 64), ("TRAIN.PROPOSAL_APPEND_GT", False)])
    out = label_and_sample_proposals(props, roidb, 5, no_append)
    assert (out.gt_classes[out.rois[:, 0] == 0] == 1).sum().item() == 2  # the appended gt is not there


# --------------------------------------------------------------------------------------------------- fast r-cnn


def _encode64(src, dst, w=(10.0, 10.0, 5.0, 5.0)):
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    dw, dh = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
    dx, dy = dst[:, 0] + 0.5 * dw, dst[:, 1] + 0.5 * dh
    return torch.stack([w[0] * (dx - sx) / sw, w[1] * (dy - sy) / sh, w[2] * torch.log(dw / sw),
                        w[3] * torch.log(dh / sh)], dim=1)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_fast_rcnn_losses_match_a_float64_reference(beta):
    g = torch.Generator().manual_seed(3)
    r, k = 8, 3
    props = torch.rand(r, 2, generator=g) * 50
    props = torch.cat([props, props + 10 + torch.rand(r, 2, generator=g) * 20], dim=1)
    gt = props + torch.randn(r, 4, generator=g) * 2
    classes = torch.tensor([0, 2, 3, 1, 3, 3, 0, 2])  # 3 = background
    cls_score, deltas = torch.randn(r, k + 1, generator=g), torch.randn(r, 4 * k, generator=g) * 0.3
    settings = FastRCNNLossSettings("smooth_l1", beta, 2.0)
    got = fast_rcnn_losses(cls_score, deltas, props, gt, classes, Box2BoxTransform((10, 10, 5, 5)), settings)
    ref_cls = -F.log_softmax(cls_score.double(), dim=1)[torch.arange(r), classes].mean()
    fg = classes < k
    target = _encode64(props[fg].double(), gt[fg].double())
    pred = deltas.double().view(r, k, 4)[torch.arange(r)[fg], classes[fg]]
    diff = (pred - target).abs()
    per = diff if beta == 0 else torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
    assert got["loss_cls"].item() == pytest.approx(ref_cls.item(), rel=1e-5)
    assert got["loss_box_reg"].item() == pytest.approx(2.0 * per.sum().item() / r, rel=1e-5)


def test_giou_box_loss_hand_value_and_agnostic_deltas():
    props = torch.tensor([[0.0, 0, 10, 10], [0, 0, 4, 4]])
    gt = torch.tensor([[5.0, 0, 15, 10], [0, 0, 4, 4]])
    classes = torch.tensor([0, 1])  # K = 1: the second RoI is background
    got = fast_rcnn_losses(torch.zeros(2, 2), torch.zeros(2, 4), props, gt, classes, Box2BoxTransform((10, 10, 5, 5)),
                           FastRCNNLossSettings("giou", 0.0, 1.0))
    # zero deltas: the prediction is the proposal; IoU 50 / 150, enclosing box = union -> GIoU 1/3, loss 2/3, / 2 RoIs
    assert got["loss_box_reg"].item() == pytest.approx((2 / 3) / 2, rel=1e-5)
    assert got["loss_cls"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_box_predictor_layout_and_init():
    torch.manual_seed(0)
    out = FastRCNNOutputLayers(1024, 80)
    assert out.class_layout == "detectron2"
    assert out.cls_score.out_features == 81 and out.bbox_pred.out_features == 320
    assert FastRCNNOutputLayers(16, 80, cls_agnostic_bbox_reg=True).bbox_pred.out_features == 4
    assert out.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert out.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert not out.cls_score.bias.any() and not out.bbox_pred.bias.any()
    assert out.detectron_weight_mapping() == {"cls_score.weight": "cls_score_w", "cls_score.bias": "cls_score_b",
                                              "bbox_pred.weight": "bbox_pred_w", "bbox_pred.bias": "bbox_pred_b"}


def test_fast_rcnn_inference_hand_case():
    # 3 RoIs, K = 2 (column 2 = background); class-specific boxes (R, 2 * 4) in a 20 x 30 (h x w) image.
    boxes = torch.tensor([
        [0, 0, 10, 10, 0, 0, 10, 10],
        [1, 1, 11, 11, 1, 1, 11, 11],  # IoU 81 / 119 with RoI 0's boxes: NMS within each class
        [25, 5, 40, 15, 25, 5, 40, 15],  # clipped to x2 = 30
    ], dtype=torch.float32)
    scores = torch.tensor([[0.6, 0.1, 0.3], [0.5, 0.3, 0.2], [0.04, 0.9, 0.06]])
    det, rows = fast_rcnn_inference_single_image(boxes, scores, (20, 30), FastRCNNTestSettings(0.05, 0.5, 100))
    # class 0: RoI 0 (0.6) suppresses RoI 1 (0.5); class 1: RoI 1 (0.3) suppresses RoI 0 (0.1); RoI 2 class 1 (0.9)
    assert det["scores"].tolist() == pytest.approx([0.9, 0.6, 0.3])
    assert det["classes"].tolist() == [1, 0, 1] and rows.tolist() == [2, 0, 1]
    assert det["boxes"][0].tolist() == [25, 5, 30, 15]
    det, _ = fast_rcnn_inference_single_image(boxes, scores, (20, 30), FastRCNNTestSettings(0.2, 0.5, 2))
    assert det["scores"].tolist() == pytest.approx([0.9, 0.6])
    # a non-finite row is dropped, background never comes out
    boxes[0, 0] = float("nan")
    det, rows = fast_rcnn_inference_single_image(boxes, scores, (20, 30), FastRCNNTestSettings(0.0, 0.5, 100))
    assert 0 not in rows.tolist() and (det["classes"] < 2).all()


# --------------------------------------------------------------------------------------------------- masks


def _paste_reference(prob, box, h, w, thresh):
    """float64: pixel centre -> mask coordinates (grid_sample, align_corners False), bilinear, zeros outside."""
    m = prob.shape[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.zeros((h, w))
    p = prob.double().numpy()

    def at(r, c):
        return p[r, c] if 0 <= r < m and 0 <= c < m else 0.0

    for y in range(h):
        for x in range(w):
            u = ((x + 0.5 - x0) / (x1 - x0)) * m - 0.5
            v = ((y + 0.5 - y0) / (y1 - y0)) * m - 0.5
            c0, r0 = math.floor(u), math.floor(v)
            fu, fv = u - c0, v - r0
            out[y, x] = ((1 - fv) * ((1 - fu) * at(r0, c0) + fu * at(r0, c0 + 1))
                         + fv * ((1 - fu) * at(r0 + 1, c0) + fu * at(r0 + 1, c0 + 1)))
    return out


def test_paste_masks_match_a_float64_reference():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 6, 6, generator=g)
    boxes = torch.tensor([[2.3, 1.7, 14.9, 9.2], [-3.0, 4.5, 8.0, 20.0], [10.0, 10.0, 10.5, 12.0]])
    got = paste_masks_in_image(probs, boxes, 16, 18, 0.5)
    assert got.dtype == torch.uint8 and got.shape == (3, 16, 18)
    for i in range(3):
        ref = _paste_reference(probs[i], boxes[i], 16, 18, 0.5)
        decided = np.abs(ref - 0.5) > 1e-5
        assert np.array_equal(got[i].numpy()[decided], (ref >= 0.5)[decided])
        assert got[i].sum() > 0 or i == 2


def test_polygon_and_bitmap_mask_targets():
    box = np.array([10, 20, 30, 40], dtype=np.float32)
    full = rasterize_polygons_within_box([np.array([10, 20, 30, 20, 30, 40, 10, 40.0])], box, 8)
    assert full.all()
    left = rasterize_polygons_within_box([np.array([10, 20, 20, 20, 20, 40, 10, 40.0])], box, 8)
    assert left[:, :4].all() and not left[:, 4:].any()
    bitmap = np.zeros((50, 50), dtype=np.uint8)
    bitmap[20:40, 10:20] = 1  # the left half of the box
    targets = mask_targets([bitmap, [np.array([10, 20, 20, 20, 20, 40, 10, 40.0])]],
                           torch.tensor([[10.0, 20, 30, 40]] * 2), 8)
    assert torch.equal(targets[0], targets[1]) and torch.equal(targets[1], left)


def test_mask_loss_picks_the_gt_class():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 2] = 100.0  # RoI 0's gt class 2 predicted "on" everywhere, targets all on -> ~0
    targets = torch.ones(2, 4, 4, dtype=torch.bool)
    loss = mask_rcnn_loss(logits, torch.tensor([2, 0]), targets)
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=1e-5)
    assert mask_rcnn_loss(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long), targets[:0]).item() == 0


# --------------------------------------------------------------------------------------------------- keypoints


def test_keypoints_to_heatmap_hand_values():
    kps = torch.tensor([[[3.0, 7.0, 2], [10.0, 10.0, 2], [-1.0, 3.0, 2], [3.0, 7.0, 0]]])
    heatmaps, valid = keypoints_to_heatmap(kps, torch.tensor([[0.0, 0, 10, 10]]), 5)
    assert heatmaps.tolist() == [[3 * 5 + 1, 4 * 5 + 4, 0, 0]] and valid.tolist() == [[1, 1, 0, 0]]


def test_keypoint_loss_normalisation():
    kps = torch.tensor([[[3.0, 7.0, 2], [1.0, 1.0, 2], [-1.0, 3.0, 2]]])
    logits = torch.zeros(1, 3, 5, 5)
    rois = torch.tensor([[0.0, 0, 10, 10]])
    assert keypoint_rcnn_loss(logits, kps, rois, None).item() == pytest.approx(math.log(25), rel=1e-6)
    assert keypoint_rcnn_loss(logits, kps, rois, 8.0).item() == pytest.approx(2 * math.log(25) / 8, rel=1e-6)


def test_heatmap_decoding_hand_heatmap():
    s = 6
    maps = torch.zeros(1, 1, s, s)
    maps[0, 0, 2, 4] = 5.0
    # an integer box of the heatmap's size: the bicubic resize is the identity
    kp = heatmaps_to_keypoints(maps, torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s]]))[0, 0]
    assert kp[:3].tolist() == pytest.approx([10 + 4.5, 20 + 2.5, 5.0])
    assert kp[3].item() == pytest.approx(1.0 / (math.exp(-5.0) * (s * s - 1) + 1.0), rel=1e-5)
    # a box 1.5x wider: the argmax column moves with the resize, corrected by width / ceil(width)
    kp = heatmaps_to_keypoints(maps, torch.tensor([[0.0, 0.0, 8.5, 6.0]]))[0, 0]
    resized = F.interpolate(maps, size=(6, 9), mode="bicubic", align_corners=False)[0, 0]
    col = int(resized.max(0).values.argmax())
    assert kp[0].item() == pytest.approx((col + 0.5) * 8.5 / 9)


# --------------------------------------------------------------------------------------------------- postprocess


def test_detector_postprocess_scales_clips_and_drops_empty():
    det = {"boxes": torch.tensor([[10.0, 10, 50, 30], [-5, 0, 200, 90], [110, 5, 120, 15]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "classes": torch.tensor([0, 1, 2]),
           "keypoints": torch.tensor([[[20.0, 20, 1]], [[0, 0, 1]], [[75, 10, 1]]])}
    # input 50 x 100 (h x w) -> original 100 x 150: scale_x 1.5, scale_y 2; the last box is past the right edge
    out = detector_postprocess(det, (50.0, 100.0), (100, 150))
    assert out["boxes"].tolist() == [[15, 20, 75, 60], [0, 0, 150, 100]]
    assert out["classes"].tolist() == [0, 1]
    assert out["keypoints"][0, 0].tolist() == [30, 40, 1]


# --------------------------------------------------------------------------------------------------- heads


def test_conv_fc_head_norms_names_and_init():
    pooler = RoIFeatureExtractor("RoIAlign", 7, 0, [0.25], aligned=True)
    head = FastRCNNConvFCHead(pooler, 64, 2, 64, 1, 128, d2_norm_spec("GN", "FAST_RCNN.NORM"))
    assert isinstance(head.convs[0].norm, torch.nn.GroupNorm) and head.convs[0].norm.num_groups == 32
    assert head.convs[0].conv.bias is None
    m = head.detectron_weight_mapping()
    assert m["convs.1.conv.weight"] == "head_conv2_w" and m["convs.0.norm.weight"] == "head_conv1_gn_s"
    assert m["fcs.0.weight"] == "fc6_w" and set(m) == set(head.state_dict())
    bound = math.sqrt(3.0 / (64 * 49))
    assert head.fcs[0].weight.abs().max().item() <= bound
    bn = FastRCNNConvFCHead(pooler, 8, 1, 8, 0, 0, d2_norm_spec("BN", "FAST_RCNN.NORM"))
    assert bn.detectron_weight_mapping()["convs.0.norm.running_var"] == "head_conv1_bn_riv"
    assert bn.dim_out == 8 * 49
    with pytest.raises(ValueError, match="FAST_RCNN.NORM"):
        d2_norm_spec("LN", "FAST_RCNN.NORM")


# --------------------------------------------------------------------------------------------------- detectors


def _train_and_infer(cfg, num_keypoints=0):
    torch.manual_seed(0)
    model = build_detector(cfg)
    batch = synthetic_batch(num_keypoints=num_keypoints)
    model.train()
    out = model(*batch)
    total_loss(out).backward()
    model.eval()
    dets = model(batch[0], batch[1], [{"height": e["height"], "width": e["width"]} for e in batch[2]])
    return model, out, dets, batch


@pytest.mark.parametrize("name,path,extra,kps", [
    ("mask", "baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", D2 + D2_MASK, 0),
    ("keypoint", "baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml", D2 + D2_KPS, 3),
])
def test_d2_fpn_detectors_train_and_infer(name, path, extra, kps):
    model, out, dets, batch = _train_and_infer(load_cfg(path, extra), kps)
    head = "loss_mask" if name == "mask" else "loss_keypoint"
    assert {"loss_cls", "loss_box_reg", head} <= set(out) and "loss_bbox" not in out
    assert all(torch.isfinite(v) for v in out.values())
    assert model.box_outputs.cls_score.out_features == 4  # 3 classes + background last
    for det, entry in zip(dets, batch[2]):
        assert det["boxes"].shape[0] > 0
        assert ((det["classes"] >= 1) & (det["classes"] <= 3)).all()
        assert (det["boxes"][:, 2] <= entry["width"]).all() and (det["boxes"][:, 3] <= entry["height"]).all()
        if name == "mask":
            assert det["masks"].shape[1:] == (entry["height"], entry["width"])
        else:
            assert det["keypoints"].shape[1:] == (3, 3)
    assert set(model.detectron_weight_mapping()) == set(model.state_dict())


def test_d2_c4_extra_norm_trains_and_infers_on_given_proposals():
    cfg = load_cfg("baselines/e2e_mask_rcnn_R-50-C4_1x.yaml", D2_C4 + ["MODEL.ROI_HEADS_NAME", "Res5ROIHeadsExtraNorm"])
    model, out, _, batch = _train_and_infer(cfg)
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(out) and all(torch.isfinite(v) for v in out.values())
    mapping = model.detectron_weight_mapping()
    assert mapping["box_head.res5.0.branch2a.conv.weight"] == "res5_0_branch2a_w"
    assert mapping["box_head.extra_norm.weight"] == "res5_extra_bn_s"
    assert model.mask_head.deconv.in_channels == 2048 and not len(model.mask_head.convs)
    data, im_info, roidb = synthetic_batch(proposals=True)
    with torch.no_grad():
        feats = [model.body(data)[i] for i in model.roi_indices]
        rois = torch.cat([torch.cat([torch.full((40, 1), float(i)), e["proposals"]], 1) for i, e in enumerate(roidb)])
        dets = model.roi_heads.forward_inference(feats, rois, im_info, [(96, 128), (64, 96)], False)
    assert dets[0]["boxes"].shape[0] > 0 and dets[0]["masks"].shape == (dets[0]["boxes"].shape[0], 96, 128)


def test_d2_heads_refuse_what_they_cannot_build():
    with pytest.raises(ValueError, match="MRCNN.RESOLUTION"):
        build_detector(load_cfg("baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", D2 + D2_MASK + ["MRCNN.RESOLUTION", "14"]))
    with pytest.raises(ValueError, match="class layout"):
        build_detector(load_cfg("baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", D2))
    with pytest.raises(ValueError, match="detectron2's class layout"):
        build_detector(load_cfg("baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", D2_MASK))
    with pytest.raises(ValueError, match="KRCNN.HEATMAP_SIZE"):
        build_detector(load_cfg("baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml",
                                D2 + D2_KPS + ["KRCNN.HEATMAP_SIZE", "28"]))


# --------------------------------------------------------------------------------------------------- config keys


def _checked(**keys):
    from pydetectron.config import assert_and_infer_cfg

    cfg = get_cfg()
    for key, value in keys.items():
        node, leaf = key.split("__")
        setattr(cfg[node], leaf, value)
    return assert_and_infer_cfg(cfg)


@pytest.mark.parametrize("keys,match", [
    ({"FAST_RCNN__BBOX_REG_LOSS_TYPE": "giou"}, "detectron2 mode only"),
    ({"FAST_RCNN__SMOOTH_L1_BETA": 0.0}, "must be > 0"),
    ({"TRAIN__PROPOSAL_APPEND_GT": False}, "detectron2 mode only"),
    ({"FAST_RCNN__NUM_FC": 1, "FAST_RCNN__ROI_BOX_HEAD": "fast_rcnn_heads.add_roi_2mlp_head"}, "FastRCNNConvFCHead"),
    ({"MRCNN__NORM": "GN"}, "MaskRCNNConvUpsampleHead"),
    ({"MODEL__ROI_HEADS_NAME": "StandardROIHeads"}, "CONVENTIONS"),
    ({"FAST_RCNN__NORM": "LN"}, "FAST_RCNN.NORM"),
])
def test_detectron_mode_refuses_d2_only_values(keys, match):
    from pydetectron.config.merge import ConfigError

    with pytest.raises(ConfigError, match=match):
        _checked(**keys)


def test_d2_cascades_refuse_detectrons_inference_options():
    from pydetectron.config.merge import ConfigError

    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.TEST.BBOX_AUG.ENABLED = True
    from pydetectron.config import assert_and_infer_cfg

    with pytest.raises(ConfigError, match="TEST.BBOX_AUG.ENABLED"):
        assert_and_infer_cfg(cfg)
    for node, key in (("SOFT_NMS", "ENABLED"), ("BBOX_VOTE", "ENABLED")):
        cfg = get_cfg()
        cfg.MODEL.CONVENTIONS = "detectron2"
        setattr(cfg.TEST[node], key, True)
        with pytest.raises(ConfigError, match=f"TEST.{node}.ENABLED"):
            assert_and_infer_cfg(cfg)


def test_d2_mode_accepts_them_and_defaults_to_a_d2_cascade():
    cfg = _checked(MODEL__CONVENTIONS="detectron2", FAST_RCNN__BBOX_REG_LOSS_TYPE="giou", FAST_RCNN__SMOOTH_L1_BETA=0.0,
                   TRAIN__PROPOSAL_APPEND_GT=False)
    assert cfg.MODEL.ROI_HEADS_NAME == "Res5ROIHeads"
    assert _checked(MODEL__CONVENTIONS="detectron2", FPN__FPN_ON=True).MODEL.ROI_HEADS_NAME == "StandardROIHeads"
    assert _checked(FAST_RCNN__NUM_FC=1, FAST_RCNN__ROI_BOX_HEAD="FastRCNNConvFCHead").FAST_RCNN.NUM_FC == 1


def test_detectron_cascade_reads_beta_and_box_loss_weight():
    from pydetectron.modeling.box_head import fast_rcnn_losses as detectron_losses

    pred, target = torch.tensor([[0.5, 2.0]]), torch.zeros(1, 2)
    ones = torch.ones(1, 2)
    loss = detectron_losses(torch.zeros(1, 2), pred, torch.tensor([1]), target, ones, ones, beta=1.0)["loss_bbox"]
    assert loss.item() == pytest.approx(0.5 * 0.25 + 1.5)
    loss = detectron_losses(torch.zeros(1, 2), pred, torch.tensor([1]), target, ones, ones, beta=0.25)["loss_bbox"]
    assert loss.item() == pytest.approx(0.5 - 0.125 + 2.0 - 0.125)
    cfg = load_cfg("baselines/e2e_faster_rcnn_R-50-C4_1x.yaml", ["FAST_RCNN.BBOX_REG_LOSS_WEIGHT", "3.0"])
    torch.manual_seed(0)
    model = build_detector(cfg)
    data, im_info, roidb = synthetic_batch(proposals=True)
    rois = torch.cat([torch.cat([torch.full((40, 1), float(i)), e["proposals"]], 1) for i, e in enumerate(roidb)])
    feats = [model.body(data)[i].detach() for i in model.roi_indices]
    assert (model.roi_heads.smooth_l1_beta, model.roi_heads.box_loss_weight) == (1.0, 3.0)  # read from cfg
    losses = []
    for weight in (1.0, 3.0):
        model.roi_heads.box_loss_weight = weight
        model.roi_heads.generator = torch.Generator().manual_seed(0)
        losses.append(model.roi_heads.forward_train(feats, rois, im_info, roidb))
    assert losses[1]["loss_bbox"].item() == pytest.approx(3 * losses[0]["loss_bbox"].item(), rel=1e-5)
    assert losses[1]["loss_bbox"].item() > 0 and losses[1]["loss_cls"].item() == losses[0]["loss_cls"].item()


def test_mask_head_caffe2_names_are_detectrons():
    from pydetectron.modeling.detectron2.mask_head import MaskRCNNConvUpsampleHead

    plain = MaskRCNNConvUpsampleHead(None, 8, 2, 8, None, 3).detectron_weight_mapping()
    assert plain["convs.1.conv.weight"] == "_[mask]_fcn2_w" and plain["deconv.weight"] == "conv5_mask_w"
    assert plain["predictor.bias"] == "mask_fcn_logits_b"
    gn = MaskRCNNConvUpsampleHead(None, 32, 1, 32, d2_norm_spec("GN", "MRCNN.NORM"), 3).detectron_weight_mapping()
    assert gn["convs.0.conv.weight"] == "_mask_fcn1_w" and gn["convs.0.norm.weight"] == "_mask_fcn1_gn_s"


def _small_standard_heads(keypoints: bool, score_thresh: float):
    from pydetectron.modeling import registry

    registry.import_builtin_modules()
    cfg = load_cfg("baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml" if keypoints else
                   "baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml",
                   D2 + (D2_KPS if keypoints else D2_MASK) + ["TEST.SCORE_THRESH", str(score_thresh)])
    return registry.build("roi_heads", "StandardROIHeads", cfg, 8, [1 / 4, 1 / 8, 1 / 16, 1 / 32])


@pytest.mark.parametrize("keypoints", [False, True])
def test_empty_cases(keypoints):
    heads = _small_standard_heads(keypoints, 1.0)  # no score passes 1.0: no detection at all
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    _, im_info, roidb = synthetic_batch(sizes=((64, 96), (64, 96)), num_keypoints=3 if keypoints else 0,
                                        proposals=True)
    rois = torch.cat([torch.cat([torch.full((40, 1), float(i)), e["proposals"]], 1) for i, e in enumerate(roidb)])
    dets = heads.forward_inference(feats, rois, im_info, [(64, 96), (64, 96)], False)
    extra = "keypoints" if keypoints else "masks"
    assert all(d["boxes"].shape == (0, 4) and d[extra].shape[0] == 0 for d in dets)
    # image 1 without gt, image 0 without proposals (only its appended gt) and no visible keypoint
    roidb[1].update(boxes=torch.zeros(0, 4), gt_classes=torch.zeros(0, dtype=torch.long),
                    is_crowd=torch.zeros(0, dtype=torch.bool), segms=[],
                    gt_keypoints=torch.zeros(0, 3, 3) if keypoints else None)
    if keypoints:
        roidb[0]["gt_keypoints"][..., 2] = 0
    losses = heads.forward_train(feats, rois[rois[:, 0] == 1], im_info, roidb)
    assert all(torch.isfinite(v) for v in losses.values())
    if keypoints:
        assert losses["loss_keypoint"].item() == 0
