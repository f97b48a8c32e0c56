"""Mask heads: output shapes and Detectron blob names per registered name, loss, class channel pick, pasting."""

import cv2
import numpy as np
import pytest
import torch

from pydetectron.config import get_cfg
from pydetectron.modeling import registry
from pydetectron.modeling.mask_head import BilinearUpsample2d, mask_probs, mask_rcnn_loss
from pydetectron.modeling.paste_masks import paste_masks_in_image

registry.import_builtin_modules()

MASK_HEADS = [
    "mask_rcnn_fcn_head_v0up",
    "mask_rcnn_fcn_head_v0upshare",
    "mask_rcnn_fcn_head_v1up",
    "mask_rcnn_fcn_head_v1up4convs",
    "mask_rcnn_fcn_head_v1up4convs_gn",
]


def _cfg(name, **overrides):
    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = 4
    cfg.MRCNN.DIM_REDUCED = 8
    cfg.MRCNN.DILATION = 1
    cfg.MRCNN.RESOLUTION = 14
    cfg.MRCNN.ROI_XFORM_RESOLUTION = 14 if "v0up" in name else 7
    cfg.FAST_RCNN.ROI_XFORM_RESOLUTION = cfg.MRCNN.ROI_XFORM_RESOLUTION
    cfg.GROUP_NORM.NUM_GROUPS = 4
    cfg.RESNETS.WIDTH_PER_GROUP = 4  # a thin res5 for the C4 heads
    for key, value in overrides.items():
        node, attr = key.split("__")
        setattr(getattr(cfg, node), attr, value)
    return cfg


@pytest.mark.parametrize("name", MASK_HEADS)
def test_every_mask_head_gives_class_logits_and_maps_all_weights(name):
    dim_in = 8
    cfg = _cfg(name)
    head = registry.build("mask_head", name, cfg, dim_in, [1 / 16])
    if head.shares_res5:
        box_head = registry.build("box_head", "ResNet_roi_conv5_head", cfg, dim_in, [1 / 16])
        head.share_res5(box_head.res5)
    feats = [torch.randn(2, dim_in, 12, 12)]
    rois = torch.tensor([[0.0, 0, 0, 100, 80], [1.0, 30, 40, 60, 90], [1.0, 5, 5, 20, 20]])
    assert head(feats, rois).shape == (3, 4, 14, 14)
    mapping = head.detectron_weight_mapping()
    assert set(mapping) == set(head.state_dict())
    blobs = set(mapping.values()) - {None}
    assert {"conv5_mask_w", "conv5_mask_b", "mask_fcn_logits_w", "mask_fcn_logits_b"} <= blobs
    if name == "mask_rcnn_fcn_head_v1up4convs":
        assert {f"_[mask]_fcn{i}_w" for i in range(1, 5)} <= blobs
    if name.endswith("_gn"):
        assert {"_mask_fcn4_w", "_mask_fcn4_gn_s", "_mask_fcn4_gn_b"} <= blobs and "_mask_fcn1_b" not in blobs
    if name == "mask_rcnn_fcn_head_v0up":
        assert "_[mask]_res5_2_branch2c_w" in blobs
    if name == "mask_rcnn_fcn_head_v0upshare":
        assert len(blobs) == 4  # res5 is the box head's: its blobs are named there
        assert head.shared_res5 is box_head.res5
        res5 = torch.randn(3, 2 * dim_in, 7, 7)
        assert head.predict(res5).shape == (3, 4, 14, 14)


