"""Resumable, retrying HTTP(S) / ``file://`` downloads with checksums computed while the bytes arrive.

One file at a time (:func:`fetch_file`) or many in parallel threads (:func:`fetch_many`):

- bytes go to ``<name>.part``; after an interruption the download resumes with an HTTP ``Range``
  request from the ``.part`` size (the existing prefix is hashed once). A server that ignores
  ``Range`` (answers ``200``) is detected and the file restarts from zero;
- connection errors, timeouts, ``408``/``429``/``5xx`` are retried with exponential backoff, honouring
  ``Retry-After``; the attempts without progress are bounded;
- the file is renamed to its final name only after its size and checksums are verified; a mismatch
  is downloaded once more from zero, then reported;
- ``stop`` (a :class:`threading.Event`, set on Ctrl-C) ends a download between two buffers, leaving a
  resumable ``.part``.

Network reads and disk writes + hashing run on two threads per file (``hashlib`` and file writes
release the GIL), so hashing costs little throughput. The standard library's ``urllib`` is used: it
follows redirects (the Hugging Face mirror redirects to a CDN), honours ``*_proxy`` variables and
needs no extra dependency.
"""

from __future__ import annotations

import email.utils
import http.client
import os
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from driveengine import __version__
from driveengine.download.checksums import StreamHasher

#: HTTP statuses worth retrying (besides every 5xx).
RETRY_STATUSES = frozenset({408, 425, 429})

ProgressFn = Callable[[int], None]
LineFn = Callable[[str], None]
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class FetchOptions:
    """How downloads behave.

    Attributes:
        jobs: files downloaded in parallel (threads).
        retries: retries per file after failures that made no progress (a failure after new bytes
            arrived resets the count).
        backoff_s: first retry delay, seconds; doubled per consecutive failure (with jitter).
        max_backoff_s: cap of the exponential delay, seconds.
        max_retry_after_s: cap of a server's ``Retry-After``, seconds.
        timeout_s: socket timeout (connect and each read), seconds.
        buffer_bytes: size of one read buffer.
        buffers: buffers in flight between the network thread and the write/hash thread.
    """

    jobs: int = 4
    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_retry_after_s: float = 300.0
    timeout_s: float = 60.0
    buffer_bytes: int = 1 << 20
    buffers: int = 8


@dataclass
class FetchTask:
    """One file to download.

    Attributes:
        url: source URL (``http://``, ``https://`` or ``file://``).
        dest: final local path; bytes go to ``dest`` + ``.part`` until verified.
        name: short name for messages (the release path).
        size: exact expected size in bytes, or ``None``.
        md5 / sha256: expected digests (lowercase hex), or ``None``.
    """

    url: str
    dest: Path
    name: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    @property
    def part(self) -> Path:
        """The partial file: ``dest`` + ``.part``."""
        return self.dest.with_name(self.dest.name + ".part")


@dataclass
class FetchResult:
    """Outcome of one :class:`FetchTask`.

    Attributes:
        ok: the file is at ``task.dest``, complete and verified against what was known.
        size: bytes of the file (or of the ``.part`` when not ok).
        md5 / sha256: digests computed while downloading (``sha256`` only when one was expected).
        error: why it failed, in words (``None`` when ok).
        attempts: HTTP requests made.
        resumed_from: bytes already in ``.part`` when this run started.
        verified: which checks passed, e.g. ``["size", "md5"]``.
        interrupted: stopped by the user; ``.part`` kept for resuming.
    """

    task: FetchTask
    ok: bool
    size: int = 0
    md5: str | None = None
    sha256: str | None = None
    error: str | None = None
    attempts: int = 0
    resumed_from: int = 0
    verified: list[str] = field(default_factory=list)
    interrupted: bool = False


class Interrupted(Exception):
    """The download was stopped on request (``stop`` event); the ``.part`` file is kept."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure retrying cannot fix (404, 403, a local write error)."""


class _RangeNotSatisfiable(Exception):
    def __init__(self, total: int | None) -> None:
        super().__init__(f"range not satisfiable (size {total})")
        self.total = total


class _Restart(Exception):
    """The server cannot continue from the offset: start the file again from zero."""


# -- responses ------------------------------------------------------------------------------------


