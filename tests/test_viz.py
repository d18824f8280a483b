"""Pictures: BEV colours at known voxels, the unobserved shade and the flow scale; cameras laid out as on
the car with the boxes projected where their calibration says; legend; local time; MP4/GIF videos and
refused suffixes; unknown cameras; clear errors. Layout properties only (no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from collected_fixture import Collected, collected_split
from driveengine.schemas.classes import FREE
from driveengine.schemas.frame import frame_schema
from driveengine.schemas.grid import GRID
from PIL import Image

from driveengine.geometry import make_transform
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.store.manifest import DatasetInfo, LogEntry, Manifest, SourceRef, save_manifest
from driveengine.store.occ import create_occ
from driveengine.synth.nuscenes import nuscenes_cameras
from driveengine.synth.world import make_cameras

pytest.importorskip("matplotlib")
from driveengine.viz import bev
from driveengine.viz.cameras import CameraCalibration, camera_layout, project_box_edges
from driveengine.viz.colors import UNOBSERVED_RGB, category_unified

FRAME_SCHEMA = frame_schema(CAMERA_CHANNELS)  # nuPlan's frame rows
LOG = "2021.06.07.12.54.00_veh-35_01843_02314"
SIZE = 300  # picture height in pixels: small pictures keep the tests fast
IMAGE_W, IMAGE_H = 192, 108
SKY, GROUND = (40, 90, 230), (20, 190, 40)  # CAM_F0's image: sky above, ground below
VEHICLE_BOX = [17.5, -9.0, 0.5, 5.0, 2.0, 1.5, 0.1]  # ahead and to the right: in CAM_F0 and CAM_R0
PEDESTRIAN_BOX = [-10.0, -30.0, 0.5, 3.0, 3.0, 1.8, 0.0]
CAMERAS = {c.channel: c for c in make_cameras(IMAGE_W, IMAGE_H)}  # the synthetic nuPlan rig


@pytest.fixture
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    return collected_split(tmp_path_factory)


def camera_struct(channel: str, path: str) -> dict:
    cam = CAMERAS[channel]
    ego_from_camera = cam.ego_from_camera()
    return {
        "data_path": path,
        "timestamp": 0,
        "sensor2lidar_rotation": ego_from_camera[:3, :3].tolist(),
        "sensor2lidar_translation": ego_from_camera[:3, 3].tolist(),
        "cam_intrinsic": cam.intrinsic.tolist(),
        "distortion": [0.0] * 5,
    }


@pytest.fixture
def split(tmp_path: Path) -> tuple[Path, Path]:
    """A collected split with one log of 3 frames; a vehicle block at x = 15..20 m, y = -10..-8 m moving
    at 5 m/s inside its box; a barrier block at x = -30..-25 m, y = 20..25 m with no box; ground
    (background) everywhere; columns at x < -45 m unobserved; a CAM_F0 image for frame 0 only."""
    split_dir, blobs = tmp_path / "out" / "mini", tmp_path / "sensor_blobs"
    n = 3
    rows = []
    for i in range(n):
        cams = {c: camera_struct(c, f"{LOG}/{c}/{i:016x}.jpg") for c in CAMERA_CHANNELS}
        anns = {
            "gt_boxes": [VEHICLE_BOX, PEDESTRIAN_BOX],
            "gt_names": ["vehicle", "pedestrian"],
            "gt_velocity_3d": [[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
            "instance_tokens": ["a" * 16, "c" * 16],
            "track_tokens": ["b" * 16, "d" * 16],
        }
        rows.append(
            {
                "token": f"{i:016x}",
                "timestamp": 1_623_070_440_000_000 + i * 500_000,  # 2021-06-07 12:54:00 UTC
                "scene_name": f"{LOG}-scene-0001",
                "frame_idx": i,
                "map_location": "us-nv-las-vegas-strip" if i < 2 else "somewhere-else",
            }
            | {"anns": anns, "cams": cams}
        )
    columns = ["token", "timestamp", "scene_name", "frame_idx", "map_location", "anns", "cams"]
    schema = pa.schema([FRAME_SCHEMA.field(c) for c in columns], metadata=FRAME_SCHEMA.metadata)
    (split_dir / "meta").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), split_dir / "meta" / f"{LOG}.parquet")
    with create_occ(split_dir / "occ" / f"{LOG}.zarr", n, generator={}) as w:
        for i in range(n):
            sem = np.full(GRID.shape, FREE, np.uint8)
            flow = np.zeros((*GRID.shape, 2), np.float32)
            mask = np.ones(GRID.shape, bool)
            mask[:10] = False  # x < -45 m: no ray
            sem[:, :, 7] = 10  # ground ...
            sem[:20, :, 7] = FREE  # ... except at x < -40 m: free (observed from x = -45 m on)
            sem[130 + i : 140 + i, 80:84, 8:11] = 0  # vehicle, 0.5 m further each frame
            flow[130 + i : 140 + i, 80:84, 8:11] = (5.0, 0.0)
            sem[40:50, 140:150, 8:10] = 9  # barrier
            w.append(semantics=sem, flow=flow, mask_lidar=mask)
    manifest = Manifest(split="mini", dataset=DatasetInfo(name="nuplan", cameras=CAMERA_CHANNELS))
    manifest.logs[LOG] = LogEntry(
        frames=n,
        meta=f"meta/{LOG}.parquet",
        occ=f"occ/{LOG}.zarr",
        checksums={},
        source=SourceRef("nuplan", str(tmp_path / "splits" / "mini" / f"{LOG}.db"), blob_root=str(blobs)),
    )
    save_manifest(split_dir, manifest)
    (blobs / LOG / "CAM_F0").mkdir(parents=True)
    image = np.zeros((IMAGE_H, IMAGE_W, 3), np.uint8)
    image[: IMAGE_H // 2], image[IMAGE_H // 2 :] = SKY, GROUND
    Image.fromarray(image).save(blobs / LOG / "CAM_F0" / f"{0:016x}.jpg", quality=95)
    return split_dir, blobs


def render(split_dir: Path, frame: int, camera: str = "all") -> tuple[bev.RenderedFrame, np.ndarray]:
    frames = bev.open_log_frames(split_dir, LOG)
    rendered = bev.render_row(frames, frame, bev.select_cameras(frames, camera), SIZE)
    return rendered, rendered.to_rgb().astype(int)


def pinhole(channel: str, point_ego: np.ndarray) -> tuple[float, float]:
    """The test's own projection: ego point -> (u, v) through the rig's calibration (no distortion)."""
    cam = CAMERAS[channel]
    camera_from_ego = np.linalg.inv(make_transform(cam.rotation, cam.translation))
    p = camera_from_ego[:3, :3] @ point_ego + camera_from_ego[:3, 3]
    uvw = cam.intrinsic @ p
    return float(uvw[0] / uvw[2]), float(uvw[1] / uvw[2])


def near(img: np.ndarray, rc: tuple[int, int], rgb: tuple[int, int, int], tol: int = 40, r: int = 2) -> bool:
    patch = img[rc[0] - r : rc[0] + r + 1, rc[1] - r : rc[1] + r + 1].reshape(-1, 3)
    return bool((np.abs(patch - np.array(rgb)).max(axis=1) <= tol).any())


def warm(img: np.ndarray, rc: tuple[int, int], r: int = 1) -> bool:
    """Whether a pixel near ``rc`` is orange-ish (the vehicle's class colour, blended with its black halo)."""
    patch = img[rc[0] - r : rc[0] + r + 1, rc[1] - r : rc[1] + r + 1].reshape(-1, 3)
    return bool(((patch[:, 0] > patch[:, 1] + 40) & (patch[:, 0] > patch[:, 2] + 80)).any())


def test_top_view_takes_the_highest_voxel():
    sem = np.full((4, 4, 5), FREE, np.uint8)
    sem[1, 1, 0] = 10
    sem[1, 1, 3] = 7
    sem[2, 2, 1] = 0
    top, top_z = bev.top_view(sem)
    assert top[1, 1] == 7 and top_z[1, 1] == 3
    assert top[2, 2] == 0 and top_z[2, 2] == 1
    assert top[0, 0] == FREE and top_z[0, 0] == -1


def test_bev_colours_unobserved_shade_and_flow_scale(split, tmp_path):
    split_dir, _ = split
    out = bev.show_frame(split_dir, LOG, 0, tmp_path / "frame.png", size_px=SIZE, camera="none")
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (SIZE, SIZE, 3)
    ref, _ = render(split_dir, 0, camera="none")
    # the middle of the barrier block (no box, no arrow) has the barrier colour, its corners too
    for x, y in ((-27.5, 22.5), (-29.7, 20.3), (-25.3, 24.7)):
        assert tuple(img[ref.pixel_of(x, y)]) == tuple(bev.CLASS_COLORS[9]), (x, y)
    assert tuple(img[ref.pixel_of(-31.0, 22.5)]) != tuple(bev.CLASS_COLORS[9])  # just outside: ground
    r, c = ref.pixel_of(-30.0, 30.0)  # ground: grey of the height shading
    assert img[r, c, 0] == img[r, c, 1] == img[r, c, 2] and tuple(img[r, c]) != tuple(bev.CLASS_COLORS[0])
    # free and unobserved (x < -45 m): shaded, not white; free and observed (-45..-40 m): white
    assert tuple(img[ref.pixel_of(-47.0, 10.0)]) == UNOBSERVED_RGB
    assert tuple(img[ref.pixel_of(-42.5, 10.0)]) == (255, 255, 255)
    # the pedestrian box (no voxels inside) is outlined in blue on the grey ground
    assert near(img, ref.pixel_of(-10.0, -31.5), (30, 60, 230), tol=70)
    assert not near(img, ref.pixel_of(-10.0, -36.0), (30, 60, 230), tol=70)
    # the flow scale: a black 10 m/s arrow (5 m in 0.5 s) pointing right, labelled, on a white box
    ax = ref.bev_axes
    assert any(t.get_text() == f"{bev.ARROW_KEY_MPS:g} m/s" for t in ax.texts)
    x0, y0 = GRID.range_min_m[0], GRID.range_min_m[1]
    key_x, key_y = x0 + 0.05 * 100, y0 + 0.04 * 100 + bev.ARROW_KEY_MPS * bev.ARROW_SECONDS
    assert near(img, ref.pixel_of(key_x, key_y - 2.0), (0, 0, 0), tol=60, r=1)
    assert near(img, ref.pixel_of(key_x, key_y - 8.0), (255, 255, 255), tol=10, r=0)  # the key's box
    # the moving vehicle: one arrow per 4 m cell it touches (cells x 14..18 and 18..22, y -10..-6), at
    # 5 m/s forward, in the same quiver as the 10 m/s scale arrow (pointing to -y: right)
    from matplotlib.quiver import Quiver

    (quiver,) = [c for c in ax.collections if isinstance(c, Quiver)]
    arrows = sorted(zip(quiver.X, quiver.Y, quiver.U, quiver.V, strict=True))  # plotted (y, x) and (vy, vx)
    assert [tuple(np.round(a, 3)) for a in arrows] == [
        (-41.0, -45.0, -10.0, 0.0),
        (-8.0, 16.0, 0.0, 5.0),
        (-8.0, 20.0, 0.0, 5.0),
    ]
    # legend: classes present, ego, flow, unobserved, boxes
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[:3] == ["vehicle", "barrier", "background (by height)"]
    assert {"ego", "flow: motion in 0.5 s", "unobserved (no ray)", "box (class colour)"} <= set(texts)


def test_cameras_sit_as_on_the_car_and_boxes_land_where_the_calibration_says(split, tmp_path):
    split_dir, _ = split
    out = bev.show_frame(split_dir, LOG, 0, tmp_path / "all.png", size_px=SIZE)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    ref, rgb = render(split_dir, 0)
    assert img.shape == (SIZE, 3 * SIZE, 3) and np.array_equal(img, rgb)  # BEV + two camera rows
    centre = {c: ref.pixel_of_camera(c, IMAGE_W / 2, IMAGE_H / 2) for c in CAMERA_CHANNELS}
    # every panel right of the BEV; front row above back row; each row left to right as on the car
    assert all(col > SIZE for _, col in centre.values())
    front, back = ["CAM_L0", "CAM_F0", "CAM_R0"], ["CAM_L1", "CAM_L2", "CAM_B0", "CAM_R2", "CAM_R1"]
    assert max(centre[c][0] for c in front) < min(centre[c][0] for c in back)
    for row in (front, back):
        assert len({centre[c][0] for c in row}) == 1
        assert [centre[c][1] for c in row] == sorted(centre[c][1] for c in row)
    # the image is shown upright: sky above, ground below
    assert near(img, ref.pixel_of_camera("CAM_F0", 20, IMAGE_H * 0.2), SKY, r=0)
    assert near(img, ref.pixel_of_camera("CAM_F0", 20, IMAGE_H * 0.9), GROUND, r=0)
    # the vehicle box's edges where the calibration projects them, in its class colour
    x, y, z, length, width, height, yaw = VEHICLE_BOX
    c, s = np.cos(yaw), np.sin(yaw)
    on_edges = [  # corners and edge midpoints of the box, in its own frame (fractions of l, w, h)
        (a, b, h) for a in (-0.5, 0.0, 0.5) for b in (-0.5, 0.5) for h in (-0.5, 0.5)
    ] + [(a, 0.0, h) for a in (-0.5, 0.5) for h in (-0.5, 0.5)]
    for channel in ("CAM_F0", "CAM_R0"):
        checked = 0
        for along, across, up in on_edges:
            local = np.array([along * length, across * width, up * height])
            point = np.array([x + c * local[0] - s * local[1], y + s * local[0] + c * local[1], z + local[2]])
            u, v = pinhole(channel, point)
            if 2 < u < IMAGE_W - 2 and 2 < v < IMAGE_H - 2:
                assert warm(img, ref.pixel_of_camera(channel, u, v)), (channel, u, v)
                checked += 1
        assert checked >= 4, channel
    # ... and not inside the box's face (the image shows through: only edges are drawn)
    u, v = pinhole("CAM_F0", np.array([x - length / 2, y + 0.2, z - 0.2]))
    assert not warm(img, ref.pixel_of_camera("CAM_F0", u, v), r=0)
    # ... and nowhere in the cameras looking away from it (nothing behind a camera wraps in)
    for channel in ("CAM_B0", "CAM_L1", "CAM_L2"):
        axes = ref.camera_axes[channel].get_window_extent()
        r0, r1 = int(SIZE - axes.y1), int(SIZE - axes.y0)
        panel = img[r0 + 2 : r1 - 2, int(axes.x0) + 2 : int(axes.x1) - 2].reshape(-1, 3)
        assert not ((panel[:, 0] > panel[:, 1] + 40) & (panel[:, 0] > panel[:, 2] + 80)).any(), channel
    # a panel without its image says where it was looked for
    f1 = bev.render_row(bev.open_log_frames(split_dir, LOG), 1, ["CAM_F0"], SIZE)
    (text,) = f1.camera_axes["CAM_F0"].texts
    assert text.get_text().startswith("no image at\n") and "(pass --blob-root)" in text.get_text()
    # the figure legend lists ego, flow, unobserved
    texts = [t.get_text() for t in ref.figure.legends[0].get_texts()]
    assert {"ego", "flow: motion in 0.5 s", "unobserved (no ray)"} <= set(texts)


def test_title_has_the_local_time(split):
    split_dir, _ = split
    frames = bev.open_log_frames(split_dir, LOG)
    # 2021-06-07 12:54:00 UTC is 05:54 in Las Vegas (PDT, UTC-7)
    assert bev.frame_title(frames, 0).endswith("2021-06-07 05:54:00.000 PDT (America/Los_Angeles)")
    assert bev.frame_title(frames, 2).endswith(
        "2021-06-07 12:54:01.000 UTC (location 'somewhere-else' unknown)"
    )


def test_camera_layout_of_nuplan_and_nuscenes_rigs():
    def calibrations(cams) -> list[CameraCalibration]:
        return [
            CameraCalibration(c.channel, c.ego_from_camera(), c.intrinsic, c.distortion, (c.width, c.height))
            for c in cams
        ]

    nuplan = calibrations(make_cameras(160, 90))
    rows = [[nuplan[i].channel for i in row] for row in camera_layout(nuplan)]
    assert rows == [["CAM_L0", "CAM_F0", "CAM_R0"], ["CAM_L1", "CAM_L2", "CAM_B0", "CAM_R2", "CAM_R1"]]
    nuscenes = calibrations(nuscenes_cameras(160, 90))
    rows = [[nuscenes[i].channel for i in row] for row in camera_layout(nuscenes)]
    assert rows == [
        ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"],
        ["CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"],
    ]
    assert [[nuplan[i].channel for i in row] for row in camera_layout(nuplan[:1])] == [["CAM_F0"]]


def test_box_edges_are_clipped_at_the_camera_and_distortion_bends_them():
    cam = make_cameras(160, 90)[0]  # CAM_F0
    cal = CameraCalibration("CAM_F0", cam.ego_from_camera(), cam.intrinsic, np.zeros(5), (160, 90))
    behind = np.array([[-20.0, 0.0, 0.5, 4.0, 2.0, 1.5, 0.0]])
    assert len(project_box_edges(behind, cal)[0]) == 0
    # a long box through the camera's position: only the part in front is drawn, no pixel from behind
    through = np.array([[1.0, 0.0, 1.6, 30.0, 1.0, 1.0, 0.0]])
    segments, which = project_box_edges(through, cal)
    assert len(segments) and np.isfinite(segments).all() and (which == 0).all()
    camera_from_ego = cal.camera_from_ego()
    assert camera_from_ego[:3, :3] @ np.array([1.0, 0, 0]) @ np.array([0, 0, 1.0]) > 0.9  # looks forward
    # distortion moves an off-centre point outward (k1 > 0, barrel to pincushion), the centre stays
    ahead = np.array([[20.0, 0.0, 1.6, 2.0, 4.0, 2.0, 0.0]])
    plain, _ = project_box_edges(ahead, cal)
    bent = CameraCalibration(
        "CAM_F0", cal.ego_from_camera, cal.intrinsic, np.array([0.2, 0, 0, 0, 0]), (160, 90)
    )
    distorted, _ = project_box_edges(ahead, bent)
    cx = cal.intrinsic[0, 2]
    assert np.abs(distorted[..., 0] - cx).max() > np.abs(plain[..., 0] - cx).max()


def test_box_colours_follow_the_category_name():
    assert category_unified("vehicle") == "vehicle" and category_unified("vehicle.car") == "vehicle"
    assert category_unified("human.pedestrian.adult") == "pedestrian"
    assert category_unified("movable_object.trafficcone") == "traffic_cone"
    assert category_unified("vehicle.construction") == "construction_vehicle"
    assert category_unified("vehicle.bus.rigid") == "bus" and category_unified("animal") == "generic_object"


def test_videos_mp4_and_gif_and_refused_suffixes(split, tmp_path, monkeypatch):
    split_dir, blobs = split
    gif = bev.show_video(split_dir, LOG, tmp_path / "log.gif", blob_root=blobs, camera="CAM_F0", size_px=150)
    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.size == (300, 150)
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    mp4 = bev.show_video(split_dir, LOG, tmp_path / "log.mp4", frames=[0, 2], camera="none", size_px=150)
    reader = imageio_ffmpeg.read_frames(str(mp4))
    meta = next(reader)
    assert meta["size"] == (160, 160)  # 150 padded to a multiple of 16
    assert sum(1 for _ in reader) == 2
    for name in ("v.avi", "v", "v.png"):
        with pytest.raises(bev.VizError, match=r"use \.mp4 or \.gif"):
            bev.show_video(split_dir, LOG, tmp_path / name)
        assert not (tmp_path / name).exists()  # nothing made, no folder named v.mp4 ever again
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if imageio-ffmpeg were not installed
    with pytest.raises(bev.VizError, match=r"MP4 needs imageio-ffmpeg \(pip install imageio-ffmpeg"):
        bev.show_video(split_dir, LOG, tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


def test_clear_errors(split, tmp_path, monkeypatch):
    split_dir, _ = split
    with pytest.raises(bev.VizError, match="frame 7 out of range"):
        bev.show_frame(split_dir, LOG, 7, tmp_path / "x.png")
    with pytest.raises(bev.VizError, match="no committed log 'nope'"):
        bev.show_frame(split_dir, "nope", 0, tmp_path / "x.png")
    with pytest.raises(
        bev.VizError, match=r"unknown camera CAM_X; the split's cameras are CAM_F0, CAM_L0, .*CAM_B0"
    ):
        bev.show_frame(split_dir, LOG, 0, tmp_path / "x.png", camera="CAM_F0,CAM_X")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(bev.VizError, match="no display"):
        bev.show_frame_3d(split_dir, LOG, 0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the viz extra were not installed
    with pytest.raises(bev.VizError, match=r"pip install driveengine\[viz\]"):
        bev.render_frame(None)


def run_cli(monkeypatch, *args: str) -> int:
    from driveengine import cli

    monkeypatch.setattr("sys.argv", ["driveengine", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return int(exc.value.code or 0)


def test_show_command(split, tmp_path, monkeypatch, capsys):
    split_dir, _ = split
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    show = ["show", str(split_dir), "--log", LOG]
    assert run_cli(monkeypatch, *show, "--frame", "2", "--out", str(tmp_path / "c.png"), "--size", "200") == 0
    assert Image.open(tmp_path / "c.png").size == (600, 200)  # BEV + eight cameras in two rows
    assert (
        run_cli(monkeypatch, *show, "--camera", "CAM_F0", "--out", str(tmp_path / "d.png"), "--size", "200")
        == 0
    )
    assert Image.open(tmp_path / "d.png").size == (400, 200)
    assert run_cli(monkeypatch, *show, "--3d") == 0
    assert "3D view skipped: no display" in capsys.readouterr().out
    assert run_cli(monkeypatch, *show, "--frame", "9", "--out", str(tmp_path / "e.png")) == 2
    assert "frame 9 out of range" in capsys.readouterr().err
    assert run_cli(monkeypatch, *show, "--camera", "CAM_X", "--out", str(tmp_path / "e.png")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown camera CAM_X" in line and "CAM_B0" in line and not (tmp_path / "e.png").exists()
    assert run_cli(monkeypatch, *show, "--video", "--out", str(tmp_path / "v.mkv")) == 2
    assert "use .mp4 or .gif" in capsys.readouterr().err and not (tmp_path / "v.mkv").exists()
    out = tmp_path / "v.gif"
    assert run_cli(monkeypatch, *show, "--video", "--out", str(out), "--size", "100", "--camera", "none") == 0
    with Image.open(out) as im:
        assert im.n_frames == 3


def test_show_finds_the_images_through_the_blob_root_collect_recorded(
    collected: Collected, tmp_path, monkeypatch
):
    """A real collected log: the recorded blob root is used; --blob-root overrides it."""
    split_dir = collected.split_dir

    def show(target: Path, *args: str) -> np.ndarray:
        argv = ["show", str(split_dir), "--log", collected.log, "--size", "200", "--camera", "CAM_F0"]
        assert run_cli(monkeypatch, *argv, "--out", str(target), *args) == 0
        return np.asarray(Image.open(target).convert("RGB")).astype(int)

    found = show(tmp_path / "found.png")  # no --blob-root
    given = show(tmp_path / "given.png", "--blob-root", str(collected.blob_root))
    missing = show(tmp_path / "missing.png", "--blob-root", str(tmp_path / "nowhere"))
    assert found.shape == (200, 400, 3)
    np.testing.assert_array_equal(found, given)  # the camera panel shows the image
    assert np.abs(found[:, 200:] - missing[:, 200:]).max() > 50  # ... not the "no image" text
    np.testing.assert_array_equal(found[:, :200], missing[:, :200])  # the BEV panel is the same


def test_unwritable_out_is_one_clear_line(split, tmp_path, monkeypatch, capsys):
    split_dir, _ = split
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    show = ["show", str(split_dir), "--log", LOG, "--size", "200", "--camera", "none"]
    for target, reason in (
        ("/proc/x.png", "cannot write the picture: "),  # a kernel file system: no new files
        (str(blocker / "x.png"), "cannot write the picture: "),  # a file where a folder should be
        (str(tmp_path / "pic.xyz"), "cannot write the picture: Format 'xyz' is not supported"),
    ):
        capsys.readouterr()
        code = run_cli(monkeypatch, *show, "--out", target)
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and line.startswith(f"error: {target}: {reason}"), line
    code = run_cli(monkeypatch, *show, "--video", "--out", str(blocker / "v.gif"))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith(f"error: {blocker / 'v.gif'}: cannot write the picture: ")


def test_a_broken_image_is_a_panel_saying_so(split):
    split_dir, blobs = split
    (blobs / LOG / "CAM_F0" / f"{2:016x}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rendered = bev.render_row(bev.open_log_frames(split_dir, LOG), 2, ["CAM_F0"], SIZE)
    (text,) = rendered.camera_axes["CAM_F0"].texts
    assert text.get_text().startswith("unreadable image\n")
