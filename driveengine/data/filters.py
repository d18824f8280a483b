"""Which frames of a split a :class:`~driveengine.data.FrameStream` serves: logs, scenario tags, map
locations and any predicate over the frame rows' metadata columns.

The selection is made once, when the stream is built, *before* the sampling plan: the selected frames
are numbered ``0 .. n-1`` in their stored order (logs in name order, rows in order), and the plan
(:mod:`driveengine.data.plan`) shuffles, pads, deals out to ranks and workers and resumes over that
numbering exactly as over a whole split. So order, sharding and resume stay deterministic over the
subset, and every rank, which makes the same selection from the same files, agrees on it without talking
to the others. History frames (``history``, ``point_sweeps``) are the frame's scene neighbours whether
selected or not.

Predicates are **pyarrow compute expressions** (``pyarrow.compute.Expression``), e.g.::

    import pyarrow.compute as pc
    FrameStream(root, "trainval", where=(pc.field("map_location") == "las_vegas") & (pc.field("frame_idx") >= 4))

chosen over SQL through an embedded engine (DuckDB, DataFusion) because:

* pyarrow is already the engine of the frame rows (Parquet, Arrow types): no new dependency, no second
  reader of the format that would bypass the dataset handle's checks (the rows are read through
  :meth:`~driveengine.store.dataset.CommittedLog.frames`, which checks them against the manifest), and
  it reads ``s3://`` through the same fsspec file system as the rest of the loader;
* an expression is a typed, composable object, not a string: no quoting, no injection through a
  config value, errors (an unknown column, a type mismatch) are found when the stream is built by
  binding the expression to the frame rows' schema, and it pickles to DataLoader workers and ranks;
* only the columns the expression references are read (found by binding it to the schema), and it is
  evaluated vectorised over a log's rows at a time (about 100k rows in a few milliseconds).

Scenario tags are a list column, for which Arrow has no "contains" expression, so ``scenario_tags``
is its own vectorised test (a frame is kept when it has at least one of the tags); ``map_locations``
and ``logs`` are shorthands. All conditions must hold together.

**Many logs.** Reading the filter's columns costs a file open per log (~0.15 ms locally, a request on an
object store), which dominates for thousands of short logs. With a cache folder
(:class:`ColumnCache`, the stream's ``cache_dir``), the columns read for :data:`CACHE_MIN_LOGS` or more
logs are kept in one Arrow IPC file keyed by what they were read from (each log's manifest entry and,
for a local shard, its size and modification time), so the next stream over the same logs (another
rank, the next run) reads one file; any change of a log, or a damaged entry, is a miss and the shards are
read again. The filter itself is evaluated again each time.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from driveengine.data.plan import log_offsets, split_frame_ids
from driveengine.data.reader import StreamError
from driveengine.errors import DriveEngineError
from driveengine.files import atomic_path
from driveengine.store.dataset import CommittedLog

IntArray = NDArray[np.int64]

logger = logging.getLogger(__name__)

#: Threads reading the filter's columns of many logs (I/O and Parquet decoding release the GIL).
READ_THREADS = 4

#: Errors pyarrow raises when an expression does not bind to a schema.
_BIND_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError, ValueError)


@dataclass(frozen=True, eq=False)  # an Expression compares to an Expression, not a bool
class FrameFilter:
    """A selection of frames (all conditions together); the empty filter selects every frame.

    Attributes:
        where: a boolean pyarrow compute expression over the frame rows' columns, or None.
        scenario_tags: keep frames with at least one of these ``scenario_tags`` (empty: no condition).
        map_locations: keep frames whose ``map_location`` is one of these (empty: no condition).
    """

    where: pc.Expression | None = None
    scenario_tags: tuple[str, ...] = ()
    map_locations: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        """Whether the filter selects every frame (no condition)."""
        return self.where is None and not self.scenario_tags and not self.map_locations

    def describe(self) -> str:
        """The filter in words (for messages and logs)."""
        parts = []
        if self.where is not None:
            parts.append(f"where {self.where}")
        if self.scenario_tags:
            parts.append(f"scenario_tags any of {list(self.scenario_tags)}")
        if self.map_locations:
            parts.append(f"map_location in {list(self.map_locations)}")
        return " and ".join(parts) or "none"

    def columns(self, schema: pa.Schema, where_url: str) -> tuple[str, ...]:
        """The columns of ``schema`` the filter reads, after checking that it binds to ``schema``.

        Raises:
            StreamError: the expression names a column the frame rows lack, does not evaluate to a
                boolean, or compares incompatible types; the message names the valid columns.
        """
        wanted: list[str] = []
        for name in (("map_location",) if self.map_locations else ()) + (
            ("scenario_tags",) if self.scenario_tags else ()
        ):
            if name not in schema.names:
                raise StreamError(
                    f"{where_url}: cannot filter on {name}: the frame rows have no column {name!r}"
                )
            wanted.append(name)
        if self.where is not None:
            if not isinstance(self.where, pc.Expression):
                raise StreamError(
                    f"where= must be a pyarrow.compute.Expression (e.g. pc.field('map_location') == "
                    f"'las_vegas'), got {type(self.where).__name__}"
                )
            if re.search(r"(?<!FieldRef\.)FieldPath\(", str(self.where)):
                # Only the referenced columns are read: a position would point at another column there.
                raise StreamError(
                    f"{where_url}: bad filter {self.where}: refer to columns by name "
                    "(pc.field('frame_idx')), not by position"
                )
            empty = schema.empty_table()
            try:
                empty.filter(self.where)
            except _BIND_ERRORS as exc:
                raise StreamError(
                    f"{where_url}: bad filter {self.where}: {_bind_problem(exc, schema)}"
                ) from None
            # A referenced column's name is printed in the expression; of those candidates, the ones
            # the expression cannot do without are the ones it references.
            text = str(self.where)
            for i, name in enumerate(schema.names):
                if name in text and name not in wanted:
                    try:
                        schema.remove(i).empty_table().filter(self.where)
                    except _BIND_ERRORS:
                        wanted.append(name)
        return tuple(wanted)

    def mask(self, table: pa.Table) -> NDArray[np.bool_]:
        """(n,) bool: the rows of ``table`` (holding :meth:`columns`) that the filter keeps."""
        n = table.num_rows
        keep = np.ones(n, dtype=bool)
        if self.map_locations:
            hit = pc.is_in(table["map_location"], value_set=pa.array(self.map_locations, pa.string()))
            keep &= np.asarray(pc.fill_null(hit, False), dtype=bool)
        if self.scenario_tags:
            tags = table["scenario_tags"].combine_chunks()
            flat = pc.list_flatten(tags)
            parents = np.asarray(pc.list_parent_indices(tags), dtype=np.int64)
            found = np.asarray(
                pc.fill_null(pc.is_in(flat, value_set=pa.array(self.scenario_tags, pa.string())), False),
                dtype=bool,
            )
            tagged = np.zeros(n, dtype=bool)
            tagged[parents[found]] = True
            keep &= tagged
        if self.where is not None:
            index = "__driveengine_row__"
            rows = table.append_column(index, pa.array(np.arange(n, dtype=np.int64))).filter(self.where)
            chosen = np.zeros(n, dtype=bool)
            chosen[np.asarray(rows[index], dtype=np.int64)] = True  # null predicates are dropped
            keep &= chosen
        return keep


def _bind_problem(exc: Exception, schema: pa.Schema) -> str:
    """One line saying why an expression does not bind (Arrow's message prints the whole schema)."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    missing = re.match(r"No match for FieldRef\.Name\((\w+)\)", first)
    if missing:
        name = missing.group(1)
        close = difflib.get_close_matches(name, schema.names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"the frame rows have no column {name!r}{hint} (columns: {', '.join(schema.names)})"
    return first


@dataclass(frozen=True)
class Selection:
    """The frames a stream serves, numbered ``0 .. n-1`` in stored order (logs in name order, then rows).

    Attributes:
        logs: the committed logs with selected frames, in name order.
        counts: (L,) selected frames per log.
        offsets: (L + 1,) start of each log's frames in the numbering (:func:`~driveengine.data.plan.log_offsets`).
        rows: (n,) row in its log's frame rows of every selected frame, or None when every row of the logs
            is selected (then the row is the position within the log).
        total: frames of the candidate logs before the filter.
        digest: a fingerprint of the selected frames (log names and rows); empty when every frame of the
            logs is selected.
    """

    logs: tuple[CommittedLog, ...]
    counts: IntArray
    offsets: IntArray
    rows: IntArray | None
    total: int
    digest: str

    @property
    def num_frames(self) -> int:
        """Selected frames."""
        return int(self.offsets[-1])

    @property
    def log_names(self) -> list[str]:
        """Names of the logs with selected frames."""
        return [log.name for log in self.logs]

    def locate(self, ids: IntArray) -> tuple[IntArray, IntArray]:
        """``(log index, row)`` of frames numbered ``ids`` in the selection."""
        logs, within = split_frame_ids(ids, self.offsets)
        return logs, (within if self.rows is None else self.rows[np.asarray(ids, dtype=np.int64)])

    def describe(self) -> str:
        """The selection's size in words."""
        return f"{self.num_frames} of {self.total} frames in {len(self.logs)} logs"


#: Candidate logs from which the filter's columns are kept in a :class:`ColumnCache` (fewer are read fast).
CACHE_MIN_LOGS = 64
#: Column tables a cache folder keeps (the least recently used are removed first).
CACHE_ENTRIES = 16
#: The cache's subfolder of the stream's cache folder.
CACHE_FOLDER = "filter-columns"
#: Schema metadata key of a cached table: the rows of each log (JSON list).
_COUNTS_KEY = b"driveengine.filter_columns.counts"


@dataclass(frozen=True)
class ColumnCache:
    """The filter's columns of many logs, kept as one Arrow IPC file per (logs, columns) in ``directory``
    (see the module doc). A cache is an accelerator: a missing, damaged or stale entry is a miss, and a
    disk that refuses to write only skips the write.

    Attributes:
        directory: the folder of the entries (``<stream cache_dir>/filter-columns``), on a local disk.
    """

    directory: Path

    @staticmethod
    def key(logs: Sequence[CommittedLog], columns: Sequence[str]) -> str:
        """The entry name of ``columns`` of ``logs``: a hash of the columns and, per log, its name, shard
        location, manifest rows, recorded sha256 and commit time, and a local shard's size and mtime."""
        h = hashlib.sha256(json.dumps(["v1", list(columns)]).encode())
        for log in logs:
            entry = log.entry
            part = f"{log.name}\0{log.meta_path}\0{entry.frames}\0{entry.checksums.get(entry.meta, '')}\0{entry.committed_at}"
            if log.split.is_local:
                try:
                    st = os.stat(log.meta_path)
                    part += f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
                except OSError:
                    part += "\0missing"
            h.update(part.encode() + b"\n")
        return h.hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.arrow"

    def load(self, key: str, logs: Sequence[CommittedLog], columns: Sequence[str]) -> pa.Table | None:
        """The cached table (one chunk, logs' rows in order), or None when absent, damaged or not the
        columns and rows of ``logs``."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
            counts = json.loads((table.schema.metadata or {}).get(_COUNTS_KEY, b"null"))
            if (
                table.column_names != list(columns)
                or counts != [log.entry.frames for log in logs]
                or table.num_rows != sum(counts)
            ):
                raise ValueError("not the columns or rows of these logs")
            table.validate(full=True)
        except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
            logger.debug("%s: damaged filter column cache entry dropped (%s)", path, exc)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return table.replace_schema_metadata(None).combine_chunks()

    def store(self, key: str, table: pa.Table, logs: Sequence[CommittedLog]) -> None:
        """Keep ``table`` (the columns of ``logs``, in order) under ``key``; evict beyond :data:`CACHE_ENTRIES`."""
        counts = json.dumps([log.entry.frames for log in logs]).encode()
        meta = {**(table.schema.metadata or {}), _COUNTS_KEY: counts}
        path = self.path(key)
        try:
            with (
                atomic_path(path, durable=False) as tmp,
                pa.OSFile(str(tmp), "wb") as sink,
                pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as w,
            ):
                w.write_table(table)
        except (OSError, pa.ArrowException) as exc:
            logger.debug("%s: filter column cache not written (%s)", path, exc)
            return
        self._evict()

    def _evict(self) -> None:
        entries = []
        for e in os.scandir(self.directory):
            if e.name.endswith(".arrow"):
                try:
                    entries.append((e.stat().st_mtime, e.path))
                except OSError:
                    continue
        for _, path in sorted(entries)[: max(len(entries) - CACHE_ENTRIES, 0)]:
            Path(path).unlink(missing_ok=True)


def select_frames(
    logs: Sequence[CommittedLog],
    flt: FrameFilter,
    schema: pa.Schema | None,
    where_url: str,
    cache: ColumnCache | None = None,
) -> Selection:
    """The frames of ``logs`` (committed, in name order) that ``flt`` keeps.

    Without conditions nothing is read (the manifest's counts say everything); otherwise the filter's
    columns of every log are read through the dataset handle (rows checked against the manifest), a
    few logs at a time, and the filter is evaluated once over all of them.

    Args:
        logs: the candidate logs (empty ones are skipped).
        flt: the filter.
        schema: the frame rows' schema (to bind the expression and find the columns it reads); only
            needed with conditions.
        where_url: the split, for messages.
        cache: where the columns of :data:`CACHE_MIN_LOGS` or more logs are kept between streams, or None.

    Raises:
        StreamError: a bad filter (see :meth:`FrameFilter.columns`), or a log whose rows cannot be read.
    """
    logs = [log for log in logs if log.entry.frames > 0]
    total = int(sum(log.entry.frames for log in logs))
    if flt.is_empty:
        counts = np.array([log.entry.frames for log in logs], dtype=np.int64)
        return Selection(tuple(logs), counts, log_offsets(counts), None, total, "")
    if schema is None:
        raise ValueError("select_frames: a filter needs the frame rows' schema")
    columns = list(flt.columns(schema, where_url))

    def read(log: CommittedLog) -> pa.Table:
        try:
            return log.frames(columns)
        except DriveEngineError as exc:
            message = str(exc)
            raise StreamError(
                message if message.startswith("log ") else f"log {log.name}: {message}"
            ) from None

    if cache is not None and len(logs) < CACHE_MIN_LOGS:
        cache = None
    key = ColumnCache.key(logs, columns) if cache is not None else ""
    rows_of_all = cache.load(key, logs, columns) if cache is not None else None
    if rows_of_all is None and logs:
        if len(logs) > 1:
            with ThreadPoolExecutor(min(READ_THREADS, len(logs))) as pool:
                tables = list(pool.map(read, logs))
        else:
            tables = [read(log) for log in logs]
        # One vectorised evaluation over every row (per-log evaluation costs ~0.3 ms of overhead a log).
        try:
            # one chunk: Arrow evaluates an expression chunk by chunk, ~0.07 ms a chunk (a log)
            rows_of_all = pa.concat_tables(tables).combine_chunks()
        except pa.ArrowInvalid as exc:  # shards of one split with different column types
            raise StreamError(
                f"{where_url}: the frame rows of the logs differ in their columns ({exc})"
            ) from None
        if cache is not None:
            cache.store(key, rows_of_all, logs)
    try:
        keep_all = flt.mask(rows_of_all) if rows_of_all is not None else np.zeros(0, bool)
    except (pa.ArrowException, TypeError, ValueError) as exc:  # e.g. a cast of a value that does not parse
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise StreamError(
            f"{where_url}: the filter ({flt.describe()}) cannot be evaluated: {first}"
        ) from None
    starts = log_offsets([log.entry.frames for log in logs])  # each log's rows: checked when read
    kept = [np.flatnonzero(keep_all[starts[i] : starts[i + 1]]).astype(np.int64) for i in range(len(logs))]
    chosen = [(log, rows) for log, rows in zip(logs, kept, strict=True) if len(rows)]
    counts = np.array([len(rows) for _, rows in chosen], dtype=np.int64)
    rows = np.concatenate([r for _, r in chosen]) if chosen else np.zeros(0, np.int64)
    digest = hashlib.sha256()
    for log, r in chosen:
        digest.update(log.name.encode() + b"\0")
        digest.update(r.astype("<i8").tobytes())
    return Selection(
        tuple(log for log, _ in chosen), counts, log_offsets(counts), rows, total, digest.hexdigest()[:16]
    )
