"""Camera-to-occupancy model: eight images -> backbone + FPN -> parameter-free lift -> BEV decoder -> classes, flow.

OpenScene's camera pre-training setting: an image backbone learns from nuPlan occupancy and flow labels
so that it transfers to downstream camera tasks (:mod:`driveengine.models.export` writes it with
the parameter names downstream code loads).

Pipeline of :class:`CameraOccupancyNet`:

1. **Backbone**: one of the registered camera backbones (:mod:`driveengine.models.backbones`: ResNet
   18/34/50/101 with torchvision names, VoVNet-99 (V-99-eSE) with the mmdet3d plugins' names) over every
   image of the batch. Images arrive in [0, 1] RGB and are normalised inside the model the way the
   backbone's published weights expect (ResNet: RGB, torchvision's ImageNet mean/std; VoVNet-99: the same
   statistics in BGR order, as the DD3D weights and the mmdet3d configs use), so an exported backbone
   is used downstream with that ``img_norm_cfg``. Optionally initialised from a local weights file.
2. **Neck** (:class:`FPNNeck`): lateral 1x1 convolutions on the backbone's four maps (strides 4, 8, 16,
   32: ``layer1`` .. ``layer4`` or ``stage2`` .. ``stage5``), top-down upsampling and addition down to
   one output level (stride 8 by default), then a 3x3 convolution.
3. **Lift** (:func:`lift_features`, no parameters): the centres of the voxels of the lift grid (the label
   grid or a coarser grid over the same range) are projected into every camera with the frame's
   calibration, the image features are sampled bilinearly there with
   :func:`torch.nn.functional.grid_sample`, and averaged over the cameras that see the voxel (in front
   of the camera and inside the image). Voxels no camera sees get zeros.
4. **Optional temporal fusion**: ``history`` previous key frames are lifted onto the *current* voxel
   centres moved into each previous ego frame with ``ego_t_from_ego_{t-j}`` (so the static world lines
   up), and concatenated with the current volume along channels.
5. **Decoder** (:class:`BEVDecoder`): the volume is folded to a bird's-eye-view image (channels x
   height bins), reduced, refined by residual blocks, upsampled to the label grid's x-y resolution and
   decoded by the :class:`~driveengine.models.heads.OccupancyHeads` into ``K * nz`` class logits (K =
   every id of the split's class table, free last: 17 for OpenScene's table) and ``2 * nz`` flow values
   per cell.

Outputs (the same as :class:`~driveengine.models.lidar.LidarOccupancyNet`, plus visibility):

* ``semantics`` logits ``(B, K, nx, ny, nz)``;
* ``flow`` ``(B, nx, ny, nz, 2)``, (vx, vy) m/s in the ego frame of the key frame;
* ``visible`` ``(B, nx, ny, nz)`` bool: the label voxel's centre is seen by at least one camera
  (evaluation restricts the metrics to these voxels).

Camera and pixel conventions (:func:`project_to_pixels`): ``ego_from_camera`` maps camera coordinates
(OpenCV: x right, y down, z along the optical axis) into the ego frame (x forward, y left, z up, rear
axle); ``camera_from_ego`` is its rigid inverse. A point projects to ``(u, v) = (K @ p)[:2] / p_z`` in
**continuous pixel coordinates whose pixel (i, j) spans [i, i + 1) x [j, j + 1)**, i.e. pixel centres at
integer + 0.5. This is the convention of the synthetic renderer (one ray through each pixel centre) and
the one under which resizing an image scales the intrinsics by a plain ``diag(sx, sy, 1)`` (what
:class:`~driveengine.data.FrameStream` does). Normalised sampling coordinates are therefore
``x = 2 u / W - 1``, ``y = 2 v / H - 1`` with ``align_corners=False``: a feature map of any stride that
covers the image samples feature (i, j) exactly at the image point ``(s (i + 0.5), s (j + 0.5))``.
Real nuPlan intrinsics follow OpenCV (pixel centres at integers); the half-pixel difference is a
sixteenth of a feature cell at stride 8 and is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from driveengine.models.backbones import get_backbone, resolve_backbone_name
from driveengine.models.heads import ModelOutputs, OccupancyHeads, predict
from driveengine.models.resnet import BasicBlock
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable

#: Points closer to the image plane than this (m, along the optical axis) are not seen by the camera.
MIN_DEPTH_M = 0.1
#: Batch keys the model reads (see :meth:`CameraOccupancyNet.inputs_from_batch`).
BATCH_KEYS: tuple[str, ...] = ("images", "intrinsics", "ego_from_camera")
HISTORY_BATCH_KEYS: tuple[str, ...] = (
    "history_images", "history_intrinsics", "history_ego_from_camera", "ego_from_history", "history_valid",
)  # fmt: skip


# -- geometry (torch, batched, on the device of the inputs) -------------------------------------------


def invert_rigid(target_from_source: torch.Tensor) -> torch.Tensor:
    """``source_from_target`` of rigid transforms (..., 4, 4): ``[R^T, -R^T t]`` (no general inverse)."""
    r = target_from_source[..., :3, :3]
    t = target_from_source[..., :3, 3:]
    rt = r.transpose(-1, -2)
    out = torch.zeros_like(target_from_source)
    out[..., :3, :3] = rt
    out[..., :3, 3:] = -rt @ t
    out[..., 3, 3] = 1.0
    return out


def project_to_pixels(
    points: torch.Tensor,
    camera_from_ego: torch.Tensor,
    intrinsics: torch.Tensor,
    image_size: tuple[int, int],
    min_depth_m: float = MIN_DEPTH_M,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates of ego-frame points in every camera, and whether each camera sees them.

    One matrix per camera, ``K @ [R | t]`` (3 x 4), maps a point to ``(u z, v z, z)`` (z: depth along the
    optical axis, since the last row of ``K`` is ``[0, 0, 1]``). Computed in float32 with autocast
    disabled: under bf16 a pixel coordinate of 1000 would be off by several pixels, in float32 by far
    less than a thousandth of a pixel.

    Args:
        points: (P, 3) or (B, P, 3) points, m, ego frame.
        camera_from_ego: (B, N, 4, 4) transforms (OpenCV camera frame: x right, y down, z forward).
        intrinsics: (B, N, 3, 3) pixel intrinsics (last row ``[0, 0, 1]``) of images of ``image_size``.
        image_size: (W, H) of the images the intrinsics belong to, pixels.
        min_depth_m: minimum depth along the optical axis, m.

    Returns:
        ``uv`` (B, N, P, 2) float32 continuous pixel coordinates (pixel centres at integer + 0.5;
        arbitrary finite values where not visible) and ``visible`` (B, N, P) bool: depth above
        ``min_depth_m`` and ``0 <= u < W``, ``0 <= v < H``.
    """
    with torch.autocast(points.device.type, enabled=False):
        projection = intrinsics.to(torch.float64) @ camera_from_ego.to(torch.float64)[..., :3, :]
        projection = projection.to(torch.float32)  # (B, N, 3, 4)
        pts = points.to(torch.float32)
        pts = pts[None, None] if pts.dim() == 2 else pts[:, None]  # (1 or B, 1, P, 3)
        pix = pts @ projection[..., :3].transpose(-1, -2) + projection[..., None, :, 3]  # (B, N, P, 3)
        depth = pix[..., 2]
        uv = pix[..., :2] / depth.clamp(min=min_depth_m).unsqueeze(-1)
        width, height = image_size
        u, v = uv.unbind(-1)
        visible = (depth > min_depth_m) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    return uv, visible


