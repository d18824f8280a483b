"""The settings of one ``collect`` run, composed of the settings of each stage.

``CollectConfig(source, frames, labels, run)``:

* :class:`SourceSelection`: which dataset (a registered source), its input root, the split, the blob
  root, a subset of logs;
* :class:`~driveengine.collect.frames.FrameOptions`: key frames and frame rows;
* a label producer (:mod:`driveengine.labels`: the generator's :class:`~driveengine.labels.generator.LabelConfig`
  recipe, or an importer of labels made by others), or None for frame rows only;
* :class:`RunOptions`: output, parallelism, resume, storage of the labels.

:meth:`CollectConfig.from_options` is the one place that maps the command line's flat options onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from driveengine.collect.frames import FrameOptions
from driveengine.errors import DriveEngineError
from driveengine.labels.base import LabelProducer
from driveengine.splits import SplitDef
from driveengine.store.occ import OccStorage


class CollectError(DriveEngineError):
    """``collect`` cannot start: bad input folder, unknown logs, bad scheduler, bad settings, ..."""


@dataclass(frozen=True)
class SourceSelection:
    """What to read.

    Attributes:
        name: a registered source (``driveengine.sources``: ``nuplan``, ``openscene``, ...).
        root: the source's input root.
        split: split name or YAML path (see :mod:`driveengine.splits`), or a ``SplitDef``.
        blob_root: sensor blob folder overriding the source's default under ``root``.
        input_dir: folder of the log inputs overriding the source's default under ``root``.
        logs: restrict to these log names.
    """

    name: str
    root: Path
    split: str | SplitDef = "mini"
    blob_root: Path | None = None
    input_dir: Path | None = None
    logs: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RunOptions:
    """How to run.

    Attributes:
        out: output root; the split goes to ``out/<split name>/``.
        workers: local worker processes (1 = in this process).
        scheduler: ``local:N`` or ``tcp://host:port`` for Dask; None for the local pool.
        overwrite: redo logs even when their manifest entry matches.
        progress: show progress.
        storage: how label groups are stored (shards, compression).
    """

    out: Path
    workers: int = 1
    scheduler: str | None = None
    overwrite: bool = False
    progress: bool = True
    storage: OccStorage = field(default_factory=OccStorage)


@dataclass(frozen=True)
class CollectConfig:
    """Settings of one ``collect`` run (see the module doc).

    Attributes:
        source: what to read.
        run: how to run.
        frames: key frames and rows (its ``split`` is set from the split when planning).
        labels: the label producer, or None for frame rows only.
    """

    source: SourceSelection
    run: RunOptions
    frames: FrameOptions = field(default_factory=lambda: FrameOptions(split=""))
    labels: LabelProducer | None = None

    @classmethod
    def from_options(
        cls,
        *,
        source: str,
        root: Path | str,
        out: Path | str,
        split: str | SplitDef = "mini",
        blob_root: Path | str | None = None,
        input_dir: Path | str | None = None,
        logs: list[str] | tuple[str, ...] | None = None,
        sample_interval: int = 10,
        is_test: bool = False,
        filter_instance: bool = False,
        check_blobs: bool = True,
        labels: bool = True,
        label_window_s: float | None = None,
        label_sweep_step: int | None = None,
        label_box_margin_m: float | None = None,
        label_visibility: str | None = None,
        openscene_occupancy: Path | str | None = None,
        overwrite: bool = False,
        workers: int = 1,
        scheduler: str | None = None,
        progress: bool = True,
    ) -> CollectConfig:
        """The composed config of the command line's flat options (names as ``driveengine collect``'s).

        ``labels=False`` collects frame rows only; ``openscene_occupancy`` imports OpenScene v1.0 labels
        instead of generating them; otherwise the ``label_*`` settings override the generator's
        defaults (None keeps one).

        Raises:
            CollectError: a bad label setting, or label settings together with imported labels.
        """
        from driveengine.labels.generator import LabelConfig
        from driveengine.labels.openscene_import import OpenSceneImport

        chosen = {
            "window_s": label_window_s,
            "sweep_step": label_sweep_step,
            "box_margin_m": label_box_margin_m,
            "visibility": label_visibility,
        }
        chosen = {k: v for k, v in chosen.items() if v is not None}
        producer: LabelProducer | None = None
        if openscene_occupancy is not None:
            if chosen:
                raise CollectError(
                    f"--label-* options ({', '.join(sorted(chosen))}) set the label generator; they do not "
                    "apply to labels imported with --openscene-occupancy"
                )
            producer = OpenSceneImport(Path(openscene_occupancy))
        elif labels:
            try:
                producer = LabelConfig(**chosen)
            except (TypeError, ValueError) as exc:
                raise CollectError(
                    f"bad label setting: {exc} (see the --label-* options of `driveengine collect --help`)"
                ) from None
        elif chosen:
            raise CollectError(
                f"--label-* options ({', '.join(sorted(chosen))}) need labels; drop --no-labels"
            )
        return cls(
            source=SourceSelection(
                name=source,
                root=Path(root),
                split=split,
                blob_root=None if blob_root is None else Path(blob_root),
                input_dir=None if input_dir is None else Path(input_dir),
                logs=None if logs is None else tuple(logs),
            ),
            run=RunOptions(
                out=Path(out), workers=workers, scheduler=scheduler, overwrite=overwrite, progress=progress
            ),
            frames=FrameOptions(
                split="",
                sample_interval=sample_interval,
                is_test=is_test,
                filter_instance=filter_instance,
                check_blobs=check_blobs,
            ),
            labels=producer,
        )
