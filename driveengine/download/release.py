"""The OpenScene release manifest: which files make up a split, where they live, what is known about them.

The manifest is data (``release.json`` next to this module) so that a changed release means an edited
JSON file, not new code. A release file is named by its path inside the release exactly as on the
Hugging Face mirror (``openscene-v1.1/openscene_metadata_mini.tgz``); its URL is a mirror's prefix (or
``--base-url``) followed by that path.

Mirrors may name environment variables in the manifest's ``mirror_env`` entry: for the Hugging Face
mirror ``HF_ENDPOINT`` replaces ``https://huggingface.co`` in its URL (a proxy or a self-hosted
endpoint) and ``HF_TOKEN`` is sent as ``Authorization: Bearer <token>`` to that mirror only (never with
``--base-url``, another mirror, or to the host a redirect leads to).

Sizes: ``size`` with ``size_exact`` is verified exactly; a rounded figure (``size_exact`` false) is
verified within ``size_tolerance`` (per modality, else the manifest's, else 10 %).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from driveengine.download.errors import ReleaseError

#: Relative tolerance of a rounded manifest size (``size_exact`` false) when a download is verified.
DEFAULT_SIZE_TOLERANCE = 0.1


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
        extract_ratio: estimated extracted bytes / archive bytes (disk-space estimate, and the base of
            the download stage's default decompression-bomb limit).
        size_tolerance: relative tolerance of an inexact ``size`` when verifying a download.
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
    size_tolerance: float = DEFAULT_SIZE_TOLERANCE

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
            "size": _number(spec.get("size"), f"{split}.{modality}.size", integer=True),
            "size_exact": bool(spec.get("size_exact", False)),
            "extract_ratio": _number(
                spec.get("extract_ratio", 1.1), f"{split}.{modality}.extract_ratio", positive=True
            ),
            "size_tolerance": _number(
                spec.get("size_tolerance", manifest.get("size_tolerance", DEFAULT_SIZE_TOLERANCE)),
                f"{split}.{modality}.size_tolerance",
            ),
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


def _number(value: Any, where: str, integer: bool = False, positive: bool = False) -> Any:
    """A manifest number checked: ``None`` stays ``None``; else finite, >= 0 (> 0 when ``positive``),
    an integer when ``integer``.

    Raises:
        ReleaseError: naming the entry.
    """
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ReleaseError(
            f"release manifest: {where} = {value!r} is not {kind} {'> 0' if positive else '>= 0'}"
        )
    return int(value) if integer else float(value)


def _lookup(checksums: dict[str, str], name: str) -> str | None:
    value = checksums.get(name) or checksums.get(PurePosixPath(name).name)
    return value.lower() if value else None


def mirror_names(manifest: dict[str, Any] | None = None) -> list[str]:
    """Names of the known mirrors."""
    return list((manifest or load_manifest())["mirrors"])


@dataclass(frozen=True)
class MirrorSource:
    """Where the release files are fetched from.

    Attributes:
        base_url: URL prefix the release paths are appended to (ends with ``/``).
        mirror: the mirror's name, ``None`` for ``--base-url``.
        authorization: ``Authorization`` header value for requests under ``base_url`` (the Hugging
            Face token), else ``None``.
    """

    base_url: str
    mirror: str | None = None
    authorization: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The source in words, for messages: ``mirror huggingface (https://...)`` or the base URL."""
        return f"mirror {self.mirror} ({self.base_url})" if self.mirror else self.base_url


def resolve_source(
    split: str,
    mirror: str | None = None,
    base_url: str | None = None,
    manifest: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> MirrorSource:
    """Where to fetch ``split`` from: ``base_url`` (any ``http://``, ``https://`` or ``file://`` prefix,
    or a plain local folder) wins over ``mirror``; without either, the split's first mirror (the
    release default when it serves the split). The mirror's ``mirror_env`` variables (``HF_ENDPOINT``,
    ``HF_TOKEN``) are read from ``environ`` (default: the process environment).

    Raises:
        ReleaseError: unknown mirror, a mirror that does not serve the split, an unsupported URL, or a
            malformed endpoint/token variable.
    """
    manifest = manifest or load_manifest()
    if base_url:
        if "://" not in base_url:
            base_url = Path(base_url).resolve().as_uri()
        scheme = base_url.split("://", 1)[0].lower()
        if scheme not in ("http", "https", "file"):
            raise ReleaseError(f"--base-url {base_url!r}: only http://, https:// and file:// are supported")
        return MirrorSource(base_url if base_url.endswith("/") else base_url + "/")
    name = _mirror_for(split, mirror, manifest)
    url = manifest["mirrors"][name]
    url = url if url.endswith("/") else url + "/"
    env = manifest.get("mirror_env", {}).get(name)
    if not env:
        return MirrorSource(url, name)
    environ = os.environ if environ is None else environ
    endpoint = environ.get(env["endpoint_variable"], "").strip()
    if endpoint:
        url = _with_endpoint(url, env["default_endpoint"], endpoint, env["endpoint_variable"])
    token = environ.get(env["token_variable"], "").strip()
    if token and any(c in token for c in "\r\n\x00"):
        raise ReleaseError(
            f"{env['token_variable']}: the token holds a line break or NUL; set it to the token alone"
        )
    return MirrorSource(url, name, f"Bearer {token}" if token else None)


def _with_endpoint(url: str, default_endpoint: str, endpoint: str, variable: str) -> str:
    """``url`` with its ``default_endpoint`` prefix replaced by ``endpoint`` (from ``variable``)."""
    if not re.match(r"^https?://[^/\s]+", endpoint, re.IGNORECASE):
        raise ReleaseError(
            f"{variable}={endpoint!r}: not an http:// or https:// URL (e.g. https://hf-mirror.com)"
        )
    if not url.startswith(default_endpoint):
        raise ReleaseError(f"release manifest: mirror URL {url} does not start with {default_endpoint}")
    return endpoint.rstrip("/") + url[len(default_endpoint) :]


def resolve_base_url(
    split: str, mirror: str | None = None, base_url: str | None = None, manifest: dict[str, Any] | None = None
) -> str:
    """The URL prefix the release paths are appended to, always ending with ``/`` (see
    :func:`resolve_source`, of which this is the ``base_url``).

    Raises:
        ReleaseError: unknown mirror, a mirror that does not serve the split, or an unsupported URL.
    """
    return resolve_source(split, mirror, base_url, manifest).base_url


def _mirror_for(split: str, mirror: str | None, manifest: dict[str, Any]) -> str:
    """The mirror to use for ``split``: ``mirror`` when it serves it, else the default one."""
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
    return mirror


def url_for(base_url: str, file: ReleaseFile) -> str:
    """Full URL of ``file`` under ``base_url`` (a prefix ending with ``/``)."""
    return base_url + file.name
