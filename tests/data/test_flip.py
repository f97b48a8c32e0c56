"""Horizontal flip of boxes, polygons, RLE masks and keypoints (Detectron: x -> W - 1 - x, left/right swap)."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util

from pydetectron.data.coco import DatasetMeta, keypoint_flip_map
from pydetectron.data.roidb import flip_entry
from pydetectron.data.transforms import flip_keypoints, flip_polygons, flip_rle


def _entry(width=100, height=80):
    mask = np.zeros((height, width), np.uint8)
    mask[5:20, 3:12] = 1
    mask[30, 90] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    return {
        "image": "x.jpg", "id": 1, "width": width, "height": height, "flipped": False,
        "boxes": np.array([[10, 20, 39, 59], [0, 0, 99, 79]], np.float32),
        "gt_classes": np.array([1, 2]), "is_crowd": np.array([False, True]),
        "segms": [[np.array([10, 20, 39, 20, 39, 59], np.float32)], rle],
        "gt_keypoints": np.array([[[20, 12, 2], [15, 11, 1], [25, 11, 0]],
                                  [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], np.float32),
        "has_visible_keypoints": True,
    }, mask


def test_flip_entry_by_hand():
    entry, mask = _entry()
    flipped = flip_entry(entry, np.array([0, 2, 1]))
    assert flipped["flipped"] and not entry["flipped"]
    np.testing.assert_array_equal(flipped["boxes"], [[60, 20, 89, 59], [0, 0, 99, 79]])
    np.testing.assert_array_equal(flipped["segms"][0][0], [89, 20, 60, 20, 60, 59])
    np.testing.assert_array_equal(mask_util.decode(flipped["segms"][1]), mask[:, ::-1])
    # nose stays; left_eye <- right_eye (v = 0: x forced to 0), right_eye <- left_eye
    np.testing.assert_array_equal(flipped["gt_keypoints"][0], [[79, 12, 2], [0, 11, 0], [84, 11, 1]])
    # the original entry is untouched
    np.testing.assert_array_equal(entry["boxes"][0], [10, 20, 39, 59])
    np.testing.assert_array_equal(entry["gt_keypoints"][0, 1], [15, 11, 1])


def test_double_flip_is_identity():
    entry, _ = _entry()
    perm = np.array([0, 2, 1])
    twice = flip_entry(flip_entry(entry, perm), perm)
    assert not twice["flipped"]
    np.testing.assert_array_equal(twice["boxes"], entry["boxes"])
    np.testing.assert_array_equal(twice["segms"][0][0], entry["segms"][0][0])
    assert twice["segms"][1]["counts"] == entry["segms"][1]["counts"]
    visible = entry["gt_keypoints"][..., 2] > 0
    np.testing.assert_array_equal(twice["gt_keypoints"][visible], entry["gt_keypoints"][visible])


def test_flip_primitives_against_reference():
    rng = np.random.default_rng(0)
    width = 37
    polys = [rng.uniform(0, 36, size=10).astype(np.float32) for _ in range(3)]
    for out, ref in zip(flip_polygons(polys, width), polys):
        np.testing.assert_allclose(out[0::2], width - 1 - ref[0::2])
        np.testing.assert_array_equal(out[1::2], ref[1::2])
    mask = (rng.uniform(size=(23, width)) > 0.6).astype(np.uint8)
    flipped = flip_rle(mask_util.encode(np.asfortranarray(mask)))
    np.testing.assert_array_equal(mask_util.decode(flipped), mask[:, ::-1])
    kps = rng.uniform(1, 30, size=(4, 5, 3)).astype(np.float32)
    kps[..., 2] = rng.integers(0, 3, size=(4, 5))
    perm = np.array([0, 2, 1, 4, 3])
    out = flip_keypoints(kps, perm, width)
    for k in range(5):
        src = kps[:, perm[k]]
        expected_x = np.where(src[:, 2] > 0, width - 1 - src[:, 0], 0)
        np.testing.assert_allclose(out[:, k, 0], expected_x)
        np.testing.assert_array_equal(out[:, k, 1:], src[:, 1:])


def test_coco_person_flip_map_matches_detectron():
    names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle"]
    expected = {f"left_{p}": f"right_{p}" for p in
                ("eye", "ear", "shoulder", "elbow", "wrist", "hip", "knee", "ankle")}
    assert keypoint_flip_map(names) == expected
    meta = DatasetMeta(["__background__", "person"], {1: 1}, {1: 1}, names, expected)
    perm = meta.keypoint_flip_permutation()
    assert perm[0] == 0 and [names[i] for i in perm[1:3]] == ["right_eye", "left_eye"]
    assert sorted(perm.tolist()) == list(range(17))
