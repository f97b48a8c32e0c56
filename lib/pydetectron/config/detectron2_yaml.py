"""Reading detectron2 YAML files: ``_BASE_`` chains, detectron2's key names, trailing ``KEY VALUE`` overrides.

The result is a flat ``{d2 key: value}`` table that starts from detectron2's defaults
(``detectron2_defaults.D2_DEFAULTS``) plus, for every key a file or an override set, where it was set, so that
the translation (``detectron2.py``) can name the file in its errors. Rules follow fvcore / detectron2: a base is
read first and the file's own keys are merged over it; a relative ``_BASE_`` is taken from the file's folder.
Additions: ``_BASE_`` may be a list (merged in order), a cycle is an error naming the files, and the one Python
tag detectron2's configs use (``!!python/object/apply:eval``, for RetinaNet's anchor sizes) is evaluated on plain
arithmetic and list comprehensions only, never as arbitrary code.
"""

from __future__ import annotations

import ast
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml

from pydetectron.config.detectron2_defaults import D2_DEFAULTS, D2_SECTIONS
from pydetectron.config.merge import ConfigError, _decode, coerce_value

BASE_KEY = "_BASE_"
OVERRIDES = "command-line overrides"


class Detectron2ConfigError(ConfigError):
    """A detectron2 config that cannot be read or translated; the message names the key and the file."""


@dataclass
class D2Values:
    """detectron2's flat option table after merging: values and, for each key that was set, its origin."""

    values: dict[str, Any] = field(default_factory=lambda: dict(D2_DEFAULTS))
    sources: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        return self.sources.get(key, "detectron2's defaults")

    def is_default(self, key: str) -> bool:
        return _same(self.values[key], D2_DEFAULTS[key])


def _same(a: Any, b: Any) -> bool:
    """Equality that treats tuples and lists alike (YAML gives lists where detectron2's defaults hold tuples)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# --------------------------------------------------------------------------------------- the eval tag
_SAFE_NODES = (ast.Expression, ast.List, ast.Tuple, ast.ListComp, ast.comprehension, ast.BinOp, ast.UnaryOp,
               ast.Constant, ast.Name, ast.Load, ast.Store, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow,
               ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)


def safe_eval(text: str, source: str) -> Any:
    """Evaluate an arithmetic expression over numbers, lists and list comprehensions (nothing else)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise Detectron2ConfigError(f"{source}: cannot parse the !!python/object/apply:eval expression "
                                    f"{text!r}: {exc.msg}") from None
    bad = [type(node).__name__ for node in ast.walk(tree) if not isinstance(node, _SAFE_NODES)]
    if bad:
        raise Detectron2ConfigError(
            f"{source}: the !!python/object/apply:eval expression {text!r} uses {bad[0]}; only numbers, lists, "
            "arithmetic and list comprehensions are evaluated (write the values out instead)")
    return eval(compile(tree, source, "eval"), {"__builtins__": {}}, {})  # noqa: S307 (AST checked above)


class _D2Loader(yaml.SafeLoader):
    """Safe YAML loading, with mapping keys kept as text and detectron2's eval tag evaluated safely."""

    source = "<string>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep)


def _construct_eval(loader: _D2Loader, node: yaml.Node) -> Any:
    args = loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode) else []
    if len(args) != 1 or not isinstance(args[0], str):
        raise Detectron2ConfigError(f"{loader.source}: !!python/object/apply:eval takes one expression string")
    return safe_eval(args[0], loader.source)


_D2Loader.add_constructor("tag:yaml.org,2002:python/object/apply:eval", _construct_eval)


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise Detectron2ConfigError(f"cannot read detectron2 config file {path}: {exc.strerror}") from None
    loader_class = type("_Loader", (_D2Loader,), {"source": path})
    try:
        data = yaml.load(text, Loader=loader_class)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise Detectron2ConfigError(f"cannot parse YAML in {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise Detectron2ConfigError(f"a detectron2 config must be a YAML mapping of keys ({path}), got "
                                    f"{type(data).__name__}")
    return dict(data)


