"""Restricted, bounded unpickling of untrusted pickles (nuPlan calibration columns, OpenScene metadata).

``pickle.loads`` runs whatever callables a pickle names, and even a pickle that names nothing can ask
for gigabytes or hours. :func:`restricted_loads` defends in three layers and raises
:class:`~driveengine.errors.UnsafePickleError` (naming the file) for anything hostile:

1. **Before anything is built**, a compiled scan of the opcodes (:func:`scan_pickle`) checks every length
   claim against the bytes that remain, refuses memo slots far beyond the objects built so far (a 12-byte
   ``LONG_BINPUT 2**31`` makes CPython's unpickler zero 32 GB), bounds the nesting of tuples, and bounds the
   work of hashing dictionary keys and set items (tuples that share their parts hash in exponential time).
2. **While unpickling**, only the globals the caller allows are resolved (checked *before* import), and
   every callable among them is a guard that checks its arguments before it runs: ``bytearray(2**31)``,
   ``bytes(n)``, ``numpy.ndarray(shape)``, or ``str`` of a container are refused; copies are charged to an
   allocation budget proportional to the file's size; numpy dtypes and arrays are rebuilt from validated
   descriptions (numpy itself crashes on forged dtype flags or an object array whose item list is short).
3. **After unpickling**, the result is walked once: reference cycles, nesting deeper than
   :data:`MAX_DEPTH` and shared parts that expand to more than the tree budget (``[L, L]`` nested 60 times
   is a 300-byte pickle of 2**60 items when traversed, e.g. by ``str`` or ``np.asarray``) are refused.

Budgets are relative to the pickle's size (with a floor), so valid files of any size load and a hostile
one fails in milliseconds. Ready-made allow-lists:

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
import contextvars
import copyreg
import gc
import importlib
import io
import math
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from os import PathLike
from typing import NoReturn

import numpy as np
import numpy._core.multiarray as _np_multiarray
import numpy._core.numeric as _np_numeric

from driveengine.errors import SourceError, UnsafePickleError

Allowed = Mapping[tuple[str, str], object] | Collection[tuple[str, str]]

#: Tree budget: a pickle of ``n`` bytes may expand (shared parts counted each time they are reached,
#: strings/bytes/arrays one unit per 64 bytes) to ``max(TREE_UNITS_FLOOR, TREE_UNITS_PER_BYTE * n)``
#: units. Plain data stays below one unit per byte (a list of ``None`` is one byte per item).
TREE_UNITS_PER_BYTE = 2
TREE_UNITS_FLOOR = 1 << 20
#: Allocation budget of the guarded callables (copies, array payloads), bytes per byte of pickle.
ALLOC_BYTES_PER_BYTE = 4
ALLOC_BYTES_FLOOR = 64 << 20
#: Hashing budget (dictionary keys, set items; a shared tuple counted each time it is reached).
HASH_UNITS_PER_BYTE = 2
HASH_UNITS_FLOOR = 1 << 20
#: Deepest nesting of containers a data pickle may have (OpenScene metadata has 5 levels).
MAX_DEPTH = 100

_HINT = "the file is corrupt or malicious: do not load it with plain pickle; re-download it from the official release"


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

#: Most values a stand-in calibration list may be built from by a call (a 3x3 matrix has 3 rows).
_STAND_IN_MAX_ITEMS = 64


class _StandIn(list):
    """A devkit list type: no attributes (pickles never carry any) and at most a few values per call."""

    __slots__ = ()

    def __init__(self, values: object = (), /) -> None:
        if isinstance(values, list | tuple) and len(values) <= _STAND_IN_MAX_ITEMS:
            super().__init__(values)
        else:
            raise ValueError(
                f"{type(self).__name__} holds a calibration value: a list or tuple of at most "
                f"{_STAND_IN_MAX_ITEMS} items, not {type(values).__name__}"
            )


class Translation(_StandIn):
    """Stand-in for ``nuplan.database.common.data_types.Translation``: [x, y, z] in metres."""

    __slots__ = ()


class Rotation(_StandIn):
    """Stand-in for ``nuplan.database.common.data_types.Rotation``: quaternion [w, x, y, z]."""

    __slots__ = ()


class CameraIntrinsic(_StandIn):
    """Stand-in for ``nuplan.database.common.data_types.CameraIntrinsic``: 3x3 rows, pixels."""

    __slots__ = ()


_STAND_INS = (Translation, Rotation, CameraIntrinsic)

#: What a nuPlan calibration column (``camera.translation``, ``lidar.rotation``, ...) may contain.
CALIBRATION_GLOBALS: dict[tuple[str, str], object] = {
    **{("builtins", t.__name__): t for t in (list, tuple, float, int)},
    **NUMPY_GLOBALS,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,  # protocol 0/1 pickles of list subclasses
    **{("nuplan.database.common.data_types", t.__name__): t for t in _STAND_INS},
}


# -- layer 1: the opcode scan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan_pickle` learnt about a pickle it accepted."""

    opcodes: int  #: opcodes up to and including STOP
    end: int  #: offset just past STOP (later bytes are ignored, as pickle does)
    hash_units: int  #: work of hashing dict keys and set items, shared tuples counted each time


