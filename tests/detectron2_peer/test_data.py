"""detectron2 mode's data and evaluation side against detectron2's own code: read_image (EXIF), ResizeShortestEdge
(pixel-equal resize, output sizes), the flip, the annotation transforms and filters of DatasetMapper, and
instances_to_coco_json. Skips without detectron2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pydetectron.data import detectron2_transforms as ours
from pydetectron.data.roidb import flip_entry
from pydetectron.evaluation.coco_results import image_results

pytest.importorskip("detectron2")
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.structures import BoxMode, Instances  # noqa: E402


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 425), (333, 500), (37, 53), (800, 1001), (1, 7)])
@pytest.mark.parametrize("short, max_size", [(800, 1333), (600, 1000), (640, 1333), (30, 41)])
def test_resize_is_pixel_equal_to_resize_shortest_edge(hw, short, max_size):
    rng = np.random.default_rng(hash((hw, short)) % 2**32)
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    transform = T.ResizeShortestEdge(short, max_size).get_transform(image)
    theirs = transform.apply_image(image)
    resized, size_hw, _ = ours.prepare_image(image, short, max_size)
    assert size_hw == theirs.shape[:2] == (transform.new_h, transform.new_w)
    np.testing.assert_array_equal(resized, theirs)


def test_read_image_equals_detectron2s(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8))
    for orientation in (1, 3, 6, 8):
        exif = image.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        image.save(path, exif=exif, quality=90)
        np.testing.assert_array_equal(ours.read_image_pil(str(path)), utils.read_image(str(path), format="BGR"))


def _d2_annotations(entry):
    annos = []
    for box, cls, crowd, segm, kps in zip(entry["boxes"], entry["gt_classes"], entry["is_crowd"], entry["segms"],
                                          entry["gt_keypoints"]):
        annos.append({"bbox": box.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(cls),
                      "iscrowd": int(crowd), "segmentation": [p.tolist() for p in segm],
                      "keypoints": kps.reshape(-1).tolist()})
    return annos


@pytest.mark.parametrize("flip", [False, True])
def test_targets_equal_dataset_mappers(flip):
    rng = np.random.default_rng(3)
    width, height = 120, 80
    n = 12
    x1 = rng.uniform(-10, width, n)
    y1 = rng.uniform(-10, height, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0, 60, n), y1 + rng.uniform(0, 40, n)], 1).astype(np.float32)
    boxes[3, 2] = boxes[3, 0]  # an empty box
    kps = np.concatenate([rng.uniform(-5, 125, (n, 4, 2)), rng.integers(0, 3, (n, 4, 1))], 2).astype(np.float32)
    entry = {"image": "x", "id": 1, "width": width, "height": height, "flipped": False, "boxes": boxes,
             "gt_classes": rng.integers(0, 5, n), "is_crowd": rng.random(n) < 0.2,
             "segms": [[np.array([b[0], b[1], b[2], b[1], b[2], b[3]], dtype=np.float32)] for b in boxes],
             "gt_keypoints": kps}
    perm = np.array([1, 0, 3, 2])
    resize = T.ResizeTransform(height, width, 50, 77)
    transforms = T.TransformList([resize] + ([T.HFlipTransform(77)] if flip else []))
    annos = [utils.transform_instance_annotations(a, transforms, (50, 77), keypoint_hflip_indices=perm)
             for a in _d2_annotations(entry) if a["iscrowd"] == 0]
    instances = utils.filter_empty_instances(utils.annotations_to_instances(annos, (50, 77)))
    kept_kps = np.stack([a["keypoints"] for a in annos])  # annotations_to_instances keeps keypoints as given
    target = flip_entry(entry, perm, legacy_plus_one=False) if flip else entry
    mine = ours.scale_targets(target, (50, 77))
    assert 0 < len(mine["boxes"]) < n - 1  # crowd and empty objects were dropped
    assert (mine["gt_keypoints"][:, :, 2] == 0).any() and (mine["gt_keypoints"][:, :, 2] > 0).any()
    np.testing.assert_allclose(mine["boxes"], instances.gt_boxes.tensor.numpy(), rtol=1e-5, atol=1e-4)
    assert mine["gt_classes"].tolist() == instances.gt_classes.tolist()
    nonempty = utils.filter_empty_instances(utils.annotations_to_instances(annos, (50, 77)), return_mask=True)[1]
    np.testing.assert_allclose(mine["gt_keypoints"], kept_kps[nonempty.numpy()], rtol=1e-5, atol=1e-4)
    theirs_polys = [p for a, k in zip(annos, nonempty.tolist()) if k for p in a["segmentation"]]
    for a, b in zip([p for s in mine["segms"] for p in s], theirs_polys):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_coco_results_equal_instances_to_coco_json():
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.structures import Boxes

    instances = Instances((50, 80))
    instances.pred_boxes = Boxes(torch.tensor([[10.0, 20.0, 40.5, 45.25], [0.0, 0.0, 3.0, 4.0]]))
    instances.scores = torch.tensor([0.9, 0.3])
    instances.pred_classes = torch.tensor([0, 1])
    instances.pred_keypoints = torch.tensor([[[10.5, 20.5, 3.0]], [[1.25, 2.0, 0.5]]])
    theirs = instances_to_coco_json(instances, 5)
    detections = {"boxes": instances.pred_boxes.tensor.numpy(), "scores": instances.scores.numpy(),
                  "classes": np.array([1, 2]), "keypoints": np.array([[[10.5, 20.5, 3.0]], [[1.25, 2.0, 0.5]]])}
    mine = image_results(5, detections, [0, 0, 1], detectron2=True)
    for a, b, k in zip(mine["bbox"], theirs, mine["keypoints"]):
        assert a["bbox"] == pytest.approx(b["bbox"]) and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"])
        assert k["keypoints"][:2] == pytest.approx(b["keypoints"][:2])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from pydetectron.data.shapes import generate_split

    root = tmp_path_factory.mktemp("d2_shapes")
    return root, generate_split(root, "val", 12, seed=5)


@pytest.mark.parametrize("kind", ["instances", "keypoints"])
@pytest.mark.parametrize("flip", [False, True])
def test_training_sample_equals_dataset_mappers(shapes, kind, flip):
    """COCO json -> one training image and its targets, all the way: detectron2's load_coco_json + DatasetMapper
    (ResizeShortestEdge, RandomFlip) against parse_coco_json(conventions='detectron2') + flip_entry +
    prepare_sample (means 0, so the network input is the resized pixels)."""
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets.coco import load_coco_json

    from pydetectron.data.coco import parse_coco_json
    from pydetectron.data.minibatch import BlobSettings, prepare_sample

    root, paths = shapes
    meta, roidb, _ = parse_coco_json(str(paths[kind]), str(root / "val"), conventions="detectron2")
    perm = meta.keypoint_flip_permutation()
    d2_dicts = load_coco_json(str(paths[kind]), str(root / "val"))
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge((90,), 150, "choice"),
                                                         T.RandomFlip(prob=1.0 if flip else 0.0)],
                           image_format="BGR", use_instance_mask=True, instance_mask_format="polygon",
                           use_keypoint=kind == "keypoints",
                           keypoint_hflip_indices=perm if kind == "keypoints" else None)
    settings = BlobSettings(scales=(90,), max_size=150, pixel_means=(0.0, 0.0, 0.0), detectron2=True)
    compared = 0
    for entry, d2_dict in zip(roidb, d2_dicts):
        if any(isinstance(a.get("segmentation"), dict) and not a.get("iscrowd") for a in d2_dict["annotations"]):
            continue  # an RLE object: detectron2's 'polygon' mask format cannot take it (pydetectron resizes it)
        compared += 1
        theirs = mapper(dict(d2_dict))
        mine = prepare_sample(flip_entry(entry, perm, legacy_plus_one=False) if flip else entry, settings,
                              np.random.default_rng(0))
        np.testing.assert_array_equal(mine.image.transpose(2, 0, 1), theirs["image"].numpy().astype(np.float32))
        instances = theirs["instances"]
        assert len(mine.entry["boxes"]) == len(instances)
        if not len(instances):
            continue  # an image without (non-crowd) objects: detectron2's Instances then has no fields
        np.testing.assert_allclose(mine.entry["boxes"], instances.gt_boxes.tensor.numpy(), rtol=1e-5, atol=1e-3)
        json_ids = [meta.contiguous_category_id_to_json_id[c] for c in mine.entry["gt_classes"]]
        assert json_ids == instances.gt_classes.tolist()
        for polys, theirs_polys in zip(mine.entry["segms"], instances.gt_masks.polygons):
            for a, b in zip(polys, theirs_polys):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
        if kind == "keypoints":
            np.testing.assert_allclose(mine.entry["gt_keypoints"], instances.gt_keypoints.tensor.numpy(),
                                       rtol=1e-5, atol=1e-3)
    assert compared >= 2
