"""Metadata-only ``collect`` (no labels, no blob checks) on full-size synthetic logs, against a raw SQL scan.

- **collect vs raw SQL**: one log collected in this process (read the ``.db`` with the nuPlan reader,
  choose key frames, build the Arrow table column-wise, write and commit the Parquet shard) against
  ``SELECT *`` of the same tables with ``sqlite3`` (fetching every row into Python, nothing else),
  same log, same run. Goal: <= 1.5x.
- **frames/s per worker** of that run, and the peak resident memory of the worker
  (``resource.getrusage`` inside the worker process).
- **2 workers vs 1 worker** (local process pool) on the same logs: speed-up of the whole run
  (process start included; goal >= 1.5x on 2 free cores).
- **blob checks**: the same log collected with ``check_blobs`` (presence of every key frame's ``.pcd``
  and 8 ``.jpg``, then their headers: JPEG start/end markers, PCD header and size) against without
  (goal <= 1.3x). The blobs are sparse files of real sizes (150 000-point binary PCD, ~400 KB JPEG)
  with real heads and tails, in the page cache: this measures the check's own cost (a few small reads
  per file), not the disk.
- **object store vs local disk**: the same logs collected with labels (the real workload: frame rows
  and occupancy/flow Zarr groups) to ``s3://`` on a moto server (its own process on 127.0.0.1) and to a
  local folder, same run, in this process, the two taking turns for 5 rounds after a warm-up: the median
  of the rounds' rate ratios (goal >= 0.7x). The object store's run
  uploads every object under per-attempt keys and reads it all back to verify it, puts the manifest
  after each log, and holds the lock object (a heartbeat). Also without labels (frame rows only: the
  Parquet shards and the manifest puts), for information.

``BENCH_COLLECT_SECONDS`` (default 1200 = 20 min, nuPlan's typical log length) and ``BENCH_COLLECT_LOGS``
(default 2) size the synthetic input (databases only, no blobs). ``BENCH_COLLECT_S3_SECONDS`` (default
20) and ``BENCH_COLLECT_S3_LOGS`` (default 2) size the labelled logs of the object-store comparison
(with point clouds and images: 40 key frames per log by default).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from benchmarks.harness import best_time, report, section
from driveengine.collect.frames import FrameOptions, select_frames
from driveengine.collect.runner import CollectConfig, collect
from driveengine.sources import get_source
from driveengine.sources.base import InputLog
from driveengine.synth import SynthLog, synthesize

#: The tables the nuPlan reader queries.
TABLES = (
    "log", "lidar", "camera", "lidar_pc", "ego_pose", "image", "lidar_box", "track", "category", "scene",
    "scenario_tag", "traffic_light_status",
)  # fmt: skip


def raw_sql_scan(db: Path) -> int:
    """Rows of every table the reader needs, fetched with plain sqlite3 (the floor for any reader)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sum(len(con.execute(f"SELECT * FROM {table}").fetchall()) for table in TABLES)
    finally:
        con.close()


def _collect(
    root: Path,
    out: Path | str,
    workers: int,
    logs: list[str] | None = None,
    check_blobs: bool = False,
    labels: bool = False,
):
    config = CollectConfig.from_options(
        source="nuplan", root=root, out=out, split="mini", labels=labels,
        check_blobs=check_blobs, overwrite=True, workers=workers, logs=logs, progress=False,
    )  # fmt: skip
    summary = collect(config, echo=lambda _: None)
    assert summary.ok, summary.format()
    return summary


#: Rounds of the object-store comparison (local and s3 runs taking turns).
ROUNDS = 5

#: Sizes of the sparse placeholder blobs: a full nuPlan sweep (150 000 points of 5 float32 + ring) and a
#: typical 1920x1080 JPEG.
PCD_POINTS = 150_000
JPEG_BYTES = 400_000


def write_key_frame_blobs(log: SynthLog) -> int:
    """Sparse ``.pcd``/``.jpg`` files of real sizes for every key frame of ``log``; returns files written."""
    source = get_source("nuplan")
    data = source.read_log(InputLog(log.log_name, log.db_path))
    candidates = source.key_frame_candidates(data, FrameOptions(split="mini").sample_interval)
    keys = select_frames(
        data, FrameOptions(split="mini", check_blobs=False), None, candidates=candidates
    ).key_sweeps
    header = (
        "# .PCD v0.7\nVERSION 0.7\nFIELDS x y z intensity ring lidar_info\nSIZE 4 4 4 4 4 4\n"
        f"TYPE F F F F F F\nCOUNT 1 1 1 1 1 1\nWIDTH {PCD_POINTS}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {PCD_POINTS}\nDATA binary\n"
    ).encode()
    paths = [(p, header, len(header) + PCD_POINTS * 24) for p in data.sweep_lidar_path[keys]]
    paths += [(p, b"\xff\xd8\xff\xe0", JPEG_BYTES) for p in data.image_path[keys].ravel() if p]
    for rel, head, size in paths:
        path = log.sensor_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(size)
            f.seek(size - 2)
            f.write(b"\xff\xd9" if rel.endswith(".jpg") else b"\0\0")
    return len(paths)