def scan_pickle(data: bytes, path: str | PathLike[str], what: str = "pickle") -> ScanResult:
    """Check a pickle's opcodes before anything is built from them (layer 1 of :func:`restricted_loads`).

    Compiled (numba, :mod:`driveengine.sources._pickle_scan`); about 10 ms for a 40 MB OpenScene file.

    Raises:
        UnsafePickleError: a memo slot beyond those set so far (CPython's unpickler would zero memory up
            to it), tuples nested deeper than :data:`MAX_DEPTH`, or hashing work beyond the budget.
        SourceError: the bytes are not a valid pickle (unknown opcode, a length beyond the end, stack
            underflow, no STOP).
    """
    from driveengine.sources import _pickle_scan as ps

    out = np.zeros(8, dtype=np.int64)
    hash_limit = max(HASH_UNITS_FLOOR, HASH_UNITS_PER_BYTE * len(data))
    ps.scan_kernel(np.frombuffer(data, dtype=np.uint8), hash_limit, MAX_DEPTH, out)
    status, at, code, ops, detail, end, work = (int(v) for v in out[:7])
    name = ps.OPCODE_NAME.get(code, f"0x{code:02x}")
    if status == ps.OK:
        return ScanResult(opcodes=ops, end=end, hash_units=work)
    if status == ps.MEMO_BOMB:
        raise UnsafePickleError(
            path,
            f"{what} is refused: opcode {name} at byte {at} asks for memo slot {detail} after {ops} "
            "opcodes (a memory bomb); nothing from it was built",
            _HINT,
        )
    if status == ps.HASH_BOMB:
        raise UnsafePickleError(
            path,
            f"{what} is refused: hashing its dict keys and set items takes {detail} steps by byte {at}, "
            f"more than the {hash_limit} allowed for {len(data)} bytes (shared tuples expand "
            "exponentially); nothing from it was built",
            _HINT,
        )
    if status == ps.TOO_DEEP:
        raise UnsafePickleError(
            path,
            f"{what} is refused: tuples nested more than {MAX_DEPTH} levels deep at byte {at}; "
            "nothing from it was built",
            _HINT,
        )
    claimed = f" (it claims {detail} bytes, {len(data) - at} remain)" if detail else ""
    reason = {
        ps.BAD_OPCODE: f"byte {at} is 0x{code:02x}, not a pickle opcode",
        ps.TRUNCATED: f"opcode {name} at byte {at} runs past the end of the data{claimed}",
        ps.NEGATIVE: f"opcode {name} at byte {at} has a negative length",
        ps.UNDERFLOW: f"opcode {name} at byte {at} finds too few items on the stack",
        ps.NO_MEMO: f"opcode {name} at byte {at} reads memo slot {detail}, which was never set",
        ps.NO_STOP: "it ends without a STOP opcode (truncated)",
        ps.BAD_INDEX: f"opcode {name} at byte {at} has a malformed memo index",
    }[status]
    raise SourceError(path, f"{what} is not a valid pickle ({reason})", "the file may be corrupt")


# -- layer 2: guarded globals ---------------------------------------------------------------------------

#: The load in progress (for the array and dtype placeholders, which numpy's BUILD reaches directly).
_ACTIVE: contextvars.ContextVar[_Load | None] = contextvars.ContextVar(
    "driveengine_safe_pickle_load", default=None
)


