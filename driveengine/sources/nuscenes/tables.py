"""Column-wise, memory-bounded reading of nuScenes' JSON tables (one list of records per ``.json``).

A table of trainval is hundreds of MB of JSON (``sample_data.json``: 2.6M records). Loading it with one
``json.load`` builds millions of dicts at once (several GB). :func:`read_table` reads the file in blocks
of about :data:`BLOCK_BYTES`, cuts each block after a complete record, decodes the records of the block
with the standard library's C decoder (``json.loads`` of ``"[" + records + "]"``), turns the wanted
fields into numpy columns and drops the dicts, so at most one block of records exists at a time.

**Why cutting is safe.** A cut is made at a comma followed (after whitespace) by ``{``; each piece is
then decoded on its own as ``"[" + piece + "]"``. If every piece decodes, the pieces' records are
exactly the records of the whole list: the decoder's state at the start of a piece equals the whole
file's state after the preceding comma (by induction over the pieces), and a piece decodes only if it
ends right after a complete top-level record, so the comma was a separator of the list and not part of
a string or of a nested value. A cut that lands inside a string or a nested value makes its piece fail
to decode, at the bracket added after it (inside a nested value) or in a string running to the end of
the piece (inside a string); the reader then reads a larger block and cuts again (doubling, so the work
stays linear). Any other failure is a genuine syntax error (a JSON string holds no raw line break, so
an "unterminated" string across one is one too) and is reported with its byte offset.

**Decoding.** Each piece is decoded with msgspec straight into a typed record (a
:func:`msgspec.defstruct` of the wanted fields; the other fields are skipped without building Python
objects), which checks every wanted value's type as it parses and is several times faster than building
dicts. A piece msgspec refuses for a value's type is decoded again with the standard library and checked
field by field (:func:`convert`), for a message that names the row and field; if that finds nothing wrong
(msgspec is the stricter, e.g. a number beyond float64), msgspec's own reason is reported with the row.
A lone UTF-16 surrogate escape (``"\\ud800"``, no Unicode text) is a syntax error with its byte offset.

**Hostile input.** Non-standard constants (``NaN``, ``Infinity``) are refused, every value is checked
for its type (a token must be a string, a timestamp an integer, a translation three numbers: ``null``,
strings or nested lists where numbers belong are errors, never NaN), a missing field names the row,
deep nesting is an error (``RecursionError`` of the decoder), and the byte offset of a syntax error is
reported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec
import numpy as np

from driveengine.errors import SourceError

#: Bytes read per block (the dicts of one block exist at a time: about 5x this in memory).
BLOCK_BYTES = 8 << 20

_WS = frozenset(b" \t\r\n")
_HINT = "the table is not a nuScenes v1.0 table; re-download or re-extract the release metadata"

#: How a field is turned into a column:
#: ``token``: ASCII string -> bytes (``S``); ``text``: string -> UTF-8 bytes (``S``); ``int``: integer
#: -> int64; ``bool``: boolean; ``vec3``/``vec4``: 3 / 4 numbers -> float64 (n, k); ``intrinsic``: a 3x3
#: list of numbers or an empty list -> float64 (n, 3, 3), NaN for empty; ``opt_int``: an integer or an
#: absent field -> int64, -1 when absent.
Kind = Literal["token", "text", "int", "bool", "vec3", "vec4", "intrinsic", "opt_int"]


@dataclass(frozen=True)
class Column:
    """A field of a table and how it becomes a column (see :data:`Kind`)."""

    name: str
    kind: Kind


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


def _decode(doc: bytes) -> list:
    return json.loads(doc, parse_constant=_reject_constant)


#: The msgspec type of each column kind (intrinsics are checked for their 3x3 shape after decoding).
_FAST_TYPES: dict[str, object] = {
    "token": str, "text": str, "int": int, "opt_int": int, "bool": bool,
    "vec3": tuple[float, float, float], "vec4": tuple[float, float, float, float],
    "intrinsic": list[list[float]],
}  # fmt: skip
_CONSTANTS = (b"NaN", b"Infinity", b"-Infinity")
_VALIDATION_AT = re.compile(r"`\$\[(\d+)\]")


class _Invalid(Exception):
    """msgspec refused a piece for a value's type (not its syntax): ``message`` names the JSON path."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Syntax(ValueError):
    """A syntax error (or the end of the piece inside a value) at byte ``pos`` of the decoded piece, with
    the ``msg`` and ``pos`` attributes of :class:`json.JSONDecodeError` (what :func:`_bad_cut` reads)."""

    def __init__(self, msg: str, pos: int) -> None:
        super().__init__(msg)
        self.msg = msg
        self.pos = pos


