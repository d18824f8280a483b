"""Colours of the pictures: one RGB per class of the unified class table, so that every dataset's labels
(any :class:`~driveengine.schemas.classes.ClassTable`) and boxes are painted alike.

Box categories are free text per dataset (nuPlan ``pedestrian``, nuScenes ``human.pedestrian.adult``);
:func:`category_unified` finds their unified class by name only (for colours; the labels never depend
on it): the category itself, else its dot-separated parts from the last, compared without underscores
(``trafficcone`` is ``traffic_cone``) or as a prefix (``construction`` is ``construction_vehicle``),
else ``generic_object``.
"""

from __future__ import annotations

import numpy as np

from driveengine.schemas.classes import UNIFIED, ClassTable

#: RGB (0-255) of each class of :data:`~driveengine.schemas.classes.UNIFIED`.
UNIFIED_COLORS: dict[str, tuple[int, int, int]] = {
    "vehicle": (255, 120, 30),
    "truck": (255, 180, 60),
    "bus": (200, 90, 0),
    "trailer": (255, 210, 120),
    "construction_vehicle": (233, 150, 70),
    "motorcycle": (255, 61, 99),
    "bicycle": (220, 20, 60),
    "pedestrian": (30, 60, 230),
    "traffic_cone": (240, 200, 0),
    "barrier": (0, 150, 140),
    "czone_sign": (230, 0, 230),
    "generic_object": (140, 80, 40),
    "driveable_surface": (0, 207, 191),
    "other_flat": (175, 0, 75),
    "sidewalk": (75, 0, 75),
    "terrain": (112, 180, 60),
    "manmade": (222, 184, 135),
    "vegetation": (0, 175, 0),
    "background": (185, 185, 185),
    "others": (90, 90, 90),
    "free": (255, 255, 255),
}
assert set(UNIFIED_COLORS) == set(UNIFIED), "every unified class needs a colour"

#: Columns no LiDAR ray observed (free and unobserved): a pale blue-grey, never white or a class colour.
UNOBSERVED_RGB: tuple[int, int, int] = (196, 200, 226)


def class_colors(classes: ClassTable) -> np.ndarray:
    """(n, 3) uint8 RGB of each id of ``classes`` (free: white), by its unified class."""
    return np.array([UNIFIED_COLORS[u] for u in classes.unified], dtype=np.uint8)


def category_unified(category: str) -> str:
    """The unified class a box category's name stands for (see the module doc)."""
    name = str(category).strip().lower()
    if name in UNIFIED_COLORS:
        return name
    squeezed = {u.replace("_", ""): u for u in UNIFIED}
    for part in reversed(name.replace("-", "_").split(".")):
        if part in UNIFIED_COLORS:
            return part
        if part.replace("_", "") in squeezed:
            return squeezed[part.replace("_", "")]
        prefixed = [u for u in UNIFIED if part and u.startswith(part + "_")]
        if prefixed:
            return prefixed[0]
    if name.startswith("human"):
        return "pedestrian"
    return "generic_object"


def category_colors(categories: list[str] | tuple[str, ...]) -> np.ndarray:
    """(N, 3) float RGB in 0..1 of box categories (:func:`category_unified`)."""
    rgb = np.array([UNIFIED_COLORS[category_unified(c)] for c in categories], dtype=np.float64)
    return rgb.reshape(-1, 3) / 255.0
