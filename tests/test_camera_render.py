"""The camera data path end to end: rendering, calibration, streaming, lifting, training.

* A controlled world (the synthetic world of :mod:`driveengine.synth` with its solids replaced by one
  box per camera, straight down that camera's optical axis, each of another class) is rendered through
  the eight cameras of the synthetic rig. The camera model's :func:`project_to_pixels` must put every
  box centre on a pixel of that box (renderer's class map and class colour), and :func:`lift_features`
  applied to the rendered RGB images must give each box-centre voxel its class colour and a ground point
  the ground colour.
* A synthesised nuPlan log, collected and streamed with resized images: its labelled vehicle voxels lift
  the vehicle colour (calibration from the database through collect and the stream is consistent).
* ``driveengine pretrain --modality camera`` on that split: the LiDAR job's machinery, and the product,
  ``backbone.pth``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from driveengine.schemas.classes import BACKGROUND
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.models.camera import invert_rigid, lift_features, project_to_pixels
from driveengine.models.resnet import ResNet
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.synth import world_for_log
from driveengine.synth.sensors import CLASS_COLOURS, GROUND_COLOUR, SKY_COLOUR, render_camera
from driveengine.synth.world import CAMERA_MOUNTS, Boxes

IMAGE_SIZE = (96, 54)
#: One class per camera (CAMERA_CHANNELS order): every class of the palette, background included.
CLASSES = (0, 4, 5, 6, 7, 8, 9, BACKGROUND)
DISTANCE_M = 9.0
BOX_SIZE = (2.5, 2.5, 2.0)


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _nearest_colour(rgb: np.ndarray) -> int | str:
    """Class id (or "ground"/"sky") whose colour has the closest direction to ``rgb`` (shading-invariant)."""
    palette = {**CLASS_COLOURS, "ground": GROUND_COLOUR, "sky": SKY_COLOUR}
    keys = list(palette)
    cols = np.array([palette[k] for k in keys], dtype=np.float64)
    cols /= np.linalg.norm(cols, axis=1, keepdims=True)
    v = np.asarray(rgb, dtype=np.float64)
    return keys[int(np.argmax(cols @ (v / np.linalg.norm(v))))]


@pytest.fixture(scope="module")
def scene():
    """(world, timestamp, box centres in the ego frame (8, 3), rendered images, class maps)."""
    world = world_for_log(3, 0, seconds=1.0, static_only=True, image_size=IMAGE_SIZE)
    ts = int(world.lidar_timestamps_us[5])
    global_from_ego = world.frame_pose(ts)
    cams = {c.channel: c for c in world.cameras}
    centres = []
    for ch in CAMERA_CHANNELS:
        yaw = np.radians(CAMERA_MOUNTS[ch][0])
        t = cams[ch].translation
        centres.append([t[0] + DISTANCE_M * np.cos(yaw), t[1] + DISTANCE_M * np.sin(yaw), 0.5 * BOX_SIZE[2]])
    centres_ego = np.array(centres)
    ego_yaw = np.arctan2(global_from_ego[1, 0], global_from_ego[0, 0])
    n = len(CLASSES)
    boxes = Boxes(
        track_index=np.arange(n),
        track_token=np.array([f"{i:016x}" for i in range(n)], dtype=object),
        category=np.array(["x"] * n, dtype=object),
        class_id=np.array(CLASSES, dtype=np.uint8),
        center=centres_ego @ global_from_ego[:3, :3].T + global_from_ego[:3, 3],
        size=np.tile(BOX_SIZE, (n, 1)),
        yaw=np.full(n, ego_yaw),
        velocity=np.zeros((n, 3)),
    )
    world.solids_at = lambda timestamp_us: boxes  # the controlled scene: only these boxes and the ground
    rendered = [render_camera(world, cams[ch], ts) for ch in CAMERA_CHANNELS]
    images = np.stack([rgb for rgb, _ in rendered])
    class_maps = np.stack([cls for _, cls in rendered])
    return world, ts, centres_ego, images, class_maps


def _calibration(world) -> tuple[torch.Tensor, torch.Tensor]:
    cams = {c.channel: c for c in world.cameras}
    k = torch.tensor(np.stack([cams[ch].intrinsic for ch in CAMERA_CHANNELS]))[None]
    ego_from_camera = torch.tensor(np.stack([cams[ch].ego_from_camera() for ch in CAMERA_CHANNELS]))[None]
    return k, ego_from_camera


def test_each_box_is_rendered_where_the_model_projects_it(scene) -> None:
    world, _, centres, images, class_maps = scene
    k, ego_from_camera = _calibration(world)
    uv, visible = project_to_pixels(torch.from_numpy(centres), invert_rigid(ego_from_camera), k, IMAGE_SIZE)
    for c, cls in enumerate(CLASSES):
        assert visible[0, c, c], CAMERA_CHANNELS[c]
        u, v = uv[0, c, c].numpy()
        # the optical axis is pitched 3 degrees down: the box centre sits near the image centre
        assert abs(u - IMAGE_SIZE[0] / 2) < 2 and abs(v - IMAGE_SIZE[1] / 2) < 8
        col, row = int(np.floor(u)), int(np.floor(v))
        assert class_maps[c, row, col] == cls, (CAMERA_CHANNELS[c], class_maps[c, row, col])
        assert _nearest_colour(images[c, row, col]) == cls
    # the ground straight ahead of CAM_F0, 8 m from the rear axle, projects onto ground pixels
    ground = torch.tensor([[8.0, 0.0, 0.0]], dtype=torch.float64)
    uv, visible = project_to_pixels(ground, invert_rigid(ego_from_camera), k, IMAGE_SIZE)
    assert visible[0, 0, 0] and not visible[0, 7, 0]  # seen by the front camera, not by the back one
    u, v = uv[0, 0, 0].numpy()
    assert class_maps[0, int(v), int(u)] == 254  # the renderer's ground marker


def test_lifting_the_rendered_images_colours_each_box_voxel_with_its_class(scene) -> None:
    world, _, centres, images, _ = scene
    k, ego_from_camera = _calibration(world)
    features = torch.from_numpy(images).permute(0, 3, 1, 2).float()[None]  # (1, 8, 3, H, W), stride 1
    points = torch.from_numpy(np.concatenate([centres, [[8.0, 0.0, 0.0]], [[0.0, 0.0, 30.0]]]))
    lifted, count = lift_features(features, points, invert_rigid(ego_from_camera), k, IMAGE_SIZE)
    for c, cls in enumerate(CLASSES):
        assert count[0, c] >= 1
        assert _nearest_colour(lifted[0, :, c].numpy()) == cls, CAMERA_CHANNELS[c]
    assert count[0, 8] >= 1 and _nearest_colour(lifted[0, :, 8].numpy()) == "ground"
    # 30 m straight up: no camera sees it, so nothing is lifted there
    assert count[0, 9] == 0 and torch.all(lifted[0, :, 9] == 0)


# -- the whole camera path: synthetic nuPlan log -> collect -> FrameStream images -> lift ------------------


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A synthesised (192 x 108 images) and collected one-log split: 6 key frames, 8 cameras."""
    import numba

    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.synth import synthesize

    before = numba.get_num_threads()
    numba.set_num_threads(1)  # module-scoped: runs before the per-test thread fixture
    root = tmp_path_factory.mktemp("camera_split")
    synthesize(
        root / "nuplan", logs=1, seconds=3.0, seed=5, points=2000, image_size=(192, 108), key_frames_only=True
    )
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=root / "nuplan", out=root / "out", progress=False)
    )
    numba.set_num_threads(before)
    assert summary.ok
    return root / "out"


