"""The shapes dataset: deterministic, valid for pycocotools, annotations agree with the pixels."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pydetectron.data.catalog import DatasetSpec
from pydetectron.data.coco import CocoDataset
from pydetectron.data.shapes import generate_split, render_image


def _quiet_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_deterministic(tmp_path, tiny_shapes):
    generate_split(tmp_path, "val", 6, seed=0)
    for kind in ("instances", "keypoints"):
        a = (tiny_shapes / "annotations" / f"{kind}_val.json").read_text()
        assert a == (tmp_path / "annotations" / f"{kind}_val.json").read_text()
    for name in ("val_000000.jpg", "val_000005.jpg"):
        assert (tiny_shapes / "val" / name).read_bytes() == (tmp_path / "val" / name).read_bytes()
    other, _ = render_image(1, "val", 0)
    same, _ = render_image(0, "val", 0)
    assert other.shape != same.shape or not np.array_equal(other, same)


def test_valid_for_pycocotools(tiny_shapes):
    coco = _quiet_coco(tiny_shapes / "annotations" / "instances_train.json")
    assert sorted(coco.getCatIds()) == [1, 3, 7]
    sizes = [(im["width"], im["height"]) for im in coco.dataset["images"]]
    assert all(160 <= v <= 320 for s in sizes for v in s)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    kinds = set()
    for ann in coco.dataset["annotations"]:
        mask = coco.annToMask(ann)
        kinds.add((ann["iscrowd"], type(ann["segmentation"]).__name__))
        assert mask.sum() == ann["area"] > 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert (0, "list") in kinds and (1, "dict") in kinds  # polygons and crowd RLE both present


def test_gt_scores_perfect_ap_and_keypoint_meta(tiny_shapes):
    """Evaluating the gt against itself must give AP 1 for boxes, masks and keypoints."""
    for kind, iou_types in (("instances", ("bbox", "segm")), ("keypoints", ("keypoints",))):
        path = tiny_shapes / "annotations" / f"{kind}_val.json"
        gt = _quiet_coco(path)
        dets = [dict(a, score=1.0) for a in gt.dataset["annotations"] if not a["iscrowd"]]
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(json.loads(json.dumps(dets)))
            for iou_type in iou_types:
                ev = COCOeval(gt, dt, iou_type)
                if iou_type == "keypoints":
                    ev.params.kpt_oks_sigmas = np.array(gt.dataset["categories"][0]["oks_sigmas"])
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                assert ev.stats[0] > 0.99, (kind, iou_type, ev.stats[0])
    ds = CocoDataset(DatasetSpec("kp", str(tiny_shapes / "val"), str(tiny_shapes / "annotations/keypoints_val.json")))
    roidb = ds.get_roidb()
    assert ds.meta.keypoint_names == ["top", "left", "right"]
    assert ds.meta.keypoint_flip_map == {"left": "right"} and ds.meta.oks_sigmas == [0.07] * 3
    assert ds.meta.json_category_id_to_contiguous_id == {7: 1}
    kps = np.concatenate([e["gt_keypoints"] for e in roidb])
    assert set(np.unique(kps[:, :, 2])) <= {1, 2} and (kps[:, :, 2] == 2).mean() > 0.6
    # 'left' lies left of 'right' on upright triangles
    assert (kps[:, 1, 0] < kps[:, 2, 0]).all()
