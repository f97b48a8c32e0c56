"""Test-time box augmentation (TEST.BBOX_AUG) and box voting (TEST.BBOX_VOTE), as Detectron's ``core/test.py``
(``im_detect_bbox_aug`` and its helpers, ``box_results_with_nms_and_limit``) and ``utils/boxes.py``
(``box_voting``) do them.

Each transformation (horizontal flip at TEST.SCALE, each of BBOX_AUG.SCALES with BBOX_AUG.MAX_SIZE and
optionally flipped, each width-relative aspect ratio, then the identity) gives the box head's class
probabilities ``(R, C)`` and class-tiled boxes ``(R, 4C)`` mapped back to original-image pixels. They are
combined by SCORE_HEUR / COORD_HEUR ('UNION' stacks the rows of every transformation, 'AVG' averages row by
row, 'ID' keeps the identity's), then go through the usual per-class NMS (or soft-NMS), box voting, and the
detections-per-image limit. Masks and keypoints are predicted on the final boxes from the identity
transformation's features, and with TEST.MASK_AUG / TEST.KPS_AUG combined with those of their own
transformations (``instance_aug``). Boxes are inclusive-pixel xyxy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pydetectron.boxes import box_iou, flip_boxes
from pydetectron.data.minibatch import BlobSettings, input_size, prepare_test_image
from pydetectron.evaluation.instance_aug import InstanceAugmentation, augmented_heatmaps, augmented_mask_probs
from pydetectron.evaluation.tta_passes import Transformations, augmented_passes, scale_box_widths
from pydetectron.modeling.postprocess import BoxInference, box_results_with_nms_and_limit, predict_boxes
from pydetectron.modeling.roi_heads import float32

HEURISTICS = ("ID", "AVG", "UNION")
VOTE_SCORING_METHODS = ("ID", "TEMP_AVG", "AVG", "IOU_AVG", "GENERALIZED_AVG", "QUASI_SUM")


@dataclass(frozen=True)
class BoxAugmentation:
    """The TEST.BBOX_AUG transformations and how their predictions are combined."""

    transforms: Transformations = Transformations()
    score_heur: str = "UNION"
    coord_heur: str = "UNION"

    def __post_init__(self) -> None:
        for key, value in (("SCORE_HEUR", self.score_heur), ("COORD_HEUR", self.coord_heur)):
            if value not in HEURISTICS:
                raise ValueError(f"TEST.BBOX_AUG.{key} {value!r} is not one of {HEURISTICS}")
        if (self.score_heur == "UNION") != (self.coord_heur == "UNION"):
            raise ValueError("TEST.BBOX_AUG.SCORE_HEUR and COORD_HEUR must both be 'UNION' or neither "
                             f"(got {self.score_heur!r} and {self.coord_heur!r})")

    @classmethod
    def from_cfg(cls, cfg) -> BoxAugmentation:
        a = cfg.TEST.BBOX_AUG
        if a.SCALE_SIZE_DEP:
            raise ValueError("TEST.BBOX_AUG.SCALE_SIZE_DEP is not implemented (nor is it in Detectron)")
        aug = cls(Transformations.from_section(a, "TEST.BBOX_AUG"), str(a.SCORE_HEUR), str(a.COORD_HEUR))
        # With an RPN every transformation has its own proposals: rows cannot be averaged, only stacked.
        if cfg.MODEL.FASTER_RCNN and aug.score_heur != "UNION":
            raise ValueError("a Faster R-CNN model (own RPN proposals per transformation) needs "
                             f"TEST.BBOX_AUG.SCORE_HEUR/COORD_HEUR 'UNION', got {aug.score_heur!r}")
        return aug


@dataclass(frozen=True)
class BoxVoting:
    """TEST.BBOX_VOTE: refine each kept box by the score-weighted mean of its class's boxes overlapping it."""

    enabled: bool = False
    thresh: float = 0.8
    scoring_method: str = "ID"
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring_method not in VOTE_SCORING_METHODS:
            raise ValueError(f"TEST.BBOX_VOTE.SCORING_METHOD {self.scoring_method!r} is not one of "
                             f"{VOTE_SCORING_METHODS}")

    @classmethod
    def from_cfg(cls, cfg) -> BoxVoting:
        v = cfg.TEST.BBOX_VOTE
        return cls(bool(v.ENABLED), float(v.VOTE_TH), str(v.SCORING_METHOD), float(v.SCORING_METHOD_BETA))


