"""Fast whole-frame reads and writes of the sharded Zarr v3 arrays of ``occ/<log>.zarr``.

``zarr-python`` pays a few milliseconds of Python and event-loop overhead per ``array[i]`` call (it
re-reads the shard index each time and hops to its I/O thread), more than decoding a frame costs.
The loader reads whole frames only, so for the layout ``store/occ.py`` writes (chunk = one frame,
``sharding_indexed`` with inner codecs ``bytes`` [+ ``zstd``] and a ``bytes`` + ``crc32c`` index) this
module reads the shard index once per shard, checks its CRC-32C, fetches a run of frames with one
ranged read and decompresses each chunk straight into the caller's preallocated array. It follows
the Zarr v3 sharding specification (index of ``(offset, nbytes)`` uint64 pairs per inner chunk, C
order, ``2**64 - 1`` for an empty chunk that reads as the fill value) and is used only when
:func:`shard_layout` recognises the codecs; anything else goes through ``zarr`` itself.

The label generator writes frames one at a time, and zarr's writer costs about 4x the compression
itself (it gathers a whole shard in a buffer, copies it chunk by chunk and hops to its event loop:
~8 ms per frame for the four arrays on OpenScene's grid, ``make bench`` labels). :class:`FrameArrayWriter`
compresses each frame as it is appended and writes a shard's file (chunks, index, CRC-32C) when its last
frame arrives: the same bytes as zarr writes (tested), in local folders (a collect to an object store
writes its labels locally first).

Unlike zarr, a **missing shard file is an error** (:class:`ShardMissingError`), not fill values:
DriveEngine's writer writes every shard of every array (all frames are appended and empty chunks are
written), so a missing file means a deleted or lost file, and reading it as "all free, no flow,
unobserved" would be silently wrong labels. An empty chunk recorded in a shard's checksummed index
is the writer's own statement and still reads as the fill value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import zstd
from numcodecs.zstd import Zstd

_EMPTY = np.uint64(2**64 - 1)
_EMPTY_INT = 2**64 - 1


class ShardReadError(Exception):
    """A shard or chunk could not be read or decoded (the message names the file; the caller adds the log)."""


class ShardMissingError(ShardReadError):
    """A shard file that holds requested frames does not exist."""


@dataclass(frozen=True)
class ShardLayout:
    """The layout of a frame array that this module reads and writes without zarr.

    Attributes:
        shard_frames: frames per shard (chunks are one frame each).
        frame_shape: shape of one frame.
        dtype: element type (little-endian).
        fill_value: value of an empty chunk.
        zstd_level: the inner chunks' Zstandard level, None for raw bytes.
        zstd_checksum: whether the Zstandard frames carry a checksum.
        index_at_end: the shard index is at the end of the shard file (else at its start).
        ndim: dimensions of the array (for the shard file names ``c/<s>/0/.../0``).
        separator: chunk key separator of the array (``/`` by default).
    """

    shard_frames: int
    frame_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    zstd_level: int | None
    zstd_checksum: bool
    index_at_end: bool
    ndim: int
    separator: str = "/"

    def shard_key(self, shard: int) -> str:
        """The shard file's key inside the array folder, e.g. ``c/3/0/0/0``."""
        return self.separator.join(["c", str(shard), *(["0"] * (self.ndim - 1))])

    @property
    def index_bytes(self) -> int:
        """Bytes of a shard's index with its CRC-32C."""
        return 16 * self.shard_frames + 4


def shard_path(path: str, fs: Any, layout: ShardLayout, shard: int) -> str:
    """The file of shard ``shard`` of the array folder ``path``: a local path (``fs`` None) or a URL."""
    key = layout.shard_key(shard)
    if fs is None:
        return os.path.join(path, *key.split("/"))
    return f"{path.rstrip('/')}/{key}"


