"""What the download stage remembers under ``<root>/.driveengine/``: download records, extraction markers
and the file list of every extracted archive (so each blob can be traced back to its archive).

```
<root>/.driveengine/
  archives/<archive>.download.json   name, size, md5 (+ sha256), url, finished at: the verified download
  archives/<archive>.files.txt       one path per line (relative to <root>, '/'-separated): what it extracted
  archives/<archive>.extracted.json  the extraction marker, written last: name, files, bytes, md5
  checksums.md5                      md5sum lines of the downloaded archives (paths relative to <root>)
  staging/<archive>/                 extraction in progress (removed afterwards)
```
``<archive>`` is the archive's base name (unique in the release).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driveengine.files import atomic_write_bytes

STATE_DIR = ".driveengine"


def archives_dir(root: str | Path) -> Path:
    """``<root>/.driveengine/archives``."""
    return Path(root) / STATE_DIR / "archives"


def staging_dir(root: str | Path, archive_basename: str) -> Path:
    """``<root>/.driveengine/staging/<archive>``: where an archive is extracted before moving into place."""
    return Path(root) / STATE_DIR / "staging" / archive_basename


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class DownloadRecord:
    """A verified download: the archive at ``<root>/<name>`` had these size and digests."""

    name: str
    size: int
    md5: str
    sha256: str | None = None
    url: str = ""
    mtime_ns: int = 0
    finished: float = 0.0


def write_download_record(root: str | Path, record: DownloadRecord) -> None:
    """Store ``record`` atomically as ``archives/<archive>.download.json``."""
    path = archives_dir(root) / f"{Path(record.name).name}.download.json"
    atomic_write_bytes(path, json.dumps(record.__dict__, indent=1).encode())


def read_download_record(root: str | Path, archive_basename: str) -> DownloadRecord | None:
    """The download record of an archive, or ``None``."""
    data = _read_json(archives_dir(root) / f"{archive_basename}.download.json")
    if not data:
        return None
    try:
        return DownloadRecord(**data)
    except TypeError:
        return None


def all_download_records(root: str | Path) -> list[DownloadRecord]:
    """Every download record under ``root``, sorted by name."""
    out = []
    folder = archives_dir(root)
    if folder.is_dir():
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".download.json"):
                record = read_download_record(root, entry[: -len(".download.json")])
                if record:
                    out.append(record)
    return out


def write_checksums_file(root: str | Path) -> Path:
    """Write ``<root>/.driveengine/checksums.md5`` from the download records (``md5sum -c`` from ``root``)."""
    lines = [f"{r.md5}  {r.name}\n" for r in all_download_records(root)]
    path = Path(root) / STATE_DIR / "checksums.md5"
    atomic_write_bytes(path, "".join(lines).encode())
    return path


def write_extraction(
    root: str | Path, archive_name: str, files: list[str], nbytes: int, md5: str | None
) -> None:
    """Record what an archive extracted: the file list first, then the marker (the commit point)."""
    base = Path(archive_name).name
    folder = archives_dir(root)
    atomic_write_bytes(folder / f"{base}.files.txt", "".join(f"{f}\n" for f in sorted(files)).encode())
    marker = {
        "name": archive_name,
        "files": len(files),
        "bytes": nbytes,
        "md5": md5,
        "extracted": time.time(),
    }
    atomic_write_bytes(folder / f"{base}.extracted.json", json.dumps(marker, indent=1).encode())


def extraction_marker(root: str | Path, archive_basename: str) -> dict[str, Any] | None:
    """The extraction marker of an archive, or ``None`` when it was never (completely) extracted."""
    return _read_json(archives_dir(root) / f"{archive_basename}.extracted.json")


def extracted_files(root: str | Path, archive_basename: str) -> list[str]:
    """Paths (relative to ``root``) an archive extracted; empty when unknown."""
    path = archives_dir(root) / f"{archive_basename}.files.txt"
    try:
        return [line for line in path.read_text("utf-8").splitlines() if line]
    except OSError:
        return []


def missing_files(root: str | Path, paths: list[str]) -> list[str]:
    """Those of ``paths`` (relative to ``root``) that do not exist, with one directory listing per folder."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        head, _, tail = p.rpartition("/")
        by_dir[head].append(tail)
    missing = []
    root = Path(root)
    for folder, names in by_dir.items():
        try:
            present = set(os.listdir(root / folder if folder else root))
        except OSError:
            present = set()
        missing.extend(f"{folder}/{n}" if folder else n for n in names if n not in present)
    return missing


def extraction_complete(root: str | Path, archive_basename: str) -> bool:
    """The archive was extracted and every file it extracted is still there."""
    if extraction_marker(root, archive_basename) is None:
        return False
    return not missing_files(root, extracted_files(root, archive_basename))


def archive_index(root: str | Path) -> dict[str, str]:
    """``{extracted path relative to root: archive release name}`` over every recorded extraction."""
    index: dict[str, str] = {}
    folder = archives_dir(root)
    if not folder.is_dir():
        return index
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".extracted.json"):
            continue
        base = entry[: -len(".extracted.json")]
        marker = extraction_marker(root, base) or {}
        name = str(marker.get("name", base))
        for path in extracted_files(root, base):
            index[path] = name
    return index
