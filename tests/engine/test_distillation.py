"""Teacher/student training (DISTILL.*, engine/distillation.py) end to end on a tiny shapes dataset: a teacher
trained for two steps, merged with a torchvision R-18 student backbone, an MGD run from the merged file with
the teacher frozen and the method's losses training the student, an exact resume across a matching update,
and the split student evaluated by tools/test_net.py exactly as the run's own evaluation."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from pydetectron.config.merge import ConfigError
from pydetectron.data.shapes import generate_split
from pydetectron.engine.checkpoint import load_checkpoint
from pydetectron.engine.distillation import DistillationHook, teacher_cfg
from pydetectron.engine.hooks import TrainerHook
from pydetectron.engine.training import TrainOptions, run_training
from pydetectron.weights import convert
from pydetectron.weights.files import read_object, write_object
from pydetectron.weights.pretrained import WeightMismatchError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import train_net_step  # noqa: E402


def _load_tool(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_net = _load_tool(ROOT / "tools" / "test_net.py")

# Both networks: RetinaNet on torchvision's RGB input, tiny images and heads.
COMMON = """
MODEL:
  TYPE: retinanet
  CONV_BODY: FPN.fpn_ResNet18_conv5_body
  LOAD_IMAGENET_PRETRAINED_WEIGHTS: False
  INPUT_COLOR_ORDER: RGB
PIXEL_MEANS: [[[123.675, 116.28, 103.53]]]
PIXEL_STDS: [[[58.395, 57.12, 57.375]]]
NUM_GPUS: 1
FPN: {FPN_ON: True, MULTILEVEL_RPN: True, RPN_MIN_LEVEL: 3, RPN_MAX_LEVEL: 7, COARSEST_STRIDE: 128,
      EXTRA_CONV_LEVELS: True, DIM: 32}
RETINANET: {RETINANET_ON: True, NUM_CONVS: 1, ANCHOR_SCALE: 2, INFERENCE_TH: 0.0, PRE_NMS_TOP_N: 50}
SOLVER: {TYPE: AdamW, BASE_LR: 0.001, WEIGHT_DECAY: 0.05, LR_POLICY: cosine_decay, MAX_ITER: 4,
         WARM_UP_ITERS: 1}
TRAIN: {SCALES: [64, 96], MAX_SIZE: 128, IMS_PER_BATCH: 2, SNAPSHOT_ITERS: 2}
TEST: {SCALE: 96, MAX_SIZE: 128}
DATA_LOADER: {NUM_THREADS: 1}
"""
TEACHER = COMMON + "RESNETS: {STRIDE_1X1: False, USE_GN: True, FREEZE_AT: 0}\n"
# The COCO recipe's student: AffineChannel body from a torchvision R-18, stem frozen, stage-last GroupNorms;
# a matching before step 1 and again before step 3 (so the resume below starts on a matching update).
STUDENT = COMMON + """
RESNETS: {STRIDE_1X1: False, FREEZE_AT: 1, ENABLE_STAGE_LAST_NORM: True}
DISTILL:
  METHOD: mgd
  TEACHER_CFG: TEACHER_FILE
  LOSS_FACTORS: (1e3, 1e3, 1e2, 1e2)
  MGD: {UPDATE_FREQ: [2, 2], UPDATE_SLOW_STEP: 0, UPDATE_ITER: 1}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    paths = generate_split(root / "shapes", "train", 4, seed=3)
    register = f"tiny_shapes:{root / 'shapes' / 'train'}:{paths['instances']}"
    teacher_file = root / "teacher.yaml"
    teacher_file.write_text(TEACHER)
    student_file = root / "student.yaml"
    student_file.write_text(STUDENT.replace("TEACHER_FILE", str(teacher_file)))
    train_net_step.main(["--register", register, "--cfg", str(teacher_file), "--no_cuda", "--output_dir",
                         str(root / "teacher"), "--set", "TRAIN.DATASETS", "('tiny_shapes',)",
                         "MODEL.NUM_CLASSES", "4", "SOLVER.MAX_ITER", "2"])
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), root / "r18.pth")
    convert.merge(root / "teacher" / "ckpt" / "model_final.pth", root / "r18.pth", root / "merged.pth")
    return {"root": root, "register": register, "student_cfg": str(student_file), "merged": root / "merged.pth",
            "teacher_ckpt": root / "teacher" / "ckpt" / "model_final.pth"}


class Spy(TrainerHook):
    """Checks, at every step of a distillation run, what the teacher and the method's parameters went through."""

    def __init__(self):
        self.steps = 0

    def before_train(self, trainer) -> None:
        self.distill = next(h for h in trainer.hooks if isinstance(h, DistillationHook))
        self.teacher_start = {k: v.clone() for k, v in self.distill.teacher.state_dict().items()}
        optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert all(id(p) in optimized for p in self.distill.method.parameters())
        assert not any(id(p) in optimized for p in self.distill.teacher.parameters())

    def after_step(self, trainer, step, losses) -> None:
        teacher, method = self.distill.teacher, self.distill.method
        assert not teacher.training and trainer.model.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
        body = self.distill.student_body
        assert body.res5[1].branch2b.norm.weight.grad.abs().sum() > 0  # MGD's trainable stage-last norm
        assert body.res3[0].branch2a.conv.weight.grad.abs().sum() > 0
        names = sorted(k for k in losses if k.startswith("loss_distill"))
        assert names == ["loss_distill_c2", "loss_distill_c3", "loss_distill_c4", "loss_distill_c5"]
        assert all(math.isfinite(losses[k]) and losses[k] > 0 for k in names)
        self.steps += 1

    def after_train(self, trainer) -> None:
        for key, value in self.distill.teacher.state_dict().items():
            assert torch.equal(value, self.teacher_start[key]), f"teacher's {key} changed"


