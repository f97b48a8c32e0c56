"""Where distillation reads a ResNet body: the pre-ReLU ends of its stages, and the norms just before them.

MGD distils the stage outputs C2..C5 *before* their final ReLU (MGD's d2 ``ResNet.extract_feature`` with
``preReLU=True``: their blocks move the ReLU to the start of the next block, so a stage returns the raw
residual sum). Our blocks end with the module ``out_relu``; a forward pre-hook on it in the last block of a
stage receives exactly that sum. Hooking, rather than a second pass through the body as MGD's d2 code does,
keeps one forward per network and the same gradients.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from pydetectron.modeling.backbones.resnet import (  # noqa: F401  (re-exported: the distill API)
    MGD_STAGE_NORM_GROUPS,
    BasicBlock,
    BottleneckBlock,
    ResNet,
    enable_stage_last_norms,
)

STAGE_LEVELS = (2, 3, 4, 5)  # C2..C5; MGD's feature index i is level i + 2


def stage_name(level: int) -> str:
    """'c2' for level 2: the suffix of a stage's ``loss_distill_*`` name and of its state entries."""
    return f"c{level}"


def resnet_body_of(model: nn.Module) -> ResNet:
    """The one ResNet body inside `model` (a detector, an FPN, or the body itself); an error if none or several."""
    bodies = [m for m in model.modules() if isinstance(m, ResNet)]
    if len(bodies) != 1:
        raise ValueError(
            f"distillation needs exactly one ResNet body in the {type(model).__name__}, found {len(bodies)}"
        )
    return bodies[0]


def _check_levels(body: ResNet, levels: Sequence[int]) -> None:
    missing = [lvl for lvl in levels if lvl not in body.stage_dims]
    if missing:
        raise ValueError(f"the ResNet body has stages {sorted(body.stage_dims)}, distillation asks for {missing}")


def stage_end_block(body: ResNet, level: int) -> nn.Module:
    """The last residual block of stage ``res<level>`` (its output is the stage output C<level>)."""
    _check_levels(body, [level])
    return getattr(body, f"res{level}")[-1]


def stage_end_norm(body: ResNet, level: int) -> nn.Module:
    """The norm right before the stage's final ReLU: ``branch2c`` (bottleneck) or ``branch2b`` (basic) of the
    stage's last block, as MGD's d2 ``ResNet.get_bn_before_relu`` (``conv3.norm`` / ``conv2.norm``)."""
    block = stage_end_block(body, level)
    if isinstance(block, BottleneckBlock):
        return block.branch2c.norm
    if isinstance(block, BasicBlock):
        return block.branch2b.norm
    raise TypeError(f"res{level}'s last block is a {type(block).__name__}, not a bottleneck or basic block")


def stage_channels(body: ResNet, levels: Sequence[int] = STAGE_LEVELS) -> List[int]:
    """Channels of C<level> for each of `levels` (MGD's ``get_channel_num``)."""
    _check_levels(body, levels)
    return [body.stage_dims[lvl] for lvl in levels]


class PreReluCapture:
    """Records the pre-ReLU outputs of stages `levels` of `body` on every forward of the network holding it.

    ``pop()`` returns them, finest first, each ``(N, C_level, H_level, W_level)``, and forgets them. While
    installed, the hooked blocks' final ReLU is not in place (so the recorded sum keeps its values and its
    autograd history); outputs are unchanged. ``remove()`` restores the blocks. One capture per network:
    under a DataParallel, replicas would write into the same capture.
    """

    def __init__(self, body: ResNet, levels: Sequence[int] = STAGE_LEVELS) -> None:
        _check_levels(body, levels)
        self.levels = list(levels)
        self._features: Dict[int, torch.Tensor] = {}
        self._relus = [stage_end_block(body, lvl).out_relu for lvl in self.levels]
        self._inplace = [relu.inplace for relu in self._relus]
        self._handles = []
        for level, relu in zip(self.levels, self._relus):
            relu.inplace = False
            self._handles.append(relu.register_forward_pre_hook(self._recorder(level)))

    def _recorder(self, level: int):
        def record(_module: nn.Module, inputs: tuple) -> None:
            self._features[level] = inputs[0]

        return record

    def pop(self) -> List[torch.Tensor]:
        """The features of the last forward, C<levels[0]> first; an error if a stage did not run since."""
        missing = [lvl for lvl in self.levels if lvl not in self._features]
        if missing:
            raise RuntimeError(f"no pre-ReLU features recorded for stages {missing}: run the network first")
        features = [self._features[lvl] for lvl in self.levels]
        self._features = {}
        return features

    def remove(self) -> None:
        """Unhook the blocks and give their ReLUs back their in-place setting."""
        for handle in self._handles:
            handle.remove()
        for relu, inplace in zip(self._relus, self._inplace):
            relu.inplace = inplace
        self._handles = []
        self._features = {}