class _Response:
    """A body being read: ``start`` offset of its first byte, ``length`` bytes (``None``: until EOF)."""

    status: int
    start: int
    length: int | None
    total: int | None

    def readinto(self, buf: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _HttpResponse(_Response):
    def __init__(self, resp: http.client.HTTPResponse, offset: int) -> None:
        self._resp = resp
        self.status = resp.status
        length = resp.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        self.total = None
        self.start = 0
        if self.status == 206:
            match = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not match:
                raise _Restart("206 response without a usable Content-Range header")
            self.start = int(match.group(1))
            self.length = int(match.group(2)) - self.start + 1
            self.total = int(match.group(3)) if match.group(3) != "*" else None
        else:
            self.total = self.length

    def readinto(self, buf: memoryview) -> int:
        return self._resp.readinto(buf)

    def close(self) -> None:
        self._resp.close()


class _FileResponse(_Response):
    def __init__(self, path: str, offset: int) -> None:
        try:
            self._f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise _Fatal(f"{path}: no such file") from None
        except OSError as exc:
            raise _Retryable(f"{path}: {exc.strerror or exc}") from exc
        self.total = os.fstat(self._f.fileno()).st_size
        if offset > self.total:
            self._f.close()
            raise _RangeNotSatisfiable(self.total)
        self._f.seek(offset)
        self.status = 206 if offset else 200
        self.start = offset
        self.length = self.total - offset

    def readinto(self, buf: memoryview) -> int:
        return self._f.readinto(buf) or 0

    def close(self) -> None:
        self._f.close()


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _open(url: str, offset: int, opts: FetchOptions, end: int | None = None) -> _Response:
    """Open ``url`` for reading from byte ``offset`` (``end``: last byte wanted, inclusive)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        return _FileResponse(urllib.request.url2pathname(parsed.path), offset)
    headers = {"User-Agent": f"driveengine/{__version__}", "Accept-Encoding": "identity"}
    if offset or end is not None:
        headers["Range"] = f"bytes={offset}-{'' if end is None else end}"
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=opts.timeout_s)
    except urllib.error.HTTPError as exc:
        retry_after = _retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
        code = exc.code
        if code == 416:
            match = re.match(r"bytes\s+\*/(\d+)", (exc.headers or {}).get("Content-Range", "") or "")
            exc.close()
            raise _RangeNotSatisfiable(int(match.group(1)) if match else None) from None
        exc.close()
        if code >= 500 or code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {code} {exc.reason}", retry_after) from None
        hint = " (dead link? try another --mirror or --base-url)" if code in (403, 404, 410) else ""
        raise _Fatal(f"HTTP {code} {exc.reason} for {url}{hint}") from None
    except urllib.error.URLError as exc:
        raise _Retryable(f"cannot connect: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"connection error: {exc!r}") from None
    return _HttpResponse(resp, offset)


def probe_size(url: str, opts: FetchOptions | None = None) -> int | None:
    """Size in bytes of the file at ``url`` without downloading it (``Range: bytes=0-0``), or ``None``."""
    opts = opts or FetchOptions(timeout_s=20.0)
    try:
        resp = _open(url, 0, opts, end=0)
    except (_Retryable, _Fatal, _Restart):
        return None
    except _RangeNotSatisfiable as exc:
        return exc.total
    try:
        return resp.total
    finally:
        resp.close()


# -- the write/hash thread -------------------------------------------------------------------------


class _Sink:
    """Writes and hashes buffers in order on its own thread; buffers are recycled through a pool."""

    def __init__(self, path: Path, append: bool, hasher: StreamHasher, opts: FetchOptions) -> None:
        self._file = open(path, "ab" if append else "wb", buffering=0)
        self._hasher = hasher
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(max(2, opts.buffers)):
            self._free.put(bytearray(opts.buffer_bytes))
        self._full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"sink:{path.name}", daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        buf = self._free.get()
        if self._error is not None:
            self._free.put(buf)
            raise _Fatal(f"cannot write {self._file.name}: {self._error}")
        return buf

    def put(self, buf: bytearray, n: int) -> None:
        self._full.put((buf, n))

    def recycle(self, buf: bytearray) -> None:
        self._free.put(buf)

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    view = memoryview(buf)[:n]
                    while view:
                        written = self._file.write(view)
                        self._hasher.update(view[:written])
                        view = view[written:]
                except BaseException as exc:
                    self._error = exc
            self._free.put(buf)

    def close(self, fsync: bool = False) -> None:
        """Drain the queue and close the file; raises :class:`_Fatal` on a write error."""
        self._full.put(None)
        self._thread.join()
        try:
            if fsync and self._error is None:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if self._error is not None:
            raise _Fatal(f"cannot write {self._file.name}: {self._error}")


# -- one file ---------------------------------------------------------------------------------------


def _delay(failures: int, retry_after: float | None, opts: FetchOptions) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures (>= 1).

    Exponential backoff with jitter in [0.5, 1] of the step, at least the server's ``Retry-After``
    (capped at ``max_retry_after_s``).
    """
    step = min(opts.max_backoff_s, opts.backoff_s * (2 ** (failures - 1)))
    delay = step * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, opts.max_retry_after_s))
    return delay