def seen_by_any_camera(
    points: torch.Tensor,
    camera_from_ego: torch.Tensor,
    intrinsics: torch.Tensor,
    image_size: tuple[int, int],
    min_depth_m: float = MIN_DEPTH_M,
) -> torch.Tensor:
    """(B, P) bool: the point is visible (as in :func:`project_to_pixels`) in at least one camera.

    The same test without dividing by the depth (``0 <= u z < W z``, ...) and reduced over the cameras
    one at a time, so the full label grid (640k voxels) costs ``B x P`` memory, not ``B x N x P x 3``.
    Arguments as in :func:`project_to_pixels`.
    """
    with torch.autocast(points.device.type, enabled=False):
        projection = intrinsics.to(torch.float64) @ camera_from_ego.to(torch.float64)[..., :3, :]
        projection = projection.to(torch.float32)  # (B, N, 3, 4)
        pts = points.to(torch.float32)
        pts = pts[None] if pts.dim() == 2 else pts  # (1 or B, P, 3)
        width, height = image_size
        seen = torch.zeros((projection.shape[0], pts.shape[-2]), dtype=torch.bool, device=points.device)
        for cam in range(projection.shape[1]):  # eight cameras
            m = projection[:, cam]
            pix = pts @ m[:, :, :3].transpose(-1, -2) + m[:, None, :, 3]  # (B, P, 3): u z, v z, z
            uz, vz, z = pix.unbind(-1)
            seen |= (z > min_depth_m) & (uz >= 0) & (uz < width * z) & (vz >= 0) & (vz < height * z)
    return seen


