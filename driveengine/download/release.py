"""The OpenScene release manifest: which files make up a split, where they live, what is known about them.

The manifest is data (``release.json`` next to this module) so that a changed release means an edited
JSON file, not new code. A release file is named by its path inside the release exactly as on the
Hugging Face mirror (``openscene-v1.1/openscene_metadata_mini.tgz``); its URL is a mirror's prefix (or
``--base-url``) followed by that path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from driveengine.download.errors import ReleaseError


@dataclass(frozen=True)
class ReleaseFile:
    """One archive of the release.

    Attributes:
        name: path inside the release, e.g. ``openscene-v1.1/openscene_metadata_mini.tgz``.
        split: split it belongs to (``mini``, ``trainval``, ...).
        modality: ``metadata``, ``camera``, ``lidar``, ``sensor`` (private test sets), ...
        shard: shard index for sharded modalities, else ``None``.
        size: size in bytes when known, else ``None``.
        size_exact: whether ``size`` is exact (usable to verify the file) or only a rounded figure.
        md5: expected MD5 (lowercase hex) when published.
        sha256: expected SHA-256 (lowercase hex) when given.
        extract_ratio: estimated extracted bytes / archive bytes (disk-space estimate only).
    """

    name: str
    split: str
    modality: str
    shard: int | None = None
    size: int | None = None
    size_exact: bool = False
    md5: str | None = None
    sha256: str | None = None
    extract_ratio: float = 1.1

    @property
    def basename(self) -> str:
        """The archive's file name without folders."""
        return PurePosixPath(self.name).name

    def local_path(self, root: str | Path) -> Path:
        """Where the archive is stored under the download folder ``root``."""
        return Path(root).joinpath(*PurePosixPath(self.name).parts)


@lru_cache(maxsize=4)
def load_manifest(path: str | None = None) -> dict[str, Any]:
    """Load the release manifest (the packaged ``release.json`` unless ``path`` is given)."""
    if path is None:
        text = resources.files("driveengine.download").joinpath("release.json").read_text("utf-8")
        where = "driveengine/download/release.json"
    else:
        text = Path(path).read_text("utf-8")
        where = path
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"{where}: release manifest is not valid JSON: {exc}") from exc
    for key in ("mirrors", "splits", "default_mirror"):
        if key not in manifest:
            raise ReleaseError(f"{where}: release manifest lacks the {key!r} entry")
    return manifest


def split_names(manifest: dict[str, Any] | None = None) -> list[str]:
    """Names of the splits the release has."""
    return list((manifest or load_manifest())["splits"])


