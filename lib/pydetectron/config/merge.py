"""Merging YAML files, other configs and ``KEY value`` lists into a config tree, and dumping it back.

Detectron's rules: a merged key must already exist in the tree; raw strings are parsed with ``ast.literal_eval``
(so ``'(600, 800)'`` becomes a tuple); the value must have the default's type, except that tuple <-> list,
numbers -> str and anything -> numpy array (of the default's dtype) are coerced. Additions: int -> float and
whole float -> int (``'1e5'`` iterations) are accepted, every error names the full key, the file it came from
and the closest valid key, and renamed keys are translated (with a warning) instead of rejected, so old YAMLs
keep loading.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
from ast import literal_eval
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from pydetectron.config.node import CfgNode

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file, list or value that cannot be merged: wrong type, bad value, unknown key."""


class UnknownConfigKeyError(ConfigError, KeyError):
    """A key that does not exist in the option tree (also a ``KeyError``, as in Detectron)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# Keys Detectron removed; they are ignored with a warning (Detectron's _DEPRECATED_KEYS).
DEPRECATED_KEYS = frozenset({
    "FINAL_MSG",
    "MODEL.DILATION",
    "ROOT_GPU_ID",
    "RPN.ON",
    "TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED",  # shadowed: Detectron.pytorch still has it as a real key
    "TRAIN.DROPOUT",
    "USE_GPU_NMS",
    "TEST.NUM_TEST_IMAGES",
})


def _split_colon_list(value: Any) -> Any:
    """``'a:b'`` -> ``('a', 'b')``: the old single-string spelling of a list of datasets / files."""
    return tuple(value.split(":")) if isinstance(value, str) else value


def _one_element_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


def _single_scale(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ConfigError(f"TEST.SCALES was renamed to TEST.SCALE, which takes one scale; got {value!r}")
        return value[0]
    return value


class _Rename:
    """Where an old key went, and how an old-style value is converted (Detectron's _RENAMED_KEYS, with the
    instructions of its notes turned into code)."""

    def __init__(self, new_key: str, convert: Callable[[Any], Any] | None = None):
        self.new_key = new_key
        self.convert = convert


RENAMED_KEYS: dict[str, _Rename] = {
    "EXAMPLE.RENAMED.KEY": _Rename("EXAMPLE.KEY"),  # Detectron's dummy example (target does not exist)
    "MODEL.PS_GRID_SIZE": _Rename("RFCN.PS_GRID_SIZE"),
    "MODEL.ROI_HEAD": _Rename("FAST_RCNN.ROI_BOX_HEAD"),
    "MRCNN.MASK_HEAD_NAME": _Rename("MRCNN.ROI_MASK_HEAD"),
    "TRAIN.DATASET": _Rename("TRAIN.DATASETS", _split_colon_list),
    "TRAIN.PROPOSAL_FILE": _Rename("TRAIN.PROPOSAL_FILES", _split_colon_list),
    "TEST.SCALES": _Rename("TEST.SCALE", _single_scale),
    "TEST.DATASET": _Rename("TEST.DATASETS", _one_element_tuple),
    "TEST.PROPOSAL_FILE": _Rename("TEST.PROPOSAL_FILES", _one_element_tuple),
    # pydetectron: the optimizer selector keeps Detectron.pytorch's name
    "SOLVER.OPTIMIZER": _Rename("SOLVER.TYPE"),
    # SparK's layer-wise lr decay (its 0 means off, as its lr_factor_func reads it)
    "SOLVER.LR_DECAY": _Rename("SOLVER.LAYER_WISE_LR_DECAY", lambda value: float(value) or 1.0),
}


def _where(source: str | None) -> str:
    return f" (in {source})" if source else ""


def _suggest(full_key: str, root: CfgNode) -> str:
    """' Did you mean X?' for the closest existing key, judged on the full key then on its last part."""
    candidates = list(root.leaf_keys())
    matches = difflib.get_close_matches(full_key, candidates, n=3, cutoff=0.6)
    if not matches:
        last = full_key.rsplit(".", 1)[-1]
        by_name = {key: key.rsplit(".", 1)[-1] for key in candidates}
        close = set(difflib.get_close_matches(last, set(by_name.values()), n=3, cutoff=0.75))
        matches = [key for key, name in by_name.items() if name in close][:3]
    if not matches:
        return " No similar key exists."
    return f" Did you mean {' or '.join(matches)}?"


def _decode(raw: Any, default: Any) -> Any:
    """Parse a raw string the way Detectron does (literal_eval, falling back to the string itself).

    For keys whose default is a string, the raw text is kept unless it is a quoted string literal, so that a
    name such as ``'1e5'`` or ``'2017'`` is not turned into a number.
    """
    if not isinstance(raw, str):
        return raw
    try:
        value = literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw
    if isinstance(default, str) and not isinstance(value, str):
        return raw
    return value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def coerce_value(value: Any, default: Any, full_key: str, source: str | None = None) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise ``ConfigError`` naming ``full_key``."""
    if isinstance(default, np.ndarray):
        try:
            array = np.asarray(value, dtype=default.dtype)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{full_key}{_where(source)}: cannot read {value!r} as numbers ({exc})") from None
        if array.size != default.size:
            raise ConfigError(f"{full_key}{_where(source)}: expected {default.size} values like "
                              f"{default.ravel().tolist()}, got {value!r}")
        return array.reshape(default.shape).copy()
    if type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(default) is int and isinstance(value, float) and value.is_integer():  # '1e5' iterations
        return int(value)
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, list) and isinstance(value, tuple):
        return list(value)
    raise ConfigError(f"type mismatch for config key {full_key}{_where(source)}: expected "
                      f"{type(default).__name__} (like its current value {default!r}), got {_describe(value)}")


