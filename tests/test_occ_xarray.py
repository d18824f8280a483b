"""Label groups carry coordinates (x/y/z in metres, frame/token/timestamp_us) and consolidated metadata,
so xarray opens them with labelled axes and no warning; DriveEngine's readers ignore the coordinate
arrays; frame rows carry an explicit frame_index (and old shards without it still read)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from collected_fixture import Collected, collected_split
from driveengine.schemas.frame import frame_schema
from driveengine.schemas.grid import VoxelGrid
from driveengine.schemas.occ import COORDINATE_ARRAYS, REQUIRED_ARRAYS

from driveengine.store.check import verify_split
from driveengine.store.dataset import open_split
from driveengine.store.occ import create_occ, open_occ

xr = pytest.importorskip("xarray")

SMALL = VoxelGrid((-2.0, -1.0, -1.0), (2.0, 1.0, 1.0), 0.5)  # 8 x 4 x 4


@pytest.fixture
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    return collected_split(tmp_path_factory)


def _open_xarray(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the consolidated-metadata warning (or any other) fails the test
        return xr.open_zarr(path)


def test_xarray_selects_a_collected_log_by_metres_and_by_token(collected: Collected) -> None:
    split = open_split(collected.split_dir)
    log = split.log(collected.log)
    rows = log.frames(["token", "timestamp", "frame_index"]).to_pydict()
    occ = log.labels()
    assert occ.num_frames == len(rows["token"]) >= 4
    ds = _open_xarray(Path(occ.path))
    assert set(ds.data_vars) == {*REQUIRED_ARRAYS, "mask_camera"}  # the coordinates are coordinates, not data
    assert set(ds.coords) == set(COORDINATE_ARRAYS)
    assert ds.semantics.dims == ("frame", "x", "y", "z") and ds.flow.dims[-1] == "component"
    assert list(ds.component.values) == ["vx", "vy"]
    # x/y/z are the voxel centres in metres
    np.testing.assert_allclose(ds.x.values, -49.75 + 0.5 * np.arange(200))
    np.testing.assert_allclose(ds.z.values, -3.75 + 0.5 * np.arange(16))
    assert ds.x.attrs["units"] == "m"
    # the frame coordinate is the rows' frame_index, token and timestamp_us are the rows' columns
    assert list(ds.frame.values) == rows["frame_index"] == list(range(occ.num_frames))
    assert list(ds.token.values) == rows["token"]
    assert list(ds.timestamp_us.values) == rows["timestamp"]

    i = occ.num_frames - 2
    labels = occ.frame(i)
    # select by token: the same labels as DriveEngine's reader gives for that row
    by_token = ds.set_xindex("token").sel(token=rows["token"][i])
    np.testing.assert_array_equal(by_token.semantics.values, labels.semantics)
    np.testing.assert_array_equal(by_token.mask_lidar.values, labels.mask_lidar)
    # select by metres: an occupied voxel and its neighbourhood
    occupied = np.argwhere(labels.semantics != occ.classes.free)
    ijk = occupied[len(occupied) // 2]
    x, y, z = (-50 + 0.5 * ijk[0] + 0.25, -50 + 0.5 * ijk[1] + 0.25, -4 + 0.5 * ijk[2] + 0.25)
    point = ds.semantics.sel(frame=i, x=x + 0.1, y=y - 0.1, z=z, method="nearest")
    assert int(point) == labels.semantics[tuple(ijk)] != occ.classes.free
    block = ds.semantics.sel(frame=i, x=slice(-10.0, 10.0), y=slice(-5.0, 5.0))
    assert block.shape == (40, 20, 16)  # 20 m / 0.5 m, 10 m / 0.5 m
    np.testing.assert_array_equal(block.values, labels.semantics[80:120, 90:110])


def test_readers_ignore_the_coordinate_arrays(collected: Collected, tmp_path: Path) -> None:
    split_dir = tmp_path / "mini"
    shutil.copytree(collected.split_dir, split_dir)
    log = open_split(split_dir).log(collected.log)
    occ = log.labels()
    assert occ.arrays == (*REQUIRED_ARRAYS, "mask_camera") and set(occ.coordinate_arrays) == set(
        COORDINATE_ARRAYS
    )
    assert verify_split(split_dir).ok
    # damage a label shard: verify names it, and names no coordinate file as foreign
    shard = Path(occ.shard_file("flow", 0))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    (Path(occ.path) / "semantics" / "c" / "stray").write_bytes(b"x")
    check = verify_split(split_dir)
    (problem,) = check.problems
    assert problem.path == f"occ/{collected.log}.zarr" and problem.status == "differs"
    foreign = [d for d in problem.details if d.startswith("not part of")]
    assert foreign == [f"not part of a DriveEngine label group: occ/{collected.log}.zarr/semantics/c/stray"]


def test_writer_coordinates_without_tokens_and_damaged_array_metadata(tmp_path: Path) -> None:
    path = tmp_path / "g.zarr"
    with create_occ(path, 3, generator={}, grid=SMALL, timestamps_us=[10, 20, 30]) as w:
        for _ in range(3):
            w.append(
                semantics=np.full(SMALL.shape, 16, np.uint8),
                flow=np.zeros((*SMALL.shape, 2), np.float32),
                mask_lidar=np.zeros(SMALL.shape, bool),
            )
    ds = _open_xarray(path)
    assert "token" not in ds.coords and list(ds.timestamp_us.values) == [10, 20, 30]
    np.testing.assert_allclose(ds.y.values, [-0.75, -0.25, 0.25, 0.75])
    assert json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]["semantics"]
    with pytest.raises(ValueError, match="2 tokens for 3 frames"):
        create_occ(tmp_path / "h.zarr", 3, generator={}, grid=SMALL, tokens=["a", "b"])
    # the consolidated copy does not hide a damaged array zarr.json from DriveEngine's reader
    (path / "flow" / "zarr.json").write_text("{")
    from driveengine.store.occ import OccFormatError

    with pytest.raises(OccFormatError, match=r"flow.zarr\.json: malformed metadata of array 'flow'"):
        open_occ(path)


def test_frame_index_column_and_shards_without_it(collected: Collected, tmp_path: Path) -> None:
    split_dir = tmp_path / "mini"
    shutil.copytree(collected.split_dir, split_dir)
    shard = next((split_dir / "meta").glob("*.parquet"))
    table = pq.read_table(shard)
    field = table.schema.field("frame_index")
    assert field.type == pa.int32() and not field.nullable and b"occ/<log>.zarr" in field.metadata[b"doc"]
    assert table.column("frame_index").to_pylist() == list(range(table.num_rows))
    assert table.schema == frame_schema(open_split(split_dir).cameras)
    # a shard written before the column existed (format 1, early format 2) still reads, with it
    old = table.drop_columns(["frame_index"])
    pq.write_table(old, shard)
    log = open_split(split_dir).log(collected.log)
    assert log.frames().column("frame_index").to_pylist() == list(range(table.num_rows))
    assert log.frames().schema.names[-1] == "frame_index"
    got = log.frames(["frame_index", "token"])
    assert got.column_names == ["frame_index", "token"]
    assert got.column("token").to_pylist() == table.column("token").to_pylist()
    assert open_split(split_dir).frames().num_rows == table.num_rows
