"""tools/infer_simple.py: one picture per image, drawn where the detection is, bad files skipped, flags."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from tools_stubs import FixedDetector
from torch import nn

import pydetectron.engine.inference_model as inference_model
from pydetectron.data.builtin_meta import COCO_PERSON_SKELETON
from pydetectron.data.catalog import get_dataset, register_dataset
from pydetectron.engine.checkpoint import atomic_save
from pydetectron.engine.dataset_cfg import dataset_meta

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "infer_simple.py"
FLAGS = ["--cfg", "--load_ckpt", "--load_detectron", "--dataset", "--image_dir", "--images", "--output_dir",
         "--thresh", "--kp_thresh", "--output_ext", "--output_json", "--set"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("infer_simple", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--help"])
    out = capsys.readouterr().out
    assert [flag for flag in FLAGS if flag not in out] == []


def test_coco_names_by_default_and_keypoint_skeleton():
    meta = dataset_meta("coco")
    names = meta.classes
    assert len(names) == 81 and names[:3] == ["__background__", "person", "bicycle"] and names[-1] == "toothbrush"
    assert len(set(names)) == 81 and not meta.skeleton and meta.num_keypoints == 0
    meta = dataset_meta("keypoints_coco")
    assert meta.classes == ["__background__", "person"] and len(meta.skeleton) == 19 and meta.num_keypoints == 17
    assert {k for pair in meta.skeleton for k in pair} == set(range(1, 18))  # all 17 COCO keypoints, 1-based
    # left/right pairs swap under a flip (TEST.KPS_AUG): nose stays, left_eye <-> right_eye, ...
    assert meta.keypoint_flip_permutation().tolist() == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def test_dataset_names_and_skeleton_from_the_catalog(shapes_val):
    meta = dataset_meta(shapes_val)
    assert meta.classes == ["__background__", "circle", "square", "triangle"] and not meta.skeleton
    assert meta.num_keypoints == 0
    spec = get_dataset(shapes_val)
    register_dataset("tools_kp_shapes_val", spec.image_dir, str(Path(spec.ann_file).with_name("keypoints_val.json")))
    meta = dataset_meta("tools_kp_shapes_val")
    assert meta.classes == ["__background__", "triangle"] and meta.skeleton == [[1, 2], [2, 3], [3, 1]]
    assert meta.num_keypoints == 3 and meta.keypoint_flip_permutation().tolist() == [0, 2, 1]


@pytest.fixture
def fixed_checkpoint(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(inference_model, "build_detector", lambda cfg: FixedDetector(num_classes=cfg.MODEL.NUM_CLASSES))
    path = tmp_path / "model.pth"
    atomic_save({"model": FixedDetector().state_dict()}, path)
    return str(path)


def test_one_picture_per_image_drawn_at_the_detection(tmp_path, tiny_cfg_file, fixed_checkpoint, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    picture = rng.integers(60, 120, size=(80, 100, 3), dtype=np.uint8)
    cv2.imwrite(str(images / "a.png"), picture)
    cv2.imwrite(str(images / "b.png"), picture[:, ::-1])
    (images / "notes.txt").write_text("not an image")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    tool.main(["--cfg", tiny_cfg_file, "--load_ckpt", fixed_checkpoint, "--image_dir", str(images),
               "--output_dir", str(out), "--output_ext", "png"])
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.png.png", "b.png.png"]
    assert "Skipping" in printed and "notes.txt" in printed and "broken.jpg: cannot be read" in printed
    assert "a.png: " in printed and " s, 1 detections" in printed
    drawn = cv2.imread(str(out / "a.png.png"))
    changed = np.any(drawn != picture, axis=2)
    x1, y1, x2, y2 = FixedDetector().box
    assert changed[y1 + 5: y2 - 5, x1 + 5: x2 - 5].mean() > 0.9  # the translucent mask
    assert changed[y1: y2 + 1, x2].mean() > 0.5  # the box outline
    assert changed[:y1, x1:].any()  # the label above the box
    assert not changed[y2 + 5:, :].any() and not changed[:, : x1 - 5].any()  # nothing below or left of it


def test_high_threshold_draws_nothing_and_pdf_output(tmp_path, tiny_cfg_file, fixed_checkpoint):
    image = tmp_path / "c.png"
    picture = np.full((80, 100, 3), 90, np.uint8)
    cv2.imwrite(str(image), picture)
    tool.main(["--cfg", tiny_cfg_file, "--load_ckpt", fixed_checkpoint, "--images", str(image), "--output_dir",
               str(tmp_path / "o"), "--thresh", "0.99", "--output_ext", "png"])
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "o" / "c.png.png")), picture)
    tool.main(["--cfg", tiny_cfg_file, "--load_ckpt", fixed_checkpoint, "--images", str(image), "--output_dir",
               str(tmp_path / "p"), "--output_ext", "pdf"])
    assert (tmp_path / "p" / "c.png.pdf").read_bytes().startswith(b"%PDF")


def test_output_json_holds_every_detection_in_json_ids(tmp_path, tiny_cfg_file, shapes_val, monkeypatch, capsys):
    monkeypatch.setattr(inference_model, "build_detector",
                        lambda cfg: FixedDetector(num_classes=cfg.MODEL.NUM_CLASSES, label=3))
    checkpoint = tmp_path / "model.pth"
    atomic_save({"model": FixedDetector(num_classes=4).state_dict()}, checkpoint)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), np.full((80, 100, 3), 90, np.uint8))
    results = tmp_path / "out" / "detections.json"
    tool.main(["--cfg", tiny_cfg_file, "--load_ckpt", str(checkpoint), "--dataset", shapes_val, "--thresh", "0.99",
               "--images", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--output_dir", str(tmp_path / "o"),
               "--output_json", str(results)])
    assert f"Wrote 2 results to {results}" in capsys.readouterr().out
    entries = json.loads(results.read_text())  # also those below --thresh, which are not drawn
    assert [(e["file_name"], e["image_id"]) for e in entries] == [("a.png", 0), ("b.png", 1)]
    x1, y1, x2, y2 = FixedDetector().box
    for entry in entries:
        assert entry["category_id"] == 7  # class 3 of the shapes is 'triangle', json id 7
        assert entry["bbox"] == [x1, y1, x2 - x1 + 1, y2 - y1 + 1] and entry["score"] == pytest.approx(0.95)
        mask = mask_util.decode(entry["segmentation"])
        assert mask.shape == (80, 100) and mask.sum() == mask[y1: y2 + 1, x1: x2 + 1].sum() == 41 * 31


def test_class_count_mismatch_is_refused(tmp_path, tiny_cfg_file, fixed_checkpoint):
    with pytest.raises(SystemExit, match="MODEL.NUM_CLASSES is 4 but --dataset 'coco' names 81"):
        tool.main(["--cfg", tiny_cfg_file, "--load_ckpt", fixed_checkpoint, "--images", "x.png", "--dataset",
                   "coco", "--set", "MODEL.NUM_CLASSES", "4"])


class KeypointStub(nn.Module):
    """A Detectron-style keypoint model's output: one class-1 detection with 17 confident keypoints; its
    box classifier (cls_score) says how many classes the weights hold."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.cls_score = nn.Linear(8, num_classes)

    def forward(self, data, im_info, roidb=None):
        keypoints = torch.zeros((1, 17, 3))
        keypoints[0, :, 0] = torch.linspace(22, 58, 17)
        keypoints[0, :, 1] = 35.0
        keypoints[0, :, 2] = 10.0
        return [{"boxes": torch.tensor([[20.0, 20.0, 60.0, 50.0]]), "scores": torch.tensor([0.95]),
                 "classes": torch.tensor([1]), "keypoints": keypoints}]


