"""``driveengine report DATASET/SPLIT --out report.html``: one self-contained HTML page about a collected split.

The page holds, in this order (each a ``<section>`` with the id in brackets):

* a summary (``summary``): dataset, logs, frames, scenes, boxes, duration, grid, class table, cameras;
* voxels per class of the labels (``classes``): a bar chart and a table, counted over up to
  ``frames_per_log`` frames of every labelled log, evenly spaced (all frames when the logs are shorter);
* boxes per category (``boxes``) from the frame rows (:func:`driveengine.stats.compute_stats`);
* frames per log (``frames``), with each log's first time in its local time zone;
* dropped frames by reason (``dropped``), from the manifest;
* label statistics (``labels``): occupied and observed (``mask_lidar``) voxels per frame, and the
  generator settings (the label recipe, or the import's description) with the logs that used each;
* a BEV thumbnail per log (``thumbnails``): the middle frame of each log, occupancy, flow and boxes.

Everything is inside the one file: images are PNG ``data:`` URIs, the style sheet is inline, there is no
script and no link to anything outside (it opens offline, can be mailed, and cannot leak that it was
opened). Every text from the dataset is HTML-escaped. Reading is bounded: labels are read one frame at a
time, ``frames_per_log`` frames per log.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.viz.bev import VizError, _require_matplotlib, _writing, render_frame
from driveengine.viz.colors import category_colors, class_colors

StrPath = str | os.PathLike[str]

#: Frames per log read for the voxel statistics (evenly spaced over the log).
FRAMES_PER_LOG = 8
#: Edge of a BEV thumbnail, pixels.
THUMBNAIL_PX = 240


@dataclass
class VoxelCounts:
    """Voxel statistics over the sampled frames of every labelled log.

    Attributes:
        per_class: (num ids,) voxels of each class id (free included).
        frames: frames counted.
        voxels_per_frame: voxels of the grid.
        occupied: voxels not free, summed over the frames.
        observed: voxels a ray observed (``mask_lidar``), summed over the frames.
    """

    per_class: np.ndarray
    frames: int = 0
    voxels_per_frame: int = 0
    occupied: int = 0
    observed: int = 0


@dataclass
class LogReport:
    """What the page says about one log."""

    name: str
    frames: int
    dropped: dict[str, int]
    has_labels: bool
    first_time: str = ""
    sampled_frames: int = 0
    thumbnail: bytes | None = None
    generator: str | None = None  #: the group's generator attribute as sorted JSON


@dataclass
class SplitReport:
    """Everything on the page (see the module doc)."""

    split: str
    split_dir: str
    dataset: str
    stats: dict[str, Any]
    grid: str
    classes: Any
    cameras: tuple[str, ...]
    logs: list[LogReport]
    voxels: VoxelCounts
    generators: dict[str, list[str]] = field(default_factory=dict)  #: generator JSON -> logs


def collect_report(
    split_dir: StrPath,
    *,
    frames_per_log: int = FRAMES_PER_LOG,
    thumbnails: bool = True,
    thumbnail_px: int = THUMBNAIL_PX,
    quiet: bool | None = None,
) -> SplitReport:
    """Read what the page shows from a collected split (bounded: ``frames_per_log`` label frames per log).

    Raises:
        ManifestError / DatasetError: the split cannot be opened or a log is damaged (named).
        VizError: thumbnails without matplotlib.
    """
    from driveengine.progress import progress
    from driveengine.stats import compute_stats
    from driveengine.store.dataset import open_split
    from driveengine.viz.localtime import local_time

    if frames_per_log < 1:
        raise VizError(f"frames per log must be at least 1, got {frames_per_log}")
    if thumbnails:
        _require_matplotlib()
    split = open_split(split_dir)
    stats = compute_stats(split_dir)
    classes = split.classes
    voxels = VoxelCounts(np.zeros(len(classes.names), dtype=np.int64))
    report = SplitReport(
        split.name,
        str(split.url),
        split.dataset_name,
        stats,
        split.grid.describe(),
        classes,
        split.cameras,
        [],
        voxels,
    )
    with progress(
        len(split.logs), desc=f"report {split.name}", unit="log", rate_unit="frame", quiet=quiet
    ) as bar:
        for log in split.logs:
            entry = log.entry
            item = LogReport(log.name, entry.frames, dict(entry.dropped), log.has_labels)
            rows = log.frames(["timestamp", "map_location", "anns"]) if entry.frames else None
            if rows is not None:
                try:
                    first = int(rows.column("timestamp")[0].as_py())
                    item.first_time = local_time(first, rows.column("map_location")[0].as_py()).text()
                except ValueError:
                    item.first_time = ""
            occ = log.labels() if log.has_labels and entry.frames else None
            if occ is not None:
                if occ.classes != classes:
                    raise VizError(
                        f"log {log.name}: its labels use class table {occ.classes.name}, the split {classes.name}"
                    )
                item.generator = json.dumps(occ.attrs.get("generator"), sort_keys=True, indent=1)
                report.generators.setdefault(item.generator, []).append(log.name)
                picks = np.unique(
                    np.linspace(0, occ.num_frames - 1, min(occ.num_frames, frames_per_log)).round()
                )
                for i in picks.astype(int):
                    labels = occ.frame(int(i))
                    counts = np.bincount(labels.semantics.reshape(-1), minlength=len(classes.names))
                    voxels.per_class += counts[: len(classes.names)]
                    voxels.occupied += int(labels.semantics.size - counts[classes.free])
                    voxels.observed += int(np.count_nonzero(labels.mask_lidar))
                    voxels.frames += 1
                    voxels.voxels_per_frame = int(labels.semantics.size)
                item.sampled_frames = len(picks)
            if thumbnails and entry.frames:
                item.thumbnail = _thumbnail(occ, rows, classes, split.grid, thumbnail_px)
            report.logs.append(item)
            bar.update(1, amount=entry.frames)
    return report


def _thumbnail(occ: Any, rows: Any, classes: Any, grid: Any, size_px: int) -> bytes:
    """PNG of the middle frame's BEV (labels when the log has them, else its boxes)."""
    n = rows.num_rows
    mid = n // 2
    anns = rows.column("anns")[mid].as_py() or {}
    boxes = np.asarray(anns.get("gt_boxes") or np.zeros((0, 7)), dtype=np.float64).reshape(-1, 7)
    if occ is not None:
        f = occ.frame(mid)
        rendered = render_frame(
            f.semantics, f.flow, mask_lidar=f.mask_lidar, boxes=boxes, box_names=anns.get("gt_names"),
            classes=classes, grid=occ.grid, size_px=size_px, legend=False,
        )  # fmt: skip
    else:
        rendered = render_frame(
            None, boxes=boxes, box_names=anns.get("gt_names"), classes=classes, grid=grid, size_px=size_px,
            legend=False,
        )  # fmt: skip
    return _png(rendered.figure)


