"""Name -> builder tables for the pieces a config selects by name.

A config names its body and heads the way Detectron or Detectron.pytorch did
(``'FPN.add_fpn_ResNet50_conv5_body'``, ``'fast_rcnn_heads.roi_2mlp_head'``); modules register their builders
under the bare name (``'fpn_ResNet50_conv5_body'``) and ``build`` accepts any of those spellings.
This module imports no model code: builders register themselves when their modules are imported, which
``import_builtin_modules()`` does for the built-in ones.

Builder signatures (ARCHITECTURE.md): bodies ``builder(cfg) -> nn.Module``; heads
``builder(cfg, dim_in: int, spatial_scales: list[float]) -> nn.Module``; ROI heads (the cascade of the box, mask
and keypoint heads, ``roi_heads.ROIHeads``) ``builder(cfg, dim_in: int, spatial_scales: list[float]) -> ROIHeads``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, TypeVar

from pydetectron.config.names import normalize_module_name

KINDS = ("body", "box_head", "mask_head", "keypoint_head", "roi_heads")

# Modules whose import registers the built-in builders (see import_builtin_modules).
BUILTIN_MODULES = (
    "pydetectron.modeling.backbones",
    "pydetectron.modeling.box_head",
    "pydetectron.modeling.mask_head",
    "pydetectron.modeling.keypoint_head",
    "pydetectron.modeling.roi_heads",
    "pydetectron.modeling.detectron2.box_head",
    "pydetectron.modeling.detectron2.mask_head",
    "pydetectron.modeling.detectron2.keypoint_head",
    "pydetectron.modeling.detectron2.roi_heads",
)

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}

F = TypeVar("F", bound=Callable[..., Any])


class RegistryError(KeyError):
    """Unknown kind or name, or a name registered twice."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _table(kind: str) -> dict[str, Callable[..., Any]]:
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown registry kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return _REGISTRY[kind]


def register(kind: str, name: str) -> Callable[[F], F]:
    """Decorator registering ``builder`` under ``name`` (any Detectron spelling; stored normalised)."""
    table = _table(kind)
    key = normalize_module_name(name)
    if not key:
        raise RegistryError(f"cannot register an empty {kind} name (given {name!r})")

    def decorator(builder: F) -> F:
        existing = table.get(key)
        if existing is not None and existing is not builder:
            raise RegistryError(f"{kind} {key!r} is already registered by "
                                f"{existing.__module__}.{existing.__qualname__}")
        table[key] = builder
        return builder

    return decorator


def lookup(kind: str, name: str) -> Callable[..., Any]:
    """The builder registered for ``name``; the error lists the valid names and the closest one."""
    table = _table(kind)
    key = normalize_module_name(name)
    if key in table:
        return table[key]
    valid = sorted(table)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Closest match: {close[0]!r}." if close else ""
    listing = ", ".join(valid) if valid else "(none registered; was import_builtin_modules() called?)"
    raise RegistryError(f"unknown {kind} {name!r} (normalised: {key!r}).{hint} Valid {kind} names: {listing}")


def build(kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """``lookup(kind, name)(*args, **kwargs)``, e.g. ``build('body', cfg.MODEL.CONV_BODY, cfg)``."""
    return lookup(kind, name)(*args, **kwargs)


def registered(kind: str) -> list[str]:
    """Sorted normalised names registered for ``kind``."""
    return sorted(_table(kind))


def import_builtin_modules() -> list[str]:
    """Import the built-in builder modules so they register; returns their names.

    Every one of them is part of the package: any import failure (a missing module included) propagates,
    so a broken install fails here rather than as an "unknown name" later.
    """
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return list(BUILTIN_MODULES)
