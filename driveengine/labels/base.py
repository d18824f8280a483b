"""The ``LabelProducer`` protocol: what makes one log's ``occ/<log>.zarr``.

A producer is a frozen, picklable settings object (it travels to the workers with each task): the label
generator's recipe (:class:`~driveengine.labels.generator.LabelConfig`) or an importer of labels made
by others (:class:`~driveengine.labels.openscene_import.OpenSceneImport`). The per-log job hands it a
:class:`LabelJob` and commits what it wrote.

**Adding a label producer** is one class with ``kind``, ``grid``, ``to_dict``, ``check`` and ``write``; ``collect``
takes it as ``CollectConfig.labels``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from driveengine.schemas.classes import ClassTable
from driveengine.schemas.grid import VoxelGrid
from driveengine.sources.base import InputLog, Source
from driveengine.sources.logdata import LogData
from driveengine.store.occ import OccStorage


@dataclass(frozen=True)
class LabelJob:
    """One log's labels to make.

    Attributes:
        log: the log.
        key_sweeps: (T,) increasing sweep indices of the frame rows, in row order.
        input: the log's input (as the source found it).
        source: the source that read it (points, files).
        blob_root: the folder the log's relative sensor paths start from.
        out: where the group goes (a temporary path the job renames at commit); replaced if it exists.
        classes: the class table of the dataset.
        storage: shard size and compression of the group.
        progress: called with the number of frames just finished (may be None).
    """

    log: LogData
    key_sweeps: np.ndarray
    input: InputLog
    source: Source
    blob_root: Path
    out: Path
    classes: ClassTable
    storage: OccStorage
    progress: Callable[[int], None] | None = None


@runtime_checkable
class LabelProducer(Protocol):
    """Makes the labels of a log (see the module doc)."""

    #: Short name of the producer, recorded with the labels (``generator``, ``openscene-v1.0``, ...).
    kind: str
    #: The voxel grid of the labels it makes (recorded as the split's grid).
    grid: VoxelGrid

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings: recorded in the group (``generator``) and part of the config hash."""
        ...

    def check(self, source: Source) -> None:
        """Refuse a source whose logs this producer cannot label (raise a ``DriveEngineError``)."""
        ...

    def write(self, job: LabelJob) -> dict[str, Any]:
        """Write the log's label group at ``job.out``; returns JSON-ready statistics."""
        ...


#: An importer of others' label files into one group (``import_openscene_labels``, ``import_occ3d_labels``):
#: ``(files, out, *, grid, classes, storage, timestamps_us, source, tokens) -> frames written``.
LabelFileImporter = Callable[..., int]


def import_label_files(
    job: LabelJob, importer: LabelFileImporter, files: Sequence[Path], grid: VoxelGrid, folder: str | Path
) -> dict[str, Any]:
    """The ``write`` of an importer producer: ``files`` (one per frame row, in row order) imported by
    ``importer`` into ``job.out`` on ``grid`` with the job's classes, storage, timestamps and tokens, the
    job's progress told; returns the statistics recorded with the log (``imported_from``, ``frames``)."""
    frames = importer(
        files,
        job.out,
        grid=grid,
        classes=job.classes,
        storage=job.storage,
        timestamps_us=job.log.sweep_timestamp_us[job.key_sweeps],
        source=str(folder),
        tokens=job.log.sweep_token[job.key_sweeps],
    )
    if job.progress is not None:
        job.progress(frames)
    return {"imported_from": str(folder), "frames": frames}
