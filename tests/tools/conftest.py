"""Fixtures for the tool tests: a tiny shapes val set registered in the catalog, a small cfg, stub detectors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools_stubs import TINY_CFG, GridDetector  # noqa: E402

from pydetectron.data.catalog import register_dataset  # noqa: E402
from pydetectron.data.shapes import generate_split  # noqa: E402
from pydetectron.engine.checkpoint import atomic_save  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYDETECTRON_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PYDETECTRON_DATASETS", raising=False)


@pytest.fixture(scope="session")
def shapes_val(tmp_path_factory) -> str:
    """Catalog name of a 6-image shapes val split (written once per session)."""
    root = tmp_path_factory.mktemp("tool_shapes")
    paths = generate_split(root, "val", 6, seed=3)
    register_dataset("tools_shapes_val", str(root / "val"), str(paths["instances"]))
    return "tools_shapes_val"


@pytest.fixture
def tiny_cfg_file(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CFG)
    return str(path)


@pytest.fixture
def grid_checkpoint(tmp_path, monkeypatch) -> str:
    """A checkpoint of the GridDetector in <tmp>/run/ckpt/, with build_detector patched to build it."""
    import pydetectron.engine.inference_model as inference_model

    monkeypatch.setattr(inference_model, "build_detector", lambda cfg: GridDetector(cfg.MODEL.NUM_CLASSES))
    model = GridDetector(4)
    with torch.no_grad():
        model.scale.copy_(torch.tensor([0.0, 0.03, -0.02, 0.05]))
    path = tmp_path / "run" / "ckpt" / "model_step10.pth"
    atomic_save({"model": model.state_dict(), "step": 10}, path)
    return str(path)
