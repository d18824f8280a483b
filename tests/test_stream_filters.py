"""FrameStream filters and map-style access on real files.

Filters (logs, scenario tags, map locations, pyarrow expressions) select the frames the fixture says
they should, are applied before the sampling plan (the global batches over ranks x workers are the plan
of the subset, whatever the number of ranks and workers), resume exactly over the subset, and refuse a
bad expression or an empty subset with one clear line. Map-style access (``stream[i]``, ``get``) returns
exactly what iteration yields, field by field, history included.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from stream_fixtures import build_split

from driveengine.data import FrameStream, StreamError
from driveengine.data.plan import global_order, pad_order

OCC = ("semantics", "flow", "mask_lidar")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    # 4 logs (map locations las_vegas, boston, pittsburgh, las_vegas), 37 frames
    return build_split(
        tmp_path_factory.mktemp("out"),
        scenes_per_log=((5, 4), (7,), (3, 6), (8, 4)),
        points=True,
        images=True,
    )


def _selected(split, keep) -> list[str]:
    """Tokens of the fixture's frames that ``keep(frame)`` keeps, in stored order (logs by name, rows)."""
    frames = sorted(split.frames.items(), key=lambda kv: (kv[1].log, kv[1].row))
    return [tok for tok, f in frames if keep(f)]


def _tokens(loader) -> list[list[str]]:
    return [list(b["token"]) for b in loader]


def test_filters_select_what_the_metadata_says(split, caplog):
    cases = [
        ({"map_locations": ["las_vegas"]}, lambda f: f.map_location == "las_vegas"),
        ({"scenario_tags": ["turning", "no_such_tag"]}, lambda f: "turning" in f.scenario_tags),
        ({"logs": [split.log_names[2]]}, lambda f: f.log == split.log_names[2]),
        ({"where": pc.field("frame_idx") >= 3}, lambda f: _frame_idx(split, f) >= 3),
        (
            {
                "where": (pc.field("frame_idx") < 2) | pc.field("sample_next").is_null(),
                "map_locations": ["boston", "las_vegas"],
                "scenario_tags": ["stationary", "high_speed"],
            },
            lambda f: (
                (_frame_idx(split, f) < 2 or _is_scene_end(split, f))
                and f.map_location in ("boston", "las_vegas")
                and bool({"stationary", "high_speed"} & set(f.scenario_tags))
            ),
        ),
    ]
    for kwargs, keep in cases:
        expected = _selected(split, keep)
        assert 0 < len(expected) < len(split.frames), kwargs  # the case does select a proper subset
        with caplog.at_level(logging.INFO, logger="driveengine.data.stream"):
            caplog.clear()
            stream = FrameStream(split.root, split.split, fields=("token",), shuffle=False, **kwargs)
        assert [s["token"] for s in stream] == expected, kwargs
        assert stream.num_frames == len(expected) and len(stream) == len(expected)
        if "logs" not in kwargs or len(kwargs) > 1:  # a log list alone is no filter of frames
            assert f"selects {len(expected)} of " in caplog.text  # the subset's size is logged


def _scene_rows(split, f) -> list[int]:
    return sorted(g.row for g in split.frames.values() if g.log == f.log and g.scene == f.scene)


def _frame_idx(split, f) -> int:
    """frame_idx of a fixture frame: its position in its scene."""
    return _scene_rows(split, f).index(f.row)


def _is_scene_end(split, f) -> bool:
    return _scene_rows(split, f)[-1] == f.row


def test_filter_errors_are_one_clear_line_when_the_stream_is_built(split):
    with pytest.raises(StreamError, match=r"no column 'frame_ix'; did you mean 'frame_idx'\?") as exc:
        FrameStream(split.root, split.split, where=pc.field("frame_ix") > 1)
    assert "\n" not in str(exc.value) and "columns: token, frame_idx" in str(exc.value)
    with pytest.raises(StreamError, match="must evaluate to bool"):
        FrameStream(split.root, split.split, where=pc.field("frame_idx"))
    with pytest.raises(StreamError, match=r"bad filter .*no kernel matching input types \(string"):
        FrameStream(split.root, split.split, where=pc.field("token") + 1)
    with pytest.raises(StreamError, match="refer to columns by name"):  # only referenced columns are read
        FrameStream(split.root, split.split, where=pc.field(1) >= 3)
    nested = FrameStream(
        split.root, split.split, fields=("token",), where=pc.field("cams", 0, "timestamp").is_null()
    )
    assert nested.num_frames == len(split.frames)  # a position inside a named struct column is fine
    with pytest.raises(
        StreamError, match=r"cannot be evaluated: Failed to parse string"
    ):  # fails on the values
        FrameStream(split.root, split.split, where=pc.field("scene_name").cast(pa.int64()) > 3)
    with pytest.raises(StreamError, match=r"where= must be a pyarrow.compute.Expression.*got str"):
        FrameStream(split.root, split.split, where="frame_idx > 1")  # no SQL strings
    with pytest.raises(StreamError, match=r"selects none of the 37 frames of 4 logs; loosen it"):
        FrameStream(split.root, split.split, map_locations=["mars"])
    with pytest.raises(StreamError, match=r"selects none"):
        FrameStream(split.root, split.split, where=pc.field("frame_idx") > 1000, logs=split.log_names[:1])


