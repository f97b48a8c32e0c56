"""The RPN head and the RPN's output, shared by both conventions (Detectron's ``rpn_heads.py`` /
``FPN.add_fpn_rpn_outputs`` and detectron2's ``StandardRPNHead`` are the same layers with the same init), and
the one-thread context both RPNs run their per-image bookkeeping in.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydetectron.ops.conv import Conv2d


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for objectness logits and box deltas, applied to every map.

    Args:
        blob_suffix: ``''`` for a single map (``conv_rpn_w`` ...), ``'_fpn2'`` for FPN
            (``conv_rpn_fpn2_w`` ...), naming the Detectron blobs in :meth:`detectron_weight_mapping`.
    """

    def __init__(self, dim_in: int, dim_out: int, num_anchors: int, softmax: bool, blob_suffix: str = "") -> None:
        super().__init__()
        self.blob_suffix = blob_suffix
        self.softmax = softmax
        # the RPN's losses count sampled anchors only: the conv's output gradient is zero almost everywhere
        self.conv_rpn = Conv2d(dim_in, dim_out, 3, padding=1, sparse_output_grad=True)
        self.rpn_cls_logits = Conv2d(dim_out, num_anchors * (2 if softmax else 1), 1)
        self.rpn_bbox_pred = Conv2d(dim_out, num_anchors * 4, 1)
        for conv in (self.conv_rpn, self.rpn_cls_logits, self.rpn_bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)  # Detectron's GaussianFill(std=0.01), zero bias
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per map ``(N, C, H, W)``: logits ``(N, A or 2A, H, W)`` and deltas ``(N, 4A, H, W)``."""
        logits, deltas = [], []
        for x in features:
            hidden = F.relu(self.conv_rpn(x))
            logits.append(self.rpn_cls_logits(hidden))
            deltas.append(self.rpn_bbox_pred(hidden))
        return logits, deltas

    def objectness(self, logits: Tensor) -> Tensor:
        """Foreground probability ``(N, A, H, W)`` from a map's logits."""
        if not self.softmax:
            return torch.sigmoid(logits)
        n, c, h, w = logits.shape
        return F.softmax(logits.reshape(n, 2, c // 2, h, w), dim=1)[:, 1]

    def detectron_weight_mapping(self) -> dict[str, str | None]:
        return {
            f"{name}.{param}": f"{name}{self.blob_suffix}_{param[0]}"
            for name in ("conv_rpn", "rpn_cls_logits", "rpn_bbox_pred")
            for param in ("weight", "bias")
        }


class RPNOutput(NamedTuple):
    """``rois`` ``(K, 5)`` ``[batch_index, x1, y1, x2, y2]`` and objectness ``scores`` ``(K,)`` (``None``
    when an RPN-only model trains, as Detectron generates no proposals then); ``losses`` in training.
    Scores are probabilities in Detectron mode and logits (detectron2's ``objectness_logits``) in
    detectron2 mode; both rank the same."""

    rois: Tensor | None
    scores: Tensor | None
    losses: dict[str, Tensor]


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when on the CPU (results are identical: same kernels).

    Anchor labelling and proposal generation are dozens of small elementwise ops per image; each one over
    ~30k elements opens a parallel region, and on a busy machine every region waits for a descheduled
    thread. One thread does the same work without those waits: measured on 2 loaded cores, RPN targets
    for 4 images x 20k anchors took 35 ms instead of 136 ms (median), proposals 24 ms instead of 127 ms.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
