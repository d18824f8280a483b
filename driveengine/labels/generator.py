"""Occupancy, flow and LiDAR-visibility labels of one log, written to ``occ/<log>.zarr`` (DESIGN §3).

OpenScene released its labels but not the code that made them; this is DriveEngine's generator,
following the baseline of reference §5. For every key frame ``t`` (a row of ``meta/<log>.parquet``):

1. **Window.** The sweeps ``k`` of the *label sweep set* (the key frames' sweeps, plus every
   ``sweep_step``-th sweep counted from each key frame when ``sweep_step > 0``) whose timestamp lies
   within ``window_s`` of ``t`` (inclusive).
2. **Points in boxes** (once per sweep, in the sweep's ego frame). A point belongs to a box if, in the
   box frame, ``|x| <= length/2 + m``, ``|y| <= width/2 + m`` and ``-height/2 <= z <= height/2 + m``
   with ``m = box_margin_m``: boxes grow sideways and upwards to catch the returns of real surfaces
   just outside noisy boxes, but not downwards, where the ground is. Points in the lowest
   ``c = box_ground_clearance_m`` of a (grown) box are ambiguous between the ground around or under
   the object and the object's own bottom: they are dropped (counted as ``ground_band_points``), so
   the ground is never carried along with an object and an object's voxels never turn into a trail
   of background. A point in several boxes goes to the one it lies deepest in (smallest normalised
   L-infinity distance to the grown box's centre; ties to the first box of the sweep). Boxes with a
   non-positive or non-finite size are ignored (counted as ``degenerate_boxes``).
3. **Static points** (in no box) are moved rigidly into ``ego_t``:
   ``ego_t_from_ego_k = inv(global_from_ego_t) @ global_from_ego_k`` (see :func:`relative_transform`);
   label ``BACKGROUND`` (10), flow 0.
4. **Object points** are expressed in their box's frame at ``k`` and re-placed at the box of the same
   track at ``t``; label = the track's class, velocity = the box's velocity at ``t`` (global) rotated
   into ``ego_t``. Points of tracks that have no box at ``t`` are dropped (no ghost trails).
5. **Voxelise** on the grid (half-open range, outside points dropped, never clamped), **majority vote**
   per voxel, ties to the lowest class id; ``FREE`` (16) where no point fell. Flow = mean (vx, vy) of
   the points carrying the winning class, 0 for background.
6. **Visibility** (``mask_lidar``): a 3D DDA (Amanatides-Woo) from the sensor origin
   (``ego_from_lidar`` translation) of each visibility sweep to each of its returns, clipped to the
   grid: the voxels a ray crosses and the voxel it ends in are observed. ``visibility="frame"``
   (default) uses the key frame's own sweep only: the mask then says what the LiDAR saw at ``t``, which
   is what evaluation should be restricted to; ``"window"`` uses every sweep of the window, each from
   its own sensor position moved into ``ego_t`` (OpenScene-style aggregated rays: a larger mask, about
   as many times slower as there are sweeps). With ``ray_dedup`` one ray per distinct end voxel is cast,
   to the voxel's centre (see :func:`~driveengine.labels.voxel_ops.cast_rays_dedup`).

Each sweep is read, cleaned (non-finite points dropped and counted) and split into static/object
points once, and reused by every frame whose window holds it (a sliding window over the log). Frames
are written one shard at a time, so memory is bounded by the window of prepared sweeps (about 12 bytes
per point: 1.4 MB for a 117k-point nuPlan sweep, so ~60 MB at 2 Hz and ~560 MB at 20 Hz for +-10 s)
plus one shard (``shard_frames`` x 3.8 MB) plus about 12 MB of per-frame workspaces.

Kernels are serial (see :mod:`~driveengine.labels.voxel_ops`); ``collect`` runs one log per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.geometry import make_transform, yaw_to_quaternion
from driveengine.labels import voxel_ops as vo
from driveengine.schemas import FORMAT_VERSION, GRID, VoxelGrid
from driveengine.schemas.classes import BACKGROUND, FREE, OPENSCENE_CLASSES, ClassTable
from driveengine.sources.base import Source
from driveengine.sources.logdata import LogData
from driveengine.store.occ import OccStorage

if TYPE_CHECKING:
    from driveengine.labels.base import LabelJob

#: Bumped whenever the algorithm changes its output for the same inputs and config.
GENERATOR_VERSION = 1

#: Loads the points of sweep ``k``: (n, 3) x, y, z in that sweep's ego frame, metres, or None if the
#: sweep's point cloud is unavailable.
PointLoader = Callable[[int], "np.ndarray | None"]


class LabelError(DriveEngineError):
    """The inputs of the label generator are inconsistent (e.g. key frames out of order)."""


@dataclass(frozen=True)
class LabelConfig:
    """The generator's recipe: every setting that changes the labels (recorded with them and part of the
    config hash via :meth:`to_dict`). A :class:`~driveengine.labels.base.LabelProducer`.

    Attributes:
        window_s: sweeps within this many seconds of a key frame (either side, inclusive) are aggregated.
        sweep_step: 0 = aggregate the key frames' sweeps only (2 Hz, the OpenScene baseline);
            n >= 1 = also every n-th sweep counted from each key frame (nuPlan's 20 Hz sweeps: 5 gives
            4 Hz). Time and the memory of the sweep window grow with the number of sweeps.
        box_margin_m: boxes are enlarged by this much on each side and on top when assigning points, m.
            0.2 m rather than OccNet's 0.5 m: enough for the returns of surfaces just outside nuPlan's
            (network-estimated) boxes, while 0.5 m would also swallow poles, kerbs and neighbours.
        box_ground_clearance_m: points in this lowest part of a box are dropped, m (see module doc).
        visibility: ``"frame"`` (rays of the key frame's own sweep) or ``"window"`` (rays of every
            aggregated sweep).
        ray_dedup: cast one ray per distinct end voxel instead of one per point.
        grid: the voxel grid.
    """

    window_s: float = 10.0
    sweep_step: int = 0
    box_margin_m: float = 0.2
    box_ground_clearance_m: float = 0.1
    visibility: Literal["frame", "window"] = "frame"
    ray_dedup: bool = True
    grid: VoxelGrid = GRID
    kind = "generator"

    def __post_init__(self) -> None:
        if not self.window_s >= 0:
            raise ValueError(f"LabelConfig.window_s must be >= 0, got {self.window_s}")
        if self.sweep_step < 0:
            raise ValueError(f"LabelConfig.sweep_step must be >= 0, got {self.sweep_step}")
        if self.box_margin_m < 0 or self.box_ground_clearance_m < 0:
            raise ValueError("LabelConfig.box_margin_m and box_ground_clearance_m must be >= 0")
        if self.visibility not in ("frame", "window"):
            raise ValueError(f"LabelConfig.visibility must be 'frame' or 'window', got {self.visibility!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the generator's name and versions (part of the config hash)."""
        d = asdict(self)
        d["grid"] = self.grid.to_dict()
        return {"generator": "driveengine.labels.generator", "generator_version": GENERATOR_VERSION,
                "format_version": FORMAT_VERSION, **d}  # fmt: skip

    def check(self, source: Source) -> None:
        """The generator's kernels vote over OpenScene-style tables (objects below ``background``, then
        ``background``, then ``free``): refuse another table clearly."""
        table = source.class_table
        if (table.background, table.free) != (BACKGROUND, FREE):
            raise LabelError(
                f"the label generator needs a class table with background {BACKGROUND} and free {FREE}; "
                f"source {source.name} uses {table.name} (background {table.background}, free {table.free})"
            )

    def write(self, job: LabelJob) -> dict[str, Any]:
        """Generate and write the labels of ``job`` (see :func:`write_log_labels`)."""
        return write_log_labels(
            job.log, job.key_sweeps, job.out, self, source=job.source, blob_root=job.blob_root,
            classes=job.classes, storage=job.storage, progress=job.progress,
        )  # fmt: skip


