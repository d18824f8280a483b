"""The dataset manifest: ``<out>/<split>/manifest.json``, the commit point of every log (DESIGN §3).

A log is visible to readers if and only if it has an entry here. Writers add an entry only after the
log's files are complete, fsynced and renamed into place; the manifest itself is replaced atomically
(write a temporary file, fsync, rename), so a crash leaves either the old or the new manifest.

In memory the manifest is typed: :class:`Manifest` (split-level), :class:`DatasetInfo` (what the split's
data is: source, cameras, class table, voxel grid), :class:`LogEntry` per committed log and its
:class:`SourceRef` (where the log came from and where its sensor blobs are). Nothing outside this
module reads or writes the JSON shape, which is (format version 2)::

    {
      "format": "driveengine", "format_version": 2, "split": "mini", "tool_version": "0.2.0",
      "dataset": {"name": "nuplan", "cameras": ["CAM_F0", ...], "classes": {...ClassTable...}},
      "grid": {...VoxelGrid.to_dict()...}, "classes": {"0": "vehicle", ...},
      "logs": {
        "<log_name>": {
          "frames": 40,                              # rows in meta/<log>.parquet = T of occ/<log>.zarr
          "meta": "meta/<log_name>.parquet",         # relative to the split folder
          "occ": "occ/<log_name>.zarr" | null,       # null when collected without labels
          "checksums": {"meta/<log>.parquet": "sha256:...", ...},
          "source": {"name": "nuplan", "path": "...", "blob_root": "...", "fingerprint": "..."},
          "config_hash": "...",                      # hash of every setting that changes the output
          "dropped": {"missing_lidar": 0, ...},      # frames dropped, by reason
          "committed_at": "2026-11-21T14:00:00Z",
          ...                                         # see LogEntry; unknown keys are kept
        }
      }
    }

Format version 1 manifests (nuPlan/OpenScene only) are read too: their entries say ``source.kind``
for the source name and may hold the blob root as a top-level ``sensor_root``; they have no
``dataset`` (nuPlan data, OpenScene's class table; the cameras are those of the frame shards).

**On object stores** (``s3://...``, any fsspec URL) the manifest is written with one put, which S3
and most object stores make atomic: readers see the old or the new object, never a mix. Storage options
(endpoint, credentials) come from fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL=...`` or
``FSSPEC_S3='{"endpoint_url": ...}'`` in the environment, ``~/.config/fsspec/``) and the backend's own
(``AWS_ACCESS_KEY_ID``, ...), or the ``storage_options`` argument.

**A manifest is input too.** :meth:`Manifest.from_json` checks the type of every field (a wrong one
is a :class:`ManifestError` naming the file and the field, e.g. ``logs["x"].frames``) and confines
every path it names (``meta``, ``occ``, the keys of ``checksums``) to the split folder: relative, POSIX,
no ``..`` part; log names are plain file names. A manifest that points at ``../../etc/passwd`` is
refused before anything opens it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from driveengine import __version__
from driveengine.errors import DriveEngineError
from driveengine.files import atomic_write_bytes
from driveengine.schemas import FORMAT_NAME, FORMAT_VERSION, GRID, OLDEST_FORMAT_VERSION, OPENSCENE_CLASSES
from driveengine.schemas.classes import ClassTable, class_table_from_record
from driveengine.schemas.grid import VoxelGrid

MANIFEST_NAME = "manifest.json"

#: A JSON value (statistics recorded for information only).
JsonValue = Any


class ManifestError(DriveEngineError):
    """A manifest is missing, unreadable, malformed, or of a format this version cannot read."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(path: str | os.PathLike[str], where: str, expected: str, value: object) -> NoReturn:
    raise ManifestError(
        f"{path}: {where} must be {expected}, got {_short(value)}; the manifest is damaged or was not "
        "written by DriveEngine (collect the split again)"
    )


