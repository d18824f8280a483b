"""collect to an object store (``--out s3://...``) against a moto S3 server on 127.0.0.1.

Real uploads, real Dask ``LocalCluster`` workers (127.0.0.1, dashboard on port 0) that know the store
only from their environment (no shared file system is used for the output), a real worker SIGKILLed
mid-log, a real client SIGKILLed mid-log and rerun, and the readers (``open_split``, ``FrameStream``)
on what the bucket holds at each moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest

from driveengine.collect.plan import plan_tasks
from driveengine.collect.pool import KILL_HOOK_ENV, KILL_ONCE_ENV
from driveengine.collect.runner import CollectConfig, collect
from driveengine.data import FrameStream
from driveengine.store.check import DIFFERS, MISSING, OK, collected_split_folder, verify_split
from driveengine.store.commit import (
    ATTEMPT_RE,
    LOCK_NAME,
    CollectLockedError,
    CommitError,
    ObjectStoreLogOutput,
    ObjectStoreSplit,
    OutputLocationError,
    meta_relpath,
    occ_relpath,
    sha256_file,
)
from driveengine.store.dataset import DatasetError, open_split
from driveengine.store.manifest import Manifest, load_manifest
from driveengine.store.occ import open_occ
from driveengine.synth import synthesize

OCC = ("semantics", "flow", "mask_lidar")
BUCKET = "collect-s3-tests"


def _s3(**options):
    """An s3fs file system (s3fs is a dev dependency; the fixture skips without it)."""
    import s3fs

    return s3fs.S3FileSystem(**options)


@pytest.fixture(scope="module")
def moto_options():
    """A moto S3 server on 127.0.0.1 with one bucket; the s3fs options that reach it."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    previous = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    fs = _s3(**options)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    yield options
    # moto keeps its buckets in this process after the server stops: leave none for other modules
    fs.rm(BUCKET, recursive=True)
    if previous is None:
        os.environ.pop("AWS_DEFAULT_REGION", None)
    else:
        os.environ["AWS_DEFAULT_REGION"] = previous
    server.stop()


@pytest.fixture
def s3(moto_options, monkeypatch, request):
    """This test's prefix URL; the store's options are in fsspec's configuration of this process and in the
    environment (``FSSPEC_S3``) of every process it starts, as a user would set them."""
    monkeypatch.setenv("FSSPEC_S3", json.dumps(moto_options))
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(moto_options))
    fs = _s3(**moto_options)
    prefix = f"{BUCKET}/{request.node.name.split('[')[0]}"
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    return f"s3://{prefix}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Three tiny nuPlan logs with real point clouds (few rays), so labels are made too."""
    root = tmp_path_factory.mktemp("nuplan")
    logs = synthesize(root, logs=3, seconds=1.5, seed=11, split="mini", points=128, image_size=(16, 9))
    return root, sorted(log.log_name for log in logs)


def _config(root: Path, out: str | Path, **kw) -> CollectConfig:
    """A URL as the command line passes it: text (``from_options`` keeps it so)."""
    return CollectConfig.from_options(source="nuplan", root=root, out=out, split="mini", progress=False, **kw)


def test_an_out_url_stays_a_url_through_config_and_plan(world, tmp_path) -> None:
    root, names = world
    for out in ("s3://bucket/data", "s3://bucket/data/"):
        config = _config(root, out)
        assert config.run.out == out  # a Path would have folded it into "s3:/bucket/data"
        plan = plan_tasks(config)
        assert (plan.split, plan.split_dir) == ("mini", "s3://bucket/data/mini")
        assert [task.split_dir for task in plan.tasks] == ["s3://bucket/data/mini"] * len(names)
    for out in (tmp_path / "out", str(tmp_path / "out"), f"file://{tmp_path}/out"):
        plan = plan_tasks(_config(root, out))
        assert _config(root, out).run.out == tmp_path / "out"
        assert plan.split_dir == tmp_path / "out" / "mini" and isinstance(plan.split_dir, Path)
        assert {task.split_dir for task in plan.tasks} == {str(tmp_path / "out" / "mini")}


