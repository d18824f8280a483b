"""Camera pre-training model: the lift (projection, sampling convention, visibility, averaging), the
network, temporal warping, a short training run on synthetic frames, and the exported backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import FREE
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.geometry import invert_transform, make_transform, transform_points, yaw_to_quaternion
from driveengine.models.camera import (
    CameraOccupancyNet,
    invert_rigid,
    lift_features,
    lift_grid_for,
    project_to_pixels,
)
from driveengine.models.export import (
    BackboneError,
    export_backbone,
    infer_resnet_config,
    load_backbone_weights,
)
from driveengine.models.resnet import ResNet
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.synth import world_for_log
from driveengine.synth.sensors import pixel_rays, render_camera
from driveengine.synth.world import make_cameras
from driveengine.train.loss import OccupancyLoss

W, H = 20, 12
GRID = VoxelGrid((-8.0, -8.0, -2.0), (8.0, 8.0, 2.0), 1.0)


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _rig(channels=CAMERA_CHANNELS, width=W, height=H) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, N, 3, 3) intrinsics and (1, N, 4, 4) ego_from_camera of the synthetic rig's cameras."""
    cams = {c.channel: c for c in make_cameras(width, height)}
    k = np.stack([cams[ch].intrinsic for ch in channels])
    e = np.stack([cams[ch].ego_from_camera() for ch in channels])
    return torch.from_numpy(k)[None], torch.from_numpy(e)[None]


def _ego_point(k: np.ndarray, ego_from_camera: np.ndarray, u: float, v: float, depth: float) -> np.ndarray:
    """The ego-frame point at ``depth`` m along the ray through continuous pixel (u, v)."""
    p_cam = depth * np.linalg.solve(k, np.array([u, v, 1.0]))
    return transform_points(ego_from_camera, p_cam[None])[0]


