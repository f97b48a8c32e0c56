"""The training data loader: roidb -> torch DataLoader of minibatch dicts (DATA_LOADER.NUM_THREADS workers).

Every image's random choices (its scale, its crop) come from a generator seeded by (seed, iteration, position
in the batch), so a run is reproducible whatever the number of workers, and a resumed run (``start_iter``)
sees the same images at the same scales as an uninterrupted one.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Iterator, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pydetectron.data.minibatch import BlobSettings, Sample, collate_samples, prepare_sample, roidb_to_tensors
from pydetectron.data.samplers import InfiniteGroupedBatchSampler, aspect_groups

logger = logging.getLogger(__name__)


class RoidbDataset(Dataset):
    """Maps ``(roidb index, seed)`` to a processed ``Sample``; with ``skip_unreadable`` a missing or corrupt
    image is logged and skipped (None) instead of stopping training."""

    def __init__(self, roidb: Sequence[dict], settings: BlobSettings, skip_unreadable: bool = False):
        self.roidb = roidb
        self.settings = settings
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.roidb)

    def __getitem__(self, key: Tuple[int, int]) -> Sample | None:
        index, seed = key
        try:
            return prepare_sample(self.roidb[index], self.settings, np.random.default_rng(seed))
        except OSError as e:  # FileNotFoundError included
            if not self.skip_unreadable:
                raise
            logger.warning("skipping roidb entry %d (image id %s): %s", index, self.roidb[index]["id"], e)
            return None


class SeededBatches(Sampler[List[Tuple[int, int]]]):
    """Wraps a batch sampler: each index gets a seed derived from (seed, iteration, position in the global
    batch). The position counts the rank (rank x per-rank batch + i), so each rank's augmentation draws come
    from the seed and its rank, and equal those of one process running the whole global batch."""

    def __init__(self, batch_sampler: InfiniteGroupedBatchSampler):
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        sampler = self.batch_sampler
        first = sampler.rank * sampler.batch_size
        for it, batch in enumerate(sampler, start=sampler.start_iter):
            seeds = np.random.SeedSequence([sampler.seed, it]).generate_state(sampler.global_batch_size,
                                                                              dtype=np.uint64)
            yield [(i, int(s)) for i, s in zip(batch, seeds[first:first + len(batch)])]


def collate_minibatch(samples: Sequence[Sample | None], stride: int) -> dict:
    """DataLoader collate: skipped images dropped, the rest padded into one minibatch dict."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise RuntimeError("every image of a minibatch was unreadable; see the warnings above")
    return collate_samples(kept, stride)


class TrainLoader:
    """An endless iterable of minibatch dicts (ARCHITECTURE.md): a DataLoader whose workers send numpy
    targets (sending many small tensors between processes costs more than building the images), made
    tensors here in the consuming process."""

    def __init__(self, loader: DataLoader, sampler: InfiniteGroupedBatchSampler):
        self.loader = loader
        self.sampler = sampler
        self.consumed = 0  # minibatches handed out by the current iterator

    def state_dict(self) -> dict:
        """The sampler's state at the current position: a loader built from it continues with the next batch."""
        return {**self.sampler.state_dict(), "start_iter": self.sampler.start_iter + self.consumed}

    def __iter__(self) -> Iterator[dict]:
        self.consumed = 0
        for batch in self.loader:
            self.consumed += 1
            yield roidb_to_tensors(batch)


def build_train_loader(
    roidb: Sequence[dict],
    settings: BlobSettings,
    batch_size: int,
    num_workers: int = 4,
    aspect_grouping: bool = True,
    seed: int = 0,
    start_iter: int = 0,
    skip_unreadable: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
) -> TrainLoader:
    """An endless loader of minibatch dicts, resumable at ``start_iter``; with ``num_replicas`` > 1, this
    rank's share of each global batch (``samplers.py``)."""
    sampler = InfiniteGroupedBatchSampler(
        aspect_groups(roidb) if aspect_grouping else None, len(roidb), batch_size, seed, start_iter,
        num_replicas, rank,
    )
    if num_workers > 0:
        # The workers are the parallelism: cv2's own thread pool in each would oversubscribe the cores. It must
        # be switched off here, before the workers fork; calling cv2.setNumThreads inside a forked worker whose
        # parent already used cv2's pool deadlocks. This is process-wide (the trainer does little cv2 work).
        cv2.setNumThreads(0)
    return TrainLoader(DataLoader(
        RoidbDataset(roidb, settings, skip_unreadable),
        batch_sampler=SeededBatches(sampler),
        num_workers=num_workers,
        collate_fn=partial(collate_minibatch, stride=settings.stride),
        persistent_workers=num_workers > 0,
        # Its own generator: starting an iterator then draws no number from the global RNG, which a resumed
        # run restores from its checkpoint and must find exactly where the uninterrupted run left it.
        generator=torch.Generator().manual_seed(seed),
    ), sampler)


def build_train_loader_from_cfg(cfg, roidb: Sequence[dict], start_iter: int = 0,
                                skip_unreadable: bool = False, devices_per_process: int | None = None,
                                num_replicas: int = 1, rank: int = 0, seed: int | None = None) -> TrainLoader:
    """``build_train_loader`` with TRAIN.IMS_PER_BATCH, TRAIN.ASPECT_GROUPING, DATA_LOADER.NUM_THREADS and
    RNG_SEED. The batch is per process: a DataParallel over n devices wants IMS_PER_BATCH * n images
    (`devices_per_process`, default NUM_GPUS); a distributed process feeds one device. `seed` overrides
    RNG_SEED (a second, independent stream, e.g. for PreciseBN)."""
    devices = int(cfg.NUM_GPUS) if devices_per_process is None else devices_per_process
    return build_train_loader(
        roidb,
        BlobSettings.from_cfg(cfg, train=True),
        batch_size=int(cfg.TRAIN.IMS_PER_BATCH) * max(1, devices),
        num_workers=int(cfg.DATA_LOADER.NUM_THREADS),
        aspect_grouping=bool(cfg.TRAIN.ASPECT_GROUPING),
        seed=int(cfg.RNG_SEED) if seed is None else seed,
        start_iter=start_iter,
        skip_unreadable=skip_unreadable,
        num_replicas=num_replicas,
        rank=rank,
    )
