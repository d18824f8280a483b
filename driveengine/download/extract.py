"""Safe, all-or-nothing extraction of release archives (``.tgz``, ``.tar.gz``, ``.tar.xz``, ...).

The archive is read as a stream and every member is checked and written by this module, not by
``tarfile.extractall``: its ``data`` filter is defeated on Pythons older than 3.11.13 / 3.12.11 by a
symlink chain longer than ``PATH_MAX`` (CVE-2025-4517), and the project allows Python >= 3.11. The rules:

- only regular files and folders are extracted; symbolic links, hard links, devices and FIFOs are
  refused (release archives hold none), so the extracted tree holds no link for a later member to
  follow;
- a member name must be a relative path without ``..`` (absolute names and Windows drive names are
  refused), and the first folder must not be ``.driveengine`` (DriveEngine's own records under the
  download folder: a forged extraction marker would make a later download skip the archive);
- every written path is resolved (:func:`os.path.realpath`) and must lie inside the staging folder;
  files are opened with ``O_NOFOLLOW``;
- decompression-bomb guard: the extracted bytes (each member counted as at least one 512-byte tar
  block) may not exceed ``max_ratio`` x the archive's size (at least :data:`MIN_EXTRACT_ALLOWANCE_BYTES`);
  a member's declared size is checked before its first byte is written.

The whole archive is decompressed into a staging folder first, ``<root>/.driveengine/staging/<archive>``
(this is also the test by full decompression: a truncated or corrupt archive fails there). Only when
every member passed are the files moved (renamed) into place, their list recorded and the extraction
marker written (see :mod:`driveengine.download.state`). A refused, corrupt or failing archive raises
:class:`~driveengine.download.errors.ArchiveError` (:class:`~driveengine.download.errors.UnsafeArchiveError`
for refusals and bombs) naming the archive and the member, and leaves nothing of itself behind.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from driveengine.download.errors import ArchiveError, UnsafeArchiveError, shorten
from driveengine.download.state import STATE_DIR, staging_dir, write_extraction

#: Default limit of extracted bytes / archive bytes (the release's archives expand by 1.05-3, see the
#: ``extract_ratio`` entries of ``release.json``; the download stage derives its own default from them).
DEFAULT_MAX_EXTRACT_RATIO = 20.0

#: Bytes every archive may extract whatever its ratio (tiny archives of small text files compress far
#: better than the release's archives do).
MIN_EXTRACT_ALLOWANCE_BYTES = 1 << 20

#: Each member costs at least one tar block in the bomb budget (empty files cost inodes, not bytes).
_MEMBER_COST_BYTES = tarfile.BLOCKSIZE

_COPY_BYTES = 1 << 20


@dataclass
class ExtractResult:
    """What :func:`extract_archive` did: ``files`` (relative to the root, '/'-separated) and their bytes."""

    archive: Path
    files: list[str]
    nbytes: int


#: Errors that mean the archive's bytes are bad (as opposed to a failure to write the output).
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def _decompressed(archive: Path) -> BinaryIO:
    """The archive's decompressed byte stream, chosen by magic bytes (gzip, bzip2, xz, or plain tar).

    Python's decompressors check the stream's end marker and checksum (gzip: CRC-32 and length), which
    tarfile alone does not: a gzip file cut at a member boundary would otherwise look complete.
    """
    with open(archive, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(archive, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(archive, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(archive, "rb")
    return open(archive, "rb")  # closed by the caller


def _drain(stream: BinaryIO) -> None:
    """Read ``stream`` to its end, so that the decompressor verifies its end marker and checksum."""
    while stream.read(1 << 20):
        pass


def extract_limit_bytes(archive_bytes: int, max_ratio: float) -> int:
    """Most bytes an archive of ``archive_bytes`` may extract: ``max_ratio`` x its size, at least
    :data:`MIN_EXTRACT_ALLOWANCE_BYTES`."""
    if not math.isfinite(max_ratio) or max_ratio <= 0:
        raise ValueError(f"max_ratio must be a positive finite number, got {max_ratio!r}")
    return max(MIN_EXTRACT_ALLOWANCE_BYTES, math.ceil(max_ratio * archive_bytes))


# -- member checks ----------------------------------------------------------------------------------


def _unsafe(archive: Path, member: tarfile.TarInfo, reason: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(archive, f"unsafe member refused: {reason}; nothing was extracted", member.name)


def relative_path_from_member(archive: Path, member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's path relative to the output folder, or ``None`` for the archive's root (``./``).

    Raises:
        UnsafeArchiveError: an absolute name, a ``..`` component, or a name under ``.driveengine/``.
    """
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _unsafe(archive, member, "absolute path (it would write outside the output folder)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(archive, member, "'..' in the path (it would write outside the output folder)")
    if not parts:
        return None
    if parts[0].casefold() == STATE_DIR.casefold():
        raise _unsafe(
            archive, member, f"{STATE_DIR}/ is reserved for DriveEngine's own records (a forged record?)"
        )
    return PurePosixPath(*parts)


def _check_member_type(archive: Path, member: tarfile.TarInfo) -> None:
    """Only regular files and folders: links, devices and FIFOs are refused."""
    if member.isreg() or member.isdir():
        return
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        target = shorten(member.linkname, 60)
        where = "an absolute path" if member.linkname.startswith(("/", "\\")) else repr(target)
        raise _unsafe(
            archive,
            member,
            f"{kind} to {where}: release archives hold no links, and a link can lead a later member "
            "outside the output folder",
        )
    kind = "device file" if member.ischr() or member.isblk() else "FIFO" if member.isfifo() else "member type"
    raise _unsafe(archive, member, f"{kind} (release archives hold only files and folders)")


def _inside(folder_real: str, path: Path) -> bool:
    """``path`` resolves (following any link) to a location inside ``folder_real`` (already resolved)."""
    resolved = os.path.realpath(path)
    return resolved.startswith(folder_real + os.sep)


class _Budget:
    """Counts extracted bytes against the decompression-bomb limit."""

    def __init__(self, archive: Path, limit_bytes: int, max_ratio: float) -> None:
        self.archive = archive
        self.limit = limit_bytes
        self.ratio = max_ratio
        self.used = 0

    def spend(self, nbytes: int, member: tarfile.TarInfo) -> None:
        """Add ``nbytes``; raises :class:`UnsafeArchiveError` past the limit."""
        self.used += nbytes
        if self.used > self.limit:
            raise UnsafeArchiveError(
                self.archive,
                f"expands past the extraction limit of {self.limit:,} bytes ({self.ratio:g} x the archive's "
                f"{self.archive.stat().st_size:,} bytes, at least {MIN_EXTRACT_ALLOWANCE_BYTES:,}): a "
                "decompression bomb? nothing was extracted (a genuine archive: raise --max-extract-ratio)",
                member.name,
            )


# -- extraction -------------------------------------------------------------------------------------


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, budget: _Budget) -> None:
    """Copy a regular member's bytes to ``target`` (never through a link), counting them in ``budget``."""
    budget.spend(max(0, member.size), member)  # the declared size: refused before the first byte
    declared = max(0, member.size)
    source = tar.extractfile(member)
    mode = 0o755 if member.mode & 0o100 else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    with os.fdopen(os.open(target, flags, mode), "wb") as dst:
        written = 0
        if source is not None:
            while chunk := source.read(_COPY_BYTES):
                written += len(chunk)
                if written > declared:  # more than declared (sparse maps): count the excess too
                    budget.spend(len(chunk), member)
                dst.write(chunk)
    try:
        os.utime(target, (member.mtime, member.mtime))
    except (OverflowError, ValueError, OSError):
        pass  # a nonsensical timestamp is not worth failing the archive for


