"""collect with occupancy labels: the Zarr group is committed with the rows; OpenScene v1.0 files round-trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_collect_e2e import _touch_blobs

from driveengine.collect.runner import CollectConfig, collect
from driveengine.errors import DriveEngineError
from driveengine.store.commit import is_temporary, sha256_file, sha256_tree
from driveengine.store.legacy import export_split
from driveengine.store.manifest import load_manifest
from driveengine.synth import synthesize
from driveengine.synth.blobs import write_sweep


@pytest.fixture(scope="module")
def nuplan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nuplan")
    logs = synthesize(root, logs=1, seconds=2.5, seed=5, split="mini", blobs=False)
    _touch_blobs(logs, root / "sensor_blobs")  # images: presence only
    for log in logs:  # real point clouds, few rays
        for i, (rel, ts) in enumerate(
            zip(log.plan.sweep_filename, log.world.lidar_timestamps_us, strict=True)
        ):
            write_sweep(log.world, log.sensor_root / rel, int(ts), 256, i)
    return root


def test_labels_are_committed_with_the_rows(nuplan: Path, tmp_path: Path) -> None:
    summary = collect(
        CollectConfig(source="nuplan", root=nuplan, out=tmp_path, progress=False), echo=lambda _: None
    )
    assert summary.ok, summary.format()
    split_dir = tmp_path / "mini"
    (name, entry), *_ = load_manifest(split_dir).logs.items()
    assert entry["occ"] == f"occ/{name}.zarr" and entry["labels"]["frames"] == entry["frames"] > 0
    group = zarr.open_group(split_dir / entry["occ"], mode="r")
    assert group["semantics"].shape[0] == entry["frames"]
    assert entry["checksums"][entry["occ"]] == sha256_tree(split_dir / entry["occ"])
    assert entry["checksums"][entry["meta"]] == sha256_file(split_dir / entry["meta"])
    assert not [p for p in split_dir.rglob("*") if is_temporary(p.name)]


def test_openscene_occupancy_files_round_trip(nuplan: Path, tmp_path: Path) -> None:
    assert collect(
        CollectConfig(source="nuplan", root=nuplan, out=tmp_path / "a", progress=False), echo=lambda _: None
    ).ok
    export = tmp_path / "openscene"
    lines = list(export_split(tmp_path / "a" / "mini", export))
    assert any(line.startswith("occupancy:") for line in lines)
    (export / "sensor_blobs").mkdir()
    (export / "sensor_blobs" / "mini").symlink_to(nuplan / "sensor_blobs")
    config = CollectConfig(
        source="openscene",
        root=export,
        out=tmp_path / "b",
        openscene_occupancy=export / "occupancy",
        progress=False,
    )
    summary = collect(config, echo=lambda _: None)
    assert summary.ok, summary.format()
    a, b = load_manifest(tmp_path / "a" / "mini"), load_manifest(tmp_path / "b" / "mini")
    for name, entry in a.logs.items():
        za = zarr.open_group(tmp_path / "a" / "mini" / entry["occ"], mode="r")
        zb = zarr.open_group(tmp_path / "b" / "mini" / b.logs[name]["occ"], mode="r")
        np.testing.assert_array_equal(za["semantics"][:], zb["semantics"][:])
        np.testing.assert_array_equal(za["flow"][:], zb["flow"][:])
    shutil.rmtree(export / "occupancy")
    with pytest.raises(DriveEngineError, match="no such folder"):
        collect(config, echo=lambda _: None)
