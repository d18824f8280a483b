"""Progress: single lines (no carriage return, no ANSI code) when not on a terminal, a tqdm bar on one,
NO_COLOR, quiet, show=False (messages only), and the lines a real process (and the demo) writes to a file."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from driveengine import progress as prog

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_lines(total: int, step_s: float, caplog: pytest.LogCaptureFixture, **kwargs) -> list[str]:
    clock = FakeClock()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=prog.LOGGER_NAME):
        with prog.progress(
            total, desc="collect", unit="log", stream=io.StringIO(), clock=clock, **kwargs
        ) as bar:
            for _ in range(total):
                clock.t += step_s
                bar.update(1, amount=37)
    return [r.getMessage() for r in caplog.records if r.name == prog.LOGGER_NAME]


def test_not_a_terminal_gives_periodic_single_lines(caplog) -> None:
    lines = run_lines(120, 1.0, caplog, rate_unit="frame")  # 2 minutes of work
    assert lines[0] == "collect: 10/120 logs (8 %), 37 frames/s, eta 1m50s"  # no line at the start
    assert lines[-1] == "collect: 120/120 logs (100 %), 37 frames/s, done in 2m00s"
    assert "collect: 40/120 logs (33 %), 37 frames/s, eta 1m20s" in lines
    # a line every 10 s (the 10 % steps take longer here): 11 + end
    assert len(lines) == 12
    for line in lines:
        assert "\r" not in line and "\n" not in line and not ANSI.search(line)
    # fast work: one line per 10 % at most, whatever the number of updates
    fast = run_lines(5000, 0.0001, caplog)
    assert len(fast) == 10 and fast[-1].startswith("collect: 5000/5000 logs (100 %)")


def test_unknown_total_and_byte_counts(caplog) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=prog.LOGGER_NAME):
        with prog.progress(
            None, desc="download", unit="B", scale=True, clock=clock, stream=io.StringIO()
        ) as bar:
            for _ in range(25):
                clock.t += 1.0
                bar.update(1.5e6)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "download: 15.0 MB, 1.5 MB/s, 10s so far",
        "download: 30.0 MB, 1.5 MB/s, 20s so far",
        "download: 37.5 MB, 1.5 MB/s, done in 25s",
    ]


def test_terminal_gets_a_tqdm_bar_coloured_unless_no_color(monkeypatch) -> None:
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    for no_color in ("", "1"):
        monkeypatch.setenv("NO_COLOR", no_color)
        term = FakeTerminal()
        with prog.progress(10, desc="render", unit="frame", stream=term) as bar:
            for _ in range(10):
                bar.update(1)
        text = term.getvalue()
        assert "\r" in text and "10/10" in text  # a redrawn tqdm bar
        assert bool(ANSI.search(text.replace("\x1b[A", ""))) is (no_color == "")
    monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot redraw: single lines
    term = FakeTerminal()
    with prog.progress(3, desc="render", unit="frame", stream=term, quiet=False) as bar:
        bar.update(3)
    assert "\r" not in term.getvalue() and not ANSI.search(term.getvalue())


def test_quiet_writes_nothing(caplog, monkeypatch) -> None:
    term = FakeTerminal()
    with caplog.at_level(logging.INFO, logger=prog.LOGGER_NAME):
        for stream in (term, io.StringIO()):
            with prog.progress(5, desc="x", stream=stream, quiet=True) as bar:
                bar.update(5)
                bar.write("a message")
        prog.set_quiet(True)
        try:
            assert list(prog.track(range(4), desc="y", stream=io.StringIO())) == [0, 1, 2, 3]
        finally:
            prog.set_quiet(False)
    assert term.getvalue() == "" and caplog.records == []


def test_not_shown_keeps_messages_and_postfix_joins_the_line(caplog) -> None:
    """show=False (a command's --no-progress): no progress line, but write() messages still come."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=prog.LOGGER_NAME):
        with prog.progress(3, desc="collect", show=False, stream=io.StringIO(), clock=clock) as bar:
            bar.update(3)
            bar.write("FAILED log_a: no lidar")
        with prog.progress(2, desc="pretrain", unit="step", stream=io.StringIO(), clock=clock) as bar:
            clock.t += 1.0
            bar.set_postfix("loss 0.5000")
            bar.update(2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "FAILED log_a: no lidar",
        "pretrain: 2/2 steps (100 %), 2 steps/s, loss 0.5000, done in 1s",
    ]
    term = FakeTerminal()
    with prog.progress(4, desc="x", stream=term, show=False) as bar:
        bar.update(4)
    assert term.getvalue() == ""


def test_a_failed_block_ends_without_a_done_line(caplog) -> None:
    """An exception inside the block: the lines so far, no "done" line (the error says what happened)."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=prog.LOGGER_NAME):
        with pytest.raises(OSError):
            with prog.progress(10, desc="video", unit="frame", stream=io.StringIO(), clock=clock) as bar:
                bar.update(5)
                raise OSError("disk full")
    assert [r.getMessage() for r in caplog.records] == ["video: 5/10 frames (50 %), eta 0s"]


def test_a_process_writing_to_a_file_gets_readable_lines(tmp_path) -> None:
    """The real thing: a process whose stderr is a file, logging not configured."""
    script = textwrap.dedent(
        """
        from driveengine.progress import progress, track
        for _ in track(range(30), desc="render", unit="frame"):
            pass
        with progress(4, desc="collect", unit="log", rate_unit="frame") as bar:
            for i in range(4):
                bar.update(1, amount=10)
                bar.write(f"log {i} committed")
        """
    )
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, timeout=120)
    text = log.read_text()
    assert "\r" not in text and not ANSI.search(text)
    lines = text.splitlines()
    assert lines[0].startswith("render: 3/30 frames (10 %), ")
    assert lines[-1].startswith("collect: 4/4 logs (100 %), ") and "frames/s, done in " in lines[-1]
    assert "log 2 committed" in lines
    assert len(lines) <= 12 + 2 + 4 + 4


def test_format_duration() -> None:
    assert [prog.format_duration(s) for s in (0, 42.4, 80, 3725, -1, float("nan"))] == [
        "0s", "42s", "1m20s", "1h02m", "?", "?"
    ]  # fmt: skip


def test_the_demo_written_to_a_file_reads_as_lines(tmp_path) -> None:
    """`make demo > demo.log 2>&1` on a tiny world: every step's output (synth, inspect, collect, stats, show,
    pretrain) through one pipe, with no carriage return and no cursor or colour code."""
    out = tmp_path / "demo"
    args = ["--out", str(out), "--logs", "1", "--seconds", "3", "--points", "256", "--image-size", "96x54"]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TERM")}
    proc = subprocess.run(
        [sys.executable, "-m", "driveengine.demo", *args, "--steps", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=600, check=False,
    )  # fmt: skip
    text = proc.stdout.decode()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text
    lines = text.splitlines()
    assert any(re.fullmatch(r"collect: 1/1 log \(100 %\), .* frames/s, done in \d+s", line) for line in lines)
    assert any(
        re.fullmatch(r"pretrain: 1/1 step \(100 %\), .*, loss \d+\.\d+, done in \d+s", line) for line in lines
    )
    assert "Demo done." in text
