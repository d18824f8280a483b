"""Per-log commit of a split, and the lock that keeps one ``collect`` per output: on a local (or shared)
file system, and on object stores (``s3://...``, any fsspec URL).

**Local folders** (DESIGN §3), for one log:

1. the worker writes ``meta/.<log>.parquet.tmp-<host>-<pid>-<rand>`` (and ``occ/.<log>.zarr.tmp-...``):
   names starting with ``.`` and containing ``.tmp-`` are temporaries, invisible to readers;
2. :func:`commit_log_files` fsyncs every file, computes its sha256, renames it into place
   (``meta/<log>.parquet``, ``occ/<log>.zarr``) and fsyncs the folders;
3. the client (the only process that owns ``manifest.json``) records the entry with
   :func:`~driveengine.store.manifest.save_manifest`. The manifest entry is the commit point.

A crash at any step leaves either temporaries (removed by :func:`clean_stale_temporaries` at the next
start, under the lock; the manifest's own ``.manifest.json.<hex>.tmp`` included) or renamed files
without a manifest entry (redone by the next run). :class:`CollectLock` is an ``flock``.

**Object stores** have no rename, and their workers need no shared file system:

1. a worker (:class:`ObjectStoreLogOutput`) writes the log's files in a private local scratch folder
   (``$TMPDIR/driveengine-scratch-<host>-<pid>-...``), then uploads them under **per-attempt keys**:
   ``meta/<log>.<attempt>.parquet`` and ``occ/<log>.<attempt>.zarr/...``, ``<attempt>`` being
   ``<UTC time>-<8 random hex>``, unique to this try of this log;
2. it lists the keys it wrote and reads every object back from the store: each object must exist
   with the size and the sha256 of the local file it came from (none missing, none extra), or the log
   fails; it returns the manifest entry, which names those keys, with the same checksums a local
   collect records (a Zarr group's tree hash is computed from its keys);
3. the client alone commits, by writing ``manifest.json`` in one put (:class:`ObjectStoreSplit`).

The entry names the keys the worker wrote, so committing copies nothing (a copy would double the
bytes moved, and overwriting fixed keys such as ``meta/<log>.parquet`` would change a committed log
under readers of the old manifest); keys are written once and never changed. Objects that no manifest
entry names are invisible to readers (they open logs through the manifest only) and are removed by
the client, under the lock: at the start of a run (attempts of crashed runs and killed workers) and at
its end (failed or killed attempts of this run, and the objects of logs redone by it). An attempt that
a worker is still writing after its client died (a ``tcp://`` cluster keeps running a task whose
client is gone) may leave objects after that; the next run removes them.

**The lock on an object store** (:class:`ObjectStoreLock`) is the object ``<split>/.collect.lock``:
``{"host", "pid", "renewed_at", ...}``, created only if absent (S3 ``If-None-Match: *``), renewed every
quarter of :data:`LOCK_LEASE_S` by a heartbeat thread with a put conditional on its ETag
(``If-Match``), deleted at the end. A lock whose lease expired, or whose process is gone on this same
host (pid and start time checked), is taken over with a put conditional on the ETag that was read, so
of two runs taking over at once one wins. Each manifest put is conditional on the ETag of the
manifest this run read or wrote last: a run that stalled past its lease and was taken over cannot
overwrite its successor's manifest (it stops with :class:`CollectLockedError`). Limits: the
lease compares the holder's clock with the reader's (clocks must agree to well within the lease);
a client killed on another host blocks the prefix until its lease expires; the conditional puts are
atomic on S3 (and stores with its conditional writes) only: on other fsspec back-ends
(:class:`ConditionalPuts`, the generic one) they check, then write, so two runs started within the
same instant could both proceed (register a back-end's own with :func:`register_conditional_puts`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import posixpath
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from driveengine.errors import DriveEngineError
from driveengine.files import ATOMIC_TMP_RE, fsync_dir, fsync_file, remove_stale_temporaries
from driveengine.store.manifest import (
    MANIFEST_NAME,
    LogEntry,
    Manifest,
    ManifestError,
    is_remote,
    join_location,
    load_or_create_manifest,
    local_path,
    manifest_from_bytes,
    manifest_to_bytes,
    save_manifest,
)

LOCK_NAME = ".collect.lock"
TMP_MARK = ".tmp-"
META_DIR = "meta"
OCC_DIR = "occ"


class CollectLockedError(DriveEngineError):
    """Another ``collect`` is writing to the same output folder."""


class CommitError(DriveEngineError):
    """A log's files could not be committed."""


def meta_relpath(log_name: str) -> str:
    """``meta/<log>.parquet``, relative to the split folder."""
    return f"{META_DIR}/{log_name}.parquet"


def occ_relpath(log_name: str) -> str:
    """``occ/<log>.zarr``, relative to the split folder."""
    return f"{OCC_DIR}/{log_name}.zarr"