def shard_layout(array: Any) -> ShardLayout | None:
    """The :class:`ShardLayout` of ``array`` (a ``zarr.Array``) if this module supports it, else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    meta = array.metadata
    codecs = getattr(meta, "codecs", ())
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    frame_shape = tuple(array.shape[1:])
    if tuple(sharding.chunk_shape) != (1, *frame_shape) or tuple(array.shards[1:]) != frame_shape:
        return None
    inner = list(sharding.codecs)
    if not inner or not isinstance(inner[0], BytesCodec):
        return None
    dtype = np.dtype(array.dtype)
    little = inner[0].endian is None or inner[0].endian.value == "little"
    if dtype.itemsize > 1 and not (little and dtype.byteorder in "=<|" and np.little_endian):
        return None
    rest = inner[1:]
    if rest and not (len(rest) == 1 and isinstance(rest[0], ZstdCodec)):
        return None
    index_codecs = list(sharding.index_codecs)
    if len(index_codecs) != 2 or not isinstance(index_codecs[0], BytesCodec):
        return None
    if not isinstance(index_codecs[1], Crc32cCodec):
        return None
    if getattr(meta.chunk_key_encoding, "name", "default") != "default":
        return None
    return ShardLayout(
        shard_frames=int(array.shards[0]),
        frame_shape=frame_shape,
        dtype=dtype,
        fill_value=meta.fill_value,
        zstd_level=int(rest[0].level) if rest else None,
        zstd_checksum=bool(rest[0].checksum) if rest else False,
        index_at_end=sharding.index_location == ShardingCodecIndexLocation.end,
        ndim=len(array.shape),
        separator=getattr(meta.chunk_key_encoding, "separator", "/"),
    )


class FrameArrayReader:
    """Reads frames ``start:stop`` of one sharded array (chunks = one frame) into a preallocated array.

    Args:
        path: the array folder (local path or URL), holding ``zarr.json`` and ``c/...`` shard files.
        fs: fsspec file system of ``path`` (None: local files through ``os.pread``).
        layout: the array's layout (:func:`shard_layout`).
    """

    def __init__(self, path: str, fs: Any, layout: ShardLayout) -> None:
        self.path = path
        self.fs = fs
        self.layout = layout
        self.frame_bytes = int(np.prod(layout.frame_shape)) * layout.dtype.itemsize
        self._index: dict[int, np.ndarray] = {}  # shard -> chunk index (a few hundred bytes)
        self._entries: dict[int, list[list[int]]] = {}  # the same as Python ints
        self._fd: int | None = None  # one open shard file (local): consecutive reads reuse it
        self._fd_shard = -1

    @classmethod
    def for_array(cls, array: Any, path: str, fs: Any) -> FrameArrayReader | None:
        """A reader for ``array`` (a ``zarr.Array`` stored at ``path``) if its layout is supported, else None."""
        layout = shard_layout(array)
        return None if layout is None else cls(path, fs, layout)

    # -- file access -----------------------------------------------------------------------------
    def _shard_path(self, shard: int) -> str:
        return shard_path(self.path, self.fs, self.layout, shard)

    def _read_range(self, shard: int, start: int, stop: int) -> bytes:
        """Bytes ``start:stop`` of a shard file. Locally one descriptor is kept (of the last shard read),
        so a worker streaming thousands of logs holds a bounded number of open files."""
        path = self._shard_path(shard)
        try:
            if self.fs is not None:
                return self.fs.cat_file(path, start=start, end=stop)
            if self._fd_shard != shard:
                self.close()
                self._fd = os.open(path, os.O_RDONLY)
                self._fd_shard = shard
            return os.pread(self._fd, stop - start, start)  # type: ignore[arg-type]
        except FileNotFoundError:
            raise ShardMissingError(f"shard file {path} is missing") from None
        except OSError as exc:
            raise ShardReadError(f"shard file {path} cannot be read ({exc})") from None

    def _size(self, shard: int) -> int:
        """Size of a shard file in bytes.

        Raises:
            ShardMissingError: the file does not exist.
            ShardReadError: it cannot be examined (permissions, I/O error).
        """
        path = self._shard_path(shard)
        try:
            if self.fs is not None:
                return int(self.fs.size(path))
            return os.stat(path).st_size
        except FileNotFoundError:
            first = shard * self.layout.shard_frames
            raise ShardMissingError(
                f"shard file {path} (frames {first}..{first + self.layout.shard_frames - 1}) is missing"
            ) from None
        except OSError as exc:
            raise ShardReadError(f"shard file {path} cannot be read ({exc})") from None

    def _shard_index(self, shard: int) -> np.ndarray:
        """(shard_frames, 2) uint64 (offset, nbytes) of the shard's chunks."""
        cached = self._index.get(shard)
        if cached is not None:
            return cached
        size = self._size(shard)
        n = self.layout.index_bytes
        if size < n:
            raise ShardReadError(
                f"shard {self._shard_path(shard)} is truncated ({size} bytes, index needs {n})"
            )
        raw = (
            self._read_range(shard, size - n, size)
            if self.layout.index_at_end
            else self._read_range(shard, 0, n)
        )
        body, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
        if google_crc32c.value(body) != stored:
            raise ShardReadError(
                f"shard {self._shard_path(shard)}: index checksum mismatch (truncated or corrupt)"
            )
        index = np.frombuffer(body, dtype="<u8").reshape(self.layout.shard_frames, 2)
        ends = index[:, 0] + index[:, 1]
        used = index[:, 0] != _EMPTY
        if (ends[used] > size).any():
            raise ShardReadError(f"shard {self._shard_path(shard)}: chunks end beyond the file (truncated)")
        self._index[shard] = index
        self._entries[shard] = index.tolist()
        return index

    # -- reading ---------------------------------------------------------------------------------
    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Decode frames ``start:stop`` into ``out`` ((stop - start, *frame_shape), C-contiguous).

        Raises:
            ShardMissingError: a shard file holding requested frames does not exist.
            ShardReadError: a truncated or corrupt shard or chunk, or an unreadable file.
        """
        if (
            out.shape != (stop - start, *self.layout.frame_shape)
            or out.dtype != self.layout.dtype
            or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out must be a C-contiguous {self.layout.dtype} array of shape {(stop - start, *self.layout.frame_shape)}"
            )
        frame = start
        while frame < stop:
            shard = frame // self.layout.shard_frames
            last = min(stop, (shard + 1) * self.layout.shard_frames)
            self._read_shard_run(shard, frame, last, out[frame - start : last - start])
            frame = last

    def _read_shard_run(self, shard: int, start: int, stop: int, out: np.ndarray) -> None:
        self._shard_index(shard)
        first = start - shard * self.layout.shard_frames
        entries = self._entries[shard][first : first + (stop - start)]  # Python ints: no numpy per call
        used = [e for e in entries if e[0] != _EMPTY_INT]
        if not used:
            out[...] = self.layout.fill_value
            return
        lo = min(e[0] for e in used)
        hi = max(e[0] + e[1] for e in used)
        blob = self._read_range(shard, lo, hi)  # one ranged read for the run
        if len(blob) != hi - lo:
            raise ShardReadError(f"shard {self._shard_path(shard)}: short read (truncated)")
        view = memoryview(blob)
        flat = out.reshape(len(out), -1).view(np.uint8)
        for k, (offset, nbytes) in enumerate(entries):
            if offset == _EMPTY_INT:
                out[k] = self.layout.fill_value
                continue
            chunk = view[offset - lo : offset - lo + nbytes]
            if self.layout.zstd_level is not None:
                try:
                    zstd.decompress(chunk, flat[k])
                except RuntimeError as exc:
                    raise ShardReadError(
                        f"shard {self._shard_path(shard)}: frame {start + k} does not decompress ({exc})"
                    ) from None
            elif nbytes != self.frame_bytes:
                raise ShardReadError(f"shard {self._shard_path(shard)}: frame {start + k} has {nbytes} bytes")
            else:
                flat[k] = np.frombuffer(chunk, dtype=np.uint8)

    def close(self) -> None:
        """Close the shard file kept open (local files)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._fd_shard = None, -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class FrameArrayWriter:
    """Writes the frames of one local sharded array (a :class:`ShardLayout`) in order, without zarr.

    Each frame is encoded (little-endian bytes, Zstandard as the layout says) when appended; a shard's
    file (its chunks, then the index of ``(offset, nbytes)`` pairs and its CRC-32C, or the index first)
    is written when the shard's last frame arrives, and :meth:`flush` writes the last, partial shard
    (frames beyond the array are empty entries, as zarr writes them). Memory: one shard's compressed
    chunks.

    Args:
        path: the array folder (local), holding its ``zarr.json``.
        layout: the array's layout (:func:`shard_layout`).
        num_frames: frames of the array (its first dimension).
    """

    def __init__(self, path: str, layout: ShardLayout, num_frames: int) -> None:
        self.path = path
        self.layout = layout
        self.num_frames = num_frames
        self._codec = (
            None
            if layout.zstd_level is None
            else Zstd(level=layout.zstd_level, checksum=layout.zstd_checksum)
        )
        self._chunks: list[bytes] = []  # the encoded frames of the current shard
        self._shard = 0
        self._appended = 0

    @classmethod
    def for_array(cls, array: Any, path: str, num_frames: int) -> FrameArrayWriter | None:
        """A writer for ``array`` (a ``zarr.Array`` in the local folder ``path``) if its layout is
        supported, else None."""
        layout = shard_layout(array)
        return None if layout is None else cls(path, layout, num_frames)

    def append(self, frame: np.ndarray) -> None:
        """Append the next frame: a C-contiguous array of the layout's frame shape and dtype."""
        lay = self.layout
        if frame.shape != lay.frame_shape or frame.dtype != lay.dtype or not frame.flags.c_contiguous:
            raise ValueError(
                f"{self.path}: a frame must be a C-contiguous {lay.dtype} array of shape {lay.frame_shape}"
            )
        if self._appended >= self.num_frames:
            raise ValueError(f"{self.path}: more than the {self.num_frames} frames declared")
        raw = frame.view(np.uint8).reshape(-1)
        self._chunks.append(bytes(raw) if self._codec is None else self._codec.encode(raw))
        self._appended += 1
        if len(self._chunks) == lay.shard_frames:
            self._write_shard()

    def flush(self) -> None:
        """Write the current shard's file now (the last, partial shard; full ones are written as they fill)."""
        if self._chunks:
            self._write_shard()

    def _write_shard(self) -> None:
        lay = self.layout
        index = np.full((lay.shard_frames, 2), _EMPTY, dtype="<u8")
        sizes = np.array([len(c) for c in self._chunks], dtype=np.uint64)
        first = lay.index_bytes if not lay.index_at_end else 0
        index[: len(sizes), 0] = first + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
        index[: len(sizes), 1] = sizes
        body = index.tobytes()
        index_blob = body + google_crc32c.value(body).to_bytes(4, "little")
        parts = [*self._chunks, index_blob] if lay.index_at_end else [index_blob, *self._chunks]
        path = shard_path(self.path, None, lay, self._shard)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"".join(parts))
        self._chunks = []
        self._shard += 1
