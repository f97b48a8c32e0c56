"""TEST.MASK_AUG / TEST.KPS_AUG: the combination heuristics against hand values, and flipped / rescaled /
stretched passes that map their predictions back onto the identity's (on a model whose heads just pool the
image, so the right answer is known)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from pydetectron.config import get_cfg, merge_cfg_from_list
from pydetectron.data.minibatch import BlobSettings, prepare_test_image
from pydetectron.evaluation.bbox_aug import AugmentedDetection, detection_function
from pydetectron.evaluation.instance_aug import (
    InstanceAugmentation,
    augmented_heatmaps,
    augmented_mask_probs,
    combine_heatmaps,
    combine_masks,
)
from pydetectron.evaluation.tta_passes import Transformations

SETTINGS = BlobSettings(scales=(40,), max_size=1000, pixel_means=(0.0, 0.0, 0.0))
BOXES = torch.tensor([[4.0, 2.0, 31.0, 37.0]])  # covers the bar (x 10..19) and plain background to its right
CPU = torch.device("cpu")


class PoolingHeads(nn.Module):
    """Heads that pool the image itself: mask logit = scaled intensity (one class-agnostic channel), heatmap
    channel 0 = intensity, channel 1 = twice it. What they predict is where the bar is, nothing learnt."""

    roi_indices = [0]

    def body(self, data):
        return [data[:, :1] / 255.0]

    def mask_head(self, roi_feats, rois):
        return roi_align(roi_feats[0], rois, (14, 14), 1.0, 2) * 4.0 - 2.0

    def keypoint_head(self, roi_feats, rois):
        pooled = roi_align(roi_feats[0], rois, (14, 14), 1.0, 2)
        return torch.cat([pooled, 2.0 * pooled], dim=1)


def _bar_image() -> np.ndarray:
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:20] = 255
    return image


def _identity(model, head: str) -> torch.Tensor:
    blob, im_scale = prepare_test_image(_bar_image(), SETTINGS)
    feats = model.body(blob)
    rois = torch.cat([torch.zeros(1, 1), BOXES * im_scale], dim=1)
    out = getattr(model, head)(feats, rois)
    return torch.sigmoid(out[:, 0]) if head == "mask_head" else out


def test_mask_heuristics_on_hand_values():
    a, b = torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 1 / (1 + math.exp(-2.0)))  # logits 0 and 2
    torch.testing.assert_close(combine_masks([a, b], "SOFT_AVG"), (a + b) / 2)
    torch.testing.assert_close(combine_masks([a, b], "SOFT_MAX"), b)
    torch.testing.assert_close(combine_masks([a, b], "LOGIT_AVG"), torch.full((1, 2, 2), 1 / (1 + math.exp(-1.0))))
    with pytest.raises(ValueError, match="TEST.MASK_AUG.HEUR 'MEDIAN'"):
        combine_masks([a, b], "MEDIAN")


def test_size_dependent_heatmaps_skip_downscaled_passes_for_small_boxes_and_upscaled_for_large():
    aug = InstanceAugmentation("HM_AVG", scale_size_dep=True, area_th=100.0)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 9.0, 9.0]])  # areas 81 (small) and 100 (large)
    identity, down, up = (torch.full((2, 1, 1, 1), v) for v in (1.0, 10.0, 100.0))
    combined = combine_heatmaps([identity, down, up], [40, 20, 80], 40, aug, boxes)
    assert combined[:, 0, 0, 0].tolist() == [(1.0 + 100.0) / 2, (1.0 + 10.0) / 2]
    plain = combine_heatmaps([identity, down, up], [40, 20, 80], 40, InstanceAugmentation("HM_MAX"), boxes)
    assert plain[:, 0, 0, 0].tolist() == [100.0, 100.0]


@pytest.mark.parametrize("aug", [
    InstanceAugmentation("SOFT_AVG", Transformations(h_flip=True)),
    InstanceAugmentation("SOFT_AVG", Transformations(scales=(80,), scale_h_flip=True)),
    InstanceAugmentation("SOFT_AVG", Transformations(aspect_ratios=(2.0,), aspect_ratio_h_flip=True)),
])
def test_every_mask_pass_lands_back_on_the_identity(aug):
    model = PoolingHeads()
    identity = _identity(model, "mask_head")
    combined = augmented_mask_probs(model, aug, _bar_image(), SETTINGS, BOXES, torch.ones(1, dtype=torch.int64),
                                    identity, CPU)
    torch.testing.assert_close(combined, identity, atol=0.05, rtol=0)
    # the check has teeth: a flip left undone puts the bar on the wrong side of the box
    assert (identity - identity.flip(-1)).abs().max() > 0.5


def test_flipped_heatmaps_swap_left_and_right_channels():
    model = PoolingHeads()
    identity = _identity(model, "keypoint_head")
    aug = InstanceAugmentation("HM_AVG", Transformations(h_flip=True))
    combined = augmented_heatmaps(model, aug, _bar_image(), SETTINGS, BOXES, identity, np.array([1, 0]), CPU)
    # channel 0 averages its own map (1x) with the flipped pass's channel 1 (2x), and vice versa
    torch.testing.assert_close(combined[:, 0], 1.5 * identity[:, 0], atol=0.02, rtol=0)
    torch.testing.assert_close(combined[:, 1], 1.5 * identity[:, 0], atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="keypoint flip map"):
        augmented_heatmaps(model, aug, _bar_image(), SETTINGS, BOXES, identity, None, CPU)


def _cfg(*pairs):
    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["MODEL.FASTER_RCNN", True, *pairs])
    return cfg


def test_sections_are_read_only_for_the_heads_a_model_has():
    detect = detection_function(_cfg("MODEL.MASK_ON", True, "TEST.MASK_AUG.ENABLED", True, "TEST.MASK_AUG.H_FLIP",
                                     True, "TEST.MASK_AUG.HEUR", "LOGIT_AVG"))
    assert isinstance(detect, AugmentedDetection)
    assert detect.mask_aug == InstanceAugmentation("LOGIT_AVG", Transformations(h_flip=True))
    assert detect.keypoint_aug is None
    assert detection_function(_cfg("TEST.MASK_AUG.ENABLED", True)) is None  # no mask head: nothing to augment
    with pytest.raises(ValueError, match="TEST.KPS_AUG.HEUR 'SOFT_AVG'"):
        detection_function(_cfg("MODEL.KEYPOINTS_ON", True, "TEST.KPS_AUG.ENABLED", True, "TEST.KPS_AUG.HEUR",
                                "SOFT_AVG"))
    with pytest.raises(ValueError, match="MASK_AUG.SCALE_SIZE_DEP is not implemented"):
        detection_function(_cfg("MODEL.MASK_ON", True, "TEST.MASK_AUG.ENABLED", True,
                                "TEST.MASK_AUG.SCALE_SIZE_DEP", True))


def test_mask_aug_on_a_real_mask_rcnn_keeps_the_boxes_and_changes_only_masks(tiny_cfg_file):
    from pydetectron.config import assert_and_infer_cfg, merge_cfg_from_file
    from pydetectron.data.shapes import render_image
    from pydetectron.evaluation.inference import detect_image
    from pydetectron.modeling.detector import build_detector

    cfg = _cfg()
    merge_cfg_from_file(cfg, tiny_cfg_file)
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", 4, "TEST.DETECTIONS_PER_IM", 10, "TEST.MASK_AUG.ENABLED", True,
                              "TEST.MASK_AUG.H_FLIP", True, "TEST.MASK_AUG.SCALES", (96,)])
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    image, _ = render_image(0, "val", 1)
    settings = BlobSettings.from_cfg(cfg, train=False)
    plain = detect_image(model, image, settings, CPU)
    augmented = detection_function(cfg)(model, image, settings, CPU)
    for key in ("boxes", "scores", "classes"):
        torch.testing.assert_close(augmented[key], plain[key], rtol=0, atol=0)
    assert augmented["masks"].shape == plain["masks"].shape and augmented["masks"].dtype == torch.uint8


@pytest.mark.parametrize("section", ["TEST.BBOX_AUG", "TEST.MASK_AUG"])
def test_bad_aspect_ratios_name_their_section(section):
    with pytest.raises(ValueError, match=rf"{section}.ASPECT_RATIOS must be positive"):
        detection_function(_cfg("MODEL.MASK_ON", True, f"{section}.ENABLED", True, f"{section}.ASPECT_RATIOS",
                                (1.0, -2.0)))
