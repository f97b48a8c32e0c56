"""detectron2 checkpoints in and out, checked against a detectron2 build (skipped without one).

A detectron2 R-50-FPN Mask R-CNN with every tensor random (FrozenBN statistics included) is saved by
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

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list  # noqa: E402
from pydetectron.config.merge import cfg_to_yaml  # noqa: E402
from pydetectron.modeling.detector import build_detector  # noqa: E402
from pydetectron.utils.detectron2_peer import (  # noqa: E402
    build_d2_model,
    d2_cfg,
    frozen_bn_affine,
    load_d2_checkpoint,
    randomize_d2_model,
    save_d2_checkpoint,
)
from pydetectron.weights import load_pretrained, save_detectron_weights  # noqa: E402
from pydetectron.weights.convert import convert  # noqa: E402

pytestmark = pytest.mark.slow
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
D2_MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
OURS_MASK_RCNN = "baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml"  # the same network in Detectron's conventions


@pytest.fixture(scope="module")
def d2_checkpoint(tmp_path_factory):
    cfg = d2_cfg(D2_MASK_RCNN)
    torch.manual_seed(0)
    model = randomize_d2_model(build_d2_model(cfg), seed=1)
    folder = tmp_path_factory.mktemp("d2")
    return cfg, model, save_d2_checkpoint(model, folder)


def _our_model():
    cfg = get_cfg()
    merge_cfg_from_file(cfg, os.path.join(CONFIGS, OURS_MASK_RCNN))
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


def test_d2_checkpoint_loads_strictly_and_goes_back_to_detectron2_both_ways(d2_checkpoint, tmp_path):
    d2_config, d2_model, path = d2_checkpoint
    cfg, ours = _our_model()
    report = load_pretrained(ours, path, cfg, training=False, print_fn=lambda _: None)  # strict: raises on leftovers
    assert report.missing == report.unused == report.unmapped == []
    assert len(report.folded) == sum(k.endswith("running_mean") for k in d2_model.state_dict())

    pkl = tmp_path / "ours_detectron.pkl"  # Detectron's file, read by detectron2's Caffe2 conversion
    save_detectron_weights(ours, pkl, cfg_yaml=cfg_to_yaml(cfg))
    fresh = build_d2_model(d2_config)
    incompatible = load_d2_checkpoint(fresh, pkl)
    assert incompatible.missing_keys == [] and incompatible.incorrect_shapes == []
    _assert_same_function(d2_model.state_dict(), fresh.state_dict())

    ours_file = tmp_path / "ours.pth"
    torch.save({"model": ours.state_dict(), "cfg": cfg_to_yaml(cfg)}, ours_file)
    for suffix in (".pkl", ".pth"):
        out = tmp_path / f"converted{suffix}"
        convert(ours_file, out, "detectron2")
        fresh = build_d2_model(d2_config)
        incompatible = load_d2_checkpoint(fresh, out)
        assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
        assert incompatible.incorrect_shapes == []
        _assert_same_function(d2_model.state_dict(), fresh.state_dict())