class LabelFrame(NamedTuple):
    """Dense labels of one key frame, indexed ``[x, y, z]`` on the config's grid."""

    semantics: np.ndarray  #: (nx, ny, nz) uint8, FREE = 16
    flow: np.ndarray  #: (nx, ny, nz, 2) float32, (vx, vy) m/s, ego frame of the frame
    mask_lidar: np.ndarray  #: (nx, ny, nz) bool


@dataclass
class LabelStats:
    """Counters of one log's generation (JSON-ready via :meth:`to_dict`)."""

    frames: int = 0
    sweeps_in_set: int = 0  #: sweeps of the label sweep set that some window needed
    sweeps_used: int = 0  #: ... whose points were read
    sweeps_missing: int = 0  #: ... whose point cloud file does not exist (skipped)
    sweeps_unreadable: int = 0  #: ... whose point cloud could not be parsed (skipped)
    frames_without_own_sweep: int = 0  #: key frames whose own sweep was missing (empty mask)
    points_read: int = 0
    bad_points: int = 0  #: NaN / inf points dropped
    object_points: int = 0  #: points assigned to a box (per sweep, counted once)
    ground_band_points: int = 0  #: points in the lowest ``box_ground_clearance_m`` of a box, dropped
    degenerate_boxes: int = 0  #: boxes with a non-positive or non-finite size, ignored
    object_points_dropped: int = (
        0  #: object points whose track has no box at the target frame (summed over frames)
    )
    aggregated_points: int = 0  #: points aggregated into frames (summed over frames)
    points_in_grid: int = 0  #: ... that landed in the grid
    rays: int = 0
    occupied_voxels: int = 0  #: summed over frames
    observed_voxels: int = 0  #: summed over frames
    seconds: float = 0.0  #: wall time of the generation (run-time only: never written to the Zarr group)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, timing: bool = True) -> dict[str, Any]:
        """JSON-ready counters and per-frame averages.

        Args:
            timing: include the run-time measurements :data:`TIMING_KEYS` (wall ``seconds`` and
                ``frames_per_second``). Without them the dict depends on the inputs and the config only,
                which is what the Zarr group stores (identical inputs give byte-identical groups).
        """
        d = asdict(self)
        f = max(self.frames, 1)
        d["points_per_frame"] = self.aggregated_points / f
        d["points_in_grid_per_frame"] = self.points_in_grid / f
        d["occupied_voxels_per_frame"] = self.occupied_voxels / f
        d["observed_voxels_per_frame"] = self.observed_voxels / f
        d["frames_per_second"] = self.frames / self.seconds if self.seconds > 0 else None
        d["notes"] = self.notes[:20] + ([f"... {len(self.notes) - 20} more"] if len(self.notes) > 20 else [])
        if not timing:
            for key in TIMING_KEYS:
                del d[key]
        return d


