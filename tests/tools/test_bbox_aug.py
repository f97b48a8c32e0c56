"""TEST.BBOX_AUG heuristics and TEST.BBOX_VOTE against hand computations; the augmented passes map boxes back."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pydetectron.config import get_cfg, merge_cfg_from_list
from pydetectron.data.minibatch import BlobSettings, prepare_test_image, scaled_size
from pydetectron.evaluation.bbox_aug import (
    AugmentedDetection,
    BoxAugmentation,
    BoxVoting,
    box_voting,
    combine_predictions,
    detections_with_voting,
)
from pydetectron.evaluation.tta_passes import Transformations, augmented_passes
from pydetectron.modeling.postprocess import BoxInference

TOP = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
ALL = torch.tensor([[0.0, 0.0, 9.0, 9.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 29.0, 29.0]])
ALL_SCORES = torch.tensor([0.9, 0.6, 0.5])
IOU_01 = 81.0 / 119.0  # inclusive pixels: 9 x 9 overlap of two 10 x 10 boxes


@pytest.mark.parametrize("method, beta, score", [
    ("ID", 1.0, 0.9),
    ("AVG", 1.0, 0.75),
    ("IOU_AVG", 1.0, (0.9 * 1.0 + 0.6 * IOU_01) / (1.0 + IOU_01)),
    ("GENERALIZED_AVG", 2.0, np.sqrt((0.81 + 0.36) / 2)),
    ("QUASI_SUM", 1.0, 1.5 / 2),
    ("TEMP_AVG", 1.0, 0.75),  # temperature 1 gives back the probabilities
    ("TEMP_AVG", 0.5, (81 / 82 + 9 / 13) / 2),  # (p / p_max)^2 renormalised per voter
])
def test_box_voting_on_three_hand_boxes(method, beta, score):
    boxes, scores = box_voting(TOP, torch.tensor([0.9]), ALL, ALL_SCORES, 0.5, method, beta)
    # the far box (IoU 0) does not vote; the other two average with weights 0.9 and 0.6
    torch.testing.assert_close(boxes, torch.tensor([[0.4, 0.4, 9.4, 9.4]]))
    assert float(scores[0]) == pytest.approx(score, rel=1e-6)


def test_box_voting_threshold_excludes_weak_overlaps():
    boxes, _ = box_voting(TOP, torch.tensor([0.9]), ALL, ALL_SCORES, 0.7)  # IoU 0.68 < 0.7: only itself
    torch.testing.assert_close(boxes, TOP)


def _tiled(fg_scores, boxes):
    """Scores (R, 2) = (background, fg) and class-tiled boxes (R, 8)."""
    fg = torch.tensor(fg_scores)
    b = torch.tensor(boxes, dtype=torch.float32)
    return torch.stack([1 - fg, fg], dim=1), torch.cat([b, b], dim=1)


FLIP = _tiled([0.8, 0.3], [[0, 0, 9, 9], [30, 30, 39, 39]])
IDENTITY = _tiled([0.9, 0.04], [[1, 0, 10, 9], [50, 50, 59, 59]])
PARAMS = BoxInference(num_classes=2, score_thresh=0.05, nms=0.5, detections_per_im=100)
NO_VOTING = BoxVoting()


def _detect(score_heur, coord_heur, voting=NO_VOTING):
    scores, boxes = combine_predictions([FLIP[0], IDENTITY[0]], [FLIP[1], IDENTITY[1]], score_heur, coord_heur)
    boxes_out, scores_out, classes = detections_with_voting(scores, boxes, PARAMS, voting)
    order = torch.argsort(scores_out, descending=True)
    return boxes_out[order], scores_out[order], classes[order]


def test_union_stacks_the_rows_then_nms_keeps_the_best_of_each_cluster():
    boxes, scores, classes = _detect("UNION", "UNION")
    # [0,0,9,9] (0.8) overlaps [1,0,10,9] (0.9) at IoU 90/110 > 0.5 and is suppressed; 0.04 is under 0.05
    torch.testing.assert_close(boxes, torch.tensor([[1.0, 0, 10, 9], [30, 30, 39, 39]]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.3]))
    assert classes.tolist() == [1, 1]


def test_union_with_box_voting_averages_the_suppressed_box_in():
    boxes, scores, _ = _detect("UNION", "UNION", BoxVoting(enabled=True, thresh=0.8))
    expected = (0.9 * torch.tensor([1.0, 0, 10, 9]) + 0.8 * torch.tensor([0.0, 0, 9, 9])) / 1.7
    torch.testing.assert_close(boxes[0], expected)
    torch.testing.assert_close(boxes[1], torch.tensor([30.0, 30, 39, 39]))  # alone: votes for itself
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.3]))


def test_avg_and_id_heuristics():
    boxes, scores, _ = _detect("AVG", "AVG")
    torch.testing.assert_close(boxes, torch.tensor([[0.5, 0, 9.5, 9], [40, 40, 49, 49]]))
    torch.testing.assert_close(scores, torch.tensor([0.85, 0.17]))
    boxes, scores, _ = _detect("ID", "ID")
    torch.testing.assert_close(boxes, torch.tensor([[1.0, 0, 10, 9]]))
    torch.testing.assert_close(scores, torch.tensor([0.9]))


def test_detection_limit_applies_after_voting():
    scores, boxes = _tiled([0.9, 0.8, 0.7], [[0, 0, 9, 9], [20, 20, 29, 29], [40, 40, 49, 49]])
    params = BoxInference(num_classes=2, score_thresh=0.05, nms=0.5, detections_per_im=2)
    _, kept, _ = detections_with_voting(scores, boxes, params, BoxVoting(enabled=True, scoring_method="AVG"))
    assert sorted(kept.tolist(), reverse=True) == pytest.approx([0.9, 0.8])


@pytest.mark.parametrize("keys, message", [
    (["TEST.BBOX_AUG.SCALE_SIZE_DEP", True], "SCALE_SIZE_DEP"),
    (["TEST.BBOX_AUG.SCORE_HEUR", "AVG"], "both be 'UNION' or neither"),
    (["TEST.BBOX_AUG.SCORE_HEUR", "AVG", "TEST.BBOX_AUG.COORD_HEUR", "AVG"], "needs TEST.BBOX_AUG"),
    (["TEST.BBOX_AUG.SCORE_HEUR", "MAX"], "not one of"),
])
def test_bad_augmentation_settings_are_named(keys, message):
    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["MODEL.FASTER_RCNN", True, "TEST.BBOX_AUG.ENABLED", True, *keys])
    with pytest.raises(ValueError, match=message):
        BoxAugmentation.from_cfg(cfg)


class BarDetector(nn.Module):
    """Proposes the box around the bright columns of the input (all rows); the box head is sure it is class 1
    and regresses nothing. Enough of the detector's attributes for the augmented passes."""

    mask_on = keypoints_on = False
    roi_indices = [0]

    def __init__(self):
        super().__init__()
        self.calls = 0

    def body(self, data):
        return [data]

    def rpn(self, features, im_info):
        self.calls += 1
        columns = torch.nonzero(features[0][0, 0].mean(dim=0) > 100).squeeze(1).float()
        h = float(im_info[0, 0])
        return SimpleNamespace(rois=torch.tensor([[0.0, float(columns.min()), 0.0, float(columns.max()), h - 1]]))

    def box_head(self, roi_feats, rois):
        return rois

    def box_outputs(self, x):
        return torch.tensor([[0.0, 5.0]]).repeat(x.shape[0], 1), torch.zeros(x.shape[0], 8)


