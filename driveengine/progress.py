"""Progress that reads well on a terminal and in a log file.

One small API for every long-running loop::

    from driveengine.progress import progress, track

    with progress(total=len(logs), desc="collect", unit="log", rate_unit="frame") as bar:
        for log in logs:
            frames = work(log)
            bar.update(1, amount=frames)       # one log done, `frames` frames of work in it
            bar.write(f"{log}: done")          # a message that does not break the bar

    for item in track(items, desc="render", unit="frame"):   # the same, wrapped around an iterable
        ...

* **On a terminal** (the stream's ``isatty()``, ``TERM`` not ``dumb``) it is a tqdm bar on stderr, in
  colour unless ``NO_COLOR`` is set (https://no-color.org).
* **Otherwise** (a file, a pipe, CI) it writes **single lines** through :mod:`logging` (logger
  ``driveengine.progress``, level INFO): one as soon as :data:`LINE_INTERVAL_S` seconds have passed or
  another :data:`LINE_PERCENT_STEP` % of the total was done since the start or the last line, and one
  when it ends (none when the block ends with an exception: the error says what happened; and none at
  the start, so a short or failing step adds no line of its own)::

      collect: 40/120 logs (33 %), 12.3 frames/s, eta 1m20s

  No carriage return, no cursor or colour code ever. When nothing has configured logging (no handler
  on the ``driveengine`` logger or the root logger), the lines go to the stream itself, so a plain
  ``driveengine ... 2> log.txt`` still records them.
* **Quiet** (``progress(..., quiet=True)``, or :func:`set_quiet` for the whole process, e.g. the CLI's
  ``--quiet``): nothing at all, in both modes; :meth:`Progress.write` messages too.
* **Not shown** (``progress(..., show=False)``, a command's ``--no-progress``): no bar and no progress
  lines, but :meth:`Progress.write` messages still come, as single lines (logging or the stream).

Counts are of ``unit`` (``log``, ``frame``, ``B`` ...); the rate is of ``rate_unit`` when given (the
``amount`` passed to :meth:`Progress.update`, e.g. frames while counting logs), else of ``unit``.
``scale=True`` prints counts and rates with SI prefixes (``12.3 MB/s``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

#: Logger of the single-line mode.
LOGGER_NAME = "driveengine.progress"
#: Seconds between two single lines (at most; a line also comes every :data:`LINE_PERCENT_STEP` %).
LINE_INTERVAL_S = 10.0
#: Percent of the total between two single lines.
LINE_PERCENT_STEP = 10.0
#: tqdm bar colour on a terminal when ``NO_COLOR`` is not set.
BAR_COLOUR = "green"

_T = TypeVar("_T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress display of this process (the CLI's ``--quiet``)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """Whether :func:`set_quiet` silenced progress."""
    return _quiet


def no_color() -> bool:
    """Whether ``NO_COLOR`` asks for no colour (set and non-empty, as https://no-color.org says)."""
    return bool(os.environ.get("NO_COLOR"))


def is_terminal(stream: IO[str] | Any) -> bool:
    """Whether ``stream`` is an interactive terminal that can show a redrawn bar."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a real file
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def format_duration(seconds: float) -> str:
    """``42s``, ``1m20s``, ``2h05m`` (whole seconds; ``?`` for a negative or non-finite value)."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _si(value: float) -> str:
    """``value`` with an SI prefix: 950, 1.2 k, 12.3 M, ..."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            return f"{value:.0f} {prefix}".rstrip() if prefix == "" else f"{value:.1f} {prefix}"
        value /= 1000.0
    return f"{value:.1f}"  # unreachable


def _count(value: float, unit: str, scale: bool) -> str:
    """``value unit``: SI-prefixed with ``scale`` (``12.3 MB``), else a whole number or 4 digits."""
    if scale:
        text = _si(value)
    else:
        text = f"{int(value)}" if float(value).is_integer() else f"{value:.4g}"
    if not unit:
        return text
    return f"{text}{unit}" if text[-1].isalpha() else f"{text} {unit}"


def _plural(unit: str, n: float) -> str:
    """``log`` -> ``logs`` unless ``n`` is 1 (units ending in a capital, ``B``, stay as they are)."""
    if not unit or unit[-1].isupper() or unit.endswith("s") or n == 1:
        return unit
    return unit + "s"


class Progress:
    """A running progress display; made by :func:`progress` (see the module doc)."""

    def __init__(
        self,
        total: int | float | None,
        desc: str,
        unit: str,
        rate_unit: str | None,
        scale: bool,
        stream: IO[str] | Any,
        quiet: bool,
        clock: Callable[[], float],
        interval_s: float,
        percent_step: float,
        logger: logging.Logger,
        show: bool = True,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.rate_unit = rate_unit
        self.scale = scale
        self.n: float = 0
        self.amount: float = 0.0
        self.postfix = ""
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._interval_s = interval_s
        self._percent_step = percent_step
        self._logger = logger
        self._bar: Any = None
        self._lines = False
        self._messages = False  # show=False: no display, but write() messages still come
        self._closed = False
        if quiet:
            return
        if not show:
            self._messages = True
            return
        if is_terminal(stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc or None,
                unit=unit,
                unit_scale=scale,
                file=stream,
                colour=None if no_color() else BAR_COLOUR,
                dynamic_ncols=True,
            )
        else:
            self._lines = True
            self._last_line_t = self._start
            self._last_line_pct = 0.0

    # -- what it says ------------------------------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        """Seconds since the start."""
        return max(self._clock() - self._start, 0.0)

    def rate(self) -> float | None:
        """Per second, of ``rate_unit`` (``amount``) when set, else of ``unit``; None before any time passed."""
        elapsed = self.elapsed_s
        if elapsed <= 0:
            return None
        return (self.amount if self.rate_unit else self.n) / elapsed

    def eta_s(self) -> float | None:
        """Seconds left at the mean speed so far; None without a total or before anything was done."""
        if not self.total or self.n <= 0:
            return None
        return self.elapsed_s * max(self.total - self.n, 0) / self.n

    def status(self, final: bool = False) -> str:
        """The single line: ``desc: 40/120 logs (33 %), 12.3 frames/s, eta 1m20s``."""
        unit = _plural(self.unit, self.total if self.total is not None else self.n)
        if self.total is not None:
            done = f"{_count(self.n, '', self.scale)}/{_count(self.total, unit, self.scale)}"
            if self.total > 0:
                done += f" ({100.0 * self.n / self.total:.0f} %)"
        else:
            done = _count(self.n, unit, self.scale)
        parts = [done]
        rate = self.rate()
        if rate is not None and (self.n or self.amount):
            rate_unit = self.rate_unit or self.unit
            rate_text = _si(rate) if self.scale else f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"
            sep = "" if self.scale and rate_text[-1].isalpha() else " "
            parts.append(f"{rate_text}{sep}{_plural(rate_unit, 2)}/s")
        if self.postfix:
            parts.append(self.postfix)
        if final:
            parts.append(f"done in {format_duration(self.elapsed_s)}")
        else:
            eta = self.eta_s()
            if eta is not None:
                parts.append(f"eta {format_duration(eta)}")
            elif self.n or self.amount:
                parts.append(f"{format_duration(self.elapsed_s)} so far")
        return f"{self.desc}: {', '.join(parts)}" if self.desc else ", ".join(parts)

    # -- updates -----------------------------------------------------------------------------------
    def update(self, n: int | float = 1, *, amount: float = 0.0) -> None:
        """``n`` more ``unit`` done (and ``amount`` more ``rate_unit``, e.g. frames within logs)."""
        self.n += n
        self.amount += amount
        if self._bar is not None:
            if self.rate_unit and amount:
                self._bar.set_postfix_str(self._bar_postfix(), refresh=False)
            self._bar.update(n)
        elif self._lines:
            self._maybe_line()

    def set_postfix(self, text: str) -> None:
        """A short status shown after the rate (``loss 0.4321``): on the bar, and in the next single line."""
        self.postfix = text.replace("\r", " ").replace("\n", " ")
        if self._bar is not None:
            self._bar.set_postfix_str(self._bar_postfix(), refresh=False)

    def _bar_postfix(self) -> str:
        """The bar's text after its own counts: the rate of ``rate_unit`` (when set) and the postfix."""
        rate = self.rate() if self.rate_unit and self.amount else None
        parts = [] if rate is None else [f"{rate:.3g} {_plural(self.rate_unit or '', 2)}/s"]
        return ", ".join([*parts, *([self.postfix] if self.postfix else [])])

    def write(self, message: str) -> None:
        """A message line that does not break the display (tqdm.write on a terminal, else a log line)."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        elif self._lines or self._messages:
            self._line(message)

    def close(self, failed: bool = False) -> None:
        """End the display (a final line in single-line mode, unless ``failed``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines and not failed:
            self._line(self.status(final=True))

    def _maybe_line(self) -> None:
        """A line when ``interval_s`` passed or ``percent_step`` % more was done since the last line."""
        now = self._clock()
        pct = 100.0 * self.n / self.total if self.total else 0.0
        due = now - self._last_line_t >= self._interval_s
        due |= bool(self.total) and pct - self._last_line_pct >= self._percent_step
        if due and not (self.total and self.n >= self.total):  # the last line is close()'s
            self._last_line_t, self._last_line_pct = now, pct
            self._line(self.status())

    def _line(self, text: str) -> None:
        text = text.replace("\r", " ").replace("\n", " ")
        if _logging_configured(self._logger):
            self._logger.info(text)
        else:
            try:
                self._stream.write(text + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: progress is never fatal
                pass


def _logging_configured(logger: logging.Logger) -> bool:
    """Whether any handler would receive ``logger``'s records (besides logging's last resort)."""
    return logger.hasHandlers()


@contextmanager
def progress(
    total: int | float | None = None,
    *,
    desc: str = "",
    unit: str = "it",
    rate_unit: str | None = None,
    scale: bool = False,
    stream: IO[str] | Any | None = None,
    quiet: bool | None = None,
    show: bool = True,
    clock: Callable[[], float] = time.monotonic,
    interval_s: float = LINE_INTERVAL_S,
    percent_step: float = LINE_PERCENT_STEP,
) -> Iterator[Progress]:
    """A progress display for the ``with`` block (see the module doc).

    Args:
        total: how many ``unit`` there are (None: unknown; no percentage or eta).
        desc: what is being done (the line's prefix).
        unit: what is counted (singular: ``log``, ``frame``; ``B`` for bytes).
        rate_unit: what the rate is of, when not ``unit`` (fed by ``update(amount=...)``).
        scale: SI prefixes on counts and rates (bytes).
        stream: where a bar or unconfigured lines go (default ``sys.stderr``, looked up at the call).
        quiet: no output at all (default: :func:`is_quiet`).
        show: False: no bar and no progress lines, only :meth:`Progress.write` messages (``--no-progress``).
        clock: seconds, monotonic (tests pass a fake one).
        interval_s, percent_step: how often single lines come (see the module doc).
    """
    bar = Progress(
        total,
        desc,
        unit,
        rate_unit,
        scale,
        sys.stderr if stream is None else stream,
        _quiet if quiet is None else quiet,
        clock,
        interval_s,
        percent_step,
        logging.getLogger(LOGGER_NAME),
        show,
    )
    try:
        yield bar
    except BaseException:
        bar.close(failed=True)
        raise
    bar.close()


def track(
    iterable: Iterable[_T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    stream: IO[str] | Any | None = None,
    quiet: bool | None = None,
    show: bool = True,
) -> Iterator[_T]:
    """Yield the items of ``iterable`` while showing :func:`progress` over them (total: ``len()`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress(total, desc=desc, unit=unit, stream=stream, quiet=quiet, show=show) as bar:
        for item in iterable:
            yield item
            bar.update(1)