@pytest.fixture(scope="module")
def local(world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same logs collected to a local folder, in this process: the reference."""
    root, names = world
    out = tmp_path_factory.mktemp("local")
    summary = collect(_config(root, out), echo=lambda _: None)
    assert summary.ok and sorted(summary.done) == names, summary.format()
    return out / "mini"


def _listing(options: dict, url: str) -> set[str]:
    """Every object under ``url``, relative to it."""
    fs = _s3(**options)
    fs.invalidate_cache()
    prefix = url.removeprefix("s3://")
    return {key[len(prefix) + 1 :] for key in fs.find(prefix)}


def _expected_objects(options: dict, url: str, manifest: Manifest) -> set[str]:
    """The manifest and every object of the files its entries name: all a committed split holds."""
    fs = _s3(**options)
    prefix = url.removeprefix("s3://")
    objects = {"manifest.json"}
    for entry in manifest.logs.values():
        objects.add(entry.meta)
        if entry.occ:
            objects |= {key[len(prefix) + 1 :] for key in fs.find(f"{prefix}/{entry.occ}")}
    return objects


def _assert_same_as_local(options: dict, url: str, local: Path, names: list[str], cache_dir: Path) -> None:
    """Entries, checksums, object bytes, reader rows and streamed samples equal the local collect's."""
    remote_manifest = load_manifest(url, storage_options=options)
    local_manifest = load_manifest(local)
    assert sorted(remote_manifest.logs) == names
    fs = _s3(**options)
    prefix = url.removeprefix("s3://")
    for name in names:
        r, lo = remote_manifest.logs[name], local_manifest.logs[name]
        # per-attempt keys: the names differ from the local ones, the checksums are the same values
        assert ATTEMPT_RE.search(r.meta) and r.meta.startswith(f"meta/{name}.")
        assert ATTEMPT_RE.search(r.occ) and r.occ.startswith(f"occ/{name}.")
        assert (r.frames, r.config_hash, r.dropped) == (lo.frames, lo.config_hash, lo.dropped)
        assert r.checksums == {
            r.meta: lo.checksums[meta_relpath(name)],
            r.occ: lo.checksums[occ_relpath(name)],
        }
        # and the bytes: the frame shard, and every object of the Zarr group
        assert fs.cat_file(f"{prefix}/{r.meta}") == (local / lo.meta).read_bytes()
        remote_tree = {k[len(f"{prefix}/{r.occ}") + 1 :]: k for k in fs.find(f"{prefix}/{r.occ}")}
        local_tree = {
            p.relative_to(local / lo.occ).as_posix(): p for p in (local / lo.occ).rglob("*") if p.is_file()
        }
        assert sorted(remote_tree) == sorted(local_tree)
        for rel, key in remote_tree.items():
            assert fs.cat_file(key) == local_tree[rel].read_bytes(), rel
    remote_split, local_split = open_split(url, storage_options=options), open_split(local)
    assert [log.name for log in remote_split.logs] == names
    for name in names:
        assert remote_split.log(name).frames().equals(local_split.log(name).frames())
    remote = FrameStream(
        url.rsplit("/", 1)[0], "mini", fields=OCC, shuffle=False, storage_options=options, cache_dir=cache_dir
    )
    here = FrameStream(local.parent, "mini", fields=OCC, shuffle=False)
    pairs = list(zip(remote, here, strict=True))
    assert len(pairs) == sum(e.frames for e in local_manifest.logs.values()) > 0
    for a, b in pairs:
        assert a["token"] == b["token"]
        for key in OCC:
            assert np.array_equal(a[key], b[key]), key


@pytest.mark.slow
def test_s3_collect_on_a_dask_cluster_equals_a_local_collect(
    world, local, s3, moto_options, tmp_path
) -> None:
    root, names = world
    summary = collect(_config(root, s3, scheduler="local:2"), echo=lambda _: None)
    assert summary.ok and sorted(summary.done) == names and summary.cleaned == [], summary.format()
    url = f"{s3}/mini"
    _assert_same_as_local(moto_options, url, local, names, tmp_path / "cache")
    manifest = load_manifest(url, storage_options=moto_options)
    assert _listing(moto_options, url) == _expected_objects(
        moto_options, url, manifest
    )  # no lock, no leftover
    rerun = collect(_config(root, s3, scheduler="local:2"), echo=lambda _: None)
    assert rerun.ok and sorted(rerun.skipped) == names and rerun.done == []
    assert load_manifest(url, storage_options=moto_options).logs == manifest.logs


@pytest.mark.slow
def test_a_dask_worker_killed_mid_log_is_retried_without_duplicate_or_partial_output(
    world, local, s3, moto_options, tmp_path, monkeypatch
) -> None:
    root, names = world
    victim = names[1]
    scratch = tmp_path / "scratch"  # the workers' $TMPDIR: their private scratch folders
    scratch.mkdir()
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_HOOK_ENV, victim)
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    monkeypatch.setenv("TMPDIR", str(scratch))
    summary = collect(_config(root, s3, scheduler="local:2"), echo=lambda _: None)
    assert marker.exists(), "no worker was killed"
    assert summary.ok and sorted(summary.done) == names, summary.format()
    url = f"{s3}/mini"
    manifest = load_manifest(url, storage_options=moto_options)
    # The killed attempt had uploaded the victim's frame shard before it died; the client removed it.
    (partial,) = summary.cleaned
    assert partial.startswith(f"meta/{victim}.") and ATTEMPT_RE.search(partial)
    assert partial != manifest.logs[victim].meta
    assert _listing(moto_options, url) == _expected_objects(moto_options, url, manifest)
    assert sum(key.startswith(f"meta/{victim}.") for key in _listing(moto_options, url)) == 1
    _assert_same_as_local(moto_options, url, local, names, tmp_path / "cache")
    # The dead worker's scratch folder was removed by the next job on this host.
    assert list(scratch.iterdir()) == []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "driveengine.cli", *args]


