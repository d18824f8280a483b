"""Label generation speed and size (driveengine/collect/labels.py, voxel_ops.py, store/occ.py), one core.

Inputs are synthetic but realistic: full-size 150k-ray LiDAR sweeps of the synthetic world
(:mod:`driveengine.synth`), ring-ordered like real merged point clouds. Every figure is a ratio against
a floor measured in the same run:

* voxelisation (transform + voxel index + count) vs ``np.bincount`` of precomputed voxel indices;
* points in boxes (numba, BEV bins) vs a numpy loop over the boxes;
* ray casting (DDA, one ray per distinct end voxel and one per point) vs scattering the same number of
  voxel visits into the grid with ``np.bincount``;
* end to end (read nothing: sweeps are preloaded; aggregate, vote, cast, compress, write Zarr) frames/s
  vs only writing the same frames to Zarr;
* bytes per frame in Zarr vs the same labels as OpenScene sparse ``.npy`` files;
* the shipped recipes at each grid preset (``openscene``, ``occ3d``, ``fine``: whole-track objects and
  ``mask_camera``) end to end, frames/s per core (goal >= 27 at ``openscene``), ``fine`` against
  ``openscene`` (goal <= 8x slower; ``fine`` has 8x the voxels), the same without ``mask_camera``, and
  ``openscene`` with its static points merged into quarter-voxel cells (the recipe) vs every point
  voxelised (``static_cell_voxels = 0``);
* ``mask_camera`` of one frame (walking the cameras' rays through its labels) vs ``mask_lidar`` of the
  same frame (casting the key frame's sweep), per preset (goal <= 2x), and the same frame through cameras
  of nuPlan's size (1920 x 1080, f = 1545 px) on the log's mounts (the synthetic rig's 160 x 90 images
  are coarser than the lattice needs, so its rays are every pixel's); and the one-time cost of the rig's
  rays and their recorded walks (built once per rig and process, so the end-to-end runs, best of 3, reuse
  them);
* peak memory of labelling one log at ``fine`` (and ``openscene``), in a fresh process, against that
  process's peak after loading the inputs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from benchmarks.harness import best_time, peak_rss_mib, report, section

SECONDS = 12.0  # log length: 25 key frames at 2 Hz


def _setup(rays: int) -> tuple:
    from driveengine.sources.nuplan.reader import read_nuplan_log
    from driveengine.synth import synthesize
    from driveengine.synth.sensors import lidar_sweep

    tmp = Path(tempfile.mkdtemp(prefix="bench_labels_"))
    synth = synthesize(tmp, logs=1, seconds=SECONDS, seed=0, blobs=False)[0]
    log = read_nuplan_log(synth.db_path)
    keys = np.arange(0, log.num_sweeps, 10)
    sweeps = {
        int(k): lidar_sweep(synth.world, int(log.sweep_timestamp_us[k]), rays, int(k)).xyz for k in keys
    }
    return tmp, log, keys, sweeps


def main() -> None:
    numba.set_num_threads(1)
    from driveengine.schemas import GRID

    from driveengine.formats.openscene_labels import dense_to_sparse
    from driveengine.labels import voxel_ops as vo
    from driveengine.labels.generator import LabelConfig, LabelGenerator, write_log_labels
    from driveengine.store.occ import create_occ, open_occ
    from driveengine.synth.sensors import FULL_SWEEP_RAYS

    lo, vs, shape = vo.grid_params(GRID)
    nv = GRID.num_voxels
    tmp, log, keys, sweeps = _setup(FULL_SWEEP_RAYS)
    k0 = int(keys[len(keys) // 2])
    pts = sweeps[k0]
    section(f"one sweep: {len(pts)} points (150k rays), grid {GRID.shape}")

    # -- voxelisation -----------------------------------------------------------------------------------
    yaw = 0.3
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    trans = np.array([1.5, -2.0, 0.1])
    counts = np.zeros(nv, np.int32)
    lin = vo.points_to_voxels(pts, rot, trans, lo, vs, shape)
    inside = lin[lin >= 0]
    t_ours = best_time(lambda: vo.accumulate_counts(pts, rot, trans, lo, vs, shape, counts), repeat=9)
    t_floor = best_time(lambda: np.bincount(inside, minlength=nv), repeat=9)
    report("voxelise: transform + index + count (numba)", t_ours * 1e3, t_floor * 1e3, "ms", "<= 5x bincount")
    occupied = np.zeros(vo.bitset_words(nv), np.uint64)
    contested = np.zeros_like(occupied)
    vo.mark_voxels(inside[:: max(1, len(inside) // 2000)], contested)  # ~2000 voxels shared with objects
    pts_f = np.asfortranarray(pts)  # the generator keeps its sweeps column-major (vectorised loop)
    t_static = best_time(
        lambda: vo.accumulate_static(pts_f, rot, trans, lo, vs, shape, occupied, contested, counts), repeat=9
    )
    report(
        "voxelise as the generator does (occupancy bits)",
        t_static * 1e3,
        t_floor * 1e3,
        "ms",
        "<= 5x bincount",
    )
    t_rows = best_time(
        lambda: vo.accumulate_static(pts, rot, trans, lo, vs, shape, occupied, contested, counts), repeat=9
    )
    report("voxelise: column-major points (stored) vs row-major", t_static * 1e3, t_rows * 1e3, "ms", "< 1")

    def numpy_voxelise() -> np.ndarray:
        q = pts.astype(np.float64) @ rot.T + trans
        ijk = np.floor((q - lo) / vs).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < shape), axis=1)
        return np.bincount(np.ravel_multi_index(ijk[ok].T, GRID.shape), minlength=nv)

    t_np = best_time(numpy_voxelise, repeat=5)
    report("voxelise: numba vs the same in plain numpy", t_ours * 1e3, t_np * 1e3, "ms", "< 1")

    # -- points in boxes ---------------------------------------------------------------------------------
    b = log.boxes(k0)
    from driveengine.geometry import make_transform, yaw_to_quaternion
    from driveengine.labels.generator import relative_transform

    g_box = make_transform(yaw_to_quaternion(log.box_yaw[b]), log.box_center[b])
    box_from_ego = relative_transform(g_box, log.global_from_ego()[k0])
    half = 0.5 * log.box_size[b] + 0.2
    br, bt = np.ascontiguousarray(box_from_ego[:, :3, :3]), np.ascontiguousarray(box_from_ego[:, :3, 3])
    t_pib = best_time(lambda: vo.points_in_boxes(pts, br, bt, -half, half, 4.0), repeat=9)

    def numpy_pib() -> np.ndarray:
        out = np.full(len(pts), -1)
        p = pts.astype(np.float64)
        for i in range(len(half)):  # broadcasting rather than matmul: no BLAS threads in the baseline
            q = (p[:, None, :] * br[i][None]).sum(axis=2) + bt[i]
            out[np.all(np.abs(q) <= half[i], axis=1) & (out < 0)] = i
        return out

    t_pib_np = best_time(numpy_pib, repeat=3)
    report(
        f"points in {len(half)} boxes (numba, BEV bins)",
        t_pib * 1e3,
        t_pib_np * 1e3,
        "ms",
        "< 0.1 numpy per box",
    )

    # -- ray casting ---------------------------------------------------------------------------------------
    origin = log.ego_from_lidar[:3, 3].copy()
    state = np.zeros(nv, np.uint8)
    ws = np.zeros(nv, np.uint8)
    eye, zero = np.eye(3), np.zeros(3)
    rays, visits = vo.cast_rays_dedup(origin, pts, eye, zero, lo, vs, shape, state, ws)
    t_dedup = best_time(
        lambda: vo.cast_rays_dedup(origin, pts, eye, zero, lo, vs, shape, state, ws), repeat=5
    )
    visit_idx = np.random.default_rng(0).integers(0, nv, visits)
    t_scatter = best_time(lambda: np.bincount(visit_idx, minlength=nv), repeat=5)
    report(f"ray casting, {rays} rays to distinct end voxels", t_dedup * 1e3, t_scatter * 1e3, "ms",
           f"<= 3x scattering its {visits} visits")  # fmt: skip
    p64 = pts.astype(np.float64)
    exact_visits = vo.cast_rays(origin, p64, lo, vs, shape, state)
    t_exact = best_time(lambda: vo.cast_rays(origin, p64, lo, vs, shape, state), repeat=3)
    visit_idx = np.random.default_rng(0).integers(0, nv, exact_visits)
    t_scatter2 = best_time(lambda: np.bincount(visit_idx, minlength=nv), repeat=3)
    report(f"ray casting, one ray per point ({len(pts)})", t_exact * 1e3, t_scatter2 * 1e3, "ms",
           f"<= 3x scattering its {exact_visits} visits")  # fmt: skip

    # -- end to end ----------------------------------------------------------------------------------------
    section(f"end to end: {len(keys)} key frames, +-10 s windows of 2 Hz sweeps, one core")
    cfg = LabelConfig()
    gen = LabelGenerator(log, keys, sweeps.get, cfg)
    for _ in gen.frames():  # warm-up (compilation is cached on disk, loading is not)
        break
    start = time.perf_counter()
    for _ in LabelGenerator(log, keys, sweeps.get, cfg).frames():
        pass
    fps_gen = len(keys) / (time.perf_counter() - start)
    zpath = tmp / "labels.zarr"
    stats = write_log_labels(log, keys, zpath, cfg, load_points=sweeps.get)
    t_e2e = best_time(
        lambda: write_log_labels(log, keys, _fresh(zpath), cfg, load_points=sweeps.get), repeat=3
    )
    occ = open_occ(zpath)
    frames = [occ.frame(i) for i in range(occ.num_frames)]
    start = time.perf_counter()
    with create_occ(tmp / "copy.zarr", len(frames), generator={}) as w:
        for f in frames:
            w.append(semantics=f[0], flow=f[1], mask_lidar=f[2])
    t_write = time.perf_counter() - start
    fps, fps_write = len(keys) / t_e2e, len(keys) / t_write
    report("labels without writing, frames/s", fps_gen, fps_write, "frame/s", "vs Zarr writing alone",
           higher_is_better=True)  # fmt: skip
    report("labels end to end, frames/s (goal >= 20)", fps, fps_write, "frame/s", "as close to 1 as possible",
           higher_is_better=True)  # fmt: skip
    print(f"    points per frame {stats['points_per_frame']:.0f}, rays per frame {stats['rays'] / len(keys):.0f}, "
          f"occupied voxels per frame {stats['occupied_voxels_per_frame']:.0f}")  # fmt: skip

    # -- size ------------------------------------------------------------------------------------------------
    section("size on disk")
    zbytes = sum(f.stat().st_size for f in zpath.rglob("*") if f.is_file())
    zbytes_no_mask = sum(
        f.stat().st_size for f in zpath.rglob("*") if f.is_file() and "mask_lidar" not in f.parts
    )
    npy = 0
    for f in frames:
        occ_sparse, flow_sparse = dense_to_sparse(f.semantics, f.flow)
        for arr in (occ_sparse, flow_sparse):
            buf = io.BytesIO()
            np.save(buf, arr)
            npy += buf.tell()
    n = len(frames)
    report("bytes/frame: Zarr (semantics, flow, mask) vs OpenScene .npy", zbytes / n, npy / n, "B", "<= 0.5")
    report("bytes/frame: Zarr without the mask vs OpenScene .npy", zbytes_no_mask / n, npy / n, "B", "<= 0.5")
    section("memory")
    print(f"peak RSS of this benchmark process: {peak_rss_mib():.0f} MiB")

    _presets(tmp, log, keys, sweeps)


def _fresh(path: Path) -> Path:
    """``path`` removed if it exists (a label group is written to a new folder)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


