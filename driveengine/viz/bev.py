"""Bird's-eye-view pictures of occupancy, flow and boxes (PNG, GIF), and an optional Open3D voxel view.

The BEV panel is a top view of the ego frame of the key frame (x forward points **up** in the
picture, y left points **left**, metres on both axes; origin at the rear axle). Each (x, y) column of
the voxel grid is painted in the colour of its **highest occupied voxel's class**
(:data:`CLASS_COLORS`), white where the column is free; background columns are grey, lighter for
low tops (ground) and darker for high ones (buildings, poles). Moving voxels (foreground with a speed of at
least 0.2 m/s) are summarised as one arrow per 4 m x 4 m cell showing the distance the cell's mean
(vx, vy) covers in 0.5 s. Box outlines come from the frame row's ``anns`` (ego frame, yaw relative to the ego), with a
line from the centre to the front, in class colours with a black halo. The ego is drawn as a black outline of a 5.2 m x 2.3 m car whose rear
axle is 1.0 m ahead of its rear bumper (nuPlan's Pacifica, approximate).

A side panel shows one camera image (``CAM_F0`` by default) when its file exists.

Rendering uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change);
matplotlib is the ``viz`` extra (``pip install driveengine[viz]``).
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.schemas.classes import BACKGROUND, CLASS_NAMES, FOREGROUND_BELOW, FREE, NUM_CLASSES
from driveengine.schemas.grid import GRID, VoxelGrid
from driveengine.sources.nuplan.constants import CATEGORY_TO_CLASS

StrPath = str | os.PathLike[str]

#: RGB colour (uint8) of each class id 0..16 (16 = free: white). Unused ids share a dark grey.
CLASS_COLORS: np.ndarray = np.array(
    [
        (255, 120, 30),  # 0 vehicle
        (90, 90, 90),  # 1 unused
        (90, 90, 90),  # 2 unused
        (90, 90, 90),  # 3 unused
        (230, 0, 230),  # 4 czone_sign
        (220, 20, 60),  # 5 bicycle
        (140, 80, 40),  # 6 generic_object
        (30, 60, 230),  # 7 pedestrian
        (240, 200, 0),  # 8 traffic_cone
        (0, 150, 140),  # 9 barrier
        (185, 185, 185),  # 10 background
        (90, 90, 90),  # 11 unused
        (90, 90, 90),  # 12 unused
        (90, 90, 90),  # 13 unused
        (90, 90, 90),  # 14 unused
        (90, 90, 90),  # 15 unused
        (255, 255, 255),  # 16 free
    ],
    dtype=np.uint8,
)

#: Ego outline in the ego frame (m): nuPlan's Pacifica, approximately (rear axle at the origin).
EGO_LENGTH_M, EGO_WIDTH_M, EGO_REAR_OVERHANG_M = 5.2, 2.3, 1.0
#: Speed (m/s) from which a foreground voxel counts as moving (the EPE split of the metrics).
MOVING_MPS = 0.2
#: Edge (m) of the cells over which flow arrows are averaged.
ARROW_CELL_M = 4.0
#: Arrows show the displacement over this many seconds.
ARROW_SECONDS = 0.5


class VizError(DriveEngineError):
    """A picture cannot be made (missing optional dependency, bad frame index, no display, ...)."""


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


def top_view(semantics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The highest (largest z) non-free voxel of each column.

    Args:
        semantics: (X, Y, Z) class ids indexed ``[x, y, z]``, FREE = 16.

    Returns:
        ``top`` (X, Y) uint8 class of that voxel (FREE for an empty column) and ``top_z`` (X, Y) int
        its z index (-1 for an empty column).
    """
    occupied = semantics != FREE
    nz = semantics.shape[2]
    top_z = nz - 1 - np.argmax(occupied[:, :, ::-1], axis=2)
    top = np.take_along_axis(semantics, top_z[..., None], axis=2)[..., 0]
    any_occ = occupied.any(axis=2)
    return np.where(any_occ, top, FREE).astype(np.uint8), np.where(any_occ, top_z, -1)


#: Grey levels of background columns whose top voxel is at the lowest / highest z index: height
#: shading that tells ground from buildings and poles (other classes keep their exact colour).
BACKGROUND_GREY_LOW_HIGH = (215, 95)


