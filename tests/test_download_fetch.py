"""Resumable, retrying, verified downloads over real HTTP on 127.0.0.1 (tests/download_server.py)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from download_server import FileServer

from driveengine.download.fetch import FetchOptions, FetchTask, _delay, fetch_file, fetch_many, probe_size

FAST = FetchOptions(
    backoff_s=0.001, max_backoff_s=0.01, retries=3, timeout_s=10.0, buffer_bytes=64 << 10, buffers=4
)
SIZE = 1_000_003


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "blob.bin").write_bytes(data)
    with FileServer(root) as server:
        yield server, data, tmp_path / "out"


def _task(server: FileServer, out: Path, data: bytes, **kw) -> FetchTask:
    kw.setdefault("md5", hashlib.md5(data).hexdigest())
    return FetchTask(url=server.url + "blob.bin", dest=out / "blob.bin", name="blob.bin", **kw)


def test_dropped_connection_resumes_from_the_part_size(served) -> None:
    server, data, out = served
    server.add_faults("blob.bin", "drop:300000")
    lines: list[str] = []
    res = fetch_file(_task(server, out, data), FAST, line=lines.append)
    assert res.ok, res.error
    assert (out / "blob.bin").read_bytes() == data
    assert not (out / "blob.bin.part").exists()
    # the retry asked for exactly the bytes after what the first response delivered
    assert server.ranges("blob.bin") == [None, "bytes=300000-"]
    assert res.verified == ["length", "md5"]  # the Content-Length only shows the transfer is complete


def test_interrupted_download_keeps_part_and_the_next_run_resumes_there(served) -> None:
    server, data, out = served
    stop = threading.Event()
    task = _task(server, out, data)
    first = fetch_file(task, FAST, progress=lambda n: stop.set(), stop=stop)
    assert first.interrupted and not first.ok
    assert not task.dest.exists()
    part_size = task.part.stat().st_size
    assert 0 < part_size < SIZE
    assert task.part.read_bytes() == data[:part_size]

    second = fetch_file(task, FAST)
    assert second.ok, second.error
    assert second.resumed_from == part_size
    assert server.ranges("blob.bin")[-1] == f"bytes={part_size}-"
    assert task.dest.read_bytes() == data  # the md5 of prefix + rest matched


def test_server_error_is_retried(served) -> None:
    server, data, out = served
    server.add_faults("blob.bin", "500", "503")
    res = fetch_file(_task(server, out, data), FAST)
    assert res.ok, res.error
    assert res.attempts == 3
    assert (out / "blob.bin").read_bytes() == data


def test_server_that_ignores_range_restarts_from_zero(served) -> None:
    server, data, out = served
    task = _task(server, out, data)
    task.dest.parent.mkdir(parents=True)
    task.part.write_bytes(data[:1000])
    server.add_faults("blob.bin", "ignore-range")
    lines: list[str] = []
    res = fetch_file(task, FAST, line=lines.append)
    assert res.ok, res.error
    assert server.ranges("blob.bin") == ["bytes=1000-"]
    assert task.dest.read_bytes() == data  # not 1000 bytes of prefix + the whole file
    assert any("ignored the Range" in s for s in lines)


def test_wrong_bytes_are_downloaded_again_once(served) -> None:
    server, data, out = served
    server.add_faults("blob.bin", "wrong-bytes")
    res = fetch_file(_task(server, out, data), FAST)
    assert res.ok, res.error
    assert server.ranges("blob.bin") == [None, None]  # second time from zero
    assert (out / "blob.bin").read_bytes() == data


def test_persistently_wrong_bytes_fail_and_leave_no_file_under_the_final_name(served) -> None:
    server, data, out = served
    server.add_faults("blob.bin", "wrong-bytes", "wrong-bytes")
    res = fetch_file(_task(server, out, data), FAST)
    assert not res.ok
    assert "MD5 mismatch" in res.error and "second time" in res.error
    assert not (out / "blob.bin").exists()
    assert not (out / "blob.bin.part").exists()
    assert len(server.requests) == 2


def test_wrong_expected_size_fails(served) -> None:
    server, data, out = served
    res = fetch_file(_task(server, out, data, md5=None, size=SIZE + 1), FAST)
    assert not res.ok and "size" in res.error
    assert not (out / "blob.bin").exists()


def test_dead_link_fails_without_retrying(served) -> None:
    server, _data, out = served
    task = FetchTask(url=server.url + "nope.tgz", dest=out / "nope.tgz", name="nope.tgz")
    res = fetch_file(task, FAST)
    assert not res.ok and "404" in res.error and "mirror" in res.error
    assert server.ranges("nope.tgz") == [None]


def test_retries_are_bounded(tmp_path: Path) -> None:
    with FileServer(tmp_path) as server:
        (tmp_path / "f").write_bytes(b"x" * 10)
        server.add_faults("f", *["500"] * 10)
        res = fetch_file(FetchTask(url=server.url + "f", dest=tmp_path / "o" / "f", name="f"), FAST)
    assert not res.ok and "gave up" in res.error
    assert res.attempts == FAST.retries + 1


def test_sha256_is_checked_when_given(served) -> None:
    server, data, out = served
    res = fetch_file(_task(server, out, data, sha256="0" * 64), FAST)
    assert not res.ok and "SHA-256 mismatch" in res.error
    res = fetch_file(_task(server, out, data, sha256=hashlib.sha256(data).hexdigest()), FAST)
    assert res.ok and res.sha256 == hashlib.sha256(data).hexdigest()
    assert res.verified == ["length", "md5", "sha256"]


def test_file_url_and_parallel_many(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blobs = {f"f{i}.bin": os.urandom(5000 + i) for i in range(6)}
    for name, b in blobs.items():
        (src / name).write_bytes(b)
    tasks = [
        FetchTask(url=(src / n).as_uri(), dest=tmp_path / "out" / n, name=n, md5=hashlib.md5(b).hexdigest())
        for n, b in blobs.items()
    ]
    results = fetch_many(tasks, FetchOptions(jobs=3))
    assert [r.task.name for r in results] == list(blobs)
    assert all(r.ok for r in results)
    assert all((tmp_path / "out" / n).read_bytes() == b for n, b in blobs.items())


def test_probe_size(served) -> None:
    server, _data, _ = served
    assert probe_size(server.url + "blob.bin") == SIZE
    assert server.ranges("blob.bin", probes=True) == ["bytes=0-0"]
    assert probe_size(server.url + "missing") is None


def test_backoff_doubles_and_honours_retry_after() -> None:
    opts = FetchOptions(backoff_s=1.0, max_backoff_s=8.0, max_retry_after_s=30.0)
    for failures, step in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 8.0)]:
        assert step * 0.5 <= _delay(failures, None, opts) <= step
    assert _delay(1, 20.0, opts) == 20.0
    assert _delay(1, 1000.0, opts) == 30.0


def test_content_length_alone_verifies_nothing(served) -> None:
    server, data, out = served
    lines: list[str] = []
    res = fetch_file(_task(server, out, data, md5=None), FAST, line=lines.append)
    assert res.ok and res.verified == ["length"]
    done = next(s for s in lines if s.startswith("[done]"))
    assert "verified nothing (no published checksum or size" in done


@pytest.mark.parametrize(
    ("expected", "tolerance", "ok"),
    [
        (SIZE, 0.0, True),
        (SIZE + 1, 0.0, False),
        (int(SIZE * 1.05), 0.1, True),  # a rounded figure: within 10 %
        (SIZE * 2, 0.1, False),  # the served file is half the size the manifest says: a short file
    ],
)
def test_size_from_the_manifest_is_verified_without_a_checksum(served, expected, tolerance, ok) -> None:
    server, data, out = served
    task = _task(server, out, data, md5=None, size=expected, size_tolerance=tolerance)
    res = fetch_file(task, FAST)
    assert res.ok is ok, res.error
    if ok:
        assert res.verified == ["size"]
    else:
        assert f"size {SIZE:,} bytes, expected" in res.error and f"{expected:,}" in res.error
        assert not task.dest.exists() and not task.part.exists()
        assert server.ranges("blob.bin") == [None, None]  # downloaded once more from zero, then reported


def test_authorization_goes_to_the_url_but_not_where_it_redirects(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"z" * 1000)
    with FileServer(tmp_path) as cdn, FileServer(tmp_path, bearer="s3cret", redirect_to=cdn.url) as hub:
        task = FetchTask(
            url=hub.url + "blob.bin", dest=tmp_path / "o/blob.bin", name="blob", authorization="Bearer s3cret"
        )
        res = fetch_file(task, FAST)
        assert res.ok, res.error
        assert hub.authorizations == ["Bearer s3cret"]
        assert cdn.authorizations == [None] and cdn.ranges("blob.bin") == [None]
        assert "s3cret" not in repr(task)
