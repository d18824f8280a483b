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
  resuming skips samples in the plan, it reads nothing to get there);
* **filters**: building a FrameStream and its epoch plan over 100k frame rows with a filter (map
  location, scenario tags and a pyarrow expression: the filter's columns of every log are read through
  the dataset handle and evaluated) against the same without a filter (the manifest's counts only), for
  few long logs and many short ones (goal: filtered <= 0.2 s): cold (the columns read from every log's
  shard) and warm (for 64+ logs, read from the stream's cache folder, where the first build kept them).
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.harness import best_time, report, section

LOGS = 2
FRAMES_PER_LOG = 32
BATCH = 8
#: Frame rows of the filter benchmark, and its layouts (logs x frames per log).
FILTER_ROWS = 100_000
FILTER_LAYOUTS = ((100, 1000), (1000, 100))


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

    from driveengine.store.manifest import LogEntry, Manifest, SourceRef, save_manifest
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
            schema=pa.schema(
                [FRAME_SCHEMA.field("token"), FRAME_SCHEMA.field("scene_token")],
                metadata=FRAME_SCHEMA.metadata,
            ),
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
        manifest.logs[name] = LogEntry(
            frames=FRAMES_PER_LOG,
            meta=f"meta/{name}.parquet",
            occ=f"occ/{name}.zarr",
            checksums={},
            source=SourceRef(name="nuplan", path=""),
        )
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


def build_metadata_split(out: Path, logs: int, frames: int) -> None:
    """A split of ``logs`` x ``frames`` frame rows without labels (the columns a filter reads, and tokens)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from driveengine.schemas.frame import frame_schema

    from driveengine.store.manifest import LogEntry, Manifest, SourceRef, save_manifest

    schema = frame_schema(("CAM_F0",))
    names = ["token", "frame_idx", "timestamp", "scene_token", "map_location", "scenario_tags"]
    schema = pa.schema([schema.field(n) for n in names], metadata=schema.metadata)
    rng = np.random.default_rng(1)
    tags = np.array(["stationary", "high_speed", "turning", "waiting_for_pedestrian", "on_pickup_dropoff"])
    locations = ["las_vegas", "boston", "pittsburgh", "singapore"]
    split_dir = out / "mini"
    (split_dir / "meta").mkdir(parents=True)
    manifest = Manifest(split="mini")
    for li in range(logs):
        name = f"log{li:05d}"
        row = np.arange(frames)
        picks = rng.random((frames, len(tags))) < 0.15
        table = pa.table(
            {
                "token": [f"{li:06x}{r:010x}" for r in range(frames)],
                "frame_idx": (row % 40).astype(np.int32),
                "timestamp": 1_600_000_000_000_000 + 500_000 * row,
                "scene_token": [f"{li:06x}{r // 40:010x}" for r in range(frames)],
                "map_location": [locations[li % len(locations)]] * frames,
                "scenario_tags": [tags[p].tolist() for p in picks],
            },
            schema=schema,
        )
        pq.write_table(table, split_dir / "meta" / f"{name}.parquet")
        manifest.logs[name] = LogEntry(
            frames=frames, meta=f"meta/{name}.parquet", occ=None, checksums={}, source=SourceRef("nuplan", "")
        )
    save_manifest(split_dir, manifest)


def bench_filters() -> None:
    """Filtered vs unfiltered stream + plan build time on FILTER_ROWS frame rows."""
    import pyarrow.compute as pc

    from driveengine.data import FrameStream

    where = (pc.field("frame_idx") >= 4) & (pc.field("timestamp") > 1_600_000_000_000_000)
    filters = dict(
        where=where, map_locations=["las_vegas", "boston"], scenario_tags=["turning", "high_speed"]
    )
    for logs, frames in FILTER_LAYOUTS:
        assert logs * frames == FILTER_ROWS
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            build_metadata_split(Path(tmp), logs, frames)
            section(
                f"filters: {logs * frames} frame rows in {logs} logs of {frames} "
                f"(built in {time.perf_counter() - start:.1f} s)"
            )

            cache = Path(tmp, "cache")
            fresh = iter(range(10**6))

            def plan(cache_dir: Path = cache, **kw) -> int:
                stream = FrameStream(tmp, "mini", fields=("token",), seed=0, global_batch_size=BATCH,
                                     cache_dir=cache_dir, **kw)  # fmt: skip
                return len(stream._plan().frames)

            # cold: every build reads the filter's columns of every log (a fresh cache folder each time,
            # as the first stream over these logs on a machine); warm: the next streams (other ranks,
            # later runs) over the same logs, whose columns the first one kept in the cache folder
            times = _interleaved(
                {
                    "unfiltered": plan,
                    "cold": lambda fresh=fresh: plan(Path(tmp, f"cold{next(fresh)}"), **filters),
                    "warm": lambda: plan(**filters),
                },
                repeat=7,
            )
            t_all = float(np.median(times["unfiltered"]))
            size = FrameStream(tmp, "mini", fields=("token",), cache_dir=cache, **filters).num_frames
            for what in ("cold", "warm"):
                t = float(np.median(times[what]))
                spread = f"median of 7, range {min(times[what]):.3f}-{max(times[what]):.3f} s"
                report(f"stream + plan build, filtered ({size} rows kept; {what}) vs unfiltered", t, t_all, "s",
                       f"filtered <= 0.2 s ({t:.3f} s; {spread})")  # fmt: skip


def main() -> None:
    bench_frames()
    bench_remote()
    bench_filters()


def _interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Wall times (s) of each function, ``repeat`` rounds after one warm-up each, the functions taking turns
    in every round (a machine shared with other jobs slows them alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _ratio_spread(ours: list[float], baseline: list[float], rate: bool = True) -> tuple[float, str]:
    """The median of the per-round ratios (rates: baseline time / our time) and its spread, as text."""
    ratios = np.array([b / o if rate else o / b for o, b in zip(ours, baseline, strict=True)])
    text = f"median of {len(ratios)} rounds {np.median(ratios):.2f}x, range {ratios.min():.2f}-{ratios.max():.2f}x"
    return float(np.median(ratios)), text


def bench_frames() -> None:
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

        def epoch(num_workers: int, persistent: bool = False, **loader_kw):
            if persistent:  # steady state: one stream (its open logs) and workers, re-iterated
                loader = stream().loader(
                    num_workers=num_workers, persistent_workers=num_workers > 0, **loader_kw
                )
                return lambda: sum(len(b["token"]) for b in loader)
            return lambda: sum(len(b["token"]) for b in stream().loader(num_workers=num_workers, **loader_kw))

        # The DataLoader path against in-process loading (the same stream, loader and consumer), steady state.
        variants = {
            "in-process": epoch(0, persistent=True),
            "1 worker": epoch(1, persistent=True),
            "2 workers": epoch(2, persistent=True),
            "1 worker, plain": epoch(1, persistent=True, zero_copy=False),
            "2 workers, plain": epoch(2, persistent=True, zero_copy=False),
        }
        times = _interleaved(variants, repeat=7)
        base = times["in-process"]
        goals = {"1 worker": ">= 0.8x", "2 workers": ">= 1.0x"}
        for name in ("1 worker", "2 workers", "1 worker, plain", "2 workers, plain"):
            _, spread = _ratio_spread(times[name], base)
            goal = goals.get(name, "(the DataLoader path without the ring, for reference)")
            report(f"frames/s, DataLoader {name} vs in-process", frames / float(np.median(times[name])),
                   frames / float(np.median(base)), "frame/s", f"{goal}; {spread}", higher_is_better=True)  # fmt: skip

        t_openscene = best_time(lambda: openscene_load(paths["pickles"], order), repeat=3)
        for name in ("in-process", "1 worker", "2 workers"):
            report(
                f"frames/s, {name} vs OpenScene pickle+npy",
                frames / min(times[name]), frames / t_openscene, "frame/s", ">= 3x", higher_is_better=True,
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

        def first_batch(resume: bool, workers: int, zero_copy: bool = True) -> None:
            s = stream()
            if resume:
                s.load_state_dict({"epoch": 0, "num_samples": frames // 2})
            next(iter(s.loader(num_workers=workers, zero_copy=zero_copy)))

        for workers in (0, 2):
            firsts = {
                "fresh": lambda w=workers: first_batch(False, w),
                "resume": lambda w=workers: first_batch(True, w),
                "plain": lambda w=workers: first_batch(False, w, zero_copy=False),
            }
            t = _interleaved(firsts, repeat=5)
            t_epoch = best_time(epoch(workers), repeat=1)
            report(f"time to first batch, {workers} workers vs a whole epoch", float(np.median(t["fresh"])),
                   t_epoch, "s", f"small (1 of {frames // BATCH} batches)")  # fmt: skip
            _, spread = _ratio_spread(t["resume"], t["fresh"], rate=False)
            report(f"resume mid-epoch to first batch, {workers} workers vs fresh start",
                   float(np.median(t["resume"])), float(np.median(t["fresh"])), "s", f"~1x; {spread}")  # fmt: skip
            if workers:
                _, spread = _ratio_spread(t["fresh"], t["plain"], rate=False)
                report(f"time to first batch, {workers} workers, zero-copy vs plain DataLoader",
                       float(np.median(t["fresh"])), float(np.median(t["plain"])), "s", f"~1x; {spread}")  # fmt: skip


def bench_remote() -> None:
    """The split on a moto S3 server on 127.0.0.1, read through the local cache: the second epoch (every
    file cached) against the same split on local disk."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        section("remote: skipped (moto[server] and s3fs are not installed: make install)")
        return
    from driveengine.data import FrameStream

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        frames = LOGS * FRAMES_PER_LOG
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        region = os.environ.get("AWS_DEFAULT_REGION")
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
        try:
            host, port = server.get_host_and_port()
            options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
            fs = s3fs.S3FileSystem(**options)
            fs.mkdir("bucket")
            nbytes = 0
            for path in sorted(Path(tmp, "mini").rglob("*")):
                if path.is_file():
                    data = path.read_bytes()
                    nbytes += len(data)
                    fs.pipe_file(f"bucket/data/mini/{path.relative_to(Path(tmp, 'mini')).as_posix()}", data)
            section(
                f"remote: the same split ({nbytes / 2**20:.1f} MiB) on moto S3 at 127.0.0.1, read through the cache"
            )
            kw = dict(seed=0, global_batch_size=BATCH, rank=0, world_size=1)
            cache_dir = Path(tmp, "cache")
            remote = FrameStream(
                "s3://bucket/data", "mini", storage_options=options, cache_dir=cache_dir, **kw
            )
            local = FrameStream(paths["root"], "mini", **kw)
            start = time.perf_counter()
            cold = sum(len(b["token"]) for b in remote.loader(num_workers=0))
            t_cold = time.perf_counter() - start

            def run(stream: FrameStream, workers: int) -> Callable[[], int]:
                return lambda: sum(len(b["token"]) for b in stream.loader(num_workers=workers))

            variants = {"local": run(local, 0), "remote": run(remote, 0),
                        "local, 2 workers": run(local, 2), "remote, 2 workers": run(remote, 2)}  # fmt: skip
            times = _interleaved(variants, repeat=5)
            for workers in ("", ", 2 workers"):
                _, spread = _ratio_spread(times[f"remote{workers}"], times[f"local{workers}"])
                report(f"frames/s, s3 through the cache (epoch 2+){workers} vs local disk",
                       frames / float(np.median(times[f"remote{workers}"])),
                       frames / float(np.median(times[f"local{workers}"])), "frame/s", f">= 0.8x; {spread}",
                       higher_is_better=True)  # fmt: skip
            report("frames/s, s3 first epoch (cold cache, loopback moto) vs local disk", cold / t_cold,
                   frames / float(np.median(times["local"])), "frame/s", "(for reference)", higher_is_better=True)  # fmt: skip
        finally:
            server.stop()
            if region is None:
                os.environ.pop("AWS_DEFAULT_REGION", None)
            else:
                os.environ["AWS_DEFAULT_REGION"] = region


if __name__ == "__main__":
    main()