def column_colors(top: np.ndarray, top_z: np.ndarray, nz: int) -> np.ndarray:
    """(X, Y, 3) uint8 RGB of a top view: :data:`CLASS_COLORS`, background shaded by height."""
    rgb = CLASS_COLORS[top]
    low, high = BACKGROUND_GREY_LOW_HIGH
    grey = np.round(low + (high - low) * top_z / max(nz - 1, 1)).astype(np.uint8)
    return np.where((top == BACKGROUND)[..., None], grey[..., None], rgb)


def moving_arrows(
    semantics: np.ndarray, flow: np.ndarray, grid: VoxelGrid = GRID, cell_m: float = ARROW_CELL_M
) -> tuple[np.ndarray, np.ndarray]:
    """Flow arrows of moving foreground voxels, averaged per ``cell_m`` x ``cell_m`` cell.

    Args:
        semantics: (X, Y, Z) class ids.
        flow: (X, Y, Z, 2) (vx, vy) m/s, ego frame.
        grid: the voxel grid (for metric positions).
        cell_m: cell edge, metres.

    Returns:
        ``positions`` (K, 2) cell centres (x, y) m, ego frame, and ``velocities`` (K, 2) mean (vx, vy)
        m/s of the moving voxels in each of the K cells that hold any.
    """
    flow = np.asarray(flow, dtype=np.float32)
    moving = (semantics < FOREGROUND_BELOW) & (np.hypot(flow[..., 0], flow[..., 1]) >= MOVING_MPS)
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
class RenderedFrame:
    """A rendered picture: the figure, its BEV axes, and the mapping from ego metres to pixels."""

    figure: Any
    bev_axes: Any
    width: int
    height: int

    def pixel_of(self, x_m: float, y_m: float) -> tuple[int, int]:
        """(row, col) of the saved picture's pixel showing ego-frame point (x, y) metres."""
        self.figure.canvas.draw()
        disp_x, disp_y = self.bev_axes.transData.transform((y_m, x_m))  # BEV axes plot (y, x)
        return int(np.floor(self.height - disp_y)), int(np.floor(disp_x))

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