@pytest.fixture
def drawn(monkeypatch) -> list:
    """What infer_simple hands to draw_detections: (class name of each detection, skeleton) per picture."""
    calls = []
    real = tool.draw_detections

    def recording(image, detections, class_names, thresh, kp_thresh, skeleton):
        calls.append(([class_names[int(c)] for c in detections["classes"]], skeleton))
        return real(image, detections, class_names, thresh, kp_thresh, skeleton)

    monkeypatch.setattr(tool, "draw_detections", recording)
    return calls


@pytest.mark.parametrize("set_cfgs", [[], ["MODEL.NUM_CLASSES", "-1"]])
def test_detectron_keypoint_model_without_dataset_draws_person(tmp_path, monkeypatch, drawn, capsys, set_cfgs):
    """Detectron's keypoint config (2 classes, TEST.DATASETS not on disk) without --dataset: 'person' with COCO's
    skeleton, whether the class count comes from the cfg or from the weights' cls_score."""
    monkeypatch.setattr(inference_model, "build_detector", lambda cfg: KeypointStub(cfg.MODEL.NUM_CLASSES))
    checkpoint = tmp_path / "kp.pth"
    atomic_save({"model": KeypointStub(2).state_dict()}, checkpoint)
    image = tmp_path / "p.png"
    cv2.imwrite(str(image), np.full((80, 100, 3), 100, np.uint8))
    cfg_file = str(ROOT / "configs" / "baselines" / "e2e_keypoint_rcnn_R-50-FPN_1x.yaml")
    tool.main(["--cfg", cfg_file, "--load_ckpt", str(checkpoint), "--images", str(image), "--output_dir",
               str(tmp_path / "out"), "--no_cuda", "--set", "TEST.SCALE", "64", "TEST.MAX_SIZE", "100", *set_cfgs])
    assert drawn == [(["person"], COCO_PERSON_SKELETON)]
    if set_cfgs:
        assert "MODEL.NUM_CLASSES = 2 from the weights' box classifier" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="MODEL.NUM_CLASSES is 2 but --dataset 'coco' names 81"):
        tool.main(["--cfg", cfg_file, "--load_ckpt", str(checkpoint), "--images", str(image), "--dataset", "coco"])


