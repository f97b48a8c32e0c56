"""Loads pydetectron._C, the compiled ops, with an error that says how to build it."""

import torch


def load_extension():
    """Import the extension once; its import registers the ops under ``torch.ops.pydetectron``."""
    try:
        from pydetectron import _C
    except ImportError as exc:
        raise ImportError(
            "pydetectron._C is not built. Run `make install` (or `pip install -e .`) in the "
            f"pydetectron checkout. Original error: {exc}"
        ) from exc
    return _C


_C = load_extension()
OPS = torch.ops.pydetectron