def render_frame(
    semantics: np.ndarray | None,
    flow: np.ndarray | None = None,
    *,
    boxes: np.ndarray | None = None,
    box_names: Sequence[str] | None = None,
    camera_image: np.ndarray | None = None,
    camera_label: str | None = "CAM_F0",
    camera_missing_text: str | None = None,
    title: str = "",
    grid: VoxelGrid = GRID,
    size_px: int = 800,
) -> RenderedFrame:
    """Render one frame: BEV panel (classes, flow arrows, boxes, ego) and optionally a camera panel.

    Args:
        semantics: (X, Y, Z) class ids on ``grid`` (FREE = 16), or None to draw boxes only.
        flow: optional (X, Y, Z, 2) (vx, vy) m/s, ego frame.
        boxes: optional (N, 7) ``[x, y, z, l, w, h, yaw]`` in the ego frame (the frame row's
            ``anns.gt_boxes``); ``box_names`` their nuPlan category names (for colours).
        camera_image: optional (H, W, 3) uint8 RGB image for the side panel.
        camera_label: title of the side panel; None for no side panel at all (a missing image with a
            label gives a panel saying so, so pictures of one log keep one size).
        camera_missing_text: what the side panel says without an image (default "<label>: no image").
        title: figure title.
        grid: the voxel grid.
        size_px: edge of each (square) panel in pixels; the picture is ``size_px`` high and
            ``size_px`` (no side panel) or ``2 * size_px`` wide.
    """
    Figure, FigureCanvasAgg = _require_matplotlib()
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.patches import Patch

    dpi = 100
    panels = 1 if camera_label is None else 2
    fig = Figure(figsize=(panels * size_px / dpi, size_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    # margins for tick labels: a fixed fraction, or more on small pictures where fonts stop shrinking
    bottom, left = max(0.07, 34.0 / size_px), max(0.08, 40.0 / size_px)
    ax = fig.add_axes((left / panels, bottom, (0.98 - left) / panels, 0.93 - bottom))
    (x0, y0, _), (x1, y1, _) = grid.range_min_m, grid.range_max_m

    present: list[int] = []
    if semantics is not None:
        semantics = np.asarray(semantics)
        top, top_z = top_view(semantics)
        present = [int(c) for c in np.unique(top) if c != FREE]
        # rows of the image are x (up), columns y; the y axis is inverted below so that left is +y
        ax.imshow(
            column_colors(top, top_z, semantics.shape[2]),
            origin="lower",
            extent=(y0, y1, x0, x1),
            interpolation="nearest",
            aspect="equal",
        )
        if flow is not None:
            pos, vel = moving_arrows(np.asarray(semantics), np.asarray(flow), grid)
            if len(pos):
                ax.quiver(
                    pos[:, 1], pos[:, 0], vel[:, 1], vel[:, 0],
                    angles="xy", scale_units="xy", scale=1.0 / ARROW_SECONDS, color="black", width=0.003, zorder=4,
                )  # fmt: skip
    else:
        ax.set_facecolor("white")

    if boxes is not None and len(boxes):
        corners = box_corners(boxes)
        # a black halo keeps class-coloured outlines visible on voxels of the same colour
        lw = max(0.5, 1.2 * size_px / 800)  # line widths follow the picture size
        halo = [patheffects.withStroke(linewidth=2.3 * lw, foreground="black")]
        names = list(box_names) if box_names is not None else ["vehicle"] * len(corners)
        colors = CLASS_COLORS[[CATEGORY_TO_CLASS.get(str(n), 6) for n in names]] / 255.0
        ax.add_collection(
            PolyCollection(
                corners[..., ::-1],
                closed=True,
                facecolors="none",
                edgecolors=colors,
                linewidths=lw,
                zorder=3,
                path_effects=halo,
            )
        )
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
        front = b[:, :2] + (b[:, 3:4] / 2.0) * np.stack([np.cos(b[:, 6]), np.sin(b[:, 6])], axis=1)
        heading = np.stack([b[:, :2], front], axis=1)[..., ::-1]
        ax.add_collection(LineCollection(heading, colors=colors, linewidths=lw, zorder=3, path_effects=halo))

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
    fs = max(5.0, 9.0 * size_px / 800)  # font size follows the picture size
    ax.set_xlabel("y (m, left)", fontsize=fs)
    ax.set_ylabel("x (m, forward)", fontsize=fs)
    ax.tick_params(labelsize=fs)
    if present:
        handles = [
            Patch(
                color=CLASS_COLORS[c] / 255.0,
                label=CLASS_NAMES[c] + (" (by height)" if c == BACKGROUND else ""),
            )
            for c in present
        ]
        if camera_label is not None:  # below the camera image, off the BEV
            fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.75, 0.08), ncol=4, fontsize=fs)
        else:
            ax.legend(handles=handles, loc="lower left", fontsize=fs * 0.85, framealpha=0.85)
    if title:
        fig.suptitle(title, fontsize=fs)

    if camera_label is not None:
        cam_ax = fig.add_axes((0.52, bottom, 0.46, 0.93 - bottom))
        cam_ax.set_axis_off()
        if camera_image is not None:
            cam_ax.imshow(camera_image)
            cam_ax.set_title(camera_label, fontsize=fs)
        else:
            text = camera_missing_text or f"{camera_label}: no image"
            cam_ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=fs, wrap=True)
    return RenderedFrame(fig, ax, panels * size_px, size_px)


# -- a frame of a collected split --------------------------------------------------------------------


@dataclass
class _LogFrames:
    rows: list[dict[str, Any]]
    occ: Any | None
    blob_root: Path | None


def _open_log(split_dir: Path, log: str, blob_root: StrPath | None) -> _LogFrames:
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
    columns = ["token", "timestamp", "scene_name", "frame_idx", "anns", "cams"]
    rows = committed.frames(columns).to_pylist()
    occ = committed.labels() if committed.has_labels else None
    root = committed.blob_root
    return _LogFrames(rows, occ, None if root is None else Path(root))


def _render_row(
    frames: _LogFrames, i: int, log: str, camera: str | None, grid: VoxelGrid, size_px: int
) -> RenderedFrame:
    if not 0 <= i < len(frames.rows):
        raise VizError(f"log {log}: frame {i} out of range (the log has {len(frames.rows)} frames)")
    row = frames.rows[i]
    sem = flow = None
    if frames.occ is not None:
        labels = frames.occ.frame(i)
        sem, flow, grid = labels.semantics, labels.flow, frames.occ.grid
    anns = row.get("anns") or {}
    boxes = np.asarray(anns.get("gt_boxes") or np.zeros((0, 7)), dtype=np.float64).reshape(-1, 7)
    image = None
    missing = None
    if camera is not None:
        rel = ((row.get("cams") or {}).get(camera) or {}).get("data_path")
        path = frames.blob_root / rel if frames.blob_root is not None and rel else None
        if path is not None and path.is_file():
            from PIL import Image

            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        elif rel:
            where = textwrap.fill(str(path or rel), width=48, break_on_hyphens=False)
            missing = f"{camera}: no image at\n{where}\n(pass --blob-root)"
    title = (
        f"{log}  frame {i}\nscene {row.get('scene_name', '')} #{row.get('frame_idx', '')}  "
        f"token {row.get('token', '')}  t = {row.get('timestamp', '')} us"
    )
    return render_frame(
        sem, flow, boxes=boxes, box_names=anns.get("gt_names"), camera_image=image, camera_label=camera,
        camera_missing_text=missing, title=title, grid=grid, size_px=size_px,
    )  # fmt: skip