#: Keys of :meth:`LabelStats.to_dict` that measure the run, not the labels (kept out of the Zarr group).
TIMING_KEYS = ("seconds", "frames_per_second")


def label_sweep_set(log: LogData, key_sweeps: np.ndarray, sweep_step: int) -> np.ndarray:
    """Sorted indices of the sweeps that may be aggregated (see :attr:`LabelConfig.sweep_step`).

    With ``sweep_step = n > 0`` a sweep ``k`` is in the set iff ``k - key`` is a multiple of ``n``, where
    ``key`` is the last key sweep at or before ``k`` (the first key sweep for sweeps before it), and
    the sweep's ego pose is valid (:meth:`LogData.valid_ego_poses`: a sweep without one cannot be moved
    into a key frame; key frames always have one, collect drops the others).
    """
    key_sweeps = np.asarray(key_sweeps, dtype=np.int64)
    if sweep_step <= 0 or key_sweeps.size == 0:
        return key_sweeps.copy()
    k = np.arange(log.num_sweeps, dtype=np.int64)
    prev = np.searchsorted(key_sweeps, k, side="right") - 1
    anchor = key_sweeps[np.maximum(prev, 0)]
    return k[(np.abs(k - anchor) % sweep_step == 0) & log.valid_ego_poses()]


