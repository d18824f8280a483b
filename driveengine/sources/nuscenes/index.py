"""The per-scene index of a nuScenes release: its JSON tables read once, checked, split by scene.

``collect`` works scene by scene (one task per scene, in worker processes), but nuScenes keeps every
scene in the same 13 tables, hundreds of MB for trainval. :func:`open_index` reads the tables once per
release (column-wise, :mod:`.tables`), resolves every token link the reader uses, computes what is
global (annotation velocities as the devkit's ``box_velocity`` defines them), and writes one compact
file per scene (:func:`write_arrays`: plain numeric and byte-string arrays after a JSON header, read back
as views of one buffer; nothing executable, no pickle) plus ``index.json`` listing the scenes and, for a
scene whose tables are broken, the one-line reason. A task then reads only its scene's file
(:func:`load_scene`), a few hundred kB, in well under a millisecond.

**Where.** Under :func:`cache_dir` (``$DRIVEENGINE_CACHE``, default ``~/.cache/driveengine``) in
``nuscenes-index/<version>-<hash of the table folder>-<hash of its files' names, sizes and mtimes>/``:
the index is a pure function of the tables, so it is shared by every split, output and run that reads
the same tables (``nuscenes_mini_train`` and ``nuscenes_mini_val`` share one), is never stale (changed
tables get a new folder; the folders of older versions of the same tables are removed), and needs no
write access to the release (often read-only) nor a local output (``--out s3://...``). A Dask run over
several machines needs ``$DRIVEENGINE_CACHE`` on a folder they all see. The index is built in a
temporary folder and renamed into place, so a killed build leaves nothing a later run would trust, and
two processes building at once both end up with the same complete index.

**Broken tables fail their scenes, not the run.** A missing table, a token link that resolves nowhere
(``scene.log_token``, ``sample.scene_token``/``prev``/``next``, ``sample_data.sample_token``/
``ego_pose_token``/``calibrated_sensor_token``/``prev``/``next``, ``sample_annotation.sample_token``/
``instance_token``/``prev``/``next``, ``instance.category_token``/``first_annotation_token``/
``last_annotation_token``, ``calibrated_sensor.sensor_token``), inconsistent chains or calibrations, or an
unknown category fail the scenes they belong to, each with one line naming the table file, the row's
token and the link. A row whose own scene link is broken is attributed through its neighbours
(``prev``/``next``, then its instance's other annotations), else to the scenes whose time span holds its
timestamp. Only an unreadable ``scene.json`` (no scenes to list) or unsafe scene names (they become
output file names) stop the whole run.

Only the rows the reader needs are kept: the ``LIDAR_TOP`` sample_data rows (20 Hz), the cameras' key
frames, their ego poses, every annotation. Radar rows and the cameras' 12 Hz sweeps are skipped while
parsing (their links are not checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from driveengine.errors import SourceError
from driveengine.sources.nuscenes.constants import (
    CAMERA_CHANNELS,
    CATEGORY_CLASS,
    LIDAR_CHANNEL,
    LIDARSEG_ORDER,
    REQUIRED_TABLES,
    VELOCITY_MAX_TIME_DIFF_S,
)
from driveengine.sources.nuscenes.tables import Column, read_table

#: Bumped whenever the index files change meaning (old indices are then rebuilt).
INDEX_FORMAT = 1
#: Name of the index's scene list (written last: its presence marks a complete index).
INDEX_FILE = "index.json"
#: A scene name is an output file name: ``meta/<name>.parquet``.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: Channel codes of sample_data rows while parsing.
_LIDAR, _OTHER, _NO_CS, _NO_SENSOR = 0, 7, -1, -2  # cameras are 1..6 in CAMERA_CHANNELS order
#: Lidarseg class ids that map to no category.
UNKNOWN_CLASS = 255

_HINT = "fix or re-download the release's tables, or leave this scene out with --logs"


def cache_dir() -> Path:
    """``$DRIVEENGINE_CACHE`` or ``~/.cache/driveengine``."""
    return Path(os.environ.get("DRIVEENGINE_CACHE") or Path.home() / ".cache" / "driveengine")


@dataclass(frozen=True)
class SceneRef:
    """One scene of an index.

    Attributes:
        name: ``scene.name`` (the log's output name).
        token: ``scene.token``.
        file: the scene's ``.npz`` in the index folder.
        error: why the scene cannot be read (``"<table file>: <reason>"``), or None.
        error_file, error_reason: the same split for :class:`SourceError`.
    """

    name: str
    token: str
    file: Path
    error_file: str | None = None
    error_reason: str | None = None


@dataclass(frozen=True)
class ReleaseIndex:
    """A built index (see the module doc).

    Attributes:
        folder: the index folder.
        table_dir: the release's table folder (``<root>/v1.0-mini``).
        root: the folder ``sample_data.filename`` is relative to.
        tables: the table files the index was built from (watched by the collect fingerprint).
        scenes: the scenes in ``scene.json`` order.
        notes: remarks about rows that belong to no scene (broken links that cannot be attributed).
        seconds: how long the build took (0 when the index was found ready).
    """

    folder: Path
    table_dir: Path
    root: Path
    tables: tuple[Path, ...]
    scenes: tuple[SceneRef, ...]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0


# -- token look-ups ----------------------------------------------------------------------------------


def _token_hash(tokens: np.ndarray, width: int) -> np.ndarray:
    """(n,) uint64 hash of byte-string tokens (zero-padded to ``width`` bytes, a multiple of 8): a key that
    sorts and searches several times faster than the strings."""
    n = len(tokens)
    raw = np.zeros((n, width), dtype=np.uint8)
    if n:
        raw[:, : tokens.dtype.itemsize] = np.ascontiguousarray(tokens).view(np.uint8).reshape(n, -1)
    words = raw.view(np.uint64)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    for k in range(words.shape[1]):
        h ^= words[:, k]
        h *= np.uint64(0x100000001B3)
        h ^= h >> np.uint64(29)
    return h


class _Tokens:
    """Position of each token of a column (tokens unique), for vectorised look-ups.

    Look-ups search a 64-bit hash of the tokens and then compare the tokens themselves, so a hash
    collision can never match a wrong row; if two of the column's tokens share a hash (never seen in
    practice), they search the strings instead."""

    def __init__(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        self.tokens = tokens
        self.size = len(tokens)
        self.width = -(-max(tokens.dtype.itemsize, 1) // 8) * 8
        hashes = _token_hash(tokens, self.width)
        order = np.argsort(hashes, kind="stable")
        self.hashes: np.ndarray | None = hashes[order]
        if self.size > 1 and bool((self.hashes[1:] == self.hashes[:-1]).any()):
            order = np.argsort(tokens, kind="stable")  # a collision: the strings' own order
            self.hashes = None
        self.order = order
        self.sorted = tokens[order]

    def duplicates(self) -> np.ndarray:
        """The tokens that appear more than once."""
        if self.hashes is not None:
            return np.zeros(0, dtype=self.tokens.dtype)  # distinct hashes: distinct tokens
        ordered = np.sort(self.tokens)
        same = ordered[1:] == ordered[:-1]
        return np.unique(ordered[1:][same])

    def lookup(self, query: np.ndarray) -> np.ndarray:
        """(len(query),) int64 row of each token, -1 where absent (``b""`` is never present)."""
        query = np.asarray(query)
        if self.size == 0 or query.size == 0:
            return np.full(query.shape, -1, dtype=np.int64)
        if self.hashes is not None and query.ndim == 1 and query.dtype.itemsize <= self.width:
            pos = np.searchsorted(self.hashes, _token_hash(query, self.width))
        else:
            pos = np.searchsorted(self.sorted, query)
        pos_c = np.minimum(pos, self.size - 1)
        found = (self.sorted[pos_c] == query) & (query != b"")
        return np.where(found, self.order[pos_c], -1).astype(np.int64)

    def contains(self, query: np.ndarray) -> np.ndarray:
        return self.lookup(query) >= 0


def _text(value: bytes | np.bytes_) -> str:
    return bytes(value).decode("utf-8", "replace")


def _propagate(scene: np.ndarray, *neighbours: np.ndarray, rounds: int = 16) -> np.ndarray:
    """Fill unknown (-1) entries of ``scene`` from the entries their neighbour rows (indices, -1 none) have."""
    scene = scene.copy()
    for _ in range(rounds):
        unknown = np.flatnonzero(scene < 0)
        if unknown.size == 0:
            break
        changed = False
        for nb in neighbours:
            j = nb[unknown]
            ok = j >= 0
            got = np.full(unknown.shape, -1, dtype=np.int64)
            got[ok] = scene[j[ok]]
            fill = (got >= 0) & (scene[unknown] < 0)
            if fill.any():
                scene[unknown[fill]] = got[fill]
                changed = True
        if not changed:
            break
    return scene


# -- the build -----------------------------------------------------------------------------------------


class _Build:
    """Reads the tables, checks links, groups rows by scene; collects the scenes' errors."""

    def __init__(self, table_dir: Path, root: Path) -> None:
        self.table_dir = table_dir
        self.root = root
        self.notes: list[str] = []

    def file(self, table: str) -> Path:
        return self.table_dir / f"{table}.json"

    def fail(self, scenes: np.ndarray, table: str, reason: str) -> None:
        """Record ``reason`` for the given scenes (the first error of a scene wins)."""
        for s in np.unique(np.asarray(scenes, dtype=np.int64)).tolist():
            if s >= 0 and self.error[s] is None:
                self.error[s] = (str(self.file(table)), reason)

    def fail_rows(
        self,
        bad: np.ndarray,
        scene: np.ndarray,
        table: str,
        what: str,
        tokens: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """Fail each scene that has a row in ``bad`` (bool mask), naming its first such row."""
        rows = np.flatnonzero(bad)
        if rows.size == 0:
            return
        owner = scene[rows]
        unowned = rows[owner < 0]
        if unowned.size:
            self.notes.append(
                f"{self.file(table)}: {unowned.size} row(s) whose {what} and which belong to no known scene, "
                f"e.g. token {_text(tokens[unowned[0]])} ({_text(values[unowned[0]])!r}); ignored"
            )
        for s in np.unique(owner[owner >= 0]).tolist():
            i = rows[owner == s][0]
            n = int((owner == s).sum())
            more = f" (and {n - 1} more)" if n > 1 else ""
            self.fail(
                np.array([s]),
                table,
                f"scene {self.scene_name[s]}: {table} {_text(tokens[i])}: {what} "
                f"({_text(values[i])!r}){more}",
            )

    # -- tables ------------------------------------------------------------------------------------

    def read(self) -> None:
        scene_path = self.file("scene")
        sc = read_table(
            scene_path,
            [Column("token", "token"), Column("log_token", "token"), Column("nbr_samples", "int"),
             Column("first_sample_token", "token"), Column("last_sample_token", "token"),
             Column("name", "text"), Column("description", "text")],
        )  # fmt: skip
        self.sc = sc
        self.n_scenes = len(sc["token"])
        self.scene_name = [_text(n) for n in sc["name"]]
        for i, name in enumerate(self.scene_name):
            if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
                raise SourceError(
                    scene_path,
                    f"row {i}: scene name {name!r} is not a plain file name (letters, digits, . _ + -); "
                    "scene names become output file names",
                    _HINT,
                )
        if len(set(self.scene_name)) != self.n_scenes:
            dup = next(n for n in self.scene_name if self.scene_name.count(n) > 1)
            raise SourceError(scene_path, f"scene name {dup!r} appears twice", _HINT)
        self.scenes = _Tokens(sc["token"])
        if self.scenes.duplicates().size:
            raise SourceError(
                scene_path, f"scene token {_text(self.scenes.duplicates()[0])} appears twice", _HINT
            )
        self.error: list[tuple[str, str] | None] = [None] * self.n_scenes
        missing = [t for t in REQUIRED_TABLES if not self.file(t).is_file()]
        if missing:
            self.fail(
                np.arange(self.n_scenes),
                missing[0],
                f"missing table (a nuScenes release has {', '.join(f'{t}.json' for t in REQUIRED_TABLES)})",
            )
            self.complete = False
            return
        self.complete = True
        try:
            self._read_logs()
            self._read_samples()
            self._read_sensors()
            self._read_sample_data()
            self._read_poses()
            self._read_annotations()
            self._read_lidarseg()
        except SourceError as exc:  # a malformed table: every scene is in it
            for s in range(self.n_scenes):
                if self.error[s] is None:
                    self.error[s] = (exc.path, exc.reason)
            self.complete = False

    def _read_logs(self) -> None:
        lg = read_table(
            self.file("log"),
            [Column("token", "token"), Column("logfile", "text"), Column("vehicle", "text"),
             Column("date_captured", "text"), Column("location", "text")],
        )  # fmt: skip
        self.lg = lg
        self.scene_log = _Tokens(lg["token"]).lookup(self.sc["log_token"])
        bad = self.scene_log < 0
        self.fail_rows(bad, np.arange(self.n_scenes), "scene", "log_token resolves to no log row",
                       self.sc["token"], self.sc["log_token"])  # fmt: skip

    def _read_samples(self) -> None:
        sa = read_table(
            self.file("sample"),
            [Column("token", "token"), Column("timestamp", "int"), Column("scene_token", "token"),
             Column("prev", "token"), Column("next", "token")],
        )  # fmt: skip
        self.sa = sa
        self.samples = _Tokens(sa["token"])
        for dup in self.samples.duplicates()[:1]:
            self.notes.append(f"{self.file('sample')}: sample token {_text(dup)} appears twice")
        prev = self.samples.lookup(sa["prev"])
        nxt = self.samples.lookup(sa["next"])
        own = self.scenes.lookup(sa["scene_token"])
        self.sample_scene = _propagate(own, prev, nxt)
        tok = sa["token"]
        self.fail_rows(
            own < 0, self.sample_scene, "sample", "scene_token resolves to no scene", tok, sa["scene_token"]
        )
        self.fail_rows((prev < 0) & (sa["prev"] != b""), self.sample_scene, "sample",
                       "prev resolves to no sample", tok, sa["prev"])  # fmt: skip
        self.fail_rows((nxt < 0) & (sa["next"] != b""), self.sample_scene, "sample",
                       "next resolves to no sample", tok, sa["next"])  # fmt: skip
        # each scene's samples, in time order, must be its first..last chain
        order = np.lexsort((tok, sa["timestamp"], self.sample_scene))
        order = order[self.sample_scene[order] >= 0]
        self.sample_order = order
        sc_of = self.sample_scene[order]
        starts = np.searchsorted(sc_of, np.arange(self.n_scenes + 1))
        self.scene_sample_start = starts
        first = self.samples.lookup(self.sc["first_sample_token"])
        last = self.samples.lookup(self.sc["last_sample_token"])
        for s in range(self.n_scenes):
            rows = order[starts[s] : starts[s + 1]]
            name = self.scene_name[s]
            if rows.size == 0:
                self.fail(
                    np.array([s]), "scene", f"scene {name} ({_text(self.sc['token'][s])}) has no sample"
                )
                continue
            if first[s] != rows[0] or last[s] != rows[-1]:
                which = "first_sample_token" if first[s] != rows[0] else "last_sample_token"
                value = self.sc[which][s]
                self.fail(np.array([s]), "scene", f"scene {name}: {which} {_text(value)!r} is not the scene's "
                          f"{'first' if which.startswith('first') else 'last'} sample")  # fmt: skip
            chained = (prev[rows[1:]] == rows[:-1]).all() and (nxt[rows[:-1]] == rows[1:]).all()
            if not chained or prev[rows[0]] >= 0 or nxt[rows[-1]] >= 0:
                self.fail(np.array([s]), "sample", f"scene {name}: the samples' prev/next links do not chain "
                          "them in time order")  # fmt: skip
            if int(self.sc["nbr_samples"][s]) != rows.size:
                self.fail(np.array([s]), "scene", f"scene {name}: nbr_samples is {int(self.sc['nbr_samples'][s])}, "
                          f"the scene has {rows.size} samples")  # fmt: skip
        self.scene_t0 = np.full(self.n_scenes, np.iinfo(np.int64).max)
        self.scene_t1 = np.full(self.n_scenes, np.iinfo(np.int64).min)
        ok = self.sample_scene >= 0
        np.minimum.at(self.scene_t0, self.sample_scene[ok], sa["timestamp"][ok])
        np.maximum.at(self.scene_t1, self.sample_scene[ok], sa["timestamp"][ok])

    def _scenes_at(self, timestamps: np.ndarray) -> list[np.ndarray]:
        """The scenes whose sample time span (+- 1 s) holds each timestamp."""
        margin = 1_000_000
        return [
            np.flatnonzero((self.scene_t0 - margin <= t) & (t <= self.scene_t1 + margin))
            for t in timestamps.tolist()
        ]

    def _read_sensors(self) -> None:
        se = read_table(self.file("sensor"), [Column("token", "token"), Column("channel", "text")])
        cs = read_table(
            self.file("calibrated_sensor"),
            [Column("token", "token"), Column("sensor_token", "token"), Column("translation", "vec3"),
             Column("rotation", "vec4"), Column("camera_intrinsic", "intrinsic")],
        )  # fmt: skip
        self.cs = cs
        self.calibrations = _Tokens(cs["token"])
        sensor = _Tokens(se["token"]).lookup(cs["sensor_token"])
        channels = [_text(c) for c in se["channel"]]
        code = np.full(len(cs["token"]), _OTHER, dtype=np.int64)
        for i, s in enumerate(sensor.tolist()):
            if s < 0:
                code[i] = _NO_SENSOR
            elif channels[s] == LIDAR_CHANNEL:
                code[i] = _LIDAR
            elif channels[s] in CAMERA_CHANNELS:
                code[i] = 1 + CAMERA_CHANNELS.index(channels[s])
        self.cs_code = code

    def _channel_code(self, cs_tokens: np.ndarray) -> np.ndarray:
        i = self.calibrations.lookup(cs_tokens)
        return np.where(i >= 0, self.cs_code[np.maximum(i, 0)], _NO_CS)

    def _read_sample_data(self) -> None:
        def keep(cols: dict[str, np.ndarray]) -> np.ndarray:
            code = self._channel_code(cols["calibrated_sensor_token"])
            return (code == _LIDAR) | ((code >= 1) & (code <= 6) & cols["is_key_frame"]) | (code < 0)

        sd = read_table(
            self.file("sample_data"),
            [Column("token", "token"), Column("sample_token", "token"), Column("ego_pose_token", "token"),
             Column("timestamp", "int"), Column("filename", "text"), Column("prev", "token"),
             Column("next", "token"), Column("width", "int"), Column("height", "int")],
            filter_columns=[Column("calibrated_sensor_token", "token"), Column("is_key_frame", "bool")],
            keep=keep,
        )  # fmt: skip
        self.sd = sd
        tok = sd["token"]
        code = self._channel_code(sd["calibrated_sensor_token"])
        self.sd_code = code
        rows = _Tokens(tok)
        sample = self.samples.lookup(sd["sample_token"])
        self.sd_sample = sample
        own = np.where(sample >= 0, self.sample_scene[np.maximum(sample, 0)], -1)
        prev, nxt = rows.lookup(sd["prev"]), rows.lookup(sd["next"])
        scene = _propagate(own, prev, nxt)
        # rows whose scene is still unknown: the scenes whose time span holds them
        lost = np.flatnonzero(scene < 0)
        shared = np.zeros(len(tok), dtype=bool)
        for i, cands in zip(lost.tolist(), self._scenes_at(sd["timestamp"][lost]), strict=True):
            if cands.size == 1:
                scene[i] = cands[0]
            elif cands.size > 1:  # several scenes at that time: each of them may hold a broken row
                shared[i] = True
                for c in cands.tolist():
                    self.fail(np.array([c]), "sample_data", f"scene {self.scene_name[c]}: sample_data "
                              f"{_text(tok[i])}: sample_token resolves to no sample ({_text(sd['sample_token'][i])!r}); "
                              "the row may belong to this scene")  # fmt: skip
        self.sd_scene = scene
        self.fail_rows((sample < 0) & ~shared, scene, "sample_data", "sample_token resolves to no sample", tok,
                       sd["sample_token"])  # fmt: skip
        self.fail_rows(code == _NO_CS, scene, "sample_data", "calibrated_sensor_token resolves to no calibrated_sensor",
                       tok, sd["calibrated_sensor_token"])  # fmt: skip
        self.fail_rows(code == _NO_SENSOR, scene, "calibrated_sensor", "sensor_token resolves to no sensor",
                       sd["calibrated_sensor_token"], sd["calibrated_sensor_token"])  # fmt: skip
        lidar = code == _LIDAR  # prev/next of the cameras' key frames lead to their sweeps (not read)
        self.fail_rows(lidar & (prev < 0) & (sd["prev"] != b""), scene, "sample_data",
                       "prev resolves to no sample_data", tok, sd["prev"])  # fmt: skip
        self.fail_rows(lidar & (nxt < 0) & (sd["next"] != b""), scene, "sample_data",
                       "next resolves to no sample_data", tok, sd["next"])  # fmt: skip

    def _read_poses(self) -> None:
        wanted = _Tokens(np.unique(self.sd["ego_pose_token"]))
        ep = read_table(
            self.file("ego_pose"),
            [Column("timestamp", "int"), Column("rotation", "vec4"), Column("translation", "vec3")],
            filter_columns=[Column("token", "token")],
            keep=lambda cols: wanted.contains(cols["token"]),
        )
        self.ep = ep
        self.sd_pose = _Tokens(ep["token"]).lookup(self.sd["ego_pose_token"])
        self.fail_rows(self.sd_pose < 0, self.sd_scene, "sample_data", "ego_pose_token resolves to no ego_pose",
                       self.sd["token"], self.sd["ego_pose_token"])  # fmt: skip

    def _read_annotations(self) -> None:
        ca = read_table(self.file("category"), [Column("token", "token"), Column("name", "text"),
                                                Column("index", "opt_int")])  # fmt: skip
        self.ca = ca
        inst = read_table(
            self.file("instance"),
            [Column("token", "token"), Column("category_token", "token"),
             Column("first_annotation_token", "token"), Column("last_annotation_token", "token")],
        )  # fmt: skip
        an = read_table(
            self.file("sample_annotation"),
            [Column("token", "token"), Column("sample_token", "token"), Column("instance_token", "token"),
             Column("translation", "vec3"), Column("size", "vec3"), Column("rotation", "vec4"),
             Column("prev", "token"), Column("next", "token")],
        )  # fmt: skip
        self.an = an
        tok = an["token"]
        anns = _Tokens(tok)
        sample = self.samples.lookup(an["sample_token"])
        instance = _Tokens(inst["token"]).lookup(an["instance_token"])
        prev, nxt = anns.lookup(an["prev"]), anns.lookup(an["next"])
        own = np.where(sample >= 0, self.sample_scene[np.maximum(sample, 0)], -1)
        scene = _propagate(own, prev, nxt)
        # still unknown: through the instance's other annotations
        lost = scene < 0
        if lost.any() and (~lost).any():
            inst_scene = np.full(len(inst["token"]), -1, dtype=np.int64)
            known = ~lost & (instance >= 0)
            inst_scene[instance[known]] = scene[known]
            fill = lost & (instance >= 0)
            scene[fill] = inst_scene[instance[fill]]
        self.an_scene = scene
        self.an_sample = sample
        self.fail_rows(sample < 0, scene, "sample_annotation", "sample_token resolves to no sample", tok,
                       an["sample_token"])  # fmt: skip
        self.fail_rows(instance < 0, scene, "sample_annotation", "instance_token resolves to no instance", tok,
                       an["instance_token"])  # fmt: skip
        self.fail_rows((prev < 0) & (an["prev"] != b""), scene, "sample_annotation",
                       "prev resolves to no sample_annotation", tok, an["prev"])  # fmt: skip
        self.fail_rows((nxt < 0) & (an["next"] != b""), scene, "sample_annotation",
                       "next resolves to no sample_annotation", tok, an["next"])  # fmt: skip
        ok_prev, ok_next = prev >= 0, nxt >= 0
        wrong = np.zeros(len(tok), dtype=bool)
        wrong[ok_prev] |= (an["instance_token"][prev[ok_prev]] != an["instance_token"][ok_prev]) | (
            nxt[prev[ok_prev]] != np.flatnonzero(ok_prev)
        )
        wrong[ok_next] |= an["instance_token"][nxt[ok_next]] != an["instance_token"][ok_next]
        self.fail_rows(wrong, scene, "sample_annotation",
                       "prev/next link annotations of another instance or do not link back", tok, an["prev"])  # fmt: skip
        # instances: category and first/last annotation
        inst_scene = np.full(len(inst["token"]), -1, dtype=np.int64)
        has = instance >= 0
        inst_scene[instance[has]] = scene[has]
        cat = _Tokens(ca["token"]).lookup(inst["category_token"])
        self.fail_rows(cat < 0, inst_scene, "instance", "category_token resolves to no category", inst["token"],
                       inst["category_token"])  # fmt: skip
        for field in ("first_annotation_token", "last_annotation_token"):
            a = anns.lookup(inst[field])
            bad = (a < 0) | (a >= 0) & (an["instance_token"][np.maximum(a, 0)] != inst["token"])
            self.fail_rows(bad, inst_scene, "instance", f"{field} resolves to no annotation of the instance",
                           inst["token"], inst[field])  # fmt: skip
        names = np.array([_text(n) for n in ca["name"]] + [""], dtype=object)
        an_cat = np.where(instance >= 0, cat[np.maximum(instance, 0)], -1)
        self.an_category = names[an_cat].astype(str)  # "" for a broken link (failed above)
        known = np.array([n in CATEGORY_CLASS or n == "" for n in names.tolist()])
        unknown = ~known[an_cat]
        self.fail_rows(unknown, scene, "category", "is an annotation of an unknown category (known: the 32 nuScenes "
                       "categories, see driveengine.sources.nuscenes.constants.CATEGORY_TO_OCC3D)", tok,
                       self.an_category.astype("S"))  # fmt: skip
        self.an_velocity = self._velocities(prev, nxt, sample)

    def _velocities(self, prev: np.ndarray, nxt: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The devkit's ``box_velocity`` of every annotation (global, m/s): the centre difference of the
        previous and next annotations over their time difference, one side with the annotation itself
        when the other is missing; NaN with no neighbour, when the time difference exceeds 1.5 s (3 s
        with both neighbours) or is not positive (a broken timeline)."""
        n = len(prev)
        idx = np.arange(n)
        has_prev, has_next = prev >= 0, nxt >= 0
        first = np.where(has_prev, prev, idx)
        last = np.where(has_next, nxt, idx)
        ts = np.where(sample >= 0, self.sa["timestamp"][np.maximum(sample, 0)], 0)
        dt = 1e-6 * ts[last] - 1e-6 * ts[first]
        limit = np.where(has_prev & has_next, 2 * VELOCITY_MAX_TIME_DIFF_S, VELOCITY_MAX_TIME_DIFF_S)
        ok = (has_prev | has_next) & (dt <= limit) & (dt > 0) & (sample[first] >= 0) & (sample[last] >= 0)
        t = self.an["translation"]
        with np.errstate(divide="ignore", invalid="ignore"):
            v = (t[last] - t[first]) / np.where(ok, dt, 1.0)[:, None]
        v[~ok] = np.nan
        return v

    def _read_lidarseg(self) -> None:
        path = self.file("lidarseg")
        self.sd_seg = np.zeros(len(self.sd["token"]), dtype="S1")
        if not path.is_file():
            return
        ls = read_table(path, [Column("sample_data_token", "token"), Column("filename", "text")])
        row = _Tokens(self.sd["token"]).lookup(ls["sample_data_token"])
        lost = int((row < 0).sum())
        if lost:
            self.notes.append(
                f"{path}: {lost} row(s) whose sample_data_token is no LIDAR_TOP sample_data; ignored"
            )
        seg = np.zeros(len(self.sd["token"]), dtype=ls["filename"].dtype if len(ls["filename"]) else "S1")
        seg[row[row >= 0]] = ls["filename"][row >= 0]
        self.sd_seg = seg

    def lidarseg_lut(self) -> np.ndarray:
        """(256,) uint8: Occ3D class id of each lidarseg class id (:data:`UNKNOWN_CLASS` for none)."""
        lut = np.full(256, UNKNOWN_CLASS, dtype=np.uint8)
        names = [_text(n) for n in self.ca["name"]]
        index = self.ca["index"]
        for name, i in zip(names, index.tolist(), strict=True):
            if i < 0 and name in LIDARSEG_ORDER:
                i = LIDARSEG_ORDER.index(name)
            if 0 <= i < 256 and name in CATEGORY_CLASS:
                lut[i] = CATEGORY_CLASS[name]
        return lut

    # -- per scene -----------------------------------------------------------------------------------

    def scene_arrays(self, s: int) -> dict[str, np.ndarray]:
        """The arrays of scene ``s``'s file (see :func:`load_scene`); records errors it finds."""
        name = self.scene_name[s]
        samples = self.sample_order[self.scene_sample_start[s] : self.scene_sample_start[s + 1]]
        local = np.full(len(self.sa["token"]), -1, dtype=np.int64)
        local[samples] = np.arange(samples.size)
        sd, code = self.sd, self.sd_code
        mine = self.sd_scene == s
        lidar = np.flatnonzero(mine & (code == _LIDAR))
        lidar = lidar[np.lexsort((sd["token"][lidar], sd["timestamp"][lidar]))]
        pose = np.maximum(self.sd_pose, 0)
        out: dict[str, np.ndarray] = {}
        if lidar.size == 0:
            self.fail(np.array([s]), "sample_data", f"scene {name} has no {LIDAR_CHANNEL} sample_data")
        cs_rows = self.calibrations.lookup(sd["calibrated_sensor_token"][lidar])
        if np.unique(cs_rows).size > 1:
            self.fail(np.array([s]), "sample_data", f"scene {name}: its {LIDAR_CHANNEL} sample_data use "
                      f"{np.unique(cs_rows).size} calibrations (expected one per scene)")  # fmt: skip
        key = lidar[sd["is_key_frame"][lidar]]
        key_sample = np.where(self.sd_sample[key] >= 0, local[np.maximum(self.sd_sample[key], 0)], -1)
        per_sample = np.bincount(key_sample[key_sample >= 0], minlength=samples.size)
        if samples.size and (per_sample != 1).any():
            i = int(np.flatnonzero(per_sample != 1)[0])
            self.fail(np.array([s]), "sample_data", f"scene {name}: sample {_text(self.sa['token'][samples[i]])} has "
                      f"{int(per_sample[i])} {LIDAR_CHANNEL} key frames (expected 1)")  # fmt: skip
        cs0 = int(cs_rows[0]) if cs_rows.size else -1
        out["lidar_token"] = sd["token"][lidar]
        out["lidar_sample"] = np.where(
            self.sd_sample[lidar] >= 0, local[np.maximum(self.sd_sample[lidar], 0)], -1
        )
        out["lidar_key"] = sd["is_key_frame"][lidar]
        out["lidar_ts"] = sd["timestamp"][lidar]
        out["lidar_file"] = sd["filename"][lidar]
        out["lidar_t"] = (
            self.ep["translation"][pose[lidar]] if len(self.ep["translation"]) else np.zeros((0, 3))
        )
        out["lidar_q"] = self.ep["rotation"][pose[lidar]] if len(self.ep["rotation"]) else np.zeros((0, 4))
        out["lidar_seg"] = self.sd_seg[lidar]
        out["lidar_calib_t"] = self.cs["translation"][cs0] if cs0 >= 0 else np.full(3, np.nan)
        out["lidar_calib_q"] = self.cs["rotation"][cs0] if cs0 >= 0 else np.full(4, np.nan)
        out["lidar_calib_token"] = self.cs["token"][cs0 : cs0 + 1] if cs0 >= 0 else np.array([b""])
        # cameras: calibration and the key-frame image of every sample
        c = len(CAMERA_CHANNELS)
        cam_token = np.zeros(c, dtype=self.cs["token"].dtype)
        cam_t, cam_q, cam_k = np.full((c, 3), np.nan), np.full((c, 4), np.nan), np.full((c, 3, 3), np.nan)
        cam_size = np.zeros((c, 2), dtype=np.int64)
        cam_file = np.zeros((samples.size, c), dtype=sd["filename"].dtype)
        cam_ts = np.full((samples.size, c), -1, dtype=np.int64)
        for j in range(c):
            rows = np.flatnonzero(mine & (code == j + 1))
            if rows.size == 0:
                continue
            cs = np.unique(self.calibrations.lookup(sd["calibrated_sensor_token"][rows]))
            if cs.size > 1:
                self.fail(np.array([s]), "sample_data", f"scene {name}: its {CAMERA_CHANNELS[j]} key frames use "
                          f"{cs.size} calibrations (expected one per scene)")  # fmt: skip
            cam_token[j] = self.cs["token"][cs[0]]
            cam_t[j], cam_q[j], cam_k[j] = (
                self.cs["translation"][cs[0]],
                self.cs["rotation"][cs[0]],
                self.cs["camera_intrinsic"][cs[0]],
            )
            cam_size[j] = (sd["width"][rows[0]], sd["height"][rows[0]])
            at = local[np.maximum(self.sd_sample[rows], 0)]
            at = np.where(self.sd_sample[rows] >= 0, at, -1)
            ok = at >= 0
            counts = np.bincount(at[ok], minlength=samples.size)
            if (counts > 1).any():
                i = int(np.flatnonzero(counts > 1)[0])
                self.fail(np.array([s]), "sample_data", f"scene {name}: sample {_text(self.sa['token'][samples[i]])} "
                          f"has {int(counts[i])} {CAMERA_CHANNELS[j]} key frames (expected 1)")  # fmt: skip
            cam_file[at[ok], j] = sd["filename"][rows[ok]]
            cam_ts[at[ok], j] = sd["timestamp"][rows[ok]]
        for files, what in ((out["lidar_file"], LIDAR_CHANNEL), (cam_file.ravel(), "camera")):
            bad = _unsafe_paths(files)
            if bad.any():
                self.fail(np.array([s]), "sample_data", f"scene {name}: {what} filename "
                          f"{_text(files[np.argmax(bad)])!r} leaves the release folder (absolute or '..')")  # fmt: skip
        out.update(cam_token=cam_token, cam_t=cam_t, cam_q=cam_q, cam_k=cam_k, cam_size=cam_size,
                   cam_file=cam_file, cam_ts=cam_ts)  # fmt: skip
        out["sample_token"] = self.sa["token"][samples]
        out["sample_ts"] = self.sa["timestamp"][samples]
        # annotations, by sample then token
        an = self.an
        anns = np.flatnonzero(self.an_scene == s) if len(an["token"]) else np.zeros(0, dtype=np.int64)
        a_local = np.where(self.an_sample[anns] >= 0, local[np.maximum(self.an_sample[anns], 0)], -1)
        order = np.lexsort((an["token"][anns], a_local))
        anns, a_local = anns[order], a_local[order]
        out["ann_token"] = an["token"][anns]
        out["ann_sample"] = a_local
        out["ann_instance"] = an["instance_token"][anns]
        out["ann_category"] = np.array(self.an_category[anns], dtype="S") if anns.size else np.zeros(0, "S1")
        out["ann_t"] = an["translation"][anns]
        out["ann_wlh"] = an["size"][anns]
        out["ann_q"] = an["rotation"][anns]
        out["ann_velocity"] = self.an_velocity[anns]
        out["lidarseg_lut"] = self.lut
        lg = self.scene_log[s]
        meta = {
            "scene_token": _text(self.sc["token"][s]), "scene_name": name,
            "description": _text(self.sc["description"][s]),
            "log_token": _text(self.lg["token"][lg]) if lg >= 0 else "",
            "logfile": _text(self.lg["logfile"][lg]) if lg >= 0 else "",
            "vehicle": _text(self.lg["vehicle"][lg]) if lg >= 0 else "",
            "location": _text(self.lg["location"][lg]) if lg >= 0 else "",
            "date_captured": _text(self.lg["date_captured"][lg]) if lg >= 0 else "",
            "table_dir": str(self.table_dir), "root": str(self.root),
        }  # fmt: skip
        out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return out


def _unsafe_paths(files: np.ndarray) -> np.ndarray:
    """(n,) bool: the relative file names (bytes) that are absolute or have a ``..`` part."""
    if files.size == 0:
        return np.zeros(0, dtype=bool)
    f = files.astype("S")
    return (
        np.char.startswith(f, b"/")
        | (f == b"..")
        | np.char.startswith(f, b"../")
        | np.char.endswith(f, b"/..")
        | (np.char.find(f, b"/../") >= 0)
        | (np.char.find(f, b"\\") >= 0)
    )


# -- the index on disk -----------------------------------------------------------------------------------


def _table_files(table_dir: Path) -> list[Path]:
    return sorted(p for p in table_dir.glob("*.json") if p.is_file())


def index_folder(table_dir: Path, root: Path) -> Path:
    """The index folder of the tables in ``table_dir`` as they are now (see the module doc)."""
    where = hashlib.sha256(f"{INDEX_FORMAT}\0{table_dir.resolve()}\0{root.resolve()}".encode()).hexdigest()[
        :12
    ]
    h = hashlib.sha256()
    for p in _table_files(table_dir):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    version = re.sub(r"[^A-Za-z0-9._-]", "_", table_dir.name)[:64] or "tables"
    return cache_dir() / "nuscenes-index" / f"{version}-{where}-{h.hexdigest()[:16]}"


def _read_ready(folder: Path, table_dir: Path, root: Path) -> ReleaseIndex | None:
    try:
        data = json.loads((folder / INDEX_FILE).read_text())
        if data.get("format") != INDEX_FORMAT:
            return None
        scenes = tuple(
            SceneRef(s["name"], s["token"], folder / s["file"], s.get("error_file"), s.get("error_reason"))
            for s in data["scenes"]
        )
        notes = tuple(str(n) for n in data.get("notes", []))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ReleaseIndex(folder, table_dir, root, tuple(_table_files(table_dir)), scenes, notes)


def open_index(table_dir: str | os.PathLike[str], root: str | os.PathLike[str]) -> ReleaseIndex:
    """The index of the tables in ``table_dir`` (files relative to ``root``), built if not cached.

    Raises:
        SourceError: ``table_dir`` or its ``scene.json`` is missing or unreadable, or a scene name is
            unsafe (the run cannot list its scenes); broken tables otherwise fail their scenes only
            (:attr:`SceneRef.error_reason`).
    """
    table_dir, root = Path(table_dir), Path(root)
    if not table_dir.is_dir():
        raise SourceError(table_dir, "no such folder, expected the release's table folder (e.g. v1.0-mini)",
                          "check --nuscenes-root and --split (or --input-dir)")  # fmt: skip
    if not (table_dir / "scene.json").is_file():
        raise SourceError(table_dir / "scene.json", "missing table: cannot list the release's scenes",
                          "is this a nuScenes table folder (v1.0-mini, v1.0-trainval, ...)?")  # fmt: skip
    folder = index_folder(table_dir, root)
    ready = _read_ready(folder, table_dir, root)
    if ready is not None:
        return ready
    start = time.perf_counter()
    build = _Build(table_dir, root)
    build.read()
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{folder.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        (tmp / "scenes").mkdir(parents=True)
        if build.complete:
            build.lut = build.lidarseg_lut()
        listing = []
        for s in range(build.n_scenes):
            rel = f"scenes/{s:05d}.arrays"
            if build.complete:
                arrays = build.scene_arrays(s)
                if build.error[s] is None:
                    write_arrays(tmp / rel, arrays)
            err = build.error[s]
            listing.append({
                "name": build.scene_name[s], "token": _text(build.sc["token"][s]), "file": rel,
                **({"error_file": err[0], "error_reason": err[1]} if err else {}),
            })  # fmt: skip
        doc = {"format": INDEX_FORMAT, "table_dir": str(table_dir), "root": str(root), "scenes": listing,
               "notes": build.notes, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
        (tmp / INDEX_FILE).write_text(json.dumps(doc, indent=0))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first (or a damaged folder is in the way)
            if _read_ready(folder, table_dir, root) is None:
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(folder)
    ready = _read_ready(folder, table_dir, root)
    if ready is None:  # pragma: no cover - the folder was just written
        raise SourceError(folder, "the index just written cannot be read", "check the cache folder's disk")
    return ReleaseIndex(ready.folder, ready.table_dir, ready.root, ready.tables, ready.scenes, ready.notes,
                        time.perf_counter() - start)  # fmt: skip


def _prune(folder: Path) -> None:
    """Remove the complete indices of older versions of the same tables (same name up to the last hash)."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for other in folder.parent.glob(prefix + "*"):
        if other != folder and other.is_dir() and (other / INDEX_FILE).is_file():
            shutil.rmtree(other, ignore_errors=True)


#: The arrays of a scene file and their kinds (checked when loaded).
SCENE_ARRAYS: tuple[str, ...] = (
    "lidar_token", "lidar_sample", "lidar_key", "lidar_ts", "lidar_file", "lidar_t", "lidar_q", "lidar_seg",
    "lidar_calib_t", "lidar_calib_q", "lidar_calib_token", "cam_token", "cam_t", "cam_q", "cam_k", "cam_size",
    "cam_file", "cam_ts", "sample_token", "sample_ts", "ann_token", "ann_sample", "ann_instance", "ann_category",
    "ann_t", "ann_wlh", "ann_q", "ann_velocity", "lidarseg_lut", "meta",
)  # fmt: skip


#: Magic bytes of a scene file; the array kinds it may hold (byte strings, bool, integers, floats).
_MAGIC = b"DEARRAYS1\n"
_KINDS = "Sbiuf"
_ALIGN = 64


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as one file: magic, an 8-byte header length, a JSON header (name -> dtype, shape,
    offset), then each array's bytes (C order, 64-byte aligned)."""
    entries, offset = {}, 0
    blobs = []
    for name, array in arrays.items():
        a = np.ascontiguousarray(array)
        if a.dtype.kind not in _KINDS:
            raise TypeError(f"{name}: {a.dtype} cannot go into a scene file")
        entries[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
        blobs.append((offset, a))
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps(entries).encode()
    start = -(-(len(_MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    with open(path, "wb") as f:
        f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
        for off, a in blobs:
            f.seek(start + off)
            f.write(a.tobytes())
        f.truncate(start + offset)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a :func:`write_arrays` file (views of one read-only buffer), checked: only the
    allowed kinds, shapes and offsets within the file. Raises ValueError (or OSError) on a bad file."""
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError("not a scene file (magic)")
    n = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
    head_end = len(_MAGIC) + 8 + n
    if head_end > len(data):
        raise ValueError("header beyond the end of the file")
    entries = json.loads(data[len(_MAGIC) + 8 : head_end])
    if not isinstance(entries, dict):
        raise ValueError("malformed header")
    start = -(-head_end // _ALIGN) * _ALIGN
    out = {}
    for name, e in entries.items():
        dtype = np.dtype(str(e["dtype"]))
        shape = tuple(int(x) for x in e["shape"])
        if dtype.kind not in _KINDS or any(x < 0 for x in shape):
            raise ValueError(f"{name}: {dtype} {shape} is not allowed")
        count = int(np.prod(shape, dtype=np.int64))
        begin = start + int(e["offset"])
        if begin < start or begin + count * dtype.itemsize > len(data):
            raise ValueError(f"{name}: beyond the end of the file")
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
    return out


def load_scene(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of one scene file of an index (:func:`read_arrays`).

    Raises:
        SourceError: the file is missing or damaged (delete the index folder to rebuild it).
    """
    path = Path(path)
    hint = f"delete the index folder {path.parent.parent} to rebuild it"
    try:
        found = read_arrays(path)
        arrays = {name: found[name] for name in SCENE_ARRAYS}
    except FileNotFoundError:
        raise SourceError(path, "the scene's index file is missing", hint) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(
            path, f"the scene's index file is damaged ({type(exc).__name__}: {exc})", hint
        ) from None
    return arrays
