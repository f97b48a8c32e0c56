"""detectron2 mode's data and evaluation conventions, each checked against values worked out by hand from
detectron2's source (ResizeShortestEdge.get_output_shape, ResizeTransform, HFlipTransform, load_coco_json,
transform_keypoint_annotations, filter_empty_instances, instances_to_coco_json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pydetectron.config import ConfigError, assert_and_infer_cfg, get_cfg
from pydetectron.data import detectron2_transforms as d2
from pydetectron.data.coco import parse_coco_json
from pydetectron.data.minibatch import BlobSettings, draw_scale, input_size, prepare_sample, prepare_test_image
from pydetectron.data.roidb import flip_entry
from pydetectron.evaluation.coco_results import image_results


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("hw, short, max_size, expected", [
    ((480, 640), 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67 -> 1067
    ((640, 480), 800, 1333, (1067, 800)),
    ((300, 1000), 800, 1333, (400, 1333)),  # long side capped: 800 * 1333 / 2666.67 = 399.9 -> 400
    ((600, 1000), 800, 1333, (800, 1333)),  # 1333.33 > 1333: capped, 799.8 + 0.5 -> 800
    ((375, 500), 600, 1000, (600, 800)),
    ((333, 500), 600, 1000, (600, 901)),  # 500 * 600 / 333 = 900.9 -> 901
    ((10, 10), 800, 1333, (800, 800)),
])
def test_resize_output_shape_rounds_as_detectron2(hw, short, max_size, expected):
    assert d2.resize_output_shape(*hw, short, max_size) == expected


def test_where_detectron2_rounding_differs_from_detectrons():
    """Detectron rounds h * im_scale half to even (cv2 / Python round); detectron2 rounds each side half up."""
    from pydetectron.data.minibatch import scaled_size
    from pydetectron.data.transforms import compute_im_scale

    h, w = 800, 1001  # long side 1001 * 400 / 800 = 500.5
    assert scaled_size(h, w, compute_im_scale(h, w, 400, 1000)) == (400, 500)
    assert d2.resize_output_shape(h, w, 400, 1000) == (400, 501)
    assert d2.resize_scale(599, 999, 800, 1334) == pytest.approx(1334 / 999)  # capped: the scale is max / long


def test_resize_image_is_pil_bilinear_on_uint8():
    row = np.array([[[0, 0, 0], [100, 200, 40]]], dtype=np.uint8)  # (1, 2, 3)
    out = d2.resize_image(row, 1, 4)
    # PIL's bilinear upsampling x2: output centres at 0.25, 0.75, 1.25, 1.75 input pixels, weights clipped to
    # the image and renormalised: [a, (3a + b) / 4, (a + 3b) / 4, b]
    np.testing.assert_array_equal(out[0, :, 0], [0, 25, 75, 100])
    np.testing.assert_array_equal(out[0, :, 1], [0, 50, 150, 200])
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)


# ---------------------------------------------------------------------------------------------- reading
def test_read_image_applies_exif_orientation_and_gives_bgr(tmp_path):
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red, top-left as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 270 (90 degrees clockwise)
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    out = d2.read_image_pil(str(path))
    assert out.shape == (3, 2, 3)  # height and width swapped
    assert out[0, 1].tolist() == [0, 0, 255]  # the red pixel moved to top-right, in BGR
    with pytest.raises(FileNotFoundError, match="nope.png"):
        d2.read_image_pil(str(tmp_path / "nope.png"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="bad.jpg"):
        d2.read_image_pil(str(tmp_path / "bad.jpg"))


# ---------------------------------------------------------------------------------------------- annotations
def _entry(**over):
    entry = {
        "image": "x.png", "id": 7, "width": 100, "height": 50, "flipped": False,
        "boxes": np.array([[10, 10, 60, 40], [90, 0, 100, 50], [20, 5, 30, 15], [50, 10, 50.000001, 20]],
                          dtype=np.float32),
        "gt_classes": np.array([1, 2, 3, 1]),
        "is_crowd": np.array([False, False, True, False]),
        "segms": [[np.array([10, 10, 60, 10, 60, 40], dtype=np.float32)], [], [], []],
        "gt_keypoints": np.array([[[20, 20, 2], [99, 49, 1], [0, 0, 0]]] * 4, dtype=np.float32),
    }
    entry["gt_keypoints"][1, 0] = [-5, 10, 2]  # outside the image
    entry.update(over)
    return entry


def test_targets_are_scaled_per_axis_clipped_and_filtered():
    out = d2.scale_targets(_entry(), (25, 40))  # sx = 0.4, sy = 0.5
    np.testing.assert_allclose(out["boxes"], [[4, 5, 24, 20], [36, 0, 40, 25]])  # crowd and empty box dropped
    assert out["gt_classes"].tolist() == [1, 2] and out["is_crowd"].tolist() == [False, False]
    np.testing.assert_allclose(out["segms"][0][0], [4, 5, 24, 5, 24, 20])
    np.testing.assert_allclose(out["gt_keypoints"][0], [[8, 10, 2], [39.6, 24.5, 1], [0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(out["gt_keypoints"][1], [[0, 0, 0], [39.6, 24.5, 1], [0, 0, 0]], rtol=1e-6)
    with pytest.raises(ValueError, match="precomputed proposals"):
        d2.scale_targets(_entry(proposals=np.zeros((1, 4), np.float32)), (25, 40))


def test_flip_is_w_minus_x():
    perm = np.array([0, 2, 1])
    out = flip_entry(_entry(), perm, legacy_plus_one=False)
    np.testing.assert_allclose(out["boxes"][0], [40, 10, 90, 40])  # x1' = 100 - 60, x2' = 100 - 10
    np.testing.assert_allclose(out["segms"][0][0], [90, 10, 40, 10, 40, 40])
    np.testing.assert_allclose(out["gt_keypoints"][0], [[80, 20, 2], [100, 0, 0], [1, 49, 1]])
    detectron = flip_entry(_entry(), perm)
    np.testing.assert_allclose(detectron["boxes"][0], [39, 10, 89, 40])  # Detectron: W - 1 - x


def _write_coco(tmp_path, anns, keypoints=False):
    cats = [{"id": 1, "name": "person", "keypoints": ["a", "b"], "skeleton": []}] if keypoints else [
        {"id": 1, "name": "thing"}]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}], "categories": cats,
            "annotations": [dict({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0}, **a)
                            for i, a in enumerate(anns)]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_coco_boxes_and_keypoints_load_as_detectron2_reads_them(tmp_path):
    anns = [{"bbox": [10, 20, 30, 25], "area": 750.0, "keypoints": [10, 20, 2, 0, 0, 0]},
            {"bbox": [90, 0, 20, 10], "area": 200.0, "keypoints": [0, 0, 0, 0, 0, 0]},
            {"bbox": [5, 5, 0.5, 10], "area": 5.0, "keypoints": [0, 0, 0, 0, 0, 0]}]
    path = _write_coco(tmp_path, anns, keypoints=True)
    _, d2_roidb, d2_invalid = parse_coco_json(path, str(tmp_path), conventions="detectron2")
    np.testing.assert_allclose(d2_roidb[0]["boxes"], [[10, 20, 40, 45], [90, 0, 100, 10], [5, 5, 5.5, 15]])
    np.testing.assert_allclose(d2_roidb[0]["gt_keypoints"][0], [[10.5, 20.5, 2], [0.5, 0.5, 0]])
    assert d2_invalid == 0
    _, roidb, invalid = parse_coco_json(path, str(tmp_path))
    np.testing.assert_allclose(roidb[0]["boxes"], [[10, 20, 39, 44], [90, 0, 99, 9]])  # the 0.5 px box dropped
    assert invalid == 1
    with pytest.raises(ValueError, match="conventions"):
        parse_coco_json(path, str(tmp_path), conventions="d2")


# ---------------------------------------------------------------------------------------------- images in
def test_range_scale_sampling_draws_every_integer_in_lo_hi():
    settings = BlobSettings(scales=(3, 6), max_size=100, pixel_means=(0, 0, 0), scale_sampling="range")
    rng = np.random.default_rng(0)
    assert {draw_scale(settings, rng) for _ in range(400)} == {3, 4, 5, 6}
    choice = BlobSettings(scales=(3, 6), max_size=100, pixel_means=(0, 0, 0))
    assert {draw_scale(choice, rng) for _ in range(100)} == {3, 6}
    with pytest.raises(ValueError, match="range"):
        BlobSettings(scales=(3, 6, 9), max_size=100, pixel_means=(0, 0, 0), scale_sampling="range")
    cfg = get_cfg()
    cfg.TRAIN.SCALE_SAMPLING, cfg.TRAIN.SCALES = "range", (800, 640)
    with pytest.raises(ConfigError, match="lo <= hi"):
        assert_and_infer_cfg(cfg)



def _cfg(**over):
    cfg = get_cfg()
    cfg.MODEL.CONVENTIONS = "detectron2"
    cfg.TRAIN.SCALES, cfg.TRAIN.MAX_SIZE, cfg.TEST.SCALE, cfg.TEST.MAX_SIZE = (30,), 100, 30, 100
    for key, value in over.items():
        cfg[key] = value
    return cfg


def test_blob_settings_follow_the_conventions():
    assert BlobSettings.from_cfg(_cfg(), train=True).detectron2
    assert not BlobSettings.from_cfg(get_cfg(), train=True).detectron2
    cfg = _cfg()
    cfg.TRAIN.ASPECT_CROPPING = True
    with pytest.raises(ValueError, match="ASPECT_CROPPING"):
        BlobSettings.from_cfg(cfg, train=True)


def test_training_sample_resizes_then_flips_then_normalises(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    cfg = _cfg()
    cfg.PIXEL_MEANS = np.array([[[10.0, 20.0, 30.0]]])
    settings = BlobSettings.from_cfg(cfg, train=True)
    entry = flip_entry(_entry(image=str(tmp_path / "a.png")), np.array([0, 2, 1]), legacy_plus_one=False)
    sample = prepare_sample(entry, settings, np.random.default_rng(0))
    assert sample.image.shape == (30, 60, 3) and sample.im_scale == pytest.approx(0.6)
    expected = np.asarray(Image.fromarray(pixels).resize((60, 30), Image.Resampling.BILINEAR))[:, ::-1, ::-1]
    np.testing.assert_array_equal(sample.image, expected.astype(np.float32) - np.float32([10, 20, 30]))
    np.testing.assert_allclose(sample.entry["boxes"][0], [24, 6, 54, 24], rtol=1e-6)  # (100 - x) * 0.6


def test_test_image_size_is_the_resized_size():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cfg = _cfg()
    cfg.FPN.FPN_ON = True
    settings = BlobSettings.from_cfg(cfg, train=False)
    blob, im_scale = prepare_test_image(image, settings)
    h, w = input_size(37, 53, im_scale, settings)
    assert (h, w) == (30, 43)  # 53 * 30 / 37 = 42.97 -> 43
    assert blob.shape == (1, 3, 32, 64)  # padded to FPN.COARSEST_STRIDE
    resized = np.asarray(Image.fromarray(image).resize((43, 30), Image.Resampling.BILINEAR)).astype(np.float32)
    np.testing.assert_array_equal(blob[0, :, :30, :43].numpy(), (resized - settings.means).transpose(2, 0, 1))
    assert float(blob[0, :, 30:, :].abs().sum()) == 0 and float(blob[0, :, :, 43:].abs().sum()) == 0


# ---------------------------------------------------------------------------------------------- results out
def test_results_are_written_as_detectron2_writes_them():
    detections = {"boxes": np.array([[10.0, 20.0, 40.0, 45.0]]), "scores": np.array([0.9]),
                  "classes": np.array([1]), "keypoints": np.array([[[10.5, 20.5, 3.0], [0.5, 1.5, 1.0]]])}
    ours = image_results(5, detections, [0, 18], detectron2=True)
    assert ours["bbox"][0]["bbox"] == [10.0, 20.0, 30.0, 25.0] and ours["bbox"][0]["category_id"] == 18
    assert ours["keypoints"][0]["keypoints"][:2] == [10.0, 20.0] and ours["keypoints"][0]["keypoints"][3:5] == [0, 1]
    detectron = image_results(5, detections, [0, 18])
    assert detectron["bbox"][0]["bbox"] == [10.0, 20.0, 31.0, 26.0]
    assert detectron["keypoints"][0]["keypoints"][:2] == [10.5, 20.5]
