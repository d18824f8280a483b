"""driveengine.geometry.relative_transform: ``a_from_b = inv(global_from_a) @ global_from_b``, precise at
UTM-scale translations, broadcast over stacks, exact identity for ``same``; the loader's
``ego_from_history`` and the labels' sweep moves use it."""

from __future__ import annotations

import numpy as np

from driveengine.geometry import invert_transform, make_transform, relative_transform, yaw_to_quaternion


def _poses(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    return make_transform(q / np.linalg.norm(q, axis=1, keepdims=True), rng.uniform(-scale, scale, (n, 3)))


def test_matches_the_definition_and_broadcasts():
    rng = np.random.default_rng(0)
    a, b = _poses(rng, 5, 100.0), _poses(rng, 5, 100.0)
    expected = invert_transform(a) @ b
    np.testing.assert_allclose(relative_transform(a, b), expected, atol=1e-12)
    np.testing.assert_allclose(relative_transform(a[2], b), invert_transform(a[2]) @ b, atol=1e-12)
    np.testing.assert_allclose(relative_transform(a, b[0]), invert_transform(a) @ b[0], atol=1e-12)
    # a_from_b @ b_from_a is the identity, and moving b's points into a agrees with the global route
    np.testing.assert_allclose(
        relative_transform(a[0], b[0]) @ relative_transform(b[0], a[0]), np.eye(4), atol=1e-12
    )
    p = rng.normal(size=(7, 3))
    m = relative_transform(a[1], b[1])
    via_global = (p @ b[1, :3, :3].T + b[1, :3, 3] - a[1, :3, 3]) @ a[1, :3, :3]
    np.testing.assert_allclose(p @ m[:3, :3].T + m[:3, 3], via_global, atol=1e-9)


def test_keeps_the_precision_of_small_offsets_at_utm_coordinates():
    """Two ego poses 0.5 s apart at ~(6e5, 4e6) m: the relative offset is exact to ~1e-12 m."""
    t = make_transform(yaw_to_quaternion([0.3, 0.3]), [[664_430.123456, 3_997_000.654321, 12.0]] * 2)
    t[1, :3, 3] += [1.25, -0.5, 0.0]  # 1.25 m forward, 0.5 m right in global terms
    m = relative_transform(t[0], t[1])
    r = t[0, :3, :3]
    exact = r.T @ np.array([1.25, -0.5, 0.0])  # computed from the offset alone
    assert np.abs(m[:3, 3] - exact).max() < 1e-12
    naive = invert_transform(t[0]) @ t[1]
    assert np.abs(naive[:3, 3] - exact).max() > np.abs(m[:3, 3] - exact).max()  # the naive route loses digits


def test_same_is_the_exact_identity():
    pose = _poses(np.random.default_rng(1), 3, 1e6)
    out = relative_transform(pose, pose, same=True)
    assert out.shape == (3, 4, 4) and (out == np.eye(4)).all()
    assert not (relative_transform(pose, pose) == np.eye(4)).all()  # without it: equal up to rounding only
