"""Fixtures for the data tests: an isolated cache dir, a hand-written COCO json, a tiny shapes dataset."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pydetectron.data.shapes import make_shapes_dataset


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYDETECTRON_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PYDETECTRON_DATASETS", raising=False)


def _write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _hand_coco() -> dict:
    """Image 1 (100 x 80) holds every interesting annotation; image 2 only a crowd; image 3 nothing.

    Categories are listed as ids 3, 1, 7, so the contiguous ids are 3 -> 1, 1 -> 2, 7 -> 3 (json order).
    """
    # Uncompressed RLE of a 10 x 10 block at the top-left of the 80 x 100 image (column-major runs, zeros first).
    counts = [0] + [10, 70] * 9 + [10, 70 + 90 * 80]
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 50, "height": 60},
            {"id": 3, "file_name": "c.jpg", "width": 40, "height": 40},
        ],
        "categories": [{"id": 3, "name": "three"}, {"id": 1, "name": "one"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0,
             "segmentation": [[10, 20, 39, 20, 39, 59, 10, 59], [1, 2, 3, 4]]},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [90, 70, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": [[90, 70, 99, 70, 99, 79]]},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 0, "iscrowd": 0,
             "segmentation": []},
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [50, 50, 1, 5], "area": 5, "iscrowd": 0,
             "segmentation": []},
            {"id": 14, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1,
             "segmentation": {"size": [80, 100], "counts": counts}},
            {"id": 15, "image_id": 1, "category_id": 1, "bbox": [-5, -5, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[0, 0, 4, 0, 4, 4]]},
            {"id": 16, "image_id": 1, "category_id": 7, "bbox": [60, 10, 10, 10], "area": 100, "iscrowd": 0,
             "ignore": 1, "segmentation": []},
            {"id": 20, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1,
             "segmentation": {"size": [60, 50], "counts": [0, 10, 2990]}},
        ],
    }


def _hand_keypoint_coco() -> dict:
    return {
        "images": [{"id": 5, "file_name": "k.jpg", "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"],
                        "skeleton": [[1, 2], [1, 3]]}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": [[10, 10, 29, 10, 29, 29]], "keypoints": [20, 12, 2, 15, 11, 1, 25, 11, 0],
             "num_keypoints": 2},
        ],
    }


def _write_images(folder, sizes: dict) -> None:
    """Solid-colour jpgs: name -> (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(folder / name), np.full((h, w, 3), 128, np.uint8))


@pytest.fixture
def hand_coco():
    """Factory of fresh copies of the hand-written json (tests edit them)."""
    return _hand_coco


@pytest.fixture
def hand_keypoint_coco():
    return _hand_keypoint_coco


@pytest.fixture
def write_json():
    return _write_json


@pytest.fixture
def write_images():
    return _write_images


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, num_train=24, num_val=6, seed=0)
    return root
