"""COCO evaluation on a tiny hand-made ground truth whose AP is known, and result-json round trips."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from pydetectron.evaluation.coco_eval import copypaste_lines, evaluate_coco, resolve_oks_sigmas
from pydetectron.evaluation.coco_results import image_results

H, W = 60, 80
# Non-contiguous json category ids 3 and 7 = contiguous classes 1 and 2.
CATEGORY_IDS = [0, 3, 7]
GT_BOXES = {1: [(10, 10, 29, 39, 3), (40, 5, 69, 24, 7)], 2: [(5, 30, 34, 54, 3)]}  # inclusive xyxy, cat


def _ground_truth(with_keypoints=False, sigmas=None) -> COCO:
    categories = [{"id": 3, "name": "square"}, {"id": 7, "name": "circle"}]
    if with_keypoints:
        categories[0].update(keypoints=["top", "left", "right"], skeleton=[[1, 2], [2, 3]])
        if sigmas:
            categories[0]["oks_sigmas"] = sigmas
    annotations = []
    for image_id, boxes in GT_BOXES.items():
        for x1, y1, x2, y2, cat in boxes:
            w, h = x2 - x1 + 1, y2 - y1 + 1
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                   "bbox": [x1, y1, w, h], "area": w * h,
                   "segmentation": [[x1, y1, x2 + 1, y1, x2 + 1, y2 + 1, x1, y2 + 1]]}
            if with_keypoints and cat == 3:
                ann["keypoints"] = [x1 + 5, y1 + 2, 2, x1 + 2, y2 - 2, 2, x2 - 2, y2 - 2, 2]
                ann["num_keypoints"] = 3
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in GT_BOXES],
                    "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco


def _detections(image_id, keep=lambda i: True):
    boxes = [b for i, b in enumerate(GT_BOXES[image_id]) if keep(i)]
    masks = np.zeros((len(boxes), H, W), np.uint8)
    for k, (x1, y1, x2, y2, _) in enumerate(boxes):
        masks[k, y1:y2 + 1, x1:x2 + 1] = 1
    keypoints = torch.tensor([[[x1 + 5, y1 + 2, 1.0], [x1 + 2, y2 - 2, 2.0], [x2 - 2, y2 - 2, 3.0]]
                              for x1, y1, x2, y2, _ in boxes]).reshape(-1, 3, 3)
    return {
        "boxes": torch.tensor([b[:4] for b in boxes], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.linspace(0.9, 0.8, len(boxes)),
        "classes": torch.tensor([CATEGORY_IDS.index(b[4]) for b in boxes], dtype=torch.int64),
        "masks": torch.from_numpy(masks),
        "keypoints": keypoints,
    }


def _all_results(task, keep=lambda image_id, i: True, **kwargs):
    results = []
    for image_id in GT_BOXES:
        dets = _detections(image_id, lambda i, image_id=image_id: keep(image_id, i))
        results += image_results(image_id, dets, CATEGORY_IDS, **kwargs).get(task, [])
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detections_give_ap_one(iou_type):
    metrics = evaluate_coco(_ground_truth(), _all_results(iou_type), iou_type, print_fn=lambda s: None)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)


def test_half_the_squares_found_gives_the_101_point_ap():
    # Category 3 has 2 gt (one per image); find only image 1's. Category 7 found perfectly.
    results = _all_results("bbox", keep=lambda image_id, i: not (image_id == 2))
    metrics = evaluate_coco(_ground_truth(), results, "bbox", print_fn=lambda s: None)
    # square: precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points; circle: 1.0
    assert metrics["AP"] == pytest.approx((51 / 101 + 1.0) / 2)


def test_no_detections_gives_zero_not_a_crash():
    metrics = evaluate_coco(_ground_truth(), [], "bbox", print_fn=lambda s: None)
    assert metrics["AP"] == 0.0


def test_keypoints_use_the_category_sigmas_and_say_so():
    lines = []
    gt = _ground_truth(with_keypoints=True, sigmas=[0.07, 0.07, 0.07])
    results = [r for r in _all_results("keypoints") if r["category_id"] == 3]
    metrics = evaluate_coco(gt, results, "keypoints", print_fn=lines.append)
    assert metrics["AP"] == pytest.approx(1.0)
    assert lines == ["Keypoint OKS sigmas used: [0.07, 0.07, 0.07]"]


def test_custom_keypoints_without_sigmas_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="KRCNN.OKS_SIGMAS"):
        resolve_oks_sigmas(_ground_truth(with_keypoints=True))
    np.testing.assert_allclose(resolve_oks_sigmas(_ground_truth(with_keypoints=True), [0.1] * 3), [0.1] * 3)
    with pytest.raises(ValueError, match="2 OKS sigmas for 3 keypoints"):
        resolve_oks_sigmas(_ground_truth(with_keypoints=True), [0.1] * 2)


def test_result_json_round_trip_through_pycocotools(tmp_path):
    gt = _ground_truth(with_keypoints=True, sigmas=[0.07] * 3)
    for task in ("bbox", "segm", "keypoints"):
        results = _all_results(task, keypoint_confidence="logit")
        path = tmp_path / f"{task}.json"
        path.write_text(json.dumps(results))
        loaded = gt.loadRes(str(path))
        first = loaded.loadAnns(loaded.getAnnIds(imgIds=[1]))[0]
        x1, y1, x2, y2, cat = GT_BOXES[1][0]
        assert first["category_id"] == cat
        if task == "bbox":
            assert first["bbox"] == [x1, y1, x2 - x1 + 1, y2 - y1 + 1]  # Detectron's +1 width
        elif task == "segm":
            decoded = mask_util.decode(first["segmentation"])
            assert decoded.sum() == (x2 - x1 + 1) * (y2 - y1 + 1) and decoded[y1, x1] == 1
        else:
            assert first["keypoints"] == [x1 + 5, y1 + 2, 1, x1 + 2, y2 - 2, 1, x2 - 2, y2 - 2, 1]
            assert first["score"] == pytest.approx(2.0)  # mean logit


def test_copypaste_lines_match_detectron_layout():
    lines = copypaste_lines("coco_2014_minival", {"bbox": {"AP": 0.37, "AP50": 0.59}})
    assert lines == ["copypaste: Dataset: coco_2014_minival", "copypaste: Task: box",
                     "copypaste: AP,AP50", "copypaste: 0.3700,0.5900"]