class _Load:
    """Budgets and the names for error messages of one :func:`restricted_loads` call."""

    __slots__ = ("alloc_limit", "alloc_used", "path", "size", "tree_limit", "what")

    def __init__(self, path: str | PathLike[str], what: str, size: int) -> None:
        self.path = path
        self.what = what
        self.size = size
        self.alloc_limit = max(ALLOC_BYTES_FLOOR, ALLOC_BYTES_PER_BYTE * size)
        self.alloc_used = 0
        self.tree_limit = max(TREE_UNITS_FLOOR, TREE_UNITS_PER_BYTE * size)

    def refuse(self, reason: str) -> NoReturn:
        raise UnsafePickleError(
            self.path, f"{self.what} is refused: {reason}; nothing from it was kept", _HINT
        )

    def charge(self, nbytes: int, purpose: str) -> None:
        """Count ``nbytes`` about to be allocated for ``purpose``; refuse past the budget."""
        self.alloc_used += nbytes
        if self.alloc_used > self.alloc_limit:
            self.refuse(
                f"{purpose} would bring its allocations to {self.alloc_used} bytes, more than the "
                f"{self.alloc_limit} allowed for a {self.size}-byte pickle (a memory bomb)"
            )


def _strict_load() -> _Load:
    """The active load, or a strict stand-in when a guard is reached outside :func:`restricted_loads`."""
    load = _ACTIVE.get()
    return load if load is not None else _Load("<pickle>", "pickle", 0)


_Rule = Callable[[_Load, object, str, tuple[object, ...]], object]


class _Guard:
    """Stands in for an allowed callable: checks the arguments (and charges copies) before calling it."""

    __slots__ = ("_load", "_rule", "name", "target")

    def __init__(self, target: object, name: str, rule: _Rule, load: _Load) -> None:
        self.target = target
        self.name = name
        self._rule = rule
        self._load = load

    def __call__(self, *args: object, **kwargs: object) -> object:
        if kwargs:
            self._load.refuse(f"it calls {self.name} with keyword arguments")
        return self._rule(self._load, self.target, self.name, args)

    def __repr__(self) -> str:
        return f"<guarded {self.name}>"


def _unguard(value: object) -> object:
    return value.target if isinstance(value, _Guard) else value


def _describe(args: tuple[object, ...]) -> str:
    parts = []
    for a in args:
        if isinstance(a, int) and a.bit_length() > 64:
            parts.append(f"<int of {a.bit_length()} bits>")
        elif isinstance(a, int | float | bool) or a is None:
            parts.append(repr(a))
        elif isinstance(a, str | bytes | bytearray | list | tuple | dict | set | frozenset):
            parts.append(f"<{type(a).__name__} of {len(a)}>")
        else:
            parts.append(f"<{type(a).__name__}>")
    return ", ".join(parts)


