"""The local worker pool of ``collect --workers N``: one log per task, workers that die with the client.

Workers are started from a ``forkserver`` (a clean server process that imported the job's modules
once forks each worker; no inherited threads or locks as with fork, much faster than spawn). Each
worker talks to the client over its own pipe: the client sends a :class:`~driveengine.collect.job.LogTask`,
the worker sends ``("progress", frames)`` messages and one ``("result", LogResult)``. The client knows
which log every worker holds, so:

**A dead worker fails one log, not the run.** When a worker process dies (the out-of-memory killer, a
segfault), the log it held is given to a fresh worker once more (:data:`RETRIES`); if that worker dies
too, the log is reported as ``worker died (signal N)`` and the other logs go on. Workers are replaced
as needed; no other worker is disturbed. A log redone after a death says so in its result
(:attr:`~driveengine.collect.job.LogResult.worker_deaths`, printed by ``collect``).

**A dead forkserver costs no log a try.** When the forkserver itself dies (killed), every worker goes
with it (below) whatever its log: such deaths (the forkserver's report is missing: exit code 255, and
the worker's parent, read from ``/proc`` at its start, has exited or is exiting) are not charged to the
logs, which are redone by workers of a new forkserver (multiprocessing starts one at the next worker).
Up to :data:`SERVER_DEATHS` forkservers a run; after that, deaths count as usual (and where ``/proc``
is missing, always). A task is handed only to a worker not yet known dead (one whose death was reported
while the client was busy costs nothing). A forkserver that dies between forking a worker and the
``/proc`` read leaves that worker's death charged (its parent is then another process): never more
free tries than the rule says.

**Workers die with the client.** Nothing of a ``collect`` outlives it, even after ``kill -9``:

* every worker holds the read end of a pipe whose only write end the client holds; a watchdog thread
  blocks on it and SIGKILLs its own worker when it reads end-of-file (the client is gone);
* right before committing a log, the worker checks that pipe again (``may_commit`` of
  :func:`~driveengine.collect.job.run_log`), so a worker outliving its client by a moment commits nothing;
* workers also ask Linux for ``SIGKILL`` when their parent (the forkserver) dies (``PR_SET_PDEATHSIG``).

With the workers gone, the forkserver and multiprocessing's resource tracker see end-of-file on their
own pipes and exit. Workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and
the client alone handles it (it stops the pool).

**Test hook.** When the environment variable :data:`KILL_HOOK_ENV` names a log, a worker that receives
that log SIGKILLs itself before running it (simulating the out-of-memory killer for tests); when
:data:`KILL_ONCE_ENV` also names a file, only the process that creates that file dies, so the retry
succeeds. Unset (the normal case) it does nothing.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path

from driveengine.collect.job import LogResult, LogTask, run_log
from driveengine.errors import DriveEngineError

#: How many times a log whose worker died is given to a fresh worker before it is reported failed.
RETRIES = 1
#: Forkservers a run may lose without charging the logs their workers held (see the module doc).
SERVER_DEATHS = 3
#: Environment variable naming a log whose worker kills itself (tests only; see the module doc).
KILL_HOOK_ENV = "DRIVEENGINE_TEST_KILL_WORKER_ON_LOG"
#: Environment variable naming a file: with the kill hook, only the process that creates it dies (tests).
KILL_ONCE_ENV = "DRIVEENGINE_TEST_KILL_ONCE_FILE"
#: Seconds an idle worker is given to exit after the client says stop, before it is killed.
STOP_TIMEOUT_S = 5.0
#: Attempts to start a worker process (the forkserver may be restarting).
START_TRIES = 3
_PR_SET_PDEATHSIG = 1


def kill_for_test() -> None:
    """SIGKILL this process: the test hook's death (module doc). With :data:`KILL_ONCE_ENV` naming a file
    that exists already (another process died for it), return instead."""
    once = os.environ.get(KILL_ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request: act on it now
        os.kill(os.getpid(), signal.SIGKILL)


def _die_with_client(client: Connection) -> None:
    """Start the watchdog: SIGKILL this process as soon as ``client`` (a pipe nobody writes) is at EOF."""

    def watch() -> None:
        try:
            client.recv_bytes()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-client", daemon=True).start()


def _worker_main(conn: Connection, client: Connection, kill_on_log: str | None) -> None:
    """A pool worker: run the tasks the client sends until it sends None (or is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _die_with_client(client)

    def client_alive() -> bool:
        return not client.poll(0)  # readable = end-of-file: the client is gone

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        if kill_on_log is not None and task.log_name == kill_on_log:
            kill_for_test()
        result = run_log(task, progress=lambda n: conn.send(("progress", n)), may_commit=client_alive)
        try:
            conn.send(("result", result))
        except OSError:  # the client is gone (the watchdog ends this process too)
            return


class PoolError(DriveEngineError):
    """The worker pool cannot start a worker process."""


@dataclass
class _Worker:
    """A worker: its process, the client's end of its pipe, the log it holds and its parent's pid at its
    start, its forkserver's (None where ``/proc`` does not say)."""

    process: BaseProcess
    conn: Connection
    server: int | None
    task: LogTask | None = None


@dataclass
class _Attempts:
    """How the attempts of each log ended so far: every worker death, and those charged to the log."""

    deaths: dict[str, list[str]] = field(default_factory=dict)
    charged: Counter[str] = field(default_factory=Counter)
    dead_servers: set[int] = field(default_factory=set)

    def record(self, worker: _Worker, log_name: str) -> bool:
        """Record the death of ``worker`` holding ``log_name``; whether the log gets another try."""
        exitcode = worker.process.exitcode
        server_died = exitcode == 255 and worker.server is not None and _exited(worker.server)
        if server_died:
            self.dead_servers.add(worker.server)
        free = server_died and len(self.dead_servers) <= SERVER_DEATHS
        self.deaths.setdefault(log_name, []).append(_how_it_died(exitcode, server_died))
        if not free:
            self.charged[log_name] += 1
        return self.charged[log_name] <= RETRIES

    def failure(self, task: LogTask) -> str:
        """The failure reason of a log whose worker died once too often, with what to do."""
        deaths = self.deaths[task.log_name]
        alone = f"collect this log alone (--workers 1 --logs {task.log_name})"
        if deaths[-1] == _how_it_died(-signal.SIGKILL, False):
            advice = f"a SIGKILL is usually the out-of-memory killer: {alone} or with more memory"
        elif deaths[-1] == _SERVER_DIED:
            advice = (
                f"{len(self.dead_servers)} forkservers of this run were killed; run the same command again"
            )
        else:
            advice = f"{alone} to see its error"
        return f"{task.input.path}: worker died ({deaths[-1]}) on {len(deaths)} tries; {advice}"


_SERVER_DIED = "its forkserver died"


def _how_it_died(exitcode: int | None, server_died: bool) -> str:
    """``signal 9, SIGKILL``, ``exit code 1``, or that the worker's forkserver died."""
    if server_died:
        return _SERVER_DIED
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-exitcode}, {name}"
    return f"exit code {exitcode}"


