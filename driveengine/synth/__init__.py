"""A synthetic nuPlan world with exact, documented geometry: the demo data and the test oracle.

:func:`synthesize` writes real nuPlan-schema ``.db`` logs, ``.pcd`` sweeps and ``.jpg`` images;
:func:`world_for_log` rebuilds a log's :class:`World` (ego poses, boxes, ground-truth occupancy and
flow) from ``(seed, log_index)`` without writing anything. Frames and conventions are described in
:mod:`driveengine.synth.world`. :func:`write_nuscenes` writes the same worlds as a nuScenes release
(:mod:`driveengine.synth.nuscenes`).
"""

from driveengine.synth.api import DEFAULT_RAYS, KEY_FRAME_EVERY, Faults, SynthLog, synthesize, world_for_log
from driveengine.synth.nuplan_db import SCHEMA, SynthError
from driveengine.synth.nuscenes import (
    NuScenesFaults,
    SynthNuScenesScene,
    format_nuscenes_summary,
    write_nuscenes,
    write_nuscenes_metadata,
)
from driveengine.synth.world import Boxes, Camera, EgoState, World, build_world

__all__ = [
    "DEFAULT_RAYS",
    "KEY_FRAME_EVERY",
    "SCHEMA",
    "Boxes",
    "Camera",
    "EgoState",
    "Faults",
    "NuScenesFaults",
    "SynthError",
    "SynthLog",
    "SynthNuScenesScene",
    "World",
    "build_world",
    "format_nuscenes_summary",
    "synthesize",
    "world_for_log",
    "write_nuscenes",
    "write_nuscenes_metadata",
]