def temporary_path(final: Path) -> Path:
    """A unique temporary sibling of ``final`` (``.<name>.tmp-<host>-<pid>-<rand>``), invisible to readers."""
    return (
        final.parent / f".{final.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`temporary_path`'s or an atomic write's (``.<name>.<hex>.tmp``)."""
    return name.startswith(".") and (TMP_MARK in name or ATOMIC_TMP_RE.fullmatch(name) is not None)


class CollectLock:
    """An exclusive ``fcntl.flock`` on ``<split_dir>/.collect.lock`` holding ``{"pid", "host"}``.

    Use as a context manager. The lock dies with the process (kill -9 included), so a crashed run
    never blocks the next one.

    Raises:
        CollectLockedError: another process holds the lock (its pid and host are in the message).
    """

    def __init__(self, split_dir: str | os.PathLike[str]) -> None:
        self.path = Path(split_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise CollectLockedError(
                f"{self.path.parent}: another `driveengine collect` is writing here "
                f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}); wait for it to finish, "
                "or stop it and run again (finished logs are kept)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CollectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_stale_temporaries(split_dir: str | os.PathLike[str]) -> list[str]:
    """Remove the temporaries of crashed runs in ``meta/`` and ``occ/``; call only under :class:`CollectLock`.

    Returns:
        The removed paths, relative to ``split_dir``.
    """
    split_dir = Path(split_dir)
    removed = [
        os.path.relpath(path, split_dir)
        for sub in (META_DIR, OCC_DIR, ".")
        for path in remove_stale_temporaries(split_dir / sub, is_temporary, folders=True)
    ]
    return sorted(removed)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """``"sha256:<hex>"`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def tree_digest(files: dict[str, str]) -> str:
    """``"sha256:<hex>"`` of a folder from its files' digests (relative POSIX path -> ``sha256:<hex>``):
    the hash of the lines ``<relative path> <sha256 of the file>``, in path order (part by part, as
    :class:`pathlib.Path` sorts). Object stores compute it from their keys, folders from their files."""
    lines = [f"{rel} {files[rel]}\n" for rel in sorted(files, key=lambda rel: tuple(rel.split("/")))]
    return f"sha256:{hashlib.sha256(''.join(lines).encode()).hexdigest()}"


def sha256_tree(root: str | os.PathLike[str]) -> str:
    """``"sha256:<hex>"`` of a folder: the hash of the sorted lines ``<relative path> <sha256 of the file>``."""
    root = Path(root)
    return tree_digest(
        {path.relative_to(root).as_posix(): sha256_file(path) for path in root.rglob("*") if path.is_file()}
    )


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing folder at ``final`` is first moved aside and removed."""
    if final.is_dir() and not final.is_symlink():
        aside = temporary_path(final)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def commit_log_files(
    split_dir: str | os.PathLike[str], files: dict[str, Path], may_commit: Callable[[], bool] | None = None
) -> dict[str, str]:
    """fsync, checksum and rename a log's temporaries into place (steps 2 of the protocol).

    Args:
        split_dir: the split folder.
        files: final path relative to ``split_dir`` (e.g. ``"meta/<log>.parquet"``) -> its temporary
            (a file, or a folder such as a Zarr store).
        may_commit: asked right before the renames; False (the collect process that owns the run is
            gone) leaves the temporaries and raises instead.

    Returns:
        Final relative path -> ``"sha256:<hex>"`` (a folder's is :func:`sha256_tree`).

    Raises:
        CommitError: a temporary is missing, or ``may_commit`` said no.
    """
    split_dir = Path(split_dir)
    checksums: dict[str, str] = {}
    for rel, tmp in sorted(files.items()):
        if not tmp.exists():
            raise CommitError(f"{tmp}: temporary output of {rel} vanished before its commit")
        if tmp.is_dir():
            _fsync_tree(tmp)
            checksums[rel] = sha256_tree(tmp)
        else:
            fsync_file(tmp)
            checksums[rel] = sha256_file(tmp)
    if may_commit is not None and not may_commit():
        raise CommitError(
            f"{split_dir}: {', '.join(sorted(files))} not committed, the collect process is gone"
        )
    for rel, tmp in sorted(files.items()):
        final = split_dir / rel
        _replace(tmp, final)
        fsync_dir(final.parent)
    return checksums


def source_fingerprint(paths: list[Path]) -> str:
    """A fingerprint of input files and folders from their sizes and mtimes (not their bytes: cheap).

    A folder contributes its own mtime, which changes when files are added to or removed from it.
    Missing paths contribute ``missing``.
    """
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size if not Path(path).is_dir() else 0}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:32]