def test_class_agnostic_fc_output_and_upsampling():
    cfg = _cfg("v1up", MRCNN__CLS_SPECIFIC_MASK=False, MRCNN__USE_FC_OUTPUT=True)
    head = registry.build("mask_head", "mask_rcnn_fcn_head_v1up", cfg, 8, [1 / 16])
    assert head(([torch.randn(1, 8, 10, 10)]), torch.tensor([[0.0, 0, 0, 50, 50]])).shape == (1, 1, 14, 14)
    cfg = _cfg("v1up", MRCNN__UPSAMPLE_RATIO=2, MRCNN__RESOLUTION=28)
    head = registry.build("mask_head", "mask_rcnn_fcn_head_v1up", cfg, 8, [1 / 16])
    assert head(([torch.randn(1, 8, 10, 10)]), torch.tensor([[0.0, 0, 0, 50, 50]])).shape == (1, 4, 28, 28)
    mapping = head.detectron_weight_mapping()
    assert set(mapping) == set(head.state_dict())
    assert mapping["upsample.weight"] == "mask_fcn_logits_up_w"  # Detectron's fixed bilinear blob
    assert not [n for n, _ in head.named_parameters() if n.startswith("upsample")]  # buffers: never trained


def test_resolution_mismatch_is_reported():
    cfg = _cfg("v1up", MRCNN__RESOLUTION=28)
    head = registry.build("mask_head", "mask_rcnn_fcn_head_v1up", cfg, 8, [1 / 16])
    with pytest.raises(ValueError, match="MRCNN.RESOLUTION 28"):
        head([torch.randn(1, 8, 10, 10)], torch.tensor([[0.0, 0, 0, 50, 50]]))


def test_bilinear_upsampling_interpolates_linear_ramps():
    # The FCN bilinear kernel reproduces a linear function away from the borders.
    x = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6).expand(1, 2, 6, 6).contiguous()
    y = BilinearUpsample2d(2, 2, "up")(x)
    assert y.shape == (1, 2, 12, 12)
    interior = y[0, 0, 5, 1:11]
    assert torch.allclose(interior[1:] - interior[:-1], torch.full((9,), 0.5))


def test_mask_loss_matches_float64_bce_over_valid_entries():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 4, 4, generator=gen, requires_grad=True)
    targets = torch.randint(-1, 2, (3, 32), generator=gen, dtype=torch.int32)
    loss = mask_rcnn_loss(logits, targets, weight=0.7)
    x = logits.detach().double().reshape(3, -1)
    t = targets.double()
    p = 1 / (1 + torch.exp(-x))
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    valid = t >= 0
    expected = bce[valid].sum() / valid.sum() * 0.7
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert logits.grad.reshape(3, -1)[~valid].abs().max() == 0


def test_mask_loss_all_ignored_is_zero_and_keeps_the_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = mask_rcnn_loss(logits, torch.full((1, 12), -1, dtype=torch.int32))
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


def test_mask_probs_pick_the_detection_class():
    logits = torch.randn(2, 3, 4, 4)
    probs = mask_probs(logits, torch.tensor([2, 1]))
    assert torch.allclose(probs[0], torch.sigmoid(logits[0, 2]))
    assert torch.allclose(probs[1], torch.sigmoid(logits[1, 1]))
    assert torch.allclose(mask_probs(logits[:, :1], torch.tensor([2, 1])), torch.sigmoid(logits[:, 0]))


def _tent_resize_1d(profile, out_size):
    """Half-pixel-centred linear interpolation of a 1-D profile (what a bilinear resize does per axis)."""
    n = len(profile)
    out = np.empty(out_size)
    for d in range(out_size):
        s = min(max((d + 0.5) * n / out_size - 0.5, 0.0), n - 1)
        i0 = int(np.floor(s))
        i1 = min(i0 + 1, n - 1)
        out[d] = profile[i0] * (1 - (s - i0)) + profile[i1] * (s - i0)
    return out


