"""OpenScene v1.0 sparse label files: sparse <-> dense, validation, export -> import round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from driveengine.schemas.classes import FREE
from driveengine.schemas.grid import GRID, VoxelGrid

from driveengine.export.openscene import export_openscene_occupancy
from driveengine.formats.openscene_labels import (
    FLOW_PATH_KEY,
    OCC_PATH_KEY,
    LabelFiles,
    OpenSceneLabelError,
    check_label_file,
    check_label_files,
    check_sparse,
    dense_to_sparse,
    frame_number,
    label_file_names,
    locate_label_files,
    read_label_file,
    sparse_to_dense,
)
from driveengine.labels.openscene_import import import_openscene_labels
from driveengine.store.dataset import DatasetError
from driveengine.store.manifest import DatasetInfo, LogEntry, Manifest, SourceRef, save_manifest
from driveengine.store.occ import OccStorage, create_occ, open_occ

SHARD_META = {b"driveengine.format_version": b"2"}  # a frame shard of format version 2
SMALL = VoxelGrid((-4.0, -4.0, -1.0), (4.0, 4.0, 1.0), 0.5)  # 16 x 16 x 4


def random_sparse(rng, n=500, grid=GRID):
    flat = rng.choice(grid.num_voxels, size=n, replace=False)
    cls = rng.choice([0, 4, 5, 6, 7, 8, 9, 10], size=n)
    flow = rng.normal(0, 2, size=(n, 2)).astype(np.float32)
    return np.stack([flat, cls], axis=1).astype(np.int64), flow


def test_flat_index_layout_matches_openscene():
    # a voxel at x=3, y=5, z=7 has flat index 3 + 200*5 + 40000*7
    occ = np.array([[3 + 200 * 5 + 40000 * 7, 7]])
    sem, flow = sparse_to_dense(occ, np.array([[1.5, -2.0]]))
    assert sem.shape == (200, 200, 16) and sem.dtype == np.uint8
    assert sem[3, 5, 7] == 7
    assert np.count_nonzero(sem != FREE) == 1
    assert flow[3, 5, 7].tolist() == [1.5, -2.0]
    assert np.count_nonzero(flow) == 2


def test_sparse_dense_round_trip():
    rng = np.random.default_rng(0)
    occ, flow = random_sparse(rng)
    sem, dense_flow = sparse_to_dense(occ, flow)
    perm = rng.permutation(len(occ))  # row order does not matter
    sem_p, flow_p = sparse_to_dense(occ[perm], flow[perm])
    np.testing.assert_array_equal(sem_p, sem)
    np.testing.assert_array_equal(flow_p, dense_flow)
    occ2, flow2 = dense_to_sparse(sem, dense_flow)
    order = np.argsort(occ[:, 0])
    assert occ2.dtype == np.int64 and flow2.dtype == np.float32
    np.testing.assert_array_equal(occ2, occ[order])
    np.testing.assert_array_equal(flow2, flow[order])
    assert np.all(np.diff(occ2[:, 0]) > 0)  # sorted, unique
    xyz = GRID.unflatten_index(occ2[:, 0])  # the schema's own definition of the flat index
    np.testing.assert_array_equal(sem[tuple(xyz.T)], occ2[:, 1])
    np.testing.assert_array_equal(dense_flow[tuple(xyz.T)], flow2)
    # and dense -> sparse -> dense is the identity
    sem3, flow3 = sparse_to_dense(occ2, flow2)
    np.testing.assert_array_equal(sem3, sem)
    np.testing.assert_array_equal(flow3, dense_flow)


def test_check_sparse_reports_each_problem_with_counts():
    good = np.array([[0, 0], [10, 10], [639_999, 9]])
    assert check_sparse(good, np.zeros((3, 2))) == []
    bad = np.array([[0, 0], [0, 0], [5, 4], [5, 4], [640_000, 1], [-1, 2], [7, 16], [8, 200]])
    problems = check_sparse(bad, np.zeros((7, 2)))
    text = " | ".join(problems)
    assert "2 of 8 rows have a flat index outside 0..639999" in text
    assert "2 flat indices occur more than once (2 extra rows" in text
    assert "2 of 8 rows have a class id outside 0..15" in text
    assert "flow has 7 rows but occ has 8" in text
    nan_flow = np.zeros((3, 2))
    nan_flow[1, 0] = np.nan
    assert check_sparse(good, nan_flow) == ["1 of 3 flow rows are not finite (NaN or inf)"]
    assert "expected (N, 2)" in check_sparse(np.zeros((4, 3), np.int64))[0]
    assert "non-integer" in check_sparse(np.array([[1.5, 0.0]]))[0]
    with pytest.raises(ValueError, match="occur more than once"):
        sparse_to_dense(bad[:4])


def test_invalid_files_are_reported_per_file(tmp_path: Path):
    rng = np.random.default_rng(1)
    occ, flow = random_sparse(rng, 50)
    files = []
    for name, o, f in [
        ("good", occ, flow),
        ("range", np.vstack([occ, [[700_000, 0]]]), np.vstack([flow, [[0, 0]]])),
        ("dups", np.vstack([occ, occ[:3]]), np.vstack([flow, flow[:3]])),
        ("misaligned", occ, flow[:-5]),
    ]:
        np.save(tmp_path / f"{name}_occ_final.npy", o)
        np.save(tmp_path / f"{name}_flow_final.npy", f)
        files.append(LabelFiles(tmp_path / f"{name}_occ_final.npy", tmp_path / f"{name}_flow_final.npy"))
    files.append(LabelFiles(tmp_path / "absent_occ_final.npy", tmp_path / "absent_flow_final.npy"))
    report = check_label_files(files)
    assert not report.ok
    assert set(report.problems) == {str(f.occ) for f in files[1:]}
    assert report.problems[str(files[1].occ)] == [
        "1 of 51 rows have a flat index outside 0..639999 (e.g. [700000])"
    ]
    assert "3 flat indices occur more than once (3 extra rows" in report.problems[str(files[2].occ)][0]
    assert report.problems[str(files[3].occ)] == ["flow has 45 rows but occ has 50: not row-aligned"]
    assert report.problems[str(files[4].occ)] == ["occ file is missing"]
    (tmp_path / "garbage_occ_final.npy").write_bytes(b"not an npy file")
    assert check_label_file(tmp_path / "good_occ_final.npy", tmp_path / "absent_flow_final.npy") == [
        "flow file is missing"
    ]
    (problem,) = check_label_file(tmp_path / "garbage_occ_final.npy", tmp_path / "good_flow_final.npy")
    assert problem.startswith("occ file is unreadable (")
    (problem,) = check_label_file(tmp_path / "good_occ_final.npy", tmp_path / "garbage_occ_final.npy")
    assert problem.startswith("flow file is unreadable (")
    msg = report.message()
    assert msg.startswith("4 OpenScene label file(s) are invalid")
    assert "misaligned_occ_final.npy: flow has 45 rows" in msg
    with pytest.raises(OpenSceneLabelError, match=r"dups_occ_final\.npy"):
        read_label_file(files[2].occ, files[2].flow)
    # nothing is written when any file is invalid
    with pytest.raises(OpenSceneLabelError, match=r"range_occ_final\.npy"):
        import_openscene_labels(files, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def make_split(root: Path, rng, grid=SMALL) -> tuple[Path, dict]:
    """A collected split folder with two logs (meta parquet with the key columns, occ Zarr, manifest)."""
    split_dir = root / "mini"
    manifest = Manifest(split="mini", dataset=DatasetInfo(name="nuplan", grid=grid))
    truth = {}
    for log, n in (
        ("2021.01.01.00.00.00_veh-1_00001_00002", 5),
        ("2021.01.02.00.00.00_veh-2_00003_00004", 3),
    ):
        scenes = [f"{log}-scene-a"] * 3 + [f"{log}-scene-b"] * (n - 3)
        rows = {
            "token": [f"{log[-5:]}{i:011x}" for i in range(n)],
            "scene_name": scenes,
            "frame_idx": [0, 1, 2, 0, 1][:n],
            "timestamp": [1_000_000 * i for i in range(n)],
        }
        (split_dir / "meta").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(rows).replace_schema_metadata(SHARD_META), split_dir / "meta" / f"{log}.parquet"
        )
        sems, flows = [], []
        with create_occ(
            split_dir / "occ" / f"{log}.zarr",
            n,
            generator={"test": True},
            grid=grid,
            storage=OccStorage(shard_frames=2),
        ) as w:
            for _ in range(n):
                sem = rng.choice(np.array([0, 5, 7, 10, FREE, FREE, FREE], np.uint8), size=grid.shape)
                flow = (rng.normal(0, 2, size=(*grid.shape, 2)) * (sem < 10)[..., None]).astype(np.float16)
                w.append(semantics=sem, flow=flow, mask_lidar=np.ones(grid.shape, bool))
                sems.append(sem), flows.append(flow)
        manifest.logs[log] = LogEntry(
            frames=n,
            meta=f"meta/{log}.parquet",
            occ=f"occ/{log}.zarr",
            checksums={},
            source=SourceRef("nuplan", ""),
        )
        truth[log] = (rows, np.stack(sems), np.stack(flows))
    save_manifest(split_dir, manifest)
    return split_dir, truth


def test_export_then_import_round_trip(tmp_path: Path):
    rng = np.random.default_rng(2)
    split_dir, truth = make_split(tmp_path, rng)
    export_root = tmp_path / "export"
    keys = export_openscene_occupancy(split_dir, export_root / "occupancy", relative_to=export_root)
    assert len(keys) == 8
    log, (rows, sems, flows) = next(iter(truth.items()))
    first = keys[rows["token"][0]]
    # three digits, as OpenScene's generator ('%03d') and its metadata name the files
    assert first[OCC_PATH_KEY] == f"occupancy/mini/{log}-scene-a/occ_gt/000_occ_final.npy"
    assert first[FLOW_PATH_KEY] == f"occupancy/mini/{log}-scene-a/occ_gt/000_flow_final.npy"
    occ_file = np.load(export_root / first[OCC_PATH_KEY])
    flow_file = np.load(export_root / first[FLOW_PATH_KEY])
    assert occ_file.dtype == np.int64 and flow_file.dtype == np.float32
    assert occ_file.shape == (np.count_nonzero(sems[0] != FREE), 2)
    assert flow_file.shape == occ_file.shape

    frame_rows = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
    # the v1.0 folder layout, located from scene_name / frame_idx ...
    by_layout = locate_label_files(frame_rows, export_root / "occupancy", "mini")
    # ... and the metadata keys (relative paths with a prefix before <split>/), the way OpenScene pkls give them
    with_keys = [{**r, **keys[r["token"]]} for r in frame_rows]
    by_keys = locate_label_files(with_keys, export_root / "occupancy", "mini")
    assert by_layout == by_keys
    n = import_openscene_labels(by_keys, tmp_path / "imported.zarr", grid=SMALL, source="test")
    assert n == 5
    imported = open_occ(tmp_path / "imported.zarr")
    np.testing.assert_array_equal(imported.semantics[:], sems)
    np.testing.assert_array_equal(imported.flow[:], flows)
    assert imported.mask_lidar[:].all()
    assert imported.attrs["generator"]["kind"] == "openscene-v1.0-import"


def test_export_rejects_frame_count_mismatch(tmp_path: Path):
    rng = np.random.default_rng(3)
    split_dir, truth = make_split(tmp_path, rng)
    log = next(iter(truth))
    pq.write_table(
        pa.table({"token": ["a"], "scene_name": ["s"], "frame_idx": [0]}).replace_schema_metadata(SHARD_META),
        split_dir / "meta" / f"{log}.parquet",
    )
    with pytest.raises(DatasetError, match="has 1 rows, the manifest says 5"):
        export_openscene_occupancy(split_dir, tmp_path / "export")


def test_locate_openscene_scene_folders(tmp_path: Path):
    """DriveEngine's scene names are ``<log>-<source scene>``; OpenScene's folders use the source name."""
    log = "2021.05.12.22.00.38_veh-35_01008_01518"
    folder = tmp_path / "mini" / "log-0003-scene-0007" / "occ_gt"
    folder.mkdir(parents=True)
    occ, flow = random_sparse(np.random.default_rng(4), 20)
    np.save(folder / "0001_occ_final.npy", occ)
    np.save(folder / "0001_flow_final.npy", flow)
    rows = [
        {"log_name": log, "scene_name": f"{log}-log-0003-scene-0007", "frame_idx": 1},
        {"log_name": log, "scene_name": f"{log}-scene-0009", "frame_idx": 0},  # no such folder
    ]
    files = locate_label_files(rows, tmp_path, "mini")
    # four-digit files are found too (any zero padding); a missing file is named the OpenScene way
    assert files[0] == LabelFiles(folder / "0001_occ_final.npy", folder / "0001_flow_final.npy")
    assert files[1].occ == tmp_path / "mini" / f"{log}-scene-0009" / "occ_gt" / "000_occ_final.npy"
    report = check_label_files(files)
    assert list(report.problems) == [str(files[1].occ)]
    assert report.problems[str(files[1].occ)] == ["occ file is missing"]
    sem, dense_flow = read_label_file(files[0].occ, files[0].flow)
    assert np.count_nonzero(sem != FREE) == 20
    assert np.count_nonzero(dense_flow.any(axis=-1)) == np.count_nonzero(flow.any(axis=-1))


def test_label_file_names_have_three_digits():
    assert label_file_names(0) == ("000_occ_final.npy", "000_flow_final.npy")
    assert label_file_names(42) == ("042_occ_final.npy", "042_flow_final.npy")
    assert label_file_names(1234) == ("1234_occ_final.npy", "1234_flow_final.npy")  # '%03d' of 1234
    assert [frame_number(n) for n in ("000_occ_final.npy", "7_occ_final.npy", "00012_occ_final.npy")] == [
        0,
        7,
        12,
    ]
    assert frame_number("x1_occ_final.npy") is None and frame_number("001_flow_final.npy") is None


def _save_pair(folder: Path, stem: str, rng) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    occ, flow = random_sparse(rng, 30)
    np.save(folder / f"{stem}_occ_final.npy", occ)
    np.save(folder / f"{stem}_flow_final.npy", flow)
    return occ, flow


@pytest.mark.parametrize("root_level", ["occupancy", "split", "dataset-parent"])
def test_openscene_metadata_paths_resolve_against_the_occupancy_folder(tmp_path: Path, root_level: str):
    """OpenScene's occ_gt_final_path, verbatim from its v1.0 metadata, against --openscene-occupancy."""
    rng = np.random.default_rng(5)
    release = tmp_path / "dataset" / "openscene-v1.0" / "occupancy"
    scene = release / "mini" / "log-0001-scene-0001" / "occ_gt"
    truth = [_save_pair(scene, f"{i:03d}", rng) for i in range(3)]
    rows = [
        {
            "token": f"t{i}",
            "scene_name": "log-0001-scene-0001",
            "frame_idx": i,
            OCC_PATH_KEY: f"dataset/openscene-v1.0/occupancy/mini/log-0001-scene-0001/occ_gt/{i:03d}_occ_final.npy",
            FLOW_PATH_KEY: f"dataset/openscene-v1.0/occupancy/mini/log-0001-scene-0001/occ_gt/{i:03d}_flow_final.npy",
        }
        for i in range(3)
    ]
    root = {"occupancy": release, "split": release / "mini", "dataset-parent": tmp_path}[root_level]
    files = locate_label_files(rows, root, "mini")
    assert files == [
        LabelFiles(scene / f"{i:03d}_occ_final.npy", scene / f"{i:03d}_flow_final.npy") for i in range(3)
    ]
    assert check_label_files(files).ok
    import_openscene_labels(files, tmp_path / "imported.zarr")
    imported = open_occ(tmp_path / "imported.zarr")
    for i, (occ, flow) in enumerate(truth):
        sem, dense_flow = sparse_to_dense(occ, flow)
        np.testing.assert_array_equal(imported.semantics[i], sem)
        np.testing.assert_array_equal(imported.flow[i], dense_flow.astype(np.float16))
    # without the flow key the flow file sits next to the occ file
    no_flow = [{k: v for k, v in r.items() if k != FLOW_PATH_KEY} for r in rows]
    assert locate_label_files(no_flow, root, "mini") == files
    # a file the metadata names but nobody shipped is reported under the split folder, not guessed
    (scene / "002_occ_final.npy").unlink()
    report = check_label_files(locate_label_files(rows, root, "mini"))
    assert list(report.problems) == [str(scene / "002_occ_final.npy")]
    assert report.problems[str(scene / "002_occ_final.npy")] == ["occ file is missing"]