def config_hash(config: dict[str, Any]) -> str:
    """Hash of every setting that changes a log's output (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_files_present(split_dir: str | os.PathLike[str], entry: LogEntry) -> bool:
    """Whether every file a manifest entry names exists (cheap check used to decide a skip)."""
    split_dir = Path(split_dir)
    return all((split_dir / rel).exists() for rel in entry.checksums)


# -- what a run writes to: a local folder or an object store -----------------------------------------

#: Seconds a lock on an object store stays valid without a renewal (renewed every quarter of it).
LOCK_LEASE_S = 60.0
#: Largest lock object read; a bigger one is not DriveEngine's.
LOCK_MAX_BYTES = 64 * 1024
#: Objects read back at once when a worker verifies its upload.
VERIFY_THREADS = 8
#: Objects up to this size are verified from one read; bigger ones are streamed (bounded memory).
VERIFY_WHOLE_BYTES = 16 * 2**20
#: Prefix of the workers' local scratch folders (in ``tempfile.gettempdir()``, i.e. ``$TMPDIR``).
SCRATCH_PREFIX = "driveengine-scratch-"
#: s3fs writes up to 5 GiB in one PutObject with this chunk size (the manifest and the lock: one put).
_SINGLE_PUT_CHUNK = 5 * 2**30 // 2 + 1
#: A per-attempt name: ``<log>.<YYYYMMDDTHHMMSSZ>-<8 hex>.<parquet|zarr>``.
ATTEMPT_RE = re.compile(r"\.(\d{8}T\d{6}Z-[0-9a-f]{8})\.(parquet|zarr)$")


class OutputLocationError(DriveEngineError):
    """An output URL cannot be used: unknown protocol, missing package, no bucket, no permission."""


class PutConflict(Exception):
    """A conditional put or delete found the object changed or gone since it was read."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc``), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (not a zombie) and, if ``start`` is given, is the one
    that started then (not a later process that reuses the pid)."""
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        fields = stat[stat.rindex(")") + 2 :].split()
        return fields[0] not in ("Z", "X") and (start is None or fields[19] == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _content_token(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ConditionalPuts:
    """Puts that succeed only if an object is absent (``create``) or unchanged since it was read
    (``replace``, ``delete``), as the lock and the manifest's fence need; ``read`` returns the token
    (``ETag``, or a hash of the bytes) those compare.

    This generic version works on every fsspec file system but is not atomic (it checks, then writes);
    back-ends with real conditional writes register their own (:func:`register_conditional_puts`).
    """

    #: Whether the conditions are checked by the store itself, atomically.
    atomic = False

    def read(self, fs: Any, path: str, limit: int | None = None) -> tuple[bytes, str]:
        """The object's bytes (the first ``limit`` ones at most) and its token.

        Raises:
            FileNotFoundError: no such object.
        """
        data = fs.cat_file(path)
        return (data if limit is None else data[:limit]), _content_token(data)

    def create(self, fs: Any, path: str, data: bytes) -> str:
        """Write ``data`` if no object is at ``path``; returns its token.

        Raises:
            FileExistsError: an object is there.
        """
        fs.pipe_file(path, data, mode="create")
        return _content_token(data)

    def replace(self, fs: Any, path: str, data: bytes, token: str) -> str:
        """Write ``data`` over the object at ``path`` if its token is still ``token``; returns the new one.

        Raises:
            PutConflict: the object changed or is gone.
        """
        try:
            _, now = self.read(fs, path)
        except FileNotFoundError:
            raise PutConflict(path) from None
        if now != token:
            raise PutConflict(path)
        fs.pipe_file(path, data)
        return _content_token(data)

    def delete(self, fs: Any, path: str, token: str) -> bool:
        """Delete the object at ``path`` if its token is still ``token``; whether it did."""
        try:
            _, now = self.read(fs, path)
        except FileNotFoundError:
            return False
        if now != token:
            return False
        fs.rm_file(path)
        return True


def _s3_error_code(exc: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated (``PreconditionFailed``, ...), or ``""``."""
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class S3ConditionalPuts(ConditionalPuts):
    """S3's own conditional writes: ``If-None-Match: *`` and ``If-Match: <ETag>`` on PutObject (AWS S3
    since 2024, MinIO, moto); reads pin the ETag they report."""

    atomic = True

    def read(self, fs: Any, path: str, limit: int | None = None) -> tuple[bytes, str]:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as f:  # s3fs reads with If-Match on the ETag it got: bytes and token agree
            token = str(f.details.get("ETag", ""))
            data = f.read() if limit is None else f.read(limit)
        return data, token

    def _etag(self, fs: Any, path: str, response: object) -> str:
        if isinstance(response, dict) and response.get("ETag"):
            return str(response["ETag"])
        fs.invalidate_cache(path)
        return str(fs.info(path).get("ETag", ""))

    def create(self, fs: Any, path: str, data: bytes) -> str:
        try:
            response = fs.pipe_file(path, data, mode="create", chunksize=_SINGLE_PUT_CHUNK)
        except FileExistsError:
            raise
        except OSError as exc:
            if _s3_error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise FileExistsError(path) from None
            raise
        return self._etag(fs, path, response)

    def replace(self, fs: Any, path: str, data: bytes, token: str) -> str:
        try:
            response = fs.pipe_file(path, data, chunksize=_SINGLE_PUT_CHUNK, IfMatch=token)
        except FileNotFoundError:
            raise PutConflict(path) from None
        except OSError as exc:
            if _s3_error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise PutConflict(path) from None
            raise
        return self._etag(fs, path, response)


