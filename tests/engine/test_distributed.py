"""Distributed training on 2 gloo processes on 127.0.0.1: DDP equals one process, SyncBN equals global BN, a
failing or killed rank stops the others within the timeout, naming it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_workers  # noqa: E402

from pydetectron.data.coco import CocoDataset  # noqa: E402
from pydetectron.data.roidb import extend_with_flipped_entries, filter_for_training  # noqa: E402
from pydetectron.data.shapes import generate_split  # noqa: E402
from pydetectron.engine.launch import DistributedRunError, LaunchSettings, free_port, launch  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "dist_runner.py"
TWO_CPU_PROCESSES = LaunchSettings(num_gpus=2, use_cuda=False, timeout_s=60)


@pytest.fixture(scope="module")
def shapes_roidb(tmp_path_factory) -> list:
    from pydetectron.data.catalog import DatasetSpec

    root = tmp_path_factory.mktemp("dist_shapes")
    paths = generate_split(root, "train", 8, seed=2)
    dataset = CocoDataset(DatasetSpec("dist_shapes", str(root / "train"), str(paths["instances"])),
                          cache_dir=str(root / "cache"))
    return filter_for_training(extend_with_flipped_entries(dataset.get_roidb(), dataset.meta))


def test_two_ranks_of_one_image_train_like_one_process_on_both(tmp_path, shapes_roidb):
    """3 steps of iter_size 2 (no_sync on the inner pass): DDP 2 ranks x 1 image = one process whose
    DataParallel runs the same 2 images as 2 sub-batches."""
    launch(dist_workers.ddp_training, TWO_CPU_PROCESSES, (str(tmp_path), shapes_roidb, 3, 2))
    logged = dist_workers.LoggedLosses()
    reference = dist_workers.train_counting_detector(shapes_roidb, 3, 2, batch_per_process=2, devices=2,
                                                     logged=logged)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(saved["params"][name], value, rtol=0, atol=1e-5, msg=f"rank {rank}: {name}")
        # the logged losses are averaged over the ranks: the one process's loss over both images
        for got, expected in zip(saved["logged"], logged.steps, strict=True):
            assert got["loss_count"] == pytest.approx(expected["loss_count"], rel=1e-5)
    torch.manual_seed(0)
    untrained = dist_workers.CountingDetector()
    moved = sum(float((p - q).detach().abs().max()) for p, q in zip(reference.parameters(), untrained.parameters()))
    assert moved > 1e-3  # the comparison is not between two untrained models


def test_sync_batch_norm_equals_batch_norm_over_the_global_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 5, 6, generator=generator, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(4, 3, 5, 6, generator=generator, dtype=torch.float64)
    launch(dist_workers.sync_batch_norm, TWO_CPU_PROCESSES, (str(tmp_path), images, upstream))
    ranks = [torch.load(tmp_path / f"bn_rank{r}.pt") for r in (0, 1)]

    x = images.clone().requires_grad_(True)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 3))
        bn.bias.copy_(torch.linspace(-1, 1, 3))
    out = bn(x)
    (out * upstream).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach())
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), x.grad)
    torch.testing.assert_close(ranks[0]["grad_w"] + ranks[1]["grad_w"], bn.weight.grad)
    torch.testing.assert_close(ranks[0]["grad_b"] + ranks[1]["grad_b"], bn.bias.grad)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


def test_a_raising_spawned_rank_fails_the_run_with_its_rank(tmp_path):
    with pytest.raises(DistributedRunError, match="(?s)rank 1 .*rank one broke on purpose"):
        launch(dist_workers.raise_on_rank_one, LaunchSettings(num_gpus=2, use_cuda=False, timeout_s=20),
               (str(tmp_path),))


def _machines(worker: str, out_dir: Path, timeout_s: int) -> list[subprocess.Popen]:
    """Two 'machines' of one process each, as two separate launches (each its own process group)."""
    url = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return [subprocess.Popen(
        [sys.executable, str(RUNNER), worker, str(out_dir), "--no_cuda", "--num-machines", "2", "--machine-rank",
         str(rank), "--dist-url", url, "--dist-timeout", str(timeout_s)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        for rank in (0, 1)]


@pytest.mark.slow  # the spawned variant above checks the same naming in CI
def test_a_rank_that_raises_makes_the_other_machine_exit_naming_it(tmp_path):
    machines = _machines("raise_on_rank_one", tmp_path, 20)
    outputs = [m.communicate(timeout=60)[0] for m in machines]
    assert machines[1].returncode != 0 and "rank one broke on purpose" in outputs[1]
    assert machines[0].returncode != 0
    assert "rank 1 failed: RuntimeError: rank one broke on purpose" in outputs[0]


def test_a_killed_rank_makes_the_other_exit_within_the_timeout(tmp_path):
    timeout_s = 5
    machines = _machines("all_reduce_until_killed", tmp_path, timeout_s)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready1").exists():
            assert time.monotonic() < deadline, "the two ranks never started"
            assert machines[0].poll() is None and machines[1].poll() is None, machines[0].communicate()[0]
            time.sleep(0.2)
        os.killpg(machines[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output = machines[0].communicate(timeout=timeout_s + 30)[0]
        waited = time.monotonic() - killed_at
    finally:
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)
    assert machines[0].returncode != 0
    assert "rank 1 stopped responding" in output
    assert waited < timeout_s + 10


@pytest.mark.parametrize("settings, message", [
    (LaunchSettings(num_gpus=0), "--num-gpus"),
    (LaunchSettings(num_machines=2, machine_rank=2, dist_url="tcp://h:1"), "--machine-rank 2 is not in 0 .. 1"),
    (LaunchSettings(num_machines=2), "--dist-url auto works on one machine only"),
    (LaunchSettings(num_gpus=2, dist_url="http://h:1"), "expected tcp://HOST:PORT"),
    (LaunchSettings(num_gpus=2, timeout_s=0), "--dist-timeout must be positive"),
])
def test_bad_launch_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        launch(dist_workers.raise_on_rank_one, settings, ("unused",))


def test_torchrun_and_num_gpus_are_not_combined(monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="give the process counts to torchrun"):
        launch(dist_workers.raise_on_rank_one, LaunchSettings(num_gpus=2), ("unused",))
