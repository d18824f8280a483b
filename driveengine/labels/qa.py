"""Label QA: checks of a collected split's labels that need no ground truth (``driveengine qa``).

Each check gives a number per frame (or per log) and fails when it passes its threshold
(:class:`QAThresholds`, documented defaults, overridable with ``--threshold NAME=VALUE``):

``invalid_values`` (per frame, voxels; default max 0)
    Voxels whose class id is outside the split's class table (above its ``free`` id) or whose flow is not
    finite. Such voxels are counted as free (class) and without flow (flow) by the other checks.
``unobserved_occupied`` (per frame, fraction; default max 0.6)
    Occupied voxels that neither the frame's LiDAR nor its cameras observed (outside ``mask_lidar`` and
    ``mask_camera``), as a fraction of the occupied voxels. Aggregating a window puts some labels where the
    key frame's own rays did not reach (behind objects, beyond the sweep); most of a frame's labels being
    unobserved means the masks and the labels do not belong together (wrong frame, wrong pose).
``static_flow`` (per frame, voxels; default max 0)
    Voxels of a class that cannot move (not a foreground class of the table) with non-zero flow. The
    generator writes flow only on objects: any such voxel is an error.
``empty_boxes`` (per frame, boxes; default max 0)
    Boxes of the frame's annotations that the LiDAR observed (at least ``box_observed_voxels`` voxels deep
    inside the box, centres a quarter voxel inside it and above its bottom half voxel, are in ``mask_lidar``;
    the box within ``box_range_m``) but that touch no voxel of a foreground class. Rays crossed the box's
    inside, so its object returned points: such a box lost its voxels.
``flicker`` (per pair of consecutive frames, fraction; default max 0.05)
    Static voxels (of any class that cannot move: not a foreground class, not free) of one frame, moved
    into the next frame's ego frame with the two ego poses (``ego_next_from_ego_this = inv(ego2global_next)
    @ ego2global_this``: the ego's motion is compensated), that land on a voxel the next frame's LiDAR
    observed and found free, with no static voxel within one voxel (the tolerance absorbs the
    re-gridding); as a fraction of those landing on observed voxels, the larger of both directions.
    Static structure does not appear and vanish between frames 0.5 s apart.
``class_outlier`` (per log, robust z-score; default max 8, needs >= 3 logs)
    For each class, the log's share of the occupied voxels against the median share over the split's logs,
    in units of 1.4826 x the median absolute deviation (at least ``class_share_floor``): a log whose labels
    hold far more or far less of a class than every other log (a broken class map, a missing layer).

The result is a JSON-ready dict (:func:`run_qa`), a PNG summary (:func:`write_qa_png`) and an exit code
(non-zero when a check fails). Frames are read one shard at a time: memory is a few frames' labels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.schemas.classes import ClassTable
from driveengine.schemas.grid import VoxelGrid


class QAError(DriveEngineError):
    """QA cannot run: no labels, a bad threshold."""


@dataclass(frozen=True)
class QAThresholds:
    """Thresholds and parameters of the checks (see the module doc). A check fails above its ``max_*``."""

    max_invalid_values: float = 0.0
    max_unobserved_occupied: float = 0.6
    max_static_flow: float = 0.0
    max_empty_boxes: float = 0.0
    max_flicker: float = 0.05
    max_class_outlier: float = 8.0
    box_observed_voxels: int = 2  #: observed voxels deep inside a box for it to count as seen
    box_range_m: float = 40.0  #: boxes farther than this from the ego are not checked, m
    flicker_gap_s: float = 1.0  #: frames farther apart than this are not compared, s
    class_share_floor: float = 0.01  #: the smallest spread (share of occupied voxels) of class_outlier

    @classmethod
    def with_overrides(cls, pairs: list[str]) -> QAThresholds:
        """The defaults with ``NAME=VALUE`` overrides (names as the attributes, or a check's name for its
        ``max_``). Raises :class:`QAError` on an unknown name or a value that is not a finite number >= 0."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            name = name.strip()
            if name in CHECKS:
                name = f"max_{name}"
            if not sep or name not in known:
                raise QAError(
                    f"--threshold {pair!r}: expected NAME=VALUE with NAME one of "
                    f"{', '.join([*CHECKS, *known])}"
                )
            try:
                value = float(text)
            except ValueError:
                raise QAError(f"--threshold {pair!r}: {text!r} is not a number") from None
            if not math.isfinite(value) or value < 0:
                raise QAError(f"--threshold {pair!r}: must be a finite number >= 0")
            values[name] = int(value) if known[name].type in ("int", int) else value
        return cls(**values)