def show_frame(
    split_dir: StrPath,
    log: str,
    frame: int,
    out: StrPath,
    *,
    blob_root: StrPath | None = None,
    camera: str | None = "CAM_F0",
    size_px: int = 800,
) -> Path:
    """Write the picture of frame ``frame`` of ``log`` in a collected split to ``out`` (PNG).

    Args:
        split_dir: ``<out>/<split>``.
        log: log name (a manifest entry).
        frame: row index in ``meta/<log>.parquet`` (= index along T of the labels).
        out: picture path.
        blob_root: sensor-blob root for the camera image (default: guessed from the manifest entry).
        camera: camera channel of the side panel, or None for the BEV panel only.
        size_px: panel edge in pixels.

    Raises:
        VizError: unknown log, frame out of range, matplotlib missing.
    """
    frames = _open_log(Path(split_dir), log, blob_root)
    rendered = _render_row(frames, frame, log, camera, GRID, size_px)
    return rendered.save(out)


def show_video(
    split_dir: StrPath,
    log: str,
    out: StrPath,
    *,
    frames: Iterable[int] | None = None,
    blob_root: StrPath | None = None,
    camera: str | None = "CAM_F0",
    size_px: int = 400,
    frame_ms: int = 500,
) -> Path:
    """Render frames of a log as an animated GIF (``out`` ending in ``.gif``) or a folder of PNGs.

    Args:
        split_dir, log, blob_root, camera, size_px: as in :func:`show_frame`.
        out: ``*.gif`` for an animation, otherwise a folder receiving ``frame_0000.png``, ...
        frames: row indices to render (default: all, in order).
        frame_ms: display time of each GIF frame, milliseconds (500 = the 2 Hz key-frame rate).

    Returns:
        The GIF or the folder.
    """
    from PIL import Image

    log_frames = _open_log(Path(split_dir), log, blob_root)
    indices = list(range(len(log_frames.rows))) if frames is None else list(frames)
    if not indices:
        raise VizError(f"log {log}: no frames to render")
    out = Path(out)
    if out.suffix.lower() != ".gif":
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
        for i in indices:
            _render_row(log_frames, i, log, camera, GRID, size_px).save(out / f"frame_{i:04d}.png")
        return out
    # quantise each frame as it is rendered so only palette images are held in memory
    images = [
        Image.fromarray(_render_row(log_frames, i, log, camera, GRID, size_px).to_rgb()).quantize(colors=128)
        for i in indices
    ]
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(out, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return out


# -- Open3D ------------------------------------------------------------------------------------------


def show_3d(semantics: np.ndarray, grid: VoxelGrid = GRID) -> None:
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
    ijk = np.argwhere(np.asarray(semantics) != FREE)
    cls = np.asarray(semantics)[tuple(ijk.T)]
    centres = np.asarray(grid.range_min_m) + (ijk + 0.5) * grid.voxel_size_m
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(centres))
    pcd.colors = o3d.utility.Vector3dVector(CLASS_COLORS[np.minimum(cls, NUM_CLASSES)] / 255.0)
    voxels = o3d.geometry.VoxelGrid.create_from_point_cloud(pcd, voxel_size=grid.voxel_size_m)
    o3d.visualization.draw_geometries([voxels], window_name="DriveEngine occupancy")


def show_frame_3d(split_dir: StrPath, log: str, frame: int) -> None:
    """:func:`show_3d` of one frame of a collected split (see there for errors)."""
    frames = _open_log(Path(split_dir), log, None)
    if frames.occ is None:
        raise VizError(f"log {log} was collected without labels; nothing to show in 3D")
    if not 0 <= frame < frames.occ.num_frames:
        raise VizError(f"log {log}: frame {frame} out of range (the log has {frames.occ.num_frames} frames)")
    show_3d(frames.occ.frame(frame).semantics, frames.occ.grid)