def _fast_decoder(columns: Sequence[Column]) -> Callable[[bytes], list]:
    """``doc -> list of records`` decoding only ``columns`` into a typed msgspec struct.

    Raises :class:`_Syntax` for syntax errors and truncation (``pos`` = the end of ``doc``), :class:`_Invalid`
    for a value of the wrong type, ``RecursionError`` for too deep nesting."""
    fields = [
        (c.name, _FAST_TYPES[c.kind], -1) if c.kind == "opt_int" else (c.name, _FAST_TYPES[c.kind])
        for c in columns
    ]
    fields.sort(key=len)  # required fields before those with a default
    record = msgspec.defstruct("Record", fields, gc=False)
    decoder = msgspec.json.Decoder(list[record])

    def decode(doc: bytes) -> list:
        try:
            return decoder.decode(doc)
        except msgspec.ValidationError as exc:
            raise _Invalid(str(exc)) from None
        except msgspec.DecodeError as exc:
            text = str(exc)
            found = re.search(r"\(byte (\d+)\)", text)
            if found is None:  # "Input data was truncated": the piece ends inside a value
                raise _Syntax(text, len(doc)) from None
            pos = int(found.group(1))
            reason = text.removeprefix("JSON is malformed: ").replace(found.group(0), "").strip()
            constant = next((c for c in _CONSTANTS if doc.startswith(c, pos)), None)
            if constant is not None:
                reason = f"non-standard JSON constant {constant.decode()}"
            raise _Syntax(reason, pos) from None

    return decode


def _find_cut(buf: bytes, end: int) -> int:
    """Position of the last comma before ``end`` that is followed (after whitespace) by ``{``, or -1."""
    pos = end
    while True:
        pos = buf.rfind(b"{", 0, pos)
        if pos <= 0:
            return -1
        j = pos - 1
        while j >= 0 and buf[j] in _WS:
            j -= 1
        if j >= 0 and buf[j] == 0x2C:  # ','
            return j


def _bad_cut(exc: Exception, doc: bytes) -> bool:
    """Whether decoding ``doc`` (a piece + ``"]"``) failed because of where it was cut, not because the
    file is invalid: the decoder stopped at the closing bracket we added (the cut is inside a nested
    value), or in a string that runs to the end of the piece without a line break (the cut is inside a
    string: a JSON string cannot hold a raw line break, so one in between means the file is invalid)."""
    pos = getattr(exc, "pos", None)
    if pos is None:  # RecursionError: too deep whatever the cut
        return False
    if pos >= len(doc) - 1:
        return True
    tail = doc[pos:]
    return (
        str(getattr(exc, "msg", "")).startswith("Unterminated string")
        and b"\n" not in tail
        and b"\r" not in tail
    )


