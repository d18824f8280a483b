"""A small collected nuPlan split with labels and real camera images, shared by the picture, report,
inspect and xarray tests: a test module defines its fixture as ::

    @pytest.fixture
    def collected(tmp_path_factory) -> Collected:
        return collected_split(tmp_path_factory)

and the split is made once per test session (tests must not change it: copy it first)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Collected:
    """``root/in`` (synthetic nuPlan inputs, ``sensor_blobs`` included) collected into ``split_dir``."""

    root: Path
    split_dir: Path
    blob_root: Path
    log: str
    db_path: Path


_MADE: dict[str, Collected] = {}


def collected_split(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    """One synthetic log of 3 s (6 key frames), 256-ray sweeps and 96 x 54 images, collected with labels
    (made on the first call of the session)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _MADE:
        _MADE[key] = _make(tmp_path_factory)
    return _MADE[key]


def _make(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.synth import synthesize

    root = tmp_path_factory.mktemp("collected")
    (log,) = synthesize(root / "in", logs=1, seconds=3.0, seed=4, points=256, image_size=(96, 54))
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=root / "in", out=root / "out", progress=False),
        echo=lambda _: None,
    )
    assert summary.ok, summary.format()
    return Collected(root, root / "out" / "mini", root / "in" / "sensor_blobs", log.log_name, log.db_path)
