"""Source readers: ``read_nuplan_log`` vs a raw ``SELECT ... fetchall``, and the bounded unpickler vs pickle.

One full-size, database-only synthetic log (``driveengine.synth``, 20 minutes of driving: 24,000
``lidar_pc`` rows at 20 Hz, ~0.85M ``lidar_box`` rows, 96,000 images, 120,000 ego poses, rows in shuffled
order, every token column indexed) is written once and cached under the temp directory
(``$DRIVEENGINE_BENCH_CACHE`` to move it). The baseline is the floor of any reader built on the
standard library's ``sqlite3``: fetching the same columns as Python tuples, with no conversion,
no joins and no sorting. Goal: ours <= 1.5x the baseline. The general token path (nuPlan-schema
databases whose tokens are not 8 bytes) is timed against the fast path on the same log.

OpenScene metadata: a synthetic ``meta_datas/<split>/<log>.pkl`` of the real layout (2,400 key frames,
about 45 numpy arrays each, 60 boxes per frame; ~37 MB, pickle protocol 4) loaded with
``restricted_loads`` (opcode scan, guarded numpy/builtins, budget walk) vs plain ``pickle.loads``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

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


def openscene_metadata(frames: int = 2400, boxes: int = 60, seed: int = 0) -> bytes:
    """A pickled OpenScene v1.1 metadata list of the real layout (keys, nesting, array shapes and dtypes)."""
    rng = np.random.default_rng(seed)
    channels = ("CAM_F0", "CAM_L0", "CAM_R0", "CAM_L1", "CAM_R1", "CAM_L2", "CAM_R2", "CAM_B0")
    out = []
    for i in range(frames):
        token = f"{rng.integers(2**62):016x}"
        out.append({
            "token": token, "frame_idx": i, "timestamp": 1_620_000_000_000_000 + 500_000 * i,
            "log_name": "2021.05.12.22.00.38_veh-35_01008_01518", "log_token": "00112233aabbccdd",
            "scene_name": f"log-0001-scene-{i // 40:04d}", "scene_token": f"{i // 40:016x}",
            "map_location": "us-nv-las-vegas-strip", "roadblock_ids": ["1001", "2001"], "vehicle_name": "veh-35",
            "can_bus": rng.normal(size=18), "lidar_path": f"log/MergedPointCloud/{token}.pcd",
            "lidar2ego_translation": rng.normal(size=3), "lidar2ego_rotation": [1.0, 0.0, 0.0, 0.0],
            "ego2global_translation": rng.normal(size=3), "ego2global_rotation": rng.normal(size=4),
            "ego_dynamic_state": [8.0, 0.1, 0.2, 2.4], "traffic_lights": [(1000 + k, k % 2 == 0) for k in range(3)],
            "driving_command": np.array([0, 1, 0, 0]),
            "cams": {
                ch: {"data_path": f"log/{ch}/{token}.jpg", "sensor2lidar_rotation": np.eye(3),
                     "sensor2lidar_translation": rng.normal(size=3), "cam_intrinsic": np.eye(3) * 1000,
                     "distortion": np.zeros(5)}
                for ch in channels
            },
            "sample_prev": None, "sample_next": None,
            "ego2global": np.eye(4), "lidar2ego": np.eye(4), "lidar2global": np.eye(4),
            "anns": {
                "gt_boxes": rng.normal(size=(boxes, 7)), "gt_names": np.array(["vehicle"] * boxes),
                "gt_velocity_3d": rng.normal(size=(boxes, 3)),
                "instance_tokens": [f"{k:016x}" for k in range(boxes)],
                "track_tokens": [f"{k:016x}" for k in range(boxes)],
            },
        })  # fmt: skip
    return pickle.dumps(out, protocol=4)


def bench_openscene_metadata() -> None:
    from driveengine.sources.openscene.reader import OPENSCENE_GLOBALS
    from driveengine.sources.safe_pickle import restricted_loads

    section("OpenScene metadata: bounded restricted unpickler vs plain pickle.loads")
    data = openscene_metadata()
    print(f"metadata: {len(data) / 2**20:.0f} MiB, protocol 4")
    restricted_loads(data, OPENSCENE_GLOBALS, "bench.pkl")  # compiles/loads the scan kernel
    cpu = {"ours": float("inf"), "baseline": float("inf")}
    for _ in range(3):
        for name, fn in (
            ("ours", lambda: restricted_loads(data, OPENSCENE_GLOBALS, "bench.pkl")),
            ("baseline", lambda: pickle.loads(data)),
        ):
            start = time.process_time()
            fn()
            cpu[name] = min(cpu[name], time.process_time() - start)
    report("restricted_loads vs pickle.loads (CPU)", cpu["ours"], cpu["baseline"], "s", goal="<= 2.5")


def main() -> None:
    from driveengine.sources.nuplan.reader import _read, read_nuplan_log

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

    def read(general: bool) -> None:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            _read(con, path, general=general)
        finally:
            con.close()

    paths = {}
    for name, general in (("fast", False), ("general", True)):
        start = time.process_time()
        read(general)
        paths[name] = time.process_time() - start
    report(
        "general token path vs fast path, same log (CPU)", paths["general"], paths["fast"], "s", goal="<= 3"
    )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    bench_openscene_metadata()


if __name__ == "__main__":
    main()