def _bar_image():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:20] = 255
    return image


def test_flip_scale_and_aspect_passes_map_boxes_back_to_the_original():
    settings = BlobSettings(scales=(40,), max_size=1000, pixel_means=(0.0, 0.0, 0.0))
    aug = BoxAugmentation(Transformations(h_flip=True, scales=(80, 20), scale_h_flip=True, aspect_ratios=(2.0,),
                                          aspect_ratio_h_flip=True))
    detect = AugmentedDetection(aug, BoxVoting(), BoxInference(num_classes=2))
    model, image = BarDetector(), _bar_image()
    passes = augmented_passes(aug.transforms, image, settings)
    assert [(p[1].scales[0], p[2], p[3]) for p in passes] == [
        (40, True, 1.0), (80, False, 1.0), (80, True, 1.0), (20, False, 1.0), (20, True, 1.0),
        (40, False, 0.5), (40, True, 0.5)]
    identity = detect._run(model, image, settings, torch.device("cpu"), hflip=False)
    torch.testing.assert_close(identity.boxes[0, 4:], torch.tensor([10.0, 0, 19, 39]))
    flipped = detect._run(model, image, settings, torch.device("cpu"), hflip=True)
    torch.testing.assert_close(flipped.boxes, identity.boxes)  # the flip is undone exactly
    # The arithmetic of a pass at scale s (inclusive pixels, Detectron's box / s): the bar's near edge maps back
    # exactly, its far edge e to e + 1 - 1/s (pixel e covers [s e, s (e + 1)) once resized); the bilinear
    # resize keeps the bar's edges on whole pixels at s = 2 and 1/2. A flipped scale pass is unflipped at the
    # original width, so its x error moves to the left edge; an aspect pass is unflipped before the width
    # factor is undone, so its error stays on the right edge. Boxes are clipped to the 40 x 60 original.
    pass_boxes = [identity.boxes[0, 4:]]
    for im, blob_settings, hflip, width_factor in passes[1:]:
        boxes = detect._run(model, im, blob_settings, torch.device("cpu"), hflip).boxes[0, 4:]
        boxes[0::2] *= width_factor
        s = blob_settings.scales[0] / 40
        if width_factor == 1.0:
            far = 1 - 1 / s
            bottom = min(39 + far, 39)
            want = [10 - far, 0, 19, bottom] if hflip else [10, 0, 19 + far, bottom]
        else:
            want = [10, 0, 19 + 1 - width_factor, 39]
        torch.testing.assert_close(boxes, torch.tensor(want), rtol=0, atol=1e-5,
                                   msg=f"{blob_settings.scales}, hflip={hflip}, width x{1 / width_factor}")
        pass_boxes.append(boxes)
    model.calls = 0
    result = detect(model, image, settings, torch.device("cpu"))
    assert model.calls == len(passes) + 1
    assert result["classes"].tolist() == [1]  # the 8 near-identical boxes are one detection after NMS
    # UNION heuristics: the kept box is one of the passes' boxes (all at most 1 px from the bar)
    assert min(float((result["boxes"][0] - b).abs().max()) for b in pass_boxes) < 1e-5


