"""Checkpoints that survive interruption: atomic writes, the last few kept, exact resume.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over its final
name, so a crash or a kill mid-write leaves the previous checkpoints intact and never a half-written
`model_step*.pth`.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pydetectron.weights.files import write_object

_NAME = re.compile(r"^model_step(\d+)\.pth$")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` through a temp file + fsync + rename (atomic on POSIX; ``weights.files``)."""
    write_object(obj, path, "torch")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `atomic_save`, with an error naming the file when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise RuntimeError(f"checkpoint {path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise RuntimeError(f"checkpoint {path} has no 'model' entry; is it a pydetectron checkpoint?")
    return checkpoint


FINAL_NAME = "model_final.pth"


class CheckpointManager:
    """Writes `<dir>/model_step<N>.pth` atomically and keeps only the newest `keep` of them (``--keep_checkpoints``);
    the last step of a finished run is also kept as `<dir>/model_final.pth` (detectron2's name), never deleted."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"model_step{step}.pth"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint in the folder, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def final_path(self) -> Path:
        return self.directory / FINAL_NAME

    def save(self, step: int, state: dict, final: bool = False) -> Path:
        """Write step `step`'s checkpoint; with `final`, model_final.pth too (a hard link to the same file
        where the file system allows, else a second atomic write)."""
        path = self.path_for(step)
        atomic_save(state, path)
        if final:
            self._link_final(path, state)
        for _, old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def _link_final(self, path: Path, state: dict) -> None:
        final = self.final_path()
        tmp = final.with_name(f".{final.name}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
            os.replace(tmp, final)
        except OSError:
            atomic_save(state, final)


def capture_rng_state() -> dict:
    """Every random generator training draws from, so a resumed run draws the same numbers."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
