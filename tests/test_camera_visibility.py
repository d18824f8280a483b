"""Camera visibility (``mask_camera``, driveengine/labels/camera_visibility.py) against geometric truth.

A hand-made scene (a wall in front of one camera) has an exact answer: voxels between the camera and the
wall are seen, the wall's near face is seen, voxels behind it are not, and nothing outside the image is.
The levelled lattice is compared with casting every lattice ray from the camera, and the rig from a
synthetic nuPlan log is checked against the synthetic world's exact occupancy.
"""

from __future__ import annotations

import numpy as np
import pytest
from driveengine.schemas.grid import GRID_PRESETS, VoxelGrid

from driveengine.geometry import make_transform
from driveengine.labels import camera_visibility as cv
from driveengine.labels import voxel_ops as vo

FREE = 16
GRID = VoxelGrid((-20.0, -20.0, -2.0), (20.0, 20.0, 4.0), 0.5)


def _front_camera(width: int = 160, height: int = 90, fov_deg: float = 70.0, yaw: float = 0.0) -> tuple:
    """One pinhole camera at (0, 0, 1) m looking along +x rotated by ``yaw`` (OpenCV axes)."""
    forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(forward, right)
    ego_from_camera = make_transform(np.stack([right, down, forward], axis=1), [0.0, 0.0, 1.0])
    f = 0.5 * width / np.tan(0.5 * np.radians(fov_deg))
    k = np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return k, ego_from_camera, np.array([width, height])


def _index(grid: VoxelGrid, x: float, y: float, z: float) -> tuple[int, int, int]:
    lo = np.asarray(grid.range_min_m)
    return tuple(int(v) for v in np.floor((np.array([x, y, z]) - lo) / grid.voxel_size_m))


def _wall_scene(grid: VoxelGrid = GRID) -> np.ndarray:
    sem = np.full(grid.shape, FREE, np.uint8)
    i = _index(grid, 10.2, 0, 0)[0]
    j0, j1 = _index(grid, 0, -6, 0)[1], _index(grid, 0, 6, 0)[1]
    sem[i, j0 : j1 + 1, :] = 10  # a wall at x ~ 10 m, 12 m wide, floor to ceiling
    return sem


