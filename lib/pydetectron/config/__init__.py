"""Detectron's option tree: defaults, YAML / list merging, checks, freezing.

Typical use (no global config; each caller owns its tree)::

    cfg = get_cfg()
    merge_cfg_from_file(cfg, 'configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml')
    merge_cfg_from_list(cfg, ['TRAIN.SCALES', '(600, 800)'])
    assert_and_infer_cfg(cfg)          # infers RPN.RPN_ON etc., checks, freezes
    cfg = load_detectron2_config('configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml',
                                 ['MODEL.WEIGHTS', 'model_final.pth'])   # a detectron2 YAML, detectron2 mode
    text = cfg_to_yaml(cfg)            # saved in checkpoints; merge_cfg_from_str reads it back

See ``defaults.py`` for the keys pydetectron adds to Detectron's and Detectron.pytorch's.
"""

from pydetectron.config.checks import assert_and_infer_cfg
from pydetectron.config.defaults import build_defaults
from pydetectron.config.detectron2 import load_detectron2_config
from pydetectron.config.detectron2_yaml import Detectron2ConfigError
from pydetectron.config.merge import (
    DEPRECATED_KEYS,
    RENAMED_KEYS,
    ConfigError,
    UnknownConfigKeyError,
    cfg_to_yaml,
    coerce_value,
    load_yaml,
    merge_cfg_from_cfg,
    merge_cfg_from_file,
    merge_cfg_from_list,
    merge_cfg_from_str,
)
from pydetectron.config.names import normalize_module_name
from pydetectron.config.node import CfgNode, FrozenConfigError

_DEFAULTS = build_defaults().freeze()


def get_cfg() -> CfgNode:
    """A fresh, unfrozen deep copy of the default tree; changing it never affects another call's result."""
    return _DEFAULTS.clone()


__all__ = [
    "CfgNode",
    "ConfigError",
    "Detectron2ConfigError",
    "DEPRECATED_KEYS",
    "FrozenConfigError",
    "RENAMED_KEYS",
    "UnknownConfigKeyError",
    "assert_and_infer_cfg",
    "cfg_to_yaml",
    "coerce_value",
    "get_cfg",
    "load_detectron2_config",
    "load_yaml",
    "merge_cfg_from_cfg",
    "merge_cfg_from_file",
    "merge_cfg_from_list",
    "merge_cfg_from_str",
    "normalize_module_name",
]