@dataclass
class _Sweep:
    """One sweep, prepared once: points in its ego frame, split into static and object points."""

    points: np.ndarray  #: (n, 3) float32 ego_k: the static points first, then the object points
    num_static: int
    obj_local: np.ndarray  #: (n_obj, 3) float32, object points in their box's frame
    obj_track: np.ndarray  #: (n_obj,) int64 track id
    obj_class: np.ndarray  #: (n_obj,) uint8 class id


class _LogBoxes:
    """Per-log box tables: track ids, classes, validity and ``global_from_box`` transforms."""

    def __init__(self, log: LogData, stats: LabelStats) -> None:
        self.track_names, self.track = np.unique(log.box_track_token.astype(str), return_inverse=True)
        self.track = self.track.astype(np.int64).reshape(-1)
        self.cls = np.asarray(log.category_class, dtype=np.uint8)[
            np.asarray(log.box_category, dtype=np.int64)
        ]
        size = np.asarray(log.box_size, dtype=np.float64).reshape(-1, 3)
        center = np.asarray(log.box_center, dtype=np.float64).reshape(-1, 3)
        yaw = np.asarray(log.box_yaw, dtype=np.float64).reshape(-1)
        self.valid = (
            np.all(np.isfinite(size), axis=1)
            & np.all(size > 0, axis=1)
            & np.all(np.isfinite(center), axis=1)
            & np.isfinite(yaw)
        )
        stats.degenerate_boxes = int((~self.valid).sum())
        safe_center = np.where(self.valid[:, None], center, 0.0)
        safe_yaw = np.where(self.valid, yaw, 0.0)
        self.global_from_box = make_transform(yaw_to_quaternion(safe_yaw), safe_center)
        self.size = np.where(self.valid[:, None], size, 0.0)
        vel = np.asarray(log.box_velocity, dtype=np.float64).reshape(-1, 3)
        self.velocity = np.where(np.isfinite(vel), vel, 0.0)


