"""detectron2's ``get_norm`` names for the heads' ``NORM`` keys, as pydetectron's ``NormSpec``.

'' = no norm (the conv keeps its bias), 'GN' = GroupNorm with 32 groups (d2's fixed count), 'BN' = trainable
batch norm, 'SyncBN' = batch norm synchronised over the process group, 'FrozenBN' = a frozen affine map
(d2's FrozenBatchNorm2d, folded into Caffe2's AffineChannel when weights load).
"""

from __future__ import annotations

from pydetectron.config.checks import D2_NORM_KINDS
from pydetectron.modeling.layers import NormSpec

D2_GN_GROUPS = 32


def d2_norm_spec(name: str, key: str) -> NormSpec | None:
    """The norm `name` given by cfg `key` (for the error), or None for ''."""
    if name not in D2_NORM_KINDS:
        raise ValueError(f"{key} = {name!r} is not one of {tuple(D2_NORM_KINDS)}")
    kind = D2_NORM_KINDS[name]
    if kind is None:
        return None
    return NormSpec(kind, gn_dim_per_gp=-1, gn_num_groups=D2_GN_GROUPS, gn_eps=1e-5)
