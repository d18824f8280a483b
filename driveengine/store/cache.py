"""A local cache of remote files for reading collected splits from object storage (``s3://``, any fsspec URL).

Reading a split from a bucket pays a request round trip per file and per range; training reads every
label shard and sensor file once per epoch. :class:`FileCache` keeps whole remote files in a local
folder so that the second epoch (and every other process on the machine) reads local disk:

* **units and versions**: a cached entry is one whole remote file, keyed by its URL and a *version tag*
  (for a split: a digest of the log's manifest entry, which changes whenever the log is re-collected;
  the manifest is the commit point, so a re-collected log is fetched again instead of served stale).
  Only files with a registered version are cached (:func:`register_versions`); everything else
  (``manifest.json``) is read from the remote every time;
* **integrity**: an entry is the file's bytes, a CRC-32C per 256 KiB block and a trailer (magic, length,
  block size, CRC-32C of the block table). Every read checks the blocks it touches, so a truncated or
  corrupted entry is **never served**: it is deleted and fetched again. A frame shard whose manifest
  records its sha256 is checked against it when fetched;
* **size limit**: bytes on disk (entries + downloads in progress, which reserve their size first) stay
  within ``limit_bytes``; the least recently used entries (by mtime, touched on use) are evicted first.
  A single file larger than the limit is still cached, alone: the bound is the limit plus one file;
* **many processes, one folder**: DataLoader workers, ranks and runs on one machine share the folder.
  Entries appear by atomic rename of a complete temporary file; a download is done once (a per-key lock
  file makes the others wait for it, every wait bounded); eviction and reservations are serialised by a
  folder lock; partial downloads of dead processes are removed. Locks are ``flock``\\ s, released by the
  kernel when a process dies. The folder must be on a local file system;
* **prefetch**: :class:`Prefetcher` fetches the next files of a reader's plan on a few threads, ahead of
  use and bounded (the reader waits for an in-flight fetch of a file it needs, up to a timeout).

:class:`CachingFileSystem` (fsspec protocol ``drivecache``) puts the cache under any fsspec file system:
``open_split("drivecache::s3://bucket/data/mini", {"cache_dir": ..., "endpoint_url": ...})`` reads the
frame rows, the Zarr metadata and the label shards through it, and :mod:`driveengine.store.shards` ranged
reads become local ``pread``\\ s.

When the local disk fails (full, read-only, a file size limit) the file is read from the remote
directly, with one warning: the cache is an accelerator, never a reason for a run to stop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import google_crc32c
import numpy as np
from fsspec.implementations.chained import ChainedFileSystem

from driveengine.errors import DriveEngineError
from driveengine.store.commit import process_alive

logger = logging.getLogger(__name__)

#: The fsspec protocol of :class:`CachingFileSystem` (``drivecache::s3://...``).
PROTOCOL = "drivecache"
#: Bytes per checksummed block of an entry.
BLOCK_BYTES = 256 * 1024
#: Bytes fetched per request when a file is downloaded (bounded memory per download).
FETCH_BYTES = 8 * 1024 * 1024
#: Default size limit of a cache folder, bytes.
DEFAULT_LIMIT_BYTES = 16 * 1024**3
#: Longest wait for another thread's or process's download of the same file, s.
FETCH_TIMEOUT_S = 600.0
#: Longest wait for the folder lock (eviction, reservations), s.
LOCK_TIMEOUT_S = 60.0
#: Partial downloads older than this are removed even if their process seems alive (pid reuse), s.
STALE_PART_S = 3600.0
#: Per-key lock files (the first two hex digits of the key).
LOCK_STRIPES = 256

_MAGIC = b"DECACHE1"
_TRAILER = struct.Struct("<8sQIIQ")  # magic, data length, block size, CRC-32C of the block table, reserved


class CacheError(DriveEngineError):
    """A remote file could not be cached or read through the cache (the URL and the cache file named)."""


class CorruptEntry(Exception):
    """A cached entry failed its checks (internal: the entry is dropped and fetched again)."""


def default_cache_dir() -> Path:
    """``$DRIVEENGINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/driveengine/remote``, else
    ``~/.cache/driveengine/remote``."""
    explicit = os.environ.get("DRIVEENGINE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "driveengine" / "remote"


@dataclass(frozen=True)
class Version:
    """What a cached remote file (or every file under a folder) is keyed by.

    Attributes:
        tag: changes whenever the file's content may have changed (e.g. a digest of the manifest entry).
        sha256: the file's sha256 (hex) when known: a fetched copy must match it (only for exact files).
    """

    tag: str
    sha256: str | None = None


@dataclass(frozen=True)
class CacheStats:
    """What this process's cache did (counters of this process only).

    Attributes:
        hits: reads served by a cached entry that was there.
        fetches: files downloaded into the cache.
        fetched_bytes: their bytes.
        refetches: entries found truncated or corrupt, deleted and fetched again.
        evictions: entries this process evicted for room.
        bypassed: reads that went to the remote directly because the local disk failed.
    """

    hits: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    refetches: int = 0
    evictions: int = 0
    bypassed: int = 0


class CachedFile:
    """An open, structurally checked cache entry; :meth:`read` checks the CRC of every block it returns.

    Args:
        path: the entry's path (for messages).
        fd: its open descriptor; the object owns it once made (closed with :meth:`close` or when garbage),
            and not when the entry fails its checks (:class:`CorruptEntry`: the caller closes it).
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = -1
        size = os.fstat(fd).st_size
        if size < _TRAILER.size:
            raise CorruptEntry(f"{path}: {size} bytes, shorter than its trailer")
        magic, length, block, table_crc, _ = _TRAILER.unpack(
            os.pread(fd, _TRAILER.size, size - _TRAILER.size)
        )
        blocks = -(-length // block) if block else -1
        if magic != _MAGIC or block <= 0 or size != length + 4 * blocks + _TRAILER.size:
            raise CorruptEntry(f"{path}: bad trailer or size (truncated or not a cache entry)")
        raw = os.pread(fd, 4 * blocks, length)
        if google_crc32c.value(raw) != table_crc:
            raise CorruptEntry(f"{path}: block table checksum mismatch")
        self.length = int(length)
        self.block = int(block)
        self.table = np.frombuffer(raw, dtype="<u4")
        self.fd = fd

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``start:end`` of the file (Python slice bounds, clipped), every block checked.

        Raises:
            CorruptEntry: a block's CRC differs or the entry is shorter than it says.
        """
        start, end, _ = slice(start, end).indices(self.length)
        if end <= start:
            return b""
        first, last = start // self.block, (end - 1) // self.block
        lo, hi = first * self.block, min(self.length, (last + 1) * self.block)
        data = os.pread(self.fd, hi - lo, lo)
        if len(data) != hi - lo:
            raise CorruptEntry(f"{self.path}: short read (truncated)")
        for b in range(first, last + 1):
            a = (b - first) * self.block
            if google_crc32c.value(data[a : a + self.block]) != int(self.table[b]):
                raise CorruptEntry(f"{self.path}: block {b} checksum mismatch (corrupt)")
        return data if (lo, hi) == (start, end) else data[start - lo : end - lo]

    def close(self) -> None:
        """Close the entry's descriptor (also done when the object is garbage: handles are shared by
        threads, so the cache never closes one that a reader may still hold)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


