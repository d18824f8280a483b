"""Loader throughput: FrameStream vs the OpenScene way of loading labels vs raw read + decompress.

On a synthetic split with the format's grid (200 x 200 x 16; sparse objects, mostly free space) the
benchmark measures, warm (files in the page cache), all in the same run:

* FrameStream frames/s (semantics + flow + mask_lidar, shuffled, batch 8) with 0, 1 and 2 DataLoader
  workers (steady state: one stream and persistent workers re-iterated; start-up is measured
  separately), against the **OpenScene way**: a legacy per-log pickle of frame dicts plus per-frame sparse
  ``*_occ_final.npy`` / ``*_flow_final.npy`` files densified with numpy (the same frames and order,
  semantics + flow only; goal >= 3x);
* FrameStream in-process against **raw read + decompress** of the very same compressed chunks
  (``os.pread`` of each chunk's bytes, zstd into a fresh array, arrays kept until their batch of 8
  frames is complete; the floor of any Zarr reader; goal >= 0.7x);
* time to the first batch (fresh FrameStream + DataLoader) and resume latency (``load_state_dict`` in
  the middle of the epoch, then the first batch) against the first batch of a fresh epoch (goal ~1x:
  resuming skips samples in the plan, it reads nothing to get there).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import best_time, report, section

LOGS = 2
FRAMES_PER_LOG = 32
BATCH = 8


def _labels(rng: np.random.Generator, shape: tuple[int, int, int]):
    """One frame of spatially coherent labels, like real ones: a ground layer, building blocks
    (background), 25 objects with velocities, free space elsewhere; the LiDAR mask observes every
    column up to a range that varies with azimuth (occlusion by buildings), as ray casting does.
    """
    nx, ny, nz = shape
    sem = np.full(shape, 16, np.uint8)
    sem[:, :, 2] = 10  # ground layer
    flow = np.zeros((*shape, 2), np.float16)
    for _ in range(30):  # buildings and walls
        x, y = rng.integers(0, nx - 20), rng.integers(0, ny - 20)
        sem[x : x + rng.integers(3, 20), y : y + rng.integers(3, 20), 3 : rng.integers(6, nz)] = 10
    for _ in range(25):  # objects
        x, y = rng.integers(0, nx - 10), rng.integers(0, ny - 5)
        cls = rng.choice([0, 5, 7, 8, 9])
        sem[x : x + 9, y : y + 4, 3:7] = cls
        if cls < 8:
            flow[x : x + 9, y : y + 4, 3:7] = rng.normal(size=2) * 5
    cx, cy = np.meshgrid(np.arange(nx) - nx / 2 + 0.5, np.arange(ny) - ny / 2 + 0.5, indexing="ij")
    azimuth = ((np.arctan2(cy, cx) + np.pi) / (2 * np.pi) * 360).astype(int) % 360
    reach = np.convolve(rng.uniform(30, 100, 360), np.ones(5) / 5, mode="same")  # voxels, per degree
    mask = np.broadcast_to((np.hypot(cx, cy) <= reach[azimuth])[..., None], shape).copy()
    mask[:, :, 12:] = False  # nothing observed high above
    return sem, flow, mask


def build(out: Path) -> dict:
    """Write the split (manifest, parquet, zarr) and the OpenScene-style files; returns paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from driveengine.schemas import GRID
    from driveengine.schemas.frame import frame_schema

    from driveengine.sources.nuplan.constants import CAMERA_CHANNELS

    FRAME_SCHEMA = frame_schema(CAMERA_CHANNELS)

    from driveengine.store.manifest import Manifest, save_manifest
    from driveengine.store.occ import create_occ

    rng = np.random.default_rng(0)
    split_dir = out / "mini"
    legacy = out / "openscene"
    manifest = Manifest(split="mini")
    pickles = []
    for li in range(LOGS):
        name = f"log{li}"
        tokens = [f"{li:04x}{r:012x}" for r in range(FRAMES_PER_LOG)]
        table = pa.table(
            {"token": tokens, "scene_token": ["s"] * FRAMES_PER_LOG},
            schema=pa.schema([FRAME_SCHEMA.field("token"), FRAME_SCHEMA.field("scene_token")]),
        )
        (split_dir / "meta").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, split_dir / "meta" / f"{name}.parquet")
        infos = []
        with create_occ(split_dir / "occ" / f"{name}.zarr", FRAMES_PER_LOG, generator={"kind": "bench"}) as w:
            for r in range(FRAMES_PER_LOG):
                sem, flow, mask = _labels(rng, GRID.shape)
                w.append(semantics=sem, flow=flow, mask_lidar=mask)
                # OpenScene v1.0: sparse (flat index, class) rows of occupied voxels, row-aligned flow.
                xyz = np.argwhere(sem != 16)
                flat = GRID.flat_index(xyz)
                occ_rows = np.stack([flat, sem[tuple(xyz.T)]], axis=1).astype(np.int64)
                scene_dir = legacy / f"log-{li:04d}-scene-0000" / "occ_gt"
                scene_dir.mkdir(parents=True, exist_ok=True)
                occ_path = scene_dir / f"{r:04d}_occ_final.npy"
                flow_path = scene_dir / f"{r:04d}_flow_final.npy"
                np.save(occ_path, occ_rows)
                np.save(flow_path, flow[tuple(xyz.T)].astype(np.float32))
                infos.append(
                    {
                        "token": tokens[r],
                        "occ_gt_final_path": str(occ_path),
                        "flow_gt_final_path": str(flow_path),
                    }
                )
        pkl = legacy / f"{name}.pkl"
        pkl.write_bytes(pickle.dumps(infos))
        pickles.append(pkl)
        manifest.logs[name] = {
            "frames": FRAMES_PER_LOG,
            "meta": f"meta/{name}.parquet",
            "occ": f"occ/{name}.zarr",
        }
    save_manifest(split_dir, manifest)
    return {"root": out, "pickles": pickles}