def test_any_zero_padding_is_accepted(tmp_path: Path):
    rng = np.random.default_rng(6)
    stems = {"scene-a": "7", "scene-b": "07", "scene-c": "007", "scene-d": "0007", "scene-e": "00007"}
    for scene, stem in stems.items():
        _save_pair(tmp_path / "mini" / scene / "occ_gt", stem, rng)
    rows = [{"scene_name": scene, "frame_idx": 7} for scene in stems]
    files = locate_label_files(rows, tmp_path, "mini")
    assert [f.occ.name for f in files] == [f"{s}_occ_final.npy" for s in stems.values()]
    assert [f.flow.name for f in files] == [f"{s}_flow_final.npy" for s in stems.values()]
    assert check_label_files(files).ok
    # metadata naming 000-style files when the folder has another padding
    meta = [{OCC_PATH_KEY: "dataset/openscene-v1.0/occupancy/mini/scene-d/occ_gt/007_occ_final.npy"}]
    assert (
        locate_label_files(meta, tmp_path, "mini")[0].occ
        == tmp_path / "mini/scene-d/occ_gt/0007_occ_final.npy"
    )
    # the same frame under two paddings is ambiguous: refused, naming the folder and the files
    _save_pair(tmp_path / "mini" / "scene-d" / "occ_gt", "07", rng)
    with pytest.raises(
        OpenSceneLabelError, match=r"scene-d/occ_gt: frame 7 has several label files \(0007_occ_final"
    ):
        locate_label_files([{"scene_name": "scene-d", "frame_idx": 7}], tmp_path, "mini")
