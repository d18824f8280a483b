"""``write_nuscenes``: the synthetic world written as a nuScenes v1.0 release, with its ground truth.

The same world model as the synthetic nuPlan logs (:func:`driveengine.synth.world.build_world`): scene
``i`` of ``write_nuscenes(seed=s)`` is ``world_for_log(s, i, seconds)``, so one seed gives the same
geometry in both formats (same objects, ego motion, LiDAR rays and hits).

Layout (nuScenes')::

    <out>/<version>/{attribute,calibrated_sensor,category,ego_pose,instance,log,map,sample,
                     sample_annotation,sample_data,scene,sensor,visibility}.json   (+ lidarseg.json)
    <out>/samples/LIDAR_TOP/<logfile>__LIDAR_TOP__<timestamp>.pcd.bin        key-frame sweeps (2 Hz)
    <out>/sweeps/LIDAR_TOP/<logfile>__LIDAR_TOP__<timestamp>.pcd.bin         the other 20 Hz sweeps
    <out>/samples/CAM_*/<logfile>__CAM_*__<timestamp>.jpg                    key-frame images
    <out>/sweeps/CAM_*/<logfile>__CAM_*__<timestamp>.jpg                     the other 12 Hz images
    <out>/maps/<map token>.png                                               semantic prior, 0.1 m/px
    <out>/lidarseg/<version>/<lidar sample_data token>_lidarseg.bin          (``lidarseg=True``)

JSON files are formatted exactly as ``json.dump(rows, f, indent=0)`` (nuScenes' own format); rows of
every table come in a shuffled order (deterministic per seed), so readers must not rely on row order.

Frames (see :class:`SynthNuScenesScene` for the transforms)
-----------------------------------------------------------
* **nuScenes global**: the world's global frame shifted by a per-scene integer offset
  (``global_offset_m``: x, y metres, z 0) so that coordinates are map-sized (0 .. a few hundred m) as
  in nuScenes, and the map mask (origin at global (0, 0), 0.1 m per pixel) covers the scene.
* **nuScenes ego**: the world's ego frame (rear axle, x forward, y left, z up) lowered by
  :data:`~driveengine.synth.world.EGO_Z_M` to the ground, so ``ego_pose.translation[2] == 0`` as in
  nuScenes. A point at ego z ``h`` in the world (nuPlan) frame is at ego z ``h + EGO_Z_M`` here.
* **LIDAR_TOP**: the world's lidar (``World.ego_from_lidar``: the same rays, the same hits) with its
  axes turned by -90° about z as nuScenes' LIDAR_TOP is (x to the right of the vehicle, y forward).
* Each ``sample_data`` has its own ``ego_pose`` row with the sample_data's timestamp; its pose is
  :meth:`World.frame_pose` of that timestamp (the pose the world's sensors capture from), so a
  sweep here and the nuPlan ``.pcd`` of the same timestamp hold the same points.

Timeline: LiDAR at 20 Hz (the world's ``lidar_timestamps_us``); samples are every
:data:`~driveengine.synth.api.KEY_FRAME_EVERY`-th sweep (2 Hz, ``sample.timestamp`` = the key-frame
sweep's); cameras at 12 Hz, every 6th frame a key frame taken a channel-specific 4..50 ms after the
sample; radar rows (``radar=True``, metadata only) at 13 Hz, the key frame nearest the sample. Each
sensor's chain runs from the first to the last sample; a non-key ``sample_data`` points to the sample
that follows it. Annotations are the world's objects that exist at the sample time within
:data:`~driveengine.synth.world.BOX_RANGE_M` of the ego (the nuPlan ``lidar_box`` rule), boxes exact.

Numbers that nuScenes measures are measured here on the synthetic sensors: ``num_lidar_pts`` counts the
key-frame sweep's points on the object; the visibility bin is the fraction of the object's unoccluded
LiDAR footprint (rays of the sweep that would hit it alone) that the sweep actually sees (nuScenes bins
camera visibility; we have no per-pixel object ids, the LiDAR fraction is our documented stand-in);
``num_radar_pts`` is 0 (no radar returns are simulated). Categories map as :data:`CATEGORY_OF`.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from driveengine.geometry import (
    invert_transform,
    make_transform,
    matrix_to_quaternion,
    transform_points,
    yaw_to_quaternion,
)
from driveengine.sources.nuscenes.constants import CAMERA_CHANNELS, LIDAR_CHANNEL
from driveengine.synth.api import DEFAULT_RAYS, KEY_FRAME_EVERY, world_for_log
from driveengine.synth.blobs import jpeg_bytes
from driveengine.synth.nuplan_db import SynthError
from driveengine.synth.sensors import LIDAR_MAX_RANGE_M, Sweep, lidar_sweep, pixel_rays, render_camera
from driveengine.synth.world import BOX_RANGE_M, EGO_Z_M, Camera, Loop, World

# ---------------------------------------------------------------------------------------------------
# sensors and timeline
# ---------------------------------------------------------------------------------------------------

#: The five nuScenes radars (rows only, ``radar=True`` with ``blobs=False``).
RADAR_CHANNELS: tuple[str, ...] = (
    "RADAR_FRONT",
    "RADAR_FRONT_LEFT",
    "RADAR_FRONT_RIGHT",
    "RADAR_BACK_LEFT",
    "RADAR_BACK_RIGHT",
)
#: Every channel, in the order of the ``sensor`` table.
CHANNELS: tuple[str, ...] = (LIDAR_CHANNEL, *CAMERA_CHANNELS, *RADAR_CHANNELS)
#: Camera frames per sample (12 Hz cameras, 2 Hz samples).
CAMERA_FRAMES_PER_SAMPLE = 6
#: Camera and radar rates, Hz.
CAMERA_HZ = 12
RADAR_HZ = 13

#: Camera mounting in the nuScenes ego frame: channel -> (yaw of the optical axis, deg; horizontal
#: field of view, deg; translation x, y, z, m). Values in the spirit of nuScenes' rig.
CAMERA_MOUNTS: dict[str, tuple[float, float, tuple[float, float, float]]] = {
    "CAM_FRONT": (0.0, 65.0, (1.70, 0.00, 1.55)),
    "CAM_FRONT_RIGHT": (-55.0, 65.0, (1.55, -0.49, 1.55)),
    "CAM_FRONT_LEFT": (55.0, 65.0, (1.52, 0.49, 1.55)),
    "CAM_BACK": (180.0, 90.0, (0.03, 0.00, 1.58)),
    "CAM_BACK_LEFT": (110.0, 65.0, (1.04, 0.48, 1.56)),
    "CAM_BACK_RIGHT": (-110.0, 65.0, (1.05, -0.48, 1.57)),
}
#: Radar mounting in the nuScenes ego frame: channel -> (yaw, deg; translation x, y, z, m).
RADAR_MOUNTS: dict[str, tuple[float, tuple[float, float, float]]] = {
    "RADAR_FRONT": (0.0, (3.41, 0.00, 0.50)),
    "RADAR_FRONT_LEFT": (85.0, (3.38, 0.62, 0.52)),
    "RADAR_FRONT_RIGHT": (-85.0, (3.38, -0.62, 0.52)),
    "RADAR_BACK_LEFT": (175.0, (-0.56, 0.62, 0.53)),
    "RADAR_BACK_RIGHT": (-175.0, (-0.56, -0.62, 0.53)),
}

#: ``nuscenes_lidar_from_world_lidar``: nuScenes' LIDAR_TOP axes are the world lidar's turned by -90°
#: about z (x to the right of the vehicle, y forward).
_WORLD_LIDAR_FROM_NUSCENES_LIDAR = make_transform(
    np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), [0.0, 0.0, 0.0]
)


def world_ego_from_nuscenes_ego() -> np.ndarray:
    """(4, 4) transform from the nuScenes ego frame (origin on the ground) to the world's (rear axle)."""
    return make_transform(np.eye(3), [0.0, 0.0, -EGO_Z_M])


def _camera_delay_us(yaw_deg: float) -> int:
    """Key-frame camera time after the sample, µs: 4 ms plus the LiDAR's sweep to the camera's azimuth."""
    return 4_000 + round((yaw_deg % 360.0) / 360.0 * 46_000)


def nuscenes_cameras(width: int, height: int) -> list[Camera]:
    """The six cameras (:data:`CAMERA_CHANNELS` order) with ``ego_from_camera`` in the nuScenes ego frame.

    Pinhole, undistorted (nuScenes images are rectified), pitched 1° down; intrinsics from the field
    of view of :data:`CAMERA_MOUNTS` with the principal point at the image centre.
    """
    out = []
    pitch = np.radians(1.0)
    for ch in CAMERA_CHANNELS:
        yaw_deg, fov_deg, t = CAMERA_MOUNTS[ch]
        yaw = np.radians(yaw_deg)
        forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), -np.sin(pitch)])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        down = np.cross(forward, right)
        rot = np.stack([right, down, forward], axis=1)  # columns: camera axes in ego coordinates
        f = 0.5 * width / np.tan(0.5 * np.radians(fov_deg))
        k = np.array([[f, 0.0, 0.5 * width], [0.0, f, 0.5 * height], [0.0, 0.0, 1.0]])
        out.append(
            Camera(ch, np.array(t), matrix_to_quaternion(rot), k, np.zeros(5), int(width), int(height))
        )
    return out


# ---------------------------------------------------------------------------------------------------
# taxonomy
# ---------------------------------------------------------------------------------------------------

