"""``synthesize``: write synthetic nuPlan logs (``.db`` + ``.pcd`` + ``.jpg``) with known ground truth.

Output layout (nuPlan's)::

    <out>/splits/<split>/<log>.db
    <out>/sensor_blobs/<log>/MergedPointCloud/<token>.pcd
    <out>/sensor_blobs/<log>/<CAM>/<token>.jpg
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.synth.blobs import write_image, write_sweep
from driveengine.synth.nuplan_db import LogPlan, SynthError, plan_log, write_db
from driveengine.synth.sensors import pixel_rays
from driveengine.synth.world import World, build_world

#: Default rays per sweep of :func:`synthesize` (a full-size sweep is
#: :data:`driveengine.synth.sensors.FULL_SWEEP_RAYS`); about 85-95 % of rays return a point.
DEFAULT_RAYS = 32_768
#: Blob jobs whose world state is evaluated together.
_BATCH = 256
#: Every this many sweeps is a key frame (OpenScene's 2 Hz release of 20 Hz sweeps).
KEY_FRAME_EVERY = 10


@dataclass(frozen=True)
class Faults:
    """Defects to inject, as real releases have them.

    Attributes:
        missing_pcd: sweep indices (time order) whose ``lidar_pc`` row exists but whose ``.pcd`` is not written.
        missing_jpg: ``(channel, image index)`` pairs (time order within the channel, after
            ``camera_gap``) whose ``image`` row exists but whose ``.jpg`` is not written.
        camera_gap: ``(channel, start_s, end_s)``: no ``image`` rows at all for that channel in that
            window (seconds since the log start), so those frames have fewer than 8 cameras.
    """

    missing_pcd: tuple[int, ...] = ()
    missing_jpg: tuple[tuple[str, int], ...] = ()
    camera_gap: tuple[str, float, float] | None = None

    @classmethod
    def coerce(cls, faults: Faults | Mapping | None) -> Faults:
        if faults is None:
            return cls()
        if isinstance(faults, Faults):
            return faults
        try:
            return cls(**dict(faults))
        except TypeError as exc:
            raise SynthError(f"bad faults {faults!r}: {exc}") from exc


@dataclass
class SynthLog:
    """One written log and its ground truth.

    Attributes:
        log_name: ``log.logfile``.
        db_path: the ``.db`` file.
        sensor_root: the ``sensor_blobs`` directory (blob paths in the DB are relative to it).
        world: the ground truth (:class:`~driveengine.synth.world.World`).
        plan: tokens, timestamps and relative file names of sweeps and images.
        counts: rows per table.
        missing_files: relative blob paths that have DB rows but were deliberately not written.
        files: blob files written.
        bytes: bytes written (database and blobs).
    """

    log_name: str
    db_path: Path
    sensor_root: Path
    world: World
    plan: LogPlan
    counts: dict[str, int]
    missing_files: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def world_for_log(
    seed: int,
    log_index: int,
    seconds: float = 20.0,
    *,
    static_only: bool = False,
    image_size: tuple[int, int] = (160, 90),
) -> World:
    """Rebuild the ground-truth :class:`World` of log ``log_index`` of ``synthesize(seed=seed, ...)``.

    Pass the same ``seconds``, ``static_only`` and ``image_size`` as to :func:`synthesize`.
    """
    return build_world(seed, log_index, seconds, static_only=static_only, image_size=image_size)


def synthesize(
    out_dir: str | Path,
    *,
    logs: int = 2,
    seconds: float = 20.0,
    seed: int = 0,
    split: str = "mini",
    points: int = DEFAULT_RAYS,
    image_size: tuple[int, int] = (160, 90),
    key_frames_only: bool = False,
    blobs: bool = True,
    faults: Faults | Mapping | None = None,
    calibration_pickle: str = "devkit",
    static_only: bool = False,
    progress: bool = False,
) -> list[SynthLog]:
    """Write ``logs`` synthetic nuPlan logs under ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: output root.
        logs: number of logs; log ``i`` is :func:`world_for_log` ``(seed, i, ...)``.
        seconds: duration of each log (20 Hz sweeps, 10 Hz images, 100 Hz ego poses).
        seed: fixes everything written (identical rows and identical blob bytes for the same seed).
        split: the ``splits/<split>`` directory name.
        points: rays per LiDAR sweep (64 rings); rays into the sky return no point.
        image_size: (width, height) of the camera images, pixels.
        key_frames_only: write ``.pcd`` files only for every 10th sweep (OpenScene's 2 Hz); the DB
            still lists all sweeps.
        blobs: write ``.pcd``/``.jpg`` files at all (False: databases only, fast).
        faults: :class:`Faults` (or a dict of its fields) applied to every log.
        calibration_pickle: ``"devkit"`` (nuplan-devkit list types) or ``"list"`` (plain lists).
        static_only: objects never move (zero velocity); the ego still drives.
        progress: show a tqdm progress bar over the blobs.

    Returns:
        One :class:`SynthLog` per log.
    """
    if logs < 0 or seconds <= 0 or points <= 0 or min(image_size) <= 0:
        raise SynthError(
            f"invalid synth options logs={logs} seconds={seconds} points={points} image_size={image_size}: "
            "use logs >= 0 and positive seconds, points and image size"
        )
    if not split or "/" in split:
        raise SynthError(f"invalid split name {split!r}")
    faults = Faults.coerce(faults)
    if faults.camera_gap is not None and faults.camera_gap[0] not in CAMERA_CHANNELS:
        raise SynthError(f"faults.camera_gap names unknown camera {faults.camera_gap[0]!r}")
    out = Path(out_dir)
    sensor_root = out / "sensor_blobs"
    results = []
    for i in range(logs):
        world = world_for_log(seed, i, seconds, static_only=static_only, image_size=image_size)
        plan = plan_log(world, camera_gap=faults.camera_gap)
        db_path = out / "splits" / split / f"{world.log_name}.db"
        counts = write_db(world, plan, db_path, calibration_pickle=calibration_pickle)
        log = SynthLog(
            world.log_name, db_path, sensor_root, world, plan, counts, bytes=db_path.stat().st_size
        )
        if blobs:
            _write_blobs(log, points, key_frames_only, faults, progress)
        results.append(log)
    return results


def _write_blobs(log: SynthLog, rays: int, key_frames_only: bool, faults: Faults, progress: bool) -> None:
    from driveengine.progress import progress as progress_display

    world, plan = log.world, log.plan
    missing_pcd = set(faults.missing_pcd)
    missing_jpg = set(faults.missing_jpg)
    jobs: list[tuple[str, str, int, int]] = []  # (kind, channel, index, timestamp)
    for i, ts in enumerate(world.lidar_timestamps_us.tolist()):
        if key_frames_only and i % KEY_FRAME_EVERY:
            continue
        jobs.append(("pcd", "", i, ts))
    for ch in CAMERA_CHANNELS:
        for k, ts in enumerate(plan.image_timestamp_us[ch].tolist()):
            jobs.append(("jpg", ch, k, ts))
    cameras = {c.channel: c for c in world.cameras}
    cam_rays = {c.channel: pixel_rays(c) for c in world.cameras}
    with progress_display(total=len(jobs), desc=log.log_name, unit="file", show=progress) as bar:
        for start in range(0, len(jobs), _BATCH):
            batch = jobs[start : start + _BATCH]
            stamps = np.array([job[3] for job in batch], dtype=np.int64)
            # world state of the whole batch in one vectorised evaluation
            solids = world.solids_many(stamps)
            poses = world.frame_poses(stamps)
            for (kind, ch, idx, ts), known_solids, pose in zip(batch, solids, poses, strict=True):
                bar.update()
                known = {"solids": known_solids, "global_from_ego": pose}
                if kind == "pcd":
                    rel = plan.sweep_filename[idx]
                    if idx in missing_pcd:
                        log.missing_files.append(rel)
                        continue
                    path = log.sensor_root / rel
                    write_sweep(world, path, ts, rays, idx, **known)
                else:
                    rel = plan.image_filename[ch][idx]
                    if (ch, idx) in missing_jpg:
                        log.missing_files.append(rel)
                        continue
                    path = log.sensor_root / rel
                    write_image(world, cameras[ch], path, ts, cam_rays[ch], **known)
                log.files += 1
                log.bytes += path.stat().st_size


def format_summary(results: list[SynthLog]) -> str:
    """A short human-readable summary of what :func:`synthesize` wrote."""
    lines = []
    for r in results:
        lines.append(
            f"{r.log_name}: {r.counts.get('lidar_pc', 0)} sweeps, {r.counts.get('lidar_box', 0)} boxes, "
            f"{r.counts.get('image', 0)} images, {r.files} blob files, {r.bytes / 1e6:.1f} MB -> {r.db_path}"
        )
    total_bytes = sum(r.bytes for r in results)
    lines.append(
        f"wrote {len(results)} logs: {sum(r.counts.get('lidar_pc', 0) for r in results)} sweeps, "
        f"{sum(r.counts.get('lidar_box', 0) for r in results)} boxes, {sum(r.files for r in results)} blob files "
        f"(+{len(results)} databases), {total_bytes / 1e6:.1f} MB"
    )
    return "\n".join(lines)
