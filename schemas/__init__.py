"""The versioned on-disk format of DriveEngine (installed as ``driveengine.schemas``).

The single source of truth that writers, readers and tests import: class tables, the voxel grid, the
Arrow schema of a frame row and the Zarr label-array specs. Bump :data:`FORMAT_VERSION` on any change
that an existing reader could misread.

Format versions:

* 1: nuPlan/OpenScene only: OpenScene's class table, 8 nuPlan cameras, one fixed grid.
* 2: dataset-agnostic: the class table (with its map onto the unified table), the cameras and the voxel
  grid are recorded per split (manifest ``dataset``) and per log (Zarr attributes). For nuPlan and
  OpenScene data the files and values are the same as in version 1. Readers read both.
"""

from driveengine.schemas.classes import (
    CLASS_NAMES,
    CLASS_TABLES,
    FREE,
    NUM_CLASSES,
    OPENSCENE_CLASSES,
    ClassTable,
)
from driveengine.schemas.grid import GRID, VoxelGrid

FORMAT_NAME = "driveengine"
FORMAT_VERSION = 2
#: The oldest format version this DriveEngine reads.
OLDEST_FORMAT_VERSION = 1

__all__ = [
    "CLASS_NAMES",
    "CLASS_TABLES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FREE",
    "GRID",
    "NUM_CLASSES",
    "OLDEST_FORMAT_VERSION",
    "OPENSCENE_CLASSES",
    "ClassTable",
    "VoxelGrid",
]
