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
        "TRAIN.SCALES", "(64, 96)", "TRAIN.MAX_SIZE", "128", "TEST.SCALE", "96", "TEST.MAX_SIZE", "128",
        "TRAIN.IMS_PER_BATCH", "2", "DATA_LOADER.NUM_THREADS", "2", "FPN.DIM", "32",
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
    assert sorted(p.name for p in (full / "ckpt").iterdir()) == ["model_final.pth", "model_step2.pth",
                                                                 "model_step4.pth"]
    log = (full / "log.txt").read_text()
    assert "[step 4/4]" in log and "copypaste: Task: box" in log and "Adaptive config changes" in log
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


def test_fast_rcnn_trains_and_evaluates_on_a_proposal_file(tmp_path, tiny_dataset, capsys):
    """A model without RPN (Fast R-CNN, Mask head on) through the tool: TRAIN/TEST.PROPOSAL_FILES feed it."""
    import numpy as np

    from pydetectron.data.proposals import write_proposal_file

    annotations = json.loads(Path(tiny_dataset.split(":")[2]).read_text())
    rng = np.random.default_rng(0)
    ids, boxes = [], []
    for image in annotations["images"]:
        gt = np.array([[x, y, x + w - 1, y + h - 1] for a in annotations["annotations"]
                       if a["image_id"] == image["id"] for x, y, w, h in [a["bbox"]]], np.float32).reshape(-1, 4)
        ids.append(image["id"])
        boxes.append(np.concatenate([gt + rng.uniform(-4, 4, size=gt.shape), rng.uniform(0, 150, (20, 4))]))
        boxes[-1][:, 2:] = np.maximum(boxes[-1][:, 2:], boxes[-1][:, :2] + 8)
    proposal_file = tmp_path / "proposals.pkl"
    write_proposal_file(proposal_file, ids, boxes, [np.ones(len(b)) for b in boxes])
    files = repr((str(proposal_file),))
    out = _train(tmp_path, tiny_dataset, "fast", "MODEL.FASTER_RCNN", "False", "TRAIN.PROPOSAL_FILES", files,
                 "TEST.PROPOSAL_FILES", files)
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert {"loss_cls", "loss_bbox", "loss_mask"} == {k for k in records[0] if k.startswith("loss_")}
    assert any("eval/segm/AP" in r for r in records)
    capsys.readouterr()
    with pytest.raises(ValueError, match="TRAIN.PROPOSAL_FILES has 0 files"):
        _train(tmp_path, tiny_dataset, "none", "MODEL.FASTER_RCNN", "False")
    with pytest.raises(ValueError, match="TEST.PROPOSAL_FILES has 0 files"):  # caught before anything loads
        _train(tmp_path, tiny_dataset, "no_test", "MODEL.FASTER_RCNN", "False", "TRAIN.PROPOSAL_FILES", files)
