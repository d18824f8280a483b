"""synth -> collect -> read back, on real SQLite logs, real Parquet shards and a real manifest.

Both sources (nuPlan DBs; OpenScene pickles made by the legacy export of the same world), resume,
lock, corrupt inputs, missing and broken blobs, non-finite poses and values, a kill -9 in the middle of
a run and of the client alone (its processes are then looked for in /proc), a worker killed by a signal,
Ctrl-C, and Dask vs the local pool.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from driveengine.schemas.frame import frame_schema
from test_collect_frames import placeholder_blob

from driveengine.collect.frames import check_finite
from driveengine.collect.pool import KILL_HOOK_ENV, KILL_ONCE_ENV
from driveengine.collect.runner import CollectConfig, collect
from driveengine.errors import DriveEngineError
from driveengine.export.openscene import export_openscene_metadata
from driveengine.geometry import invert_transform, rotate_vectors, transform_points
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.store.commit import CollectLock, CollectLockedError, is_temporary, sha256_tree
from driveengine.store.frames import read_log_frames, read_split_frames
from driveengine.store.manifest import load_manifest
from driveengine.synth import synthesize
from driveengine.synth.world import BOX_RANGE_M

FRAME_SCHEMA = frame_schema(CAMERA_CHANNELS)  # nuPlan's frame rows

SECONDS = 4.0


def _touch_blobs(logs, root: Path, skip: set[str] = frozenset()) -> None:
    """Tiny whole placeholder files for every blob the synthetic DBs reference (collect checks their
    presence and headers, not their content)."""
    for log in logs:
        paths = list(log.plan.sweep_filename) + [
            p for ch in CAMERA_CHANNELS for p in log.plan.image_filename[ch]
        ]
        for rel in paths:
            if rel not in skip:
                placeholder_blob(root / rel)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("nuplan")
    logs = synthesize(root, logs=2, seconds=SECONDS, seed=7, split="mini", blobs=False)
    _touch_blobs(logs, root / "sensor_blobs")
    return root, logs


def _config(root: Path, out: Path, **kw) -> CollectConfig:
    kw = {"labels": False, "progress": False, **kw}  # rows only unless a test asks for labels
    return CollectConfig.from_options(source="nuplan", root=root, out=out, split="mini", **kw)


def test_nuplan_rows_equal_the_synthetic_truth(world, tmp_path: Path) -> None:
    root, logs = world
    summary = collect(_config(root, tmp_path), echo=lambda _: None)
    assert summary.ok and sorted(summary.done) == sorted(log.log_name for log in logs)
    manifest = load_manifest(tmp_path / "mini")
    for log in logs:
        w, plan = log.world, log.plan
        entry = manifest.logs[log.log_name]
        table = read_log_frames(tmp_path / "mini", log.log_name)
        assert table.schema == FRAME_SCHEMA
        assert entry.frames == table.num_rows and entry.dropped == {}
        assert table.num_rows in (int(SECONDS * 2) - 1, int(SECONDS * 2))  # 2 Hz over the log
        assert sum(len(a["gt_names"]) for a in table.column("anns").to_pylist()) > 0
        rows = table.to_pylist()
        ts = np.array([r["timestamp"] for r in rows])
        assert np.all(np.diff(ts) == 500_000)  # 2 Hz, every 10th lidar_pc
        sweep_idx = np.searchsorted(w.lidar_timestamps_us, ts)
        assert [r["token"] for r in rows] == list(plan.sweep_token[sweep_idx])
        for r, t in zip(rows, ts.tolist(), strict=True):
            pose = w.frame_pose(t)
            np.testing.assert_allclose(np.array(r["ego2global"]), pose, atol=1e-9)
            np.testing.assert_allclose(np.array(r["lidar2ego"]), w.ego_from_lidar, atol=1e-12)
            ego_from_global = invert_transform(pose)
            truth = w.boxes_at(t, max_range_m=BOX_RANGE_M)
            anns = r["anns"]
            order = {tok: i for i, tok in enumerate(anns["track_tokens"])}
            assert set(order) == set(truth.track_token.tolist())
            idx = np.array([order[tok] for tok in truth.track_token.tolist()], dtype=int)
            boxes = np.array(anns["gt_boxes"]).reshape(-1, 7)[idx]
            np.testing.assert_allclose(
                boxes[:, :3], transform_points(ego_from_global, truth.center), atol=1e-6
            )
            np.testing.assert_allclose(boxes[:, 3:6], truth.size, atol=1e-9)
            yaw_pose = np.arctan2(pose[1, 0], pose[0, 0])
            np.testing.assert_allclose(np.cos(boxes[:, 6] + yaw_pose - truth.yaw), 1.0, atol=1e-9)
            assert np.all((boxes[:, 6] >= -np.pi) & (boxes[:, 6] < np.pi))
            vel = np.array(anns["gt_velocity_3d"]).reshape(-1, 3)[idx]
            np.testing.assert_allclose(vel, rotate_vectors(ego_from_global, truth.velocity), atol=1e-6)
            assert list(np.array(anns["gt_names"])[idx]) == list(truth.category)
            assert list(r["cams"]) == list(CAMERA_CHANNELS)
            for cam in w.cameras:
                c = r["cams"][cam.channel]
                k = int(np.argmin(np.abs(plan.image_timestamp_us[cam.channel] - t)))
                assert c["data_path"] == plan.image_filename[cam.channel][k]
                np.testing.assert_allclose(
                    np.array(c["sensor2lidar_rotation"]), cam.ego_from_camera()[:3, :3], atol=1e-12
                )
                np.testing.assert_allclose(c["sensor2lidar_translation"], cam.translation, atol=1e-12)
                np.testing.assert_allclose(np.array(c["cam_intrinsic"]), cam.intrinsic, atol=1e-12)
        # frame_idx counts per scene without gaps; prev/next link neighbours of the same scene only.
        for i, r in enumerate(rows):
            same_prev = i > 0 and rows[i - 1]["scene_token"] == r["scene_token"]
            assert r["sample_prev"] == (rows[i - 1]["token"] if same_prev else None)
            assert r["frame_idx"] == (rows[i - 1]["frame_idx"] + 1 if same_prev else 0)
            same_next = i + 1 < len(rows) and rows[i + 1]["scene_token"] == r["scene_token"]
            assert r["sample_next"] == (rows[i + 1]["token"] if same_next else None)


def _comparable(table: pa.Table) -> list[dict]:
    """Rows without what only one source knows (source, image timestamps, scenario tags)."""
    rows = table.drop_columns(["source", "scenario_tags"]).to_pylist()
    for r in rows:
        for cam in r["cams"].values():
            cam.pop("timestamp")
    return rows


def _assert_rows_close(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_rows_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        if a and isinstance(a[0], float | list) and not isinstance(a[0], str):
            arr_a, arr_b = np.array(a, dtype=float), np.array(b, dtype=float)
            if "gt_boxes" in path:  # yaw at +-pi may come back as the same angle on the other side
                arr_a[..., 6], arr_b[..., 6] = np.cos(arr_a[..., 6]), np.cos(arr_b[..., 6])
            np.testing.assert_allclose(arr_a, arr_b, atol=1e-6, err_msg=path)
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                _assert_rows_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6), path
    else:
        assert a == b, path


def test_openscene_source_gives_the_same_rows(world, tmp_path: Path) -> None:
    root, _ = world
    assert collect(_config(root, tmp_path / "a"), echo=lambda _: None).ok
    # An OpenScene tree made from the same world by the legacy export, blobs shared.
    os_root = tmp_path / "openscene"
    export_openscene_metadata(tmp_path / "a" / "mini", os_root / "meta_datas" / "mini")
    (os_root / "sensor_blobs").mkdir(parents=True)
    (os_root / "sensor_blobs" / "mini").symlink_to(root / "sensor_blobs")
    config = CollectConfig.from_options(
        source="openscene", root=os_root, out=tmp_path / "b", split="mini", labels=False, progress=False
    )
    summary = collect(config, echo=lambda _: None)
    assert summary.ok, summary.format()
    a = read_split_frames(tmp_path / "a" / "mini")
    b = read_split_frames(tmp_path / "b" / "mini")
    assert a.num_rows == b.num_rows > 0
    assert set(b.column("source").to_pylist()) == {"openscene"}
    _assert_rows_close(_comparable(a), _comparable(b))


def test_resume_skips_up_to_date_logs_and_overwrite_redoes_them(world, tmp_path: Path) -> None:
    root, logs = world
    first = collect(_config(root, tmp_path), echo=lambda _: None)
    manifest1 = load_manifest(tmp_path / "mini")
    shard = tmp_path / "mini" / manifest1.logs[logs[0].log_name].meta
    inode = shard.stat().st_ino
    again = collect(_config(root, tmp_path), echo=lambda _: None)
    assert again.done == [] and sorted(again.skipped) == sorted(first.done)
    assert shard.stat().st_ino == inode
    assert load_manifest(tmp_path / "mini").logs == manifest1.logs
    # A changed setting changes the config hash: the logs are redone.
    changed = collect(_config(root, tmp_path, filter_instance=True), echo=lambda _: None)
    assert sorted(changed.done) == sorted(first.done)
    forced = collect(
        _config(root, tmp_path, filter_instance=True, overwrite=True, logs=[logs[1].log_name]),
        echo=lambda _: None,
    )
    assert forced.done == [logs[1].log_name] and forced.skipped == []
    assert sorted(load_manifest(tmp_path / "mini").logs) == sorted(first.done)


def test_logs_being_redone_leave_the_manifest_until_recommitted(world, tmp_path: Path) -> None:
    root, logs = world
    inputs = tmp_path / "in"
    shutil.copytree(root / "splits", inputs / "splits")
    (inputs / "sensor_blobs").symlink_to(root / "sensor_blobs")
    assert collect(_config(inputs, tmp_path), echo=lambda _: None).ok
    for db in (inputs / "splits" / "mini").glob("*.db"):  # inputs change and turn bad
        db.write_bytes(b"garbage" * 1000)
    summary = collect(_config(inputs, tmp_path), echo=lambda _: None)
    assert sorted(summary.failed) == sorted(log.log_name for log in logs)
    assert load_manifest(tmp_path / "mini").logs == {}  # no entry describes inputs it no longer matches


def test_a_log_without_any_frame_with_8_cameras_is_reported_not_a_crash(tmp_path: Path) -> None:
    logs = synthesize(tmp_path / "in", logs=1, seconds=1.5, seed=2, split="mini", blobs=False)
    with sqlite3.connect(logs[0].db_path) as con:  # the log loses every CAM_B0 image
        con.execute(
            "DELETE FROM image WHERE camera_token IN (SELECT token FROM camera WHERE channel = 'CAM_B0')"
        )
    _touch_blobs(logs, tmp_path / "in" / "sensor_blobs")
    summary = collect(_config(tmp_path / "in", tmp_path / "out"), echo=lambda _: None)
    name = logs[0].log_name
    assert summary.ok and list(summary.empty) == [name] and "all 8 cameras" in summary.empty[name]
    entry = load_manifest(tmp_path / "out" / "mini").logs[name]
    assert entry.frames == 0 and entry.dropped == {"no_frame_with_all_cameras": 3}
    assert read_log_frames(tmp_path / "out" / "mini", name).schema == FRAME_SCHEMA
    assert f"empty log {name}" in summary.format()


def test_a_user_split_with_logs_and_tokens(world, tmp_path: Path) -> None:
    root, logs = world
    rows = _first_rows(root, tmp_path / "probe", logs[1].log_name)
    wanted = [rows[1]["token"], rows[4]["token"]]
    split_file = tmp_path / "my_split.yaml"
    split_file.write_text(f"folder: mini\nlog_names: [{logs[1].log_name}]\ntokens: [{', '.join(wanted)}]\n")
    config = CollectConfig.from_options(
        source="nuplan", root=root, out=tmp_path / "out", split=str(split_file), labels=False, progress=False
    )
    summary = collect(config, echo=lambda _: None)
    assert summary.done == [logs[1].log_name]
    table = read_log_frames(tmp_path / "out" / "my_split", logs[1].log_name)
    assert table.column("token").to_pylist() == wanted
    assert set(table.column("split").to_pylist()) == {"my_split"}
    assert table.column("frame_idx").to_pylist() == [0, 1]  # no gaps among the kept frames
    assert table.column("sample_next").to_pylist() == [None, None]  # not neighbours: no link
    assert summary.dropped == {"not_in_split": len(rows) - 2}


def test_a_second_collect_on_the_same_output_is_refused(world, tmp_path: Path) -> None:
    root, _ = world
    with CollectLock(tmp_path / "mini"):
        with pytest.raises(CollectLockedError, match=f"pid {os.getpid()}"):
            collect(_config(root, tmp_path), echo=lambda _: None)
    assert collect(_config(root, tmp_path), echo=lambda _: None).ok  # released


def test_corrupt_db_fails_alone_and_missing_blobs_are_counted(world, tmp_path: Path) -> None:
    root, logs = world
    mixed = tmp_path / "in"
    shutil.copytree(root / "splits", mixed / "splits")
    (mixed / "splits" / "mini" / "2021.01.01.00.00.00_veh-00_00000_00001.db").write_bytes(
        b"not a database" * 100
    )
    # Missing blobs of log 0: the lidar of its first key frame, one camera image of another.
    rows = _first_rows(root, tmp_path / "probe", logs[0].log_name)
    _touch_blobs(
        logs, mixed / "sensor_blobs", skip={rows[0]["lidar_path"], rows[2]["cams"]["CAM_L1"]["data_path"]}
    )
    summary = collect(_config(mixed, tmp_path / "out"), echo=lambda _: None)
    assert not summary.ok
    assert list(summary.failed) == ["2021.01.01.00.00.00_veh-00_00000_00001"]
    assert (
        "not a database" in summary.failed["2021.01.01.00.00.00_veh-00_00000_00001"].lower()
        or ".db" in summary.failed["2021.01.01.00.00.00_veh-00_00000_00001"]
    )
    manifest = load_manifest(tmp_path / "out" / "mini")
    assert sorted(manifest.logs) == sorted(log.log_name for log in logs)
    assert manifest.logs[logs[0].log_name].dropped == {"missing_camera": 1, "missing_lidar": 1}
    assert manifest.logs[logs[0].log_name].frames == len(rows) - 2
    assert summary.dropped == {"missing_camera": 1, "missing_lidar": 1}
    assert "FAILED 2021.01.01.00.00.00_veh-00_00000_00001" in summary.format()


def _first_rows(root: Path, out: Path, log_name: str) -> list[dict]:
    collect(_config(root, out, logs=[log_name]), echo=lambda _: None)
    return read_log_frames(out / "mini", log_name).to_pylist()


def test_unknown_logs_and_missing_folders_are_clear_errors(world, tmp_path: Path) -> None:
    root, _ = world
    with pytest.raises(DriveEngineError, match="no-such-log"):
        collect(_config(root, tmp_path, logs=["no-such-log"]), echo=lambda _: None)
    with pytest.raises(DriveEngineError, match="splits/mini"):
        collect(_config(tmp_path / "nowhere", tmp_path), echo=lambda _: None)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "driveengine.cli", *args]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    root = tmp_path / "nuplan"
    logs = synthesize(root, logs=4, seconds=12.0, seed=3, split="mini", blobs=False)
    (root / "splits" / "mini" / "broken.db").write_bytes(b"\0" * 4096)  # fails alone, every run
    out = tmp_path / "out"
    args = _cli(
        "collect",
        "--nuplan-root",
        str(root),
        "--out",
        str(out),
        "--no-labels",
        "--no-check-blobs",
        "--no-progress",
    )
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    manifest_file = out / "mini" / "manifest.json"
    deadline = time.monotonic() + 120
    committed: dict = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest_file.exists():
            committed = json.loads(manifest_file.read_text())["logs"]
            if committed:
                break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert committed, "the first log was never committed"
    assert len(committed) < len(logs), "the run finished before it could be killed"
    # What readers see right after the crash: only complete, committed logs.
    visible = load_manifest(out / "mini")
    for name, entry in visible.logs.items():
        assert read_log_frames(out / "mini", name).num_rows == entry.frames
    done_before = {name: entry.committed_at for name, entry in visible.logs.items()}
    inode_before = {name: (out / "mini" / e.meta).stat().st_ino for name, e in visible.logs.items()}
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stdout + result.stderr  # non-zero: a log failed
    assert "FAILED broken: " in result.stdout and "broken.db" in result.stdout
    manifest = load_manifest(out / "mini")
    assert sorted(manifest.logs) == sorted(log.log_name for log in logs)
    for name, stamp in done_before.items():  # finished logs were not redone
        assert manifest.logs[name].committed_at == stamp
        assert (out / "mini" / manifest.logs[name].meta).stat().st_ino == inode_before[name]
    table = read_split_frames(out / "mini")
    assert table.num_rows == sum(e.frames for e in manifest.logs.values())
    tokens = table.column("token").to_pylist()
    assert len(tokens) == len(set(tokens))  # no duplicate rows
    leftovers = [p for p in (out / "mini").rglob("*") if is_temporary(p.name)]
    assert leftovers == []
    assert (
        f"{len(logs) - len(done_before)} logs done, {len(done_before)} skipped (up to date), 1 failed"
        in result.stdout
    )


@pytest.mark.slow
def test_dask_local_cluster_matches_the_pool(tmp_path: Path) -> None:
    # a tiny world with real point clouds (few rays), so the labels are real too
    root = tmp_path / "nuplan"
    logs = synthesize(root, logs=2, seconds=1.5, seed=11, split="mini", points=128, image_size=(16, 9))
    runs = {
        "pool": collect(_config(root, tmp_path / "pool", workers=2, labels=True), echo=lambda _: None),
        "dask": collect(
            _config(root, tmp_path / "dask", scheduler="local:2", labels=True), echo=lambda _: None
        ),
    }
    names = sorted(x.log_name for x in logs)
    assert all(s.ok and sorted(s.done) == names for s in runs.values()), [s.format() for s in runs.values()]
    pool, dask = (load_manifest(tmp_path / run / "mini").logs for run in runs)
    for name in names:
        assert pool[name].occ and pool[name].labels["points_in_grid"] > 0
        for rel in (pool[name].meta, pool[name].occ):  # the Zarr group's zarr.json included
            a, b = tmp_path / "pool" / "mini" / rel, tmp_path / "dask" / "mini" / rel
            assert sha256_tree(a) == sha256_tree(b) if a.is_dir() else a.read_bytes() == b.read_bytes(), rel
        assert pool[name].checksums == dask[name].checksums


# -- processes: kill -9 of the client, a worker killed by a signal, Ctrl-C ------------------------------


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``, from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _wait_for_no_members(sid: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := _session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _committed_files(split_dir: Path) -> set[str]:
    return {
        p.relative_to(split_dir).as_posix()
        for p in split_dir.rglob("*")
        if p.is_file() and not any(is_temporary(part) for part in p.relative_to(split_dir).parts)
    }


@pytest.fixture(scope="module")
def many_logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """10 logs of 12 s (databases only): a pool run of a second or two, long enough to interrupt."""
    root = tmp_path_factory.mktemp("many")
    return root, synthesize(root, logs=10, seconds=12.0, seed=21, split="mini", blobs=False)


def _collect_args(root: Path, out: Path, workers: int | str) -> list[str]:
    """The CLI collecting rows only, on ``workers`` local workers, or on a Dask ``local:N`` scheduler."""
    how = ["--scheduler", workers] if isinstance(workers, str) else ["--workers", str(workers)]
    return _cli(
        "collect", "--nuplan-root", str(root), "--out", str(out), "--no-labels", "--no-check-blobs",
        "--no-progress", *how,
    )  # fmt: skip


def _start_and_wait_for_first_commit(args: list[str], out: Path, n_logs: int) -> subprocess.Popen:
    """Start the CLI in its own session; return once a log is committed and others are still to do."""
    # SIGINT as at a terminal, even when the tests run where it is ignored (a background job inherits SIG_IGN)
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    manifest_file = out / "mini" / "manifest.json"
    deadline = time.monotonic() + 120
    committed: dict = {}
    while time.monotonic() < deadline and proc.poll() is None and not committed:
        if manifest_file.exists():
            committed = json.loads(manifest_file.read_text())["logs"]
        time.sleep(0.01)
    assert committed, "no log was committed"
    assert len(committed) < n_logs and proc.poll() is None, "the run finished before it could be stopped"
    return proc


def _read_until_eof(stream, seconds: float) -> tuple[bytes, bool]:
    """What ``stream`` yields until end-of-file (every writer gone), and whether EOF came in time."""
    import select

    data, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return data, True
            data += chunk
    return data, False


@pytest.mark.slow
def test_kill_9_of_the_client_leaves_no_process_and_no_write_behind(many_logs, tmp_path: Path) -> None:
    root, logs = many_logs
    out = tmp_path / "out"
    proc = _start_and_wait_for_first_commit(_collect_args(root, out, 2), out, len(logs))
    members = _session_members(proc.pid)
    # the client, the forkserver, the resource tracker and 2 busy workers
    assert len(members) >= 5, members
    os.kill(proc.pid, signal.SIGKILL)  # the client only, not its group
    proc.wait(timeout=10)
    at_kill = _committed_files(out / "mini")
    survivors = _wait_for_no_members(proc.pid, 20)
    assert survivors == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in survivors]
    _, eof = _read_until_eof(proc.stdout, 10)
    assert eof, "a process of the run still holds the caller's stdout"
    proc.stdout.close()
    time.sleep(0.5)
    assert _committed_files(out / "mini") == at_kill  # nothing was written after the kill


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_fails_its_log_only(many_logs, tmp_path: Path) -> None:
    root, logs = many_logs
    victim = sorted(log.log_name for log in logs)[3]
    env = {**os.environ, KILL_HOOK_ENV: victim}
    result = subprocess.run(
        _collect_args(root, tmp_path, 2), capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("  FAILED")]  # the summary's
    assert len(failed) == 1 and failed[0].startswith(f"  FAILED {victim}: "), result.stdout
    assert "worker died (signal 9, SIGKILL) on 2 tries" in failed[0] and f"{victim}.db" in failed[0]
    assert f"{len(logs) - 1} logs done, 0 skipped (up to date), 1 failed" in result.stdout
    manifest = load_manifest(tmp_path / "mini")
    assert sorted(manifest.logs) == sorted(log.log_name for log in logs if log.log_name != victim)
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_worker_killed_once_is_retried_and_the_summary_says_so(many_logs, tmp_path: Path) -> None:
    root, logs = many_logs
    victim = sorted(log.log_name for log in logs)[5]
    env = {**os.environ, KILL_HOOK_ENV: victim, KILL_ONCE_ENV: str(tmp_path / "died")}
    args = [*_collect_args(root, tmp_path, 2), "--json"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "died").exists()  # the hook fired: one worker died
    summary = json.loads(result.stdout)
    assert summary["retried"] == {victim: ["signal 9, SIGKILL"]} and summary["failed"] == {}
    assert sorted(load_manifest(tmp_path / "mini").logs) == sorted(log.log_name for log in logs)
    text = subprocess.run(
        _collect_args(root, tmp_path / "again", 2), capture_output=True, text=True,
        env={**env, KILL_ONCE_ENV: str(tmp_path / "died2")}, timeout=300, check=False,
    ).stdout  # fmt: skip
    assert f"  retried {victim} after its worker died (signal 9, SIGKILL)" in text.splitlines(), text


def _forkserver_with_workers(client: int, not_these: set[int], seconds: float) -> tuple[int, list[int]]:
    """A forkserver of ``client`` (not one of ``not_these``) once it has workers, and its workers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        members = {pid: _stat_fields(pid) for pid in _session_members(client)}
        for pid, fields in members.items():
            if not fields or int(fields[1]) != client or pid in not_these:
                continue
            if b"multiprocessing.forkserver" in _cmdline(pid):
                workers = [w for w, f in members.items() if f and int(f[1]) == pid and f[0] != "Z"]
                if workers:
                    return pid, workers
        time.sleep(0.005)
    raise AssertionError("no forkserver with workers appeared")


