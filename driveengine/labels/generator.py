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
   ``ego_t_from_ego_k = inv(global_from_ego_t) @ global_from_ego_k`` (see
   :func:`~driveengine.geometry.relative_transform`); flow 0. With ``static_cell_voxels`` (the shipped
   recipes: 0.25, a quarter voxel) each sweep's static points are first merged, once per sweep, into the
   distinct cells of a cubic lattice of that edge fixed in the world (on the ego frame of the log's first
   pose, so it moves with the world): per cell the **mean** of its points and their count
   (:func:`~driveengine.labels.voxel_ops.static_cells`); every frame then voxelises the cells' means,
   each voting with its count, instead of every point. The windows of consecutive frames share all but
   a sweep or two and see the same surfaces again and again, and voxelising dominated the generator's
   time (every static point of ~40 sweeps, every frame): on the bench's sweeps a cell of 1/4 voxel holds
   2.6 points, a frame's static part takes 2.6x less time (10.8 -> 4.1 ms; merging costs ~1.1 ms a
   sweep, once), and 99.3 % of the occupied voxels are those of per-point voxelisation (a mean lies on
   the surface its points lie on, so a flat ground is not moved off it; a cell's points that straddle a
   voxel face land on one side). Static IoU against the synthetic truth: 0.918 vs 0.919 per point
   (tests/test_labels_synth.py). Cell centres instead of means moved whole ground layers by a voxel
   where the ground lay within half a cell of a voxel face. Their label is the class table's
   ``background`` (OpenScene: 10), unless the source gives the sweep's points classes of their own
   (:class:`PointClassSource`, e.g. nuScenes-lidarseg on nuScenes key frames): then each static point
   keeps its class. In a frame whose window holds such labelled sweeps, the static points of sweeps
   without classes only fill voxels that no classed point reaches (with ``background``), so that
   unlabelled sweeps never outvote the labelled ones; in other frames they vote for ``background``.