def main() -> None:
    seconds = float(os.environ.get("BENCH_COLLECT_SECONDS", "1200"))
    n_logs = int(os.environ.get("BENCH_COLLECT_LOGS", "2"))
    with tempfile.TemporaryDirectory(prefix="bench_collect_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        logs = synthesize(tmp / "nuplan", logs=n_logs, seconds=seconds, seed=0, split="mini", blobs=False)
        db_mib = sum(log.db_path.stat().st_size for log in logs) / 2**20
        print(
            f"synthetic input: {n_logs} logs x {seconds:.0f} s ({db_mib:.0f} MiB of .db) in {time.perf_counter() - start:.0f} s"
        )

        section("one log, in this process: collect vs raw SQL scan of the same tables")
        first = logs[0]
        sql = best_time(lambda: raw_sql_scan(first.db_path), repeat=3)
        summaries = []
        ours = best_time(
            lambda: summaries.append(_collect(tmp / "nuplan", tmp / "out1", 1, [first.log_name])), repeat=3
        )
        frames = summaries[-1].frames
        report("collect one log (read + frames + parquet + commit)", ours, sql, "s", goal="<= 1.5x")
        print(
            f"  {frames} frames: {frames / ours:.0f} frames/s per worker; peak RSS {summaries[-1].peak_rss_mib:.0f} MiB"
        )

        section("one log: blob checks (presence + headers of every key frame's 9 files) vs none")
        files = write_key_frame_blobs(first)
        runs: dict[bool, list] = {False: [], True: []}

        def run(check: bool) -> None:
            runs[check].append(_collect(tmp / "nuplan", tmp / "out3", 1, [first.log_name], check))

        plain = best_time(lambda: run(False), repeat=3)
        checked = best_time(lambda: run(True), repeat=3)
        with_check, without = runs[True][-1], runs[False][-1]
        assert (with_check.frames, with_check.dropped) == (without.frames, without.dropped), (
            with_check.format()
        )
        report("collect one log with blob checks", checked, plain, "s", goal="<= 1.3x")
        print(f"  {files} files checked: {(checked - plain) / files * 1e6:.1f} us per file")

        section(f"{n_logs} logs: local process pool, 2 workers vs 1")
        one = _timed(lambda: _collect(tmp / "nuplan", tmp / "out1", 1))
        two = _timed(lambda: _collect(tmp / "nuplan", tmp / "out2", 2))
        report(
            "collect all logs, 2 workers (rate)",
            one[0] / two[0],
            1.0,
            "x",
            goal=">= 1.5x on 2 free cores",
            higher_is_better=True,
        )
        print(
            f"  1 worker {one[0]:.2f} s ({one[1].frames / one[0]:.0f} frames/s), 2 workers {two[0]:.2f} s "
            f"({two[1].frames / two[0]:.0f} frames/s, {two[1].frames / two[0] / 2:.0f} per worker); "
            f"peak RSS per worker {two[1].peak_rss_mib:.0f} MiB"
        )

        object_store_vs_local(tmp)


@contextmanager
def moto_server(seconds: float = 30.0):
    """A moto S3 server in its own process on 127.0.0.1 (a free port); yields its s3fs options."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + seconds
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the moto server on {endpoint} did not start") from None
                time.sleep(0.1)
        yield {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def object_store_vs_local(tmp: Path) -> None:
    """The section of the module doc: labelled logs to moto S3 vs to a local folder, same run."""
    import fsspec
    import s3fs

    seconds = float(os.environ.get("BENCH_COLLECT_S3_SECONDS", "20"))
    n_logs = int(os.environ.get("BENCH_COLLECT_S3_LOGS", "2"))
    root = tmp / "labelled"
    synthesize(root, logs=n_logs, seconds=seconds, seed=1, split="mini", image_size=(64, 36))
    with moto_server() as options:
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        fsspec.config.conf["s3"] = dict(options)  # as FSSPEC_S3 in the environment would
        s3fs.S3FileSystem(**options).mkdir("bench")
        for labels in (True, False):
            _compare_to_local(root, tmp, options, n_logs, seconds, labels)
        fsspec.config.conf.pop("s3", None)


def _compare_to_local(
    root: Path, tmp: Path, options: dict, n_logs: int, seconds: float, labels: bool
) -> None:
    import s3fs

    what = "rows + labels" if labels else "rows only"
    section(f"{n_logs} logs of {seconds:.0f} s ({what}), in this process: to moto S3 vs to local disk")
    runs: dict[str, list] = {"local": [], "s3": []}
    targets = {"local": tmp / "out_local", "s3": "s3://bench/out"}
    times: dict[str, list[float]] = {"local": [], "s3": []}
    for round_ in range(ROUNDS + 1):  # the two take turns (a shared machine slows them alike); 1 warm-up
        for name, out in targets.items():
            seconds, summary = _timed(lambda out=out: _collect(root, out, 1, labels=labels))
            runs[name].append(summary)
            if round_:
                times[name].append(seconds)
    frames = runs["s3"][-1].frames
    assert frames == runs["local"][-1].frames
    ratios = sorted(lo / s3 for lo, s3 in zip(times["local"], times["s3"], strict=True))
    local, remote = statistics.median(times["local"]), statistics.median(times["s3"])
    spread = f"median of {ROUNDS} rounds, range {ratios[0]:.2f}-{ratios[-1]:.2f}x"
    report(
        f"collect to s3 ({what}; rate vs local disk)",
        statistics.median(ratios),
        1.0,
        "x",
        goal=f">= 0.7x; {spread}" if labels else f"none, for information; {spread}",
        higher_is_better=True,
    )
    stored = sum(
        info["size"] for info in s3fs.S3FileSystem(**options).find("bench/out", detail=True).values()
    )
    print(
        f"  local {local:.2f} s, s3 {remote:.2f} s for {frames} frames "
        f"({frames / local:.1f} vs {frames / remote:.1f} frames/s); {stored / 2**20:.1f} MiB stored"
    )


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


if __name__ == "__main__":
    main()
