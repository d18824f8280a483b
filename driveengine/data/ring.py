"""Zero-copy batches out of DataLoader workers: a ring of preallocated shared-memory batch slots.

Without it a worker allocates new shared memory for every tensor of every batch (``share_memory_``:
a new file, page faults on every page, in the worker and again in the main process, a file descriptor
sent per tensor) and the main process maps it again: for 30 MB batches of dense labels that cost several
times the decoding itself. With a :class:`BatchRing` (what :meth:`FrameStream.loader
<driveengine.data.stream.FrameStream.loader>` sets up for ``num_workers > 0``):

* the main process allocates ``slots`` shared-memory slots of ``slot_bytes`` once, before the workers
  start (they inherit them, or receive them once when spawned), and keeps them across epochs and loaders
  of the same stream: no allocation per batch, and every page is faulted in once per process;
* a worker **claims** a free slot for each batch window, decodes the window's fixed-size arrays straight
  into it (label arrays, ``images``), copies the batch's small tensors and ragged lists (``points``)
  behind them while they fit, and sends only a small descriptor (:class:`SlotBatch`: slot, ticket,
  offsets, dtypes, shapes and the batch's Python values) through the DataLoader's queue;
* the main process turns the descriptor back into tensors that are **views of the slot** (no copy) and
  takes a **lease** on the slot: the slot becomes free again when the last tensor of the batch (or any
  view of one) is garbage-collected, never before. With ``pin_memory=True`` (CUDA) the DataLoader's pin
  thread copies the batch into page-locked memory from torch's caching host allocator (a reused set of
  pinned buffers, safe for ``non_blocking`` copies) and drops the views, which frees the slot at once.

**Contract.** A batch stays valid for as long as you hold it: nothing is overwritten while any of its
tensors is alive. The ring has ``prefetch_factor * num_workers + 1 + held_batches`` slots, enough for the
batches in flight, the one being fetched and ``held_batches`` more held by the consumer (default 2: the
loop's ``batch`` and one more). A consumer that holds more (e.g. ``list(loader)``) stays correct: when no
slot is free within ``claim_wait_s`` the worker falls back to the ordinary per-batch shared memory
(slower; counted in :meth:`BatchRing.stats` ``fallbacks`` and logged once per worker). ``.clone()`` what
you keep for long to keep the fast path.

Misuse that cannot be made safe is detected: a descriptor whose slot was reclaimed or reused meanwhile
(its ticket does not match) raises :class:`RingError` instead of returning another batch's bytes.

A slot's state lives in shared memory: ``role`` (free, claimed by a worker, held by the main process),
the ``ticket`` of its claim (unique, increasing) and the ``generation`` of the iterator whose worker
claimed it. Workers claim under one inter-process lock (bounded wait); the main process alone moves a
slot from claimed to held (when its descriptor arrives) and from held to free (when the lease ends).
Slots claimed by workers of an iterator that is gone (a ``break`` out of the loop, a worker killed) are
reclaimed when the next iterator starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import multiprocessing.reduction
import os
import secrets
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from driveengine.data.reader import StreamError

logger = logging.getLogger(__name__)

#: Byte alignment of every array in a slot (a cache line; any dtype's alignment).
SLOT_ALIGN = 64
#: Slot roles (shared state).
FREE, CLAIMED, HELD = 0, 1, 2
#: How long a worker waits for a free slot before it falls back to per-batch shared memory, s.
CLAIM_WAIT_S = 0.02
#: Longest wait for the ring's inter-process lock, s (a worker killed while holding it: fall back).
LOCK_WAIT_S = 1.0

# Shared counters (after the per-slot arrays).
_TICKET, _CLAIMS, _FALLBACKS, _COPIED, _WANTED, _NCOUNTERS = 0, 1, 2, 3, 4, 5


class RingError(StreamError):
    """A batch descriptor that does not match its slot (a reclaimed or reused slot), or a ring misused."""


def _align(n: int) -> int:
    return -(-int(n) // SLOT_ALIGN) * SLOT_ALIGN


def _meta_bytes(slots: int) -> int:
    """Bytes of a ring's shared state (per slot: role, ticket, generation; the counters), whole pages."""
    return -(-8 * (3 * slots + _NCOUNTERS) // 4096) * 4096


class SharedRegion:
    """``nbytes`` of memory shared with the processes this one forks or spawns, mapped once per process,
    with an inter-process lock.

    An anonymous ``memfd`` on Linux (``os.memfd_create``; elsewhere an unlinked temporary file): made in
    microseconds whatever its size (pages are allocated when first written), not bounded by the size of
    ``/dev/shm`` (64 MB in a default Docker container), gone with the last process that maps it. A
    spawned process receives the file descriptor once, while it starts (``DupFd``). The lock is a POSIX
    record lock on the region's first byte: the kernel drops it when its holder dies, and every wait for
    it is bounded.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("driveengine-batch-ring", os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                self.fd = os.dup(f.fileno())
        os.ftruncate(self.fd, self.nbytes)
        weakref.finalize(self, os.close, self.fd)
        self._map()

    def _map(self) -> None:
        self._mmap = mmap.mmap(self.fd, self.nbytes)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.array = self.tensor.numpy()

    @contextlib.contextmanager
    def locked(self, timeout_s: float) -> Iterator[bool]:
        """Hold the region's inter-process lock; yields False (not holding it) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
                break
            except OSError:  # held by another process (EAGAIN / EACCES)
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.0002)
        try:
            yield True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def __reduce__(self) -> tuple[Callable[..., SharedRegion], tuple[Any, ...]]:
        if not is_spawning():
            raise RingError(
                "shared batch memory is handed to DataLoader workers when they start, not pickled"
            )
        return _region_from, (self.nbytes, multiprocessing.reduction.DupFd(self.fd))


