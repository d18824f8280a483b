"""OpenScene v1.0 occupancy/flow label files: validate, read (densify), write (sparsify), import, export.

The files (reference §4), one pair per key frame::

    <root>/<split>/<scene_name>/occ_gt/{frame_idx:03d}_occ_final.npy    (N, 2) integer [flat_index, class_id]
    <root>/<split>/<scene_name>/occ_gt/{frame_idx:03d}_flow_final.npy   (N, 2) float   (vx, vy), m/s

* The names have **three** digits (``000_occ_final.npy``), as OpenScene's generator writes them
  (``'%03d'``) and the v1.0 metadata's ``occ_gt_final_path`` names them
  (``dataset/openscene-v1.0/occupancy/mini/log-0001-scene-0001/occ_gt/000_occ_final.npy``). The
  four-digit listing on OpenScene's dataset_stats page (repeated by earlier versions of our reference
  notes) is wrong. The export writes ``{frame_idx:03d}``; the import accepts any zero padding
  (``0``, ``000``, ``0000``, ...) and OpenScene's own ``occ_gt_final_path`` values.

* Only occupied voxels are listed; every other voxel is free (class 16 in dense grids).
* ``flat_index = x + 200*y + 40000*z`` on the grid :data:`~driveengine.schemas.grid.GRID` (ego frame of
  the key frame, x forward, y left, z up, 0.5 m voxels, indexed ``[x, y, z]``); see
  :meth:`VoxelGrid.flat_index`.
* The flow file is row-aligned with the occ file: row ``i`` is the (vx, vy) of the voxel in occ row
  ``i``, in m/s in the ego frame of the key frame.

What this module writes: occ files as ``int64`` (OpenScene-style loaders ``torch.from_numpy`` the
array and index a dense tensor with column 0, which needs an integer type; ``int64`` is torch's index
type and numpy's default integer, so it needs no cast; the exact dtype of the released files is not
verified), rows sorted by flat index; flow files as ``float32`` (exact for the ``float16`` values
DriveEngine stores; the released flow dtype is not verified either). What it reads: any integer
dtype for occ (and floating-point arrays holding whole numbers), any floating-point dtype for flow.

Every problem is reported per file with counts (indices out of range, duplicated indices, class ids
out of range, non-finite flow, occ/flow row counts that differ); nothing is dropped or repaired
silently. :func:`check_label_file` returns the problems; the readers raise
:class:`OpenSceneLabelError` listing all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.files import atomic_path
from driveengine.schemas.classes import FREE, NUM_CLASSES
from driveengine.schemas.grid import GRID, VoxelGrid

StrPath = str | os.PathLike[str]

#: Suffixes of the two files of a frame.
OCC_SUFFIX = "_occ_final.npy"
FLOW_SUFFIX = "_flow_final.npy"
#: dtypes DriveEngine writes (see the module docstring).
OCC_FILE_DTYPE = np.dtype(np.int64)
FLOW_FILE_DTYPE = np.dtype(np.float32)
#: Metadata keys of OpenScene frame dicts that point at the files.
OCC_PATH_KEY = "occ_gt_final_path"
FLOW_PATH_KEY = "flow_gt_final_path"


class OpenSceneLabelError(DriveEngineError):
    """One or more OpenScene label files are missing or invalid; the message lists every file and problem."""


# -- one frame: validation, dense <-> sparse ---------------------------------------------------------


def check_sparse(occ: np.ndarray, flow: np.ndarray | None = None, grid: VoxelGrid = GRID) -> list[str]:
    """Problems of one frame's sparse arrays, each in words with a count; empty when valid.

    Args:
        occ: (N, 2) rows ``[flat_index, class_id]``.
        flow: optional (N, 2) rows ``(vx, vy)``, m/s, row-aligned with ``occ``.
        grid: the grid the flat indices refer to.
    """
    problems: list[str] = []
    occ = np.asarray(occ)
    if occ.ndim != 2 or occ.shape[1] != 2:
        return [f"occ array has shape {occ.shape}, expected (N, 2) rows [flat_index, class_id]"]
    if occ.dtype.kind == "f":
        if not np.all(np.isfinite(occ)) or np.any(occ != np.round(occ)):
            return [f"occ array is {occ.dtype} with non-integer values; expected integer rows"]
    elif occ.dtype.kind not in "iu":
        return [f"occ array has dtype {occ.dtype}, expected integers"]
    n = occ.shape[0]
    flat = occ[:, 0].astype(np.int64)
    cls = occ[:, 1].astype(np.int64)
    outside = (flat < 0) | (flat >= grid.num_voxels)
    if outside.any():
        problems.append(
            f"{int(outside.sum())} of {n} rows have a flat index outside 0..{grid.num_voxels - 1} "
            f"(e.g. {flat[outside][:3].tolist()})"
        )
    inside = flat[~outside]
    if inside.size:
        counts = np.bincount(inside, minlength=grid.num_voxels)
        dup_voxels = int(np.count_nonzero(counts > 1))
        if dup_voxels:
            extra = int(inside.size - np.count_nonzero(counts))
            problems.append(
                f"{dup_voxels} flat indices occur more than once ({extra} extra rows, "
                f"e.g. index {int(np.flatnonzero(counts > 1)[0])})"
            )
    bad_cls = (cls < 0) | (cls >= NUM_CLASSES)
    if bad_cls.any():
        problems.append(
            f"{int(bad_cls.sum())} of {n} rows have a class id outside 0..{NUM_CLASSES - 1} "
            f"(e.g. {np.unique(cls[bad_cls])[:5].tolist()})"
        )
    if flow is not None:
        flow = np.asarray(flow)
        if flow.ndim != 2 or flow.shape[1] != 2:
            problems.append(f"flow array has shape {flow.shape}, expected (N, 2) rows (vx, vy)")
        elif flow.shape[0] != n:
            problems.append(f"flow has {flow.shape[0]} rows but occ has {n}: not row-aligned")
        elif flow.dtype.kind not in "fiu":
            problems.append(f"flow array has dtype {flow.dtype}, expected floats")
        else:
            nonfinite = ~np.isfinite(flow).all(axis=1)
            if nonfinite.any():
                problems.append(f"{int(nonfinite.sum())} of {n} flow rows are not finite (NaN or inf)")
    return problems


def sparse_to_dense(
    occ: np.ndarray, flow: np.ndarray | None = None, grid: VoxelGrid = GRID
) -> tuple[np.ndarray, np.ndarray]:
    """Dense grids of one frame's sparse rows.

    Args:
        occ: (N, 2) rows ``[flat_index, class_id]`` (validated here).
        flow: optional (N, 2) ``(vx, vy)`` m/s, row-aligned with ``occ``; zeros when None.
        grid: the voxel grid.

    Returns:
        ``semantics`` uint8 ``grid.shape`` (class id, FREE = 16 where no row) and ``flow`` float32
        ``(*grid.shape, 2)`` (m/s, ego frame; 0 where no row), both indexed ``[x, y, z]``.

    Raises:
        ValueError: the arrays fail :func:`check_sparse` (the message lists the problems).
    """
    problems = check_sparse(occ, flow, grid)
    if problems:
        raise ValueError("; ".join(problems))
    occ = np.asarray(occ).astype(np.int64, copy=False)
    flat = occ[:, 0]
    # a C-order array indexed [z, y, x] has position z*nx*ny + y*nx + x = the flat index, so the rows
    # scatter straight into its buffer, and a transposed view is the [x, y, z] grid
    nx, ny, nz = grid.shape
    sem_zyx = np.full(grid.num_voxels, FREE, dtype=np.uint8)
    sem_zyx[flat] = occ[:, 1]
    flow_zyx = np.zeros((grid.num_voxels, 2), dtype=np.float32)
    if flow is not None:
        flow_zyx[flat] = np.asarray(flow, dtype=np.float32)
    sem = np.ascontiguousarray(sem_zyx.reshape(nz, ny, nx).transpose(2, 1, 0))
    dense_flow = np.ascontiguousarray(flow_zyx.reshape(nz, ny, nx, 2).transpose(2, 1, 0, 3))
    return sem, dense_flow


def dense_to_sparse(
    semantics: np.ndarray, flow: np.ndarray | None = None, grid: VoxelGrid = GRID
) -> tuple[np.ndarray, np.ndarray]:
    """OpenScene's sparse rows of one frame's dense grids.

    Args:
        semantics: ``grid.shape`` class ids indexed ``[x, y, z]``, FREE = 16 for empty voxels.
        flow: optional ``(*grid.shape, 2)`` (vx, vy) m/s; zeros when None.
        grid: the voxel grid.

    Returns:
        ``occ`` int64 (N, 2) ``[flat_index, class_id]`` of every non-free voxel, sorted by flat index,
        and ``flow`` float32 (N, 2), row-aligned.
    """
    semantics = np.asarray(semantics)
    if semantics.shape != grid.shape:
        raise ValueError(f"semantics has shape {semantics.shape}, expected the grid shape {grid.shape}")
    # [z, y, x] C order is OpenScene's flat order: non-zero positions come out sorted by flat index
    sem_zyx = semantics.transpose(2, 1, 0).reshape(-1)
    flat = np.flatnonzero(sem_zyx != FREE)
    occ = np.stack([flat, sem_zyx[flat].astype(np.int64)], axis=1).astype(OCC_FILE_DTYPE, copy=False)
    if flow is None:
        rows = np.zeros((len(flat), 2), dtype=FLOW_FILE_DTYPE)
    else:
        flow = np.asarray(flow)
        if flow.shape != (*grid.shape, 2):
            raise ValueError(f"flow has shape {flow.shape}, expected {(*grid.shape, 2)}")
        rows = flow.transpose(2, 1, 0, 3).reshape(-1, 2)[flat].astype(FLOW_FILE_DTYPE)
    return occ, rows


# -- files -----------------------------------------------------------------------------------------


def label_file_names(frame_idx: int) -> tuple[str, str]:
    """OpenScene's file names ``{frame_idx:03d}_occ_final.npy`` and ``{frame_idx:03d}_flow_final.npy``."""
    return f"{int(frame_idx):03d}{OCC_SUFFIX}", f"{int(frame_idx):03d}{FLOW_SUFFIX}"


