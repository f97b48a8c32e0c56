"""CfgNode: the dict that holds one level of the option tree.

Detectron used an ``AttrDict`` with an ``immutable`` flag. Ours is the same idea with three additions that make
mistakes loud: every node knows its dotted path (so errors name ``TRAIN.SCALES``, not ``SCALES``), a frozen node
refuses every kind of mutation (item, attribute, ``update``, ``pop``...), and reading a missing attribute suggests
the closest existing key.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Iterator, Mapping

import numpy as np


class FrozenConfigError(AttributeError):
    """Raised when code tries to change a config after ``freeze()`` / ``assert_and_infer_cfg()``."""


def _closest(name: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


class CfgNode(dict):
    """One level of the config tree: a ``dict`` with attribute access that can be frozen.

    Nested ``dict`` values are converted to ``CfgNode`` on insertion. ``clone()`` gives an independent,
    unfrozen deep copy. Internal state lives in instance attributes whose names start with ``_``.
    """

    def __init__(self, init: Mapping[str, Any] | None = None, path: str = ""):
        super().__init__()
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_frozen", False)
        for key, value in (init or {}).items():
            self[key] = value

    # ------------------------------------------------------------------ naming
    def full_key(self, key: str) -> str:
        """Dotted name of ``key`` inside this node, e.g. ``'TRAIN.SCALES'``."""
        return f"{self._path}.{key}" if self._path else key

    def _set_path(self, path: str) -> None:
        object.__setattr__(self, "_path", path)
        for key, value in self.items():
            if isinstance(value, CfgNode):
                value._set_path(self.full_key(key))

    # ------------------------------------------------------------------ access
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # keep copy/pickle protocol lookups on the normal path
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            hint = _closest(name, list(self.keys()))
            suggestion = f"; did you mean {self.full_key(hint)}?" if hint else ""
            raise AttributeError(f"{self.full_key(name)} is not a config key{suggestion}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"config keys may not start with '_': {self.full_key(name)}")
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    # ------------------------------------------------------------------ mutation guard
    def _check_mutable(self, key: Any = None) -> None:
        if self._frozen:
            where = self.full_key(str(key)) if key is not None else (self._path or "<root>")
            raise FrozenConfigError(
                f"cannot change config key {where}: the config is frozen "
                "(clone() it, or change it before assert_and_infer_cfg())"
            )

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_mutable(key)
        if isinstance(value, Mapping) and not isinstance(value, CfgNode):
            value = CfgNode(value)
        if isinstance(value, CfgNode):
            value._set_path(self.full_key(key))
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._check_mutable(key)
        super().__delitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._check_mutable()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        self._check_mutable(key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        self._check_mutable()
        return super().popitem()

    def clear(self) -> None:
        self._check_mutable()
        super().clear()

    def __ior__(self, other: Any) -> CfgNode:  # type: ignore[override]
        self.update(other)
        return self

    # ------------------------------------------------------------------ freezing
    def freeze(self) -> CfgNode:
        """Make this node and every node below it immutable (numpy values become read-only). Returns self."""
        self._set_frozen(True)
        return self

    def defrost(self) -> CfgNode:
        """Undo ``freeze()`` on this node and everything below it. Returns self."""
        self._set_frozen(False)
        return self

    def _set_frozen(self, frozen: bool) -> None:
        object.__setattr__(self, "_frozen", frozen)
        for key, value in self.items():
            if isinstance(value, CfgNode):
                value._set_frozen(frozen)
            elif isinstance(value, np.ndarray):
                if not frozen:  # a read-only array may be a view we do not own: give the node its own copy
                    value = value.copy()
                    super().__setitem__(key, value)
                value.flags.writeable = not frozen

    def is_frozen(self) -> bool:
        return self._frozen

    # ------------------------------------------------------------------ copying / pickling
    def clone(self) -> CfgNode:
        """An independent deep copy, always unfrozen (the way to derive a modified config)."""
        return CfgNode(_plain_copy(self), path=self._path)

    def __deepcopy__(self, memo: dict) -> CfgNode:
        result = self.clone()
        if self._frozen:
            result.freeze()
        return result

    def __reduce__(self) -> tuple:
        return (_rebuild_node, (dict(self), self._path, self._frozen))

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        """Key-by-key equality that also compares numpy values (plain dict equality would raise on them)."""
        if not isinstance(other, Mapping) or self.keys() != other.keys():
            return False
        for key, value in self.items():
            theirs = other[key]
            if isinstance(value, np.ndarray) or isinstance(theirs, np.ndarray):
                if not np.array_equal(np.asarray(value), np.asarray(theirs)):
                    return False
            elif value != theirs:
                return False
        return True

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ helpers
    def leaf_keys(self) -> Iterator[str]:
        """Every dotted leaf key below this node (``'TRAIN.SCALES'``, ...), in insertion order."""
        for key, value in self.items():
            if isinstance(value, CfgNode):
                yield from value.leaf_keys()
            else:
                yield self.full_key(key)

    def __repr__(self) -> str:
        state = "frozen " if self._frozen else ""
        return f"CfgNode({state}{dict.__repr__(self)})"


def _plain_copy(node: Mapping[str, Any]) -> dict:
    """Deep copy of a node as nested plain dicts (numpy arrays copied and writable)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out[key] = _plain_copy(value)
        elif isinstance(value, np.ndarray):
            out[key] = np.array(value, copy=True)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _rebuild_node(items: dict, path: str, frozen: bool) -> CfgNode:
    node = CfgNode(items, path=path)
    return node.freeze() if frozen else node