def test_wall_hides_what_is_behind_it() -> None:
    k, m, size = _front_camera()
    rays = cv.rig_rays(k[None], m[None], size[None], GRID)
    sem = _wall_scene()
    seen = cv.mask_camera(sem, FREE, rays, GRID)
    assert seen[_index(GRID, 5.0, 0.0, 1.0)]  # in front of the wall, in view
    assert seen[_index(GRID, 10.2, 0.0, 1.0)]  # the wall's face
    for x in (12.0, 15.0, 19.0):
        assert not seen[_index(GRID, x, 0.0, 1.0)]  # behind the wall
    assert not seen[_index(GRID, -5.0, 0.0, 1.0)]  # behind the camera: outside the image
    assert not seen[_index(GRID, 3.0, 10.0, 1.0)]  # 73 degrees to the left: outside a 70 degree image
    # every voxel behind the wall (within its width) is hidden, every one in front (inside the image) seen
    i_wall = _index(GRID, 10.2, 0, 0)[0]
    assert not seen[i_wall + 1 :, _index(GRID, 0, -4, 0)[1] : _index(GRID, 0, 4, 0)[1], :].any()
    centres = GRID.voxel_centres()
    cam = centres - m[:3, 3]
    in_image = np.zeros(GRID.shape, bool)
    depth = cam @ m[:3, :3][:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (cam @ m[:3, :3]) @ k.T
        u, v = uv[..., 0] / uv[..., 2], uv[..., 1] / uv[..., 2]
    in_image = (depth > 0.5) & (u >= 1) & (u < size[0] - 1) & (v >= 1) & (v < size[1] - 1)
    in_front = np.zeros(GRID.shape, bool)
    in_front[:i_wall, :, :] = True
    assert seen[in_image & in_front & (centres[..., 0] > 2.0)].mean() > 0.99  # coverage in front
    # a voxel 2 m or more away subtends under 10 degrees: past 46 degrees from the axis it is outside the image
    away = np.hypot(centres[..., 0], centres[..., 1]) > 2.0
    assert not seen[away & (np.abs(np.arctan2(centres[..., 1], centres[..., 0])) > np.radians(46))].any()


def test_the_empty_scene_is_seen_inside_the_image_only_and_a_camera_outside_the_grid_works() -> None:
    k, m, size = _front_camera(yaw=np.pi / 2)  # looking left (+y)
    rays = cv.rig_rays(k[None], m[None], size[None], GRID)
    seen = cv.mask_camera(np.full(GRID.shape, FREE, np.uint8), FREE, rays, GRID)
    assert seen[_index(GRID, 0.0, 15.0, 1.0)] and not seen[_index(GRID, 0.0, -15.0, 1.0)]
    # the same camera 30 m outside the grid, looking into it
    far = m.copy()
    far[:3, 3] = (0.0, -50.0, 1.0)
    rays = cv.rig_rays(k[None], far[None], size[None], GRID)
    seen = cv.mask_camera(np.full(GRID.shape, FREE, np.uint8), FREE, rays, GRID)
    assert seen[_index(GRID, 0.0, 0.0, 1.0)] and seen.sum() > 1000


def test_levels_match_casting_every_lattice_ray_from_the_camera() -> None:
    k, m, size = _front_camera(width=1600, height=900)
    rays = cv.rig_rays(k[None], m[None], size[None], GRID)
    assert rays.strides[0] > 1  # a large image is sampled, not cast at every pixel
    # reference: every lattice ray from the camera (no parents)
    flat = cv.CameraRays(
        rays.origin, rays.direction, np.zeros(rays.num_rays), rays.exit_m, np.full(rays.num_rays, -1),
        rays.strides, rays.cameras,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for clutter in (0.0, 0.002, 0.01):  # up to 1 % random occupied voxels: silhouettes everywhere
        sem = _wall_scene()
        sem[:, :, 3] = 10  # a ground layer
        sem[rng.random(GRID.shape) < clutter] = 3
        masker, flat_masker = cv.CameraMasker(rays, GRID, FREE), cv.CameraMasker(flat, GRID, FREE)
        levelled, reference = masker.mask(sem).copy(), flat_masker.mask(sem)
        differ = np.count_nonzero(levelled != reference)
        assert differ <= 0.003 * np.count_nonzero(reference), (clutter, differ, np.count_nonzero(reference))
        if clutter == 0.0:  # open space: far fewer voxel visits (restarted children begin at a checkpoint of
            # their walk, up to vo.CHECKPOINT_STEPS voxels early: ~0.55 here, < 0.5 with exact restarts)
            assert masker.visits < 0.6 * flat_masker.visits, (masker.visits, flat_masker.visits)


def test_distortion_is_undone() -> None:
    dist = np.array([-0.3, 0.1, 0.001, -0.002, 0.02])
    x = np.linspace(-0.6, 0.6, 25)
    xx, yy = np.meshgrid(x, x * 0.6)
    r2 = xx**2 + yy**2
    radial = 1 + r2 * (dist[0] + r2 * (dist[1] + r2 * dist[4]))
    xd = xx * radial + 2 * dist[2] * xx * yy + dist[3] * (r2 + 2 * xx**2)
    yd = yy * radial + dist[2] * (r2 + 2 * yy**2) + 2 * dist[3] * xx * yy
    ux, uy = cv.undistort_normalised(xd, yd, dist)
    assert np.abs(ux - xx).max() < 1e-6 and np.abs(uy - yy).max() < 1e-6


def test_lattice_stride_keeps_rays_within_a_voxel_over_sqrt2() -> None:
    grid = GRID_PRESETS["openscene"]
    f = 1545.0  # nuPlan's cameras, 1920 x 1080
    s = cv.lattice_stride(f, grid, 72.0)
    assert s >= 1 and s / f * 72.0 <= grid.voxel_size_m / np.sqrt(2) + 1e-12
    assert (s + 1) / f * 72.0 > grid.voxel_size_m / np.sqrt(2)
    assert cv.lattice_stride(100.0, grid, 72.0) == 1  # a coarse image: every pixel


def test_camera_rays_of_a_log_skip_cameras_without_calibration() -> None:
    pytest.importorskip("driveengine.synth.sensors")
    import tempfile
    from pathlib import Path

    from driveengine.sources.nuplan.reader import read_nuplan_log
    from driveengine.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        synth = synthesize(Path(tmp), logs=1, seconds=1.0, seed=2, blobs=False)[0]
        log = read_nuplan_log(synth.db_path)
    rays, notes = cv.camera_rays(log, GRID)
    assert rays is not None and len(rays.cameras) == len(log.camera_channels) and not notes
    log.camera_intrinsic[2] = np.nan
    rays, notes = cv.camera_rays(log, GRID)
    assert rays is not None and len(rays.cameras) == len(log.camera_channels) - 1
    assert len(notes) == 1 and log.camera_channels[2] in notes[0]
    log.camera_size[:] = 0
    rays, notes = cv.camera_rays(log, GRID)
    assert rays is None and len(notes) == len(log.camera_channels)


def test_synthetic_world_buildings_hide_what_is_behind_them(tmp_path) -> None:
    """The rig of a synthetic log on the world's exact occupancy: every voxel the cameras see is free or on
    the near side of a solid (a seen occupied voxel has a seen or camera-side free neighbour), and the
    inside of the buildings beside the road is never seen."""
    pytest.importorskip("driveengine.synth.sensors")
    from driveengine.sources.nuplan.reader import read_nuplan_log
    from driveengine.synth import synthesize

    synth = synthesize(tmp_path, logs=1, seconds=2.0, seed=0, blobs=False, image_size=(640, 360))[0]
    log = read_nuplan_log(synth.db_path)
    grid = GRID_PRESETS["openscene"]
    ts = int(log.sweep_timestamp_us[20])
    truth = synth.world.occupancy(ts, grid)
    rays, _ = cv.camera_rays(log, grid)
    seen = cv.mask_camera(truth, FREE, rays, grid)
    occupied = truth != FREE
    assert seen.any() and (seen & occupied).any() and (seen & ~occupied).any()
    # a voxel whose six face neighbours are all occupied (inside a solid or under the ground) is never seen
    inner = occupied.copy()
    for axis in range(3):
        for shift in (1, -1):
            inner &= np.roll(occupied, shift, axis=axis)
    inner[[0, -1], :, :] = inner[:, [0, -1], :] = inner[:, :, [0, -1]] = False
    assert inner.sum() > 1000 and not (seen & inner).any()
    # nothing under the ground layer is seen (the ground is a closed floor)
    ground = int(np.floor((-0.3 - grid.range_min_m[2]) / grid.voxel_size_m))
    assert not seen[:, :, :ground].any()


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (3, 1, 5), (7, 6, 16), (5, 4, 63), (4, 5, 64), (3, 4, 65), (3, 3, 130)]
)
def test_occupancy_codes_are_the_occupied_voxels_and_their_26_neighbours(shape) -> None:
    """The dilation against numpy's, on random scenes of every density: columns up to 64 voxels tall (one
    bit word each, 64 a full word) and taller ones (dilated voxel by voxel). One workspace and one output
    serve every scene, densest first, and start as all ones: nothing of an earlier scene may remain."""
    rng = np.random.default_rng(sum(shape))
    nx, ny, nz = shape
    grid_shape = np.array(shape, np.int64)
    words = vo.occupancy_words(grid_shape)
    words[:] = ~np.uint64(0)
    code = np.full(nx * ny * nz, 255, np.uint8)
    for fraction in (1.0, 0.3, 0.02, 0.0):
        semantics = np.where(rng.random(shape) < fraction, rng.integers(0, FREE, shape), FREE).astype(
            np.uint8
        )
        occupied = semantics != FREE
        padded = np.pad(occupied, 1)
        near = np.zeros(shape, bool)
        for dx in range(3):
            for dy in range(3):
                for dz in range(3):
                    near |= padded[dx : dx + nx, dy : dy + ny, dz : dz + nz]
        vo.occupancy_codes(semantics.reshape(-1), FREE, grid_shape, code, words)
        expected = vo.NEAR * near.astype(np.uint8) + vo.OCCUPIED * occupied.astype(np.uint8)
        np.testing.assert_array_equal(code, expected.reshape(-1))
    if nz <= 64:  # a workspace of another (smaller) grid is refused, not written past its end
        with pytest.raises(ValueError, match="smaller than occupancy_words"):
            vo.occupancy_codes(semantics.reshape(-1), FREE, grid_shape, code, words[:, :-1])


