"""Planning a ``collect`` run: the split, its logs (found by the source), the settings hash, one task per log.

The settings hash (manifest ``config_hash``) covers every setting that changes a log's files: the
format version, the source, the frame options, the frame shards' Parquet settings, the split's token
list, the label producer's settings and the label storage. A log is skipped on a rerun when its entry
has the same hash, the same input fingerprint and its files are present.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from driveengine.collect.config import CollectConfig, CollectError, output_root
from driveengine.collect.job import LogTask
from driveengine.errors import SourceError
from driveengine.schemas import FORMAT_VERSION
from driveengine.sources import UnknownSourceError, get_source, source_label_grid
from driveengine.sources.base import Source
from driveengine.splits import SplitDef, load_split
from driveengine.store.commit import config_hash, source_fingerprint
from driveengine.store.frames import PARQUET_OPTIONS
from driveengine.store.manifest import DatasetInfo, is_remote, join_location


@dataclass(frozen=True)
class Plan:
    """What a run will do.

    Attributes:
        split: the split's name (the last part of :attr:`split_dir`).
        split_dir: the output split ``<out>/<split>``: a folder (:class:`~pathlib.Path`), or the URL of a
            ``--out`` URL as text (``s3://bucket/prefix/<split>``).
        dataset: what the split's data is (source, cameras, classes, grid): recorded in the manifest.
        tasks: one task per selected log, sorted by name.
    """

    split: str
    split_dir: Path | str
    dataset: DatasetInfo
    tasks: list[LogTask]


def _split_ref(split: SplitDef) -> str:
    """How a worker finds the split again: a shipped split by name (install paths differ between
    machines), a user split by its path (which must be visible to the workers)."""
    shipped = Path(str(resources.files("driveengine.splits"))).resolve()
    return split.name if split.path and Path(split.path).parent.resolve() == shipped else str(split.path)


def _check_split(source: Source, split: SplitDef) -> None:
    if split.dataset != source.dataset:
        raise CollectError(
            f"split {split.name!r} names {split.dataset} logs; --source {source.name} reads {source.dataset} "
            "data (pick a split of that dataset, see `driveengine splits`)"
        )


def plan_tasks(config: CollectConfig) -> Plan:
    """The split folder, the dataset it will hold and one :class:`LogTask` per selected log.

    Raises:
        CollectError: an unknown source, a split of another dataset, a missing input folder, ``--logs``
            naming logs the split does not have, a label producer that does not fit the source, ...
    """
    try:
        source = get_source(config.source.name)
    except UnknownSourceError as exc:
        raise CollectError(f"--source: {exc}") from None
    sel = config.source
    split = sel.split if isinstance(sel.split, SplitDef) else load_split(sel.split)
    _check_split(source, split)
    if config.labels is not None:
        config.labels.check(source)
    try:
        inputs = source.find_logs(sel.root, split, sel.input_dir)
    except SourceError as exc:
        raise CollectError(str(exc)) from None
    if sel.logs:
        known = {log.name for log in inputs}
        unknown = sorted(set(sel.logs) - known)
        if unknown:
            raise CollectError(
                f"--logs names {len(unknown)} log(s) that split {split.name!r} has no input for under "
                f"{sel.root}: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            )
        inputs = [log for log in inputs if log.name in set(sel.logs)]
    blob_root = (
        Path(sel.blob_root) if sel.blob_root is not None else source.default_blob_root(sel.root, split)
    )
    frames = replace(config.frames, split=split.name)
    dataset = DatasetInfo(
        name=source.dataset,
        cameras=tuple(source.cameras),
        classes=source.class_table,
        grid=source_label_grid(source),
    )
    if config.labels is not None:
        dataset = replace(dataset, grid=config.labels.grid)
    settings = {
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "frames": frames.to_dict(),
        "parquet": PARQUET_OPTIONS,
        "tokens": split.tokens_digest(),
        "labels": None if config.labels is None else config.labels.to_dict(),
        "storage": None if config.labels is None else config.run.storage.to_dict(),
    }
    digest = config_hash(settings)
    location = join_location(output_root(config.run.out), split.name)
    split_dir: Path | str = location if is_remote(location) else Path(location)
    watch_blobs = frames.check_blobs or config.labels is not None
    tasks = [
        LogTask(
            source=source.name,
            input=log,
            blob_root=str(blob_root),
            split_dir=location,
            frames=frames,
            labels=config.labels,
            storage=config.run.storage,
            split_ref=_split_ref(split) if split.tokens is not None and split.path else None,
            tokens=split.tokens if split.tokens is not None and not split.path else None,
            config_hash=digest,
            fingerprint=source_fingerprint(
                [log.path, *log.watched, *(source.blob_folders(blob_root, log) if watch_blobs else [])]
            ),
        )
        for log in sorted(inputs, key=lambda log: log.name)
    ]
    return Plan(split=split.name, split_dir=split_dir, dataset=dataset, tasks=tasks)
