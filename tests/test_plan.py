"""The sampling plan: shuffles, rank/worker split, padding and resume (driveengine.data.plan)."""

from __future__ import annotations

import numpy as np
import pytest

from driveengine.data.plan import global_order, log_offsets, pad_order, plan_epoch, split_frame_ids

COUNTS = [7, 3, 11, 0, 5, 14]  # 40 frames over 6 logs, one empty


def _rank_batches(counts, world_size, num_workers, batch, **kw):
    """Per rank: its device batches in the order a DataLoader would deliver them (round-robin)."""
    out = []
    for rank in range(world_size):
        per_worker = [
            plan_epoch(
                counts,
                rank=rank,
                world_size=world_size,
                worker=w,
                num_workers=num_workers,
                global_batch_size=batch,
                **kw,
            )
            for w in range(num_workers)
        ]
        device = batch // world_size
        chunks = [list(p.frames.reshape(-1, device)) for p in per_worker]
        merged = []
        for j in range(max(len(c) for c in chunks)):
            for c in chunks:
                if j < len(c):
                    merged.append(c[j])
        out.append(merged)
    return out


def _global_batches(counts, world_size, num_workers, batch, **kw):
    ranks = _rank_batches(counts, world_size, num_workers, batch, **kw)
    steps = len(ranks[0])
    assert all(len(r) == steps for r in ranks), "ranks must take the same number of steps"
    return [np.concatenate([r[s] for r in ranks]) for s in range(steps)]


def test_global_order_is_a_permutation_that_depends_on_seed_and_epoch():
    n = sum(COUNTS)
    a = global_order(COUNTS, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(n))
    assert np.array_equal(a, global_order(COUNTS, seed=3, epoch=0))
    assert not np.array_equal(a, global_order(COUNTS, seed=3, epoch=1))
    assert not np.array_equal(a, global_order(COUNTS, seed=4, epoch=0))
    assert np.array_equal(global_order(COUNTS, shuffle=False), np.arange(n))


def test_block_shuffle_keeps_blocks_within_a_few_logs():
    counts = [100] * 20
    order = global_order(counts, seed=1, block_size=100)
    assert sorted(order.tolist()) == list(range(2000))
    logs, _ = split_frame_ids(order, log_offsets(counts))
    # Each block of 100 samples of a log-permuted order spans at most 2 logs.
    per_block = [len(np.unique(logs[i : i + 100])) for i in range(0, 2000, 100)]
    assert max(per_block) <= 2
    # ... and is shuffled inside (not the stored frame order).
    assert not np.array_equal(np.sort(order[:100]), order[:100])


def test_split_frame_ids_round_trip():
    offsets = log_offsets(COUNTS)
    ids = np.arange(sum(COUNTS))
    log, row = split_frame_ids(ids, offsets)
    assert np.array_equal(offsets[log] + row, ids)
    assert (row < np.asarray(COUNTS)[log]).all()
    assert 3 not in log  # the empty log owns no frame


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 1), (1, 3), (2, 2), (4, 3)])
def test_every_frame_exactly_once_when_divisible(world_size, num_workers):
    batch = 8  # 40 frames = 5 global batches
    steps = _global_batches(COUNTS, world_size, num_workers, batch, seed=5, epoch=2)
    seen = np.concatenate(steps)
    assert len(seen) == 40
    assert sorted(seen.tolist()) == list(range(40))


def test_global_batches_do_not_depend_on_ranks_and_workers():
    reference = _global_batches(COUNTS, 1, 1, 8, seed=9, epoch=1)
    for world_size, num_workers in [(2, 2), (4, 1), (8, 3), (2, 5)]:
        other = _global_batches(COUNTS, world_size, num_workers, 8, seed=9, epoch=1)
        assert len(other) == len(reference)
        for a, b in zip(reference, other, strict=True):
            assert np.array_equal(a, b)


def test_uneven_split_is_padded_from_the_start_of_the_order():
    counts = [7, 6]  # 13 frames, global batch 4 -> 16 samples, 3 repeated
    order = global_order(counts, seed=2)
    steps = _global_batches(counts, 2, 2, 4, seed=2)
    seen = np.concatenate(steps)
    assert len(seen) == 16
    assert set(seen.tolist()) == set(range(13))
    assert np.array_equal(seen[13:], order[:3])
    assert np.array_equal(pad_order(order, 4), seen)


def test_drop_last_truncates_to_full_global_batches():
    counts = [7, 6]
    steps = _global_batches(counts, 2, 1, 4, seed=2, drop_last=True)
    seen = np.concatenate(steps)
    assert len(seen) == 12
    assert len(set(seen.tolist())) == 12
    assert np.array_equal(seen, global_order(counts, seed=2)[:12])


def test_without_global_batch_ranks_share_single_samples():
    counts = [5, 4]  # 9 frames, 2 ranks -> padded to 10
    plans = [plan_epoch(counts, rank=r, world_size=2, seed=1) for r in range(2)]
    assert all(p.device_batch_size == 1 for p in plans)
    assert len(plans[0].frames) == len(plans[1].frames) == 5
    assert set(np.concatenate([p.frames for p in plans]).tolist()) == set(range(9))


def test_resume_yields_exactly_the_remaining_batches():
    full = _global_batches(COUNTS, 2, 2, 8, seed=4, epoch=3)
    for done in range(len(full) + 1):
        rest = _global_batches(COUNTS, 2, 3, 8, seed=4, epoch=3, start=8 * done)
        assert len(rest) == len(full) - done
        for a, b in zip(full[done:], rest, strict=True):
            assert np.array_equal(a, b)


def test_positions_index_the_padded_order():
    p = plan_epoch(COUNTS, rank=1, world_size=2, worker=1, num_workers=2, global_batch_size=8, seed=0)
    order = pad_order(global_order(COUNTS, seed=0), 8)
    assert np.array_equal(order[p.positions], p.frames)
    assert p.epoch_samples == 40


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 2, "world_size": 2},
        {"worker": 3, "num_workers": 2},
        {"world_size": 3, "global_batch_size": 8},
        {"global_batch_size": 8, "start": 4},
    ],
)
def test_inconsistent_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        plan_epoch(COUNTS, **kwargs)
