"""``driveengine inspect``: one-screen summaries of the files DriveEngine reads and writes.

Inputs: nuPlan log databases (``.db``), point clouds (``.pcd``), OpenScene metadata (``.pkl``, loaded
with the restricted unpickler: a pickle that asks for anything but builtins and numpy arrays is refused
before anything runs). DriveEngine's own files: frame shards (``meta/<log>.parquet``) and label groups
(``occ/<log>.zarr``).

:func:`inspect_path` returns a JSON-ready ``dict`` (``--json`` prints it as is); :func:`format_summary`
renders any such dict as aligned text. Every file is treated as untrusted: a damaged one is a
:class:`~driveengine.errors.SourceError` naming it and the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import SourceError

#: Key frames are every ``KEY_FRAME_STRIDE``-th lidar_pc (20 Hz -> 2 Hz), as in OpenScene.
KEY_FRAME_STRIDE = 10
#: At most this many names are listed (logs, scenes, keys); the rest are counted.
LISTED = 20


def inspect_path(path: str | PathLike[str]) -> dict[str, Any]:
    """Summarise a file, dispatching on its suffix (:data:`INSPECTORS`).

    * ``.db`` (nuPlan log): log name and token, vehicle, map version, location, start time (us), duration
      (s), counts of lidar_pc sweeps, key frames (every 10th sweep, 2 Hz), boxes (total and by category),
      tracks, scenes, traffic-light and scenario-tag rows, sweeps with a matched image per camera
      (closest within +-50 ms), and the reader's notes.
    * ``.pcd``: :func:`driveengine.sources.pcd.pcd_summary` (encoding, points, fields, xyz bounds in m).
    * ``.parquet`` (frame shard): format version, rows, columns, cameras, logs and frames per log, scenes,
      first/last time (us and UTC), whether ``frame_index`` is there.
    * ``.zarr`` (label group): format version, frames, grid, class table, label arrays (dtype, shape,
      chunks, shards), coordinate arrays, first/last time, generator (the label recipe or import source).
    * ``.pkl`` (OpenScene metadata): frames, logs, scenes, first/last time, frame keys, cameras, boxes.

    Raises:
        SourceError: the file is missing, of an unknown kind, or cannot be read (subclasses say why;
            :class:`~driveengine.errors.UnsafePickleError` for a pickle that asks for code).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    inspector = INSPECTORS.get(suffix)
    if inspector is None:
        known = ", ".join(sorted(INSPECTORS))
        raise SourceError(p, f"cannot inspect a {suffix or 'suffix-less'} file", f"expected one of {known}")
    if not p.exists():
        raise SourceError(p, "no such file or folder", "check the path")
    kind, summarise = inspector
    return {"kind": kind, **summarise(p)}


def _summarise_log(path: Path) -> dict[str, Any]:
    from driveengine.sources.nuplan.reader import read_nuplan_log

    data = read_nuplan_log(path)
    n = data.num_sweeps
    by_category = np.bincount(data.box_category.astype(np.int64), minlength=len(data.categories))
    matched = (data.image_path != "").sum(axis=0)
    return {
        "path": str(path),
        "log_name": data.log_name,
        "log_token": data.log_token,
        "vehicle": data.vehicle_name,
        "map_version": data.map_version,
        "location": data.location,
        "start_timestamp_us": int(data.sweep_timestamp_us[0]),
        "duration_s": round(float(data.sweep_timestamp_us[-1] - data.sweep_timestamp_us[0]) / 1e6, 3),
        "lidar_pc_frames": n,
        "key_frames": len(range(0, n, KEY_FRAME_STRIDE)),
        "boxes": len(data.box_token),
        "boxes_by_category": {c: int(k) for c, k in zip(data.categories, by_category, strict=True)},
        "tracks": len(np.unique(data.box_track_token)),
        "scenes": len(data.scene_token),
        "traffic_light_rows": len(data.traffic_light_status),
        "scenario_tags": len(data.tag_type),
        "sweeps_with_image_per_camera": {
            c: int(k) for c, k, t in zip(data.camera_channels, matched, data.camera_token, strict=True) if t
        },
        "cameras_missing": [c for c, t in zip(data.camera_channels, data.camera_token, strict=True) if not t],
        "notes": list(data.notes),
    }


def _summarise_pcd(path: Path) -> dict[str, Any]:
    from driveengine.sources.pcd import pcd_summary

    return pcd_summary(path)


