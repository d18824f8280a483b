"""collect with occupancy labels: the Zarr group is committed with the rows; OpenScene v1.0 files round-trip."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_collect_e2e import _touch_blobs

from driveengine.collect.runner import CollectConfig, collect
from driveengine.errors import DriveEngineError
from driveengine.export.openscene import export_split
from driveengine.store.commit import is_temporary, sha256_file, sha256_tree
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
        CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path, progress=False),
        echo=lambda _: None,
    )
    assert summary.ok, summary.format()
    split_dir = tmp_path / "mini"
    (name, entry), *_ = load_manifest(split_dir).logs.items()
    assert entry.occ == f"occ/{name}.zarr" and entry.labels["frames"] == entry.frames > 0
    group = zarr.open_group(split_dir / entry.occ, mode="r")
    assert group["semantics"].shape[0] == entry.frames
    assert entry.checksums[entry.occ] == sha256_tree(split_dir / entry.occ)
    assert entry.checksums[entry.meta] == sha256_file(split_dir / entry.meta)
    assert not [p for p in split_dir.rglob("*") if is_temporary(p.name)]


def test_openscene_occupancy_files_round_trip(nuplan: Path, tmp_path: Path) -> None:
    assert collect(
        CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path / "a", progress=False),
        echo=lambda _: None,
    ).ok
    export = tmp_path / "openscene"
    lines = list(export_split(tmp_path / "a" / "mini", export))
    assert any(line.startswith("occupancy:") for line in lines)
    (export / "sensor_blobs").mkdir()
    (export / "sensor_blobs" / "mini").symlink_to(nuplan / "sensor_blobs")
    config = CollectConfig.from_options(
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
        za = zarr.open_group(tmp_path / "a" / "mini" / entry.occ, mode="r")
        zb = zarr.open_group(tmp_path / "b" / "mini" / b.logs[name].occ, mode="r")
        np.testing.assert_array_equal(za["semantics"][:], zb["semantics"][:])
        np.testing.assert_array_equal(za["flow"][:], zb["flow"][:])
    shutil.rmtree(export / "occupancy")
    with pytest.raises(DriveEngineError, match="no such folder"):
        collect(config, echo=lambda _: None)


def _invoke(*args: str) -> tuple[int, str]:
    """Run ``driveengine ARGS`` in this process: (exit code, output); DriveEngineErrors give 2 as in main()."""
    from typer.testing import CliRunner

    from driveengine.cli import app

    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, DriveEngineError):
        return 2, str(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _collect_cli(nuplan: Path, out: Path, *label_args: str) -> tuple[int, str]:
    return _invoke("collect", "--nuplan-root", str(nuplan), "--out", str(out), "--no-progress", *label_args)


def _generator(split_dir: Path) -> tuple[str, dict]:
    entry = next(iter(load_manifest(split_dir).logs.values()))
    return entry.config_hash, dict(zarr.open_group(split_dir / entry.occ, mode="r").attrs)["generator"]


def test_label_settings_from_the_command_line_enter_the_hash_and_the_zarr_group(
    nuplan: Path, tmp_path: Path
) -> None:
    split_dir = tmp_path / "mini"
    code, output = _collect_cli(nuplan, tmp_path)
    assert code == 0 and "1 logs done" in output, output
    default_hash, generator = _generator(split_dir)
    assert (generator["window_s"], generator["sweep_step"], generator["visibility"]) == (10.0, 0, "frame")

    code, output = _collect_cli(nuplan, tmp_path)  # same settings: up to date
    assert code == 0 and "0 logs done, 1 skipped" in output, output

    changed = ("--label-sweep-step", "5", "--label-window-s", "1.5", "--label-box-margin-m", "0.3")
    code, output = _collect_cli(nuplan, tmp_path, *changed, "--label-visibility", "window")
    assert code == 0 and "1 logs done, 0 skipped" in output, output  # the entry no longer matched
    new_hash, generator = _generator(split_dir)
    assert new_hash != default_hash
    assert generator["sweep_step"] == 5 and generator["window_s"] == 1.5
    assert generator["box_margin_m"] == 0.3 and generator["visibility"] == "window"

    code, output = _collect_cli(nuplan, tmp_path, *changed, "--label-visibility", "window")
    assert code == 0 and "1 skipped" in output, output
    code, output = _collect_cli(nuplan, tmp_path, *changed)  # visibility back to its default: redone
    assert code == 0 and "1 logs done" in output, output
    last_hash = _generator(split_dir)[0]

    code, output = _collect_cli(nuplan, tmp_path, "--label-visibility", "everywhere")
    assert code == 2 and "visibility" in output and "'frame' or 'window'" in output, output
    code, output = _collect_cli(nuplan, tmp_path, "--label-window-s", "-1")
    assert code != 0 and "--label-window-s" in output, output
    assert _generator(split_dir)[0] == last_hash  # refused runs leave the manifest alone


def test_same_inputs_give_byte_identical_label_groups(nuplan: Path, tmp_path: Path) -> None:
    entries = []
    for run in ("a", "b"):
        summary = collect(
            CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path / run, progress=False),
            echo=lambda _: None,
        )
        assert summary.ok, summary.format()
        entries.append(next(iter(load_manifest(tmp_path / run / "mini").logs.values())))
    a, b = entries
    # every file of the groups (zarr.json attributes included) and of the frame rows is identical
    assert a.checksums == b.checksums and a.occ in a.checksums
    assert sha256_tree(tmp_path / "a" / "mini" / a.occ) == sha256_tree(tmp_path / "b" / "mini" / b.occ)
    # the run time is kept in the manifest entry, out of the group
    assert a.labels["seconds"] > 0 and "frames_per_second" in a.labels
    stats = dict(zarr.open_group(tmp_path / "a" / "mini" / a.occ, mode="r").attrs)["stats"]
    assert "seconds" not in stats and "frames_per_second" not in stats
    assert stats == {k: v for k, v in a.labels.items() if k not in ("seconds", "frames_per_second", "recipe")}
    # the manifest entry also records the recipe, the same as the group's generator attribute
    generator = dict(zarr.open_group(tmp_path / "a" / "mini" / a.occ, mode="r").attrs)["generator"]
    assert a.labels["recipe"] == generator and generator["recipe"] == "openscene"


def test_export_with_and_without_occupancy(nuplan: Path, tmp_path: Path) -> None:
    assert collect(
        CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path / "c", progress=False),
        echo=lambda _: None,
    ).ok
    split_dir = tmp_path / "c" / "mini"
    frames = load_manifest(split_dir).logs
    (name, entry), *_ = frames.items()
    for flag, out in (("--occupancy", tmp_path / "with"), ("--no-occupancy", tmp_path / "without")):
        code, output = _invoke("export", str(split_dir), "--out", str(out), "--format", "openscene", flag)
        assert code == 0, output
        rows = pickle.loads((out / "meta_datas" / "mini" / f"{name}.pkl").read_bytes())
        assert len(rows) == entry.frames > 0
        npy = sorted((out / "occupancy").rglob("*_occ_final.npy")) if (out / "occupancy").exists() else []
        if flag == "--occupancy":
            assert "occupancy:" in output and len(npy) == entry.frames
            assert all((out / r["occ_gt_final_path"]).is_file() for r in rows)
        else:
            assert "occupancy:" not in output and npy == []
            assert not any("occ_gt_final_path" in r for r in rows)
    # the default of the library function is on as well
    lines = list(export_split(split_dir, tmp_path / "default"))
    assert any(line.startswith("occupancy:") for line in lines)
    assert not any(
        line.startswith("occupancy:") for line in export_split(split_dir, tmp_path / "off", occupancy=False)
    )
