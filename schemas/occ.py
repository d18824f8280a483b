"""Zarr v3 specs of the per-log occupancy labels, ``occ/<log>.zarr`` (format version 2).

One Zarr v3 group per log, ``T`` frames (row ``i`` of ``meta/<log>.parquet`` is index ``i`` along T).
The label arrays are a registry (:data:`LABEL_ARRAYS`); a group holds the required ones and any
optional ones its producer wrote (group attribute ``arrays``):

=========== ======== ======================= ===========================================================
array       dtype    shape                   meaning
=========== ======== ======================= ===========================================================
semantics   uint8    (T, nx, ny, nz)         class id per voxel (the group's ``class_table``), its
                                             ``free`` id where nothing was seen
flow        float16  (T, nx, ny, nz, 2)      (vx, vy) m/s in the ego frame of the frame; 0 off objects
mask_lidar  bool     (T, nx, ny, nz)         True where a LiDAR ray of the frame observed the voxel
                                             (passed through it, or ended in it)
mask_camera bool     (T, nx, ny, nz)         optional: True where the voxel is observed from the frame's
                                             camera views (Occ3D-nuScenes' ``mask_camera``; imported)
=========== ======== ======================= ===========================================================

The grid (the group's ``grid`` attribute, a :class:`~driveengine.schemas.grid.VoxelGrid`) is in the ego
frame of the frame (x forward, y left, z up, rear axle), indexed ``[x, y, z]`` (so OpenScene's flat
index ``x + nx*y + nx*ny*z`` is *not* the C-order position in the dense array). Chunks are one frame;
shards hold ``shard_frames`` frames and are written whole (shard-aligned), so a writer holds at most
one shard in memory. Every shard is written, fill values included: a missing shard file is damage.

Group attributes (all JSON): ``format`` (:data:`OCC_FORMAT`), ``format_version``, ``grid``
(``VoxelGrid.to_dict()``), ``class_table`` (``ClassTable.to_dict()``), ``classes`` (``{"0": name, ...}``,
as in version 1), ``free``, ``background``, ``flow`` (units and frame, in words), ``frames`` (T),
``timestamps_us`` (T ints or null), ``arrays`` (the label arrays present), ``coordinate_arrays`` (the
coordinate arrays present; absent in older groups), ``generator`` (how the labels
were made: the label recipe, or a description of the source of imported labels), ``stats`` (free-form,
may be absent). Version 1 groups lack ``class_table`` and ``arrays`` (OpenScene's table; the three
required arrays).

**Coordinate arrays** (:data:`COORDINATE_ARRAYS`; format version 2 groups written since DriveEngine
0.2 have them, readers never require them): small 1-D arrays that label the axes for tools such as
xarray (``xr.open_zarr(path)`` shows ``x``/``y``/``z`` in metres and selects frames by token), listed in
the group attribute ``coordinate_arrays``. They are **not label arrays**: the group attribute ``arrays``
lists the label arrays, and every DriveEngine reader reads only those.

============= ========= =========== ===================================================================
array         dtype     dimension   meaning
============= ========= =========== ===================================================================
frame         int64     frame       0 .. T-1: index along T = the row's ``frame_index`` in the shard
token         string    frame       the frame row's ``token`` (variable-length UTF-8); only when the
                                    writer was given the tokens
timestamp_us  int64     frame       the frame row's ``timestamp``, microseconds since the Unix epoch
                                    (UTC); only when the writer was given the timestamps
x, y, z       float64   x, y, z     voxel centres, metres, ego frame (``range_min + (i + 0.5) * size``)
component     string    component   ``vx``, ``vy``: the flow components
============= ========= =========== ===================================================================

Each label array's attribute ``coordinates`` names the non-dimension coordinates along its ``frame``
axis (``"token timestamp_us"``, CF convention), so xarray makes them coordinates, not data variables.
The group's ``zarr.json`` also holds **consolidated metadata** (zarr-python's inline
``consolidated_metadata``, written when the writer closes) so that xarray opens the group in one read
and without a warning; DriveEngine's own reader ignores it and reads each array's own ``zarr.json``.

**Adding a label array** is one :func:`register_label_array` call here (name, dtype, per-voxel
components, fill value, description); the writer (``driveengine.store.occ``), the readers, the loader's
fields and the verifiers follow the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable
from driveengine.schemas.grid import GRID, VoxelGrid

#: Value of the group attribute ``format``.
OCC_FORMAT = "driveengine-occ"

#: Frames per shard (chunks are one frame). 16 frames = 10 MiB of semantics, 41 MiB of flow and
#: 10 MiB of mask uncompressed on OpenScene's grid: the most a writer holds at once.
SHARD_FRAMES = 16

#: Default compressor of every array: Zstandard at this level (grids are mostly free / 0 / False).
COMPRESSOR = "zstd"
COMPRESSION_LEVEL = 3


@dataclass(frozen=True)
class LabelArray:
    """A kind of label array (grid-independent).

    Attributes:
        name: array name inside the group (also the loader field's name).
        dtype: numpy dtype of the elements.
        components: per-voxel shape after ``(nx, ny, nz)`` (``()`` for a scalar, ``(2,)`` for flow).
        fill: value of voxels never written: a number, or ``"free"`` for the class table's free id.
        required: every group has it.
        description: one line, stored as an array attribute.
    """

    name: str
    dtype: np.dtype
    components: tuple[int, ...]
    fill: int | float | bool | str
    required: bool
    description: str

    def fill_value(self, classes: ClassTable) -> int | float | bool:
        """The fill value for a group of class table ``classes``."""
        return classes.free if self.fill == "free" else self.fill  # type: ignore[return-value]


#: The label arrays, by name, in the order they are documented and written.
LABEL_ARRAYS: dict[str, LabelArray] = {}


def register_label_array(array: LabelArray) -> LabelArray:
    """Add a label array kind (see the module doc); returns it. Names are unique."""
    if array.name in LABEL_ARRAYS:
        raise ValueError(f"label array {array.name!r} is registered already")
    LABEL_ARRAYS[array.name] = array
    return array


register_label_array(LabelArray("semantics", np.dtype(np.uint8), (), "free", True,
                                "class id per voxel, see group attribute 'class_table'"))  # fmt: skip
register_label_array(LabelArray("flow", np.dtype(np.float16), (2,), 0.0, True,
                                "(vx, vy) m/s in the ego frame of the frame; 0 off objects"))  # fmt: skip
register_label_array(LabelArray("mask_lidar", np.dtype(np.bool_), (), False, True,
                                "True where a LiDAR ray of the frame passed through or ended in the voxel"))  # fmt: skip
register_label_array(LabelArray("mask_camera", np.dtype(np.bool_), (), False, False,
                                "True where the voxel is observed from the frame's camera views (Occ3D's "
                                "mask_camera); optional"))  # fmt: skip


@dataclass(frozen=True)
class CoordinateArray:
    """A 1-D coordinate array of a label group (see the module doc).

    Attributes:
        name: array name inside the group (also its dimension's name for dimension coordinates).
        dimension: the dimension it runs along (a label arrays' dimension name).
        description: one line, stored as the array attribute ``description``.
        units: stored as the array attribute ``units`` when not None.
    """

    name: str
    dimension: str
    description: str
    units: str | None = None


#: The coordinate arrays a label group may hold, by name (not label arrays: see the module doc).
COORDINATE_ARRAYS: dict[str, CoordinateArray] = {
    c.name: c
    for c in (
        CoordinateArray("frame", "frame", "index along T = frame_index of the row in meta/<log>.parquet"),
        CoordinateArray("token", "frame", "token of the frame row"),
        CoordinateArray("timestamp_us", "frame", "timestamp of the frame row, microseconds since the Unix "
                        "epoch (UTC)", "us"),
        CoordinateArray("x", "x", "voxel centre x, metres, ego frame (forward)", "m"),
        CoordinateArray("y", "y", "voxel centre y, metres, ego frame (left)", "m"),
        CoordinateArray("z", "z", "voxel centre z, metres, ego frame (up)", "m"),
        CoordinateArray("component", "component", "flow components: vx, vy (m/s, ego frame)"),
    )
}  # fmt: skip

#: The flow components, values of the ``component`` coordinate.
FLOW_COMPONENTS: tuple[str, ...] = ("vx", "vy")


def grid_axes_m(grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The voxel centres along x, y and z of ``grid`` (float64, metres): the ``x``/``y``/``z`` coordinates."""
    return tuple(  # type: ignore[return-value]
        lo + (np.arange(n, dtype=np.float64) + 0.5) * grid.voxel_size_m
        for lo, n in zip(grid.range_min_m, grid.shape, strict=True)
    )


#: The arrays every group has, in order (format version 1 had exactly these).
REQUIRED_ARRAYS: tuple[str, ...] = tuple(name for name, a in LABEL_ARRAYS.items() if a.required)
#: Compatibility name of :data:`REQUIRED_ARRAYS`.
ARRAY_NAMES = REQUIRED_ARRAYS


@dataclass(frozen=True)
class OccArraySpec:
    """Specification of one label array of a group, on its grid and class table.

    Attributes:
        name: array name inside the group.
        dtype: numpy dtype of the elements.
        frame_shape: shape of one frame (e.g. (200, 200, 16) or (200, 200, 16, 2)).
        fill_value: value of voxels never written (free, 0.0, False).
        dimension_names: Zarr v3 dimension names, leading with "frame".
        description: one line, stored as an array attribute.
    """

    name: str
    dtype: np.dtype
    frame_shape: tuple[int, ...]
    fill_value: int | float | bool
    dimension_names: tuple[str, ...]
    description: str

    def shape(self, num_frames: int) -> tuple[int, ...]:
        """Full array shape for a log of ``num_frames`` frames."""
        return (num_frames, *self.frame_shape)

    def chunks(self) -> tuple[int, ...]:
        """Chunk shape: one whole frame."""
        return (1, *self.frame_shape)

    def shards(self, shard_frames: int = SHARD_FRAMES) -> tuple[int, ...]:
        """Shard shape: ``shard_frames`` whole frames."""
        return (shard_frames, *self.frame_shape)


def occ_array_specs(
    grid: VoxelGrid = GRID,
    classes: ClassTable = OPENSCENE_CLASSES,
    names: tuple[str, ...] | None = None,
) -> dict[str, OccArraySpec]:
    """The specs of the label arrays ``names`` (default: the required ones) on ``grid``, keyed by name."""
    dims = ("frame", "x", "y", "z")
    out = {}
    for name in REQUIRED_ARRAYS if names is None else names:
        a = LABEL_ARRAYS[name]
        components = ("component",) * len(a.components)
        out[name] = OccArraySpec(
            name,
            a.dtype,
            (*grid.shape, *a.components),
            a.fill_value(classes),
            (*dims, *components),
            a.description,
        )
    return out


#: Specs of the required arrays on OpenScene's grid and table (format version 1).
OCC_ARRAYS: dict[str, OccArraySpec] = occ_array_specs(GRID)


def occ_group_attributes(
    num_frames: int,
    generator: dict,
    grid: VoxelGrid = GRID,
    timestamps_us: list[int] | None = None,
    classes: ClassTable = OPENSCENE_CLASSES,
    arrays: tuple[str, ...] = REQUIRED_ARRAYS,
    coordinates: tuple[str, ...] | None = None,
) -> dict:
    """The JSON attributes of an ``occ/<log>.zarr`` group (see the module docstring); ``coordinates``:
    the coordinate arrays the group holds (``coordinate_arrays``, left out when None)."""
    from driveengine.schemas import FORMAT_VERSION  # the package imports this module's siblings

    attrs = {
        "format": OCC_FORMAT,
        "format_version": FORMAT_VERSION,
        "grid": grid.to_dict(),
        "class_table": classes.to_dict(),
        "classes": classes.id_names(),
        "free": classes.free,
        "background": classes.background,
        "flow": "(vx, vy) m/s, ego frame of the frame (x forward, y left), 0 off objects",
        "frames": int(num_frames),
        "timestamps_us": None if timestamps_us is None else [int(t) for t in timestamps_us],
        "arrays": list(arrays),
        "generator": generator,
    }
    if coordinates is not None:
        attrs["coordinate_arrays"] = list(coordinates)
    return attrs
