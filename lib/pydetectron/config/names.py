"""Spelling-independent module names.

Detectron writes builder names as ``'FPN.add_fpn_ResNet50_conv5_body'`` and Detectron.pytorch as
``'FPN.fpn_ResNet50_conv5_body'``; both (and the bare ``'fpn_ResNet50_conv5_body'``) name the same builder.
The config keeps whatever string the YAML had; the registry and the config checks compare normalised names.
"""

from __future__ import annotations


def normalize_module_name(name: str) -> str:
    """Drop any dotted module prefix and one leading ``'add_'``.

    >>> normalize_module_name('FPN.add_fpn_ResNet50_conv5_body')
    'fpn_ResNet50_conv5_body'
    >>> normalize_module_name('mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs')
    'mask_rcnn_fcn_head_v1up4convs'
    """
    if not isinstance(name, str):
        raise TypeError(f"module name must be a string, got {type(name).__name__}: {name!r}")
    base = name.strip().rsplit(".", 1)[-1]
    return base[len("add_"):] if base.startswith("add_") else base
