"""Pickle streams as Python 2 wrote them (Detectron's ``.pkl`` weights and proposal files), opcode by opcode.

Python 2's ``str`` is a byte string, so protocol 2 writes every key, dtype code and array buffer with
``SHORT_BINSTRING`` (``U``, < 256 bytes) or ``BINSTRING`` (``T``); a numpy array is
``numpy.core.multiarray._reconstruct(ndarray, (0,), 'b')`` + ``BUILD`` with ``(1, shape, dtype, False, raw)``
and its dtype ``numpy.dtype('f4', 0, 1)`` + ``BUILD`` with ``(3, '<', None, None, None, -1, -1, 0)``. Python 3's
pickle never writes these opcodes for ``str``, which is why a reader needs ``encoding='latin1'`` for real files.
Independent of pydetectron.
"""

from __future__ import annotations

import struct
from typing import Any, List

import numpy as np

PROTO_2 = b"\x80\x02"
TUPLE_OPS = {1: b"\x85", 2: b"\x86", 3: b"\x87"}  # TUPLE1..3


class _Dtype:
    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


def dumps(obj: Any) -> bytes:
    """`obj` (dicts, lists, tuples, str as Python 2 byte strings, int, float, None, bool, numpy arrays)."""
    out: List[bytes] = [PROTO_2]
    _save(obj, out)
    out.append(b".")  # STOP
    return b"".join(out)


def _save(obj: Any, out: List[bytes]) -> None:
    if obj is None:
        out.append(b"N")
    elif isinstance(obj, bool):
        out.append(b"\x88" if obj else b"\x89")  # NEWTRUE / NEWFALSE
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out.append(b"K" + bytes([obj]))  # BININT1
        elif 0 <= obj < 65536:
            out.append(b"M" + struct.pack("<H", obj))  # BININT2
        else:
            out.append(b"J" + struct.pack("<i", obj))  # BININT
    elif isinstance(obj, float):
        out.append(b"G" + struct.pack(">d", obj))  # BINFLOAT
    elif isinstance(obj, (str, bytes)):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            out.append(b"U" + bytes([len(data)]) + data)  # SHORT_BINSTRING
        else:
            out.append(b"T" + struct.pack("<i", len(data)) + data)  # BINSTRING
    elif isinstance(obj, tuple):
        if not obj:
            out.append(b")")
            return
        if len(obj) not in TUPLE_OPS:
            out.append(b"(")  # MARK
        for item in obj:
            _save(item, out)
        out.append(TUPLE_OPS.get(len(obj), b"t"))
    elif isinstance(obj, list):
        out.append(b"]")  # EMPTY_LIST
        if obj:
            out.append(b"(")
            for item in obj:
                _save(item, out)
            out.append(b"e")  # APPENDS
    elif isinstance(obj, dict):
        out.append(b"}")  # EMPTY_DICT
        if obj:
            out.append(b"(")
            for key, value in obj.items():
                _save(key, out)
                _save(value, out)
            out.append(b"u")  # SETITEMS
    elif isinstance(obj, _Dtype):
        out.append(b"cnumpy\ndtype\n")  # GLOBAL
        _save((obj.dtype.str[1:], 0, 1), out)
        out.append(b"R")  # REDUCE
        _save((3, obj.dtype.str[0], None, None, None, -1, -1, 0), out)
        out.append(b"b")  # BUILD
    elif isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        out.append(b"cnumpy.core.multiarray\n_reconstruct\n")
        out.append(b"cnumpy\nndarray\n")
        _save((0,), out)
        _save(b"b", out)
        out.append(TUPLE_OPS[3] + b"R")
        _save((1, array.shape, _Dtype(array.dtype), False, array.tobytes()), out)
        out.append(b"b")
    else:
        raise TypeError(f"py2_pickle cannot write {type(obj).__name__}")
