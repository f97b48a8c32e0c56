"""Our per-image detections -> COCO result entries, as Detectron's json_dataset_evaluator writes them."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch

KEYPOINT_CONFIDENCES = ("bbox", "logit")


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def encode_mask(mask: np.ndarray) -> dict:
    """uint8 (H, W) mask -> COCO RLE with a str `counts`, json-serialisable."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def image_results(
    image_id: int,
    detections: Mapping[str, object],
    category_ids: Sequence[int],
    keypoint_confidence: str = "bbox",
    detectron2: bool = False,
) -> dict[str, list[dict]]:
    """COCO entries of one image for every task its detections support.

    `detections` is the detector's per-image output (boxes (D, 4) inclusive xyxy in original pixels, scores,
    classes as contiguous ids, optional masks (D, H, W) or their RLEs 'segms', and keypoints (D, K, 3) = (x, y, logit)).
    `category_ids[c]` is the json category id of contiguous class c (index 0 = background).
    Boxes become [x, y, x2 - x1 + 1, y2 - y1 + 1] (Detectron's xyxy_to_xywh). Keypoint scores follow
    Detectron's KRCNN.KEYPOINT_CONFIDENCE: 'bbox' (the box score, Detectron's default) or 'logit' (the mean
    keypoint logit). With `detectron2` (detectron2 mode), as detectron2's ``instances_to_coco_json``: boxes
    [x, y, x2 - x1, y2 - y1], and keypoint x / y - 0.5 (back from pixel centres to COCO's pixel indices).
    """
    if keypoint_confidence not in KEYPOINT_CONFIDENCES:
        raise ValueError(f"KRCNN.KEYPOINT_CONFIDENCE {keypoint_confidence!r} is not supported; "
                         f"valid: {', '.join(KEYPOINT_CONFIDENCES)}")
    boxes = _numpy(detections["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(detections["scores"]).astype(np.float64)
    classes = _numpy(detections["classes"]).astype(np.int64)
    cats = [int(category_ids[c]) for c in classes]
    results: dict[str, list[dict]] = {"bbox": []}
    plus_one = 0.0 if detectron2 else 1.0
    for box, score, cat in zip(boxes, scores, cats):
        x1, y1, x2, y2 = box
        results["bbox"].append({"image_id": int(image_id), "category_id": cat,
                                "bbox": [x1, y1, x2 - x1 + plus_one, y2 - y1 + plus_one], "score": float(score)})
    segms = detections.get("segms")
    if segms is None and detections.get("masks") is not None:
        segms = [encode_mask(mask) for mask in _numpy(detections["masks"])]
    if segms is not None:
        results["segm"] = [
            {"image_id": int(image_id), "category_id": cat, "segmentation": rle, "score": float(s)}
            for rle, s, cat in zip(segms, scores, cats)
        ]
    if detections.get("keypoints") is not None:
        keypoints = _numpy(detections["keypoints"]).astype(np.float64)
        if detectron2:
            keypoints[:, :, :2] -= 0.5
        results["keypoints"] = []
        for kps, s, cat in zip(keypoints, scores, cats):
            flat = np.stack([kps[:, 0], kps[:, 1], np.ones(len(kps))], 1).reshape(-1).tolist()
            score = float(s) if keypoint_confidence == "bbox" else float(kps[:, 2].mean())
            results["keypoints"].append({"image_id": int(image_id), "category_id": cat, "keypoints": flat,
                                         "score": score})
    return results