def modality_names(split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Modalities of ``split`` in manifest order."""
    return list(_split_entry(split, manifest or load_manifest())["modalities"])


def _split_entry(split: str, manifest: dict[str, Any]) -> dict[str, Any]:
    try:
        return manifest["splits"][split]
    except KeyError:
        raise ReleaseError(
            f"unknown split {split!r}; the release has: {', '.join(manifest['splits'])}"
        ) from None


def parse_shards(spec: str | None) -> list[int] | None:
    """Parse a shard selection such as ``"0-3,7,10-11"`` into sorted unique indices (``None``: all).

    Raises:
        ReleaseError: on malformed input.
    """
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ReleaseError(f"--shards {spec!r}: {part!r} is not a number or a range like 0-3")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ReleaseError(f"--shards {spec!r}: range {part!r} is empty (write low-high)")
        out.update(range(lo, hi + 1))
    return sorted(out)


def format_shards(shards: list[int]) -> str:
    """Inverse of :func:`parse_shards`: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    values = sorted(set(shards))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def select_files(
    split: str,
    modalities: list[str] | None = None,
    shards: list[int] | None = None,
    manifest: dict[str, Any] | None = None,
) -> list[ReleaseFile]:
    """The release files of ``split`` for the given modalities (all when ``None``) and shard indices.

    ``shards`` restricts sharded modalities only (it is ignored when none is selected); unsharded
    archives (metadata) are always included when their modality is selected.

    Raises:
        ReleaseError: unknown split or modality, or a shard index outside every selected range.
    """
    manifest = manifest or load_manifest()
    entry = _split_entry(split, manifest)
    available = entry["modalities"]
    chosen = list(available) if not modalities else modalities
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ReleaseError(
            f"split {split!r} has no modality {', '.join(map(repr, unknown))}; it has: {', '.join(available)}"
        )
    checksums: dict[str, str] = manifest.get("md5", {})
    files: list[ReleaseFile] = []
    used_shards: set[int] = set()
    sharded_ranges: list[tuple[str, int, int]] = []
    for modality in chosen:
        spec = available[modality]
        common = {
            "split": split,
            "modality": modality,
            "size": spec.get("size"),
            "size_exact": bool(spec.get("size_exact", False)),
            "extract_ratio": float(spec.get("extract_ratio", 1.1)),
        }
        if "shards" not in spec:
            name = spec["path"]
            files.append(ReleaseFile(name=name, md5=_lookup(checksums, name), **common))
            continue
        lo, hi = spec["shards"]
        sharded_ranges.append((modality, lo, hi))
        indices = range(lo, hi + 1) if shards is None else [s for s in shards if lo <= s <= hi]
        for index in indices:
            used_shards.add(index)
            name = spec["path"].format(shard=index)
            files.append(ReleaseFile(name=name, shard=index, md5=_lookup(checksums, name), **common))
    if shards is not None and sharded_ranges:
        outside = sorted(set(shards) - used_shards)
        if outside:
            ranges = "; ".join(f"{m}: {lo}-{hi}" for m, lo, hi in sharded_ranges)
            raise ReleaseError(
                f"split {split!r}: shard(s) {format_shards(outside)} do not exist; shards are {ranges}"
            )
    return files


def _lookup(checksums: dict[str, str], name: str) -> str | None:
    value = checksums.get(name) or checksums.get(PurePosixPath(name).name)
    return value.lower() if value else None


def mirror_names(manifest: dict[str, Any] | None = None) -> list[str]:
    """Names of the known mirrors."""
    return list((manifest or load_manifest())["mirrors"])


def resolve_base_url(
    split: str, mirror: str | None = None, base_url: str | None = None, manifest: dict[str, Any] | None = None
) -> str:
    """The URL prefix the release paths are appended to, always ending with ``/``.

    ``base_url`` (any ``http://``, ``https://`` or ``file://`` prefix, or a plain local folder) wins over
    ``mirror``; without either, the split's first mirror (the release default when it serves the split).

    Raises:
        ReleaseError: unknown mirror, a mirror that does not serve the split, or an unsupported URL.
    """
    manifest = manifest or load_manifest()
    if base_url:
        if "://" not in base_url:
            base_url = Path(base_url).resolve().as_uri()
        scheme = base_url.split("://", 1)[0].lower()
        if scheme not in ("http", "https", "file"):
            raise ReleaseError(f"--base-url {base_url!r}: only http://, https:// and file:// are supported")
        return base_url if base_url.endswith("/") else base_url + "/"
    entry = _split_entry(split, manifest)
    serving = entry.get("mirrors") or list(manifest["mirrors"])
    if mirror is None:
        mirror = manifest["default_mirror"] if manifest["default_mirror"] in serving else serving[0]
    if mirror not in manifest["mirrors"]:
        raise ReleaseError(f"unknown mirror {mirror!r}; known mirrors: {', '.join(manifest['mirrors'])}")
    if mirror not in serving:
        raise ReleaseError(
            f"mirror {mirror!r} does not serve split {split!r}; it is on: {', '.join(serving)}"
        )
    url = manifest["mirrors"][mirror]
    return url if url.endswith("/") else url + "/"


def url_for(base_url: str, file: ReleaseFile) -> str:
    """Full URL of ``file`` under ``base_url`` (a prefix ending with ``/``)."""
    return base_url + file.name
