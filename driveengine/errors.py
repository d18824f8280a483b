"""The error types DriveEngine raises for bad input.

Every error names the file (or log) it is about, what is wrong, and, where there is one, what to do.
The command line prints them as one line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

from os import PathLike


class DriveEngineError(Exception):
    """Base class of every error DriveEngine raises on purpose."""


class SourceError(DriveEngineError):
    """An input file (nuPlan ``.db``, ``.pcd``, OpenScene ``.pkl``, ...) cannot be used.

    Args:
        path: the offending file.
        reason: what is wrong with it, in words.
        hint: optional advice on what to do about it.
    """

    def __init__(self, path: str | PathLike[str], reason: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class PCDError(SourceError):
    """A point cloud file is malformed or truncated."""


class UnsafePickleError(SourceError):
    """A pickle asked for something other than the plain data types it may contain."""
