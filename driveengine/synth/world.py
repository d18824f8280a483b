"""The synthetic world: a road loop, solids, object tracks, the ego trajectory and the sensor timeline.

Everything is deterministic from ``(seed, log_index)`` (numpy ``Generator``) and analytic in time, so
any consumer can ask for the exact state at any microsecond.

Frames and units
----------------
* **global**: a UTM-like frame (metres, float64) with the world placed near ``x ≈ 664000``,
  ``y ≈ 3997000`` so that float32 precision problems show up as with real nuPlan data. The ground is
  the plane ``z = 0`` (class background).
* **ego**: nuPlan's ego frame: origin at the rear axle, x forward, y left, z up. The rear axle is at
  global ``z = EGO_Z_M = 0.3`` and the ego never rolls or pitches, so the ground lies at ego ``z = -0.3``.
* **box**: an object's frame: origin at the box centre, x along its heading (length), y left (width),
  z up (height). Every solid (building, pole, annotated object) is an oriented box
  ``(centre, size = (length, width, height), yaw)``: an object's annotation box *is* its solid.

Layout
------
The ego drives counter-clockwise around a rounded rectangle (straights joined by left turns of radius
``CORNER_RADIUS_M``) with a periodic speed profile: cruise, smooth deceleration to 0, a stop, smooth
acceleration. Other objects follow lines parallel to the ego's path at fixed lateral offsets (``d``,
metres, positive to the left of the ego's direction of travel), so tracks never cross:

====================  ==========  ===========================================================
line                   offset (m)  content
====================  ==========  ===========================================================
ego lane                0.0        the ego and (when present) a lead vehicle ahead of it
same-direction lane    -3.5        vehicles travelling with the ego
oncoming lane          +3.5        vehicles travelling against the ego
bike lane              -5.8        a cyclist
road side              -7.3/+6.5   static cones / generic objects (right), barriers / signs (left)
sidewalks              -8.7/-9.6   pedestrians walking either way
poles                  -11/+9.5    thin tall background boxes
buildings              <=-14/>=+14 tall background boxes along the straights
====================  ==========  ===========================================================

Objects sharing a line share one speed profile (fixed spacing along the line), so no two solids ever
overlap; some tracks exist only part of the log ("no box at t" cases).

Sensor timeline (all integers, microseconds)
--------------------------------------------
* ``lidar_pc``: 20 Hz, exactly 50 000 us apart from ``t0_us`` (an epoch around 1.62e15 us).
* ``ego_pose``: 100 Hz, ``t0 - 50 ms + 10 ms * k + jitter`` with jitter in [0.5, 2.5) ms; a sensor
  sample links the ego_pose row closest to its timestamp (``ego_pose_token``).
* images: 10 Hz per camera, ``t0 + 100 ms * k`` shifted by a deterministic ±(10..30) ms jitter.
* **Capture rule**: a sensor sample taken at time ``t`` sees the objects at ``t`` from the ego pose of
  the ego_pose row closest to ``t`` (:meth:`World.frame_pose`), which is the pose a reader reports for
  it. Points and ground-truth grids are expressed in that ego frame.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from driveengine.geometry import make_transform, matrix_to_quaternion, wrap_angle, yaw_to_quaternion
from driveengine.schemas.classes import BACKGROUND
from driveengine.schemas.grid import VoxelGrid
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES, CATEGORY_TO_CLASS

#: Global z of the rear axle (the ego origin), metres.
EGO_Z_M = 0.3
#: Radius of the loop's left turns, metres.
CORNER_RADIUS_M = 20.0
#: Lidar sweep period, microseconds (20 Hz).
LIDAR_PERIOD_US = 50_000
#: Ego pose period, microseconds (100 Hz).
EGO_POSE_PERIOD_US = 10_000
#: Camera period, microseconds (10 Hz).
CAMERA_PERIOD_US = 100_000
#: ``lidar_box`` rows are written for objects whose centre is within this xy distance of the ego, m.
BOX_RANGE_M = 60.0

LANE_SAME_M = -3.5
LANE_ONCOMING_M = 3.5
LANE_BIKE_M = -5.8
SIDE_RIGHT_M = -7.3
SIDE_LEFT_M = 6.5
SIDEWALK_M = (-8.7, -9.6)
POLE_M = (-11.0, 9.5)
BUILDING_GAP_M = 14.0

_CAT = {name: i for i, name in enumerate(CATEGORIES)}


# ---------------------------------------------------------------------------------------------------
# the road loop
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loop:
    """A rounded rectangle driven counter-clockwise, parametrised by arc length ``s`` (metres).

    The loop is built in a local frame (centred at the origin, first straight along +x) and placed in
    the global frame by ``global = origin + R(theta) @ local``.

    Attributes:
        size_m: (Lx, Ly) outer extent of the centre line, metres.
        radius_m: radius of the four left turns, metres.
        origin: (2,) global position of the loop centre, metres.
        theta: global rotation of the layout, radians.
    """

    size_m: tuple[float, float]
    radius_m: float
    origin: np.ndarray
    theta: float

    @property
    def straights_m(self) -> tuple[float, float]:
        lx, ly = self.size_m
        return lx - 2 * self.radius_m, ly - 2 * self.radius_m

    @property
    def segment_lengths(self) -> np.ndarray:
        """Lengths of the 8 segments: straight, turn, straight, turn, ... metres."""
        a, b = self.straights_m
        arc = 0.5 * np.pi * self.radius_m
        return np.array([a, arc, b, arc, a, arc, b, arc])

    @property
    def length_m(self) -> float:
        return float(self.segment_lengths.sum())

    def straight_ranges(self) -> list[tuple[float, float]]:
        """``(s_start, s_end)`` of the four straights, metres."""
        starts = np.concatenate([[0.0], np.cumsum(self.segment_lengths)[:-1]])
        return [(float(starts[i]), float(starts[i] + self.segment_lengths[i])) for i in (0, 2, 4, 6)]

    def evaluate(self, s: np.ndarray, offset_m: np.ndarray | float = 0.0) -> tuple[np.ndarray, ...]:
        """Point on the line at lateral ``offset_m`` (left positive) beside arc length ``s``.

        Args:
            s: arc length along the centre line, any shape, metres (taken modulo the loop length).
            offset_m: lateral offset, broadcastable to ``s``, metres.

        Returns:
            ``(xy, heading, curvature)``: global position (..., 2) m, heading of the centre line
            (...,) rad (global, counter-clockwise from +x), curvature of the centre line (...,) 1/m.
        """
        s = np.mod(np.asarray(s, dtype=np.float64), self.length_m)
        lengths = self.segment_lengths
        starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
        seg = np.clip(np.searchsorted(starts, s, side="right") - 1, 0, 7)
        u = s - starts[seg]
        r = self.radius_m
        lx, ly = self.size_m
        # start point and heading of each segment in the local frame (centred at the loop centre)
        p0 = np.array(
            [[r, 0.0], [lx - r, 0.0], [lx, r], [lx, ly - r], [lx - r, ly], [r, ly], [0.0, ly - r], [0.0, r]]
        ) - np.array([lx / 2, ly / 2])
        h0 = np.array([0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5]) * np.pi
        is_arc = (seg % 2) == 1
        h = h0[seg] + np.where(is_arc, u / r, 0.0)
        x = np.where(is_arc, p0[seg, 0] + r * (np.sin(h) - np.sin(h0[seg])), p0[seg, 0] + u * np.cos(h))
        y = np.where(is_arc, p0[seg, 1] - r * (np.cos(h) - np.cos(h0[seg])), p0[seg, 1] + u * np.sin(h))
        offset_m = np.asarray(offset_m, dtype=np.float64)
        x = x - offset_m * np.sin(h)
        y = y + offset_m * np.cos(h)
        c, sn = np.cos(self.theta), np.sin(self.theta)
        gx = self.origin[0] + c * x - sn * y
        gy = self.origin[1] + sn * x + c * y
        curvature = np.where(is_arc, 1.0 / r, 0.0)
        return np.stack([gx, gy], axis=-1), h + self.theta, curvature


# ---------------------------------------------------------------------------------------------------
# speed profiles
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopAndGo:
    """The ego's periodic speed profile: cruise, cosine deceleration to 0, stop, cosine acceleration.

    Attributes are seconds (phase durations) and m/s (``v_max``). ``t = 0`` is the start of a cruise.
    """

    v_max: float
    cruise_s: float = 9.0
    decel_s: float = 5.0
    stop_s: float = 4.0
    accel_s: float = 5.0

    @property
    def period_s(self) -> float:
        return self.cruise_s + self.decel_s + self.stop_s + self.accel_s

    @property
    def distance_per_cycle_m(self) -> float:
        return self.v_max * (self.cruise_s + 0.5 * self.decel_s + 0.5 * self.accel_s)

    def __call__(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(distance m, speed m/s, acceleration m/s^2)`` at times ``t`` (seconds), exact integrals."""
        t = np.asarray(t, dtype=np.float64)
        vm, tc, td, ts, ta = self.v_max, self.cruise_s, self.decel_s, self.stop_s, self.accel_s
        cycles = np.floor(t / self.period_s)
        tau = t - cycles * self.period_s
        d_cruise, d_decel = vm * tc, 0.5 * vm * td
        ud = np.clip(tau - tc, 0.0, td)
        ua = np.clip(tau - tc - td - ts, 0.0, ta)
        dist = np.select(
            [tau < tc, tau < tc + td, tau < tc + td + ts],
            [
                vm * tau,
                d_cruise + 0.5 * vm * (ud + td / np.pi * np.sin(np.pi * ud / td)),
                np.full_like(tau, d_cruise + d_decel),
            ],
            d_cruise + d_decel + 0.5 * vm * (ua - ta / np.pi * np.sin(np.pi * ua / ta)),
        )
        speed = np.select(
            [tau < tc, tau < tc + td, tau < tc + td + ts],
            [np.full_like(tau, vm), 0.5 * vm * (1 + np.cos(np.pi * ud / td)), np.zeros_like(tau)],
            0.5 * vm * (1 - np.cos(np.pi * ua / ta)),
        )
        accel = np.select(
            [tau < tc, tau < tc + td, tau < tc + td + ts],
            [np.zeros_like(tau), -0.5 * vm * np.pi / td * np.sin(np.pi * ud / td), np.zeros_like(tau)],
            0.5 * vm * np.pi / ta * np.sin(np.pi * ua / ta),
        )
        return cycles * self.distance_per_cycle_m + dist, speed, accel