#: nuScenes(-lidarseg) categories; the position is the category's ``index`` (lidarseg class id).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("noise", "Points that are not part of any surface or object."),
    ("animal", "Any animal."),
    ("human.pedestrian.adult", "Adult walking, standing or sitting."),
    ("human.pedestrian.child", "Child walking, standing or sitting."),
    ("human.pedestrian.construction_worker", "Person working in a construction zone."),
    ("human.pedestrian.personal_mobility", "Person on a small personal vehicle (skateboard, scooter, ...)."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.stroller", "Stroller."),
    ("human.pedestrian.wheelchair", "Wheelchair."),
    ("movable_object.barrier", "Temporary road barrier."),
    ("movable_object.debris", "Movable object left on the road, too large to drive over."),
    ("movable_object.pushable_pullable", "Object a pedestrian may push or pull (bin, cart, ...)."),
    ("movable_object.trafficcone", "Traffic cone."),
    ("static_object.bicycle_rack", "Area or rack of parked bicycles."),
    ("vehicle.bicycle", "Bicycle, with or without a rider."),
    ("vehicle.bus.bendy", "Articulated bus."),
    ("vehicle.bus.rigid", "Rigid bus."),
    ("vehicle.car", "Passenger car, van, SUV, pickup."),
    ("vehicle.construction", "Construction vehicle."),
    ("vehicle.emergency.ambulance", "Ambulance."),
    ("vehicle.emergency.police", "Police vehicle."),
    ("vehicle.motorcycle", "Motorcycle or scooter, with or without a rider."),
    ("vehicle.trailer", "Trailer."),
    ("vehicle.truck", "Truck."),
    ("flat.driveable_surface", "Surface a car can drive on."),
    ("flat.other", "Other flat ground: curbs, traffic islands, ..."),
    ("flat.sidewalk", "Sidewalk and pedestrian walkways."),
    ("flat.terrain", "Natural flat ground: grass, soil, ..."),
    ("static.manmade", "Buildings, walls, poles, signs, ..."),
    ("static.other", "Other static background."),
    ("static.vegetation", "Trees, bushes, ..."),
    ("vehicle.ego", "The ego vehicle."),
)
CATEGORY_INDEX: dict[str, int] = {name: i for i, (name, _) in enumerate(CATEGORIES)}

#: World (nuPlan) category -> nuScenes category. ``czone_sign`` has no nuScenes box category; a
#: construction sign on the road side is annotated as debris, ``generic_object`` (1 m cube by the
#: road) as pushable/pullable (bins, carts).
CATEGORY_OF: dict[str, str] = {
    "vehicle": "vehicle.car",
    "bicycle": "vehicle.bicycle",
    "pedestrian": "human.pedestrian.adult",
    "traffic_cone": "movable_object.trafficcone",
    "barrier": "movable_object.barrier",
    "czone_sign": "movable_object.debris",
    "generic_object": "movable_object.pushable_pullable",
}

#: nuScenes attributes (name, description).
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver, is stationary but may move soon (traffic, lights)."),
    ("vehicle.parked", "Vehicle is stationary with no intent to move."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is no rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The pedestrian is sitting or lying down."),
    ("pedestrian.standing", "The pedestrian is standing."),
    ("pedestrian.moving", "The pedestrian is moving."),
)
ATTRIBUTE_INDEX: dict[str, int] = {name: i for i, (name, _) in enumerate(ATTRIBUTES)}
#: Objects slower than this are stopped / standing, m/s.
MOVING_SPEED_M_S = 0.2

#: nuScenes' visibility table (its tokens are the strings "1".."4"): token, level, description.
VISIBILITY: tuple[tuple[str, str, str], ...] = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)

#: Ground bands by lateral offset from the loop's centre line (m, left positive) -> lidarseg class.
#: Lanes and the bike lane are driveable; road-side strips (cones, barriers) are flat.other;
#: sidewalks (pedestrians, the left poles) flat.sidewalk; everything else flat.terrain.
DRIVEABLE_M = (-6.8, 5.9)
ROADSIDE_M = ((-8.0, -6.8), (5.9, 7.4))
SIDEWALK_M = ((-10.4, -8.0), (7.4, 10.4))
#: Map mask resolution (nuScenes' native 0.1 m per pixel) and margin around the scene, m.
MAP_RESOLUTION_M = 0.1
MAP_MARGIN_M = 30.0


def _fixed_token(kind: str, name: str) -> str:
    """A 32-hex token that depends only on the row's identity (same in every release, as nuScenes')."""
    return hashlib.md5(f"driveengine-synth-nuscenes/{kind}/{name}".encode()).hexdigest()


CATEGORY_TOKENS: tuple[str, ...] = tuple(_fixed_token("category", n) for n, _ in CATEGORIES)
ATTRIBUTE_TOKENS: tuple[str, ...] = tuple(_fixed_token("attribute", n) for n, _ in ATTRIBUTES)
SENSOR_TOKENS: dict[str, str] = {ch: _fixed_token("sensor", ch) for ch in CHANNELS}

#: The 13 tables of a release (``lidarseg`` is the optional 14th).
TABLES: tuple[str, ...] = (
    "attribute",
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "log",
    "map",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
    "visibility",
)

