"""Box heads, RoI feature extraction and the Fast R-CNN losses, against independent references
(torchvision's Caffe2-compatible RoI ops, float64 loss loops, Detectron's blob names)."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pydetectron.config import get_cfg
from pydetectron.modeling import registry
from pydetectron.modeling.box_head import FastRCNNOutputs, classification_accuracy, fast_rcnn_losses
from pydetectron.modeling.roi_features import RoIFeatureExtractor

registry.import_builtin_modules()


def small_cfg(**fast_rcnn):
    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = 5
    cfg.FAST_RCNN.MLP_HEAD_DIM = 32
    cfg.FAST_RCNN.CONV_HEAD_DIM = 16
    cfg.FAST_RCNN.NUM_STACKED_CONVS = 2
    cfg.FAST_RCNN.ROI_XFORM_METHOD = "RoIAlign"
    cfg.FAST_RCNN.ROI_XFORM_RESOLUTION = 7
    cfg.FAST_RCNN.ROI_XFORM_SAMPLING_RATIO = 2
    for key, value in fast_rcnn.items():
        setattr(cfg.FAST_RCNN, key, value)
    return cfg


def ref_level(box, k_min, k_max):
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    return int(min(max(math.floor(4 + math.log2(math.sqrt(area) / 224 + 1e-6)), k_min), k_max))


def test_losses_match_float64_reference():
    torch.manual_seed(0)
    num_rois, num_classes = 6, 4
    cls_score = torch.randn(num_rois, num_classes, dtype=torch.float64)
    labels = torch.tensor([1, 0, 3, 2, 0, 1])
    bbox_pred = 2 * torch.randn(num_rois, 4 * num_classes, dtype=torch.float64)
    bbox_targets = torch.zeros_like(bbox_pred)
    inside = torch.zeros_like(bbox_pred)
    for r, c in enumerate(labels.tolist()):
        if c > 0:
            bbox_targets[r, 4 * c : 4 * c + 4] = torch.randn(4, dtype=torch.float64)
            inside[r, 4 * c : 4 * c + 4] = 1.0
    outside = (inside > 0).double()
    losses = fast_rcnn_losses(cls_score, bbox_pred, labels, bbox_targets, inside, outside)

    ce = 0.0
    for r in range(num_rois):
        row = cls_score[r].tolist()
        log_z = math.log(sum(math.exp(v) for v in row))
        ce += log_z - row[labels[r]]
    assert losses["loss_cls"].item() == pytest.approx(ce / num_rois, rel=1e-10)

    sl1 = 0.0
    seen_both_branches = set()
    for r in range(num_rois):
        for k in range(4 * num_classes):
            x = inside[r, k].item() * (bbox_pred[r, k].item() - bbox_targets[r, k].item())
            seen_both_branches.add(abs(x) < 1 if inside[r, k] > 0 else None)
            sl1 += outside[r, k].item() * (0.5 * x * x if abs(x) < 1 else abs(x) - 0.5)
    assert {True, False} <= seen_both_branches  # both sides of the Huber kink are exercised
    assert losses["loss_bbox"].item() == pytest.approx(sl1 / num_rois, rel=1e-10)


def test_loss_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="CLS_AGNOSTIC_BBOX_REG"):
        fast_rcnn_losses(torch.zeros(2, 3), torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64),
                         torch.zeros(2, 12), torch.zeros(2, 12), torch.zeros(2, 12))


@pytest.mark.parametrize("agnostic", [False, True])
def test_outputs_shapes_init_and_names(agnostic):
    out = FastRCNNOutputs(64, 5, cls_agnostic_bbox_reg=agnostic)
    cls, bbox = out(torch.randn(3, 64))
    assert cls.shape == (3, 5) and bbox.shape == (3, 8 if agnostic else 20)
    assert out.bbox_pred.weight.std().item() < 0.005 < out.cls_score.weight.std().item()
    assert out.detectron_weight_mapping() == {
        "cls_score.weight": "cls_score_w", "cls_score.bias": "cls_score_b",
        "bbox_pred.weight": "bbox_pred_w", "bbox_pred.bias": "bbox_pred_b",
    }


def test_single_level_extractor_matches_torchvision_caffe2_modes():
    torch.manual_seed(1)
    feat = torch.randn(2, 3, 20, 24)
    rois = torch.tensor([[0, 4.0, 6.0, 100.0, 80.0], [1, 0.0, 0.0, 15.0, 15.0], [0, 30.0, 10.0, 31.0, 12.0]])
    align = RoIFeatureExtractor("RoIAlign", 5, 2, [1 / 8])
    expected = torchvision.ops.roi_align(feat, rois, 5, 1 / 8, 2, aligned=False)
    assert torch.allclose(align([feat], rois), expected, atol=1e-5)
    pool = RoIFeatureExtractor("RoIPoolF", 5, 0, [1 / 8])
    assert torch.allclose(pool([feat], rois), torchvision.ops.roi_pool(feat, rois, 5, 1 / 8), atol=1e-6)


def test_fpn_extractor_pools_each_roi_from_its_level_in_input_order():
    torch.manual_seed(2)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = [torch.randn(1, 2, 256 // s, 256 // s) for s in (4, 8, 16, 32)]
    boxes = [[0, 0, 20, 20], [0, 0, 250, 250], [10, 10, 120, 90], [5, 5, 223, 223], [0, 0, 60, 200]]
    rois = torch.tensor([[0.0] + b for b in boxes])
    ext = RoIFeatureExtractor("RoIAlign", 4, 2, scales)
    out = ext(feats, rois)
    levels = [ref_level(b, 2, 5) for b in boxes]
    assert len(set(levels)) >= 3  # the case really spreads over levels
    for r, lvl in enumerate(levels):
        expected = torchvision.ops.roi_align(feats[lvl - 2], rois[r : r + 1], 4, scales[lvl - 2], 2, aligned=False)
        assert torch.allclose(out[r : r + 1], expected, atol=1e-5), (r, lvl)


def test_fpn_extractor_gradient_reaches_the_levels_used():
    feats = [torch.randn(1, 2, 64 // 2**i, 64 // 2**i, requires_grad=True) for i in range(4)]
    rois = torch.tensor([[0, 0, 0, 10, 10], [0, 0, 0, 240, 240.0], [0, 0, 0, 500, 500.0]])
    ext = RoIFeatureExtractor("RoIAlign", 2, 1, [1 / 4, 1 / 8, 1 / 16, 1 / 32])
    ext(feats, rois).sum().backward()
    assert [ref_level(r[1:].tolist(), 2, 5) for r in rois] == [2, 4, 5]
    assert all(feats[i].grad.abs().sum() > 0 for i in (0, 2, 3))
    assert feats[1].grad is None or feats[1].grad.abs().sum() == 0


def test_extractor_rejects_bad_settings():
    with pytest.raises(ValueError, match="ROI_XFORM_METHOD"):
        RoIFeatureExtractor("RoIWarp", 7, 0, [1 / 16])
    with pytest.raises(ValueError, match="power of 1/2"):
        RoIFeatureExtractor("RoIAlign", 7, 0, [1 / 12])
    ext = RoIFeatureExtractor("RoIAlign", 7, 0, [1 / 4, 1 / 8])
    with pytest.raises(ValueError, match="feature maps"):
        ext([torch.zeros(1, 1, 8, 8)], torch.zeros(1, 5))


def test_2mlp_head_matches_manual_computation_and_names():
    cfg = small_cfg()
    head = registry.build("box_head", "fast_rcnn_heads.add_roi_2mlp_head", cfg, 3, [1 / 16])
    assert head.dim_out == 32
    feat = torch.randn(1, 3, 10, 12)
    rois = torch.tensor([[0, 8.0, 8.0, 120.0, 100.0], [0, 40.0, 20.0, 90.0, 150.0]])
    pooled = torchvision.ops.roi_align(feat, rois, 7, 1 / 16, 2, aligned=False).flatten(1)
    expected = F.relu(head.fc7(F.relu(head.fc6(pooled))))
    assert torch.allclose(head([feat], rois), expected, atol=1e-5)
    assert head.detectron_weight_mapping() == {
        "fc6.weight": "fc6_w", "fc6.bias": "fc6_b", "fc7.weight": "fc7_w", "fc7.bias": "fc7_b",
    }
    assert set(head.detectron_weight_mapping()) == set(head.state_dict())
    # Caffe2 XavierFill: U(-a, a), a = sqrt(3 / fan_in)
    bound = math.sqrt(3 / (3 * 7 * 7))
    assert head.fc6.weight.abs().max().item() <= bound and head.fc6.weight.abs().max().item() > 0.9 * bound


@pytest.mark.parametrize("name, gn", [("roi_Xconv1fc_head", False), ("roi_Xconv1fc_gn_head", True)])
def test_xconv1fc_heads_forward_and_names(name, gn):
    cfg = small_cfg()
    cfg.GROUP_NORM.NUM_GROUPS = 4
    head = registry.build("box_head", name, cfg, 3, [1 / 4, 1 / 8])
    out = head([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)], torch.tensor([[1, 0, 0, 50, 60.0]]))
    assert out.shape == (1, 32) and (out >= 0).all()
    mapping = head.detectron_weight_mapping()
    assert set(mapping) == set(head.state_dict())
    blobs = set(mapping.values())
    assert {"head_conv1_w", "head_conv2_w", "fc6_w", "fc6_b"} <= blobs
    if gn:
        assert {"head_conv1_gn_s", "head_conv1_gn_b", "head_conv2_gn_s", "head_conv2_gn_b"} <= blobs
        assert "head_conv1_b" not in blobs and head.norms[0].num_groups == 4
    else:
        assert {"head_conv1_b", "head_conv2_b"} <= blobs and not any("_gn_" in b for b in blobs)


def test_resnet_c4_head_shapes_names_and_res5_map():
    cfg = small_cfg(ROI_XFORM_RESOLUTION=14)
    head = registry.build("box_head", "ResNet.add_ResNet_roi_conv5_head", cfg, 1024, [1 / 16])
    feat = torch.randn(1, 1024, 6, 6)
    rois = torch.tensor([[0, 0, 0, 60, 60.0], [0, 10, 20, 90, 70.0]])
    pooled, res5 = head([feat], rois, return_res5=True)
    assert pooled.shape == (2, 2048) and res5.shape == (2, 2048, 7, 7)
    assert torch.allclose(pooled, res5.mean(dim=(2, 3)), atol=1e-5)
    blobs = {b for b in head.detectron_weight_mapping().values() if b is not None}
    assert {"res5_0_branch1_w", "res5_0_branch2a_w", "res5_2_branch2c_w", "res5_2_branch2c_bn_s"} <= blobs
    assert all(b.startswith("res5_") for b in blobs)


def test_resnet_c4_head_rejects_resolution_without_7x7_output():
    with pytest.raises(ValueError, match="ROI_XFORM_RESOLUTION"):
        registry.build("box_head", "ResNet_roi_conv5_head", small_cfg(ROI_XFORM_RESOLUTION=10), 1024, [1 / 16])


def test_classification_accuracy_is_the_top1_hit_rate():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [4.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2])  # rows 0 and 1 right, rows 2 and 3 wrong
    accuracy = classification_accuracy(scores, labels)
    assert accuracy.item() == 0.5 and not accuracy.requires_grad
    assert classification_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)).item() == 0.0
