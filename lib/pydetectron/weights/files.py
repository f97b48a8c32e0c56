"""The one place a weights path is opened (pickles and ``torch.save`` files, whatever their extension), and
atomic writes of weights files."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Tuple

import torch

SERIALIZERS = ("pickle", "torch")


def read_object_and_serializer(path: str | os.PathLike) -> Tuple[Any, str]:
    """(unpickled contents, 'pickle' | 'torch') of a pickle (Detectron / detectron2 ``.pkl``, Python 2 pickles
    included) or a ``torch.save`` file (zip or legacy); errors name the file."""
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
                return obj, "pickle"
    error: Exception | None = None
    for weights_only in (True, False):  # our own checkpoints hold more than tensors (RNG states)
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only), "torch"
        except pickle.UnpicklingError as exc:  # weights_only refused it, or it is no pickle at all
            error = exc
        except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign files
            error = exc
            break
    raise ValueError(f"{path}: neither a pickle nor a torch.save file ({error})") from error


def read_object(path: str | os.PathLike) -> Any:
    """The contents of a weights file (see :func:`read_object_and_serializer`)."""
    return read_object_and_serializer(path)[0]


def _atomic_write(path: str | os.PathLike, dump: Callable[[BinaryIO], None]) -> None:
    """Write through a temp file in the same folder, fsync, rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            dump(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_object(obj: Any, path: str | os.PathLike, serializer: str = "pickle") -> None:
    """Atomically write `obj` as a pickle (what Detectron and detectron2 ``.pkl`` files are) or with torch.save."""
    if serializer not in SERIALIZERS:
        raise ValueError(f"serializer must be one of {SERIALIZERS}, got {serializer!r}")
    if serializer == "pickle":
        _atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        _atomic_write(path, lambda f: torch.save(obj, f))