def _png(figure: Any) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=figure.dpi)
    return buf.getvalue()


def _bar_chart(labels: list[str], values: list[float], colors: Any, title: str, log: bool = False) -> bytes:
    """A horizontal bar chart as PNG bytes."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    height = max(1.6, 0.28 * len(labels) + 0.9)
    fig = Figure(figsize=(7.0, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.30, 0.9 / height * 0.6, 0.66, 1 - 1.2 / height))
    y = np.arange(len(labels))
    ax.barh(y, values, color=colors, edgecolor="black", linewidth=0.4)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    if log and any(v > 0 for v in values):
        ax.set_xscale("log")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for j, v in enumerate(row):
            text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
            cls = ' class="num"' if j >= numeric_from and isinstance(v, int | float) else ""
            cells.append(f"<td{cls}>{e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
figure { display: inline-block; margin: 0.4em; text-align: center; font-size: 0.75em; }
figure img { border: 1px solid #ccc; }
.note { color: #666; font-size: 0.85em; }
"""


def render_html(report: SplitReport) -> str:
    """The page (see the module doc) as one HTML string."""
    e = html.escape
    s = report.stats
    classes = report.classes
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>DriveEngine report: {e(report.split)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>DriveEngine report: split {e(report.split)} ({e(report.dataset)})</h1>",
        f'<p class="note">{e(report.split_dir)}</p>',
    ]
    # summary
    summary = [
        ["dataset", report.dataset],
        ["logs", s["logs"]],
        ["logs with labels", s["logs_with_labels"]],
        ["frames", s["frames"]],
        ["scenes", s["scenes"]],
        ["boxes", s["boxes"]],
        ["dropped frames", sum(s["dropped"].values())],
        ["duration (2 Hz key frames)", f"{s['duration_s'] / 3600.0:.2f} h"],
        ["grid", report.grid],
        ["class table", f"{classes.name} ({len(classes.names)} ids, free = {classes.free})"],
        ["cameras", ", ".join(report.cameras)],
    ]
    parts += ['<section id="summary"><h2>Summary</h2>', _table(["", "value"], summary), "</section>"]

    # voxels per class
    v = report.voxels
    parts.append('<section id="classes"><h2>Voxels per class</h2>')
    if v.frames:
        ids = [i for i in range(len(classes.names)) if i != classes.free]
        colors = class_colors(classes)[ids] / 255.0
        chart = _bar_chart([classes.names[i] for i in ids], [int(v.per_class[i]) for i in ids], colors,
                           f"occupied voxels per class over {v.frames} frames (log scale)", log=True)  # fmt: skip
        total = int(v.per_class.sum())
        rows = [
            [i, classes.names[i], int(v.per_class[i]), f"{100.0 * v.per_class[i] / max(total, 1):.3f} %"]
            for i in range(len(classes.names))
        ]
        parts += [
            f'<p class="note">Counted over {v.frames} label frames (up to the first, last and evenly spaced '
            "frames of each log).</p>",
            _img(chart, "voxels per class"),
            _table(["id", "class", "voxels", "share"], rows, numeric_from=2),
        ]
    else:
        parts.append('<p class="note">No labels in this split.</p>')
    parts.append("</section>")

    # boxes per category
    boxes = s["boxes_per_class"]
    parts.append('<section id="boxes"><h2>Boxes per category</h2>')
    if boxes:
        names = list(boxes)
        chart = _bar_chart(names, [boxes[n] for n in names], category_colors(names), "boxes per category")
        parts += [
            _img(chart, "boxes per category"),
            _table(["category", "boxes"], [[n, boxes[n]] for n in names]),
        ]
    else:
        parts.append('<p class="note">No boxes (test data or no annotations).</p>')
    parts.append("</section>")

    # frames per log
    parts.append('<section id="frames"><h2>Frames per log</h2>')
    if report.logs:
        names = [log.name for log in report.logs]
        if len(names) <= 60:
            chart = _bar_chart(names, [log.frames for log in report.logs], "#4a7ab5", "frames per log")
        else:
            chart = _histogram([log.frames for log in report.logs], "logs by number of frames")
        parts.append(_img(chart, "frames per log"))
    rows = [
        [log.name, log.frames, sum(log.dropped.values()), "yes" if log.has_labels else "no", log.first_time]
        for log in report.logs
    ]
    parts += [_table(["log", "frames", "dropped", "labels", "first frame (local time)"], rows), "</section>"]

    # dropped frames
    dropped = Counter()
    for log in report.logs:
        dropped.update(log.dropped)
    parts.append('<section id="dropped"><h2>Dropped frames by reason</h2>')
    reasons = sorted(r for r, n in dropped.items() if n)
    if reasons:
        chart = _bar_chart(reasons, [dropped[r] for r in reasons], "#c05050", "dropped frames by reason")
        parts += [
            _img(chart, "dropped frames by reason"),
            _table(["reason", "frames"], [[r, dropped[r]] for r in reasons]),
        ]
    else:
        parts.append('<p class="note">No frame was dropped.</p>')
    parts.append("</section>")

    # label statistics and generator settings
    parts.append('<section id="labels"><h2>Label statistics</h2>')
    if v.frames:
        per = max(v.frames, 1)
        rows = [
            ["frames counted", v.frames],
            ["voxels per frame", v.voxels_per_frame],
            ["occupied voxels per frame", f"{v.occupied / per:,.1f} ({100.0 * v.occupied / per / max(v.voxels_per_frame, 1):.2f} %)"],
            ["observed voxels per frame (mask_lidar)", f"{v.observed / per:,.1f} ({100.0 * v.observed / per / max(v.voxels_per_frame, 1):.2f} %)"],
        ]  # fmt: skip
        parts.append(_table(["", "value"], rows))
        for recipe, logs in report.generators.items():
            shown = ", ".join(logs[:5]) + (f" and {len(logs) - 5} more" if len(logs) > 5 else "")
            parts += [
                f"<h3>Generator settings of {len(logs)} log(s): {e(shown)}</h3>",
                f"<pre>{e(recipe)}</pre>",
            ]
    else:
        parts.append('<p class="note">No labels in this split.</p>')
    parts.append("</section>")

    # thumbnails
    parts.append('<section id="thumbnails"><h2>BEV thumbnails (middle frame of each log)</h2>')
    for log in report.logs:
        if log.thumbnail is not None:
            parts.append(
                f"<figure>{_img(log.thumbnail, f'BEV of {log.name}')}<figcaption>{e(log.name)}</figcaption></figure>"
            )
    parts += ["</section>", "</body></html>"]
    return "\n".join(parts)


def _histogram(values: list[int], title: str) -> bytes:
    Figure, FigureCanvasAgg = _require_matplotlib()
    fig = Figure(figsize=(7.0, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.2, 0.85, 0.68))
    ax.hist(values, bins=min(40, max(5, len(set(values)))), color="#4a7ab5", edgecolor="black", linewidth=0.4)
    ax.set_xlabel("frames", fontsize=8)
    ax.set_ylabel("logs", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def write_report(
    split_dir: StrPath,
    out: StrPath,
    *,
    frames_per_log: int = FRAMES_PER_LOG,
    thumbnails: bool = True,
    quiet: bool | None = None,
) -> Path:
    """Write the report of a collected split to ``out`` (one self-contained HTML file, written whole).

    Raises:
        VizError: ``out`` cannot be written, or the errors of :func:`collect_report`.
    """
    from driveengine.files import atomic_write_bytes

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise VizError(f"{out}: the report is an HTML file; name it *.html")
    page = render_html(
        collect_report(split_dir, frames_per_log=frames_per_log, thumbnails=thumbnails, quiet=quiet)
    )
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, page.encode("utf-8"))
    return out
