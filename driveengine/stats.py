"""``driveengine stats``: what a collected split holds (logs, frames, boxes per class, drops, duration).

Counts come from the committed frame shards (only the columns needed are read) and the manifest
(frames dropped by reason, label presence); nothing uncommitted is counted.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pyarrow.compute as pc

from driveengine.store.dataset import open_split

#: Seconds between key frames at the default sample interval (2 Hz), used for the duration.
KEY_FRAME_PERIOD_S = 0.5


def compute_stats(split_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Statistics of a collected split, JSON-ready.

    Returns:
        ``split``, ``logs``, ``logs_with_labels``, ``empty_logs``, ``frames``, ``scenes``,
        ``boxes`` (total) and ``boxes_per_class`` (nuPlan category -> count), ``frames_with_anns``,
        ``dropped`` (reason -> frames), ``duration_s`` (key-frame coverage: frames x 0.5 s) and
        ``span_s`` (sum over logs of last - first key-frame time), ``scenario_tags`` (tag -> frames).
    """
    split = open_split(split_dir)
    boxes: Counter = Counter()
    tags: Counter = Counter()
    dropped: Counter = Counter()
    frames = scenes = with_anns = empty = labelled = 0
    span_us = 0
    for log in split.logs:
        dropped.update(log.entry.dropped)
        labelled += log.has_labels
        table = log.frames(["timestamp", "scene_token", "anns", "scenario_tags"])
        frames += table.num_rows
        if table.num_rows == 0:
            empty += 1
            continue
        ts = table.column("timestamp")
        span_us += int(pc.max(ts).as_py()) - int(pc.min(ts).as_py())
        scenes += len(pc.unique(table.column("scene_token")))
        anns = table.column("anns")
        with_anns += table.num_rows - anns.null_count
        names = pc.list_flatten(pc.struct_field(anns, "gt_names"))
        for item in pc.value_counts(names).to_pylist():
            boxes[item["values"]] += item["counts"]
        for item in pc.value_counts(pc.list_flatten(table.column("scenario_tags"))).to_pylist():
            tags[item["values"]] += item["counts"]
    return {
        "split": split.name,
        "split_dir": split.url,
        "dataset": split.dataset_name,
        "logs": len(split.logs),
        "logs_with_labels": labelled,
        "empty_logs": empty,
        "frames": frames,
        "scenes": scenes,
        "frames_with_anns": with_anns,
        "boxes": sum(boxes.values()),
        "boxes_per_class": dict(sorted(boxes.items())),
        "dropped": dict(sorted(dropped.items())),
        "duration_s": frames * KEY_FRAME_PERIOD_S,
        "span_s": span_us / 1e6,
        "scenario_tags": dict(sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A terminal table of :func:`compute_stats`'s result."""
    hours = stats["duration_s"] / 3600.0
    lines = [
        f"split {stats['split']}  ({stats['split_dir']})",
        f"  {'logs':<22}{stats['logs']:>12}   ({stats['logs_with_labels']} with labels, {stats['empty_logs']} empty)",
        f"  {'scenes':<22}{stats['scenes']:>12}",
        f"  {'frames':<22}{stats['frames']:>12}   ({stats['frames_with_anns']} with boxes)",
        f"  {'duration':<22}{stats['duration_s']:>12.1f} s ({hours:.2f} h at 2 Hz; span {stats['span_s']:.1f} s)",
        f"  {'boxes':<22}{stats['boxes']:>12}",
    ]
    lines += [f"    {name:<20}{count:>12}" for name, count in stats["boxes_per_class"].items()]
    total_dropped = sum(stats["dropped"].values())
    lines.append(f"  {'dropped frames':<22}{total_dropped:>12}")
    lines += [f"    {reason:<20}{count:>12}" for reason, count in stats["dropped"].items()]
    if stats["scenario_tags"]:
        lines.append(f"  {'scenario tags (frames)':<22}")
        lines += [f"    {tag:<36}{count:>8}" for tag, count in list(stats["scenario_tags"].items())[:15]]
    return "\n".join(lines)
