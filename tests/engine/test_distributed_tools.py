"""train_net_step.py and test_net.py with 2 gloo processes on a tiny shapes set, started by torchrun (training)
and by --num-gpus 2 (the resumed run, testing): rank 0 alone writes, a DDP run resumes exactly, distributed
testing gives one process's AP; AMP (bfloat16 on the CPU) trains with finite losses and detects boxes close to
float32's."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pydetectron.data.shapes import generate_split
from pydetectron.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import test_net  # noqa: E402
import train_net_step  # noqa: E402

TINY_CFG = """\
MODEL:
  TYPE: generalized_rcnn
  CONV_BODY: FPN.add_fpn_ResNet18_conv5_body
  FASTER_RCNN: True
  LOAD_IMAGENET_PRETRAINED_WEIGHTS: False
NUM_GPUS: 1
RESNETS:
  TRANS_FUNC: basic_transformation
  NORM: GN
FPN:
  FPN_ON: True
  MULTILEVEL_ROIS: True
  MULTILEVEL_RPN: True
  DIM: 16
  RPN_ANCHOR_START_SIZE: 16
FAST_RCNN:
  ROI_BOX_HEAD: fast_rcnn_heads.add_roi_2mlp_head
  ROI_XFORM_METHOD: RoIAlign
  ROI_XFORM_RESOLUTION: 7
  ROI_XFORM_SAMPLING_RATIO: 2
  MLP_HEAD_DIM: 32
SOLVER:
  TYPE: SGD
  BASE_LR: 0.004
  LR_POLICY: steps_with_decay
  STEPS: [0, 100]
  MAX_ITER: 4
  WARM_UP_ITERS: 0
TRAIN:
  SCALES: (64,)
  MAX_SIZE: 96
  IMS_PER_BATCH: 1
  BATCH_SIZE_PER_IM: 16
  RPN_BATCH_SIZE_PER_IM: 16
  RPN_PRE_NMS_TOP_N: 100
  RPN_POST_NMS_TOP_N: 50
  SNAPSHOT_ITERS: 2
TEST:
  SCALE: 64
  MAX_SIZE: 96
  RPN_PRE_NMS_TOP_N: 100
  RPN_POST_NMS_TOP_N: 50
DATA_LOADER:
  NUM_THREADS: 0
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_tools")
    with pytest.MonkeyPatch.context() as patch:  # roidb caches in the test folder (the tools inherit it)
        patch.setenv("PYDETECTRON_CACHE", str(root / "cache"))
        yield _tiny_dataset(root)


def _tiny_dataset(root: Path) -> dict:
    paths = generate_split(root, "train", 6, seed=4)
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_CFG)
    return {"root": root, "cfg": str(cfg), "register": f"ddp_tiny:{root / 'train'}:{paths['instances']}"}


def _tool(tool: str, *args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    """Run a tool in a subprocess (under `torchrun --standalone --nproc_per_node 2` when asked)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if torchrun else [sys.executable]
    run = subprocess.run([*launcher, str(ROOT / "tools" / tool), *args], capture_output=True, text=True,
                         env=env, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _train_args(tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "ddp_tiny", "--register", tiny["register"], "--cfg", tiny["cfg"], "--no_cuda",
            "--disp_interval", "1", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def ddp_run(tiny) -> tuple[Path, str]:
    """4 steps under torchrun on 2 ranks x 1 image (--bs 2: the config's batch of 1 x 1 GPU on 2 devices)."""
    out = tiny["root"] / "ddp"
    run = _tool("train_net_step.py", *_train_args(tiny, out, "--bs", "2", "--dist-timeout", "60", "--use_tfboard",
                                                   "--set", "SOLVER.MAX_ITER", "8"), torchrun=True)
    return out, run.stdout


def test_only_rank_zero_writes_and_prints(ddp_run):
    out, stdout = ddp_run
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "config.yaml", "eval_step4", "log.txt", "metrics.json",
                                                     "tensorboard", "training_curves.png"]
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file: one writer
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["model_final.pth", "model_step2.pth",
                                                                "model_step4.pth"]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["step"] for r in records if "lr" in r] == [1, 2, 3, 4]  # one writer, not one line per rank
    assert [r["step"] for r in records if "eval/bbox/AP" in r] == [4]
    for text in (stdout, (out / "log.txt").read_text()):
        assert text.count("[step 4/4]") == 1 and text.count("Adaptive config changes") == 1
        assert "BASE_LR:              0.004 --> 0.008" in text and "MAX_ITER:             8 --> 4" in text
        assert "Distributed: 2 processes (gloo)" in text
    checkpoint = load_checkpoint(out / "ckpt" / "model_step2.pth")
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_per_rank"]) == 2
    assert checkpoint["data"] == {"seed": 3, "start_iter": 2, "batch_size": 1, "num_replicas": 2}