#: The checks, in report order.
CHECKS = ("invalid_values", "unobserved_occupied", "static_flow", "empty_boxes", "flicker", "class_outlier")


def _static_classes(classes: ClassTable) -> np.ndarray:
    """(free + 1,) bool: the ids that cannot move (not foreground)."""
    out = np.ones(classes.free + 1, dtype=bool)
    out[list(classes.foreground)] = False
    out[classes.free] = False
    return out


def _dilate(occ: np.ndarray) -> np.ndarray:
    """``occ`` (nx, ny, nz) bool dilated by one voxel (26-neighbourhood)."""
    out = occ.copy()
    for axis in range(3):
        shifted = out.copy()
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(1, None), slice(None, -1)
        shifted[tuple(lo)] |= out[tuple(hi)]
        shifted[tuple(hi)] |= out[tuple(lo)]
        out = shifted
    return out


def _voxels_of_points(points: np.ndarray, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) int voxel indices of points (N, 3) and (N,) bool inside the grid."""
    lo = np.asarray(grid.range_min_m)
    idx = np.floor((points - lo) / grid.voxel_size_m).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(grid.shape)), axis=1)
    return idx, inside


def flicker_rate(
    static_a: np.ndarray,
    static_b: np.ndarray,
    observed_b: np.ndarray,
    b_from_a: np.ndarray,
    grid: VoxelGrid,
    free_b: np.ndarray,
) -> tuple[int, int]:
    """Static voxels of frame a that vanish in frame b (see the module doc): ``(vanished, compared)``.

    Args:
        static_a, static_b: (nx, ny, nz) bool static voxels of both frames.
        observed_b: (nx, ny, nz) bool observed voxels of b; free_b: (nx, ny, nz) bool free voxels of b.
        b_from_a: (4, 4) ``ego_b_from_ego_a``.
    """
    ijk = np.argwhere(static_a)
    if ijk.size == 0:
        return 0, 0
    centres = np.asarray(grid.range_min_m) + (ijk + 0.5) * grid.voxel_size_m
    moved = centres @ b_from_a[:3, :3].T + b_from_a[:3, 3]
    idx, inside = _voxels_of_points(moved, grid)
    idx = idx[inside]
    seen = observed_b[idx[:, 0], idx[:, 1], idx[:, 2]]
    idx = idx[seen]
    near = _dilate(static_b)
    vanished = free_b[idx[:, 0], idx[:, 1], idx[:, 2]] & ~near[idx[:, 0], idx[:, 1], idx[:, 2]]
    return int(np.count_nonzero(vanished)), int(idx.shape[0])


def empty_boxes(
    semantics: np.ndarray,
    observed: np.ndarray,
    boxes: np.ndarray,
    grid: VoxelGrid,
    foreground: np.ndarray,
    min_observed: int,
    range_m: float,
) -> list[int]:
    """Indices of the boxes (N, 7: x, y, z, l, w, h, yaw, ego frame) that were observed and hold no
    foreground voxel (see the module doc). ``foreground``: (free + 1,) bool per class id."""
    out = []
    vs = grid.voxel_size_m
    lo = np.asarray(grid.range_min_m)
    shape = np.asarray(grid.shape)
    for b, (x, y, z, length, width, height, yaw) in enumerate(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    ):
        if not np.isfinite([x, y, z, length, width, height, yaw]).all() or min(length, width, height) <= 0:
            continue
        if math.hypot(x, y) > range_m:
            continue
        r = 0.5 * math.sqrt(length * length + width * width)
        i0 = np.maximum(np.floor((np.array([x - r, y - r, z - height / 2]) - lo) / vs).astype(int), 0)
        i1 = np.minimum(np.floor((np.array([x + r, y + r, z + height / 2]) - lo) / vs).astype(int), shape - 1)
        if np.any(i1 < i0):
            continue
        ax = [lo[a] + (np.arange(i0[a], i1[a] + 1) + 0.5) * vs for a in range(3)]
        cx, cy, cz = np.meshgrid(*ax, indexing="ij")
        c, s = math.cos(yaw), math.sin(yaw)
        dx, dy = cx - x, cy - y
        along, across, up = np.abs(c * dx + s * dy), np.abs(-s * dx + c * dy), cz - z
        # the object's voxels may be any the box touches: centres inside the box grown by half a voxel
        inside = (
            (along <= length / 2 + vs / 2)
            & (across <= width / 2 + vs / 2)
            & (np.abs(up) <= height / 2 + vs / 2)
        )
        # a ray through a voxel deep inside the box must have hit the object: centres inside the box shrunk
        # by a quarter voxel, above its bottom half voxel (the ground's layer)
        deep = (
            (along <= length / 2 - vs / 4) & (across <= width / 2 - vs / 4)
            & (up >= -height / 2 + vs / 2) & (up <= height / 2 - vs / 4)
        )  # fmt: skip
        sub = (slice(i0[0], i1[0] + 1), slice(i0[1], i1[1] + 1), slice(i0[2], i1[2] + 1))
        if np.count_nonzero(observed[sub] & deep) < min_observed:
            continue
        if not np.any(foreground[semantics[sub][inside]]):
            out.append(b)
    return out


@dataclass
class _Failure:
    log: str
    frame: int | None
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"log": self.log, "frame": self.frame, "value": self.value}


def run_qa(
    split_dir: str | Path,
    thresholds: QAThresholds = QAThresholds(),
    *,
    logs: list[str] | None = None,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Run every check on the split's labels (see the module doc).

    Returns:
        JSON-ready: ``split``, ``ok``, ``thresholds``, ``recipe`` (the recorded one of the first log, or
        None), ``checks`` ({name: {ok, worst, threshold, failures: [{log, frame, value}] (first 50),
        failed (count), skipped (reason or None)}}), ``logs`` ({log: {frames, per-check worst values, class
        shares}}).

    Raises:
        QAError: the split has no labelled log.
    """
    from driveengine.store.dataset import open_split

    split = open_split(split_dir, storage_options=storage_options)
    grid, classes = split.grid, split.classes
    static_ids = _static_classes(classes)
    fg = np.zeros(classes.free + 1, dtype=bool)
    fg[list(classes.foreground)] = True
    fg[classes.free] = False
    if classes.background is not None and classes.background in classes.foreground:
        fg[classes.background] = False  # a table whose background is also an object class (Occ3D's others)
    t = thresholds
    failures: dict[str, list[_Failure]] = {name: [] for name in CHECKS}
    worst: dict[str, float] = {name: 0.0 for name in CHECKS}
    per_log: dict[str, dict[str, Any]] = {}
    recipe = None
    selected = [log for log in split.logs if log.has_labels and (logs is None or log.name in logs)]
    if not selected:
        raise QAError(f"{split_dir}: no labelled log to check; collect with labels first")
    for log in selected:
        occ = log.labels()
        if recipe is None:
            recipe = occ.attrs.get("generator")
        rows = log.frames(["ego2global", "anns", "timestamp"]).to_pylist()
        n = occ.num_frames
        has_camera = "mask_camera" in occ.arrays
        shard = max(1, int(occ.array("semantics").shards[0]) if occ.array("semantics").shards else 1)
        hist = np.zeros(classes.free + 1, dtype=np.float64)
        values = {name: 0.0 for name in CHECKS}
        prev: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None = None
        for start in range(0, n, shard):
            block = occ.read(start, min(n, start + shard))
            for j in range(block["semantics"].shape[0]):
                i = start + j
                sem = block["semantics"][j]
                flow = block["flow"][j]
                # ids outside the table and non-finite flow: counted, then read as free / no flow
                bad_class = sem > classes.free
                bad_flow = ~np.isfinite(flow).all(axis=-1)
                n_invalid = int(np.count_nonzero(bad_class | bad_flow))
                if n_invalid:
                    sem = np.where(bad_class, np.uint8(classes.free), sem)
                    flow = np.where(bad_flow[..., None], np.float32(0), flow)
                _record(
                    failures,
                    worst,
                    values,
                    "invalid_values",
                    log.name,
                    i,
                    float(n_invalid),
                    t.max_invalid_values,
                )
                observed = block["mask_lidar"][j]
                if has_camera:
                    observed = observed | block["mask_camera"][j]
                occupied = sem != classes.free
                hist += np.bincount(sem.reshape(-1), minlength=classes.free + 1)[: classes.free + 1]
                # unobserved occupied
                n_occ = int(np.count_nonzero(occupied))
                frac = float(np.count_nonzero(occupied & ~observed) / n_occ) if n_occ else 0.0
                _record(
                    failures,
                    worst,
                    values,
                    "unobserved_occupied",
                    log.name,
                    i,
                    frac,
                    t.max_unobserved_occupied,
                )
                # flow on static classes
                moving = np.any(flow != 0, axis=-1)
                bad = int(np.count_nonzero(moving & static_ids[sem]))
                _record(failures, worst, values, "static_flow", log.name, i, float(bad), t.max_static_flow)
                # boxes without voxels
                anns = rows[i]["anns"]
                boxes = (
                    np.asarray(anns["gt_boxes"], dtype=np.float64).reshape(-1, 7)
                    if anns
                    else np.zeros((0, 7))
                )
                empty = empty_boxes(
                    sem, block["mask_lidar"][j], boxes, grid, fg, t.box_observed_voxels, t.box_range_m
                )
                _record(
                    failures, worst, values, "empty_boxes", log.name, i, float(len(empty)), t.max_empty_boxes
                )
                # flicker against the previous frame
                pose = np.asarray(rows[i]["ego2global"], dtype=np.float64).reshape(4, 4)
                static = static_ids[sem]
                if prev is not None and abs(rows[i]["timestamp"] - prev[4]) <= t.flicker_gap_s * 1e6:
                    p_static, p_obs, p_free, p_pose, _ = prev
                    this_from_prev = np.linalg.solve(pose, p_pose)
                    v1, c1 = flicker_rate(
                        p_static, static, block["mask_lidar"][j], this_from_prev, grid, ~occupied
                    )
                    v2, c2 = flicker_rate(
                        static, p_static, p_obs, np.linalg.inv(this_from_prev), grid, p_free
                    )
                    rate = max(v1 / c1 if c1 else 0.0, v2 / c2 if c2 else 0.0)
                    _record(failures, worst, values, "flicker", log.name, i, rate, t.max_flicker)
                prev = (static, block["mask_lidar"][j].copy(), ~occupied, pose, rows[i]["timestamp"])
        total = hist[: classes.free].sum()
        shares = (hist[: classes.free] / total) if total else np.zeros(classes.free)
        per_log[log.name] = {
            "frames": n,
            **{f"worst_{k}": v for k, v in values.items()},
            "class_shares": shares,
        }
    # class histogram outliers across logs
    skipped = {name: None for name in CHECKS}
    if len(per_log) >= 3:
        shares = np.stack([d["class_shares"] for d in per_log.values()])
        median = np.median(shares, axis=0)
        mad = np.median(np.abs(shares - median), axis=0)
        spread = np.maximum(1.4826 * mad, t.class_share_floor)
        z = np.abs(shares - median) / spread
        for (name, d), zl in zip(per_log.items(), z, strict=True):
            value = float(zl.max())
            d["worst_class_outlier"] = value
            d["class_outlier_class"] = classes.names[int(zl.argmax())]
            _record(failures, worst, None, "class_outlier", name, None, value, t.max_class_outlier)
    else:
        skipped["class_outlier"] = f"needs at least 3 labelled logs, the split has {len(per_log)}"
    limits = {
        "invalid_values": t.max_invalid_values, "unobserved_occupied": t.max_unobserved_occupied,
        "static_flow": t.max_static_flow, "empty_boxes": t.max_empty_boxes, "flicker": t.max_flicker, "class_outlier": t.max_class_outlier,
    }  # fmt: skip
    checks = {
        name: {
            "ok": not failures[name],
            "worst": worst[name],
            "threshold": limits[name],
            "failed": len(failures[name]),
            "failures": [f.to_dict() for f in failures[name][:50]],
            "skipped": skipped[name],
        }
        for name in CHECKS
    }
    for d in per_log.values():
        d["class_shares"] = {classes.names[c]: float(v) for c, v in enumerate(d["class_shares"])}
    return {
        "split": str(split_dir),
        "ok": all(c["ok"] for c in checks.values()),
        "grid": grid.to_dict(),
        "thresholds": dataclasses.asdict(thresholds),
        "recipe": recipe,
        "checks": checks,
        "logs": per_log,
    }


