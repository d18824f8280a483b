"""``driveengine export``: a collected split in other tools' formats, a registry by name.

* ``openscene``: OpenScene v1.1 metadata pickles and v1.0 occupancy files (:mod:`~driveengine.export.openscene`);
* ``occ3d``: Occ3D-nuScenes ``gts/<scene>/<sample_token>/labels.npz`` files (:mod:`~driveengine.export.occ3d`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from driveengine.errors import DriveEngineError


@dataclass(frozen=True)
class ExportFormat:
    """An export format.

    Attributes:
        name: the ``--format`` value.
        description: one line for ``--help``.
        function: ``"module:function"`` taking ``(split_dir, out, occupancy=...)`` and yielding progress
            lines.
        labels_only: the format is the labels alone (``--no-occupancy`` makes no sense).
    """

    name: str
    description: str
    function: str
    labels_only: bool = False


#: The export formats, by name.
EXPORT_FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            "openscene",
            "OpenScene v1.1 per-log metadata .pkl (and v1.0 occupancy .npy files of logs with labels)",
            "driveengine.export.openscene:export_split",
        ),
        ExportFormat(
            "occ3d",
            "Occ3D-nuScenes gts/<scene>/<sample_token>/labels.npz (nuScenes splits with labels)",
            "driveengine.export.occ3d:export_split",
            labels_only=True,
        ),
    )
}


def export_split(
    split_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str = "openscene",
    occupancy: bool = True,
) -> Iterator[str]:
    """Export a collected split in format ``fmt`` (:data:`EXPORT_FORMATS`); yields progress lines.

    Raises:
        DriveEngineError: an unknown format, or ``occupancy=False`` for a labels-only format.
    """
    spec = EXPORT_FORMATS.get(fmt)
    if spec is None:
        raise DriveEngineError(f"unknown export format {fmt!r}; available: {', '.join(EXPORT_FORMATS)}")
    if spec.labels_only and not occupancy:
        raise DriveEngineError(f"--format {fmt} exports labels only; drop --no-occupancy")
    module, _, name = spec.function.partition(":")
    yield from getattr(importlib.import_module(module), name)(split_dir, out, occupancy=occupancy)
