"""Precomputed proposal files: Detectron's pickle layout, cleaning, roidb attachment, flip / scale / crop."""

from __future__ import annotations

import json
import pickle

import numpy as np
import py2_pickle
import pytest

from pydetectron.data.proposals import attach_proposals, clean_proposals, read_proposal_file, write_proposal_file
from pydetectron.data.roidb import (
    OverlapThresholds,
    combined_roidb_for_training,
    flip_entry,
    is_valid_for_training,
)
from pydetectron.data.transforms import crop_to_aspect, scale_targets


@pytest.fixture
def hand_dataset(tmp_path, monkeypatch, hand_coco) -> str:
    """Catalog name of the hand-written json: images 1 (gt), 2 (a crowd only) and 3 (nothing)."""
    ann = tmp_path / "hand.json"
    ann.write_text(json.dumps(hand_coco()))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"handset:\n  image_dir: img\n  ann_file: {ann}\n")
    monkeypatch.setenv("PYDETECTRON_DATASETS", str(catalog))
    return "handset"


def _python2_style_pickle(path, data) -> None:
    """What Detectron (Python 2) wrote: protocol 2 with byte-string keys and buffers (tests/py2_pickle.py)."""
    path.write_bytes(py2_pickle.dumps(data))


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "rpn_proposals.pkl"
    boxes = [np.array([[1, 2, 30, 40], [5, 5, 9, 9]], np.float32), np.zeros((0, 4), np.float32)]
    write_proposal_file(path, [7, 3], boxes, [np.array([0.9, 0.1]), np.zeros(0)], "MODEL: {}")
    read = read_proposal_file(path)
    assert sorted(read) == [3, 7]
    np.testing.assert_array_equal(read[7], boxes[0])
    assert read[3].shape == (0, 4)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # pickle protocol 2, as Detectron's save_object writes
        f.seek(0)
        raw = pickle.load(f)
    assert set(raw) == {"boxes", "scores", "ids", "cfg"} and raw["ids"] == [7, 3]


def test_reads_the_old_indexes_field_and_python2_pickles(tmp_path):
    path = tmp_path / "old.pkl"
    _python2_style_pickle(path, {"boxes": [[[0.0, 0.0, 10.0, 10.0]]], "scores": [[1.0]], "indexes": [42]})
    np.testing.assert_array_equal(read_proposal_file(path)[42], [[0, 0, 10, 10]])


@pytest.mark.parametrize("data, message", [
    ([1, 2], "not a dict with 'boxes'"),
    ({"boxes": []}, "no 'ids'"),
    ({"boxes": [np.zeros((1, 4))], "ids": [1, 2]}, "1 box arrays for 2 ids"),
    ({"boxes": [np.zeros((2, 5))], "ids": [1]}, r"image 1 has boxes of shape \(2, 5\)"),
    ({"boxes": [np.zeros((1, 4))] * 2, "ids": [4, 4]}, "lists image 4 twice"),
])
def test_bad_files_name_the_file_and_the_fault(tmp_path, data, message):
    path = tmp_path / "bad.pkl"
    _python2_style_pickle(path, data)
    with pytest.raises(ValueError, match=message) as err:
        read_proposal_file(path)
    assert "bad.pkl" in str(err.value)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.pkl"
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="broken.pkl"):
        read_proposal_file(path)


def test_clean_clips_dedups_drops_small_and_limits():
    boxes = np.array([
        [-5, -5, 20, 20],     # clipped to [0, 0, 20, 20]
        [0.2, 0, 20, 19.8],   # the same box after rounding: dropped
        [10, 10, 12, 30],     # 3 px wide (inclusive) > 2: kept
        [10, 10, 11, 30],     # 2 px wide: dropped (Detectron keeps sides > min_size)
        [30, 30, 90, 90],     # clipped to the 50 x 40 image: [30, 30, 49, 39]
        [1, 1, 8, 8],
    ], np.float32)
    cleaned = clean_proposals(boxes, height=40, width=50)
    np.testing.assert_array_equal(cleaned, [[0, 0, 20, 20], [10, 10, 12, 30], [30, 30, 49, 39], [1, 1, 8, 8]])
    np.testing.assert_array_equal(clean_proposals(boxes, 40, 50, limit=2), cleaned[:2])


