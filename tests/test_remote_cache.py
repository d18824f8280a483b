"""Remote splits through the local cache (driveengine.store.cache) against a moto S3 server on 127.0.0.1:
the second epoch asks the server for nothing, the size limit holds at every moment, a corrupted or
truncated entry is never served, processes sharing one folder do not corrupt it, a re-collected log is not
served stale, a failing disk falls back to the remote, prefetching runs ahead of the reader."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path

import cache_workers
import numpy as np
import pytest
import torch
from stream_fixtures import build_split

from driveengine.data import FrameStream
from driveengine.store.cache import (
    BLOCK_BYTES,
    CachedFile,
    CacheError,
    FileCache,
    file_cache,
)

pytest.importorskip("moto")
s3fs = pytest.importorskip("s3fs")

OCC = ("semantics", "flow", "mask_lidar")
FIELDS = (*OCC, "ego2global", "points", "images")
_REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (/[^ ?]*)')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Requests(logging.Handler):
    """Counts the requests the moto server answers (all processes), by method and path."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str]] = []
        self.mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        found = _REQUEST.search(_ANSI.sub("", record.getMessage()))  # werkzeug colours some lines
        if found:
            with self.mutex:
                self.seen.append((found.group(1), found.group(2)))

    def reads(self, start: int = 0) -> list[tuple[str, str]]:
        with self.mutex:
            return [r for r in self.seen[start:] if r[0] in ("GET", "HEAD")]


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A split (labels, points, images) uploaded to a moto server on 127.0.0.1, blobs included."""
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("remote")
    info = build_split(root, points=True, images=True)
    requests = Requests()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(requests)
    level = werkzeug.level
    werkzeug.setLevel(logging.INFO)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    old_region = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("cachetest")
        files = {}
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                fs.pipe_file(f"cachetest/data/{rel}", path.read_bytes())
                files[rel] = path.read_bytes()
        yield {"info": info, "options": options, "requests": requests, "files": files, "fs": fs}
    finally:
        # moto keeps its buckets in this process after the server stops: leave none for other modules
        s3fs.S3FileSystem(**options).rm("cachetest", recursive=True)
        server.stop()
        werkzeug.removeHandler(requests)
        werkzeug.setLevel(level)
        if old_region is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = old_region


def _remote_stream(remote, cache_dir, **kw) -> FrameStream:
    options = dict(fields=FIELDS, seed=4, global_batch_size=5, image_size=(32, 18), image_dtype="uint8")
    return FrameStream(
        "s3://cachetest/data", "mini", storage_options=remote["options"], blob_root="s3://cachetest/data/sensor_blobs",
        cache_dir=cache_dir, **{**options, **kw},
    )  # fmt: skip


def _local_batches(remote, **kw) -> list[dict]:
    info = remote["info"]
    options = dict(fields=FIELDS, seed=4, global_batch_size=5, image_size=(32, 18), image_dtype="uint8")
    return list(FrameStream(info.root, info.split, **{**options, **kw}).loader(num_workers=0))


def _same(a: dict, b: dict) -> None:
    assert a["token"] == b["token"]
    for key in (*OCC, "ego2global", "images"):
        assert torch.equal(a[key], b[key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["points"], b["points"], strict=True))


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "objects").rglob("*") if p.is_file())


def _url_of(remote, cache_dir: Path, entry: Path) -> str:
    """The server path of the remote file a cache entry holds."""
    cache = file_cache(cache_dir, FrameStream.__init__.__kwdefaults__["cache_limit_bytes"])
    for rel in remote["files"]:
        version = cache.version_of("s3", f"cachetest/data/{rel}")
        if version is not None and FileCache.key("s3", f"cachetest/data/{rel}", version) == entry.name:
            return f"/cachetest/data/{rel}"
    raise AssertionError(f"no remote file for {entry}")


def _entry_bytes(path: Path) -> bytes:
    """The whole content of a cache entry, every block checked."""
    fd = os.open(path, os.O_RDONLY)
    try:
        entry = CachedFile(str(path), fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        return entry.read()
    finally:
        entry.close()


def _disk_bytes(cache_dir: Path, reserved: bool = False) -> int:
    """Bytes of the files under ``objects/`` and ``tmp/`` right now (0 before the folder exists); with
    ``reserved``, a partial download counts the final size of its entry (its name declares the file size)."""
    total = 0
    folders = []
    with contextlib.suppress(FileNotFoundError):
        folders += [Path(e.path) for e in os.scandir(cache_dir / "objects")]
    folders.append(cache_dir / "tmp")  # after objects/: a file renamed meanwhile is not counted twice
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(folder):
                with contextlib.suppress(FileNotFoundError):
                    size = e.stat(follow_symlinks=False).st_size
                    if reserved and e.name.endswith(".part"):
                        declared = int(e.name.split(".")[3])
                        size = max(size, declared + 4 * (-(-declared // BLOCK_BYTES)) + 32)
                    total += size
    return total


def test_second_epoch_asks_the_server_for_nothing(remote, tmp_path):
    local = _local_batches(remote)
    stream = _remote_stream(remote, tmp_path / "cache")
    first = [b for b in stream.loader(num_workers=2)]
    for a, b in zip(local, first, strict=True):
        _same(a, b)
    assert _entries(tmp_path / "cache")
    start = len(remote["requests"].seen)
    second = list(stream.loader(num_workers=2))  # new worker processes, the same cache folder
    in_process = list(stream.loader(num_workers=0))
    for a, b, c in zip(local, second, in_process, strict=True):
        _same(a, b)
        _same(a, c)
    assert remote["requests"].reads(start) == []  # labels, frame rows, zarr metadata, points, images: local
    # A new stream on the same folder (another run): only the manifest comes from the server.
    start = len(remote["requests"].seen)
    again = _remote_stream(remote, tmp_path / "cache")
    for a, b in zip(local, again.loader(num_workers=2), strict=True):
        _same(a, b)
    assert remote["requests"].reads(start) == [("HEAD", "/cachetest/data/mini/manifest.json"),
                                              ("GET", "/cachetest/data/mini/manifest.json")]  # fmt: skip


def test_the_size_limit_holds_at_every_moment(remote, tmp_path):
    cache_dir = tmp_path / "cache"
    sizes = sorted(len(v) for k, v in remote["files"].items() if k != "mini/manifest.json")
    largest = sizes[-1] + 4 * (-(-sizes[-1] // BLOCK_BYTES)) + 32
    limit = 60 * 1024  # a few files (of 411 KB): the epochs evict all the time
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _disk_bytes(cache_dir))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stream = _remote_stream(remote, cache_dir, cache_limit_bytes=limit, fields=(*OCC, "points"))
        local = _local_batches(remote, fields=(*OCC, "points"))
        for workers in (2, 0):
            for a, b in zip(local, stream.loader(num_workers=workers), strict=True):
                for key in OCC:
                    assert torch.equal(a[key], b[key])
                assert all(torch.equal(x, y) for x, y in zip(a["points"], b["points"], strict=True))
    finally:
        done.set()
        watcher.join(timeout=10)
    assert 0 < peak <= limit + largest
    assert _disk_bytes(cache_dir) <= limit
    assert not list((cache_dir / "tmp").iterdir())
    assert stream.cache_stats().evictions > 0
    # A partial download of a dead process holds room until the next reservation removes it.
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join(timeout=30)
    ghost = cache_dir / "tmp" / f"{'0' * 40}.{dead.pid}.abcd1234.{10**9}.part"
    ghost.touch()
    assert file_cache(cache_dir, limit).disk_bytes() <= limit
    assert not ghost.exists()


def test_corrupt_truncated_or_planted_entries_are_never_served(remote, tmp_path):
    cache_dir = tmp_path / "cache"
    local = _local_batches(remote)
    list(_remote_stream(remote, cache_dir).loader(num_workers=0))  # warm
    entries = _entries(cache_dir)
    big = sorted(entries, key=lambda p: p.stat().st_size)[-3:]
    flipped, truncated, garbage = big
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one bit flip inside the data, same size
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    small = sorted(entries, key=lambda p: p.stat().st_size)[0]
    target = tmp_path / "elsewhere"
    target.write_bytes(small.read_bytes())
    small.unlink()
    small.symlink_to(target)  # a planted symlink is refetched, not followed
    start = len(remote["requests"].seen)
    for workers in (0, 2):
        for a, b in zip(local, _remote_stream(remote, cache_dir).loader(num_workers=workers), strict=True):
            _same(a, b)
    refetched = [path for method, path in remote["requests"].reads(start) if method == "GET"]
    damaged = {_url_of(remote, cache_dir, p) for p in (flipped, truncated, garbage, small)}
    manifest = "/cachetest/data/mini/manifest.json"
    assert sorted(p for p in refetched if p != manifest) == sorted(damaged)  # exactly those, once each
    for path in _entries(cache_dir):  # and every entry now checks out
        _entry_bytes(path)
    assert not small.is_symlink()


def test_an_entry_damaged_while_a_process_holds_it_open_is_refetched(remote, tmp_path):
    cache_dir = tmp_path / "cache"
    stream = _remote_stream(remote, cache_dir, fields=OCC, image_dtype="float32")
    local = _local_batches(remote, fields=OCC, image_dtype="float32")
    list(stream.loader(num_workers=0))  # this process now holds the entries open
    for path in _entries(cache_dir):
        with open(path, "r+b") as f:  # in place: the same inode, the open descriptors see it
            f.seek(0)
            head = f.read(1)
            f.seek(0)
            f.write(bytes([head[0] ^ 0x01]))
    for a, b in zip(local, stream.loader(num_workers=0), strict=True):
        for key in OCC:
            assert torch.equal(a[key], b[key])
    assert stream.cache_stats().refetches >= 3


def test_processes_sharing_one_folder_do_not_corrupt_it(remote, tmp_path):
    """Four processes read twelve 192 KiB files (and the split's label files) through one folder that
    holds three: downloads run concurrently, evict each other's entries, wait for room; every byte read is
    right, the folder ends consistent, and the room reserved never exceeds the limit, at any moment."""
    cache_dir = tmp_path / "cache"
    rng = np.random.default_rng(7)
    blobs = {f"blobs/b{i:02d}": rng.bytes(192 * 1024) for i in range(12)}
    for rel, data in blobs.items():
        remote["fs"].pipe_file(f"cachetest/{rel}", data)
    files = {f"s3://cachetest/{rel}": data for rel, data in blobs.items()}
    files |= {f"s3://cachetest/data/{p}": d for p, d in remote["files"].items() if p.startswith("mini/occ/")}
    limit = 3 * (192 * 1024 + 4 * 1 + 32) + 1024
    peak = 0
    done = threading.Event()

    def watch() -> None:  # entries plus the room downloads in flight reserved, as the cache's lock sees them
        nonlocal peak
        while not done.is_set():
            if (cache_dir / ".lock").exists():
                with open(cache_dir / ".lock", "rb") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    peak = max(peak, _disk_bytes(cache_dir, reserved=True))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=cache_workers.read_everything,
            args=(str(cache_dir), limit, remote["options"], sorted(files), str(tmp_path / f"out{i}.json")),
        )
        for i in range(4)
    ]
    watcher.start()
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
            assert p.exitcode == 0
    finally:
        done.set()
        watcher.join(timeout=10)
    truth = {url: hashlib.sha256(data).hexdigest() for url, data in files.items()}
    for i in range(4):
        assert json.loads((tmp_path / f"out{i}.json").read_text()) == truth
    assert 0 < peak <= limit
    assert not list((cache_dir / "tmp").iterdir())
    assert _disk_bytes(cache_dir) <= limit
    for path in _entries(cache_dir):
        assert hashlib.sha256(_entry_bytes(path)).hexdigest() in truth.values()


def test_a_recollected_log_is_not_served_stale(remote, tmp_path):
    cache_dir = tmp_path / "cache"
    info = remote["info"]
    fs = remote["fs"]
    manifest_url = "cachetest/data/mini/manifest.json"
    original = fs.cat_file(manifest_url)
    name = info.log_names[0]
    meta = f"cachetest/data/mini/meta/{name}.parquet"
    original_meta = fs.cat_file(meta)
    try:
        stream = _remote_stream(remote, cache_dir, fields=("token", "frame_idx"))
        before = [s["frame_idx"] for s in stream if s["log_name"] == name]
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(info.root / "mini" / "meta" / f"{name}.parquet")
        at = table.schema.get_field_index("frame_idx")
        shifted = pa.array(table.column("frame_idx").to_numpy() + 100, type=table.schema.field(at).type)
        table = table.set_column(at, table.schema.field(at), shifted)
        sink = tmp_path / "new.parquet"
        pq.write_table(table, sink)
        fs.pipe_file(meta, sink.read_bytes())  # the log re-collected: new rows, a new manifest entry
        data = json.loads(original)
        data["logs"][name]["committed_at"] = "2099-01-01T00:00:00Z"
        data["logs"][name]["checksums"] = {
            f"meta/{name}.parquet": "sha256:" + hashlib.sha256(sink.read_bytes()).hexdigest()
        }
        fs.pipe_file(manifest_url, json.dumps(data).encode())
        after = [
            s["frame_idx"]
            for s in _remote_stream(remote, cache_dir, fields=("token", "frame_idx"))
            if s["log_name"] == name
        ]
        assert sorted(after) == sorted(f + 100 for f in before)
        # A file that differs from the sha256 its manifest records is refused, naming it.
        data["logs"][name]["checksums"][f"meta/{name}.parquet"] = "sha256:" + "0" * 64
        data["logs"][name]["committed_at"] = "2099-01-02T00:00:00Z"
        fs.pipe_file(manifest_url, json.dumps(data).encode())
        with pytest.raises(
            CacheError,
            match=rf"s3://cachetest/data/mini/meta/{re.escape(name)}\.parquet: its content differs",
        ):
            list(_remote_stream(remote, cache_dir, fields=("token", "frame_idx")))
    finally:
        fs.pipe_file(manifest_url, original)
        fs.pipe_file(meta, original_meta)


def test_a_failing_disk_falls_back_to_the_remote(remote, tmp_path):
    path = max(
        (p for p in remote["files"] if p.startswith("mini/occ/")), key=lambda p: len(remote["files"][p])
    )
    assert len(remote["files"][path]) > 4096
    proc = multiprocessing.get_context("spawn").Process(
        target=cache_workers.read_on_a_small_disk,
        args=(
            str(tmp_path / "cache"),
            remote["options"],
            f"s3://cachetest/data/{path}",
            str(tmp_path / "out.json"),
        ),
    )
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result == {"sha": hashlib.sha256(remote["files"][path]).hexdigest(), "bypassed": 1}
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the failed partial file was removed


def test_prefetch_fetches_the_next_windows_ahead(remote, tmp_path):
    counts = {}
    for prefetch in (0, 2):
        cache_dir = tmp_path / f"cache{prefetch}"
        stream = _remote_stream(
            remote, cache_dir, fields=OCC, prefetch=prefetch, shuffle=False, global_batch_size=2
        )
        it = iter(stream)
        next(it)  # the first sample: window 0 read
        deadline = time.monotonic() + 20
        last = -1
        while time.monotonic() < deadline:  # let the prefetch threads settle
            now = len(_entries(cache_dir))
            if now == last:
                break
            last = now
            time.sleep(0.3)
        counts[prefetch] = len(_entries(cache_dir))
        it.close()
    assert counts[2] > counts[0]


def test_each_worker_prefetches_the_next_windows_of_its_own_plan(remote, tmp_path, monkeypatch):
    """Through a DataLoader with 2 workers: each worker queues the windows of its own plan, in its order,
    ``prefetch`` windows ahead of the one it reads, and fetches exactly the label shard files those
    windows' rows are in (every one of them, none of another worker's)."""
    from driveengine.data import stream as stream_module

    events = tmp_path / "events"
    events.mkdir()

    def record(kind: str, value: object) -> None:
        info = torch.utils.data.get_worker_info()
        with open(events / f"{info.id if info is not None else 'main'}.jsonl", "a") as f:
            f.write(json.dumps([kind, value]) + "\n")

    real_window, real_get = stream_module._PrefetchState.window, stream_module._PrefetchState._get
    real_samples = FrameStream._window_samples

    def window(self, logs, rows):
        record("queue", [[int(li), int(r)] for li, r in zip(logs, rows, strict=True)])
        return real_window(self, logs, rows)

    def get(self, path):
        record("get", path)
        return real_get(self, path)

    def samples(self, logs, rows, positions, s, size, ring, in_process):
        record(
            "read", [[int(li), int(r)] for li, r in zip(logs[s : s + size], rows[s : s + size], strict=True)]
        )
        return real_samples(self, logs, rows, positions, s, size, ring, in_process)

    monkeypatch.setattr(stream_module._PrefetchState, "window", window)
    monkeypatch.setattr(stream_module._PrefetchState, "_get", get)
    monkeypatch.setattr(FrameStream, "_window_samples", samples)
    ahead = 1
    stream = _remote_stream(remote, tmp_path / "cache", fields=OCC, prefetch=ahead, global_batch_size=4)
    assert sum(len(b["token"]) for b in stream.loader(num_workers=2)) == len(stream)
    occ = stream.selection.logs[0].labels()
    per_shard = int(occ.array("semantics").shards[0])
    for worker in (0, 1):
        plan = stream._plan(worker, 2)
        logs, rows = stream.selection.locate(plan.frames)
        size = plan.device_batch_size
        windows = [
            [[int(li), int(r)] for li, r in zip(logs[s : s + size], rows[s : s + size], strict=True)]
            for s in range(0, len(rows), size)
        ]
        assert len(windows) > ahead + 1
        lines = [json.loads(x) for x in (events / f"{worker}.jsonl").read_text().splitlines()]
        assert [v for k, v in lines if k == "queue"] == windows  # its own plan's windows, in order
        assert [v for k, v in lines if k == "read"] == windows
        queued = read = 0
        for kind, _ in lines:  # reading window i, windows up to i + prefetch are queued
            if kind == "queue":
                queued += 1
            elif kind == "read":
                assert queued >= min(len(windows), read + 1 + ahead)
                read += 1
        wanted = {
            (stream.selection.logs[li].name, array, r // per_shard)
            for w in windows for li, r in w for array in OCC
        }  # fmt: skip
        fetched = set()
        for kind, path in lines:
            found = re.search(r"/occ/([^/]+)\.zarr/(\w+)/c/(\d+)(?:/0)+$", path) if kind == "get" else None
            if found:
                fetched.add((found.group(1), found.group(2), int(found.group(3))))
        assert fetched == wanted


def test_unversioned_files_are_not_cached_and_the_cache_can_be_off(remote, tmp_path):
    cache = FileCache(tmp_path / "cache", 10**6)
    assert cache.version_of("s3", "cachetest/data/mini/manifest.json") is None
    stream = _remote_stream(remote, tmp_path / "off", cache_limit_bytes=0, fields=OCC)
    assert stream.cache_stats() is None and not (tmp_path / "off").exists()
    local = _local_batches(remote, fields=OCC)
    for a, b in zip(local, stream.loader(num_workers=0), strict=True):
        for key in OCC:
            assert torch.equal(a[key], b[key])