def _utc(timestamp_us: int | None) -> str | None:
    """ISO 8601 UTC of a microsecond timestamp (None when missing or out of range)."""
    if timestamp_us is None:
        return None
    from driveengine.viz.localtime import local_time

    try:
        return local_time(int(timestamp_us), None).time.isoformat()
    except ValueError:
        return None


def _listed(counts: Counter) -> dict[str, int]:
    """The first :data:`LISTED` entries of ``counts`` (sorted by name), the rest as ``"... N more"``."""
    items = sorted(counts.items())
    out = {str(k)[:80]: int(v) for k, v in items[:LISTED]}
    if len(items) > LISTED:
        out[f"... {len(items) - LISTED} more"] = sum(int(v) for _, v in items[LISTED:])
    return out


def _summarise_shard(path: Path) -> dict[str, Any]:
    """A frame shard (``meta/<log>.parquet``): only the few columns summarised are read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from driveengine.schemas.frame import schema_cameras

    try:
        shard = pq.ParquetFile(path)
        schema = shard.schema_arrow
        names = schema.names
        wanted = [
            c for c in ("log_name", "timestamp", "scene_token", "map_location", "frame_index") if c in names
        ]
        table = shard.read(columns=wanted)
        anns = shard.read(columns=["anns"]).column("anns") if "anns" in names else None
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise SourceError(
            path, f"not a readable Parquet file ({exc})", "re-collect or re-download it"
        ) from None
    meta = schema.metadata or {}
    version = meta.get(b"driveengine.format_version", b"").decode(errors="replace")
    out: dict[str, Any] = {
        "path": str(path),
        "frame_shard": meta.get(b"driveengine.kind") == b"frames",
        "format_version": int(version) if version.isdigit() else None,
        "rows": shard.metadata.num_rows,
        "row_groups": shard.metadata.num_row_groups,
        "columns": names,
    }
    if "cams" in names and pa.types.is_struct(schema.field("cams").type):
        out["cameras"] = list(schema_cameras(schema))
    if "log_name" in wanted:
        logs = Counter(str(v) for v in table.column("log_name").to_pylist())
        out["logs"] = len(logs)
        out["frames_per_log"] = _listed(logs)
    if "scene_token" in wanted:
        out["scenes"] = len(pc.unique(table.column("scene_token")))
    if "timestamp" in wanted and table.num_rows:
        ts = table.column("timestamp")
        first, last = pc.min(ts).as_py(), pc.max(ts).as_py()
        out |= {
            "first_timestamp_us": first,
            "last_timestamp_us": last,
            "first_utc": _utc(first),
            "last_utc": _utc(last),
        }
        if "map_location" in wanted:
            from driveengine.viz.localtime import local_time

            try:
                out["first_local_time"] = local_time(first, table.column("map_location")[0].as_py()).text()
            except ValueError:
                pass
    if anns is not None:
        out["rows_with_boxes"] = len(anns) - anns.null_count
        names_col = pc.list_flatten(pc.struct_field(anns, "gt_names"))
        out["boxes"] = len(names_col)
        out["boxes_by_category"] = _listed(Counter(dict(zip(*_value_counts(names_col), strict=True))))
    if not out["frame_shard"]:
        pass
    elif "frame_index" in wanted:
        index = table.column("frame_index").to_numpy(zero_copy_only=False)
        out["frame_index"] = (
            "0 .. T-1 in row order" if np.array_equal(index, np.arange(len(index))) else "NOT the row order"
        )
    else:
        out["frame_index"] = "absent (format 1 or early format 2: the row position is the frame index)"
    return out


def _value_counts(values: Any) -> tuple[list[str], list[int]]:
    import pyarrow.compute as pc

    counts = pc.value_counts(values).to_pylist()
    return [str(c["values"]) for c in counts], [int(c["counts"]) for c in counts]


def _summarise_labels(path: Path) -> dict[str, Any]:
    """A label group (``occ/<log>.zarr``), through DriveEngine's own validating reader."""
    from driveengine.store.occ import open_occ

    occ = open_occ(path)
    attrs = occ.attrs
    arrays = []
    for name in occ.arrays:
        a = occ.array(name)
        arrays.append(
            {
                "name": name,
                "dtype": str(a.dtype),
                "shape": list(a.shape),
                "chunks": list(a.chunks),
                "shards": list(a.shards) if a.shards else None,
            }
        )
    ts = attrs.get("timestamps_us")
    ts = [int(t) for t in ts if isinstance(t, int)] if isinstance(ts, list) else []
    out: dict[str, Any] = {
        "path": str(path),
        "format_version": attrs.get("format_version"),
        "frames": occ.num_frames,
        "grid": occ.grid.describe(),
        "class_table": occ.classes.name,
        "classes": {str(i): n for i, n in enumerate(occ.classes.names)},
        "free": occ.classes.free,
        "arrays": arrays,
        "coordinate_arrays": list(occ.coordinate_arrays),
        "first_timestamp_us": ts[0] if ts else None,
        "last_timestamp_us": ts[-1] if ts else None,
        "first_utc": _utc(ts[0]) if ts else None,
        "generator": attrs.get("generator") if isinstance(attrs.get("generator"), dict) else {},
    }
    return out