# ---------------------------------------------------------------------------------------------------
# ground-truth containers
# ---------------------------------------------------------------------------------------------------


@dataclass
class Boxes:
    """Oriented boxes in the global frame at one instant.

    Attributes:
        track_index: (B,) int, index into the world's track table (-1 for unannotated background solids).
        track_token: (B,) str, 16-hex track token ("" for background solids).
        category: (B,) str, nuPlan category name ("" for background solids).
        class_id: (B,) uint8 occupancy class id (BACKGROUND for background solids).
        center: (B, 3) float64, global, m.
        size: (B, 3) float64, (length, width, height) along the box x, y, z, m.
        yaw: (B,) float64, global heading in [-pi, pi), rad.
        velocity: (B, 3) float64, global, m/s (exact derivative of the box motion).
    """

    track_index: np.ndarray
    track_token: np.ndarray
    category: np.ndarray
    class_id: np.ndarray
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray

    def __len__(self) -> int:
        return int(self.center.shape[0])

    def select(self, mask: np.ndarray) -> Boxes:
        """The boxes where ``mask`` is true."""
        return Boxes(**{k: v[mask] for k, v in self.__dict__.items()})

    @staticmethod
    def concatenate(parts: list[Boxes]) -> Boxes:
        return Boxes(
            **{k: np.concatenate([getattr(p, k) for p in parts]) for k in Boxes.__dataclass_fields__}
        )


