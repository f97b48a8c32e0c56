"""Minibatch blobs: scaling, normalisation, padding, im_info, targets in network-input coordinates."""

from __future__ import annotations

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from pydetectron.config import get_cfg
from pydetectron.data.minibatch import (
    BlobSettings,
    get_minibatch,
    prepare_test_image,
    scaled_size,
    split_per_device,
)
from pydetectron.data.roidb import flip_entry
from pydetectron.data.transforms import compute_im_scale, crop_to_aspect

MEANS = (10.0, 20.0, 30.0)
STDS = (2.0, 4.0, 5.0)


def _write(path, h, w, bgr=(110, 60, 230)):
    cv2.imwrite(str(path), np.full((h, w, 3), bgr, np.uint8))  # png: lossless
    return str(path)


def _entry(path, h, w, boxes, segms=None, kps=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return {"image": path, "id": 7, "width": w, "height": h, "flipped": False, "boxes": boxes,
            "gt_classes": np.ones(len(boxes), np.int64), "is_crowd": np.zeros(len(boxes), bool),
            "segms": segms if segms is not None else [[] for _ in boxes], "gt_keypoints": kps,
            "has_visible_keypoints": kps is not None}


def test_compute_im_scale_by_hand():
    assert compute_im_scale(80, 100, 40, 1000) == 0.5
    assert compute_im_scale(100, 300, 600, 1000) == pytest.approx(1000 / 300)  # 1800 > MAX_SIZE
    assert compute_im_scale(300, 100, 200, 600) == 2.0  # 600 is not > 600


def test_blob_shapes_padding_im_info_and_targets(tmp_path):
    mask = np.zeros((80, 100), np.uint8)
    mask[10:30, 20:60] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    kps = np.array([[[20, 30, 2], [40, 50, 1]]], np.float32)
    e1 = _entry(_write(tmp_path / "a.png", 80, 100), 80, 100, [[10, 20, 39, 59]],
                segms=[[np.array([10, 20, 39, 20, 39, 59], np.float32)]], kps=kps)
    e2 = _entry(_write(tmp_path / "b.png", 60, 70), 60, 70, [[0, 0, 9, 9]], segms=[rle])
    e2["segms"] = [mask_util.encode(np.asfortranarray(mask[:60, :70]))]
    settings = BlobSettings(scales=(40,), max_size=1000, pixel_means=MEANS, pixel_stds=STDS, stride=32)
    batch = get_minibatch([e1, e2], settings, np.random.default_rng(0))
    # e1: 80x100 -> scale 0.5 -> 40x50; e2: 60x70 -> scale 2/3 -> 40x47 (round(46.67)); pad to 64x64
    assert batch["data"].shape == (2, 3, 64, 64) and batch["data"].dtype == torch.float32
    torch.testing.assert_close(batch["im_info"], torch.tensor([[40, 50, 0.5], [40, 47, 40 / 60]]))
    expected = (np.array([110, 60, 230], np.float32) - MEANS) / STDS
    np.testing.assert_allclose(batch["data"][0, :, :40, :50].numpy(),
                               np.broadcast_to(expected[:, None, None], (3, 40, 50)), rtol=1e-6)
    assert batch["data"][0, :, 40:].abs().sum() == 0 and batch["data"][0, :, :, 50:].abs().sum() == 0
    assert batch["data"][1, :, :, 47:].abs().sum() == 0
    r1, r2 = batch["roidb"]
    torch.testing.assert_close(r1["boxes"], torch.tensor([[5.0, 10.0, 19.5, 29.5]]))
    np.testing.assert_allclose(r1["segms"][0][0], [5, 10, 19.5, 10, 19.5, 29.5])
    torch.testing.assert_close(r1["gt_keypoints"], torch.tensor([[[10.0, 15.0, 2.0], [20.0, 25.0, 1.0]]]))
    assert r1["gt_classes"].dtype == torch.int64 and r1["is_crowd"].dtype == torch.bool
    assert (r1["image_id"], r1["height"], r1["width"], r1["flipped"]) == (7, 80, 100, False)
    m = r2["segms"][0]
    assert m.dtype == np.uint8 and m.shape == (40, 47)
    ref = cv2.resize(mask[:60, :70], (47, 40), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(m, ref)
    assert r2["gt_keypoints"] is None


def test_rgb_order_and_cfg(tmp_path):
    cfg = get_cfg()
    cfg.MODEL.INPUT_COLOR_ORDER = "RGB"
    cfg.PIXEL_MEANS = np.array([[[1.0, 2.0, 3.0]]])
    cfg.TRAIN.SCALES = (40,)
    settings = BlobSettings.from_cfg(cfg, train=True)
    assert settings.to_rgb and settings.stride == 0 and settings.scales == (40,)
    e = _entry(_write(tmp_path / "a.png", 80, 100, bgr=(10, 20, 30)), 80, 100, [[0, 0, 5, 5]])
    data = get_minibatch([e], settings, np.random.default_rng(0))["data"]
    np.testing.assert_allclose(data[0, :, 0, 0].numpy(), [30 - 1, 20 - 2, 10 - 3])
    cfg.FPN.FPN_ON = True
    assert BlobSettings.from_cfg(cfg, train=False).stride == cfg.FPN.COARSEST_STRIDE


def test_flipped_entry_mirrors_pixels_and_boxes(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, size=(80, 100, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "r.png"), img)
    e = _entry(str(tmp_path / "r.png"), 80, 100, [[10, 20, 39, 59]])
    settings = BlobSettings(scales=(40,), max_size=1000, pixel_means=MEANS)
    plain = get_minibatch([e], settings, np.random.default_rng(0))
    flipped = get_minibatch([flip_entry(e, None)], settings, np.random.default_rng(0))
    np.testing.assert_allclose(flipped["data"].numpy(), plain["data"].numpy()[..., ::-1], atol=1e-3)
    torch.testing.assert_close(flipped["roidb"][0]["boxes"], torch.tensor([[30.0, 10.0, 44.5, 29.5]]))


def test_missing_and_unreadable_images(tmp_path):
    settings = BlobSettings(scales=(40,), max_size=1000, pixel_means=MEANS)
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        get_minibatch([_entry(str(tmp_path / "nothere.jpg"), 80, 100, [[0, 0, 5, 5]])], settings,
                      np.random.default_rng(0))
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(OSError, match="junk.jpg"):
        get_minibatch([_entry(str(tmp_path / "junk.jpg"), 80, 100, [[0, 0, 5, 5]])], settings,
                      np.random.default_rng(0))
    wrong = _entry(_write(tmp_path / "a.png", 80, 100), 90, 100, [[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="image id 7"):
        get_minibatch([wrong], settings, np.random.default_rng(0))


def test_prepare_test_image():
    im = np.full((300, 100, 3), (50, 60, 70), np.uint8)
    settings = BlobSettings(scales=(200,), max_size=500, pixel_means=MEANS, stride=32)
    blob, im_scale = prepare_test_image(im, settings)
    # shortest side 100 -> 200 would make 600 > 500: scale 500 / 300
    assert im_scale == pytest.approx(500 / 300)
    h, w = scaled_size(300, 100, im_scale)
    assert (h, w) == (500, 167)
    assert blob.shape == (1, 3, 512, 192)
    np.testing.assert_allclose(blob[0, :, 0, 0].numpy(), [40, 40, 40])
    assert blob[0, :, h:].abs().sum() == 0 and blob[0, :, :, w:].abs().sum() == 0


def test_split_per_device_pads_each_part(tmp_path):
    e1 = _entry(_write(tmp_path / "a.png", 80, 100), 80, 100, [[0, 0, 5, 5]])
    e2 = _entry(_write(tmp_path / "b.png", 40, 40), 40, 40, [[0, 0, 5, 5]])
    e3 = _entry(_write(tmp_path / "c.png", 200, 200), 200, 200, [[0, 0, 5, 5]])
    settings = BlobSettings(scales=(40,), max_size=1000, pixel_means=MEANS, stride=32)
    batch = get_minibatch([e1, e2, e3], settings, np.random.default_rng(0))
    assert batch["data"].shape == (3, 3, 64, 64)
    parts = split_per_device(batch, 2, stride=32)
    assert [p["data"].shape for p in parts] == [(2, 3, 64, 64), (1, 3, 64, 64)]
    parts = split_per_device({**batch, "data": batch["data"][[1, 0, 2]], "im_info": batch["im_info"][[1, 0, 2]],
                              "roidb": [batch["roidb"][i] for i in (1, 0, 2)]}, 3, stride=32)
    assert [tuple(p["data"].shape) for p in parts] == [(1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64)]
    small = split_per_device(get_minibatch([e2, e2], settings, np.random.default_rng(0)), 2, stride=16)
    assert [tuple(p["data"].shape[2:]) for p in small] == [(48, 48), (48, 48)]  # 40 -> 48 (16) not 64 (32)
    torch.testing.assert_close(parts[1]["data"], batch["data"][:1])
    assert parts[2]["roidb"][0] is batch["roidb"][2]
    with pytest.raises(ValueError, match="cannot split"):
        split_per_device(batch, 4, stride=32)


def test_aspect_crop_portrait():
    h, w = 400, 100
    im = np.repeat(np.arange(h, dtype=np.float32)[:, None, None], 3, axis=2).repeat(w, axis=1)
    entry = {"boxes": np.array([[10, 150, 50, 200], [0, 390, 20, 399]], np.float32),
             "gt_classes": np.array([1, 2]), "is_crowd": np.array([False, False]),
             "segms": [[np.array([10, 150, 50, 150, 50, 200], np.float32)], np.ones((h, w), np.uint8)],
             "gt_keypoints": np.array([[[20, 160, 2]], [[5, 395, 2]]], np.float32)}
    for seed in range(5):
        out_im, out = crop_to_aspect(im, entry, 0.5, 2.0, np.random.default_rng(seed))
        assert out_im.shape == (200, 100, 3)  # ceil(100 / 0.5)
        start = int(out_im[0, 0, 0])
        # gt extent y in [150, 399] is taller than the crop: start in [150, 150 + (250 - 200) // 2]
        assert 150 <= start <= 175
        np.testing.assert_array_equal(out["boxes"][0], [10, max(150 - start, 0), 50, 200 - start])
        np.testing.assert_array_equal(out["segms"][0][0], [10, 150 - start, 50, 150 - start, 50, 200 - start])
        kp = [[20, 160 - start, 2]] if start <= 160 else [[0, 0, 0]]  # outside the crop: invisible
        np.testing.assert_array_equal(out["gt_keypoints"][0], kp)
        # the second box falls below the window (clamped to zero height): dropped with its mask and keypoints
        assert len(out["boxes"]) == 1 and len(out["segms"]) == 1 and out["gt_classes"].tolist() == [1]
    untouched_im, untouched = crop_to_aspect(im[:150], entry, 0.5, 2.0, np.random.default_rng(0))
    assert untouched_im.shape == (150, 100, 3) and untouched is entry
