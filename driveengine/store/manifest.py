"""The dataset manifest: ``<out>/<split>/manifest.json``, the commit point of every log (DESIGN §3).

A log is visible to readers if and only if it has an entry here. Writers add an entry only after the
log's files are complete, fsynced and renamed into place; the manifest itself is replaced atomically
(write a temporary file, fsync, rename), so a crash leaves either the old or the new manifest.

Shape of the JSON file::

    {
      "format": "driveengine", "format_version": 1, "split": "mini", "tool_version": "0.1.0",
      "grid": {...VoxelGrid.to_dict()...}, "classes": {"0": "vehicle", ...},
      "logs": {
        "<log_name>": {
          "frames": 40,                              # rows in meta/<log>.parquet = T of occ/<log>.zarr
          "meta": "meta/<log_name>.parquet",         # relative to the split folder
          "occ": "occ/<log_name>.zarr" | null,       # null when collected with --no-labels
          "checksums": {"meta/<log>.parquet": "sha256:...", ...},
          "source": {"kind": "nuplan", "path": "...", "fingerprint": "..."},
          "config_hash": "...",                      # hash of every setting that changes the output
          "dropped": {"missing_lidar": 0, ...},      # frames dropped, by reason
          "committed_at": "2026-11-21T14:00:00Z",
          ...                                         # writers may add keys; readers ignore unknown keys
        }
      }
    }

**A manifest is input too.** :meth:`Manifest.from_json` checks the type of every field readers use
(a wrong one is a :class:`ManifestError` naming the file and the field, e.g. ``logs["x"].frames``) and
confines every path it names (``meta``, ``occ``, the keys of ``checksums``) to the split folder:
relative, POSIX, no ``..`` part; log names are plain file names. A manifest that points at
``../../etc/passwd`` is refused before anything opens it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from driveengine import __version__
from driveengine.errors import DriveEngineError
from driveengine.schemas import CLASS_NAMES, FORMAT_NAME, FORMAT_VERSION, GRID

MANIFEST_NAME = "manifest.json"
#: Names of :func:`atomic_write_bytes`' temporaries: ``.<name>.<12 hex>.tmp``.
ATOMIC_TMP_RE = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


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


def _check_entry(path: str | os.PathLike[str], name: object, entry: object) -> None:
    """Check one ``logs`` entry: types of the fields readers use, paths confined to the split folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        _bad(path, "a log name", "a plain file name (no '/', no '..')", name)
    where = f"logs[{name!r}]"
    if not isinstance(entry, dict):
        _bad(path, where, "an object", entry)
    frames = entry.get("frames")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 0:
        _bad(path, f"{where}.frames", "a non-negative integer", frames)
    _confined(path, f"{where}.meta", entry.get("meta"))
    if entry.get("occ") is not None:
        _confined(path, f"{where}.occ", entry["occ"])
    checksums = entry.get("checksums", {})
    if not isinstance(checksums, dict):
        _bad(path, f"{where}.checksums", "an object", checksums)
    for rel, digest in checksums.items():
        _confined(path, f"{where}.checksums key", rel)
        if not isinstance(digest, str):
            _bad(path, f"{where}.checksums[{rel!r}]", "a string", digest)
    for key in ("source", "dropped", "labels"):
        if entry.get(key) is not None and not isinstance(entry[key], dict):
            _bad(path, f"{where}.{key}", "an object", entry[key])
    for key, value in (entry.get("source") or {}).items():
        if value is not None and not isinstance(value, str):
            _bad(path, f"{where}.source.{key}", "a string", value)
    for reason, count in (entry.get("dropped") or {}).items():
        if not isinstance(count, int) or isinstance(count, bool):
            _bad(path, f"{where}.dropped[{reason!r}]", "an integer", count)
    for key in ("config_hash", "sensor_root"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            _bad(path, f"{where}.{key}", "a string", entry[key])


@dataclass
class Manifest:
    """In-memory form of ``manifest.json`` for one split folder."""

    split: str
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__
    grid: dict[str, Any] = field(default_factory=GRID.to_dict)
    classes: dict[str, str] = field(default_factory=lambda: {str(k): v for k, v in CLASS_NAMES.items()})
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "split": self.split,
            "tool_version": self.tool_version,
            "grid": self.grid,
            "classes": self.classes,
            "logs": {name: self.logs[name] for name in sorted(self.logs)},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str | os.PathLike[str] = MANIFEST_NAME) -> Manifest:
        """The manifest held by ``data`` (parsed JSON read from ``path``), validated (see the module doc).

        Raises:
            ManifestError: not a DriveEngine manifest, a newer format, a field of the wrong type, or a
                path that leaves the split folder; the message names ``path`` and the field.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ManifestError(f'{path}: not a DriveEngine manifest (no "format": "{FORMAT_NAME}")')
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise ManifestError(
                f"{path}: format version {version!r}, this DriveEngine ({__version__}) reads up to "
                f"{FORMAT_VERSION}; upgrade DriveEngine or re-collect the split"
            )
        for key, kind, expected in (
            ("split", str, "a string"),
            ("tool_version", str, "a string"),
            ("grid", dict, "an object"),
            ("classes", dict, "an object"),
            ("logs", dict, "an object (log name -> entry)"),
        ):
            if key in data and not isinstance(data[key], kind):
                _bad(path, key, expected, data[key])
        logs = data.get("logs", {})
        for name, entry in logs.items():
            _check_entry(path, name, entry)
        known = {"format", "format_version", "split", "tool_version", "grid", "classes", "logs"}
        return cls(
            split=data.get("split", ""),
            logs=dict(logs),
            format_version=version,
            tool_version=data.get("tool_version", ""),
            grid=dict(data.get("grid", GRID.to_dict())),
            classes=dict(data.get("classes", {})),
            extra={k: v for k, v in data.items() if k not in known},
        )


def manifest_path(split_dir: str | os.PathLike[str]) -> Path:
    """Path of the manifest of a split folder ``<out>/<split>``."""
    return Path(split_dir) / MANIFEST_NAME


def load_manifest(split_dir: str | os.PathLike[str]) -> Manifest:
    """Read ``<split_dir>/manifest.json``.

    Raises:
        ManifestError: the file is missing, not JSON, not a DriveEngine manifest, or of a newer format.
    """
    path = manifest_path(split_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest; this folder holds no collected split (run `driveengine collect` first)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    return Manifest.from_json(data, path)


def load_or_create_manifest(split_dir: str | os.PathLike[str], split: str) -> Manifest:
    """The existing manifest of ``split_dir``, or a new empty one for ``split``."""
    if manifest_path(split_dir).exists():
        return load_manifest(split_dir)
    return Manifest(split=split)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it survive a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open with 0o666 lets the umask decide the mode (mkstemp would force 0600 on shared datasets).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_manifest(split_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Replace ``<split_dir>/manifest.json`` atomically with ``manifest``."""
    text = json.dumps(manifest.to_json(), indent=1, sort_keys=False) + "\n"
    atomic_write_bytes(manifest_path(split_dir), text.encode())
