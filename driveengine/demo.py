"""``make demo``: the main job on the embedded synthetic data, step by step.

Synthesises a small nuPlan world, inspects it, collects it into frame shards and occupancy labels,
prints statistics, renders a BEV picture and runs a few pre-training steps. Every step is the real
``driveengine`` command a user would type, printed before it runs.

Its output reads as lines in a file too (``make demo > demo.log 2>&1``): every step's progress is
:mod:`driveengine.progress`, a bar on a terminal and single lines otherwise. ``--logs``, ``--seconds``,
``--points`` and ``--image-size`` shrink the world (the tests run the whole demo on a tiny one).

``--data-only`` (what ``make pretrain`` runs first) only makes the demo dataset, and only what is
missing: the world is synthesised when it is not there, collected when the split has no manifest;
then it prints the ``driveengine pretrain`` arguments that train on it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: The demo world: small enough for a laptop CPU in a few minutes, large enough to show every stage.
DEMO_SPLIT = "mini"
DEMO_LOGS = 2
DEMO_SECONDS = 12.0
DEMO_POINTS = 16384
DEMO_IMAGE_SIZE = "320x180"


def demo_paths(out: Path) -> tuple[Path, Path]:
    """``(nuplan_root, dataset_root)`` of the demo under ``out``."""
    return out / "nuplan", out / "dataset"


def synth_args(
    out: Path,
    seed: int = 0,
    logs: int = DEMO_LOGS,
    seconds: float = DEMO_SECONDS,
    points: int = DEMO_POINTS,
    image_size: str = DEMO_IMAGE_SIZE,
) -> list[str]:
    """Arguments of ``driveengine synth`` that write the demo world (``seconds`` per log)."""
    nuplan, _ = demo_paths(out)
    return [
        "synth", "--out", str(nuplan), "--logs", str(logs), "--seconds", str(seconds),
        "--seed", str(seed), "--split", DEMO_SPLIT, "--points", str(points), "--image-size", image_size,
    ]  # fmt: skip


def collect_args(out: Path, workers: int = 2) -> list[str]:
    """Arguments of ``driveengine collect`` that turn the demo world into frame shards and labels."""
    nuplan, dataset = demo_paths(out)
    return [
        "collect", "--source", "nuplan", "--root", str(nuplan), "--split", DEMO_SPLIT,
        "--out", str(dataset), "--workers", str(workers),
    ]  # fmt: skip


def run_step(title: str, args: list[str]) -> None:
    """Run ``driveengine ARGS`` as a user would, echoing the command; stop the demo if it fails."""
    print(f"\n=== {title}\n$ driveengine {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "driveengine.cli", *args], check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo step failed ({title}): exit code {result.returncode}")
    print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)


def ensure_demo_dataset(out: Path, seed: int = 0) -> Path:
    """The collected demo dataset root under ``out``, synthesised (with ``seed``) and collected first if
    missing; each step that runs is printed as the command a user would type."""
    nuplan, dataset = demo_paths(out)
    if (dataset / DEMO_SPLIT / "manifest.json").exists():
        print(f"demo data: {dataset / DEMO_SPLIT} is already collected (delete {out} to make it again)")
        return dataset
    if not (nuplan / "splits" / DEMO_SPLIT).is_dir():
        run_step("synthesise the demo world", synth_args(out, seed))
    run_step("collect the demo world", collect_args(out))
    return dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("demo_data"), help="folder for everything the demo writes"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_argument("--steps", type=int, default=12, help="pre-training steps at the end")
    parser.add_argument("--logs", type=int, default=DEMO_LOGS, help="logs of the synthetic world")
    parser.add_argument("--seconds", type=float, default=DEMO_SECONDS, help="seconds of each log")
    parser.add_argument("--points", type=int, default=DEMO_POINTS, help="LiDAR rays per sweep")
    parser.add_argument("--image-size", default=DEMO_IMAGE_SIZE, help="camera images WIDTHxHEIGHT")
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="only make the demo dataset (synthesise and collect what is missing) and print how to train on it",
    )
    args = parser.parse_args(argv)
    if args.data_only:
        dataset = ensure_demo_dataset(args.out, args.seed)
        print(
            f"demo dataset ready; train on it with: driveengine pretrain --data {dataset} --split {DEMO_SPLIT}"
        )
        return

    nuplan, dataset = demo_paths(args.out)
    split_dir = dataset / DEMO_SPLIT
    run_step(
        "1. synthesise a nuPlan world (SQLite logs, .pcd sweeps, .jpg images)",
        synth_args(args.out, args.seed, args.logs, args.seconds, args.points, args.image_size),
    )
    first_db = sorted((nuplan / "splits" / DEMO_SPLIT).glob("*.db"))[0]
    run_step("2. inspect one log", ["inspect", str(first_db)])
    first_pcd = sorted((nuplan / "sensor_blobs" / first_db.stem / "MergedPointCloud").glob("*.pcd"))[0]
    run_step("3. inspect one point cloud", ["inspect", str(first_pcd)])
    run_step(
        "4. collect: frame shards (Parquet) and occupancy/flow labels (Zarr)",
        [*collect_args(args.out), "--overwrite"],
    )
    run_step("5. dataset statistics", ["stats", str(split_dir)])
    frame = min(10, int(args.seconds * 2) // 2)  # key frames come at 2 Hz: one in the middle of short logs
    picture = args.out / f"{first_db.stem}_frame{frame}.png"
    run_step(
        "6. a bird's-eye view of one frame",
        ["show", str(split_dir), "--log", first_db.stem, "--frame", str(frame), "--out", str(picture)],
    )
    run_step(
        "7. a short LiDAR-to-occupancy pre-training",
        ["pretrain", "--data", str(dataset), "--split", DEMO_SPLIT, "--max-steps", str(args.steps),
         "--run-dir", str(args.out / "runs"), "--name", "demo", "--eval-every", str(args.steps)],
    )  # fmt: skip
    print(f"\nDemo done. Everything is under {args.out.resolve()}; the picture is {picture}.")


if __name__ == "__main__":
    main()