GENERIC_PUTS = ConditionalPuts()
_CONDITIONAL_PUTS: dict[str, ConditionalPuts] = {}


def register_conditional_puts(protocol: str, puts: ConditionalPuts) -> None:
    """Use ``puts`` for the lock and the manifest on file systems of ``protocol``."""
    _CONDITIONAL_PUTS[protocol] = puts


def conditional_puts(fs: Any) -> ConditionalPuts:
    """The registered :class:`ConditionalPuts` of an fsspec file system (the generic one by default)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    for protocol in protocols:
        if protocol in _CONDITIONAL_PUTS:
            return _CONDITIONAL_PUTS[protocol]
    return GENERIC_PUTS


register_conditional_puts("s3", S3ConditionalPuts())
register_conditional_puts("s3a", S3ConditionalPuts())


@dataclass(frozen=True)
class ObjectStore:
    """A split's location on an object store.

    Attributes:
        url: the split's URL (``s3://bucket/prefix/<split>``).
        fs: its fsspec file system (options from fsspec's configuration and the back-end's environment).
        root: the split's path in ``fs``.
    """

    url: str
    fs: Any
    root: str

    @classmethod
    def open(cls, url: str) -> ObjectStore:
        """The store of ``url``.

        Raises:
            OutputLocationError: fsspec knows no file system for the URL, or its package is missing.
        """
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:
            raise OutputLocationError(
                f"{url}: no fsspec file system for this URL ({exc}); install its package (s3fs for s3://, "
                "gcsfs for gs://, adlfs for az://) or give a local folder"
            ) from None
        return cls(url.rstrip("/"), fs, root.rstrip("/"))

    @property
    def puts(self) -> ConditionalPuts:
        """The conditional puts of this store's back-end."""
        return conditional_puts(self.fs)

    def key(self, rel: str) -> str:
        """The path in :attr:`fs` of ``rel`` (relative to the split)."""
        return f"{self.root}/{rel}"

    def url_of(self, rel: str) -> str:
        """The URL of ``rel`` (relative to the split)."""
        return f"{self.url}/{rel}"


@dataclass(frozen=True)
class LockHolder:
    """What a lock object says about the run holding it.

    Attributes:
        host: its host name.
        pid: its process id there.
        pid_start: that process's start time (``/proc``), None where unknown.
        renewed_at: wall-clock time of its last renewal, seconds since the epoch (the holder's clock).
    """

    host: str
    pid: int
    pid_start: str | None
    renewed_at: float

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        """The holder a lock object's bytes describe; None when they are not a DriveEngine lock."""
        if len(data) > LOCK_MAX_BYTES:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        host, pid, start, renewed = (record.get(k) for k in ("host", "pid", "pid_start", "renewed_at"))
        if (
            not isinstance(host, str)
            or not isinstance(pid, int)
            or isinstance(pid, bool)
            or pid <= 0
            or not isinstance(start, str | None)
            or not isinstance(renewed, int | float)
            or isinstance(renewed, bool)
            or not math.isfinite(renewed)
        ):
            return None
        return cls(host, pid, start, float(renewed))

    def stale_reason(self, lease_s: float, now: float | None = None) -> str | None:
        """Why the lock may be taken over (lease expired, holder gone from this host); None: it holds."""
        age = (time.time() if now is None else now) - self.renewed_at
        if age > lease_s:
            return f"its lease expired ({age:.0f} s since its last renewal, lease {lease_s:.0f} s)"
        if self.host == socket.gethostname() and not process_alive(self.pid, self.pid_start):
            return f"its process (pid {self.pid} on this host) is gone"
        return None