@pytest.fixture(scope="module")
def streamed_frames(collected):
    """The split's frames, streamed with images resized to half size (96 x 54)."""
    from driveengine.data import FrameStream

    stream = FrameStream(
        collected, "mini", fields=("images", "semantics"), shuffle=False, image_size=(96, 54)
    )
    return list(stream)


def test_streamed_images_lift_onto_the_labelled_voxels_of_their_class(streamed_frames) -> None:
    """The calibration a real reader stores (DB -> collect -> stream, intrinsics scaled to the resize)
    puts labelled vehicle voxels on red pixels: most visible vehicle voxels (the rest are hidden behind
    other solids) lift the vehicle colour, far more often than voxels in general do."""
    from driveengine.schemas import GRID

    hits = total = red_any = seen_any = 0
    for sample in streamed_frames:
        images = torch.from_numpy(sample["images"])[None]
        k = torch.from_numpy(sample["intrinsics"])[None]
        cam_from_ego = invert_rigid(torch.from_numpy(sample["ego_from_camera"])[None])
        assert images.shape == (1, 8, 3, 54, 96)
        occupied = np.argwhere(sample["semantics"] != 16)
        centres = torch.from_numpy(GRID.voxel_centres()[tuple(occupied.T)])
        lifted, count = lift_features(images, centres, cam_from_ego, k, (96, 54))
        seen = (count[0] > 0).numpy()
        colours = [_nearest_colour(c) for c in lifted[0].T.numpy()[seen] * 255 + 1e-6]
        is_red = np.array([c == 0 for c in colours])
        vehicle = sample["semantics"][tuple(occupied.T)][seen] == 0
        hits += int(is_red[vehicle].sum())
        total += int(vehicle.sum())
        red_any += int(is_red.sum())
        seen_any += len(is_red)
    assert total >= 50, "the synthetic log should show some vehicles"
    assert hits / total > 0.5
    assert hits / total > 2 * red_any / seen_any