def openscene_load(pickles: list[Path], order: list[tuple[int, int]]) -> int:
    """Load (log, row) frames the OpenScene way: pickles, then per-frame sparse .npy densified."""
    from driveengine.schemas import GRID

    nx, ny, nz = GRID.shape
    infos = [pickle.loads(p.read_bytes()) for p in pickles]
    n = 0
    for li, row in order:
        info = infos[li][row]
        occ = np.load(info["occ_gt_final_path"])
        flow = np.load(info["flow_gt_final_path"])
        dense = np.full(nx * ny * nz, 16, np.uint8)
        dense[occ[:, 0]] = occ[:, 1]
        dense_flow = np.zeros((nx * ny * nz, 2), np.float32)
        dense_flow[occ[:, 0]] = flow
        # OpenScene's flat index is x + nx*y + nx*ny*z: (z, y, x) in C order -> [x, y, z].
        _sem = dense.reshape(nz, ny, nx).transpose(2, 1, 0)
        _flow = dense_flow.reshape(nz, ny, nx, 2).transpose(2, 1, 0, 3)
        n += 1
    return n


def raw_chunk_table(root: Path, order: list[tuple[int, int]]) -> list[tuple[str, int, int, tuple, np.dtype]]:
    """(shard file, offset, nbytes, frame shape, dtype) of every chunk the loader reads, in order."""
    from driveengine.store.occ import open_occ
    from driveengine.store.shards import FrameArrayReader

    table = []
    readers = {}
    for li, row in order:
        for field in ("semantics", "flow", "mask_lidar"):
            key = (li, field)
            if key not in readers:
                path = root / "mini" / "occ" / f"log{li}.zarr"
                readers[key] = FrameArrayReader.for_array(
                    open_occ(path).group[field], str(path / field), None
                )
            r = readers[key]
            shard = row // r.shard_frames
            index = r._shard_index(shard)
            offset, nbytes = index[row % r.shard_frames]
            table.append((r._shard_path(shard), int(offset), int(nbytes), r.frame_shape, r.dtype))
    return table