# ------------------------------------------------------------------------------------------- merging
def _unknown(key: str, source: str) -> Detectron2ConfigError:
    close = difflib.get_close_matches(key, list(D2_DEFAULTS), n=2, cutoff=0.7)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return Detectron2ConfigError(f"{key} (in {source}) is not a detectron2 config key (detectron2's "
                                 f"config/defaults.py has no such key).{hint}")


def _coerce(key: str, raw: Any, source: str) -> Any:
    """yacs' rules: text is read as a Python literal where it is one, then must have the default's type."""
    default = D2_DEFAULTS[key]
    raw = _decode(raw, default)
    if default is None or raw is None:  # SOLVER.WEIGHT_DECAY_BIAS: None or a number
        return raw if raw is None or isinstance(raw, (int, float)) else _bad_type(key, raw, source)
    if isinstance(default, tuple) and isinstance(raw, int) and key == "INPUT.MIN_SIZE_TRAIN":
        return (raw,)  # detectron2's ResizeShortestEdge takes a single size too
    return coerce_value(raw, default, key, source)


def _bad_type(key: str, raw: Any, source: str) -> Any:
    raise Detectron2ConfigError(f"{key} (in {source}) must be a number or None, got {raw!r}")


def _merge_mapping(values: D2Values, data: Mapping[str, Any], prefix: str, source: str) -> None:
    for name, raw in data.items():
        key = f"{prefix}{name}"
        if key in D2_SECTIONS:
            if not isinstance(raw, Mapping):
                raise Detectron2ConfigError(f"{key} (in {source}) is a section of detectron2's config; it needs a "
                                            f"mapping of keys, got {raw!r}")
            _merge_mapping(values, raw, f"{key}.", source)
            continue
        if key not in D2_DEFAULTS:
            raise _unknown(key, source)
        values.values[key] = _coerce(key, raw, source)
        values.sources[key] = source


def _base_paths(base: Any, path: str) -> list[str]:
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise Detectron2ConfigError(f"{BASE_KEY} in {path} must be a file name or a list of file names, got {base!r}")
    folder = os.path.dirname(path)
    resolved = []
    for name in bases:
        if name.startswith(("http://", "https://")):
            raise Detectron2ConfigError(f"{BASE_KEY} {name!r} in {path}: bases are read from files, not URLs")
        name = os.path.expanduser(name)
        resolved.append(os.path.normpath(name if os.path.isabs(name) else os.path.join(folder, name)))
    return resolved


def _merge_file(values: D2Values, path: str, chain: tuple[str, ...]) -> None:
    if path in chain:
        cycle = " -> ".join((*chain[chain.index(path):], path))
        raise Detectron2ConfigError(f"{BASE_KEY} cycle: {cycle}")
    if not os.path.isfile(path):
        where = f" ({BASE_KEY} of {chain[-1]})" if chain else ""
        raise Detectron2ConfigError(f"detectron2 config file {path} does not exist{where}")
    data = _read_yaml(path)
    base = data.pop(BASE_KEY, None)
    if base is not None:
        for base_path in _base_paths(base, path):
            _merge_file(values, base_path, (*chain, path))
    _merge_mapping(values, data, "", path)


def refuse_lazy_config(path: str) -> None:
    if str(path).endswith(".py"):
        raise Detectron2ConfigError(
            f"{path} is a detectron2 LazyConfig (.py); pydetectron reads detectron2's YAML configs only (the "
            "CfgNode kind under detectron2's configs/COCO-*/ folders). Write the model as a YAML config instead.")


def read_detectron2_values(path: str | os.PathLike, opts: Sequence[Any] = ()) -> D2Values:
    """detectron2's merged option table for the YAML at ``path`` (and its bases), then ``opts`` (KEY VALUE ...)."""
    path = os.path.normpath(os.fspath(path))
    refuse_lazy_config(path)
    values = D2Values()
    _merge_file(values, path, ())
    opts = list(opts)
    if len(opts) % 2:
        raise Detectron2ConfigError(f"detectron2 config overrides must be KEY VALUE pairs, got an odd number of "
                                    f"items: {opts!r}")
    for key, raw in zip(opts[0::2], opts[1::2]):
        if not isinstance(key, str) or key not in D2_DEFAULTS:
            raise _unknown(str(key), OVERRIDES)
        values.values[key] = _coerce(key, raw, OVERRIDES)
        values.sources[key] = OVERRIDES
    return values

