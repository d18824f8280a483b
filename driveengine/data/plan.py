"""The sampling plan of the streaming loader: which frame each rank and worker reads, in which order.

Pure numpy, no I/O, no torch: every function here is a deterministic function of its arguments, so
that every rank and worker derives the same plan without talking to the others.

The plan is built the way MosaicML Streaming builds it: first one **global order** of the epoch is
defined, then it is dealt out. That makes the sequence of global batches independent of the number
of ranks and DataLoader workers.

1. *Global order.* Frames are numbered globally (``log_offsets[i] + row``, logs in manifest order).
   With ``shuffle`` the logs are permuted, their frames concatenated, and the result is shuffled
   inside consecutive blocks of ``block_size`` samples (so a block mixes frames of a few logs while
   each worker's reads stay within a bounded set of open logs); ``block_size=None`` shuffles the whole
   epoch. The permutations are drawn from ``numpy.random.default_rng([seed, epoch])``.
2. *Uneven splits.* The order is padded to a multiple of the global batch size (``world_size`` when no
   global batch size is given) by repeating samples from the start of the shuffled order, so that every
   rank receives the same number of samples and full batches (DDP needs equal step counts, or it
   hangs). With ``drop_last=True`` the tail is dropped instead. Without padding or dropping (a
   multiple already), every frame is seen exactly once per epoch.
3. *Dealing out.* Global batch ``k`` is ``order[k*B:(k+1)*B]``; rank ``r`` takes the ``r``-th slice of
   ``B / world_size`` samples of every global batch (its device batch). A rank's device batches are
   dealt to DataLoader workers round-robin (batch ``j`` to worker ``j % num_workers``), which is the
   order in which ``torch.utils.data.DataLoader`` collects batches from its workers, so the batches a
   rank receives are the same whatever the number of workers.
4. *Resume.* ``start`` (a multiple of ``B``) skips the first ``start`` samples of the padded global
   order: the remaining batches are exactly those an uninterrupted run would have produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class EpochPlan:
    """The samples one worker of one rank reads in one epoch, in the order it must yield them.

    Attributes:
        positions: (n,) int64, index of each sample in the padded global order of the epoch.
        frames: (n,) int64, global frame id of each sample (``log_offsets[log] + row``).
        device_batch_size: samples per device batch of this rank (1 without a global batch size).
        epoch_samples: length of the padded (or truncated) global order.
    """

    positions: IntArray
    frames: IntArray
    device_batch_size: int
    epoch_samples: int


def log_offsets(frame_counts: ArrayLike) -> IntArray:
    """(L + 1,) int64 start of every log's frames in the global numbering; the last entry is the total."""
    counts = np.asarray(frame_counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"frame_counts must be a 1-D array of non-negative counts, got {counts!r}")
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def split_frame_ids(frame_ids: ArrayLike, offsets: ArrayLike) -> tuple[IntArray, IntArray]:
    """``(log_index, row)`` of global frame ids, given :func:`log_offsets`."""
    ids = np.asarray(frame_ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    log = np.searchsorted(offsets, ids, side="right") - 1
    return log.astype(np.int64), ids - offsets[log]


def global_order(
    frame_counts: ArrayLike,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    block_size: int | None = None,
) -> IntArray:
    """The epoch's order of all global frame ids (a permutation of ``0..N-1``).

    Args:
        frame_counts: (L,) frames per log, logs in manifest order.
        seed: shuffle seed, shared by all ranks.
        epoch: epoch number; each epoch has its own order.
        shuffle: without it, logs and frames keep their stored order.
        block_size: shuffle inside blocks of this many consecutive samples of the log-permuted order;
            ``None`` shuffles the whole epoch.
    """
    offsets = log_offsets(frame_counts)
    total = int(offsets[-1])
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    counts = np.diff(offsets)
    log_perm = rng.permutation(len(counts))
    # Frames of the permuted logs, concatenated, without a Python loop over frames.
    perm_counts = counts[log_perm]
    starts = np.repeat(offsets[:-1][log_perm], perm_counts)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(perm_counts) - perm_counts, perm_counts)
    concatenated = starts + within
    if block_size is None or block_size >= total:
        return concatenated[rng.permutation(total)]
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
    block = np.arange(total, dtype=np.int64) // block_size
    keys = rng.random(total)
    return concatenated[np.lexsort((keys, block))]


def pad_order(order: ArrayLike, multiple: int, drop_last: bool = False) -> IntArray:
    """``order`` padded to a multiple of ``multiple`` by repeating from its start, or truncated (``drop_last``)."""
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if drop_last:
        return order[: n - n % multiple]
    missing = (-n) % multiple
    if missing and n == 0:
        raise ValueError("cannot pad an empty order: the split has no frames")
    return np.concatenate([order, np.resize(order, missing)]) if missing else order


