"""Keypoint head: output shapes and blob names per variant, spatial-softmax loss, heatmap decoding."""

import numpy as np
import pytest
import torch

from pydetectron.config import get_cfg
from pydetectron.modeling import registry
from pydetectron.modeling.keypoint_head import heatmaps_to_keypoints, keypoint_rcnn_loss, nms_oks

registry.import_builtin_modules()


def _cfg(**krcnn):
    cfg = get_cfg()
    k = cfg.KRCNN
    k.NUM_KEYPOINTS = 3  # e.g. triangle vertices
    k.CONV_HEAD_DIM = 8
    k.DECONV_DIM = 8
    k.NUM_STACKED_CONVS = 2
    for key, value in krcnn.items():
        setattr(k, key, value)
    return cfg


@pytest.mark.parametrize(
    "options,size,score_blob",
    [
        (dict(ROI_XFORM_RESOLUTION=14, USE_DECONV_OUTPUT=True, UP_SCALE=2, HEATMAP_SIZE=56), 56, "kps_score_lowres"),
        (dict(ROI_XFORM_RESOLUTION=7, USE_DECONV=True, USE_DECONV_OUTPUT=True, HEATMAP_SIZE=28), 28, "kps_score"),
        (dict(ROI_XFORM_RESOLUTION=7, UP_SCALE=-1, HEATMAP_SIZE=7), 7, "kps_score"),
    ],
)
def test_keypoint_head_shapes_and_names(options, size, score_blob):
    head = registry.build("keypoint_head", "keypoint_rcnn_heads.add_roi_pose_head_v1convX", _cfg(**options), 6, [1 / 8])
    rois = torch.tensor([[0.0, 4, 4, 60, 40], [1.0, 0, 0, 20, 30]])
    assert head([torch.randn(2, 6, 10, 10)], rois).shape == (2, 3, size, size)
    mapping = head.detectron_weight_mapping()
    assert set(mapping) == set(head.state_dict())
    blobs = set(mapping.values())
    assert {"conv_fcn1_w", "conv_fcn2_b", f"{score_blob}_w", f"{score_blob}_b"} <= blobs
    assert ("kps_deconv_w" in blobs) == bool(options.get("USE_DECONV", False))
    assert ("kps_score_w" in blobs) == (options.get("UP_SCALE", -1) > 1 or score_blob == "kps_score")


@pytest.mark.parametrize("dilation,size", [(1, 28), (2, 56)])
def test_c4_res5_keypoint_head(dilation, size):
    cfg = _cfg(ROI_XFORM_RESOLUTION=14, USE_DECONV_OUTPUT=True, UP_SCALE=2, HEATMAP_SIZE=size, DILATION=dilation)
    cfg.RESNETS.WIDTH_PER_GROUP = 2
    head = registry.build("keypoint_head", "keypoint_rcnn_heads.add_ResNet_roi_conv5_head_for_keypoints", cfg, 6,
                          [1 / 16])
    rois = torch.tensor([[0.0, 4, 4, 60, 40]])
    assert head([torch.randn(1, 6, 10, 10)], rois).shape == (1, 3, size, size)
    blobs = set(head.detectron_weight_mapping().values())
    assert set(head.detectron_weight_mapping()) == set(head.state_dict())
    assert {"_[pose]_res5_0_branch2a_w", "_[pose]_res5_2_branch2c_w", "kps_score_lowres_w", "kps_score_w"} <= blobs


def test_heatmap_size_mismatch_is_reported():
    with pytest.raises(ValueError, match="HEATMAP_SIZE is 28 but .* makes 56x56"):
        registry.build("keypoint_head", "roi_pose_head_v1convX",
                       _cfg(ROI_XFORM_RESOLUTION=14, USE_DECONV_OUTPUT=True, UP_SCALE=2, HEATMAP_SIZE=28), 6, [1 / 8])


def test_keypoint_loss_matches_float64_log_softmax():
    gen = torch.Generator().manual_seed(1)
    heat = torch.randn(3, 2, 5, 5, generator=gen, requires_grad=True)
    loc = torch.randint(0, 25, (3, 2), generator=gen)
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    loss = keypoint_rcnn_loss(heat, loc, w, loss_weight=2.0)
    logp = torch.log_softmax(heat.detach().double().reshape(6, 25), dim=1)
    nll = -logp[torch.arange(6), loc.reshape(-1)]
    expected = (nll * w.reshape(-1).double()).sum() / 4 * 2.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert keypoint_rcnn_loss(heat, loc, w, 2.0, normalizer=0.25).item() == pytest.approx(expected.item() / 4, rel=1e-6)
    loss.backward()
    assert heat.grad[0, 1].abs().max() == 0  # weight 0: no gradient


def test_keypoint_loss_without_keypoint_rois_is_zero():
    heat = torch.zeros(0, 3, 4, 4, requires_grad=True)
    loss = keypoint_rcnn_loss(heat, torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3))
    assert loss.item() == 0 and loss.requires_grad