def _refuse_call(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    load.refuse(f"it calls {name}({_describe(args)}), which a data pickle never does")


_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _bytes_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``bytes``/``bytearray``: empty, a copy of bytes, or latin-1 text; never a count."""
    if not args:
        return target()
    first = args[0]
    if len(args) == 1 and isinstance(first, bytes | bytearray):
        load.charge(len(first), f"{name}(<{len(first)} bytes>)")
        return target(first)
    if 2 <= len(args) <= 3 and all(type(a) is str for a in args) and args[1].lower() in _LATIN1:
        load.charge(len(first), f"{name}(<{len(first)} characters>)")
        return target(*args)
    if isinstance(first, int):
        load.refuse(f"it calls {name}({_describe(args)}), which allocates by count (a memory bomb)")
    return _refuse_call(load, target, name, args)


def _encode_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``_codecs.encode(text, "latin1")``: how protocol 0-2 pickles store bytes."""
    if 2 <= len(args) <= 3 and all(type(a) is str for a in args) and args[1].lower() in _LATIN1:
        load.charge(len(args[0]), f"{name}(<{len(args[0])} characters>)")
        return _codecs.encode(*args)
    return _refuse_call(load, target, name, args)


def _hash_units(items: Collection[object], limit: int) -> int:
    """Work of hashing ``items``: a tuple counts all it holds (shared parts every time it is reached; other
    hashable containers cache their hash)."""
    total = len(items)
    memo: dict[int, int] = {}

    def units(obj: object, depth: int) -> int:
        if not isinstance(obj, tuple):
            return 1
        known = memo.get(id(obj))
        if known is not None:
            return known
        if depth > MAX_DEPTH:
            return limit + 1
        n = 1 + sum(units(x, depth + 1) for x in obj)
        memo[id(obj)] = n
        return n

    for item in items:
        total += units(item, 0)
        if total > limit:
            break
    return total


def _set_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``set``/``frozenset`` of a list (protocol 0-3 pickles): copied and hashed, both charged."""
    if not args:
        return target()
    if len(args) == 1 and isinstance(args[0], list | tuple):
        items = args[0]
        load.charge(16 * len(items), f"{name}(<{len(items)} items>)")
        limit = max(HASH_UNITS_FLOOR, HASH_UNITS_PER_BYTE * load.size)
        if _hash_units(items, limit) > limit:
            load.refuse(f"{name}(...) hashes shared tuples that expand past {limit} steps")
        return target(items)
    return _refuse_call(load, target, name, args)


def _complex_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    if len(args) <= 2 and all(type(a) in (int, float) for a in args):
        return complex(*args)
    return _refuse_call(load, target, name, args)


def _reconstructor_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``copyreg._reconstructor(cls, list, items)`` of a devkit list type (protocol 0/1)."""
    if len(args) == 3:
        cls, base, state = args[0], _unguard(args[1]), args[2]
        if isinstance(cls, type) and issubclass(cls, _StandIn) and base is list:
            if state is None:
                return cls()
            if isinstance(state, list | tuple) and len(state) <= _STAND_IN_MAX_ITEMS:
                return cls(state)
    return _refuse_call(load, target, name, args)


# numpy ---------------------------------------------------------------------------------------------------

_DTYPE_SPEC = re.compile(r"[A-Za-z?][0-9]{0,10}")
_DTYPE_KINDS = frozenset("biufcSUO")  # no void/structured, no datetime: never in the data we read
_DTYPE_CACHE: dict[tuple[object, ...], np.dtype] = {}


class _PendingDtype:
    """A numpy dtype as the pickle describes it; turned into a real dtype only from a validated state.

    numpy's own ``dtype.__setstate__`` accepts forged flags (an ``f8`` that claims to hold objects), which
    crashes numpy later; so the description is checked against a dtype built from its name.
    """

    __slots__ = ("resolved", "spec", "state")

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.state: tuple[object, ...] | None = None
        self.resolved: np.dtype | None = None

    def __setstate__(self, state: object) -> None:
        load = _strict_load()
        if self.state is not None or self.resolved is not None:
            load.refuse(f"numpy dtype {self.spec!r} is given a state twice or after use")
        if not isinstance(state, tuple) or len(state) != 8 or any(x is not None for x in state[2:5]):
            load.refuse(f"numpy dtype {self.spec!r} has a state that is not a plain dtype's")
        if not all(isinstance(x, int | str) for x in (*state[:2], *state[5:])):
            load.refuse(f"numpy dtype {self.spec!r} has a state of unexpected types")
        self.state = state

    def resolve(self, load: _Load) -> np.dtype:
        """The real dtype (cached per description)."""
        if self.resolved is not None:
            return self.resolved
        key = (self.spec, self.state)
        dtype = _DTYPE_CACHE.get(key)
        if dtype is None:
            dtype = np.dtype(self.spec)
            if self.state is not None:
                order = self.state[1]
                if order in ("<", ">") and dtype.byteorder != "|":
                    dtype = dtype.newbyteorder(order)
                if dtype.__reduce__()[2] != self.state:
                    load.refuse(
                        f"numpy dtype {self.spec!r} has the state {self.state!r:.160}, which is not that "
                        "dtype's (forged flags or sizes)"
                    )
            if len(_DTYPE_CACHE) < 4096:
                _DTYPE_CACHE[key] = dtype
        self.resolved = dtype
        return dtype


def _dtype_of(load: _Load, value: object, purpose: str) -> np.dtype:
    if isinstance(value, _PendingDtype):
        return value.resolve(load)
    load.refuse(f"{purpose} names a {type(value).__name__} as its numpy dtype")


def _dtype_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``numpy.dtype("f8", False, True)``: a simple dtype by name; its state arrives through BUILD."""
    if 1 <= len(args) <= 3 and isinstance(args[0], str) and all(type(a) is bool for a in args[1:]):
        spec = args[0]
        if _DTYPE_SPEC.fullmatch(spec):
            try:
                kind = np.dtype(spec).kind
            except (TypeError, ValueError, OverflowError):
                kind = ""
            if kind in _DTYPE_KINDS:
                return _PendingDtype(spec)
        load.refuse(f"numpy dtype {spec!r:.40} is not allowed (only plain numbers, strings and objects)")
    return _refuse_call(load, target, name, args)


_new_checked_array = _np_multiarray._reconstruct
_ndarray_setstate = np.ndarray.__setstate__


class _CheckedArray(np.ndarray):
    """An array whose pickled state is validated before numpy reads it (turned into a plain ndarray after
    the load). numpy's ``__setstate__`` allocates by shape before it looks at the data, and crashes on an
    object array whose item list is shorter than its shape."""

    __slots__ = ("_plain",)  # the plain ndarray view that replaces it (one per array, however shared)

    def __setstate__(self, state: object) -> None:
        load = _ACTIVE.get() or _strict_load()
        if type(state) is not tuple or not 4 <= len(state) <= 5:
            load.refuse("a numpy array has a malformed state")
        shape, pending, raw = state[-4], state[-3], state[-1]
        dtype = pending.resolved if type(pending) is _PendingDtype else None
        if dtype is None:
            dtype = _dtype_of(load, pending, "a numpy array")
        if type(shape) is not tuple or len(shape) > 32:
            load.refuse(f"a numpy array has the shape {shape!r:.60}")
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                load.refuse(f"a numpy array has the shape {shape!r:.60}")
            count *= d
        if dtype.hasobject:
            if type(raw) is not list or len(raw) != count:
                load.refuse(f"a numpy object array of shape {shape} comes with {_describe((raw,))} items")
            nbytes = 8 * count
        else:
            nbytes = count * dtype.itemsize
            kind = type(raw)
            if (kind is not bytes and kind is not bytearray and kind is not str) or len(raw) != nbytes:
                load.refuse(
                    f"a numpy array of shape {shape} and dtype {dtype} comes with {_describe((raw,))} "
                    "of data, which does not match its size"
                )
        load.alloc_used += nbytes
        if load.alloc_used > load.alloc_limit:
            load.charge(0, f"a numpy array of shape {shape}")
        _ndarray_setstate(self, (*state[:-3], dtype, *state[-2:]))


def _reconstruct_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``_reconstruct(ndarray, (0,), b"b")``: numpy's empty placeholder, filled by BUILD."""
    if (
        len(args) == 3
        and _unguard(args[0]) is np.ndarray
        and type(args[1]) is tuple
        and args[1] == (0,)
        and args[2] in (b"b", "b")
    ):
        array = _np_multiarray._reconstruct(_CheckedArray, (0,), b"b")
        array._plain = None
        return array
    return _refuse_call(load, target, name, args)


class _ReconstructGuard(_Guard):
    """The guard of ``_reconstruct``, called once per array of a protocol 0-4 pickle: one frame, not two."""

    __slots__ = ()

    def __call__(self, *args: object, **kwargs: object) -> object:
        if not kwargs and len(args) == 3 and type(args[1]) is tuple and args[1] == (0,) and args[2] == b"b":
            subtype = args[0]
            if type(subtype) is _Guard and subtype.target is np.ndarray:
                array = _new_checked_array(_CheckedArray, (0,), b"b")
                array._plain = None
                return array
        return super().__call__(*args, **kwargs)


def _scalar_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``scalar(dtype, data)``: a numpy scalar from exactly ``itemsize`` bytes."""
    if len(args) == 2:
        dtype = _dtype_of(load, args[0], "a numpy scalar")
        data = args[1]
        if not dtype.hasobject and isinstance(data, bytes | str) and len(data) == dtype.itemsize:
            return _np_multiarray.scalar(dtype, data)
    return _refuse_call(load, target, name, args)


def _frombuffer_rule(load: _Load, target: object, name: str, args: tuple[object, ...]) -> object:
    """``_frombuffer(buffer, dtype, shape, order)`` (protocol 5): a view of exactly the buffer's bytes."""
    if len(args) == 4 and isinstance(args[0], bytes | bytearray) and args[3] in ("C", "F", "A", "K"):
        buffer, dtype, shape = args[0], _dtype_of(load, args[1], "a numpy array"), args[2]
        if (
            not dtype.hasobject
            and type(shape) is tuple
            and len(shape) <= 32
            and all(type(d) is int and d >= 0 for d in shape)
            and math.prod(shape) * dtype.itemsize == len(buffer)
        ):
            return _np_numeric._frombuffer(buffer, dtype, shape, args[3])
    return _refuse_call(load, target, name, args)


#: Checks of the callables the allow-lists hand out, by the callable's identity; anything allowed but not
#: here (the devkit stand-ins, names a caller imports) is handed out as is.
_RULES: dict[int, _Rule] = {
    id(bytes): _bytes_rule,
    id(bytearray): _bytes_rule,
    id(set): _set_rule,
    id(frozenset): _set_rule,
    id(complex): _complex_rule,
    **{id(t): _refuse_call for t in (list, tuple, dict, str, int, float, bool, np.ndarray)},
    id(_codecs.encode): _encode_rule,
    id(copyreg._reconstructor): _reconstructor_rule,
    id(np.dtype): _dtype_rule,
    id(_np_multiarray._reconstruct): _reconstruct_rule,
    id(_np_multiarray.scalar): _scalar_rule,
    id(_np_numeric._frombuffer): _frombuffer_rule,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``allowed`` (refusing the rest before import), guarded by _RULES."""

    def __init__(self, file: io.BufferedIOBase, allowed: Allowed, load: _Load) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._load = load

    def find_class(self, module: str, name: str) -> object:
        # protocol 0-2 pickles written by Python 3 use Python 2 names (copy_reg, __builtin__)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key not in self._allowed:
            raise UnsafePickleError(
                self._load.path,
                f"{self._load.what} asks for {module}.{name}, which this pickle may not contain; "
                "nothing from it was run",
                _HINT,
            )
        if isinstance(self._allowed, Mapping):
            value = self._allowed[key]
        else:
            value = getattr(importlib.import_module(module), name)
        rule = _RULES.get(id(value))
        if rule is None:
            return value
        guard = _ReconstructGuard if rule is _reconstruct_rule else _Guard
        return guard(value, f"{module}.{name}", rule, self._load)

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(
            self._load.path, f"{self._load.what} uses persistent ids, which are not allowed"
        )


# -- layer 3: the walk of the result ---------------------------------------------------------------------

_LEAVES = frozenset({int, float, bool, complex, type(None)})


class _Finisher:
    """One walk of the unpickled value: placeholders replaced by real numpy objects, cycles, depth and the
    tree budget checked (a part shared k times counts k times, as any traversal would pay).

    Containers and arrays are visited once (memo by id), so the walk costs O(objects built), however
    large the tree the budget measures. Plain leaves are counted inline (this walk is on the hot path of
    every OpenScene load).
    """

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.limit = load.tree_limit
        self.done: dict[int, tuple[object, int]] = {}
        self.active: set[int] = set()

    def value(self, v: object, depth: int) -> tuple[object, int]:
        """(replacement, units) of one contained value."""
        t = type(v)
        if t is str:
            return v, 1 + (len(v) >> 6)
        if t in _LEAVES:
            return v, 1
        if t is bytes or t is bytearray:
            return v, 1 + (len(v) >> 6)
        if t is _CheckedArray and not v.dtype.hasobject:
            if v._plain is None:
                v._plain = v.view(np.ndarray)
            return v._plain, 1 + (v.nbytes >> 6)
        return self.walk(v, depth)

    def walk(self, obj: object, depth: int) -> tuple[object, int]:
        """(replacement, units) of a container, array or placeholder (see the class doc)."""
        key = id(obj)
        known = self.done.get(key)
        if known is not None:
            return known
        if key in self.active:
            self.load.refuse("it contains a reference cycle, which plain data never does")
        if depth > MAX_DEPTH:
            self.load.refuse(f"it nests containers more than {MAX_DEPTH} levels deep")
        self.active.add(key)
        out: object = obj
        units = 1
        inner = depth + 1
        value = self.value
        if isinstance(obj, dict):
            units += 2 * len(obj)  # keys and values as plain leaves; the rest is added below
            for k, v in obj.items():
                t = type(v)
                if t is str:
                    units += len(v) >> 6
                elif t is _CheckedArray and (v._plain is not None or not v.dtype.hasobject):
                    plain = v._plain
                    if plain is None:
                        plain = v._plain = v.view(np.ndarray)
                    obj[k] = plain
                    units += v.nbytes >> 6
                elif t not in _LEAVES:
                    nv, vu = value(v, inner)
                    units += vu - 1
                    if nv is not v:
                        obj[k] = nv
                if type(k) is not str:
                    nk, ku = value(k, inner)
                    units += ku - 1
                    if nk is not k:
                        self.load.refuse("a numpy value is part of a dict key")
        elif isinstance(obj, list | tuple):
            units += len(obj)
            replaced = None
            for i, v in enumerate(obj):
                t = type(v)
                if t is str:
                    units += len(v) >> 6
                elif t not in _LEAVES:
                    nv, vu = value(v, inner)
                    units += vu - 1
                    if nv is not v:
                        replaced = replaced or {}
                        replaced[i] = nv
            if replaced:
                if isinstance(obj, list):
                    for i, nv in replaced.items():
                        obj[i] = nv
                else:
                    out = tuple(replaced.get(i, v) for i, v in enumerate(obj))
        elif isinstance(obj, set | frozenset):
            for v in obj:
                nv, vu = value(v, inner)
                units += vu
                if nv is not v:
                    self.load.refuse("a numpy value sits inside a set")
        elif isinstance(obj, np.ndarray):
            out = obj.view(np.ndarray) if type(obj) is _CheckedArray else obj
            if obj.dtype.hasobject:
                for i, v in enumerate(out.reshape(-1).tolist()):  # C order, as out.flat
                    nv, vu = value(v, inner)
                    units += vu
                    if nv is not v:
                        out.flat[i] = nv
            else:
                units += obj.nbytes >> 6
        elif isinstance(obj, _PendingDtype):
            out = obj.resolve(self.load)
        elif isinstance(obj, _Guard):
            out = obj.target
        elif isinstance(obj, np.generic):
            units += obj.nbytes >> 6
        if units > self.limit:
            self.load.refuse(
                f"its shared parts expand to more than {self.limit} items when followed "
                f"(a memory bomb of {self.load.size} bytes)"
            )
        self.active.discard(key)
        self.done[key] = (out, units)
        return out, units


def restricted_loads(
    data: bytes, allowed: Allowed, path: str | PathLike[str], what: str = "pickle"
) -> object:
    """Unpickle ``data`` admitting only the globals in ``allowed``, within budgets relative to its size.

    Args:
        data: the pickle bytes.
        allowed: ``(module, name) -> object`` to hand out (e.g. ``{**BUILTIN_GLOBALS, **NUMPY_GLOBALS}``),
            or a collection of ``(module, name)`` pairs imported on first use (only after the check).
            Callables among them that allocate or copy are guarded (see the module doc).
        path: the file the bytes came from, named in errors.
        what: where in the file the bytes came from, named in errors.

    Raises:
        UnsafePickleError: the pickle names a global outside ``allowed`` (raised before it is imported
            or called), or asks for more memory, work or nesting than its size justifies.
        SourceError: the bytes are not a valid pickle (truncated, corrupt, wrong type).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SourceError(path, f"{what} holds {type(data).__name__}, expected pickled bytes")
    data = bytes(data) if not isinstance(data, bytes) else data
    scan_pickle(data, path, what)  # the unpickler stops at the STOP the scan stopped at
    load = _Load(path, what, len(data))
    token = _ACTIVE.set(load)
    collecting = gc.isenabled()
    gc.disable()  # nothing built here is garbage until the end; the collector would rescan it all often
    try:
        value = _RestrictedUnpickler(io.BytesIO(data), allowed, load).load()
        return _Finisher(load).walk(value, 0)[0]
    except SourceError:
        raise
    except RecursionError as exc:  # pragma: no cover - the scan and the walk bound nesting first
        raise UnsafePickleError(path, f"{what} is refused: it nests too deeply ({exc})", _HINT) from None
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise SourceError(
            path, f"{what} is not a valid pickle ({type(exc).__name__}: {exc})", "the file may be corrupt"
        ) from exc
    finally:
        _ACTIVE.reset(token)
        if collecting:
            gc.enable()


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