def frame_number(name: str, suffix: str = OCC_SUFFIX) -> int | None:
    """The frame_idx of a label file name with any zero padding (``"007_occ_final.npy"`` -> 7), else None."""
    if not name.endswith(suffix):
        return None
    stem = name[: -len(suffix)]
    return int(stem) if stem.isascii() and stem.isdigit() else None


def _load_npy(path: Path) -> np.ndarray:
    """``np.load`` without pickles; OSError/ValueError become one-line problems for the caller."""
    return np.load(path, allow_pickle=False)


def _try_load_npy(path: Path, what: str) -> tuple[np.ndarray | None, str | None]:
    """``(array, None)``, or ``(None, problem)`` naming ``what`` (``occ``, ``flow``) if missing or unreadable."""
    try:
        return _load_npy(path), None
    except FileNotFoundError:
        return None, f"{what} file is missing"
    except (OSError, ValueError) as exc:
        return None, f"{what} file is unreadable ({exc})"


def check_label_file(
    occ_path: StrPath, flow_path: StrPath | None = None, grid: VoxelGrid = GRID
) -> list[str]:
    """Problems of one frame's files (missing, unreadable, or :func:`check_sparse`); empty when valid."""
    occ, problem = _try_load_npy(Path(occ_path), "occ")
    if problem is not None:
        return [problem]
    flow = None
    if flow_path is not None:
        flow, problem = _try_load_npy(Path(flow_path), "flow")
        if problem is not None:
            return [problem]
    return check_sparse(occ, flow, grid)


