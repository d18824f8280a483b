"""BEV pictures: PNG size and colours at known voxels, camera panel, GIF frames, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from driveengine.schemas.classes import FREE
from driveengine.schemas.frame import frame_schema
from driveengine.schemas.grid import GRID
from PIL import Image

from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.store.manifest import LogEntry, Manifest, SourceRef, save_manifest
from driveengine.store.occ import create_occ
from driveengine.viz import bev

FRAME_SCHEMA = frame_schema(CAMERA_CHANNELS)  # nuPlan's frame rows


pytest.importorskip("matplotlib")

LOG = "2021.06.07.12.54.00_veh-35_01843_02314"
SIZE = 300  # panel edge in pixels: small pictures keep the tests fast
CAM_RGB = (20, 190, 40)


def camera_struct(path: str) -> dict:
    return {
        "data_path": path,
        "timestamp": 0,
        "sensor2lidar_rotation": np.eye(3).tolist(),
        "sensor2lidar_translation": [0.0, 0.0, 1.5],
        "cam_intrinsic": np.eye(3).tolist(),
        "distortion": [0.0] * 5,
    }


@pytest.fixture
def split(tmp_path: Path) -> tuple[Path, Path]:
    """A collected split with one log of 3 frames; a vehicle block at x = 15..20 m, y = -10..-8 m
    moving at 5 m/s inside its box; a barrier block at x = -30..-25 m, y = 20..25 m with no box;
    ground (background) everywhere; a CAM_F0 image for frame 0 only."""
    split_dir, blobs = tmp_path / "out" / "mini", tmp_path / "sensor_blobs"
    n = 3
    rows = []
    for i in range(n):
        cams = {c: camera_struct(f"{LOG}/{c}/{i:016x}.jpg") for c in CAMERA_CHANNELS}
        anns = {
            "gt_boxes": [[17.5, -9.0, 0.5, 5.0, 2.0, 1.5, 0.1], [-10.0, -30.0, 0.5, 3.0, 3.0, 1.8, 0.0]],
            "gt_names": ["vehicle", "pedestrian"],
            "gt_velocity_3d": [[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
            "instance_tokens": ["a" * 16, "c" * 16],
            "track_tokens": ["b" * 16, "d" * 16],
        }
        rows.append(
            {
                "token": f"{i:016x}",
                "timestamp": i * 500_000,
                "scene_name": f"{LOG}-scene-0001",
                "frame_idx": i,
            }
            | {"anns": anns, "cams": cams}
        )
    columns = ["token", "timestamp", "scene_name", "frame_idx", "anns", "cams"]
    schema = pa.schema([FRAME_SCHEMA.field(c) for c in columns], metadata=FRAME_SCHEMA.metadata)
    (split_dir / "meta").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), split_dir / "meta" / f"{LOG}.parquet")
    with create_occ(split_dir / "occ" / f"{LOG}.zarr", n, generator={}) as w:
        for i in range(n):
            sem = np.full(GRID.shape, FREE, np.uint8)
            flow = np.zeros((*GRID.shape, 2), np.float32)
            sem[:, :, 7] = 10  # ground
            sem[130 + i : 140 + i, 80:84, 8:11] = 0  # vehicle, 0.5 m further each frame
            flow[130 + i : 140 + i, 80:84, 8:11] = (5.0, 0.0)
            sem[40:50, 140:150, 8:10] = 9  # barrier
            w.append(semantics=sem, flow=flow, mask_lidar=np.ones(GRID.shape, bool))
    manifest = Manifest(split="mini")
    manifest.logs[LOG] = LogEntry(
        frames=n,
        meta=f"meta/{LOG}.parquet",
        occ=f"occ/{LOG}.zarr",
        checksums={},
        source=SourceRef("nuplan", str(tmp_path / "splits" / "mini" / f"{LOG}.db"), blob_root=str(blobs)),
    )
    save_manifest(split_dir, manifest)
    (blobs / LOG / "CAM_F0").mkdir(parents=True)
    Image.new("RGB", (192, 108), CAM_RGB).save(blobs / LOG / "CAM_F0" / f"{0:016x}.jpg", quality=95)
    return split_dir, blobs


def layout(camera: bool = True) -> bev.RenderedFrame:
    """An empty picture with the same layout as ``show_frame``'s, for mapping metres to pixels."""
    return bev.render_frame(None, camera_label="CAM_F0" if camera else None, size_px=SIZE)


