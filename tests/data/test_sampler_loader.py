"""Aspect-grouped infinite sampler, resume, and the DataLoader on a tiny shapes dataset."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from pydetectron.data.catalog import DatasetSpec
from pydetectron.data.coco import CocoDataset
from pydetectron.data.loader import build_train_loader
from pydetectron.data.minibatch import BlobSettings
from pydetectron.data.roidb import extend_with_flipped_entries, filter_for_training
from pydetectron.data.samplers import InfiniteGroupedBatchSampler, aspect_groups


def _take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_groups_never_mixed_and_each_image_once_per_pass():
    rng = np.random.default_rng(0)
    roidb = [{"width": int(w), "height": int(h)} for w, h in rng.integers(100, 300, size=(60, 2))]
    groups = aspect_groups(roidb)
    assert set(groups.tolist()) == {0, 1}
    for bs in (1, 2, 3, 4):
        batches = _take(InfiniteGroupedBatchSampler(groups, len(roidb), bs, seed=5), 200)
        for b in batches:
            assert len(b) == bs and len({int(groups[i]) for i in b}) == 1
        # the first pass (whole batches of each group) uses no image twice
        first_pass = sum(int((groups == g).sum()) // bs for g in (0, 1))
        first = [i for b in batches[:first_pass] for i in b]
        assert len(first) == len(set(first)) == first_pass * bs


def test_no_grouping_and_seed_changes_order():
    a = _take(InfiniteGroupedBatchSampler(None, 10, 2, seed=0), 5)
    b = _take(InfiniteGroupedBatchSampler(None, 10, 2, seed=1), 5)
    assert sorted(i for x in a for i in x) == list(range(10)) and a != b


@pytest.mark.parametrize("start", [0, 1, 7, 23, 61])
def test_resume_matches_uninterrupted(start):
    groups = np.array([0] * 13 + [1] * 8)
    full = _take(InfiniteGroupedBatchSampler(groups, 21, 2, seed=3), 80)
    sampler = InfiniteGroupedBatchSampler(groups, 21, 2, seed=99)
    sampler.load_state_dict({"seed": 3, "start_iter": start})
    assert _take(sampler, 80 - start) == full[start:]
    assert sampler.state_dict() == {"seed": 3, "start_iter": start, "batch_size": 2, "num_replicas": 1}


def test_ranks_split_each_global_batch_and_cover_every_image_once_per_epoch():
    groups = np.array([0] * 13 + [1] * 9)
    one_process = _take(InfiniteGroupedBatchSampler(groups, 22, 4, seed=3), 30)
    ranks = [_take(InfiniteGroupedBatchSampler(groups, 22, 2, seed=3, num_replicas=2, rank=r), 30) for r in (0, 1)]
    # together the ranks see what one process with the global batch sees, rank 0 the first half of each
    assert [a + b for a, b in zip(*ranks)] == one_process
    assert all(not set(a) & set(b) for a, b in zip(ranks[0][:5], ranks[1][:5]))
    # the first epoch (3 global batches of group 0, 2 of group 1) uses no image twice over both ranks
    first_epoch = [i for rank in ranks for batch in rank[:5] for i in batch]
    assert len(first_epoch) == len(set(first_epoch)) == 20
    for rank in ranks:
        assert all(len({int(groups[i]) for i in batch}) == 1 for batch in rank)


@pytest.mark.parametrize("start", [0, 3, 17])
def test_a_rank_resumes_at_any_step(start):
    groups = np.array([0] * 13 + [1] * 9)
    full = _take(InfiniteGroupedBatchSampler(groups, 22, 1, seed=8, num_replicas=3, rank=2), 40)
    state = InfiniteGroupedBatchSampler(groups, 22, 1, seed=8, start_iter=start, num_replicas=3, rank=2).state_dict()
    resumed = InfiniteGroupedBatchSampler(groups, 22, 1, seed=0, num_replicas=3, rank=2)
    resumed.load_state_dict(state)
    assert _take(resumed, 40 - start) == full[start:]
    other_world = InfiniteGroupedBatchSampler(groups, 22, 1, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="num_replicas 3"):
        other_world.load_state_dict(state)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="empty dataset"):
        InfiniteGroupedBatchSampler(None, 0, 2)
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteGroupedBatchSampler(None, 4, 0)
    with pytest.raises(ValueError, match="rank 2 is not in 0 .. 1"):
        InfiniteGroupedBatchSampler(None, 4, 1, num_replicas=2, rank=2)


def _shapes_roidb(root):
    ds = CocoDataset(DatasetSpec("tiny", str(root / "train"), str(root / "annotations" / "instances_train.json")))
    return filter_for_training(extend_with_flipped_entries(ds.get_roidb(), ds.meta))


def test_loader_batches_and_resume(tiny_shapes):
    roidb = _shapes_roidb(tiny_shapes)
    settings = BlobSettings(scales=(96, 128), max_size=200, pixel_means=(102.9801, 115.9465, 122.7717),
                            stride=32)
    full = _take(build_train_loader(roidb, settings, batch_size=2, num_workers=0, seed=4), 6)
    for batch in full:
        data, info = batch["data"], batch["im_info"]
        assert data.shape[0] == 2 and data.shape[2] % 32 == 0 and data.shape[3] % 32 == 0
        assert len({e["width"] >= e["height"] for e in batch["roidb"]}) == 1
        for row, e in zip(info, batch["roidb"]):
            assert min(row[0], row[1]) in (96, 128) or max(row[0], row[1]) == 200
            assert e["boxes"][:, 2].max() <= row[1] and e["boxes"][:, 3].max() <= row[0]
            assert e["boxes"].dtype == torch.float32 and e["gt_classes"].dtype == torch.int64
    resumed = _take(build_train_loader(roidb, settings, batch_size=2, num_workers=0, seed=4, start_iter=3), 3)
    for a, b in zip(full[3:], resumed):
        torch.testing.assert_close(a["data"], b["data"])
        torch.testing.assert_close(a["im_info"], b["im_info"])
        assert [e["id"] for e in a["roidb"]] == [e["id"] for e in b["roidb"]]


def test_each_rank_loads_its_half_of_the_global_batch_with_the_same_augmentation(tiny_shapes):
    """Rank r's images, scales and flips are those of the r-th half of one process's global batch."""
    roidb = _shapes_roidb(tiny_shapes)
    settings = BlobSettings(scales=(64, 96, 128), max_size=200, pixel_means=(0, 0, 0), stride=32)
    whole = _take(build_train_loader(roidb, settings, batch_size=2, num_workers=0, seed=6), 4)
    ranks = [_take(build_train_loader(roidb, settings, batch_size=1, num_workers=0, seed=6, num_replicas=2,
                                      rank=r), 4) for r in (0, 1)]
    for step, batch in enumerate(whole):
        for r in (0, 1):
            part = ranks[r][step]
            assert part["roidb"][0]["id"] == batch["roidb"][r]["id"]
            assert part["roidb"][0]["flipped"] == batch["roidb"][r]["flipped"]
            torch.testing.assert_close(part["im_info"][0], batch["im_info"][r])


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [e["id"] for e in x["roidb"]] == [e["id"] for e in y["roidb"]]
        assert [e["flipped"] for e in x["roidb"]] == [e["flipped"] for e in y["roidb"]]
        torch.testing.assert_close(x["data"], y["data"], rtol=0, atol=0)
        torch.testing.assert_close(x["im_info"], y["im_info"], rtol=0, atol=0)
        for ex, ey in zip(x["roidb"], y["roidb"]):
            torch.testing.assert_close(ex["boxes"], ey["boxes"], rtol=0, atol=0)


def test_loader_with_workers_matches_main_process_and_resumes_exactly(tiny_shapes):
    """Every shipped config loads with workers: they must give the main process's batches (images, random
    scales, flips, boxes), and a run resumed at step 3 with workers must continue the same sequence."""
    roidb = _shapes_roidb(tiny_shapes)
    settings = BlobSettings(scales=(48, 64), max_size=96, pixel_means=(0, 0, 0), stride=32)
    main = _take(build_train_loader(roidb, settings, 2, num_workers=0, seed=1), 6)
    assert len({tuple(b["im_info"][:, 2].tolist()) for b in main}) > 1  # the random scales vary
    _assert_same_batches(main, _take(build_train_loader(roidb, settings, 2, num_workers=2, seed=1), 6))
    _assert_same_batches(main[3:], _take(build_train_loader(roidb, settings, 2, num_workers=2, seed=1,
                                                            start_iter=3), 3))


def test_loader_skips_unreadable_when_asked(tiny_shapes, tmp_path, caplog):
    roidb = [dict(e) for e in _shapes_roidb(tiny_shapes)[:4]]
    roidb[0]["image"] = str(tmp_path / "gone.jpg")
    settings = BlobSettings(scales=(64,), max_size=200, pixel_means=(0, 0, 0))
    loader = build_train_loader(roidb, settings, 1, num_workers=0, aspect_grouping=False, seed=0)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        _take(loader, 4)
    loader = build_train_loader(roidb, settings, 2, num_workers=0, aspect_grouping=False, seed=0,
                                skip_unreadable=True)
    with caplog.at_level(logging.WARNING):
        sizes = [b["data"].shape[0] for b in _take(loader, 2)]
    assert sum(sizes) == 3  # the first pass over the 4 entries, less the missing one
    assert "gone.jpg" in caplog.text