def test_kernel_marks_the_stopping_voxel_and_reports_where_it_came_near() -> None:
    grid = VoxelGrid((0.0, 0.0, 0.0), (40.0, 1.0, 1.0), 1.0)
    lo, vs, shape = vo.grid_params(grid)
    semantics = np.full(grid.num_voxels, FREE, np.uint8)
    semantics[30] = 3  # voxel x = 30
    code = np.empty(grid.num_voxels, np.uint8)
    vo.occupancy_codes(semantics, FREE, shape, code, vo.occupancy_words(shape))
    assert code.tolist() == [0] * 29 + [vo.NEAR, vo.NEAR | vo.OCCUPIED, vo.NEAR] + [0] * 8
    origin = np.tile([0.5, 0.5, 0.5], (3, 1))
    direction = np.tile([1.0, 0.0, 0.0], (3, 1))
    # ray 1 is ray 0's child, starting at 35 m: ray 0 came near at 28.5 m, so ray 1 restarts at its last
    # checkpoint (every K steps) at or before 28.5 - 1 m; ray 2 is ray 1's child, starting at 2 m, before ray 1
    # came near: it starts in the voxel holding that point, voxel 2
    k = vo.CHECKPOINT_STEPS
    restart = (28 // k) * k  # the step (and voxel) of that checkpoint: voxel v is entered at v - 0.5 m
    start, exit_m, parent = np.array([0.0, 35.0, 2.0]), np.full(3, 39.5), np.array([-1, 0, 1])
    steps = vo.camera_ray_steps(origin, direction, start, exit_m, lo, vs, shape)
    assert steps[0].tolist() == [0, 39, 78, 117]  # step offsets: 39 steps from voxel 0 to voxel 39
    assert steps[5].tolist() == [0, 35, 2] and steps[6].tolist() == [0, 35, 2]  # start step and voxel
    checkpoints = 39 // k + 1
    assert steps[2].tolist() == [0, checkpoints, 2 * checkpoints, 3 * checkpoints]
    assert steps[3][:checkpoints].tolist() == [0.0] + [j * k - 0.5 for j in range(1, checkpoints)]
    assert steps[4][:checkpoints].tolist() == [j * k for j in range(checkpoints)]
    t_near = np.empty(3)
    has_children = np.array([True, True, False])
    visits = vo.cast_camera_rays(
        origin, direction, start, parent, has_children, *steps, code, lo, vs, shape, t_near, 1.0
    )
    assert (code >= vo.OBSERVED).tolist() == [True] * 31 + [False] * 9
    assert t_near.tolist() == pytest.approx([28.5, 28.5, 1e30])  # ray 2 has no child: no t_near needed
    assert (
        visits == 31 + (31 - restart) + 29
    )  # ray 0 from voxel 0 to the occupied 30, ray 1 from its checkpoint,
    # ray 2 from voxel 2


# -- the lattice's guarantee: every voxel seen head-on is entered by a ray walked at its depth -------------

NUPLAN_K = np.array([[1545.0, 0.0, 960.0], [0.0, 1545.0, 560.0], [0.0, 0.0, 1.0]])  # 1920 x 1080 cameras
BARREL = np.array([-0.356, 0.172, -0.0002, -0.0005, -0.05])  # k1, k2, p1, p2, k3 of nuPlan's order


def _distort(x: np.ndarray, y: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k1, k2, p1, p2, k3 = dist
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), y * radial + p1 * (
        r2 + 2 * y * y
    ) + 2 * p2 * x * y


def _worst_gap(
    k: np.ndarray, m: np.ndarray, size: tuple[int, int], dist: np.ndarray, grid: VoxelGrid
) -> float:
    """The largest distance, over random points of the grid box inside the lattice, from a point to the
    nearest ray walked at its depth (started before it), in units of half a voxel (the radius of a face
    seen head-on): <= 1 is the module's guarantee."""
    direction, start, _, _, stride = cv._camera_levels(k, dist, size[0], size[1], m, grid)
    cam = direction @ m[:3, :3]  # camera frame
    x, y = cam[:, 0] / cam[:, 2], cam[:, 1] / cam[:, 2]
    xd, yd = _distort(x, y, dist)
    iu = np.rint((k[0, 0] * xd + k[0, 2]) / stride - 0.5).astype(int)
    iv = np.rint((k[1, 1] * yd + k[1, 2]) / stride - 0.5).astype(int)
    nu, nv = iu.max() + 1, iv.max() + 1
    assert nu * nv == direction.shape[0]  # every lattice point once
    lattice = np.empty((nv, nu, 3))
    lattice[iv, iu] = direction
    start_depth = np.empty((nv, nu))
    start_depth[iv, iu] = start * cam[:, 2]
    rmax = np.hypot(x, y).max()
    rng = np.random.default_rng(0)
    lo, hi = np.asarray(grid.range_min_m), np.asarray(grid.range_max_m)
    q = lo + rng.random((30000, 3)) * (hi - lo)
    pc = (q - m[:3, 3]) @ m[:3, :3]
    q, pc = q[pc[:, 2] > 1.0], pc[pc[:, 2] > 1.0]
    qx, qy = pc[:, 0] / pc[:, 2], pc[:, 1] / pc[:, 2]
    qxd, qyd = _distort(qx, qy, dist)
    fu = (k[0, 0] * qxd + k[0, 2]) / stride - 0.5
    fv = (k[1, 1] * qyd + k[1, 2]) / stride - 0.5
    inside = (np.hypot(qx, qy) <= rmax) & (fu >= 0) & (fu <= nu - 1) & (fv >= 0) & (fv <= nv - 1)
    q, fu, fv, depth = q[inside], fu[inside], fv[inside], pc[inside, 2]
    assert q.shape[0] > 1000
    rel = q - m[:3, 3]
    best = np.full(q.shape[0], np.inf)
    reach = 2**cv.LEVELS + 2  # the coarsest lattice's spacing, with a margin
    for a in range(-reach, reach + 1):
        for b in range(-reach, reach + 1):
            cu, cv_ = np.floor(fu).astype(int) + a, np.floor(fv).astype(int) + b
            ok = (cu >= 0) & (cu < nu) & (cv_ >= 0) & (cv_ < nv)
            cu, cv_ = np.clip(cu, 0, nu - 1), np.clip(cv_, 0, nv - 1)
            d = lattice[cv_, cu]
            apart = np.linalg.norm(rel - (rel * d).sum(axis=1, keepdims=True) * d, axis=1)
            walked = ok & (start_depth[cv_, cu] <= depth)
            best = np.where(walked, np.minimum(best, apart), best)
    return float(best.max() / (grid.voxel_size_m / 2))


@pytest.mark.parametrize("dist", [np.zeros(5), BARREL], ids=["pinhole", "barrel"])
@pytest.mark.parametrize("yaw", [0.0, np.radians(55)], ids=["front", "front-left"])
def test_every_point_of_the_grid_in_view_is_within_half_a_voxel_of_a_walked_ray(dist, yaw) -> None:
    _, m, _ = _front_camera(yaw=yaw)
    worst = _worst_gap(NUPLAN_K, m, (1920, 1080), dist, GRID_PRESETS["openscene"])
    assert worst <= 1.0, worst


def test_the_stride_follows_the_depth_the_camera_sees_and_the_lens() -> None:
    grid = GRID_PRESETS["openscene"]
    _, front, _ = _front_camera()
    _, corner, _ = _front_camera(yaw=np.radians(45))
    corner_distance = float(np.linalg.norm(np.array([50.0, 50.0, -4.0]) - front[:3, 3]))
    by_distance = cv.lattice_stride(1545.0, grid, corner_distance)  # the old rule: 7
    strides = {}
    for name, m in (("front", front), ("corner", corner)):
        for lens, dist in (("pinhole", np.zeros(5)), ("barrel", BARREL)):
            strides[name, lens] = cv._camera_levels(NUPLAN_K, dist, 1920, 1080, m, grid)[4]
    # the front camera sees at most 48.2 m deep (x = 50 m): a coarser lattice than the grid corner's rule
    assert strides["front", "pinhole"] == cv.lattice_stride(1545.0, grid, 50.0 - front[0, 3]) > by_distance
    assert strides["corner", "pinhole"] < strides["front", "pinhole"]
    # barrel distortion spreads the lattice at the image's edges: never a coarser stride
    assert strides["front", "barrel"] <= strides["front", "pinhole"]
    assert strides["corner", "barrel"] <= strides["corner", "pinhole"]


def test_cone_depths_is_the_deepest_point_of_the_box_in_each_pyramid() -> None:
    grid = VoxelGrid((-20.0, -10.0, -2.0), (30.0, 10.0, 4.0), 0.5)
    _, m, _ = _front_camera(yaw=0.3)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-0.8, 0.6, 40)
    y0 = rng.uniform(-0.5, 0.4, 40)
    rect = np.stack([x0, x0 + rng.uniform(0.01, 0.3, 40), y0, y0 + rng.uniform(0.01, 0.2, 40)], axis=1)
    rect[0] = (-0.1, 0.1, -3.0, -2.9)  # steeply up: misses the box (the camera is inside it, under the top)
    depths = cv.cone_depths(m, grid, rect)
    for (a, b, c, d), found in zip(rect, depths, strict=True):
        # brute force: the deepest exit point of a dense fan of rays through the rectangle
        xx, yy = np.meshgrid(np.linspace(a, b, 60), np.linspace(c, d, 60))
        rays = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)], axis=1) @ m[:3, :3].T
        exit_m = cv._exit_distances(m[:3, 3], rays, grid)  # in units of the rays' depth (z = 1 per unit)
        brute = float(np.where(np.isfinite(exit_m), exit_m, 0.0).max())
        assert brute <= found + 1e-6 and found <= brute * 1.05 + 0.05, (a, b, c, d, found, brute)
    assert depths[0] < 3.0  # only the few metres up to the grid's top


