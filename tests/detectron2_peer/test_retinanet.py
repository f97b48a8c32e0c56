"""Our detectron2-mode RetinaNet against detectron2's own (skipped without a detectron2 build): the same weights
(ours, copied into detectron2's model through the Caffe2 names and detectron2's own c2 name converter), the
same image tensor; head outputs, losses on a given gt, and inference scores / classes agree to 1e-4, boxes to
1e-4 relative (3e-3 pixels absolute), detections paired by nearest box (near-tied scores may swap)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts  # noqa: E402
from detectron2.config import get_cfg as d2_get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list  # noqa: E402
from pydetectron.modeling.detector import build_detector  # noqa: E402
from pydetectron.weights.detectron_pkl import detectron_blobs  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "baselines", "retinanet_R-50-FPN_1x.yaml")
NUM_CLASSES = 3  # foreground classes (detectron2's NUM_CLASSES); ours counts the background too
FPN_DIM = 64
HEIGHT, WIDTH = 128, 256  # multiples of 128: neither model pads
ORIGINAL = (100, 190)  # the "original" size inference maps back to (separate x / y scales)
GT_BOXES = [[10.0, 12.0, 90.0, 100.0], [120.0, 30.0, 250.0, 90.0], [60.0, 60.0, 80.0, 76.0]]
GT_CLASSES = [2, 0, 1]  # detectron2's 0-based ids


def _ours(norm: str):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, CONFIG)
    merge_cfg_from_list(cfg, ["MODEL.CONVENTIONS", "detectron2", "MODEL.NUM_CLASSES", str(NUM_CLASSES + 1),
                              "FPN.DIM", str(FPN_DIM), "RETINANET.NORM", norm, "RETINANET.ASPECT_RATIOS",
                              "(0.5, 1.0, 2.0)", "RETINANET.BBOX_REG_BETA", "0.1", "TEST.DETECTIONS_PER_IM", "100",
                              "RETINANET.INFERENCE_TH", "0.05", "RETINANET.PRE_NMS_TOP_N", "1000", "TEST.NMS", "0.5"])
    return build_detector(assert_and_infer_cfg(cfg))


def _detectron2(norm: str):
    cfg = d2_get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.DEVICE", "cpu",
                         "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
                         "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
                         "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"], "MODEL.FPN.OUT_CHANNELS", FPN_DIM,
                         "MODEL.ANCHOR_GENERATOR.SIZES",
                         [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]],
                         "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]],
                         "MODEL.RETINANET.NUM_CLASSES", NUM_CLASSES, "MODEL.RETINANET.NORM", norm,
                         "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.1,
                         "MODEL.PIXEL_MEAN", [0.0, 0.0, 0.0], "MODEL.PIXEL_STD", [1.0, 1.0, 1.0]])
    return build_model(cfg)


def _d2_names(ours, num_convs: int, norm: str):
    """Our weights under detectron2's names: the body through detectron2's own c2 converter (Caffe2 blob names
    -> detectron2 names), P6 / P7 and the head (which the converter does not know) by hand."""
    blobs = {name: torch.from_numpy(value) for name, value in detectron_blobs(ours).items()}
    step = 3 if norm else 2  # conv[, norm], relu
    by_hand = {"fpn_6_w": "backbone.top_block.p6.weight", "fpn_6_b": "backbone.top_block.p6.bias",
               "fpn_7_w": "backbone.top_block.p7.weight", "fpn_7_b": "backbone.top_block.p7.bias"}
    for tower, d2_tower in (("cls", "cls_subnet"), ("bbox", "bbox_subnet")):
        for i in range(num_convs):
            for suffix, key in (("w", "weight"), ("b", "bias")):
                by_hand[f"retnet_{tower}_conv_n{i}_fpn3_{suffix}"] = f"head.{d2_tower}.{step * i}.{key}"
            if norm:
                by_hand[f"retnet_{tower}_conv_n{i}_fpn3_gn_s"] = f"head.{d2_tower}.{step * i + 1}.weight"
                by_hand[f"retnet_{tower}_conv_n{i}_fpn3_gn_b"] = f"head.{d2_tower}.{step * i + 1}.bias"
    for blob, name in (("retnet_cls_pred_fpn3", "head.cls_score"), ("retnet_bbox_pred_fpn3", "head.bbox_pred")):
        by_hand[f"{blob}_w"], by_hand[f"{blob}_b"] = f"{name}.weight", f"{name}.bias"
    assert set(by_hand) <= set(blobs)
    return blobs, by_hand


def _load_into_detectron2(d2_model, ours, norm: str) -> None:
    blobs, by_hand = _d2_names(ours, 4, norm)
    state = {d2_name: blobs.pop(blob) for blob, d2_name in by_hand.items()}
    state.update(align_and_update_state_dicts(d2_model.state_dict(), blobs, c2_conversion=True))
    missing, unexpected = d2_model.load_state_dict(state, strict=False)
    # FrozenBN running statistics keep their defaults (mean 0, var 1 - eps): our AffineChannel is the fold
    assert all(k.endswith(("running_mean", "running_var")) for k in missing), missing
    assert not unexpected
    assert set(state) >= {k for k, _ in d2_model.named_parameters()}


@pytest.fixture(scope="module", params=["", "GN"])
def models(request):
    torch.manual_seed(0)
    ours = _ours(request.param)
    with torch.no_grad():  # scores spread around the threshold, boxes moved: top-k and NMS have work to do
        ours.head.cls_pred.bias.copy_(torch.randn_like(ours.head.cls_pred.bias) * 1.5 - 2.5)
        ours.head.bbox_pred.bias.copy_(torch.randn_like(ours.head.bbox_pred.bias) * 0.2)
    d2_model = _detectron2(request.param)
    _load_into_detectron2(d2_model, ours, request.param)
    rng = np.random.RandomState(0)
    image = torch.from_numpy(rng.uniform(-60, 60, size=(3, HEIGHT, WIDTH)).astype(np.float32))
    return ours, d2_model, image


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_head_outputs_match(models):
    ours, d2_model, image = models
    ours.eval(), d2_model.eval()
    with torch.no_grad():
        logits, deltas = ours.head(ours.body(image[None]))
        features = d2_model.backbone(image[None])
        d2_logits, d2_deltas = d2_model.head([features[f] for f in d2_model.head_in_features])
    assert len(logits) == len(d2_logits) == 5
    for mine, theirs in zip(logits + deltas, d2_logits + d2_deltas):
        assert mine.shape == theirs.shape
        _close(mine, theirs)


@pytest.mark.parametrize("loss_type, beta", [("smooth_l1", 0.1), ("smooth_l1", 0.0), ("giou", 0.1)])
def test_losses_match(models, loss_type, beta):
    """On detectron2's defaults (SMOOTH_L1_LOSS_BETA 0.1), its Base-RetinaNet.yaml's L1 (beta 0) and GIoU; both
    loss normalisers start at 100."""
    ours, d2_model, image = models
    ours.train(), d2_model.train()
    ours.settings = ours.d2_rules.settings = dataclasses.replace(ours.settings, bbox_loss_type=loss_type,
                                                                 bbox_beta=beta)
    d2_model.box_reg_loss_type, d2_model.smooth_l1_beta = loss_type, beta
    ours.loss_normalizer.value.fill_(100.0)
    if hasattr(d2_model, "loss_normalizer"):
        del d2_model.loss_normalizer
    roidb = [{"boxes": torch.tensor(GT_BOXES), "gt_classes": torch.tensor(GT_CLASSES) + 1,
              "is_crowd": torch.zeros(len(GT_BOXES), dtype=torch.bool)}]
    instances = Instances((HEIGHT, WIDTH), gt_boxes=Boxes(torch.tensor(GT_BOXES)),
                          gt_classes=torch.tensor(GT_CLASSES))
    losses = ours(image[None], torch.tensor([[HEIGHT, WIDTH, 1.0]]), roidb)
    with EventStorage():
        d2_losses = d2_model([{"image": image, "instances": instances}])
    assert set(losses) == set(d2_losses) == {"loss_cls", "loss_box_reg"}
    for name in losses:
        _close(losses[name], d2_losses[name])
    assert ours.loss_normalizer.value.item() == pytest.approx(d2_model.loss_normalizer, rel=1e-15) != 100.0


def test_inference_matches(models):
    ours, d2_model, image = models
    ours.eval(), d2_model.eval()
    with torch.no_grad():
        det = ours(image[None], torch.tensor([[HEIGHT, WIDTH, ORIGINAL[0] / HEIGHT]]),
                   [{"height": ORIGINAL[0], "width": ORIGINAL[1]}])[0]
        d2_det = d2_model([{"image": image, "height": ORIGINAL[0], "width": ORIGINAL[1]}])[0]["instances"]
    assert 20 < len(d2_det) <= 100  # enough detections for top-k, NMS and the per-image cut to matter
    # the head outputs agree to ~1e-5; a box side is a delta times the anchor's size (tens of pixels), so box
    # coordinates agree to ~1e-5 of the box, ~1e-3 pixels. Scores that tie to ~1e-6 may come out in either
    # order, so each detection is paired with the other model's nearest box before comparing.
    d2_boxes = d2_det.pred_boxes.tensor
    assert len(det["boxes"]) == len(d2_boxes)
    pairing = torch.cdist(det["boxes"], d2_boxes, p=float("inf")).argmin(dim=1)
    assert sorted(pairing.tolist()) == list(range(len(d2_boxes)))  # one-to-one
    assert (pairing - torch.arange(len(pairing))).abs().max() <= 2  # only near neighbours in the ranking swap
    torch.testing.assert_close(det["boxes"], d2_boxes[pairing], rtol=1e-4, atol=3e-3)
    _close(det["scores"], d2_det.scores[pairing])
    assert torch.equal(det["classes"], d2_det.pred_classes[pairing] + 1)