def _run(setup: dict, name: str, *extra: str, hooks=()) -> Path:
    out = setup["root"] / name
    args = train_net_step.parse_args(["--dataset", "tiny_shapes", "--register", setup["register"], "--cfg",
                                      setup["student_cfg"], "--no_cuda", "--disp_interval", "1", "--output_dir",
                                      str(out), *extra, "--set", "TRAIN.WEIGHTS", str(setup["merged"])])
    cfg = train_net_step.load_cfg(args)
    options = TrainOptions(dataset=args.dataset, register=args.register, use_cuda=False, output_dir=str(out),
                           load_ckpt=args.load_ckpt, resume=args.resume, disp_interval=1, hooks=hooks)
    return run_training(cfg, options, lambda line: print(line, flush=True))


def _metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def test_mgd_run_from_a_merged_file_resumes_exactly_and_its_split_student_evaluates_alike(setup):
    spy = Spy()
    full = _run(setup, "full", hooks=[spy])
    assert spy.steps == 4
    log = (full / "log.txt").read_text()
    assert log.count("MGD: channel matching updated") == 2 and "its student part" in log
    records = _metrics(full)
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all("loss_distill_c4" in r for r in steps)
    final = load_checkpoint(full / "ckpt" / "model_final.pth")
    assert not any(k.startswith(("t_net", "s_net")) for k in final["model"])  # the student only, no teacher
    assert {"margin_c2", "matching_c5", "matched"} <= set(final["hooks"]["Distillation"]["method"])

    resumed = _run(setup, "resumed", "--resume", "--load_ckpt", str(full / "ckpt" / "model_step2.pth"))
    got = load_checkpoint(resumed / "ckpt" / "model_step4.pth")
    expected = load_checkpoint(full / "ckpt" / "model_step4.pth")
    assert expected["model"].keys() == got["model"].keys()
    for key in expected["model"]:
        torch.testing.assert_close(got["model"][key], expected["model"][key], rtol=0, atol=0, msg=f"model's {key}")
    for key, value in expected["hooks"]["Distillation"]["method"].items():
        assert torch.equal(got["hooks"]["Distillation"]["method"][key], value), f"method's {key} after resume"
    student = setup["root"] / "student.pth"
    convert.split(full / "ckpt" / "model_final.pth", student, "student")
    with pytest.raises(ValueError, match="holds the student only"):
        convert.split(full / "ckpt" / "model_final.pth", setup["root"] / "t.pth", "teacher")
    test_out = setup["root"] / "test"
    test_net.main(["--dataset", "tiny_shapes", "--register", setup["register"], "--cfg", setup["student_cfg"],
                   "--load_ckpt", str(student), "--no_cuda", "--output_dir", str(test_out)])
    in_run = next(r for r in records if "eval/bbox/AP" in r)
    evaluated = json.loads((test_out / "evaluation.json").read_text())
    assert evaluated["tiny_shapes"]["bbox"]["AP"] == in_run["eval/bbox/AP"]
    detections = json.loads((test_out / "bbox_tiny_shapes_results.json").read_text())
    assert detections and detections == json.loads((full / "eval_step4" / "bbox_tiny_shapes_results.json").read_text())


def test_teacher_cfg_must_read_the_students_input(setup, tmp_path):
    from pydetectron.config import get_cfg, merge_cfg_from_file, merge_cfg_from_list

    cfg = get_cfg()
    merge_cfg_from_file(cfg, setup["student_cfg"])
    bgr = tmp_path / "bgr_teacher.yaml"
    bgr.write_text(TEACHER.replace("INPUT_COLOR_ORDER: RGB", "INPUT_COLOR_ORDER: BGR"))
    merge_cfg_from_list(cfg, ["DISTILL.TEACHER_CFG", str(bgr)])
    with pytest.raises(ConfigError, match="MODEL.INPUT_COLOR_ORDER.*bgr_teacher.yaml"):
        teacher_cfg(cfg)


def test_a_merged_part_that_does_not_fit_names_the_file_and_keys(setup, tmp_path):
    from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
    from pydetectron.modeling.detector import build_detector
    from pydetectron.weights import load_pretrained

    cfg = get_cfg()
    merge_cfg_from_file(cfg, setup["student_cfg"])
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", "4"])
    assert_and_infer_cfg(cfg)
    extra = dict(read_object(setup["merged"]))
    extra["model"] = {**extra["model"], "s_net.layer5.0.conv1.weight": torch.zeros(1)}
    write_object(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightMismatchError, match=r"(?s)extra\.pth \[student part\].*layer5\.0\.conv1\.weight"):
        load_pretrained(build_detector(cfg), tmp_path / "extra.pth", cfg, training=True, part="student",
                        print_fn=lambda _: None)