def _extract_to_staging(archive: Path, staging: Path, limit_bytes: int, max_ratio: float) -> None:
    """Check and write every member of ``archive`` under ``staging`` (see the module docstring)."""
    staging_real = os.path.realpath(staging)
    budget = _Budget(archive, limit_bytes, max_ratio)
    with _decompressed(archive) as raw:
        with tarfile.open(fileobj=raw, mode="r|", bufsize=1 << 20) as tar:
            for member in tar:
                rel = relative_path_from_member(archive, member)
                _check_member_type(archive, member)
                budget.spend(_MEMBER_COST_BYTES, member)
                if rel is None:
                    continue
                target = staging.joinpath(*rel.parts)
                if not _inside(staging_real, target):
                    raise _unsafe(archive, member, "the path resolves outside the output folder")
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_file(tar, member, target, budget)
        _drain(raw)


def extract_archive(
    archive: str | Path,
    root: str | Path,
    name: str | None = None,
    md5: str | None = None,
    max_ratio: float = DEFAULT_MAX_EXTRACT_RATIO,
) -> ExtractResult:
    """Test and extract ``archive`` into ``root`` (all or nothing) and record what it extracted.

    Args:
        archive: the archive file.
        root: the target tree; OpenScene archives hold ``openscene-v1.1/...`` paths, so ``root`` is the
            download folder.
        name: the archive's release name for the records (default: its file name).
        md5: the archive's verified MD5, stored in the marker.
        max_ratio: decompression-bomb guard: extraction stops when the extracted bytes exceed
            :func:`extract_limit_bytes` of the archive's size and this ratio.

    Returns:
        The extracted files (relative to ``root``) and their total size in bytes.

    Raises:
        UnsafeArchiveError: a link, device, absolute or ``..`` path, a ``.driveengine/`` member, or more
            bytes than the limit.
        ArchiveError: corrupt or truncated archive, or a write failure. Nothing of the archive is left
            in ``root`` in either case.
    """
    archive = Path(archive)
    root = Path(root)
    name = name or archive.name
    limit = extract_limit_bytes(archive.stat().st_size, max_ratio)
    staging = staging_dir(root, archive.name)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        try:
            _extract_to_staging(archive, staging, limit, max_ratio)
        except ArchiveError:
            raise
        except _CORRUPT as exc:
            raise ArchiveError(
                archive,
                f"corrupt or truncated archive ({exc}); nothing was extracted; delete it and download it again",
            ) from None
        except OSError as exc:
            raise ArchiveError(
                archive, f"cannot extract: {shorten(str(exc), 200)}; nothing was extracted"
            ) from None
        try:
            files, nbytes = _move_into_place(staging, root)
        except OSError as exc:
            raise ArchiveError(
                archive,
                f"cannot move the extracted files into place: {shorten(str(exc), 200)}; nothing was kept",
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_extraction(root, name, files, nbytes, md5)
    return ExtractResult(archive=archive, files=files, nbytes=nbytes)


def _move_into_place(staging: Path, root: Path) -> tuple[list[str], int]:
    """Rename every file of ``staging`` to the same relative path under ``root``.

    The staging tree holds only folders and regular files (see :func:`_extract_to_staging`). On a
    failure the files moved so far and the folders created are removed again, and the error re-raised.
    """
    files: list[str] = []
    moved: list[Path] = []
    created: list[Path] = []
    nbytes = 0
    try:
        for dirpath, _dirnames, filenames in os.walk(staging):
            rel = os.path.relpath(dirpath, staging)
            target = root if rel == "." else root / rel
            if not target.is_dir():
                target.mkdir(parents=True)
                created.append(target)
            for fname in filenames:
                src = os.path.join(dirpath, fname)
                nbytes += os.lstat(src).st_size
                os.replace(src, target / fname)
                moved.append(target / fname)
                files.append(fname if rel == "." else f"{Path(rel).as_posix()}/{fname}")
    except OSError:
        for path in reversed(moved):
            path.unlink(missing_ok=True)
        for folder in reversed(created):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return files, nbytes


def test_archive(archive: str | Path) -> int:
    """Decompress ``archive`` completely without writing anything; returns the number of members.

    Raises:
        ArchiveError: corrupt or truncated.
    """
    archive = Path(archive)
    count = 0
    try:
        with _decompressed(archive) as raw:
            with tarfile.open(fileobj=raw, mode="r|", bufsize=1 << 20) as tar:
                for member in tar:
                    count += 1
                    if member.isfile():
                        f = tar.extractfile(member)
                        if f is not None:
                            _drain(f)  # type: ignore[arg-type]
            _drain(raw)
    except (*_CORRUPT, OSError) as exc:
        raise ArchiveError(archive, f"corrupt or truncated archive ({exc}); download it again") from None
    return count


test_archive.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