def test_identity_only_matches_the_detectors_own_inference(tiny_cfg_file):
    """With no transformation and no voting the augmented path must give the detector's answer exactly
    (boxes, scores, classes and pasted masks), on a real (randomly initialised) Mask R-CNN."""
    from pydetectron.config import assert_and_infer_cfg, merge_cfg_from_file
    from pydetectron.data.shapes import render_image
    from pydetectron.modeling.detector import build_detector

    cfg = get_cfg()
    merge_cfg_from_file(cfg, tiny_cfg_file)
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", 4, "TEST.DETECTIONS_PER_IM", 30])
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    image, _ = render_image(0, "val", 1)
    settings = BlobSettings.from_cfg(cfg, train=False)
    blob, im_scale = prepare_test_image(image, settings)
    im_info = torch.tensor([[*scaled_size(image.shape[0], image.shape[1], im_scale), im_scale]])
    with torch.no_grad():  # the true original size, which im_info alone cannot always recover
        expected = model(blob, im_info, [{"height": image.shape[0], "width": image.shape[1]}])[0]
    got = AugmentedDetection(BoxAugmentation(), BoxVoting(), BoxInference.from_cfg(cfg))(
        model, image, settings, torch.device("cpu"))
    assert expected["boxes"].shape[0] > 0 and set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
