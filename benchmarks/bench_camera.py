"""Camera pre-training model on CPU at test size: cost of the lift and decoder over the backbone alone.

* Step: forward + backward of :class:`~driveengine.models.camera.CameraOccupancyNet` (backbone,
  FPN, lift, BEV decoder, loss) vs forward + backward of its ResNet backbone alone on the same images,
  in the same run. Time ratio and peak memory ratio (peak resident memory of a fresh process per
  measurement, so one measurement's peak does not hide the other's) show the overhead of everything
  that is not the backbone.
* Lift: :func:`~driveengine.models.camera.lift_features` (one ``grid_sample`` per camera over all
  voxels) vs one ``grid_sample`` over all cameras at once (``B*N x C x P`` intermediate), time and
  peak memory.
* Backbones (issue 17): forward + backward of the whole camera model with a tiny VoVNet-99 (V-99-eSE)
  vs a tiny ResNet-101 whose width gives about the same backbone parameter count, same images, same
  run; and the parameter counts of the full-width backbones next to the published figures.
* On a GPU only (``torch.cuda.is_available()``): samples/s of full-width ResNet-101 and VoVNet-99 camera
  pre-training steps (8 cameras x 704x256, bf16 autocast, AdamW), the same step function as the CPU
  comparison.

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
#: Tiny challenge backbones of about the same parameter count (VoVNet-99 has 1.64x ResNet-101's at
#: full width, so ResNet-101 gets sqrt(1.64) = 1.28x the width).
BACKBONE_PAIR = (("vovnet99", 16), ("resnet101", 20))
#: Full-width GPU measurement: 8 cameras of 704 x 256, 2 frames per step, bf16.
GPU_IMAGE_W, GPU_IMAGE_H, GPU_BATCH, GPU_STEPS = 704, 256, 2, 10


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


def backbone_parameters(name: str, width: int) -> int:
    """Trainable parameters of a registered backbone at ``width`` (built on the meta device)."""
    import torch

    from driveengine.models.backbones import get_backbone

    with torch.device("meta"):
        return sum(p.numel() for p in get_backbone(name).build(width, 3).parameters())


def _step_fn(
    backbone: str,
    width: int,
    device: str,
    image_w: int,
    image_h: int,
    batch: int,
    amp: bool,
    full: bool = False,
):
    """One camera pre-training step (forward, loss, backward, AdamW) of ``backbone`` at ``width``: on the
    test-size grid, or with ``full`` on OpenScene's 200 x 200 x 16 grid (1 m lift voxels, the GPU
    defaults' 64 neck / 128 decoder channels)."""
    import numpy as np
    import torch
    from driveengine.schemas import VoxelGrid
    from driveengine.schemas.classes import FREE

    from driveengine.models.camera import CameraOccupancyNet
    from driveengine.synth.world import make_cameras
    from driveengine.train.loss import OccupancyLoss

    torch.manual_seed(0)
    grid = VoxelGrid() if full else VoxelGrid(*GRID_ARGS)
    dev = torch.device(device)
    model = CameraOccupancyNet(
        grid, backbone=backbone, width=width, neck_channels=64 if full else MODEL_ARGS["neck_channels"],
        decoder_channels=128 if full else MODEL_ARGS["decoder_channels"], lift_voxel_size_m=1.0 if full else None,
    ).to(dev)  # fmt: skip
    cams = make_cameras(image_w, image_h)
    k = torch.from_numpy(np.stack([c.intrinsic for c in cams]))[None].expand(batch, -1, -1, -1).to(dev)
    e = (
        torch.from_numpy(np.stack([c.ego_from_camera() for c in cams]))[None]
        .expand(batch, -1, -1, -1)
        .to(dev)
    )
    images = torch.rand(batch, CAMERAS, 3, image_h, image_w, device=dev)
    sem = torch.randint(0, FREE + 1, (batch, *grid.shape), dtype=torch.uint8, device=dev)
    flow = torch.zeros(batch, *grid.shape, 2, device=dev)
    criterion = OccupancyLoss().to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images, k, e)
        loss = criterion(out["semantics"], out["flow"], sem, flow, out["visible"])["loss"]
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step