@contextlib.contextmanager
def _flock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed), waiting at most ``timeout_s``.

    Raises:
        CacheError: the lock was not obtained in time.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheError(
                        f"{path}: waited {timeout_s:.0f} s for the lock of {what}; another process holds it "
                        "(a stuck download?); retry, or use another cache_dir"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


class FileCache:
    """A cache folder of whole remote files (see the module doc). Use :func:`file_cache` to get the one
    object per folder and process.

    Args:
        directory: the cache folder (created if needed; a local file system).
        limit_bytes: bytes on disk it may hold (entries and downloads in progress).
    """

    def __init__(self, directory: str | os.PathLike[str], limit_bytes: int = DEFAULT_LIMIT_BYTES) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"cache limit must be > 0 bytes, got {limit_bytes}")
        self.directory = Path(directory)
        self.limit_bytes = int(limit_bytes)
        self._objects = self.directory / "objects"
        self._tmp = self.directory / "tmp"
        self._locks = self.directory / "locks"
        try:
            for d in (self._objects, self._tmp, self._locks):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"{self.directory}: cannot create the cache folder ({exc}); pass another cache_dir"
            ) from None
        self._lock = threading.Lock()
        self._inflight: dict[str, concurrent.futures.Future[None]] = {}
        self._handles: OrderedDict[str, CachedFile] = OrderedDict()
        self._pid = os.getpid()
        self._versions: dict[tuple[str, str], Version] = {}
        self._keys: dict[tuple[str, str, str], str] = {}
        self.generation = 0  # bumped by every registration (file systems memoise lookups per generation)
        self._stats = dict.fromkeys(CacheStats.__dataclass_fields__, 0)
        self._warned = False

    # -- versions ----------------------------------------------------------------------------------
    def register(self, protocol: str, versions: Mapping[str, Version]) -> None:
        """Cache the remote files ``protocol://path`` of ``versions`` (exact paths, or folders: every file
        under them) under their version; paths without the protocol, as the file system strips them."""
        with self._lock:
            for path, version in versions.items():
                self._versions[(protocol, path.rstrip("/"))] = version
            self.generation += 1

    def version_of(self, protocol: str, path: str) -> Version | None:
        """The version ``path`` is cached under (its own, else its nearest registered folder's), or None."""
        probe = path.rstrip("/")
        while probe:
            found = self._versions.get((protocol, probe))
            if found is not None:
                return found if probe == path.rstrip("/") else Version(found.tag)
            cut = probe.rfind("/")
            if cut <= 0:
                return None
            probe = probe[:cut]
        return None

    def _key_of(self, protocol: str, path: str, version: Version) -> str:
        memo = self._keys.get((protocol, path, version.tag))
        if memo is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            memo = self._keys[(protocol, path, version.tag)] = FileCache.key(protocol, path, version)
        return memo

    @staticmethod
    def key(protocol: str, path: str, version: Version) -> str:
        """The entry name of a remote file at a version."""
        return hashlib.sha256(f"{protocol}\0{path}\0{version.tag}".encode()).hexdigest()[:40]

    def has(self, protocol: str, path: str, version: Version) -> bool:
        """Whether the entry of the remote file is in the folder (a ``stat``; not checked)."""
        return self.entry_path(self._key_of(protocol, path, version)).exists()

    def entry_path(self, key: str) -> Path:
        """Where the entry ``key`` lives."""
        return self._objects / key[:2] / key

    # -- reading -----------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """This process's counters."""
        return CacheStats(**self._stats)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def read(self, fs: Any, url: str, protocol: str, path: str, version: Version, start: int = 0,
             end: int | None = None) -> bytes:  # fmt: skip
        """Bytes ``start:end`` of the remote file ``path`` (of ``fs``, ``url`` for messages) at ``version``,
        through the cache; a corrupt entry is dropped and fetched again once.

        Raises:
            FileNotFoundError: no such remote file.
            CacheError: the entry is corrupt again after a fresh fetch, or a lock wait timed out.
        """
        for attempt in range(2):
            handle = self.open(fs, url, protocol, path, version)
            if handle is None:  # the local disk failed: read the remote directly
                return fs.cat_file(path, start=start, end=end)
            try:
                return handle.read(start, end)
            except CorruptEntry as exc:
                self._drop(FileCache.key(protocol, path, version), handle)
                if attempt:
                    raise CacheError(
                        f"{url}: its cached copy {handle.path} is corrupt right after a fresh download ({exc}); "
                        "the remote file changed while it was read, or the disk is failing"
                    ) from None
                logger.warning("cache entry of %s failed its checksum (%s): fetching it again", url, exc)
                self._count("refetches")
        raise AssertionError("unreachable")

    def size(self, fs: Any, url: str, protocol: str, path: str, version: Version) -> int:
        """The remote file's size (fetching it into the cache)."""
        handle = self.open(fs, url, protocol, path, version)
        return int(fs.size(path)) if handle is None else handle.length

    def open(self, fs: Any, url: str, protocol: str, path: str, version: Version) -> CachedFile | None:
        """The checked entry of the remote file (fetched first when missing or broken); None when the local
        disk cannot hold it (the caller reads the remote).

        Raises:
            FileNotFoundError: no such remote file.
            CacheError: a lock wait timed out.
        """
        if self._pid != os.getpid():  # a forked process: its own handles and in-flight fetches
            self._lock, self._handles, self._inflight, self._pid = (
                threading.Lock(),
                OrderedDict(),
                {},
                os.getpid(),
            )
        key = self._key_of(protocol, path, version)
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                self._handles.move_to_end(key)
        if handle is not None:
            self._count("hits")
            return handle
        for _ in range(5):
            handle = self._open_entry(key)
            if handle is not None:
                self._count("hits")
                return self._remember(key, handle)
            try:
                handle = self.fetch(fs, url, protocol, path, version)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) or exc.errno not in _DISK_ERRNOS:
                    raise
                self._bypass(url, exc)
                return None
            if handle is not None:
                return self._remember(key, handle)
            # Another thread fetched it (and other processes may have evicted it since): open it again.
        raise CacheError(f"{url}: its cache entry {self.entry_path(key)} was evicted five times before it could "
                         "be opened; the cache limit is far too small for the data in flight, raise it")  # fmt: skip

    def _bypass(self, url: str, exc: OSError) -> None:
        self._count("bypassed")
        if not self._warned:
            self._warned = True
            logger.warning(
                "cache folder %s cannot hold %s (%s); reading such files from the remote directly",
                self.directory, url, exc,
            )  # fmt: skip

    def _remember(self, key: str, handle: CachedFile) -> CachedFile:
        """Keep ``handle`` among the process's recently used open entries (at most 32; dropped ones are
        closed when no reader holds them any more)."""
        with self._lock:
            self._handles[key] = handle
            self._handles.move_to_end(key)
            while len(self._handles) > 32:
                self._handles.popitem(last=False)
            for stale in [k for k, h in self._handles.items() if h.fd >= 0 and os.fstat(h.fd).st_nlink == 0]:
                del self._handles[stale]  # evicted by some process: let its disk space go
        return handle

    def _open_entry(self, key: str) -> CachedFile | None:
        """The entry ``key`` opened and checked (its mtime touched: recently used); None when missing or
        broken (a broken one is deleted)."""
        path = self.entry_path(key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink planted in the cache: never followed
                with contextlib.suppress(OSError):
                    self._unlink_if(path, os.lstat(path))
                return None
            raise
        try:
            handle = CachedFile(str(path), fd)
        except BaseException as exc:
            st = os.fstat(fd)
            os.close(fd)
            if not isinstance(exc, CorruptEntry):
                raise
            logger.warning("dropping broken cache entry %s (%s)", path, exc)
            self._count("refetches")
            self._unlink_if(path, st)
            return None
        with contextlib.suppress(OSError):
            if time.time() - os.fstat(fd).st_mtime > 1.0:
                os.utime(path)
        return handle

    def _unlink_if(self, path: Path, st: os.stat_result) -> None:
        """Remove ``path`` if it still is the file ``st`` describes (not a fresh copy another thread or
        process has put there since)."""
        with contextlib.suppress(FileNotFoundError):
            now = os.lstat(path)
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                path.unlink()

    def _drop(self, key: str, handle: CachedFile) -> None:
        with self._lock:
            if self._handles.get(key) is handle:
                del self._handles[key]
        with contextlib.suppress(OSError):
            self._unlink_if(Path(handle.path), os.fstat(handle.fd))

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # -- fetching ----------------------------------------------------------------------------------
    def fetch(self, fs: Any, url: str, protocol: str, path: str, version: Version) -> CachedFile | None:
        """Make sure the remote file is cached: wait for a fetch of it in flight in this process or another,
        else download it (bounded waits). Returns the entry opened when this thread opened or downloaded it
        (an open entry stays readable even if another process evicts it), None when another thread did.

        Raises:
            FileNotFoundError: no such remote file.
            OSError: the local disk failed.
            CacheError: a wait timed out, or the file differs from its recorded sha256.
        """
        key = FileCache.key(protocol, path, version)
        with self._lock:
            future = self._inflight.get(key)
            mine = future is None
            if mine:
                future = self._inflight[key] = concurrent.futures.Future()
        assert future is not None
        if not mine:
            try:
                future.result(timeout=FETCH_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                raise CacheError(
                    f"{url}: waited {FETCH_TIMEOUT_S:.0f} s for another thread's download of it"
                ) from None
            return None
        try:
            with _flock(self._locks / f"{key[:2]}.lock", FETCH_TIMEOUT_S, f"the download of {url}"):
                handle = self._open_entry(key)  # another process may have fetched it meanwhile
                if handle is None:
                    handle = self._download(fs, url, path, version, key)
            future.set_result(None)
            return handle
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _download(self, fs: Any, url: str, path: str, version: Version, key: str) -> CachedFile:
        size = int(fs.size(path))
        part = self._tmp / f"{key}.{os.getpid()}.{secrets.token_hex(4)}.{size}.part"
        self._reserve(size, part)
        digest = hashlib.sha256() if version.sha256 else None
        crcs: list[int] = []
        try:
            with open(part, "r+b") as out:
                done = 0
                while done < size:
                    chunk = fs.cat_file(path, start=done, end=min(size, done + FETCH_BYTES))
                    if not chunk:
                        break
                    out.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    for a in range(0, len(chunk), BLOCK_BYTES):
                        crcs.append(google_crc32c.value(chunk[a : a + BLOCK_BYTES]))
                    done += len(chunk)
                if done != size:
                    raise CacheError(f"{url}: the remote file has {done} bytes, it said {size}; retry")
                if digest is not None and f"sha256:{digest.hexdigest()}" != version.sha256:
                    raise CacheError(
                        f"{url}: its content differs from the sha256 its manifest records (the log was "
                        "changed after it was committed, or the storage returned wrong bytes); re-collect "
                        "the log, or reopen the stream if it was just re-committed"
                    )
                table = np.asarray(crcs, dtype="<u4").tobytes()
                out.write(table)
                out.write(_TRAILER.pack(_MAGIC, size, BLOCK_BYTES, google_crc32c.value(table), 0))
                out.truncate()
            final = self.entry_path(key)
            final.parent.mkdir(exist_ok=True)
            fd = os.open(part, os.O_RDONLY)  # open before the rename: readable even if evicted right after
            try:
                with _flock(self.directory / ".lock", LOCK_TIMEOUT_S, "the cache folder"):
                    os.replace(part, final)  # under the folder lock: a scan sees it in tmp/ or in objects/
                handle = CachedFile(str(final), fd)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._unlink(part)
            raise
        self._count("fetches")
        self._count("fetched_bytes", size)
        return handle

    def _reserve(self, size: int, part: Path) -> None:
        """Make room for a file of ``size`` bytes and create its partial download file, which holds the room
        until it is renamed or removed: the least recently used entries are evicted; room held by other
        downloads in flight is waited for (bounded). A file larger than the limit gets the folder to itself.

        Raises:
            OSError: ENOSPC when other downloads hold the room for longer than :data:`LOCK_TIMEOUT_S` (the
                caller then reads the remote directly).
        """
        need = size + 4 * (-(-size // BLOCK_BYTES)) + _TRAILER.size
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        delay = 0.001
        while True:
            with _flock(self.directory / ".lock", LOCK_TIMEOUT_S, "the cache folder"):
                entries, used = self._scan()
                entries.sort()  # oldest first
                evicted = 0
                while entries and used + need > self.limit_bytes:
                    _, nbytes, victim = entries.pop(0)
                    self._unlink(victim)
                    used -= nbytes
                    evicted += 1
                if evicted:
                    self._count("evictions", evicted)
                if used + need <= self.limit_bytes or used == 0:
                    part.touch(exist_ok=False)
                    return
            if time.monotonic() >= deadline:
                raise OSError(
                    errno.ENOSPC, "the cache folder's room is held by downloads in flight", str(part)
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        """(mtime, bytes, path) of every entry, and the bytes of entries and partial downloads (a partial
        one counts its final size; those of dead processes are removed)."""
        entries: list[tuple[float, int, Path]] = []
        used = 0
        for sub in os.scandir(self._objects):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(sub.path):
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, Path(e.path)))
                used += st.st_size
        now = time.time()
        for e in os.scandir(self._tmp):
            parts = e.name.split(".")
            try:
                st = e.stat(follow_symlinks=False)
                pid, declared = int(parts[1]), int(parts[3])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            if not process_alive(pid) or now - st.st_mtime > STALE_PART_S:
                self._unlink(Path(e.path))
                continue
            used += max(st.st_size, declared + 4 * (-(-declared // BLOCK_BYTES)) + _TRAILER.size)
        return entries, used

    def disk_bytes(self) -> int:
        """Bytes the folder holds now (entries and partial downloads)."""
        return self._scan()[1]


#: Errors of the local disk that make a read bypass the cache instead of failing.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}

_CACHES: dict[tuple[str, int], FileCache] = {}
_CACHES_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked process (a DataLoader worker): fresh locks (another thread may have held one at the fork),
    no open handles or fetches in flight of the parent."""
    global _CACHES_LOCK
    _CACHES_LOCK = threading.Lock()
    for cache in _CACHES.values():
        cache._lock, cache._handles, cache._inflight, cache._pid = (
            threading.Lock(),
            OrderedDict(),
            {},
            os.getpid(),
        )


os.register_at_fork(after_in_child=_after_fork_in_child)


def file_cache(
    directory: str | os.PathLike[str] | None = None, limit_bytes: int = DEFAULT_LIMIT_BYTES
) -> FileCache:
    """The process's :class:`FileCache` of ``directory`` (default :func:`default_cache_dir`) and limit."""
    path = str(Path(directory) if directory is not None else default_cache_dir())
    with _CACHES_LOCK:
        cache = _CACHES.get((path, int(limit_bytes)))
        if cache is None:
            cache = _CACHES[(path, int(limit_bytes))] = FileCache(path, limit_bytes)
        return cache


def register_versions(
    directory: str | os.PathLike[str] | None, limit_bytes: int, url_versions: Mapping[str, Version]
) -> None:
    """Register the versions of remote files or folders given by URL (``s3://bucket/a/b``) in the cache."""
    cache = file_cache(directory, limit_bytes)
    by_protocol: dict[str, dict[str, Version]] = {}
    for url, version in url_versions.items():
        protocol, _, _ = url.partition("://")
        cls = fsspec.get_filesystem_class(protocol)
        by_protocol.setdefault(protocol, {})[cls._strip_protocol(url)] = version
    for protocol, versions in by_protocol.items():
        cache.register(protocol, versions)


# -- the fsspec layer --------------------------------------------------------------------------------------

#: Options of :class:`CachingFileSystem` itself (the others go to the file system under it).
CACHE_OPTIONS = ("cache_dir", "cache_limit_bytes")


class CachingFileSystem(ChainedFileSystem):
    """fsspec file system ``drivecache``: a :class:`FileCache` over another file system (see the module doc).

    ``fsspec.url_to_fs("drivecache::s3://bucket/key", cache_dir=..., cache_limit_bytes=..., endpoint_url=...)``
    Files with a registered version are read through the cache; the rest (and listings) go to the target.

    Args:
        target_protocol: the file system under the cache (``s3``, ``gcs``, ...).
        target_options: its options.
        cache_dir: the cache folder (default :func:`default_cache_dir`).
        cache_limit_bytes: its size limit.
        **options: more options of the target (fsspec passes a URL chain's flat options here).
    """

    protocol = PROTOCOL

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fo: str | None = None,
        cache_dir: str | None = None,
        cache_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        **options: Any,
    ) -> None:
        super().__init__()
        if not target_protocol:
            raise CacheError(f"{PROTOCOL}: needs a file system under it, e.g. {PROTOCOL}::s3://bucket/key")
        options = {
            k: v for k, v in options.items() if k not in ("asynchronous", "loop", "skip_instance_cache")
        }
        self.target_protocol = target_protocol
        self.target_options = {**(target_options or {}), **options}
        self.cache_dir = cache_dir
        self.cache_limit_bytes = int(cache_limit_bytes)
        self._target: Any = None
        self._target_pid = -1
        self._cache: FileCache | None = None
        self._resolved: dict[str, tuple[str, Version | None]] = {}  # path -> (target path, version)
        self._resolved_generation = -1

    @property
    def target(self) -> Any:
        """The file system under the cache (made per process: fsspec's async ones are not fork-safe)."""
        if self._target is None or self._target_pid != os.getpid():
            self._target = fsspec.filesystem(self.target_protocol, **self.target_options)
            self._target_pid = os.getpid()
        return self._target

    @property
    def cache(self) -> FileCache:
        """The process's :class:`FileCache` of this file system's folder."""
        if self._cache is None:
            self._cache = file_cache(self.cache_dir, self.cache_limit_bytes)
        return self._cache

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        for prefix in (f"{PROTOCOL}::", f"{PROTOCOL}://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path

    def _target_path(self, path: str) -> str:
        return self.target._strip_protocol(self._strip_protocol(path))

    def _versioned(self, path: str) -> tuple[str, Version | None]:
        """The target's path of ``path`` and the version it is cached under (None: not cached); memoised
        until the next registration of versions."""
        cache = self.cache
        if self._resolved_generation != cache.generation or len(self._resolved) > 100_000:
            self._resolved, self._resolved_generation = {}, cache.generation
        found = self._resolved.get(path)
        if found is None:
            target_path = self._target_path(path)
            found = self._resolved[path] = (target_path, cache.version_of(self.target_protocol, target_path))
        return found

    def _url(self, target_path: str) -> str:
        return f"{self.target_protocol}://{target_path}"

    # -- reads through the cache -----------------------------------------------------------------------
    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        target_path, version = self._versioned(path)
        if version is None:
            return self.target.cat_file(target_path, start=start, end=end, **kwargs)
        return self.cache.read(self.target, self._url(target_path), self.target_protocol, target_path, version,
                               start or 0, end)  # fmt: skip

    def size(self, path: str) -> int:
        target_path, version = self._versioned(path)
        if version is None:
            return int(self.target.size(target_path))
        return self.cache.size(
            self.target, self._url(target_path), self.target_protocol, target_path, version
        )

    def prefetch(self, path: str) -> None:
        """Fetch ``path`` into the cache unless its entry is there (a ``stat``); unversioned paths: nothing."""
        target_path, version = self._versioned(path)
        if version is not None and not self.cache.has(self.target_protocol, target_path, version):
            self.size(path)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        target_path, version = self._versioned(path)
        if version is None:
            return self.target.info(target_path, **kwargs)
        size = self.size(path)
        return {"name": target_path, "size": size, "type": "file"}

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        target_path, version = self._versioned(path)
        if "r" not in mode or "+" in mode or version is None:
            return self.target.open(target_path, mode, **kwargs)
        length = self.size(path)
        return io.BufferedReader(_CachedReader(self, path, length), buffer_size=1024 * 1024)

    # -- everything else: the target ---------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self.target.ls(self._target_path(path), detail=detail, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        target_path, version = self._versioned(path)
        if version is not None:
            try:
                self.size(path)
                return True
            except FileNotFoundError:
                return False
        return self.target.exists(target_path, **kwargs)

    def isdir(self, path: str) -> bool:
        return self.target.isdir(self._target_path(path))

    def isfile(self, path: str) -> bool:
        target_path, version = self._versioned(path)
        return self.exists(path) if version is not None else self.target.isfile(target_path)

    def cat_ranges(self, paths: list[str], starts: Any, ends: Any, max_gap: Any = None, on_error: str = "return",
                   **kwargs: Any) -> list[Any]:  # fmt: skip
        out: list[Any] = []
        for p, s, e in zip(
            paths, np.broadcast_to(starts, len(paths)), np.broadcast_to(ends, len(paths)), strict=True
        ):
            try:
                out.append(self.cat_file(p, None if s is None else int(s), None if e is None else int(e)))
            except Exception as exc:
                if on_error == "raise":
                    raise
                out.append(exc)
        return out


class _CachedReader(io.RawIOBase):
    """A read-only raw file over a cached remote file (each read checked; :class:`io.BufferedReader` on top)."""

    def __init__(self, fs: CachingFileSystem, path: str, length: int) -> None:
        super().__init__()
        self._fs = fs
        self.path = fs._url(fs._target_path(path))
        self._source = path
        self._length = length
        self._pos = 0

    @property
    def size(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._length, self._pos + len(view))
        if end <= self._pos:
            return 0
        data = self._fs.cat_file(self._source, self._pos, end)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


fsspec.register_implementation(PROTOCOL, CachingFileSystem, clobber=True)


def cached_url(url: str) -> str:
    """``url`` read through the cache (``drivecache::<url>``); local paths and cached URLs unchanged."""
    if "://" not in url or url.startswith(f"{PROTOCOL}::") or url.startswith("file://"):
        return url
    return f"{PROTOCOL}::{url}"


# -- prefetching -------------------------------------------------------------------------------------------


class Prefetcher:
    """Runs fetch jobs (functions that fetch a few files into the cache) on ``threads`` threads, a bounded
    number queued; errors are logged, not raised (the reader reads the file itself and reports them).

    Args:
        threads: worker threads.
        max_queued: jobs queued or running at most (older ones are not cancelled; newer ones wait).
    """

    def __init__(self, threads: int = 4, max_queued: int = 64) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="drivecache")
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._max = max(1, max_queued)

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (waits, bounded, while too many are queued)."""
        self._pending = {f for f in self._pending if not f.done()}
        if len(self._pending) >= self._max:
            concurrent.futures.wait(self._pending, timeout=FETCH_TIMEOUT_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)  # fmt: skip
        self._pending.add(self._pool.submit(self._run, job))

    @staticmethod
    def _run(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:  # the reader reads the file itself and reports what is wrong
            logger.debug("prefetch failed: %s", exc)

    def close(self) -> None:
        """Stop: queued jobs are dropped, running ones finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def read_json(fs: Any, path: str) -> dict[str, Any] | None:
    """A small JSON file read through ``fs`` (None if missing or not JSON: the caller's reader reports it)."""
    try:
        data = json.loads(fs.cat_file(path))
    except (OSError, ValueError, DriveEngineError):
        return None
    return data if isinstance(data, dict) else None
