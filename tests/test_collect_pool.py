"""The local pool's accounting of worker deaths (:mod:`driveengine.collect.pool`), on real processes.

The end-to-end kills (a worker, the forkserver twice) are in test_collect_e2e.py; these pin the rule
itself: a death is free only when its forkserver has exited, for at most ``SERVER_DEATHS`` forkservers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

from driveengine.collect.pool import (
    RETRIES,
    SERVER_DEATHS,
    _Attempts,
    _exited,
    _parent_pid,
    _stat_fields,
    _Worker,
)


@dataclass
class _Ended:
    """What the accounting reads of a dead worker's process."""

    exitcode: int | None


def _death(attempts: _Attempts, log: str, exitcode: int, server: int | None) -> bool:
    return attempts.record(_Worker(process=_Ended(exitcode), conn=None, server=server), log)  # type: ignore[arg-type]


def _reaped_pids(n: int) -> list[int]:
    """Pids of ``n`` children that exited and were reaped (gone from /proc)."""
    children = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(n)]
    for child in children:
        child.wait(timeout=30)
    return [child.pid for child in children]


def test_exited_tells_a_running_process_from_a_zombie_and_a_reaped_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not _exited(child.pid) and not _exited(os.getpid())
        assert _parent_pid(child.pid) == os.getpid() and _parent_pid(os.getpid()) == os.getppid()
        child.kill()
        deadline = time.monotonic() + 20
        while (_stat_fields(child.pid) or [b"?"])[0] != b"Z":  # dead, not yet waited for
            assert time.monotonic() < deadline, _stat_fields(child.pid)
            time.sleep(0.01)
        assert _exited(child.pid)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert _exited(child.pid) and _parent_pid(child.pid) is None  # reaped: gone


def test_a_dead_forkservers_deaths_are_free_and_other_deaths_are_charged() -> None:
    (gone,) = _reaped_pids(1)
    attempts = _Attempts()
    for _ in range(
        3
    ):  # its forkserver exited: the log is redone, however often that forkserver's workers die
        assert _death(attempts, "a", 255, gone)
    assert _death(attempts, "a", 255, os.getpid())  # 255 with the forkserver running: the worker's own exit
    assert RETRIES == 1 and not _death(attempts, "a", -9, os.getpid())  # the second charged death fails it
    assert attempts.deaths["a"] == ["its forkserver died"] * 3 + ["exit code 255", "signal 9, SIGKILL"]
    task = SimpleNamespace(log_name="a", input=SimpleNamespace(path="/logs/a.db"))
    reason = attempts.failure(task)  # type: ignore[arg-type]
    assert reason.startswith("/logs/a.db: worker died (signal 9, SIGKILL) on 5 tries; a SIGKILL is usually")
    # without /proc (no forkserver pid) nothing is free
    assert _death(attempts, "b", 255, None) and not _death(attempts, "b", 255, None)


def test_at_most_server_deaths_forkservers_are_free_in_a_run() -> None:
    pids = _reaped_pids(SERVER_DEATHS + 1)
    attempts = _Attempts()
    for pid in pids[:SERVER_DEATHS]:
        assert _death(attempts, "a", 255, pid)
    assert attempts.charged["a"] == 0
    last = pids[SERVER_DEATHS]  # one forkserver too many: its deaths count
    assert _death(attempts, "a", 255, last) and not _death(attempts, "a", 255, last)
    reason = attempts.failure(SimpleNamespace(log_name="a", input=SimpleNamespace(path="a.db")))  # type: ignore[arg-type]
    assert f"forkserver died) on {SERVER_DEATHS + 2} tries" in reason and "out-of-memory" not in reason
