"""Pictures of a frame: a bird's-eye view of occupancy, flow and boxes beside the cameras as they sit on the
car with the boxes projected into them (PNG), a log as a video (MP4 or GIF), and an optional Open3D view.

**The BEV panel** is a top view of the ego frame of the key frame (x forward points **up** in the
picture, y left points **left**, metres on both axes; origin at the rear axle). Each (x, y) column of
the voxel grid is painted in the colour of its **highest occupied voxel's class** (by its unified class,
:mod:`driveengine.viz.colors`); the dataset's background class is grey, lighter for low tops (ground)
and darker for high ones (buildings, poles). A free column is white where a LiDAR ray observed it and
**shaded** (:data:`~driveengine.viz.colors.UNOBSERVED_RGB`) where none did (``mask_lidar``). Moving
voxels (object classes with a speed of at least 0.2 m/s) are summarised as one black arrow per
4 m x 4 m cell showing the distance the cell's mean (vx, vy) covers in 0.5 s; the **scale arrow** in the
lower right corner is 5 m/s. Box outlines come from the frame row's ``anns`` (ego frame, yaw relative to
the ego), with a line from the centre to the front, in class colours with a black halo. The ego is a
black outline of a 5.2 m x 2.3 m car whose rear axle is 1.0 m ahead of its rear bumper (nuPlan's
Pacifica, approximately). The legend lists the classes present, the ego, the flow arrows, the boxes and
the unobserved shade.

**The camera panels** (:mod:`driveengine.viz.cameras`) show every camera of the dataset (or those
asked for) in two rows, front cameras over back cameras, each row left to right as on the car, placed
from each camera's extrinsics; the frame's 3D boxes are drawn into them (the visible parts of their
edges). A camera whose image file is missing gets a panel saying where it was looked for.

**The title** names the log, frame, scene and token and the frame's **local time** in the time zone of
the log's location (:mod:`driveengine.viz.localtime`; UTC, labelled so, when the location is unknown).

Rendering uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change);
matplotlib is the ``viz`` extra (``pip install driveengine[viz]``), MP4 needs ``imageio-ffmpeg`` (also in
the ``viz`` extra: a wheel with its own ffmpeg, no system package).
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable
from driveengine.schemas.grid import GRID, VoxelGrid
from driveengine.viz.cameras import CameraCalibration, camera_layout, project_box_edges
from driveengine.viz.colors import UNOBSERVED_RGB, category_colors, class_colors

StrPath = str | os.PathLike[str]

#: RGB colour (uint8) of each class id of OpenScene's table (16 = free: white); other tables: :func:`class_colors`.
CLASS_COLORS: np.ndarray = class_colors(OPENSCENE_CLASSES)

#: Ego outline in the ego frame (m): nuPlan's Pacifica, approximately (rear axle at the origin).
EGO_LENGTH_M, EGO_WIDTH_M, EGO_REAR_OVERHANG_M = 5.2, 2.3, 1.0
#: Speed (m/s) from which a foreground voxel counts as moving (the EPE split of the metrics).
MOVING_MPS = 0.2
#: Edge (m) of the cells over which flow arrows are averaged.
ARROW_CELL_M = 4.0
#: Arrows show the displacement over this many seconds.
ARROW_SECONDS = 0.5
#: Speed of the scale arrow, m/s.
ARROW_KEY_MPS = 10.0
#: Video suffixes :func:`show_video` writes.
VIDEO_SUFFIXES = (".mp4", ".gif")


class VizError(DriveEngineError):
    """A picture cannot be made (missing optional dependency, bad frame index, unknown camera, ...)."""


def _require_matplotlib() -> Any:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise VizError(
            "matplotlib is missing: pictures need the viz extra (pip install driveengine[viz])"
        ) from None
    return Figure, FigureCanvasAgg


# -- arrays --------------------------------------------------------------------------------------------


def top_view(semantics: np.ndarray, free: int = OPENSCENE_CLASSES.free) -> tuple[np.ndarray, np.ndarray]:
    """The highest (largest z) non-free voxel of each column.

    Args:
        semantics: (X, Y, Z) class ids indexed ``[x, y, z]``.
        free: the class table's free id.

    Returns:
        ``top`` (X, Y) class of that voxel (``free`` for an empty column) and ``top_z`` (X, Y) int its z
        index (-1 for an empty column).
    """
    occupied = semantics != free
    nz = semantics.shape[2]
    top_z = nz - 1 - np.argmax(occupied[:, :, ::-1], axis=2)
    top = np.take_along_axis(semantics, top_z[..., None], axis=2)[..., 0]
    any_occ = occupied.any(axis=2)
    return np.where(any_occ, top, free).astype(semantics.dtype), np.where(any_occ, top_z, -1)


#: Grey levels of background columns whose top voxel is at the lowest / highest z index: height
#: shading that tells ground from buildings and poles (other classes keep their exact colour).
BACKGROUND_GREY_LOW_HIGH = (215, 95)


def column_colors(
    top: np.ndarray,
    top_z: np.ndarray,
    nz: int,
    classes: ClassTable = OPENSCENE_CLASSES,
    observed: np.ndarray | None = None,
) -> np.ndarray:
    """(X, Y, 3) uint8 RGB of a top view: class colours, background shaded by height, and free columns
    that no ray observed (``observed`` (X, Y) False) in :data:`~driveengine.viz.colors.UNOBSERVED_RGB`."""
    rgb = class_colors(classes)[top]
    if classes.background is not None:
        low, high = BACKGROUND_GREY_LOW_HIGH
        grey = np.round(low + (high - low) * top_z / max(nz - 1, 1)).astype(np.uint8)
        rgb = np.where((top == classes.background)[..., None], grey[..., None], rgb)
    if observed is not None:
        unseen = (top == classes.free) & ~observed
        rgb = np.where(unseen[..., None], np.array(UNOBSERVED_RGB, dtype=np.uint8), rgb)
    return rgb


def moving_arrows(
    semantics: np.ndarray,
    flow: np.ndarray,
    grid: VoxelGrid = GRID,
    cell_m: float = ARROW_CELL_M,
    classes: ClassTable = OPENSCENE_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Flow arrows of moving object voxels, averaged per ``cell_m`` x ``cell_m`` cell.

    Args:
        semantics: (X, Y, Z) class ids.
        flow: (X, Y, Z, 2) (vx, vy) m/s, ego frame.
        grid: the voxel grid (for metric positions).
        cell_m: cell edge, metres.
        classes: the class table (its ``foreground`` ids are the object classes).

    Returns:
        ``positions`` (K, 2) cell centres (x, y) m, ego frame, and ``velocities`` (K, 2) mean (vx, vy)
        m/s of the moving voxels in each of the K cells that hold any.
    """
    flow = np.asarray(flow, dtype=np.float32)
    foreground = np.isin(semantics, np.asarray(classes.foreground, dtype=semantics.dtype))
    moving = foreground & (np.hypot(flow[..., 0], flow[..., 1]) >= MOVING_MPS)
    ijk = np.argwhere(moving)
    if ijk.size == 0:
        return np.zeros((0, 2)), np.zeros((0, 2))
    vel = flow[moving].astype(np.float64)
    lo = np.asarray(grid.range_min_m[:2])
    xy = lo + (ijk[:, :2] + 0.5) * grid.voxel_size_m
    ncell = np.ceil((np.asarray(grid.range_max_m[:2]) - lo) / cell_m).astype(np.int64)
    cell = np.minimum(((xy - lo) // cell_m).astype(np.int64), ncell - 1)
    cid = cell[:, 0] * ncell[1] + cell[:, 1]
    used, inverse, counts = np.unique(cid, return_inverse=True, return_counts=True)
    mean_v = np.stack([np.bincount(inverse, weights=vel[:, k]) for k in range(2)], axis=1) / counts[:, None]
    centres = lo + (np.stack([used // ncell[1], used % ncell[1]], axis=1) + 0.5) * cell_m
    return centres, mean_v


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 4, 2) BEV corners (x, y) m of boxes ``[x, y, z, l, w, h, yaw]`` (ego frame), counter-clockwise."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    half = boxes[:, 3:5] / 2.0
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
    local = signs[None] * half[:, None, :]  # (N, 4, 2) in the box frame
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], axis=1)  # ego_from_box (N, 2, 2)
    return np.einsum("nkj,nij->nki", local, rot) + boxes[:, None, :2]


# -- one frame -----------------------------------------------------------------------------------------


@dataclass
class CameraPanel:
    """A camera to draw: its calibration and its image (None: the panel says ``missing_text``)."""

    calibration: CameraCalibration
    image: np.ndarray | None = None
    missing_text: str = ""


@dataclass
class RenderedFrame:
    """A rendered picture: the figure, its axes, and the mapping from ego metres / camera pixels to pixels."""

    figure: Any
    bev_axes: Any
    width: int
    height: int
    camera_axes: dict[str, Any] = field(default_factory=dict)

    def _pixel(self, axes: Any, xy: tuple[float, float]) -> tuple[int, int]:
        self.figure.canvas.draw()
        disp_x, disp_y = axes.transData.transform(xy)
        return int(np.floor(self.height - disp_y)), int(np.floor(disp_x))

    def pixel_of(self, x_m: float, y_m: float) -> tuple[int, int]:
        """(row, col) of the saved picture's pixel showing ego-frame point (x, y) metres."""
        return self._pixel(self.bev_axes, (y_m, x_m))  # the BEV axes plot (y, x)

    def pixel_of_camera(self, channel: str, u: float, v: float) -> tuple[int, int]:
        """(row, col) of the saved picture's pixel showing pixel ``(u, v)`` of camera ``channel``'s image."""
        return self._pixel(self.camera_axes[channel], (u, v))

    def to_rgb(self) -> np.ndarray:
        """(height, width, 3) uint8 RGB pixels."""
        self.figure.canvas.draw()
        return np.asarray(self.figure.canvas.buffer_rgba())[..., :3].copy()

    def save(self, path: StrPath) -> Path:
        """Write the picture (format from the suffix, e.g. ``.png``) at its exact pixel size.

        Raises:
            VizError: the file or its folder cannot be written (the path and the reason are named).
        """
        path = Path(path)
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.figure.savefig(path, dpi=self.figure.dpi)
            except ValueError as exc:  # matplotlib: "Format 'xyz' is not supported ..."
                raise VizError(f"{path}: cannot write the picture: {exc}; use .png, .jpg or .svg") from None
        return path


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into one clear :class:`VizError` naming it and the reason."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise VizError(
            f"{path}: cannot write the picture: {reason}{where}; choose a writable --out path"
        ) from None


def _camera_grid(panels: Sequence[CameraPanel], size_px: int) -> tuple[list[list[int]], float, float]:
    """Rows of panel indices, the cell width and height (pixels) for a region ``size_px`` high."""
    rows = camera_layout([p.calibration for p in panels])
    ncols = max((len(r) for r in rows), default=1)
    width = size_px if ncols == 1 else 2 * size_px
    aspect = max(p.calibration.image_size[1] / max(p.calibration.image_size[0], 1) for p in panels)
    cell_w = 0.98 * width / ncols
    title_px = 0.045 * size_px
    available = size_px * 0.70  # the rest: figure title, legend, time
    if len(rows) * (cell_w * aspect + title_px) > available:
        cell_w = (available / len(rows) - title_px) / aspect
    return rows, cell_w, cell_w * aspect


def render_frame(
    semantics: np.ndarray | None,
    flow: np.ndarray | None = None,
    *,
    mask_lidar: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    box_names: Sequence[str] | None = None,
    cameras: Sequence[CameraPanel] | None = None,
    title: str = "",
    classes: ClassTable = OPENSCENE_CLASSES,
    grid: VoxelGrid = GRID,
    size_px: int = 800,
    legend: bool = True,
) -> RenderedFrame:
    """Render one frame: the BEV panel (classes, flow arrows and their scale, boxes, ego, unobserved
    shade) and the camera panels as they sit on the car, with the boxes projected into them.

    Args:
        semantics: (X, Y, Z) class ids on ``grid``, or None to draw boxes only.
        flow: optional (X, Y, Z, 2) (vx, vy) m/s, ego frame.
        mask_lidar: optional (X, Y, Z) bool, True where a ray observed the voxel (free columns no ray
            observed are shaded).
        boxes: optional (N, 7) ``[x, y, z, l, w, h, yaw]`` in the ego frame (the frame row's
            ``anns.gt_boxes``); ``box_names`` their category names (for colours).
        cameras: camera panels (any number; None or empty: the BEV panel alone).
        title: figure title (e.g. log, frame, token, local time).
        classes: the class table of ``semantics``.
        grid: the voxel grid.
        size_px: height of the picture and edge of the (square) BEV panel, pixels. With cameras the
            picture is ``size_px`` (one camera column) or ``2 * size_px`` (more) wider.
        legend: draw the legend (off for thumbnails).
    """
    Figure, FigureCanvasAgg = _require_matplotlib()
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    dpi = 100
    panels = list(cameras or [])
    rows, cell_w, cell_h = _camera_grid(panels, size_px) if panels else ([], 0.0, 0.0)
    right_px = 0 if not panels else (size_px if max(len(r) for r in rows) == 1 else 2 * size_px)
    width_px, height_px = size_px + right_px, size_px
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fs = max(5.0, 9.0 * size_px / 800)  # font size follows the picture size
    lw = max(0.5, 1.2 * size_px / 800)  # so do line widths
    halo = [patheffects.withStroke(linewidth=2.3 * lw, foreground="black")]
    # margins for tick labels: a fixed fraction, or more on small pictures where fonts stop shrinking
    bottom, left = max(0.07, 34.0 / size_px), max(0.08, 40.0 / size_px)
    top = 0.90 if title else 0.96
    ax = fig.add_axes((left * size_px / width_px, bottom, (0.98 - left) * size_px / width_px, top - bottom))
    (x0, y0, _), (x1, y1, _) = grid.range_min_m, grid.range_max_m
    colors = class_colors(classes)

    present: list[int] = []
    moving = False
    if semantics is not None:
        semantics = np.asarray(semantics)
        top_cls, top_z = top_view(semantics, classes.free)
        present = [int(c) for c in np.unique(top_cls) if c != classes.free]
        observed = None if mask_lidar is None else np.asarray(mask_lidar, dtype=bool).any(axis=2)
        # rows of the image are x (up), columns y; the y axis is inverted below so that left is +y
        ax.imshow(
            column_colors(top_cls, top_z, semantics.shape[2], classes, observed),
            origin="lower",
            extent=(y0, y1, x0, x1),
            interpolation="nearest",
            aspect="equal",
        )
        pos, vel = (np.zeros((0, 2)), np.zeros((0, 2)))
        if flow is not None:
            pos, vel = moving_arrows(semantics, np.asarray(flow), grid, classes=classes)
            moving = len(pos) > 0
        # the scale arrow (ARROW_KEY_MPS to the right of the picture: -y) rides in the same quiver
        span = x1 - x0
        key_x, key_y = x0 + 0.05 * span, y0 + 0.04 * (y1 - y0) + ARROW_KEY_MPS * ARROW_SECONDS
        ax.add_patch(
            Rectangle(
                (y0 + 0.01 * (y1 - y0), x0 + 0.015 * span),
                0.04 * (y1 - y0) + ARROW_KEY_MPS * ARROW_SECONDS + 0.12 * (y1 - y0),
                0.06 * span,
                facecolor="white",
                edgecolor="black",
                linewidth=0.5,
                alpha=0.9,
                zorder=6,
            )
        )
        ax.quiver(
            np.append(pos[:, 1], key_y), np.append(pos[:, 0], key_x),
            np.append(vel[:, 1], -ARROW_KEY_MPS), np.append(vel[:, 0], 0.0),
            angles="xy", scale_units="xy", scale=1.0 / ARROW_SECONDS, color="black", zorder=7,
            width=max(0.003, 1.6 / size_px),  # at least ~1.5 px wide
        )  # fmt: skip
        ax.text(
            key_y + 0.01 * (y1 - y0), key_x, f"{ARROW_KEY_MPS:g} m/s", ha="right", va="center",
            fontsize=fs * 0.9, zorder=7,
        )  # fmt: skip
    else:
        ax.set_facecolor("white")

    b = np.asarray(boxes if boxes is not None else np.zeros((0, 7)), dtype=np.float64).reshape(-1, 7)
    names = list(box_names) if box_names is not None else ["vehicle"] * len(b)
    box_rgb = category_colors(names)
    if len(b):
        ax.add_collection(
            PolyCollection(
                box_corners(b)[..., ::-1], closed=True, facecolors="none", edgecolors=box_rgb,
                linewidths=lw, zorder=3, path_effects=halo,
            )
        )  # fmt: skip
        front = b[:, :2] + (b[:, 3:4] / 2.0) * np.stack([np.cos(b[:, 6]), np.sin(b[:, 6])], axis=1)
        heading = np.stack([b[:, :2], front], axis=1)[..., ::-1]
        ax.add_collection(LineCollection(heading, colors=box_rgb, linewidths=lw, zorder=3, path_effects=halo))

    ego = np.array(
        [
            [-EGO_REAR_OVERHANG_M, -EGO_WIDTH_M / 2],
            [EGO_LENGTH_M - EGO_REAR_OVERHANG_M, -EGO_WIDTH_M / 2],
            [EGO_LENGTH_M - EGO_REAR_OVERHANG_M, EGO_WIDTH_M / 2],
            [-EGO_REAR_OVERHANG_M, EGO_WIDTH_M / 2],
        ]
    )
    ax.add_collection(PolyCollection([ego[:, ::-1]], facecolors="black", edgecolors="black", zorder=5))
    ax.plot([0.0, 0.0], [0.0, EGO_LENGTH_M], color="white", linewidth=1.0, zorder=6)

    ax.set_xlim(y1, y0)  # +y (left) on the left
    ax.set_ylim(x0, x1)
    ax.set_aspect("equal")
    ax.set_xlabel("y (m, left)", fontsize=fs)
    ax.set_ylabel("x (m, forward)", fontsize=fs)
    ax.tick_params(labelsize=fs)

    handles: list[Any] = [
        Patch(
            color=colors[c] / 255.0,
            label=classes.names[c] + (" (by height)" if c == classes.background else ""),
        )
        for c in present
    ]
    handles.append(Patch(color="black", label="ego"))
    if semantics is not None:
        handles.append(
            Line2D([], [], color="black", marker=r"$\rightarrow$", markersize=2 * fs, linestyle="None",
                   label=f"flow: motion in {ARROW_SECONDS:g} s" + ("" if moving else " (none moving)"))
        )  # fmt: skip
        if mask_lidar is not None:
            handles.append(
                Patch(
                    facecolor=np.array(UNOBSERVED_RGB) / 255.0, edgecolor="grey", label="unobserved (no ray)"
                )
            )
    if len(b):
        handles.append(Line2D([], [], color="grey", linewidth=2 * lw, label="box (class colour)"))

    if title:
        fig.suptitle(title, fontsize=fs, y=0.995, va="top")

    camera_axes: dict[str, Any] = {}
    if panels:
        x_start = size_px
        title_px = 0.045 * size_px
        y_top = height_px * (top + 0.02)
        for r, row in enumerate(rows):
            row_w = len(row) * cell_w
            x = x_start + (right_px - row_w) / 2
            y = y_top - (r + 1) * (cell_h + title_px)
            for j, index in enumerate(row):
                panel = panels[index]
                cal = panel.calibration
                cam_ax = fig.add_axes(
                    (
                        (x + j * cell_w + 1) / width_px,
                        y / height_px,
                        (cell_w - 2) / width_px,
                        cell_h / height_px,
                    )
                )
                w, h = cal.image_size
                cam_ax.set_xlim(0, w)
                cam_ax.set_ylim(h, 0)
                cam_ax.set_xticks([])
                cam_ax.set_yticks([])
                cam_ax.set_title(cal.channel, fontsize=fs * 0.9, pad=2)
                if panel.image is not None:
                    cam_ax.imshow(panel.image, extent=(0, w, h, 0), interpolation="bilinear", aspect="auto")
                else:
                    cam_ax.set_facecolor((0.93, 0.93, 0.93))
                    cam_ax.text(
                        0.5, 0.5, panel.missing_text or f"{cal.channel}: no image", ha="center", va="center",
                        fontsize=fs * 0.7, transform=cam_ax.transAxes, wrap=True,
                    )  # fmt: skip
                cam_ax.set_xlim(0, w)
                cam_ax.set_ylim(h, 0)
                if len(b):
                    segments, which = project_box_edges(b, cal)
                    if len(segments):
                        cam_lw = max(1.0, lw)  # panels are small: lines at least a pixel wide
                        thin_halo = [patheffects.withStroke(linewidth=cam_lw + 1.0, foreground="black")]
                        cam_ax.add_collection(
                            LineCollection(
                                segments,
                                colors=box_rgb[which],
                                linewidths=cam_lw,
                                zorder=3,
                                path_effects=thin_halo,
                            )
                        )
                camera_axes[cal.channel] = cam_ax
        legend_top = (y_top - len(rows) * (cell_h + title_px) - 0.01 * size_px) / height_px
        fig.legend(
            handles=handles if legend else [], loc="upper center", bbox_to_anchor=((size_px + right_px / 2) / width_px, legend_top),
            ncol=4 if right_px > size_px else 3, fontsize=fs * 0.9, frameon=False,
        )  # fmt: skip
    elif legend:
        ax.legend(handles=handles, loc="upper left", fontsize=fs * 0.8, framealpha=0.85)
    return RenderedFrame(fig, ax, width_px, height_px, camera_axes)


# -- a frame of a collected split --------------------------------------------------------------------

#: Frame-row columns a picture reads.
ROW_COLUMNS = ["token", "timestamp", "scene_name", "frame_idx", "map_location", "anns", "cams"]


@dataclass
class LogFrames:
    """What pictures of one committed log read: its rows, labels and where its images are."""

    log: str
    rows: list[dict[str, Any]]
    occ: Any | None
    blob_root: Path | None
    cameras: tuple[str, ...]
    classes: ClassTable
    grid: VoxelGrid


def open_log_frames(split_dir: StrPath, log: str, blob_root: StrPath | None = None) -> LogFrames:
    """The rows and labels of ``log`` in a collected split (for :func:`render_row`).

    Raises:
        VizError: no such committed log (the message lists some that exist).
    """
    from driveengine.store.dataset import DatasetError, open_split

    split = open_split(split_dir, blob_root=blob_root)
    try:
        committed = split.log(log)
    except DatasetError:
        names = [c.name for c in split.logs]
        known = ", ".join(names[:5]) or "none"
        raise VizError(
            f"{split_dir}: no committed log {log!r} (logs: {known}{', ...' if len(names) > 5 else ''})"
        ) from None
    rows = committed.frames(ROW_COLUMNS).to_pylist()
    occ = committed.labels() if committed.has_labels else None
    root = committed.blob_root
    grid = occ.grid if occ is not None else split.grid
    classes = occ.classes if occ is not None else split.classes
    return LogFrames(log, rows, occ, None if root is None else Path(root), split.cameras, classes, grid)


def select_cameras(frames: LogFrames, camera: str | Sequence[str] | None) -> list[str]:
    """The cameras to draw: ``"all"`` (every camera of the split, the default), ``"none"``/None (the BEV
    panel alone), or names (a comma-separated string or a list).

    Raises:
        VizError: a name that is not a camera of the split (the message lists the split's cameras).
    """
    if camera is None:
        return []
    names = [c.strip() for c in camera.split(",")] if isinstance(camera, str) else [str(c) for c in camera]
    names = [n for n in names if n]
    if [n.lower() for n in names] in (["none"], []):
        return []
    if [n.lower() for n in names] == ["all"]:
        return list(frames.cameras)
    unknown = [n for n in names if n not in frames.cameras]
    if unknown:
        raise VizError(
            f"log {frames.log}: unknown camera {', '.join(unknown)}; the split's cameras are "
            f"{', '.join(frames.cameras)} (or 'all', 'none')"
        )
    return names


def _load_image(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None  # the panel says so


def frame_title(frames: LogFrames, i: int) -> str:
    """``<log>  frame i`` over ``scene ... #idx  token ...  <local time>``."""
    from driveengine.viz.localtime import local_time

    row = frames.rows[i]
    try:
        when = local_time(int(row.get("timestamp") or 0), row.get("map_location")).text()
    except ValueError:
        when = f"t = {row.get('timestamp')} us"
    return (
        f"{frames.log}  frame {i}\nscene {row.get('scene_name', '')} #{row.get('frame_idx', '')}  "
        f"token {row.get('token', '')}  {when}"
    )


def render_row(frames: LogFrames, i: int, cameras: Sequence[str], size_px: int) -> RenderedFrame:
    """The picture of frame (row) ``i`` of a log (see :func:`render_frame`), with the cameras ``cameras``.

    Raises:
        VizError: ``i`` out of range.
    """
    if not 0 <= i < len(frames.rows):
        raise VizError(f"log {frames.log}: frame {i} out of range (the log has {len(frames.rows)} frames)")
    row = frames.rows[i]
    sem = flow = mask = None
    if frames.occ is not None:
        labels = frames.occ.frame(i)
        sem, flow, mask = labels.semantics, labels.flow, labels.mask_lidar
    anns = row.get("anns") or {}
    boxes = np.asarray(anns.get("gt_boxes") or np.zeros((0, 7)), dtype=np.float64).reshape(-1, 7)
    panels = []
    for channel in cameras:
        cam = (row.get("cams") or {}).get(channel) or {}
        rel = cam.get("data_path")
        path = frames.blob_root / rel if frames.blob_root is not None and rel else None
        image = _load_image(path) if path is not None and path.is_file() else None
        try:
            size = None if image is None else (int(image.shape[1]), int(image.shape[0]))
            calibration = CameraCalibration.from_row(channel, cam, size)
        except (KeyError, TypeError, ValueError) as exc:
            raise VizError(
                f"log {frames.log}: frame {i}: camera {channel} has no usable calibration ({exc})"
            ) from None
        missing = ""
        if image is None:
            where = textwrap.fill(str(path or rel or "?"), width=36, break_on_hyphens=False)
            if path is not None and path.is_file():
                missing = f"unreadable image\n{where}"
            else:
                missing = f"no image at\n{where}\n(pass --blob-root)" if rel else "no image"
        panels.append(CameraPanel(calibration, image, missing))
    return render_frame(
        sem, flow, mask_lidar=mask, boxes=boxes, box_names=anns.get("gt_names"), cameras=panels,
        title=frame_title(frames, i), classes=frames.classes, grid=frames.grid, size_px=size_px,
    )  # fmt: skip


def show_frame(
    split_dir: StrPath,
    log: str,
    frame: int,
    out: StrPath,
    *,
    blob_root: StrPath | None = None,
    camera: str | Sequence[str] | None = "all",
    size_px: int = 800,
) -> Path:
    """Write the picture of frame ``frame`` of ``log`` in a collected split to ``out`` (PNG).

    Args:
        split_dir: ``<out>/<split>``.
        log: log name (a manifest entry).
        frame: row index in ``meta/<log>.parquet`` (= index along T of the labels, ``frame_index``).
        out: picture path.
        blob_root: sensor-blob root for the camera images (default: as the manifest records).
        camera: ``"all"`` cameras, ``"none"``/None for the BEV panel only, or camera names (see
            :func:`select_cameras`).
        size_px: picture height in pixels.

    Raises:
        VizError: unknown log or camera, frame out of range, matplotlib missing, unwritable ``out``.
    """
    frames = open_log_frames(split_dir, log, blob_root)
    rendered = render_row(frames, frame, select_cameras(frames, camera), size_px)
    return rendered.save(out)


def show_video(
    split_dir: StrPath,
    log: str,
    out: StrPath,
    *,
    frames: Iterable[int] | None = None,
    blob_root: StrPath | None = None,
    camera: str | Sequence[str] | None = "all",
    size_px: int = 400,
    frame_ms: int = 500,
    quiet: bool | None = None,
) -> Path:
    """Render frames of a log as a video: MP4 (``out`` ending in ``.mp4``, H.264 through imageio-ffmpeg)
    or an animated GIF (``.gif``); any other suffix is refused before anything is rendered.

    Args:
        split_dir, log, blob_root, camera, size_px: as in :func:`show_frame`.
        out: ``*.mp4`` or ``*.gif``.
        frames: row indices to render (default: all, in order).
        frame_ms: display time of each frame, milliseconds (500 = the 2 Hz key-frame rate).
        quiet: no progress display (default: :func:`driveengine.progress.is_quiet`).

    Returns:
        The video's path.

    Raises:
        VizError: an unknown suffix, MP4 without imageio-ffmpeg (the message says what to install), no
            frames, or the errors of :func:`show_frame`.
    """
    from driveengine.progress import progress

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise VizError(
            f"{out}: cannot write a video with suffix {suffix or '(none)'!r}; use .mp4 or .gif "
            "(for single pictures drop --video)"
        )
    ffmpeg = _require_ffmpeg(out) if suffix == ".mp4" else None
    log_frames = open_log_frames(split_dir, log, blob_root)
    cameras = select_cameras(log_frames, camera)
    indices = list(range(len(log_frames.rows))) if frames is None else list(frames)
    if not indices:
        raise VizError(f"log {log}: no frames to render")
    for i in indices:
        if not 0 <= i < len(log_frames.rows):
            raise VizError(f"log {log}: frame {i} out of range (the log has {len(log_frames.rows)} frames)")
    with progress(len(indices), desc=f"video {log}", unit="frame", quiet=quiet) as bar:
        pictures = (_rendered_rgb(log_frames, i, cameras, size_px, bar) for i in indices)
        with _writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            if ffmpeg is not None:
                _write_mp4(ffmpeg, out, pictures, frame_ms)
            else:
                _write_gif(out, pictures, frame_ms)
    return out


def _rendered_rgb(frames: LogFrames, i: int, cameras: Sequence[str], size_px: int, bar: Any) -> np.ndarray:
    rgb = render_row(frames, i, cameras, size_px).to_rgb()
    bar.update(1)
    return rgb


def _require_ffmpeg(out: Path) -> Any:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise VizError(
            f"{out}: writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg, or driveengine[viz]: a wheel "
            "with its own ffmpeg, no system package); or write a .gif"
        ) from None
    return imageio_ffmpeg


def _write_mp4(ffmpeg: Any, out: Path, pictures: Iterator[np.ndarray], frame_ms: int) -> None:
    """H.264 (yuv420p, plays everywhere); each picture padded with white to a multiple of 16 pixels."""
    writer = None
    try:
        for rgb in pictures:
            h, w = rgb.shape[:2]
            ph, pw = -h % 16, -w % 16
            if ph or pw:
                rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=255)
            if writer is None:
                writer = ffmpeg.write_frames(
                    str(out), (rgb.shape[1], rgb.shape[0]), fps=1000.0 / frame_ms, codec="libx264",
                    pix_fmt_out="yuv420p", macro_block_size=16, quality=7, ffmpeg_log_level="error",
                )  # fmt: skip
                writer.send(None)  # start the ffmpeg process
            writer.send(np.ascontiguousarray(rgb))
    finally:
        if writer is not None:
            writer.close()


def _write_gif(out: Path, pictures: Iterator[np.ndarray], frame_ms: int) -> None:
    """An animated GIF; each picture is quantised as it comes (only palette images are held)."""
    from PIL import Image

    images = [Image.fromarray(rgb).quantize(colors=128) for rgb in pictures]
    images[0].save(out, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


# -- Open3D ------------------------------------------------------------------------------------------


def show_3d(semantics: np.ndarray, grid: VoxelGrid = GRID, classes: ClassTable = OPENSCENE_CLASSES) -> None:
    """Open an interactive Open3D window with the occupied voxels in class colours.

    Raises:
        VizError: no display (``DISPLAY`` / ``WAYLAND_DISPLAY`` unset) or Open3D missing/broken; the
            message says what to install or to use the PNG view instead.
    """
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise VizError(
            "no display (DISPLAY is not set): the 3D view needs a desktop; use the PNG view instead"
        )
    try:
        import open3d as o3d
    except (ImportError, OSError) as exc:
        raise VizError(f"Open3D is unavailable ({exc}): pip install driveengine[o3d]") from None
    ijk = np.argwhere(np.asarray(semantics) != classes.free)
    cls = np.asarray(semantics)[tuple(ijk.T)]
    centres = np.asarray(grid.range_min_m) + (ijk + 0.5) * grid.voxel_size_m
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(centres))
    pcd.colors = o3d.utility.Vector3dVector(class_colors(classes)[np.minimum(cls, classes.free)] / 255.0)
    voxels = o3d.geometry.VoxelGrid.create_from_point_cloud(pcd, voxel_size=grid.voxel_size_m)
    o3d.visualization.draw_geometries([voxels], window_name="DriveEngine occupancy")


def show_frame_3d(split_dir: StrPath, log: str, frame: int) -> None:
    """:func:`show_3d` of one frame of a collected split (see there for errors)."""
    frames = open_log_frames(split_dir, log, None)
    if frames.occ is None:
        raise VizError(f"log {log} was collected without labels; nothing to show in 3D")
    if not 0 <= frame < frames.occ.num_frames:
        raise VizError(f"log {log}: frame {frame} out of range (the log has {frames.occ.num_frames} frames)")
    show_3d(frames.occ.frame(frame).semantics, frames.occ.grid, frames.occ.classes)
