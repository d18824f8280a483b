"""FrameStream on real files: contents, epochs, resume, random access, history, sensors, bad input, S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from driveengine.schemas.classes import FREE
from stream_fixtures import build_split

from driveengine.data import FrameStream, StreamError, collate_frames
from driveengine.geometry import invert_transform
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.store.manifest import ManifestError

OCC = ("semantics", "flow", "mask_lidar")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return build_split(tmp_path_factory.mktemp("out"), points=True, images=True)


def _tokens(stream_or_loader) -> list[str]:
    out: list[str] = []
    for item in stream_or_loader:
        out.extend(item["token"] if isinstance(item["token"], list) else [item["token"]])
    return out


def test_samples_match_what_was_written(split):
    stream = FrameStream(split.root, split.split, fields=(*OCC, "ego2global", "scene_token"), seed=1)
    seen = []
    for s in stream:
        truth = split.frames[s["token"]]
        assert s["log_name"] == truth.log and s["row"] == truth.row
        assert np.array_equal(s["semantics"], truth.semantics)
        assert np.array_equal(s["flow"], truth.flow)
        assert np.array_equal(s["mask_lidar"], truth.mask_lidar)
        assert s["semantics"].dtype == np.uint8 and s["flow"].dtype == np.float16
        assert np.allclose(s["ego2global"], truth.ego2global)
        assert s["scene_token"] == truth.scene
        seen.append(s["token"])
    assert sorted(seen) == sorted(split.frames)


def test_a_bounded_number_of_open_logs_reads_the_same(split):
    kwargs = dict(fields=("semantics", "flow", "token"), seed=2)
    small = {s["token"]: s for s in FrameStream(split.root, split.split, max_open_logs=1, **kwargs)}
    assert sorted(small) == sorted(split.frames)
    for tok, s in small.items():
        assert np.array_equal(s["semantics"], split.frames[tok].semantics)
        assert np.array_equal(s["flow"], split.frames[tok].flow)


def test_zarr_and_fast_reads_agree(split):
    kwargs = dict(fields=OCC, seed=2, shuffle=False)
    fast = list(FrameStream(split.root, split.split, **kwargs))
    slow = list(FrameStream(split.root, split.split, fast_reads=False, **kwargs))
    for a, b in zip(fast, slow, strict=True):
        for key in OCC:
            assert np.array_equal(a[key], b[key])


def test_only_requested_fields_are_present(split):
    stream = FrameStream(split.root, split.split, fields=("flow",))
    s = next(iter(stream))
    assert set(s) == {"token", "log_name", "row", "sample_index", "dataset", "flow"}
    assert s["dataset"] == stream.dataset_name == "nuplan"  # the split's dataset, from the manifest
    assert stream.grid.shape == s["flow"].shape[:3] and stream.classes.free == FREE
    assert stream.cameras == CAMERA_CHANNELS


def test_epochs_differ_and_seed_repeats(split):
    stream = FrameStream(split.root, split.split, fields=("semantics",), seed=7)
    e0 = _tokens(stream)
    stream.set_epoch(1)
    e1 = _tokens(stream)
    again = FrameStream(split.root, split.split, fields=("semantics",), seed=7)
    assert e0 == _tokens(again)
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(split.frames)
    unshuffled = _tokens(FrameStream(split.root, split.split, fields=("token",), shuffle=False))
    assert unshuffled == [t for name in split.log_names for t, f in split.frames.items() if f.log == name]


def test_dataloader_workers_keep_the_global_order(split):
    kwargs = dict(fields=("semantics",), seed=3, global_batch_size=5)
    reference = _tokens(FrameStream(split.root, split.split, **kwargs).loader(num_workers=0))
    with_workers = _tokens(FrameStream(split.root, split.split, **kwargs).loader(num_workers=2))
    assert with_workers == reference
    assert len(reference) == 25 and sorted(reference) == sorted(split.frames)  # 25 frames, 5 batches


def test_batches_are_tensors(split):
    loader = FrameStream(split.root, split.split, fields=(*OCC, "ego2global"), global_batch_size=4).loader()
    batch = next(iter(loader))
    assert batch["semantics"].shape == (4, 16, 16, 8) and batch["semantics"].dtype == torch.uint8
    assert batch["flow"].dtype == torch.float16 and batch["mask_lidar"].dtype == torch.bool
    assert batch["ego2global"].shape == (4, 4, 4) and batch["ego2global"].dtype == torch.float64
    assert isinstance(batch["token"], list) and len(batch["token"]) == 4
    for i, tok in enumerate(batch["token"]):
        assert np.array_equal(batch["semantics"][i].numpy(), split.frames[tok].semantics)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(split, num_workers):
    kwargs = dict(fields=("semantics",), seed=11, global_batch_size=4)
    full = FrameStream(split.root, split.split, **kwargs)
    full.set_epoch(2)
    expected = [b["token"] for b in full.loader(num_workers=num_workers)]  # 25 -> 28 samples, 7 batches

    first = FrameStream(split.root, split.split, **kwargs)
    first.set_epoch(2)
    consumed = []
    for step, batch in enumerate(first.loader(num_workers=num_workers)):
        consumed.append(batch["token"])
        if step == 2:
            break
    state = json.loads(json.dumps(first.state_dict(num_samples=3 * 4)))  # survives a checkpoint file

    resumed = FrameStream(split.root, split.split, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop's usual call keeps the resume point
    rest = [b["token"] for b in resumed.loader(num_workers=num_workers)]
    assert consumed + rest == expected
    assert len(rest) == 4
    resumed.set_epoch(3)  # the next epoch starts from its beginning
    assert len(list(resumed.loader(num_workers=0))) == 7


def test_in_process_state_counts_yielded_samples(split):
    stream = FrameStream(split.root, split.split, fields=("token",), seed=2, global_batch_size=4)
    it = iter(stream)
    head = [next(it)["token"] for _ in range(8)]
    state = stream.state_dict()
    assert state["num_samples"] == 8 and state["epoch"] == 0
    other = FrameStream(split.root, split.split, fields=("token",), seed=2, global_batch_size=4)
    other.load_state_dict(state)
    assert head + _tokens(other) == _tokens(
        FrameStream(split.root, split.split, fields=("token",), seed=2, global_batch_size=4)
    )


def test_resume_rejects_a_state_of_another_configuration(split):
    state = FrameStream(split.root, split.split, seed=1).state_dict(0)
    with pytest.raises(StreamError, match="seed"):
        FrameStream(split.root, split.split, seed=2).load_state_dict(state)
    batched = FrameStream(split.root, split.split, seed=1, global_batch_size=4)
    with pytest.raises(StreamError, match="not a whole number of global batches"):
        batched.load_state_dict({**batched.state_dict(0), "num_samples": 6})


def test_get_equals_streamed_sample_and_history_precedes_in_scene(split):
    fields = (*OCC, "ego2global", "scene_token", "frame_idx")
    stream = FrameStream(split.root, split.split, fields=fields, history=2, seed=5)
    checked_valid = 0
    for s in stream:
        g = stream.get(s["token"])
        assert g["sample_index"] == -1
        for key in (*fields, "history_valid", "ego_from_history", "history_semantics", "history_flow"):
            assert np.array_equal(np.asarray(g[key]), np.asarray(s[key])), key
        truth = split.frames[s["token"]]
        for j, (tok, valid) in enumerate(zip(s["history_tokens"], s["history_valid"], strict=True)):
            h = split.frames[tok]
            assert h.scene == truth.scene and h.log == truth.log
            if valid:
                checked_valid += 1
                assert h.row == truth.row - (j + 1)
                expected = invert_transform(truth.ego2global) @ h.ego2global
                assert np.allclose(s["ego_from_history"][j], expected)
                assert np.array_equal(s["history_semantics"][j], h.semantics)
            else:
                assert s["frame_idx"] <= j  # only missing before the scene's start
                assert h.row <= truth.row
    assert checked_valid > 10
    with pytest.raises(KeyError):
        stream.get("ffffffffffffffff")


def test_points_and_sweeps(split):
    stream = FrameStream(
        split.root, split.split, fields=("points", "ego2global", "frame_idx"), point_sweeps=1
    )
    for s in stream:
        truth = split.frames[s["token"]]
        key = s["points"][: len(truth.points)]
        assert np.allclose(key[:, :4], truth.points) and (key[:, 4] == 0).all()
        extra = s["points"][len(truth.points) :]
        if s["frame_idx"] == 0:
            assert len(extra) == 0
        else:
            prev = next(f for f in split.frames.values() if f.log == truth.log and f.row == truth.row - 1)
            moved = invert_transform(truth.ego2global) @ prev.ego2global
            expected = prev.points[:, :3] @ moved[:3, :3].T + moved[:3, 3]
            assert np.allclose(extra[:, :3], expected, atol=1e-4)
            assert np.allclose(extra[:, 4], 0.5)


def test_a_sweep_file_larger_than_a_sweep_can_be_is_refused_unread(split, monkeypatch, tmp_path):
    """The points field reads at most ``MAX_SWEEP_BYTES`` + 1 bytes of a sweep file and refuses a
    larger one in one line naming the log and the file (collect drops such sweeps; this is a file changed
    since)."""
    import driveengine.sources.base as sources_base
    from driveengine.data.reader import BlobFiles

    big = tmp_path / "big.pcd"
    big.write_bytes(bytes(1000))
    assert len(BlobFiles({}).read(str(big), limit=10)) == 11 and len(BlobFiles({}).read(str(big))) == 1000
    monkeypatch.setattr(sources_base, "MAX_SWEEP_BYTES", 10)
    stream = FrameStream(split.root, split.split, fields=("points",), shuffle=False)
    with pytest.raises(
        StreamError, match=r"^log \S+: sensor file \S+\.pcd is larger than 10 bytes: damaged\?"
    ):
        next(iter(stream))


def test_images_are_resized_with_scaled_intrinsics(split):
    stream = FrameStream(
        split.root, split.split, fields=("images",), image_size=(32, 18), shuffle=False, history=2
    )
    s = next(iter(stream))
    assert s["history_images"].shape == (2, 8, 3, 18, 32) and not s["history_valid"].any()  # scene start
    assert np.array_equal(s["history_intrinsics"][0], s["intrinsics"])
    assert s["images"].shape == (8, 3, 18, 32) and s["images"].dtype == np.float32
    assert np.allclose(s["images"][3].mean(), 60 / 255, atol=0.02)  # camera 3 was painted 20*3
    assert np.allclose(s["intrinsics"][:, 0, 0], 50.0) and np.allclose(s["intrinsics"][:, 1, 2], 9.0)
    assert np.allclose(s["ego_from_camera"][2, :3, 3], [3.0, 0.0, 1.5])


def test_unknown_field_is_refused_when_the_stream_is_built(split):
    with pytest.raises(StreamError, match=r"unknown field 'no_such_column'.*meta/2021\..*parquet") as exc:
        FrameStream(split.root, split.split, fields=("no_such_column",))
    message = str(exc.value)
    assert "valid fields: points, images, semantics, flow, mask_lidar, token," in message
    assert "did you mean" not in message and "\n" not in message
    with pytest.raises(StreamError, match=r"unknown field 'semantic'.*did you mean 'semantics'\?"):
        FrameStream(split.root, split.split, fields=("semantic", "flow"))
    with pytest.raises(StreamError, match=r"did you mean 'scene_token'"):
        FrameStream(split.root, split.split, fields=("scene_tokn",))


def test_missing_occupancy_shard_names_the_log(tmp_path):
    info = build_split(tmp_path, scenes_per_log=((3,), (4,)))
    victim = info.log_names[1]
    shutil.rmtree(tmp_path / "mini" / "occ" / f"{victim}.zarr")
    with pytest.raises(StreamError, match=f"log {victim}: .*occ/{victim}.zarr: no such Zarr group"):
        list(FrameStream(tmp_path, "mini", fields=OCC))
    # Fields that do not need the labels still stream.
    assert len(list(FrameStream(tmp_path, "mini", fields=("token",)))) == 7


def test_missing_frame_rows_name_the_log(tmp_path):
    info = build_split(tmp_path, scenes_per_log=((3,), (4,)))
    (tmp_path / "mini" / "meta" / f"{info.log_names[0]}.parquet").unlink()
    name = info.log_names[0]
    with pytest.raises(StreamError, match=f"log {name}: .*meta/{name}.parquet: frame shard missing"):
        list(FrameStream(tmp_path, "mini", fields=("semantics",)))


def test_newer_manifest_version_is_refused(tmp_path):
    build_split(tmp_path, scenes_per_log=((3,),))
    path = tmp_path / "mini" / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format version 99"):
        FrameStream(tmp_path, "mini")
    with pytest.raises(ManifestError, match="no manifest"):
        FrameStream(tmp_path, "nosuchsplit")


def test_truncated_zarr_chunk_names_the_log(tmp_path):
    info = build_split(tmp_path, scenes_per_log=((3,), (6,)))
    victim = info.log_names[1]
    shard_dir = tmp_path / "mini" / "occ" / f"{victim}.zarr" / "flow"
    shard = sorted(p for p in shard_dir.rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StreamError, match=f"log {victim}: cannot decode flow frames"):
        list(FrameStream(tmp_path, "mini", fields=("flow",)))


def test_frame_count_mismatch_is_reported(tmp_path):
    info = build_split(tmp_path, scenes_per_log=((3,),))
    path = tmp_path / "mini" / "manifest.json"
    data = json.loads(path.read_text())
    data["logs"][info.log_names[0]]["frames"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(StreamError, match=r"has 3 (rows|frames), the manifest says 5"):
        list(FrameStream(tmp_path, "mini", fields=("semantics",)))


def test_collate_rejects_mixed_samples():
    with pytest.raises(ValueError):
        collate_frames([{"a": 1}, {"b": 2}])
    batch = collate_frames([{"p": np.zeros((2, 4))}, {"p": np.ones((3, 4))}], pin_memory=False)
    assert [t.shape[0] for t in batch["p"]] == [2, 3]


def _upload(fs, local: Path, remote: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{remote}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_s3_streams_the_same_samples_as_disk(split, monkeypatch, tmp_path):
    pytest.importorskip("moto")
    monkeypatch.setenv("DRIVEENGINE_CACHE_DIR", str(tmp_path / "cache"))  # remote reads go through a cache
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "endpoint_url": f"http://{host}:{port}",
            "key": "testing",
            "secret": "testing",
        }
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bucket")
        _upload(fs, Path(split.root) / split.split, "bucket/data/mini")
        kwargs = dict(fields=(*OCC, "ego2global"), seed=4, global_batch_size=5)
        remote = FrameStream("s3://bucket/data", "mini", storage_options=options, **kwargs)
        local = FrameStream(split.root, split.split, **kwargs)
        pairs = list(zip(remote.loader(num_workers=0), local.loader(num_workers=0), strict=True))
        assert len(pairs) == 5
        for r, lo in pairs:
            assert r["token"] == lo["token"]
            for key in (*OCC, "ego2global"):
                assert torch.equal(r[key], lo[key])
        # A filter reads the remote rows through the same handle: the same subset, the same samples.
        import pyarrow.compute as pc

        flt = dict(where=pc.field("frame_idx") >= 1, scenario_tags=["stationary", "turning"])
        remote = FrameStream(
            "s3://bucket/data", "mini", storage_options=options, fields=OCC, history=1, **flt
        )
        local = FrameStream(split.root, split.split, fields=OCC, history=1, **flt)
        assert 0 < remote.num_frames == local.num_frames < len(split.frames)
        assert remote.state_dict()["subset"] == local.state_dict()["subset"]
        for r, lo in zip(remote, local, strict=True):
            assert r["token"] == lo["token"] and np.array_equal(r["history_flow"], lo["history_flow"])
            assert np.array_equal(remote.get(r["token"])["semantics"], lo["semantics"])
    finally:
        s3fs.S3FileSystem(**options).rm("bucket", recursive=True)  # moto keeps buckets after it stops
        server.stop()


@pytest.mark.slow
def test_end_to_end_on_synth_and_collect_output(tmp_path):
    """synth -> collect (labels on) -> FrameStream: labels, points and images as the store holds them."""
    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.sources.pcd import read_pcd
    from driveengine.store.manifest import load_manifest
    from driveengine.store.occ import open_occ
    from driveengine.synth import synthesize

    nuplan, out = tmp_path / "nuplan", tmp_path / "out"
    synthesize(nuplan, logs=1, seconds=3.0, seed=3, split="mini", points=3000, image_size=(64, 36))
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=nuplan, out=out, split="mini", progress=False),
        echo=print,
    )
    assert summary.ok and summary.frames >= 4
    manifest = load_manifest(out / "mini")
    ((_, entry),) = manifest.logs.items()
    occ = open_occ(out / "mini" / entry.occ)
    fields = (*OCC, "points", "images", "lidar_path", "scene_token", "frame_idx")
    # No sensor_root given: the stream finds the blobs next to the source log, as collect did.
    stream = FrameStream(out, "mini", fields=fields, history=1, image_size=(32, 18), global_batch_size=2)
    batches = list(stream.loader(num_workers=0))
    samples = [dict(zip(b, vals, strict=True)) for b in batches for vals in zip(*b.values(), strict=True)]
    assert sorted(s["row"].item() for s in samples) == list(range(entry.frames))
    for s in samples:
        row = s["row"].item()
        frame = occ.frame(row)
        assert np.array_equal(s["semantics"].numpy(), frame.semantics)
        assert np.array_equal(s["flow"].numpy(), frame.flow)
        assert np.array_equal(s["mask_lidar"].numpy(), frame.mask_lidar)
        cloud = read_pcd(nuplan / "sensor_blobs" / s["lidar_path"])
        assert np.allclose(s["points"][:, :3].numpy(), cloud.xyz)
        assert s["images"].shape == (8, 3, 18, 32) and float(s["images"].max()) <= 1.0
        assert s["history_valid"].item() == (s["frame_idx"].item() > 0)
    assert (samples[0]["semantics"] != FREE).any()


def test_fast_reader_handles_empty_chunks_and_missing_shards(tmp_path):
    from stream_fixtures import SMALL_GRID

    from driveengine.store.occ import OccStorage, create_occ, open_occ
    from driveengine.store.shards import FrameArrayReader

    shape = SMALL_GRID.shape
    sem = np.full((10, *shape), FREE, np.uint8)
    sem[1, 3, 4, 5] = 7  # frames 0 and 2..3 of shard 0 are all free; shard 1 (4..7) entirely
    sem[9] = 10
    path = tmp_path / "occ.zarr"
    with create_occ(path, 10, generator={}, grid=SMALL_GRID, storage=OccStorage(shard_frames=4)) as w:
        for i in range(10):
            w.append(semantics=sem[i], flow=np.zeros((*shape, 2)), mask_lidar=sem[i] != FREE)
    group = open_occ(path).group
    for name in OCC:
        reader = FrameArrayReader.for_array(group[name], str(path / name), None)
        assert reader is not None
        out = np.empty((10, *group[name].shape[1:]), group[name].dtype)
        reader.read(0, 10, out)
        assert np.array_equal(out, group[name][:])
    assert np.array_equal(out[:, 3, 4, 5], sem[:, 3, 4, 5] != FREE)
