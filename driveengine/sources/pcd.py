"""Point Cloud Data (``.pcd``, v0.7) files: reader, writer and the nuPlan ``MergedPointCloud`` layout.

The reader handles the three encodings of the format:

* ``DATA ascii``: one point per line, values separated by whitespace;
* ``DATA binary``: packed little-endian records, one per point (what nuPlan ships);
* ``DATA binary_compressed``: ``u32 compressed size, u32 uncompressed size`` followed by LZF data that
  decompresses to the columns of the fields one after another (field-major).

The numpy dtype of a file is built generically from its ``SIZE``/``TYPE``/``COUNT`` header lines
(``F`` float, ``I`` signed, ``U`` unsigned integer; ``COUNT > 1`` gives a sub-array per point).
Bytes after the last point record are ignored (real nuPlan files carry such trailing bytes).
Every problem with a file (truncated, malformed header, inconsistent sizes, corrupt compressed
data) raises :class:`~driveengine.errors.PCDError` naming the file and what is wrong.

LZF is implemented here with numba (no dependency on a C extension); the codec follows the
public liblzf format: a control byte ``< 32`` starts a run of ``ctrl + 1`` literal bytes, otherwise
the top 3 bits give a back-reference length (7 means "one more length byte follows") and the low
5 bits with the next byte a 13-bit distance.

Coordinates are stored as they come: nuPlan's merged clouds are in the ego frame (origin at the
rear axle, x forward, y left, z up), in metres.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from driveengine.errors import PCDError

__all__ = [
    "ENCODINGS",
    "NUPLAN_PCD_FIELDS",
    "PCDHeader",
    "PointCloud",
    "lzf_compress",
    "lzf_decompress",
    "parse_pcd",
    "pcd_summary",
    "read_pcd",
    "read_pcd_header",
    "write_nuplan_pcd",
    "write_pcd",
]

#: The three ``DATA`` kinds of PCD v0.7.
ENCODINGS: tuple[str, ...] = ("ascii", "binary", "binary_compressed")

#: Fields of a nuPlan ``MergedPointCloud`` file, in file order, with their on-disk dtypes.
#: All six are 4-byte floats (``SIZE 4 4 4 4 4 4``, ``TYPE F F F F F F``): this matches the files
#: written by public tools that produce nuPlan-compatible sweeps and the devkit's own reader, which
#: casts every field to float32. It is not confirmed against a header of a released file; the reader
#: does not depend on it (it parses any SIZE/TYPE), only the writer does.
NUPLAN_PCD_FIELDS: dict[str, np.dtype[Any]] = {
    "x": np.dtype("<f4"),
    "y": np.dtype("<f4"),
    "z": np.dtype("<f4"),
    "intensity": np.dtype("<f4"),
    "ring": np.dtype("<f4"),
    "lidar_info": np.dtype("<f4"),
}

_HEADER_KEYS = (
    "version",
    "fields",
    "size",
    "type",
    "count",
    "width",
    "height",
    "viewpoint",
    "points",
    "data",
)
_MAX_HEADER_BYTES = 1 << 20  # a header longer than this is not a PCD header
_VALID_SIZES = {"F": (4, 8), "I": (1, 2, 4, 8), "U": (1, 2, 4, 8)}
_DEFAULT_VIEWPOINT = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
_U32 = struct.Struct("<II")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is fine, the rest means binary data
_DATA_LINE = re.compile(rb"(?:^|\n)[ \t]*data[ \t][^\n]*\n", re.IGNORECASE)

PathType = str | PathLike[str]


# -- header ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCDHeader:
    """The parsed header of a PCD file.

    Attributes:
        version: the ``VERSION`` value as written (``"0.7"``), ``""`` when absent.
        fields: field names in file order (repeated ``_`` padding fields are renamed ``_``, ``_1``...).
        sizes: bytes per value of each field.
        types: ``"F"``, ``"I"`` or ``"U"`` per field.
        counts: values per point of each field (``COUNT``, 1 when absent).
        width: ``WIDTH`` (points per row of an organised cloud; the point count when unorganised).
        height: ``HEIGHT`` (rows; 1 when unorganised).
        viewpoint: ``VIEWPOINT`` as ``(tx, ty, tz, qw, qx, qy, qz)``: the acquisition pose.
        points: number of points (``POINTS``; ``width * height`` when absent).
        encoding: ``"ascii"``, ``"binary"`` or ``"binary_compressed"``.
        data_offset: byte offset of the body (the first byte after the ``DATA`` line).
    """

    version: str
    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    width: int
    height: int
    viewpoint: tuple[float, ...]
    points: int
    encoding: str
    data_offset: int

    @property
    def dtype(self) -> np.dtype[Any]:
        """Packed little-endian record dtype of one point (sub-arrays for ``COUNT > 1``)."""
        return _record_dtype(self.fields, self.sizes, self.types, self.counts)

    @property
    def field_dtypes(self) -> dict[str, np.dtype[Any]]:
        """Scalar dtype of each field by name."""
        return {f: _scalar_dtype(t, s) for f, t, s in zip(self.fields, self.types, self.sizes, strict=True)}


def _scalar_dtype(kind: str, size: int) -> np.dtype[Any]:
    return np.dtype(f"<{kind.lower() if kind != 'F' else 'f'}{size}")


def _record_dtype(
    fields: Sequence[str], sizes: Sequence[int], types: Sequence[str], counts: Sequence[int]
) -> np.dtype[Any]:
    parts: list[tuple[Any, ...]] = []
    for name, size, kind, count in zip(fields, sizes, types, counts, strict=True):
        base = _scalar_dtype(kind, size)
        parts.append((name, base) if count == 1 else (name, base, (count,)))
    return np.dtype(parts)


def _parse_ints(path: PathType, key: str, values: list[str], minimum: int) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except ValueError:
        raise PCDError(path, f"header line {key.upper()} has non-integer values {values!r}") from None
    if any(v < minimum for v in out):
        raise PCDError(path, f"header line {key.upper()} has values below {minimum}: {values!r}")
    return out


def _parse_header_bytes(path: PathType, data: bytes) -> PCDHeader:
    """Parse the header at the start of ``data`` (which must contain at least the whole header)."""
    entries: dict[str, list[str]] = {}
    pos = 0
    data_offset = -1
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            # a DATA line that ends the file without a newline: the body is empty
            end = len(data)
        raw = data[pos:end]
        pos = end + 1
        line = raw.decode("latin-1").strip()  # never fails; non-ASCII is only valid in comments
        if not line or line.startswith("#"):
            continue
        if _CONTROL_CHARS.search(line):
            raise PCDError(
                path, "binary bytes before any DATA line", "the header is truncated or this is not a PCD file"
            )
        key, *values = line.split()
        key = key.lower()
        if key not in _HEADER_KEYS:
            raise PCDError(path, f"unknown header line {line[:60]!r}", "is this a PCD v0.7 file?")
        if key in entries:
            raise PCDError(path, f"header line {key.upper()} appears twice")
        entries[key] = values
        if key == "data":
            data_offset = min(pos, len(data))
            break
    if data_offset < 0:
        raise PCDError(path, "no DATA line in the header", "the file is truncated or not a PCD file")

    missing = [k.upper() for k in ("fields", "size", "type", "data") if k not in entries]
    if "width" not in entries and "points" not in entries:
        missing.append("WIDTH or POINTS")
    if missing:
        raise PCDError(path, f"header lacks {', '.join(missing)}")

    encoding_values = entries["data"]
    if len(encoding_values) != 1:
        raise PCDError(path, f"DATA line must name one encoding, got {encoding_values!r}")
    encoding = encoding_values[0].lower()
    if encoding not in ENCODINGS:
        raise PCDError(path, f"unknown DATA kind {encoding_values[0]!r}", f"expected one of {ENCODINGS}")

    names = entries["fields"]
    if not names:
        raise PCDError(path, "FIELDS line names no field")
    n = len(names)
    sizes = _parse_ints(path, "size", entries["size"], 1)
    types = tuple(t.upper() for t in entries["type"])
    counts = _parse_ints(path, "count", entries["count"], 1) if "count" in entries else (1,) * n
    for key, values in (("SIZE", sizes), ("TYPE", types), ("COUNT", counts)):
        if len(values) != n:
            raise PCDError(path, f"{key} has {len(values)} values for {n} FIELDS")
    for name, kind, size in zip(names, types, sizes, strict=True):
        if kind not in _VALID_SIZES:
            raise PCDError(path, f"field {name!r} has TYPE {kind!r}; expected F, I or U")
        if size not in _VALID_SIZES[kind]:
            raise PCDError(
                path, f"field {name!r} has SIZE {size} for TYPE {kind}; allowed {_VALID_SIZES[kind]}"
            )
    if max(counts) > 1 << 20:
        raise PCDError(path, f"COUNT {max(counts)} is implausibly large")

    fields = _unique_field_names(path, names)

    width = _parse_ints(path, "width", entries["width"], 0) if "width" in entries else None
    height = _parse_ints(path, "height", entries["height"], 0) if "height" in entries else (1,)
    points = _parse_ints(path, "points", entries["points"], 0) if "points" in entries else None
    for key, value in (("WIDTH", width), ("HEIGHT", height), ("POINTS", points)):
        if value is not None and len(value) != 1:
            raise PCDError(path, f"{key} must be one integer, got {value!r}")
    h = height[0]
    w = width[0] if width is not None else (points[0] if points is not None else 0)
    p = points[0] if points is not None else w * h
    if w * h != p:
        raise PCDError(path, f"WIDTH {w} x HEIGHT {h} != POINTS {p}")

    viewpoint: tuple[float, ...] = _DEFAULT_VIEWPOINT
    if "viewpoint" in entries:
        try:
            viewpoint = tuple(float(v) for v in entries["viewpoint"])
        except ValueError:
            raise PCDError(path, f"VIEWPOINT has non-numeric values {entries['viewpoint']!r}") from None
        if len(viewpoint) != 7:
            raise PCDError(path, f"VIEWPOINT needs 7 numbers (tx ty tz qw qx qy qz), got {len(viewpoint)}")

    version = entries.get("version", [""])
    return PCDHeader(
        version=" ".join(version),
        fields=fields,
        sizes=sizes,
        types=types,
        counts=counts,
        width=w,
        height=h,
        viewpoint=viewpoint,
        points=p,
        encoding=encoding,
        data_offset=data_offset,
    )


def _unique_field_names(path: PathType, names: Sequence[str]) -> tuple[str, ...]:
    """Field names made unique: PCL pads records with fields all named ``_``; rename those."""
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        candidate = name
        if name in seen:
            if name != "_":
                raise PCDError(path, f"field {name!r} appears twice in FIELDS")
            k = 1
            while f"_{k}" in seen or f"_{k}" in names:
                k += 1
            candidate = f"_{k}"
        seen.add(candidate)
        out.append(candidate)
    return tuple(out)


def _read_header_prefix(f: io.BufferedReader) -> bytes:
    """Bytes from the start of ``f`` through the DATA line (plus what the last read brought along).

    Stops early at end of file or after about ``_MAX_HEADER_BYTES`` (then the header parser reports
    what is wrong).
    """
    chunk = 4096
    buf = b""
    while True:
        more = f.read(chunk)
        buf += more
        if not more or _DATA_LINE.search(buf) or len(buf) > _MAX_HEADER_BYTES:
            return buf
        chunk *= 2


def read_pcd_header(path: PathType) -> PCDHeader:
    """Read only the header of a PCD file.

    Args:
        path: a local ``.pcd`` file.

    Returns:
        The parsed :class:`PCDHeader` (the body is not read or checked).

    Raises:
        PCDError: the file cannot be opened or its header is malformed.
    """
    try:
        with open(path, "rb") as f:
            prefix = _read_header_prefix(f)
    except OSError as exc:
        raise PCDError(path, f"cannot read: {exc.strerror or exc}") from None
    return _parse_header_bytes(path, prefix[: _header_end(prefix)])


# -- body ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointCloud:
    """A point cloud read from a PCD file.

    Attributes:
        fields: one array per field by name, in file order: shape ``(N,)``, or ``(N, COUNT)`` for
            fields with ``COUNT > 1``; dtype from the header. For ``binary`` files they are views of one
            record array (strided), for the other encodings contiguous arrays.
        header: the parsed header.
        path: the file it came from (``"<bytes>"`` for in-memory data).
    """

    fields: dict[str, NDArray[Any]]
    header: PCDHeader
    path: str = field(default="<bytes>")

    @property
    def num_points(self) -> int:
        """Number of points."""
        return self.header.points

    @property
    def xyz(self) -> NDArray[np.floating[Any]]:
        """``(N, 3)`` coordinates, in the file's frame and unit (nuPlan: ego frame, metres).

        The dtype is the common type of the x, y and z fields (float32 for nuPlan files).

        Raises:
            PCDError: the file has no ``x``, ``y`` and ``z`` fields of one value each.
        """
        missing = [c for c in "xyz" if c not in self.fields]
        if missing:
            raise PCDError(self.path, f"no {'/'.join(missing)} field(s); fields are {list(self.fields)}")
        cols = [self.fields[c] for c in "xyz"]
        if any(c.ndim != 1 for c in cols):
            raise PCDError(self.path, "x, y and z must have COUNT 1")
        dtype = np.result_type(*cols)
        if dtype.kind != "f":
            dtype = np.dtype(np.float64)
        out = np.empty((self.num_points, 3), dtype=dtype)
        for i, c in enumerate(cols):
            out[:, i] = c
        return out


def _decode_binary(path: PathType, header: PCDHeader, body: NDArray[np.uint8]) -> dict[str, NDArray[Any]]:
    dtype = header.dtype
    need = header.points * dtype.itemsize
    if len(body) < need:
        raise PCDError(
            path,
            f"truncated: DATA binary needs {need} bytes for {header.points} points of "
            f"{dtype.itemsize} bytes, the file has {len(body)}",
        )
    records = body[:need].view(dtype)
    return {name: records[name] for name in header.fields}


def _decode_compressed(path: PathType, header: PCDHeader, body: NDArray[np.uint8]) -> dict[str, NDArray[Any]]:
    dtype = header.dtype
    if len(body) < _U32.size:
        raise PCDError(path, "truncated: DATA binary_compressed lacks its two size words")
    compressed_size, uncompressed_size = _U32.unpack_from(body[: _U32.size].tobytes())
    need = header.points * dtype.itemsize
    if uncompressed_size != need:
        raise PCDError(
            path,
            f"binary_compressed uncompressed size {uncompressed_size} != {need} bytes for "
            f"{header.points} points of {dtype.itemsize} bytes",
        )
    src = body[_U32.size : _U32.size + compressed_size]
    if len(src) < compressed_size:
        raise PCDError(path, f"truncated: {compressed_size} compressed bytes announced, {len(src)} present")
    if uncompressed_size > _LZF_MAX_EXPANSION * compressed_size:
        raise PCDError(
            path,
            f"binary_compressed data of {compressed_size} bytes cannot expand to the "
            f"{uncompressed_size} bytes announced",
        )
    try:
        raw = lzf_decompress(src, uncompressed_size)
    except ValueError as exc:
        raise PCDError(path, f"corrupt binary_compressed data: {exc}") from None
    out: dict[str, NDArray[Any]] = {}
    pos = 0
    for name in header.fields:
        fdt = dtype.fields[name][0]  # type: ignore[index]
        nbytes = fdt.itemsize * header.points
        column = raw[pos : pos + nbytes]
        if pos % fdt.base.alignment:  # keep every column aligned: unaligned arrays are slow to use
            column = column.copy()
        out[name] = column.view(fdt.base).reshape((header.points, *fdt.shape))
        pos += nbytes
    return out


def _decode_ascii(path: PathType, header: PCDHeader, body: NDArray[np.uint8]) -> dict[str, NDArray[Any]]:
    dtype = header.dtype
    if header.points == 0:
        records = np.zeros(0, dtype=dtype)
    else:
        try:
            text = body.tobytes().decode("ascii")
        except UnicodeDecodeError:
            raise PCDError(path, "DATA ascii body contains non-ASCII bytes") from None
        try:
            with warnings.catch_warnings():
                # numpy notes that blank lines do not count towards max_rows: that is what we want
                warnings.simplefilter("ignore", UserWarning)
                records = np.loadtxt(
                    io.StringIO(text), dtype=dtype, max_rows=header.points, ndmin=1, comments=None
                )
        except (ValueError, OverflowError, TypeError) as exc:
            raise PCDError(path, f"DATA ascii body is malformed: {exc}") from None
        if len(records) != header.points:
            raise PCDError(path, f"truncated: DATA ascii has {len(records)} of {header.points} points")
    return {name: np.ascontiguousarray(records[name]) for name in header.fields}


def _decode(path: PathType, header: PCDHeader, body: NDArray[np.uint8]) -> PointCloud:
    """Decode the body (the bytes after the DATA line, as an aligned uint8 array)."""
    if header.encoding == "binary":
        fields = _decode_binary(path, header, body)
    elif header.encoding == "binary_compressed":
        fields = _decode_compressed(path, header, body)
    else:
        fields = _decode_ascii(path, header, body)
    return PointCloud(fields=fields, header=header, path=str(path))


def _header_end(data: bytes | bytearray) -> int:
    """Length of the header at the start of ``data``: up to the end of the DATA line, when there is one."""
    match = _DATA_LINE.search(data, 0, _MAX_HEADER_BYTES)
    return match.end() if match else min(len(data), _MAX_HEADER_BYTES)


def _over_limits(header: PCDHeader, max_points: int | None, max_bytes: int | None) -> str | None:
    """Why a file announcing ``header`` is beyond the limits (points; bytes of its decoded records), or None."""
    if max_points is not None and header.points > max_points:
        return f"{header.points} points, more than the {max_points} a sweep may hold"
    decoded = header.points * header.dtype.itemsize
    if max_bytes is not None and decoded > max_bytes:
        return f"{header.points} points of {header.dtype.itemsize} bytes, more than the {max_bytes} bytes a sweep may hold"
    return None


def parse_pcd(
    data: bytes | bytearray,
    path: PathType = "<bytes>",
    max_points: int | None = None,
    max_bytes: int | None = None,
) -> PointCloud:
    """Parse a whole PCD file held in memory (for example bytes fetched with fsspec).

    Args:
        data: the file's bytes.
        path: name used in error messages.
        max_points, max_bytes: refuse a file announcing more points, or records of more bytes in all,
            than these, before decoding it (a compressed body may expand up to ~88x).

    Returns:
        The :class:`PointCloud` (field arrays are views of one aligned copy of the body).

    Raises:
        PCDError: the data is malformed or truncated.
    """
    header = _parse_header_bytes(path, bytes(data[: _header_end(data)]))
    if (reason := _over_limits(header, max_points, max_bytes)) is not None:
        raise PCDError(path, f"{reason}: damaged?")
    body = np.frombuffer(data, dtype=np.uint8)[header.data_offset :].copy()  # copy: aligned, writable
    return _decode(path, header, body)


def read_pcd(path: PathType) -> PointCloud:
    """Read a PCD v0.7 file (``ascii``, ``binary`` or ``binary_compressed``).

    Args:
        path: a local ``.pcd`` file (for remote files read the bytes and call :func:`parse_pcd`).

    Returns:
        The :class:`PointCloud`: one array per field, the parsed header. Coordinates are as stored
        (nuPlan ``MergedPointCloud``: ego frame, metres). Bytes after the last point are ignored.

    Raises:
        PCDError: the file cannot be read, or is malformed or truncated; the message names the file.
    """
    try:
        with open(path, "rb") as f:
            prefix = _read_header_prefix(f)
            header = _parse_header_bytes(path, prefix[: _header_end(prefix)])
            # the body goes into a fresh (aligned) array: records at the file's odd header length
            # would otherwise be unaligned, which makes every later numpy operation on them slow
            size = os.fstat(f.fileno()).st_size
            start = prefix[header.data_offset :]
            body = np.empty(max(size - header.data_offset, len(start)), dtype=np.uint8)
            body[: len(start)] = np.frombuffer(start, dtype=np.uint8)
            n = f.readinto(memoryview(body)[len(start) :])
    except OSError as exc:
        raise PCDError(path, f"cannot read: {exc.strerror or exc}") from None
    return _decode(path, header, body[: len(start) + (n or 0)])


def pcd_defect(
    path: str | os.PathLike[str], max_points: int | None = None, max_bytes: int | None = None
) -> str | None:
    """What is wrong with a ``.pcd`` file, or None when it looks whole (and within the limits of
    :func:`parse_pcd`).

    Parses the header (:func:`driveengine.sources.pcd.read_pcd_header`) and compares the file size with
    what the header announces: ``binary`` needs ``POINTS x`` record size bytes after the header
    (trailing bytes are allowed, as in nuPlan's files); ``binary_compressed`` needs its two size words,
    an uncompressed size of ``POINTS x`` record size and the compressed bytes they announce; ``ascii``
    needs a body when ``POINTS > 0``. The point data itself is not decoded.
    """
    try:
        header = read_pcd_header(path)
        size = os.stat(path).st_size
    except PCDError as exc:
        return exc.reason
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if (reason := _over_limits(header, max_points, max_bytes)) is not None:
        return reason
    body = size - header.data_offset
    need = header.points * header.dtype.itemsize
    if header.encoding == "binary" and body < need:
        return f"truncated: {header.points} points need {need} bytes after the header, the file has {body}"
    if header.encoding == "binary_compressed":
        try:
            with open(path, "rb") as f:
                f.seek(header.data_offset)
                words = f.read(8)
        except OSError as exc:
            return f"cannot read ({exc.strerror or exc})"
        if len(words) < 8:
            return "truncated: binary_compressed data lacks its two size words"
        compressed, uncompressed = int.from_bytes(words[:4], "little"), int.from_bytes(words[4:], "little")
        if uncompressed != need:
            return f"binary_compressed announces {uncompressed} bytes, {header.points} points need {need}"
        if body < 8 + compressed:
            return f"truncated: {compressed} compressed bytes announced, {max(0, body - 8)} present"
    if header.encoding == "ascii" and header.points > 0 and body <= 0:
        return f"truncated: no data for {header.points} points"
    return None


def pcd_summary(path: PathType) -> dict[str, Any]:
    """A JSON-ready summary of a PCD file, for ``driveengine inspect``.

    Returns:
        ``{"path", "encoding", "version", "points", "width", "height", "viewpoint",
        "fields": [{"name", "type", "size", "count", "dtype"}], "xyz_min", "xyz_max"}``; the bounds are
        lists of 3 floats over finite points in the file's unit (metres), ``None`` when the file has no
        x/y/z fields or no finite point.

    Raises:
        PCDError: the file is malformed or truncated.
    """
    cloud = read_pcd(path)
    h = cloud.header
    xyz_min: list[float] | None = None
    xyz_max: list[float] | None = None
    if all(c in cloud.fields and cloud.fields[c].ndim == 1 for c in "xyz") and cloud.num_points:
        xyz = cloud.xyz
        finite = xyz[np.isfinite(xyz).all(axis=1)]
        if len(finite):
            xyz_min = [float(v) for v in finite.min(axis=0)]
            xyz_max = [float(v) for v in finite.max(axis=0)]
    return {
        "path": str(path),
        "encoding": h.encoding,
        "version": h.version,
        "points": h.points,
        "width": h.width,
        "height": h.height,
        "viewpoint": list(h.viewpoint),
        "fields": [
            {"name": name, "type": t, "size": s, "count": c, "dtype": str(_scalar_dtype(t, s))}
            for name, t, s, c in zip(h.fields, h.types, h.sizes, h.counts, strict=True)
        ],
        "xyz_min": xyz_min,
        "xyz_max": xyz_max,
    }


# -- writer ----------------------------------------------------------------------------------------


def _field_spec(name: str, array: NDArray[Any]) -> tuple[str, int, int]:
    kind = array.dtype.kind
    if kind == "f":
        t = "F"
    elif kind == "i":
        t = "I"
    elif kind == "u":
        t = "U"
    else:
        raise ValueError(f"field {name!r}: dtype {array.dtype} is not a float or integer type")
    size = array.dtype.itemsize
    if size not in _VALID_SIZES[t]:
        raise ValueError(f"field {name!r}: dtype {array.dtype} has no PCD equivalent (TYPE {t} SIZE {size})")
    count = 1 if array.ndim == 1 else array.shape[1]
    return t, size, count


def _ascii_body(arrays: Mapping[str, NDArray[Any]], n: int) -> bytes:
    """``DATA ascii`` lines: one point per line, values separated by one space.

    pyarrow's CSV writer formats in C++ with shortest round-trip float text (so float32 and float64
    values read back bit for bit, ``nan``/``inf`` included) and exact integers.
    """
    if n == 0:
        return b""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    columns: list[NDArray[Any]] = []
    for a in arrays.values():
        columns.extend(a.reshape(n, -1).T)
    table = pa.table({str(i): np.ascontiguousarray(c) for i, c in enumerate(columns)})
    sink = io.BytesIO()
    options = pa_csv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")
    pa_csv.write_csv(table, sink, options)
    return sink.getvalue()


def write_pcd(
    path: PathType,
    fields: Mapping[str, ArrayLike],
    encoding: str = "binary",
    viewpoint: Sequence[float] = _DEFAULT_VIEWPOINT,
) -> None:
    """Write a PCD v0.7 file.

    Args:
        path: output file (overwritten; not written atomically).
        fields: arrays by field name, in file order: each ``(N,)`` or ``(N, COUNT)``, all with the same
            ``N``; float (4/8 bytes) or integer (1/2/4/8 bytes) dtypes, taken from each array.
        encoding: ``"ascii"``, ``"binary"`` or ``"binary_compressed"``.
        viewpoint: ``(tx, ty, tz, qw, qx, qy, qz)``, the acquisition pose recorded in the header.

    Raises:
        ValueError: unknown encoding, no fields, a bad field name, unsupported dtype or unequal lengths.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown PCD encoding {encoding!r}; expected one of {ENCODINGS}")
    if not fields:
        raise ValueError("a PCD file needs at least one field")
    vp = tuple(float(v) for v in viewpoint)
    if len(vp) != 7:
        raise ValueError(f"viewpoint needs 7 numbers (tx ty tz qw qx qy qz), got {len(vp)}")
    arrays: dict[str, NDArray[Any]] = {}
    for name, value in fields.items():
        if not name or not name.isascii() or not name.isprintable() or " " in name:
            raise ValueError(f"field name {name!r} must be non-empty printable ASCII without spaces")
        a = np.asarray(value)
        if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[1] < 1):
            raise ValueError(f"field {name!r} must be (N,) or (N, COUNT), got shape {a.shape}")
        arrays[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"fields have different lengths: { {k: len(a) for k, a in arrays.items()} }")
    n = lengths.pop()
    specs = [_field_spec(name, a) for name, a in arrays.items()]
    names = list(arrays)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        "VERSION 0.7\n"
        f"FIELDS {' '.join(names)}\n"
        f"SIZE {' '.join(str(s[1]) for s in specs)}\n"
        f"TYPE {' '.join(s[0] for s in specs)}\n"
        f"COUNT {' '.join(str(s[2]) for s in specs)}\n"
        f"WIDTH {n}\n"
        "HEIGHT 1\n"
        f"VIEWPOINT {' '.join(f'{v:.17g}' for v in vp)}\n"
        f"POINTS {n}\n"
        f"DATA {encoding}\n"
    ).encode("ascii")
    dtype = _record_dtype(names, [s[1] for s in specs], [s[0] for s in specs], [s[2] for s in specs])

    if encoding == "binary":
        records = np.empty(n, dtype=dtype)
        for name, a in arrays.items():
            records[name] = a
        body = records.tobytes()
    elif encoding == "binary_compressed":
        raw = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
        packed = lzf_compress(np.frombuffer(raw, dtype=np.uint8))
        body = _U32.pack(len(packed), len(raw)) + packed.tobytes()
    else:
        body = _ascii_body(arrays, n)
    with open(path, "wb") as f:
        f.write(header)
        f.write(body)