class ObjectStoreLock:
    """The lock of a split on an object store (see the module doc); a context manager.

    Raises (from :meth:`acquire`):
        CollectLockedError: another run holds it (host, pid and age named), or its object is not a
            DriveEngine lock (delete it if no collect runs there).
        OutputLocationError: the lock object cannot be written (no bucket, no permission).
    """

    def __init__(self, store: ObjectStore, lease_s: float | None = None) -> None:
        self.store = store
        self.url = store.url_of(LOCK_NAME)
        self.lease_s = LOCK_LEASE_S if lease_s is None else lease_s
        #: Why a previous holder's lock was taken over (None: it was free).
        self.took_over: str | None = None
        self._path = store.key(LOCK_NAME)
        self._puts = store.puts
        self._token: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "tool": "driveengine collect",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": process_start(os.getpid()),
                "renewed_at": time.time(),
                "lease_s": self.lease_s,
            }
        ).encode()

    def _refusal(self, holder: LockHolder | None) -> CollectLockedError:
        if holder is None:
            return CollectLockedError(
                f"{self.url}: this object is not a DriveEngine collect lock; if no `driveengine collect` "
                "writes there, delete it and run again"
            )
        age = time.time() - holder.renewed_at
        return CollectLockedError(
            f"{self.url}: another `driveengine collect` is writing here (pid {holder.pid} on host "
            f"{holder.host}, lock renewed {age:.0f} s ago, lease {self.lease_s:.0f} s); wait for it to "
            "finish, or stop it and run again (finished logs are kept; a run killed on another host frees "
            f"the lock when its lease expires); if no collect writes there, delete {self.url}"
        )

    def acquire(self) -> None:
        fs = self.store.fs
        for _ in range(4):
            try:
                self._token = self._puts.create(fs, self._path, self._record())
                break
            except FileExistsError:
                pass
            except OSError as exc:
                raise OutputLocationError(
                    f"{self.url}: cannot write the collect lock ({exc}); check that the bucket exists and "
                    "that these credentials may write there"
                ) from None
            try:
                data, token = self._puts.read(fs, self._path, LOCK_MAX_BYTES + 1)
            except FileNotFoundError:
                continue  # released meanwhile: create it again
            except OSError as exc:
                if _s3_error_code(exc) == "PreconditionFailed":
                    continue  # renewed between the read's two requests: read it again
                raise OutputLocationError(f"{self.url}: cannot read the collect lock ({exc})") from None
            holder = LockHolder.parse(data)
            stale = None if holder is None else holder.stale_reason(self.lease_s)
            if stale is None:
                raise self._refusal(holder)
            try:
                self._token = self._puts.replace(fs, self._path, self._record(), token)
            except PutConflict:
                continue  # another run took it over at the same moment: look again
            self.took_over = stale
            break
        else:
            raise CollectLockedError(
                f"{self.url}: the collect lock keeps changing hands; another `driveengine collect` is "
                "starting here, wait for it"
            )
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="collect-lock-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.lease_s / 4):
            try:
                with self._guard:
                    if self._stop.is_set() or self._token is None:
                        return
                    self._token = self._puts.replace(self.store.fs, self._path, self._record(), self._token)
                last_ok = time.monotonic()
            except PutConflict:
                self._lost = "another process took the collect lock over (this run stalled past its lease)"
                return
            except Exception as exc:  # a network error: try again until the lease is spent
                if time.monotonic() - last_ok > self.lease_s:
                    self._lost = f"the collect lock could not be renewed for {self.lease_s:.0f} s ({exc})"
                    return

    def check(self) -> None:
        """Raise :class:`CollectLockedError` if the lock was lost (taken over, or not renewable)."""
        if self._lost is not None:
            raise CollectLockedError(
                f"{self.url}: {self._lost}; this run stops (the logs it committed are kept); run again"
            )

    def release(self) -> None:
        self._stop.set()
        with self._guard:
            token, self._token = self._token, None
        if self._thread is not None:
            self._thread.join(timeout=self.lease_s)
            self._thread = None
        if token is not None and self._lost is None:
            try:
                self._puts.delete(self.store.fs, self._path, token)
            except OSError:
                pass  # expires with its lease

    def __enter__(self) -> ObjectStoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _referenced(manifest: Manifest) -> set[str]:
    """Every path the manifest's entries name (relative to the split)."""
    names: set[str] = set()
    for entry in manifest.logs.values():
        names.add(entry.meta)
        if entry.occ:
            names.add(entry.occ)
        names.update(entry.checksums)
    return names


class SplitOutput(Protocol):
    """Where a ``collect`` client keeps a split: its lock, its manifest, its leftovers."""

    @property
    def location(self) -> str:
        """The split folder or URL."""
        ...

    @property
    def has_manifest(self) -> bool:
        """Whether a manifest was there when :meth:`load_manifest` ran."""
        ...

    def lock(self) -> CollectLock | ObjectStoreLock:
        """The split's lock (a context manager)."""
        ...

    def load_manifest(self, split: str) -> Manifest:
        """The split's manifest, or a new one."""
        ...

    def save_manifest(self, manifest: Manifest) -> None:
        """Commit ``manifest``."""
        ...

    def files_present(self, entry: LogEntry) -> bool:
        """Whether every file ``entry`` names is there (cheap)."""
        ...

    def check_result(self, entry: LogEntry) -> str | None:
        """Why a worker's new entry must not be committed (its files are not visible here), or None."""
        ...

    def clean(self, manifest: Manifest, at_start: bool) -> list[str]:
        """Remove what no committed entry of ``manifest`` needs; the removed paths."""
        ...