# -- the lift -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_a_voxel_centre_samples_exactly_the_feature_at_its_pixel(stride):
    k, e = _rig(("CAM_L0",))
    h, w = H // stride, W // stride
    features = torch.zeros(1, 1, 2, h, w)
    i, j = 3, 2  # feature cell (column, row); its centre is image point (s (i + 0.5), s (j + 0.5))
    features[0, 0, :, j, i] = torch.tensor([7.0, -3.0])
    features[0, 0, :, j, i + 1] = torch.tensor([1.0, 1.0])
    kn, en = k[0, 0].numpy(), e[0, 0].numpy()
    points = np.stack(
        [
            _ego_point(kn, en, stride * (i + 0.5), stride * (j + 0.5), 6.0),  # the cell centre
            _ego_point(kn, en, stride * (i + 1.0), stride * (j + 0.5), 9.0),  # between cells i and i+1
            _ego_point(kn, en, stride * (i + 2.5), stride * (j + 2.5), 4.0),  # elsewhere: zeros
        ]
    )
    lifted, count = lift_features(features, torch.from_numpy(points), invert_rigid(e), k, (W, H))
    assert count.tolist() == [[1, 1, 1]]
    torch.testing.assert_close(lifted[0, :, 0], torch.tensor([7.0, -3.0]), atol=1e-5, rtol=0)
    # bilinear with align_corners=False: halfway between the two cell centres is their mean
    torch.testing.assert_close(lifted[0, :, 1], torch.tensor([4.0, -1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(lifted[0, :, 2], torch.zeros(2), atol=1e-6, rtol=0)


def test_voxels_outside_every_frustum_get_no_contribution():
    k, e = _rig(("CAM_F0",))
    kn, en = k[0, 0].numpy(), e[0, 0].numpy()
    features = torch.full((1, 1, 3, H, W), 5.0)
    points = np.stack(
        [
            _ego_point(kn, en, W / 2, H / 2, -5.0),  # behind the camera (projects inside the image)
            _ego_point(kn, en, W + 0.5, H / 2, 5.0),  # right of the image
            _ego_point(kn, en, float(W), H / 2, 5.0),  # on the right edge: outside (half-open)
            _ego_point(kn, en, W / 2, -0.25, 5.0),  # above the image
            _ego_point(kn, en, W / 2, H / 2, 0.05),  # closer than the minimum depth
            _ego_point(kn, en, 0.01, 0.01, 5.0),  # just inside the top-left image corner
            _ego_point(kn, en, W - 0.01, H - 0.01, 30.0),  # just inside the bottom-right corner
        ]
    )
    lifted, count = lift_features(features, torch.from_numpy(points), invert_rigid(e), k, (W, H))
    assert count[0].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert torch.all(lifted[0, :, :5] == 0)
    # border padding: a visible point near the edge gets the edge feature, not a blend with zeros
    torch.testing.assert_close(lifted[0, :, 5:], torch.full((3, 2), 5.0))


def test_a_voxel_seen_by_two_cameras_gets_their_mean():
    k, e = _rig(("CAM_F0", "CAM_L0"))  # optical axes at 0 and 55 degrees, 70 degree fields of view
    features = torch.stack([torch.full((2, H, W), 1.0), torch.full((2, H, W), 3.0)])[None]
    yaw = np.radians([27.5, -20.0, 70.0, 180.0])  # both, only CAM_F0, only CAM_L0, neither
    points = np.stack([1.0 + 12 * np.cos(yaw), 12 * np.sin(yaw), np.full(4, 1.0)], axis=1)
    lifted, count = lift_features(features, torch.from_numpy(points), invert_rigid(e), k, (W, H))
    assert count[0].tolist() == [2, 1, 1, 0]
    torch.testing.assert_close(lifted[0, 0], torch.tensor([2.0, 1.0, 3.0, 0.0]))


def test_projection_matches_the_numpy_geometry_per_batch_sample():
    rng = np.random.default_rng(0)
    k, e = _rig()
    moved = make_transform(yaw_to_quaternion(0.3), [0.5, -1.0, 0.2]) @ e[0].numpy()  # another rig per sample
    e2 = torch.cat([e, torch.from_numpy(moved)[None]])
    k2 = torch.cat([k, torch.diag(torch.tensor([2.0, 1.5, 1.0], dtype=k.dtype)) @ k])  # a resized image
    points = rng.uniform(-20, 20, size=(50, 3))
    uv, visible = project_to_pixels(torch.from_numpy(points), invert_rigid(e2), k2, (W, H))
    for b in range(2):
        for c in range(len(CAMERA_CHANNELS)):
            cam = transform_points(invert_transform(e2[b, c].numpy()), points)
            pix = cam @ k2[b, c].numpy().T
            expect_uv = pix[:, :2] / pix[:, 2:]
            inside = (cam[:, 2] > 0.1) & np.all((expect_uv >= 0) & (expect_uv < [W, H]), axis=1)
            assert np.array_equal(visible[b, c].numpy(), inside)
            np.testing.assert_allclose(
                uv[b, c].numpy()[inside], expect_uv[inside], rtol=0, atol=1e-3
            )  # float32 pixels
    assert visible.any()


def test_the_lift_keeps_full_precision_under_bf16_autocast():
    """Under bf16 autocast (the loop's CUDA setting; CPU autocast here) the projection and the sampling stay
    float32: a wide image, where bf16 pixel coordinates would be off by several pixels, still samples the
    exact feature cell."""
    k, e = _rig(("CAM_F0",), width=1920, height=1080)
    features = torch.zeros(1, 1, 1, 135, 240, dtype=torch.bfloat16)  # stride 8
    features[0, 0, 0, 70, 201] = 5.0
    point = _ego_point(k[0, 0].numpy(), e[0, 0].numpy(), 8 * 201.5, 8 * 70.5, 20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lifted, count = lift_features(
            features, torch.from_numpy(point[None]), invert_rigid(e), k, (1920, 1080)
        )
    assert lifted.dtype == torch.float32 and count.item() == 1
    torch.testing.assert_close(lifted[0, 0, 0], torch.tensor(5.0), atol=1e-3, rtol=0)


# -- the network --------------------------------------------------------------------------------------


def _small_model(**kw) -> CameraOccupancyNet:
    base = dict(depth=18, width=8, neck_channels=8, decoder_channels=16)
    base.update(kw)
    return CameraOccupancyNet(GRID, **base)


def test_model_outputs_and_visibility():
    torch.manual_seed(0)
    k, e = _rig()
    model = _small_model(lift_voxel_size_m=2.0)
    assert model.lift_grid.shape == (8, 8, 2)
    images = torch.rand(2, 8, 3, H, W)
    out = model(images, k.expand(2, -1, -1, -1), e.expand(2, -1, -1, -1))
    assert out["semantics"].shape == (2, FREE + 1, *GRID.shape)
    assert out["flow"].shape == (2, *GRID.shape, 2) and torch.all(out["flow"] == 0)  # zero-init head
    _, vis = project_to_pixels(
        torch.from_numpy(GRID.voxel_centres().reshape(-1, 3)), invert_rigid(e), k, (W, H)
    )
    assert torch.equal(out["visible"][0], vis.any(dim=1)[0].view(GRID.shape))
    assert 0 < out["visible"].float().mean() < 1
    assert len(model._visibility_cache) == 1  # one rig: computed once, then memoised
    full = _small_model()  # lift grid = label grid: visibility comes from the lift's camera counts
    assert torch.equal(
        full(images, k.expand(2, -1, -1, -1), e.expand(2, -1, -1, -1))["visible"], out["visible"]
    )
    sem, flow = CameraOccupancyNet.predict(out)
    assert sem.dtype == torch.uint8 and int(sem.max()) <= FREE and flow.dtype == torch.float32
    out["semantics"].float().mean().backward()
    assert model.backbone.conv1.weight.grad is not None and model.backbone.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not tile"):
        lift_grid_for(GRID, 3.0)


def test_uint8_images_from_the_loader_give_the_float_images_output():
    """The camera task streams uint8 images (a quarter of the bytes); the model scales them on the device."""
    from driveengine.train.tasks import StreamOptions

    assert StreamOptions().image_dtype == "uint8"
    torch.manual_seed(0)
    k, e = _rig()
    model = _small_model(lift_voxel_size_m=2.0).eval()
    pixels = torch.randint(0, 256, (1, 8, 3, H, W), dtype=torch.uint8)
    with torch.no_grad():
        as_uint8 = model(pixels, k.expand(1, -1, -1, -1), e.expand(1, -1, -1, -1))
        as_float = model(pixels.float() / 255.0, k.expand(1, -1, -1, -1), e.expand(1, -1, -1, -1))
    assert torch.equal(as_uint8["semantics"], as_float["semantics"])
    assert torch.equal(model.normalise(pixels), model.normalise(pixels.float() / 255.0))


def test_history_frames_are_warped_by_ego_motion():
    """A previous frame whose cameras saw the same images from the same place in the world gives the same
    output whichever ego frame it is expressed in; claiming the ego moved while the cameras did not
    changes it."""
    torch.manual_seed(0)
    k, e = _rig()
    model = _small_model(history=1).eval()
    images = torch.rand(1, 8, 3, H, W)
    hist_images = torch.rand(1, 1, 8, 3, H, W)
    motion = torch.from_numpy(make_transform(yaw_to_quaternion(0.2), [2.0, 0.5, 0.0]))  # ego_t_from_ego_{t-1}
    still = torch.eye(4, dtype=torch.float64)
    valid = torch.tensor([[True]])

    def run(ego_from_history, hist_ego_from_camera):
        with torch.no_grad():
            return model(
                images,
                k,
                e,
                hist_images,
                k[:, None],
                hist_ego_from_camera[:, None],
                ego_from_history[None, None],
                valid,
            )["semantics"]

    # same physical cameras: in the previous ego frame they sit at ego_{t-1}_from_ego_t @ ego_t_from_camera
    a = run(still, e)
    b = run(motion, torch.linalg.inv(motion) @ e)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    c = run(motion, e)
    assert (a - c).abs().max() > 1e-3
    invalid = model(
        images, k, e, hist_images, k[:, None], e[:, None], still[None, None], torch.tensor([[False]])
    )
    other = model(
        images,
        k,
        e,
        torch.rand_like(hist_images),
        k[:, None],
        e[:, None],
        still[None, None],
        torch.tensor([[False]]),
    )
    torch.testing.assert_close(invalid["semantics"], other["semantics"])  # invalid frames contribute nothing


# -- learning on synthetic frames, exporting the backbone ----------------------------------------------------


def _synthetic_frames(n: int, size: tuple[int, int] = (48, 27)) -> dict[str, torch.Tensor]:
    """``n`` key frames of a synthetic log: rendered images, calibration, exact labels on ``GRID``."""
    world = world_for_log(1, 0, seconds=float(n), image_size=size)
    cams = {c.channel: c for c in world.cameras}
    rays = {ch: pixel_rays(cams[ch]) for ch in CAMERA_CHANNELS}
    images, sem, flow = [], [], []
    for ts in world.lidar_timestamps_us[::20][:n].tolist():  # one frame per second
        rgb = [render_camera(world, cams[ch], ts, rays[ch])[0] for ch in CAMERA_CHANNELS]
        images.append(np.stack(rgb).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        sem.append(world.occupancy(ts, GRID))
        flow.append(world.flow(ts, GRID))
    k = np.stack([cams[ch].intrinsic for ch in CAMERA_CHANNELS])
    e = np.stack([cams[ch].ego_from_camera() for ch in CAMERA_CHANNELS])
    return {
        "images": torch.from_numpy(np.stack(images)),
        "intrinsics": torch.from_numpy(np.broadcast_to(k, (n, *k.shape)).copy()),
        "ego_from_camera": torch.from_numpy(np.broadcast_to(e, (n, *e.shape)).copy()),
        "semantics": torch.from_numpy(np.stack(sem)),
        "flow": torch.from_numpy(np.stack(flow)),
    }


def _train_briefly(model: CameraOccupancyNet, frames: dict[str, torch.Tensor], steps: int = 40) -> None:
    """``steps`` AdamW steps on pairs of ``frames``; the loss (and its semantic term alone) must fall
    below 0.4 of its start."""
    criterion = OccupancyLoss(flow_weight=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, sem_losses = [], []
    n = len(frames["images"])
    for step in range(steps):
        idx = torch.tensor([(2 * step) % n, (2 * step + 1) % n])
        batch = {key: value[idx] for key, value in frames.items()}
        out = model(**CameraOccupancyNet.inputs_from_batch(batch))
        terms = criterion(out["semantics"], out["flow"], batch["semantics"], batch["flow"], out["visible"])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
        sem_losses.append(float(terms["loss_sem"].detach()))
    assert np.mean(losses[-4:]) < 0.4 * np.mean(losses[:4]), losses
    assert np.mean(sem_losses[-4:]) < 0.4 * np.mean(sem_losses[:4]), sem_losses  # not the flow term alone


def test_short_training_run_lowers_the_loss_and_the_backbone_exports(tmp_path):
    torch.manual_seed(0)
    frames = _synthetic_frames(4)
    assert (frames["semantics"] != FREE).any() and (frames["semantics"] == 0).any()  # ground and vehicles
    model = _small_model()
    _train_briefly(model, frames)

    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    torch.save({"model": model.state_dict(), "step": 40, "config": {"modality": "camera"}}, ckpt)
    result = CliRunner().invoke(app, ["export-backbone", str(ckpt)])
    assert result.exit_code == 0, result.output
    path = tmp_path / "run" / "backbone.pth"
    state = torch.load(path, weights_only=True)
    assert (
        "conv1.weight" in state and "layer4.1.bn2.running_var" in state and "layer1.0.conv1.weight" in state
    )
    assert not any(key.startswith(("backbone.", "fc.")) for key in state)
    assert infer_resnet_config(state) == (18, 8)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (
        meta["backbone"] == "resnet18" and meta["depth"] == 18 and meta["width"] == 8 and meta["step"] == 40
    )
    assert meta["downstream_compatible"] is False and meta["downstream"] is None  # width 8: DriveEngine only
    fresh = ResNet(18, width=8)
    fresh.load_state_dict(state, strict=True)
    fresh.eval(), model.eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(fresh(x), model.backbone(x), strict=True):
            torch.testing.assert_close(got, want)


def test_a_vovnet99_camera_model_learns_too():
    """The same short run with the VoVNet-99 backbone (tiny width; images above its 29-pixel minimum)."""
    torch.manual_seed(0)
    frames = _synthetic_frames(4, size=(64, 36))
    model = _small_model(backbone="vovnet99", depth=None)
    assert model.backbone_name == "vovnet99" and model.backbone.out_channels == (32, 64, 96, 128)
    _train_briefly(model, frames)


def test_export_refuses_a_checkpoint_without_a_camera_model(tmp_path):
    from driveengine.models.lidar import LidarOccupancyNet

    lidar = LidarOccupancyNet(GRID, depth=18, width=8, decoder_channels=8)
    ckpt = tmp_path / "lidar.pt"
    torch.save({"model": lidar.state_dict(), "config": {"depth": 18}}, ckpt)
    result = CliRunner().invoke(app, ["export-backbone", str(ckpt), "--out", str(tmp_path / "b.pth")])
    assert isinstance(result.exception, BackboneError)
    assert "holds no camera model" in str(result.exception) and str(ckpt) in str(result.exception)
    assert not (tmp_path / "b.pth").exists()
    with pytest.raises(BackboneError, match="no such checkpoint"):
        export_backbone(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="unreadable"):
        export_backbone(tmp_path / "junk.pt")


def test_standard_resnet_weights_load_strictly_and_mismatches_are_refused(tmp_path):
    torch.manual_seed(1)
    source = ResNet(34, width=16)
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)  # an ImageNet head
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    model = CameraOccupancyNet(GRID, depth=34, width=16, neck_channels=8, decoder_channels=8, pretrained=path)
    loaded = model.backbone.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    with pytest.raises(BackboneError, match="missing keys") as err:
        CameraOccupancyNet(GRID, depth=50, width=16, pretrained=path)
    assert str(path) in str(err.value)
    with pytest.raises(BackboneError, match="shape mismatches"):
        load_backbone_weights(ResNet(34, width=8), path)
    with pytest.raises(BackboneError, match="no such backbone weights file"):
        load_backbone_weights(ResNet(18), tmp_path / "nope.pth")