@dataclass(frozen=True)
class EgoState:
    """Ego state at some timestamps (arrays with a leading time axis).

    Attributes:
        timestamp_us: (N,) int64.
        translation: (N, 3) global position of the rear axle, m.
        rotation: (N, 4) global orientation ``[w, x, y, z]`` (pure yaw).
        yaw: (N,) rad.
        velocity: (N, 3) ego frame, m/s (the rear axle moves along +x).
        acceleration: (N, 3) ego frame, m/s^2 (longitudinal dv/dt, lateral v^2 * curvature).
        angular_rate: (N, 3) ego frame, rad/s (yaw rate v * curvature about z).
    """

    timestamp_us: np.ndarray
    translation: np.ndarray
    rotation: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    acceleration: np.ndarray
    angular_rate: np.ndarray

    def global_from_ego(self) -> np.ndarray:
        """(N, 4, 4) float64 transforms."""
        return make_transform(self.rotation, self.translation)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera. Camera frame (OpenCV): x right, y down, z along the optical axis.

    Attributes:
        channel: nuPlan channel name, e.g. ``"CAM_F0"``.
        translation: (3,) ego_from_camera translation, m.
        rotation: (4,) ego_from_camera ``[w, x, y, z]``.
        intrinsic: (3, 3) pixels; ``[u, v, 1] ~ K @ p_camera`` with pixel centres at integer + 0.5.
        distortion: (5,) k1, k2, p1, p2, k3 (zeros: ideal pinhole).
        width, height: image size in pixels.
    """

    channel: str
    translation: np.ndarray
    rotation: np.ndarray
    intrinsic: np.ndarray
    distortion: np.ndarray
    width: int
    height: int

    def ego_from_camera(self) -> np.ndarray:
        return make_transform(self.rotation, self.translation)


#: Camera mounting: channel -> (yaw of the optical axis in the ego frame, deg; horizontal FOV, deg).
CAMERA_MOUNTS: dict[str, tuple[float, float]] = {
    "CAM_F0": (0.0, 70.0),
    "CAM_L0": (55.0, 70.0),
    "CAM_R0": (-55.0, 70.0),
    "CAM_L1": (110.0, 70.0),
    "CAM_R1": (-110.0, 70.0),
    "CAM_L2": (150.0, 70.0),
    "CAM_R2": (-150.0, 70.0),
    "CAM_B0": (180.0, 70.0),
}


def make_cameras(width: int, height: int) -> list[Camera]:
    """The eight nuPlan cameras (in :data:`CAMERA_CHANNELS` order) on a roof rig, pitched 3° down.

    ``ego_from_camera`` rotation columns are the camera's x (right), y (down), z (optical axis)
    expressed in the ego frame; translations place the cameras 1.6 m above the rear axle on a ring
    around (1.0, 0) m.
    """
    out = []
    pitch = np.radians(3.0)
    for ch in CAMERA_CHANNELS:
        yaw_deg, fov_deg = CAMERA_MOUNTS[ch]
        yaw = np.radians(yaw_deg)
        forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), -np.sin(pitch)])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        down = np.cross(forward, right)
        rot = np.stack([right, down, forward], axis=1)  # columns: camera axes in ego coordinates
        f = 0.5 * width / np.tan(0.5 * np.radians(fov_deg))
        k = np.array([[f, 0.0, 0.5 * width], [0.0, f, 0.5 * height], [0.0, 0.0, 1.0]])
        t = np.array([1.0 + 0.8 * np.cos(yaw), 0.5 * np.sin(yaw), 1.6])
        out.append(Camera(ch, t, matrix_to_quaternion(rot), k, np.zeros(5), int(width), int(height)))
    return out


#: ego_from_lidar of the merged cloud's virtual sensor: 1.4 m ahead of and 1.8 m above the rear axle,
#: rotated by (roll 0.5°, pitch -1.0°, yaw 1.5°).
def make_ego_from_lidar() -> np.ndarray:
    """(4, 4) float64 ``ego_from_lidar`` (realistic, deliberately not the identity)."""
    roll, pitch, yaw = np.radians([0.5, -1.0, 1.5])
    cr, sr, cp, sp, cy, sy = (
        np.cos(roll),
        np.sin(roll),
        np.cos(pitch),
        np.sin(pitch),
        np.cos(yaw),
        np.sin(yaw),
    )
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return make_transform(rz @ ry @ rx, [1.4, 0.0, 1.8])


# ---------------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrackTable:
    """Object tracks (annotated solids), one row per track; motion along the loop lines.

    ``s(t) = s0 + direction * (v0 t + (A/w)(cos phi - cos(w t + phi)))`` for lane tracks; tracks with
    ``follows_ego`` ride at ``s_ego(t) + s0``. Attributes are (T,) arrays unless noted.
    """

    token: np.ndarray  #: 16-hex track tokens
    category: np.ndarray  #: int8 index into CATEGORIES
    size: np.ndarray  #: (T, 3) length, width, height, m
    offset_m: np.ndarray  #: lateral line offset, m (left positive)
    direction: np.ndarray  #: +1 with the ego, -1 against
    s0: np.ndarray  #: arc length at t = 0, m
    v0: np.ndarray  #: mean speed along the centre line, m/s
    amp: np.ndarray  #: speed oscillation amplitude, m/s
    omega: np.ndarray  #: rad/s
    phase: np.ndarray  #: rad
    follows_ego: np.ndarray  #: bool
    t_on: np.ndarray  #: seconds since log start when the track appears
    t_off: np.ndarray  #: seconds since log start when it disappears (exclusive)

    def __len__(self) -> int:
        return int(self.token.shape[0])


@dataclass
class World:
    """One synthetic log's world: content, motion, sensors and timeline (see the module docstring).

    Build it with :func:`build_world` (or :func:`driveengine.synth.world_for_log`); all queries are
    pure functions of time.
    """

    seed: int
    log_index: int
    seconds: float
    static_only: bool
    loop: Loop
    ego_profile: StopAndGo
    ego_s0: float
    tracks: TrackTable
    static_center: np.ndarray  #: (S, 3) background solids (buildings, poles), global, m
    static_size: np.ndarray  #: (S, 3) length, width, height, m
    static_yaw: np.ndarray  #: (S,) rad
    static_kind: np.ndarray  #: (S,) str: "building" | "pole"
    t0_us: int
    lidar_timestamps_us: np.ndarray  #: (N,) int64
    ego_pose_timestamps_us: np.ndarray  #: (P,) int64
    image_timestamps_us: dict[str, np.ndarray]  #: channel -> (K,) int64
    ego_from_lidar: np.ndarray  #: (4, 4)
    cameras: list[Camera]
    vehicle_name: str
    log_name: str
    date: str
    extras: dict = field(default_factory=dict)

    # -- time ------------------------------------------------------------------------------------
    def seconds_since_start(self, timestamp_us: np.ndarray | int) -> np.ndarray:
        """Seconds since ``t0_us`` (float64)."""
        return (np.asarray(timestamp_us, dtype=np.int64) - self.t0_us) / 1e6

    def nearest_ego_pose_index(self, timestamp_us: np.ndarray | int) -> np.ndarray:
        """Index of the ego_pose row closest to each timestamp (ties: the earlier row)."""
        ts = np.asarray(timestamp_us, dtype=np.int64)
        p = self.ego_pose_timestamps_us
        hi = np.clip(np.searchsorted(p, ts), 1, len(p) - 1)
        lo = hi - 1
        return np.where(np.abs(p[hi] - ts) < np.abs(ts - p[lo]), hi, lo)

    # -- ego -------------------------------------------------------------------------------------
    def ego_state(self, timestamp_us: np.ndarray | int) -> EgoState:
        """Exact ego state at the given timestamps (analytic trajectory, no table lookup)."""
        ts = np.atleast_1d(np.asarray(timestamp_us, dtype=np.int64))
        dist, speed, accel = self.ego_profile(self.seconds_since_start(ts))
        xy, heading, curvature = self.loop.evaluate(self.ego_s0 + dist)
        n = ts.shape[0]
        translation = np.column_stack([xy, np.full(n, EGO_Z_M)])
        zeros = np.zeros(n)
        return EgoState(
            timestamp_us=ts,
            translation=translation,
            rotation=yaw_to_quaternion(heading),
            yaw=wrap_angle(heading),
            velocity=np.column_stack([speed, zeros, zeros]),
            acceleration=np.column_stack([accel, speed**2 * curvature, zeros]),
            angular_rate=np.column_stack([zeros, zeros, speed * curvature]),
        )

    def ego_pose(self, timestamp_us: int) -> np.ndarray:
        """(4, 4) ``global_from_ego`` of the analytic ego pose at ``timestamp_us``."""
        return self.ego_state(timestamp_us).global_from_ego()[0]

    def frame_poses(self, timestamps_us: np.ndarray) -> np.ndarray:
        """(N, 4, 4) :meth:`frame_pose` of many timestamps at once."""
        idx = self.nearest_ego_pose_index(np.atleast_1d(timestamps_us))
        return self.ego_state(self.ego_pose_timestamps_us[idx]).global_from_ego()

    def frame_pose(self, timestamp_us: int) -> np.ndarray:
        """(4, 4) ``global_from_ego`` a sensor sample at ``timestamp_us`` is expressed in.

        That is the pose of the ego_pose row closest to ``timestamp_us`` (the row its
        ``ego_pose_token`` links), i.e. what a reader reports for a ``lidar_pc`` or an image.
        """
        idx = int(self.nearest_ego_pose_index(timestamp_us))
        return self.ego_pose(int(self.ego_pose_timestamps_us[idx]))

    # -- objects ---------------------------------------------------------------------------------
    def track_states(self, timestamp_us: np.ndarray) -> dict[str, np.ndarray]:
        """All tracks at all timestamps, vectorised: arrays with shape (N, T[, k]).

        Returns a dict with ``center`` (N, T, 3), ``yaw`` (N, T), ``velocity`` (N, T, 3) (global) and
        ``exists`` (N, T) bool.
        """
        tr = self.tracks
        t = self.seconds_since_start(np.atleast_1d(timestamp_us))[:, None]
        ego_dist, ego_speed, _ = self.ego_profile(t)
        w = tr.omega[None, :]
        s_lane = tr.s0 + tr.direction * (
            tr.v0 * t + tr.amp / w * (np.cos(tr.phase) - np.cos(w * t + tr.phase))
        )
        v_lane = tr.v0 + tr.amp * np.sin(w * t + tr.phase)
        s = np.where(tr.follows_ego, self.ego_s0 + ego_dist + tr.s0, s_lane)
        speed = np.where(tr.follows_ego, ego_speed, v_lane) * tr.direction
        xy, heading, curvature = self.loop.evaluate(s, tr.offset_m)
        # d/dt of base(s) + d * normal(s) = (1 - curvature * d) * ds/dt * tangent
        along = speed * (1.0 - curvature * tr.offset_m)
        velocity = np.stack([along * np.cos(heading), along * np.sin(heading), np.zeros_like(along)], -1)
        yaw = wrap_angle(heading + np.where(tr.direction < 0, np.pi, 0.0))
        center = np.concatenate([xy, np.broadcast_to(0.5 * tr.size[:, 2], s.shape)[..., None]], axis=-1)
        exists = (t >= tr.t_on) & (t < tr.t_off)
        return {"center": center, "yaw": yaw, "velocity": velocity, "exists": exists}

    def boxes_at(self, timestamp_us: int, *, max_range_m: float | None = None) -> Boxes:
        """The annotated objects that exist at ``timestamp_us`` (global boxes, exact velocities).

        Args:
            timestamp_us: microseconds.
            max_range_m: keep only boxes whose centre is within this xy distance of the analytic ego
                position at that time (``lidar_box`` uses :data:`BOX_RANGE_M`); None keeps all.
        """
        return self.boxes_many(np.array([timestamp_us]), max_range_m=max_range_m)[0]

    def boxes_many(self, timestamps_us: np.ndarray, *, max_range_m: float | None = None) -> list[Boxes]:
        """:meth:`boxes_at` for many timestamps with one vectorised evaluation of all tracks."""
        ts = np.atleast_1d(np.asarray(timestamps_us, dtype=np.int64))
        st = self.track_states(ts)
        keep = st["exists"]
        if max_range_m is not None:
            ego_xy = self.ego_state(ts).translation[:, None, :2]
            keep = keep & (np.linalg.norm(st["center"][..., :2] - ego_xy, axis=-1) <= max_range_m)
        class_of = np.array([CATEGORY_TO_CLASS[c] for c in CATEGORIES], dtype=np.uint8)
        names_of = np.array(CATEGORIES, dtype=object)
        out = []
        for k in range(len(ts)):
            idx = np.flatnonzero(keep[k])
            cat = self.tracks.category[idx]
            out.append(
                Boxes(
                    track_index=idx,
                    track_token=self.tracks.token[idx],
                    category=names_of[cat],
                    class_id=class_of[cat],
                    center=st["center"][k, idx],
                    size=self.tracks.size[idx],
                    yaw=st["yaw"][k, idx],
                    velocity=st["velocity"][k, idx],
                )
            )
        return out

    def background_boxes(self) -> Boxes:
        """The unannotated static solids (buildings, poles) as boxes of class BACKGROUND."""
        n = len(self.static_yaw)
        return Boxes(
            track_index=np.full(n, -1),
            track_token=np.full(n, "", dtype=object),
            category=np.full(n, "", dtype=object),
            class_id=np.full(n, BACKGROUND, dtype=np.uint8),
            center=self.static_center,
            size=self.static_size,
            yaw=self.static_yaw,
            velocity=np.zeros((n, 3)),
        )

    def solids_at(self, timestamp_us: int) -> Boxes:
        """Every solid at ``timestamp_us``: annotated objects first, then background solids."""
        return Boxes.concatenate([self.boxes_at(timestamp_us), self.background_boxes()])

    def solids_many(self, timestamps_us: np.ndarray) -> list[Boxes]:
        """:meth:`solids_at` for many timestamps (one vectorised track evaluation)."""
        background = self.background_boxes()
        return [Boxes.concatenate([b, background]) for b in self.boxes_many(timestamps_us)]

    # -- ground truth and sensors (implemented in sibling modules) ---------------------------------
    def occupancy(self, timestamp_us: int, grid: VoxelGrid | None = None) -> np.ndarray:
        """(nx, ny, nz) uint8 class grid at ``timestamp_us``; see :func:`driveengine.synth.occupancy.occupancy`."""
        from driveengine.synth.occupancy import occupancy

        return occupancy(self, timestamp_us, grid)

    def flow(self, timestamp_us: int, grid: VoxelGrid | None = None) -> np.ndarray:
        """(nx, ny, nz, 2) float32 (vx, vy) m/s; see :func:`driveengine.synth.occupancy.flow`."""
        from driveengine.synth.occupancy import flow

        return flow(self, timestamp_us, grid)


# ---------------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------------


def _hex_tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = np.frombuffer(rng.bytes(8 * n), dtype=np.uint8).reshape(n, 8)
    return np.array([r.tobytes().hex() for r in raw], dtype=object)


def build_world(
    seed: int = 0,
    log_index: int = 0,
    seconds: float = 20.0,
    *,
    static_only: bool = False,
    image_size: tuple[int, int] = (160, 90),
) -> World:
    """Build the deterministic world of log ``log_index`` of a run with ``seed``.

    Args:
        seed: run seed; ``(seed, log_index)`` fixes everything (layout, motion, timeline, tokens).
        log_index: which log of the run.
        seconds: log duration; ``round(seconds * 20)`` lidar sweeps.
        static_only: objects never move (zero velocity, always present); the ego still drives.
        image_size: camera image (width, height) in pixels.
    """
    rng = np.random.default_rng([seed, log_index, 0])
    token_rng = np.random.default_rng([seed, log_index, 1])

    # log identity first, so that it does not depend on the duration
    t0_us = int(
        1_620_000_000_000_000 + int(rng.integers(0, 20_000_000)) * 1_000_000 + int(rng.integers(0, 999_999))
    )
    vehicle = f"veh-{int(rng.integers(10, 60))}"
    seq = int(rng.integers(100, 5000))

    size = (float(rng.uniform(150.0, 170.0)), float(rng.uniform(95.0, 110.0)))
    origin = np.array([664000.0 + rng.uniform(-500, 500), 3997000.0 + rng.uniform(-500, 500)])
    loop = Loop(size, CORNER_RADIUS_M, origin, float(rng.uniform(-np.pi, np.pi)))
    length = loop.length_m
    straights = loop.straight_ranges()
    profile = StopAndGo(v_max=float(rng.uniform(8.5, 10.5)))
    ego_s0 = straights[0][1] - 35.0 - float(rng.uniform(0.0, 5.0))  # a left turn ~4 s in

    rows: dict[str, list] = {k: [] for k in ("cat", "size", "d", "dir", "s0", "v0", "amp", "om", "ph", "fol")}

    def add(cat: str, size3, d, direction, s0, v0=0.0, amp=0.0, om=1.0, ph=0.0, fol=False) -> None:
        for key, val in zip(rows, (_CAT[cat], size3, d, direction, s0, v0, amp, om, ph, fol), strict=True):
            rows[key].append(val)

    def lane(cat: str, count: int, d: float, direction: int, v0: float, sizes) -> None:
        amp, om, ph = 0.25 * v0, float(rng.uniform(0.2, 0.4)), float(rng.uniform(0, 2 * np.pi))
        spacing = length / count
        base = float(rng.uniform(0, spacing))
        for i in range(count):
            s0 = base + i * spacing + float(rng.uniform(-0.1, 0.1)) * spacing
            add(cat, sizes(), d, direction, s0, v0, amp, om, ph)

    def vehicle_size():
        return [rng.uniform(4.2, 5.2), rng.uniform(1.8, 2.1), rng.uniform(1.5, 2.0)]

    lane("vehicle", 9, LANE_SAME_M, 1, float(rng.uniform(6.0, 9.0)), vehicle_size)
    lane("vehicle", 12, LANE_ONCOMING_M, -1, float(rng.uniform(7.0, 10.0)), vehicle_size)
    lane("bicycle", 2, LANE_BIKE_M, 1, float(rng.uniform(3.5, 5.0)), lambda: [1.8, 0.6, 1.7])
    lane("pedestrian", 5, SIDEWALK_M[0], 1, 1.3, lambda: [0.6, 0.6, float(rng.uniform(1.6, 1.9))])
    lane("pedestrian", 5, SIDEWALK_M[1], -1, 1.2, lambda: [0.6, 0.6, float(rng.uniform(1.6, 1.9))])
    if not static_only:
        add("vehicle", vehicle_size(), 0.0, 1, float(rng.uniform(14.0, 18.0)), fol=True)  # lead vehicle
    # static annotated objects in slots every 5 m around the loop, alternating sides
    static_kinds = {
        "traffic_cone": ([0.4, 0.4, 0.7], SIDE_RIGHT_M),
        "generic_object": ([1.0, 1.0, 1.0], SIDE_RIGHT_M),
        "barrier": ([2.0, 0.5, 1.0], SIDE_LEFT_M),
        "czone_sign": ([0.9, 0.3, 1.8], SIDE_LEFT_M),
    }
    names = list(static_kinds)
    for i, s in enumerate(np.arange(2.0, length - 3.0, 5.0)):
        cat = names[(2 * (i % 2) + int(rng.integers(0, 2)))]
        size3, d = static_kinds[cat]
        add(cat, size3, d, 1, float(s + rng.uniform(-1.0, 1.0)))

    n_tracks = len(rows["cat"])
    size_arr = np.array(rows["size"], dtype=np.float64)
    v0 = np.array(rows["v0"], dtype=np.float64)
    amp = np.array(rows["amp"], dtype=np.float64)
    fol = np.array(rows["fol"], dtype=bool)
    if static_only:  # freeze every object where it is at t = 0
        v0[:] = 0.0
        amp[:] = 0.0
    # some moving tracks enter or leave during the log
    t_on = np.full(n_tracks, -np.inf)
    t_off = np.full(n_tracks, np.inf)
    moving = np.flatnonzero((v0 > 0) | fol)
    if len(moving) and not static_only:
        part = rng.permutation(moving)[: max(2, len(moving) // 3)]
        for j, idx in enumerate(part):
            if j % 2 == 0:
                t_on[idx] = float(rng.uniform(0.2, 0.5)) * seconds
            else:
                t_off[idx] = float(rng.uniform(0.5, 0.8)) * seconds
    tracks = TrackTable(
        token=_hex_tokens(token_rng, n_tracks),
        category=np.array(rows["cat"], dtype=np.int8),
        size=size_arr,
        offset_m=np.array(rows["d"], dtype=np.float64),
        direction=np.array(rows["dir"], dtype=np.float64),
        s0=np.array(rows["s0"], dtype=np.float64),
        v0=v0,
        amp=amp,
        omega=np.array(rows["om"], dtype=np.float64),
        phase=np.array(rows["ph"], dtype=np.float64),
        follows_ego=fol,
        t_on=t_on,
        t_off=t_off,
    )

    # background solids: poles everywhere, buildings along the straights
    centers, sizes, yaws, kinds = [], [], [], []
    for d in POLE_M:
        s_poles = np.arange(float(rng.uniform(0, 20)), length - 1.0, 20.0)
        xy, heading, _ = loop.evaluate(s_poles, d)
        for p, h in zip(xy, heading, strict=True):
            centers.append([p[0], p[1], 3.5])
            sizes.append([0.3, 0.3, 7.0])
            yaws.append(h)
            kinds.append("pole")
    for s_a, s_b in straights:
        for side in (-1.0, 1.0):
            s = s_a + 6.0 + float(rng.uniform(0, 4))
            while True:
                blen = float(rng.uniform(10.0, 25.0))
                if s + blen > s_b - 6.0:
                    break
                depth = float(rng.uniform(6.0, 10.0))
                height = float(rng.uniform(6.0, 20.0))
                d = side * (BUILDING_GAP_M + 0.5 * depth)
                xy, heading, _ = loop.evaluate(np.array([s + 0.5 * blen]), d)
                centers.append([xy[0, 0], xy[0, 1], 0.5 * height])
                sizes.append([blen, depth, height])
                yaws.append(heading[0])
                kinds.append("building")
                s += blen + float(rng.uniform(3.0, 8.0))

    # timeline
    n_sweeps = max(1, round(seconds * 1e6 / LIDAR_PERIOD_US))
    lidar_ts = t0_us + LIDAR_PERIOD_US * np.arange(n_sweeps, dtype=np.int64)
    n_pose = n_sweeps * (LIDAR_PERIOD_US // EGO_POSE_PERIOD_US) + 10
    pose_ts = (
        t0_us
        - 5 * EGO_POSE_PERIOD_US
        + EGO_POSE_PERIOD_US * np.arange(n_pose, dtype=np.int64)
        + rng.integers(500, 2500, n_pose)
    )
    n_img = (n_sweeps + 1) // 2
    images = {}
    for ch in CAMERA_CHANNELS:
        jitter = rng.integers(10_000, 30_001, n_img) * rng.choice([-1, 1], n_img)
        ts = t0_us + CAMERA_PERIOD_US * np.arange(n_img, dtype=np.int64) + jitter
        ts[0] = t0_us + abs(int(jitter[0]))  # never before the log starts
        images[ch] = ts

    start = _dt.datetime.fromtimestamp(t0_us / 1e6, tz=_dt.UTC)
    log_name = f"{start:%Y.%m.%d.%H.%M.%S}_{vehicle}_{seq:05d}_{seq + max(1, round(seconds * 1.5)):05d}"
    return World(
        seed=seed,
        log_index=log_index,
        seconds=float(seconds),
        static_only=static_only,
        loop=loop,
        ego_profile=profile,
        ego_s0=ego_s0,
        tracks=tracks,
        static_center=np.array(centers, dtype=np.float64),
        static_size=np.array(sizes, dtype=np.float64),
        static_yaw=wrap_angle(np.array(yaws, dtype=np.float64)),
        static_kind=np.array(kinds, dtype=object),
        t0_us=t0_us,
        lidar_timestamps_us=lidar_ts,
        ego_pose_timestamps_us=pose_ts,
        image_timestamps_us=images,
        ego_from_lidar=make_ego_from_lidar(),
        cameras=make_cameras(*image_size),
        vehicle_name=vehicle,
        log_name=log_name,
        date=f"{start:%Y-%m-%d}",
    )