def test_every_ray_is_within_a_voxel_of_the_ancestors_it_relies_on() -> None:
    """Up to its start a ray is not walked: the ancestors whose walks vouch for that part of its path
    (an ancestor ``a`` up to the start of its child on the ray's line) are less than a voxel beside it
    there, so nothing occupied lies on the skipped part when their walks met nothing near."""
    grid = GRID_PRESETS["openscene"]
    for dist in (np.zeros(5), BARREL):
        _, m, _ = _front_camera(yaw=0.4)
        direction, start, parent, level, _ = cv._camera_levels(NUPLAN_K, dist, 1920, 1080, m, grid)
        assert (parent[level == 0] == -1).all() and (parent[level > 0] < np.flatnonzero(level > 0)).all()
        worst = 0.0
        for r in np.flatnonzero(level == cv.LEVELS)[::7]:
            child, up = r, parent[r]
            while up >= 0:
                worst = max(worst, np.linalg.norm(direction[r] - direction[up]) * start[child])
                child, up = up, parent[up]
        assert 0 < worst < grid.voxel_size_m


def test_a_rigs_rays_are_built_once_per_calibration_and_grid() -> None:
    k, m, size = _front_camera()
    first = cv.rig_rays(k[None], m[None], size[None], GRID)
    assert (
        cv.rig_rays(k[None].copy(), m[None].copy(), size[None].copy(), GRID) is first
    )  # same values: cached
    assert not first.direction.flags.writeable and not first.steps(GRID).step_axes.flags.writeable
    moved = m.copy()
    moved[2, 3] += 0.01  # another mount height: other rays
    other = cv.rig_rays(k[None], moved[None], size[None], GRID)
    assert other is not first and not np.array_equal(other.origin, first.origin)
    finer = VoxelGrid(GRID.range_min_m, GRID.range_max_m, 0.25)
    assert cv.rig_rays(k[None], m[None], size[None], finer) is not first
    # the cache keeps the last rig whatever its size, and older ones within its byte budget
    assert cv.rig_rays(k[None], m[None], size[None], finer).nbytes > 0
    assert sum(r.nbytes for r in cv._RIG_CACHE.values()) <= max(cv.RIG_CACHE_BYTES, first.nbytes)
