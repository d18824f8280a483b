"""The occ/<log>.zarr writer and reader (driveengine/store/occ.py, schemas/occ.py) on real Zarr v3 stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from driveengine.schemas import FORMAT_VERSION, FREE, GRID, VoxelGrid
from driveengine.schemas.occ import OCC_ARRAYS, OCC_FORMAT, REQUIRED_ARRAYS

from driveengine.store.occ import OccDataError, OccFormatError, OccStorage, create_occ, open_occ

SMALL = VoxelGrid((-2.0, -2.0, -1.0), (2.0, 2.0, 1.0), 0.5)  # 8 x 8 x 4


def frame_arrays(frame: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    """A (semantics, flow, mask_lidar) tuple as the writer's keyword arrays."""
    return dict(zip(REQUIRED_ARRAYS, frame, strict=True))


def _frames(n: int, grid: VoxelGrid, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sem = rng.choice(np.array([0, 7, 10, FREE], np.uint8), grid.shape, p=[0.1, 0.1, 0.2, 0.6])
        flow = np.where((sem < 10)[..., None], rng.normal(size=(*grid.shape, 2)), 0).astype(np.float16)
        out.append((sem, flow, rng.random(grid.shape) < 0.5))
    return out


def test_written_group_has_the_specified_arrays_and_reads_back(tmp_path: Path) -> None:
    frames = _frames(7, SMALL)
    path = tmp_path / "log.zarr"
    with create_occ(
        path,
        7,
        generator={"name": "test"},
        grid=SMALL,
        storage=OccStorage(shard_frames=3),
        timestamps_us=np.arange(7) * 10,
    ) as w:
        for f in frames:
            w.append(**frame_arrays(f))
        w.set_stats({"frames": 7})
    # the Zarr v3 metadata on disk, as any other reader sees it
    meta = json.loads((path / "semantics" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "uint8" and meta["fill_value"] == FREE
    assert meta["dimension_names"] == ["frame", "x", "y", "z"]
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, 8, 8, 4]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 8, 8, 4]  # the shard
    assert {c["name"] for c in sharding["configuration"]["codecs"]} >= {"zstd"}
    assert len(list((path / "semantics" / "c").iterdir())) == 3  # shards 0..2 of 7 frames

    occ = open_occ(path)
    assert occ.num_frames == 7 and occ.grid == SMALL
    assert occ.attrs["format"] == OCC_FORMAT and occ.attrs["format_version"] == FORMAT_VERSION
    assert (
        occ.attrs["grid"] == json.loads(json.dumps(SMALL.to_dict())) and occ.attrs["classes"]["16"] == "free"
    )
    assert occ.attrs["timestamps_us"] == list(range(0, 70, 10)) and occ.attrs["stats"] == {"frames": 7}
    for name, spec in OCC_ARRAYS.items():
        arr = occ.group[name]
        assert arr.dtype == spec.dtype and arr.chunks == (1, *SMALL.shape, *spec.frame_shape[3:])
        assert arr.shards == (3, *SMALL.shape, *spec.frame_shape[3:])
    for i, (sem, flow, mask) in enumerate(frames):
        got = occ.frame(i)
        assert np.array_equal(got.semantics, sem) and np.array_equal(got.flow, flow)
        assert np.array_equal(got.mask_lidar, mask)
    block = occ.read(2, 5)
    assert block["semantics"].shape == (3, *SMALL.shape)
    assert np.array_equal(block["flow"][1], frames[3][1])


def test_plain_zarr_reads_the_group_without_driveengine(tmp_path: Path) -> None:
    frames = _frames(2, GRID, seed=1)
    with create_occ(tmp_path / "g.zarr", 2, generator={}) as w:
        for f in frames:
            w.append(**frame_arrays(f))
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    assert g["flow"].shape == (2, 200, 200, 16, 2) and g["flow"].dtype == np.float16
    assert np.array_equal(g["semantics"][1], frames[1][0])


def test_writer_holds_one_shard_and_checks_the_frame_count(tmp_path: Path) -> None:
    frames = _frames(4, SMALL)
    with create_occ(
        tmp_path / "a.zarr", 5, generator={}, grid=SMALL, storage=OccStorage(shard_frames=2)
    ) as w:
        for i, f in enumerate(frames):
            w.append(**frame_arrays(f))
            assert all(len(d._chunks) < 2 for d in w._direct.values())  # at most one shard held
            # complete shards are on disk, the buffered frames are not yet
            on_disk = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["semantics"][:]
            done = (i + 1) // 2 * 2
            for j in range(5):
                expected = frames[j][0] if j < done else np.full(SMALL.shape, FREE)
                assert np.array_equal(on_disk[j], expected)
        with pytest.raises(ValueError, match="4 frames appended, 5 declared"):
            w.close()
    w2 = create_occ(tmp_path / "b.zarr", 1, generator={}, grid=SMALL)
    w2.append(**frame_arrays(_frames(1, SMALL)[0]))
    with pytest.raises(ValueError, match="more than the 1 frames"):
        w2.append(**frame_arrays(_frames(1, SMALL)[0]))
    with pytest.raises(ValueError, match="shape"):
        create_occ(tmp_path / "c.zarr", 1, generator={}, grid=SMALL).append(
            semantics=np.zeros((2, 2, 2), np.uint8),
            flow=np.zeros((8, 8, 4, 2)),
            mask_lidar=np.zeros((8, 8, 4), bool),
        )
    with pytest.raises(ValueError, match="needs exactly the arrays"):
        create_occ(tmp_path / "d.zarr", 1, generator={}, grid=SMALL).append(
            semantics=np.zeros(SMALL.shape, np.uint8)
        )


def test_unwritten_frames_are_an_error_and_empty_logs_work(tmp_path: Path) -> None:
    with create_occ(tmp_path / "e.zarr", 0, generator={}) as w:
        assert w.num_frames == 0
    assert open_occ(tmp_path / "e.zarr").num_frames == 0
    assert all(v.shape[0] == 0 for v in open_occ(tmp_path / "e.zarr").read().values())
    w = create_occ(tmp_path / "p.zarr", 3, generator={}, grid=SMALL, storage=OccStorage(shard_frames=2))
    w.append(**frame_arrays(_frames(1, SMALL)[0]))
    w.append(
        **frame_arrays(_frames(1, SMALL)[0])
    )  # first shard flushed; frame 2 never written (a crashed writer)
    occ = open_occ(tmp_path / "p.zarr")
    assert occ.frame(1).semantics.shape == SMALL.shape
    # zarr alone would read frame 2 as fill values (all free, no flow): DriveEngine refuses
    assert np.all(occ.semantics[2] == FREE)
    with pytest.raises(
        OccDataError,
        match=r"log p: .*p\.zarr/semantics/c/1/0/0/0: the shard file of semantics frames 2\.\.2 is missing",
    ):
        occ.frame(2)
    with pytest.raises(OccDataError, match=r"semantics/c/1/0/0/0"):
        occ.read(0, 3)


def test_every_shard_file_is_written_even_when_all_fill(tmp_path: Path) -> None:
    """All free, zero flow, unobserved frames are stored: a missing shard file always means damage."""
    n = 5
    with create_occ(
        tmp_path / "f.zarr", n, generator={}, grid=SMALL, storage=OccStorage(shard_frames=2)
    ) as w:
        for _ in range(n):
            w.append(
                semantics=np.full(SMALL.shape, FREE, np.uint8),
                flow=np.zeros((*SMALL.shape, 2)),
                mask_lidar=np.zeros(SMALL.shape, bool),
            )
    for name in OCC_ARRAYS:
        shards = sorted(
            p.relative_to(tmp_path / "f.zarr" / name).as_posix()
            for p in (tmp_path / "f.zarr" / name / "c").rglob("*")
            if p.is_file()
        )
        assert [s.split("/")[1] for s in shards] == ["0", "1", "2"], name
    block = open_occ(tmp_path / "f.zarr").read()
    assert np.all(block["semantics"] == FREE) and not block["flow"].any() and not block["mask_lidar"].any()


def test_deleted_and_damaged_shards_name_the_log_and_file(tmp_path: Path) -> None:
    frames = _frames(6, SMALL)
    path = tmp_path / "2021.01.01.00.00.00_veh-1_00001_00002.zarr"
    with create_occ(path, 6, generator={}, grid=SMALL, storage=OccStorage(shard_frames=2)) as w:
        for f in frames:
            w.append(**frame_arrays(f))
    (path / "flow" / "c" / "1" / "0" / "0" / "0" / "0").unlink()
    occ = open_occ(path)
    np.testing.assert_array_equal(occ.frame(0).semantics, frames[0][0])  # other shards still read
    with pytest.raises(OccDataError) as exc:
        occ.frame(3)
    message = str(exc.value)
    assert message.startswith("log 2021.01.01.00.00.00_veh-1_00001_00002: ")
    assert f"{path}/flow/c/1/0/0/0/0: the shard file of flow frames 2..3 is missing" in message
    assert "--overwrite" in message and "\n" not in message
    mask_shard = path / "mask_lidar" / "c" / "2" / "0" / "0" / "0"
    mask_shard.write_bytes(mask_shard.read_bytes()[:-30])  # truncated
    with pytest.raises(
        OccDataError,
        match=r"veh-1_00001_00002: .*mask_lidar/c/2/0/0/0: mask_lidar frames 4\.\.4 do not decode",
    ):
        occ.frame(4)
    with pytest.raises(OccDataError, match=r"mask_lidar/c/2/0/0/0: mask_lidar frames 4\.\.5 do not decode"):
        open_occ(path).read(4, 6)  # whole-shard reads too
    mask_shard.write_bytes(b"")  # emptied: zarr alone reads an empty file as fill values
    assert not open_occ(path).mask_lidar[4:6].any()
    with pytest.raises(
        OccDataError,
        match=r"mask_lidar/c/2/0/0/0: the shard file of mask_lidar frames 4\.\.5 is truncated \(0 bytes\)",
    ):
        open_occ(path).read(4, 6)


@pytest.mark.parametrize(
    ("file", "damage", "reason"),
    [
        ("zarr.json", lambda t: "{not json", "malformed group metadata (JSONDecodeError"),
        ("zarr.json", lambda t: "[1, 2]", "malformed group metadata"),
        ("zarr.json", lambda t: json.dumps({**json.loads(t), "attributes": "x"}), "malformed group metadata"),
        ("zarr.json", lambda t: _attrs(t, grid="x"), "malformed group attribute grid"),
        ("zarr.json", lambda t: _attrs(t, grid={"voxel_size_m": 0.5}), "malformed group attribute grid"),
        (
            "zarr.json",
            lambda t: _attrs(t, grid={"range_min_m": [0, 0, 0], "range_max_m": [1, 1, 1], "voxel_size_m": 0}),
            "voxel_size_m > 0",
        ),
        ("flow/zarr.json", lambda t: "", "malformed metadata of array 'flow' (JSONDecodeError"),
        (
            "semantics/zarr.json",
            lambda t: json.dumps({**json.loads(t), "shape": "abc"}),
            "malformed metadata of array 'semantics' (TypeError",
        ),
        (
            "semantics/zarr.json",
            lambda t: json.dumps({**json.loads(t), "data_type": 5}),
            "malformed metadata of array 'semantics'",
        ),
        (
            "mask_lidar/zarr.json",
            lambda t: json.dumps({**json.loads(t), "codecs": "x"}),
            "malformed metadata of array 'mask_lidar'",
        ),
        (
            "mask_lidar/zarr.json",
            lambda t: json.dumps({**json.loads(t), "node_type": "group"}),
            "malformed metadata of array 'mask_lidar'",
        ),
    ],
)
def test_garbage_zarr_json_is_an_occ_format_error_naming_the_file(
    tmp_path: Path, file, damage, reason
) -> None:
    path = tmp_path / "log.zarr"
    with create_occ(path, 1, generator={}, grid=SMALL) as w:
        w.append(**frame_arrays(_frames(1, SMALL)[0]))
    target = path / file
    target.write_text(damage(target.read_text()))
    with pytest.raises(OccFormatError) as exc:
        open_occ(path)
    assert str(exc.value).startswith(f"{target}: ") and reason in str(exc.value)


def _attrs(text: str, **changes) -> str:
    data = json.loads(text)
    data["attributes"].update(changes)
    return json.dumps(data)


def test_open_occ_rejects_other_formats_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(OccFormatError, match="no such Zarr group"):
        open_occ(tmp_path / "missing.zarr")
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.attrs["format"] = "something-else"
    with pytest.raises(OccFormatError, match=r"other\.zarr.*format"):
        open_occ(tmp_path / "other.zarr")
    with create_occ(tmp_path / "new.zarr", 1, generator={}, grid=SMALL) as w:
        w.append(**frame_arrays(_frames(1, SMALL)[0]))
    zarr.open_group(str(tmp_path / "new.zarr"), mode="a").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(OccFormatError, match="upgrade driveengine"):
        open_occ(tmp_path / "new.zarr")


@pytest.mark.parametrize("set_fraction", [0.0, 0.001, 0.05, 0.5])
def test_sparse_float16_copy_gives_the_bytes_of_the_plain_cast(set_fraction: float) -> None:
    """The writer's fast path for mostly-zero float32 flow (zeros plus the cast of the set elements) writes
    exactly what numpy's cast writes, including -0.0, NaN, infinities, overflow and float16 subnormals; a
    denser array takes the plain cast."""
    from driveengine.store.occ import _copy_into

    rng = np.random.default_rng(1)
    value = np.zeros((40, 40, 8, 2), np.float32)
    n = int(set_fraction * value.size)
    idx = rng.choice(value.size, n, replace=False)
    special = np.array([-0.0, np.nan, np.inf, -np.inf, 1e6, -7e4, 3e-7, -6e-8, 65519.0, 1.0], np.float32)
    value.reshape(-1)[idx] = np.concatenate([special, rng.normal(size=max(n - special.size, 0))])[:n].astype(
        np.float32
    )
    out = np.full(value.shape, np.float16(9.0))  # stale values from an earlier frame must be overwritten
    with np.errstate(over="ignore"):
        _copy_into(out, value)
        expected = value.astype(np.float16)
    assert out.tobytes() == expected.tobytes()


@pytest.mark.parametrize("num_frames", [1, 5, 16, 21])
def test_direct_shard_writer_writes_the_bytes_zarr_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_frames: int
) -> None:
    """store/shards.py's writer (used for local groups) against zarr's own writer: the same files, byte for
    byte, for full and partial shards (frames beyond the array are empty index entries)."""
    import driveengine.store.occ as occ_module

    frames = _frames(num_frames, SMALL, seed=num_frames)
    arrays = (*REQUIRED_ARRAYS, "mask_camera")

    def write(path: Path) -> None:
        with create_occ(path, num_frames, generator={}, grid=SMALL, arrays=arrays) as w:
            for sem, flow, mask in frames:
                w.append(semantics=sem, flow=flow.astype(np.float32), mask_lidar=mask, mask_camera=~mask)

    write(tmp_path / "direct.zarr")
    with monkeypatch.context() as m:
        m.setattr(occ_module.FrameArrayWriter, "for_array", classmethod(lambda cls, *args: None))
        write(tmp_path / "zarr.zarr")
    files = sorted(
        p.relative_to(tmp_path / "zarr.zarr") for p in (tmp_path / "zarr.zarr").rglob("*") if p.is_file()
    )
    direct = sorted(
        p.relative_to(tmp_path / "direct.zarr") for p in (tmp_path / "direct.zarr").rglob("*") if p.is_file()
    )
    assert files == direct and any(f.parts[1] == "c" for f in files)
    for f in files:
        assert (tmp_path / "direct.zarr" / f).read_bytes() == (tmp_path / "zarr.zarr" / f).read_bytes(), f
    occ = open_occ(tmp_path / "direct.zarr")
    for i in (0, num_frames - 1):
        assert np.array_equal(occ.frame(i).semantics, frames[i][0])
        assert np.array_equal(occ.read(i, i + 1)["mask_camera"][0], ~frames[i][2])


def test_other_compressors_and_object_stores_take_zarrs_writer(tmp_path: Path) -> None:
    frames = _frames(3, SMALL)
    storage = OccStorage(compressor="blosc-lz4", compression_level=5)
    with create_occ(tmp_path / "b.zarr", 3, generator={}, grid=SMALL, storage=storage) as w:
        assert not w._direct  # blosc is not a layout store/shards.py writes
        for f in frames:
            w.append(**frame_arrays(f))
    with create_occ(tmp_path / "z.zarr", 3, generator={}, grid=SMALL) as w:
        assert set(w._direct) == set(REQUIRED_ARRAYS)
        for f in frames:
            w.append(**frame_arrays(f))
    for name in ("b.zarr", "z.zarr"):
        assert np.array_equal(open_occ(tmp_path / name).frame(2).semantics, frames[2][0])
