"""``driveengine show --diff A B``: where two label sets of the same frames differ (e.g. two recipes).

Both splits must hold the frame (matched by its ``token``) on the same grid and class table. Each voxel is
one of: the same in both, occupied in A only, occupied in B only, or occupied in both with different
classes. The picture has three bird's-eye panels: A's top view, B's top view (class colours, as ``show``
draws them) and the differences (per column, the most telling difference in it: class changes over
A-only over B-only), with the voxel counts of each kind in the title.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from driveengine.schemas.classes import ClassTable
from driveengine.schemas.grid import VoxelGrid
from driveengine.store.occ import OccFrame
from driveengine.viz.bev import VizError, _require_matplotlib, _writing, column_colors, top_view

StrPath = str | os.PathLike[str]

#: Difference kinds (values of :func:`label_diff`'s grid) and their colours in the diff panel.
SAME, ONLY_A, ONLY_B, CHANGED = 0, 1, 2, 3
DIFF_RGB = {SAME: (235, 235, 235), ONLY_A: (31, 119, 180), ONLY_B: (255, 127, 14), CHANGED: (214, 39, 40)}
DIFF_NAMES = {ONLY_A: "only in A", ONLY_B: "only in B", CHANGED: "class differs"}


@dataclass(frozen=True)
class LabelDiff:
    """The differences of one frame: ``kind`` (X, Y, Z) uint8 (:data:`SAME` ...) and counts per kind."""

    kind: np.ndarray
    counts: dict[str, int]


def label_diff(sem_a: np.ndarray, sem_b: np.ndarray, free: int) -> LabelDiff:
    """Per-voxel difference of two class grids of the same shape (see the module doc)."""
    if sem_a.shape != sem_b.shape:
        raise VizError(f"the label grids differ in shape: {sem_a.shape} vs {sem_b.shape}")
    occ_a, occ_b = sem_a != free, sem_b != free
    kind = np.zeros(sem_a.shape, dtype=np.uint8)
    kind[occ_a & ~occ_b] = ONLY_A
    kind[occ_b & ~occ_a] = ONLY_B
    kind[occ_a & occ_b & (sem_a != sem_b)] = CHANGED
    counts = {name: int(np.count_nonzero(kind == k)) for k, name in DIFF_NAMES.items()}
    return LabelDiff(kind, counts)


def diff_columns(kind: np.ndarray) -> np.ndarray:
    """(X, Y, 3) uint8: per column the most telling difference (class change > A only > B only > same)."""
    column = np.zeros(kind.shape[:2], dtype=np.uint8)
    for k in (ONLY_B, ONLY_A, CHANGED):  # later ones win
        column[(kind == k).any(axis=2)] = k
    palette = np.array([DIFF_RGB[k] for k in (SAME, ONLY_A, ONLY_B, CHANGED)], dtype=np.uint8)
    return palette[column]


def _short(path: StrPath) -> str:
    """``<out>/<split>`` of a split folder path, for titles."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _frame_pair(
    split_a: StrPath, split_b: StrPath, log: str, frame: int
) -> tuple[str, list[OccFrame], VoxelGrid, ClassTable]:
    """Row ``frame`` of ``log`` in ``split_a`` and the frame with the same token in ``split_b``:
    ``(token, [frame of A, frame of B], grid, classes)``.

    Raises:
        VizError: the log or frame is missing from either split, or the grids / class tables differ.
    """
    from driveengine.store.dataset import open_split

    a, b = open_split(split_a), open_split(split_b)
    if a.grid != b.grid:
        raise VizError(f"{split_b}: grid {b.grid.describe()} differs from {split_a}'s {a.grid.describe()}")
    if a.classes != b.classes:
        raise VizError(f"{split_b}: class table {b.classes.name} differs from {split_a}'s {a.classes.name}")
    sides: list[OccFrame] = []
    token: str | None = None
    for split, where in ((a, split_a), (b, split_b)):
        logs = {entry.name: entry for entry in split.logs}
        if log not in logs:
            raise VizError(f"{where}: no log {log!r}; logs: {', '.join(sorted(logs)[:5])}")
        entry = logs[log]
        if not entry.has_labels:
            raise VizError(f"{where}: log {log} has no labels")
        tokens = [str(t) for t in entry.frames(["token"]).column("token").to_pylist()]
        if token is None:
            if not 0 <= frame < len(tokens):
                raise VizError(f"{where}: log {log} has {len(tokens)} frames, no frame {frame}")
            token = tokens[frame]
        if token not in tokens:
            raise VizError(f"{where}: log {log} has no frame with token {token} (frame {frame} of {split_a})")
        sides.append(entry.labels().frame(tokens.index(token)))
    assert token is not None
    return token, sides, a.grid, a.classes


def diff_frames(split_a: StrPath, split_b: StrPath, log: str, frame: int) -> tuple[str, LabelDiff]:
    """The differences of row ``frame`` of ``log`` in ``split_a`` and the same frame (by token) in
    ``split_b``: ``(token, diff)`` (see :func:`label_diff`).

    Raises:
        VizError: as :func:`show_diff`.
    """
    token, sides, _, classes = _frame_pair(split_a, split_b, log, frame)
    return token, label_diff(sides[0].semantics, sides[1].semantics, classes.free)


def show_diff(
    split_a: StrPath,
    split_b: StrPath,
    log: str,
    frame: int,
    out: StrPath,
    size_px: int = 600,
) -> Path:
    """Write the picture of the module doc for row ``frame`` of ``log`` in ``split_a`` and the frame with
    the same token in ``split_b``; returns ``out``.

    Raises:
        VizError: the log or frame is missing from either split, the grids / class tables differ, or
            ``out`` cannot be written.
    """
    token, sides, grid, classes = _frame_pair(split_a, split_b, log, frame)
    diff = label_diff(sides[0].semantics, sides[1].semantics, classes.free)
    Figure, FigureCanvasAgg = _require_matplotlib()
    height = size_px / 100.0
    fig = Figure(figsize=(3.2 * height, 1.15 * height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    # x forward up, y left to the left: rows run from +x down, columns from +y rightwards
    extent = (grid.range_max_m[1], grid.range_min_m[1], grid.range_min_m[0], grid.range_max_m[0])
    panels = []
    for side in sides:
        top, top_z = top_view(side.semantics, classes.free)
        panels.append(column_colors(top, top_z, grid.shape[2], classes, side.mask_lidar.any(axis=2)))
    panels.append(diff_columns(diff.kind))
    titles = [f"A: {_short(split_a)}", f"B: {_short(split_b)}", "differences"]
    for ax, rgb, title in zip(axes, panels, titles, strict=True):
        ax.imshow(rgb[::-1, ::-1], extent=extent, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("y (m, left)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("x (m, forward)", fontsize=7)
    legend = ", ".join(f"{name} {diff.counts[name]}" for name in DIFF_NAMES.values())
    from matplotlib.patches import Patch

    axes[2].legend(
        handles=[Patch(color=np.array(DIFF_RGB[k]) / 255.0, label=n) for k, n in DIFF_NAMES.items()],
        loc="lower right", fontsize=6,
    )  # fmt: skip
    fig.suptitle(f"{log} frame {frame} (token {token}): {legend} voxels", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fig.savefig(out)
        except ValueError as exc:  # matplotlib: "Format 'xyz' is not supported ..."
            raise VizError(f"{out}: cannot write the picture: {exc}; use .png, .jpg or .svg") from None
    return out
