"""Tiny timing harness shared by the benchmarks.

Machines are noisy, so absolute times mean little: every benchmark measures a baseline in the same
run and reports ``ratio = ours / baseline`` (for times) or ``ours / baseline`` (for rates), with the
goal stated next to it.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Smallest wall time in seconds of ``repeat`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(
    name: str, ours: float, baseline: float, unit: str, goal: str = "", higher_is_better: bool = False
) -> None:
    """Print one benchmark line: both figures, their ratio and the goal."""
    ratio = ours / baseline if baseline else float("inf")
    direction = "higher is better" if higher_is_better else "lower is better"
    print(
        f"{name:<58} ours {ours:12.4g} {unit:<8} baseline {baseline:12.4g} {unit:<8} "
        f"ratio {ratio:7.3f}  ({direction}{'; goal ' + goal if goal else ''})"
    )


def section(title: str) -> None:
    """Print a section heading."""
    print(f"\n== {title}")