def plan_epoch(
    frame_counts: ArrayLike,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    block_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    global_batch_size: int | None = None,
    start: int = 0,
    drop_last: bool = False,
) -> EpochPlan:
    """The samples of one worker of one rank for one epoch (see the module docstring).

    Args:
        frame_counts: (L,) frames per log, logs in manifest order.
        seed, epoch, shuffle, block_size: see :func:`global_order`.
        rank, world_size: this process's DDP rank and the number of ranks.
        worker, num_workers: this DataLoader worker and the number of workers (0 workers = 1 here).
        global_batch_size: samples per optimiser step over all ranks; must be a multiple of
            ``world_size``. ``None`` deals single samples (device batch 1).
        start: samples of the global order already consumed (resume); a multiple of the global batch.
        drop_last: drop the tail that does not fill a global batch instead of padding it.

    Raises:
        ValueError: inconsistent rank/worker/batch arguments.
    """
    batch = _global_batch(global_batch_size, world_size)
    order = pad_order(
        global_order(frame_counts, seed=seed, epoch=epoch, shuffle=shuffle, block_size=block_size),
        batch,
        drop_last,
    )
    positions, device_batch = deal_positions(
        len(order), rank=rank, world_size=world_size, worker=worker, num_workers=num_workers,
        global_batch_size=global_batch_size, start=start,
    )  # fmt: skip
    return EpochPlan(
        positions=positions, frames=order[positions], device_batch_size=device_batch, epoch_samples=len(order)
    )


# -- several sources mixed at given proportions (driveengine.data.mix.MixedStream) ---------------------
#
# A mix is planned like one split: one global order per (seed, epoch), then dealt out with the same
# arithmetic (global batch k, rank slice r, device batch j to worker j % W). What differs is how the
# global order is made (see :func:`mixed_global_order`): it is a sequence of *units*, each a run of
# ``unit`` consecutive samples of one source (a whole global batch when batches must be homogeneous,
# else one sample); the units of each source are drawn by weight, and a source's samples come from its
# own endless sequence of shuffled passes over its frames.

#: Stream names of the random draws of a mix (the second/third seed word), distinct from the plain plan's.
_INTERLEAVE_STREAM = 0x6D697820  # "mix "
_SOURCE_STREAM = 0x73726365  # "srce"

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class MixedEpochPlan:
    """The samples one worker of one rank reads in one epoch of a mix, in the order it must yield them.

    Attributes:
        positions: (n,) int64, index of each sample in the epoch's global order.
        sources: (n,) int64, the source (index into the mix's sources) of each sample.
        frames: (n,) int64, the frame of each sample within its source (its map-style index).
        device_batch_size: samples per device batch of this rank (1 without a global batch size).
        epoch_samples: length of the epoch's global order (a multiple of the global batch).
    """

    positions: IntArray
    sources: IntArray
    frames: IntArray
    device_batch_size: int
    epoch_samples: int


def mix_probabilities(weights: ArrayLike) -> FloatArray:
    """The weights normalised to sum 1: source ``s``'s share of the samples (:func:`mix_units`).

    Raises:
        ValueError: no weights, or one that is not a finite positive number.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"weights must be finite positive numbers, one per source, got {w.tolist()}")
    return w / w.sum()


def mix_units(weights: ArrayLike, units: int) -> IntArray:
    """(S,) units of each source among the first ``units`` units of a weighted mix.

    The highest-averages (Sainte-Laguë / Webster) apportionment of ``units`` by the weights: unit
    ``h + 1`` goes to the source with the largest ``p_s / (n_s + 1/2)`` (``p`` =
    :func:`mix_probabilities`, ``n_s`` its units so far; ties to the lower source index). Computed
    directly (a lower bound, then at most about ``S`` units placed one by one), not by replaying every unit,
    so its cost does not grow with ``units``. Properties the mix relies on: every count stays within about
    one unit of its share ``p_s * units`` (within 1/2 for two sources), and no count ever decreases when
    ``units`` grows, so the units of one epoch, ``mix_units(w, (e + 1) U) - mix_units(w, e U)``, are never
    negative and add up to ``U``.

    Raises:
        ValueError: bad weights or a negative ``units``.
    """
    p = mix_probabilities(weights)
    if units < 0:
        raise ValueError(f"units must be >= 0, got {units}")
    # Each source holds at least floor(p_s * (units - S/2)) - 1 units (the divisor is within S/2 of units).
    seats = np.maximum(np.floor(p * (units - len(p) / 2 - 2)), 0).astype(np.int64)
    for _ in range(int(units) - int(seats.sum())):
        seats[int(np.argmax(p / (seats + 0.5)))] += 1
    return seats


def source_order(
    frame_counts: ArrayLike,
    start: int,
    stop: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    block_size: int | None = None,
) -> IntArray:
    """Samples ``start .. stop - 1`` of a source's endless sequence of passes over its frames.

    Pass ``k`` is :func:`global_order` ``(frame_counts, seed=seed, epoch=k)``: every frame once, in a new
    shuffle per pass. A source read at ``n`` samples per epoch thus continues where the previous epoch
    stopped: a large source is subsampled without repeating a frame before all were seen, a small one
    repeats whole passes.

    Raises:
        ValueError: the source has no frames.
    """
    counts = np.asarray(frame_counts, dtype=np.int64)
    total = int(counts.sum())
    if stop <= start:
        return np.zeros(0, dtype=np.int64)
    if total == 0:
        raise ValueError("a source of a mix has no frames")
    first, last = start // total, (stop - 1) // total
    passes = [
        global_order(counts, seed=seed, epoch=k, shuffle=shuffle, block_size=block_size)
        for k in range(first, last + 1)
    ]
    sequence = np.concatenate(passes) if len(passes) > 1 else passes[0]
    return sequence[start - first * total : stop - first * total]


def source_seed(seed: int, source: int) -> int:
    """The shuffle seed of source ``source``'s passes in a mix seeded by ``seed`` (independent per source)."""
    return int(np.random.SeedSequence([int(seed), _SOURCE_STREAM, int(source)]).generate_state(1)[0])