def relative_transform(
    global_from_a: np.ndarray, global_from_b: np.ndarray, same: bool = False
) -> np.ndarray:
    """``a_from_b = inv(global_from_a) @ global_from_b`` for (4, 4) or (N, 4, 4) rigid transforms.

    Computed as ``R_a^T R_b`` and ``R_a^T (t_b - t_a)``: the translations (UTM, ~1e6 m) are subtracted
    before rotating, which keeps the full float64 precision of the (small) relative offset. ``same``
    returns the exact identity (a sweep seen from its own frame stays bit-identical).
    """
    a = np.asarray(global_from_a, dtype=np.float64)
    b = np.asarray(global_from_b, dtype=np.float64)
    shape = np.broadcast_shapes(a.shape, b.shape)
    out = np.zeros(shape)
    if same:
        out[..., :, :] = np.eye(4)
        return out
    ra_t = np.swapaxes(a[..., :3, :3], -1, -2)
    out[..., :3, :3] = ra_t @ b[..., :3, :3]
    out[..., :3, 3] = np.einsum("...ij,...j->...i", ra_t, b[..., :3, 3] - a[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


class LabelGenerator:
    """Labels of the key frames of one log, computed frame by frame over a sliding window of sweeps.

    Args:
        log: the log.
        key_sweeps: (T,) increasing indices into the log's sweeps of the key frames (the frame rows).
        load_points: reads sweep ``k``'s points, (n, 3) in its ego frame, or None when unavailable.
        config: the settings.
    """

    def __init__(
        self, log: LogData, key_sweeps: np.ndarray, load_points: PointLoader, config: LabelConfig
    ) -> None:
        key_sweeps = np.asarray(key_sweeps, dtype=np.int64).reshape(-1)
        if key_sweeps.size and (
            np.any(np.diff(key_sweeps) <= 0) or key_sweeps[0] < 0 or key_sweeps[-1] >= log.num_sweeps
        ):
            raise LabelError(
                f"{log.path}: key frame sweep indices must be increasing and within 0..{log.num_sweeps - 1}"
            )
        self.log = log
        self.key_sweeps = key_sweeps
        self.config = config
        self.load_points = load_points
        self.stats = LabelStats()
        self.lo, self.vs, self.shape = vo.grid_params(config.grid)
        self.boxes = _LogBoxes(log, self.stats)
        self.global_from_ego = log.global_from_ego()
        self.sweep_set = label_sweep_set(log, key_sweeps, config.sweep_step)
        self.sensor_origin = np.asarray(log.ego_from_lidar, dtype=np.float64)[:3, 3]
        c = config
        self._half_lo_extra = np.array([-c.box_margin_m, -c.box_margin_m, 0.0])
        self._half_hi_extra = np.array([c.box_margin_m, c.box_margin_m, c.box_margin_m])

    # -- per sweep, once ----------------------------------------------------------------------------

    def _prepare(self, k: int) -> _Sweep | None:
        st = self.stats
        st.sweeps_in_set += 1
        raw = self.load_points(k)
        if raw is None:
            return None
        st.sweeps_used += 1
        pts = np.asarray(raw).reshape(-1, 3)
        st.points_read += pts.shape[0]
        pts, bad = vo.finite_points(pts)
        st.bad_points += bad
        b = self.log.boxes(k)
        idx = np.arange(b.start, b.stop)[self.boxes.valid[b]]
        if idx.size == 0 or pts.shape[0] == 0:
            return _Sweep(
                pts, pts.shape[0], np.zeros((0, 3), np.float32), np.zeros(0, np.int64), np.zeros(0, np.uint8)
            )
        box_from_ego = relative_transform(self.boxes.global_from_box[idx], self.global_from_ego[k])
        half = 0.5 * self.boxes.size[idx]
        box_of, local = vo.points_in_boxes(
            pts,
            np.ascontiguousarray(box_from_ego[:, :3, :3]),
            np.ascontiguousarray(box_from_ego[:, :3, 3]),
            -half + self._half_lo_extra,
            half + self._half_hi_extra,
            4.0,
        )
        # the lowest box_ground_clearance_m of a box: ground or the object's bottom? dropped
        floor_z = -half[:, 2] + self.config.box_ground_clearance_m
        ordered, num_static, obj_local, obj_box, band = vo.partition_points(pts, box_of, local, floor_z)
        st.ground_band_points += band
        st.object_points += obj_box.size
        owner = idx[obj_box]
        return _Sweep(ordered, num_static, obj_local, self.boxes.track[owner], self.boxes.cls[owner])

    # -- per frame ------------------------------------------------------------------------------------

    def frames(self) -> Iterator[LabelFrame]:
        """Yield the labels of every key frame in order. The yielded arrays are reused: copy to keep."""
        cfg, st = self.config, self.stats
        nv = int(np.prod(self.shape))
        grid_shape = tuple(int(s) for s in self.shape)
        counts = np.zeros(nv, dtype=np.int32)  # background points per voxel, at contested voxels only
        occupied = np.zeros(vo.bitset_words(nv), dtype=np.uint64)  # voxels with background points
        contested = np.zeros(vo.bitset_words(nv), dtype=np.uint64)  # voxels with object points
        semantics = np.empty(nv, dtype=np.uint8)
        flow = np.empty((nv, 2), dtype=np.float32)
        state = np.zeros(nv, dtype=np.uint8)
        slot_ws = np.full(nv, -1, dtype=np.int32)
        end_ws = np.zeros(nv, dtype=np.uint8)
        obj_vox = np.empty(0, np.int64)
        obj_cls = np.empty(0, np.uint8)
        obj_vel = np.empty((0, 2), np.float64)
        ts = self.log.sweep_timestamp_us
        set_ts = ts[self.sweep_set]
        half_window_us = round(cfg.window_s * 1e6)
        cache: dict[int, _Sweep | None] = {}
        next_load = 0  # position in sweep_set of the next sweep to prepare
        n_tracks = len(self.boxes.track_names)
        started = time.perf_counter()
        for kt in self.key_sweeps:
            kt = int(kt)
            w0 = int(np.searchsorted(set_ts, ts[kt] - half_window_us, side="left"))
            w1 = int(np.searchsorted(set_ts, ts[kt] + half_window_us, side="right"))
            window = self.sweep_set[w0:w1]
            for k in [k for k in cache if k < (window[0] if window.size else kt)]:
                del cache[k]
            next_load = max(next_load, w0)
            while next_load < w1:
                k = int(self.sweep_set[next_load])
                cache[k] = self._prepare(k)
                next_load += 1
            if kt not in cache:  # cannot happen (key sweeps are in the set), kept for safety
                cache[kt] = self._prepare(kt)

            global_from_ego_t = self.global_from_ego[kt]
            # tracks present at t: their box transforms into ego_t and velocities
            b = self.log.boxes(kt)
            idx_t = np.arange(b.start, b.stop)[self.boxes.valid[b]]
            track_slot = np.full(n_tracks, -1, dtype=np.int64)
            track_slot[self.boxes.track[idx_t]] = np.arange(idx_t.size)
            ego_t_from_box = relative_transform(global_from_ego_t, self.boxes.global_from_box[idx_t])
            slot_rot = np.ascontiguousarray(ego_t_from_box[:, :3, :3])
            slot_trans = np.ascontiguousarray(ego_t_from_box[:, :3, 3])
            slot_vel = np.ascontiguousarray(
                (self.boxes.velocity[idx_t] @ global_from_ego_t[:3, :3])[:, :2]
            )  # R^T v

            # object points first: their voxels are where background points must be counted
            windowed = [
                (int(k), sw) for k, sw in ((int(k), cache.get(int(k))) for k in window) if sw is not None
            ]
            capacity = sum(sw.obj_track.size for _, sw in windowed)
            if obj_vox.shape[0] < capacity:  # grow the object buffers (amortised)
                obj_vox = np.empty(2 * capacity, np.int64)
                obj_cls = np.empty(2 * capacity, np.uint8)
                obj_vel = np.empty((2 * capacity, 2), np.float64)
            n_obj = 0
            transforms = {}
            for k, sw in windowed:
                m = relative_transform(global_from_ego_t, self.global_from_ego[k], same=k == kt)
                transforms[k] = (np.ascontiguousarray(m[:3, :3]), np.ascontiguousarray(m[:3, 3]))
                if sw.obj_track.size:
                    end, dropped = vo.place_objects(
                        sw.obj_local, sw.obj_track, sw.obj_class, track_slot, slot_rot, slot_trans, slot_vel,
                        self.lo, self.vs, self.shape, obj_vox, obj_cls, obj_vel, n_obj,
                    )  # fmt: skip
                    st.object_points_dropped += dropped
                    st.aggregated_points += sw.obj_track.size - dropped
                    st.points_in_grid += end - n_obj
                    n_obj = end
            ov, oc, ovel = obj_vox[:n_obj], obj_cls[:n_obj], obj_vel[:n_obj]
            occupied.fill(0)
            contested.fill(0)
            vo.mark_voxels(ov, contested)
            for k, sw in windowed:
                rot, trans = transforms[k]
                static = sw.points[: sw.num_static]
                st.aggregated_points += static.shape[0]
                st.points_in_grid += vo.accumulate_static(
                    static, rot, trans, self.lo, self.vs, self.shape, occupied, contested, counts
                )
            vo.vote(occupied, counts, ov, oc, ovel, semantics, flow, slot_ws)  # resets counts to 0

            # visibility
            state.fill(0)
            vis = window if cfg.visibility == "window" else np.array([kt])
            own = cache.get(kt)
            if own is None:
                st.frames_without_own_sweep += 1
            for k in vis:
                sw = cache.get(int(k))
                if sw is None:
                    continue
                m = relative_transform(global_from_ego_t, self.global_from_ego[k], same=k == kt)
                origin = m[:3, :3] @ self.sensor_origin + m[:3, 3]
                rot, trans = np.ascontiguousarray(m[:3, :3]), np.ascontiguousarray(m[:3, 3])
                if cfg.ray_dedup:
                    rays, _ = vo.cast_rays_dedup(
                        origin, sw.points, rot, trans, self.lo, self.vs, self.shape, state, end_ws
                    )
                else:
                    ends = sw.points.astype(np.float64) @ rot.T + trans
                    rays = ends.shape[0]
                    vo.cast_rays(origin, ends, self.lo, self.vs, self.shape, state)
                st.rays += int(rays)
            mask = state > 0
            st.occupied_voxels += int(np.count_nonzero(semantics != FREE))
            st.observed_voxels += int(np.count_nonzero(mask))
            st.frames += 1
            st.seconds = time.perf_counter() - started
            yield LabelFrame(
                semantics.reshape(grid_shape), flow.reshape((*grid_shape, 2)), mask.reshape(grid_shape)
            )


def source_point_loader(source: Source, log: LogData, blob_root: Path, stats: LabelStats) -> PointLoader:
    """A :data:`PointLoader` reading ``blob_root / log.sweep_lidar_path[k]`` through ``source.points_ego``.

    A missing file or one that cannot be parsed is skipped (None), counted in ``stats`` and noted.
    """
    from driveengine.errors import SourceError

    def load(k: int) -> np.ndarray | None:
        path = Path(blob_root) / str(log.sweep_lidar_path[k])
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            stats.sweeps_missing += 1
            stats.notes.append(f"{path}: missing point cloud, sweep skipped")
            return None
        try:
            return source.points_ego(data, str(path), log.ego_from_lidar)[:, :3]
        except SourceError as exc:
            stats.sweeps_unreadable += 1
            stats.notes.append(f"{exc}; sweep skipped")
            return None

    return load


def write_log_labels(
    log: LogData,
    key_sweeps: np.ndarray,
    zarr_path: Path,
    config: LabelConfig,
    *,
    source: Source | None = None,
    blob_root: Path | None = None,
    load_points: PointLoader | None = None,
    classes: ClassTable = OPENSCENE_CLASSES,
    storage: OccStorage = OccStorage(),
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate the labels of ``log``'s key frames and write them as a Zarr v3 group at ``zarr_path``.

    Args:
        log: the log (any source's :class:`LogData`).
        key_sweeps: (T,) increasing indices into ``log``'s sweeps of the key frames, in frame-row order.
        zarr_path: where the group goes (collect passes a temporary path and renames it at commit);
            replaced if it exists.
        config: the generator settings.
        source, blob_root: read the sweeps through ``source`` from under ``blob_root`` (the sensor root
            ``log.sweep_lidar_path`` is relative to) ...
        load_points: ... or through this loader (tests, other point sources).
        classes: the class table of the dataset (recorded with the labels).
        storage: shard size and compression of the group.
        progress: called with the number of frames finished since the last call (e.g. ``tqdm.update``).

    Returns:
        JSON-ready statistics (:class:`LabelStats`). The group attribute ``stats`` holds the same without
        the run-time measurements (:data:`TIMING_KEYS`), so the same inputs and config give
        byte-identical groups; the returned dict keeps them (``collect`` records it in the manifest).
    """
    from driveengine.store.occ import create_occ

    key_sweeps = np.asarray(key_sweeps, dtype=np.int64).reshape(-1)
    gen = LabelGenerator(log, key_sweeps, lambda k: None, config)
    if load_points is None:
        if source is None or blob_root is None:
            raise ValueError("write_log_labels needs load_points, or a source and a blob_root")
        load_points = source_point_loader(source, log, Path(blob_root), gen.stats)
    gen.load_points = load_points
    with create_occ(
        zarr_path,
        int(key_sweeps.size),
        generator=config.to_dict(),
        grid=config.grid,
        classes=classes,
        storage=storage,
        timestamps_us=log.sweep_timestamp_us[key_sweeps],
    ) as writer:
        for frame in gen.frames():
            writer.append(semantics=frame.semantics, flow=frame.flow, mask_lidar=frame.mask_lidar)
            if progress is not None:
                progress(1)
        writer.set_stats(gen.stats.to_dict(timing=False))
    return gen.stats.to_dict()
