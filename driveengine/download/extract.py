"""Safe, all-or-nothing extraction of release archives (``.tgz``, ``.tar.gz``, ``.tar.xz``, ...).

An archive is decompressed completely into a staging folder first (this is the test by full
decompression: a truncated or corrupt archive fails here and nothing reaches the target tree), with
tarfile's ``data`` filter plus a rejection of absolute member names, so absolute paths, ``..``, links
leaving the tree and device files raise :class:`~driveengine.download.errors.ArchiveError` naming the
archive and the member. Only then are the files moved (renamed) into place, their list recorded and
the extraction marker written (see :mod:`driveengine.download.state`).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from driveengine.download.errors import ArchiveError
from driveengine.download.state import staging_dir, write_extraction


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


def _strict_data_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter, and absolute member names rejected instead of made relative."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest_path)


def extract_archive(
    archive: str | Path, root: str | Path, name: str | None = None, md5: str | None = None
) -> ExtractResult:
    """Test and extract ``archive`` into ``root`` (all or nothing) and record what it extracted.

    Args:
        archive: the archive file.
        root: the target tree; OpenScene archives hold ``openscene-v1.1/...`` paths, so ``root`` is the
            download folder.
        name: the archive's release name for the records (default: its file name).
        md5: the archive's verified MD5, stored in the marker.

    Returns:
        The extracted files (relative to ``root``) and their total size in bytes.

    Raises:
        ArchiveError: corrupt or truncated archive, unsafe member, or a write failure; nothing of the
            archive is left in ``root`` then.
    """
    archive = Path(archive)
    root = Path(root)
    name = name or archive.name
    staging = staging_dir(root, archive.name)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        try:
            with _decompressed(archive) as raw:
                with tarfile.open(fileobj=raw, mode="r|", bufsize=1 << 20) as tar:
                    tar.extractall(staging, filter=_strict_data_filter)
                _drain(raw)
        except tarfile.FilterError as exc:
            member = exc.tarinfo.name if exc.tarinfo is not None else None
            raise ArchiveError(
                archive, f"unsafe member rejected ({exc}); the archive is not extracted", member
            ) from None
        except _CORRUPT as exc:
            raise ArchiveError(
                archive,
                f"corrupt or truncated archive ({exc}); nothing was extracted; delete it and download it again",
            ) from None
        except OSError as exc:
            raise ArchiveError(archive, f"cannot extract: {exc}; nothing was extracted") from None
        files, nbytes = _move_into_place(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_extraction(root, name, files, nbytes, md5)
    return ExtractResult(archive=archive, files=files, nbytes=nbytes)


def _move_into_place(staging: Path, root: Path) -> tuple[list[str], int]:
    """Rename every file (and symlink) of ``staging`` to the same relative path under ``root``."""
    files: list[str] = []
    nbytes = 0
    for dirpath, dirnames, filenames in os.walk(staging):
        rel = os.path.relpath(dirpath, staging)
        target = root if rel == "." else root / rel
        target.mkdir(parents=True, exist_ok=True)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in links]
        for fname in [*filenames, *links]:
            src = os.path.join(dirpath, fname)
            st = os.lstat(src)
            nbytes += st.st_size
            os.replace(src, target / fname)
            files.append(fname if rel == "." else f"{Path(rel).as_posix()}/{fname}")
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
