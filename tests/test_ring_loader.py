"""The zero-copy DataLoader path (driveengine.data.ring): worker batches are views of preallocated shared
slots, equal to in-process loading; a held batch is never overwritten; holding too many stays correct and
is counted; slots of abandoned iterators and killed workers come back; stale descriptors are refused;
uint8 images become the float path's images on the device."""

from __future__ import annotations

import os
import pickle
import signal

import numpy as np
import pytest
import torch
from stream_fixtures import build_split

from driveengine.data import FrameStream, StreamError
from driveengine.data.collate import images_to_float
from driveengine.data.ring import BatchRing, RingError, RingLoader, SlotBatch

OCC = ("semantics", "flow", "mask_lidar")
FIELDS = (*OCC, "ego2global", "images", "points")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return build_split(tmp_path_factory.mktemp("ring"), points=True, images=True)


def _stream(split, **kw) -> FrameStream:
    options = dict(fields=FIELDS, seed=3, global_batch_size=5, image_size=(32, 18), image_dtype="uint8")
    return FrameStream(split.root, split.split, **{**options, **kw})


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(value, b[key], strict=True)), key
        else:
            assert value == b[key], key


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    return [_clone(v) for v in value] if isinstance(value, list) else value


def _tensors(batch: dict) -> list[torch.Tensor]:
    out = []
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, list):
            out += [v for v in value if isinstance(v, torch.Tensor)]
    return out


def test_worker_batches_are_views_of_the_ring_and_equal_in_process_loading(split):
    reference = list(_stream(split).loader(num_workers=0))
    loader = _stream(split).loader(num_workers=2)
    assert isinstance(loader, RingLoader)
    batches = []
    for batch in loader:
        # Every tensor, the ragged points too, is a view of a slot: no copy on this side.
        assert all(loader.ring.contains(t) for t in _tensors(batch))
        batches.append({k: _clone(v) for k, v in batch.items()})
        del batch
    assert len(batches) == len(reference) == 5
    for a, b in zip(reference, batches, strict=True):
        _same(a, b)
    stats = loader.ring_stats()
    assert stats.claims == 5 and stats.fallbacks == 0 and stats.copied_bytes > 0
    assert stats.slots == 2 * 2 + 1 + 2 and stats.held == 0 and stats.claimed == 0
    # The plain DataLoader path is still there and gives the same batches.
    plain = list(_stream(split).loader(num_workers=2, zero_copy=False))
    assert not isinstance(_stream(split).loader(num_workers=2, zero_copy=False), RingLoader)
    for a, b in zip(reference, plain, strict=True):
        _same(a, b)


def test_the_ring_is_kept_across_epochs_and_loaders_of_a_stream(split):
    stream = _stream(split, fields=OCC)
    first = stream.loader(num_workers=1)
    list(first)
    ring = first.ring
    for epoch in (1, 2):
        stream.set_epoch(epoch)
        loader = stream.loader(num_workers=1)
        tokens = [b["token"] for b in loader]
        assert loader.ring is ring and len(tokens) == 5  # no new shared memory per epoch or loader
    assert ring.stats().fallbacks == 0 and ring.stats().claims == 15


def test_a_held_batch_is_never_overwritten(split):
    """The consumer keeps batch 0 while the loader goes on: its slot is not reused (a ring that recycled
    slots after N batches regardless would overwrite it)."""
    loader = _stream(split, fields=OCC).loader(num_workers=1, prefetch_factor=1, held_batches=0)
    it = iter(loader)
    kept = next(it)
    snapshot = {k: kept[k].clone() for k in OCC}
    rest = list(it)
    assert len(rest) == 4
    for key in OCC:
        assert torch.equal(kept[key], snapshot[key]), key
    for batch in rest:  # and the others are intact too, though all were held at once
        truth = np.stack([split.frames[t].semantics for t in batch["token"]])
        assert np.array_equal(batch["semantics"].numpy(), truth)
    assert loader.ring_stats().fallbacks > 0  # more batches held than the ring has spare slots


def test_holding_every_batch_stays_correct_and_is_counted(split):
    reference = list(_stream(split, global_batch_size=2).loader(num_workers=0))
    loader = _stream(split, global_batch_size=2).loader(num_workers=2, held_batches=0)
    held = list(loader)  # 13 batches held, a ring of 2 * 2 + 1 slots
    assert len(held) == len(reference) == 13
    for a, b in zip(reference, held, strict=True):
        _same(a, b)
    stats = loader.ring_stats()
    assert stats.fallbacks >= 13 - 5 and stats.claims + stats.fallbacks == 13
    del held
    assert loader.ring_stats().held == 0  # leases end with the batches


