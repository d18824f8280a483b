"""OpenScene-compatible export: per-log ``meta_datas/<split>/<log>.pkl`` files from a collected split.

Each file is a ``list[dict]``, one dict per frame row, with OpenScene v1.1's key set and value types
(numpy arrays where OpenScene has them; reference §3). Values follow OpenScene's meanings, so code
written for OpenScene reads them unchanged:

* ``anns.gt_velocity_3d`` is written in the **lidar** frame as OpenScene does (DriveEngine's rows hold
  it in the ego frame: ``v_lidar = v_ego @ R_ego_from_lidar``);
* ``cams`` is a dict in the dataset's camera order (the frame rows' ``cams`` members);
* ``anns`` is absent for test data (null ``anns`` in the rows);
* the corrected values (wrapped yaw, scene-local prev/next, gap-free frame_idx, deterministic scene
  names) are kept; DriveEngine-only columns (``scenario_tags``, ``source``, ``split``, image
  timestamps) are not written.

``extra_keys`` adds keys per frame token, e.g. the labels export's ``occ_gt_final_path`` and
``flow_gt_final_path``.

The files are written by :func:`driveengine.formats.pickles.write_pickle` (protocol 4, numpy globals under
the names numpy 1.21-2.x all load), so NAVSIM (numpy 1.23.4) and OpenScene (numpy 1.22.4) read them
with plain ``pickle.load``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.formats.openscene_labels import (
    FLOW_PATH_KEY,
    OCC_PATH_KEY,
    OpenSceneLabelError,
    label_file_names,
    write_label_file,
)
from driveengine.formats.pickles import write_pickle
from driveengine.store.dataset import open_split


class ExportError(DriveEngineError):
    """An export cannot be written."""


def rows_to_openscene(
    rows: list[dict[str, Any]], extra_keys: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict]:
    """Frame rows (``Table.to_pylist()``) as OpenScene v1.1 frame dicts (see the module doc)."""
    out = []
    for r in rows:
        l2e = np.array(r["lidar2ego"], dtype=np.float64)
        can_bus = np.array(r["can_bus"], dtype=np.float64)
        info: dict[str, Any] = {
            "token": r["token"],
            "frame_idx": int(r["frame_idx"]),
            "timestamp": int(r["timestamp"]),
            "log_name": r["log_name"],
            "log_token": r["log_token"],
            "scene_name": r["scene_name"],
            "scene_token": r["scene_token"],
            "map_location": r["map_location"],
            "roadblock_ids": list(r["roadblock_ids"]),
            "vehicle_name": r["vehicle_name"],
            "can_bus": can_bus,
            "lidar_path": r["lidar_path"],
            "lidar2ego_translation": np.array(r["lidar2ego_translation"], dtype=np.float64),
            "lidar2ego_rotation": [float(x) for x in r["lidar2ego_rotation"]],
            "ego2global_translation": can_bus[:3],
            "ego2global_rotation": can_bus[3:7],
            "ego_dynamic_state": [float(x) for x in r["ego_dynamic_state"]],
            "traffic_lights": [(int(t["lane_connector_id"]), bool(t["is_red"])) for t in r["traffic_lights"]],
            "driving_command": np.array(r["driving_command"], dtype=np.int64),
            "cams": {
                ch: {
                    "data_path": cam["data_path"],
                    "sensor2lidar_rotation": np.array(cam["sensor2lidar_rotation"], dtype=np.float64),
                    "sensor2lidar_translation": np.array(cam["sensor2lidar_translation"], dtype=np.float64),
                    "cam_intrinsic": np.array(cam["cam_intrinsic"], dtype=np.float64),
                    "distortion": np.array(cam["distortion"], dtype=np.float64),
                }
                for ch, cam in r["cams"].items()
            },
            "sample_prev": r["sample_prev"],
            "sample_next": r["sample_next"],
            "ego2global": np.array(r["ego2global"], dtype=np.float64),
            "lidar2ego": l2e,
            "lidar2global": np.array(r["lidar2global"], dtype=np.float64),
        }
        anns = r["anns"]
        if anns is not None:
            velocity_ego = np.array(anns["gt_velocity_3d"], dtype=np.float64).reshape(-1, 3)
            info["anns"] = {
                "gt_boxes": np.array(anns["gt_boxes"], dtype=np.float64).reshape(-1, 7),
                "gt_names": np.array(anns["gt_names"], dtype=str),
                "gt_velocity_3d": velocity_ego @ l2e[:3, :3],  # rows: R_ego_from_lidar^T v = lidar frame
                "instance_tokens": list(anns["instance_tokens"]),
                "track_tokens": list(anns["track_tokens"]),
            }
        if extra_keys is not None and r["token"] in extra_keys:
            info.update(extra_keys[r["token"]])
        out.append(info)
    return out


def export_openscene_metadata(
    split_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    extra_keys: Mapping[str, Mapping[str, Any]] | None = None,
    logs: list[str] | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<log>.pkl`` (OpenScene v1.1 metadata) for every committed log of ``split_dir``.

    Args:
        split_dir: a collected split folder ``<out>/<split>``.
        out_dir: destination folder (e.g. ``openscene-v1.1/meta_datas/<split>``).
        extra_keys: ``{token: {key: value}}`` merged into the frame dicts (e.g. occupancy file paths).
        logs: restrict to these logs (default: all committed logs).

    Returns:
        The written files, sorted. Each is written atomically, loadable under numpy 1.21-2.x.
    """
    split = open_split(split_dir)
    out_dir = Path(out_dir)
    committed = {log.name: log for log in split.logs}
    names = sorted(committed) if logs is None else sorted(logs)
    missing = [n for n in names if n not in committed]
    if missing:
        raise ExportError(f"{split.url}: logs not committed here: {', '.join(missing[:5])}")
    written = []
    for name in names:
        frames = rows_to_openscene(committed[name].frames().to_pylist(), extra_keys)
        path = out_dir / f"{name}.pkl"
        write_pickle(path, frames)
        written.append(path)
    return written