def fetch_file(
    task: FetchTask,
    opts: FetchOptions | None = None,
    progress: ProgressFn | None = None,
    line: LineFn | None = None,
    stop: threading.Event | None = None,
) -> FetchResult:
    """Download ``task.url`` to ``task.dest`` (resumable, retried, verified). Never raises for a network
    or verification failure: the result says what went wrong.

    Args:
        task: what to download and what to expect.
        opts: behaviour (retries, backoff, timeouts, buffers).
        progress: called with the number of new bytes (negative when bytes are discarded).
        line: called with one human-readable state line per event (resume, retry, restart, done).
        stop: when set, the download stops between buffers and keeps its ``.part`` file.

    Returns:
        The :class:`FetchResult`. ``task.dest`` exists only when ``result.ok``.
    """
    opts = opts or FetchOptions()
    progress = progress or (lambda n: None)
    line = line or (lambda s: None)
    stop = stop or threading.Event()
    task.dest.parent.mkdir(parents=True, exist_ok=True)
    result = FetchResult(task=task, ok=False)
    hasher = StreamHasher(sha256=task.sha256 is not None)
    part = task.part

    offset = part.stat().st_size if part.exists() else 0
    if offset and task.size is not None and offset > task.size:
        line(f"[restart] {task.name}: .part is larger than the expected {task.size:,} bytes")
        part.unlink()
        offset = 0
    if offset:
        hasher.update_from_file(part, offset)
        result.resumed_from = offset
        progress(offset)
        line(f"[resume]  {task.name}: continuing from {offset:,} bytes")

    redownloaded = False
    while True:
        try:
            offset = _transfer(task, part, hasher, offset, opts, result, progress, line, stop)
        except Interrupted:
            result.interrupted = True
            result.size = hasher.nbytes
            result.error = "interrupted; the .part file is kept for resuming"
            return result
        except _Fatal as exc:
            result.size = hasher.nbytes
            result.error = str(exc)
            return result
        problem = _verify(task, hasher, result)
        if problem is None:
            break
        part.unlink(missing_ok=True)
        progress(-hasher.nbytes)
        if redownloaded:
            result.error = (
                f"{problem}, again after downloading it a second time from zero (corrupt on the server?)"
            )
            result.size = 0
            return result
        line(f"[retry]   {task.name}: {problem}; downloading again from zero")
        redownloaded = True
        hasher.reset()
        offset = 0
        result.verified = []

    os.replace(part, task.dest)
    result.ok = True
    result.size = hasher.nbytes
    result.md5 = hasher.md5
    result.sha256 = hasher.sha256
    checks = "+".join(result.verified) or "nothing"
    if task.md5 is None and task.sha256 is None:
        checks += f" (no published checksum; MD5 {result.md5} recorded)"
    line(f"[done]    {task.name}: {result.size:,} bytes, verified {checks}")
    return result


def _verify(task: FetchTask, hasher: StreamHasher, result: FetchResult) -> str | None:
    """``None`` when the downloaded bytes match what is expected, else the reason."""
    checks: list[str] = []
    if task.size is not None:
        if hasher.nbytes != task.size:
            return f"size {hasher.nbytes:,} bytes, expected {task.size:,}"
        checks.append("size")
    elif result.size:  # the size the server announced
        if hasher.nbytes != result.size:
            return f"size {hasher.nbytes:,} bytes, server announced {result.size:,}"
        checks.append("size")
    if task.md5 is not None:
        if hasher.md5 != task.md5:
            return f"MD5 mismatch: expected {task.md5}, got {hasher.md5}"
        checks.append("md5")
    if task.sha256 is not None:
        if hasher.sha256 != task.sha256:
            return f"SHA-256 mismatch: expected {task.sha256}, got {hasher.sha256}"
        checks.append("sha256")
    result.verified = checks
    return None


