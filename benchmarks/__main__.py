"""Run every benchmark (``python -m benchmarks``) or some (``python -m benchmarks pcd reader``).

Each module ``benchmarks/bench_<name>.py`` defines ``main() -> None``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import benchmarks


def run(names: list[str]) -> None:
    available = sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )
    for name in names or available:
        if name not in available:
            raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(available)}")
        print(f"\n######## benchmark: {name}")
        importlib.import_module(f"benchmarks.bench_{name}").main()


if __name__ == "__main__":
    run(sys.argv[1:])
