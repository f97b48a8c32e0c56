"""Checkpoints: atomic under a kill mid-write, pruning, RNG round trip, clear errors."""

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pydetectron.engine.checkpoint import (
    CheckpointManager,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)


def test_killed_writer_leaves_previous_checkpoint_loadable(tmp_path):
    # The child saves step 1, then dies by SIGKILL while pickling step 2 (after part of it hit the disk).
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pydetectron.engine.checkpoint import CheckpointManager

        class DieWhilePickled:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        manager = CheckpointManager({str(tmp_path)!r})
        manager.save(1, {{"model": {{"w": torch.ones(3)}}, "step": 1}})
        manager.save(2, {{"model": {{"w": torch.zeros(1 << 20)}}, "step": 2, "boom": DieWhilePickled()}})
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    manager = CheckpointManager(tmp_path)
    assert not manager.path_for(2).exists()
    assert manager.latest() == manager.path_for(1)
    checkpoint = load_checkpoint(manager.latest())
    assert checkpoint["step"] == 1
    torch.testing.assert_close(checkpoint["model"]["w"], torch.ones(3))


def test_manager_keeps_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save(step, {"model": {}, "step": step})
    assert [step for step, _ in manager.checkpoints()] == [20, 30]
    assert manager.latest().name == "model_step30.pth"


def test_corrupt_and_foreign_files_name_the_file(tmp_path):
    corrupt = tmp_path / "model_step5.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="model_step5.pth"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pth"
    atomic_save({"weights": 1}, foreign)
    with pytest.raises(RuntimeError, match="no 'model' entry"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]
