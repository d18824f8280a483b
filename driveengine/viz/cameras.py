"""Camera panels of the pictures: where each camera sits on the car, and the 3D boxes projected into it.

**Layout** (:func:`camera_layout`). Each camera's optical axis (the third column of the rotation of
``ego_from_camera``, from the frame row's ``sensor2lidar_rotation``) has an azimuth in the ego frame
(0 forward, +90 deg left). Cameras looking forward (``cos(azimuth) > 0``) form the front row, the others
the back row; each row runs from the car's left to its right (``sin(azimuth)`` decreasing), so the
picture reads like the view from above with the front up: nuPlan's eight cameras give
``L0 F0 R0`` over ``L1 L2 B0 R2 R1``, nuScenes' six ``FRONT_LEFT FRONT FRONT_RIGHT`` over
``BACK_LEFT BACK BACK_RIGHT``; any number of cameras works.

**Boxes** (:func:`project_box_edges`). A box ``[x, y, z, l, w, h, yaw]`` (ego frame, ``z`` its centre)
has 12 edges; each is clipped to the part in front of the camera (depth above :data:`NEAR_M`), split into
:data:`EDGE_SAMPLES` pieces, moved into the camera frame (``camera_from_ego``, OpenCV axes: x right, y
down, z forward) and projected with the intrinsics (pixel centres at integer + 0.5) and, when the
calibration has any, OpenCV's distortion (k1, k2, p1, p2, k3) for points within :data:`DISTORTION_FOV`
times the undistorted image's field of view (beyond it the polynomial folds back: those pieces are
left out). Pieces entirely off one side of the image are left out; the rest is clipped by the panel.
Only the visible parts of the edges are drawn: nothing behind the camera ever wraps into the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Depth (m, camera z) in front of the camera below which edges are clipped away.
NEAR_M = 0.1
#: Pieces each box edge is split into (so edges bend with the lens distortion).
EDGE_SAMPLES = 16
#: Distortion is applied within this factor of the undistorted image's half-extent (normalised coordinates).
DISTORTION_FOV = 1.3

#: The 12 edges of a box as pairs of corner indices (:func:`box_corners_3d` order).
BOX_EDGES: np.ndarray = np.array(
    [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]]
)


@dataclass(frozen=True)
class CameraCalibration:
    """One camera of a frame row (``cams.<channel>``).

    Attributes:
        channel: its name.
        ego_from_camera: (4, 4) from ``sensor2lidar_rotation`` / ``sensor2lidar_translation`` (which hold
            ``ego_from_camera``, see ``schemas/frame.py``).
        intrinsic: (3, 3) pixels.
        distortion: (5,) k1, k2, p1, p2, k3.
        image_size: (width, height) pixels of the image (the image's own, else ``2 * (cx, cy)``).
    """

    channel: str
    ego_from_camera: np.ndarray
    intrinsic: np.ndarray
    distortion: np.ndarray
    image_size: tuple[int, int]

    @property
    def azimuth_rad(self) -> float:
        """Azimuth of the optical axis in the ego frame (0 forward, +pi/2 left)."""
        axis = self.ego_from_camera[:3, 2]
        return float(np.arctan2(axis[1], axis[0]))

    def camera_from_ego(self) -> np.ndarray:
        """(4, 4) the rigid inverse of ``ego_from_camera``."""
        r, t = self.ego_from_camera[:3, :3], self.ego_from_camera[:3, 3]
        out = np.eye(4)
        out[:3, :3] = r.T
        out[:3, 3] = -r.T @ t
        return out

    @classmethod
    def from_row(
        cls, channel: str, cam: dict, image_size: tuple[int, int] | None = None
    ) -> CameraCalibration:
        """From a frame row's ``cams[channel]`` struct (a dict of lists).

        Raises:
            ValueError: a matrix of the wrong shape or with non-finite numbers.
        """
        rot = np.asarray(cam["sensor2lidar_rotation"], dtype=np.float64).reshape(3, 3)
        t = np.asarray(cam["sensor2lidar_translation"], dtype=np.float64).reshape(3)
        k = np.asarray(cam["cam_intrinsic"], dtype=np.float64).reshape(3, 3)
        dist = np.asarray(cam.get("distortion") or np.zeros(5), dtype=np.float64).reshape(-1)[:5]
        dist = np.pad(dist, (0, 5 - dist.size))
        if not (
            np.isfinite(rot).all()
            and np.isfinite(t).all()
            and np.isfinite(k).all()
            and np.isfinite(dist).all()
        ):
            raise ValueError(f"camera {channel}: non-finite calibration")
        ego_from_camera = np.eye(4)
        ego_from_camera[:3, :3], ego_from_camera[:3, 3] = rot, t
        if image_size is None:
            image_size = (max(1, round(2 * k[0, 2])), max(1, round(2 * k[1, 2])))
        return cls(channel, ego_from_camera, k, dist, image_size)


def camera_layout(cameras: list[CameraCalibration]) -> list[list[int]]:
    """Rows of camera indices as on the car: front row first, each left to right (see the module doc).

    Returns:
        One or two non-empty rows (an empty list for no cameras).
    """
    az = np.array([c.azimuth_rad for c in cameras], dtype=np.float64)
    front = [i for i in range(len(cameras)) if np.cos(az[i]) > 1e-6]
    back = [i for i in range(len(cameras)) if i not in front]
    rows = [sorted(row, key=lambda i: (-np.sin(az[i]), cameras[i].channel)) for row in (front, back)]
    return [row for row in rows if row]


def box_corners_3d(boxes: np.ndarray) -> np.ndarray:
    """(N, 8, 3) corners (ego frame, m) of boxes ``[x, y, z, l, w, h, yaw]`` (``z`` the box centre):
    bottom face 0-3 counter-clockwise from front-left, top face 4-7 above them."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    signs = np.array(
        [[1, 1, -1], [-1, 1, -1], [-1, -1, -1], [1, -1, -1], [1, 1, 1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1]],
        dtype=np.float64,
    )
    local = signs[None] * (b[:, None, 3:6] / 2.0)  # (N, 8, 3) box frame
    c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
    x = c[:, None] * local[..., 0] - s[:, None] * local[..., 1]
    y = s[:, None] * local[..., 0] + c[:, None] * local[..., 1]
    return np.stack([x, y, local[..., 2]], axis=-1) + b[:, None, :3]