class LocalSplit:
    """A split in a local (or shared) folder: the rename protocol (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._had_manifest = False

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def has_manifest(self) -> bool:
        return self._had_manifest

    def lock(self) -> CollectLock:
        self.path.mkdir(parents=True, exist_ok=True)
        return CollectLock(self.path)

    def load_manifest(self, split: str) -> Manifest:
        self._had_manifest = (self.path / MANIFEST_NAME).exists()
        return load_or_create_manifest(self.path, split)

    def save_manifest(self, manifest: Manifest) -> None:
        save_manifest(self.path, manifest)
        self._had_manifest = True

    def files_present(self, entry: LogEntry) -> bool:
        return entry_files_present(self.path, entry)

    def check_result(self, entry: LogEntry) -> str | None:
        """None: the worker renamed the files into this very folder (its commit checked them)."""
        return None

    def clean(self, manifest: Manifest, at_start: bool) -> list[str]:
        """The temporaries of crashed runs, at the start (renamed files are replaced by their redo)."""
        return clean_stale_temporaries(self.path) if at_start else []


class ObjectStoreSplit:
    """A split on an object store, the client's side (see the module doc): lock, fenced manifest puts,
    removal of the objects no entry names."""

    def __init__(self, url: str, lease_s: float | None = None) -> None:
        self.store = ObjectStore.open(url)
        self._lock = ObjectStoreLock(self.store, lease_s)
        self._manifest_token: str | None = None
        self._present: set[str] = set()

    @property
    def location(self) -> str:
        return self.store.url

    @property
    def has_manifest(self) -> bool:
        return self._manifest_token is not None

    def lock(self) -> ObjectStoreLock:
        return self._lock

    @property
    def atomic(self) -> bool:
        """Whether the store checks the lock's and the manifest's conditional puts itself (see the module doc)."""
        return self.store.puts.atomic

    def load_manifest(self, split: str) -> Manifest:
        url = self.store.url_of(MANIFEST_NAME)
        try:
            data, token = self.store.puts.read(self.store.fs, self.store.key(MANIFEST_NAME))
        except FileNotFoundError:
            self._manifest_token = None
            return Manifest(split=split)
        except OSError as exc:
            raise ManifestError(f"{url}: unreadable manifest ({exc})") from None
        manifest = manifest_from_bytes(data, url)
        self._manifest_token = token
        return manifest

    def save_manifest(self, manifest: Manifest) -> None:
        """One put of the whole manifest, conditional on it being the one this run read or wrote last.

        Raises:
            CollectLockedError: the lock was lost, or another process changed the manifest meanwhile
                (nothing is overwritten).
        """
        self._lock.check()
        fs, path, data = self.store.fs, self.store.key(MANIFEST_NAME), manifest_to_bytes(manifest)
        try:
            if self._manifest_token is None:
                token = self.store.puts.create(fs, path, data)
            else:
                token = self.store.puts.replace(fs, path, data, self._manifest_token)
        except (FileExistsError, PutConflict):
            raise CollectLockedError(
                f"{self.store.url_of(MANIFEST_NAME)} was changed by another process during this run "
                "(another collect took the lock over); this run stops without overwriting it; run again"
            ) from None
        except OSError as exc:
            raise OutputLocationError(
                f"{self.store.url_of(MANIFEST_NAME)}: cannot write the manifest ({exc}); the logs it does "
                "not name yet are redone by the next run"
            ) from None
        self._manifest_token = token

    def list_outputs(self) -> set[str]:
        """The entries of ``meta/`` and ``occ/`` (``meta/<name>``, ``occ/<name>``; one per Zarr group)."""
        found: set[str] = set()
        for folder in (META_DIR, OCC_DIR):
            key = self.store.key(folder)
            self.store.fs.invalidate_cache(key)
            try:
                names = self.store.fs.ls(key, detail=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise OutputLocationError(f"{self.store.url_of(folder)}: cannot list ({exc})") from None
            found |= {f"{folder}/{posixpath.basename(name.rstrip('/'))}" for name in names}
        return found

    def files_present(self, entry: LogEntry) -> bool:
        """Whether every path ``entry`` names was listed by the last :meth:`clean`."""
        return all(rel in self._present for rel in entry.checksums)

    def check_result(self, entry: LogEntry) -> str | None:
        """Whether this client sees the objects a worker says it wrote (two requests): a worker whose
        environment points at another store (endpoint, bucket) or keeps a process-local one
        (``memory://``) verified its own upload, which the manifest must not name."""
        fs = self.store.fs
        keys = [self.store.key(entry.meta)]
        if entry.occ:
            keys.append(self.store.key(f"{entry.occ}/zarr.json"))
        for key in keys:
            fs.invalidate_cache(key)
            try:
                fs.info(key)
            except FileNotFoundError:
                return (
                    f"{self.store.fs.unstrip_protocol(key)}: the worker's upload is not visible from this "
                    "client; give the workers the client's store settings (endpoint, credentials: their "
                    "environment), and no process-local store such as memory:// with several processes"
                )
            except OSError as exc:
                return f"{self.store.fs.unstrip_protocol(key)}: cannot check the worker's upload ({exc})"
        return None

    def clean(self, manifest: Manifest, at_start: bool) -> list[str]:
        """Remove the frame shards and label groups of ``meta/`` and ``occ/`` that no entry of
        ``manifest`` (as committed) names: attempts of crashed runs, failed or killed attempts, logs
        redone. Other objects are left alone."""
        listing = self.list_outputs()
        garbage = sorted(
            rel
            for rel in listing - _referenced(manifest)
            if rel.endswith(".parquet" if rel.startswith(f"{META_DIR}/") else ".zarr")
        )
        if garbage:
            try:
                self.store.fs.rm([self.store.key(rel) for rel in garbage], recursive=True)
            except OSError as exc:
                raise OutputLocationError(
                    f"{self.store.url}: cannot remove {len(garbage)} objects no manifest entry names, e.g. "
                    f"{garbage[0]} ({exc}); check that these credentials may delete there, then run again"
                ) from None
        self._present = listing - set(garbage)
        return garbage


def split_output(out: str | os.PathLike[str], split: str) -> LocalSplit | ObjectStoreSplit:
    """Where a run writes split ``split`` of the output root ``out`` (a folder, or a URL: see the module doc).

    Raises:
        OutputLocationError: a URL fsspec cannot open.
    """
    if is_remote(out):
        return ObjectStoreSplit(join_location(out, split))
    path = local_path(out)
    if path.parts and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+:", path.parts[0]):
        raise OutputLocationError(
            f"{out}: looks like a URL whose '//' was folded into '/' (pathlib.Path does that); pass the URL "
            "as a string, or write ./ before a local folder whose name ends with ':'"
        )
    return LocalSplit(path / split)


# -- the worker's side: where one log's files go -----------------------------------------------------


@dataclass(frozen=True)
class CommittedFiles:
    """A log's files as a worker left them for the client to record.

    Attributes:
        paths: the name each file was staged under (``meta/<log>.parquet``) -> the path the manifest
            entry must name (the same on a local folder; the per-attempt key on an object store).
        checksums: that path -> ``"sha256:<hex>"`` (a folder's is its tree hash).
    """

    paths: dict[str, str]
    checksums: dict[str, str]


class LogOutput(Protocol):
    """Where a worker writes one log's files: :func:`log_output`."""

    def stage(self, rel: str) -> Path:
        """A local path to write the file or folder ``rel`` (``meta/<log>.parquet``, ``occ/<log>.zarr``) at."""
        ...

    def finish(self, rel: str) -> None:
        """``rel`` is complete (an object store uploads it now)."""
        ...

    def commit(self, may_commit: Callable[[], bool] | None = None) -> CommittedFiles:
        """Make every staged file durable and checked, ready for the manifest entry."""
        ...

    def discard(self) -> None:
        """Remove what was not committed (always call it, e.g. in a ``finally``)."""
        ...


class LocalLogOutput:
    """Temporaries in the split folder, renamed into place by :func:`commit_log_files`."""

    def __init__(self, split_dir: Path) -> None:
        self.split_dir = split_dir
        self._staged: dict[str, Path] = {}

    def stage(self, rel: str) -> Path:
        tmp = temporary_path(self.split_dir / rel)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self._staged[rel] = tmp
        return tmp

    def finish(self, rel: str) -> None:
        pass

    def commit(self, may_commit: Callable[[], bool] | None = None) -> CommittedFiles:
        checksums = commit_log_files(self.split_dir, dict(self._staged), may_commit)
        self._staged.clear()
        return CommittedFiles({rel: rel for rel in checksums}, checksums)

    def discard(self) -> None:
        for tmp in self._staged.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self._staged.clear()


def new_attempt_id() -> str:
    """A unique id of one try of one log: ``<UTC YYYYMMDDTHHMMSSZ>-<8 random hex>``."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def attempt_relpath(rel: str, attempt: str) -> str:
    """``meta/<log>.parquet`` -> ``meta/<log>.<attempt>.parquet`` (likewise ``occ/<log>.<attempt>.zarr``)."""
    stem, _, suffix = rel.rpartition(".")
    return f"{stem}.{attempt}.{suffix}"


def clean_dead_scratch(base: Path | None = None) -> list[str]:
    """Remove the scratch folders of this host's dead workers (killed mid-log) under ``base``
    (default ``tempfile.gettempdir()``); the removed names."""
    base = Path(tempfile.gettempdir()) if base is None else base
    host, removed = socket.gethostname(), []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SCRATCH_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        parts = entry.name.removeprefix(SCRATCH_PREFIX).rsplit("-", 3)
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
            continue
        if not process_alive(int(parts[1]), None if parts[2] == "0" else parts[2]):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


def make_scratch_dir() -> Path:
    """A new private scratch folder ``$TMPDIR/driveengine-scratch-<host>-<pid>-<start>-<rand>`` (those
    of dead workers of this host removed first)."""
    base = Path(tempfile.gettempdir())
    clean_dead_scratch(base)
    owner = f"{socket.gethostname()}-{os.getpid()}-{process_start(os.getpid()) or 0}"
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{owner}-", dir=base))


def sha256_object(fs: Any, path: str, size: int) -> str:
    """``"sha256:<hex>"`` of an object, read back from the store (streamed when big)."""
    h = hashlib.sha256()
    if size <= VERIFY_WHOLE_BYTES:
        h.update(fs.cat_file(path))
    else:
        with fs.open(path, "rb", block_size=8 * 2**20) as f:
            while block := f.read(8 * 2**20):
                h.update(block)
    return f"sha256:{h.hexdigest()}"


@dataclass
class _Upload:
    """One staged file or folder: its objects' keys -> (size, sha256) of the local file each came from."""

    final_rel: str
    is_tree: bool
    objects: dict[str, tuple[int, str]] = field(default_factory=dict)


class ObjectStoreLogOutput:
    """Local scratch, uploaded under per-attempt keys and read back to verify (see the module doc)."""

    def __init__(self, url: str) -> None:
        self.store = ObjectStore.open(url)
        self.attempt = new_attempt_id()
        self._scratch: Path | None = None
        self._staged: dict[str, Path] = {}
        self._uploads: dict[str, _Upload] = {}
        self._committed = False

    def stage(self, rel: str) -> Path:
        if self._scratch is None:
            self._scratch = make_scratch_dir()
        path = self._scratch / posixpath.basename(attempt_relpath(rel, self.attempt))
        self._staged[rel] = path
        return path

    def finish(self, rel: str) -> None:
        local = self._staged[rel]
        final_rel = attempt_relpath(rel, self.attempt)
        prefix = self.store.key(final_rel)
        if local.is_dir():
            files = {
                f"{prefix}/{p.relative_to(local).as_posix()}": p
                for p in sorted(local.rglob("*"))
                if p.is_file()
            }
        elif local.is_file():
            files = {prefix: local}
        else:
            raise CommitError(f"{local}: staged output of {rel} vanished before its upload")
        upload = _Upload(final_rel, local.is_dir())
        upload.objects = {key: (path.stat().st_size, sha256_file(path)) for key, path in files.items()}
        self._uploads[rel] = upload  # before the put: whatever part of it lands is removed on failure
        try:
            self.store.fs.put([str(p) for p in files.values()], list(files))
        except OSError as exc:
            raise CommitError(
                f"{self.store.url_of(final_rel)}: upload failed ({exc}); run again (committed logs are kept)"
            ) from None

    def _verify(self) -> None:
        """Every object of every upload exists, with its size and sha256, and no other is there."""
        fs = self.store.fs
        expected = {key: spec for up in self._uploads.values() for key, spec in up.objects.items()}
        found: dict[str, int] = {}
        for upload in self._uploads.values():
            prefix = self.store.key(upload.final_rel)
            fs.invalidate_cache(prefix)
            try:
                if upload.is_tree:
                    listing = fs.find(prefix, detail=True)
                    found.update(
                        {k: int(v["size"]) for k, v in listing.items() if v.get("type") != "directory"}
                    )
                else:
                    found[prefix] = int(fs.info(prefix)["size"])
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CommitError(
                    f"{self.store.url_of(upload.final_rel)}: cannot list the upload ({exc}); run again"
                ) from None
        problems = [
            f"{key}: missing" if key not in found else f"{key}: {found[key]} bytes, {size} written"
            for key, (size, _) in sorted(expected.items())
            if found.get(key) != size
        ]
        problems += [f"{key}: not written by this attempt" for key in sorted(set(found) - set(expected))]
        if not problems:
            keys = sorted(expected)
            try:
                with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
                    digests = list(pool.map(lambda k: sha256_object(fs, k, expected[k][0]), keys))
            except OSError as exc:
                raise CommitError(
                    f"{self.store.url}: cannot read back the upload of attempt {self.attempt} ({exc}); run again"
                ) from None
            problems = [
                f"{key}: sha256 {digest} read back, {expected[key][1]} written"
                for key, digest in zip(keys, digests, strict=True)
                if digest != expected[key][1]
            ]
        if problems:
            raise CommitError(
                f"{self.store.url}: the upload of attempt {self.attempt} does not read back as written "
                f"({len(problems)} object(s); first: {problems[0]}); the log is not committed, run again"
            )

    def commit(self, may_commit: Callable[[], bool] | None = None) -> CommittedFiles:
        if may_commit is not None and not may_commit():
            raise CommitError(
                f"{self.store.url}: {', '.join(sorted(self._staged))} not uploaded, the collect process is gone"
            )
        for rel in self._staged:
            if rel not in self._uploads:
                self.finish(rel)
        self._verify()
        checksums = {}
        for upload in self._uploads.values():
            prefix = self.store.key(upload.final_rel)
            if upload.is_tree:
                checksums[upload.final_rel] = tree_digest(
                    {key[len(prefix) + 1 :]: sha for key, (_, sha) in upload.objects.items()}
                )
            else:
                checksums[upload.final_rel] = upload.objects[prefix][1]
        self._committed = True
        return CommittedFiles({rel: up.final_rel for rel, up in self._uploads.items()}, checksums)

    def discard(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if not self._committed and self._uploads:
            keys = [self.store.key(up.final_rel) for up in self._uploads.values()]
            try:
                self.store.fs.rm(keys, recursive=True)
            except Exception:  # best effort: the client removes objects no entry names
                pass
        self._staged.clear()
        self._uploads.clear()


def log_output(split_location: str | os.PathLike[str]) -> LocalLogOutput | ObjectStoreLogOutput:
    """Where a worker writes a log of the split at ``split_location`` (a folder, or a URL)."""
    if is_remote(split_location):
        return ObjectStoreLogOutput(os.fspath(split_location))
    return LocalLogOutput(local_path(split_location))
