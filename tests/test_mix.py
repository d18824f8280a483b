"""One stream over several collected splits: the mixed plan (driveengine.data.plan) and MixedStream.

* The plan: one global order per (seed, epoch); weights are the shares of the units (samples, or global
  batches) after any number of epochs, within one unit (highest averages, never decreasing); a source continues its own endless sequence of
  shuffled passes from epoch to epoch (small sources repeat whole passes, large ones are subsampled
  without a repeat before every frame was read); the global batches are the same for any ranks x
  workers; without weights every frame of every source is read once.
* The stream, on real splits: samples say their dataset and source and hold the written labels; the same
  global batches for 1 rank x 0 workers, 1 x 2 and 2 x 2 (DataLoader worker processes); exact mid-epoch
  resume with 0 and 2 workers; a state of another mix or of one split is refused; batches come from one
  source when grids, camera rigs or class tables differ, and mix otherwise; ``classes="unified"`` maps every
  source's ids onto the unified table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES, OPENSCENE_CLASSES, UNIFIED
from driveengine.schemas.grid import VoxelGrid
from stream_fixtures import OPENSCENE_TO_OCC3D_IDS, SMALL_GRID, build_split, build_split_as

from driveengine.data import UNIFIED_CLASSES, FrameStream, MixedStream, MixSource, StreamError
from driveengine.data.plan import (
    mix_units,
    mixed_global_order,
    plan_mixed_epoch,
    source_order,
    source_seed,
)

COUNTS = [[7, 3, 11], [5], [2, 4]]  # three sources of 21, 5 and 6 frames


pytestmark = pytest.mark.usefixtures("one_compute_thread")


# -- the plan ------------------------------------------------------------------------------------------


def _global_batches(world_size, num_workers, batch, **kw):
    """The global batches (source, frame) pairs that ranks x workers read, merged like DataLoaders do."""
    ranks = []
    for rank in range(world_size):
        options = dict(
            rank=rank, world_size=world_size, num_workers=num_workers, global_batch_size=batch, **kw
        )
        plans = [plan_mixed_epoch(COUNTS, worker=w, **options) for w in range(num_workers)]
        device = batch // world_size
        chunks = [list(zip(p.sources.tolist(), p.frames.tolist(), strict=True)) for p in plans]
        chunks = [[c[i : i + device] for i in range(0, len(c), device)] for c in chunks]
        ranks.append([c[j] for j in range(max(map(len, chunks))) for c in chunks if j < len(c)])
    steps = len(ranks[0])
    assert all(len(r) == steps for r in ranks), "every rank takes the same number of steps"
    return [[pair for r in ranks for pair in r[s]] for s in range(steps)]


@pytest.mark.parametrize("homogeneous", [True, False])
def test_mixed_order_is_deterministic_per_seed_and_epoch(homogeneous):
    def order(seed, epoch):
        s, f = mixed_global_order(COUNTS, [0.5, 0.3, 0.2], 4, homogeneous=homogeneous, seed=seed, epoch=epoch)
        return np.stack([s, f])

    a = order(3, 0)
    assert a.shape[1] == 32  # 32 frames, a whole number of global batches of 4
    assert np.array_equal(a, order(3, 0))
    assert not np.array_equal(a, order(3, 1))
    assert not np.array_equal(a[0], order(3, 1)[0])  # the sources' turns are drawn anew, too
    assert not np.array_equal(a, order(4, 0))
    # every frame id is one of its source's
    for s, n in enumerate(sum(c) for c in COUNTS):
        assert ((a[1][a[0] == s] >= 0) & (a[1][a[0] == s] < n)).all()


def _sequential_units(weights, units):
    """The highest-averages apportionment unit by unit (what mix_units computes directly)."""
    p = np.asarray(weights, dtype=float) / np.sum(weights)
    seats = np.zeros(len(p), dtype=np.int64)
    history = [seats.copy()]
    for _ in range(units):
        seats[int(np.argmax(p / (seats + 0.5)))] += 1
        history.append(seats.copy())
    return history


@pytest.mark.parametrize("weights", [[0.7, 0.3], [5, 3, 2], [1, 1, 1, 1], [0.9, 0.05, 0.03, 0.02, 1e-4]])
def test_weights_are_the_share_of_the_units_after_any_number_of_epochs(weights):
    p = np.asarray(weights) / np.sum(weights)
    reference = _sequential_units(weights, 400)
    for units in range(400):
        counts = mix_units(weights, units)
        assert np.array_equal(counts, reference[units])  # computed directly, without replaying
        assert np.abs(counts - p * units).max() <= (0.5 if len(p) == 2 else 1.1) + 1e-9
    # never decreasing: the units of every epoch are >= 0 and add up to the epoch's
    for per_epoch in (3, 13):
        epochs = np.diff([mix_units(weights, e * per_epoch) for e in range(60)], axis=0)
        assert (epochs >= 0).all() and (epochs.sum(axis=1) == per_epoch).all()
    # the cost does not grow with the number of units (an epoch far away, e.g. a resumed state)
    far = mix_units(weights, 10**15)
    assert far.sum() == 10**15 and np.allclose(far / 10**15, p)


def test_the_mixed_order_keeps_the_shares_of_samples_and_of_batches():
    p = np.array([0.5, 0.3, 0.2])
    drawn, batches = np.zeros(3), np.zeros(3)
    for epoch in range(50):
        s, _ = mixed_global_order(COUNTS, p, 4, homogeneous=False, seed=1, epoch=epoch)
        drawn += np.bincount(s, minlength=3)
        s, _ = mixed_global_order(COUNTS, p, 4, homogeneous=True, seed=1, epoch=epoch)
        assert (s.reshape(-1, 4) == s.reshape(-1, 4)[:, :1]).all()  # one source per global batch
        batches += np.bincount(s[::4], minlength=3)
    assert np.abs(drawn - p * drawn.sum()).max() <= 1  # 50 epochs x 32 samples
    assert np.abs(batches - p * batches.sum()).max() <= 1  # 50 epochs x 8 global batches
    with pytest.raises(ValueError, match="finite positive"):
        mix_units([1.0, 0.0], 4)
    with pytest.raises(ValueError, match="finite positive"):
        mixed_global_order(COUNTS, [1.0, float("nan"), 1.0], 4, homogeneous=False)


def test_sources_continue_their_passes_from_epoch_to_epoch():
    """A large source is subsampled (no frame twice before all were read), a small one repeats whole
    passes; each source's samples over the epochs are its endless sequence of shuffled passes."""
    counts = [[60, 40], [7]]
    seen = {0: [], 1: []}
    for epoch in range(12):
        s, f = mixed_global_order(
            counts, [0.5, 0.5], 4, homogeneous=True, epoch_samples=24, seed=5, epoch=epoch, block_size=16
        )
        for source in (0, 1):
            seen[source] += f[s == source].tolist()
    for source in (0, 1):
        n = len(seen[source])
        expected = source_order(counts[source], 0, n, seed=source_seed(5, source), block_size=16)
        assert seen[source] == expected.tolist()
    assert 100 < len(seen[0]) < 200 and len(seen[1]) > 100
    assert sorted(seen[0][:100]) == list(range(100))  # every frame of the large source before any repeat
    first_passes = len(seen[1]) // 7 * 7
    assert np.bincount(seen[1][:first_passes]).tolist() == [first_passes // 7] * 7
    assert seen[1][:7] != seen[1][7:14]  # each pass is a new shuffle


@pytest.mark.parametrize(
    "kw",
    [
        {"weights": [0.5, 0.3, 0.2], "homogeneous": True},
        {"weights": [0.5, 0.3, 0.2], "homogeneous": False, "epoch_samples": 50},
        {"weights": None, "homogeneous": True},
        {"weights": None, "homogeneous": False, "shuffle": False},
    ],
)
def test_global_batches_are_the_same_for_any_ranks_and_workers(kw):
    for epoch in (0, 3):
        reference = _global_batches(1, 1, 12, epoch=epoch, seed=2, **kw)
        for world_size, num_workers in [(2, 1), (1, 3), (2, 2), (4, 3), (3, 2)]:
            assert _global_batches(world_size, num_workers, 12, epoch=epoch, seed=2, **kw) == reference
        if kw["homogeneous"]:
            assert all(len({s for s, _ in batch}) == 1 for batch in reference)
        # resume: starting after k global batches reads exactly the rest
        rest = _global_batches(2, 2, 12, epoch=epoch, seed=2, start=2 * 12, **kw)
        assert rest == reference[2:]


def test_a_mix_without_weights_reads_every_frame_once():
    s, f = mixed_global_order(COUNTS, None, 4, homogeneous=False, seed=1)
    assert sorted(zip(s.tolist(), f.tolist(), strict=True)) == [
        (i, j) for i, c in enumerate(COUNTS) for j in range(sum(c))
    ]
    s, f = mixed_global_order(COUNTS, None, 4, homogeneous=True, seed=1)
    # per source padded to whole global batches of 4 by repeating its first frames: 21 -> 24, 5 -> 8, 6 -> 8
    assert np.bincount(s).tolist() == [24, 8, 8]
    for source, n in enumerate(sum(c) for c in COUNTS):
        assert set(f[s == source].tolist()) == set(range(n))


def test_an_unshuffled_mix_spreads_the_sources_evenly():
    s, f = mixed_global_order([[30], [10]], [3, 1], 1, homogeneous=False, shuffle=False, epoch_samples=40)
    assert all(np.bincount(s[i : i + 4], minlength=2).tolist() == [3, 1] for i in range(0, 40, 4))
    assert f[s == 1].tolist() == list(range(10)) and f[s == 0].tolist() == list(range(30))


# -- the stream on real splits -------------------------------------------------------------------------


OTHER_GRID = VoxelGrid((-4.0, -4.0, -2.0), (4.0, 4.0, 2.0), 1.0)  # 8 x 8 x 4: other label shapes


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """nuPlan-like split A (25 frames, OpenScene's table), nuScenes-like B (10 frames, Occ3D's table, the
    same grid), C on another grid, D with six cameras (both with images)."""
    root = tmp_path_factory.mktemp("mix")
    a = build_split(root / "a", seed=0, images=True)
    b = build_split_as(
        root / "b", dataset="nuscenes", classes=OCC3D_NUSCENES_CLASSES, id_map=OPENSCENE_TO_OCC3D_IDS, seed=1,
        scenes_per_log=((4, 2), (4,)), images=True,
    )  # fmt: skip
    c = build_split(root / "c", seed=2, scenes_per_log=((6,), (3,)), grid=OTHER_GRID)
    cams = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
    d = build_split_as(
        root / "d", dataset="nuscenes", cameras=cams, seed=3, scenes_per_log=((5,), (3,)), images=True
    )
    return {"a": a, "b": b, "c": c, "d": d}


def _src(info, weight: float | None = 1.0) -> MixSource:
    return MixSource(str(info.root), info.split, weight)


def _mix(splits, names="ab", weights=(0.7, 0.3), **kw) -> MixedStream:
    kw.setdefault("fields", ("token", "semantics"))
    kw.setdefault("seed", 3)
    return MixedStream([_src(splits[n], w) for n, w in zip(names, weights, strict=True)], **kw)


def _batches(stream: MixedStream, num_workers: int = 0) -> list[list[tuple[int, str]]]:
    return [
        list(zip(b["mix_source"].tolist(), b["token"], strict=True))
        for b in stream.loader(num_workers=num_workers)
    ]


def test_samples_say_their_source_and_hold_the_written_labels(splits):
    mix = _mix(splits, classes="unified", global_batch_size=4, fields=("semantics", "flow", "mask_lidar"))
    assert mix.datasets == ("nuplan", "nuscenes") and mix.num_frames == 35
    assert mix.samples_per_epoch == 35 and len(mix) == 36  # rounded up to 9 global batches
    luts = [np.asarray(t.to_unified()) for t in (OPENSCENE_CLASSES, OCC3D_NUSCENES_CLASSES)]
    positions, per_source = [], [0, 0]
    for sample in mix:
        s = sample["mix_source"]
        truth = splits["ab"[s]].frames[sample["token"]]
        assert sample["dataset"] == ("nuplan", "nuscenes")[s]
        assert truth.log == sample["log_name"] and truth.row == sample["row"]
        assert np.array_equal(sample["semantics"], luts[s][truth.semantics])
        assert np.array_equal(sample["flow"], truth.flow) and np.array_equal(
            sample["mask_lidar"], truth.mask_lidar
        )
        positions.append(sample["sample_index"])
        per_source[s] += 1
    assert positions == list(range(36))
    assert per_source == [25, 11]  # 0.7 * 36 = 25.2 samples of A


@pytest.mark.parametrize("names,kw", [("ab", {"classes": "unified"}), ("ac", {})])
def test_the_global_batches_are_the_same_for_1x0_1x2_and_2x2(splits, names, kw):
    """Ranks are given explicitly (what torchrun's RANK/WORLD_SIZE give a FrameStream), workers are real
    DataLoader processes; the global batches of 2 ranks are their device batches side by side."""
    reference = {}
    for epoch in (0, 1):
        mix = _mix(splits, names, global_batch_size=4, rank=0, world_size=1, **kw)
        mix.set_epoch(epoch)
        reference[epoch] = _batches(mix)
        mix.set_epoch(epoch)
        assert _batches(mix, num_workers=2) == reference[epoch]
        per_rank = []
        for rank in (0, 1):
            ranked = _mix(splits, names, global_batch_size=4, rank=rank, world_size=2, **kw)
            ranked.set_epoch(epoch)
            per_rank.append(_batches(ranked, num_workers=2))
        assert [a + b for a, b in zip(*per_rank, strict=True)] == reference[epoch]
    assert reference[0] != reference[1]  # epochs differ
    both = [b for b in reference[0] + reference[1] if len({s for s, _ in b}) > 1]
    assert bool(both) == (names == "ab")  # mixed batches only where the shapes agree


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_is_exact(splits, num_workers):
    def fresh():
        return _mix(splits, classes="unified", global_batch_size=4, samples_per_epoch=30)

    run = fresh()
    run.set_epoch(1)
    full = _batches(run, num_workers)
    run.set_epoch(2)
    next_epoch = _batches(run, num_workers)
    assert len(full) == 8  # 30 samples -> 8 global batches of 4

    interrupted = fresh()
    interrupted.set_epoch(1)
    taken = []
    for batch in interrupted.loader(num_workers=num_workers):
        taken.append(list(zip(batch["mix_source"].tolist(), batch["token"], strict=True)))
        if len(taken) == 3:
            break
    state = interrupted.state_dict(num_samples=3 * 4)
    if num_workers == 0:  # in-process loading counts what it yielded
        assert interrupted.state_dict() == state
    assert state["epoch"] == 1 and state["num_samples"] == 12 and state["samples_per_epoch"] == 30

    resumed = fresh()
    resumed.load_state_dict(state)
    assert len(resumed) == 5 * 4
    assert taken + _batches(resumed, num_workers) == full
    resumed.set_epoch(2)
    assert _batches(resumed, num_workers) == next_epoch


def test_a_state_of_another_mix_or_of_one_split_is_refused(splits):
    state = _mix(splits, classes="unified", global_batch_size=4).state_dict(num_samples=8)
    others = {
        "weights": _mix(splits, weights=(0.6, 0.4), classes="unified", global_batch_size=4),
        "order": _mix(splits, "ba", weights=(0.3, 0.7), classes="unified", global_batch_size=4),
        "classes": _mix(splits, "aa", classes="native", global_batch_size=4),
    }
    for name, other in others.items():
        with pytest.raises(
            StreamError, match="cannot resume, the saved loader state is of another mix"
        ) as exc:
            other.load_state_dict(state)
        assert "nuplan/mini (25 frames, weight 0.7)" in str(exc.value), name
    with pytest.raises(StreamError, match="seed=3"):
        _mix(splits, classes="unified", global_batch_size=4, seed=4).load_state_dict(state)
    with pytest.raises(StreamError, match="not a whole number of global batches"):
        _mix(splits, classes="unified", global_batch_size=4).load_state_dict({**state, "num_samples": 6})
    single = FrameStream(splits["a"].root, "mini", fields=("token",), global_batch_size=4).state_dict()
    with pytest.raises(StreamError, match="is of a single split, not of this mix"):
        _mix(splits, classes="unified", global_batch_size=4).load_state_dict(single)
    _mix(splits, classes="unified", global_batch_size=4).load_state_dict(state)  # the same mix resumes


@pytest.mark.parametrize(
    "names,fields,why",
    [
        ("ac", ("semantics", "flow"), "grid"),  # 16 x 16 x 8 vs 8 x 8 x 4 voxels
        ("ad", ("images", "semantics"), "cameras"),  # 8 vs 6 images
        ("ab", ("semantics",), "classes"),  # OpenScene's vs Occ3D-nuScenes' ids (native classes)
    ],
)
def test_batches_come_from_one_source_when_shapes_differ(splits, names, fields, why):
    mix = MixedStream(
        [_src(splits[names[0]], 0.5), _src(splits[names[1]], 0.5)], fields=("token", *fields), seed=1,
        global_batch_size=4, image_size=(32, 18),
    )  # fmt: skip
    assert mix.homogeneous
    sources = set()
    for batch in mix.loader():
        assert len(set(batch["mix_source"].tolist())) == 1
        assert all(isinstance(batch[f], torch.Tensor) for f in fields)  # one stacked tensor per field
        sources |= set(batch["mix_source"].tolist())
        if "images" in fields:
            assert batch["images"].shape[1] == (8 if batch["mix_source"][0] == 0 else 6)
    assert sources == {0, 1}
    if why == "grid":
        with pytest.raises(StreamError, match="voxel grids differ"):
            _ = mix.grid
        with pytest.raises(StreamError, match="cannot share a batch"):
            MixedStream([_src(splits["a"]), _src(splits["c"])], fields=("semantics",), homogeneous=False)
    if why == "classes":
        with pytest.raises(StreamError, match=r"class tables differ.*classes='unified'"):
            _ = mix.classes
    if why == "cameras":
        assert mix.grid == SMALL_GRID
        with pytest.raises(StreamError, match="cameras differ"):
            _ = mix.cameras
        # without images, the user may mix the rigs in one batch
        mixed = MixedStream([_src(splits["a"]), _src(splits["d"])], fields=("semantics",), homogeneous=False)
        assert not mixed.homogeneous


def test_unified_classes_map_every_source_onto_one_table(splits):
    assert UNIFIED_CLASSES.names == UNIFIED and UNIFIED_CLASSES.free == len(UNIFIED) - 1
    assert UNIFIED_CLASSES.to_unified() == tuple(range(len(UNIFIED)))
    assert [UNIFIED[i] for i in UNIFIED_CLASSES.foreground][-1] == "generic_object"
    mix = _mix(splits, classes="auto", global_batch_size=4, fields=("token", "semantics"), history=1)
    assert mix.class_mode == "unified" and mix.classes == UNIFIED_CLASSES and not mix.homogeneous
    assert _mix(splits, "aa", classes="auto").class_mode == "native"
    seen, history = set(), set()
    for sample in mix:
        truth = splits["ab"[sample["mix_source"]]].frames[sample["token"]]
        table = OPENSCENE_CLASSES if sample["mix_source"] == 0 else OCC3D_NUSCENES_CLASSES
        # each id means the same class before and after
        written = [table.unified[i] for i in truth.semantics.ravel()]
        assert [UNIFIED[i] for i in sample["semantics"].ravel()] == written
        seen |= set(np.unique(sample["semantics"]).tolist())
        history |= set(np.unique(sample["history_semantics"]).tolist())
    # vehicle/car -> vehicle, background (OpenScene) and others (Occ3D) kept apart, free -> free
    assert seen == {
        UNIFIED.index(n) for n in ("vehicle", "bicycle", "pedestrian", "background", "others", "free")
    }
    assert history == seen  # the history frames' labels are mapped too


def test_bad_mixes_are_one_clear_line(splits):
    with pytest.raises(StreamError, match="finite number > 0"):
        _mix(splits, weights=(1.0, -1.0))
    with pytest.raises(StreamError, match="give every source of a mix a weight, or none"):
        _mix(splits, weights=(1.0, None))
    with pytest.raises(StreamError, match="at least one source"):
        MixedStream([])
    with pytest.raises(StreamError, match="classes='other'"):
        _mix(splits, classes="other")
    with pytest.raises(StreamError, match="samples_per_epoch=0"):
        _mix(splits, samples_per_epoch=0)
    with pytest.raises(StreamError, match="must come from one source"):
        _mix(splits, "ac").loader(batch_size=2)
    with pytest.raises(StreamError, match="not a positive multiple of the world size"):
        _mix(splits, global_batch_size=3, rank=0, world_size=2)
