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
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    num_workers = max(int(num_workers), 1)
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is not in [0, num_workers={num_workers})")
    batch = world_size if global_batch_size is None else int(global_batch_size)
    if batch < 1 or batch % world_size:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the world size {world_size}"
        )
    if start < 0 or start % batch:
        raise ValueError(f"resume point {start} must be a non-negative multiple of the global batch {batch}")
    device_batch = batch // world_size
    order = pad_order(
        global_order(frame_counts, seed=seed, epoch=epoch, shuffle=shuffle, block_size=block_size),
        batch,
        drop_last,
    )
    n = len(order)
    # Positions of this rank's samples: for each global batch k >= start/B, its slice r.
    first_batch = min(start, n) // batch
    num_batches = n // batch - first_batch
    batch_ids = first_batch + np.arange(num_batches, dtype=np.int64)
    # Device batch j of this rank goes to worker j % num_workers.
    batch_ids = batch_ids[worker::num_workers]
    positions = (
        batch_ids[:, None] * batch + rank * device_batch + np.arange(device_batch, dtype=np.int64)[None, :]
    ).reshape(-1)
    return EpochPlan(
        positions=positions, frames=order[positions], device_batch_size=device_batch, epoch_samples=n
    )