def _summarise_openscene(path: Path) -> dict[str, Any]:
    """OpenScene v1.1 metadata (a list of frame dicts), loaded with the restricted unpickler."""
    from driveengine.sources.openscene.reader import load_openscene_pickle

    frames = load_openscene_pickle(path)
    keys: Counter = Counter(str(k) for f in frames for k in f)
    cameras: Counter = Counter()
    logs: Counter = Counter()
    scenes: set[str] = set()
    timestamps: list[int] = []
    boxes: Counter = Counter()
    with_boxes = 0
    for f in frames:
        cams = f.get("cams")
        if isinstance(cams, dict):
            cameras.update(str(c) for c in cams)
        logs[str(f.get("log_name", ""))] += 1
        scenes.add(str(f.get("scene_name", "")))
        t = f.get("timestamp")
        if isinstance(t, int | np.integer) and not isinstance(t, bool):
            timestamps.append(int(t))
        anns = f.get("anns")
        if isinstance(anns, dict) and anns.get("gt_names") is not None:
            with_boxes += 1
            try:
                boxes.update(str(n) for n in np.asarray(anns["gt_names"]).reshape(-1))
            except (TypeError, ValueError):
                pass
    first, last = (min(timestamps), max(timestamps)) if timestamps else (None, None)
    return {
        "path": str(path),
        "frames": len(frames),
        "logs": _listed(logs),
        "scenes": len(scenes),
        "first_timestamp_us": first,
        "last_timestamp_us": last,
        "first_utc": _utc(first),
        "last_utc": _utc(last),
        "keys": sorted(keys)[:60] + ([f"... {len(keys) - 60} more"] if len(keys) > 60 else []),
        "frames_missing_keys": {k: len(frames) - n for k, n in sorted(keys.items()) if n < len(frames)},
        "cameras": _listed(cameras),
        "frames_with_boxes": with_boxes,
        "boxes": sum(boxes.values()),
        "boxes_by_category": _listed(boxes),
    }


#: suffix -> (summary kind, summariser); a ``.zarr`` is a folder.
INSPECTORS: dict[str, tuple[str, Callable[[Path], dict[str, Any]]]] = {
    ".db": ("nuplan_log", lambda p: _summarise_log(p)),
    ".pcd": ("pcd", _summarise_pcd),
    ".parquet": ("frame_shard", _summarise_shard),
    ".zarr": ("label_group", _summarise_labels),
    ".pkl": ("openscene_metadata", _summarise_openscene),
}

#: Title of each summary kind in :func:`format_summary`.
KIND_TITLES: dict[str, str] = {
    "nuplan_log": "nuPlan log",
    "pcd": "PCD point cloud",
    "frame_shard": "DriveEngine frame shard",
    "label_group": "DriveEngine label group",
    "openscene_metadata": "OpenScene metadata",
}


def format_summary(summary: dict[str, Any]) -> str:
    """Render an :func:`inspect_path` summary as aligned ``key: value`` lines (nested dicts indented)."""
    lines: list[str] = []
    title = KIND_TITLES.get(summary.get("kind", ""), "file")
    lines.append(f"{title}: {summary.get('path', '')}")
    body = {k: v for k, v in summary.items() if k not in ("kind", "path")}
    _format_items(body, lines, indent=2)
    return "\n".join(lines)


def _format_items(items: dict[str, Any], lines: list[str], indent: int) -> None:
    width = max((len(k) for k in items), default=0)
    pad = " " * indent
    for key, value in items.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:" + ("" if value else " -"))
            _format_items(value, lines, indent + 2)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key}:")
            for v in value:
                lines.append(f"{pad}  - " + ", ".join(f"{k}={_scalar(x)}" for k, x in v.items()))
        elif isinstance(value, list) and key == "notes":
            lines.append(f"{pad}{key:<{width}}  " + ("-" if not value else value[0]))
            lines.extend(f"{pad}{'':<{width}}  {note}" for note in value[1:])
        else:
            lines.append(f"{pad}{key:<{width}}  {_scalar(value)}")


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]" if value else "-"
    return str(value)