def _measure(kind: str, queue: mp.Queue) -> None:
    """In a fresh process: best time of ``REPEAT`` steps of ``kind`` and the process's peak RSS (MiB)."""
    import torch
    from driveengine.schemas import VoxelGrid
    from driveengine.schemas.classes import FREE

    from benchmarks.harness import best_time, peak_rss_mib
    from driveengine.models.camera import CameraOccupancyNet, invert_rigid, lift_features
    from driveengine.train.loss import OccupancyLoss

    torch.set_num_threads(1)
    grid = VoxelGrid(*GRID_ARGS)
    images, k, e = _inputs()
    before = peak_rss_mib()
    if kind.startswith("step:"):  # step:<backbone>:<width>
        _, name, width = kind.split(":")
        step = _step_fn(name, int(width), "cpu", IMAGE_W, IMAGE_H, BATCH, amp=False)
    elif kind in ("model", "backbone"):
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
                feats = model.backbone(model.normalise(images.flatten(0, 1)))
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
                from driveengine.models.camera import project_to_pixels

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
    backbones()
    print(f"(bench_camera took {time.perf_counter() - start:.0f} s)")


def backbones() -> None:
    """Issue 17: tiny VoVNet-99 vs tiny ResNet-101 of about the same size on CPU; full-width parameter
    counts next to the published ones; full-width samples/s on a GPU when there is one."""
    from benchmarks.harness import report, section

    (vov, vov_w), (res, res_w) = BACKBONE_PAIR
    vov_p, res_p = backbone_parameters(vov, vov_w), backbone_parameters(res, res_w)
    section(
        f"camera model step on CPU, {BATCH} frames x {CAMERAS} cameras {IMAGE_W}x{IMAGE_H}: {vov} width {vov_w} "
        f"({vov_p / 1e6:.2f}M backbone parameters) vs {res} width {res_w} ({res_p / 1e6:.2f}M), 1 thread"
    )
    vov_s, vov_mib = _run(f"step:{vov}:{vov_w}")
    res_s, res_mib = _run(f"step:{res}:{res_w}")
    report("parameters: tiny VoVNet-99 vs tiny ResNet-101", vov_p, res_p, "params", "~1 (same size)")
    report("forward+backward+AdamW: VoVNet-99 vs ResNet-101", vov_s * 1e3, res_s * 1e3, "ms")
    report("peak memory growth: VoVNet-99 vs ResNet-101", vov_mib, res_mib, "MiB")

    from driveengine.models.backbones import get_backbone

    section("full-width backbones: parameters (no classifier) vs published")
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "vovnet99"):
        params = backbone_parameters(name, 64)
        print(
            f"{name:<10} {params:>12,d} parameters ({params / 1e6:.2f}M); published: {get_backbone(name).published}"
        )

    import torch

    if not torch.cuda.is_available():
        print("(no CUDA device: full-width GPU samples/s not measured)")
        return
    from benchmarks.harness import best_time

    section(f"full-width camera pre-training step on {torch.cuda.get_device_name()}: {GPU_BATCH} frames x "
            f"{CAMERAS} cameras {GPU_IMAGE_W}x{GPU_IMAGE_H}, 200x200x16 grid, 1 m lift voxels, bf16")  # fmt: skip
    rates = {}
    for name in (res, vov):
        step = _step_fn(name, 64, "cuda", GPU_IMAGE_W, GPU_IMAGE_H, GPU_BATCH, amp=True, full=True)
        torch.cuda.reset_peak_memory_stats()
        seconds = best_time(step, repeat=GPU_STEPS, warmup=2)
        rates[name] = GPU_BATCH / seconds
        print(
            f"{name:<10} {rates[name]:8.2f} samples/s, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )
        del step
        torch.cuda.empty_cache()
    report("samples/s: VoVNet-99 vs ResNet-101 (full width, bf16)", rates[vov], rates[res], "samples/s",
           higher_is_better=True)  # fmt: skip


if __name__ == "__main__":
    main()
