"""tools/train_net_step.py end to end on a tiny shapes dataset: it trains, checkpoints, evaluates, and a run
resumed from a mid-way checkpoint ends with exactly the weights of an uninterrupted run."""

import json
import sys
from pathlib import Path

import pytest
import torch

from pydetectron.data.shapes import generate_split
from pydetectron.engine.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import train_net_step  # noqa: E402

CFG = Path(__file__).resolve().parents[2] / "configs/getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml"
TINY = ["SOLVER.MAX_ITER", "4", "SOLVER.WARM_UP_ITERS", "2", "TRAIN.SNAPSHOT_ITERS", "2",
        "TRAIN.SCALES", "(96,)", "TRAIN.MAX_SIZE", "128", "TEST.SCALE", "96", "TEST.MAX_SIZE", "128",
        "TRAIN.IMS_PER_BATCH", "2", "DATA_LOADER.NUM_THREADS", "0", "FPN.DIM", "32",
        "FAST_RCNN.CONV_HEAD_DIM", "32", "FAST_RCNN.MLP_HEAD_DIM", "64", "MRCNN.DIM_REDUCED", "32",
        "TRAIN.BATCH_SIZE_PER_IM", "32", "TRAIN.RPN_BATCH_SIZE_PER_IM", "32",
        "TRAIN.RPN_PRE_NMS_TOP_N", "200", "TRAIN.RPN_POST_NMS_TOP_N", "100",
        "TEST.RPN_PRE_NMS_TOP_N", "100", "TEST.RPN_POST_NMS_TOP_N", "50"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shapes")
    paths = generate_split(root, "train", 6, seed=1)
    return f"tiny_shapes:{root / 'train'}:{paths['instances']}"


def _train(tmp_path: Path, dataset: str, name: str, *extra: str) -> Path:
    out = tmp_path / name
    train_net_step.main(["--dataset", "tiny_shapes", "--register", dataset, "--cfg", str(CFG), "--no_cuda",
                         "--disp_interval", "1", "--output_dir", str(out), "--set", *TINY, *extra])
    return out


def test_training_runs_checkpoints_evaluates_and_resumes_exactly(tmp_path, tiny_dataset, capsys):
    full = _train(tmp_path, tiny_dataset, "full")
    printed = capsys.readouterr().out
    assert "[step 4/4]" in printed and "eta" in printed and "copypaste: Task: box" in printed
    assert sorted(p.name for p in (full / "ckpt").iterdir()) == ["model_step2.pth", "model_step4.pth"]
    records = [json.loads(line) for line in (full / "metrics.json").read_text().splitlines()]
    assert [r["step"] for r in records if "lr" in r] == [1, 2, 3, 4]
    assert {"loss_rpn_cls_fpn2", "loss_cls", "loss_bbox", "loss_mask"} <= set(records[0])
    assert any("eval/bbox/AP" in r for r in records)
    assert (full / "training_curves.png").stat().st_size > 0

    resumed = _train(tmp_path, tiny_dataset, "resumed", "--resume", "--load_ckpt",
                     str(full / "ckpt" / "model_step2.pth"))
    expected = load_checkpoint(full / "ckpt" / "model_step4.pth")["model"]
    got = load_checkpoint(resumed / "ckpt" / "model_step4.pth")["model"]
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{key} differs after resume")
