"""--config-file on the three tools: detectron2 YAML + trailing opts, --set after, exclusive with --cfg; test_net's
children; train_net_step's --eval-only and --resume with detectron2's meaning; MODEL.WEIGHTS and OUTPUT_DIR."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pydetectron.engine.checkpoint import atomic_save
from pydetectron.engine.test_engine import TestOptions, child_arguments, load_detections
from pydetectron.engine.training import TrainOptions, resolve_resume
from pydetectron.utils.cli import load_cfg

ROOT = Path(__file__).resolve().parents[2]
# the shapes d2-style config, shrunk; MODEL.WEIGHTS etc. come as opts in the tests
D2_TINY = """\
_BASE_: "{base}"
MODEL:
  RESNETS: {{DEPTH: 18, RES2_OUT_CHANNELS: 64}}
  FPN: {{OUT_CHANNELS: 32}}
  ROI_HEADS: {{NUM_CLASSES: 3}}
INPUT: {{MIN_SIZE_TEST: 96, MAX_SIZE_TEST: 160}}
"""


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_net = _load_tool("test_net")
train_net_step = _load_tool("train_net_step")
infer_simple = _load_tool("infer_simple")


@pytest.fixture
def d2_cfg_file(tmp_path) -> str:
    path = tmp_path / "d2_tiny.yaml"
    path.write_text(D2_TINY.format(base=ROOT / "configs" / "detectron2" / "shapes_mask_rcnn_R_50_FPN.yaml"))
    return str(path)


@pytest.mark.parametrize("tool, extra", [(test_net, ["--load_ckpt", "m.pth"]), (train_net_step, []),
                                         (infer_simple, ["--image_dir", "d"])])
def test_cfg_and_config_file_are_exclusive_and_opts_need_config_file(tool, extra, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--cfg", "a.yaml", "--config-file", "b.yaml", *extra])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(["--cfg", "a.yaml", *extra, "MODEL.WEIGHTS", "w.pkl"])
    assert "detectron2 overrides for --config-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(["--config-file", "a.yaml", *extra, "MODEL.WEIGHTS"])
    assert "odd number" in capsys.readouterr().err
    args = tool.parse_args(["--config-file", "b.yaml", *extra, "MODEL.WEIGHTS", "w.pkl", "OUTPUT_DIR", "out"])
    assert args.config_file == "b.yaml" and args.opts == ["MODEL.WEIGHTS", "w.pkl", "OUTPUT_DIR", "out"]


def test_load_cfg_translates_then_applies_set(d2_cfg_file):
    args = test_net.parse_args(["--config-file", d2_cfg_file, "--set", "TEST.NMS", "0.4", "--",
                                "MODEL.WEIGHTS", "w.pkl", "INPUT.MIN_SIZE_TEST", "80"])
    cfg = load_cfg(args)
    assert cfg.MODEL.CONVENTIONS == "detectron2" and cfg.TEST.WEIGHTS == "w.pkl"
    assert cfg.TEST.SCALE == 80 and cfg.TEST.NMS == 0.4 and cfg.MODEL.NUM_CLASSES == 4


def test_children_get_the_config_file_and_opts_back(tmp_path):
    options = TestOptions(config_file="d2.yaml", opts=["MODEL.WEIGHTS", "w.pkl"], set_cfgs=["TEST.NMS", "0.4"],
                          load_ckpt="w.pkl", use_cuda=False, child_command=["python", "tool.py"])
    args = child_arguments(options, "d", 4, tmp_path, 0, 3)
    parsed = test_net.parse_args(args[2:])
    assert parsed.config_file == "d2.yaml" and parsed.cfg_file is None
    assert parsed.opts == ["MODEL.WEIGHTS", "w.pkl"]
    assert parsed.set_cfgs == ["TEST.NMS", "0.4", "MODEL.NUM_CLASSES", "4"] and parsed.range == [0, 3]


def test_test_net_honours_model_weights_and_output_dir(d2_cfg_file, shapes_val, grid_checkpoint, tmp_path):
    out = tmp_path / "d2_out"
    test_net.test_process(test_net.parse_args(["--config-file", d2_cfg_file, "--dataset", shapes_val, "--no_cuda",
                                               "MODEL.WEIGHTS", grid_checkpoint, "OUTPUT_DIR", str(out)]))
    name, detections = load_detections(out / "inference" / "detections.pkl")  # detectron2's OUTPUT_DIR/inference
    assert name == shapes_val and len(detections) == 6
    assert (out / "inference" / "evaluation.json").is_file()


def _checkpoint(folder: Path, step: int) -> Path:
    path = folder / "ckpt" / f"model_step{step}.pth"
    atomic_save({"model": {}, "step": step}, path)
    return path


def test_resume_takes_the_last_checkpoint_of_the_output_dir(tmp_path):
    options = TrainOptions(resume=True)
    resolve_resume(options, tmp_path, print)
    assert not options.resume and options.load_ckpt is None  # none yet: start from MODEL.WEIGHTS
    _checkpoint(tmp_path, 20)
    latest = _checkpoint(tmp_path, 100)
    options = TrainOptions(resume=True)
    resolve_resume(options, tmp_path, print)
    assert options.resume and options.load_ckpt == str(latest)
    explicit = TrainOptions(resume=True, load_ckpt="given.pth")
    resolve_resume(explicit, tmp_path, print)
    assert explicit.load_ckpt == "given.pth"


def test_resume_without_an_output_dir_is_refused_with_cfg(capsys):
    with pytest.raises(SystemExit):
        train_net_step.parse_args(["--cfg", "a.yaml", "--resume"])
    assert "--resume needs --load_ckpt" in capsys.readouterr().err
    assert train_net_step.parse_args(["--config-file", "a.yaml", "--resume"]).resume  # OUTPUT_DIR is the dir


def test_eval_only_evaluates_model_weights_or_the_last_checkpoint(d2_cfg_file, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train_net_step, "run_test", lambda cfg, options, print_fn: calls.append(options))
    out = tmp_path / "run"
    train_net_step.train(train_net_step.parse_args(
        ["--config-file", d2_cfg_file, "--eval-only", "--no_cuda", "MODEL.WEIGHTS", "w.pkl", "OUTPUT_DIR", str(out)]))
    assert calls[-1].load_detectron == "w.pkl" and calls[-1].output_dir == str(out / "inference")
    latest = _checkpoint(out, 7)
    train_net_step.train(train_net_step.parse_args(
        ["--config-file", d2_cfg_file, "--eval-only", "--resume", "--no_cuda", "MODEL.WEIGHTS", "w.pkl",
         "OUTPUT_DIR", str(out)]))
    assert calls[-1].load_ckpt == str(latest) and calls[-1].load_detectron is None
    with pytest.raises(SystemExit, match="no weights"):
        train_net_step.train(train_net_step.parse_args(["--config-file", d2_cfg_file, "--eval-only"]))


def test_eval_only_runs_the_evaluation(d2_cfg_file, shapes_val, grid_checkpoint, tmp_path):
    out = tmp_path / "run"
    train_net_step.train(train_net_step.parse_args(
        ["--config-file", d2_cfg_file, "--eval-only", "--no_cuda", "--dataset", shapes_val,
         "MODEL.WEIGHTS", grid_checkpoint, "OUTPUT_DIR", str(out)]))
    name, detections = load_detections(out / "inference" / "detections.pkl")
    assert name == shapes_val and len(detections) == 6


def test_infer_simple_says_when_images_swallowed_the_opts(capsys):
    with pytest.raises(SystemExit):
        infer_simple.parse_args(["--config-file", "a.yaml", "--images", "x.jpg", "MODEL.WEIGHTS", "w.pth"])
    assert "put detectron2 KEY VALUE opts before --images" in capsys.readouterr().err
    args = infer_simple.parse_args(["--config-file", "a.yaml", "MODEL.WEIGHTS", "w.pth", "--images", "x.jpg"])
    assert args.opts == ["MODEL.WEIGHTS", "w.pth"] and args.images == ["x.jpg"]
