"""roidb from a hand-written COCO json vs values computed by hand (Detectron's json_dataset semantics)."""

from __future__ import annotations

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest

from pydetectron.config import get_cfg
from pydetectron.data import coco as coco_mod
from pydetectron.data.catalog import DatasetSpec
from pydetectron.data.coco import AnnotationError, CocoDataset
from pydetectron.data.roidb import combined_roidb_for_training, combined_roidb_from_cfg, filter_for_training


def _dataset(tmp_path, data, name="hand") -> CocoDataset:
    ann = tmp_path / f"{name}.json"
    ann.write_text(json.dumps(data))
    return CocoDataset(DatasetSpec(name, str(tmp_path / "img"), str(ann)))


def test_roidb_values_by_hand(tmp_path, hand_coco):
    ds = _dataset(tmp_path, hand_coco())
    roidb = ds.get_roidb()
    meta = ds.meta
    # json order, not sorted: 3 -> 1, 1 -> 2, 7 -> 3
    assert meta.json_category_id_to_contiguous_id == {3: 1, 1: 2, 7: 3}
    assert meta.contiguous_category_id_to_json_id == {1: 3, 2: 1, 3: 7}
    assert meta.classes == ["__background__", "three", "one", "seven"]
    e = roidb[0]
    assert e["image"] == os.path.join(str(tmp_path / "img"), "a.jpg")
    assert (e["id"], e["width"], e["height"], e["flipped"]) == (1, 100, 80, False)
    # kept: 10, 11 (clipped), 14 (crowd), 15 (clipped); 12 zero area and 13 one-pixel wide are invalid;
    # 16 is ignored (skipped, not counted as invalid).
    expected = np.array([[10, 20, 39, 59], [90, 70, 99, 79], [0, 0, 9, 9], [0, 0, 4, 4]], np.float32)
    np.testing.assert_array_equal(e["boxes"], expected)
    assert e["boxes"].dtype == np.float32
    np.testing.assert_array_equal(e["gt_classes"], [1, 3, 2, 2])
    np.testing.assert_array_equal(e["is_crowd"], [False, False, True, False])
    np.testing.assert_array_equal(e["seg_areas"], [1200, 400, 100, 100])
    assert ds.num_invalid == 2
    # polygons with < 3 points are dropped; the crowd RLE becomes a compressed RLE of the same mask
    assert len(e["segms"][0]) == 1
    np.testing.assert_array_equal(e["segms"][0][0], [10, 20, 39, 20, 39, 59, 10, 59])
    crowd = mask_util.decode(e["segms"][2])
    assert crowd.shape == (80, 100) and crowd.sum() == 100 and crowd[:10, :10].all()
    assert e["gt_keypoints"] is None
    assert len(roidb[1]["boxes"]) == 1 and roidb[1]["is_crowd"].all()
    assert roidb[2]["boxes"].shape == (0, 4)


def test_gt_min_area(tmp_path, hand_coco):
    ds = _dataset(tmp_path, hand_coco())
    e = ds.get_roidb(gt_min_area=150)[0]
    np.testing.assert_array_equal(e["gt_classes"], [1, 3])  # the two with area >= 150
    assert ds.num_invalid == 0  # Detectron skips area < GT_MIN_AREA before the validity check


def test_filter_for_training_drops_crowd_only_and_empty(tmp_path, hand_coco):
    roidb = _dataset(tmp_path, hand_coco()).get_roidb()
    assert [e["id"] for e in filter_for_training(roidb)] == [1]


def test_keypoints_parsed(tmp_path, hand_keypoint_coco):
    ds = _dataset(tmp_path, hand_keypoint_coco())
    e = ds.get_roidb()[0]
    assert ds.meta.keypoint_names == ["nose", "left_eye", "right_eye"]
    assert ds.meta.keypoint_flip_map == {"left_eye": "right_eye"}
    np.testing.assert_array_equal(ds.meta.keypoint_flip_permutation(), [0, 2, 1])
    np.testing.assert_array_equal(e["gt_keypoints"], [[[20, 12, 2], [15, 11, 1], [25, 11, 0]]])
    assert e["gt_keypoints"].dtype == np.float32 and e["has_visible_keypoints"]