@pytest.mark.slow
def test_killed_forkservers_take_their_workers_along_and_cost_no_log_a_try(many_logs, tmp_path: Path) -> None:
    root, logs = many_logs
    proc = _start_and_wait_for_first_commit(_collect_args(root, tmp_path, 2), tmp_path, len(logs))
    killed: set[int] = set()
    # twice, the second as soon as the new one has workers: a log redone after the first kill usually dies
    # again (RETRIES is 1: charged, it would fail; test_collect_pool.py pins the rule without timing)
    for _ in range(2):
        server, workers = _forkserver_with_workers(proc.pid, killed, 60)
        os.kill(server, signal.SIGKILL)
        killed.add(server)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "the workers outlived their forkserver"
            time.sleep(0.005)
    output, eof = _read_until_eof(proc.stdout, 120)
    text = output.decode()
    assert eof and proc.wait(timeout=10) == 0, text
    assert sorted(load_manifest(tmp_path / "mini").logs) == sorted(log.log_name for log in logs)
    retried = [line for line in text.splitlines() if line.startswith("  retried ")]
    assert retried, text
    for line in retried:  # the logs in flight at each kill died with it, some twice
        assert set(line[line.index("(") + 1 : -1].split("; ")) == {"its forkserver died"}, text


def _stat_fields(pid: int) -> list[str] | None:
    """``state, ppid, pgrp, session, ...`` of a process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2, "local:2"])
def test_ctrl_c_prints_one_line_exits_130_and_the_rerun_resumes(
    many_logs, tmp_path: Path, workers: int | str
) -> None:

    root, logs = many_logs
    args = _collect_args(root, tmp_path, workers)
    proc = _start_and_wait_for_first_commit(args, tmp_path, len(logs))
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole process group
    output, eof = _read_until_eof(proc.stdout, 60)
    assert eof and proc.wait(timeout=10) == 130, output.decode()
    text = output.decode()
    lines = [line for line in text.splitlines() if line.startswith("interrupted: ")]
    assert (
        len(lines) == 1
        and "logs committed" in lines[0]
        and "run the same command again to resume" in lines[0]
    )
    for noise in ("Traceback", "KeyboardInterrupt", "asyncio", "Exception"):
        assert noise not in text, text
    assert _wait_for_no_members(proc.pid, 20) == []
    committed = load_manifest(tmp_path / "mini").logs
    assert 0 < len(committed) < len(logs)
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(committed)} skipped (up to date), 0 failed" in rerun.stdout
    assert sorted(load_manifest(tmp_path / "mini").logs) == sorted(log.log_name for log in logs)


# -- bad values: ego poses, non-finite rows, broken blobs ----------------------------------------------


def test_non_finite_ego_poses_drop_frames_and_a_nan_velocity_fails_its_log(tmp_path: Path) -> None:
    logs = synthesize(tmp_path / "in", logs=2, seconds=SECONDS, seed=7, split="mini", blobs=False)
    posed, boxed = sorted(logs, key=lambda log: log.log_name)
    assert collect(_config(tmp_path / "in", tmp_path / "probe", check_blobs=False), echo=lambda _: None).ok
    clean = {
        log.log_name: read_log_frames(tmp_path / "probe" / "mini", log.log_name).to_pylist() for log in logs
    }
    baseline = load_manifest(tmp_path / "probe" / "mini").logs[posed.log_name]
    bad_tokens = [clean[posed.log_name][i]["token"] for i in (1, 2, 3)]
    with sqlite3.connect(posed.db_path) as con:
        pose = "(SELECT ego_pose_token FROM lidar_pc WHERE lower(hex(token)) = ?)"
        con.execute(f"UPDATE ego_pose SET x = ? WHERE token = {pose}", (float("nan"), bad_tokens[0]))  # NULL
        con.execute(f"UPDATE ego_pose SET z = 1e999 WHERE token = {pose}", (bad_tokens[1],))  # inf
        con.execute(
            f"UPDATE ego_pose SET qw = 0, qx = 0, qy = 0, qz = 0 WHERE token = {pose}", (bad_tokens[2],)
        )
    row = clean[boxed.log_name][2]
    with sqlite3.connect(boxed.db_path) as con:
        box = con.execute(
            "SELECT token FROM lidar_box WHERE lidar_pc_token = (SELECT token FROM lidar_pc "
            "WHERE lower(hex(token)) = ?) ORDER BY token",
            (row["token"],),
        ).fetchone()[0]
        con.execute("UPDATE lidar_box SET vy = ? WHERE token = ?", (float("nan"), box))
    out = tmp_path / "out"
    result = subprocess.run(
        _collect_args(tmp_path / "in", out, 1), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stdout + result.stderr
    manifest = load_manifest(out / "mini")
    assert list(manifest.logs) == [posed.log_name]
    entry = manifest.logs[posed.log_name]
    assert entry.dropped == {**baseline.dropped, "bad_ego_pose": 3}
    table = read_log_frames(out / "mini", posed.log_name)
    assert table.num_rows == entry.frames == baseline.frames - 3
    assert not set(bad_tokens) & set(table.column("token").to_pylist())
    check_finite(table, posed.db_path, posed.log_name)
    assert "bad_ego_pose 3" in result.stdout
    (failed,) = [line for line in result.stdout.splitlines() if line.startswith("  FAILED")]
    assert failed.startswith(
        f"  FAILED {boxed.log_name}: {boxed.db_path}: log {boxed.log_name}: column anns.gt_velocity_3d holds nan "
        f"at row 2 (token {row['token']})"
    ), failed
    assert not (out / "mini" / "meta" / f"{boxed.log_name}.parquet").exists()


def test_broken_blobs_are_dropped_counted_and_reported(world, tmp_path: Path) -> None:
    root, logs = world
    rows = _first_rows(root, tmp_path / "probe", logs[0].log_name)
    inputs = tmp_path / "in"
    shutil.copytree(root / "splits", inputs / "splits")
    _touch_blobs(logs, inputs / "sensor_blobs")
    blobs = inputs / "sensor_blobs"
    (blobs / rows[1]["cams"]["CAM_F0"]["data_path"]).write_bytes(b"")  # zero-byte image
    image = blobs / rows[2]["cams"]["CAM_R2"]["data_path"]
    image.write_bytes(image.read_bytes()[:-30])  # truncated image
    sweep = blobs / rows[3]["lidar_path"]
    sweep.write_bytes(sweep.read_bytes()[:-4])  # truncated binary sweep
    summary = collect(_config(inputs, tmp_path / "out"), echo=lambda _: None)
    assert summary.ok
    assert summary.dropped == {"broken_image": 2, "broken_lidar": 1}
    entry = load_manifest(tmp_path / "out" / "mini").logs[logs[0].log_name]
    assert entry.dropped == {"broken_image": 2, "broken_lidar": 1} and entry.frames == len(rows) - 3
    assert any(str(sweep) in note and "truncated" in note for note in entry.notes)
    text = summary.format()
    assert "WARNING: 3 frames dropped for broken sensor files (broken_lidar 1, broken_image 2), e.g. " in text
    assert "then run again with --overwrite" in text
