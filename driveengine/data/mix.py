"""``MixedStream``: one deterministic, resumable stream over several collected splits, mixed by weight.

Pre-training on nuPlan and fine-tuning data together (nuScenes, ...) needs one stream that draws from
several datasets at chosen proportions, with the guarantees of :class:`~driveengine.data.FrameStream`: the
same order for any number of ranks and DataLoader workers, exact mid-epoch resume, every sample naming its
dataset. A mix is made of one :class:`FrameStream` per source (opened unshuffled, read map-style), so
filters, fields, history, remote data and the sample layout are exactly a split's; the mix only decides
*which* frame of *which* source comes when (:func:`driveengine.data.plan.plan_mixed_epoch`)::

    mix = MixedStream(
        [MixSource("nuplan_ds", "mini", 0.7), MixSource("nuscenes_ds", "mini_train", 0.3)],
        fields=("points", "semantics", "flow", "mask_lidar"), seed=0, global_batch_size=8,
        classes="unified",
    )
    for batch in mix.loader(num_workers=4):
        batch["dataset"], batch["mix_source"]   # per sample: dataset name, index of its source

**Weights.** ``weight`` is a source's share of the samples: ``p_s = w_s / sum(w)`` (``0.7, 0.3`` and
``7, 3`` are the same mix). The units of the epochs (a unit is one sample, or one whole global batch
when batches are homogeneous, below) are apportioned to the sources by the highest-averages method
(Sainte-Laguë, :func:`~driveengine.data.plan.mix_units`), counted from the first epoch: after any number
of whole epochs each source has had its share ``p_s`` of the units to within one unit (half a unit with
two sources), so every single epoch is within about one unit of it too (``0.7, 0.3`` of 4 global batches
per epoch: 3 + 1, 3 + 1, 2 + 2, 3 + 1, 3 + 1, then again: 14 of every 20).
No randomness is involved in the counts; which unit goes to which source is drawn per epoch. Without
weights (every ``weight`` None) every frame of every source is read once per epoch (a concatenation; the
evaluation mix of ``driveengine pretrain``).

**Epoch length.** ``samples_per_epoch`` (default: the sum of the sources' frames after their filters),
rounded up to whole global batches (down with ``drop_last``): the loader never pads a mix with repeats.
Each source reads its frames as an endless sequence of passes, each pass a new shuffle of all its frames
(:func:`~driveengine.data.plan.source_order`); an epoch continues where the previous one stopped. A source
smaller than its share repeats (whole passes, each frame ``floor`` or ``ceil`` of the ratio times); a larger
one is subsampled, and the next epochs read on, so no frame repeats before every frame was read.

**Order.** One global order per ``(seed, epoch)``: the units of all sources in a seeded random order
(without ``shuffle``: spread evenly, each source's ``k``-th unit at ``(k + 1/2) / m_s`` of the epoch), then
dealt to ranks and workers exactly like a split's (global batch ``k``: rank ``r`` takes its ``r``-th slice;
device batch ``j`` goes to worker ``j % W``), so the global batches are the same for any ranks x workers.

**Homogeneous batches.** Samples of sources whose tensors differ cannot share a batch. Sources differ in
shape when their voxel grids, their class tables (with ``classes="native"``) or their cameras differ; then
every global batch is drawn from one source (``homogeneous=None``, the default, decides so; ``True``
forces it; ``False`` mixes samples in a batch and is refused when grids or class tables differ, allowed when
only the cameras differ, for a stream without ``images``).

**Class tables.** ``classes="native"``: ``semantics`` keep each source's ids (:attr:`classes` is their
common table, and refused when they differ). ``classes="unified"``: every source's ``semantics`` (and
``history_semantics``) are mapped onto :data:`UNIFIED_CLASSES` (the ids of
:data:`driveengine.schemas.classes.UNIFIED`, through each table's :meth:`ClassTable.to_unified`), so
sources with different tables share one table, one model head and, on one grid, mixed batches.
``classes="auto"``: native when all sources share a table, else unified.

**Resume.** :meth:`MixedStream.state_dict` holds ``epoch``, ``num_samples`` (global samples of the epoch
consumed, a whole number of global batches), ``seed``, ``shuffle``, ``global_batch_size``, ``num_frames``
(of all sources), ``samples_per_epoch`` (resolved), ``mix`` (a fingerprint of the sources -- dataset,
split, frames, filter subset, normalised weight -- and of the class mode, homogeneity, block size and
``drop_last``) and ``sources`` (the same in words, for messages). :meth:`~MixedStream.load_state_dict`
refuses a state of another mix or of a single split.

A sample is a :class:`FrameStream` sample of its source (``dataset`` = the source's dataset) with
``sample_index`` its position in the epoch's global order and ``mix_source`` the index of its source.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from driveengine.data.plan import MixedEpochPlan, mix_probabilities, plan_mixed_epoch
from driveengine.data.stream import OCC_FIELDS, EpochCursor, FrameStream, StreamError
from driveengine.schemas.classes import UNIFIED, ClassTable
from driveengine.schemas.grid import VoxelGrid

__all__ = ["CLASS_MODES", "UNIFIED_CLASSES", "MixSource", "MixedStream"]

#: The unified class table as a :class:`ClassTable`: the ids of :data:`UNIFIED` (free last); the object
#: classes (``vehicle`` .. ``generic_object``) are its foreground, ``background`` its background.
UNIFIED_CLASSES: ClassTable = ClassTable(
    name="unified",
    names=UNIFIED,
    free=len(UNIFIED) - 1,
    foreground=tuple(range(UNIFIED.index("generic_object") + 1)),
    background=UNIFIED.index("background"),
    unified=UNIFIED,
)

#: Values of ``MixedStream(classes=...)``.
CLASS_MODES: tuple[str, ...] = ("native", "unified", "auto")

#: Sample keys holding class ids of the source's table (mapped with ``classes="unified"``).
_CLASS_ID_KEYS: tuple[str, ...] = ("semantics", "history_semantics")


@dataclass(frozen=True)
class MixSource:
    """One source of a mix.

    Attributes:
        root: the collect output folder (local path or fsspec URL); the split is ``root/split``.
        split: the split folder name.
        weight: the source's weight (its expected share of the samples is ``weight / sum of weights``);
            None for all sources = every frame of every source once per epoch.
        blob_root: where this source's sensor files are (default: as each log was collected).
        storage_options: fsspec options for this source (default: the mix's ``storage_options``).
    """

    root: str
    split: str
    weight: float | None = 1.0
    blob_root: str | None = None
    storage_options: dict[str, Any] | None = None


class MixedStream(EpochCursor, IterableDataset):
    """Streams several collected splits mixed by weight, sharded over DDP ranks and DataLoader workers.

    Args:
        sources: the splits and their weights (:class:`MixSource`, or ``(root, split, weight)`` tuples),
            at least one; the order matters (it seeds each source's shuffle and is part of the state).
        fields, history: what each sample holds (as :class:`FrameStream`; the same for every source).
        shuffle, seed: the epoch order (module docstring).
        global_batch_size: samples per optimiser step over all ranks (as :class:`FrameStream`); the unit
            of homogeneous batches. Without it a rank's DataLoader batches are its single samples.
        samples_per_epoch: weighted mixes: samples per epoch (default: the sum of the sources' frames).
        classes: ``"native"``, ``"unified"`` or ``"auto"`` (module docstring).
        homogeneous: every global batch from one source: None = when the sources' shapes differ.
        drop_last: round the epoch down to whole global batches instead of up.
        block_size: shuffle each source's passes in blocks (:func:`~driveengine.data.plan.global_order`).
        rank, world_size: override the DDP rank / world size (as :class:`FrameStream`).
        storage_options: fsspec options of every source without its own.
        **options: other :class:`FrameStream` keyword arguments, the same for every source (``image_size``,
            ``point_sweeps``, ``where``, ``scenario_tags``, ``map_locations``, ``fast_reads``,
            ``max_open_logs``, ``sensor_storage_options``); filters apply to every source.

    Raises:
        StreamError: no source, bad weights, an unknown class mode, a batch size that is not a multiple of
            the world size, mixed batches of sources whose grids or class tables differ; and whatever
            :class:`FrameStream` raises for a source.
        ManifestError: a source without manifest.
    """

    def __init__(
        self,
        sources: Sequence[MixSource | tuple[str, str, float | None]],
        fields: Sequence[str] = OCC_FIELDS,
        history: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        global_batch_size: int | None = None,
        *,
        samples_per_epoch: int | None = None,
        classes: str = "native",
        homogeneous: bool | None = None,
        drop_last: bool = False,
        block_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.sources: tuple[MixSource, ...] = tuple(
            s if isinstance(s, MixSource) else MixSource(os.fspath(s[0]), s[1], s[2]) for s in sources
        )
        if not self.sources:
            raise StreamError("a mix needs at least one source (root, split, weight)")
        given = [s.weight is not None for s in self.sources]
        if any(given) and not all(given):
            raise StreamError(
                "give every source of a mix a weight, or none (every frame of every source once per epoch)"
            )
        self.weights: tuple[float, ...] | None = None
        if all(given):
            try:
                self.weights = tuple(
                    float(p) for p in mix_probabilities([float(s.weight or 0) for s in self.sources])
                )
            except ValueError:
                raise StreamError(
                    f"mix weights {[s.weight for s in self.sources]}: each must be a finite number > 0 "
                    "(they are normalised to sum 1)"
                ) from None
        if classes not in CLASS_MODES:
            raise StreamError(f"classes={classes!r}: use one of {', '.join(CLASS_MODES)}")
        if samples_per_epoch is not None and (self.weights is None or int(samples_per_epoch) < 1):
            raise StreamError(
                f"samples_per_epoch={samples_per_epoch}: a positive number, for a mix with weights only"
            )
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self.drop_last = bool(drop_last)
        self.block_size = block_size
        self.streams: tuple[FrameStream, ...] = tuple(
            self._open(s, fields, history, rank, world_size, storage_options, options) for s in self.sources
        )
        first = self.streams[0]
        self.rank, self.world_size = first.rank, first.world_size
        if self.global_batch_size is not None and (
            self.global_batch_size < 1 or self.global_batch_size % self.world_size
        ):
            raise StreamError(
                f"global batch size {self.global_batch_size} is not a positive multiple of the world size "
                f"{self.world_size}"
            )

        tables = [s.classes for s in self.streams]
        same_tables = all(t == tables[0] for t in tables)
        self.class_mode = ("native" if same_tables else "unified") if classes == "auto" else classes
        self._luts: tuple[np.ndarray, ...] | None = None
        if self.class_mode == "unified":
            self._luts = tuple(np.asarray(t.to_unified(), dtype=np.uint8) for t in tables)
        same_grids = all(s.grid == first.grid for s in self.streams)
        same_labels = same_grids and (same_tables or self.class_mode == "unified")
        same_cameras = all(s.cameras == first.cameras for s in self.streams)
        if homogeneous is False and not same_labels:
            hint = "leave homogeneous=None (every global batch then comes from one source)"
            raise StreamError(
                f"{self.split_url}: samples of these sources cannot share a batch ({self._differences()}); "
                + (hint + " or pass classes='unified'" if same_grids else hint)
            )
        self.homogeneous = (not (same_labels and same_cameras)) if homogeneous is None else bool(homogeneous)
        self.samples_per_epoch: int | None = None
        if self.weights is not None:
            self.samples_per_epoch = (
                int(samples_per_epoch) if samples_per_epoch is not None else self.num_frames
            )
        self._source_counts = [
            (s.frame_counts if self.block_size is not None else [s.num_frames]) for s in self.streams
        ]

    def _open(
        self,
        source: MixSource,
        fields: Sequence[str],
        history: int,
        rank: int | None,
        world_size: int | None,
        storage_options: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> FrameStream:
        """The source's split as an unshuffled FrameStream (the mix reads it map-style)."""
        return FrameStream(
            source.root, source.split, fields=fields, history=history, shuffle=False, seed=self.seed,
            rank=rank, world_size=world_size, blob_root=source.blob_root,
            storage_options=storage_options if source.storage_options is None else source.storage_options,
            **options,
        )  # fmt: skip

    # -- what the mix is ---------------------------------------------------------------------------
    @property
    def split_url(self) -> str:
        """The sources' split URLs joined with `` + `` (for messages)."""
        return " + ".join(s.split_url for s in self.streams)

    @property
    def datasets(self) -> tuple[str, ...]:
        """The dataset of each source (``nuplan``, ``nuscenes``, ...): the samples' ``dataset``."""
        return tuple(s.dataset_name for s in self.streams)

    @property
    def num_frames(self) -> int:
        """Frames of all sources together (after their filters)."""
        return int(sum(s.num_frames for s in self.streams))

    @property
    def grid(self) -> VoxelGrid:
        """The voxel grid of the sources' labels.

        Raises:
            StreamError: the sources' grids differ (one model predicts one grid).
        """
        grid = self.streams[0].grid
        if any(s.grid != grid for s in self.streams):
            raise StreamError(
                f"{self.split_url}: the sources' voxel grids differ ({self._describe('grid')}); a model predicts "
                "one grid: mix splits whose labels were made on the same grid (collect them with the same --grid, "
                "e.g. --grid openscene)"
            )
        return grid

    @property
    def classes(self) -> ClassTable:
        """The class table of the samples' ``semantics``: :data:`UNIFIED_CLASSES` with unified classes, else
        the sources' common table.

        Raises:
            StreamError: native classes and the sources' tables differ.
        """
        if self.class_mode == "unified":
            return UNIFIED_CLASSES
        table = self.streams[0].classes
        if any(s.classes != table for s in self.streams):
            raise StreamError(
                f"{self.split_url}: the sources' class tables differ ({self._describe('classes')}); use "
                "classes='unified' to map them onto the unified table"
            )
        return table

    @property
    def cameras(self) -> tuple[str, ...]:
        """The sources' camera channels (the order of ``images``).

        Raises:
            StreamError: the sources' cameras differ.
        """
        cameras = self.streams[0].cameras
        if any(s.cameras != cameras for s in self.streams):
            raise StreamError(f"{self.split_url}: the sources' cameras differ ({self._describe('cameras')})")
        return cameras

    def _describe(self, what: str) -> str:
        """Each source's grid, class table or cameras, for messages."""
        parts = []
        for s in self.streams:
            if what == "grid":
                text = s.grid.describe()
            elif what == "classes":
                text = f"class table {s.classes.name}"
            else:
                text = f"{len(s.cameras)} cameras"
            parts.append(f"{s.split_url}: {text}")
        return "; ".join(parts)

    def _differences(self) -> str:
        """What keeps the sources' samples out of one batch, for messages."""
        first = self.streams[0]
        parts = []
        if any(s.grid != first.grid for s in self.streams):
            parts.append(self._describe("grid"))
        if self.class_mode == "native" and any(s.classes != first.classes for s in self.streams):
            parts.append(self._describe("classes"))
        return "; ".join(parts)

    # -- epochs and resume -------------------------------------------------------------------------
    def _plan(self, worker: int = 0, num_workers: int = 1) -> MixedEpochPlan:
        return plan_mixed_epoch(
            self._source_counts, self.weights, homogeneous=self.homogeneous,
            epoch_samples=self.samples_per_epoch, seed=self.seed, epoch=self._epoch, shuffle=self.shuffle,
            block_size=self.block_size, rank=self.rank, world_size=self.world_size, worker=worker,
            num_workers=num_workers, global_batch_size=self.global_batch_size, start=self._start,
            drop_last=self.drop_last,
        )  # fmt: skip

    def __len__(self) -> int:
        """Samples this rank yields in the current epoch from the resume point."""
        return len(self._plan().positions)

    def _fingerprint(self) -> tuple[str, str]:
        """(digest, words) of what makes the order: the sources and the mix's options."""
        described = []
        for i, s in enumerate(self.streams):
            subset = s.state_dict().get("subset", "")
            weight = None if self.weights is None else float(f"{self.weights[i]:.12g}")
            described.append(
                {"dataset": s.dataset_name, "split": s.split, "num_frames": s.num_frames, "subset": subset,
                 "weight": weight}
            )  # fmt: skip
        record = {
            "sources": described, "classes": self.class_mode, "homogeneous": self.homogeneous,
            "block_size": self.block_size, "drop_last": self.drop_last,
        }  # fmt: skip
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
        words = " + ".join(
            f"{d['dataset']}/{d['split']} ({d['num_frames']} frames"
            + ("" if d["weight"] is None else f", weight {d['weight']:.3g}")
            + (", filtered" if d["subset"] else "")
            + ")"
            for d in described
        )
        return digest, words

    def state_dict(self, num_samples: int | None = None) -> dict[str, Any]:
        """The resume state (module docstring).

        Args:
            num_samples: samples of the epoch consumed by all ranks together (a training loop passes
                ``steps_in_epoch * global_batch_size``); default: counted here (in-process loading only).
        """
        if num_samples is None:
            num_samples = self._start + self._yielded * self.world_size
        digest, words = self._fingerprint()
        return {
            "epoch": self._epoch,
            "num_samples": int(num_samples),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "num_frames": self.num_frames,
            "samples_per_epoch": self.samples_per_epoch,
            "mix": digest,
            "sources": words,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues epoch ``state["epoch"]`` after its consumed samples.

        Raises:
            StreamError: the state is of a single split or of another mix (sources, weights, class mode,
                seed, shuffle, batch size, epoch length), or stops inside a global batch.
        """
        mine = self.state_dict()
        if "mix" not in state:
            raise StreamError(
                f"{self.split_url}: cannot resume, the saved loader state is of a single split, not of this mix "
                f"({mine['sources']}); resume with the data of the run that saved it"
            )
        if state["mix"] != mine["mix"]:
            raise StreamError(
                f"{self.split_url}: cannot resume, the saved loader state is of another mix "
                f"({state.get('sources', '?')}) than this one ({mine['sources']}); resume with the sources, "
                "weights and class mode of the run that saved it"
            )
        for key in ("seed", "shuffle", "global_batch_size", "num_frames", "samples_per_epoch"):
            if state.get(key) != mine[key]:
                raise StreamError(
                    f"{self.split_url}: cannot resume, the saved loader state has {key}={state.get(key)!r} but "
                    f"this MixedStream has {mine[key]!r}"
                )
        batch = self.global_batch_size or self.world_size
        consumed = state["num_samples"]
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0 or consumed % batch:
            raise StreamError(
                f"{self.split_url}: cannot resume after {consumed!r} samples: not a whole number of global "
                f"batches of {batch} (save the state at an optimiser-step boundary)"
            )
        epoch = state["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise StreamError(
                f"{self.split_url}: cannot resume: the saved epoch {epoch!r} is not an int >= 0"
            )
        self._epoch = epoch
        self._start = consumed
        self._yielded = 0

    # -- reading -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self._plan(worker, num_workers)
        in_process = info is None
        if in_process:
            self._yielded = 0
        for source, frame, position in zip(
            plan.sources.tolist(), plan.frames.tolist(), plan.positions.tolist(), strict=True
        ):
            sample = self.streams[source][frame]
            sample["sample_index"] = position
            sample["mix_source"] = source
            if self._luts is not None:
                self._unify(source, sample)
            if in_process:
                self._yielded += 1
            yield sample

    def _unify(self, source: int, sample: dict[str, Any]) -> None:
        """Map the sample's class ids of its source's table onto :data:`UNIFIED_CLASSES` (in place).

        Raises:
            StreamError: an id outside the source's table (its labels and manifest disagree).
        """
        lut = self._luts[source] if self._luts is not None else None
        if lut is None:
            return
        for key in _CLASS_ID_KEYS:
            ids = sample.get(key)
            if ids is None:
                continue
            if ids.size and int(ids.max()) >= len(lut):
                stream = self.streams[source]
                raise StreamError(
                    f"{stream.split_url}: frame {sample.get('token', '?')} of log {sample.get('log_name', '?')} has "
                    f"class id {int(ids.max())} in {key!r}, but the split's class table {stream.classes.name} ends "
                    f"at free = {stream.classes.free}; re-collect the split (its labels and manifest disagree)"
                )
            sample[key] = lut[ids]

    def loader(self, num_workers: int = 0, batch_size: int | None = None, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over the mix (as :meth:`FrameStream.loader`): batch size = :attr:`device_batch_size`
        (or ``batch_size`` without a global batch size, refused for a homogeneous mix: its batches would
        straddle sources), :func:`~driveengine.data.collate.collate_frames`, pinned memory with CUDA.

        Raises:
            StreamError: a batch size that is not the device batch, or that would mix sources that differ.
        """
        from driveengine.data.collate import collate_frames

        if self.global_batch_size is not None and batch_size not in (None, self.device_batch_size):
            raise StreamError(
                f"batch_size {batch_size} differs from the device batch {self.device_batch_size} "
                f"(global batch {self.global_batch_size} / world size {self.world_size})"
            )
        if self.global_batch_size is None and self.homogeneous and (batch_size or 1) > 1:
            raise StreamError(
                f"{self.split_url}: batches of this mix must come from one source; give the MixedStream a "
                "global_batch_size instead of a loader batch_size"
            )
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        if num_workers > 0:
            kwargs.setdefault("prefetch_factor", 2)
        return DataLoader(
            self,
            batch_size=batch_size or self.device_batch_size,
            num_workers=num_workers,
            collate_fn=collate_frames,
            **kwargs,
        )
