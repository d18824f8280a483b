"""Readers of inputs, one package per dataset behind the :class:`~driveengine.sources.base.Source`
protocol, found by name in a registry.

Each source turns its dataset's logs into the same columnar :class:`~driveengine.sources.logdata.LogData`,
so everything after it is shared. Shipped sources: ``nuplan`` (SQLite logs, :mod:`.nuplan`),
``openscene`` (OpenScene v1.1 metadata pickles, :mod:`.openscene`) and ``nuscenes`` (nuScenes v1.0 JSON
tables, :mod:`.nuscenes`).

**Adding a dataset** is one package here with a class implementing ``Source`` and one
:func:`register_source` call (a built-in one below, or from the user's code before ``collect`` runs):
the command line, collect, the loader and the pictures then take it by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from driveengine.errors import DriveEngineError
from driveengine.schemas.grid import GRID, VoxelGrid
from driveengine.sources.base import InputLog, Source
from driveengine.sources.logdata import LogData

#: name -> factory, or "module:Class" of a built-in source (imported on first use: cheap to list).
_REGISTRY: dict[str, Callable[[], Source] | str] = {
    "nuplan": "driveengine.sources.nuplan:NuplanSource",
    "openscene": "driveengine.sources.openscene:OpenSceneSource",
    "nuscenes": "driveengine.sources.nuscenes:NuScenesSource",
}
_INSTANCES: dict[str, Source] = {}


class UnknownSourceError(DriveEngineError):
    """A source name that is not registered."""


def register_source(name: str, factory: Callable[[], Source]) -> None:
    """Register a source under ``name`` (``factory()`` builds it; called once, on first use).

    Raises:
        ValueError: ``name`` is registered already.
    """
    if name in _REGISTRY:
        raise ValueError(f"source {name!r} is registered already")
    _REGISTRY[name] = factory


def unregister_source(name: str) -> None:
    """Remove a registered source (tests)."""
    _REGISTRY.pop(name, None)
    _INSTANCES.pop(name, None)


def source_names() -> list[str]:
    """Registered source names, sorted."""
    return sorted(_REGISTRY)


def source_label_grid(source: Source) -> VoxelGrid:
    """The grid a source's labels use unless the user chooses one: its ``label_grid`` attribute when it
    has one (an optional member of a source, e.g. nuScenes: Occ3D-nuScenes' grid), else OpenScene's
    (:data:`~driveengine.schemas.grid.GRID`)."""
    grid = getattr(source, "label_grid", None)
    return grid if isinstance(grid, VoxelGrid) else GRID


def get_source(name: str) -> Source:
    """The source registered as ``name``.

    Raises:
        UnknownSourceError: no source has that name (the message lists those that exist).
    """
    if name not in _INSTANCES:
        entry = _REGISTRY.get(name)
        if entry is None:
            raise UnknownSourceError(f"unknown source {name!r}; use one of {', '.join(source_names())}")
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
        source = entry()
        if not isinstance(source, Source):
            raise TypeError(f"source {name!r} does not implement the Source protocol")
        _INSTANCES[name] = source
    return _INSTANCES[name]


__all__ = [
    "InputLog",
    "LogData",
    "Source",
    "UnknownSourceError",
    "get_source",
    "register_source",
    "source_label_grid",
    "source_names",
]
