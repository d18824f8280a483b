"""Writing pickles that every numpy from 1.21 to 2.x loads: the one pickle writer of DriveEngine.

numpy 2 renamed its private ``numpy.core`` package to ``numpy._core``, and a plain ``pickle.dumps`` of
an array names the new module (``numpy._core.multiarray._reconstruct``). Consumers of OpenScene files
pin older numpy (NAVSIM 1.23.4, OpenScene's install docs 1.22.4), where loading such a pickle fails
with ``ModuleNotFoundError: No module named 'numpy._core'``.

:func:`dumps` writes the names numpy 1.x itself writes, which exist in both worlds:

* arrays: ``numpy.core.multiarray._reconstruct`` + ``numpy.ndarray`` + ``numpy.dtype`` (the stream
  numpy 1.x produces for protocol 4);
* numpy scalars: ``numpy.core.multiarray.scalar``;
* the boolean scalar type: ``numpy.bool_`` (numpy 2's ``numpy.bool`` does not exist in 1.24-1.26 and
  is Python's ``bool`` in 1.21-1.23).

numpy 2 keeps ``numpy/core/multiarray.py`` as a shim whose module globals ``_reconstruct`` and
``scalar`` are the very objects of ``numpy._core.multiarray`` ("these must import without warning or
error from numpy.core.multiarray to support old pickle files"), so plain ``pickle.load`` under numpy
2.x resolves them silently too. Any other name under ``numpy._core`` or ``numpy.dtypes`` (a numpy-2
only object such as ``StringDType``) cannot be written portably and is refused with
:class:`PickleWriteError` instead of writing a file an old numpy cannot read.

The writer is the standard library's pure-Python pickler with only :meth:`save_global` changed, so the
rest of the stream is exactly what :func:`pickle.dumps` writes (protocol 4, readable by Python >= 3.4).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import types
import warnings
from functools import cache

from driveengine.errors import DriveEngineError

#: Protocol of every pickle DriveEngine writes (OpenScene wrote HIGHEST_PROTOCOL; 4 reads on Python >= 3.4
#: and stores arrays through ``_reconstruct``, not protocol 5's out-of-band ``_frombuffer``).
PICKLE_PROTOCOL = 4

#: ``(module, name)`` numpy 2 writes -> the ``(module, name)`` written instead (present in numpy 1.21-2.x).
PORTABLE_NAMES: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy._core.multiarray", "_reconstruct"): ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"): ("numpy.core.multiarray", "scalar"),
    ("numpy", "bool"): ("numpy", "bool_"),
}

#: Modules whose names do not exist in numpy 1.21 (their objects cannot be pickled portably).
_NUMPY2_ONLY_MODULES = ("numpy._core", "numpy.dtypes")


class PickleWriteError(DriveEngineError):
    """An object cannot be pickled so that numpy 1.x and 2.x both load it."""


@cache
def _resolve(module: str, name: str) -> object:
    """The object ``module.name`` (imported without warnings), as ``pickle.load`` would find it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a name that warns on load is not a portable name
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    return obj


def _module_of(obj: object, name: str) -> str:
    """The module ``pickle`` records for a global (its ``__module__``, else a search of sys.modules)."""
    module = getattr(obj, "__module__", None)
    if module is not None:
        return module
    return pickle.whichmodule(obj, name)


class PortablePickler(pickle._Pickler):
    """A pickler writing numpy globals under names numpy 1.21-2.x all resolve (see the module doc).

    Use :func:`dumps` or :func:`write_pickle`; the protocol is fixed to :data:`PICKLE_PROTOCOL`.
    """

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)

    def save_global(self, obj: object, name: str | None = None) -> None:
        qualname = name or getattr(obj, "__qualname__", None) or obj.__name__  # type: ignore[attr-defined]
        module = _module_of(obj, qualname)
        target = PORTABLE_NAMES.get((module, qualname))
        if target is None:
            if module.startswith(_NUMPY2_ONLY_MODULES):
                raise PickleWriteError(
                    f"{module}.{qualname} exists only in numpy 2: a pickle naming it cannot be loaded by "
                    "numpy 1.x (convert the value to a plain array or Python type first)"
                )
            super().save_global(obj, name)
            return
        try:
            same = _resolve(*target) is obj
        except (ImportError, AttributeError, Warning) as exc:
            raise PickleWriteError(
                f"{target[0]}.{target[1]} does not resolve under this numpy ({exc})"
            ) from exc
        if not same:
            raise PickleWriteError(f"{target[0]}.{target[1]} is not {module}.{qualname} under this numpy")
        self.save(target[0])
        self.save(target[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    # the base class dispatches Python functions straight to its own save_global: route them here too
    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[types.FunctionType] = save_global


def dumps(obj: object) -> bytes:
    """``obj`` pickled (protocol 4) so that plain ``pickle.load`` reads it under numpy 1.21-2.x.

    Raises:
        PickleWriteError: ``obj`` holds an object that only numpy 2 can name.
    """
    buffer = io.BytesIO()
    PortablePickler(buffer).dump(obj)
    return buffer.getvalue()


def write_pickle(path: str | os.PathLike[str], obj: object) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file, fsync, rename) with :func:`dumps`."""
    from driveengine.files import atomic_write_bytes

    atomic_write_bytes(path, dumps(obj))


def pickle_module_names(data: bytes) -> set[str]:
    """The modules a pickle names: ``GLOBAL``/``INST`` arguments and the module strings of ``STACK_GLOBAL``.

    For checks and tests (the modules an unpickler would import); memoised strings are followed.
    """
    import pickletools

    names: set[str] = set()
    recent: list[str | None] = []  # values pushed by the string/memo-get opcodes since the last other op
    memo: dict[int, str | None] = {}
    for op, arg, _pos in pickletools.genops(data):
        kind = op.name
        if kind in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "SHORT_BINSTRING"):
            recent.append(str(arg))
        elif kind in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif kind == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif kind == "FRAME":
            continue
        else:
            if kind in ("GLOBAL", "INST"):
                names.add(str(arg).split(" ", 1)[0])
            elif kind == "STACK_GLOBAL":
                module = recent[-2] if len(recent) >= 2 else None
                names.add(module if module is not None else "<unknown>")
            recent = []
    return names