# ---------------------------------------------------------------------------------------------------
# official scene names (the shipped split files)
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def official_scene_names(split: str) -> tuple[str, ...]:
    """The scene names of the official nuScenes split ``split`` in the devkit's order.

    Args:
        split: ``mini_train``, ``mini_val``, ``train``, ``val``, ``test``, ``train_detect`` or
            ``train_track`` (read from the shipped ``splits/nuscenes_<split>.yaml``).
    """
    path = resources.files("driveengine.splits") / f"nuscenes_{split}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SynthError(f"{path}: no such nuScenes split file (unknown split {split!r})") from None
    names = data.get("log_names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SynthError(f"{path}: log_names must be a list of scene names")
    return tuple(names)


def _interleave(a: Sequence[str], b: Sequence[str]) -> list[str]:
    out: list[str] = []
    for i in range(max(len(a), len(b))):
        out += [x[i] for x in (a, b) if i < len(x)]
    return out


def default_scene_names(version: str) -> list[str]:
    """Scene names :func:`write_nuscenes` gives its scenes, in order.

    ``v1.0-mini``: mini_train and mini_val interleaved (so two scenes give one of each);
    ``v1.0-trainval``: train and val interleaved; ``v1.0-test``: test; any other table folder name
    (e.g. a T4-style release): ``scene-0001``, ``scene-0002``, ... (9999 at most).
    """
    if version == "v1.0-mini":
        return _interleave(official_scene_names("mini_train"), official_scene_names("mini_val"))
    if version == "v1.0-trainval":
        return _interleave(official_scene_names("train"), official_scene_names("val"))
    if version == "v1.0-test":
        return list(official_scene_names("test"))
    return [f"scene-{i:04d}" for i in range(1, 10_000)]


# ---------------------------------------------------------------------------------------------------
# records: faults and truth
# ---------------------------------------------------------------------------------------------------

#: Foreign keys :class:`NuScenesFaults.broken_links` may break, per table.
BREAKABLE_LINKS: dict[str, tuple[str, ...]] = {
    "scene": ("log_token", "first_sample_token", "last_sample_token"),
    "sample": ("scene_token", "prev", "next"),
    "sample_data": ("sample_token", "ego_pose_token", "calibrated_sensor_token", "prev", "next"),
    "sample_annotation": ("sample_token", "instance_token", "prev", "next"),
    "instance": ("category_token", "first_annotation_token", "last_annotation_token"),
    "calibrated_sensor": ("sensor_token",),
}


@dataclass(frozen=True)
class NuScenesFaults:
    """Defects to inject, as broken downloads and bad conversions have them.

    Row and chain indices are in time order within the scene (the order of the truth arrays).

    Attributes:
        missing_tables: table names whose ``.json`` is not written at all.
        missing_sweeps: ``(scene, LIDAR_TOP chain index)``: row written, ``.pcd.bin`` not written.
        truncated_sweeps: ``(scene, LIDAR_TOP chain index)``: ``.pcd.bin`` written without its last 6 bytes.
        missing_images: ``(scene, camera channel, chain index)``: row written, ``.jpg`` not written.
        broken_links: ``(scene, table, field, row)``: that foreign key holds a fresh token that
            resolves nowhere (fields: :data:`BREAKABLE_LINKS`).
    """

    missing_tables: tuple[str, ...] = ()
    missing_sweeps: tuple[tuple[int, int], ...] = ()
    truncated_sweeps: tuple[tuple[int, int], ...] = ()
    missing_images: tuple[tuple[int, str, int], ...] = ()
    broken_links: tuple[tuple[int, str, str, int], ...] = ()

    @classmethod
    def coerce(cls, faults: NuScenesFaults | Mapping | None) -> NuScenesFaults:
        if faults is None:
            return cls()
        if isinstance(faults, NuScenesFaults):
            return faults
        try:
            f = cls(
                **{
                    k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                    for k, v in dict(faults).items()
                }
            )
        except (TypeError, AttributeError) as exc:
            raise SynthError(f"bad nuScenes faults {faults!r}: {exc}") from exc
        return f

    def check(self, n_scenes: int) -> None:
        """Raise :class:`SynthError` naming the first fault that refers to nothing."""
        bad = [t for t in self.missing_tables if t not in (*TABLES, "lidarseg")]
        if bad:
            raise SynthError(
                f"faults.missing_tables names unknown table {bad[0]!r}; tables: {', '.join(TABLES)}"
            )
        scenes = [
            f[0]
            for f in (*self.missing_sweeps, *self.truncated_sweeps, *self.missing_images, *self.broken_links)
        ]
        if any(not 0 <= s < n_scenes for s in scenes):
            raise SynthError(f"a fault names a scene index outside 0..{n_scenes - 1}")
        for _, ch, _ in self.missing_images:
            if ch not in CAMERA_CHANNELS:
                raise SynthError(f"faults.missing_images names unknown camera {ch!r}")
        for _, table, fld, _ in self.broken_links:
            if fld not in BREAKABLE_LINKS.get(table, ()):
                raise SynthError(
                    f"faults.broken_links cannot break {table}.{fld}; breakable: "
                    + ", ".join(f"{t}.{f}" for t, fs in BREAKABLE_LINKS.items() for f in fs)
                )


@dataclass(frozen=True)
class NuScenesSamples:
    """The samples (key frames) of one scene, in time order.

    Attributes:
        token: (S,) 32-hex tokens.
        timestamp_us: (S,) int64, the key-frame LiDAR sweep's timestamp.
        sweep_index: (S,) index of that sweep in ``World.lidar_timestamps_us``.
    """

    token: np.ndarray
    timestamp_us: np.ndarray
    sweep_index: np.ndarray


@dataclass(frozen=True)
class NuScenesSampleData:
    """Every ``sample_data`` row of one scene, grouped by channel (:data:`CHANNELS` order), each in time order.

    Attributes:
        token, ego_pose_token, calibrated_sensor_token: (N,) 32-hex tokens.
        channel: (N,) str.
        timestamp_us: (N,) int64 (also the ``ego_pose.timestamp``).
        is_key_frame: (N,) bool.
        sample_index: (N,) index into :class:`NuScenesSamples` (the sample it belongs to / that follows).
        chain_index: (N,) position in its channel's chain (0 = first).
        sweep_index: (N,) world LiDAR sweep index for LIDAR_TOP rows, -1 otherwise.
        filename: (N,) path relative to the release root.
        ego_translation: (N, 3) ``ego_pose.translation`` (nuScenes global frame, m).
        ego_rotation: (N, 4) ``ego_pose.rotation`` (w, x, y, z).
    """

    token: np.ndarray
    channel: np.ndarray
    timestamp_us: np.ndarray
    is_key_frame: np.ndarray
    sample_index: np.ndarray
    chain_index: np.ndarray
    sweep_index: np.ndarray
    filename: np.ndarray
    ego_pose_token: np.ndarray
    calibrated_sensor_token: np.ndarray
    ego_translation: np.ndarray
    ego_rotation: np.ndarray

    def global_from_ego(self) -> np.ndarray:
        """(N, 4, 4) nuScenes ``global_from_ego`` of every row."""
        return make_transform(self.ego_rotation, self.ego_translation)


@dataclass(frozen=True)
class NuScenesAnnotations:
    """Every ``sample_annotation`` of one scene, sample-major (time order), then by track.

    Attributes:
        token: (A,) 32-hex tokens.
        sample_index: (A,) index into :class:`NuScenesSamples`.
        instance_index: (A,) index into :class:`NuScenesInstances`.
        track_index: (A,) index into ``World.tracks``.
        category: (A,) nuScenes category name.
        translation: (A, 3) box centre, nuScenes global frame, m.
        size_wlh: (A, 3) width, length, height, m (nuScenes' order).
        rotation: (A, 4) global orientation (w, x, y, z), pure yaw.
        yaw: (A,) rad.
        velocity: (A, 3) exact global velocity at the sample time, m/s.
        velocity_nuscenes: (A, 3) the velocity as the devkit's ``box_velocity`` defines it from the
            written annotations (centred difference; NaN without neighbours or beyond 1.5 s / 3 s).
        num_lidar_pts: (A,) key-frame sweep points on the object.
        visibility_token: (A,) "1".."4".
        attribute_tokens: (A,) tuples of attribute tokens.
        prev, next: (A,) index of the previous / next annotation of the same instance, -1 at the ends.
    """

    token: np.ndarray
    sample_index: np.ndarray
    instance_index: np.ndarray
    track_index: np.ndarray
    category: np.ndarray
    translation: np.ndarray
    size_wlh: np.ndarray
    rotation: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    velocity_nuscenes: np.ndarray
    num_lidar_pts: np.ndarray
    visibility_token: np.ndarray
    attribute_tokens: np.ndarray
    prev: np.ndarray
    next: np.ndarray


@dataclass(frozen=True)
class NuScenesInstances:
    """The instances of one scene (one per annotated world track), by first appearance.

    Attributes:
        token: (I,) 32-hex tokens.
        track_index: (I,) index into ``World.tracks``.
        category: (I,) nuScenes category name.
        first_annotation, last_annotation: (I,) indices into :class:`NuScenesAnnotations`.
        nbr_annotations: (I,) int.
    """

    token: np.ndarray
    track_index: np.ndarray
    category: np.ndarray
    first_annotation: np.ndarray
    last_annotation: np.ndarray
    nbr_annotations: np.ndarray


@dataclass(frozen=True)
class NuScenesCalibration:
    """One ``calibrated_sensor`` row.

    Attributes:
        channel: sensor channel.
        token: calibrated_sensor token; ``sensor_token``: its sensor row.
        translation: (3,) nuScenes ego frame, m; ``rotation``: (4,) w, x, y, z (sensor -> ego).
        camera_intrinsic: (3, 3) pixels for cameras, None otherwise.
    """

    channel: str
    token: str
    sensor_token: str
    translation: np.ndarray
    rotation: np.ndarray
    camera_intrinsic: np.ndarray | None

    def ego_from_sensor(self) -> np.ndarray:
        """(4, 4) nuScenes ``ego_from_sensor``."""
        return make_transform(self.rotation, self.translation)


@dataclass
class SynthNuScenesScene:
    """One written scene and its ground truth.

    Attributes:
        name: ``scene.name`` (e.g. ``scene-0061``).
        token, log_token, map_token: its scene, log and map rows.
        logfile, location: ``log.logfile`` and ``log.location``.
        version: the table folder name; ``root``: the release root (``filename`` is relative to it).
        world: the ground truth (:class:`~driveengine.synth.world.World`), in the world's frames.
        global_offset_m: (3,) world global position of the nuScenes global origin, m (z = 0).
        samples, sample_data, annotations, instances: rows in time order (see their classes).
        calibration: channel -> :class:`NuScenesCalibration`.
        annotated: whether ``sample_annotation``/``instance`` rows were written (not for ``*-test``);
            ``annotations`` holds the truth either way.
        missing_files, truncated_files: relative paths deliberately not written / cut short.
        broken_links: ``(table, field, token of the row)`` of the links deliberately broken.
        counts: rows written per table for this scene; ``files``/``bytes``: blob files and bytes.
    """

    name: str
    token: str
    log_token: str
    map_token: str
    logfile: str
    location: str
    version: str
    root: Path
    world: World
    global_offset_m: np.ndarray
    samples: NuScenesSamples
    sample_data: NuScenesSampleData
    annotations: NuScenesAnnotations
    instances: NuScenesInstances
    calibration: dict[str, NuScenesCalibration]
    annotated: bool = True
    missing_files: list[str] = field(default_factory=list)
    truncated_files: list[str] = field(default_factory=list)
    broken_links: list[tuple[str, str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0

    def nuscenes_global_from_world_global(self) -> np.ndarray:
        """(4, 4): world (nuPlan synth) global coordinates -> this scene's nuScenes global coordinates."""
        return make_transform(np.eye(3), -self.global_offset_m)

    def world_global_from_nuscenes_ego(self, row: int) -> np.ndarray:
        """(4, 4) world-global pose of the nuScenes ego frame of ``sample_data`` row ``row``."""
        sd = self.sample_data
        pose = make_transform(sd.ego_rotation[row], sd.ego_translation[row])
        return invert_transform(self.nuscenes_global_from_world_global()) @ pose

    def rows(self, channel: str) -> np.ndarray:
        """Indices of ``sample_data`` rows of ``channel`` in time order."""
        return np.flatnonzero(self.sample_data.channel == channel)


# ---------------------------------------------------------------------------------------------------
# geometry of a scene (token-free)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _KeySweep:
    """What the writer needs of one key-frame sweep (points already in the nuScenes LIDAR_TOP frame)."""

    points: np.ndarray  #: (P, 5) float32: x, y, z, intensity, ring
    labels: np.ndarray  #: (P,) uint8 lidarseg class index


@dataclass
class _Geometry:
    """Everything of a scene except tokens and the absolute time shift (see :class:`SynthNuScenesScene`)."""

    world: World
    offset: np.ndarray
    sample_ts: np.ndarray
    sample_sweep: np.ndarray
    sd_channel: np.ndarray  # (N,) int index into CHANNELS
    sd_ts: np.ndarray
    sd_key: np.ndarray
    sd_sample: np.ndarray
    sd_chain: np.ndarray
    sd_sweep: np.ndarray
    sd_translation: np.ndarray
    sd_rotation: np.ndarray
    ann_sample: np.ndarray
    ann_track: np.ndarray
    ann_instance: np.ndarray
    ann_center: np.ndarray
    ann_wlh: np.ndarray
    ann_rotation: np.ndarray
    ann_yaw: np.ndarray
    ann_velocity: np.ndarray
    ann_velocity_nuscenes: np.ndarray
    ann_num_lidar: np.ndarray
    ann_visibility: np.ndarray  # (A,) int 1..4
    ann_attribute: np.ndarray  # (A,) int index into ATTRIBUTES, -1 for none
    ann_prev: np.ndarray
    ann_next: np.ndarray
    inst_track: np.ndarray
    inst_first: np.ndarray
    inst_last: np.ndarray
    inst_count: np.ndarray
    calib_channels: tuple[str, ...]
    calib_translation: dict[str, np.ndarray]
    calib_rotation: dict[str, np.ndarray]
    calib_intrinsic: dict[str, np.ndarray | None]
    cameras_world: dict[str, Camera]  # cameras with ego_from_camera in the world's ego frame
    key_sweeps: dict[int, _KeySweep]  # world sweep index -> sweep


def _map_origin(loop: Loop) -> np.ndarray:
    """(3,) integer world-global xy of the nuScenes global origin (z 0): the scene's corner minus a margin."""
    lx, ly = loop.size_m
    reach = 30.0  # buildings and poles stand up to ~24 m outside the centre line
    hx = 0.5 * (lx + 2 * reach)
    hy = 0.5 * (ly + 2 * reach)
    c, s = abs(np.cos(loop.theta)), abs(np.sin(loop.theta))
    half = np.array([c * hx + s * hy, s * hx + c * hy])
    xy = np.floor(loop.origin - half - MAP_MARGIN_M)
    return np.array([xy[0], xy[1], 0.0])


def _map_size_px(loop: Loop, offset: np.ndarray) -> tuple[int, int]:
    """(width, height) of the map mask covering the scene."""
    far = np.ceil(2 * (loop.origin - offset[:2]))  # the scene is centred at loop.origin
    return int(far[0] / MAP_RESOLUTION_M), int(far[1] / MAP_RESOLUTION_M)


def loop_offset_m(loop: Loop, xy_global: np.ndarray) -> np.ndarray:
    """Signed lateral offset (m, left of the direction of travel positive) of world-global points from the loop's centre line.

    The centre line is a rounded rectangle driven counter-clockwise, so "left" is inside: the offset
    is minus the signed distance to the rounded rectangle.
    """
    xy = np.asarray(xy_global, dtype=np.float64)
    c, s = np.cos(loop.theta), np.sin(loop.theta)
    d = xy - loop.origin
    qx = np.abs(c * d[..., 0] + s * d[..., 1])
    qy = np.abs(-s * d[..., 0] + c * d[..., 1])
    bx = 0.5 * loop.size_m[0] - loop.radius_m
    by = 0.5 * loop.size_m[1] - loop.radius_m
    ox, oy = qx - bx, qy - by
    outside = np.hypot(np.maximum(ox, 0.0), np.maximum(oy, 0.0))
    inside = np.minimum(np.maximum(ox, oy), 0.0)
    return -(outside + inside - loop.radius_m)


def ground_class(loop: Loop, xy_global: np.ndarray) -> np.ndarray:
    """nuScenes-lidarseg class index (uint8) of ground points at world-global ``xy_global``."""
    d = loop_offset_m(loop, xy_global)
    out = np.full(d.shape, CATEGORY_INDEX["flat.terrain"], dtype=np.uint8)
    for lo, hi in SIDEWALK_M:
        out[(d >= lo) & (d <= hi)] = CATEGORY_INDEX["flat.sidewalk"]
    for lo, hi in ROADSIDE_M:
        out[(d >= lo) & (d <= hi)] = CATEGORY_INDEX["flat.other"]
    out[(d >= DRIVEABLE_M[0]) & (d <= DRIVEABLE_M[1])] = CATEGORY_INDEX["flat.driveable_surface"]
    return out


def map_mask_png(loop: Loop, offset: np.ndarray) -> bytes:
    """The semantic-prior map mask (driveable surface and sidewalks 255, else 0) as PNG bytes.

    nuScenes' convention: 0.1 m per pixel, pixel row 0 at the top (largest y), the nuScenes global
    origin at the bottom-left corner; the devkit maps global (x, y) to pixel
    ``(round(x / 0.1), round(height - y / 0.1))``. The bands are drawn as nested polygons along the
    lines of constant offset (one vertex per 0.2 m of loop), so the mask and :func:`ground_class`
    agree up to a pixel at the band edges.
    """
    from PIL import ImageDraw

    width, height = _map_size_px(loop, offset)
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    s = np.arange(0.0, loop.length_m, 0.2)
    # a curve at offset d encloses every point of offset >= d (left = inside): paint from the outside in
    edges = sorted([(SIDEWALK_M[0][0], 255), (SIDEWALK_M[0][1], 0), (DRIVEABLE_M[0], 255), (DRIVEABLE_M[1], 0),
                    (SIDEWALK_M[1][0], 255), (SIDEWALK_M[1][1], 0)])  # fmt: skip
    for d, value in edges:
        xy, _, _ = loop.evaluate(s, d)
        px = (xy[:, 0] - offset[0]) / MAP_RESOLUTION_M
        py = height - (xy[:, 1] - offset[1]) / MAP_RESOLUTION_M
        draw.polygon(list(zip(px.tolist(), py.tolist(), strict=True)), fill=value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _chain(first_ts: int, n: int, hz: int, delay_us: int) -> np.ndarray:
    """``first_ts + delay + floor(k * 1e6 / hz)`` for k = 0..n-1 (exact integers), µs."""
    return first_ts + delay_us + (np.arange(n, dtype=np.int64) * 1_000_000) // hz


def _sample_of(ts: np.ndarray, sample_ts: np.ndarray) -> np.ndarray:
    """Index of the sample each timestamp belongs to: the first sample at or after it."""
    return np.minimum(np.searchsorted(sample_ts, ts, side="left"), len(sample_ts) - 1)


def _nuscenes_velocity(
    sample_ts: np.ndarray, ann_sample, center, prev, nxt, max_time_diff_s: float = 1.5
) -> np.ndarray:
    """The devkit's ``box_velocity`` of every annotation, vectorised (NaN where it gives NaN)."""
    has_prev, has_next = prev >= 0, nxt >= 0
    first = np.where(has_prev, prev, np.arange(len(prev)))
    last = np.where(has_next, nxt, np.arange(len(nxt)))
    dt = 1e-6 * sample_ts[ann_sample[last]] - 1e-6 * sample_ts[ann_sample[first]]
    limit = np.where(has_prev & has_next, 2 * max_time_diff_s, max_time_diff_s)
    ok = (has_prev | has_next) & (dt <= limit)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (center[last] - center[first]) / dt[:, None]
    v[~ok] = np.nan
    return v


def _visibility_levels(
    sweep: Sweep, centers: np.ndarray, sizes: np.ndarray, yaws: np.ndarray, seen: np.ndarray
) -> np.ndarray:
    """Visibility bin 1..4 of each box: its points in ``sweep`` (``seen``) / the points it would give alone.

    "Alone" tests the sweep's rays that can reach a box (inside its bounding sphere's cone) against
    that box and the ground only (slab test, vectorised over all (ray, box) pairs). Every ray that
    hits the box alone returns a point in the full sweep (the box or something in front of it), so
    the directions of the sweep's points are all the rays needed.
    """
    out = np.ones(len(seen), dtype=np.int64)
    if len(seen) == 0 or len(sweep.global_xyz) == 0:
        return out
    origin = sweep.origin_global
    rel = sweep.global_xyz - origin
    dirs = rel / np.linalg.norm(rel, axis=1, keepdims=True)
    v = centers - origin
    dist = np.linalg.norm(v, axis=1)
    radius = 0.5 * np.linalg.norm(sizes, axis=1)
    cos_lim = np.where(
        dist > radius, np.sqrt(np.clip(1.0 - (radius / np.maximum(dist, 1e-9)) ** 2, 0.0, 1.0)), -2.0
    )
    ray, box = np.nonzero(dirs @ (v / np.maximum(dist, 1e-9)[:, None]).T >= cos_lim[None, :] - 1e-9)
    d = dirs[ray]
    c, s = np.cos(yaws[box]), np.sin(yaws[box])
    o = origin - centers[box]
    lo = np.stack([c * o[:, 0] + s * o[:, 1], -s * o[:, 0] + c * o[:, 1], o[:, 2]], axis=-1)
    ld = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=-1)
    half = 0.5 * sizes[box]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - lo) / ld
        t2 = (half - lo) / ld
        t_ground = np.where(d[:, 2] < 0.0, -origin[2] / d[:, 2], np.inf)
    near = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf).max(axis=1)
    far = np.nan_to_num(np.maximum(t1, t2), nan=np.inf).min(axis=1)
    hit = (near <= far) & (near > 0.0) & (near <= LIDAR_MAX_RANGE_M) & (near < t_ground)
    alone = np.bincount(box[hit], minlength=len(seen))
    frac = np.where(alone > 0, np.minimum(1.0, seen / np.maximum(alone, 1)), 0.0)
    return 1 + (frac >= 0.4).astype(np.int64) + (frac >= 0.6) + (frac >= 0.8)


def _world_lidar_pose(world: World, global_from_ego: np.ndarray) -> np.ndarray:
    """World-global pose of the nuScenes LIDAR_TOP frame given the world ego pose."""
    return global_from_ego @ world.ego_from_lidar @ _WORLD_LIDAR_FROM_NUSCENES_LIDAR


def _sweep_points(world: World, sweep: Sweep) -> np.ndarray:
    """(P, 5) float32 nuScenes ``.pcd.bin`` rows (LIDAR_TOP frame) of a world sweep."""
    lidar_from_global = invert_transform(_world_lidar_pose(world, sweep.global_from_ego))
    xyz = transform_points(lidar_from_global, sweep.global_xyz)
    return np.column_stack([xyz, sweep.intensity, sweep.ring]).astype(np.float32)


def _sweep_labels(world: World, sweep: Sweep, track_category: np.ndarray) -> np.ndarray:
    """(P,) uint8 lidarseg class of every point: the object's category, ground bands, static.manmade."""
    labels = np.full(len(sweep.track_index), CATEGORY_INDEX["static.manmade"], dtype=np.uint8)
    obj = sweep.track_index >= 0
    labels[obj] = track_category[sweep.track_index[obj]]
    ground = ~obj & (np.abs(sweep.global_xyz[:, 2]) < 1e-6)
    labels[ground] = ground_class(world.loop, sweep.global_xyz[ground, :2])
    return labels


def _build_geometry(
    world: World, *, rays: int, camera_sweeps: bool, radar: bool, image_size: tuple[int, int]
) -> _Geometry:
    """Samples, sample_data rows, poses, annotations and key-frame sweeps of one scene (vectorised)."""
    lidar_ts = world.lidar_timestamps_us
    n_samples = (len(lidar_ts) - 1) // KEY_FRAME_EVERY + 1
    sample_sweep = np.arange(n_samples) * KEY_FRAME_EVERY
    sample_ts = lidar_ts[sample_sweep]
    t_first = int(sample_ts[0])
    offset = _map_origin(world.loop)

    # --- sample_data rows, channel by channel --------------------------------------------------
    ch_idx, ts_all, key_all, chain_all, sweep_all, sample_all = [], [], [], [], [], []

    def add(ch: str, ts: np.ndarray, key: np.ndarray, sweep: np.ndarray, sample_of_key: np.ndarray) -> None:
        sample = _sample_of(ts, sample_ts)
        sample[key] = sample_of_key
        ch_idx.append(np.full(len(ts), CHANNELS.index(ch)))
        ts_all.append(ts)
        key_all.append(key)
        chain_all.append(np.arange(len(ts)))
        sweep_all.append(sweep)
        sample_all.append(sample)

    chain = np.arange(sample_sweep[-1] + 1)
    lkey = chain % KEY_FRAME_EVERY == 0
    add(LIDAR_CHANNEL, lidar_ts[chain], lkey, chain, chain[lkey] // KEY_FRAME_EVERY)
    for ch in CAMERA_CHANNELS:
        ts = _chain(
            t_first,
            CAMERA_FRAMES_PER_SAMPLE * (n_samples - 1) + 1,
            CAMERA_HZ,
            _camera_delay_us(CAMERA_MOUNTS[ch][0]),
        )
        k = np.arange(len(ts))
        key = k % CAMERA_FRAMES_PER_SAMPLE == 0
        if not camera_sweeps:
            ts, k, key = ts[key], k[key], key[key]
        add(ch, ts, key, np.full(len(ts), -1), k[key] // CAMERA_FRAMES_PER_SAMPLE)
    if radar:
        for i, ch in enumerate(RADAR_CHANNELS):
            n = int((sample_ts[-1] - t_first) * RADAR_HZ // 1_000_000) + 2
            ts = _chain(t_first, n, RADAR_HZ, 7_000 + 5_000 * i)
            keys = np.argmin(np.abs(ts[None, :] - sample_ts[:, None]), axis=1)
            ts = ts[: keys[-1] + 1]
            key = np.zeros(len(ts), dtype=bool)
            key[keys] = True
            add(ch, ts, key, np.full(len(ts), -1), np.arange(n_samples))
    sd_ts = np.concatenate(ts_all)
    # the pose each sensor captures from (World.frame_pose), lowered to the ground and shifted
    pose = world.ego_state(world.ego_pose_timestamps_us[world.nearest_ego_pose_index(sd_ts)])
    sd_translation = pose.translation - offset - np.array([0.0, 0.0, EGO_Z_M])

    # --- annotations ------------------------------------------------------------------------------
    tr = world.tracks
    states = world.track_states(sample_ts)
    ego_xy = world.ego_state(sample_ts).translation[:, :2]
    dist = np.linalg.norm(states["center"][..., :2] - ego_xy[:, None, :], axis=-1)
    ann_sample, ann_track = np.nonzero(states["exists"] & (dist <= BOX_RANGE_M))  # sample-major
    n_ann = len(ann_sample)
    order = np.lexsort((ann_sample, ann_track))  # by track, then time
    prev = np.full(n_ann, -1)
    nxt = np.full(n_ann, -1)
    same = ann_track[order[1:]] == ann_track[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    nxt[order[:-1][same]] = order[1:][same]
    center_world = states["center"][ann_sample, ann_track]
    center = center_world - offset
    yaw = states["yaw"][ann_sample, ann_track]
    velocity = states["velocity"][ann_sample, ann_track]
    size = tr.size[ann_track]
    wlh = size[:, [1, 0, 2]]
    rotation = yaw_to_quaternion(yaw)
    # instances by first appearance
    inst_track, first = np.unique(ann_track, return_index=True)
    by_first = np.argsort(first, kind="stable")
    inst_track, first = inst_track[by_first], first[by_first]
    inst_of_track = np.full(len(tr), -1)
    inst_of_track[inst_track] = np.arange(len(inst_track))
    ann_instance = inst_of_track[ann_track]
    inst_count = np.bincount(ann_instance, minlength=len(inst_track))
    last = np.full(len(inst_track), -1)
    last[ann_instance] = np.arange(n_ann)  # later annotations overwrite: the last one wins
    world_cat = np.array(_world_categories(), dtype=object)[tr.category]
    track_category = np.array([CATEGORY_INDEX[CATEGORY_OF[c]] for c in world_cat], dtype=np.uint8)
    # attributes from the category and the speed
    speed = np.linalg.norm(velocity, axis=1)
    moving = speed >= MOVING_SPEED_M_S
    cat_name = world_cat[ann_track]
    attribute = np.full(n_ann, -1)
    is_vehicle = cat_name == "vehicle"
    attribute[is_vehicle & moving] = ATTRIBUTE_INDEX["vehicle.moving"]
    parked = ATTRIBUTE_INDEX["vehicle.parked"] if world.static_only else ATTRIBUTE_INDEX["vehicle.stopped"]
    attribute[is_vehicle & ~moving] = parked
    attribute[cat_name == "bicycle"] = ATTRIBUTE_INDEX["cycle.with_rider"]
    is_ped = cat_name == "pedestrian"
    attribute[is_ped & moving] = ATTRIBUTE_INDEX["pedestrian.moving"]
    attribute[is_ped & ~moving] = ATTRIBUTE_INDEX["pedestrian.standing"]

    # --- key-frame sweeps: points, labels, num_lidar_pts, visibility ----------------------------
    num_lidar = np.zeros(n_ann, dtype=np.int64)
    visibility = np.ones(n_ann, dtype=np.int64)
    key_sweeps: dict[int, _KeySweep] = {}
    solids = world.solids_many(sample_ts)
    poses = world.frame_poses(sample_ts)
    ann_start = np.searchsorted(ann_sample, np.arange(n_samples + 1))
    for m in range(n_samples):
        sweep = lidar_sweep(
            world, int(sample_ts[m]), rays, int(sample_sweep[m]), solids=solids[m], global_from_ego=poses[m]
        )
        lo, hi = ann_start[m], ann_start[m + 1]
        tracks_here = ann_track[lo:hi]
        counts = np.bincount(sweep.track_index[sweep.track_index >= 0], minlength=len(tr))
        num_lidar[lo:hi] = counts[tracks_here]
        visibility[lo:hi] = _visibility_levels(
            sweep, center_world[lo:hi], size[lo:hi], yaw[lo:hi], num_lidar[lo:hi]
        )
        key_sweeps[int(sample_sweep[m])] = _KeySweep(
            _sweep_points(world, sweep), _sweep_labels(world, sweep, track_category)
        )

    # --- calibration ------------------------------------------------------------------------------
    lift = invert_transform(world_ego_from_nuscenes_ego())
    ego_from_lidar = lift @ world.ego_from_lidar @ _WORLD_LIDAR_FROM_NUSCENES_LIDAR
    calib_t = {LIDAR_CHANNEL: ego_from_lidar[:3, 3].copy()}
    calib_q = {LIDAR_CHANNEL: matrix_to_quaternion(ego_from_lidar[:3, :3])}
    calib_k: dict[str, np.ndarray | None] = {LIDAR_CHANNEL: None}
    cameras_world = {}
    for cam in nuscenes_cameras(*image_size):
        calib_t[cam.channel] = cam.translation
        calib_q[cam.channel] = cam.rotation
        calib_k[cam.channel] = cam.intrinsic
        cameras_world[cam.channel] = Camera(
            cam.channel, cam.translation - np.array([0.0, 0.0, EGO_Z_M]), cam.rotation, cam.intrinsic,
            cam.distortion, cam.width, cam.height,
        )  # fmt: skip
    channels = (LIDAR_CHANNEL, *CAMERA_CHANNELS)
    if radar:
        for ch in RADAR_CHANNELS:
            yaw_deg, t = RADAR_MOUNTS[ch]
            calib_t[ch] = np.array(t)
            calib_q[ch] = yaw_to_quaternion(np.radians(yaw_deg))
            calib_k[ch] = None
        channels = CHANNELS
    return _Geometry(
        world=world,
        offset=offset,
        sample_ts=sample_ts,
        sample_sweep=sample_sweep,
        sd_channel=np.concatenate(ch_idx),
        sd_ts=sd_ts,
        sd_key=np.concatenate(key_all),
        sd_sample=np.concatenate(sample_all),
        sd_chain=np.concatenate(chain_all),
        sd_sweep=np.concatenate(sweep_all),
        sd_translation=sd_translation,
        sd_rotation=pose.rotation,
        ann_sample=ann_sample,
        ann_track=ann_track,
        ann_instance=ann_instance,
        ann_center=center,
        ann_wlh=wlh,
        ann_rotation=rotation,
        ann_yaw=yaw,
        ann_velocity=velocity,
        ann_velocity_nuscenes=_nuscenes_velocity(sample_ts, ann_sample, center, prev, nxt),
        ann_num_lidar=num_lidar,
        ann_visibility=visibility,
        ann_attribute=attribute,
        ann_prev=prev,
        ann_next=nxt,
        inst_track=inst_track,
        inst_first=first,
        inst_last=last,
        inst_count=inst_count,
        calib_channels=channels,
        calib_translation=calib_t,
        calib_rotation=calib_q,
        calib_intrinsic=calib_k,
        cameras_world=cameras_world,
        key_sweeps=key_sweeps,
    )


# ---------------------------------------------------------------------------------------------------
# JSON in nuScenes' format (json.dump(rows, indent=0)), columnar and fast
# ---------------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': json.dumps leaves it as is


def _hex_tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random 32-hex tokens (uuid4-sized), vectorised."""
    if n == 0:
        return np.zeros(0, dtype="U32")
    raw = binascii.hexlify(rng.bytes(16 * n))
    return np.frombuffer(raw, dtype="S32").astype("U32")


def _emit(
    fields: Sequence[tuple[str, str]], columns: Mapping[str, object], order: np.ndarray, where: str
) -> str:
    """Rows (in ``order``) of a table as ``json.dumps(rows, indent=0)`` would write them, without the brackets.

    ``fields``: (name, kind) in output order; kinds: ``str``, ``int``, ``bool``, ``floatK`` (a list of
    K floats, column (n, K)), ``json`` (any value, rendered with ``json.dumps(indent=0)``); ``tok``:
    strings known to need no escaping (tokens, file names built from checked parts), ``str``: others;
    ``toklist``: lists of such strings.
    """
    parts: list[str] = []
    args: list[list] = []
    for name, kind in fields:
        col = columns[name]
        if kind == "tok":  # trusted: hex tokens and names built from checked parts
            parts.append(f'"{name}": "%s"')
            args.append(col.tolist() if isinstance(col, np.ndarray) else list(col))  # type: ignore[arg-type]
        elif kind == "str":
            values = col.tolist() if isinstance(col, np.ndarray) else list(col)  # type: ignore[arg-type]
            if all(isinstance(v, str) and _PLAIN.fullmatch(v) for v in values):
                parts.append(f'"{name}": "%s"')
                args.append(values)
            else:
                parts.append(f'"{name}": %s')
                args.append([json.dumps(v) for v in values])
        elif kind == "int":
            parts.append(f'"{name}": %d')
            args.append(np.asarray(col, dtype=np.int64).tolist())
        elif kind == "bool":
            parts.append(f'"{name}": %s')
            args.append(["true" if v else "false" for v in np.asarray(col, dtype=bool).tolist()])
        elif kind.startswith("float"):
            k = int(kind[5:])
            arr = np.asarray(col, dtype=np.float64).reshape(-1, k)
            if not np.isfinite(arr).all():
                raise SynthError(f"{where}: non-finite value in {name}; refusing to write it")
            parts.append(f'"{name}": [\n' + ",\n".join(["%r"] * k) + "\n]")
            args.extend(arr.T.tolist())
        elif kind == "toklist":  # lists of trusted strings, as json.dumps(indent=0) renders them
            parts.append(f'"{name}": %s')
            args.append(["[\n" + ",\n".join(f'"{t}"' for t in v) + "\n]" if len(v) else "[]" for v in col])  # type: ignore[union-attr]
        elif kind == "json":
            parts.append(f'"{name}": %s')
            args.append([json.dumps(v, indent=0, allow_nan=False) for v in col])  # type: ignore[union-attr]
        else:  # pragma: no cover - programming error
            raise ValueError(kind)
    template = "{\n" + ",\n".join(parts) + "\n}"
    rows = [template % values for values in zip(*args, strict=True)] if args else []
    return ",\n".join(rows[i] for i in order.tolist())


class _TableFile:
    """One table's ``.json`` written chunk by chunk (bounded memory), renamed into place on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = self.tmp.open("w", encoding="ascii", newline="\n")
        self.rows = 0

    def add(self, text: str, rows: int) -> None:
        if rows == 0:
            return
        self.file.write(("[\n" if self.rows == 0 else ",\n") + text)
        self.rows += rows

    def close(self) -> int:
        self.file.write("\n]" if self.rows else "[]")
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "attribute": (("token", "tok"), ("name", "str"), ("description", "str")),
    "calibrated_sensor": (
        ("token", "tok"), ("sensor_token", "tok"), ("translation", "float3"), ("rotation", "float4"),
        ("camera_intrinsic", "json"),
    ),
    "category": (("token", "tok"), ("name", "str"), ("description", "str"), ("index", "int")),
    "ego_pose": (("token", "tok"), ("timestamp", "int"), ("rotation", "float4"), ("translation", "float3")),
    "instance": (
        ("token", "tok"), ("category_token", "tok"), ("nbr_annotations", "int"),
        ("first_annotation_token", "tok"), ("last_annotation_token", "tok"),
    ),
    "log": (("token", "tok"), ("logfile", "str"), ("vehicle", "str"), ("date_captured", "str"), ("location", "str")),
    "map": (("category", "str"), ("token", "tok"), ("filename", "str"), ("log_tokens", "json")),
    "sample": (("token", "tok"), ("timestamp", "int"), ("prev", "tok"), ("next", "tok"), ("scene_token", "tok")),
    "sample_annotation": (
        ("token", "tok"), ("sample_token", "tok"), ("instance_token", "tok"), ("visibility_token", "tok"),
        ("attribute_tokens", "toklist"), ("translation", "float3"), ("size", "float3"), ("rotation", "float4"),
        ("prev", "tok"), ("next", "tok"), ("num_lidar_pts", "int"), ("num_radar_pts", "int"),
    ),
    "sample_data": (
        ("token", "tok"), ("sample_token", "tok"), ("ego_pose_token", "tok"), ("calibrated_sensor_token", "tok"),
        ("timestamp", "int"), ("fileformat", "tok"), ("is_key_frame", "bool"), ("height", "int"),
        ("width", "int"), ("filename", "tok"), ("prev", "tok"), ("next", "tok"),
    ),
    "scene": (
        ("token", "tok"), ("log_token", "tok"), ("nbr_samples", "int"), ("first_sample_token", "tok"),
        ("last_sample_token", "tok"), ("name", "str"), ("description", "str"),
    ),
    "sensor": (("token", "tok"), ("channel", "str"), ("modality", "str")),
    "visibility": (("description", "str"), ("token", "tok"), ("level", "str")),
    "lidarseg": (("token", "tok"), ("sample_data_token", "tok"), ("filename", "tok")),
}  # fmt: skip


def _linked(tokens: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``tokens[index]`` with '' where ``index`` is -1."""
    out = np.full(len(index), "", dtype="U32")
    ok = index >= 0
    out[ok] = tokens[index[ok]]
    return out


def _chain_links(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prev/next row index within each channel's chain (rows are grouped by channel, time-ordered)."""
    n = len(channel)
    prev = np.arange(n) - 1
    nxt = np.arange(n) + 1
    prev[0:1] = -1
    nxt[n - 1 : n] = -1
    start = np.flatnonzero(np.r_[True, channel[1:] != channel[:-1]]) if n else np.zeros(0, dtype=int)
    prev[start] = -1
    nxt[start[1:] - 1] = -1
    return prev, nxt


# ---------------------------------------------------------------------------------------------------
# the release writer
# ---------------------------------------------------------------------------------------------------


@dataclass
class _SceneJob:
    """One output scene: its geometry, identity, tokens' seed and time shift."""

    index: int
    geometry: _Geometry
    name: str
    shift_us: int
    map_token: str
    location: str


class _Release:
    """The open table files of a release; scenes are added one at a time."""

    def __init__(self, out: Path, version: str, faults: NuScenesFaults, lidarseg: bool) -> None:
        self.out = out
        self.version = version
        self.faults = faults
        self.table_dir = out / version
        self.table_dir.mkdir(parents=True, exist_ok=True)
        names = [t for t in TABLES if t != "map"] + (["lidarseg"] if lidarseg else [])
        self.files = {
            t: _TableFile(self.table_dir / f"{t}.json") for t in names if t not in faults.missing_tables
        }
        self.maps: dict[str, tuple[str, list[str]]] = {}  # map token -> (filename, log tokens)
        self.counts: dict[str, int] = dict.fromkeys([*TABLES, *(["lidarseg"] if lidarseg else [])], 0)

    def add(self, table: str, text: str, rows: int) -> None:
        self.counts[table] += rows
        if table in self.files:
            self.files[table].add(text, rows)

    def close(self) -> dict[str, int]:
        """Write the fixed tables and the map table, close every file; returns bytes per table file."""
        fixed = {
            "category": {
                "token": np.array(CATEGORY_TOKENS), "name": [n for n, _ in CATEGORIES],
                "description": [d for _, d in CATEGORIES], "index": np.arange(len(CATEGORIES)),
            },
            "attribute": {
                "token": np.array(ATTRIBUTE_TOKENS), "name": [n for n, _ in ATTRIBUTES],
                "description": [d for _, d in ATTRIBUTES],
            },
            "visibility": {
                "token": [t for t, _, _ in VISIBILITY], "level": [lv for _, lv, _ in VISIBILITY],
                "description": [d for _, _, d in VISIBILITY],
            },
            "sensor": {
                "token": [SENSOR_TOKENS[ch] for ch in CHANNELS], "channel": list(CHANNELS),
                "modality": ["lidar" if ch == LIDAR_CHANNEL else "camera" if ch.startswith("CAM") else "radar" for ch in CHANNELS],
            },
        }  # fmt: skip
        for table, cols in fixed.items():
            n = len(cols["token"])
            self.add(table, _emit(FIELDS[table], cols, np.arange(n), table), n)
        sizes = {t: f.close() for t, f in self.files.items()}
        if "map" not in self.faults.missing_tables:
            tokens = sorted(self.maps)
            cols = {
                "category": ["semantic_prior"] * len(tokens), "token": tokens,
                "filename": [self.maps[t][0] for t in tokens], "log_tokens": [self.maps[t][1] for t in tokens],
            }  # fmt: skip
            path = self.table_dir / "map.json"
            tmp = path.with_name("map.json.tmp")
            body = _emit(FIELDS["map"], cols, np.arange(len(tokens)), "map")
            tmp.write_text(f"[\n{body}\n]" if tokens else "[]", encoding="ascii")
            os.replace(tmp, path)
            sizes["map"] = path.stat().st_size
        self.counts["map"] = len(self.maps)
        return sizes

    def discard(self) -> None:
        for f in self.files.values():
            f.discard()


def _logfile(world: World, shift_us: int) -> tuple[str, str, str]:
    """(logfile, vehicle, date_captured) in nuScenes' style, from the world's log identity."""
    import datetime as _dt

    start = _dt.datetime.fromtimestamp((world.t0_us + shift_us) / 1e6, tz=_dt.UTC)
    digits = "".join(ch for ch in world.vehicle_name if ch.isdigit()) or "0"
    vehicle = f"n{int(digits):03d}"
    return f"{vehicle}-{start:%Y-%m-%d-%H-%M-%S}+0000", vehicle, f"{start:%Y-%m-%d}"


def _write_scene(
    release: _Release, job: _SceneJob, rng: np.random.Generator, annotated: bool, lidarseg: bool
) -> SynthNuScenesScene:
    """Draw the scene's tokens and add its rows to every table; returns its truth (no blobs yet)."""
    g = job.geometry
    world = g.world
    faults = release.faults
    scene_tok, log_tok = _hex_tokens(rng, 2).tolist()
    n_s, n_sd, n_ann, n_inst = len(g.sample_ts), len(g.sd_ts), len(g.ann_sample), len(g.inst_track)
    sample_tok = _hex_tokens(rng, n_s)
    sd_tok = _hex_tokens(rng, n_sd)
    pose_tok = _hex_tokens(rng, n_sd)
    ann_tok = _hex_tokens(rng, n_ann)
    inst_tok = _hex_tokens(rng, n_inst)
    cs_tok = dict(zip(g.calib_channels, _hex_tokens(rng, len(g.calib_channels)).tolist(), strict=True))
    every = np.concatenate(
        [[scene_tok, log_tok], sample_tok, sd_tok, pose_tok, ann_tok, inst_tok, list(cs_tok.values())]
    )
    if len(np.unique(every)) != len(every):  # 2^-128 per pair: never in practice, but never silent
        raise SynthError(f"{job.name}: token collision; use another seed")
    logfile, vehicle, date = _logfile(world, job.shift_us)
    sample_ts = g.sample_ts + job.shift_us
    sd_ts = g.sd_ts + job.shift_us
    channel = np.array(CHANNELS, dtype=object)[g.sd_channel]
    is_cam = np.char.startswith(channel.astype(str), "CAM")
    is_lidar = channel == LIDAR_CHANNEL
    folder = np.where(g.sd_key, "samples", "sweeps")
    ext = np.where(is_lidar, ".pcd.bin", np.where(is_cam, ".jpg", ".pcd"))
    filename = np.array(
        [
            f"{d}/{c}/{logfile}__{c}__{t}{e}"
            for d, c, t, e in zip(folder, channel, sd_ts.tolist(), ext, strict=True)
        ],
        dtype=object,
    )
    width, height = g.cameras_world[CAMERA_CHANNELS[0]].width, g.cameras_world[CAMERA_CHANNELS[0]].height

    # foreign keys, then the requested broken ones
    s_idx = np.arange(n_s)
    cols: dict[str, dict[str, object]] = {}
    sd_prev, sd_next = _chain_links(g.sd_channel)
    cols["sample"] = {
        "token": sample_tok, "timestamp": sample_ts, "prev": _linked(sample_tok, s_idx - 1),
        "next": _linked(sample_tok, np.where(s_idx + 1 < n_s, s_idx + 1, -1)), "scene_token": np.full(n_s, scene_tok),
    }  # fmt: skip
    cols["sample_data"] = {
        "token": sd_tok, "sample_token": sample_tok[g.sd_sample], "ego_pose_token": pose_tok,
        "calibrated_sensor_token": np.array([cs_tok[c] for c in channel]), "timestamp": sd_ts,
        "fileformat": np.where(is_cam, "jpg", "pcd"), "is_key_frame": g.sd_key,
        "height": np.where(is_cam, height, 0), "width": np.where(is_cam, width, 0), "filename": filename,
        "prev": _linked(sd_tok, sd_prev), "next": _linked(sd_tok, sd_next),
    }  # fmt: skip
    cols["ego_pose"] = {
        "token": pose_tok,
        "timestamp": sd_ts,
        "rotation": g.sd_rotation,
        "translation": g.sd_translation,
    }
    attr_tokens = np.empty(n_ann, dtype=object)
    attr_tokens[:] = [(ATTRIBUTE_TOKENS[a],) if a >= 0 else () for a in g.ann_attribute.tolist()]
    vis_tokens = np.array([VISIBILITY[v - 1][0] for v in g.ann_visibility.tolist()], dtype="U1").astype(
        object
    )
    track_cat = np.array(
        [CATEGORY_OF[c] for c in np.array(_world_categories(), dtype=object)[world.tracks.category]],
        dtype=object,
    )
    cols["sample_annotation"] = {
        "token": ann_tok, "sample_token": sample_tok[g.ann_sample], "instance_token": inst_tok[g.ann_instance],
        "visibility_token": vis_tokens, "attribute_tokens": attr_tokens,
        "translation": g.ann_center, "size": g.ann_wlh, "rotation": g.ann_rotation,
        "prev": _linked(ann_tok, g.ann_prev), "next": _linked(ann_tok, g.ann_next),
        "num_lidar_pts": g.ann_num_lidar, "num_radar_pts": np.zeros(n_ann, dtype=np.int64),
    }  # fmt: skip
    inst_category = track_cat[g.inst_track]
    cols["instance"] = {
        "token": inst_tok, "category_token": np.array([CATEGORY_TOKENS[CATEGORY_INDEX[c]] for c in inst_category]),
        "nbr_annotations": g.inst_count, "first_annotation_token": ann_tok[g.inst_first],
        "last_annotation_token": ann_tok[g.inst_last],
    }  # fmt: skip
    cols["scene"] = {
        "token": [scene_tok], "log_token": [log_tok], "nbr_samples": [n_s], "first_sample_token": [sample_tok[0]],
        "last_sample_token": [sample_tok[-1]], "name": [job.name],
        "description": [f"Synthetic loop drive, seed {world.seed}, log {world.log_index}: stop and go, left turns"],
    }  # fmt: skip
    cols["log"] = {
        "token": [log_tok], "logfile": [logfile], "vehicle": [vehicle], "date_captured": [date],
        "location": [job.location],
    }  # fmt: skip
    cal = g.calib_channels
    cols["calibrated_sensor"] = {
        "token": [cs_tok[c] for c in cal], "sensor_token": [SENSOR_TOKENS[c] for c in cal],
        "translation": np.array([g.calib_translation[c] for c in cal]),
        "rotation": np.array([g.calib_rotation[c] for c in cal]),
        "camera_intrinsic": [[] if g.calib_intrinsic[c] is None else g.calib_intrinsic[c].tolist() for c in cal],
    }  # fmt: skip
    lidar_key_rows = np.flatnonzero(is_lidar & g.sd_key)
    if lidarseg:
        lt = sd_tok[lidar_key_rows]
        cols["lidarseg"] = {
            "token": lt, "sample_data_token": lt,
            "filename": [f"lidarseg/{release.version}/{t}_lidarseg.bin" for t in lt.tolist()],
        }  # fmt: skip

    broken: list[tuple[str, str, str]] = []
    for scene_i, table, fld, row in faults.broken_links:
        if scene_i != job.index:
            continue
        col = np.array(cols[table][fld], dtype=object)
        if not 0 <= row < len(col):
            raise SynthError(f"faults.broken_links: {table} of scene {job.index} has no row {row}")
        col[row] = _hex_tokens(rng, 1)[0]
        cols[table][fld] = col
        broken.append((table, fld, str(np.asarray(cols[table]["token"])[row])))

    counts: dict[str, int] = {}
    for table, c in cols.items():
        if table in ("sample_annotation", "instance") and not annotated:
            counts[table] = 0
            continue
        n = len(c["token"])  # type: ignore[arg-type]
        order = rng.permutation(n)
        release.add(table, _emit(FIELDS[table], c, order, f"{release.version}/{table}.json ({job.name})"), n)
        counts[table] = n
    _, logs = release.maps.setdefault(job.map_token, (f"maps/{job.map_token}.png", []))
    logs.append(log_tok)
    counts["map"] = 0

    cal_rec = {
        c: NuScenesCalibration(
            c, cs_tok[c], SENSOR_TOKENS[c], g.calib_translation[c], g.calib_rotation[c], g.calib_intrinsic[c]
        )
        for c in cal
    }
    return SynthNuScenesScene(
        name=job.name,
        token=scene_tok,
        log_token=log_tok,
        map_token=job.map_token,
        logfile=logfile,
        location=job.location,
        version=release.version,
        root=release.out,
        world=world,
        global_offset_m=g.offset,
        samples=NuScenesSamples(sample_tok, sample_ts, g.sample_sweep),
        sample_data=NuScenesSampleData(
            token=sd_tok, channel=channel, timestamp_us=sd_ts, is_key_frame=g.sd_key, sample_index=g.sd_sample,
            chain_index=g.sd_chain, sweep_index=g.sd_sweep, filename=filename, ego_pose_token=pose_tok,
            calibrated_sensor_token=np.asarray(cols["sample_data"]["calibrated_sensor_token"]),
            ego_translation=g.sd_translation, ego_rotation=g.sd_rotation,
        ),
        annotations=NuScenesAnnotations(
            token=ann_tok, sample_index=g.ann_sample, instance_index=g.ann_instance, track_index=g.ann_track,
            category=track_cat[g.ann_track] if n_ann else np.zeros(0, dtype=object), translation=g.ann_center,
            size_wlh=g.ann_wlh, rotation=g.ann_rotation, yaw=g.ann_yaw, velocity=g.ann_velocity,
            velocity_nuscenes=g.ann_velocity_nuscenes, num_lidar_pts=g.ann_num_lidar, visibility_token=vis_tokens,
            attribute_tokens=attr_tokens, prev=g.ann_prev, next=g.ann_next,
        ),
        instances=NuScenesInstances(
            token=inst_tok, track_index=g.inst_track, category=inst_category, first_annotation=g.inst_first,
            last_annotation=g.inst_last, nbr_annotations=g.inst_count,
        ),
        calibration=cal_rec,
        annotated=annotated,
        broken_links=broken,
        counts=counts,
    )  # fmt: skip


@lru_cache(maxsize=1)
def _world_categories() -> tuple[str, ...]:
    from driveengine.sources.nuplan.constants import CATEGORIES as WORLD_CATEGORIES

    return tuple(WORLD_CATEGORIES)


#: Blob jobs whose world state is evaluated together.
_BATCH = 128


def _write_blobs(
    scene: SynthNuScenesScene, g: _Geometry, rays: int, faults: NuScenesFaults, index: int, progress: bool
) -> None:
    """Write the scene's ``.pcd.bin`` sweeps and ``.jpg`` images (the capture rule of the module docstring)."""
    from driveengine.progress import progress as progress_display

    world = g.world
    sd = scene.sample_data
    missing = {k for s, k in faults.missing_sweeps if s == index}
    truncated = {k for s, k in faults.truncated_sweeps if s == index}
    missing_img = {(ch, k) for s, ch, k in faults.missing_images if s == index}
    rows = np.flatnonzero(np.isin(sd.channel, (LIDAR_CHANNEL, *CAMERA_CHANNELS)))
    cam_rays = {ch: pixel_rays(c) for ch, c in g.cameras_world.items()}
    with progress_display(total=len(rows), desc=scene.name, unit="file", show=progress) as bar:
        for start in range(0, len(rows), _BATCH):
            batch = rows[start : start + _BATCH]
            stamps = g.sd_ts[batch]  # world time (write_nuscenes does not shift scenes)
            solids = world.solids_many(stamps)
            poses = world.frame_poses(stamps)
            for r, known_solids, pose in zip(batch.tolist(), solids, poses, strict=True):
                bar.update()
                ch, k, rel = str(sd.channel[r]), int(sd.chain_index[r]), str(sd.filename[r])
                if ch == LIDAR_CHANNEL:
                    if k in missing:
                        scene.missing_files.append(rel)
                        continue
                    sweep_i = int(sd.sweep_index[r])
                    key = g.key_sweeps.get(sweep_i)
                    if key is None:
                        sweep = lidar_sweep(
                            world, int(g.sd_ts[r]), rays, sweep_i, solids=known_solids, global_from_ego=pose
                        )
                        data = _sweep_points(world, sweep).tobytes()
                    else:
                        data = key.points.tobytes()
                    if k in truncated:
                        data = data[:-6]
                        scene.truncated_files.append(rel)
                else:
                    if (ch, k) in missing_img:
                        scene.missing_files.append(rel)
                        continue
                    rgb, _ = render_camera(
                        world,
                        g.cameras_world[ch],
                        int(g.sd_ts[r]),
                        cam_rays[ch],
                        solids=known_solids,
                        global_from_ego=pose,
                    )
                    data = jpeg_bytes(rgb)
                _put(scene, scene.root / rel, data)


def _put(scene: SynthNuScenesScene, path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    scene.files += 1
    scene.bytes += len(data)


def _write_lidarseg(scene: SynthNuScenesScene, g: _Geometry) -> None:
    """One ``<token>_lidarseg.bin`` (uint8 class index per point) per key-frame LIDAR_TOP sweep."""
    sd = scene.sample_data
    for r in np.flatnonzero((sd.channel == LIDAR_CHANNEL) & sd.is_key_frame).tolist():
        labels = g.key_sweeps[int(sd.sweep_index[r])].labels
        _put(scene, scene.root / "lidarseg" / scene.version / f"{sd.token[r]}_lidarseg.bin", labels.tobytes())


def _check_version(version: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version or ""):
        raise SynthError(f"invalid nuScenes version (table folder name) {version!r}: use e.g. v1.0-mini")


def _names(version: str, n: int, scene_names: Sequence[str] | None) -> list[str]:
    names = list(scene_names) if scene_names is not None else default_scene_names(version)
    if len(names) < n:
        raise SynthError(
            f"{n} scenes asked for but only {len(names)} scene names for {version!r}; "
            "pass scene_names or use v1.0-trainval (850 names)"
        )
    names = names[:n]
    if len(set(names)) != n or not all(_PLAIN.fullmatch(x) and x for x in names):
        raise SynthError(
            "scene names must be unique, non-empty printable ASCII without quotes or backslashes"
        )
    return names


def write_nuscenes(
    out_dir: str | os.PathLike[str],
    *,
    scenes: int = 2,
    seconds: float = 20.0,
    seed: int = 0,
    version: str = "v1.0-mini",
    points: int = DEFAULT_RAYS,
    image_size: tuple[int, int] = (160, 90),
    blobs: bool = True,
    camera_sweeps: bool = True,
    lidarseg: bool = False,
    radar: bool = False,
    scene_names: Sequence[str] | None = None,
    static_only: bool = False,
    faults: NuScenesFaults | Mapping | None = None,
    progress: bool = False,
) -> list[SynthNuScenesScene]:
    """Write ``scenes`` synthetic scenes as a nuScenes release under ``out_dir`` (layout: module docstring).

    Args:
        out_dir: release root (the devkit's ``dataroot``).
        scenes: number of scenes; scene ``i`` is ``world_for_log(seed, i, seconds, ...)`` (one log each).
        seconds: duration of each world; ``(round(seconds * 20) - 1) // 10 + 1`` samples.
        seed: fixes everything written (identical bytes for the same arguments).
        version: the table folder name (``v1.0-mini``, ``v1.0-trainval``, ``v1.0-test`` or any other
            name, e.g. for T4-style releases). ``*-test`` releases have no annotation rows, as nuScenes'.
        points: rays per LiDAR sweep (the nuPlan synth's ``points``; the same value gives the same points).
        image_size: (width, height) of the camera images, pixels.
        blobs: write sweeps, images (and lidarseg labels) at all; False writes tables and maps only.
        camera_sweeps: write the 12 Hz non-key camera rows and images (False: key frames only).
        lidarseg: write nuScenes-lidarseg labels (``lidarseg.json`` and one ``.bin`` per key-frame sweep).
        radar: add the five radars' ``sample_data`` rows (13 Hz); their ``.pcd`` files are never
            synthesised, so this needs ``blobs=False`` (metadata-only releases, e.g. benchmarks).
        scene_names: names of the scenes (default: :func:`default_scene_names` of ``version``).
        static_only: objects never move (vehicles are then ``vehicle.parked``).
        faults: :class:`NuScenesFaults` (or a dict of its fields).
        progress: show a progress bar over the blobs.

    Returns:
        One :class:`SynthNuScenesScene` (rows, tokens and world truth) per scene.
    """
    if scenes < 0 or seconds <= 0 or points <= 0 or min(image_size) <= 0:
        raise SynthError(
            f"invalid synth options scenes={scenes} seconds={seconds} points={points} image_size={image_size}: "
            "use scenes >= 0 and positive seconds, points and image size"
        )
    _check_version(version)
    if radar and blobs:
        raise SynthError("radar=True writes radar rows without .pcd files: use it with blobs=False")
    annotated = not version.endswith("-test")
    if lidarseg and not annotated:
        raise SynthError(f"lidarseg labels are not part of a test release ({version}); drop lidarseg")
    faults = NuScenesFaults.coerce(faults)
    faults.check(scenes)
    names = _names(version, scenes, scene_names)
    out = Path(out_dir)
    release = _Release(out, version, faults, lidarseg)
    results: list[SynthNuScenesScene] = []
    try:
        for i, name in enumerate(names):
            world = world_for_log(seed, i, seconds, static_only=static_only, image_size=image_size)
            g = _build_geometry(
                world, rays=points, camera_sweeps=camera_sweeps, radar=radar, image_size=image_size
            )
            map_token = _hex_tokens(np.random.default_rng([seed, i, 101]), 1)[0]
            job = _SceneJob(i, g, name, 0, map_token, f"synthetic-s{seed}-l{i:04d}")
            scene = _write_scene(release, job, np.random.default_rng([seed, i, 100]), annotated, lidarseg)
            png = out / "maps" / f"{map_token}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(map_mask_png(world.loop, g.offset))
            if blobs:
                _write_blobs(scene, g, points, faults, i, progress)
            if lidarseg:
                _write_lidarseg(scene, g)
            results.append(scene)
    except BaseException:
        release.discard()
        raise
    release.close()
    return results


@dataclass(frozen=True)
class NuScenesMetadataStats:
    """What :func:`write_nuscenes_metadata` wrote.

    Attributes:
        scenes: scenes written; ``distinct``: distinct worlds they were replicated from.
        rows: rows per table; ``bytes``: bytes per table file.
        seconds: wall time of the whole write; ``build_seconds``: of it, building the distinct worlds
            (a fixed cost); ``write_seconds``: writing the scenes' rows (grows with the scene count).
    """

    scenes: int
    distinct: int
    rows: dict[str, int]
    bytes: dict[str, int]
    seconds: float
    build_seconds: float
    write_seconds: float


def write_nuscenes_metadata(
    out_dir: str | os.PathLike[str],
    *,
    scenes: int = 850,
    scale: float = 1.0,
    distinct: int = 4,
    seconds: float = 20.0,
    seed: int = 0,
    version: str = "v1.0-trainval",
    radar: bool = True,
    points: int = 8192,
) -> NuScenesMetadataStats:
    """Write trainval-sized nuScenes tables and maps (no sensor files) quickly, for benchmarks.

    ``round(scenes * scale)`` scenes are written; scene ``j`` replicates world ``j % distinct``
    (built once, with its LiDAR measurements from ``points`` rays) with its own tokens, log and name
    (the official train/val names), shifted by ``(j // distinct)`` hours, so every scene is a valid
    scene of its own. Scenes of one world share its map (as nuScenes' logs share four maps). With the
    defaults (850 scenes, radar rows) the tables hold 2.61M ``sample_data``/``ego_pose`` and about
    1.2M ``sample_annotation`` rows (2.5 GB of JSON), like v1.0-trainval; ``scale`` writes a fraction
    (``scale=0.1``: 85 scenes) for a benchmark that extrapolates.

    Args:
        out_dir: release root; tables go to ``<out_dir>/<version>/``, maps to ``<out_dir>/maps/``.
        scenes: scenes at ``scale=1`` (850 = v1.0-trainval); ``scale``: the fraction to write.
        distinct: distinct worlds (``world_for_log(seed, b, seconds)``, b < distinct) replicated.
        seconds: duration of each world; seed: as in :func:`write_nuscenes`.
        version: the table folder name (its default scene names are used).
        radar: add the five radars' rows (13 Hz), as real releases have them.
        points: rays of the key-frame sweeps that measure ``num_lidar_pts`` and visibility.

    Returns:
        :class:`NuScenesMetadataStats`.
    """
    import time

    start = time.perf_counter()
    if distinct <= 0 or seconds <= 0 or points <= 0 or not (0 < scale < float("inf")):
        raise SynthError(
            f"invalid options scale={scale} distinct={distinct} seconds={seconds} points={points}: "
            "use a positive scale, distinct, seconds and points"
        )
    n = max(1, round(scenes * scale))
    _check_version(version)
    names = _names(version, n, None)
    out = Path(out_dir)
    release = _Release(out, version, NuScenesFaults(), lidarseg=False)
    annotated = not version.endswith("-test")
    geometries: list[_Geometry] = []
    map_tokens: list[str] = []
    try:
        for b in range(min(distinct, n)):
            world = world_for_log(seed, b, seconds)
            g = _build_geometry(world, rays=points, camera_sweeps=True, radar=radar, image_size=(1600, 900))
            g.key_sweeps.clear()  # no blobs: free the points
            geometries.append(g)
            map_tokens.append(_hex_tokens(np.random.default_rng([seed, b, 101]), 1)[0])
            png = out / "maps" / f"{map_tokens[-1]}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(map_mask_png(world.loop, g.offset))
        built = time.perf_counter()
        for j, name in enumerate(names):
            b = j % len(geometries)
            job = _SceneJob(
                j,
                geometries[b],
                name,
                (j // len(geometries)) * 3_600_000_000,
                map_tokens[b],
                f"synthetic-s{seed}-l{b:04d}",
            )
            _write_scene(release, job, np.random.default_rng([seed, j, 100]), annotated, False)
    except BaseException:
        release.discard()
        raise
    sizes = release.close()
    end = time.perf_counter()
    return NuScenesMetadataStats(
        n, len(geometries), dict(release.counts), sizes, end - start, built - start, end - built
    )


def format_nuscenes_summary(results: Iterable[SynthNuScenesScene]) -> str:
    """A short human-readable summary of what :func:`write_nuscenes` wrote."""
    results = list(results)
    lines = []
    for r in results:
        lines.append(
            f"{r.name} ({r.logfile}): {r.counts.get('sample', 0)} samples, {r.counts.get('sample_data', 0)} sample_data, "
            f"{r.counts.get('sample_annotation', 0)} annotations, {r.files} blob files, {r.bytes / 1e6:.1f} MB"
        )
    if results:
        root = results[0].root
        lines.append(
            f"wrote {len(results)} scenes: {sum(r.counts.get('sample', 0) for r in results)} samples, "
            f"{sum(r.files for r in results)} blob files -> {root / results[0].version}"
        )
    return "\n".join(lines)


__all__ = [
    "ATTRIBUTES",
    "CAMERA_CHANNELS",
    "CATEGORIES",
    "CATEGORY_OF",
    "CHANNELS",
    "LIDAR_CHANNEL",
    "RADAR_CHANNELS",
    "TABLES",
    "NuScenesAnnotations",
    "NuScenesCalibration",
    "NuScenesFaults",
    "NuScenesInstances",
    "NuScenesMetadataStats",
    "NuScenesSampleData",
    "NuScenesSamples",
    "SynthNuScenesScene",
    "default_scene_names",
    "format_nuscenes_summary",
    "ground_class",
    "loop_offset_m",
    "map_mask_png",
    "nuscenes_cameras",
    "official_scene_names",
    "world_ego_from_nuscenes_ego",
    "write_nuscenes",
    "write_nuscenes_metadata",
]