@pytest.mark.slow
def test_a_client_killed_mid_log_leaves_nothing_visible_and_the_rerun_resumes(
    world, local, s3, moto_options, tmp_path
) -> None:
    root, names = world
    victim = names[1]
    args = _cli("collect", "--nuplan-root", str(root), "--out", s3, "--no-progress", "--workers", "1")
    env = {**os.environ, KILL_HOOK_ENV: victim}  # --workers 1: the client runs the log and dies with it
    crashed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    url = f"{s3}/mini"
    objects = _listing(moto_options, url)
    assert LOCK_NAME in objects  # the dead client's lock
    partial = [key for key in objects if key.startswith(f"meta/{victim}.")]
    assert len(partial) == 1  # its frame shard was uploaded before it died
    # Readers see the committed log only, and only its files.
    split = open_split(url, storage_options=moto_options)
    assert [log.name for log in split.logs] == names[:1]
    (entry,) = split.manifest.logs.values()
    assert set(entry.checksums) == {entry.meta, entry.occ} and partial[0] not in entry.checksums
    assert split.logs[0].frames().num_rows == entry.frames > 0
    with pytest.raises(DatasetError, match="is not committed here"):
        split.log(victim)
    stream = FrameStream(
        s3, "mini", fields=OCC, shuffle=False, storage_options=moto_options, cache_dir=tmp_path / "cache"
    )
    assert stream.num_frames == entry.frames and {s["log_name"] for s in stream} == {names[0]}

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "took over the lock of a previous run (its process (pid" in rerun.stdout
    assert f"{len(names) - 1} logs done, 1 skipped (up to date), 0 failed" in rerun.stdout
    assert "removed 1 objects that no manifest entry names" in rerun.stdout
    manifest = load_manifest(url, storage_options=moto_options)
    assert manifest.logs[names[0]] == entry  # not redone
    assert _listing(moto_options, url) == _expected_objects(
        moto_options, url, manifest
    )  # no lock, no partial
    tokens = open_split(url, storage_options=moto_options).frames(["token"]).column("token").to_pylist()
    assert len(tokens) == len(set(tokens)) == sum(e.frames for e in manifest.logs.values())
    _assert_same_as_local(moto_options, url, local, names, tmp_path / "cache")


