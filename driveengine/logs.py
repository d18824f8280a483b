"""Logging of the ``driveengine`` command line: one handler on the ``driveengine`` logger.

Every module logs through ``logging.getLogger(__name__)`` (a logger under ``driveengine``); the CLI's
global options choose the level:

* default: INFO (progress lines when not on a terminal, notes of the stages);
* ``--quiet``: WARNING (warnings and errors only) and no progress display (:func:`driveengine.progress.set_quiet`);
* ``--verbose``: DEBUG.

The handler writes to the *current* ``sys.stderr`` (looked up for each record, so a test runner that
swaps the stream gets the lines), one line per record: ``message`` at INFO, ``warning: message`` and
``error: message`` above it, ``debug <logger>: message`` at DEBUG. No colour, no cursor code.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

#: The logger every DriveEngine module logs under.
ROOT_LOGGER = "driveengine"

#: Levels of the CLI's verbosity: -1 = --quiet, 0 = default, 1 = --verbose.
LEVELS: dict[int, int] = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler on whatever ``sys.stderr`` is when a record arrives."""

    @property  # type: ignore[override]
    def stream(self) -> object:  # the base class assigns and reads an attribute
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # the base class assigns it in __init__
        pass


class _LineFormatter(logging.Formatter):
    """``message`` at INFO, ``warning: message`` above, ``debug <logger>: message`` below; one line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", " ")
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {text}"
        return text


@dataclass(frozen=True)
class LoggingState:
    """What :func:`configure_logging` changed, for :func:`restore_logging`."""

    level: int
    handlers: tuple[logging.Handler, ...]
    quiet: bool


def configure_logging(verbosity: int = 0) -> LoggingState:
    """Send ``driveengine`` log records to stderr at the level of ``verbosity`` (-1, 0, 1; see the module doc)
    and silence progress displays for ``--quiet``. Idempotent: the handler is installed once.

    Returns:
        The previous state, for :func:`restore_logging`.
    """
    from driveengine import progress

    logger = logging.getLogger(ROOT_LOGGER)
    state = LoggingState(logger.level, tuple(logger.handlers), progress.is_quiet())
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LineFormatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    progress.set_quiet(verbosity < 0)
    return state


def restore_logging(state: LoggingState) -> None:
    """Undo :func:`configure_logging` (level, handlers, progress quiet): commands run in-process, e.g. by a
    test runner, leave the process as they found it."""
    from driveengine import progress

    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(state.level)
    for handler in list(logger.handlers):
        if handler not in state.handlers:
            logger.removeHandler(handler)
    progress.set_quiet(state.quiet)
