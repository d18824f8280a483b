"""The ``Source`` protocol: everything DriveEngine knows about one dataset's inputs, in one place.

A source is one package under ``driveengine/sources/`` (``nuplan/``, ``openscene/``, ...) registered by
name (:mod:`driveengine.sources`). Everything after it — key frames, frame rows, labels, the loader,
the pictures — works on the common in-memory form :class:`~driveengine.sources.logdata.LogData` and
asks the source only through this protocol; nothing outside ``sources/`` tests a source's name.

A source answers:

* **what the dataset is**: its ``name`` (the ``--source`` value, recorded in the manifest), its camera
  channels in a fixed order, the class table its labels use (with the map of its box categories onto it
  in every :class:`LogData`), the option that names its input root;
* **where a split's logs are**: :meth:`Source.find_logs` (one :class:`InputLog` per log: the unit of
  work, of commit and of resume) and the default blob root (:meth:`Source.default_blob_root`) that the
  relative sensor paths of the frame rows start from;
* **what a log holds**: :meth:`Source.read_log` (one log into :class:`LogData`) and
  :meth:`Source.key_frame_candidates` (which sweeps can be key frames);
* **how to read its sensor files**: :meth:`Source.points_ego` (a sweep's point cloud, from its file's
  bytes, in the ego frame of the sweep), :meth:`Source.lidar_defect` (a cheap check of a sweep file) and
  :meth:`Source.blob_folders`. Images are JPEG for every source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from driveengine.schemas.classes import ClassTable
from driveengine.sources.logdata import LogData
from driveengine.splits import SplitDef

#: The most points a sweep may hold. A sweep file announcing more is refused before it is decoded (a
#: damaged or hostile file must not take a worker's memory): nuPlan's merged sweeps hold ~100-250k
#: points, nuScenes' ~35k, a 128-beam LiDAR's ~260k.
MAX_SWEEP_POINTS = 8_000_000
#: The largest sweep file read at all, and the most bytes a sweep's points may decode to (a PCD's
#: records of every field; a compressed body expands up to ~88x): 64 bytes a point (nuPlan's records
#: are 24 bytes, nuScenes' 20, an ASCII PCD's lines ~40-60).
MAX_SWEEP_BYTES = MAX_SWEEP_POINTS * 64


@dataclass(frozen=True)
class InputLog:
    """One log of a split as found by :meth:`Source.find_logs`.

    Attributes:
        name: the output name (``meta/<name>.parquet``); unique within the split, a plain file name.
        path: what :meth:`Source.read_log` reads (a ``.db``, a ``.pkl``, a scene's index file, ...).
        watched: files and folders whose change means the log must be collected again (their sizes and
            mtimes are fingerprinted), besides ``path``.
    """

    name: str
    path: Path
    watched: tuple[Path, ...] = ()


@runtime_checkable
class Source(Protocol):
    """The inputs of one dataset (see the module doc). Implementations are registered in
    :mod:`driveengine.sources` and constructed without arguments."""

    #: Registry name: the ``--source`` value, the manifest's ``dataset.source``, the rows' ``source``.
    name: str
    #: Whose logs the source reads (the ``dataset`` of the splits it takes): ``nuplan`` for nuPlan
    #: databases and OpenScene metadata alike, ``nuscenes``, ...
    dataset: str
    #: One line for ``--help`` and listings.
    description: str
    #: The command-line option naming the input root, e.g. ``--nuplan-root``.
    root_option: str
    #: Camera channels in the dataset's fixed order (the members of the frame rows' ``cams``).
    cameras: tuple[str, ...]
    #: The class table of the dataset's labels.
    class_table: ClassTable

    def find_logs(self, root: Path, split: SplitDef, input_dir: Path | None = None) -> list[InputLog]:
        """The logs of ``split`` under ``root`` (or in ``input_dir`` when given), sorted by name.

        Raises:
            SourceError: the input folder is missing or malformed (name the folder and what to pass).
        """
        ...

    def default_blob_root(self, root: Path, split: SplitDef) -> Path:
        """The folder the relative sensor paths of this dataset's logs start from, by default."""
        ...

    def blob_folders(self, blob_root: Path, log: InputLog) -> list[Path]:
        """Folders holding the log's sensor files under ``blob_root`` (fingerprinted: files added or
        removed there redo the log when blobs are checked or labels built)."""
        ...

    def read_log(self, log: InputLog) -> LogData:
        """Read one log into a validated :class:`LogData`.

        Raises:
            SourceError: the input is missing, malformed or hostile (name the file and the reason).
        """
        ...

    def key_frame_candidates(self, log: LogData, sample_interval: int) -> np.ndarray:
        """(K,) int64 sweep indices that become key frames before drops, in time order."""
        ...

    def lidar_defect(self, path: Path) -> str | None:
        """What is wrong with a sweep file, from its header and size only (cheap), or None when it looks
        whole (collect drops frames whose sweep is broken)."""
        ...

    def points_ego(self, data: bytes, path: str, ego_from_lidar: np.ndarray) -> np.ndarray:
        """A sweep's points from its file's bytes: (N, 4) float32 x, y, z in the ego frame of the sweep
        (m) and intensity.

        Args:
            data: the file's bytes.
            path: the file (named in errors).
            ego_from_lidar: (4, 4) the log's lidar extrinsics (sources whose files hold the points in the
                sensor frame move them with it).

        Raises:
            SourceError: the bytes are not a point cloud of this dataset's format, or hold more than
                :data:`MAX_SWEEP_POINTS` points or :data:`MAX_SWEEP_BYTES` of them (refused before they are
                decoded).
        """
        ...


def logs_in_folder(folder: Path, suffix: str, split: SplitDef, hint: str) -> list[InputLog]:
    """One :class:`InputLog` per ``<name><suffix>`` file of ``folder`` that ``split`` keeps (sources whose
    logs are one file each).

    Raises:
        SourceError: ``folder`` does not exist (``hint`` says what was expected).
    """
    from driveengine.errors import SourceError

    if not folder.is_dir():
        raise SourceError(folder, "no such folder", hint)
    available = {p.name.removesuffix(suffix): p for p in folder.iterdir() if p.name.endswith(suffix)}
    return [InputLog(name, available[name]) for name in split.select_logs(list(available))]