def _region_from(nbytes: int, handle: Any) -> SharedRegion:
    """A spawned process's mapping of a :class:`SharedRegion`."""
    region = SharedRegion.__new__(SharedRegion)
    region.nbytes = nbytes
    region.fd = handle.detach()
    weakref.finalize(region, os.close, region.fd)
    region._map()
    return region


@dataclass(frozen=True)
class RingStats:
    """What a ring has done (all processes together).

    Attributes:
        slots, slot_bytes: its size.
        claims: batch windows that got a slot.
        fallbacks: batch windows that found no free slot in time (per-batch shared memory instead).
        copied_bytes: bytes copied into slots besides the arrays decoded in place (small tensors, lists).
        wanted_bytes: the most bytes a batch needed (more than ``slot_bytes``: some of its tensors
            travelled the ordinary way, and the stream's next ring is made that much larger).
        free, claimed, held: slots in each role now.
    """

    slots: int
    slot_bytes: int
    claims: int
    fallbacks: int
    copied_bytes: int
    wanted_bytes: int
    free: int
    claimed: int
    held: int


@dataclass
class SlotClaim:
    """A worker's claim of a slot for one batch window (worker-local).

    Attributes:
        slot: the slot.
        ticket: the claim's ticket (checked when the main process takes the lease).
        used: bytes of the slot carved out so far.
    """

    slot: int
    ticket: int
    used: int = 0


#: One entry of a :class:`SlotBatch`: (key, kind, payload). Kinds: ``"t"`` a tensor in the slot, payload
#: ``(offset, dtype name, shape)``; ``"l"`` a list whose items are such triples or values; ``"v"`` a value.
Entry = tuple[str, str, Any]


class SlotBatch:
    """The descriptor of a batch in a slot, what a worker sends instead of the tensors (see the module doc).

    Unpickled in the main process it *becomes* the batch dict (its ``__reduce__`` rebuilds it there), so
    the DataLoader and its pin thread see an ordinary dict of tensors.
    """

    __slots__ = ("entries", "ring_id", "slot", "ticket")

    def __init__(self, ring_id: str, slot: int, ticket: int, entries: list[Entry]) -> None:
        self.ring_id = ring_id
        self.slot = slot
        self.ticket = ticket
        self.entries = entries

    def __reduce__(self) -> tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]:
        return _rebuild_batch, (self.ring_id, self.slot, self.ticket, self.entries)


