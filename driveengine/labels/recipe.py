"""Label recipes: every setting of the label generator as one named, recorded, reusable thing.

A recipe *is* a :class:`~driveengine.labels.generator.LabelConfig` (grid, window, sweeps, box margins,
visibility, whole-track objects, camera mask) with a name. It is recorded with the data twice: as each
log's Zarr ``generator`` attribute and in the manifest entry's ``labels.recipe``; it is part of the
config hash, so two datasets whose manifests show the same recipe dict were labelled the same way, and
``collect --recipe-from OTHER/SPLIT`` rebuilds another dataset's labels exactly (same generator version).

Shipped recipes (:data:`RECIPES`):

============== ==================================================================================
name           what
============== ==================================================================================
openscene      OpenScene's grid ([-50, -50, -4, 50, 50, 4] m, 0.5 m); +-10 s of 2 Hz sweeps; whole-track
               objects with priority over the background in the voxels they claim (``object_priority``);
               static points merged per sweep into quarter-voxel world cells (``static_cell_voxels: 0.25``);
               mask_lidar of the key frame's sweep; mask_camera. nuPlan's default.
occ3d          Occ3D-nuScenes' grid ([-40, -40, -1, 40, 40, 5.4] m, 0.4 m), otherwise as openscene.
               nuScenes' default.
fine           0.25 m voxels over [-50, -50, -5, 50, 50, 3] m (400 x 400 x 32), otherwise as openscene.
openscene-v1   DriveEngine's labels before whole-track objects and mask_camera (generator version 1),
               bit for bit: window-only objects, plain majority vote, no camera mask.
============== ==================================================================================

The shipped recipes aggregate the key frames' sweeps (2 Hz). Where the source has more (nuPlan: every
20 Hz sweep), ``sweep_step`` buys static quality with time: static IoU against the synthetic truth on
the test frame 0.81 at 2 Hz, 0.92 at 4 Hz (``sweep_step: 5``), 0.98 at 10 Hz (``sweep_step: 2``), at
34.7, 25.1 and 15.1 frames/s on the bench's log; the voxels missed at 2 Hz are mostly ground voxels far
away that rays graze (docs/ARCHITECTURE.md, Labels).

A **custom recipe** is a YAML file of settings, optionally on top of a shipped one::

    base: openscene          # optional: start from a shipped recipe (default: the source's)
    name: my-recipe          # recorded with the data (default: the file's stem)
    grid: -40,-40,-2,40,40,6:0.2   # a preset name, x0,y0,z0,x1,y1,z1:voxel, or a mapping as recorded
    window_s: 5
    sweep_step: 5
    camera_mask: false

Unknown keys, wrong types and bad values are refused with one line naming the file and the key. The
file is read with ``yaml.safe_load`` (no Python objects), at most :data:`MAX_RECIPE_BYTES`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from driveengine.errors import DriveEngineError
from driveengine.labels.generator import LabelConfig
from driveengine.schemas.grid import GRID_PRESETS, grid_name

#: The shipped recipes by name.
RECIPES: dict[str, LabelConfig] = {
    name: LabelConfig(
        grid=GRID_PRESETS[grid],
        whole_track=True,
        object_priority=True,
        camera_mask=True,
        static_cell_voxels=0.25,
        recipe=name,
    )
    for name, grid in (("openscene", "openscene"), ("occ3d", "occ3d"), ("fine", "fine"))
}
RECIPES["openscene-v1"] = LabelConfig(
    grid=GRID_PRESETS["openscene"], whole_track=False, camera_mask=False, recipe="openscene-v1"
)

#: A recipe file larger than this is refused (a recipe is a few lines).
MAX_RECIPE_BYTES = 64 * 1024


class RecipeError(DriveEngineError):
    """A recipe cannot be used: unknown name, unreadable or invalid file, a dataset without one."""


def default_recipe_name(label_grid: Any) -> str:
    """The shipped recipe of a source whose default label grid is ``label_grid`` (occ3d or openscene)."""
    return "occ3d" if label_grid == GRID_PRESETS["occ3d"] else "openscene"


def load_recipe(name_or_path: str | Path, default_base: str = "openscene") -> LabelConfig:
    """A shipped recipe by name, or a YAML recipe file (see the module doc).

    Args:
        name_or_path: a name of :data:`RECIPES` or a path to a ``.yaml``/``.yml`` file.
        default_base: the shipped recipe a file without ``base`` starts from.

    Raises:
        RecipeError: unknown name, missing/unreadable/oversized file, invalid YAML or settings.
    """
    text = str(name_or_path)
    if text in RECIPES:
        return RECIPES[text]
    path = Path(text)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise RecipeError(f"--recipe {text!r}: not a shipped recipe ({', '.join(RECIPES)}) nor a .yaml file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size} bytes; a recipe file is at most {MAX_RECIPE_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    import yaml

    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"{path}: not a valid YAML recipe ({reason})") from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe is a mapping of settings (key: value), got {type(data).__name__}"
        )
    data = dict(data)
    base_name = data.pop("base", default_base)
    if base_name not in RECIPES:
        raise RecipeError(f"{path}: base {base_name!r} is not a shipped recipe ({', '.join(RECIPES)})")
    name = data.pop("name", path.stem)
    if not isinstance(name, str):
        raise RecipeError(f"{path}: name must be a string, got {name!r}")
    for key in ("generator", "generator_version", "format_version", "recipe"):
        if key in data:
            raise RecipeError(f"{path}: {key!r} is recorded by DriveEngine, not set in a recipe; remove it")
    base = RECIPES[base_name].to_dict()
    try:
        return LabelConfig.from_dict({**base, **data, "recipe": name}, where=str(path))
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def recipe_from_split(split_dir: str | Path) -> LabelConfig:
    """The recipe recorded with a collected split (its first labelled log's ``generator`` attribute,
    checked against every other log's manifest record).

    Raises:
        RecipeError: no labels, labels imported rather than generated, logs made with different recipes,
            or a record this version cannot rebuild.
    """
    from driveengine.store.dataset import open_split

    split = open_split(split_dir)
    records: dict[str, dict[str, Any]] = {}
    for log in split.logs:
        if not log.has_labels:
            continue
        entry = log.entry.labels or {}
        recorded = entry.get("recipe") if isinstance(entry, dict) else None
        if recorded is None:
            recorded = log.labels().attrs.get("generator")
        if isinstance(recorded, dict):
            records[log.name] = recorded
    if not records:
        raise RecipeError(f"{split_dir}: no log with generated labels; nothing to take a recipe from")
    first_log, first = next(iter(records.items()))
    for name, rec in records.items():
        if rec != first:
            raise RecipeError(
                f"{split_dir}: logs {first_log} and {name} were labelled with different recipes; "
                "rebuild them one log at a time (--logs)"
            )
    try:
        return LabelConfig.from_dict(first, where=f"{split_dir} (log {first_log})")
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def recipe_settings(config: LabelConfig) -> dict[str, Any]:
    """The settings of ``config`` as a recipe file holds them (grid by preset name or range)."""
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d["grid"] = grid_name(config.grid)
    name = d.pop("recipe")
    return {"name": name, **d}


def recipe_yaml(config: LabelConfig) -> str:
    """``config`` as a self-contained recipe file (loads back with :func:`load_recipe` to ``config``)."""
    import yaml

    return yaml.safe_dump(recipe_settings(config), sort_keys=False)


def same_recipe(a: LabelConfig, b: LabelConfig) -> bool:
    """Whether two recipes make the same labels (equal settings; names aside)."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("recipe"), db.pop("recipe")
    return json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)