def _merge_mapping(values: Mapping[str, Any], root: CfgNode, prefix: str, source: str | None) -> None:
    for key, raw in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r} under '{prefix or '<root>'}'"
                              f"{_where(source)}")
        _assign(root, f"{prefix}{key}", raw, source)


def _lookup_parent(root: CfgNode, full_key: str) -> tuple[CfgNode, str] | None:
    node = root
    *parents, leaf = full_key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, CfgNode):
            return None
        node = child
    return (node, leaf) if leaf in node else None


def _assign(root: CfgNode, full_key: str, raw: Any, source: str | None) -> None:
    """Merge one (possibly nested) value at ``full_key``, handling deprecated and renamed keys."""
    found = _lookup_parent(root, full_key)
    if found is None:
        if full_key in DEPRECATED_KEYS:
            logger.warning("Deprecated config key (ignoring): %s%s", full_key, _where(source))
            return
        if full_key in RENAMED_KEYS:
            _assign_renamed(root, full_key, raw, source)
            return
        raise UnknownConfigKeyError(f"Non-existent config key: {full_key}{_where(source)}."
                                    f"{_suggest(full_key, root)}")
    node, leaf = found
    default = node[leaf]
    if isinstance(default, CfgNode):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{full_key}{_where(source)} is a section of the config; it needs a mapping of "
                              f"keys, got {_describe(raw)}")
        _merge_mapping(raw, root, f"{full_key}.", source)
        return
    node[leaf] = coerce_value(_decode(raw, default), default, full_key, source)


def _assign_renamed(root: CfgNode, old_key: str, raw: Any, source: str | None) -> None:
    rename = RENAMED_KEYS[old_key]
    if _lookup_parent(root, rename.new_key) is None:
        raise UnknownConfigKeyError(f"Key {old_key} was renamed to {rename.new_key}; please update your config"
                                    f"{_where(source)}.")
    value = _decode(raw, None)
    if rename.convert is not None:
        value = rename.convert(value)
    logger.warning("Config key %s was renamed to %s; translated to %s = %r%s. Please update your config.",
                   old_key, rename.new_key, rename.new_key, value, _where(source))
    _assign(root, rename.new_key, value, source)


class _KeysAsTextLoader(yaml.SafeLoader):
    """Safe YAML loader that keeps mapping keys as written: YAML 1.1 would turn a key ``ON`` into ``True``."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep)


# ---------------------------------------------------------------------------------------------- public API
def load_yaml(text: str, source: str | None = None) -> dict:
    """Parse YAML text that must hold a mapping (an empty document is an empty mapping)."""
    try:
        stream = io.StringIO(text)
        stream.name = source or "<string>"  # PyYAML quotes the stream's name in its error positions
        data = yaml.load(stream, Loader=_KeysAsTextLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML{_where(source)}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a YAML mapping of keys{_where(source)}, got {_describe(data)}")
    return data


def merge_cfg_from_file(cfg: CfgNode, path: str | os.PathLike) -> CfgNode:
    """Merge the YAML file at ``path`` into ``cfg`` (in place; also returned)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return merge_cfg_from_str(cfg, text, source=str(path))


def merge_cfg_from_str(cfg: CfgNode, text: str, source: str | None = "<string>") -> CfgNode:
    """Merge YAML text (e.g. a config saved in a checkpoint by ``cfg_to_yaml``) into ``cfg``."""
    _merge_mapping(load_yaml(text, source), cfg, "", source)
    return cfg


def merge_cfg_from_cfg(cfg: CfgNode, other: Mapping[str, Any]) -> CfgNode:
    """Merge another config (or nested dict) into ``cfg``; every key of ``other`` must exist in ``cfg``."""
    _merge_mapping(other, cfg, "", None)
    return cfg


def merge_cfg_from_list(cfg: CfgNode, pairs: Sequence[Any]) -> CfgNode:
    """Merge ``['TEST.NMS', '0.5', 'TRAIN.SCALES', '(600, 800)', ...]`` (as from a command line) into ``cfg``."""
    if isinstance(pairs, str) or len(pairs) % 2 != 0:
        raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd number of items: {list(pairs)!r}")
    for full_key, raw in zip(pairs[0::2], pairs[1::2]):
        if not isinstance(full_key, str):
            raise ConfigError(f"config override keys must be strings like 'TRAIN.SCALES', got {full_key!r}")
        _assign(cfg, full_key, raw, "command-line overrides")
    return cfg


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_to_plain(item) for item in value]
    return value


def cfg_to_yaml(cfg: CfgNode) -> str:
    """The whole tree as YAML that ``merge_cfg_from_str`` reads back to an identical config."""
    return yaml.safe_dump(_to_plain(cfg), default_flow_style=None, sort_keys=True, width=110)