def test_abandoned_iterators_and_killed_workers_give_their_slots_back(split):
    stream = _stream(split, fields=OCC)
    for _ in range(3):  # break out early: the in-flight batches are never delivered
        for _batch in stream.loader(num_workers=2):
            break
    del _batch
    loader = stream.loader(num_workers=2)
    it = iter(loader)
    next(it)
    os.kill(it._workers[0].pid, signal.SIGKILL)  # a worker dies mid-epoch (kill -9)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for _ in range(10):
            next(it)
    del it
    fresh = stream.loader(num_workers=2)
    tokens = [b["token"] for b in fresh]  # a whole epoch after all that: every batch through the ring
    assert len(tokens) == 5
    stats = fresh.ring_stats()
    assert fresh.ring is loader.ring and stats.fallbacks == 0
    assert stats.claimed == 0 and stats.held == 0


def test_a_failing_window_gives_its_slot_back(tmp_path):
    info = build_split(tmp_path, scenes_per_log=((6,), (6,)))
    victim = info.log_names[1]
    shard = sorted(
        p for p in (tmp_path / "mini" / "occ" / f"{victim}.zarr" / "flow").rglob("*") if p.is_file()
    )[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    stream = FrameStream(tmp_path, "mini", fields=OCC, global_batch_size=2, shuffle=False)
    loader = stream.loader(num_workers=1)
    with pytest.raises(StreamError, match=f"log {victim}: cannot decode flow"):
        list(loader)
    assert loader.ring_stats().claimed == 0 and loader.ring_stats().held == 0


def test_a_stale_descriptor_is_refused():
    ring = BatchRing(slots=2, slot_bytes=4096)
    claim = ring.claim(generation=1)
    assert claim is not None
    block = ring.alloc(claim, (4, 8), np.dtype(np.float32))
    block[:] = 7.0
    packed = ring.pack({"x": torch.from_numpy(block).clone(), "token": ["a"] * 4})
    assert isinstance(packed, SlotBatch)
    wire = pickle.dumps(packed)
    batch = pickle.loads(wire)  # the main process's side: a view of the slot, leased
    assert torch.equal(batch["x"], torch.full((4, 8), 7.0)) and ring.contains(batch["x"])
    assert ring.stats().held == 1
    with pytest.raises(RingError, match="no longer holds the batch"):
        pickle.loads(wire)  # the same descriptor twice: the slot is held, not claimed under that ticket
    del batch
    assert ring.stats().free == 2
    again = ring.claim(generation=1)  # the slot is reused under a new ticket
    assert again is not None and again.ticket != claim.ticket
    with pytest.raises(RingError):
        pickle.loads(wire)
    forged = SlotBatch(ring.id, 5, again.ticket, [])
    with pytest.raises(RingError, match="slot 5 of a ring of 2"):
        pickle.loads(pickle.dumps(forged))
    with pytest.raises(RingError, match="cannot be pickled"):
        pickle.dumps(ring)


def test_spawned_workers_share_the_ring(split):
    reference = list(_stream(split, fields=OCC).loader(num_workers=0))
    loader = _stream(split, fields=OCC).loader(num_workers=1, multiprocessing_context="spawn")
    for a, b in zip(reference, loader, strict=True):
        assert loader.ring.contains(b["semantics"])
        _same(a, b)
    assert loader.ring_stats().fallbacks == 0


def test_uint8_images_become_the_float_path_images(split):
    as_float = next(iter(_stream(split, image_dtype="float32").loader(num_workers=0)))
    as_uint8 = next(iter(_stream(split).loader(num_workers=1)))
    assert as_uint8["images"].dtype == torch.uint8 and as_float["images"].dtype == torch.float32
    assert torch.equal(images_to_float(as_uint8["images"], "cpu"), as_float["images"])
    assert torch.equal(images_to_float(as_float["images"]), as_float["images"])  # floats pass through
    every = torch.arange(256, dtype=torch.uint8)
    assert np.array_equal(
        images_to_float(every).numpy(), np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0
    )
    assert images_to_float(every, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        images_to_float(every.to(torch.int32))
    with pytest.raises(StreamError, match="image_dtype"):
        _stream(split, image_dtype="uint16")