def write_nuplan_pcd(
    path: PathType,
    xyz: ArrayLike,
    intensity: ArrayLike | None = None,
    ring: ArrayLike | None = None,
    lidar_info: ArrayLike | None = None,
) -> None:
    """Write a nuPlan ``MergedPointCloud`` file (``DATA binary``, fields of :data:`NUPLAN_PCD_FIELDS`).

    Args:
        path: output ``.pcd`` file.
        xyz: ``(N, 3)`` point coordinates in metres, in the ego frame (rear axle origin, x forward,
            y left, z up), as nuPlan stores them.
        intensity: ``(N,)`` return intensity; zeros when omitted.
        ring: ``(N,)`` laser ring index; zeros when omitted.
        lidar_info: ``(N,)`` id of the lidar that produced the point; zeros when omitted.

    Raises:
        ValueError: ``xyz`` is not ``(N, 3)`` or an optional array does not have ``N`` values.
    """
    pts = np.asarray(xyz)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"xyz must be (N, 3), got shape {pts.shape}")
    n = len(pts)
    columns: dict[str, ArrayLike] = {"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2]}
    for name, value in (("intensity", intensity), ("ring", ring), ("lidar_info", lidar_info)):
        a = np.zeros(n) if value is None else np.asarray(value)
        if a.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
        columns[name] = a
    write_pcd(
        path,
        {name: np.asarray(columns[name]).astype(dt) for name, dt in NUPLAN_PCD_FIELDS.items()},
        encoding="binary",
    )


# -- LZF codec (numba) -----------------------------------------------------------------------------

_LZF_HLOG = 14
_LZF_MAX_LIT = 32
_LZF_MAX_OFF = 1 << 13
_LZF_MAX_REF = (1 << 8) + (1 << 3)
#: Largest output per input byte: a 3-byte back-reference yields at most 264 bytes.
_LZF_MAX_EXPANSION = 88


# Index arithmetic in the kernels is unsigned (uint64): with signed indices numba must guard every
# access against negative wrap-around, which makes these byte loops about 1.5-2x slower.
_U = numba.uint64
# One explicit signature per kernel (read-only input accepts writable arrays too): compiled once,
# cached on disk, instead of once per combination of input flags.
_KERNEL_SIGNATURE = numba.int64(numba.types.Array(numba.uint8, 1, "C", readonly=True), numba.uint8[::1])


@numba.njit(_KERNEL_SIGNATURE, cache=True, nogil=True)
def _lzf_decompress_kernel(src: NDArray[np.uint8], dst: NDArray[np.uint8]) -> int:
    """Decode ``src`` into ``dst``; returns bytes written, or a negative error code.

    -1: input ends inside a literal run or back-reference; -2: output overflow;
    -3: back-reference before the start of the output.
    """
    ip = _U(0)
    op = _U(0)
    n_in = _U(src.shape[0])
    n_out = _U(dst.shape[0])
    while ip < n_in:
        ctrl = _U(src[ip])
        ip += _U(1)
        if ctrl < _U(32):  # literal run of ctrl + 1 bytes
            run = ctrl + _U(1)
            if ip + run > n_in:
                return -1
            if op + run > n_out:
                return -2
            for k in range(run):
                dst[op + k] = src[ip + k]
            ip += run
            op += run
        else:  # back-reference: length in the top 3 bits, 13-bit distance
            length = ctrl >> _U(5)
            back = ((ctrl & _U(0x1F)) << _U(8)) + _U(1)
            if length == _U(7):
                if ip >= n_in:
                    return -1
                length += _U(src[ip])
                ip += _U(1)
            if ip >= n_in:
                return -1
            back += _U(src[ip])
            ip += _U(1)
            length += _U(2)
            if op + length > n_out:
                return -2
            if back > op:
                return -3
            ref = op - back
            for k in range(length):  # forward, byte by byte: an overlapping copy repeats bytes
                dst[op + k] = dst[ref + k]
            op += length
    return numba.int64(op)


@numba.njit(_KERNEL_SIGNATURE, cache=True, nogil=True)
def _lzf_compress_kernel(src: NDArray[np.uint8], dst: NDArray[np.uint8]) -> int:
    """Encode ``src`` into ``dst`` (sized for the worst case); returns bytes written."""
    n = _U(src.shape[0])
    if n == 0:
        return 0
    # position + 1 of the last 3-byte sequence seen with each hash (0: none yet)
    htab = np.zeros(1 << _LZF_HLOG, dtype=np.uint64)
    ip = _U(0)
    op = _U(1)  # dst[0] is reserved for the first literal run's control byte
    lit = _U(0)
    while ip < n:
        matched = False
        if ip + _U(2) < n:
            v = (_U(src[ip]) << _U(16)) | (_U(src[ip + _U(1)]) << _U(8)) | _U(src[ip + _U(2)])
            h = ((v * _U(2654435761)) & _U(0xFFFFFFFF)) >> _U(32 - _LZF_HLOG)
            cand = htab[h]
            htab[h] = ip + _U(1)
            if cand > _U(0):
                ref = cand - _U(1)
                off = ip - ref - _U(1)
                if (
                    off < _U(_LZF_MAX_OFF)
                    and src[ref] == src[ip]
                    and src[ref + _U(1)] == src[ip + _U(1)]
                    and src[ref + _U(2)] == src[ip + _U(2)]
                ):
                    maxlen = min(_U(_LZF_MAX_REF), n - ip)
                    length = _U(3)
                    while length < maxlen and src[ref + length] == src[ip + length]:
                        length += _U(1)
                    # close the open literal run (or drop its unused control byte)
                    if lit:
                        dst[op - lit - _U(1)] = lit - _U(1)
                    else:
                        op -= _U(1)
                    enc = length - _U(2)
                    if enc < _U(7):
                        dst[op] = (off >> _U(8)) + (enc << _U(5))
                        op += _U(1)
                    else:
                        dst[op] = (off >> _U(8)) + _U(7 << 5)
                        dst[op + _U(1)] = enc - _U(7)
                        op += _U(2)
                    dst[op] = off & _U(0xFF)
                    op += _U(2)  # the distance byte, then the next literal run's control byte
                    lit = _U(0)
                    ip += length
                    matched = True
        if not matched:
            dst[op] = src[ip]
            op += _U(1)
            ip += _U(1)
            lit += _U(1)
            if lit == _U(_LZF_MAX_LIT):
                dst[op - lit - _U(1)] = lit - _U(1)
                lit = _U(0)
                op += _U(1)
    if lit:
        dst[op - lit - _U(1)] = lit - _U(1)
    else:
        op -= _U(1)
    return numba.int64(op)


_LZF_ERRORS = {
    -1: "input ends inside a literal run or back-reference",
    -2: "data decompresses to more bytes than announced",
    -3: "back-reference points before the start of the data",
}


def lzf_decompress(src: ArrayLike, size: int) -> NDArray[np.uint8]:
    """Decompress LZF data (liblzf format, as in PCD ``binary_compressed``).

    Args:
        src: the compressed bytes (``bytes`` or a uint8 array).
        size: the exact decompressed size in bytes.

    Returns:
        A new uint8 array of ``size`` bytes.

    Raises:
        ValueError: the data is corrupt or does not decompress to exactly ``size`` bytes.
    """
    data = np.frombuffer(src, dtype=np.uint8) if isinstance(src, bytes | bytearray) else np.asarray(src)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError("LZF input must be bytes or a 1-D uint8 array")
    dst = np.empty(size, dtype=np.uint8)
    written = _lzf_decompress_kernel(np.ascontiguousarray(data), dst) if len(data) else 0
    if written < 0:
        raise ValueError(_LZF_ERRORS[written])
    if written != size:
        raise ValueError(f"data decompresses to {written} bytes, {size} announced")
    return dst


def lzf_compress(src: ArrayLike) -> NDArray[np.uint8]:
    """Compress bytes with LZF (liblzf format; decodable by :func:`lzf_decompress` and PCL).

    Args:
        src: ``bytes`` or a 1-D uint8 array.

    Returns:
        The compressed bytes as a uint8 array (empty for empty input).
    """
    data = np.frombuffer(src, dtype=np.uint8) if isinstance(src, bytes | bytearray) else np.asarray(src)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError("LZF input must be bytes or a 1-D uint8 array")
    n = len(data)
    dst = np.empty(n + n // _LZF_MAX_LIT + 16, dtype=np.uint8)
    written = _lzf_compress_kernel(np.ascontiguousarray(data), dst)
    return dst[:written].copy()
