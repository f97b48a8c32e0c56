"""pydetectron.Predictor: one BGR image in, the same detections tools/test_net.py finds for it out."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import pydetectron
from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.data.coco import CocoDataset
from pydetectron.engine.checkpoint import atomic_save
from pydetectron.engine.predictor import Predictor, weights_flags
from pydetectron.engine.test_engine import TestOptions, load_detections, run_test
from pydetectron.evaluation.inference import compact
from pydetectron.modeling.detector import build_detector


def _cfg(cfg_file: str):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, cfg_file)
    merge_cfg_from_list(cfg, ["TEST.SCALE", 96, "MODEL.NUM_CLASSES", 4, "TEST.DETECTIONS_PER_IM", 10])
    return cfg


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_cfg_file) -> str:
    """A real (randomly initialised) ResNet-18-FPN Mask R-CNN of the tiny cfg, saved as a checkpoint."""
    cfg = _cfg(tiny_cfg_file)
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    path = tmp_path / "run" / "ckpt" / "model_step1.pth"
    atomic_save({"model": build_detector(cfg).state_dict(), "step": 1}, path)
    return str(path)


def test_predictor_gives_test_net_detections(tmp_path, tiny_cfg_file, tiny_checkpoint, shapes_val):
    run_test(_cfg(tiny_cfg_file), TestOptions(cfg_file=tiny_cfg_file, dataset=shapes_val, load_ckpt=tiny_checkpoint,
                                              output_dir=str(tmp_path / "test"), use_cuda=False), lambda _: None)
    _, expected = load_detections(tmp_path / "test" / "detections.pkl")
    predictor = pydetectron.Predictor(_cfg(tiny_cfg_file), tiny_checkpoint, device="cpu", dataset=shapes_val)
    assert predictor.class_names == ["__background__", "circle", "square", "triangle"]
    entries = CocoDataset(shapes_val).get_roidb()
    assert sum(len(expected[e["id"]]["scores"]) for e in entries) > 0  # the comparison is not vacuous
    for entry in entries:
        got = compact(predictor(cv2.imread(entry["image"], cv2.IMREAD_COLOR)))
        want = expected[entry["id"]]
        for key in ("boxes", "scores", "classes"):
            np.testing.assert_array_equal(got[key], want[key])
        assert got["segms"] == want["segms"]


def test_predictor_takes_a_yaml_path_and_leaves_a_given_cfg_alone(tiny_cfg_file, tiny_checkpoint, shapes_val):
    cfg = _cfg(tiny_cfg_file)
    Predictor(cfg, tiny_checkpoint, device="cpu", dataset=shapes_val, print_fn=lambda _: None)
    assert not cfg.is_frozen() and cfg.MODEL.NUM_CLASSES == 4
    from_path = Predictor(tiny_cfg_file, tiny_checkpoint, device="cpu", dataset=shapes_val, print_fn=lambda _: None)
    assert from_path.cfg.is_frozen() and from_path.cfg.MODEL.NUM_CLASSES == 4
    detections = from_path(np.full((70, 90, 3), 120, np.uint8))
    assert detections["masks"].shape[1:] == (70, 90)  # original pixels


def test_bad_image_is_refused_and_weights_flags_name_the_source(tiny_cfg_file, tiny_checkpoint, shapes_val):
    predictor = Predictor(tiny_cfg_file, tiny_checkpoint, device="cpu", dataset=shapes_val, print_fn=lambda _: None)
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), "image.jpg"):
        with pytest.raises(ValueError, match=r"BGR uint8 image of shape \(H, W, 3\)"):
            predictor(bad)
    assert weights_flags("https://x/model_final.pkl") == (None, "https://x/model_final.pkl")
    assert weights_flags("run/model_step9.pth") == ("run/model_step9.pth", None)
    assert weights_flags("moco_v2_800ep.pth.tar") == ("moco_v2_800ep.pth.tar", None)  # any extension: read by content