class _Blocks:
    """The records of a ``[...]`` JSON file, decoded a block at a time (see the module doc), as
    :meth:`_rows` gives them."""

    def __init__(self, path: Path, block_bytes: int, decode: Callable[[bytes], list] = _decode) -> None:
        self.path = path
        self.block_bytes = block_bytes
        self.decode = decode

    def _rows(self, doc: bytes) -> tuple[list, bool, str | None]:
        """``(records, typed, invalid)``: ``decode``'s records (``typed``), else the standard library's dicts
        with ``decode``'s reason for refusing a value's type, or without one when ``decode`` stopped at the end
        of the piece: the standard library decides then (a cut inside a value fails there too, with the
        position and message :func:`_bad_cut` reads; a piece the standard library decodes is used as is)."""
        try:
            return self.decode(doc), True, None
        except _Invalid as exc:
            return _decode(doc), False, exc.message
        except _Syntax as exc:
            if exc.pos < len(doc):
                raise
            return _decode(doc), False, None

    def _error(self, offset: int, reason: str) -> SourceError:
        return SourceError(
            self.path, f"not a valid JSON list of records near byte {offset} ({reason})", _HINT
        )

    def __iter__(self) -> Iterator[tuple[list, bool, str | None]]:
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise SourceError(self.path, f"cannot open the table ({exc.strerror or exc})", _HINT) from None
        try:
            yield from self._read(f)
        finally:
            f.close()

    def _read(self, f: BinaryIO) -> Iterator[tuple[list, bool, str | None]]:
        head = b""
        while True:  # skip leading whitespace
            chunk = f.read(4096)
            if not chunk:
                raise self._error(len(head), "empty file")
            head += chunk
            stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")  # a UTF-8 byte order mark is tolerated
            if stripped:
                break
        if stripped[:1] != b"[":
            raise self._error(len(head) - len(stripped), "expected a JSON list '[' of records")
        offset = len(head) - len(stripped) + 1  # file offset of pending[0]
        pending = stripped[1:]
        target = self.block_bytes
        eof = False
        while True:
            while len(pending) < target and not eof:
                data = f.read(max(self.block_bytes, target - len(pending)))
                if not data:
                    eof = True
                else:
                    pending += data
            if eof:
                try:
                    rows = self._rows(b"[" + pending)
                except (ValueError, RecursionError) as exc:
                    raise self._at(exc, offset) from None
                yield rows
                return
            cut = _find_cut(pending, len(pending))
            if cut < 0:
                target = 2 * max(target, len(pending))
                continue
            doc = b"".join((b"[", memoryview(pending)[:cut], b"]"))
            try:
                rows = self._rows(doc)
            except (ValueError, RecursionError) as exc:
                if not _bad_cut(exc, doc):
                    raise self._at(exc, offset) from None
                target = 2 * max(target, len(pending))
                continue
            yield rows
            pending = pending[cut + 1 :]
            offset += cut + 1
            target = self.block_bytes

    def _at(self, exc: Exception, offset: int) -> SourceError:
        if isinstance(exc, RecursionError):
            return self._error(offset, "values nested too deeply")
        pos = getattr(exc, "pos", None)
        msg = getattr(exc, "msg", str(exc))
        return self._error(offset + (pos - 1 if pos is not None else 0), msg)


def _strings(values: list, path: Path, table: str, field: str, ascii_only: bool) -> np.ndarray:
    if not set(map(type, values)) <= {str}:
        bad = next(v for v in values if type(v) is not str)
        raise SourceError(
            path,
            f"field {field} of table {table} holds {type(bad).__name__} {bad!r:.40}, expected a string",
            _HINT,
        )
    if not values:
        return np.zeros(0, dtype="S1")
    if ascii_only:
        try:
            return np.array(values, dtype="S")
        except UnicodeEncodeError:
            bad = next(v for v in values if not v.isascii())
            raise SourceError(
                path, f"field {field} of table {table} holds {bad!r:.60}, expected an ASCII token", _HINT
            ) from None
    try:
        return np.array(values, dtype="S")
    except UnicodeEncodeError:
        return np.array([v.encode("utf-8", "surrogatepass") for v in values], dtype="S")


def _numbers(values: list, k: int, path: Path, table: str, field: str) -> np.ndarray:
    try:
        out = np.array(values)  # numbers only: strings, null or ragged lists give another dtype or fail
    except (ValueError, TypeError):
        out = None
    if out is None or out.dtype.kind not in "iuf" or out.shape != (len(values), k):
        raise SourceError(path, f"field {field} of table {table} must hold {k} numbers per row", _HINT)
    return out.astype(np.float64, copy=False)