def project_points(points_camera: np.ndarray, camera: CameraCalibration) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(u, v)`` of points in the camera frame (depth > 0), with OpenCV distortion.

    Returns:
        ``uv`` (..., 2) pixels and ``valid`` (...,) bool: False where the distortion model does not
        hold (far outside the image) or the point is not in front of the camera.
    """
    p = np.asarray(points_camera, dtype=np.float64)
    z = p[..., 2]
    valid = z > NEAR_M * 0.5
    zs = np.where(valid, z, 1.0)
    x, y = p[..., 0] / zs, p[..., 1] / zs
    k = camera.intrinsic
    k1, k2, p1, p2, k3 = camera.distortion
    if np.any(camera.distortion != 0):
        w, h = camera.image_size
        # the undistorted image's half-extent in normalised coordinates, from its corners
        corners = np.linalg.solve(k, np.array([[0, w, 0, w], [0, 0, h, h], [1, 1, 1, 1]], dtype=np.float64))
        limit = DISTORTION_FOV * np.max(np.hypot(corners[0], corners[1]))
        r2 = x * x + y * y
        valid &= r2 <= limit * limit
        radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 * r2 * r2
        x, y = (
            x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y,
        )
    u = k[0, 0] * x + k[0, 1] * y + k[0, 2]
    v = k[1, 1] * y + k[1, 2]
    return np.stack([u, v], axis=-1), valid


def project_box_edges(boxes: np.ndarray, camera: CameraCalibration) -> tuple[np.ndarray, np.ndarray]:
    """The visible pieces of the boxes' edges in the camera's image (see the module doc).

    Args:
        boxes: (N, 7) ``[x, y, z, l, w, h, yaw]`` in the ego frame.
        camera: the camera.

    Returns:
        ``segments`` (M, 2, 2) pixel ``(u, v)`` end points and ``box`` (M,) the index of each piece's box.
    """
    corners = box_corners_3d(boxes)  # (N, 8, 3)
    n = corners.shape[0]
    if n == 0:
        return np.zeros((0, 2, 2)), np.zeros(0, dtype=np.int64)
    cam = camera.camera_from_ego()
    pc = corners @ cam[:3, :3].T + cam[:3, 3]  # (N, 8, 3) camera frame
    a, b = pc[:, BOX_EDGES[:, 0]], pc[:, BOX_EDGES[:, 1]]  # (N, 12, 3)
    za, zb = a[..., 2], b[..., 2]
    keep = (za > NEAR_M) | (zb > NEAR_M)
    # clip each edge to the near plane: move an end behind it onto it
    t = np.clip((NEAR_M - za) / np.where(zb != za, zb - za, 1.0), 0.0, 1.0)[..., None]
    a2 = np.where((za <= NEAR_M)[..., None], a + t * (b - a), a)
    t = np.clip((NEAR_M - zb) / np.where(za != zb, za - zb, 1.0), 0.0, 1.0)[..., None]
    b2 = np.where((zb <= NEAR_M)[..., None], b + t * (a - b), b)
    s = np.linspace(0.0, 1.0, EDGE_SAMPLES + 1)[:, None]
    samples = a2[..., None, :] + s * (b2 - a2)[..., None, :]  # (N, 12, S+1, 3)
    uv, valid = project_points(samples, camera)
    valid &= keep[..., None]
    seg = np.stack([uv[..., :-1, :], uv[..., 1:, :]], axis=-2)  # (N, 12, S, 2, 2)
    ok = valid[..., :-1] & valid[..., 1:]
    w, h = camera.image_size
    u, v = seg[..., 0], seg[..., 1]  # (N, 12, S, 2)
    off = (u < 0).all(-1) | (u > w).all(-1) | (v < 0).all(-1) | (v > h).all(-1)
    ok &= ~off
    box = np.broadcast_to(np.arange(n)[:, None, None], ok.shape)
    return seg[ok], box[ok]
