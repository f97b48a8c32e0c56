"""tools/train_net_step.py: every Detectron.pytorch flag is there and documented; the cfg adaptation."""

import subprocess
import sys
from pathlib import Path

import pytest

from pydetectron.config import get_cfg, merge_cfg_from_list
from pydetectron.engine.training import TrainOptions, adapt_cfg

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_net_step.py"
FLAGS = ["--dataset", "--cfg", "--set", "--bs", "--nw", "--iter_size", "--o", "--lr", "--lr_decay_gamma",
         "--start_step", "--load_ckpt", "--load_detectron", "--resume", "--no_save", "--use_tfboard",
         "--disp_interval", "--no_cuda", "--output_dir", "--seed", "--register", "--keep_checkpoints", "--amp",
         "--num-gpus", "--num-machines", "--machine-rank", "--dist-url", "--dist-timeout"]


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True).stdout
    missing = [flag for flag in FLAGS if flag not in out]
    assert not missing, f"--help does not document {missing}"


def test_resume_without_checkpoint_is_refused():
    run = subprocess.run([sys.executable, str(TOOL), "--cfg", "x.yaml", "--resume"], capture_output=True, text=True)
    assert run.returncode == 2 and "--resume needs --load_ckpt" in run.stderr


@pytest.mark.parametrize("options, lr, steps, max_iter, ims", [
    # no --bs: Detectron.pytorch keeps the config's total batch (8 x 2) on the devices there are
    (TrainOptions(), 0.02, [0, 60000, 80000], 90000, 16),
    (TrainOptions(batch_size=4, iter_size=2), 0.005, [0, 120000, 160000], 180000, 4),
    (TrainOptions(batch_size=4, lr=0.1, lr_decay_gamma=0.5, optimizer="AdamW"), 0.1, [0, 240000, 320000], 360000, 4),
])
def test_adaptation_of_a_detectron_schedule(options, lr, steps, max_iter, ims):
    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["NUM_GPUS", 8, "SOLVER.BASE_LR", 0.02, "SOLVER.LR_POLICY", "steps_with_decay",
                              "SOLVER.STEPS", [0, 60000, 80000], "SOLVER.MAX_ITER", 90000,
                              "FPN.FPN_ON", True, "MODEL.FASTER_RCNN", True])
    lines = []
    adapt_cfg(cfg, options, num_devices=1, print_fn=lines.append)
    assert cfg.SOLVER.BASE_LR == pytest.approx(lr)
    assert cfg.SOLVER.STEPS == steps and cfg.SOLVER.MAX_ITER == max_iter
    assert cfg.NUM_GPUS == 1 and cfg.TRAIN.IMS_PER_BATCH == ims
    assert cfg.FPN.RPN_COLLECT_SCALE == pytest.approx(ims / 2)
    if options.optimizer:
        assert cfg.SOLVER.TYPE == "AdamW" and cfg.SOLVER.GAMMA == 0.5
    assert any("BASE_LR" in line for line in lines)
