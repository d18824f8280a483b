"""Zarr v3 specs of the per-log occupancy labels, ``occ/<log>.zarr`` (DESIGN §3, format version 1).

One Zarr v3 group per log, ``T`` frames (row ``i`` of ``meta/<log>.parquet`` is index ``i`` along T):

========== ======== ======================= ===========================================================
array      dtype    shape                   meaning
========== ======== ======================= ===========================================================
semantics  uint8    (T, nx, ny, nz)         class id per voxel (:data:`~driveengine.schemas.classes.CLASS_NAMES`),
                                            ``FREE = 16`` where nothing was seen
flow       float16  (T, nx, ny, nz, 2)      (vx, vy) m/s in the ego frame of the frame; 0 off objects
mask_lidar bool     (T, nx, ny, nz)         True where a LiDAR ray of the frame observed the voxel
                                            (passed through it, or ended in it)
========== ======== ======================= ===========================================================

The grid is :data:`~driveengine.schemas.grid.GRID`: ego frame of the frame (x forward, y left, z up,
rear axle), indexed ``[x, y, z]`` (so OpenScene's flat index ``x + nx*y + nx*ny*z`` is *not* the
C-order position in the dense array). Chunks are one frame; shards hold :data:`SHARD_FRAMES` frames
and are written whole (shard-aligned), so a writer holds at most one shard in memory. Unwritten
chunks read as the fill value (FREE / 0 / False).

Group attributes (all JSON): ``format`` (:data:`OCC_FORMAT`), ``format_version``
(:data:`~driveengine.schemas.FORMAT_VERSION`), ``grid`` (``VoxelGrid.to_dict()``), ``classes``
(``{"0": "vehicle", ...}``), ``free`` (16), ``background`` (10), ``flow`` (units and frame, in words),
``frames`` (T), ``timestamps_us`` (T ints or null), ``generator`` (the label generator's config dict,
or a description of the source for imported labels), ``stats`` (free-form, may be absent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from driveengine.schemas.classes import BACKGROUND, CLASS_NAMES, FREE
from driveengine.schemas.grid import GRID, VoxelGrid

#: Value of the group attribute ``format``.
OCC_FORMAT = "driveengine-occ"

#: Frames per shard (chunks are one frame). 16 frames = 10 MiB of semantics, 41 MiB of flow and
#: 10 MiB of mask uncompressed: the most a writer holds at once.
SHARD_FRAMES = 16

#: Default compressor of every array: Zstandard at this level (grids are mostly FREE / 0 / False).
COMPRESSOR = "zstd"
COMPRESSION_LEVEL = 3

#: Names of the arrays, in the order they are documented and written.
ARRAY_NAMES: tuple[str, ...] = ("semantics", "flow", "mask_lidar")


@dataclass(frozen=True)
class OccArraySpec:
    """Specification of one label array of the group.

    Attributes:
        name: array name inside the group.
        dtype: numpy dtype of the elements.
        frame_shape: shape of one frame, given the grid (e.g. (200, 200, 16) or (200, 200, 16, 2)).
        fill_value: value of voxels never written (FREE, 0.0, False).
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


def occ_array_specs(grid: VoxelGrid = GRID) -> dict[str, OccArraySpec]:
    """The specs of ``semantics``, ``flow`` and ``mask_lidar`` for ``grid``, keyed by name."""
    g = tuple(grid.shape)
    dims = ("frame", "x", "y", "z")
    return {
        "semantics": OccArraySpec(
            "semantics", np.dtype(np.uint8), g, FREE, dims,
            f"class id per voxel, {FREE} = free; see group attribute 'classes'",
        ),
        "flow": OccArraySpec(
            "flow", np.dtype(np.float16), (*g, 2), 0.0, (*dims, "component"),
            "(vx, vy) m/s in the ego frame of the frame; 0 off objects",
        ),
        "mask_lidar": OccArraySpec(
            "mask_lidar", np.dtype(np.bool_), g, False, dims,
            "True where a LiDAR ray of the frame passed through or ended in the voxel",
        ),
    }  # fmt: skip


#: Specs for the grid of format version 1.
OCC_ARRAYS: dict[str, OccArraySpec] = occ_array_specs(GRID)


def occ_group_attributes(
    num_frames: int,
    generator: dict,
    grid: VoxelGrid = GRID,
    timestamps_us: list[int] | None = None,
) -> dict:
    """The JSON attributes of an ``occ/<log>.zarr`` group (see the module docstring)."""
    from driveengine.schemas import FORMAT_VERSION  # the package imports this module's siblings

    return {
        "format": OCC_FORMAT,
        "format_version": FORMAT_VERSION,
        "grid": grid.to_dict(),
        "classes": {str(k): v for k, v in CLASS_NAMES.items()},
        "free": FREE,
        "background": BACKGROUND,
        "flow": "(vx, vy) m/s, ego frame of the frame (x forward, y left), 0 off objects",
        "frames": int(num_frames),
        "timestamps_us": None if timestamps_us is None else [int(t) for t in timestamps_us],
        "generator": generator,
    }
