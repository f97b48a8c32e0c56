"""A rank of the two-process loss-normaliser test (spawned processes import it by name)."""

from pathlib import Path

import torch

from pydetectron.modeling.detectron2.retinanet import LossNormalizer
from pydetectron.utils.distributed import get_rank

FOREGROUND_PER_RANK = {0: [10, 3], 1: [0, 7]}  # rank 1's first batch has none: max(0, 1) = 1


def loss_normalizer_updates(out_dir: str) -> None:
    normalizer = LossNormalizer()
    values = [normalizer.update(n) for n in FOREGROUND_PER_RANK[get_rank()]]
    torch.save(values, Path(out_dir) / f"normalizer_rank{get_rank()}.pt")
