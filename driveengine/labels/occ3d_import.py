"""Import Occ3D-nuScenes labels (``gts/<scene>/<sample_token>/labels.npz``) as a log's ``occ/<log>.zarr``:
the label producer of ``collect --source nuscenes --occ3d-labels DIR``.

Occ3D-nuScenes ships, per nuScenes sample, ``labels.npz`` with ``semantics`` (class ids of the Occ3D
table, 17 = free), ``mask_lidar`` and ``mask_camera`` (0/1), each uint8 ``(200, 200, 16)`` on its grid
([-40, -40, -1, 40, 40, 5.4] m, 0.4 m, ego frame of the key frame, indexed [x, y, z]). A frame row of a
nuScenes log is matched to its file by the log's name (the scene name) and the row's ``token`` (the
sample token). The group gets ``semantics``, ``mask_lidar``, ``mask_camera`` (the optional label array)
and ``flow`` = 0 (Occ3D has no flow; the group's ``generator`` attribute says so).
:func:`driveengine.export.occ3d.export_occ3d` writes the same layout back, byte-equal arrays.

**The files are input from the internet**: every file is checked before anything is written, and a
check reads only what a valid file holds: the ``.npz`` must be a zip whose members ``semantics.npy``,
``mask_lidar.npy``, ``mask_camera.npy`` declare (central directory) at most the bytes of a
``(200, 200, 16)`` uint8 array plus a header (no decompression bomb), their ``.npy`` headers must say
uint8 (or bool) of exactly the grid's shape (nothing is allocated from a header's say-so), the data must be
complete, ``semantics`` within 0..17 and the masks 0/1 (the round trip through bool arrays is exact).
Scene names and tokens must be plain file names (no path leaves the folder), and a symbolic link on the
way is refused. Every problem is listed (the first ones, and a count), naming the file.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.labels.base import LabelJob, import_label_files
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES, ClassTable
from driveengine.schemas.grid import VoxelGrid
from driveengine.sources.base import Source
from driveengine.sources.nuscenes.constants import OCC3D_GRID
from driveengine.store.occ import OccStorage, create_occ

#: The members of a ``labels.npz``, in order.
OCC3D_ARRAYS: tuple[str, ...] = ("semantics", "mask_lidar", "mask_camera")
#: The label arrays of an imported group.
IMPORT_ARRAYS: tuple[str, ...] = ("semantics", "flow", "mask_lidar", "mask_camera")
#: Value of the group attribute ``generator`` (plus the folder and frame count).
IMPORT_GENERATOR = {
    "kind": "occ3d-nuscenes-import",
    "flow": "Occ3D-nuScenes has no flow: flow is 0",
    "mask_lidar": "Occ3D's mask_lidar (0/1) as bool",
    "mask_camera": "Occ3D's mask_camera (0/1) as bool",
}
#: Bytes a ``.npy`` header may take beyond the data (numpy pads headers to 64 / 4096 bytes).
NPY_HEADER_MAX = 4096
#: Problems listed per error before they are counted.
LISTED = 5
#: A scene name or token that can be a path component.
PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class Occ3DLabelError(DriveEngineError):
    """Occ3D-nuScenes label files are missing or invalid (the message names the files and problems)."""


@dataclass(frozen=True)
class Occ3DFrame:
    """The arrays of one ``labels.npz``, each uint8 (nx, ny, nz) as in the file."""

    semantics: np.ndarray
    mask_lidar: np.ndarray
    mask_camera: np.ndarray


def labels_path(gts: Path, scene: str, token: str) -> Path:
    """``<gts>/<scene>/<token>/labels.npz``.

    Raises:
        Occ3DLabelError: the scene name or token is not a plain file name.
    """
    for what, value in (("scene name", scene), ("sample token", token)):
        if not PLAIN.fullmatch(value) or value in (".", ".."):
            raise Occ3DLabelError(f"{gts}: {what} {value!r} is not a plain file name; refusing it as a path")
    return Path(gts) / scene / token / "labels.npz"


def gts_folder(folder: Path) -> Path:
    """The ``gts`` folder of an Occ3D-nuScenes release: ``<folder>/gts`` or ``folder`` itself."""
    folder = Path(folder)
    return folder / "gts" if (folder / "gts").is_dir() else folder


def _read_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One ``.npy`` member, checked before it is read (module doc); raises ValueError with the reason."""
    member = f"{name}.npy"
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise ValueError(f"no array {name!r}") from None
    count = int(np.prod(shape))
    if info.file_size > count + NPY_HEADER_MAX:
        raise ValueError(f"{member} declares {info.file_size} bytes, more than a {shape} uint8 array")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(f, max_header_size=NPY_HEADER_MAX)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(f, max_header_size=NPY_HEADER_MAX)
        else:
            raise ValueError(f"{member}: unsupported .npy version {version}")
        got_shape, fortran, dtype = header
        if tuple(got_shape) != shape or dtype not in (np.dtype(np.uint8), np.dtype(np.bool_)):
            raise ValueError(f"{member} is {dtype} {tuple(got_shape)}, expected uint8 {shape}")
        data = f.read(count + 1)
    if len(data) != count:
        raise ValueError(f"{member} holds {len(data)} data bytes, expected {count}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape, order="F" if fortran else "C").copy()


def read_labels_npz(
    path: Path, grid: VoxelGrid = OCC3D_GRID, classes: ClassTable = OCC3D_NUSCENES_CLASSES
) -> Occ3DFrame:
    """Read and check one ``labels.npz`` (see the module doc).

    Raises:
        Occ3DLabelError: the file is missing, a link, not a zip of the three arrays, or an array is not
            uint8 of the grid's shape, is incomplete or holds out-of-range values.
    """
    path = Path(path)
    shape = tuple(grid.shape)
    try:
        if path.is_symlink() or any(p.is_symlink() for p in path.parents[:2]):
            raise ValueError("a symbolic link (refused)")
        with zipfile.ZipFile(path) as zf:
            arrays = [_read_member(zf, name, shape) for name in OCC3D_ARRAYS]
    except FileNotFoundError:
        raise Occ3DLabelError(f"{path}: missing") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise Occ3DLabelError(f"{path}: {exc}") from None
    sem, lidar, camera = arrays
    if sem.max(initial=0) > classes.free:
        raise Occ3DLabelError(
            f"{path}: semantics holds class id {int(sem.max())}, beyond {classes.name}'s 0..{classes.free}"
        )
    for name, mask in (("mask_lidar", lidar), ("mask_camera", camera)):
        if mask.max(initial=0) > 1:
            raise Occ3DLabelError(f"{path}: {name} holds {int(mask.max())}, expected 0/1")
    return Occ3DFrame(sem, lidar, camera)


def import_occ3d_labels(
    files: Sequence[Path],
    out_path: str | Path,
    *,
    grid: VoxelGrid = OCC3D_GRID,
    classes: ClassTable = OCC3D_NUSCENES_CLASSES,
    storage: OccStorage = OccStorage(),
    timestamps_us: Sequence[int] | np.ndarray | None = None,
    source: str = "",
    tokens: Sequence[str] | np.ndarray | None = None,
) -> int:
    """Write Occ3D ``labels.npz`` files (one per frame row, in row order) as one log's label group.

    Every file is checked first; nothing is written unless all are valid.

    Raises:
        Occ3DLabelError: files are missing or invalid (the first :data:`LISTED` named, the rest counted).
    """
    problems: list[str] = []
    for f in files:  # check all first (a few ms per file: small arrays)
        try:
            read_labels_npz(f, grid, classes)
        except Occ3DLabelError as exc:
            problems.append(str(exc))
    if problems:
        more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        raise Occ3DLabelError(
            f"{len(problems)} of {len(files)} Occ3D label files are missing or invalid: "
            + "; ".join(problems[:LISTED])
            + more
        )
    flow = np.zeros((*grid.shape, 2), dtype=np.float16)
    generator = {**IMPORT_GENERATOR, "source": source, "frames": len(files)}
    with create_occ(
        out_path, len(files), generator=generator, grid=grid, classes=classes, arrays=IMPORT_ARRAYS,
        storage=storage, timestamps_us=timestamps_us, tokens=tokens,
    ) as w:  # fmt: skip
        for f in files:
            frame = read_labels_npz(f, grid, classes)
            w.append(
                semantics=frame.semantics,
                flow=flow,
                mask_lidar=frame.mask_lidar.astype(bool),
                mask_camera=frame.mask_camera.astype(bool),
            )
    return len(files)


@dataclass(frozen=True)
class Occ3DImport:
    """Label producer: import Occ3D-nuScenes labels from ``folder`` (``--occ3d-labels``: the folder holding
    ``gts/``, or ``gts/`` itself).

    Attributes:
        folder: the Occ3D-nuScenes release.
        grid: the grid of the files (Occ3D-nuScenes').
    """

    folder: Path
    grid: VoxelGrid = field(default=OCC3D_GRID)
    kind = "occ3d-nuscenes"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder), "grid": self.grid.to_dict()}

    def check(self, source: Source) -> None:
        if source.class_table != OCC3D_NUSCENES_CLASSES:
            raise Occ3DLabelError(
                f"--occ3d-labels imports Occ3D-nuScenes labels, whose class table is {OCC3D_NUSCENES_CLASSES.name}; "
                f"source {source.name} uses {source.class_table.name} (use --source nuscenes)"
            )
        if not Path(self.folder).is_dir():
            raise Occ3DLabelError(f"{self.folder}: no such folder (--occ3d-labels)")

    def write(self, job: LabelJob) -> dict[str, Any]:
        gts = gts_folder(Path(self.folder))
        tokens = [str(t) for t in job.log.sweep_token[job.key_sweeps]]
        files = [labels_path(gts, job.input.name, token) for token in tokens]
        return import_label_files(job, import_occ3d_labels, files, self.grid, self.folder)
