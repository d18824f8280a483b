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
  resumable ``.part``;
- a server that trickles is cut off: an attempt that receives less than ``min_speed_bps`` on average
  over ``speed_window_s`` fails as "too slow" (retried, and counted as a failure without progress),
  and a file that is not complete ``deadline_s`` after its download started fails, keeping its
  ``.part`` (each read blocks at most ``timeout_s``, so the deadline is met within one timeout);
- sizes: ``FetchTask.size`` is the size an independent source (the release manifest) expects, exact or
  within ``size_tolerance``, and is verified ("size"); the ``Content-Length`` a server announces only
  shows that the transfer is complete ("length"), it verifies nothing;
- ``FetchTask.authorization`` (e.g. the Hugging Face token) is sent to the task's URL only, never on
  to the host a redirect leads to (the CDN's URLs are pre-signed).

Network reads and disk writes + hashing run on two threads per file (``hashlib`` and file writes
release the GIL), so hashing costs little throughput. The standard library's ``urllib`` is used: it
follows redirects (the Hugging Face mirror redirects to a CDN), honours ``*_proxy`` variables and
needs no extra dependency.
"""

from __future__ import annotations

import email.utils
import http.client
import math
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
from driveengine.download.errors import DownloadError

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
        timeout_s: socket timeout (connect, each read, size probes), seconds.
        min_speed_bps: an attempt that receives fewer bytes per second than this, on average over
            ``speed_window_s``, fails as too slow (0: no minimum).
        speed_window_s: the window of the minimum-speed check, seconds.
        deadline_s: most seconds one file may take, retries and waits included (0: no deadline).
        buffer_bytes: size of one read buffer.
        buffers: buffers in flight between the network thread and the write/hash thread.
    """

    jobs: int = 4
    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_retry_after_s: float = 300.0
    timeout_s: float = 60.0
    min_speed_bps: float = 1024.0
    speed_window_s: float = 60.0
    deadline_s: float = 86400.0
    buffer_bytes: int = 1 << 20
    buffers: int = 8

    def __post_init__(self) -> None:
        """Every number finite and in range (``nan`` would silently disable a limit)."""
        at_least_zero = {
            "--backoff": self.backoff_s,
            "max_backoff_s": self.max_backoff_s,
            "max_retry_after_s": self.max_retry_after_s,
            "--min-speed": self.min_speed_bps,
            "--deadline": self.deadline_s,
        }
        for name, value in at_least_zero.items():
            if not (math.isfinite(value) and value >= 0):
                raise DownloadError(f"{name} {value}: must be a finite number >= 0")
        for name, value in {"--timeout": self.timeout_s, "--speed-window": self.speed_window_s}.items():
            if not (math.isfinite(value) and value > 0):
                raise DownloadError(f"{name} {value}: must be a finite number > 0")
        if self.jobs < 1 or self.retries < 0 or self.buffer_bytes < 1 or self.buffers < 1:
            raise DownloadError(f"invalid download options: {self}")


@dataclass
class FetchTask:
    """One file to download.

    Attributes:
        url: source URL (``http://``, ``https://`` or ``file://``).
        dest: final local path; bytes go to ``dest`` + ``.part`` until verified.
        name: short name for messages (the release path).
        size: expected size in bytes from an independent source (the release manifest), or ``None``.
        size_tolerance: relative tolerance of ``size`` (0: exact; 0.05: a rounded figure within 5 %).
        md5 / sha256: expected digests (lowercase hex), or ``None``.
        authorization: value of an ``Authorization`` header for ``url`` (not sent on after a redirect).
    """

    url: str
    dest: Path
    name: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    size_tolerance: float = 0.0
    authorization: str | None = field(default=None, repr=False)

    def size_matches(self, nbytes: int) -> bool:
        """``nbytes`` is the expected size (within the tolerance); true when no size is expected."""
        if self.size is None:
            return True
        return abs(nbytes - self.size) <= self.size_tolerance * self.size

    def largest_size(self) -> int | None:
        """The most bytes the file may have (``None``: unknown)."""
        return None if self.size is None else int(self.size * (1 + self.size_tolerance))

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
        verified: which checks passed, e.g. ``["size", "md5"]`` (``"length"``: only the server's
            ``Content-Length`` matched, which verifies nothing).
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


class _Unreachable(_Retryable):
    """No HTTP answer at all: the host cannot be resolved or connected to, or it did not answer in time."""


class _TooSlow(_Retryable):
    """The transfer ran below the minimum speed: retried, but never counted as progress."""


class _Fatal(Exception):
    """A failure retrying cannot fix (404, 403, a local write error, the deadline)."""


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
        # read1: return what has arrived, so that the speed and deadline checks run between reads
        # (readinto would block until the whole buffer is full, whatever the trickle)
        data = self._resp.read1(len(buf))
        n = len(data)
        buf[:n] = data
        return n

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


def _connection_problem(exc: BaseException, opts: FetchOptions) -> str:
    """``exc`` (a connection-level failure) in words."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {opts.timeout_s:g} s (--timeout)"
    return f"cannot connect: {reason}"


def _open(
    url: str,
    offset: int,
    opts: FetchOptions,
    end: int | None = None,
    authorization: str | None = None,
) -> _Response:
    """Open ``url`` for reading from byte ``offset`` (``end``: last byte wanted, inclusive).

    ``authorization`` goes to ``url`` only: an unredirected header, dropped when the server redirects.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        return _FileResponse(urllib.request.url2pathname(parsed.path), offset)
    headers = {"User-Agent": f"driveengine/{__version__}", "Accept-Encoding": "identity"}
    if offset or end is not None:
        headers["Range"] = f"bytes={offset}-{'' if end is None else end}"
    request = urllib.request.Request(url, headers=headers)
    if authorization:
        request.add_unredirected_header("Authorization", authorization)
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
        hint = ""
        if code in (401, 403):
            hint = " (gated or private? for the Hugging Face mirror set HF_TOKEN; or try another --mirror)"
        elif code in (404, 410):
            hint = " (dead link? try another --mirror or --base-url)"
        raise _Fatal(f"HTTP {code} {exc.reason} for {url}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Unreachable(_connection_problem(exc, opts)) from None
    except http.client.HTTPException as exc:
        raise _Retryable(f"connection error: {exc!r}") from None
    return _HttpResponse(resp, offset)


@dataclass
class Probe:
    """What a size probe found: ``size`` in bytes (``None``: unknown) and, when unknown, why.

    ``unreachable``: no HTTP answer at all (cannot resolve or connect, or no answer within the timeout).
    """

    size: int | None
    problem: str | None = None
    unreachable: bool = False


def probe(url: str, opts: FetchOptions | None = None, authorization: str | None = None) -> Probe:
    """Ask the size of the file at ``url`` without downloading it (``Range: bytes=0-0``, one request,
    ``opts.timeout_s``)."""
    opts = opts or FetchOptions()
    try:
        resp = _open(url, 0, opts, end=0, authorization=authorization)
    except _Unreachable as exc:
        return Probe(None, str(exc), unreachable=True)
    except (_Retryable, _Fatal, _Restart) as exc:
        return Probe(None, str(exc))
    except _RangeNotSatisfiable as exc:
        return Probe(exc.total, None if exc.total is not None else "the server did not tell its size")
    try:
        if resp.total is None:
            return Probe(None, "the server did not tell its size")
        return Probe(resp.total)
    finally:
        resp.close()


def probe_size(url: str, opts: FetchOptions | None = None, authorization: str | None = None) -> int | None:
    """Size in bytes of the file at ``url`` (see :func:`probe`), or ``None``."""
    return probe(url, opts, authorization).size


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


# -- pace: minimum speed and deadline -------------------------------------------------------------------


class _Pace:
    """The minimum-speed window and the per-file deadline of one download (monotonic clock)."""

    def __init__(self, opts: FetchOptions) -> None:
        self.opts = opts
        now = time.monotonic()
        self.deadline = now + opts.deadline_s if opts.deadline_s > 0 else None
        self.window_start = now
        self.window_bytes = 0

    def time_left(self) -> float | None:
        """Seconds until the deadline (``None``: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check_deadline(self, nbytes: int) -> None:
        """Raise :class:`_Fatal` once the deadline has passed (``nbytes``: bytes of the file so far)."""
        left = self.time_left()
        if left is not None and left <= 0:
            raise _Fatal(
                f"not complete within the deadline of {self.opts.deadline_s:g} s (--deadline; "
                f"{nbytes:,} bytes so far); the .part file is kept: run the same command again to resume"
            )

    def start_attempt(self) -> None:
        """A new request: the speed window starts now."""
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def received(self, n: int, nbytes: int) -> None:
        """``n`` new bytes (``nbytes`` in all): raises on a passed deadline or a too slow window."""
        self.check_deadline(nbytes)
        self.window_bytes += n
        if self.opts.min_speed_bps <= 0:
            return
        now = time.monotonic()
        elapsed = now - self.window_start
        if elapsed < self.opts.speed_window_s:
            return
        rate = self.window_bytes / elapsed
        if rate < self.opts.min_speed_bps:
            raise _TooSlow(
                f"too slow: {self.window_bytes:,} bytes in the last {elapsed:.1f} s ({rate:,.1f} B/s), "
                f"below the minimum of {self.opts.min_speed_bps:,.0f} B/s (--min-speed, over "
                f"--speed-window {self.opts.speed_window_s:g} s)"
            )
        self.window_start = now
        self.window_bytes = 0


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
    pace = _Pace(opts)
    task.dest.parent.mkdir(parents=True, exist_ok=True)
    result = FetchResult(task=task, ok=False)
    hasher = StreamHasher(sha256=task.sha256 is not None)
    part = task.part

    offset = part.stat().st_size if part.exists() else 0
    largest = task.largest_size()
    if offset and largest is not None and offset > largest:
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
            offset = _transfer(task, part, hasher, offset, opts, pace, result, progress, line, stop)
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
    checks = "+".join(c for c in result.verified if c != "length") or "nothing"
    if task.md5 is None and task.sha256 is None:
        checks += f" (no published checksum{'' if task.size is not None else ' or size'}; MD5 {result.md5} recorded)"
    line(f"[done]    {task.name}: {result.size:,} bytes, verified {checks}")
    return result


def _verify(task: FetchTask, hasher: StreamHasher, result: FetchResult) -> str | None:
    """``None`` when the downloaded bytes match what is expected, else the reason."""
    checks: list[str] = []
    if task.size is not None:
        if not task.size_matches(hasher.nbytes):
            if task.size_tolerance:
                return (
                    f"size {hasher.nbytes:,} bytes, expected about {task.size:,} "
                    f"(within {task.size_tolerance:.0%}): truncated or not the release's file"
                )
            return f"size {hasher.nbytes:,} bytes, expected {task.size:,}"
        checks.append("size")
    elif result.size:  # the length the server announced: shows the transfer is complete, verifies nothing
        if hasher.nbytes != result.size:
            return f"size {hasher.nbytes:,} bytes, server announced {result.size:,}"
        checks.append("length")
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
    pace: _Pace,
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
        if task.size is not None and task.size_tolerance == 0 and offset == task.size:
            result.size = task.size
            return offset  # complete already (e.g. interrupted right before the rename)
        pace.check_deadline(offset)
        before = offset
        retry_after: float | None = None
        try:
            result.attempts += 1
            pace.start_attempt()
            resp = _open(task.url, offset, opts, authorization=task.authorization)
            try:
                if offset and (resp.status == 200 or resp.start != offset):
                    offset = restart_from_zero("the server ignored the Range request", offset)
                if resp.total is not None:
                    result.size = resp.total
                offset = _stream(resp, part, hasher, offset, opts, pace, progress, stop)
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
            # a too slow attempt counts as a failure even though some bytes arrived
            failures = 0 if offset > before and not isinstance(exc, _TooSlow) else failures + 1
            reason = str(exc) if isinstance(exc, _Retryable) else f"connection error: {exc!r}"
            if failures > opts.retries:
                raise _Fatal(
                    f"{reason}; gave up after {opts.retries} retries (too slow or without progress)"
                ) from None
            wait_s = _delay(max(failures, 1), retry_after, opts)
            left = pace.time_left()
            if left is not None:
                wait_s = max(0.0, min(wait_s, left))
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
    pace: _Pace,
    progress: ProgressFn,
    stop: threading.Event,
) -> int:
    """Append the body of ``resp`` to ``part`` (hashing it); returns the new size of ``part``.

    ``pace`` is checked after every read (minimum speed, deadline)."""
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
            offset += n
            if remaining is not None:
                remaining -= n
            pace.received(n, offset)
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