_RINGS: weakref.WeakValueDictionary[str, BatchRing] = weakref.WeakValueDictionary()
_RINGS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked process (a DataLoader worker): fresh process-local locks (another thread, e.g. the pin
    thread, may have held one at the fork)."""
    global _RINGS_LOCK
    _RINGS_LOCK = threading.Lock()
    for ring in list(_RINGS.values()):
        ring._local_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _attach_ring(state: dict[str, Any]) -> BatchRing:
    """The process's ring object of ``state["id"]`` (one per process however often it is unpickled)."""
    with _RINGS_LOCK:
        ring = _RINGS.get(state["id"])
        if ring is None:
            ring = BatchRing.__new__(BatchRing)
            ring._init_from(state)
            _RINGS[ring.id] = ring
        return ring


def _rebuild_batch(ring_id: str, slot: int, ticket: int, entries: list[Entry]) -> dict[str, Any]:
    """The batch of a :class:`SlotBatch`, as tensors viewing the slot (main process)."""
    ring = _RINGS.get(ring_id)
    if ring is None:
        raise RingError(
            f"a batch of shared-memory ring {ring_id} arrived in a process that does not hold that ring; "
            "iterate the loader in the process that made it"
        )
    lease = ring.lease(slot, ticket)
    batch: dict[str, Any] = {}
    for key, kind, payload in entries:
        if kind == "t":
            batch[key] = ring.tensor_of(lease, payload)
        elif kind == "l":
            batch[key] = [ring.tensor_of(lease, p[1]) if p[0] == "t" else p[1] for p in payload]
        else:
            batch[key] = payload
    return batch