@pytest.mark.slow
def test_resume_under_ddp_is_exact(tiny, ddp_run):
    out, _ = ddp_run
    resumed = tiny["root"] / "resumed"
    _tool("train_net_step.py", *_train_args(tiny, resumed, "--num-gpus", "2", "--bs", "2", "--resume",
                                            "--load_ckpt", str(out / "ckpt" / "model_step2.pth"), "--set",
                                            "SOLVER.MAX_ITER", "8"))
    expected = load_checkpoint(out / "ckpt" / "model_step4.pth")["model"]
    got = load_checkpoint(resumed / "ckpt" / "model_step4.pth")["model"]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{key} differs after resume")


def test_distributed_test_net_gives_the_ap_of_one_process(tiny, ddp_run, capsys):
    out, _ = ddp_run
    weights = str(out / "ckpt" / "model_final.pth")
    common = ["--dataset", "ddp_tiny", "--register", tiny["register"], "--cfg", tiny["cfg"], "--no_cuda",
              "--load_ckpt", weights]
    keep_all = ["--set", "TEST.SCORE_THRESH", "0.0"]  # 4 steps of training score every class under 0.05
    test_net.main([*common, "--output_dir", str(tiny["root"] / "test1"), *keep_all])
    single = capsys.readouterr().out
    run = _tool("test_net.py", *common, "--output_dir", str(tiny["root"] / "test2"), "--num-gpus", "2", *keep_all)
    copypaste = [line for line in single.splitlines() if line.startswith("copypaste:")]
    log = (tiny["root"] / "test2" / "log.txt").read_text()
    assert log.count("copypaste: Task: box") == 1  # rank 0 alone evaluates and logs
    assert len(copypaste) == 4 and copypaste == [line for line in run.stdout.splitlines()
                                                 if line.startswith("copypaste:")]

    def detections(folder):
        with open(tiny["root"] / folder / "detections.pkl", "rb") as f:
            return pickle.load(f)["detections"]

    one, two = detections("test1"), detections("test2")
    assert one.keys() == two.keys() and len(one) == 6
    assert sum(len(d["boxes"]) for d in one.values()) > 0  # the comparison is not between two empty sets
    for image_id in one:
        torch.testing.assert_close(torch.as_tensor(two[image_id]["boxes"]), torch.as_tensor(one[image_id]["boxes"]))


@pytest.mark.slow  # bfloat16 convolutions have no fast CPU kernel here: about 2 s a step
def test_bf16_amp_trains_20_steps_with_finite_losses(tiny, capsys):
    out = tiny["root"] / "amp"
    train_net_step.main(["--register", tiny["register"], "--cfg", tiny["cfg"], "--no_cuda", "--amp",
                         "--disp_interval", "1", "--output_dir", str(out), "--no_save", "--set",
                         "TRAIN.DATASETS", "('ddp_tiny',)", "SOLVER.MAX_ITER", "20", "TRAIN.SCALES", "(32,)",
                         "TRAIN.MAX_SIZE", "48"])
    capsys.readouterr()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    for record in records:
        losses = [v for k, v in record.items() if k.startswith("loss")]
        assert len(losses) == 13 and all(torch.isfinite(torch.tensor(losses))), record  # total + 5 + 5 FPN + 2
        assert record["amp_skipped_steps"] == 0
    assert "SOLVER:\n" in (out / "config.yaml").read_text() and "ENABLED: true" in (out / "config.yaml").read_text()


def test_amp_inference_boxes_are_close_to_float32(tiny, ddp_run):
    import cv2

    from pydetectron.config import get_cfg, merge_cfg_from_file, merge_cfg_from_list
    from pydetectron.data.minibatch import BlobSettings
    from pydetectron.engine.inference_model import build_inference_model
    from pydetectron.engine.trainer import AmpSettings
    from pydetectron.evaluation.inference import detect_image

    out, _ = ddp_run
    cfg = get_cfg()
    merge_cfg_from_file(cfg, tiny["cfg"])
    merge_cfg_from_list(cfg, ["MODEL.NUM_CLASSES", 4, "TEST.SCORE_THRESH", 0.0])
    model = build_inference_model(cfg, str(out / "ckpt" / "model_final.pth"))
    settings = BlobSettings.from_cfg(cfg, train=False)
    image = cv2.imread(str(next((tiny["root"] / "train").iterdir())))
    reference = detect_image(model, image, settings, torch.device("cpu"))
    with AmpSettings(True, "cpu").autocast():
        mixed = detect_image(model, image, settings, torch.device("cpu"))
    assert mixed["boxes"].dtype == torch.float32 and mixed["scores"].dtype == torch.float32
    top = reference["boxes"][:10]
    assert len(top) == 10
    from pydetectron.boxes import box_iou

    best = box_iou(top, mixed["boxes"]).max(dim=1).values
    assert (best > 0.9).all(), best