@pytest.mark.parametrize("shuffle", [True, False])
def test_filtered_global_batches_do_not_depend_on_ranks_and_workers(split, shuffle):
    """The global batches over ranks x workers are the plan of the subset: the subset's frames in
    stored order, put in the epoch's global order by the plan, padded, cut into global batches."""
    batch = 4
    kwargs = dict(
        fields=("token", "semantics"), seed=13, global_batch_size=batch, shuffle=shuffle, block_size=5,
        where=pc.field("frame_idx") != 1, map_locations=["las_vegas", "pittsburgh"],
    )  # fmt: skip
    subset = _selected(
        split, lambda f: _frame_idx(split, f) != 1 and f.map_location in ("las_vegas", "pittsburgh")
    )
    counts = [sum(1 for t in subset if split.frames[t].log == name) for name in split.log_names]
    counts = [c for c in counts if c]
    for epoch in (0, 1):
        order = pad_order(global_order(counts, seed=13, epoch=epoch, shuffle=shuffle, block_size=5), batch)
        expected = [[subset[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]
        # every selected frame, once or repeated as padding
        assert sorted({t for b in expected for t in b}) == sorted(subset)
        for world_size, num_workers in [(1, 0), (1, 2), (2, 0), (2, 2)]:
            per_rank = []
            for rank in range(world_size):
                stream = FrameStream(split.root, split.split, rank=rank, world_size=world_size, **kwargs)
                stream.set_epoch(epoch)
                per_rank.append(_tokens(stream.loader(num_workers=num_workers)))
            assert len({len(r) for r in per_rank}) == 1  # equal step counts: no DDP hang
            merged = [[t for r in per_rank for t in r[step]] for step in range(len(per_rank[0]))]
            assert merged == expected, (world_size, num_workers, epoch)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_over_a_filtered_subset_is_exact(split, num_workers):
    kwargs = dict(fields=("semantics",), seed=5, global_batch_size=4, scenario_tags=["stationary", "turning"])
    full = FrameStream(split.root, split.split, **kwargs)
    full.set_epoch(1)
    expected = _tokens(full.loader(num_workers=num_workers))
    assert len(expected) >= 4

    first = FrameStream(split.root, split.split, **kwargs)
    first.set_epoch(1)
    consumed = []
    for step, batch in enumerate(first.loader(num_workers=num_workers)):
        consumed.append(list(batch["token"]))
        if step == 1:
            break
    state = json.loads(json.dumps(first.state_dict(num_samples=2 * 4)))  # survives a checkpoint file
    assert state["num_frames"] == full.num_frames and len(state["subset"]) == 16

    resumed = FrameStream(split.root, split.split, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert consumed + _tokens(resumed.loader(num_workers=num_workers)) == expected

    # A state of another selection is refused, even one of the same size.
    with pytest.raises(StreamError, match="another selection of frames"):
        resumed.load_state_dict({**state, "subset": "0" * 16})
    other = FrameStream(split.root, split.split, fields=("semantics",), seed=5, global_batch_size=4)
    with pytest.raises(StreamError, match="another selection of frames"):
        other.load_state_dict({**state, "num_frames": other.num_frames})
    with pytest.raises(StreamError, match="another selection of frames"):
        resumed.load_state_dict(other.state_dict() | {"num_frames": resumed.num_frames})


def _assert_same_sample(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if key == "sample_index":
            continue
        va, vb = a[key], b[key]
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb), key
        else:
            assert va == vb, key


def test_map_style_access_returns_exactly_what_iteration_yields(split):
    fields = (*OCC, "points", "images", "ego2global", "scene_token", "scenario_tags")
    kwargs = dict(fields=fields, history=2, point_sweeps=1, image_size=(16, 8), seed=3)
    stream = FrameStream(split.root, split.split, **kwargs)
    streamed = {s["token"]: s for s in stream}
    assert len(streamed) == stream.num_frames == len(split.frames)
    stored = _selected(split, lambda f: True)
    for i, token in enumerate(stored):
        by_index = stream[i]
        assert by_index["token"] == token and by_index["sample_index"] == -1
        assert "history_semantics" in by_index and "history_images" in by_index
        _assert_same_sample(by_index, streamed[token])
        _assert_same_sample(stream.get(token), streamed[token])
        assert stream.index_of(token) == i
    _assert_same_sample(stream[-1], stream[len(stored) - 1])
    for bad in (len(stored), -len(stored) - 1):
        with pytest.raises(IndexError, match="out of range"):
            stream[bad]


def test_map_style_access_follows_the_filtered_subset(split):
    where = pc.field("frame_idx") >= 2
    stream = FrameStream(split.root, split.split, fields=("semantics", "frame_idx"), where=where, history=1)
    subset = _selected(split, lambda f: _frame_idx(split, f) >= 2)
    assert [stream[i]["token"] for i in range(stream.num_frames)] == subset
    streamed = {s["token"]: s for s in stream}
    for i, token in enumerate(subset):
        _assert_same_sample(stream[i], streamed[token])
    outside = next(t for t in split.frames if t not in set(subset))
    with pytest.raises(KeyError, match="among the frames this stream serves"):
        stream.get(outside)


def test_a_filter_reads_the_rows_through_the_dataset_handle(tmp_path):
    """A frame shard that disagrees with the manifest is refused when the filter reads it."""
    info = build_split(tmp_path, scenes_per_log=((3,), (4,)))
    path = tmp_path / "mini" / "manifest.json"
    data = json.loads(path.read_text())
    data["logs"][info.log_names[1]]["frames"] = 9
    path.write_text(json.dumps(data))
    with pytest.raises(StreamError, match=rf"log {info.log_names[1]}: .* has 4 rows, the manifest says 9"):
        FrameStream(tmp_path, "mini", fields=("token",), map_locations=["las_vegas", "boston"])


def test_the_filter_columns_of_many_logs_are_kept_and_any_change_is_read_again(split, tmp_path, monkeypatch):
    """The columns a filter read are kept in the cache folder: the next stream over the same logs reads no
    shard and selects the same frames; a damaged entry, or a shard changed under the same manifest, is
    read again; the folder keeps a bounded number of entries."""
    import os
    import shutil

    import pyarrow.parquet as pq

    from driveengine.data import filters
    from driveengine.store.dataset import CommittedLog

    monkeypatch.setattr(filters, "CACHE_MIN_LOGS", 1)  # the fixture has 4 logs
    monkeypatch.setattr(filters, "CACHE_ENTRIES", 2)
    root = tmp_path / "out"
    shutil.copytree(split.root, root)
    cache = tmp_path / "cache"
    folder = cache / filters.CACHE_FOLDER
    where = pc.field("frame_idx") >= 3

    def tokens(**kw) -> list[str]:
        stream = FrameStream(root, split.split, fields=("token",), shuffle=False, cache_dir=cache, **kw)
        return [s["token"] for s in stream]

    reads: list[str] = []
    real_frames = CommittedLog.frames

    def counted(self, columns=None):
        reads.append(self.name)
        return real_frames(self, columns)

    monkeypatch.setattr(CommittedLog, "frames", counted)
    expected = _selected(split, lambda f: _frame_idx(split, f) >= 3)
    assert tokens(where=where, cache_limit_bytes=0) == expected and not folder.exists()  # no cache: none kept
    reads.clear()
    FrameStream(root, split.split, fields=("token",), where=where, cache_dir=cache)
    assert len(reads) == 4 and len(list(folder.glob("*.arrow"))) == 1
    reads.clear()
    stream = FrameStream(root, split.split, fields=("token",), shuffle=False, where=where, cache_dir=cache)
    assert reads == []  # kept: no shard read to build the stream
    assert [s["token"] for s in stream] == expected

    (entry,) = folder.glob("*.arrow")
    entry.write_bytes(entry.read_bytes()[:200])  # damaged (a disk that filled up, a crash)
    reads.clear()
    assert tokens(where=where) == expected and len(reads) >= 4
    assert entry.stat().st_size > 200  # written again

    # a shard rewritten under the same manifest (same rows, other frame_idx): read again, not served stale
    log = split.log_names[0]
    shard = root / split.split / "meta" / f"{log}.parquet"
    table = pq.read_table(shard)
    column = table.schema.get_field_index("frame_idx")
    table = table.set_column(column, table.schema.field(column), pa.array([0] * table.num_rows, pa.int32()))
    pq.write_table(table, shard.with_suffix(".new"))
    os.replace(shard.with_suffix(".new"), shard)
    fresh = tokens(where=where, cache_limit_bytes=0)
    assert fresh != expected and not any(split.frames[t].log == log for t in fresh)
    assert tokens(where=where) == fresh

    tokens(where=pc.field("timestamp") > 0)  # other columns: other entries, at most CACHE_ENTRIES kept
    tokens(map_locations=["boston"])
    assert len(list(folder.glob("*.arrow"))) == 2