def test_delta_heatmaps_decode_to_cell_centres_in_the_box():
    s = 4
    heat = torch.full((2, 2, s, s), -3.0)
    heat[0, 0, 1, 2] = 5.0  # cell x=2, y=1
    heat[0, 1, 2, 1] = 4.0  # cell x=1, y=2
    heat[1, 0, 1, 1] = 6.0
    heat[1, 1, 2, 2] = 2.0
    # Box 0 is 3x the heatmap (12 x 12): an odd up-sampling keeps each peak on one resized cell.
    # Box 1 is exactly the heatmap size (4 x 4) but INFERENCE_MIN_SIZE 12 resizes it 3x as well.
    boxes = torch.tensor([[10.0, 20.0, 22.0, 32.0], [100.0, 50.0, 104.0, 54.0]])
    out = heatmaps_to_keypoints(heat, boxes, min_size=12)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        for k in range(2):
            y, x = divmod(int(heat[i, k].argmax()), s)
            expected_xy = (x1 + (x + 0.5) * (x2 - x1) / s, y1 + (y + 0.5) * (y2 - y1) / s)
            assert out[i, k, :2].tolist() == pytest.approx(expected_xy, abs=1e-4)
            assert out[i, k, 2].item() == pytest.approx(heat[i, k].max().item(), abs=1e-4)
    # A peak in a border cell: bicubic overshoot with replicated borders moves it to the outermost
    # resized cell (as in Detectron), i.e. half a resized cell inside the box corner.
    corner = torch.full((1, 1, s, s), -3.0)
    corner[0, 0, 3, 0] = 5.0
    out = heatmaps_to_keypoints(corner, boxes[:1], min_size=0)
    assert out[0, 0, :2].tolist() == pytest.approx([10.5, 31.5])


def test_decoded_probability_is_the_spatial_softmax_at_the_peak():
    gen = torch.Generator().manual_seed(2)
    heat = torch.randn(1, 3, 6, 6, generator=gen)
    box = torch.tensor([[7.0, 9.0, 13.0, 15.0]])  # 6 x 6: the resize keeps the map as it is
    out = heatmaps_to_keypoints(heat, box)
    flat = heat[0].double().reshape(3, -1)
    probs = torch.softmax(flat, dim=1).max(dim=1).values
    assert out[0, :, 3].numpy() == pytest.approx(probs.numpy(), rel=1e-5)
    pos = flat.argmax(dim=1).numpy()
    assert out[0, :, 0].numpy() == pytest.approx(7.0 + (pos % 6) + 0.5)
    assert out[0, :, 1].numpy() == pytest.approx(9.0 + (pos // 6) + 0.5)
    assert np.isfinite(out.numpy()).all()


def test_nms_oks_suppresses_overlapping_poses_by_mean_logit():
    sigmas = [0.05, 0.05, 0.05]
    base = torch.tensor([[10.0, 10.0], [30.0, 12.0], [20.0, 30.0]])
    kps = torch.zeros(4, 3, 3)
    kps[0, :, :2] = base
    kps[1, :, :2] = base + 0.5  # nearly the same pose as 0
    kps[2, :, :2] = base + 40.0  # far away
    kps[3, :, :2] = base + torch.tensor([6.0, 0.0])  # shifted by 6 px
    kps[:, :, 2] = torch.tensor([1.0, 2.0, 0.5, 0.1])[:, None]  # mean logits: 1 is best
    boxes = torch.tensor([[5.0, 5.0, 34.0, 34.0]]).repeat(4, 1)
    # float64 reference OKS of 3 against 1: d^2 = 5.5^2 + 0.5^2, area 30 * 30, var (2 * 0.05)^2.
    oks_31 = np.exp(-(5.5**2 + 0.5**2) / 0.01 / 900 / 2)
    assert 0.1 < oks_31 < 0.3
    assert nms_oks(kps, boxes, 0.3, sigmas).tolist() == [1, 2, 3]  # 0 suppressed by 1; 3 kept (OKS < 0.3)
    assert nms_oks(kps, boxes, oks_31 - 1e-3, sigmas).tolist() == [1, 2]
    with pytest.raises(ValueError, match="K sigmas"):
        nms_oks(kps, boxes, 0.3, [0.05])


def test_channels_last_head_matches_float64_and_returns_contiguous_heatmaps():
    import copy

    cfg = _cfg(ROI_XFORM_RESOLUTION=7, USE_DECONV=True, USE_DECONV_OUTPUT=True, HEATMAP_SIZE=28)
    torch.manual_seed(0)
    head = registry.build("keypoint_head", "keypoint_rcnn_heads.add_roi_pose_head_v1convX", cfg, 6, [1 / 8]).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    feats = [torch.randn(2, 6, 10, 10)]
    rois = torch.tensor([[0.0, 4, 4, 60, 40], [1.0, 0, 0, 20, 30]])
    with torch.no_grad():
        got = head(feats, rois)
        want = copy.deepcopy(head).double()([feats[0].double()], rois.double())
    assert got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