# ---------------------------------------------------------------------------------------------- heuristics
def box_voting(top_boxes: torch.Tensor, top_scores: torch.Tensor, all_boxes: torch.Tensor,
               all_scores: torch.Tensor, thresh: float, scoring_method: str = "ID",
               beta: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detectron's ``box_voting``: each of `top_boxes` ``(N, 4)`` becomes the `all_scores`-weighted mean of
    the `all_boxes` ``(M, 4)`` with IoU >= `thresh` to it; its score is kept ('ID') or recombined from the
    voters' scores. Returns (boxes ``(N, 4)``, scores ``(N,)``); the voters must include each top box."""
    if scoring_method not in VOTE_SCORING_METHODS:
        raise ValueError(f"box voting scoring method {scoring_method!r} is not one of {VOTE_SCORING_METHODS}")
    out_boxes, out_scores = top_boxes.clone(), top_scores.clone()
    if top_boxes.shape[0] == 0:
        return out_boxes, out_scores
    overlaps = box_iou(top_boxes.double(), all_boxes.double())
    boxes64, scores64 = all_boxes.double(), all_scores.double()
    for k in range(top_boxes.shape[0]):
        voters = overlaps[k] >= thresh
        ws = scores64[voters]
        if ws.numel() == 0 or float(ws.sum()) <= 0:
            raise ValueError(f"box voting: box {k} has no voter with positive score at IoU >= {thresh}")
        out_boxes[k] = ((boxes64[voters] * ws[:, None]).sum(0) / ws.sum()).to(out_boxes.dtype)
        if scoring_method != "ID":
            out_scores[k] = _vote_score(ws, overlaps[k, voters], scoring_method, beta).to(out_scores.dtype)
    return out_boxes, out_scores


def _vote_score(ws: torch.Tensor, ious: torch.Tensor, method: str, beta: float) -> torch.Tensor:
    """The recombined score of one voted box from its voters' scores `ws` and their IoUs with it."""
    if method == "TEMP_AVG":  # P(class) vs P(not class), temperature-smoothed, averaged
        p = torch.stack([ws, 1.0 - ws])
        x = torch.log(p / p.max(dim=0).values)
        tempered = torch.exp(x / beta)
        return (tempered[0] / tempered.sum(dim=0)).mean()
    if method == "AVG":
        return ws.mean()
    if method == "IOU_AVG":
        return (ws * ious).sum() / ious.sum()
    if method == "GENERALIZED_AVG":
        return (ws**beta).mean() ** (1.0 / beta)
    return ws.sum() / float(ws.numel()) ** beta  # QUASI_SUM


def combine_predictions(scores_ts: List[torch.Tensor], boxes_ts: List[torch.Tensor], score_heur: str,
                        coord_heur: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(R_t, C)`` and boxes ``(R_t, 4C)`` of each transformation (the identity LAST) -> one set:
    'UNION' stacks the rows, 'AVG' averages them element-wise (equal R_t needed), 'ID' keeps the identity's."""
    def combine(values: List[torch.Tensor], heur: str, what: str) -> torch.Tensor:
        if heur == "ID":
            return values[-1]
        if heur == "UNION":
            return torch.cat(values)
        if heur == "AVG":
            if len({tuple(v.shape) for v in values}) != 1:
                raise ValueError(f"BBOX_AUG 'AVG' needs the same rows in every transformation; {what} shapes "
                                 f"are {[tuple(v.shape) for v in values]}")
            return torch.stack(values).mean(dim=0)
        raise ValueError(f"unknown BBOX_AUG heuristic {heur!r}; valid: {HEURISTICS}")

    return combine(scores_ts, score_heur, "score"), combine(boxes_ts, coord_heur, "box")


def detections_with_voting(scores: torch.Tensor, boxes: torch.Tensor, params: BoxInference,
                           voting: BoxVoting) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detectron's ``box_results_with_nms_and_limit`` with box voting: per-class threshold + NMS, voting
    each class's kept boxes with that class's above-threshold boxes, then the per-image limit (ties kept).
    `scores` ``(R, C)``, class-tiled `boxes` ``(R, 4C)``. Returns boxes ``(D, 4)``, scores, classes."""
    det_boxes, det_scores, det_classes = box_results_with_nms_and_limit(
        scores, boxes, dataclasses.replace(params, detections_per_im=0))
    if voting.enabled:
        det_boxes, det_scores = det_boxes.clone(), det_scores.clone()
        for j in det_classes.unique().tolist():
            mine = det_classes == j
            pool = scores[:, j] > params.score_thresh
            det_boxes[mine], det_scores[mine] = box_voting(
                det_boxes[mine], det_scores[mine], boxes[pool, 4 * j: 4 * j + 4], scores[pool, j],
                voting.thresh, voting.scoring_method, voting.beta)
    limit = params.detections_per_im
    if limit > 0 and det_scores.numel() > limit:
        keep = det_scores >= torch.topk(det_scores, limit).values[-1]
        det_boxes, det_scores, det_classes = det_boxes[keep], det_scores[keep], det_classes[keep]
    return det_boxes, det_scores, det_classes


@dataclass
class _Pass:
    """One transformation's predictions, in the coordinates of the image it was run on."""

    scores: torch.Tensor  # (R, C) class probabilities
    boxes: torch.Tensor  # (R, 4C)
    features: list
    im_info: torch.Tensor  # (1, 3)


def box_predictions(model: torch.nn.Module, image: np.ndarray, settings: BlobSettings, params: BoxInference,
                    device: torch.device) -> _Pass:
    """Detectron's ``im_detect_bbox`` for an RPN model: class probabilities and class-tiled boxes of every
    proposal, in `image`'s pixels (clipped to it), plus the features for the mask / keypoint heads."""
    if getattr(model, "rpn", None) is None or getattr(model, "box_head", None) is None:
        raise ValueError("TEST.BBOX_AUG / TEST.BBOX_VOTE need a detector with an RPN and a box head "
                         "(precomputed-proposal and RPN-only models are not supported)")
    blob, im_scale = prepare_test_image(image, settings)
    height, width = input_size(image.shape[0], image.shape[1], im_scale, settings)
    im_info = torch.tensor([[height, width, im_scale]], dtype=torch.float32, device=device)
    features = model.body(blob.to(device))
    rois = model.rpn(features, im_info).rois
    roi_feats = [features[i] for i in model.roi_indices]
    cls_score, bbox_pred = float32(*model.box_outputs(model.box_head(roi_feats, rois)))
    probs = F.softmax(cls_score, dim=1)
    boxes = predict_boxes(rois[:, 1:5], bbox_pred, probs.shape[1], im_scale, image.shape[:2], params)
    return _Pass(probs, boxes, features, im_info)


class AugmentedDetection:
    """``detect(model, image, settings, device) -> dict``, the same call as ``inference.detect_image``,
    with TEST.BBOX_AUG transformations and TEST.BBOX_VOTE, then TEST.MASK_AUG / TEST.KPS_AUG on the final
    boxes (``instance_aug``); any of them may be off. `keypoint_flip_perm` (the dataset's, see
    ``DatasetMeta.keypoint_flip_permutation``) is needed when KPS_AUG flips."""

    def __init__(self, augmentation: BoxAugmentation, voting: BoxVoting, params: BoxInference,
                 mask_aug: InstanceAugmentation | None = None, keypoint_aug: InstanceAugmentation | None = None,
                 keypoint_flip_perm: np.ndarray | None = None) -> None:
        self.aug, self.voting, self.params = augmentation, voting, params
        self.mask_aug, self.keypoint_aug, self.keypoint_flip_perm = mask_aug, keypoint_aug, keypoint_flip_perm

    @classmethod
    def from_cfg(cls, cfg, keypoint_flip_perm: np.ndarray | None = None) -> AugmentedDetection:
        aug = BoxAugmentation.from_cfg(cfg) if cfg.TEST.BBOX_AUG.ENABLED else BoxAugmentation()
        return cls(aug, BoxVoting.from_cfg(cfg), BoxInference.from_cfg(cfg), InstanceAugmentation.masks_from_cfg(cfg),
                   InstanceAugmentation.keypoints_from_cfg(cfg), keypoint_flip_perm)

    def _run(self, model, image: np.ndarray, settings: BlobSettings, device, hflip: bool) -> _Pass:
        """A pass on `image` (flipped first when `hflip`), boxes mapped back to `image`'s frame."""
        if not hflip:
            return box_predictions(model, image, settings, self.params, device)
        result = box_predictions(model, np.ascontiguousarray(image[:, ::-1]), settings, self.params, device)
        result.boxes = flip_boxes(result.boxes, image.shape[1])
        return result

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, image: np.ndarray, settings: BlobSettings,
                 device: torch.device) -> dict:
        scores_ts, boxes_ts = [], []
        for im, blob_settings, hflip, width_factor in augmented_passes(self.aug.transforms, image, settings):
            result = self._run(model, im, blob_settings, device, hflip)
            scores_ts.append(result.scores)
            boxes_ts.append(result.boxes if width_factor == 1.0 else scale_box_widths(result.boxes, width_factor))
        identity = self._run(model, image, settings, device, hflip=False)
        scores_ts.append(identity.scores)
        boxes_ts.append(identity.boxes)
        scores, boxes = combine_predictions(scores_ts, boxes_ts, self.aug.score_heur, self.aug.coord_heur)
        det_boxes, det_scores, det_classes = detections_with_voting(scores, boxes, self.params, self.voting)
        results = [{"boxes": det_boxes, "scores": det_scores, "classes": det_classes}]
        self._add_instance_outputs(model, results, identity, image, settings, device)
        return {k: v.detach().cpu() for k, v in results[0].items()}

    def _add_instance_outputs(self, model, results: list, identity: _Pass, image: np.ndarray,
                              settings: BlobSettings, device: torch.device) -> None:
        """Masks / keypoints of the final boxes, through the detector's own ROI-heads steps: from the identity pass's
        features (Detectron's ``im_detect_mask`` / ``im_detect_keypoints``), combined with the other
        transformations' under MASK_AUG / KPS_AUG (``im_detect_mask_aug`` / ``im_detect_keypoints_aug``)."""
        if not (model.mask_on or model.keypoints_on):
            return
        heads = model.roi_heads
        roi_feats = [identity.features[i] for i in model.roi_indices]
        det_rois = heads.detection_rois(results, identity.im_info)
        boxes = results[0]["boxes"]
        augment = boxes.shape[0] > 0
        if model.mask_on:
            probs = heads.detection_mask_probs(results, roi_feats, det_rois)
            if self.mask_aug is not None and augment:
                probs = augmented_mask_probs(model, self.mask_aug, image, settings, boxes, results[0]["classes"],
                                             probs, device)
            heads.paste_masks(results, probs, [tuple(image.shape[:2])])
        if model.keypoints_on:
            heatmaps = heads.keypoint_head(roi_feats, det_rois) if augment else None
            if self.keypoint_aug is not None and augment:
                heatmaps = augmented_heatmaps(model, self.keypoint_aug, image, settings, boxes, heatmaps,
                                              self.keypoint_flip_perm, device)
            heads.decode_keypoints(results, heatmaps)


def detection_function(cfg, keypoint_flip_perm: np.ndarray | None = None) -> Callable | None:
    """The per-image detection function TEST.BBOX_AUG / BBOX_VOTE / MASK_AUG / KPS_AUG ask for, or None for the
    plain model. `keypoint_flip_perm`: the dataset's keypoint flip permutation (KPS_AUG flips need it)."""
    instance_aug = (cfg.MODEL.MASK_ON and cfg.TEST.MASK_AUG.ENABLED) or (
        cfg.MODEL.KEYPOINTS_ON and cfg.TEST.KPS_AUG.ENABLED)
    if cfg.TEST.BBOX_AUG.ENABLED or cfg.TEST.BBOX_VOTE.ENABLED or instance_aug:
        if cfg.MODEL.CONVENTIONS == "detectron2":
            raise ValueError("TEST.BBOX_AUG / BBOX_VOTE / MASK_AUG / KPS_AUG are Detectron's test-time passes (its "
                             "box decoding and combination rules); they are not available in detectron2 mode "
                             "(MODEL.CONVENTIONS 'detectron2')")
        if not cfg.MODEL.FASTER_RCNN:
            raise ValueError("TEST.BBOX_AUG / BBOX_VOTE / MASK_AUG / KPS_AUG are implemented for models with an "
                             "RPN (MODEL.FASTER_RCNN), not for precomputed proposals or RPN-only models")
        return AugmentedDetection.from_cfg(cfg, keypoint_flip_perm)
    return None
