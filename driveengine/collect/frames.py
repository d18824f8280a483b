"""Key frames of a log and their frame rows (an Arrow table in :func:`~driveengine.schemas.frame.frame_schema`
of the log's cameras).

Everything here works on whole-log numpy arrays of a :class:`~driveengine.sources.logdata.LogData` and
builds the Arrow table column by column (no per-frame Python dicts). The rules (key-frame choice, drops,
quirk fixes, ``driving_command``) are documented in :mod:`driveengine.schemas.frame`.

Typical use (the per-log job does this, with the log's source)::

    options = FrameOptions(split="mini")
    selection = select_frames(log, options, blob_root, candidates=source.key_frame_candidates(log, 10),
                              lidar_defect=source.lidar_defect)
    table = build_frame_table(log, selection, options)
    check_finite(table, log.path, log.log_name)

**Bad inputs never become rows.** A key frame whose ego pose is not finite (NaN/inf translation, a
non-finite or zero-norm quaternion) is dropped (``bad_ego_pose``). With ``check_blobs`` a frame is
dropped when its files are absent (``missing_lidar``, ``missing_camera``) or broken: the blob check
reads only the head and the tail of each file of a kept frame (:func:`jpeg_defect`: JPEG start marker
``FF D8 FF`` at the start, end marker ``FF D9`` at the end; the source's ``lidar_defect``, e.g. for nuPlan a
parsable PCD header and a file long enough for its ``POINTS``), so ``broken_image`` and ``broken_lidar`` cost a few small reads
per frame, not a decode. Finally :func:`check_finite` refuses a table with a NaN/inf in any of
:data:`~driveengine.schemas.frame.FINITE_COLUMNS` (the log fails, naming column, row and token).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from driveengine.errors import SourceError
from driveengine.geometry import (
    make_transform,
    matrix_to_quaternion,
    quaternion_to_matrix,
    quaternion_yaw,
    wrap_angle,
)
from driveengine.schemas.frame import (
    ANNS_TYPE,
    CAMERA_TYPE,
    DRIVING_COMMAND_LATERAL_M,
    DRIVING_COMMAND_LOOKAHEAD_M,
    FINITE_COLUMNS,
    TRAFFIC_LIGHT_TYPE,
    cams_type,
    frame_schema,
)
from driveengine.sources.logdata import LogData

#: Categories that ``--filter-instance`` removes from ``anns`` (OpenScene's ``filtered_classes``).
FILTERED_CATEGORIES: tuple[str, ...] = ("traffic_cone", "barrier", "czone_sign", "generic_object")

#: Drop reasons, in the order they are tested.
DROP_REASONS: tuple[str, ...] = (
    "no_frame_with_all_cameras",  # the source's key-frame rule found no sweep with an image of every camera
    "not_in_split",  # the split lists tokens and this key frame is not one of them
    "bad_ego_pose",  # the ego pose has a NaN/inf translation or a non-finite / zero-norm quaternion
    "missing_lidar",  # the .pcd file is not under the blob root
    "no_camera_image",  # a channel has no image row within +-50 ms of the lidar_pc
    "missing_camera",  # an image row exists but its .jpg file is not under the blob root
    "broken_lidar",  # the .pcd file has no parsable header or is shorter than its header says
    "broken_image",  # a .jpg file lacks the JPEG start or end marker (empty or truncated)
)

#: Drop reasons that mean a sensor file is broken (the summary asks to repair them).
BROKEN_BLOB_REASONS: tuple[str, ...] = ("broken_lidar", "broken_image")
#: Bytes read from the end of a ``.jpg`` to find its end marker in (a little padding after it is allowed).
JPEG_TAIL_BYTES = 64
#: Broken files named per log and kind (the manifest's notes and the summary), beyond which they are counted.
BROKEN_EXAMPLES = 3

_TRAFFIC_LIGHT_RED = 2


@dataclass(frozen=True)
class FrameOptions:
    """Settings that change the frame rows (all of them go into the config hash).

    Attributes:
        split: split name written to the ``split`` column.
        sample_interval: key frame every this many ``lidar_pc`` (10 = 2 Hz); ignored for sources whose
            sweeps already are key frames (OpenScene).
        is_test: write null ``anns`` (test data has no boxes).
        filter_instance: drop boxes of :data:`FILTERED_CATEGORIES` (OpenScene's ``--filter-instance``).
        check_blobs: drop frames whose ``.pcd`` or images are missing under the blob root or broken
            (the source's ``lidar_defect``, :func:`jpeg_defect`).
    """

    split: str = ""
    sample_interval: int = 10
    is_test: bool = False
    filter_instance: bool = False
    check_blobs: bool = True

    def to_dict(self) -> dict:
        """JSON-ready form (for the config hash)."""
        return asdict(self)


@dataclass
class FrameSelection:
    """Which sweeps of a log become rows.

    Attributes:
        candidates: (K,) int64 sweep indices of the key-frame grid before drops, time order.
        kept: (K,) bool, whether each candidate becomes a row.
        dropped: frames dropped, by reason (see :data:`DROP_REASONS`); zero counts omitted.
        notes: human-readable remarks for the summary (e.g. why a log has no rows).
        broken: ``"<file>: <defect>"`` of the first broken sensor files (up to :data:`BROKEN_EXAMPLES`
            per kind).
    """

    candidates: np.ndarray
    kept: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    @property
    def key_sweeps(self) -> np.ndarray:
        """(T,) int64 sweep indices of the rows, in row order (what labels need)."""
        return self.candidates[self.kept]


def _present(paths: np.ndarray, blob_root: Path) -> np.ndarray:
    """Whether each relative path exists under ``blob_root``, with one directory listing per folder."""
    flat = np.asarray(paths, dtype=str).ravel()
    out = np.zeros(flat.shape, dtype=bool)
    nonempty = flat != ""
    if not nonempty.any():
        return out.reshape(np.shape(paths))
    folders, inverse = np.unique(np.char.rpartition(flat[nonempty], "/")[:, 0], return_inverse=True)
    names = np.char.rpartition(flat[nonempty], "/")[:, 2]
    found = np.zeros(names.shape, dtype=bool)
    for i, folder in enumerate(folders):  # one listing per folder (a few per log), never a stat per file
        try:
            listing = np.array(os.listdir(blob_root / folder), dtype=str)
        except (FileNotFoundError, NotADirectoryError):
            continue
        members = inverse == i
        found[members] = np.isin(names[members], listing)
    out[nonempty] = found
    return out.reshape(np.shape(paths))


def _require_sensor_folder(log: LogData, candidates: np.ndarray, blob_root: Path) -> None:
    """Refuse a log whose sensor folder is absent altogether (a wrong root, not missing files)."""
    if candidates.size == 0:
        return
    folder = blob_root / str(log.sweep_lidar_path[candidates[0]]).split("/")[0]
    if not folder.is_dir():
        raise SourceError(
            folder,
            f"no sensor blobs for log {log.log_name} (every frame would be dropped)",
            "pass the folder holding the logs' sensor files with --blob-root, or collect metadata only "
            "with --no-check-blobs --no-labels",
        )


def jpeg_defect(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a ``.jpg`` file, or None when it looks whole.

    Reads the first 3 and the last :data:`JPEG_TAIL_BYTES` bytes only: a JPEG starts with the SOI marker
    and the next marker's ``FF`` (``FF D8 FF``) and ends with the EOI marker ``FF D9`` (a few bytes of
    padding after it, as some encoders write, are tolerated; ``FF D9`` cannot occur inside the
    entropy-coded data, where every ``FF`` is followed by ``00`` or a restart marker). An empty or
    truncated file fails; the image data is not decoded.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"cannot open ({exc.strerror or exc})"
    try:
        size = os.fstat(fd).st_size
        if size < 4:
            return f"{size} bytes, too short for a JPEG"
        head = os.pread(fd, 3, 0)
        tail = os.pread(fd, min(size, JPEG_TAIL_BYTES), max(0, size - JPEG_TAIL_BYTES))
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    finally:
        os.close(fd)
    if head != b"\xff\xd8\xff":
        return "no JPEG start marker (FF D8 FF): not a JPEG"
    if b"\xff\xd9" not in tail:
        return "no JPEG end marker (FF D9): truncated"
    return None


def _defects(
    paths: np.ndarray,
    rows: np.ndarray,
    blob_root: Path,
    defect: Callable[[Path], str | None],
    examples: list[str],
) -> tuple[np.ndarray, int]:
    """Which of ``paths`` (shape (K,) or (K, C)) are broken, checking the rows flagged in ``rows`` only.

    Returns:
        (same shape as ``paths``) bool, True where broken; the number of broken files. The first
        :data:`BROKEN_EXAMPLES` are appended to ``examples`` as ``"<file>: <defect>"``.
    """
    width = 1 if np.ndim(paths) == 1 else np.shape(paths)[1]
    table = np.asarray(paths, dtype=str).reshape(len(rows), width)
    broken = np.zeros(table.shape, dtype=bool)
    count = 0
    for i in np.flatnonzero(rows):
        for j in range(table.shape[1]):
            path = blob_root / table[i, j]
            why = defect(path)
            if why is not None:
                broken[i, j] = True
                count += 1
                if count <= BROKEN_EXAMPLES:
                    examples.append(f"{path}: {why}")
    return broken.reshape(np.shape(paths)), count


def select_frames(
    log: LogData,
    options: FrameOptions,
    blob_root: Path | None,
    *,
    candidates: np.ndarray,
    lidar_defect: Callable[[Path], str | None] | None = None,
    tokens: Iterable[str] | None = None,
) -> FrameSelection:
    """Key frames of ``log`` and which of them become rows, with drop reasons.

    Args:
        log: the log.
        options: see :class:`FrameOptions` (``sample_interval``, ``check_blobs``).
        blob_root: folder the LogData's relative sensor paths are relative to; required when
            ``options.check_blobs``.
        candidates: (K,) sweep indices the source's key-frame rule chose (time order).
        lidar_defect: the source's check of a sweep file (header and size), used with ``check_blobs``;
            None skips it.
        tokens: when given, keep only key frames whose token is listed (split token lists).

    Raises:
        SourceError: ``check_blobs`` and the log's sensor folder does not exist under ``blob_root``.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    dropped: dict[str, int] = {}
    notes: list[str] = []
    if candidates.size == 0 and log.num_sweeps > 0:
        would_be = len(range(0, log.num_sweeps, options.sample_interval))
        dropped["no_frame_with_all_cameras"] = would_be
        notes.append(
            f"no sweep of the {log.num_sweeps} has an image of all {len(log.camera_channels)} cameras "
            "within the matching window; the log has no key frames"
        )
    kept = np.ones(candidates.shape, dtype=bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        newly = mask & kept
        if newly.any():
            dropped[reason] = dropped.get(reason, 0) + int(newly.sum())
            kept[newly] = False

    if tokens is not None:
        wanted = np.array(sorted(set(tokens)), dtype=str)
        drop(~np.isin(log.sweep_token[candidates], wanted), "not_in_split")
    drop(~log.valid_ego_poses()[candidates], "bad_ego_pose")
    broken: list[str] = []
    if options.check_blobs:
        if blob_root is None:
            raise ValueError("check_blobs needs a blob_root")
        _require_sensor_folder(log, candidates, blob_root)
        lidar = log.sweep_lidar_path[candidates]
        drop(~_present(lidar, blob_root), "missing_lidar")
        images = log.image_path[candidates]
        drop(np.any(images == "", axis=1), "no_camera_image")
        drop(~np.all(_present(images, blob_root), axis=1), "missing_camera")
        # Header checks of the files of the frames still kept (a few small reads per file).
        if lidar_defect is not None:
            bad_lidar, n_lidar = _defects(lidar, kept, blob_root, lidar_defect, broken)
            drop(bad_lidar, "broken_lidar")
        else:
            n_lidar = 0
        bad_images, n_images = _defects(images, kept, blob_root, jpeg_defect, broken)
        drop(np.any(bad_images, axis=1), "broken_image")
        for n, kind in ((n_lidar, "sweep"), (n_images, ".jpg")):
            if n:
                notes.append(f"{n} broken {kind} file(s), their frames dropped")
    else:
        drop(np.any(log.image_path[candidates] == "", axis=1), "no_camera_image")
    return FrameSelection(candidates=candidates, kept=kept, dropped=dropped, notes=notes, broken=broken)


def driving_commands(translation: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """One-hot ``(left, forward, right, unknown)`` commands from the ego's own future path.

    For each pose ``i`` the path (the poses in time order, joined by straight segments) is followed
    for :data:`~driveengine.schemas.frame.DRIVING_COMMAND_LOOKAHEAD_M` metres of travel; the lateral
    offset ``y`` of that point in the ego frame of pose ``i`` decides: ``y > 2 m`` left, ``y < -2 m``
    right, else forward; ``unknown`` when the path ends first.

    Args:
        translation: (K, 3) global ego positions, m, time order.
        rotation: (K, 4) global ego orientations ``[w, x, y, z]``.

    Returns:
        (K, 4) int8 one-hot rows.
    """
    k = translation.shape[0]
    out = np.zeros((k, 4), dtype=np.int8)
    if k == 0:
        return out
    seg = np.linalg.norm(np.diff(translation, axis=0), axis=1)
    travelled = np.concatenate([[0.0], np.cumsum(seg)])
    target = travelled + DRIVING_COMMAND_LOOKAHEAD_M
    reach = target <= travelled[-1]
    command = np.full(k, 3, dtype=np.int64)
    if reach.any():
        j = np.searchsorted(travelled, target[reach], side="left")  # travelled[j-1] < target <= travelled[j]
        j = np.clip(j, 1, k - 1)
        lo, hi = travelled[j - 1], travelled[j]
        frac = ((target[reach] - lo) / np.where(hi > lo, hi - lo, 1.0))[:, None]
        ahead = translation[j - 1] + frac * (translation[j] - translation[j - 1])
        r = quaternion_to_matrix(rotation[reach])  # global_from_ego rotations
        lateral = np.einsum("ni,ni->n", ahead - translation[reach], r[:, :, 1])
        command[reach] = np.where(
            lateral > DRIVING_COMMAND_LATERAL_M, 0, np.where(lateral < -DRIVING_COMMAND_LATERAL_M, 2, 1)
        )
    out[np.arange(k), command] = 1
    return out


# -- Arrow helpers ------------------------------------------------------------------------------------


def _vectors(values: np.ndarray) -> pa.FixedSizeListArray:
    """(K, n) float64 -> fixed_size_list<double, n>."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _matrices(values: np.ndarray) -> pa.FixedSizeListArray:
    """(K, r, c) float64 -> fixed_size_list<fixed_size_list<double, c>, r> (row-major)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    _, r, c = values.shape
    rows = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), c)
    return pa.FixedSizeListArray.from_arrays(rows, r)


def _lists(counts: np.ndarray, values: pa.Array, value_type: pa.DataType | None = None) -> pa.ListArray:
    """A list array whose row ``i`` holds the next ``counts[i]`` entries of ``values``."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    list_type = pa.list_(value_type if value_type is not None else values.type)
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=list_type)


def _strings(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    values = np.asarray(values, dtype=str)
    if valid is None:
        return pa.array(values, type=pa.string())
    return pa.array(values, type=pa.string(), mask=~valid)


def _gather_ragged(offsets: np.ndarray, sweeps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a ragged per-sweep array for the given sweeps: (indices into the values, count per sweep)."""
    starts = offsets[sweeps]
    counts = (offsets[sweeps + 1] - starts).astype(np.int64)
    total = int(counts.sum())
    row_starts = np.cumsum(counts) - counts
    idx = np.repeat(starts - row_starts, counts) + np.arange(total, dtype=np.int64)
    return idx.astype(np.int64), counts


def _scene_links(
    scene: np.ndarray, kept: np.ndarray, tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """frame_idx, prev/next tokens and their validity for the kept candidates.

    ``frame_idx`` counts the kept frames of each scene in time order without gaps (so ``(scene,
    frame_idx)`` is unique); prev/next link kept frames that are adjacent candidates (no dropped frame
    in between) of the same scene.
    """
    scene_k = scene[kept]
    k = scene_k.shape[0]
    idx_in_candidates = np.flatnonzero(kept)
    order = np.argsort(scene_k, kind="stable")  # time order within each scene
    first = np.ones(k, dtype=bool)
    first[1:] = scene_k[order][1:] != scene_k[order][:-1]
    group_start = np.flatnonzero(first)
    frame_idx = np.empty(k, dtype=np.int32)
    frame_idx[order] = np.arange(k) - group_start[np.cumsum(first) - 1]
    new_scene = np.ones(k, dtype=bool)
    new_scene[1:] = scene_k[1:] != scene_k[:-1]
    linked = np.zeros(k, dtype=bool)  # linked[i]: row i-1 -> row i is a valid link
    linked[1:] = ~new_scene[1:] & (np.diff(idx_in_candidates) == 1)
    tok = tokens[kept]
    prev_tok = np.where(linked, np.roll(tok, 1), "")
    next_valid = np.zeros(k, dtype=bool)
    next_valid[:-1] = linked[1:]
    next_tok = np.where(next_valid, np.roll(tok, -1), "")
    return frame_idx, prev_tok, linked, next_tok, next_valid


def build_frame_table(log: LogData, selection: FrameSelection, options: FrameOptions) -> pa.Table:
    """The frame rows of ``log`` (one per kept key frame, time order) in the frame schema of its cameras.

    Args:
        log: the log (global poses and boxes).
        selection: from :func:`select_frames`.
        options: ``split``, ``is_test``, ``filter_instance`` are used here.

    Returns:
        A table with ``len(selection.key_sweeps)`` rows whose schema is exactly
        ``frame_schema(log.camera_channels)``.
    """
    cand = selection.candidates
    s = selection.key_sweeps
    k = int(s.shape[0])

    # Ego poses and the driving command (over the candidate grid with a valid pose, so other drops do
    # not change it; a frame with a bad pose is never kept).
    valid = log.valid_ego_poses()[cand]
    commands = np.zeros((cand.shape[0], 4), dtype=np.int8)
    commands[valid] = driving_commands(log.ego_translation[cand[valid]], log.ego_rotation[cand[valid]])
    command = commands[selection.kept]
    t_ego = log.ego_translation[s]
    q_ego = log.ego_rotation[s]
    global_from_ego = make_transform(q_ego, t_ego)
    r_ego = global_from_ego[:, :3, :3]
    ego_yaw = quaternion_yaw(q_ego)
    ego_from_lidar = np.broadcast_to(log.ego_from_lidar, (k, 4, 4))
    global_from_lidar = global_from_ego @ log.ego_from_lidar
    lidar_rotation = np.broadcast_to(matrix_to_quaternion(log.ego_from_lidar[:3, :3]), (k, 4))

    can_bus = np.zeros((k, 18))
    can_bus[:, 0:3] = t_ego
    can_bus[:, 3:7] = q_ego
    can_bus[:, 7:10] = log.ego_acceleration[s]
    can_bus[:, 10:13] = log.ego_velocity[s]
    can_bus[:, 13:16] = log.ego_angular_rate[s]
    dynamic = np.stack(
        [
            log.ego_velocity[s, 0],
            log.ego_velocity[s, 1],
            log.ego_acceleration[s, 0],
            log.ego_acceleration[s, 1],
        ],
        axis=1,
    )

    # Scenes, frame_idx, prev/next.
    scene = log.sweep_scene[cand]
    frame_idx, prev_tok, prev_valid, next_tok, next_valid = _scene_links(
        scene, selection.kept, log.sweep_token[cand]
    )
    sc = log.sweep_scene[s]
    has_scene = sc >= 0
    # Append "" so that index -1 (no scene) reads as empty.
    scene_names = np.append(np.asarray(log.scene_name, dtype=str), "")
    scene_tokens = np.append(np.asarray(log.scene_token, dtype=str), "")
    scene_name_col = np.where(has_scene, np.char.add(f"{log.log_name}-", scene_names[sc]), "")
    scene_token_col = scene_tokens[sc]
    roadblocks = [log.scene_roadblock_ids[i] if i >= 0 else [] for i in sc.tolist()]  # per-row lists, tiny
    rb_counts = np.array([len(r) for r in roadblocks], dtype=np.int64)
    rb_values = pa.array([x for r in roadblocks for x in r], type=pa.string())

    # Traffic lights.
    tl_idx, tl_counts = _gather_ragged(log.traffic_light_offsets, s)
    traffic = pa.StructArray.from_arrays(
        [
            pa.array(log.traffic_light_lane_connector_id[tl_idx].astype(np.int64)),
            pa.array(log.traffic_light_status[tl_idx] == _TRAFFIC_LIGHT_RED),
        ],
        fields=list(TRAFFIC_LIGHT_TYPE),
    )

    # Scenario tags: sorted, unique per frame.
    tag_idx, tag_counts = _gather_ragged(log.tag_offsets, s)
    tag_row = np.repeat(np.arange(k), tag_counts)
    tag_type = np.asarray(log.tag_type, dtype=str)[tag_idx]
    order = np.lexsort((tag_type, tag_row))
    tag_row, tag_type = tag_row[order], tag_type[order]
    first = np.ones(tag_row.shape, dtype=bool)
    first[1:] = (tag_row[1:] != tag_row[:-1]) | (tag_type[1:] != tag_type[:-1])
    tag_row, tag_type = tag_row[first], tag_type[first]
    tags = _lists(np.bincount(tag_row, minlength=k), _strings(tag_type))

    # Cameras.
    cams = _cams_array(log, s)

    # Boxes.
    anns = _anns_array(log, s, r_ego, t_ego, ego_yaw, options)

    columns = {
        "token": _strings(log.sweep_token[s]),
        "frame_idx": pa.array(frame_idx, type=pa.int32()),
        "timestamp": pa.array(log.sweep_timestamp_us[s].astype(np.int64)),
        "log_name": pa.array([log.log_name] * k, type=pa.string()),
        "log_token": pa.array([log.log_token] * k, type=pa.string()),
        "scene_name": _strings(scene_name_col),
        "scene_token": _strings(scene_token_col),
        "map_location": pa.array([log.map_version] * k, type=pa.string()),
        "roadblock_ids": _lists(rb_counts, rb_values),
        "vehicle_name": pa.array([log.vehicle_name] * k, type=pa.string()),
        "can_bus": _vectors(can_bus),
        "lidar_path": _strings(log.sweep_lidar_path[s]),
        "lidar2ego_translation": _vectors(ego_from_lidar[:, :3, 3]),
        "lidar2ego_rotation": _vectors(lidar_rotation),
        "ego2global_translation": _vectors(t_ego),
        "ego2global_rotation": _vectors(q_ego),
        "ego_dynamic_state": _vectors(dynamic),
        "traffic_lights": _lists(tl_counts, traffic),
        "driving_command": pa.FixedSizeListArray.from_arrays(
            pa.array(command.reshape(-1), type=pa.int8()), 4
        ),
        "cams": cams,
        "sample_prev": _strings(prev_tok, prev_valid),
        "sample_next": _strings(next_tok, next_valid),
        "ego2global": _matrices(global_from_ego),
        "lidar2ego": _matrices(ego_from_lidar),
        "lidar2global": _matrices(global_from_lidar),
        "anns": anns,
        "scenario_tags": tags,
        "source": pa.array([log.source] * k, type=pa.string()),
        "split": pa.array([options.split] * k, type=pa.string()),
        "frame_index": pa.array(np.arange(k, dtype=np.int32)),
    }
    schema = frame_schema(log.camera_channels)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _cams_array(log: LogData, s: np.ndarray) -> pa.StructArray:
    k = int(s.shape[0])
    # A channel the log lacks has NaN calibration; its frames are all dropped (no image), but keep the
    # matrix defined for an empty table.
    q = np.array(log.camera_rotation, dtype=np.float64)
    q[np.isnan(q).any(axis=1)] = (1.0, 0.0, 0.0, 0.0)
    rot = quaternion_to_matrix(q)
    children = []
    for c in range(len(log.camera_channels)):
        ts = log.image_timestamp_us[s, c].astype(np.int64)
        child = pa.StructArray.from_arrays(
            [
                _strings(log.image_path[s, c]),
                pa.array(ts, type=pa.int64(), mask=ts < 0),
                _matrices(np.broadcast_to(rot[c], (k, 3, 3))),
                _vectors(np.broadcast_to(log.camera_translation[c], (k, 3))),
                _matrices(np.broadcast_to(log.camera_intrinsic[c], (k, 3, 3))),
                _vectors(np.broadcast_to(log.camera_distortion[c], (k, 5))),
            ],
            fields=list(CAMERA_TYPE),
        )
        children.append(child)
    return pa.StructArray.from_arrays(children, fields=list(cams_type(log.camera_channels)))


def _anns_array(
    log: LogData,
    s: np.ndarray,
    r_ego: np.ndarray,
    t_ego: np.ndarray,
    ego_yaw: np.ndarray,
    options: FrameOptions,
) -> pa.StructArray:
    """``anns`` for the rows: boxes moved from global into each row's ego frame."""
    k = int(s.shape[0])
    idx, counts = _gather_ragged(log.box_offsets, s)
    row = np.repeat(np.arange(k), counts)
    names_all = np.asarray(log.categories, dtype=str)[log.box_category[idx].astype(np.int64)]
    if options.filter_instance:
        keep = ~np.isin(names_all, np.array(FILTERED_CATEGORIES, dtype=str))
        idx, row, names_all = idx[keep], row[keep], names_all[keep]
        counts = np.bincount(row, minlength=k)
    r = r_ego[row]  # (M, 3, 3) global_from_ego rotation of each box's row
    # ego_from_global applied to points: (p - t) @ R (row vectors), i.e. R.T (p - t).
    center = np.einsum("mji,mj->mi", r, log.box_center[idx] - t_ego[row])
    velocity = np.einsum("mji,mj->mi", r, log.box_velocity[idx])
    yaw = wrap_angle(log.box_yaw[idx] - ego_yaw[row])
    boxes = np.concatenate([center, log.box_size[idx], yaw[:, None]], axis=1)
    fields = list(ANNS_TYPE)
    children = [
        _lists(counts, _vectors(boxes.reshape(-1, 7))),
        _lists(counts, _strings(names_all)),
        _lists(counts, _vectors(velocity.reshape(-1, 3))),
        _lists(counts, _strings(np.asarray(log.box_token, dtype=str)[idx])),
        _lists(counts, _strings(np.asarray(log.box_track_token, dtype=str)[idx])),
    ]
    if options.is_test:
        empty = np.zeros(k, dtype=np.int64)
        children = [
            _lists(empty, _vectors(np.zeros((0, 7)))),
            _lists(empty, pa.array([], type=pa.string())),
            _lists(empty, _vectors(np.zeros((0, 3)))),
            _lists(empty, pa.array([], type=pa.string())),
            _lists(empty, pa.array([], type=pa.string())),
        ]
        return pa.StructArray.from_arrays(children, fields=fields, mask=pa.array(np.ones(k, dtype=bool)))
    return pa.StructArray.from_arrays(children, fields=fields)


# -- finiteness --------------------------------------------------------------------------------------


class NonFiniteError(SourceError):
    """A frame row would hold NaN/inf in a column that must be finite (see ``FINITE_COLUMNS``)."""


def _column_paths(path: str, cameras: Iterable[str]) -> list[str]:
    """A :data:`FINITE_COLUMNS` entry with ``cams.*`` expanded to every camera."""
    if path.startswith("cams.*."):
        return [path.replace("*", channel, 1) for channel in cameras]
    return [path]


def _first_non_finite(values: pa.Array) -> tuple[int, float] | None:
    """(row, value) of the first NaN/inf in a column of (nested lists of) floats, None when all finite."""
    rows = np.arange(len(values), dtype=np.int64)
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        rows = rows[pc.list_parent_indices(values).to_numpy()]
        values = pc.list_flatten(values)
    numbers = values.to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(numbers)
    if values.null_count:
        bad &= values.is_valid().to_numpy(zero_copy_only=False)
    if not bad.any():
        return None
    first = int(np.argmax(bad))
    return int(rows[first]), float(numbers[first])


def check_finite(table: pa.Table, source: str | os.PathLike[str], log_name: str) -> None:
    """Refuse frame rows with a NaN/inf in any column of :data:`~driveengine.schemas.frame.FINITE_COLUMNS`.

    Args:
        table: a log's frame rows (:func:`~driveengine.schemas.frame.frame_schema`).
        source: the input file (named in the error).
        log_name: the log (named in the error).

    Raises:
        NonFiniteError: one line naming the file, log, column, first bad row and its token.
    """
    cameras = [f.name for f in table.schema.field("cams").type]
    for declared in FINITE_COLUMNS:
        for path in _column_paths(declared, cameras):
            top, *members = path.split(".")
            column = table.column(top).combine_chunks()
            for member in members:
                column = pc.struct_field(column, [member])
            found = _first_non_finite(column)
            if found is not None:
                row, value = found
                token = table.column("token")[row].as_py()
                raise NonFiniteError(
                    source,
                    f"log {log_name}: column {path} holds {value} at row {row} (token {token}); frame rows "
                    "must be finite there",
                    "fix the input, or collect the other logs with --logs",
                )