def read_label_file(
    occ_path: StrPath, flow_path: StrPath | None = None, grid: VoxelGrid = GRID
) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``semantics`` (uint8) and ``flow`` (float32, zeros without a flow file) of one frame's files.

    Raises:
        OpenSceneLabelError: a file is missing, unreadable or invalid (every problem is named).
    """
    problems = check_label_file(occ_path, flow_path, grid)
    if problems:
        raise OpenSceneLabelError(_format_problems({str(occ_path): problems}))
    occ = _load_npy(Path(occ_path))
    flow = None if flow_path is None else _load_npy(Path(flow_path))
    return sparse_to_dense(occ, flow, grid)


def write_label_file(
    occ_path: StrPath,
    flow_path: StrPath,
    semantics: np.ndarray,
    flow: np.ndarray | None = None,
    grid: VoxelGrid = GRID,
) -> int:
    """Write one frame as OpenScene's pair of files (int64 occ, float32 flow); returns the row count.

    Each file is written under a temporary name and renamed into place, so a crash never leaves a
    truncated ``.npy`` behind.
    """
    occ, rows = dense_to_sparse(semantics, flow, grid)
    for path, arr in ((occ_path, occ), (flow_path, rows)):
        with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)  # (a file object: given a name, numpy would append .npy)
    return int(occ.shape[0])


def _format_problems(problems: Mapping[str, list[str]], limit: int = 20) -> str:
    """One message naming each file and its problems (the first ``limit`` files, then a count)."""
    items = list(problems.items())
    lines = [f"{len(items)} OpenScene label file(s) are invalid:"]
    for path, probs in items[:limit]:
        lines.append(f"  {path}: " + "; ".join(probs))
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more files")
    lines.append("  (fix or re-download these label files, or collect without --openscene-occupancy)")
    return "\n".join(lines)


# -- locating a log's files --------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelFiles:
    """The label files of one key frame (``flow`` None when the frame has no flow file)."""

    occ: Path
    flow: Path | None


class _PaddedNames:
    """Finds a frame's label file in a folder whatever the zero padding of its number (folders listed once)."""

    def __init__(self) -> None:
        self._folders: dict[Path, dict[tuple[str, int], list[str]]] = {}

    def _listing(self, folder: Path) -> dict[tuple[str, int], list[str]]:
        if folder not in self._folders:
            names: dict[tuple[str, int], list[str]] = {}
            try:
                entries = sorted(os.listdir(folder))
            except OSError:  # missing folder: every file in it is reported missing later
                entries = []
            for name in entries:
                for suffix in (OCC_SUFFIX, FLOW_SUFFIX):
                    number = frame_number(name, suffix)
                    if number is not None:
                        names.setdefault((suffix, number), []).append(name)
            self._folders[folder] = names
        return self._folders[folder]

    def find(self, path: Path, suffix: str) -> Path:
        """``path`` if it exists, else the one file of its folder with the same frame number and
        ``suffix`` in another zero padding, else ``path`` (reported missing by the checks).

        Raises:
            OpenSceneLabelError: several paddings of the same frame exist (e.g. ``07_`` and ``007_``).
        """
        if path.is_file():
            return path
        number = frame_number(path.name, suffix)
        if number is None:
            return path
        found = self._listing(path.parent).get((suffix, number), [])
        if len(found) > 1:
            raise OpenSceneLabelError(
                f"{path.parent}: frame {number} has several label files ({', '.join(found)}); "
                "keep one per frame"
            )
        return path.parent / found[0] if found else path


