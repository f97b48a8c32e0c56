"""tools/test_net.py and pydetectron.engine.test_engine: ranges, merging, detections.pkl, eval-only,
multi-process testing, flags."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pydetectron.config import get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.data.catalog import get_dataset
from pydetectron.engine.test_engine import (
    TestOptions,
    load_detections,
    merge_detections,
    run_test,
    save_detections,
    split_range,
)

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "test_net.py"
FLAGS = ["--dataset", "--cfg", "--load_ckpt", "--load_detectron", "--output_dir", "--set", "--multi-gpu-testing",
         "--vis", "--range", "--num_workers", "--register", "--eval_only", "--no_cuda"]


def _cfg(cfg_file: str):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, cfg_file)
    merge_cfg_from_list(cfg, ["TEST.SCALE", 96])
    return cfg


def _run(cfg_file, lines=None, **kwargs):
    """run_test as the tool calls it: the cfg file, then the --set list, merged before the engine sees them."""
    cfg = _cfg(cfg_file)
    merge_cfg_from_list(cfg, list(kwargs.get("set_cfgs", ())))
    options = TestOptions(cfg_file=cfg_file, use_cuda=False, **kwargs)
    return run_test(cfg, options, (lines.append if lines is not None else lambda _: None))


def _assert_same_detections(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for image_id in a:
        for key in ("boxes", "scores", "classes"):
            np.testing.assert_array_equal(a[image_id][key], b[image_id][key])
        assert a[image_id]["segms"] == b[image_id]["segms"]


def _load_tool(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool(TOOL)


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert [flag for flag in FLAGS if flag not in out] == []


@pytest.mark.parametrize("args, message", [
    (["--cfg", "x.yaml", "--load_ckpt", "a", "--load_detectron", "b"], "not both"),
    (["--cfg", "x.yaml", "--eval_only", "d.pkl", "--load_ckpt", "a"], "takes no weights"),
    (["--cfg", "x.yaml", "--load_ckpt", "a", "--range", "0", "3", "--num_workers", "2"], "--range is one process"),
    (["--cfg", "x.yaml", "--load_ckpt", "a", "--set", "TEST.SCALE"], "KEY VALUE pairs"),
])
def test_bad_flag_combinations_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("n, parts, expected", [
    (6, 2, [(0, 3), (3, 6)]), (7, 3, [(0, 2), (2, 5), (5, 7)]), (2, 4, [(0, 1), (1, 2)]), (5, 1, [(0, 5)]),
])
def test_split_range_covers_the_dataset_in_near_equal_parts(n, parts, expected):
    assert split_range(n, parts) == expected


def test_merge_refuses_an_image_in_two_parts():
    with pytest.raises(ValueError, match=r"image ids \[2\]"):
        merge_detections([{1: {}, 2: {}}, {2: {}, 3: {}}])


def test_range_parts_merge_to_the_full_run(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "parts"
    lines = []
    metrics = _run(tiny_cfg_file, lines, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(full_dir))
    assert any("images/s" in line for line in lines)
    assert any(line.startswith("copypaste") or "copypaste" in line for line in lines)
    for start, end in ((0, 2), (2, 6)):
        assert _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(part_dir),
                    range=(start, end)) == {}
    name_a, part_a = load_detections(part_dir / "detections_range_0_2.pkl")
    name_b, part_b = load_detections(part_dir / "detections_range_2_6.pkl")
    assert name_a == name_b == shapes_val and (len(part_a), len(part_b)) == (2, 4)
    _, full = load_detections(full_dir / "detections.pkl")
    _assert_same_detections(merge_detections([part_a, part_b]), full)
    assert not (part_dir / "detections.pkl").exists()  # a --range child does not evaluate
    assert set(metrics[shapes_val]) == {"bbox", "segm"}
    # the written result json is what pycocotools was given: one entry per detection
    entries = json.loads((full_dir / f"bbox_{shapes_val}_results.json").read_text())
    assert len(entries) == sum(len(d["scores"]) for d in full.values())


def test_eval_only_reproduces_the_metrics(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    first = _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(tmp_path / "a"))
    copy = tmp_path / "b" / "detections.pkl"
    _, detections = load_detections(tmp_path / "a" / "detections.pkl")
    save_detections(copy, shapes_val, detections)
    lines = []
    again = _run(tiny_cfg_file, lines, eval_only=str(copy))  # dataset from the pickle, no weights
    assert again == first
    assert (tmp_path / "b" / f"segmentations_{shapes_val}_results.json").is_file()
    for folder in ("a", "b"):  # the figures the copypaste lines print, as json for scripts
        assert json.loads((tmp_path / folder / "evaluation.json").read_text()) == first
    assert any("Evaluating the detections of 6 images" in line for line in lines)


def test_default_output_dir_is_beside_the_checkpoint(shapes_val, tiny_cfg_file, grid_checkpoint):
    _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint)
    assert (Path(grid_checkpoint).parents[1] / "test" / "detections.pkl").is_file()


def test_weights_outside_a_ckpt_folder_test_into_their_own_folder(tmp_path):
    from pydetectron.engine.test_engine import default_output_dir

    pkl = tmp_path / "zoo" / "model_final.pkl"
    assert default_output_dir(TestOptions(load_detectron=str(pkl))) == (tmp_path / "zoo" / "test").resolve()
    ckpt = tmp_path / "run" / "ckpt" / "model_step9.pth"
    assert default_output_dir(TestOptions(load_ckpt=str(ckpt))) == (tmp_path / "run" / "test").resolve()
    url = "https://dl.fbaipublicfiles.com/detectron/35861858/model_final.pkl"
    assert default_output_dir(TestOptions(load_detectron=url)) == Path("test")  # nothing local beside a URL


def test_eval_only_refuses_incomplete_detections(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(tmp_path), range=(0, 2))
    with pytest.raises(ValueError, match="cover 2 of 6 images"):
        _run(tiny_cfg_file, eval_only=str(tmp_path / "detections_range_0_2.pkl"))


def test_bad_range_and_bad_pickle_are_named(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--range 4 9"):
        _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(tmp_path), range=(4, 9))
    bad = tmp_path / "junk.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pkl"):
        load_detections(bad)


def test_vis_draws_one_picture_per_image(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(tmp_path), vis=True,
         set_cfgs=())
    assert len(list((tmp_path / "vis").glob("*.jpg"))) == 6


def test_multi_process_testing_merges_to_the_single_run(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    spec = get_dataset(shapes_val)
    single = _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(tmp_path / "one"))
    lines = []
    child = [sys.executable, str(Path(__file__).with_name("stub_test_net.py"))]
    merged = _run(tiny_cfg_file, lines, dataset=shapes_val, load_ckpt=grid_checkpoint, num_workers=2,
                  output_dir=str(tmp_path / "two"), set_cfgs=["TEST.SCALE", "96"], child_command=child,
                  register=[f"{shapes_val}:{spec.image_dir}:{spec.ann_file}"])
    assert merged == single
    _, one = load_detections(tmp_path / "one" / "detections.pkl")
    _, two = load_detections(tmp_path / "two" / "detections.pkl")
    _assert_same_detections(one, two)
    assert sum("Launched process" in line for line in lines) == 2
    assert (tmp_path / "two" / "detections_range_0_3.pkl").is_file()


def test_children_get_one_gpu_each_or_a_share_of_the_cores(monkeypatch):
    from pydetectron.engine import test_engine

    monkeypatch.setattr(test_engine.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [test_engine._child_env(i, 3)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["3", "5", "3"]
    monkeypatch.setattr(test_engine.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(test_engine.os, "cpu_count", lambda: 8)
    assert test_engine._child_env(0, 4)["OMP_NUM_THREADS"] == "2"


def test_child_arguments_carry_the_parents_choices(tmp_path):
    options = TestOptions(cfg_file="c.yaml", set_cfgs=["TEST.SCALE", "96"], register=["d:i:a.json"],
                          load_ckpt="m.pth", use_cuda=False, vis=True, child_command=["python", "tool.py"])
    from pydetectron.engine.test_engine import child_arguments

    args = child_arguments(options, "d", 4, tmp_path, 3, 6)
    assert args[:2] == ["python", "tool.py"]
    text = " ".join(args)
    for part in ("--cfg c.yaml", "--register d:i:a.json", "--dataset d", f"--output_dir {tmp_path}", "--range 3 6",
                 "--load_ckpt m.pth", "--no_cuda", "--vis", "--set TEST.SCALE 96 MODEL.NUM_CLASSES 4"):
        assert part in text



@pytest.fixture(scope="module")
def real_run(shapes_val, tmp_path_factory):
    """test_net's path with the real (random-weight) Mask R-CNN: strict checkpoint load, inference, pickle,
    result jsons, COCO evaluation. Returns (metrics, output dir)."""
    import torch
    from tools_stubs import TINY_CFG

    from pydetectron.config import assert_and_infer_cfg
    from pydetectron.engine.checkpoint import atomic_save
    from pydetectron.modeling.detector import build_detector

    root = tmp_path_factory.mktemp("real_run")
    cfg_file = root / "tiny.yaml"
    cfg_file.write_text(TINY_CFG)
    cfg = _cfg(str(cfg_file))
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", 4])
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    checkpoint = root / "ckpt" / "model_step1.pth"
    atomic_save({"model": build_detector(cfg).state_dict()}, checkpoint)
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse cache fixture is not active yet
        patch.setenv("PYDETECTRON_CACHE", str(root / "cache"))
        metrics = _run(str(cfg_file), dataset=shapes_val, load_ckpt=str(checkpoint), output_dir=str(root / "test"),
                       set_cfgs=["TEST.DETECTIONS_PER_IM", "5"])
    return metrics, root / "test"


def test_real_detector_end_to_end(real_run, shapes_val):
    metrics, out = real_run
    assert set(metrics[shapes_val]) == {"bbox", "segm"}
    _, detections = load_detections(out / "detections.pkl")
    assert len(detections) == 6 and sum(len(d["scores"]) for d in detections.values()) > 0
    assert all(len(d["segms"]) == len(d["scores"]) for d in detections.values())


def test_result_masks_have_their_images_size(real_run, shapes_val):
    _, out = real_run
    _, detections = load_detections(out / "detections.pkl")
    spec = get_dataset(shapes_val)
    sizes = {im["id"]: [im["height"], im["width"]] for im in json.loads(Path(spec.ann_file).read_text())["images"]}
    wrong = {image_id: d["segms"][0]["size"] for image_id, d in detections.items()
             if d["segms"] and d["segms"][0]["size"] != sizes[image_id]}
    assert wrong == {}, f"mask sizes differ from the images' for {wrong} (images: {sizes})"


def _random_checkpoint(cfg_file: str, path: Path, set_cfgs) -> str:
    import torch

    from pydetectron.config import assert_and_infer_cfg
    from pydetectron.engine.checkpoint import atomic_save
    from pydetectron.modeling.detector import build_detector

    cfg = _cfg(cfg_file)
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", 4, *set_cfgs])
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    atomic_save({"model": build_detector(cfg).state_dict()}, path)
    return str(path)


def test_rpn_only_proposals_feed_a_fast_rcnn_model(shapes_val, tiny_cfg_file, tmp_path):
    """Detectron's two-stage workflow: an RPN-only model writes rpn_proposals.pkl and reports its recall;
    a Fast R-CNN model (no RPN) then detects in those proposals through TEST.PROPOSAL_FILES."""
    from pydetectron.data.proposals import read_proposal_file

    rpn_set = ["MODEL.RPN_ONLY", "True", "MODEL.FASTER_RCNN", "False", "MODEL.MASK_ON", "False"]
    rpn_ckpt = _random_checkpoint(tiny_cfg_file, tmp_path / "rpn" / "model.pth", rpn_set)
    lines = []
    metrics = _run(tiny_cfg_file, lines, dataset=shapes_val, load_ckpt=rpn_ckpt, output_dir=str(tmp_path / "rpn_out"),
                   set_cfgs=rpn_set, vis=True)
    assert any("RPN-only model has no classes to draw" in line for line in lines)
    recall = metrics[shapes_val]["box_proposal"]
    assert list(recall)[:2] == ["AR@100", "ARs@100"] and 0.0 <= recall["AR@1000"] <= 1.0
    assert recall["AR@1000"] >= recall["AR@100"]  # 50 proposals per image: equal here, never lower
    assert "copypaste: Task: box_proposal" in lines
    proposal_file = tmp_path / "rpn_out" / "rpn_proposals.pkl"
    proposals = read_proposal_file(proposal_file)
    assert len(proposals) == 6 and all(0 < len(p) <= 50 for p in proposals.values())

    fast_set = ["MODEL.FASTER_RCNN", "False", "TEST.PROPOSAL_FILES", repr((str(proposal_file),)),
                "TEST.PROPOSAL_LIMIT", "20"]
    fast_ckpt = _random_checkpoint(tiny_cfg_file, tmp_path / "fast" / "model.pth", fast_set)
    metrics = _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=fast_ckpt, output_dir=str(tmp_path / "fast_out"),
                   set_cfgs=fast_set + ["TEST.DETECTIONS_PER_IM", "5"])
    assert set(metrics[shapes_val]) == {"bbox", "segm"}
    _, detections = load_detections(tmp_path / "fast_out" / "detections.pkl")
    assert sum(len(d["scores"]) for d in detections.values()) > 0

    with pytest.raises(ValueError, match="TEST.PROPOSAL_FILES has 0 files"):
        _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=fast_ckpt, output_dir=str(tmp_path / "none"),
             set_cfgs=["MODEL.FASTER_RCNN", "False"])


def test_class_count_the_dataset_does_not_have_is_refused(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    from pydetectron.engine.dataset_cfg import DatasetMismatchError

    with pytest.raises(DatasetMismatchError, match=f"MODEL.NUM_CLASSES is 81 but the test dataset '{shapes_val}' "
                                                   "names 4 classes"):
        _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(tmp_path),
             set_cfgs=["MODEL.NUM_CLASSES", "81"])


def test_weights_from_test_weights_as_detectron_reads_them(shapes_val, tiny_cfg_file, grid_checkpoint, tmp_path):
    """Without --load_ckpt / --load_detectron the tool tests Detectron's TEST.WEIGHTS; with neither, it says so."""
    args = ["--cfg", tiny_cfg_file, "--dataset", shapes_val, "--no_cuda", "--set", "TEST.SCALE", "96"]
    with pytest.raises(SystemExit, match="give --load_ckpt, --load_detectron or --set TEST.WEIGHTS"):
        tool.main(args + ["--output_dir", str(tmp_path / "none")])
    tool.main(args + ["TEST.WEIGHTS", grid_checkpoint, "--output_dir", str(tmp_path / "cfg")])
    _run(tiny_cfg_file, dataset=shapes_val, load_ckpt=grid_checkpoint, output_dir=str(tmp_path / "flag"))
    _assert_same_detections(load_detections(tmp_path / "cfg" / "detections.pkl")[1],
                            load_detections(tmp_path / "flag" / "detections.pkl")[1])