def export_split(
    split_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    occupancy: bool = True,
) -> Iterator[str]:
    """``driveengine export --format openscene``: write a collected split in OpenScene's formats; yields
    progress lines.

    Writes ``<out>/meta_datas/<split>/<log>.pkl`` and, for logs with labels and when
    ``occupancy`` is True, OpenScene v1.0 occupancy files ``<out>/occupancy/<split>/<scene>/occ_gt/*.npy``
    whose paths (relative to ``out``) go into the frame dicts as ``occ_gt_final_path`` /
    ``flow_gt_final_path``. With ``occupancy=False`` only the metadata is written (no occupancy keys).
    """
    out = Path(out)
    split = open_split(split_dir).name
    extra: dict[str, dict[str, Any]] | None = None
    if occupancy and any(log.has_labels for log in open_split(split_dir).logs):
        # Hook for the labels export: sparse *_occ_final.npy / *_flow_final.npy per frame.
        extra = export_openscene_occupancy(split_dir, out / "occupancy", relative_to=out)
        yield f"occupancy: {len(extra)} frames -> {out / 'occupancy'}"
    files = export_openscene_metadata(split_dir, out / "meta_datas" / split, extra)
    yield f"metadata: {len(files)} logs -> {out / 'meta_datas' / split}"


# -- occupancy: OpenScene v1.0 files of a collected split ---------------------------------------------------------------------


def export_openscene_occupancy(
    split_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    relative_to: str | os.PathLike[str] | None = None,
    logs: Iterable[str] | None = None,
) -> dict[str, dict[str, str]]:
    """Export a collected split's labels as OpenScene v1.0 files.

    Writes ``<out_dir>/<split>/<scene_name>/occ_gt/{frame_idx:03d}_occ_final.npy`` (int64 rows
    ``[flat_index, class_id]``, sorted) and ``..._flow_final.npy`` (float32 ``(vx, vy)`` m/s, ego frame)
    for every frame of every log in the manifest that has labels.

    Args:
        split_dir: the collected split folder ``<out>/<split>`` (manifest, meta/, occ/).
        out_dir: the root of the exported occupancy tree.
        relative_to: when given, returned paths are relative to this folder (e.g. the root of an
            OpenScene-style export that also holds ``meta_datas/``); otherwise absolute.
        logs: restrict to these log names (default: every log with labels).

    Returns:
        ``{token: {"occ_gt_final_path": ..., "flow_gt_final_path": ...}}`` for every exported frame, the
        extra keys the legacy ``.pkl`` export merges into its frame dicts.

    Raises:
        OpenSceneLabelError: a log's frame rows and label frames disagree, or two frames map to the
            same file name.
        ManifestError, OccFormatError: the split folder or a label group is unreadable.
    """
    split = open_split(split_dir)
    out_dir = Path(out_dir)
    wanted = None if logs is None else set(logs)
    base = None if relative_to is None else Path(relative_to).resolve()
    result: dict[str, dict[str, str]] = {}
    written: set[Path] = set()
    for log in split.logs:
        log_name = log.name
        if (wanted is not None and log_name not in wanted) or not log.has_labels:
            continue
        rows = log.frames(["token", "scene_name", "frame_idx"]).to_pylist()
        occ = log.labels()
        grid = occ.grid
        shard = max(1, int(occ.semantics.shards[0]) if occ.semantics.shards else 1)
        for start in range(0, len(rows), shard):  # read shard-aligned blocks
            block = occ.read(start, min(start + shard, len(rows)))
            for k in range(block["semantics"].shape[0]):
                row = rows[start + k]
                scene = row["scene_name"] or log_name
                occ_name, flow_name = label_file_names(int(row["frame_idx"]))
                folder = out_dir / split.name / scene / "occ_gt"
                occ_path, flow_path = folder / occ_name, folder / flow_name
                if occ_path in written:
                    raise OpenSceneLabelError(
                        f"{occ_path}: two frames of scene {scene} have frame_idx {row['frame_idx']} "
                        f"(log {log_name}); the frame rows are inconsistent, re-collect the log"
                    )
                written.add(occ_path)
                write_label_file(occ_path, flow_path, block["semantics"][k], block["flow"][k], grid)
                if base is not None:
                    occ_str = os.path.relpath(occ_path.resolve(), base)
                    flow_str = os.path.relpath(flow_path.resolve(), base)
                else:
                    occ_str, flow_str = str(occ_path.resolve()), str(flow_path.resolve())
                result[str(row["token"])] = {OCC_PATH_KEY: occ_str, FLOW_PATH_KEY: flow_str}
    return result