def test_combined_roidb_flipped_and_filtered(tmp_path, monkeypatch, hand_coco):
    ann = tmp_path / "hand.json"
    ann.write_text(json.dumps(hand_coco()))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"handset:\n  image_dir: img\n  ann_file: {ann}\n")
    monkeypatch.setenv("PYDETECTRON_DATASETS", str(catalog))
    roidb, meta = combined_roidb_for_training(["handset"], use_flipped=True)
    assert [(e["id"], e["flipped"]) for e in roidb] == [(1, False), (1, True)]
    np.testing.assert_array_equal(roidb[1]["boxes"][0], [100 - 1 - 39, 20, 100 - 1 - 10, 59])
    with pytest.raises(ValueError, match="define no keypoints"):
        combined_roidb_for_training(["handset"], keypoints_on=True)
    cfg = get_cfg()
    cfg.TRAIN.DATASETS = ("handset", "handset")
    cfg.TRAIN.USE_FLIPPED = False
    from_cfg, _ = combined_roidb_from_cfg(cfg)
    assert [(e["id"], e["flipped"]) for e in from_cfg] == [(1, False), (1, False)]


# ---------------------------------------------------------------------------------------------- bad input
def _expect_error(tmp_path, data, *fragments):
    ds = _dataset(tmp_path, data)
    with pytest.raises(AnnotationError) as info:
        ds.get_roidb()
    for fragment in (str(tmp_path / "hand.json"),) + fragments:
        assert fragment in str(info.value)


def test_missing_bbox_names_file_image_and_field(tmp_path, hand_coco):
    data = hand_coco()
    del data["annotations"][1]["bbox"]
    _expect_error(tmp_path, data, "image id 1", "'bbox'", "missing")


def test_missing_image_width(tmp_path, hand_coco):
    data = hand_coco()
    del data["images"][1]["width"]
    _expect_error(tmp_path, data, "image id 2", "'width'")


def test_bad_bbox_and_unknown_category(tmp_path, hand_coco):
    data = hand_coco()
    data["annotations"][0]["bbox"] = [1, 2, 3]
    _expect_error(tmp_path, data, "image id 1", "'bbox'")
    data = hand_coco()
    data["annotations"][-1]["category_id"] = 99
    _expect_error(tmp_path, data, "image id 2", "'category_id'", "99")


def test_annotation_for_unknown_image_and_bad_segmentation(tmp_path, hand_coco):
    data = hand_coco()
    data["annotations"][0]["image_id"] = 42
    _expect_error(tmp_path, data, "image id 42", "'image_id'")
    data = hand_coco()
    data["annotations"][0]["segmentation"] = [["a", "b"]]
    _expect_error(tmp_path, data, "image id 1", "'segmentation'")
    data = hand_coco()
    data["annotations"][4]["segmentation"]["size"] = [10, 10]
    _expect_error(tmp_path, data, "image id 1", "'segmentation'", "RLE size")


@pytest.mark.parametrize("segmentation, message", [
    ([[1, 2, 3, 4]], "no polygon has at least 3 points (coordinates per polygon: [4])"),
    ([[1, 2, 3, 4], []], "no polygon has at least 3 points (coordinates per polygon: [4, 0])"),
    ([[10, 20, 39, 20, 39, 59, 10]], "polygon #0 has an odd number of coordinates (7)"),
    ([[10, 20, 39, 20, 39, 59], [[1, 2], [3, 4], [5, 6]]], "polygon #1 must be a flat list of numbers"),
    ([10, 20, 39, 20, 39, 59], "polygon #0 must be a flat list of numbers"),
    ("polygon", "must be a list of polygons or an RLE {size, counts}, got str"),
])
def test_malformed_polygons_name_file_image_and_annotation(tmp_path, hand_coco, segmentation, message):
    data = hand_coco()
    data["annotations"][1]["segmentation"] = segmentation  # annotation id 11 of image 1
    _expect_error(tmp_path, data, "image id 1", "'segmentation'", "annotation id 11", message)


def test_short_polygons_beside_valid_ones_are_dropped_as_detectron_does(tmp_path, hand_coco):
    segms = _dataset(tmp_path, hand_coco()).get_roidb()[0]["segms"]
    assert [len(p) for p in segms[0]] == [8]  # annotation 10's [1, 2, 3, 4] is gone, its square kept