#: ``PF_EXITING`` of ``/proc/<pid>/stat``'s flags: set when the process starts to exit (include/linux/sched.h).
_PF_EXITING = 0x4


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3 on (state, parent pid, ..., flags at index 6) of ``/proc/<pid>/stat``; None when the
    process is gone or there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()  # the name, in parentheses, may hold spaces


def _parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` from ``/proc``; None when it is gone or there is no ``/proc``."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _exited(pid: int) -> bool:
    """Whether process ``pid`` has exited or is exiting: gone, a zombie, or flagged ``PF_EXITING``. A killed
    process closes its files while it exits, before it becomes a zombie, so its pipes can report it dead
    while ``/proc`` still shows it running; the flag is set by then."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] in (b"Z", b"X") or bool(int(fields[6]) & _PF_EXITING)


def _start_worker(context: ForkServerContext, client: Connection, kill_on_log: str | None) -> _Worker:
    """Start one worker; a few tries, as a forkserver that just died is restarted by the next one."""
    for attempt in range(START_TRIES):
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(
            target=_worker_main, args=(theirs, client, kill_on_log), name="collect-worker", daemon=True
        )
        try:
            process.start()
        except (EOFError, OSError) as exc:
            ours.close()
            if attempt + 1 == START_TRIES:
                raise PoolError(f"cannot start a collect worker process ({exc!r}); run again") from None
            time.sleep(0.2)
            continue
        finally:
            theirs.close()
        return _Worker(process, ours, server=None if process.pid is None else _parent_pid(process.pid))
    raise AssertionError("unreachable")


def run_pool(tasks: list[LogTask], workers: int, progress: Callable[[str, int], None]) -> Iterator[LogResult]:
    """Run ``tasks`` on ``workers`` local worker processes; yield each log's result as it finishes.

    Args:
        tasks: the logs to collect.
        workers: worker processes (at most one per task is started).
        progress: called with (log name, frames labelled) as workers report progress.

    Yields:
        One :class:`LogResult` per task, in completion order, with how its earlier attempts' workers died
        (a log whose workers died more than :data:`RETRIES` times, forkserver deaths aside, is a failed
        result naming the signal). Closing the iterator early kills the workers.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["driveengine.collect.pool"])
    kill_on_log = os.environ.get(KILL_HOOK_ENV) or None
    client_r, client_w = context.Pipe(duplex=False)  # client_w is never written: its EOF is our death
    pending = deque(tasks)
    attempts = _Attempts()
    live: list[_Worker] = []
    try:
        while pending or any(w.task is not None for w in live):
            while len(live) < workers and len(live) < len(pending) + sum(w.task is not None for w in live):
                live.append(_start_worker(context, client_r, kill_on_log))
            for worker in live:
                # a worker that died meanwhile (e.g. while the caller consumed a result) gets no task
                if worker.task is None and pending and worker.process.is_alive():
                    worker.task = pending.popleft()
                    try:
                        worker.conn.send(worker.task)
                    except OSError:  # it just died: its sentinel says so below
                        pass
            ready = wait([w.conn for w in live] + [w.process.sentinel for w in live])
            for worker in list(live):
                dead = worker.process.sentinel in ready
                try:
                    while worker.conn.poll(0):
                        kind, payload = worker.conn.recv()
                        if kind == "progress" and worker.task is not None:
                            progress(worker.task.log_name, payload)
                        elif kind == "result":
                            worker.task = None
                            payload.worker_deaths = attempts.deaths.pop(payload.log_name, [])
                            yield payload
                except (EOFError, OSError):
                    dead = True
                if not dead:
                    continue
                worker.process.join(STOP_TIMEOUT_S)
                live.remove(worker)
                worker.conn.close()
                task = worker.task
                if task is None:
                    continue
                if attempts.record(worker, task.log_name):
                    pending.appendleft(task)
                else:
                    reason = attempts.failure(task)
                    deaths = attempts.deaths.pop(task.log_name)
                    yield LogResult(task.log_name, "failed", reason=reason, worker_deaths=deaths)
        for worker in live:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in live:
            worker.process.join(STOP_TIMEOUT_S)
    finally:
        client_w.close()  # idle or not, every worker of ours now sees EOF and dies
        client_r.close()
        for worker in live:
            if worker.process.is_alive():
                worker.process.kill()
        for worker in live:
            worker.process.join(STOP_TIMEOUT_S)
            worker.conn.close()
