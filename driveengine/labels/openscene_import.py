"""Import OpenScene v1.0 occupancy labels (sparse ``*_occ_final.npy`` / ``*_flow_final.npy``) as a log's
``occ/<log>.zarr`` group: the label producer of ``collect --source openscene --openscene-occupancy DIR``.

Each frame row is matched to its frame dict in the OpenScene metadata pickle by token, whose
``occ_gt_final_path`` (or, without it, OpenScene's own scene name and frame_idx) locates the files
(:func:`driveengine.formats.openscene_labels.locate_label_files`). Every file is checked before anything
is written. OpenScene v1.0 ships no visibility mask: ``mask_lidar`` is True everywhere (recorded in the
group's ``generator`` attribute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.formats.openscene_labels import (
    LabelFiles,
    OpenSceneLabelError,
    check_label_files,
    locate_label_files,
    read_label_file,
)
from driveengine.labels.base import LabelJob, import_label_files
from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable
from driveengine.schemas.grid import GRID, VoxelGrid
from driveengine.sources.base import Source
from driveengine.store.occ import OccStorage, create_occ

#: Value of the Zarr group attribute ``generator`` for imported labels (plus the root and file count).
IMPORT_GENERATOR = {
    "kind": "openscene-v1.0-import",
    "mask_lidar": "OpenScene v1.0 ships no visibility mask: mask_lidar is True everywhere",
}


def import_openscene_labels(
    files: Sequence[LabelFiles],
    out_path: str | Path,
    *,
    grid: VoxelGrid = GRID,
    classes: ClassTable = OPENSCENE_CLASSES,
    storage: OccStorage = OccStorage(),
    timestamps_us: Sequence[int] | np.ndarray | None = None,
    source: str = "",
    tokens: Sequence[str] | np.ndarray | None = None,
) -> int:
    """Write OpenScene v1.0 label files as one log's ``occ/<log>.zarr`` group.

    Args:
        files: one :class:`LabelFiles` per frame row, in row order; frame ``i`` of the group is ``files[i]``.
        out_path: the group to create (usually a temporary path the caller renames into place).
        grid: the grid of the files' flat indices.
        classes: the class table of the files' class ids.
        storage: shard size and compression of the group.
        timestamps_us: optional (T,) frame timestamps, microseconds, stored with the group.
        source: free text naming where the files came from (stored in the ``generator`` attribute).
        tokens: optional (T,) frame-row tokens, stored as the group's ``token`` coordinate.

    Returns:
        The number of frames written.

    Raises:
        OpenSceneLabelError: any file is missing or invalid; the message lists every file and problem.
    """
    report = check_label_files(files, grid)
    if not report.ok:
        raise OpenSceneLabelError(report.message())
    mask = np.ones(grid.shape, dtype=bool)
    generator = {**IMPORT_GENERATOR, "source": source, "frames": len(files)}
    with create_occ(
        out_path, len(files), generator=generator, grid=grid, classes=classes, storage=storage,
        timestamps_us=timestamps_us,
        tokens=tokens,
    ) as w:  # fmt: skip
        for f in files:
            sem, flow = read_label_file(f.occ, f.flow, grid)
            w.append(semantics=sem, flow=flow, mask_lidar=mask)
    return len(files)


@dataclass(frozen=True)
class OpenSceneImport:
    """Label producer: import OpenScene v1.0 files from ``folder`` (``--openscene-occupancy``).

    Attributes:
        folder: the occupancy release (``occupancy/``, ``occupancy/<split>/`` or the folder holding
            OpenScene's ``dataset/`` tree).
        grid: the grid of the files (OpenScene's).
    """

    folder: Path
    grid: VoxelGrid = GRID
    kind = "openscene-v1.0"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder), "grid": self.grid.to_dict()}

    def check(self, source: Source) -> None:
        from driveengine.sources.openscene import OpenSceneSource

        if not isinstance(source, OpenSceneSource):
            raise DriveEngineError(
                "--openscene-occupancy needs --source openscene (its metadata names the label files)"
            )
        if not Path(self.folder).is_dir():
            raise DriveEngineError(f"{self.folder}: no such folder (--openscene-occupancy)")

    def write(self, job: LabelJob) -> dict[str, Any]:
        from driveengine.sources.openscene.reader import load_openscene_pickle

        by_token = {str(f["token"]): f for f in load_openscene_pickle(job.input.path)}
        rows = [by_token[str(tok)] for tok in job.log.sweep_token[job.key_sweeps]]
        folder = Path(job.input.path).parent.name  # meta_datas/<folder>/<log>.pkl
        files = locate_label_files(rows, Path(self.folder), folder)
        return import_label_files(job, import_openscene_labels, files, self.grid, self.folder)
