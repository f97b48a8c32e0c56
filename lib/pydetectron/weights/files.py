"""The one place a weights path is opened: pickles and ``torch.save`` files, whatever their extension."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch


def read_object(path: str | os.PathLike) -> Any:
    """The unpickled contents of a pickle (Detectron / detectron2 ``.pkl``, Python 2 pickles included) or a
    ``torch.save`` file (zip or legacy); errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
        if not is_zip:
            f.seek(0)
            try:
                obj = pickle.load(f, encoding="latin1")
            except Exception:  # noqa: BLE001 - not a plain pickle: try torch's formats below
                obj = None
            if obj is not None and not isinstance(obj, int):  # an int is torch's legacy-format magic number
                return obj
    error: Exception | None = None
    for weights_only in (True, False):  # our own checkpoints hold more than tensors (RNG states)
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as exc:  # weights_only refused it, or it is no pickle at all
            error = exc
        except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign files
            error = exc
            break
    raise ValueError(f"{path}: neither a pickle nor a torch.save file ({error})") from error
