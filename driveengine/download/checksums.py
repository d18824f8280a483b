"""Checksums: md5sum / sha256sum files, streaming hashers and fast whole-file hashing.

Hashes are computed while bytes arrive (:class:`StreamHasher`), so a download is never read twice; a
resumed download hashes its existing ``.part`` prefix once and then continues with the new bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from driveengine.download.errors import ChecksumFileError

#: Read size of whole-file hashing: large reads keep the hash, not the system calls, the bottleneck.
HASH_BUFFER_BYTES = 4 << 20

_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]{32}|[0-9a-fA-F]{64})\s[ *](?P<name>.+)$")
# BSD style: "MD5 (name) = hex"
_BSD = re.compile(r"^(?P<algo>MD5|SHA256) \((?P<name>.+)\) = (?P<hex>[0-9a-fA-F]+)$")
# NAVSIM's published style: "name hex"
_REVERSED = re.compile(r"^(?P<name>\S+)\s+(?P<hex>[0-9a-fA-F]{32}|[0-9a-fA-F]{64})$")


@dataclass
class Expected:
    """Expected digests of one file (lowercase hex; ``None`` where unknown)."""

    md5: str | None = None
    sha256: str | None = None


def parse_checksum_lines(lines: Iterable[str], source: str = "<checksums>") -> dict[str, Expected]:
    """Parse md5sum / sha256sum output into ``{name: Expected}``.

    Accepts GNU lines ``<hex>  <name>`` and ``<hex> *<name>`` (binary mode), BSD lines
    ``MD5 (<name>) = <hex>``, and ``<name> <hex>`` as NAVSIM publishes them. The algorithm follows from
    the digest's length (32 hex: MD5, 64 hex: SHA-256). Blank lines and ``#`` comments are ignored. Names
    are kept as written (relative paths with ``/``); :func:`lookup` also matches by base name.

    Raises:
        ChecksumFileError: a line that is none of the above, naming ``source`` and the line number.
    """
    table: dict[str, Expected] = {}
    for line_no, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line) or _BSD.match(line) or _REVERSED.match(line.strip())
        if not match:
            raise ChecksumFileError(source, line_no, f"cannot parse {line[:80]!r}")
        digest = match.group("hex").lower()
        name = match.group("name").strip()
        if name.startswith("./"):
            name = name[2:]
        entry = table.setdefault(name, Expected())
        if len(digest) == 32:
            entry.md5 = digest
        elif len(digest) == 64:
            entry.sha256 = digest
        else:
            raise ChecksumFileError(
                source, line_no, f"digest of {len(digest)} hex digits is neither MD5 nor SHA-256"
            )
    return table


def read_checksum_file(path: str | os.PathLike[str]) -> dict[str, Expected]:
    """Read an md5sum / sha256sum file (see :func:`parse_checksum_lines`)."""
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ChecksumFileError(path, 0, f"cannot read: {exc.strerror or exc}") from exc
    return parse_checksum_lines(text.splitlines(), str(path))


def lookup(table: dict[str, Expected], name: str) -> Expected | None:
    """Entry of ``name`` (a release path) in ``table``: by full path first, then by base name."""
    if name in table:
        return table[name]
    base = PurePosixPath(name).name
    if base in table:
        return table[base]
    for key, value in table.items():
        if PurePosixPath(key).name == base:
            return value
    return None


class StreamHasher:
    """MD5 (always) and SHA-256 (optional) of a byte stream fed in pieces.

    ``hashlib`` releases the GIL on large buffers, so feeding it from a writer thread overlaps hashing
    with network reads.
    """

    def __init__(self, sha256: bool = False) -> None:
        self.with_sha256 = sha256
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far."""
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha256 = hashlib.sha256() if self.with_sha256 else None
        self.nbytes = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes."""
        self._md5.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        self.nbytes += len(data)

    def update_from_file(self, path: str | os.PathLike[str], limit: int | None = None) -> int:
        """Feed the first ``limit`` bytes (all when ``None``) of a file; returns the bytes fed."""
        fed = 0
        buf = bytearray(HASH_BUFFER_BYTES)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while limit is None or fed < limit:
                want = len(buf) if limit is None else min(len(buf), limit - fed)
                n = f.readinto(view[:want])
                if not n:
                    break
                self.update(view[:n])
                fed += n
        return fed

    @property
    def md5(self) -> str:
        """MD5 of everything fed, lowercase hex."""
        return self._md5.hexdigest()

    @property
    def sha256(self) -> str | None:
        """SHA-256 of everything fed (``None`` when not requested)."""
        return self._sha256.hexdigest() if self._sha256 is not None else None


def md5_file(path: str | os.PathLike[str]) -> str:
    """MD5 of a whole file, lowercase hex (4 MiB unbuffered reads into one reused buffer)."""
    hasher = StreamHasher()
    hasher.update_from_file(path)
    return hasher.md5


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a whole file, lowercase hex."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def md5sum_line(digest: str, name: str) -> str:
    """One GNU md5sum line (text mode, two spaces), as ``md5sum -c`` reads it."""
    return f"{digest}  {name}"


def md5sum_files(paths: Iterable[str | os.PathLike[str]], jobs: int = 1) -> Iterable[tuple[str, str]]:
    """``(path, md5)`` of each file, in the given order; ``jobs`` > 1 hashes files in parallel threads."""
    paths = [os.fspath(p) for p in paths]
    if jobs <= 1 or len(paths) <= 1:
        for p in paths:
            yield p, md5_file(p)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        yield from zip(paths, pool.map(md5_file, paths), strict=True)
