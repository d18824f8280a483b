"""Errors of the download stage (all :class:`~driveengine.errors.DriveEngineError`, printed as one line)."""

from __future__ import annotations

from os import PathLike

from driveengine.errors import DriveEngineError


class DownloadError(DriveEngineError):
    """A release file could not be downloaded, or the request itself is invalid."""


class ReleaseError(DownloadError):
    """The request does not match the release manifest (unknown split, modality, shard, mirror)."""


class InsufficientSpaceError(DownloadError):
    """The target folder's file system has not enough free space for the download and extraction.

    Args:
        folder: the folder that would receive the files.
        needed: bytes the download and extraction need.
        free: bytes free on that file system.
    """

    def __init__(self, folder: str | PathLike[str], needed: int, free: int) -> None:
        self.folder = str(folder)
        self.needed = needed
        self.free = free
        super().__init__(
            f"{self.folder}: not enough free disk space: need {needed:,} bytes ({needed / 2**30:.2f} GiB) "
            f"for download and extraction, {free:,} bytes ({free / 2**30:.2f} GiB) free "
            "(free some space, choose another --out, or select fewer --shards / --modality)"
        )


class ChecksumFileError(DownloadError):
    """A checksum file (md5sum / sha256sum format) cannot be parsed."""

    def __init__(self, path: str | PathLike[str], line_no: int, reason: str) -> None:
        self.path = str(path)
        super().__init__(
            f"{self.path}:{line_no}: {reason} (expected md5sum/sha256sum lines: '<hex>  <name>')"
        )


class ArchiveError(DriveEngineError):
    """An archive is corrupt, truncated or contains an unsafe member.

    Args:
        archive: the archive file.
        reason: what is wrong.
        member: the offending member's name inside the archive, when there is one.
    """

    def __init__(self, archive: str | PathLike[str], reason: str, member: str | None = None) -> None:
        self.archive = str(archive)
        self.member = member
        self.reason = reason
        where = f" (member {shorten(member)!r})" if member is not None else ""
        super().__init__(f"{self.archive}{where}: {reason}")


def shorten(text: str, limit: int = 120) -> str:
    """``text``, its middle replaced by ``...`` when longer than ``limit`` characters (for one-line messages)."""
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return f"{text[:keep]}...{text[-keep:]}"


class UnsafeArchiveError(ArchiveError):
    """An archive was refused for what it holds (a link, a path leaving the output folder, a reserved
    ``.driveengine/`` name, a device file) or for expanding past the extraction limit (a decompression
    bomb). Unlike a corrupt archive, downloading it again cannot help."""