class BatchRing:
    """Preallocated shared-memory batch slots (see the module doc).

    Args:
        slots: number of slots.
        slot_bytes: bytes per slot (rounded up to :data:`SLOT_ALIGN`).
        claim_wait_s: how long a worker waits for a free slot before falling back.
    """

    def __init__(self, slots: int, slot_bytes: int, claim_wait_s: float = CLAIM_WAIT_S) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a ring needs slots >= 1 and slot_bytes >= 1, got {slots} and {slot_bytes}")
        slot_bytes = _align(slot_bytes)
        state = {
            "id": secrets.token_hex(8),
            "slots": int(slots),
            "slot_bytes": slot_bytes,
            "claim_wait_s": float(claim_wait_s),
            "region": SharedRegion(_meta_bytes(slots) + slots * slot_bytes),
        }
        self._init_from(state)
        with _RINGS_LOCK:
            _RINGS[self.id] = self

    def _init_from(self, state: dict[str, Any]) -> None:
        self.id: str = state["id"]
        self.slots: int = state["slots"]
        self.slot_bytes: int = state["slot_bytes"]
        self.claim_wait_s: float = state["claim_wait_s"]
        self._region: SharedRegion = state["region"]
        head = _meta_bytes(self.slots)
        self._bytes_t = self._region.tensor[head : head + self.slots * self.slot_bytes]
        self._bytes = self._bytes_t.numpy()
        meta = self._region.array[: 8 * (3 * self.slots + _NCOUNTERS)].view(np.int64)
        self._role = meta[: self.slots]
        self._ticket = meta[self.slots : 2 * self.slots]
        self._gen = meta[2 * self.slots : 3 * self.slots]
        self._counters = meta[3 * self.slots :]
        self._local_lock = threading.Lock()  # main process: lease/release from the loop and the pin thread
        self._pending: list[SlotClaim] = []  # worker: claims whose batch is not packed yet
        self._warned = False
        self._copied = 0
        self._wanted = 0
        # Main process: the generation of the last iterator, and the workers of each live generation.
        self._generation = 0
        self._iterators: dict[int, tuple[weakref.ref[Any], list[Any]]] = {}

    def __reduce__(self) -> tuple[Callable[..., BatchRing], tuple[dict[str, Any]]]:
        if not is_spawning():
            raise RingError(
                "a BatchRing is shared with DataLoader workers when they start; it cannot be pickled otherwise"
            )
        state = {
            "id": self.id,
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "claim_wait_s": self.claim_wait_s,
            "region": self._region,
        }
        return _attach_ring, (state,)

    # -- main process ------------------------------------------------------------------------------
    def begin(self, iterator_factory: Callable[[int], Any]) -> Any:
        """Start an iterator: reclaim the claims of iterators that are gone, then make the iterator with
        ``iterator_factory(generation)`` (its workers start inside it and carry ``generation`` in their
        claims) and remember it."""
        self._reclaim()
        self._generation += 1
        iterator = iterator_factory(self._generation)
        workers = list(getattr(iterator, "_workers", []))
        self._iterators[self._generation] = (weakref.ref(iterator), workers)
        return iterator

    def _reclaim(self) -> None:
        """Free the slots claimed by workers of iterators that are gone or shut down, once those workers
        have exited (their batches were never delivered and never will be)."""
        dead = set()
        for generation, (ref, workers) in list(self._iterators.items()):
            iterator = ref()
            finished = iterator is None or getattr(iterator, "_shutdown", False)
            if finished and not any(w.is_alive() for w in workers):
                dead.add(generation)
                del self._iterators[generation]
        if not dead:
            return
        with self._region.locked(LOCK_WAIT_S) as held:
            if held:
                for slot in np.flatnonzero(self._role == CLAIMED).tolist():
                    if int(self._gen[slot]) in dead:
                        self._role[slot] = FREE

    def lease(self, slot: int, ticket: int) -> np.ndarray:
        """Take the main process's lease on ``slot`` for the batch of claim ``ticket``: a fresh uint8 view of
        the slot; the slot is freed when the view and every tensor made from it are garbage.

        Raises:
            RingError: the slot is not claimed under that ticket (reclaimed, reused, or a forged descriptor).
        """
        if not 0 <= slot < self.slots:
            raise RingError(f"batch descriptor names slot {slot} of a ring of {self.slots}")
        with self._local_lock:
            if int(self._role[slot]) != CLAIMED or int(self._ticket[slot]) != int(ticket):
                raise RingError(
                    f"batch slot {slot} no longer holds the batch of claim {ticket} (role "
                    f"{int(self._role[slot])}, claim {int(self._ticket[slot])}): it was reclaimed or reused; "
                    "iterate one loader iterator at a time and do not keep its batches past its shutdown"
                )
            self._role[slot] = HELD
        start = slot * self.slot_bytes
        view = self._bytes[start : start + self.slot_bytes]
        weakref.finalize(view, self._release, slot, int(ticket))
        return view

    def _release(self, slot: int, ticket: int) -> None:
        with self._local_lock:  # also a memory barrier: the consumer's reads come before the slot is free
            if int(self._ticket[slot]) == ticket and int(self._role[slot]) == HELD:
                self._role[slot] = FREE

    def tensor_of(self, lease: np.ndarray, payload: tuple[int, str, tuple[int, ...]]) -> torch.Tensor:
        """The tensor ``(offset, dtype, shape)`` of a leased slot (a view; keeps the lease alive).

        Raises:
            RingError: the region does not lie inside the slot.
        """
        offset, dtype_name, shape = payload
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise RingError(f"batch descriptor names an unknown dtype {dtype_name!r}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        if offset < 0 or offset % SLOT_ALIGN or offset + nbytes > self.slot_bytes:
            raise RingError(
                f"batch descriptor region {offset}+{nbytes} lies outside a {self.slot_bytes}-byte slot"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(lease, dtype=dtype, count=count, offset=offset).view(shape)

    def stats(self) -> RingStats:
        """The ring's counters and the slots in each role now."""
        roles = self._role.copy()
        return RingStats(
            slots=self.slots,
            slot_bytes=self.slot_bytes,
            claims=int(self._counters[_CLAIMS]),
            fallbacks=int(self._counters[_FALLBACKS]),
            copied_bytes=int(self._counters[_COPIED]),
            wanted_bytes=int(self._counters[_WANTED]),
            free=int((roles == FREE).sum()),
            claimed=int((roles == CLAIMED).sum()),
            held=int((roles == HELD).sum()),
        )

    def contains(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies in this ring (in this process's mapping)."""
        start = self._bytes_t.data_ptr()
        return start <= tensor.data_ptr() < start + self.slots * self.slot_bytes

    # -- workers -----------------------------------------------------------------------------------
    def claim(self, generation: int) -> SlotClaim | None:
        """Claim a free slot for a batch window (worker); None when none is free within ``claim_wait_s``
        (the window then uses per-batch shared memory)."""
        deadline = time.monotonic() + self.claim_wait_s
        while True:
            with self._region.locked(LOCK_WAIT_S) as held:
                free = np.flatnonzero(self._role == FREE) if held else ()
                if len(free):
                    slot = int(free[0])
                    self._counters[_TICKET] += 1
                    ticket = int(self._counters[_TICKET])
                    self._ticket[slot] = ticket
                    self._gen[slot] = generation
                    self._role[slot] = CLAIMED
                    self._counters[_CLAIMS] += 1
                    claim = SlotClaim(slot, ticket)
                    self._pending.append(claim)
                    return claim
            if time.monotonic() >= deadline:
                break
            time.sleep(0.001)
        self._note_fallback()
        return None

    def _note_fallback(self) -> None:
        with self._region.locked(LOCK_WAIT_S) as held:
            if held:
                self._counters[_FALLBACKS] += 1
        if not self._warned:
            self._warned = True
            logger.warning(
                "DataLoader worker: no free batch slot within %.0f ms (the consumer holds more than the ring's "
                "spare slots); batches use per-batch shared memory meanwhile (slower). Hold fewer batches, "
                ".clone() what you keep, or pass held_batches= to FrameStream.loader",
                self.claim_wait_s * 1e3,
            )

    def abandon(self, claim: SlotClaim) -> None:
        """Give a claim back (worker: its window failed before its batch was sent)."""
        if claim in self._pending:
            self._pending.remove(claim)
        with self._region.locked(LOCK_WAIT_S) as held:
            if (
                held
                and int(self._ticket[claim.slot]) == claim.ticket
                and int(self._role[claim.slot]) == CLAIMED
            ):
                self._role[claim.slot] = FREE

    def alloc(self, claim: SlotClaim, shape: Sequence[int], dtype: np.dtype) -> np.ndarray | None:
        """An uninitialised array in the claimed slot (its ``.base`` is a tensor viewing the ring, which
        :func:`~driveengine.data.collate.collate_frames` hands on); None when the slot is full."""
        t = self._carve(claim, tuple(int(s) for s in shape), torch.from_numpy(np.empty(0, dtype)).dtype)
        return None if t is None else t.numpy()

    def _carve(self, claim: SlotClaim, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        start = _align(claim.used)
        if start + nbytes > self.slot_bytes:
            return None
        claim.used = start + nbytes
        begin = claim.slot * self.slot_bytes + start
        return self._bytes_t[begin : begin + nbytes].view(dtype).view(shape)

    def _locate(self, claim: SlotClaim, tensor: torch.Tensor) -> tuple[int, str, tuple[int, ...]] | None:
        """``(offset in the slot, dtype, shape)`` of a contiguous tensor that lies in the claimed slot."""
        if not tensor.is_contiguous() or not self.contains(tensor) or tensor.numel() == 0:
            return None
        offset = tensor.data_ptr() - self._bytes_t.data_ptr() - claim.slot * self.slot_bytes
        nbytes = tensor.numel() * tensor.element_size()
        if offset < 0 or offset % SLOT_ALIGN or offset + nbytes > self.slot_bytes:
            return None
        return offset, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)

    def _place(self, claim: SlotClaim, tensor: torch.Tensor) -> tuple[int, str, tuple[int, ...]] | None:
        """Where ``tensor`` is in the slot: in place, or copied behind what is there; None if it does not fit."""
        found = self._locate(claim, tensor)
        if found is not None:
            return found
        if tensor.numel() == 0 or tensor.dtype not in _SLOT_DTYPES:
            return None
        dst = self._carve(claim, tuple(tensor.shape), tensor.dtype)
        if dst is None:
            self._wanted += _align(tensor.numel() * tensor.element_size())
            return None
        dst.copy_(tensor)
        self._copied += dst.numel() * dst.element_size()
        return self._locate(claim, dst)

    def pack(self, batch: dict[str, Any]) -> SlotBatch | dict[str, Any]:
        """The descriptor of a collated batch whose window had a claim (worker); ``batch`` itself when it
        had none (a fallback window: its tensors travel the ordinary way)."""
        claim = self._claim_of(batch)
        if claim is None:
            return batch
        self._copied = self._wanted = 0
        entries: list[Entry] = []
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                where = self._place(claim, value)
                entries.append((key, "t", where) if where is not None else (key, "v", value))
            elif isinstance(value, list) and value and any(isinstance(v, torch.Tensor) for v in value):
                items = []
                for v in value:
                    where = self._place(claim, v) if isinstance(v, torch.Tensor) else None
                    items.append(("t", where) if where is not None else ("v", v))
                entries.append((key, "l", items))
            else:
                entries.append((key, "v", value))
        if self._copied or self._wanted:
            with self._region.locked(LOCK_WAIT_S) as held:
                if held:
                    self._counters[_COPIED] += self._copied
                    if self._wanted:
                        wanted = _align(claim.used) + self._wanted
                        self._counters[_WANTED] = max(int(self._counters[_WANTED]), wanted)
        return SlotBatch(self.id, claim.slot, claim.ticket, entries)

    def _claim_of(self, batch: dict[str, Any]) -> SlotClaim | None:
        """The pending claim whose slot holds the batch's arrays (else the oldest pending claim); claims
        older than it whose batch never came are given back."""
        if not self._pending:
            return None
        slot = None
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.numel() and self.contains(value):
                slot = (value.data_ptr() - self._bytes_t.data_ptr()) // self.slot_bytes
                break
        index = 0
        if slot is not None:
            index = next((i for i, c in enumerate(self._pending) if c.slot == slot), -1)
            if index < 0:
                return None
        claim = self._pending[index]
        for stale in self._pending[:index]:
            self.abandon(stale)
        self._pending.remove(claim)
        return claim


#: dtypes a slot can hold.
_SLOT_DTYPES = {
    d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    )
}


def is_spawning() -> bool:
    """Whether this process is pickling the arguments of a process it starts."""
    from multiprocessing import context

    return context.get_spawning_popen() is not None


class RingCollate:
    """The collate function of a :class:`RingLoader`: ``collate`` (default
    :func:`~driveengine.data.collate.collate_frames`), then, in a worker whose dataset has a ring attached,
    the batch packed into its slot (a :class:`SlotBatch`)."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any] | None = None) -> None:
        from driveengine.data.collate import collate_frames

        self.collate = collate or collate_frames

    def __call__(self, samples: list[dict[str, Any]]) -> Any:
        batch = self.collate(samples)
        info = get_worker_info()
        ring = None if info is None else getattr(info.dataset, "attached_ring", None)
        if ring is None or not isinstance(batch, dict):
            return batch
        return ring.pack(batch)


class RingLoader(DataLoader):
    """A DataLoader whose workers deliver batches through a :class:`BatchRing` (see the module doc).

    Made by :meth:`FrameStream.loader <driveengine.data.stream.FrameStream.loader>`. The dataset attaches
    the ring its workers decode into (``attach_ring(ring, generation, window)``; ``attached_ring``);
    ``ring_for(batch_size)`` gives the ring for each new iterator (the dataset's, kept across epochs and
    loaders, made larger when batches needed more room).

    Args:
        dataset: the dataset (a :class:`~driveengine.data.stream.FrameStream`).
        ring_for: the ring of the next iterator.
        **kwargs: ``DataLoader`` arguments (``collate_fn`` is wrapped in :class:`RingCollate`).
    """

    def __init__(self, dataset: Any, ring_for: Callable[[int], BatchRing], **kwargs: Any) -> None:
        kwargs["collate_fn"] = RingCollate(kwargs.get("collate_fn"))
        super().__init__(dataset, **kwargs)
        self.ring_for = ring_for
        self.ring: BatchRing | None = None

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        ring = self.ring = self.ring_for(int(self.batch_size or 1))

        def start(generation: int) -> Any:
            self.dataset.attach_ring(ring, generation, self.batch_size)
            try:
                return super(
                    RingLoader, self
                )._get_iterator()  # the workers start (and inherit the ring) here
            finally:
                self.dataset.attach_ring(None, 0, None)

        return ring.begin(start)

    def ring_stats(self) -> RingStats | None:
        """The counters of the ring of the last iterator (:class:`RingStats`); None before the first."""
        return None if self.ring is None else self.ring.stats()


def ring_size(num_workers: int, prefetch_factor: int, held_batches: int) -> int:
    """Slots a ring needs: batches in flight (``prefetch_factor * num_workers``), the one being fetched and
    ``held_batches`` held by the consumer."""
    return int(prefetch_factor) * int(num_workers) + 1 + int(held_batches)