def _record(
    failures: dict[str, list[_Failure]],
    worst: dict[str, float],
    values: dict[str, float] | None,
    check: str,
    log: str,
    frame: int | None,
    value: float,
    limit: float,
) -> None:
    worst[check] = max(worst[check], value)
    if values is not None:
        values[check] = max(values[check], value)
    if value > limit:
        failures[check].append(_Failure(log, frame, value))


def format_qa(result: dict[str, Any]) -> str:
    """A few lines: one per check (PASS/FAIL/SKIP, worst value vs threshold, first failures)."""
    lines = [f"QA of {result['split']}: {'PASS' if result['ok'] else 'FAIL'}"]
    for name, c in result["checks"].items():
        if c["skipped"]:
            lines.append(f"  SKIP {name}: {c['skipped']}")
            continue
        state = "PASS" if c["ok"] else "FAIL"
        where = ""
        if c["failures"]:
            f = c["failures"][0]
            where = f"; {c['failed']} failing, first: log {f['log']}" + (
                f" frame {f['frame']}" if f["frame"] is not None else ""
            )
        lines.append(f"  {state} {name}: worst {c['worst']:.4g} (max {c['threshold']:g}){where}")
    return "\n".join(lines)


def write_qa_png(result: dict[str, Any], out: str | Path) -> Path:
    """A PNG summary: per check, each log's worst value against the threshold (bars; red = failing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logs = list(result["logs"])
    fig = Figure(figsize=(3.2 * len(CHECKS), 3.2 + 0.12 * len(logs)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(CHECKS))
    for ax, name in zip(axes, CHECKS, strict=True):
        c = result["checks"][name]
        vals = [float(result["logs"][log].get(f"worst_{name}", 0.0)) for log in logs]
        colors = ["#d62728" if v > c["threshold"] else "#2ca02c" for v in vals]
        ax.barh(range(len(logs)), vals, color=colors)
        ax.axvline(c["threshold"], color="k", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(logs)))
        ax.set_yticklabels([log[-18:] for log in logs] if name == CHECKS[0] else [], fontsize=7)
        title = (
            f"{name}\n{'SKIP' if c['skipped'] else ('PASS' if c['ok'] else 'FAIL')} (max {c['threshold']:g})"
        )
        ax.set_title(title, fontsize=9, color="k" if c["ok"] else "#d62728")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"label QA of {result['split']}: {'PASS' if result['ok'] else 'FAIL'}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    return out
