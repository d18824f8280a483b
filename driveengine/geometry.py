"""Rigid-body geometry: quaternions, SE(3) transforms, frame changes, angles.

Conventions used across DriveEngine:

* Quaternions are ``[w, x, y, z]`` (nuPlan's and OpenScene's order), Hamilton product, unit norm.
* A transform that maps coordinates in frame ``source`` to frame ``target`` is named
  ``target_from_source`` (``global_from_ego``, ``ego_from_lidar``) and is a 4x4 float64 matrix.
* Points are rows: ``points_target = points_source @ R.T + t`` (see :func:`transform_points`).
* Lengths are metres, angles radians, yaw measured counter-clockwise about +z from +x.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


#: A quaternion whose norm is at or below this is no rotation (e.g. the ``[0, 0, 0, 0]`` of broken
#: calibration rows): refused as calibration, a dropped frame as an ego pose.
MIN_QUATERNION_NORM = 1e-6


def quaternion_norm(q: ArrayLike) -> FloatArray:
    """(...) Euclidean norm of ``[w, x, y, z]`` quaternions; non-finite components count as 0 (quietly)."""
    q = np.asarray(q, dtype=np.float64)
    return np.sqrt(np.sum(np.where(np.isfinite(q), q, 0.0) ** 2, axis=-1))


def valid_poses(translation: ArrayLike, rotation: ArrayLike) -> NDArray[np.bool_]:
    """(...) bool: the translation (..., 3) is finite and the quaternion (..., 4) finite with a norm above
    :data:`MIN_QUATERNION_NORM`, i.e. the pose makes a transform."""
    t = np.asarray(translation, dtype=np.float64)
    q = np.asarray(rotation, dtype=np.float64)
    finite = np.all(np.isfinite(t), axis=-1) & np.all(np.isfinite(q), axis=-1)
    return finite & (quaternion_norm(q) > MIN_QUATERNION_NORM)


def quaternion_to_matrix(q: ArrayLike) -> FloatArray:
    """Rotation matrices of ``[w, x, y, z]`` quaternions.

    Args:
        q: (4,) or (N, 4); normalised here, so any non-zero scale is accepted.

    Returns:
        (3, 3) or (N, 3, 3) rotation matrices.
    """
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    m = np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    )  # fmt: skip
    return m.reshape((*q.shape[:-1], 3, 3))


def matrix_to_quaternion(m: ArrayLike) -> FloatArray:
    """``[w, x, y, z]`` quaternions (w >= 0) of rotation matrices (3, 3) or (N, 3, 3)."""
    m = np.asarray(m, dtype=np.float64)
    flat = m.reshape(-1, 3, 3)
    out = np.empty((flat.shape[0], 4))
    for i, r in enumerate(flat):  # tiny loop: calibration matrices, never per point
        trace = r[0, 0] + r[1, 1] + r[2, 2]
        if trace > 0:
            s = 2.0 * np.sqrt(trace + 1.0)
            out[i] = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
        elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
            s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
            out[i] = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
        elif r[1, 1] > r[2, 2]:
            s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
            out[i] = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
        else:
            s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
            out[i] = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    out[out[:, 0] < 0] *= -1.0
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.reshape((*m.shape[:-2], 4))


def yaw_to_quaternion(yaw: ArrayLike) -> FloatArray:
    """``[w, x, y, z]`` quaternions of rotations by ``yaw`` radians about +z."""
    yaw = np.asarray(yaw, dtype=np.float64)
    half = 0.5 * yaw
    zeros = np.zeros_like(half)
    return np.stack([np.cos(half), zeros, zeros, np.sin(half)], axis=-1)


def quaternion_yaw(q: ArrayLike) -> FloatArray:
    """Yaw (radians, in [-pi, pi]) of the heading of ``[w, x, y, z]`` quaternions: the angle of the rotated +x."""
    r = quaternion_to_matrix(q)
    return np.arctan2(r[..., 1, 0], r[..., 0, 0])


def wrap_angle(angle: ArrayLike) -> FloatArray:
    """Angles wrapped to [-pi, pi)."""
    angle = np.asarray(angle, dtype=np.float64)
    return (angle + np.pi) % (2.0 * np.pi) - np.pi


def make_transform(rotation: ArrayLike, translation: ArrayLike) -> FloatArray:
    """4x4 (or N x 4 x 4) transforms from rotations and translations.

    Args:
        rotation: a ``[w, x, y, z]`` quaternion (..., 4) or a rotation matrix (..., 3, 3).
        translation: (..., 3) metres.
    """
    rotation = np.asarray(rotation, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    r = quaternion_to_matrix(rotation) if rotation.shape[-1] == 4 else rotation
    out = np.zeros((*translation.shape[:-1], 4, 4))
    out[..., :3, :3] = r
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def invert_transform(target_from_source: ArrayLike) -> FloatArray:
    """``source_from_target`` of rigid transforms (4, 4) or (N, 4, 4), without a general inverse."""
    m = np.asarray(target_from_source, dtype=np.float64)
    r = m[..., :3, :3]
    t = m[..., :3, 3]
    rt = np.swapaxes(r, -1, -2)
    out = np.zeros_like(m)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rt, t)
    out[..., 3, 3] = 1.0
    return out


def relative_transform(global_from_a: ArrayLike, global_from_b: ArrayLike, same: bool = False) -> FloatArray:
    """``a_from_b = inv(global_from_a) @ global_from_b`` of rigid transforms (4, 4) or (N, 4, 4), broadcast.

    With two ego poses ``global_from_ego_t`` and ``global_from_ego_k`` this is ``ego_t_from_ego_k``: the
    transform that moves points of the ego frame at ``k`` into the ego frame at ``t`` (the labels'
    sweep aggregation, the loader's ``ego_from_history`` and ``point_sweeps``).

    Computed as ``R_a^T R_b`` and ``R_a^T (t_b - t_a)``: the translations (UTM, ~1e6 m) are subtracted
    before rotating, which keeps the full float64 precision of the (small) relative offset, where
    ``invert_transform(a) @ b`` loses about 1e-10 m to the cancellation of two large numbers.

    Args:
        global_from_a, global_from_b: rigid transforms, shapes broadcastable to each other.
        same: ``a`` and ``b`` are the same frame: return the exact identity (a sweep seen from its own
            frame stays bit-identical).
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


def transform_points(target_from_source: ArrayLike, points: ArrayLike) -> FloatArray:
    """Points (N, 3) in frame ``source`` expressed in frame ``target``: ``points @ R.T + t``."""
    m = np.asarray(target_from_source, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:3, :3].T + m[:3, 3]


def rotate_vectors(target_from_source: ArrayLike, vectors: ArrayLike) -> FloatArray:
    """Free vectors (N, 3) such as velocities, rotated (not translated) from ``source`` into ``target``."""
    m = np.asarray(target_from_source, dtype=np.float64)
    return np.asarray(vectors, dtype=np.float64) @ m[:3, :3].T