def mixed_global_order(
    source_counts: list[ArrayLike],
    weights: ArrayLike | None,
    batch: int,
    *,
    homogeneous: bool,
    epoch_samples: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    block_size: int | None = None,
    drop_last: bool = False,
) -> tuple[IntArray, IntArray]:
    """The epoch's global order of a mix: ``(sources, frames)``, (n,) each, ``n`` a multiple of ``batch``.

    Args:
        source_counts: per source, its frames per log (map-style order: ``frames`` index into it).
        weights: (S,) positive weights: source ``s``'s share of the samples is ``w_s / sum(w)``: of the
            first ``e`` epochs' units it holds :func:`mix_units` ``(w, e * U)``, the epoch's units being the
            difference; its samples continue its endless sequence of passes (:func:`source_order`; sources
            smaller than their share repeat, larger ones are subsampled).
            ``None``: every frame of every source once per epoch (each source's pass; the epoch padded or
            cut like a plain split's, per source when ``homogeneous``).
        batch: the global batch size (the epoch is made of whole global batches).
        homogeneous: every global batch holds samples of one source (units of ``batch`` samples);
            otherwise sources are drawn sample by sample.
        epoch_samples: weighted mixes: samples per epoch (default: the sum of the sources' frames),
            rounded up to whole global batches (down with ``drop_last``).
        seed, epoch, shuffle, block_size: the draws, and each source's passes (:func:`global_order`;
            without ``shuffle`` frames keep their stored order and the sources' units are spread evenly,
            in proportion, in source order on ties).
        drop_last: round down instead of up (see above).

    Raises:
        ValueError: a source without frames, bad weights, or an epoch shorter than one global batch.
    """
    counts = [np.asarray(c, dtype=np.int64) for c in source_counts]
    totals = np.array([int(c.sum()) for c in counts], dtype=np.int64)
    if len(counts) == 0 or (totals == 0).any():
        raise ValueError(f"every source of a mix needs frames, got {totals.tolist()}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    unit = batch if homogeneous else 1
    seeds = [source_seed(seed, s) for s in range(len(counts))]

    def own_order(s: int, start: int, stop: int) -> IntArray:
        return source_order(counts[s], start, stop, seed=seeds[s], shuffle=shuffle, block_size=block_size)

    if weights is None:
        per_source = [
            global_order(counts[s], seed=seeds[s], epoch=epoch, shuffle=shuffle, block_size=block_size)
            for s in range(len(counts))
        ]
        if homogeneous:
            per_source = [pad_order(o, batch, drop_last) for o in per_source]
        quotas = np.array([len(o) // unit for o in per_source], dtype=np.int64)
    else:
        wanted = int(totals.sum()) if epoch_samples is None else int(epoch_samples)
        if wanted < 1:
            raise ValueError(f"samples per epoch must be >= 1, got {wanted}")
        units = (wanted // batch if drop_last else -(-wanted // batch)) * (batch // unit)
        if units == 0:
            raise ValueError(
                f"{wanted} samples per epoch do not fill one global batch of {batch} (drop_last)"
            )
        before = mix_units(weights, epoch * units)  # units each source gave in the epochs before
        quotas = mix_units(weights, (epoch + 1) * units) - before
        done = before * unit
        per_source = [own_order(s, int(done[s]), int(done[s] + quotas[s] * unit)) for s in range(len(counts))]

    labels = np.repeat(np.arange(len(counts), dtype=np.int64), quotas)  # sorted by source
    rank_in_source = np.arange(len(labels), dtype=np.int64) - np.repeat(np.cumsum(quotas) - quotas, quotas)
    if shuffle:
        rng = np.random.default_rng([int(seed), int(epoch), _INTERLEAVE_STREAM])
        labels = labels[rng.permutation(len(labels))]
    else:  # the k-th unit of source s at (k + 1/2) / m_s of the epoch
        labels = labels[np.argsort((rank_in_source + 0.5) / np.repeat(quotas, quotas), kind="stable")]
    # The k-th unit of a source in epoch order takes the source's samples k * unit .. (k + 1) * unit - 1.
    occurrence = np.empty(len(labels), dtype=np.int64)
    occurrence[np.argsort(labels, kind="stable")] = rank_in_source
    starts = np.concatenate([[0], np.cumsum(quotas * unit)[:-1]]).astype(np.int64)
    flat = np.concatenate(per_source)
    index = (
        (starts[labels] + occurrence * unit)[:, None] + np.arange(unit, dtype=np.int64)[None, :]
    ).reshape(-1)
    sources, frames = np.repeat(labels, unit), flat[index]
    if weights is None and not homogeneous:
        keep = pad_order(np.arange(len(frames), dtype=np.int64), batch, drop_last)
        sources, frames = sources[keep], frames[keep]
    return sources, frames


def _global_batch(global_batch_size: int | None, world_size: int) -> int:
    """The global batch (``world_size`` single samples when None), validated against the world size."""
    batch = world_size if global_batch_size is None else int(global_batch_size)
    if batch < 1 or batch % world_size:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the world size {world_size}"
        )
    return batch


def deal_positions(
    epoch_samples: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    global_batch_size: int | None = None,
    start: int = 0,
) -> tuple[IntArray, int]:
    """The positions of an epoch's global order of ``epoch_samples`` (a multiple of the global batch) that
    one worker of one rank reads, in order, and the device batch size (the dealing of :func:`plan_epoch`).

    Raises:
        ValueError: inconsistent rank/worker/batch arguments.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    num_workers = max(int(num_workers), 1)
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is not in [0, num_workers={num_workers})")
    batch = _global_batch(global_batch_size, world_size)
    if start < 0 or start % batch:
        raise ValueError(f"resume point {start} must be a non-negative multiple of the global batch {batch}")
    if epoch_samples % batch:
        raise ValueError(f"an epoch of {epoch_samples} samples is not made of global batches of {batch}")
    device_batch = batch // world_size
    first_batch = min(start, epoch_samples) // batch
    batch_ids = first_batch + np.arange(epoch_samples // batch - first_batch, dtype=np.int64)
    batch_ids = batch_ids[worker::num_workers]  # device batch j of a rank goes to worker j % num_workers
    positions = (
        batch_ids[:, None] * batch + rank * device_batch + np.arange(device_batch, dtype=np.int64)[None, :]
    ).reshape(-1)
    return positions, device_batch


def plan_mixed_epoch(
    source_counts: list[ArrayLike],
    weights: ArrayLike | None,
    *,
    homogeneous: bool,
    epoch_samples: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    block_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    global_batch_size: int | None = None,
    start: int = 0,
    drop_last: bool = False,
) -> MixedEpochPlan:
    """The samples of one worker of one rank for one epoch of a mix: :func:`mixed_global_order` dealt out
    like :func:`plan_epoch` (so the global batches are the same for any ranks x workers).

    Raises:
        ValueError: inconsistent arguments (see :func:`mixed_global_order` and :func:`deal_positions`).
    """
    batch = world_size if global_batch_size is None else int(global_batch_size)
    if batch < 1 or batch % max(world_size, 1):
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the world size {world_size}"
        )
    sources, frames = mixed_global_order(
        source_counts, weights, batch, homogeneous=homogeneous, epoch_samples=epoch_samples, seed=seed,
        epoch=epoch, shuffle=shuffle, block_size=block_size, drop_last=drop_last,
    )  # fmt: skip
    positions, device_batch = deal_positions(
        len(frames), rank=rank, world_size=world_size, worker=worker, num_workers=num_workers,
        global_batch_size=global_batch_size, start=start,
    )  # fmt: skip
    return MixedEpochPlan(
        positions=positions,
        sources=sources[positions],
        frames=frames[positions],
        device_batch_size=device_batch,
        epoch_samples=len(frames),
    )