def _transfer(
    task: FetchTask,
    part: Path,
    hasher: StreamHasher,
    offset: int,
    opts: FetchOptions,
    result: FetchResult,
    progress: ProgressFn,
    line: LineFn,
    stop: threading.Event,
) -> int:
    """Bring ``part`` to the complete file, from ``offset``; returns the final size.

    Sets ``result.size`` to the size the server announced (0 when unknown).
    """

    def restart_from_zero(reason: str, offset: int) -> int:
        """Drop the partial file, its hash and its progress; the next attempt starts at byte 0."""
        line(f"[restart] {task.name}: {reason}; starting from zero")
        progress(-offset)
        hasher.reset()
        part.unlink(missing_ok=True)
        return 0

    failures = 0
    result.size = 0
    while True:
        if stop.is_set():
            raise Interrupted
        if task.size is not None and offset == task.size:
            result.size = task.size
            return offset  # complete already (e.g. interrupted right before the rename)
        before = offset
        retry_after: float | None = None
        try:
            result.attempts += 1
            resp = _open(task.url, offset, opts)
            try:
                if offset and (resp.status == 200 or resp.start != offset):
                    offset = restart_from_zero("the server ignored the Range request", offset)
                if resp.total is not None:
                    result.size = resp.total
                offset = _stream(resp, part, hasher, offset, opts, progress, stop)
            finally:
                resp.close()
            if result.size and offset < result.size:
                raise _Retryable(f"connection closed after {offset:,} of {result.size:,} bytes")
            return offset
        except _RangeNotSatisfiable as exc:
            if exc.total is not None and exc.total == offset:
                result.size = offset
                return offset
            offset = restart_from_zero(f"the server cannot continue at {offset:,} bytes", offset)
            failures += 1
        except _Restart as exc:
            offset = restart_from_zero(str(exc), offset)
            failures += 1
        except (_Retryable, http.client.HTTPException, OSError) as exc:
            offset = hasher.nbytes
            retry_after = exc.retry_after if isinstance(exc, _Retryable) else None
            failures = 0 if offset > before else failures + 1
            reason = str(exc) if isinstance(exc, _Retryable) else f"connection error: {exc!r}"
            if failures > opts.retries:
                raise _Fatal(f"{reason}; gave up after {opts.retries} retries without progress") from None
            wait_s = _delay(max(failures, 1), retry_after, opts)
            line(
                f"[retry]   {task.name}: {reason}; retry {max(failures, 1)}/{opts.retries} "
                f"from {offset:,} bytes in {wait_s:.1f} s"
            )
            if stop.wait(wait_s):
                raise Interrupted from None
        if failures > opts.retries:
            raise _Fatal(f"gave up after {opts.retries} restarts")


def _stream(
    resp: _Response,
    part: Path,
    hasher: StreamHasher,
    offset: int,
    opts: FetchOptions,
    progress: ProgressFn,
    stop: threading.Event,
) -> int:
    """Append the body of ``resp`` to ``part`` (hashing it); returns the new size of ``part``."""
    sink = _Sink(part, append=offset > 0, hasher=hasher, opts=opts)
    remaining = resp.length
    try:
        while remaining is None or remaining > 0:
            if stop.is_set():
                raise Interrupted
            buf = sink.buffer()
            want = len(buf) if remaining is None else min(len(buf), remaining)
            try:
                n = resp.readinto(memoryview(buf)[:want])
            except BaseException:
                sink.recycle(buf)
                raise
            if not n:
                sink.recycle(buf)
                break
            sink.put(buf, n)
            progress(n)
            if remaining is not None:
                remaining -= n
    finally:
        sink.close(fsync=remaining == 0 or remaining is None)
    if remaining:
        raise _Retryable(f"connection closed with {remaining:,} bytes of the response missing")
    return hasher.nbytes


# -- many files -------------------------------------------------------------------------------------


def parallel_map(
    fn: Callable[[T], R], items: list[T], jobs: int, stop: threading.Event | None = None
) -> list[R]:
    """``[fn(item) for item in items]`` on ``jobs`` threads, results in input order.

    A ``KeyboardInterrupt`` in the calling thread sets ``stop`` (which ``fn`` is expected to watch),
    waits for the running calls to return and is re-raised; calls not yet started are cancelled.
    """
    stop = stop or threading.Event()
    if not items:
        return []
    results: dict[int, R] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(items))), thread_name_prefix="fetch")
    futures: dict[Future[R], int] = {pool.submit(fn, item): i for i, item in enumerate(items)}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in done:
                results[futures[fut]] = fut.result()
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
    return [results[i] for i in range(len(items))]


def fetch_many(
    tasks: list[FetchTask],
    opts: FetchOptions,
    progress: ProgressFn | None = None,
    line: LineFn | None = None,
    stop: threading.Event | None = None,
) -> list[FetchResult]:
    """Download ``tasks`` with ``opts.jobs`` threads (see :func:`fetch_file`); results in task order."""
    stop = stop or threading.Event()
    return parallel_map(lambda t: fetch_file(t, opts, progress, line, stop), tasks, opts.jobs, stop)
