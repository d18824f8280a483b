"""The versioned on-disk format of DriveEngine (installed as ``driveengine.schemas``).

The single source of truth that writers, readers and tests import: the class table, the voxel grid,
the Arrow schema of a frame row and the Zarr array specs. Bump :data:`FORMAT_VERSION` on any change
that an existing reader could misread.
"""

from driveengine.schemas.classes import CAMERA_CHANNELS, CATEGORY_TO_CLASS, CLASS_NAMES, FREE, NUM_CLASSES
from driveengine.schemas.grid import GRID, VoxelGrid

FORMAT_NAME = "driveengine"
FORMAT_VERSION = 1

__all__ = [
    "CAMERA_CHANNELS",
    "CATEGORY_TO_CLASS",
    "CLASS_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FREE",
    "GRID",
    "NUM_CLASSES",
    "VoxelGrid",
]