def test_mask_training_needs_every_object_segmented(tmp_path, monkeypatch, hand_coco):
    data = hand_coco()
    data["annotations"][1]["segmentation"] = []  # a box-only annotation: fine for boxes, not for masks
    ann = tmp_path / "boxes_only.json"
    ann.write_text(json.dumps(data))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"boxes_only:\n  image_dir: img\n  ann_file: {ann}\n")
    monkeypatch.setenv("PYDETECTRON_DATASETS", str(catalog))
    roidb, _ = combined_roidb_for_training(("boxes_only",), use_flipped=False)
    assert any(isinstance(s, list) and not s for e in roidb for s in e["segms"])
    with pytest.raises(AnnotationError) as info:
        combined_roidb_for_training(("boxes_only",), use_flipped=False, masks_on=True)
    for fragment in (str(ann), "image id 1", "'segmentation'", "object #1", "MODEL.MASK_ON"):
        assert fragment in str(info.value)


def test_crowd_flag_must_be_0_or_1(tmp_path, hand_coco):
    data = hand_coco()
    data["annotations"][1]["iscrowd"] = "0"  # bool("0") is True: it would silently become a crowd region
    _expect_error(tmp_path, data, "image id 1", "'iscrowd'", "must be 0 or 1, got '0'")


def test_bad_keypoint_values_and_skeleton(tmp_path, hand_keypoint_coco):
    data = hand_keypoint_coco()
    data["annotations"][0]["keypoints"] = [20, 12, 2, 15, "x", 1, 25, 11, 0]
    _expect_error(tmp_path, data, "image id 5", "'keypoints'", "annotation id 1", "must be numbers")
    data = hand_keypoint_coco()
    data["categories"][0]["skeleton"] = [[1, 2], [1, 4]]
    _expect_error(tmp_path, data, "'skeleton'", "[1, 4] is not a pair of 1-based keypoint indices in 1..3")
    data = hand_keypoint_coco()
    data["categories"][0]["oks_sigmas"] = [0.1, "a", 0.1]
    _expect_error(tmp_path, data, "'oks_sigmas'", "positive numbers")


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="not valid JSON") as info:
        CocoDataset(DatasetSpec("hand", str(tmp_path), str(path))).get_roidb()
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(DatasetSpec("x", str(tmp_path), str(tmp_path / "nope.json"))).get_roidb()


def test_keypoint_count_mismatch(tmp_path, hand_keypoint_coco):
    data = hand_keypoint_coco()
    data["annotations"][0]["keypoints"] = [1, 2, 2]
    _expect_error(tmp_path, data, "image id 5", "'keypoints'", "expected 3 x 3")


# ---------------------------------------------------------------------------------------------- cache
def test_cache_hit_and_invalidation(tmp_path, monkeypatch, hand_coco):
    calls = []
    real = coco_mod.parse_coco_json

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(coco_mod, "parse_coco_json", counting)
    ds = _dataset(tmp_path, hand_coco())
    first = ds.get_roidb()
    second_ds = CocoDataset(ds.spec)
    second = second_ds.get_roidb()
    assert len(calls) == 1, "the second load must come from the cache"
    assert list(ds.cache_dir.glob("*.pkl")) and second_ds.num_invalid == 2
    np.testing.assert_array_equal(first[0]["boxes"], second[0]["boxes"])
    assert second_ds.meta.json_category_id_to_contiguous_id == {3: 1, 1: 2, 7: 3}
    # a changed json (new size and mtime) is parsed again
    data = hand_coco()
    data["annotations"] = data["annotations"][:2]
    (tmp_path / "hand.json").write_text(json.dumps(data) + " " * 10)
    os.utime(tmp_path / "hand.json", ns=(1, 1))
    third = CocoDataset(ds.spec).get_roidb()
    assert len(calls) == 2 and len(third[0]["boxes"]) == 2


def _assert_same_roidb(a_roidb, b_roidb):
    assert len(a_roidb) == len(b_roidb)
    for a, b in zip(a_roidb, b_roidb):
        assert a.keys() == b.keys()
        for key, value in a.items():
            other = b[key]
            if key == "segms":
                assert len(value) == len(other)
                for x, y in zip(value, other):
                    if isinstance(x, dict):
                        assert x == y
                    else:
                        assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))
            elif isinstance(value, np.ndarray):
                assert value.dtype == other.dtype and np.array_equal(value, other), key
            else:
                assert value == other, key


def test_cache_round_trip_is_exact(tmp_path, hand_coco, hand_keypoint_coco):
    for name, data in (("hand", hand_coco()), ("kp", hand_keypoint_coco())):
        ds = _dataset(tmp_path, data, name=name)
        parsed = ds.get_roidb(use_cache=False)
        ds.get_roidb()  # writes the cache
        cached = CocoDataset(ds.spec).get_roidb()
        assert ds.cache_path(-1.0).is_file()
        _assert_same_roidb(parsed, cached)
