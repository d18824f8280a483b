"""Synthetic world speed: ray casting (numba kernel vs a chunked numpy slab test) and database writing.

Figures are ratios against baselines measured in the same run:

* a full-size LiDAR sweep (150k rays) against all solids: ours (numba, nearest-sphere ordering) vs
  a vectorised numpy slab test over rays x boxes in chunks (the same answer, checked);
* a database-only log: ours (all tables, shuffled, indexed) vs the floor of inserting the same number
  of rows of constant tuples with ``executemany`` into an unindexed table;
* nuScenes metadata at trainval size (a ``NUSCENES_SCALE`` fraction of 850 scenes, extrapolated):
  ours (world evaluation, tokens, rows, JSON) vs the stdlib's ``json.dump(rows, indent=0)`` of the
  same rows (the encoding alone, rows already in memory).
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import best_time, peak_rss_mib, report, section
from driveengine.synth import synthesize, world_for_log
from driveengine.synth.raycast import cast_rays
from driveengine.synth.sensors import FULL_SWEEP_RAYS, LIDAR_MAX_RANGE_M, lidar_directions


def _numpy_cast(origin, dirs, centers, sizes, yaws, max_range, chunk=4096):
    """Baseline: nearest box/ground hit per ray by a numpy slab test over (chunk x boxes)."""
    best = np.full(len(dirs), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(dirs[:, 2] < 0, -origin[2] / dirs[:, 2], np.inf)
    best = np.where(tg <= max_range, tg, np.inf)
    c, s = np.cos(yaws), np.sin(yaws)
    o = origin - centers
    lo_o = np.stack([c * o[:, 0] + s * o[:, 1], -s * o[:, 0] + c * o[:, 1], o[:, 2]], -1)  # (B, 3)
    half = 0.5 * sizes
    for a in range(0, len(dirs), chunk):
        d = dirs[a : a + chunk]
        ld = np.stack(
            [
                d[:, None, 0] * c + d[:, None, 1] * s,
                -d[:, None, 0] * s + d[:, None, 1] * c,
                np.broadcast_to(d[:, None, 2], (len(d), len(c))),
            ],
            -1,
        )  # (R, B, 3)
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-half - lo_o) / ld
            t2 = (half - lo_o) / ld
        near = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf).max(-1)
        far = np.nan_to_num(np.maximum(t1, t2), nan=np.inf).min(-1)
        hit = (near <= far) & (near > 0) & (near <= max_range)
        tb = np.where(hit, near, np.inf).min(axis=1)
        best[a : a + chunk] = np.minimum(best[a : a + chunk], tb)
    return best


def main() -> None:
    section("synth: full-size LiDAR sweep (150k rays)")
    world = world_for_log(0, 0, 20.0)
    ts = int(world.lidar_timestamps_us[0])
    g = world.frame_pose(ts) @ world.ego_from_lidar
    dirs = lidar_directions(FULL_SWEEP_RAYS)[0] @ g[:3, :3].T
    origin = g[:3, 3]
    solids = world.solids_at(ts)
    args = (origin, dirs, solids.center, solids.size, solids.yaw, LIDAR_MAX_RANGE_M)
    ours = cast_rays(*args)
    base = _numpy_cast(*args)
    agree = np.mean(
        np.isclose(
            np.where(np.isfinite(ours.distance), ours.distance, -1),
            np.where(np.isfinite(base), base, -1),
            atol=1e-6,
        )
    )
    print(
        f"rays {len(dirs)}, solids {len(solids)}, hits agree with the numpy baseline on {agree:.4%} of rays"
    )
    t_ours = best_time(lambda: cast_rays(*args), repeat=3)
    t_base = best_time(lambda: _numpy_cast(*args), repeat=1, warmup=0)
    report("full sweep ray cast (numba vs numpy slab)", t_ours, t_base, "s", goal="< 0.1 and well under 1 s")

    section("synth: database-only log (2 min, 2400 sweeps)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        (log,) = synthesize(Path(tmp) / "db", logs=1, seconds=120.0, blobs=False)
        t_ours = time.perf_counter() - start
        n_rows = sum(log.counts.values())
        conn = sqlite3.connect(Path(tmp) / "floor.db")
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE t (a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p)")
        row = (b"01234567", b"01234567", *[1.5] * 14)
        start = time.perf_counter()
        with conn:
            conn.executemany("INSERT INTO t VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [row] * n_rows)
        t_floor = time.perf_counter() - start
        conn.close()
    print(f"rows {n_rows} ({log.counts['lidar_box']} boxes); extrapolated 20-minute log: {t_ours * 10:.1f} s")
    report("db-only log write (ours vs bare executemany floor)", t_ours, t_floor, "s", goal="< 5")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    _nuscenes_metadata()


#: Fraction of trainval's 850 scenes the nuScenes metadata benchmark writes (full size: ~2.5 GB of JSON).
NUSCENES_SCALE = 0.1


def _nuscenes_metadata() -> None:
    import json

    from driveengine.synth import write_nuscenes_metadata

    section(f"synth: nuScenes trainval-sized metadata ({NUSCENES_SCALE:.0%} of 850 scenes, no blobs)")
    with tempfile.TemporaryDirectory() as tmp:
        stats = write_nuscenes_metadata(Path(tmp), scale=NUSCENES_SCALE)
        t_base = 0.0
        for table in ("sample_data", "ego_pose", "sample_annotation"):
            rows = json.loads((Path(tmp) / "v1.0-trainval" / f"{table}.json").read_text())
            start = time.perf_counter()
            with open(Path(tmp) / "dump.json", "w") as f:
                json.dump(rows, f, indent=0)
            t_base += time.perf_counter() - start
            del rows
    scale = 850 / stats.scenes
    print(
        f"{stats.scenes} scenes: {stats.rows['sample_data']} sample_data, {stats.rows['ego_pose']} ego_pose, "
        f"{stats.rows['sample_annotation']} sample_annotation rows, {sum(stats.bytes.values()) / 1e6:.0f} MB JSON; "
        f"worlds built in {stats.build_seconds:.1f} s; extrapolated to 850 scenes: "
        f"{stats.build_seconds + stats.write_seconds * scale:.0f} s, {sum(stats.bytes.values()) * scale / 1e9:.2f} GB "
        f"({stats.rows['ego_pose'] * scale / 1e6:.2f}M ego_pose, {stats.rows['sample_annotation'] * scale / 1e6:.2f}M "
        "sample_annotation)"
    )
    report(
        "nuScenes metadata rows (all tables vs json.dump of 3 big ones)",
        stats.write_seconds,
        t_base,
        "s",
        goal="< 2",
    )


if __name__ == "__main__":
    main()