def test_history_frames_from_the_stream_feed_the_temporal_model(collected) -> None:
    """The stream's ``history=1`` batch (previous key frame's images, calibration, ``ego_t_from_ego_{t-1}``,
    validity) is what the temporal model takes (the warp itself is tested in test_camera_model)."""
    from driveengine.schemas import GRID

    from driveengine.data import FrameStream
    from driveengine.models.camera import CameraOccupancyNet

    stream = FrameStream(
        collected,
        "mini",
        fields=("images",),
        history=1,
        shuffle=False,
        image_size=(96, 54),
        global_batch_size=2,
    )
    batch = next(iter(stream.loader()))
    assert batch["history_images"].shape == (2, 1, 8, 3, 54, 96)
    assert batch["history_valid"].tolist() == [[False], [True]]  # the first frame of the scene has none
    model = CameraOccupancyNet(
        GRID, width=8, neck_channels=4, decoder_channels=8, lift_voxel_size_m=4.0, history=1
    )
    with torch.no_grad():
        out = model(**CameraOccupancyNet.inputs_from_batch(batch))
    assert out["semantics"].shape == (2, 17, *GRID.shape) and torch.isfinite(out["semantics"]).all()


# -- the same training machinery as the LiDAR job: `driveengine pretrain --modality camera` -----------------


def test_pretrain_with_the_camera_modality_writes_the_backbone_at_each_checkpoint(collected, tmp_path):
    """`driveengine pretrain --modality camera` runs the LiDAR job's loop (checkpoints, evaluation on
    camera-visible voxels) and leaves the backbone, torchvision-named, next to the checkpoints."""
    from driveengine.train.config import PretrainConfig

    if "modality" not in PretrainConfig.__dataclass_fields__:
        pytest.skip("the pre-training loop has no modality switch yet")
    args = [
        "pretrain", "--data", str(collected), "--split", "mini", "--modality", "camera", "--image-size", "96x54",
        "--lift-voxel", "2", "--width", "8", "--batch-size", "2", "--max-steps", "3", "--ckpt-every", "2",
        "--eval-every", "3", "--eval-frames", "2", "--run-dir", str(tmp_path / "runs"), "--device", "cpu",
        "--cpu-threads", "1", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pretrain: 3 steps" in result.output and "eval: mIoU" in result.output
    run = tmp_path / "runs" / "pretrain"
    assert (run / "ckpt_0000002.pt").exists() and (run / "last.pt").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["modality"] == "camera" and config["image_size"] == [96, 54]
    meta = json.loads((run / "backbone.json").read_text())
    assert meta["step"] == 3 and meta["depth"] == 18 and meta["width"] == 8
    state = torch.load(run / "backbone.pth", weights_only=True)
    ResNet(18, width=8).load_state_dict(state, strict=True)
    trained = torch.load(run / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(trained[f"backbone.{key}"], value) for key, value in state.items())
    exported = CliRunner().invoke(
        app, ["export-backbone", str(run / "ckpt_0000002.pt"), "--out", str(tmp_path / "b2.pth")]
    )
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "b2.json").read_text())["step"] == 2
    early = torch.load(tmp_path / "b2.pth", weights_only=True)
    assert early.keys() == state.keys() and not all(torch.equal(early[k], state[k]) for k in state)
    bad = CliRunner().invoke(app, [*args[:7], "--image-size", "96by54"])
    assert bad.exception is not None and "WIDTHxHEIGHT" in str(bad.exception)
