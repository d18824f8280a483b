"""``driveengine inspect``: one-screen summaries of input files (nuPlan log databases, PCD point clouds).

:func:`inspect_path` returns a JSON-ready ``dict`` (``--json`` prints it as is); :func:`format_summary`
renders any such dict as aligned text.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import SourceError

#: Key frames are every ``KEY_FRAME_STRIDE``-th lidar_pc (20 Hz -> 2 Hz), as in OpenScene.
KEY_FRAME_STRIDE = 10


def inspect_path(path: str | PathLike[str]) -> dict[str, Any]:
    """Summarise an input file, dispatching on its suffix.

    * ``.db`` (nuPlan log): log name and token, vehicle, map version, location, start time (us), duration
      (s), counts of lidar_pc sweeps, key frames (every 10th sweep, 2 Hz), boxes (total and by category),
      tracks, scenes, traffic-light and scenario-tag rows, sweeps with a matched image per camera
      (closest within +-50 ms), and the reader's notes.
    * ``.pcd``: :func:`driveengine.sources.pcd.pcd_summary` (encoding, points, fields, xyz bounds in m).

    Raises:
        SourceError: the file is missing, of an unknown kind, or cannot be read (subclasses say why).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".db":
        return {"kind": "nuplan_log", **_summarise_log(p)}
    if suffix == ".pcd":
        from driveengine.sources.pcd import pcd_summary

        return {"kind": "pcd", **pcd_summary(p)}
    raise SourceError(
        p, f"cannot inspect a {suffix or 'suffix-less'} file", "expected a nuPlan log .db or a .pcd"
    )


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


def format_summary(summary: dict[str, Any]) -> str:
    """Render an :func:`inspect_path` summary as aligned ``key: value`` lines (nested dicts indented)."""
    lines: list[str] = []
    title = {"nuplan_log": "nuPlan log", "pcd": "PCD point cloud"}.get(summary.get("kind", ""), "file")
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