#: The grid presets measured, in report order.
PRESETS = ("openscene", "occ3d", "fine")


def _presets(tmp: Path, log, keys: np.ndarray, sweeps: dict[int, np.ndarray]) -> None:
    """The shipped recipes at each grid preset: end to end, mask_camera vs mask_lidar, memory per log."""
    from dataclasses import replace

    from driveengine.schemas.classes import OPENSCENE_CLASSES

    from driveengine.labels import camera_visibility as cv
    from driveengine.labels import voxel_ops as vo
    from driveengine.labels.camera_visibility import CameraMasker, camera_rays, rig_rays
    from driveengine.labels.generator import LabelGenerator, write_log_labels
    from driveengine.labels.recipe import RECIPES
    from driveengine.store.occ import open_occ

    section(
        f"grid presets: shipped recipes (whole-track objects, mask_camera), {len(keys)} key frames, one core"
    )
    fps: dict[str, float] = {}
    fps_no_cam: dict[str, float] = {}
    mask_ratio: dict[str, tuple[float, float, float]] = {}
    rig_seconds: dict[str, float] = {}
    for name in PRESETS:
        cfg = RECIPES[name]
        grid = cfg.grid
        for _ in LabelGenerator(log, keys[:1], sweeps.get, cfg).frames():  # compile / warm caches
            pass
        runs = []
        variants = [cfg, replace(cfg, camera_mask=False)]
        if name == "openscene":
            variants.append(replace(cfg, static_cell_voxels=0.0))
        for c in variants:
            zpath = tmp / f"preset-{name}-{c.camera_mask}-{c.static_cell_voxels}.zarr"
            # best of 3 whole logs after one (the first run of a process loads caches and allocates)
            seconds = best_time(
                lambda c=c, zpath=zpath: write_log_labels(
                    log, keys, _fresh(zpath), c, load_points=sweeps.get
                ),
                repeat=3,
            )
            runs.append(len(keys) / seconds)
        fps[name], fps_no_cam[name] = runs[:2]
        if name == "openscene":
            fps_points = runs[2]
        # one frame's masks: mask_camera through its labels vs mask_lidar of its own sweep
        occ = open_occ(tmp / f"preset-{name}-True-{cfg.static_cell_voxels}.zarr")  # the recipe's
        mid = len(keys) // 2
        sem = np.ascontiguousarray(occ.frame(mid).semantics)
        cv._RIG_CACHE.clear()  # the rig's rays and walks from scratch: what a worker's first log of a rig pays
        start = time.perf_counter()
        rays, _ = camera_rays(log, grid)
        rays.steps(grid)
        rig_seconds[name] = time.perf_counter() - start
        masker = CameraMasker(rays, grid, OPENSCENE_CLASSES.free)
        out = np.zeros(grid.num_voxels, dtype=bool)
        t_cam = best_time(lambda: masker.mask(sem, out=out), repeat=3)  # noqa: B023
        lo, vs, shape = vo.grid_params(grid)
        state = np.zeros(grid.num_voxels, np.uint8)
        ws = np.zeros(grid.num_voxels, np.uint8)
        pts = sweeps[int(keys[mid])]
        origin = log.ego_from_lidar[:3, 3].copy()
        eye, zero = np.eye(3), np.zeros(3)
        t_lidar = best_time(
            lambda: vo.cast_rays_dedup(origin, pts, eye, zero, lo, vs, shape, state, ws),  # noqa: B023
            repeat=3,
        )
        # the same frame through cameras of nuPlan's size (1920 x 1080, f = 1545 px, pinhole) on the log's mounts:
        # the synthetic rig's 160 x 90 images are coarser than the lattice needs, real ones are not
        k_full = np.tile(
            np.array([[1545.0, 0.0, 960.0], [0.0, 1545.0, 540.0], [0.0, 0.0, 1.0]]), (len(rays.cameras), 1, 1)
        )
        full_rays = rig_rays(k_full, log.ego_from_camera(), np.tile([1920, 1080], (len(k_full), 1)), grid)
        full = CameraMasker(full_rays, grid, OPENSCENE_CLASSES.free)
        t_full = best_time(lambda: full.mask(sem, out=out), repeat=3)  # noqa: B023
        mask_ratio[name] = (t_cam, t_lidar, t_full)
        print(
            f"    {name}: grid {grid.describe()}, {rays.num_rays} camera rays, {masker.visits} camera visits;"
            f" nuPlan-size cameras: strides {full_rays.strides}, {full_rays.num_rays} rays, {full.visits} visits"
        )
    for name in PRESETS:
        report(f"{name}: labels end to end, frames/s" + (" (goal >= 27)" if name == "openscene" else ""),
               fps[name], fps_no_cam[name], "frame/s", "vs the same without mask_camera",
               higher_is_better=True)  # fmt: skip
    cell = RECIPES["openscene"].static_cell_voxels
    report(f"openscene: static points in {cell}-voxel cells vs every point, frames/s", fps["openscene"],
           fps_points, "frame/s", "> 1 (static_cell_voxels = 0 voxelises every point)",
           higher_is_better=True)  # fmt: skip
    report("fine vs openscene: seconds per frame (goal <= 8)", 1 / fps["fine"], 1 / fps["openscene"], "s",
           "<= 8 (fine has 8x the voxels)")  # fmt: skip
    report("occ3d vs openscene: seconds per frame", 1 / fps["occ3d"], 1 / fps["openscene"], "s",
           "about 1 (same voxel count)")  # fmt: skip
    for name in PRESETS:
        t_cam, t_lidar, t_full = mask_ratio[name]
        report(f"{name}: mask_camera vs mask_lidar, ms per frame", t_cam * 1e3, t_lidar * 1e3, "ms", "<= 2")
        report(f"{name}: mask_camera of nuPlan-size cameras vs mask_lidar, ms per frame", t_full * 1e3,
               t_lidar * 1e3, "ms", "<= 2")  # fmt: skip
        print(f"    {name}: the rig's camera rays and their recorded walks, built once per rig and process (a worker's first log of "
              f"a vehicle): {rig_seconds[name] * 1e3:.0f} ms = {rig_seconds[name] * 1e3 / len(keys):.1f} ms per "
              f"frame of this {len(keys)}-frame log (the end-to-end runs above reuse them)")  # fmt: skip

    section("peak memory per log (a fresh process: inputs loaded, peak reset, then one log labelled)")
    inputs = tmp / "sweeps.npz"
    np.savez(inputs, keys=keys, **{str(k): v for k, v in sweeps.items()})
    for name in ("openscene", "fine"):
        child = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(log.path), str(inputs), name, str(tmp / f"mem-{name}.zarr")],
            capture_output=True, text=True, timeout=1800, check=True,
        )  # fmt: skip
        m = json.loads(child.stdout.strip().splitlines()[-1])
        report(f"{name}: peak RSS labelling one log ({len(keys)} frames)", m["peak_mib"], m["inputs_mib"], "MiB",
               f"bounded; {m['peak_mib'] - m['inputs_mib']:.0f} MiB above the inputs")  # fmt: skip


#: Labels one log in a fresh process and prints {"inputs_mib" (RSS with the inputs loaded), "peak_mib" (peak
#: RSS while labelling: VmHWM reset through /proc/self/clear_refs)} as JSON (argv: db, sweeps.npz, recipe, out).
_MEMORY_CHILD = """
import json, resource, sys
import numba
import numpy as np
numba.set_num_threads(1)
from driveengine.sources.nuplan.reader import read_nuplan_log
from driveengine.labels.generator import write_log_labels
from driveengine.labels.recipe import RECIPES
db, inputs, name, out = sys.argv[1:]
log = read_nuplan_log(db)
with np.load(inputs) as z:
    keys = z["keys"]
    sweeps = {int(k): z[str(int(k))] for k in keys}
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts from the current RSS
    f.write("5")
write_log_labels(log, keys, out, RECIPES[name], load_points=sweeps.get)
print(json.dumps({"inputs_mib": before, "peak_mib": status("VmHWM")}))
"""


if __name__ == "__main__":
    main()
