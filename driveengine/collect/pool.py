"""The local worker pool of ``collect --workers N``: one log per task, workers that die with the client.

Workers are started from a ``forkserver`` (a clean server process that imported the job's modules
once forks each worker; no inherited threads or locks as with fork, much faster than spawn). Each
worker talks to the client over its own pipe: the client sends a :class:`~driveengine.collect.job.LogTask`,
the worker sends ``("progress", frames)`` messages and one ``("result", LogResult)``. The client knows
which log every worker holds, so:

**A dead worker fails one log, not the run.** When a worker process dies (the out-of-memory killer, a
segfault), the log it held is given to a fresh worker once more (:data:`RETRIES`); if that worker dies
too, the log is reported as ``worker died (signal N)`` and the other logs go on. Workers are replaced
as needed; no other worker is disturbed.

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
that log SIGKILLs itself before running it (simulating the out-of-memory killer for tests). Unset (the
normal case) it does nothing.
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
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess

from driveengine.collect.job import LogResult, LogTask, run_log
from driveengine.errors import DriveEngineError

#: How many times a log whose worker died is given to a fresh worker before it is reported failed.
RETRIES = 1
#: Environment variable naming a log whose worker kills itself (tests only; see the module doc).
KILL_HOOK_ENV = "DRIVEENGINE_TEST_KILL_WORKER_ON_LOG"
#: Seconds an idle worker is given to exit after the client says stop, before it is killed.
STOP_TIMEOUT_S = 5.0
#: Attempts to start a worker process (the forkserver may be restarting).
START_TRIES = 3
_PR_SET_PDEATHSIG = 1


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
            os.kill(os.getpid(), signal.SIGKILL)
        result = run_log(task, progress=lambda n: conn.send(("progress", n)), may_commit=client_alive)
        try:
            conn.send(("result", result))
        except OSError:  # the client is gone (the watchdog ends this process too)
            return


class PoolError(DriveEngineError):
    """The worker pool cannot start a worker process."""


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    task: LogTask | None = None


def _death_reason(task: LogTask, exitcode: int | None, tries: int) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        how = f"worker died (signal {-exitcode}, {name})"
    else:
        how = f"worker died (exit code {exitcode})"
    return (
        f"{task.input.path}: {how} on {tries} tries; a SIGKILL is usually the out-of-memory killer: "
        f"collect this log alone (--workers 1 --logs {task.log_name}) or with more memory"
    )


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
        return _Worker(process, ours)
    raise AssertionError("unreachable")


def run_pool(tasks: list[LogTask], workers: int, progress: Callable[[str, int], None]) -> Iterator[LogResult]:
    """Run ``tasks`` on ``workers`` local worker processes; yield each log's result as it finishes.

    Args:
        tasks: the logs to collect.
        workers: worker processes (at most one per task is started).
        progress: called with (log name, frames labelled) as workers report progress.

    Yields:
        One :class:`LogResult` per task, in completion order (a log whose worker died twice is a
        failed result naming the signal). Closing the iterator early kills the workers.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["driveengine.collect.pool"])
    kill_on_log = os.environ.get(KILL_HOOK_ENV) or None
    client_r, client_w = context.Pipe(duplex=False)  # client_w is never written: its EOF is our death
    pending = deque(tasks)
    tries: Counter[str] = Counter()
    live: list[_Worker] = []
    try:
        while pending or any(w.task is not None for w in live):
            while len(live) < workers and len(live) < len(pending) + sum(w.task is not None for w in live):
                live.append(_start_worker(context, client_r, kill_on_log))
            for worker in live:
                if worker.task is None and pending:
                    worker.task = pending.popleft()
                    tries[worker.task.log_name] += 1
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
                if tries[task.log_name] <= RETRIES:
                    pending.appendleft(task)
                else:
                    reason = _death_reason(task, worker.process.exitcode, tries[task.log_name])
                    yield LogResult(task.log_name, "failed", reason=reason)
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
