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

import os
from dataclasses import dataclass, field
from pathlib import Path

from driveengine.collect.frames import FrameOptions
from driveengine.errors import DriveEngineError
from driveengine.labels.base import LabelProducer
from driveengine.splits import SplitDef
from driveengine.store.manifest import is_remote, local_path
from driveengine.store.occ import OccStorage

#: The command-line option of each label setting ``from_options`` takes (for messages).
_OPTION_OF = {
    "window_s": "--label-window-s",
    "sweep_step": "--label-sweep-step",
    "box_margin_m": "--label-box-margin-m",
    "visibility": "--label-visibility",
    "whole_track": "--label-whole-track",
    "camera_mask": "--label-camera-mask",
    "grid": "--grid",
}


class CollectError(DriveEngineError):
    """``collect`` cannot start: bad input folder, unknown logs, bad scheduler, bad settings, ..."""


def output_root(out: str | os.PathLike[str]) -> Path | str:
    """``--out`` as :class:`RunOptions` keeps it: a URL (``s3://bucket/prefix``, any fsspec URL but
    ``file://``) as its text, a local folder (or ``file://`` URL) as a :class:`~pathlib.Path`."""
    text = os.fspath(out)
    return text if is_remote(text) else local_path(text)


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
        out: output root, a local folder or an fsspec URL kept as text (``s3://bucket/prefix``: a
            :class:`~pathlib.Path` would fold its ``//``); the split goes to ``out/<split name>/``.
        workers: local worker processes (1 = in this process).
        scheduler: ``local:N`` or ``tcp://host:port`` for Dask; None for the local pool.
        overwrite: redo logs even when their manifest entry matches.
        progress: show progress.
        storage: how label groups are stored (shards, compression).
    """

    out: Path | str
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
        label_whole_track: bool | None = None,
        label_camera_mask: bool | None = None,
        grid: str | None = None,
        recipe: str | None = None,
        recipe_from: Path | str | None = None,
        openscene_occupancy: Path | str | None = None,
        occ3d_labels: Path | str | None = None,
        overwrite: bool = False,
        workers: int = 1,
        scheduler: str | None = None,
        progress: bool = True,
    ) -> CollectConfig:
        """The composed config of the command line's flat options (names as ``driveengine collect``'s).

        ``labels=False`` collects frame rows only; ``openscene_occupancy`` imports OpenScene v1.0 labels
        and ``occ3d_labels`` Occ3D-nuScenes labels instead of generating them; otherwise the labels
        follow a recipe (:mod:`driveengine.labels.recipe`): ``recipe`` (a shipped name or a YAML file),
        or the one recorded with the split ``recipe_from``, or the source's default (``occ3d`` for a
        source whose labels default to Occ3D's grid, else ``openscene``); ``grid`` (a preset name or
        ``x0,y0,z0,x1,y1,z1:voxel``) and the ``label_*`` settings override it (None keeps the recipe's;
        a recipe changed so is recorded as ``custom``).

        Raises:
            CollectError: a bad label setting, or label settings together with imported labels.
        """
        from driveengine.labels.occ3d_import import Occ3DImport
        from driveengine.labels.openscene_import import OpenSceneImport
        from driveengine.sources import UnknownSourceError, get_source, source_label_grid

        importers = {"--openscene-occupancy": OpenSceneImport, "--occ3d-labels": Occ3DImport}

        chosen: dict[str, object] = {
            "window_s": label_window_s,
            "sweep_step": label_sweep_step,
            "box_margin_m": label_box_margin_m,
            "visibility": label_visibility,
            "whole_track": label_whole_track,
            "camera_mask": label_camera_mask,
        }
        chosen = {k: v for k, v in chosen.items() if v is not None}
        if grid is not None:
            from driveengine.schemas.grid import parse_grid

            try:
                chosen["grid"] = parse_grid(grid)
            except ValueError as exc:
                raise CollectError(f"--grid: {exc}") from None
        recipe_options = {"--recipe": recipe, "--recipe-from": recipe_from}
        recipe_options = {k: v for k, v in recipe_options.items() if v is not None}
        if len(recipe_options) > 1:
            raise CollectError("--recipe and --recipe-from both choose the label recipe; choose one")
        producer: LabelProducer | None = None
        imports = {"--openscene-occupancy": openscene_occupancy, "--occ3d-labels": occ3d_labels}
        imports = {option: folder for option, folder in imports.items() if folder is not None}
        if len(imports) > 1:
            raise CollectError(f"{' and '.join(imports)} both import labels; choose one")
        if imports:
            option, folder = next(iter(imports.items()))
            if chosen or recipe_options:
                what = sorted([*recipe_options, *(_OPTION_OF[k] for k in chosen)])
                raise CollectError(
                    f"{', '.join(what)} set the label generator; they do not apply to labels imported with "
                    f"{option}"
                )
            producer = importers[option](Path(folder))
        elif labels:
            from dataclasses import replace

            from driveengine.labels.recipe import (
                RECIPES,
                default_recipe_name,
                load_recipe,
                recipe_from_split,
            )

            try:
                base = default_recipe_name(source_label_grid(get_source(source)))
            except UnknownSourceError:
                base = "openscene"  # planning names the unknown source
            if recipe is not None:
                config = load_recipe(recipe, default_base=base)
            elif recipe_from is not None:
                config = recipe_from_split(recipe_from)
            else:
                config = RECIPES[base]
            changed = {k: v for k, v in chosen.items() if getattr(config, k) != v}
            try:
                producer = replace(config, **changed, **({"recipe": "custom"} if changed else {}))
            except (TypeError, ValueError) as exc:
                raise CollectError(
                    f"bad label setting: {exc} (see the --label-* options of `driveengine collect --help`)"
                ) from None
        elif chosen or recipe_options:
            what = sorted([*recipe_options, *(_OPTION_OF[k] for k in chosen)])
            raise CollectError(f"{', '.join(what)} need labels; drop --no-labels")
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
                out=output_root(out),
                workers=workers,
                scheduler=scheduler,
                overwrite=overwrite,
                progress=progress,
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