def lift_features(
    features: torch.Tensor,
    points: torch.Tensor,
    camera_from_ego: torch.Tensor,
    intrinsics: torch.Tensor,
    image_size: tuple[int, int],
    min_depth_m: float = MIN_DEPTH_M,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample per-camera feature maps at the projections of 3D points and average over the cameras.

    A feature map is taken to cover its image exactly (see the module docstring for the pixel
    convention): point ``(u, v)`` of the ``W x H`` image is sampled at normalised ``(2u/W - 1, 2v/H - 1)``
    with bilinear ``grid_sample(align_corners=False)``; border padding, so a visible point within half a
    feature cell of the image edge gets the edge feature rather than a blend with zeros. Sampling runs in
    float32, one camera at a time and only at the points that camera sees in some sample of the batch
    (each point is seen by one or two of eight cameras: about a quarter of the work and memory of
    sampling every camera at every point).

    Args:
        features: (B, N, C, h, w) feature maps of the N cameras.
        points: (P, 3) or (B, P, 3) points (voxel centres), m, ego frame.
        camera_from_ego: (B, N, 4, 4).
        intrinsics: (B, N, 3, 3) of the ``image_size`` images.
        image_size: (W, H) pixels of the images the features were computed from.
        min_depth_m: see :func:`project_to_pixels`.

    Returns:
        ``lifted`` (B, C, P) float32: mean feature over the cameras that see each point (0 where none
        does), and ``count`` (B, P) int64: number of cameras that see it.
    """
    b, n, c = features.shape[:3]
    uv, visible = project_to_pixels(points, camera_from_ego, intrinsics, image_size, min_depth_m)
    width, height = image_size
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=uv.dtype, device=uv.device)
    grid = (uv * scale - 1.0).to(torch.float32)  # (B, N, P, 2); weight 0 where the camera does not see
    weight = visible.to(torch.float32)
    acc = features.new_zeros((b, c, grid.shape[2]), dtype=torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        for cam in range(n):  # eight cameras, each sampled at the points it sees (in any sample)
            cols = visible[:, cam].any(dim=0).nonzero().squeeze(1)
            if cols.numel() == 0:
                continue
            sampled = F.grid_sample(
                features[:, cam].float(), grid[:, cam][:, None, cols], mode="bilinear", padding_mode="border",
                align_corners=False,
            )  # fmt: skip
            acc = acc.index_add(2, cols, sampled[:, :, 0] * weight[:, cam, None, cols])
    count = visible.sum(dim=1)
    return acc / count.clamp(min=1).unsqueeze(1).to(acc.dtype), count


# -- network pieces -----------------------------------------------------------------------------------


class FPNNeck(nn.Module):
    """Feature pyramid (Lin et al. 2017) reduced to one output level.

    Lateral 1x1 convolutions bring C2..C5 to ``out_channels``; the top-down path upsamples (nearest, to
    the finer map's size) and adds, from C5 down to level ``out_level``; a 3x3 convolution + BN + ReLU
    smooths the result.

    Args:
        in_channels: channels of the backbone outputs, finest first (``ResNet.out_channels``).
        out_channels: channels of the output.
        out_level: index of the output level in ``in_channels`` (0 = stride 4, 1 = stride 8, ...).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, out_level: int = 1) -> None:
        super().__init__()
        if not 0 <= out_level < len(in_channels):
            raise ValueError(f"out_level must be in 0..{len(in_channels) - 1}, got {out_level}")
        self.out_level = out_level
        self.lateral = nn.ModuleList(nn.Conv2d(ch, out_channels, 1) for ch in in_channels[out_level:])
        self.smooth = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused map at ``out_level`` for backbone outputs C2..C5 (each (B, C_i, h_i, w_i))."""
        used = list(feats[self.out_level :])
        x = self.lateral[-1](used[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(used[:-1]), strict=True):
            x = lat(f) + F.interpolate(x, size=f.shape[-2:], mode="nearest")
        return self.smooth(x)


class BEVDecoder(nn.Module):
    """Bird's-eye-view decoder: (B, C_in, X_l, Y_l) -> per-cell logits and flow for ``nz`` height bins.

    1x1 reduction + BN + ReLU, ``blocks`` residual basic blocks at the lift resolution, bilinear
    upsampling to the label grid's (nx, ny), a 3x3 refinement, and two 1x1 heads (flow head zero-init,
    so training starts from "no motion").

    Args:
        in_channels: channels of the folded volume (lifted channels x lift height bins x frames).
        channels: decoder width.
        out_shape: (nx, ny, nz) of the label grid.
        blocks: residual blocks.
        classes: the class table of the labels (the ids predicted).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        out_shape: tuple[int, int, int],
        blocks: int = 2,
        classes: ClassTable = OPENSCENE_CLASSES,
    ) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        nz = out_shape[2]
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(*(BasicBlock(channels, channels) for _ in range(blocks)))
        self.refine = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.heads = OccupancyHeads(channels, nz, classes)

    def forward(self, bev: torch.Tensor) -> ModelOutputs:
        """``semantics`` (B, K, nx, ny, nz) logits (K ids of the class table) and ``flow`` (B, nx, ny, nz, 2) m/s."""
        nx, ny, _ = self.out_shape
        x = self.blocks(self.reduce(bev))
        if x.shape[-2:] != (nx, ny):
            x = F.interpolate(x, size=(nx, ny), mode="bilinear", align_corners=False)
        return self.heads(self.refine(x))