def test_class_names_follow_the_cfg_dataset(tmp_path, tiny_cfg_file, shapes_val, monkeypatch, drawn):
    monkeypatch.setattr(inference_model, "build_detector", lambda cfg: FixedDetector(num_classes=cfg.MODEL.NUM_CLASSES))
    checkpoint = tmp_path / "model.pth"
    atomic_save({"model": FixedDetector(num_classes=4).state_dict()}, checkpoint)
    image = tmp_path / "s.png"
    cv2.imwrite(str(image), np.full((80, 100, 3), 100, np.uint8))
    tool.main(["--cfg", tiny_cfg_file, "--load_ckpt", str(checkpoint), "--images", str(image), "--output_dir",
               str(tmp_path / "out"), "--no_cuda", "--set", "TEST.DATASETS", f"('{shapes_val}',)",
               "MODEL.NUM_CLASSES", "4"])
    assert drawn == [(["circle"], [])]  # class 1 of the shapes json, not COCO's 'person'


def test_test_weights_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch, drawn):
    """Detectron's way: the weights named by URL in TEST.WEIGHTS, no weights flag; the second run reuses the
    cache without a request."""
    from weights_server import WeightsServer

    monkeypatch.setattr(inference_model, "build_detector", lambda cfg: KeypointStub(cfg.MODEL.NUM_CLASSES))
    checkpoint = tmp_path / "kp.pth"
    atomic_save({"model": KeypointStub(2).state_dict()}, checkpoint)
    server = WeightsServer()
    server.files["/zoo/keypoints/model_final.pth"] = checkpoint.read_bytes()
    image = tmp_path / "p.png"
    cv2.imwrite(str(image), np.full((80, 100, 3), 100, np.uint8))
    try:
        for _ in range(2):
            tool.main(["--cfg", str(ROOT / "configs" / "baselines" / "e2e_keypoint_rcnn_R-50-FPN_1x.yaml"), "--images",
                       str(image), "--output_dir", str(tmp_path / "out"), "--no_cuda", "--set", "TEST.SCALE", "64",
                       "TEST.WEIGHTS", server.url("/zoo/keypoints/model_final.pth"),
                       "DOWNLOAD_CACHE", str(tmp_path / "cache")])
    finally:
        server.close()
    assert server.requests == ["/zoo/keypoints/model_final.pth"]
    assert drawn == [(["person"], COCO_PERSON_SKELETON)] * 2
