"""Geometry conventions: quaternions, transforms, angle wrapping."""

from __future__ import annotations

import numpy as np
from driveengine.schemas import GRID
from hypothesis import given
from hypothesis import strategies as st

from driveengine.geometry import (
    invert_transform,
    make_transform,
    matrix_to_quaternion,
    quaternion_to_matrix,
    quaternion_yaw,
    rotate_vectors,
    transform_points,
    wrap_angle,
    yaw_to_quaternion,
)

unit = st.floats(-1.0, 1.0, allow_nan=False)


@given(st.tuples(unit, unit, unit, unit).filter(lambda q: np.linalg.norm(q) > 0.1))
def test_quaternion_matrix_round_trip(q: tuple[float, float, float, float]) -> None:
    r = quaternion_to_matrix(q)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) > 0
    np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(r)), r, atol=1e-9)


def test_yaw_quaternion_and_points() -> None:
    q = yaw_to_quaternion(np.pi / 2)
    np.testing.assert_allclose(quaternion_yaw(q), np.pi / 2)
    global_from_ego = make_transform(q, [10.0, 0.0, 0.0])
    # the ego's +x axis points along global +y
    np.testing.assert_allclose(
        transform_points(global_from_ego, [[1.0, 0.0, 0.0]]), [[10.0, 1.0, 0.0]], atol=1e-12
    )
    np.testing.assert_allclose(
        rotate_vectors(global_from_ego, [[1.0, 0.0, 0.0]]), [[0.0, 1.0, 0.0]], atol=1e-12
    )
    ego_from_global = invert_transform(global_from_ego)
    np.testing.assert_allclose(ego_from_global @ global_from_ego, np.eye(4), atol=1e-12)


def test_wrap_angle_half_open() -> None:
    np.testing.assert_allclose(wrap_angle([np.pi, -np.pi, 3 * np.pi, 0.5]), [-np.pi, -np.pi, -np.pi, 0.5])


def test_grid_flat_index_round_trip() -> None:
    assert GRID.shape == (200, 200, 16)
    ijk = np.array([[0, 0, 0], [199, 199, 15], [3, 7, 11]])
    flat = GRID.flat_index(ijk)
    np.testing.assert_array_equal(flat, [0, 199 + 200 * 199 + 40000 * 15, 3 + 200 * 7 + 40000 * 11])
    np.testing.assert_array_equal(GRID.unflatten_index(flat), ijk)
