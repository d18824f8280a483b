"""Camera pre-training model on CPU at test size: cost of the lift and decoder over the backbone alone.

* Step: forward + backward of :class:`~driveengine.train.model_camera.CameraOccupancyNet` (backbone,
  FPN, lift, BEV decoder, loss) vs forward + backward of its ResNet backbone alone on the same images,
  in the same run. Time ratio and peak memory ratio (peak resident memory of a fresh process per
  measurement, so one measurement's peak does not hide the other's) show the overhead of everything
  that is not the backbone.
* Lift: :func:`~driveengine.train.model_camera.lift_features` (one ``grid_sample`` per camera over all
  voxels) vs one ``grid_sample`` over all cameras at once (``B*N x C x P`` intermediate), time and
  peak memory.

Run: ``python -m benchmarks camera``.
"""

from __future__ import annotations

import multiprocessing as mp
import time

#: Test-size configuration: 2 frames x 8 cameras of 96 x 176 pixels, a 64 x 64 x 8 grid of 1 m voxels.
BATCH, CAMERAS, IMAGE_H, IMAGE_W = 2, 8, 96, 176
GRID_ARGS = ((-32.0, -32.0, -4.0), (32.0, 32.0, 4.0), 1.0)
MODEL_ARGS = dict(depth=18, width=16, neck_channels=16, decoder_channels=32)
REPEAT = 3


def _inputs():
    import numpy as np
    import torch

    from driveengine.synth.world import make_cameras

    torch.manual_seed(0)
    cams = make_cameras(IMAGE_W, IMAGE_H)
    k = torch.from_numpy(np.stack([c.intrinsic for c in cams]))[None].expand(BATCH, -1, -1, -1)
    e = torch.from_numpy(np.stack([c.ego_from_camera() for c in cams]))[None].expand(BATCH, -1, -1, -1)
    images = torch.rand(BATCH, CAMERAS, 3, IMAGE_H, IMAGE_W)
    return images, k.contiguous(), e.contiguous()


def _measure(kind: str, queue: mp.Queue) -> None:
    """In a fresh process: best time of ``REPEAT`` steps of ``kind`` and the process's peak RSS (MiB)."""
    import torch
    from driveengine.schemas import VoxelGrid
    from driveengine.schemas.classes import FREE

    from benchmarks.harness import best_time, peak_rss_mib
    from driveengine.train.loss import OccupancyLoss
    from driveengine.train.model_camera import CameraOccupancyNet, invert_rigid, lift_features

    torch.set_num_threads(1)
    grid = VoxelGrid(*GRID_ARGS)
    images, k, e = _inputs()
    before = peak_rss_mib()
    if kind in ("model", "backbone"):
        model = CameraOccupancyNet(grid, **MODEL_ARGS)
        sem = torch.randint(0, FREE + 1, (BATCH, *grid.shape), dtype=torch.uint8)
        flow = torch.zeros(BATCH, *grid.shape, 2)
        criterion = OccupancyLoss()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            if kind == "model":
                out = model(images, k, e)
                loss = criterion(out["semantics"], out["flow"], sem, flow, out["visible"])["loss"]
            else:
                feats = model.backbone((images.flatten(0, 1) - model.mean) / model.std)
                loss = sum(f.float().mean() for f in feats)
            loss.backward()

    else:
        feats = torch.randn(BATCH, CAMERAS, 16, IMAGE_H // 8, IMAGE_W // 8, requires_grad=True)
        centres = torch.from_numpy(grid.voxel_centres().reshape(-1, 3)).float()
        cam_from_ego = invert_rigid(e)

        def step() -> None:
            if kind == "lift":
                lifted, _ = lift_features(feats, centres, cam_from_ego, k, (IMAGE_W, IMAGE_H))
            else:  # all cameras in one grid_sample, then a masked mean over cameras
                from driveengine.train.model_camera import project_to_pixels

                uv, vis = project_to_pixels(centres, cam_from_ego, k, (IMAGE_W, IMAGE_H))
                g = (uv * torch.tensor([2.0 / IMAGE_W, 2.0 / IMAGE_H], dtype=uv.dtype) - 1).float()
                s = torch.nn.functional.grid_sample(
                    feats.flatten(0, 1), g.flatten(0, 1)[:, None], align_corners=False, padding_mode="border"
                )[:, :, 0].view(BATCH, CAMERAS, 16, -1)
                w = vis.float()[:, :, None]
                lifted = (s * w).sum(1) / w.sum(1).clamp(min=1)
            lifted.sum().backward()

    seconds = best_time(step, repeat=REPEAT, warmup=1)
    queue.put((seconds, peak_rss_mib() - before))


def _run(kind: str) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, queue))
    proc.start()
    result = queue.get(timeout=900)
    proc.join()
    return result


def main() -> None:
    from benchmarks.harness import report, section

    section(
        f"camera model step on CPU, {BATCH} frames x {CAMERAS} cameras {IMAGE_W}x{IMAGE_H}, "
        f"grid {GRID_ARGS}, ResNet-{MODEL_ARGS['depth']} width {MODEL_ARGS['width']}, 1 thread"
    )
    start = time.perf_counter()
    model_s, model_mib = _run("model")
    backbone_s, backbone_mib = _run("backbone")
    report("forward+backward: full model vs backbone alone", model_s * 1e3, backbone_s * 1e3, "ms", "< 3.5")
    report("peak memory growth: full model vs backbone alone", model_mib, backbone_mib, "MiB", "< 2.5")
    section("lift of 16-channel stride-8 features onto 32k voxels, forward+backward")
    lift_s, lift_mib = _run("lift")
    batched_s, batched_mib = _run("batched")
    report(
        "lift_features (per camera) vs one grid_sample over all cameras",
        lift_s * 1e3,
        batched_s * 1e3,
        "ms",
        "<= 1",
    )
    report("peak memory growth: per camera vs all cameras at once", lift_mib, batched_mib, "MiB", "< 0.7")
    print(f"(bench_camera took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
