"""nuPlan log reader: ``read_nuplan_log`` vs a raw ``SELECT ... fetchall`` of the same tables and columns.

One full-size, database-only synthetic log (``driveengine.synth``, 20 minutes of driving: 24,000
``lidar_pc`` rows at 20 Hz, ~0.85M ``lidar_box`` rows, 96,000 images, 120,000 ego poses, rows in shuffled
order, every token column indexed) is written once and cached under the temp directory
(``$DRIVEENGINE_BENCH_CACHE`` to move it). The baseline is the floor of any reader built on the
standard library's ``sqlite3``: fetching the same columns as Python tuples, with no conversion,
no joins and no sorting. Goal: ours <= 1.5x the baseline.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from benchmarks.harness import best_time, peak_rss_mib, report, section

SECONDS = 1200.0  # 20 minutes of driving: 24,000 sweeps at 20 Hz
CACHE_VERSION = 1

#: The raw baseline: the same tables and columns the reader needs, fetched as tuples.
BASELINE_QUERIES = (
    "SELECT token, vehicle_name, logfile, location, map_version FROM log",
    "SELECT token, channel, translation, rotation FROM lidar",
    "SELECT token, channel, translation, rotation, intrinsic, distortion, width, height FROM camera",
    "SELECT token, ego_pose_token, lidar_token, scene_token, filename, timestamp FROM lidar_pc",
    "SELECT token, x, y, z, qw, qx, qy, qz, vx, vy, vz, acceleration_x, acceleration_y, acceleration_z, "
    "angular_rate_x, angular_rate_y, angular_rate_z FROM ego_pose",
    "SELECT token, camera_token, filename_jpg, timestamp FROM image",
    "SELECT token, lidar_pc_token, track_token, x, y, z, width, length, height, vx, vy, vz, yaw, confidence "
    "FROM lidar_box",
    "SELECT token, category_token FROM track",
    "SELECT token, name FROM category",
    "SELECT token, name, roadblock_ids FROM scene",
    "SELECT token, lidar_pc_token, type, agent_track_token FROM scenario_tag",
    "SELECT token, lidar_pc_token, lane_connector_id, status FROM traffic_light_status",
)


def cached_log() -> Path:
    """The full-size benchmark log (synthetic world, database only), built on first use and reused."""
    from driveengine.synth import synthesize

    root = Path(os.environ.get("DRIVEENGINE_BENCH_CACHE", Path(tempfile.gettempdir()) / "driveengine-bench"))
    path = root / f"reader-synth-{SECONDS:.0f}s-v{CACHE_VERSION}.db"
    if not path.exists():
        start = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:  # same file system: the move is a rename
            (log,) = synthesize(tmp, logs=1, seconds=SECONDS, seed=0, blobs=False)
            shutil.move(log.db_path, path)
        print(f"synthesised {path} in {time.perf_counter() - start:.1f} s")
    return path


def raw_select(path: Path) -> int:
    """The baseline: one connection, fetchall of every table's needed columns as plain tuples."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sum(len(con.execute(sql).fetchall()) for sql in BASELINE_QUERIES)
    finally:
        con.close()


def main() -> None:
    from driveengine.sources.nuplan_db import read_nuplan_log

    section("nuPlan log reader (full-size database-only log)")
    path = cached_log()
    data = read_nuplan_log(path)
    print(
        f"log: {data.num_sweeps} sweeps, {len(data.box_token)} boxes, "
        f"{int((data.image_path != '').sum())} matched images, {path.stat().st_size / 2**20:.0f} MiB"
    )
    # The read above warmed the page cache. Alternate the two so that load changes hit both alike, and
    # report CPU time too: on a shared machine wall time mostly measures the neighbours.
    wall = {"ours": float("inf"), "baseline": float("inf")}
    cpu = dict(wall)
    for _ in range(3):
        for name, fn in (("ours", lambda: read_nuplan_log(path)), ("baseline", lambda: raw_select(path))):
            start_cpu = time.process_time()
            wall[name] = min(wall[name], best_time(fn, repeat=1, warmup=0))
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    report(
        "read_nuplan_log vs raw SELECT fetchall (wall)", wall["ours"], wall["baseline"], "s", goal="<= 1.5"
    )
    report("read_nuplan_log vs raw SELECT fetchall (CPU)", cpu["ours"], cpu["baseline"], "s", goal="<= 1.5")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
