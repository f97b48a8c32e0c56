"""Every YAML under configs/ builds a detector that takes a training step and runs inference on CPU.

Configs are shrunk (small images, few RoIs/anchors/proposals, narrow heads) but keep their body, heads and
options. Only with the slow tests run: deep bodies (ResNet-101/152, ResNeXt), configs whose model is
identical to one already listed (schedules differ only: 1x / 2x / s1x), and the configs that
tests/test_detector.py already trains and runs in detail.
"""

import math
import os

import pytest
import torch
from test_detector import SHRINK, synthetic_batch, train_step

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.modeling.detector import build_detector

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
HEAVY_BODIES = ("ResNet101", "ResNet152", "X-101", "X-152")
MODEL_SECTIONS = ("MODEL", "RESNETS", "FPN", "RPN", "FAST_RCNN", "MRCNN", "KRCNN", "GROUP_NORM", "RETINANET")
COVERED_BY_TEST_DETECTOR = {
    "baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml",
    "baselines/e2e_mask_rcnn_R-50-C4_1x.yaml",
    "baselines/e2e_faster_rcnn_R-50-C4_1x.yaml",
    "baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml",
    "baselines/rpn_R-50-FPN_1x.yaml",
    "baselines/fast_rcnn_R-50-FPN_1x.yaml",
}
DETECTRON_LOSS = ("loss_cls", "loss_bbox", "loss_mask", "loss_kps", "loss_rpn_cls", "loss_rpn_bbox", "loss_retnet_cls",
                  "loss_retnet_bbox")


def all_configs():
    found = []
    for folder, _, files in os.walk(ROOT):
        if os.path.relpath(folder, ROOT).split(os.sep)[0] == "detectron2":
            continue  # detectron2-format YAMLs: tests/test_detectron2_config.py builds them
        found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def load(relpath):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, os.path.join(ROOT, relpath))
    merge_cfg_from_list(cfg, SHRINK + ["TRAIN.IMS_PER_BATCH", "2"])
    assert_and_infer_cfg(cfg)
    return cfg


def model_signature(cfg):
    return repr([(name, sorted(cfg[name].items(), key=lambda kv: kv[0])) for name in MODEL_SECTIONS])


def params():
    seen, out = set(), []
    for relpath in all_configs():
        cfg = load(relpath)
        heavy = any(h in relpath or h in cfg.MODEL.CONV_BODY for h in HEAVY_BODIES)
        signature = model_signature(cfg)
        duplicate = signature in seen
        seen.add(signature)
        marks = [pytest.mark.slow] if heavy or duplicate or relpath in COVERED_BY_TEST_DETECTOR else []
        out.append(pytest.param(relpath, marks=marks, id=relpath))
    return out


def test_configs_are_found():
    assert len(all_configs()) >= 20
    assert COVERED_BY_TEST_DETECTOR <= set(all_configs())


@pytest.mark.parametrize("relpath", params())
def test_config_builds_trains_and_infers(relpath):
    torch.manual_seed(0)
    cfg = load(relpath)
    model = build_detector(cfg)
    num_kps = int(cfg.KRCNN.NUM_KEYPOINTS) if cfg.MODEL.KEYPOINTS_ON else 0
    num_classes = int(cfg.MODEL.NUM_CLASSES)
    batch = synthetic_batch(sizes=((64, 96), (64, 64)), scales=(1.0, 1.5), num_classes=num_classes,
                            num_keypoints=num_kps, proposals=not cfg.MODEL.FASTER_RCNN and not cfg.MODEL.RPN_ONLY)
    losses = train_step(model, batch)
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert all(name.startswith(DETECTRON_LOSS) for name in losses), sorted(losses)
    assert ("loss_cls" in losses) == (not cfg.MODEL.RPN_ONLY and not cfg.RETINANET.RETINANET_ON)
    assert ("loss_mask" in losses) == bool(cfg.MODEL.MASK_ON)
    assert ("loss_kps" in losses) == bool(cfg.MODEL.KEYPOINTS_ON)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    results = model.eval()(*batch)
    assert len(results) == 2
    expected = {"boxes", "scores"} if cfg.MODEL.RPN_ONLY else {"boxes", "scores", "classes"}
    expected |= {"masks"} if cfg.MODEL.MASK_ON else set()
    expected |= {"keypoints"} if cfg.MODEL.KEYPOINTS_ON else set()
    for det, entry in zip(results, batch[2]):
        assert set(det) == expected
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0]
        if "masks" in det:
            assert det["masks"].shape[1:] == (entry["height"], entry["width"])