def _integers(values: list, path: Path, table: str, field: str) -> np.ndarray:
    if not set(map(type, values)) <= {int}:
        bad = next(v for v in values if type(v) is not int)
        raise SourceError(
            path,
            f"field {field} of table {table} holds {type(bad).__name__} {bad!r:.40}, expected an integer",
            _HINT,
        )
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        raise SourceError(
            path, f"field {field} of table {table} holds an integer beyond int64", _HINT
        ) from None


def _intrinsics(values: list, path: Path, table: str, field: str) -> np.ndarray:
    out = np.full((len(values), 3, 3), np.nan)
    for i, v in enumerate(values):  # calibrated_sensor: a few thousand rows at most
        if isinstance(v, list) and not v:
            continue
        try:
            m = np.array(v, dtype=np.float64)
        except (ValueError, TypeError):
            m = None
        if m is None or m.shape != (3, 3) or np.isnan(m).any():
            raise SourceError(
                path, f"field {field} of table {table}, row {i}: expected a 3x3 list of numbers or []", _HINT
            )
        out[i] = m
    return out


def convert(
    rows: list,
    columns: Sequence[Column],
    path: Path,
    table: str,
    first_row: int,
    numbers: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The ``columns`` of ``rows`` (dicts of one block), checked (see :data:`Kind`).

    ``first_row`` is the number of the block's first record in the file and ``numbers`` (if given) the
    position of each of ``rows`` in the block (rows left out by a filter), both for error messages.

    Raises:
        SourceError: a row is not an object, lacks a field, or a value has the wrong type.
    """

    if not rows:
        return {col.name: _empty(col) for col in columns}

    def row(i: int) -> int:
        return first_row + (int(numbers[i]) if numbers is not None else i)

    if not set(map(type, rows)) <= {dict}:
        i = next(i for i, r in enumerate(rows) if type(r) is not dict)
        raise SourceError(path, f"row {row(i)} of table {table} is not a JSON object", _HINT)
    out: dict[str, np.ndarray] = {}
    for col in columns:
        name = col.name
        if col.kind == "opt_int":
            values = [r.get(name, -1) for r in rows]
        else:
            try:
                values = [r[name] for r in rows]
            except KeyError:
                i = next(i for i, r in enumerate(rows) if name not in r)
                raise SourceError(
                    path, f"row {row(i)} of table {table} has no field {name!r}", _HINT
                ) from None
        if col.kind in ("token", "text"):
            out[name] = _strings(values, path, table, name, col.kind == "token")
        elif col.kind in ("int", "opt_int"):
            out[name] = _integers(values, path, table, name)
        elif col.kind == "bool":
            if not set(map(type, values)) <= {bool}:
                raise SourceError(path, f"field {name} of table {table} must hold true or false", _HINT)
            out[name] = np.array(values, dtype=bool)
        elif col.kind in ("vec3", "vec4"):
            out[name] = _numbers(values, int(col.kind[3]), path, table, name)
        elif col.kind == "intrinsic":
            out[name] = _intrinsics(values, path, table, name)
        else:  # pragma: no cover - programming error
            raise ValueError(col.kind)
    return out


def _columns(records: list, columns: Sequence[Column], path: Path, table: str) -> dict[str, np.ndarray]:
    """The ``columns`` of msgspec ``records`` of one block (their types already checked while decoding)."""
    if not records:
        return {col.name: _empty(col) for col in columns}
    out: dict[str, np.ndarray] = {}
    for col in columns:
        values = list(map(attrgetter(col.name), records))
        if col.kind in ("token", "text"):
            out[col.name] = _strings(values, path, table, col.name, col.kind == "token")
        elif col.kind in ("int", "opt_int"):
            out[col.name] = _integers(values, path, table, col.name)
        elif col.kind == "bool":
            out[col.name] = np.array(values, dtype=bool)
        elif col.kind in ("vec3", "vec4"):  # tuples of k floats (msgspec checked them): flattened
            k = int(col.kind[3])
            out[col.name] = np.fromiter(chain.from_iterable(values), np.float64, len(values) * k).reshape(
                -1, k
            )
        elif col.kind == "intrinsic":
            out[col.name] = _intrinsics(values, path, table, col.name)
        else:  # pragma: no cover - programming error
            raise ValueError(col.kind)
    return out


def _empty(col: Column) -> np.ndarray:
    if col.kind in ("token", "text"):
        return np.zeros(0, dtype="S1")
    if col.kind in ("int", "opt_int"):
        return np.zeros(0, dtype=np.int64)
    if col.kind == "bool":
        return np.zeros(0, dtype=bool)
    if col.kind == "intrinsic":
        return np.zeros((0, 3, 3))
    return np.zeros((0, int(col.kind[3])))


def _concat(parts: list[np.ndarray], col: Column) -> np.ndarray:
    if not parts:
        return _empty(col)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_table(
    path: str | os.PathLike[str],
    columns: Sequence[Column],
    *,
    table: str | None = None,
    filter_columns: Sequence[Column] = (),
    keep: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> dict[str, np.ndarray]:
    """Read the ``columns`` of a nuScenes JSON table, block by block (see the module doc).

    Args:
        path: the ``<table>.json`` file.
        columns: the fields to return as columns.
        table: the table's name in errors (default: the file's stem).
        filter_columns, keep: when given, ``keep`` receives the ``filter_columns`` of each block and
            returns a bool mask of the rows to keep; the other columns are converted for those rows only
            (e.g. only the LiDAR rows of ``sample_data``). The returned columns include the filter
            columns (kept rows).
        block_bytes: bytes per block.

    Returns:
        ``{field: array}`` with one row per (kept) record, in file order; see :data:`Kind` for the types.

    Raises:
        SourceError: the file is missing, not a JSON list of records, or a field is missing or of the
            wrong type (the message names the file, the row or byte offset, and the field).
    """
    path = Path(path)
    table = table or path.name.removesuffix(".json")
    names = {c.name for c in filter_columns}
    rest = [c for c in columns if c.name not in names]
    parts: dict[str, list[np.ndarray]] = {c.name: [] for c in (*filter_columns, *rest)}
    first = 0
    for rows, typed, invalid in _Blocks(path, block_bytes, _fast_decoder([*filter_columns, *rest])):
        if not isinstance(rows, list):  # pragma: no cover - the decoder returns the "[...]" we built
            raise SourceError(path, "expected a JSON list of records", _HINT)
        if invalid is not None:  # ``rows`` are the block's dicts: name the row and field
            convert(rows, [*filter_columns, *rest], path, table, first)
            at = _VALIDATION_AT.search(invalid)
            where = f"row {first + int(at.group(1))} of table {table}" if at else f"table {table}"
            raise SourceError(path, f"{where}: {invalid}", _HINT)
        numbers = None
        kept = rows
        if keep is not None:
            if typed:
                fcols = _columns(rows, filter_columns, path, table)
            else:
                fcols = convert(rows, filter_columns, path, table, first)
            mask = np.asarray(keep(fcols), dtype=bool)
            for name, values in fcols.items():
                parts[name].append(values[mask])
            if not mask.all():
                numbers = np.flatnonzero(mask)
                kept = (
                    list(itemgetter(*numbers.tolist())(rows))
                    if numbers.size > 1
                    else [rows[i] for i in numbers]
                )
        if typed:
            columns_of_block = _columns(kept, rest, path, table)
        else:
            columns_of_block = convert(kept, rest, path, table, first, numbers)
        for name, values in columns_of_block.items():
            parts[name].append(values)
        first += len(rows)
    return {c.name: _concat(parts[c.name], c) for c in (*filter_columns, *rest)}
