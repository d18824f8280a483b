"""Builds tiny collected splits on disk for the loader and training tests.

A split is written through the real store modules (manifest via ``save_manifest``, labels via
``store.occ.create_occ``, frame rows as Parquet with the column types of ``schemas/frame.py``), on a
small voxel grid so that tests stay fast. Labels are random but known: the builder returns them, so
tests can compare what the loader yields with what was written.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import FREE
from driveengine.schemas.frame import frame_schema

from driveengine.geometry import make_transform, yaw_to_quaternion
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.store.manifest import DatasetInfo, LogEntry, Manifest, SourceRef, save_manifest
from driveengine.store.occ import OccStorage, create_occ

FRAME_SCHEMA = frame_schema(CAMERA_CHANNELS)  # nuPlan's frame rows

#: A 16 x 16 x 8 grid of 0.5 m voxels (the format's grid is 200 x 200 x 16).
SMALL_GRID = VoxelGrid((-4.0, -4.0, -2.0), (4.0, 4.0, 2.0), 0.5)


@dataclass
class FrameTruth:
    """What was written for one key frame."""

    log: str
    row: int
    scene: str
    semantics: np.ndarray
    flow: np.ndarray
    mask_lidar: np.ndarray
    ego2global: np.ndarray
    points: np.ndarray | None = None
    map_location: str = ""
    scenario_tags: tuple[str, ...] = ()
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # optional label arrays, by name


@dataclass
class SplitInfo:
    root: Path
    split: str
    sensor_root: Path
    frames: dict[str, FrameTruth] = field(default_factory=dict)  # by token
    log_names: list[str] = field(default_factory=list)


def _token(log_index: int, row: int) -> str:
    return f"{log_index:04x}{row:012x}"


#: Map location of log ``i`` is ``MAP_LOCATIONS[i % 3]``.
MAP_LOCATIONS = ("las_vegas", "boston", "pittsburgh")


def scenario_tags_of(row: int) -> tuple[str, ...]:
    """The (made-up) scenario tags of frame ``row`` of a fixture log: sorted, unique, often none."""
    tags = []
    if row % 3 == 0:
        tags.append("stationary")
    if row % 4 == 1:
        tags += ["high_speed", "turning"]
    return tuple(sorted(tags))


def make_labels(rng: np.random.Generator, grid: VoxelGrid, n: int, structured: bool = False):
    """Random (or learnable, ``structured``) semantics, flow and mask for ``n`` frames."""
    shape = grid.shape
    if structured:
        # A learnable world: ground (background) in the lowest layer, a vehicle block at a random place.
        sem = np.full((n, *shape), FREE, np.uint8)
        sem[..., 0] = 10
        flow = np.zeros((n, *shape, 2), np.float16)
        for i in range(n):  # a few frames
            x, y = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
            sem[i, x : x + 4, y : y + 3, 1:3] = 0
            flow[i, x : x + 4, y : y + 3, 1:3] = (2.0, -1.0)
        mask = np.ones((n, *shape), bool)
        return sem, flow, mask
    sem = rng.choice(
        np.array([0, 5, 7, 10, FREE], np.uint8), size=(n, *shape), p=[0.05, 0.02, 0.03, 0.2, 0.7]
    )
    flow = np.where((sem < 10)[..., None], rng.normal(size=(n, *shape, 2)), 0).astype(np.float16)
    mask = rng.random((n, *shape)) < 0.6
    return sem, flow, mask


def build_split(
    out: Path,
    split: str = "mini",
    scenes_per_log: tuple[tuple[int, ...], ...] = ((5, 4), (7,), (3, 6)),
    grid: VoxelGrid = SMALL_GRID,
    seed: int = 0,
    points: bool = False,
    images: bool = False,
    structured: bool = False,
    shard_frames: int = 4,
    extra_arrays: tuple[str, ...] = (),
) -> SplitInfo:
    """Write ``out/<split>`` with one log per entry of ``scenes_per_log`` (frames per scene).

    Args:
        out: the collect output folder.
        points: also write a ``.pcd`` per frame under ``out/sensor_blobs``.
        images: also write eight small ``.jpg`` per frame.
        structured: learnable labels (see :func:`make_labels`) instead of noise.
        extra_arrays: optional registered label arrays to write too (value: the complement of
            ``mask_lidar``, broadcast over the array's components, in its dtype).
    """
    from driveengine.schemas.occ import REQUIRED_ARRAYS, occ_array_specs

    from driveengine.sources.pcd import write_nuplan_pcd

    rng = np.random.default_rng(seed)
    split_dir = out / split
    sensor_root = out / "sensor_blobs"
    info = SplitInfo(root=out, split=split, sensor_root=sensor_root)
    manifest = Manifest(split=split, dataset=DatasetInfo(name="nuplan", cameras=CAMERA_CHANNELS, grid=grid))
    for li, scenes in enumerate(scenes_per_log):
        name = f"2021.0{li + 1}.01.00.00.00_veh-{li:02d}_00000_00100"
        info.log_names.append(name)
        n = int(sum(scenes))
        sem, flow, mask = make_labels(rng, grid, n, structured)
        tokens = [_token(li, r) for r in range(n)]
        scene_of_row = np.repeat(np.arange(len(scenes)), scenes)
        frame_idx = np.concatenate([np.arange(s) for s in scenes]).astype(np.int32)
        scene_tokens = [f"{li:04x}{s:012x}" for s in scene_of_row]
        yaw = 0.1 * np.arange(n)
        trans = np.stack([100.0 + 2.0 * np.arange(n), 50.0 + np.arange(n), np.zeros(n)], axis=1)
        ego2global = make_transform(yaw_to_quaternion(yaw), trans)
        timestamps = 1_600_000_000_000_000 + 500_000 * np.arange(n, dtype=np.int64)
        prev = [tokens[r - 1] if r > 0 and scene_of_row[r - 1] == scene_of_row[r] else None for r in range(n)]
        nxt = [
            tokens[r + 1] if r + 1 < n and scene_of_row[r + 1] == scene_of_row[r] else None for r in range(n)
        ]
        lidar_paths = [f"{name}/MergedPointCloud/{t}.pcd" for t in tokens]
        columns = {
            "token": tokens,
            "frame_idx": frame_idx,
            "timestamp": timestamps,
            "log_name": [name] * n,
            "map_location": [MAP_LOCATIONS[li % 3]] * n,
            "scene_token": scene_tokens,
            "scene_name": [f"{name}-scene-{s}" for s in scene_of_row],
            "sample_prev": prev,
            "sample_next": nxt,
            "ego2global": [m.tolist() for m in ego2global],
            "lidar_path": lidar_paths,
            "lidar2ego": [np.eye(4).tolist()] * n,
            "scenario_tags": [list(scenario_tags_of(r)) for r in range(n)],
        }
        if images:
            cams = []
            for t in tokens:
                cams.append(
                    {
                        ch: {
                            "data_path": f"{name}/{ch}/{t}.jpg",
                            "timestamp": None,
                            "sensor2lidar_rotation": np.eye(3).tolist(),
                            "sensor2lidar_translation": [1.0 + c, 0.0, 1.5],
                            "cam_intrinsic": [[100.0, 0, 32.0], [0, 100.0, 18.0], [0, 0, 1]],
                            "distortion": [0.0] * 5,
                        }
                        for c, ch in enumerate(CAMERA_CHANNELS)
                    }
                )
            columns["cams"] = cams
        schema = pa.schema([FRAME_SCHEMA.field(c) for c in columns], metadata=FRAME_SCHEMA.metadata)
        table = pa.table(columns, schema=schema)
        (split_dir / "meta").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, split_dir / "meta" / f"{name}.parquet")
        specs = occ_array_specs(grid, names=extra_arrays)
        extra = {
            a: np.broadcast_to(
                (~mask).reshape(*mask.shape, *[1] * (len(specs[a].frame_shape) - 3)),
                (n, *specs[a].frame_shape),
            ).astype(specs[a].dtype)
            for a in extra_arrays
        }
        with create_occ(
            split_dir / "occ" / f"{name}.zarr",
            n,
            generator={"kind": "test-fixture"},
            grid=grid,
            arrays=(*REQUIRED_ARRAYS, *extra_arrays),
            storage=OccStorage(shard_frames=shard_frames),
            timestamps_us=timestamps,
        ) as writer:
            for r in range(n):
                writer.append(
                    semantics=sem[r], flow=flow[r], mask_lidar=mask[r], **{a: v[r] for a, v in extra.items()}
                )
        for r, tok in enumerate(tokens):
            pts = None
            if points:
                if structured:  # points on the surfaces the labels describe: a learnable input
                    occupied = np.argwhere(sem[r] != FREE)
                    centres = grid.voxel_centres()[tuple(occupied.T)]
                    pts = (centres + rng.uniform(-0.2, 0.2, centres.shape)).astype(np.float32)
                    intensity = np.where(sem[r][tuple(occupied.T)] == 0, 80.0, 10.0).astype(np.float32)
                else:
                    pts = rng.uniform(-3.5, 3.5, size=(50 + r, 3)).astype(np.float32)
                    intensity = rng.uniform(0, 100, size=len(pts)).astype(np.float32)
                path = sensor_root / lidar_paths[r]
                path.parent.mkdir(parents=True, exist_ok=True)
                write_nuplan_pcd(path, pts, intensity)
                pts = np.concatenate([pts, intensity[:, None]], axis=1)
            if images:
                from PIL import Image

                for c, ch in enumerate(CAMERA_CHANNELS):
                    path = sensor_root / name / ch / f"{tok}.jpg"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    img = np.full((36, 64, 3), 20 * c, np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=95)
                    path.write_bytes(buf.getvalue())
            info.frames[tok] = FrameTruth(
                name, r, scene_tokens[r], sem[r], flow[r], mask[r], ego2global[r], pts,
                MAP_LOCATIONS[li % 3], scenario_tags_of(r), {a: v[r] for a, v in extra.items()},
            )  # fmt: skip
        manifest.logs[name] = LogEntry(
            frames=n,
            meta=f"meta/{name}.parquet",
            occ=f"occ/{name}.zarr",
            checksums={},
            source=SourceRef(name="nuplan", path="", blob_root=str(sensor_root)),
        )
    save_manifest(split_dir, manifest)
    return info


#: Fixture label ids (OpenScene's: vehicle, bicycle, pedestrian, background, free) -> Occ3D-nuScenes' ids
#: of the same classes (car, bicycle, pedestrian, others, free): what :func:`build_split_as` writes for
#: ``classes=OCC3D_NUSCENES_CLASSES``.
OPENSCENE_TO_OCC3D_IDS: dict[int, int] = {0: 4, 5: 2, 7: 7, 10: 0, FREE: 17}


def build_split_as(
    out: Path,
    *,
    dataset: str = "nuplan",
    classes=None,
    id_map: dict[int, int] | None = None,
    cameras: tuple[str, ...] | None = None,
    **kwargs,
) -> SplitInfo:
    """:func:`build_split` of another dataset name, class table or camera rig.

    Args:
        dataset: the manifest's dataset name (what samples say in ``dataset``).
        classes: the class table recorded in the manifest and the label groups (default OpenScene's).
        id_map: fixture label id -> id written (e.g. :data:`OPENSCENE_TO_OCC3D_IDS`); the returned truth
            holds the written ids.
        cameras: the camera channels (frame rows, manifest and images); default nuPlan's eight.
        kwargs: :func:`build_split`'s other arguments.
    """
    import functools

    module = globals()
    saved = {
        k: module[k] for k in ("create_occ", "DatasetInfo", "make_labels", "CAMERA_CHANNELS", "FRAME_SCHEMA")
    }
    info_fields = {"name": dataset, **({} if classes is None else {"classes": classes})}
    try:
        module["DatasetInfo"] = lambda **kw: saved["DatasetInfo"](**{**kw, **info_fields})
        if classes is not None:
            module["create_occ"] = functools.partial(saved["create_occ"], classes=classes)
        if id_map is not None:
            lut = np.arange(256, dtype=np.uint8)
            for a, b in id_map.items():
                lut[a] = b

            def mapped_labels(*args, **kw):
                sem, flow, mask = saved["make_labels"](*args, **kw)
                return lut[sem], flow, mask

            module["make_labels"] = mapped_labels
        if cameras is not None:
            module["CAMERA_CHANNELS"] = tuple(cameras)
            module["FRAME_SCHEMA"] = frame_schema(tuple(cameras))
        return build_split(out, **kwargs)
    finally:
        module.update(saved)