def test_attach_needs_every_image(hand_dataset, tmp_path):
    from pydetectron.data.coco import CocoDataset

    roidb = CocoDataset(hand_dataset).get_roidb()
    path = tmp_path / "props.pkl"
    write_proposal_file(path, [1, 2], [np.array([[0, 0, 9, 9]])] * 2, [np.ones(1)] * 2)
    with pytest.raises(ValueError, match=r"no proposals for 1 of 3 images, e.g. image ids \[3\]"):
        attach_proposals(roidb, path)


def _entry_with_proposals() -> dict:
    return {"image": "x.jpg", "id": 1, "width": 100, "height": 50, "flipped": False,
            "boxes": np.array([[10, 10, 29, 19]], np.float32), "gt_classes": np.array([1]),
            "is_crowd": np.array([False]), "segms": [[np.array([10, 10, 29, 10, 29, 19], np.float32)]],
            "gt_keypoints": None, "has_visible_keypoints": False,
            "proposals": np.array([[0, 0, 9, 9], [60, 5, 99, 49]], np.float32)}


def test_flip_and_scale_move_proposals_like_boxes():
    flipped = flip_entry(_entry_with_proposals(), None)
    np.testing.assert_array_equal(flipped["proposals"], [[90, 0, 99, 9], [0, 5, 39, 49]])  # x' = W - 1 - x
    scaled = scale_targets(flipped, 2.0, (100, 200))
    np.testing.assert_array_equal(scaled["proposals"], [[180, 0, 198, 18], [0, 10, 78, 98]])


def test_aspect_crop_shifts_clamps_and_drops_proposals():
    entry = _entry_with_proposals()
    entry["boxes"] = np.array([[60, 10, 79, 19]], np.float32)
    entry["proposals"] = np.array([[0, 0, 3, 9], [60, 5, 99, 49]], np.float32)
    image = np.zeros((50, 100, 3), np.float32)  # ratio 2 > 1.5: the width is cropped to ceil(50 * 1.5) = 75
    cropped, out = crop_to_aspect(image, entry, 0.5, 1.5, np.random.default_rng(0))
    assert cropped.shape[1] == 75
    start = 60 - out["boxes"][0, 0]  # the crop keeps the gt box, so start <= 60 - 4
    # [0, 3] falls left of the window and flattens to a line (dropped); [60, 99] is shifted and clamped
    np.testing.assert_array_equal(out["proposals"], [[60 - start, 5, 74, 49]])


def test_proposals_make_an_image_without_foreground_trainable():
    """Detectron's filter: some box must be foreground or background; proposals count with their gt IoU,
    or -1 (neither) inside a crowd region."""
    entry = _entry_with_proposals()  # gt [10, 10, 29, 19]; proposals away from it: IoU 0, background
    entry["is_crowd"] = np.array([True])
    assert is_valid_for_training(entry, keypoints_on=False)
    assert not is_valid_for_training(entry, False, OverlapThresholds(bg_lo=0.1))  # IoU 0 is below BG_THRESH_LO
    entry["proposals"] = np.array([[12, 11, 20, 18], [10, 10, 29, 19]], np.float32)  # inside the crowd region
    assert not is_valid_for_training(entry, keypoints_on=False)
    assert is_valid_for_training(entry, False, OverlapThresholds(crowd_filter=0.0))  # no filter: IoU 1, foreground
    entry["proposals"] = np.zeros((0, 4), np.float32)
    assert not is_valid_for_training(entry, keypoints_on=False)


def test_training_roidb_reads_one_file_per_dataset(hand_dataset, tmp_path):
    path = tmp_path / "props.pkl"
    write_proposal_file(path, [3, 1, 2], [np.array([[0, 0, 30, 30]])] * 3, [np.ones(1)] * 3)
    roidb, _ = combined_roidb_for_training([hand_dataset], use_flipped=True, proposal_files=[str(path)])
    assert all(len(e["proposals"]) == 1 for e in roidb)
    # image 3 has no gt at all, yet its proposal (background) keeps it in, as Detectron's filter does
    assert sorted({e["id"] for e in roidb}) == [1, 2, 3]
    with pytest.raises(ValueError, match="1 files for 2 datasets"):
        combined_roidb_for_training([hand_dataset, hand_dataset], proposal_files=[str(path)])
