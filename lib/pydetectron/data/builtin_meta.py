"""COCO's class and person-keypoint names, for drawing a Detectron model's detections without its json
(Detectron's ``datasets/dummy_datasets.py``)."""

from __future__ import annotations

from pydetectron.data.coco import DatasetMeta, keypoint_flip_map

COCO_CLASSES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
COCO_PERSON_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
]
# COCO person keypoints' skeleton (1-based keypoint pairs, as in the COCO keypoint annotations).
COCO_PERSON_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10], [9, 11],
    [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]


def coco_meta() -> DatasetMeta:
    """COCO's 80 classes (with background): what Detectron's 81-class models detect."""
    return DatasetMeta(list(COCO_CLASSES), {}, {})


def coco_person_keypoints_meta() -> DatasetMeta:
    """'person' with COCO's 17 keypoints, their left/right pairs and skeleton: Detectron's keypoint models."""
    return DatasetMeta(["__background__", "person"], {}, {}, list(COCO_PERSON_KEYPOINTS),
                       keypoint_flip_map(COCO_PERSON_KEYPOINTS), skeleton=[list(p) for p in COCO_PERSON_SKELETON])