def lift_grid_for(grid: VoxelGrid, voxel_size_m: float | None) -> VoxelGrid:
    """The lift grid: ``grid``'s range with ``voxel_size_m`` voxels (None = ``grid`` itself).

    Raises:
        ValueError: the lift voxels do not tile the label grid (each label axis must be an integer
            multiple of the lift axis).
    """
    if voxel_size_m is None or voxel_size_m == grid.voxel_size_m:
        return grid
    for n_label, lo, hi in zip(grid.shape, grid.range_min_m, grid.range_max_m, strict=True):
        n_lift = round((hi - lo) / voxel_size_m)
        if n_lift < 1 or abs(n_lift * voxel_size_m - (hi - lo)) > 1e-6 or n_label % n_lift:
            raise ValueError(
                f"lift voxel size {voxel_size_m} m does not tile the label grid {grid.shape} of "
                f"{grid.voxel_size_m} m voxels; use a multiple of {grid.voxel_size_m} m that divides the range"
            )
    return VoxelGrid(grid.range_min_m, grid.range_max_m, float(voxel_size_m))


class CameraOccupancyNet(nn.Module):
    """Eight camera images -> per-voxel class logits and flow (see the module docstring).

    Args:
        grid: the label grid (output shape).
        backbone: a registered backbone name (``resnet18`` .. ``resnet101``, ``vovnet99``; default
            ``resnet18``, or ``resnet<depth>`` when only ``depth`` is given).
        width: channels of the backbone's first convolution (64 = the published network, the only width
            published weights fit and downstream code builds; smaller = the same architecture scaled).
        neck_channels: channels of the FPN output, i.e. of every lifted voxel.
        decoder_channels: channels of the BEV decoder.
        feature_level: FPN output level sampled by the lift (0 = stride 4, 1 = stride 8, ...).
        lift_voxel_size_m: voxel size of the lift grid (None = the label grid's); a coarser lift grid
            saves memory, the decoder upsamples to the label grid.
        history: previous key frames fused (0 = current frame only).
        pretrained: a local weights file to initialise the backbone (torchvision ResNet, VoVNet-99 in the
            mmdet3d plugins' names, an exported ``backbone.pth``;
            :func:`~driveengine.models.export.load_backbone_weights`).
        min_depth_m: see :func:`project_to_pixels`.
        depth: the older way to choose a ResNet (``depth=50`` = ``backbone="resnet50"``); must agree
            with ``backbone`` when both are given.
        classes: the class table of the labels (the ids predicted; the split records it).

    Attributes:
        backbone_name: the registered name of :attr:`backbone`.
    """

    #: Calibrations whose label-grid visibility is memoised (:meth:`label_visibility`).
    VISIBILITY_CACHE = 16

    def __init__(
        self,
        grid: VoxelGrid,
        backbone: str | None = None,
        width: int = 64,
        neck_channels: int = 64,
        decoder_channels: int = 64,
        feature_level: int = 1,
        lift_voxel_size_m: float | None = None,
        history: int = 0,
        pretrained: str | os.PathLike[str] | None = None,
        min_depth_m: float = MIN_DEPTH_M,
        depth: int | None = None,
        classes: ClassTable = OPENSCENE_CLASSES,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.classes = classes
        self.lift_grid = lift_grid_for(grid, lift_voxel_size_m)
        self.history = int(history)
        self.min_depth_m = float(min_depth_m)
        spec = get_backbone(resolve_backbone_name(backbone, depth))
        self.backbone_name = spec.name
        self.backbone = spec.build(width, 3)
        if pretrained is not None:
            from driveengine.models.export import load_backbone_weights

            load_backbone_weights(self.backbone, pretrained)
        self.neck = FPNNeck(self.backbone.out_channels, neck_channels, feature_level)
        lnz = self.lift_grid.shape[2]
        self.decoder = BEVDecoder(
            neck_channels * lnz * (1 + self.history), decoder_channels, grid.shape, classes=classes
        )
        norm = spec.normalisation
        self._channel_order = list(norm.rgb_indices())
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1) / 255.0, persistent=False)
        centres = torch.from_numpy(self.lift_grid.voxel_centres().reshape(-1, 3)).float()
        self.register_buffer("lift_centres", centres, persistent=False)
        label_centres = torch.from_numpy(grid.voxel_centres().reshape(-1, 3)).float()
        self.register_buffer("label_centres", label_centres, persistent=False)
        self._visibility_cache: dict[tuple, torch.Tensor] = {}

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone input (..., 3, H, W) from RGB images, float in [0, 1] or uint8 0..255 (the loader's
        compact form, scaled here, on the device): reordered to the backbone's channel order and
        standardised with its statistics (see the module docstring)."""
        x = images.to(self.mean.dtype)
        if images.dtype == torch.uint8:
            x = x / 255.0
        if self._channel_order != [0, 1, 2]:
            x = x[..., self._channel_order, :, :]
        return (x - self.mean) / self.std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Neck features (B, N, C, h, w) of images (B, N, 3, H, W) in [0, 1] RGB."""
        b, n = images.shape[:2]
        feats = self.neck(self.backbone(self.normalise(images.flatten(0, 1))))
        return feats.view(b, n, *feats.shape[1:])

    def _lift(
        self,
        features: torch.Tensor,
        camera_from_ego: torch.Tensor,
        intrinsics: torch.Tensor,
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BEV image (B, C * nz, nx, ny) of the lift grid and the cameras seeing each voxel (B, P)."""
        lifted, count = lift_features(
            features, self.lift_centres, camera_from_ego, intrinsics, image_size, self.min_depth_m
        )
        b, c = lifted.shape[:2]
        nx, ny, nz = self.lift_grid.shape
        # (B, C, P) with P in x, y, z order -> BEV image (B, C * nz, nx, ny)
        bev = lifted.view(b, c, nx, ny, nz).permute(0, 1, 4, 2, 3).reshape(b, c * nz, nx, ny)
        return bev, count

    @torch.no_grad()
    def label_visibility(
        self, camera_from_ego: torch.Tensor, intrinsics: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, nx * ny * nz) bool: label voxel centres seen by some camera (:func:`seen_by_any_camera`).

        Memoised per sample on its calibration (the rig rarely changes within a dataset), at most
        :attr:`VISIBILITY_CACHE` calibrations; a lookup costs a copy of 8 x 25 numbers to the host.
        """
        keys = [
            (image_size, k.cpu().numpy().tobytes(), m.cpu().numpy().tobytes())
            for k, m in zip(intrinsics.to(torch.float64), camera_from_ego.to(torch.float64), strict=True)
        ]
        out = []
        for b, key in enumerate(keys):
            hit = self._visibility_cache.pop(key, None)
            if hit is None or hit.device != intrinsics.device:
                hit = seen_by_any_camera(
                    self.label_centres,
                    camera_from_ego[b : b + 1],
                    intrinsics[b : b + 1],
                    image_size,
                    self.min_depth_m,
                )[0]
            self._visibility_cache[key] = hit  # most recently used last
            while len(self._visibility_cache) > self.VISIBILITY_CACHE:
                self._visibility_cache.pop(next(iter(self._visibility_cache)))
            out.append(hit)
        return torch.stack(out)

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        ego_from_camera: torch.Tensor,
        history_images: torch.Tensor | None = None,
        history_intrinsics: torch.Tensor | None = None,
        history_ego_from_camera: torch.Tensor | None = None,
        ego_from_history: torch.Tensor | None = None,
        history_valid: torch.Tensor | None = None,
    ) -> ModelOutputs:
        """Outputs (module docstring) for one batch of frames.

        Args:
            images: (B, N, 3, H, W) in [0, 1], cameras in ``CAMERA_CHANNELS`` order.
            intrinsics: (B, N, 3, 3) pixel intrinsics of the (resized) ``W x H`` images.
            ego_from_camera: (B, N, 4, 4) camera extrinsics (OpenCV camera frame), m.
            history_images, history_intrinsics, history_ego_from_camera: (B, k, N, ...) the same for the
                ``k = history`` previous key frames (nearest first); required when ``history > 0``.
            ego_from_history: (B, k, 4, 4) ``ego_t_from_ego_{t-j}`` for j = 1..k.
            history_valid: (B, k) bool; invalid previous frames (before the scene start) contribute zeros.
        """
        b, n, _, height, width = images.shape
        size = (width, height)
        camera_from_ego = invert_rigid(ego_from_camera.to(torch.float64))
        k = self.history
        if not k:
            bev, lift_count = self._lift(self.image_features(images), camera_from_ego, intrinsics, size)
        else:
            if history_images is None or history_intrinsics is None or history_ego_from_camera is None:
                raise ValueError(
                    f"this model fuses {k} previous frames: pass history_images, history_intrinsics, "
                    "history_ego_from_camera and ego_from_history"
                )
            if ego_from_history is None:
                raise ValueError("history fusion needs ego_from_history (B, k, 4, 4)")
            all_images = torch.cat(
                [images.unsqueeze(1), history_images[:, :k]], dim=1
            )  # (B, 1+k, N, 3, H, W)
            feats = self.image_features(all_images.flatten(1, 2))
            feats = feats.view(b, 1 + k, n, *feats.shape[2:])
            current, lift_count = self._lift(feats[:, 0], camera_from_ego, intrinsics, size)
            parts = [current]
            hist_from_ego = invert_rigid(ego_from_history[:, :k].to(torch.float64))  # ego_{t-j}_from_ego_t
            for j in range(k):  # a few previous frames, each lifted onto the current voxel centres
                cam_j = invert_rigid(history_ego_from_camera[:, j].to(torch.float64))
                part, _ = self._lift(
                    feats[:, 1 + j], cam_j @ hist_from_ego[:, j, None], history_intrinsics[:, j], size
                )
                if history_valid is not None:
                    part = part * history_valid[:, j].to(part.dtype).view(b, 1, 1, 1)
                parts.append(part)
            bev = torch.cat(parts, dim=1)
        out = self.decoder(bev)
        if self.lift_grid == self.grid:
            visible = lift_count > 0
        else:
            visible = self.label_visibility(camera_from_ego, intrinsics, size)
        out["visible"] = visible.view(b, *self.grid.shape)
        return out

    @staticmethod
    def inputs_from_batch(
        batch: Mapping[str, object], device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """The keyword arguments of :meth:`forward` from a :func:`~driveengine.data.collate.collate_frames`
        batch (keys :data:`BATCH_KEYS` and, when present, :data:`HISTORY_BATCH_KEYS`), moved to ``device``.
        """
        non_blocking = device is not None and device.type == "cuda"
        out: dict[str, torch.Tensor] = {}
        for key in (*BATCH_KEYS, *HISTORY_BATCH_KEYS):
            if key not in batch:
                continue
            value = batch[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"camera batch entry {key!r} is a {type(value).__name__}, expected one tensor for the batch "
                    "(every frame's images resized to the same image_size)"
                )
            out[key] = value if device is None else value.to(device, non_blocking=non_blocking)
        missing = [k for k in BATCH_KEYS if k not in out]
        if missing:
            raise KeyError(f"camera batch lacks {missing}: stream the 'images' field (FrameStream fields)")
        return out

    @staticmethod
    def predict(outputs: ModelOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids (B, nx, ny, nz) uint8 and flow (B, nx, ny, nz, 2) float32 of the outputs
        (:func:`driveengine.models.heads.predict`)."""
        return predict(outputs)