4. **Object points** are expressed in their box's frame at ``k`` and re-placed at the box of the same
   track at ``t``; velocity = the box's velocity at ``t`` (global) rotated into ``ego_t``. Points of
   tracks that have no box at ``t`` are dropped (no ghost trails).

   *Whole-track objects* (``whole_track``, the default since generator version 2): an object's points
   come from **every** sweep in which its track has a box, not only from the window: a first pass over
   the log reads each sweep of the label sweep set (and every ``track_sweep_step``-th sweep, when set)
   once and accumulates each track's object points in its box frame, in cubic cells of
   ``track_cell_m`` (0.1 m): per cell the number of points and their mean position. Memory is bounded
   by the objects' surface area, not by the log's length (a car's surface is a few thousand cells;
   points are merged into the cells every 2 M points), so a moving object is as complete as its best
   views allow. **Which voxels an object owns at** ``t``: its track must have a box at ``t``; each of
   its cells is placed with that box and claims the voxel of its mean point and, with
   ``track_cell_fill``, every voxel that the cell's cube overlaps *inside the box* (the cube clipped to
   the box, sampled at its corners), with the cell's point count as its vote; the class is the class of
   the box at ``t``. An object therefore never claims a voxel outside its box except through points
   that lay outside it (within ``box_margin_m``); the vote (step 5) settles voxels it shares with another
   object and, without ``object_priority``, with background points (the ground under it: with
   ``object_priority``, the shipped recipes' setting, the object keeps them). Without ``whole_track``
   (recipe ``openscene-v1``) the object points of the window's sweeps are placed one by one, each with
   the class of its own box (generator version 1, bit for bit).
5. **Voxelise** on the grid (half-open range, outside points dropped, never clamped), **majority vote**
   per voxel, ties to the lowest class id; the table's ``free`` id (OpenScene: 16) where no point fell.
   With ``object_priority`` (the shipped recipes since generator version 3) background points do not
   vote in a voxel that object points or cells claim: the objects there vote among themselves, as the
   synthetic truth (and OpenScene's box-based annotation) gives a voxel shared by an object and the
   ground to the object. Without it (recipe ``openscene-v1``, and version 2's recipes) the background's
   points count in the vote, so the ground's many returns take the voxels at an object's base.
   Flow = mean (vx, vy) of the points carrying the winning class (static points carry 0), so 0 for
   background. Any :class:`~driveengine.schemas.classes.ClassTable` with a ``background`` id works
   (OpenScene's: objects 0..9 < background 10 < free 16; Occ3D-nuScenes': ``others`` 0 is the
   background, free 17); OpenScene's output is the same as before the generalisation, bit for bit.
6. **Visibility** (``mask_lidar``): a 3D DDA (Amanatides-Woo) from the sensor origin
   (``ego_from_lidar`` translation) of each visibility sweep to each of its returns, clipped to the
   grid: the voxels a ray crosses and the voxel it ends in are observed. ``visibility="frame"``
   (default) uses the key frame's own sweep only: the mask then says what the LiDAR saw at ``t``, which
   is what evaluation should be restricted to; ``"window"`` uses every sweep of the window, each from
   its own sensor position moved into ``ego_t`` (OpenScene-style aggregated rays: a larger mask, about
   as many times slower as there are sweeps). With ``ray_dedup`` one ray per distinct end voxel is cast,
   to the voxel's centre (see :func:`~driveengine.labels.voxel_ops.cast_rays_dedup`).

7. **Camera visibility** (``mask_camera``, with ``camera_mask``): rays from every camera's optical centre
   through a pixel lattice of its image, walked through the frame's ``semantics`` up to the first
   occupied voxel (Occ3D's meaning); see :mod:`~driveengine.labels.camera_visibility`. A log without a
   usable camera calibration gets an all-False mask and a note.

Each sweep is read, cleaned (non-finite points dropped and counted) and split into static/object
points once per pass, and reused by every frame whose window holds it (a sliding window over the log;
with whole-track objects the first pass reads every sweep once more, the first window's sweeps being
kept for the frame pass). Frames are written one shard at a time, so memory is bounded by the window
of prepared sweeps (about 12 bytes per point: 1.4 MB for a 117k-point nuPlan sweep, so ~60 MB at 2 Hz
and ~560 MB at 20 Hz for +-10 s; with ``static_cell_voxels`` 16 bytes a cell more, ~0.7 MB a sweep)
plus at most one shard (``shard_frames`` x 6 bytes per voxel: 3.8 MB a frame
on OpenScene's grid, 31 MB on ``fine``) plus the track cells (~36 bytes each) plus per-frame workspaces
(~20 bytes per voxel: 12 MB on OpenScene's grid, 100 MB on ``fine``) plus the camera rays (~64 bytes
per ray and their recorded walks, ~1.3 bytes per voxel a ray enters: 60 MB for nuPlan's eight 1920 x 1080
cameras on OpenScene's grid, 420 MB on ``fine``; 24 / 34 MB for the synthetic rig). Shards go to disk as
they fill (each frame is compressed when it is appended, :mod:`driveengine.store.shards`).

Kernels are serial (see :mod:`~driveengine.labels.voxel_ops`); ``collect`` runs one log per process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.geometry import make_transform, relative_transform, yaw_to_quaternion
from driveengine.labels import voxel_ops as vo
from driveengine.schemas import FORMAT_VERSION, GRID, VoxelGrid
from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable
from driveengine.sources import source_label_grid
from driveengine.sources.base import MAX_SWEEP_BYTES, Source
from driveengine.sources.logdata import LogData
from driveengine.store.occ import OccStorage

if TYPE_CHECKING:
    from driveengine.labels.base import LabelJob
    from driveengine.labels.camera_visibility import CameraMasker

#: Bumped whenever the algorithm changes its output for the same inputs and config. Version 2 added
#: whole-track objects and ``mask_camera`` (both settings of the recipe); with ``whole_track=False`` and
#: ``camera_mask=False`` its arrays are version 1's, bit for bit. Version 3 added ``object_priority`` (a
#: setting; without it the arrays are version 2's, bit for bit). Version 4 changed ``mask_camera``'s rays (a
#: stride per camera from the depth it sees, levels started per ray; :mod:`~driveengine.labels.camera_visibility`):
#: every array but ``mask_camera`` is version 3's, bit for bit. Version 5 restarts ``mask_camera``'s child rays
#: at the last checkpoint of their recorded walk (every 8 voxels) before a quarter voxel before their parent's
#: ``t_near`` (version 4: 2 voxels before it); the masks differ in rare voxels, the other arrays are version
#: 4's, bit for bit. Version 6 added ``static_cell_voxels`` (a setting; with 0, the default, the arrays are
#: version 5's, bit for bit; the shipped recipes use a quarter voxel).
GENERATOR_VERSION = 6

#: Loads the points of sweep ``k``: (n, 3) x, y, z in that sweep's ego frame, metres, or None if the
#: sweep's point cloud is unavailable.
PointLoader = Callable[[int], "np.ndarray | None"]

#: Loads the classes of the points of sweep ``k`` given the number of points the :data:`PointLoader`
#: returned: (n,) uint8 ids of the class table (one per point, in the same order), or None when the
#: sweep has no per-point classes.
PointClassLoader = Callable[[int, int], "np.ndarray | None"]


@runtime_checkable
class PointClassSource(Protocol):
    """A source that can give the points of some sweeps classes of their own (optional, beside
    :class:`~driveengine.sources.base.Source`): e.g. nuScenes-lidarseg labels of nuScenes key frames.
    :func:`write_log_labels` asks a source that has this method."""

    def point_classes(self, log: LogData, sweep: int, blob_root: Path, num_points: int) -> np.ndarray | None:
        """(num_points,) uint8 class ids (the source's class table) of the points of sweep ``sweep`` as
        :meth:`~driveengine.sources.base.Source.points_ego` returns them, or None when the sweep has none.

        Raises:
            SourceError: the labels exist but cannot be used (wrong size, unknown class ids, ...); the
                generator then uses the sweep's points without classes and notes why.
        """
        ...


#: The grid a source's labels use unless the user chooses one (:func:`driveengine.sources.source_label_grid`).
default_label_grid = source_label_grid


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
        whole_track: objects from every sweep of the label sweep set in which their track has a box,
            not only the window's (see the module doc, step 4); False = version 1's window-only objects.
        track_cell_m: edge of the box-frame cells a track's points are accumulated in (whole-track), m.
        track_sweep_step: whole-track: 0 = the objects' points come from the label sweep set; n >= 1 = also
            from every n-th sweep (as ``sweep_step``; 1 = every sweep): more views of each object, more
            sweeps read.
        track_cell_fill: a cell claims every voxel its cube overlaps inside the box, not only the voxel
            of its points' mean (whole-track; see the module doc).
        object_priority: background points do not vote in voxels that object points (or whole-track
            cells) claim, so an object keeps the voxels it shares with the ground (see the module doc,
            step 5); False = the plain majority vote of versions 1 and 2.
        camera_mask: also compute ``mask_camera`` (:mod:`~driveengine.labels.camera_visibility`) from
            the log's camera calibration.
        static_cell_voxels: 0 = every static point is voxelised in every frame whose window holds its
            sweep (versions 1-5); > 0 = each sweep's static points are first merged, once, into the
            distinct cells of a cubic lattice fixed in the world whose edge is this many voxels (of the
            grid: a recipe's fraction stays with ``--grid``), and frames voxelise the cells' means, each
            with its points' count as its vote (see the module doc, step 3). The shipped recipes: 0.25.
        recipe: the recipe's name (:mod:`~driveengine.labels.recipe`; ``custom`` for hand-made settings).
    """

    window_s: float = 10.0
    sweep_step: int = 0
    box_margin_m: float = 0.2
    box_ground_clearance_m: float = 0.1
    visibility: Literal["frame", "window"] = "frame"
    ray_dedup: bool = True
    grid: VoxelGrid = GRID
    whole_track: bool = False
    track_cell_m: float = 0.1
    track_cell_fill: bool = True
    track_sweep_step: int = 0
    object_priority: bool = False
    camera_mask: bool = False
    static_cell_voxels: float = 0.0
    recipe: str = "custom"
    kind = "generator"

    def __post_init__(self) -> None:
        if not self.window_s >= 0:
            raise ValueError(f"LabelConfig.window_s must be >= 0, got {self.window_s}")
        if self.sweep_step < 0 or self.track_sweep_step < 0:
            raise ValueError(
                f"LabelConfig.sweep_step and track_sweep_step must be >= 0, got {self.sweep_step}, {self.track_sweep_step}"
            )
        if self.box_margin_m < 0 or self.box_ground_clearance_m < 0:
            raise ValueError("LabelConfig.box_margin_m and box_ground_clearance_m must be >= 0")
        if self.visibility not in ("frame", "window"):
            raise ValueError(f"LabelConfig.visibility must be 'frame' or 'window', got {self.visibility!r}")
        if not (np.isfinite(self.window_s) and np.isfinite(self.box_margin_m)
                and np.isfinite(self.box_ground_clearance_m)):  # fmt: skip
            raise ValueError("LabelConfig.window_s, box_margin_m and box_ground_clearance_m must be finite")
        if not (np.isfinite(self.track_cell_m) and 0.01 <= self.track_cell_m <= 1.0):
            raise ValueError(f"LabelConfig.track_cell_m must be within 0.01..1 m, got {self.track_cell_m}")
        cell = self.static_cell_voxels
        if not (cell == 0 or (np.isfinite(cell) and 0.05 <= cell <= 1.0)):
            raise ValueError(f"LabelConfig.static_cell_voxels must be 0 or within 0.05..1 voxel, got {cell}")
        for name in ("ray_dedup", "whole_track", "track_cell_fill", "object_priority", "camera_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LabelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.grid, VoxelGrid):
            raise ValueError(f"LabelConfig.grid must be a VoxelGrid, got {type(self.grid).__name__}")
        if not (isinstance(self.recipe, str) and self.recipe.replace("-", "").replace("_", "").isalnum()
                and len(self.recipe) <= 64):  # fmt: skip
            raise ValueError(
                f"LabelConfig.recipe must be a short name (letters, digits, - and _), got {self.recipe!r}"
            )

    #: Keys of :meth:`to_dict` that are not settings.
    RECORD_KEYS = ("generator", "generator_version", "format_version")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the generator's name and versions (part of the config hash)."""
        d = asdict(self)
        d["grid"] = self.grid.to_dict()
        return {"generator": "driveengine.labels.generator", "generator_version": GENERATOR_VERSION,
                "format_version": FORMAT_VERSION, **d}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> LabelConfig:
        """The config of a :meth:`to_dict` record (a dataset's ``generator`` attribute or manifest entry).

        A version 1 record (no ``whole_track``/``camera_mask``) gives ``whole_track=False`` and
        ``camera_mask=False``, which this version computes bit for bit as version 1 did; a record of
        version 1 or 2 has no ``object_priority``, which is then False (bit for bit as they did).

        Raises:
            ValueError: one line naming ``where``: not this generator's record, a newer generator version,
                unknown keys or bad values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of label settings, got {type(d).__name__}")
        gen = d.get("generator", "driveengine.labels.generator")
        if gen != "driveengine.labels.generator":
            raise ValueError(
                f"{where}: labels made by {gen!r}, not by DriveEngine's generator; no recipe to reuse"
            )
        version = d.get("generator_version", GENERATOR_VERSION)
        if not isinstance(version, int) or not 1 <= version <= GENERATOR_VERSION:
            raise ValueError(
                f"{where}: generator version {version!r}; this DriveEngine has version {GENERATOR_VERSION} "
                "and cannot rebuild newer labels exactly (upgrade DriveEngine)"
            )
        settings = {k: v for k, v in d.items() if k not in cls.RECORD_KEYS}
        if version == 1:
            settings.setdefault("whole_track", False)
            settings.setdefault("camera_mask", False)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{where}: unknown label settings {unknown}; known: {sorted(known)}")
        if "grid" in settings:
            g = settings["grid"]
            try:
                if isinstance(g, str):
                    from driveengine.schemas.grid import parse_grid

                    settings["grid"] = parse_grid(g)
                elif isinstance(g, dict):
                    settings["grid"] = VoxelGrid.from_dict(g)
                else:
                    raise ValueError(f"a grid name, range or mapping, got {type(g).__name__}")
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{where}: bad grid: {exc}") from None
        for name, typ in (("window_s", float), ("box_margin_m", float), ("box_ground_clearance_m", float),
                          ("track_cell_m", float), ("static_cell_voxels", float), ("sweep_step", int),
                          ("track_sweep_step", int)):  # fmt: skip
            if name in settings:
                v = settings[name]
                if (
                    isinstance(v, bool)
                    or not isinstance(v, int | float)
                    or (typ is int and not isinstance(v, int))
                ):
                    raise ValueError(
                        f"{where}: {name} must be a {'whole ' if typ is int else ''}number, got {v!r}"
                    )
                settings[name] = typ(v)
        try:
            return cls(**settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def check(self, source: Source) -> None:
        """The generator labels the points in no box with the class table's ``background`` id (unless the
        source gives them classes of their own): refuse a table without one, clearly."""
        table = source.class_table
        if table.background is None:
            raise LabelError(
                f"the label generator needs a class table with a background class (the class of points in "
                f"no box); source {source.name} uses {table.name}, which has none"
            )

    def write(self, job: LabelJob) -> dict[str, Any]:
        """Generate and write the labels of ``job`` (see :func:`write_log_labels`)."""
        return write_log_labels(
            job.log, job.key_sweeps, job.out, self, source=job.source, blob_root=job.blob_root,
            classes=job.classes, storage=job.storage, progress=job.progress,
        )  # fmt: skip


class LabelFrame(NamedTuple):
    """Dense labels of one key frame, indexed ``[x, y, z]`` on the config's grid."""

    semantics: np.ndarray  #: (nx, ny, nz) uint8, the class table's ids (OpenScene: free = 16)
    flow: np.ndarray  #: (nx, ny, nz, 2) float32, (vx, vy) m/s, ego frame of the frame
    mask_lidar: np.ndarray  #: (nx, ny, nz) bool
    mask_camera: np.ndarray | None = None  #: (nx, ny, nz) bool, or None without ``camera_mask``


@dataclass
class LabelStats:
    """Counters of one log's generation (JSON-ready via :meth:`to_dict`)."""

    frames: int = 0
    sweeps_in_set: int = 0  #: sweeps of the label sweep set that some window needed
    sweeps_used: int = 0  #: ... whose points were read
    sweeps_missing: int = 0  #: ... whose point cloud file does not exist (skipped)
    sweeps_unreadable: int = 0  #: ... whose point cloud could not be parsed (skipped)
    frames_without_own_sweep: int = 0  #: key frames whose own sweep was missing (empty mask)
    point_class_sweeps: int = 0  #: sweeps whose points carry classes of their own (e.g. lidarseg)
    point_class_unreadable: int = 0  #: ... whose per-point classes could not be used (points kept, unclassed)
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
    static_cells: int = 0  #: lattice cells of the frames' static points (summed over frames)
    far_static_points: int = 0  #: static points too far from their sensor for the lattice, dropped
    rays: int = 0
    occupied_voxels: int = 0  #: summed over frames
    observed_voxels: int = 0  #: summed over frames
    camera_observed_voxels: int = 0  #: voxels of mask_camera, summed over frames
    camera_rays: int = 0  #: rays per frame of mask_camera (0 without)
    camera_visits: int = 0  #: voxel visits of mask_camera's rays, summed over frames
    tracks: int = 0  #: whole-track: tracks with points
    track_cells: int = 0  #: whole-track: box-frame cells holding their points (the model's size)
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

    #: (n, 3) float32 ego_k: the static points first, then the object points; column-major (F order),
    #: which :func:`~driveengine.labels.voxel_ops.accumulate_static` vectorises over
    points: np.ndarray
    num_static: int
    obj_local: np.ndarray  #: (n_obj, 3) float32, object points in their box's frame
    obj_track: np.ndarray  #: (n_obj,) int64 track id
    obj_class: np.ndarray  #: (n_obj,) uint8 class id
    #: (num_static,) uint8 class id of each static point, or None when the sweep's points have no classes
    static_class: np.ndarray | None = None
    #: with ``static_cell_voxels``: (M, 3) float32 column-major mean of the static points of each lattice
    #: cell (in the lattice's frame, :attr:`LabelGenerator.global_from_lattice`), and (M,) int32 the points
    #: in each (see :func:`~driveengine.labels.voxel_ops.static_cells`)
    static_cells: np.ndarray | None = None
    static_weights: np.ndarray | None = None
    _per_track: np.ndarray | None = None

    def points_per_track(self) -> np.ndarray:
        """(max track id + 1,) int64 object points of each track (``bincount(obj_track)``, computed once)."""
        if self._per_track is None:
            self._per_track = np.bincount(self.obj_track)
        return self._per_track


class _LogBoxes:
    """Per-log box tables: track ids, classes, validity and ``global_from_box`` transforms."""

    def __init__(self, log: LogData, stats: LabelStats, classes: ClassTable = OPENSCENE_CLASSES) -> None:
        self.track_names, self.track = np.unique(log.box_track_token.astype(str), return_inverse=True)
        self.track = self.track.astype(np.int64).reshape(-1)
        category_class = np.asarray(log.category_class)
        bad = np.flatnonzero((category_class < 0) | (category_class >= classes.free))
        if bad.size:
            i = int(bad[0])
            raise LabelError(
                f"{log.path}: category {log.categories[i]!r} has class id {int(category_class[i])}, not one "
                f"of the {classes.free} classes of table {classes.name}"
            )
        self.cls = category_class.astype(np.uint8)[np.asarray(log.box_category, dtype=np.int64)]
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


class LabelGenerator:
    """Labels of the key frames of one log, computed frame by frame over a sliding window of sweeps.

    Args:
        log: the log.
        key_sweeps: (T,) increasing indices into the log's sweeps of the key frames (the frame rows).
        load_points: reads sweep ``k``'s points, (n, 3) in its ego frame, or None when unavailable.
        config: the settings.
        classes: the class table of the labels (ids of ``log.category_class`` and of point classes).
        load_point_classes: reads the classes of sweep ``k``'s points (see :data:`PointClassLoader`), or
            None when no sweep has any.
    """

    def __init__(
        self,
        log: LogData,
        key_sweeps: np.ndarray,
        load_points: PointLoader,
        config: LabelConfig,
        *,
        classes: ClassTable = OPENSCENE_CLASSES,
        load_point_classes: PointClassLoader | None = None,
    ) -> None:
        key_sweeps = np.asarray(key_sweeps, dtype=np.int64).reshape(-1)
        if key_sweeps.size and (
            np.any(np.diff(key_sweeps) <= 0) or key_sweeps[0] < 0 or key_sweeps[-1] >= log.num_sweeps
        ):
            raise LabelError(
                f"{log.path}: key frame sweep indices must be increasing and within 0..{log.num_sweeps - 1}"
            )
        if classes.background is None:
            raise LabelError(f"class table {classes.name} has no background class; the generator needs one")
        self.log = log
        self.key_sweeps = key_sweeps
        self.config = config
        self.classes = classes
        self.load_points = load_points
        self.load_point_classes = load_point_classes
        self.stats = LabelStats()
        self.lo, self.vs, self.shape = vo.grid_params(config.grid)
        self.boxes = _LogBoxes(log, self.stats, classes)
        self.global_from_ego = log.global_from_ego()
        self.sweep_set = label_sweep_set(log, key_sweeps, config.sweep_step)
        #: the sweeps whose object points the whole-track pass reads
        self.track_sweeps = (
            self.sweep_set if config.track_sweep_step == 0 or config.track_sweep_step == config.sweep_step
            else np.union1d(self.sweep_set, label_sweep_set(log, key_sweeps, config.track_sweep_step))
        )  # fmt: skip
        self.sensor_origin = np.asarray(log.ego_from_lidar, dtype=np.float64)[:3, 3]
        c = config
        self._half_lo_extra = np.array([-c.box_margin_m, -c.box_margin_m, 0.0])
        self._half_hi_extra = np.array([c.box_margin_m, c.box_margin_m, c.box_margin_m])
        finite = np.flatnonzero(np.isfinite(self.global_from_ego).all(axis=(1, 2)))
        #: (4, 4) ``global_from_lattice`` of the static cells' lattice (``static_cell_voxels``): the ego frame
        #: of the log's first valid pose (the log's whichever frames are labelled, moving with the world)
        self.global_from_lattice = self.global_from_ego[finite[0]].copy() if finite.size else np.eye(4)
        self._counted: set[int] = set()  # sweeps counted in the stats by the whole-track pass
        self._unavailable: set[int] = set()  # ... whose point cloud could not be read

    # -- per sweep, once ----------------------------------------------------------------------------

    def _prepare(self, k: int, st: LabelStats | None = None) -> _Sweep | None:
        """Sweep ``k`` read and split (None when unavailable); counted in ``st`` (default: the log's)."""
        st = self.stats if st is None else st
        st.sweeps_in_set += 1
        raw = self.load_points(k)
        if raw is None:
            return None
        st.sweeps_used += 1
        pts = np.asarray(raw).reshape(-1, 3)
        st.points_read += pts.shape[0]
        point_class = self._point_classes(k, pts.shape[0], st)
        finite = None
        if point_class is not None:
            finite = np.isfinite(pts).all(axis=1)
        pts, bad = vo.finite_points(pts)
        st.bad_points += bad
        if point_class is not None and bad:
            point_class = point_class[finite]
        b = self.log.boxes(k)
        idx = np.arange(b.start, b.stop)[self.boxes.valid[b]]
        if idx.size == 0 or pts.shape[0] == 0:
            return _Sweep(
                np.asfortranarray(pts), pts.shape[0], np.zeros((0, 3), np.float32), np.zeros(0, np.int64),
                np.zeros(0, np.uint8), point_class,
            )  # fmt: skip
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
        static_class = None if point_class is None else point_class[box_of < 0]
        return _Sweep(
            np.asfortranarray(ordered), num_static, obj_local, self.boxes.track[owner], self.boxes.cls[owner],
            static_class,
        )  # fmt: skip

    def _ego_t_from_ego_k(self, t: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The rigid move of sweep ``k``'s points into the ego frame of sweep ``t``: (3, 3) rotation, (3,)
        translation, contiguous float64 (exactly the identity for ``k == t``)."""
        m = relative_transform(self.global_from_ego[t], self.global_from_ego[k], same=k == t)
        return np.ascontiguousarray(m[:3, :3]), np.ascontiguousarray(m[:3, 3])

    def _with_cells(self, sw: _Sweep | None, k: int) -> _Sweep | None:
        """``sw`` with the lattice cells of its static points (``static_cell_voxels``; computed once, by the
        frame pass only, and not for classed points, which vote with their own classes point by point)."""
        cell = self.config.static_cell_voxels * self.vs  # m
        if sw is None or cell <= 0 or sw.static_class is not None or sw.static_cells is not None:
            return sw
        lattice_from_sweep = relative_transform(self.global_from_lattice, self.global_from_ego[k])
        sw.static_cells, sw.static_weights, far = vo.static_cells(
            sw.points, sw.num_static, np.ascontiguousarray(lattice_from_sweep[:3, :3]),
            np.ascontiguousarray(lattice_from_sweep[:3, 3]), cell,
        )  # fmt: skip
        self.stats.far_static_points += far
        return sw

    def _point_classes(self, k: int, n: int, st: LabelStats) -> np.ndarray | None:
        """The classes of sweep ``k``'s ``n`` points, checked, or None (none, or unusable: counted, noted)."""
        if self.load_point_classes is None:
            return None
        from driveengine.errors import SourceError

        try:
            cls = self.load_point_classes(k, n)
        except SourceError as exc:
            st.point_class_unreadable += 1
            st.notes.append(f"{exc}; the sweep's points are used without their classes")
            return None
        if cls is None:
            return None
        cls = np.asarray(cls)
        why = None
        if cls.shape != (n,):
            why = f"{cls.shape[0] if cls.ndim == 1 else cls.shape} classes for {n} points"
        elif cls.size and (cls.min() < 0 or cls.max() >= self.classes.free):
            why = f"class ids outside 0..{self.classes.free - 1} of table {self.classes.name}"
        if why is not None:
            st.point_class_unreadable += 1
            st.notes.append(f"sweep {self.log.sweep_token[k]}: {why}; its points are used without classes")
            return None
        st.point_class_sweeps += 1
        return cls.astype(np.uint8, copy=False)

    # -- per frame ------------------------------------------------------------------------------------

    def _track_model(self, keep_until_us: int) -> tuple[_TrackModel, dict[int, _Sweep | None]]:
        """Whole-track pass: every sweep of :attr:`track_sweeps` read once (the label sweep set, plus
        every ``track_sweep_step``-th sweep); the object points accumulated per track in box-frame cells of
        ``track_cell_m`` (count and mean position per cell).

        Returns the model and the prepared sweeps up to ``keep_until_us`` (the first frame's window), so
        that the frame pass does not read them again.
        """
        cell = self.config.track_cell_m
        keys_parts: list[np.ndarray] = []
        xyz_parts: list[np.ndarray] = []
        pending = 0
        model = _CellAccumulator()
        kept: dict[int, _Sweep | None] = {}
        ts = self.log.sweep_timestamp_us
        in_set = set(self.sweep_set.tolist())
        for k in self.track_sweeps:
            k = int(k)
            if k in in_set:
                sw = self._prepare(k)
                self._counted.add(k)
                if sw is None:
                    self._unavailable.add(k)
            else:  # a sweep for the objects only: not counted (the stats describe the label sweep set)
                sw = self._prepare(k, LabelStats())
            if sw is not None and sw.obj_track.size:
                q = np.floor(sw.obj_local / cell).astype(np.int64) + _CELL_OFFSET
                np.clip(q, 0, _CELL_MASK, out=q)
                key = (
                    (sw.obj_track << (3 * _CELL_BITS))
                    | (q[:, 0] << (2 * _CELL_BITS))
                    | (q[:, 1] << _CELL_BITS)
                    | q[:, 2]
                )
                keys_parts.append(key)
                xyz_parts.append(sw.obj_local.astype(np.float64))
                pending += key.size
                if pending >= _CELL_FLUSH_POINTS:
                    model.add(np.concatenate(keys_parts), np.concatenate(xyz_parts))
                    keys_parts, xyz_parts, pending = [], [], 0
            if k in in_set and ts[k] <= keep_until_us:
                kept[k] = sw
        if keys_parts:
            model.add(np.concatenate(keys_parts), np.concatenate(xyz_parts))
        tracks = model.finish(len(self.boxes.track_names))
        self.stats.tracks = int(np.count_nonzero(np.diff(tracks.track_start)))
        self.stats.track_cells = int(tracks.count.size)
        return tracks, kept

    def _camera_masker(self) -> CameraMasker | None:
        """The camera visibility of this log's rig (None without a usable camera: noted)."""
        from driveengine.labels.camera_visibility import CameraMasker, camera_rays

        rays, notes = camera_rays(self.log, self.config.grid)
        self.stats.notes.extend(notes)
        if rays is None:
            self.stats.notes.append(
                f"{self.log.path}: no camera with a usable calibration; mask_camera is empty"
            )
            return None
        self.stats.camera_rays = rays.num_rays
        return CameraMasker(rays, self.config.grid, self.classes.free)

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
        camera = np.zeros(nv, dtype=bool) if cfg.camera_mask else None
        obj_vox = np.empty(0, np.int64)
        obj_cls = np.empty(0, np.uint8)
        obj_vel = np.empty((0, 2), np.float64)
        obj_w = np.empty(0, np.int32)
        ts = self.log.sweep_timestamp_us
        set_ts = ts[self.sweep_set]
        half_window_us = round(cfg.window_s * 1e6)
        cache: dict[int, _Sweep | None] = {}
        next_load = 0  # position in sweep_set of the next sweep to prepare
        n_tracks = len(self.boxes.track_names)
        started = time.perf_counter()
        tracks: _TrackModel | None = None
        if cfg.whole_track and self.key_sweeps.size:
            tracks, cache = self._track_model(int(ts[self.key_sweeps[0]]) + half_window_us)
            cache = {k: self._with_cells(sw, k) for k, sw in cache.items()}
        masker = self._camera_masker() if cfg.camera_mask else None
        quiet = LabelStats()  # counters of sweeps read a second time (counted by the whole-track pass)

        def prepare(k: int) -> _Sweep | None:
            if k in self._unavailable:
                return None
            return self._prepare(k, quiet if k in self._counted else None)

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
                if k not in cache:
                    cache[k] = self._with_cells(prepare(k), k)
                next_load += 1
            if kt not in cache:  # cannot happen (key sweeps are in the set), kept for safety
                cache[kt] = self._with_cells(prepare(kt), kt)

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
            # static points with classes of their own vote like object points (after them)
            classed = [(k, sw) for k, sw in windowed if sw.static_class is not None]
            slot_track = self.boxes.track[idx_t]
            if tracks is None:
                capacity = sum(sw.obj_track.size for _, sw in windowed)
            else:
                capacity = 9 * int(
                    (tracks.track_start[slot_track + 1] - tracks.track_start[slot_track]).sum()
                )
            capacity += sum(sw.num_static for _, sw in classed)
            if obj_vox.shape[0] < capacity:  # grow the object buffers (amortised)
                obj_vox = np.empty(2 * capacity, np.int64)
                obj_cls = np.empty(2 * capacity, np.uint8)
                obj_vel = np.empty((2 * capacity, 2), np.float64)
                obj_w = np.ones(2 * capacity, np.int32)
            n_obj = 0
            for _, sw in windowed:
                if tracks is None and sw.obj_track.size:
                    end, dropped = vo.place_objects(
                        sw.obj_local, sw.obj_track, sw.obj_class, track_slot, slot_rot, slot_trans, slot_vel,
                        self.lo, self.vs, self.shape, obj_vox, obj_cls, obj_vel, n_obj,
                    )  # fmt: skip
                    st.object_points_dropped += dropped
                    st.aggregated_points += sw.obj_track.size - dropped
                    st.points_in_grid += end - n_obj
                    n_obj = end
                elif sw.obj_track.size:  # whole-track: the window's object points of tracks absent at t
                    per_track = sw.points_per_track()
                    st.object_points_dropped += int(per_track @ (track_slot[: per_track.size] < 0))
            if tracks is not None:
                obj_w[: obj_w.shape[0]] = 1
                end, points = vo.place_track_cells(
                    tracks.local, tracks.count, tracks.track_start, slot_track, self.boxes.cls[idx_t],
                    slot_rot, slot_trans, slot_vel, 0.5 * self.boxes.size[idx_t],
                    cfg.track_cell_m if cfg.track_cell_fill else 0.0, self.lo, self.vs, self.shape,
                    obj_vox, obj_cls, obj_vel, obj_w, n_obj,
                )  # fmt: skip
                st.aggregated_points += int((tracks.count_of_tracks[slot_track]).sum())
                st.points_in_grid += points
                n_obj = end
            for k, sw in classed:
                rot, trans = self._ego_t_from_ego_k(kt, k)
                st.aggregated_points += sw.num_static
                end = vo.place_static(
                    sw.points[: sw.num_static], sw.static_class, rot, trans, self.lo, self.vs, self.shape,
                    obj_vox, obj_cls, obj_vel, n_obj,
                )  # fmt: skip
                st.points_in_grid += end - n_obj
                n_obj = end
            ov, oc, ovel = obj_vox[:n_obj], obj_cls[:n_obj], obj_vel[:n_obj]
            ego_t_from_lattice = relative_transform(global_from_ego_t, self.global_from_lattice)
            lattice_rot = np.ascontiguousarray(ego_t_from_lattice[:3, :3])
            lattice_trans = np.ascontiguousarray(ego_t_from_lattice[:3, 3])
            occupied.fill(0)
            contested.fill(0)
            if not classed and not cfg.object_priority:
                vo.mark_voxels(ov, contested)  # unclassed static points vote for background against objects
            for k, sw in windowed:
                if sw.static_class is not None:
                    continue
                st.aggregated_points += sw.num_static
                if sw.static_cells is not None:  # the cells' means, weighted by their points
                    st.static_cells += sw.static_weights.size
                    st.points_in_grid += vo.accumulate_static(
                        sw.static_cells, lattice_rot, lattice_trans, self.lo, self.vs, self.shape, occupied,
                        contested, counts, -1, sw.static_weights,
                    )  # fmt: skip
                    continue
                rot, trans = self._ego_t_from_ego_k(kt, k)
                st.points_in_grid += vo.accumulate_static(  # the whole (contiguous) array: its static rows
                    sw.points, rot, trans, self.lo, self.vs, self.shape, occupied, contested, counts, sw.num_static
                )  # fmt: skip
            if tracks is None:
                vo.vote(
                    occupied, counts, ov, oc, ovel, semantics, flow, slot_ws,
                    self.classes.background, self.classes.free, self.classes.free,
                )  # resets counts to 0  # fmt: skip
            else:
                vo.vote_weighted(
                    occupied, counts, ov, oc, ovel, obj_w[:n_obj], semantics, flow, slot_ws,
                    self.classes.background, self.classes.free, self.classes.free,
                )  # resets counts to 0  # fmt: skip

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
                rot, trans = self._ego_t_from_ego_k(kt, int(k))
                origin = rot @ self.sensor_origin + trans
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
            camera_grid = None
            if camera is not None:
                if masker is None:
                    camera.fill(False)
                else:
                    masker.mask(semantics, out=camera)
                    st.camera_visits += masker.visits
                st.camera_observed_voxels += int(np.count_nonzero(camera))
                camera_grid = camera.reshape(grid_shape)
            st.occupied_voxels += int(np.count_nonzero(semantics != self.classes.free))
            st.observed_voxels += int(np.count_nonzero(mask))
            st.frames += 1
            st.seconds = time.perf_counter() - started
            yield LabelFrame(
                semantics.reshape(grid_shape),
                flow.reshape((*grid_shape, 2)),
                mask.reshape(grid_shape),
                camera_grid,
            )


#: Whole-track cells: bits per axis of a cell index (box-frame coordinates within +-819 m at 0.1 m cells),
#: the offset of index 0 and the mask; the track id sits above the three axes.
_CELL_BITS = 14
_CELL_OFFSET = 1 << (_CELL_BITS - 1)
_CELL_MASK = (1 << _CELL_BITS) - 1
#: Object points gathered before they are merged into the cells (bounds the pass's memory: ~32 bytes each).
_CELL_FLUSH_POINTS = 2_000_000


@dataclass
class _TrackModel:
    """The whole-track object points of a log: cells sorted by track (see :meth:`LabelGenerator._track_model`)."""

    local: np.ndarray  #: (C, 3) float32 mean box-frame position of the points of each cell, m
    count: np.ndarray  #: (C,) int32 points per cell
    track_start: (
        np.ndarray
    )  #: (num_tracks + 1,) int64: track t's cells are rows track_start[t]:track_start[t+1]
    count_of_tracks: np.ndarray  #: (num_tracks,) int64 points per track


class _CellAccumulator:
    """Sums of box-frame positions and point counts per (track, cell) key, merged in batches."""

    def __init__(self) -> None:
        self.keys = np.empty(0, np.int64)
        self.sums = np.empty((0, 3), np.float64)
        self.counts = np.empty(0, np.int64)

    def add(self, keys: np.ndarray, xyz: np.ndarray) -> None:
        """Merge points (keys (n,), box-frame xyz (n, 3)) into the cells."""
        all_keys = np.concatenate([self.keys, keys])
        uniq, inverse = np.unique(all_keys, return_inverse=True)
        n_old = self.keys.size
        sums = np.zeros((uniq.size, 3), np.float64)
        counts = np.zeros(uniq.size, np.int64)
        old, new = inverse[:n_old], inverse[n_old:]
        sums[old] += self.sums  # old keys are distinct: plain indexing adds once each
        counts[old] += self.counts
        for a in range(3):
            sums[:, a] += np.bincount(new, weights=xyz[:, a], minlength=uniq.size)
        counts += np.bincount(new, minlength=uniq.size)
        self.keys, self.sums, self.counts = uniq, sums, counts

    def finish(self, num_tracks: int) -> _TrackModel:
        """The model, cells sorted by track (keys are sorted, the track id is their top bits)."""
        track = self.keys >> (3 * _CELL_BITS)
        start = np.searchsorted(track, np.arange(num_tracks + 1), side="left").astype(np.int64)
        count = np.minimum(self.counts, np.iinfo(np.int32).max).astype(np.int32)
        local = (self.sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)
        per_track = np.bincount(track, weights=self.counts, minlength=num_tracks).astype(np.int64)
        return _TrackModel(np.ascontiguousarray(local), count, start, per_track[:num_tracks])


def source_point_loader(source: Source, log: LogData, blob_root: Path, stats: LabelStats) -> PointLoader:
    """A :data:`PointLoader` reading ``blob_root / log.sweep_lidar_path[k]`` through ``source.points_ego``.

    A missing file or one that cannot be parsed is skipped (None), counted in ``stats`` and noted.
    """
    from driveengine.errors import SourceError

    def load(k: int) -> np.ndarray | None:
        path = Path(blob_root) / str(log.sweep_lidar_path[k])
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SWEEP_BYTES + 1)  # a larger file is not read whole (bounded memory per log)
                size = os.fstat(f.fileno()).st_size if len(data) > MAX_SWEEP_BYTES else len(data)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            stats.sweeps_missing += 1
            stats.notes.append(f"{path}: missing point cloud, sweep skipped")
            return None
        if size > MAX_SWEEP_BYTES:
            stats.sweeps_unreadable += 1
            stats.notes.append(f"{path}: {size} bytes, more than a sweep's {MAX_SWEEP_BYTES}; skipped")
            return None
        try:
            return source.points_ego(data, str(path), log.ego_from_lidar)[:, :3]
        except SourceError as exc:
            stats.sweeps_unreadable += 1
            stats.notes.append(f"{exc}; sweep skipped")
            return None

    return load


def source_point_class_loader(source: PointClassSource, log: LogData, blob_root: Path) -> PointClassLoader:
    """A :data:`PointClassLoader` asking ``source.point_classes`` (files under ``blob_root``)."""

    def load(k: int, n: int) -> np.ndarray | None:
        return source.point_classes(log, k, Path(blob_root), n)

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
    load_point_classes: PointClassLoader | None = None,
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
        load_point_classes: classes of the sweeps' points (see :data:`PointClassLoader`); by default
            the source's (:class:`PointClassSource`) when it has them, else none.
        classes: the class table of the dataset (of the labels, the boxes' and the points' class ids).
        storage: shard size and compression of the group.
        progress: called with the number of frames finished since the last call (e.g. ``tqdm.update``).

    Returns:
        JSON-ready statistics (:class:`LabelStats`) and, under ``recipe``, the settings
        (:meth:`LabelConfig.to_dict`, also the group's ``generator`` attribute). The group attribute
        ``stats`` holds the statistics without the run-time measurements (:data:`TIMING_KEYS`), so the
        same inputs and config give byte-identical groups; the returned dict keeps them (``collect``
        records it in the manifest entry's ``labels``, so the manifest carries the recipe too).
    """
    from driveengine.store.occ import create_occ

    key_sweeps = np.asarray(key_sweeps, dtype=np.int64).reshape(-1)
    gen = LabelGenerator(
        log, key_sweeps, lambda k: None, config, classes=classes, load_point_classes=load_point_classes
    )
    if load_points is None:
        if source is None or blob_root is None:
            raise ValueError("write_log_labels needs load_points, or a source and a blob_root")
        load_points = source_point_loader(source, log, Path(blob_root), gen.stats)
        if load_point_classes is None and isinstance(source, PointClassSource):
            gen.load_point_classes = source_point_class_loader(source, log, Path(blob_root))
    gen.load_points = load_points
    from driveengine.schemas.occ import REQUIRED_ARRAYS

    arrays = (*REQUIRED_ARRAYS, "mask_camera") if config.camera_mask else REQUIRED_ARRAYS
    with create_occ(
        zarr_path,
        int(key_sweeps.size),
        generator=config.to_dict(),
        grid=config.grid,
        classes=classes,
        arrays=arrays,
        storage=storage,
        timestamps_us=log.sweep_timestamp_us[key_sweeps],
        tokens=log.sweep_token[key_sweeps],
    ) as writer:
        for frame in gen.frames():
            extra = {} if frame.mask_camera is None else {"mask_camera": frame.mask_camera}
            writer.append(semantics=frame.semantics, flow=frame.flow, mask_lidar=frame.mask_lidar, **extra)
            if progress is not None:
                progress(1)
        writer.set_stats(gen.stats.to_dict(timing=False))
    return {**gen.stats.to_dict(), "recipe": config.to_dict()}