def test_top_view_takes_the_highest_voxel():
    sem = np.full((4, 4, 5), FREE, np.uint8)
    sem[1, 1, 0] = 10
    sem[1, 1, 3] = 7
    sem[2, 2, 1] = 0
    top, top_z = bev.top_view(sem)
    assert top[1, 1] == 7 and top_z[1, 1] == 3
    assert top[2, 2] == 0 and top_z[2, 2] == 1
    assert top[0, 0] == FREE and top_z[0, 0] == -1


def test_png_size_class_colours_and_camera_panel(split, tmp_path):
    split_dir, _ = split
    # the blob root is found from the manifest's source (<root>/splits/mini/<log>.db -> <root>/sensor_blobs)
    out = bev.show_frame(split_dir, LOG, 0, tmp_path / "frame.png", size_px=SIZE)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (SIZE, 2 * SIZE, 3)
    ref = layout()
    # the middle of the barrier block (no box, no arrow) has the barrier colour, its corners too
    for x, y in ((-27.5, 22.5), (-29.7, 20.3), (-25.3, 24.7)):
        r, c = ref.pixel_of(x, y)
        assert tuple(img[r, c]) == tuple(bev.CLASS_COLORS[9]), (x, y)
    # just outside the block: ground grey
    r, c = ref.pixel_of(-31.0, 22.5)
    assert tuple(img[r, c]) != tuple(bev.CLASS_COLORS[9])
    # ground: grey of the background height shading, not a class colour
    r, c = ref.pixel_of(-30.0, 30.0)
    assert img[r, c, 0] == img[r, c, 1] == img[r, c, 2]
    assert tuple(img[r, c]) != tuple(bev.CLASS_COLORS[0])
    # the camera image fills the middle of the right panel
    centre = img[SIZE // 2, SIZE + SIZE // 2 + 5].astype(int)
    assert np.abs(centre - CAM_RGB).max() <= 6


def test_missing_camera_keeps_the_size(split, tmp_path):
    split_dir, _ = split
    out = bev.show_frame(split_dir, LOG, 1, tmp_path / "f1.png", size_px=SIZE)  # frame 1 has no image
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (SIZE, 2 * SIZE, 3)
    right = img[:, SIZE:]
    assert not (np.abs(right - CAM_RGB).max(axis=-1) <= 6).any()
    # without a side panel the picture is square; the vehicle moved 0.5 m forward in frame 1
    out = bev.show_frame(split_dir, LOG, 1, tmp_path / "bev.png", camera=None, size_px=SIZE)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (SIZE, SIZE, 3)
    r, c = layout(camera=False).pixel_of(-27.5, 22.5)
    assert tuple(img[r, c]) == tuple(bev.CLASS_COLORS[9])
    # the outline of the pedestrian box (no voxels inside) is drawn in blue on the grey ground
    r, c = layout(camera=False).pixel_of(-10.0, -31.5)  # its right edge
    patch = img[r - 2 : r + 3, c - 2 : c + 3].reshape(-1, 3).astype(int)
    assert (patch[:, 2] - patch[:, 0] > 60).any()
    r, c = layout(camera=False).pixel_of(-10.0, -36.0)  # well outside it: grey only
    patch = img[r - 2 : r + 3, c - 2 : c + 3].reshape(-1, 3).astype(int)
    assert not (patch[:, 2] - patch[:, 0] > 60).any()


def test_gif_has_one_frame_per_row_and_png_folder(split, tmp_path):
    split_dir, blobs = split
    gif = bev.show_video(split_dir, LOG, tmp_path / "log.gif", blob_root=blobs, size_px=150)
    with Image.open(gif) as im:
        assert im.n_frames == 3
        assert im.size == (300, 150)
    folder = bev.show_video(split_dir, LOG, tmp_path / "pngs", frames=[0, 2], camera=None, size_px=150)
    assert sorted(p.name for p in folder.iterdir()) == ["frame_0000.png", "frame_0002.png"]


def test_clear_errors(split, tmp_path, monkeypatch):
    split_dir, _ = split
    with pytest.raises(bev.VizError, match="frame 7 out of range"):
        bev.show_frame(split_dir, LOG, 7, tmp_path / "x.png")
    with pytest.raises(bev.VizError, match="no committed log 'nope'"):
        bev.show_frame(split_dir, "nope", 0, tmp_path / "x.png")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(bev.VizError, match="no display"):
        bev.show_frame_3d(split_dir, LOG, 0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the viz extra were not installed
    with pytest.raises(bev.VizError, match=r"pip install driveengine\[viz\]"):
        bev.render_frame(None)


def test_show_command(split, tmp_path, monkeypatch, capsys):
    from driveengine import cli

    split_dir, _ = split
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)

    def run(*args: str) -> int:
        monkeypatch.setattr("sys.argv", ["driveengine", "show", str(split_dir), "--log", LOG, *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        return int(exc.value.code or 0)

    assert run("--frame", "2", "--out", str(tmp_path / "c.png"), "--size", "200") == 0
    assert Image.open(tmp_path / "c.png").size == (400, 200)
    assert run("--3d") == 0
    assert "3D view skipped: no display" in capsys.readouterr().out
    assert run("--frame", "9", "--out", str(tmp_path / "d.png")) == 2
    assert "frame 9 out of range" in capsys.readouterr().err


def test_show_finds_the_images_through_the_blob_root_collect_recorded(tmp_path, monkeypatch):
    from driveengine import cli
    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.store.manifest import load_manifest
    from driveengine.synth import synthesize

    (log,) = synthesize(tmp_path / "in", logs=1, seconds=0.6, seed=4, points=128, image_size=(64, 36))
    blobs = tmp_path / "elsewhere" / "blobs"  # not where the manifest's source path would suggest
    blobs.parent.mkdir()
    (tmp_path / "in" / "sensor_blobs").rename(blobs)
    config = CollectConfig.from_options(
        source="nuplan",
        root=tmp_path / "in",
        out=tmp_path / "out",
        blob_root=blobs,
        labels=False,
        progress=False,
    )
    assert collect(config, echo=lambda _: None).ok
    split_dir = tmp_path / "out" / "mini"
    entry = load_manifest(split_dir).logs[log.log_name]
    assert entry.source.blob_root == str(blobs.resolve()) and Path(entry.source.blob_root).is_absolute()

    def show(target: Path, *args: str) -> np.ndarray:
        argv = ["driveengine", "show", str(split_dir), "--log", log.log_name, "--size", "200"]
        monkeypatch.setattr("sys.argv", [*argv, "--out", str(target), *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert not exc.value.code
        return np.asarray(Image.open(target).convert("RGB")).astype(int)

    found = show(tmp_path / "found.png")  # no --blob-root
    given = show(tmp_path / "given.png", "--blob-root", str(blobs))
    missing = show(tmp_path / "missing.png", "--blob-root", str(tmp_path / "nowhere"))
    assert found.shape == (200, 400, 3)
    np.testing.assert_array_equal(found, given)  # the camera panel shows the image
    assert np.abs(found[:, 200:] - missing[:, 200:]).max() > 50  # ... not the "no image" text
    np.testing.assert_array_equal(found[:, :200], missing[:, :200])  # the BEV panel is the same


def test_unwritable_out_is_one_clear_line(split, tmp_path, monkeypatch, capsys):
    from driveengine import cli

    split_dir, _ = split
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(
            "sys.argv", ["driveengine", "show", str(split_dir), "--log", LOG, "--size", "200", *args]
        )
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main()
        return int(exc.value.code or 0), capsys.readouterr().err

    for target, reason in (
        ("/proc/x.png", "cannot write the picture: "),  # a kernel file system: no new files
        (str(blocker / "x.png"), "cannot write the picture: "),  # a file where a folder should be
        (str(tmp_path / "pic.xyz"), "cannot write the picture: Format 'xyz' is not supported"),
    ):
        code, err = run("--out", target)
        (line,) = err.strip().splitlines()
        assert code == 2 and line.startswith(f"error: {target}: {reason}"), line
    code, err = run("--video", "--out", str(blocker / "v.gif"))
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith(f"error: {blocker / 'v.gif'}: cannot write the picture: ")
