"""Restricted unpickling of untrusted pickles (nuPlan calibration columns, OpenScene metadata).

``pickle.loads`` runs whatever callables a pickle names, so a pickle from the internet can execute
code. :func:`restricted_loads` admits only the globals (``module``, ``name``) that the caller allows and
raises :class:`~driveengine.errors.UnsafePickleError` for anything else *before* it is imported or
called. Ready-made allow-lists:

* :data:`NUMPY_GLOBALS`: numpy arrays, dtypes and scalars, under numpy 1.x and 2.x module names;
* :data:`BUILTIN_GLOBALS`: plain builtin containers and scalars (the sibling readers add what they need);
* :data:`CALIBRATION_GLOBALS`: what a nuPlan ``camera``/``lidar`` calibration column may hold: lists,
  tuples, floats, ints, numpy arrays and the devkit's list types
  ``nuplan.database.common.data_types.{Translation, Rotation, CameraIntrinsic}`` (mapped to plain list
  subclasses defined here, so the devkit need not be installed).

Example (OpenScene metadata reader)::

    allowed = {**BUILTIN_GLOBALS, **NUMPY_GLOBALS}
    frames = restricted_loads(path.read_bytes(), allowed, path, what="OpenScene metadata")
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import copyreg
import importlib
import io
import pickle
from collections.abc import Collection, Mapping
from os import PathLike

import numpy as np
import numpy._core.multiarray as _np_multiarray
import numpy._core.numeric as _np_numeric

from driveengine.errors import SourceError, UnsafePickleError

Allowed = Mapping[tuple[str, str], object] | Collection[tuple[str, str]]


def _numpy_globals() -> dict[tuple[str, str], object]:
    """numpy's pickling globals under both the 1.x (``numpy.core``) and 2.x (``numpy._core``) names."""
    out: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol < 3 pickles store raw bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): _codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = _np_multiarray._reconstruct
        out[(f"{core}.multiarray", "scalar")] = _np_multiarray.scalar
        out[(f"{core}.numeric", "_frombuffer")] = _np_numeric._frombuffer
    return out


#: numpy arrays (any protocol), dtypes and numpy scalars.
NUMPY_GLOBALS: dict[tuple[str, str], object] = _numpy_globals()

#: Builtin containers and scalars a data pickle may name explicitly.
BUILTIN_GLOBALS: dict[tuple[str, str], object] = {
    ("builtins", t.__name__): t
    for t in (list, tuple, dict, set, frozenset, float, int, complex, bool, str, bytes, bytearray)
}


class Translation(list):
    """Stand-in for ``nuplan.database.common.data_types.Translation``: [x, y, z] in metres."""


class Rotation(list):
    """Stand-in for ``nuplan.database.common.data_types.Rotation``: quaternion [w, x, y, z]."""


class CameraIntrinsic(list):
    """Stand-in for ``nuplan.database.common.data_types.CameraIntrinsic``: 3x3 rows, pixels."""


#: What a nuPlan calibration column (``camera.translation``, ``lidar.rotation``, ...) may contain.
CALIBRATION_GLOBALS: dict[tuple[str, str], object] = {
    **{("builtins", t.__name__): t for t in (list, tuple, float, int)},
    **NUMPY_GLOBALS,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,  # protocol 0/1 pickles of list subclasses
    **{
        ("nuplan.database.common.data_types", t.__name__): t for t in (Translation, Rotation, CameraIntrinsic)
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``allowed`` and refuses everything else.

    Args:
        file: binary stream holding the pickle.
        allowed: ``(module, name) -> object`` to hand out, or a collection of ``(module, name)`` pairs
            that are imported on first use (only after they passed the check).
        path: the file the pickle came from (for the error message).
        what: where in that file the pickle sits, e.g. "column camera.rotation of channel CAM_F0".
    """

    def __init__(self, file: io.BufferedIOBase, allowed: Allowed, path: str | PathLike[str], what: str):
        super().__init__(file)
        self._allowed = allowed
        self._path = path
        self._what = what

    def find_class(self, module: str, name: str) -> object:
        # protocol 0-2 pickles written by Python 3 use Python 2 names (copy_reg, __builtin__)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key not in self._allowed:
            raise UnsafePickleError(
                self._path,
                f"{self._what} asks for {module}.{name}, which this pickle may not contain; "
                "nothing from it was run",
                "the file is corrupt or malicious: do not load it with plain pickle; re-download it "
                "from the official release",
            )
        if isinstance(self._allowed, Mapping):
            return self._allowed[key]
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(self._path, f"{self._what} uses persistent ids, which are not allowed")


def restricted_loads(
    data: bytes, allowed: Allowed, path: str | PathLike[str], what: str = "pickle"
) -> object:
    """Unpickle ``data`` admitting only the globals in ``allowed``.

    Args:
        data: the pickle bytes.
        allowed: see :class:`RestrictedUnpickler` (e.g. ``{**BUILTIN_GLOBALS, **NUMPY_GLOBALS}``).
        path: the file the bytes came from, named in errors.
        what: where in the file the bytes came from, named in errors.

    Raises:
        UnsafePickleError: the pickle names a global outside ``allowed`` (raised before it is imported
            or called).
        SourceError: the bytes are not a valid pickle (truncated, corrupt, wrong type).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SourceError(path, f"{what} holds {type(data).__name__}, expected pickled bytes")
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, path, what).load()
    except SourceError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise SourceError(
            path, f"{what} is not a valid pickle ({type(exc).__name__}: {exc})", "the file may be corrupt"
        ) from exc


def load_calibration(data: bytes, shape: tuple[int, ...], path: str | PathLike[str], what: str) -> np.ndarray:
    """A pickled nuPlan calibration value as a float64 array of ``shape``.

    Accepts the devkit's list types, plain lists/tuples and numpy arrays (see
    :data:`CALIBRATION_GLOBALS`); refuses anything else with :class:`UnsafePickleError`.

    Args:
        data: the column's BLOB.
        shape: expected shape, e.g. ``(3,)`` for a translation, ``(4,)`` for a ``[w, x, y, z]`` rotation,
            ``(3, 3)`` for an intrinsic matrix, ``(5,)`` for distortion.
        path: the database file, named in errors.
        what: e.g. "column camera.rotation of channel CAM_F0", named in errors.
    """
    if data is None:
        raise SourceError(path, f"{what} is NULL", "the log's calibration is incomplete")
    value = restricted_loads(data, CALIBRATION_GLOBALS, path, what)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SourceError(path, f"{what} holds {type(value).__name__}, not numbers ({exc})") from exc
    if array.shape != shape:
        raise SourceError(path, f"{what} has shape {array.shape}, expected {shape}")
    return array