def _write_lock(options: dict, url: str, data: bytes) -> None:
    _s3(**options).pipe_file(f"{url.removeprefix('s3://')}/mini/{LOCK_NAME}", data)


def test_a_second_collect_on_one_prefix_is_refused_and_a_stale_lock_is_taken_over(
    world, s3, moto_options
) -> None:
    root, names = world
    config = _config(root, s3, labels=False, logs=names[:1])
    holder = ObjectStoreSplit(f"{s3}/mini").lock()
    holder.acquire()  # a live run (this process: alive on this host)
    try:
        with pytest.raises(CollectLockedError, match=rf"pid {os.getpid()} on host .*lock renewed \d+ s ago"):
            collect(config, echo=lambda _: None)
    finally:
        holder.release()
    assert LOCK_NAME not in _listing(moto_options, f"{s3}/mini")
    record = {"host": "other-host", "pid": 4242, "pid_start": None, "renewed_at": time.time()}
    _write_lock(moto_options, s3, json.dumps(record).encode())  # alive elsewhere, lease running
    with pytest.raises(CollectLockedError, match="pid 4242 on host other-host"):
        collect(config, echo=lambda _: None)
    _write_lock(moto_options, s3, b"\x00not a lock")  # not ours: never taken over silently
    with pytest.raises(CollectLockedError, match=r"not a DriveEngine collect lock; .* delete it"):
        collect(config, echo=lambda _: None)
    record["renewed_at"] = time.time() - 3600  # a run on another host that died an hour ago
    _write_lock(moto_options, s3, json.dumps(record).encode())
    said: list[str] = []
    summary = collect(config, echo=said.append)
    assert summary.ok and summary.done == names[:1]
    assert any("took over the lock of a previous run (its lease expired" in line for line in said), said
    assert LOCK_NAME not in _listing(moto_options, f"{s3}/mini")


def _lock_record(options: dict, url: str) -> dict:
    fs = _s3(**options)
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{url.removeprefix('s3://')}/{LOCK_NAME}"))


def _wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_lock_is_renewed_and_a_run_taken_over_cannot_overwrite_its_successor(s3, moto_options) -> None:
    url = f"{s3}/mini"
    first = ObjectStoreSplit(url, lease_s=2.0)
    first.lock().acquire()
    try:
        manifest = first.load_manifest("mini")
        first.save_manifest(manifest)
        renewed = _lock_record(moto_options, url)["renewed_at"]
        assert _wait_for(lambda: _lock_record(moto_options, url)["renewed_at"] > renewed), "never renewed"
        with pytest.raises(CollectLockedError, match="another `driveengine collect` is writing here"):
            ObjectStoreSplit(url, lease_s=2.0).lock().acquire()
        # The first run stalls (as under SIGSTOP) past its lease: its record is left old.
        stale = {**_lock_record(moto_options, url), "renewed_at": time.time() - 60}
        second = ObjectStoreSplit(url, lease_s=2.0)
        _s3(**moto_options).pipe_file(f"{url.removeprefix('s3://')}/{LOCK_NAME}", json.dumps(stale).encode())
        second.lock().acquire()
        assert second.lock().took_over and "lease expired" in second.lock().took_over
        theirs = second.load_manifest("mini")
        theirs.extra["note"] = "the second run's"
        second.save_manifest(theirs)
        # The first run wakes up: its manifest put is refused, and its heartbeat finds the lock taken.
        with pytest.raises(CollectLockedError, match="was changed by another process during this run"):
            first.save_manifest(manifest)
        assert load_manifest(url, storage_options=moto_options).extra["note"] == "the second run's"

        def lost() -> bool:
            try:
                first.lock().check()
            except CollectLockedError:
                return True
            return False

        assert _wait_for(lost), "the first run never noticed it lost the lock"
        first.lock().release()  # must not delete the second run's lock
        assert LOCK_NAME in _listing(moto_options, url)
        second.lock().release()
        assert LOCK_NAME not in _listing(moto_options, url)
    finally:
        first.lock().release()


