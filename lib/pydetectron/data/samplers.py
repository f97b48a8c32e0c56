"""Infinite, seeded, resumable batch sampler with Detectron's aspect grouping.

Aspect grouping (TRAIN.ASPECT_GROUPING): landscape images (width >= height) and portrait images are shuffled
separately and cut into batches of one orientation, so a batch never mixes them (Detectron pairs images the
same way in ``roi_data/loader.py``; here it holds for any batch size). Each epoch draws its permutations from
``(seed, epoch)``; the images of a group left over at an epoch's end open that group's next epoch, so every
image is used once per pass and no batch is short. The sequence is a pure function of the seed, so resuming at
iteration ``k`` yields exactly the batches an uninterrupted run yields from ``k`` on.

Distributed (``num_replicas`` processes): every iteration draws one *global* batch of ``batch_size x
num_replicas`` images of one group, and rank r takes its r-th slice. So the ranks see different images, every
image is used once per epoch over all ranks, and the ranks together see exactly what one process with the
global batch (cut into per-device parts by the DataParallel) would see.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import numpy as np
from torch.utils.data import Sampler


def aspect_groups(roidb: Sequence[dict]) -> np.ndarray:
    """(N,) int64 group per entry: 0 = landscape or square (width >= height), 1 = portrait."""
    return np.array([0 if e["width"] >= e["height"] else 1 for e in roidb], dtype=np.int64)


class InfiniteGroupedBatchSampler(Sampler[List[int]]):
    """Yields lists of ``batch_size`` dataset indices forever; all indices of a batch share a group.

    ``groups``: (N,) group id per index (``aspect_groups``), or None for no grouping.
    ``start_iter``: number of batches to skip, to resume a run that stopped after that many iterations.
    ``num_replicas`` / ``rank``: the process count and this process's rank (module docstring).
    """

    def __init__(self, groups: Sequence[int] | None, num_items: int, batch_size: int, seed: int = 0,
                 start_iter: int = 0, num_replicas: int = 1, rank: int = 0):
        if num_items <= 0:
            raise ValueError("cannot sample from an empty dataset (is the roidb empty after filtering?)")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.groups = np.zeros(num_items, np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        if len(self.groups) != num_items:
            raise ValueError(f"{len(self.groups)} group ids for {num_items} items")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0 .. {num_replicas - 1}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.start_iter = int(start_iter)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def state_dict(self) -> Dict[str, int]:
        """What a checkpoint stores to resume the data stream exactly (start_iter = iterations done)."""
        return {"seed": self.seed, "start_iter": self.start_iter, "batch_size": self.batch_size,
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("batch_size", "num_replicas"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"the sampler state was saved with {key} {state[key]}, this run has "
                                 f"{getattr(self, key)}: the data stream cannot resume exactly")
        self.seed = int(state["seed"])
        self.start_iter = int(state["start_iter"])

    def _epoch_batches(self, epoch: int, carry: Dict[int, np.ndarray]) -> List[np.ndarray]:
        """The batches of one pass; ``carry`` holds each group's leftovers and is updated in place."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for g in np.unique(self.groups):
            members = np.nonzero(self.groups == g)[0]
            pool = np.concatenate([carry.get(int(g), members[:0]), rng.permutation(members)])
            size = self.global_batch_size
            full = len(pool) // size * size
            batches.extend(pool[:full].reshape(-1, size))
            carry[int(g)] = pool[full:]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[List[int]]:
        carry: Dict[int, np.ndarray] = {}
        to_skip, epoch = self.start_iter, 0
        while True:
            batches = self._epoch_batches(epoch, carry)
            epoch += 1
            if to_skip >= len(batches):
                to_skip -= len(batches)
                continue
            first = self.rank * self.batch_size
            for batch in batches[to_skip:]:
                yield batch[first:first + self.batch_size].tolist()
            to_skip = 0