def raw_read_decompress(table) -> int:
    """Read and decompress every chunk of ``table``; a batch's arrays stay alive until the batch is
    complete (3 arrays per frame, ``BATCH`` frames), as they must for a consumer of batches."""
    from numcodecs import zstd

    fds: dict[str, int] = {}
    batch: list[np.ndarray] = []
    try:
        for path, offset, nbytes, shape, dtype in table:
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, nbytes, offset)
            out = np.empty(shape, dtype)
            zstd.decompress(data, out.reshape(-1).view(np.uint8))
            batch.append(out)
            if len(batch) == 3 * BATCH:
                batch = []
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(table)


def main() -> None:
    from driveengine.data import FrameStream
    from driveengine.data.plan import split_frame_ids

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = build(Path(tmp))
        frames = LOGS * FRAMES_PER_LOG
        section(
            f"loader: {frames} frames of 200x200x16 (built in {time.perf_counter() - start:.1f} s), batch {BATCH}"
        )

        def stream(**kw) -> FrameStream:
            return FrameStream(
                paths["root"], "mini", seed=0, global_batch_size=BATCH, rank=0, world_size=1, **kw
            )

        plan = stream()._plan()
        logs, rows = split_frame_ids(plan.frames, stream().offsets)
        order = list(zip(logs.tolist(), rows.tolist(), strict=True))

        def epoch(num_workers: int, persistent: bool = False):
            if persistent:  # steady state: one stream (its open logs) and workers, re-iterated
                loader = stream().loader(num_workers=num_workers, persistent_workers=num_workers > 0)
                return lambda: sum(len(b["token"]) for b in loader)
            return lambda: sum(len(b["token"]) for b in stream().loader(num_workers=num_workers))

        t_openscene = best_time(lambda: openscene_load(paths["pickles"], order), repeat=3)
        for workers in (0, 1, 2):
            t = best_time(epoch(workers, persistent=True), repeat=3)
            report(
                f"frames/s, {workers} workers vs OpenScene pickle+npy",
                frames / t, frames / t_openscene, "frame/s", ">= 3x", higher_is_better=True,
            )  # fmt: skip

        table = raw_chunk_table(paths["root"], order)
        t_raw = best_time(lambda: raw_read_decompress(table), repeat=7)
        ours = stream()
        t_ours = best_time(lambda: sum(1 for _ in ours), repeat=7)
        report("frames/s in-process vs raw pread + zstd of the chunks", frames / t_ours, frames / t_raw,
               "frame/s", ">= 0.7x", higher_is_better=True)  # fmt: skip
        via_zarr = stream(fast_reads=False)
        t_zarr = best_time(lambda: sum(1 for _ in via_zarr), repeat=3)
        report("frames/s in-process, zarr-python reads vs raw", frames / t_zarr, frames / t_raw,
               "frame/s", "(for reference)", higher_is_better=True)  # fmt: skip

        def first_batch(resume: bool, workers: int) -> None:
            s = stream()
            if resume:
                s.load_state_dict({"epoch": 0, "num_samples": frames // 2})
            next(iter(s.loader(num_workers=workers)))

        for workers in (0, 2):
            t_first = best_time(lambda w=workers: first_batch(False, w), repeat=3)
            t_resume = best_time(lambda w=workers: first_batch(True, w), repeat=3)
            t_epoch = best_time(epoch(workers), repeat=1)
            report(f"time to first batch, {workers} workers vs a whole epoch", t_first, t_epoch, "s",
                   f"small (1 of {frames // BATCH} batches)")  # fmt: skip
            report(f"resume mid-epoch to first batch, {workers} workers vs fresh start", t_resume, t_first,
                   "s", "~1x")  # fmt: skip


if __name__ == "__main__":
    main()