def _resolve(root: Path, relative: str, split: str) -> Path:
    """A metadata path made absolute: as is, or the longest tail of it that exists under ``root``.

    OpenScene's metadata writes ``dataset/openscene-v1.0/occupancy/<split>/<scene>/occ_gt/000_occ_final.npy``;
    ``root`` may be any folder of that chain (``occupancy/``, the common case, ``occupancy/<split>/``
    or the folder holding ``dataset/``), so the path is tried under ``root`` whole and then without
    its leading parts, down to ``<scene>/occ_gt/<file>``. A missing file is named in the first of
    those folders that exists (so the checks report it where it belongs), else under the ``<split>/...``
    tail of the path when it holds ``split``, else as the path under ``root``.
    """
    p = Path(relative)
    if p.is_absolute():
        return p
    parts = p.parts
    tails = [root.joinpath(*parts[k:]) for k in range(max(len(parts) - 2, 1))]  # >= <scene>/occ_gt/<file>
    for candidate in tails:
        if candidate.exists():
            return candidate
    for candidate in tails:
        if candidate.parent.is_dir() and candidate.parent != root:
            return candidate
    if split in parts:
        return root.joinpath(*parts[len(parts) - 1 - parts[::-1].index(split) :])
    return root / p


def locate_label_files(rows: Iterable[Mapping[str, Any]], root: StrPath, split: str) -> list[LabelFiles]:
    """The label files of each frame row, in row order.

    A row with a non-empty ``occ_gt_final_path`` (and ``flow_gt_final_path``) key (OpenScene metadata)
    uses those paths: absolute, or relative to ``root`` as OpenScene writes them
    (``dataset/openscene-v1.0/occupancy/<split>/<scene>/occ_gt/000_occ_final.npy``: the longest tail of
    the path that exists under ``root``, see :func:`_resolve`). Other rows use the v1.0 layout
    ``<root>/<split>/<scene>/occ_gt/{frame_idx:03d}_{occ,flow}_final.npy`` where ``<scene>`` is the row's
    ``scene_name`` or, when no such folder exists and ``scene_name`` is DriveEngine's
    ``<log_name>-<source scene name>``, the source scene name (for OpenScene input that is OpenScene's
    own ``log-XXXX-scene-YYYY``). In both cases a file that is absent under its exact name is looked for
    with another zero padding of the same frame number (``0_``, ``00_``, ``0000_``, ...). Nothing is
    guessed beyond that: files that do not exist are reported as missing by :func:`check_label_files`.

    Caveat: the layout is keyed by ``frame_idx``, and DriveEngine renumbers ``frame_idx`` without the
    gaps OpenScene left where it dropped frames; where a source had such gaps, give the rows
    OpenScene's ``occ_gt_final_path`` keys instead (they name each frame's file exactly).

    Args:
        rows: frame rows (dicts with ``scene_name``, ``frame_idx`` and optionally ``log_name`` and the
            path keys).
        root: the folder holding ``<split>/`` of OpenScene's occupancy release (``--openscene-occupancy``).
        split: the split name (``mini``, ``trainval``, ...).

    Raises:
        OpenSceneLabelError: a folder holds the same frame under several zero paddings.
    """
    root = Path(root)
    padded = _PaddedNames()
    out: list[LabelFiles] = []
    for row in rows:
        occ_rel = row.get(OCC_PATH_KEY)
        if occ_rel:
            flow_rel = row.get(FLOW_PATH_KEY)
            occ = padded.find(_resolve(root, str(occ_rel), split), OCC_SUFFIX)
            flow = (
                _resolve(root, str(flow_rel), split)
                if flow_rel
                else occ.with_name(occ.name[: -len(OCC_SUFFIX)] + FLOW_SUFFIX)
            )
        else:
            occ_name, flow_name = label_file_names(int(row["frame_idx"]))
            scene, log = str(row["scene_name"]), row.get("log_name")
            folder = root / split / scene
            if not folder.is_dir() and log and scene.startswith(f"{log}-"):
                source_scene = root / split / scene[len(log) + 1 :]
                folder = source_scene if source_scene.is_dir() else folder
            occ = padded.find(folder / "occ_gt" / occ_name, OCC_SUFFIX)
            flow = folder / "occ_gt" / flow_name
        out.append(LabelFiles(occ, padded.find(flow, FLOW_SUFFIX)))
    return out


@dataclass
class LabelCheck:
    """Result of checking a log's label files: problems per file (empty when all are valid)."""

    frames: int
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        """All problems in words (file, problem, count), or "N frames OK"."""
        return _format_problems(self.problems) if self.problems else f"{self.frames} frames OK"


def check_label_files(files: Sequence[LabelFiles], grid: VoxelGrid = GRID) -> LabelCheck:
    """Check every frame's files; a missing flow file is a problem (OpenScene ships both)."""
    report = LabelCheck(frames=len(files))
    for f in files:
        problems = check_label_file(f.occ, f.flow, grid)
        if problems:
            report.problems[str(f.occ)] = problems
    return report