def _confined(path: str | os.PathLike[str], where: str, value: object) -> str:
    """``value`` if it is a path inside the split folder (relative, POSIX, no ``..``), else ManifestError."""
    if not isinstance(value, str):
        _bad(path, where, "a path relative to the split folder", value)
    parts = PurePosixPath(value).parts
    if (
        not parts
        or value.startswith("/")
        or ".." in parts
        or "\\" in value
        or "\0" in value
        or parts == (".",)
    ):
        _bad(path, where, "a path inside the split folder (relative, no '..')", value)
    return value


def _str(path: str | os.PathLike[str], where: str, value: object, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        _bad(path, where, "a string", value)
    return value


def _int(path: str | os.PathLike[str], where: str, value: object, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        expected = {None: "an integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        _bad(path, where, expected, value)
    return value


def _object(path: str | os.PathLike[str], where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        _bad(path, where, "an object", value)
    return value


def check_log_name(path: str | os.PathLike[str], name: object) -> str:
    """``name`` if it is a plain file name (no ``/``, no ``..``), else :class:`ManifestError`."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        _bad(path, "a log name", "a plain file name (no '/', no '..')", name)
    return name


@dataclass(frozen=True)
class SourceRef:
    """Where a committed log came from.

    Attributes:
        name: the source's registry name (``nuplan``, ``openscene``, ...; see ``driveengine.sources``).
        path: the input the log was read from (a ``.db``, a ``.pkl``, a table folder...).
        blob_root: folder or URL the frame rows' sensor paths (``lidar_path``, ``cams.*.data_path``) are
            relative to; ``""`` when not recorded (old manifests).
        fingerprint: fingerprint of the inputs when the log was collected (a change redoes the log).
    """

    name: str
    path: str
    blob_root: str = ""
    fingerprint: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "path": self.path,
            "blob_root": self.blob_root,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(
        cls, data: object, path: str | os.PathLike[str], where: str, blob_root: str | None = None
    ) -> SourceRef:
        """Parse (and check) an entry's ``source``; format 1 says ``kind`` for ``name``."""
        d = _object(path, where, data)
        for key, value in d.items():
            if value is not None and not isinstance(value, str):
                _bad(path, f"{where}.{key}", "a string", value)
        return cls(
            name=d.get("name") or d.get("kind") or "",
            path=d.get("path") or "",
            blob_root=d.get("blob_root") or blob_root or "",
            fingerprint=d.get("fingerprint") or "",
        )


@dataclass(frozen=True)
class LogEntry:
    """One committed log (see the module doc for the JSON form).

    Attributes:
        frames: rows of ``meta/<log>.parquet`` (= T of ``occ/<log>.zarr``).
        meta: the frame shard, relative to the split folder.
        occ: the label group, relative to the split folder; None without labels.
        checksums: relative path -> ``"sha256:<hex>"`` of every committed file (a folder's is the tree hash).
        source: where the log came from.
        config_hash: hash of every setting that changes the output.
        dropped: frames dropped, by reason.
        key_frame_candidates: key frames before drops.
        log_name: the log's own name (e.g. nuPlan ``log.logfile``; the entry's key is the output name).
        first_timestamp_us, last_timestamp_us: first and last frame time, microseconds (None: no frames).
        labels: the label producer's statistics (JSON, informational), or None.
        notes: remarks of the reader and the frame selection.
        committed_at: UTC time of the commit, ISO 8601.
        extra: keys this version does not know (kept as they are).
    """

    frames: int
    meta: str
    occ: str | None
    checksums: dict[str, str]
    source: SourceRef
    config_hash: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    key_frame_candidates: int = 0
    log_name: str = ""
    first_timestamp_us: int | None = None
    last_timestamp_us: int | None = None
    labels: dict[str, JsonValue] | None = None
    notes: tuple[str, ...] = ()
    committed_at: str = ""
    extra: dict[str, JsonValue] = field(default_factory=dict)

    _KNOWN = (
        "frames", "meta", "occ", "checksums", "source", "config_hash", "dropped", "key_frame_candidates",
        "log_name", "first_timestamp", "last_timestamp", "labels", "notes", "committed_at", "sensor_root",
    )  # fmt: skip

    def to_json(self) -> dict[str, JsonValue]:
        return {
            **self.extra,
            "frames": self.frames,
            "meta": self.meta,
            "occ": self.occ,
            "checksums": dict(self.checksums),
            "source": self.source.to_json(),
            "config_hash": self.config_hash,
            "dropped": dict(sorted(self.dropped.items())),
            "key_frame_candidates": self.key_frame_candidates,
            "labels": self.labels,
            "log_name": self.log_name,
            "first_timestamp": self.first_timestamp_us,
            "last_timestamp": self.last_timestamp_us,
            "notes": list(self.notes),
            "committed_at": self.committed_at,
        }

    @classmethod
    def from_json(cls, data: object, path: str | os.PathLike[str], name: str) -> LogEntry:
        """Parse and check one ``logs`` entry: types, and paths confined to the split folder."""
        where = f"logs[{name!r}]"
        d = _object(path, where, data)
        checksums = _object(path, f"{where}.checksums", d.get("checksums", {}))
        for rel, digest in checksums.items():
            _confined(path, f"{where}.checksums key", rel)
            _str(path, f"{where}.checksums[{rel!r}]", digest)
        dropped = _object(path, f"{where}.dropped", d.get("dropped") or {})
        for reason, count in dropped.items():
            _int(path, f"{where}.dropped[{reason!r}]", count)
        labels = d.get("labels")
        if labels is not None:
            _object(path, f"{where}.labels", labels)
        notes = d.get("notes") or []
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            _bad(path, f"{where}.notes", "a list of strings", notes)
        timestamps = [d.get("first_timestamp"), d.get("last_timestamp")]
        for key, value in zip(("first_timestamp", "last_timestamp"), timestamps, strict=True):
            if value is not None:
                _int(path, f"{where}.{key}", value)
        sensor_root = d.get("sensor_root")  # format 1: a test fixture wrote the blob root here
        if sensor_root is not None:
            _str(path, f"{where}.sensor_root", sensor_root)
        return cls(
            frames=_int(path, f"{where}.frames", d.get("frames"), minimum=0),
            meta=_confined(path, f"{where}.meta", d.get("meta")),
            occ=None if d.get("occ") is None else _confined(path, f"{where}.occ", d["occ"]),
            checksums=dict(checksums),
            source=SourceRef.from_json(d.get("source") or {}, path, f"{where}.source", sensor_root),
            config_hash=_str(path, f"{where}.config_hash", d.get("config_hash"), default=""),
            dropped=dict(dropped),
            key_frame_candidates=_int(
                path, f"{where}.key_frame_candidates", d.get("key_frame_candidates", 0)
            ),
            log_name=_str(path, f"{where}.log_name", d.get("log_name"), default=""),
            first_timestamp_us=timestamps[0],
            last_timestamp_us=timestamps[1],
            labels=labels,
            notes=tuple(notes),
            committed_at=_str(path, f"{where}.committed_at", d.get("committed_at"), default=""),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )

    @property
    def files(self) -> list[str]:
        """The committed files and folders of the log, relative to the split folder."""
        return sorted(self.checksums)

    def with_blob_root(self, blob_root: str) -> LogEntry:
        """A copy whose source says its sensor blobs are under ``blob_root``."""
        return replace(self, source=replace(self.source, blob_root=blob_root))


@dataclass(frozen=True)
class DatasetInfo:
    """What a split's data is; the same for every log of the split.

    Attributes:
        name: the dataset (``nuplan``, ``nuscenes``, ...: the ``dataset`` of the sources that collect it;
            the nuPlan and OpenScene sources both collect ``nuplan`` data, and a split may mix them).
        cameras: the camera channels in the dataset's fixed order (the members of the frame rows'
            ``cams``); None in format 1 manifests (read them from a frame shard).
        classes: the class table of the labels.
        grid: the voxel grid of the labels.
    """

    name: str = "nuplan"
    cameras: tuple[str, ...] | None = None
    classes: ClassTable = OPENSCENE_CLASSES
    grid: VoxelGrid = GRID

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "name": self.name,
            "cameras": None if self.cameras is None else list(self.cameras),
            "classes": self.classes.to_dict(),
        }

    def conflicts(self, other: DatasetInfo) -> list[str]:
        """What differs between two datasets' name, cameras, classes or grid (empty: the same)."""
        out = []
        if self.name != other.name:
            out.append(f"dataset {self.name} vs {other.name}")
        if self.cameras is not None and other.cameras is not None and self.cameras != other.cameras:
            out.append(f"cameras {list(self.cameras)} vs {list(other.cameras)}")
        if self.classes != other.classes:
            out.append(f"class table {self.classes.name} vs {other.classes.name}")
        if self.grid != other.grid:
            out.append(f"grid {self.grid.describe()} vs {other.grid.describe()}")
        return out


@dataclass
class Manifest:
    """In-memory form of ``manifest.json`` for one split folder."""

    split: str
    logs: dict[str, LogEntry] = field(default_factory=dict)
    dataset: DatasetInfo = field(default_factory=DatasetInfo)
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__
    extra: dict[str, JsonValue] = field(default_factory=dict)

    @property
    def grid(self) -> VoxelGrid:
        """The voxel grid of the split's labels."""
        return self.dataset.grid

    @property
    def classes(self) -> ClassTable:
        """The class table of the split's labels."""
        return self.dataset.classes

    def to_json(self) -> dict[str, JsonValue]:
        return {
            **self.extra,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "split": self.split,
            "tool_version": __version__,
            "dataset": self.dataset.to_json(),
            "grid": self.dataset.grid.to_dict(),
            "classes": self.dataset.classes.id_names(),
            "logs": {name: self.logs[name].to_json() for name in sorted(self.logs)},
        }

    @classmethod
    def from_json(cls, data: object, path: str | os.PathLike[str] = MANIFEST_NAME) -> Manifest:
        """The manifest held by ``data`` (parsed JSON read from ``path``), validated (see the module doc).

        Raises:
            ManifestError: not a DriveEngine manifest, a format this version cannot read, a field of the
                wrong type, or a path that leaves the split folder; the message names ``path`` and the field.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ManifestError(f'{path}: not a DriveEngine manifest (no "format": "{FORMAT_NAME}")')
        version = data.get("format_version")
        if (
            not isinstance(version, int)
            or isinstance(version, bool)
            or not OLDEST_FORMAT_VERSION <= version <= FORMAT_VERSION
        ):
            raise ManifestError(
                f"{path}: format version {version!r}, this DriveEngine ({__version__}) reads "
                f"{OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}; upgrade DriveEngine or re-collect the split"
            )
        for key, kind, expected in (
            ("split", str, "a string"),
            ("tool_version", str, "a string"),
            ("grid", dict, "an object"),
            ("classes", dict, "an object"),
            ("dataset", dict, "an object"),
            ("logs", dict, "an object (log name -> entry)"),
        ):
            if key in data and not isinstance(data[key], kind):
                _bad(path, key, expected, data[key])
        logs = {
            check_log_name(path, name): LogEntry.from_json(entry, path, name)
            for name, entry in data.get("logs", {}).items()
        }
        known = {"format", "format_version", "split", "tool_version", "grid", "classes", "dataset", "logs"}
        return cls(
            split=data.get("split", ""),
            logs=logs,
            dataset=_dataset_info(data, path),
            format_version=version,
            tool_version=data.get("tool_version", ""),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _dataset_info(data: Mapping[str, Any], path: str | os.PathLike[str]) -> DatasetInfo:
    """The split-level :class:`DatasetInfo` of a manifest's JSON (format 1: derived, see the module doc)."""
    try:
        grid = VoxelGrid.from_dict(data["grid"]) if "grid" in data else GRID
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: malformed grid ({type(exc).__name__}: {exc})") from None
    dataset = data.get("dataset") or {}
    record = dataset.get("classes", data.get("classes"))
    try:
        classes = OPENSCENE_CLASSES if record is None else class_table_from_record(record)
    except ValueError as exc:
        raise ManifestError(f"{path}: malformed class table ({exc})") from None
    cameras = dataset.get("cameras")
    if cameras is not None and (
        not isinstance(cameras, list) or not cameras or not all(isinstance(c, str) and c for c in cameras)
    ):
        _bad(path, "dataset.cameras", "a list of camera channel names", cameras)
    name = dataset.get("name", "nuplan")  # format 1 held nuPlan data only
    return DatasetInfo(
        name=_str(path, "dataset.name", name),
        cameras=None if cameras is None else tuple(cameras),
        classes=classes,
        grid=grid,
    )


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an fsspec URL of a remote store (``s3://...``; ``file://`` is local)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike[str]) -> Path:
    """The local path of a location that is not remote (``file://`` stripped)."""
    return Path(os.fspath(location).removeprefix("file://"))


def join_location(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for local paths and URLs alike (always ``/`` in URLs)."""
    text = os.fspath(base)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(text, *parts)


def manifest_path(split_dir: str | os.PathLike[str]) -> Path:
    """Path of the manifest of a local split folder ``<out>/<split>``."""
    return Path(split_dir) / MANIFEST_NAME


def manifest_to_bytes(manifest: Manifest) -> bytes:
    """The JSON bytes :func:`save_manifest` writes."""
    return (json.dumps(manifest.to_json(), indent=1, sort_keys=False) + "\n").encode()


def manifest_from_bytes(data: bytes, path: str | os.PathLike[str]) -> Manifest:
    """The validated manifest held by the bytes ``data`` read from ``path``.

    Raises:
        ManifestError: not JSON, not a DriveEngine manifest, a newer format or a malformed field.
    """
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    return Manifest.from_json(parsed, path)


def remote_fs(location: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec file system of a URL and the URL's path in it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(location, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise ManifestError(f"{location}: no fsspec file system for this URL ({exc})") from None


def load_manifest(
    split_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Manifest:
    """Read ``<split_dir>/manifest.json`` (a local folder or an fsspec URL, see the module doc).

    Raises:
        ManifestError: the file is missing, not JSON, not a DriveEngine manifest, or of a newer format.
    """
    if is_remote(split_dir):
        url = join_location(split_dir, MANIFEST_NAME)
        fs, path = remote_fs(url, storage_options)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise ManifestError(
                f"{url}: no manifest; this location holds no collected split (run `driveengine collect` first)"
            ) from None
        except OSError as exc:
            raise ManifestError(f"{url}: unreadable manifest ({exc})") from None
        return manifest_from_bytes(data, url)
    path = manifest_path(local_path(split_dir))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest; this folder holds no collected split (run `driveengine collect` first)"
        ) from None
    except OSError as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    return manifest_from_bytes(data, path)


def load_or_create_manifest(
    split_dir: str | os.PathLike[str], split: str, storage_options: dict[str, Any] | None = None
) -> Manifest:
    """The existing manifest of ``split_dir`` (folder or URL), or a new empty one for ``split``."""
    if is_remote(split_dir):
        fs, path = remote_fs(join_location(split_dir, MANIFEST_NAME), storage_options)
        if not fs.exists(path):
            return Manifest(split=split)
        return load_manifest(split_dir, storage_options)
    if manifest_path(local_path(split_dir)).exists():
        return load_manifest(split_dir)
    return Manifest(split=split)


def save_manifest(
    split_dir: str | os.PathLike[str], manifest: Manifest, storage_options: dict[str, Any] | None = None
) -> None:
    """Replace ``<split_dir>/manifest.json`` atomically with ``manifest``.

    A local folder: temporary file, fsync, rename. An fsspec URL: one put of the whole object (no
    rename on object stores; a single put is atomic on S3). ``collect`` itself writes remote manifests
    through :class:`driveengine.store.commit.ObjectStoreSplit`, which also refuses to overwrite a
    manifest another process changed.
    """
    data = manifest_to_bytes(manifest)
    if is_remote(split_dir):
        fs, path = remote_fs(join_location(split_dir, MANIFEST_NAME), storage_options)
        fs.pipe_file(path, data)
        return
    atomic_write_bytes(manifest_path(local_path(split_dir)), data)