def _stage(output: ObjectStoreLogOutput) -> None:
    (meta := output.stage("meta/log.parquet")).write_bytes(b"rows " * 100)
    occ = output.stage("occ/log.zarr")
    (occ / "semantics" / "c").mkdir(parents=True)
    (occ / "zarr.json").write_bytes(b"{}")
    (occ / "semantics" / "c" / "0").write_bytes(bytes(range(256)) * 8)
    output.finish("meta/log.parquet")
    assert meta.exists()


def _flip_a_byte(fs, key: str) -> None:
    data = bytearray(fs.cat_file(key))
    data[7] ^= 0xFF
    fs.pipe_file(key, bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip_a_byte, "sha256 sha256:.* read back, sha256:.* written"),
        (lambda fs, key: fs.rm_file(key), "missing"),
        (lambda fs, key: fs.pipe_file(key.rsplit("/", 1)[0] + "/1", b"x"), "not written by this attempt"),
    ],
)
def test_an_upload_that_does_not_read_back_as_written_is_not_committed(
    s3, moto_options, monkeypatch, tmp_path, damage, message
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    output = ObjectStoreLogOutput(f"{s3}/mini")
    fs = output.store.fs
    real_put = fs.put

    def put_then_damage(lpaths, rpaths, **kw):  # a store or a proxy that garbles what it was sent
        real_put(lpaths, rpaths, **kw)
        chunk = [key for key in rpaths if key.endswith("semantics/c/0")]
        if chunk:
            damage(fs, chunk[0])

    monkeypatch.setattr(fs, "put", put_then_damage)
    _stage(output)
    with pytest.raises(CommitError, match=rf"does not read back as written .*first: .*{message}"):
        output.commit()
    output.discard()
    assert _listing(moto_options, s3) == set()  # the attempt's objects are removed
    assert list(tmp_path.iterdir()) == []  # and its scratch folder


def test_a_verified_upload_names_per_attempt_keys_with_local_checksums(
    s3, moto_options, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    output = ObjectStoreLogOutput(f"{s3}/mini")
    _stage(output)
    staged = sha256_file(next(tmp_path.rglob("*.parquet")))
    committed = output.commit()
    output.discard()
    meta, occ = committed.paths["meta/log.parquet"], committed.paths["occ/log.zarr"]
    assert meta == f"meta/log.{output.attempt}.parquet" and occ == f"occ/log.{output.attempt}.zarr"
    assert committed.checksums[meta] == staged
    assert _listing(moto_options, f"{s3}/mini") == {meta, f"{occ}/zarr.json", f"{occ}/semantics/c/0"}
    assert list(tmp_path.iterdir()) == []


def test_any_fsspec_url_and_bad_urls(world, local, tmp_path) -> None:
    root, names = world
    url = f"memory://collect-{os.getpid()}/data"
    try:
        summary = collect(_config(root, url), echo=lambda _: None)
        assert summary.ok and sorted(summary.done) == names, summary.format()
        split = open_split(f"{url}/mini")
        for name in names:
            assert split.log(name).frames().equals(open_split(local).log(name).frames())
            assert np.array_equal(
                split.log(name).labels().read()["semantics"],
                open_split(local).log(name).labels().read()["semantics"],
            )
    finally:
        fsspec.filesystem("memory").rm(f"/collect-{os.getpid()}", recursive=True)
    with pytest.raises(OutputLocationError, match=r"^nosuch://x/mini: no fsspec file system for this URL"):
        collect(_config(root, "nosuch://x"), echo=lambda _: None)
    config = _config(root, Path("unused"))
    folded = replace(config, run=replace(config.run, out=Path("s3://bucket/data")))  # Path() folds the '//'
    with pytest.raises(
        OutputLocationError, match=r"^s3:/bucket/data: looks like a URL whose '//' was folded"
    ):
        collect(folded, echo=lambda _: None)  # never a local folder named "s3:"
    assert not Path("s3:").exists()


def test_uploads_the_client_cannot_see_are_not_committed(world, tmp_path) -> None:
    """Workers in other processes with a process-local store (or, alike, another endpoint in their
    environment): each verifies its own upload, and the client refuses entries it cannot see."""
    root, names = world
    url = f"memory://elsewhere-{os.getpid()}/data"
    try:
        summary = collect(_config(root, url, labels=False, workers=2), echo=lambda _: None)
        assert sorted(summary.failed) == names and summary.done == []
        assert all(
            "the worker's upload is not visible from this client" in r for r in summary.failed.values()
        )
        assert open_split(f"{url}/mini").logs == []
    finally:
        fsspec.filesystem("memory").rm(f"/elsewhere-{os.getpid()}", recursive=True)


def test_a_missing_bucket_is_one_clear_error(world, moto_options, monkeypatch) -> None:
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(moto_options))
    root, _ = world
    with pytest.raises(
        OutputLocationError, match=r"cannot write the collect lock .*check that the bucket exists"
    ):
        collect(_config(root, "s3://no-such-bucket/data", labels=False), echo=lambda _: None)


def test_verify_reads_a_collected_split_back_from_the_store(world, local, s3, moto_options) -> None:
    """``verify`` of a split on S3: every object read back and hashed as the worker did; damage named."""
    root, names = world
    first, second = names[:2]
    summary = collect(_config(root, s3, logs=[first, second]), echo=lambda _: None)
    assert summary.ok, summary.format()
    url = f"{s3}/mini"
    assert collected_split_folder(s3, "mini") == url and collected_split_folder(url, "other") == url
    assert collected_split_folder(f"{s3}/nothing", "mini") is None
    check = verify_split(url, storage_options=moto_options, workers=2)
    assert check.ok and check.logs == 2 and len(check.files) == 4, check.format()
    assert {f.status for f in check.files} == {OK}
    assert check.split_dir == url and "OK: every committed file matches" in check.format()
    # the checksums verify recomputes from the objects are the ones a local collect records
    local_sums = {(f.log, f.path): f.actual for f in verify_split(local).files}
    for f in check.files:
        attempt = ATTEMPT_RE.search(f.path).group(1)
        assert f.actual == local_sums[(f.log, f.path.replace(f".{attempt}", ""))]
    # the label group's log name is the log's, not its per-attempt key's
    split = open_split(url, storage_options=moto_options)
    labels = split.log(first).labels()
    assert ATTEMPT_RE.search(labels.path) and labels.log_name == first
    assert open_occ(labels.path, storage_options=moto_options).log_name == first  # opened by its URL alone

    fs = _s3(**moto_options)
    prefix = url.removeprefix("s3://")
    manifest = load_manifest(url, storage_options=moto_options)
    group = f"{prefix}/{manifest.logs[first].occ}"
    shards = sorted(k for k in fs.find(f"{group}/semantics") if not k.endswith("zarr.json"))
    fs.rm_file(shards[0])  # a label shard lost
    fs.pipe_file(f"{group}/flow/c/9/9/9", b"planted")  # an object that is no part of the group
    fs.rm_file(f"{prefix}/{manifest.logs[second].meta}")  # a frame shard lost
    fs.invalidate_cache()
    check = verify_split(url, storage_options=moto_options)
    assert not check.ok and check.damaged_logs() == [first, second]
    (occ,) = [f for f in check.problems if f.log == first]
    assert occ.status == DIFFERS and occ.path == manifest.logs[first].occ
    assert any(
        d.startswith(f"missing: {shards[0][len(prefix) + 1 :]} (semantics frames 0..") for d in occ.details
    )
    assert f"not part of a DriveEngine label group: {manifest.logs[first].occ}/flow/c/9/9/9" in occ.details
    (meta,) = [f for f in check.problems if f.log == second]
    assert meta.status == MISSING and meta.path == manifest.logs[second].meta
    text = check.format()
    assert f"MISSING: {url}/{manifest.logs[second].meta} (log {second})" in text, text
    assert f"--overwrite --logs {first},{second}" in text
