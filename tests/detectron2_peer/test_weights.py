"""detectron2 checkpoints in and out, checked against a detectron2 build (skipped without one).

A detectron2 model (R-50-FPN / C4 Mask R-CNN, Keypoint R-CNN, RetinaNet, from the YAMLs in configs/detectron2/)
with every tensor random (FrozenBN statistics included) is saved by
detectron2's own DetectionCheckpointer. It must load strictly into our model, and come back out of it in two
ways, each read by detectron2's own loader: our Detectron ``.pkl`` export (through detectron2's Caffe2
conversion, background handling included) and our ``convert --to detectron2`` file. Both must give detectron2 the
tensors it saved. A FrozenBN is compared as the affine map it computes, because a Detectron file holds the fold.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("detectron2")

from pydetectron.config import (  # noqa: E402
    assert_and_infer_cfg,
    get_cfg,
    load_detectron2_config,
    merge_cfg_from_file,
    merge_cfg_from_list,
)
from pydetectron.config.merge import cfg_to_yaml  # noqa: E402
from pydetectron.modeling.detector import build_detector  # noqa: E402
from pydetectron.utils.detectron2_peer import (  # noqa: E402
    build_d2_model,
    d2_cfg,
    frozen_bn_affine,
    load_d2_checkpoint,
    random_d2_model,
    save_d2_checkpoint,
)
from pydetectron.weights import load_pretrained, save_detectron_weights  # noqa: E402
from pydetectron.weights.convert import convert  # noqa: E402

pytestmark = pytest.mark.slow
REPO = os.path.join(os.path.dirname(__file__), "..", "..")
OURS_DETECTRON_MODE = "configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml"  # the FPN Mask R-CNN, Detectron's ways
# (detectron2 YAML shipped in configs/detectron2/, read by detectron2 and by us; whether d2 reads our Detectron
# .pkl export: its Caffe2 conversion has no RetinaNet names)
CASES = [
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", True),
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml", True),
    ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", True),
    ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", False),
]


def _d2_checkpoint(config: str, folder):
    cfg = d2_cfg(config)
    model = random_d2_model(cfg, seed=1)
    return cfg, model, save_d2_checkpoint(model, folder)


def _ours_d2_mode(config: str, weights: str):
    cfg = load_detectron2_config(config, ["MODEL.WEIGHTS", weights])
    assert_and_infer_cfg(cfg)
    return cfg, build_detector(cfg).eval()


def _ours_detectron_mode():
    cfg = get_cfg()
    merge_cfg_from_file(cfg, os.path.join(REPO, OURS_DETECTRON_MODE))
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", "81", "MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS", "False"])
    assert_and_infer_cfg(cfg)
    return cfg, build_detector(cfg).eval()


def _assert_same_function(saved: dict, loaded: dict):
    saved, loaded = frozen_bn_affine(saved), frozen_bn_affine(loaded)
    assert saved.keys() == loaded.keys()
    for key in saved:
        exact = not key.endswith((".scale", ".shift"))
        # detectron2 gives a folded Caffe2 BN variance 1 (not 1 - eps): its scale is off by eps / 2 relative
        torch.testing.assert_close(loaded[key].double(), saved[key].double(), rtol=0 if exact else 1e-5,
                                   atol=0 if exact else 1e-6, msg=key)


def _check_round_trips(d2_config, d2_model, cfg, ours, folder, through_detectron: bool):
    """Ours back to detectron2, read by detectron2's own loader: as a Detectron .pkl (its Caffe2 conversion and
    background handling) and as convert --to detectron2 (.pkl and .pth); it must get back what it saved."""
    if through_detectron:
        pkl = folder / "ours_detectron.pkl"
        save_detectron_weights(ours, pkl, cfg_yaml=cfg_to_yaml(cfg))
        fresh = build_d2_model(d2_config)
        incompatible = load_d2_checkpoint(fresh, pkl)
        assert incompatible.missing_keys == [] and incompatible.incorrect_shapes == []
        _assert_same_function(d2_model.state_dict(), fresh.state_dict())
    ours_file = folder / "ours.pth"
    torch.save({"model": ours.state_dict(), "cfg": cfg_to_yaml(cfg)}, ours_file)
    for suffix in (".pkl", ".pth"):
        out = folder / f"converted{suffix}"
        convert(ours_file, out, "detectron2")
        fresh = build_d2_model(d2_config)
        incompatible = load_d2_checkpoint(fresh, out)
        assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
        assert incompatible.incorrect_shapes == []
        _assert_same_function(d2_model.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("config,through_detectron", CASES, ids=[c[0].split("/")[1][:-5] for c in CASES])
def test_d2_model_final_into_d2_mode_strictly_and_back(config, through_detectron, tmp_path):
    path = os.path.join(REPO, "configs", "detectron2", config)
    d2_config, d2_model, weights = _d2_checkpoint(path, tmp_path / "d2")
    cfg, ours = _ours_d2_mode(path, weights)
    report = load_pretrained(ours, weights, cfg, training=False, print_fn=lambda _: None)  # raises on leftovers
    assert report.missing == report.unused == report.unmapped == []
    assert len(report.folded) == sum(k.endswith("running_mean") for k in d2_model.state_dict())
    _check_round_trips(d2_config, d2_model, cfg, ours, tmp_path, through_detectron)


def test_d2_model_final_into_detectron_mode_with_the_class_layout_changed(tmp_path):
    path = os.path.join(REPO, "configs", "detectron2", CASES[0][0])
    d2_config, d2_model, weights = _d2_checkpoint(path, tmp_path / "d2")
    cfg, ours = _ours_detectron_mode()
    lines = []
    report = load_pretrained(ours, weights, cfg, training=False, print_fn=lines.append)
    assert report.missing == report.unused == report.unmapped == []
    assert "bbox_pred_w: detectron2 -> detectron class layout, (320, 1024) -> (324, 1024)" in lines[0]
    _check_round_trips(d2_config, d2_model, cfg, ours, tmp_path, True)


def test_random_d2_model_is_the_same_for_a_seed_whatever_the_global_generator():
    cfg = d2_cfg(os.path.join(REPO, "configs", "detectron2", CASES[0][0]))
    torch.manual_seed(100)
    first = random_d2_model(cfg, seed=4).state_dict()
    after_first = torch.rand(3)
    torch.manual_seed(200)  # the init draw used to follow the global generator, and the weights its scale
    second = random_d2_model(cfg, seed=4).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(100)
    assert torch.equal(torch.rand(3), after_first)  # the global generator is left as it was
    other = random_d2_model(cfg, seed=5).state_dict()
    assert not torch.equal(first["roi_heads.box_predictor.cls_score.weight"],
                           other["roi_heads.box_predictor.cls_score.weight"])
