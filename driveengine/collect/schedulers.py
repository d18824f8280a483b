"""Where the per-log jobs run: one function, :func:`run_tasks`, over three schedulers.

One log per task, dynamic scheduling, per-log error isolation; results come back as they finish:

* ``workers=1``: in this process;
* ``workers=N``: a local process pool (:mod:`driveengine.collect.pool`: workers forked from a
  ``forkserver``; a worker killed by the OOM killer costs one retry of its log, not the run; workers die
  with this process, even after ``kill -9``);
* ``scheduler="local:N"``: a Dask ``LocalCluster`` of N single-threaded worker processes on 127.0.0.1;
* ``scheduler="tcp://host:port"``: an existing Dask distributed cluster; the inputs must be readable by
  the workers at the same paths, and the output either a folder on a file system they share or an object
  store URL (``s3://...``: no shared file system needed, see :mod:`driveengine.store.commit`; the workers
  find the store's endpoint and credentials in their own environment, e.g. ``FSSPEC_S3_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``).

A Dask worker that dies mid-log (killed, out of memory) costs a retry of the log on another worker: the
scheduler reschedules the task (up to Dask's ``distributed.scheduler.allowed-failures``, default 3, after
which the log fails with ``KilledWorker``). The dead attempt's files are never committed: on a folder its
temporaries are removed at the next start, on an object store its keys are named by no manifest entry
and the client removes them at the end of the run.

Processes are started with SIGINT ignored (a terminal's Ctrl-C reaches the whole process group; only
the client reacts, and stops them).

**Test hook.** When the environment variable :data:`~driveengine.collect.pool.KILL_HOOK_ENV`
(``DRIVEENGINE_TEST_KILL_WORKER_ON_LOG``) names a log, the process running that log SIGKILLs itself: a
pool worker before it starts the log (see :mod:`driveengine.collect.pool`); a Dask worker, or this
process in an in-process run (``workers=1``: the client itself dies), while working on it, at the first
frame whose labels are made (the frame shard is written and, on an object store, uploaded by then;
before it starts when the log has no labels). When :data:`~driveengine.collect.pool.KILL_ONCE_ENV`
(``DRIVEENGINE_TEST_KILL_ONCE_FILE``) also names a file, only the process that creates that file dies
(once per test), so the retry succeeds. Unset (the normal case) they do nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from driveengine.collect.config import CollectError
from driveengine.collect.job import LogResult, LogTask, run_log
from driveengine.collect.pool import KILL_HOOK_ENV, kill_for_test, run_pool

#: Called with (log name, frames just labelled) as labels are made (in-process and pool runs).
Progress = Callable[[str, int], None]


def _kill_hook(task: LogTask) -> Callable[[int], None] | None:
    """The test hook of the module doc for ``task``: a progress callback that SIGKILLs this process, or
    None (the normal case: the environment names no log, or another one)."""
    if os.environ.get(KILL_HOOK_ENV) != task.log_name:
        return None

    def kill(_frames: int = 0) -> None:
        kill_for_test()

    return kill


def _run_log_hooked(task: LogTask, progress: Callable[[int], None] | None = None) -> LogResult:
    """:func:`~driveengine.collect.job.run_log` with the test hook of the module doc (inert when unset)."""
    hook = _kill_hook(task)
    if hook is None:
        return run_log(task, progress=progress)
    if task.labels is None:
        hook()

    def report(frames: int) -> None:
        hook(frames)
        if progress is not None:
            progress(frames)

    return run_log(task, progress=report)


def run_log_on_dask_worker(task: LogTask) -> LogResult:
    """The Dask task of one log (see the module doc)."""
    return _run_log_hooked(task)


def run_tasks(
    tasks: list[LogTask], workers: int = 1, scheduler: str | None = None, progress: Progress | None = None
) -> Iterator[LogResult]:
    """Run ``tasks`` and yield their results as they finish (see the module doc).

    Raises:
        CollectError: a malformed ``scheduler`` or an unreachable Dask scheduler.
    """
    report: Progress = progress or (lambda name, n: None)
    if not tasks:
        return iter(())
    if scheduler:
        return _results_dask(tasks, scheduler)
    if workers <= 1 or len(tasks) == 1:
        return _results_inline(tasks, report)
    return run_pool(tasks, min(workers, len(tasks)), report)


def _results_inline(tasks: list[LogTask], progress: Progress) -> Iterator[LogResult]:
    for task in tasks:
        yield _run_log_hooked(task, progress=lambda n, name=task.log_name: progress(name, n))


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while processes are started (they inherit it: a terminal's Ctrl-C reaches the whole
    process group, and then only this process reacts); a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _results_dask(tasks: list[LogTask], scheduler: str) -> Iterator[LogResult]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise CollectError(f"--scheduler needs dask distributed ({exc})") from None
    cluster = None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.removeprefix("local:"))
        except ValueError:
            raise CollectError(f"--scheduler {scheduler!r}: expected local:N with N workers") from None
        with sigint_ignored():  # the cluster's processes inherit it: Ctrl-C is handled here alone
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                processes=True,
                # quiet workers: a task's failure reaches us through its future (reported per log), and on
                # Ctrl-C a worker's heartbeat can race the scheduler's shutdown and log a traceback at ERROR
                silence_logs=logging.CRITICAL,
            )
        client = Client(cluster)
    elif scheduler.startswith("tcp://"):
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise CollectError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc})") from None
    else:
        raise CollectError(f"--scheduler {scheduler!r}: expected local:N or tcp://HOST:PORT")
    try:
        futures = [
            client.submit(
                run_log_on_dask_worker, task, key=f"collect-{task.log_name}-{time.time_ns()}", pure=False
            )
            for task in tasks
        ]
        by_key = {f.key: t for f, t in zip(futures, tasks, strict=True)}
        for future in as_completed(futures):
            task = by_key[future.key]
            try:
                yield future.result()
            except Exception as exc:  # KilledWorker, lost connection, ...
                yield LogResult(
                    task.log_name, "failed", reason=f"{task.input.path}: Dask task failed ({exc!r})"
                )
    finally:
        with sigint_ignored():  # a Ctrl-C during the shutdown would leave the cluster half closed
            client.close()
            if cluster is not None:
                cluster.close()
