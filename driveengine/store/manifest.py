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
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driveengine import __version__
from driveengine.errors import DriveEngineError
from driveengine.schemas import CLASS_NAMES, FORMAT_NAME, FORMAT_VERSION, GRID

MANIFEST_NAME = "manifest.json"


class ManifestError(DriveEngineError):
    """A manifest is missing, unreadable, or of a format this version cannot read."""


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
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ManifestError(f'{path}: not a DriveEngine manifest (no "format": "{FORMAT_NAME}")')
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ManifestError(
                f"{path}: format version {version!r}, this DriveEngine ({__version__}) reads up to "
                f"{FORMAT_VERSION}; upgrade DriveEngine or re-collect the split"
            )
        known = {"format", "format_version", "split", "tool_version", "grid", "classes", "logs"}
        return cls(
            split=str(data.get("split", "")),
            logs=dict(data.get("logs", {})),
            format_version=version,
            tool_version=str(data.get("tool_version", "")),
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