@pytest.mark.parametrize(
    "box,rows,cols",
    [((10.3, 20.6, 29.2, 27.9), (0, 3), (0, 3)), ((-6.0, 30.5, 17.7, 55.0), (1, 2), (2, 3))],
)
def test_paste_rectangle_mask_vs_separable_reference(box, rows, cols):
    m, im_h, im_w = 4, 40, 50
    prob = np.zeros((m, m), np.float32)
    prob[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = 0.9
    out = paste_masks_in_image(torch.from_numpy(prob)[None], torch.tensor([box]), im_h, im_w, 0.5)[0].numpy()

    # Reference: expand the box by (M + 2) / M around its centre (1-pixel zero border), truncate to int,
    # resize each axis profile of the zero-padded rectangle, multiply, threshold, place in the image.
    x1, y1, x2, y2 = box
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * (m + 2) / m, (y2 - y1) / 2 * (m + 2) / m
    ex1, ey1, ex2, ey2 = (int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh))
    col_profile = np.zeros(m + 2)
    col_profile[cols[0] + 1 : cols[1] + 2] = 1
    row_profile = np.zeros(m + 2)
    row_profile[rows[0] + 1 : rows[1] + 2] = 0.9
    value = np.outer(_tent_resize_1d(row_profile, ey2 - ey1 + 1), _tent_resize_1d(col_profile, ex2 - ex1 + 1))
    expected = np.zeros((im_h, im_w), np.uint8)
    near = np.zeros((im_h, im_w), bool)
    for yy in range(max(ey1, 0), min(ey2 + 1, im_h)):
        for xx in range(max(ex1, 0), min(ex2 + 1, im_w)):
            v = value[yy - ey1, xx - ex1]
            expected[yy, xx] = v > 0.5
            near[yy, xx] = abs(v - 0.5) < 1e-4
    assert expected.sum() > 10
    assert np.array_equal(out[~near], expected[~near])


def test_paste_uses_opencv_bilinear_on_padded_mask_exactly():
    gen = np.random.default_rng(3)
    probs = gen.random((3, 6, 6)).astype(np.float32)
    boxes = torch.tensor([[3.2, 4.9, 30.1, 17.5], [40.0, 2.0, 70.0, 44.0], [0.0, 0.0, 0.4, 0.2]])
    out = paste_masks_in_image(torch.from_numpy(probs), boxes, 30, 60, 0.5).numpy()
    assert out.shape == (3, 30, 60) and out.dtype == np.uint8
    # The second box runs off the right / bottom edge: its mask is cut, nothing wraps around. Its
    # expanded box, in Detectron's float32 arithmetic: centre (55, 23), half sizes 15 and 21 times 8/6.
    scale = np.float32(8 / 6)
    ex1, ex2 = int(np.float32(55) - np.float32(15) * scale), int(np.float32(55) + np.float32(15) * scale)
    ey1, ey2 = int(np.float32(23) - np.float32(21) * scale), int(np.float32(23) + np.float32(21) * scale)
    assert ey1 < 0 and ex2 >= 60
    full = cv2.resize(np.pad(probs[1], 1), (ex2 - ex1 + 1, ey2 - ey1 + 1)) > 0.5
    assert np.array_equal(out[1, :, ex1:], full[-ey1 : -ey1 + 30, : 60 - ex1])
    assert out[1, :, :ex1].sum() == 0
    assert paste_masks_in_image(torch.zeros(0, 6, 6), torch.zeros(0, 4), 5, 5).shape == (0, 5, 5)


@pytest.mark.parametrize("name", [n for n in MASK_HEADS if not n.endswith("share")] + ["fc_output"])
def test_channels_last_head_body_matches_float64(name):
    """predict() runs its body channels-last; the logits must be those of a float64 copy of the head."""
    import copy

    if name == "fc_output":
        cfg = _cfg("v1up", MRCNN__CLS_SPECIFIC_MASK=False, MRCNN__USE_FC_OUTPUT=True)
        name = "mask_rcnn_fcn_head_v1up"
    else:
        cfg = _cfg(name)
    torch.manual_seed(0)
    head = registry.build("mask_head", name, cfg, 8, [1 / 16]).eval()
    for p in head.parameters():  # Detectron's tiny init would make every logit ~0
        torch.nn.init.normal_(p, std=0.2)
    side = cfg.MRCNN.ROI_XFORM_RESOLUTION
    x = torch.randn(3, 8, side, side)
    with torch.no_grad():
        got, want = head.predict(x), copy.deepcopy(head).double().predict(x.double())
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
