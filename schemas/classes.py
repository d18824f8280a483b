"""Class tables of the occupancy labels: each dataset's own, and the unified table they all map onto.

A :class:`ClassTable` is a property of a dataset, recorded in its manifest and in every
``occ/<log>.zarr`` (group attribute ``class_table``): the label id of each class, which id is free
space, which ids are objects (foreground), the class of points in no box (background), and for each id
its class in the :data:`UNIFIED` table, so that labels of several datasets can be trained on together.

Tables shipped here (:data:`CLASS_TABLES`, by name):

* ``openscene``: OpenScene's ids for nuPlan data (0 vehicle, 4 czone_sign, 5 bicycle, 6 generic_object,
  7 pedestrian, 8 traffic_cone, 9 barrier, 10 background, 16 free; 1-3 and 11-15 unused but kept, so that
  ids, the 16-id metrics and OpenScene's files agree);
* ``occ3d-nuscenes``: Occ3D-nuScenes' ids (0 others ... 16 vegetation, 17 free).

Which dataset category becomes which class id is the source's business (e.g.
``driveengine.sources.nuplan.constants.CATEGORY_TO_CLASS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: The unified class table: every class any dataset's table maps onto, in a fixed order (id = index).
UNIFIED: tuple[str, ...] = (
    "vehicle", "truck", "bus", "trailer", "construction_vehicle", "motorcycle", "bicycle", "pedestrian",
    "traffic_cone", "barrier", "czone_sign", "generic_object", "driveable_surface", "other_flat",
    "sidewalk", "terrain", "manmade", "vegetation", "background", "others", "free",
)  # fmt: skip


@dataclass(frozen=True)
class ClassTable:
    """The label classes of a dataset.

    Attributes:
        name: the table's name (``openscene``, ``occ3d-nuscenes``, ...).
        names: class name per id, ``0 .. free`` (free last).
        free: id of free (empty) voxels; ids ``0 .. free - 1`` are the evaluated classes.
        foreground: ids of object classes (OpenScene's foreground metrics use these).
        background: id given to points in no box that have no class of their own (e.g. without
            nuScenes-lidarseg labels), or None when every point always has a class of its own.
        unified: per id, the name of its class in :data:`UNIFIED`.
    """

    name: str
    names: tuple[str, ...]
    free: int
    foreground: tuple[int, ...]
    background: int | None
    unified: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.free != n - 1:
            raise ValueError(f"class table {self.name}: free must be the last id ({n - 1}), got {self.free}")
        if len(self.unified) != n or any(u not in UNIFIED for u in self.unified):
            raise ValueError(f"class table {self.name}: unified needs one UNIFIED name per id")
        ids = [*self.foreground, *([] if self.background is None else [self.background])]
        if any(not 0 <= i < self.free for i in ids):
            raise ValueError(
                f"class table {self.name}: foreground/background ids must be in 0..{self.free - 1}"
            )

    @property
    def num_classes(self) -> int:
        """Evaluated classes (ids ``0 .. free - 1``)."""
        return self.free

    def id_of(self, name: str) -> int:
        """The id of class ``name``."""
        return self.names.index(name)

    def to_unified(self) -> tuple[int, ...]:
        """Per id of this table, its id in :data:`UNIFIED` (a lookup table for ``semantics``)."""
        return tuple(UNIFIED.index(u) for u in self.unified)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (manifest ``dataset.classes``, Zarr attribute ``class_table``)."""
        return {
            "name": self.name,
            "names": list(self.names),
            "free": self.free,
            "foreground": list(self.foreground),
            "background": self.background,
            "unified": list(self.unified),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassTable:
        """Inverse of :meth:`to_dict`. Raises ``ValueError``/``KeyError``/``TypeError`` on a malformed one."""
        return cls(
            name=str(data["name"]),
            names=tuple(str(n) for n in data["names"]),
            free=int(data["free"]),
            foreground=tuple(int(i) for i in data["foreground"]),
            background=None if data.get("background") is None else int(data["background"]),
            unified=tuple(str(u) for u in data["unified"]),
        )

    def id_names(self) -> dict[str, str]:
        """``{"0": name, ...}``: the id -> name map of format version 1 manifests and Zarr attributes."""
        return {str(i): n for i, n in enumerate(self.names)}


def _table(
    name: str,
    names: Sequence[str],
    foreground: Sequence[int],
    background: int | None,
    unified: Mapping[str, str],
) -> ClassTable:
    return ClassTable(
        name=name,
        names=tuple(names),
        free=len(names) - 1,
        foreground=tuple(foreground),
        background=background,
        unified=tuple(unified.get(n, n) for n in names),
    )


#: OpenScene's class table (nuPlan data): ids as in OpenScene's label files and metrics.
OPENSCENE_CLASSES: ClassTable = _table(
    "openscene",
    ("vehicle", "unused_1", "unused_2", "unused_3", "czone_sign", "bicycle", "generic_object", "pedestrian",
     "traffic_cone", "barrier", "background", "unused_11", "unused_12", "unused_13", "unused_14",
     "unused_15", "free"),
    foreground=range(10),
    background=10,
    unified={f"unused_{i}": "others" for i in (1, 2, 3, 11, 12, 13, 14, 15)},
)  # fmt: skip

#: Occ3D-nuScenes' class table (nuScenes-lidarseg's 16 classes, ``others`` and free). ``others`` (0,
#: lidarseg's ``ignore``) is also the background: the class of points in no box when a sweep has no
#: nuScenes-lidarseg labels (points with labels keep their own class).
OCC3D_NUSCENES_CLASSES: ClassTable = _table(
    "occ3d-nuscenes",
    ("others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
     "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
     "manmade", "vegetation", "free"),
    foreground=range(11),
    background=0,
    unified={"car": "vehicle"},
)  # fmt: skip

#: Every shipped class table, by name.
CLASS_TABLES: dict[str, ClassTable] = {t.name: t for t in (OPENSCENE_CLASSES, OCC3D_NUSCENES_CLASSES)}


def class_table_from_record(data: object) -> ClassTable:
    """The class table a manifest or Zarr group records: a :meth:`ClassTable.to_dict` form, or the
    ``{"0": "vehicle", ...}`` id map of format version 1 (which only ever held OpenScene's table).

    Raises:
        ValueError: the record is neither.
    """
    if isinstance(data, Mapping) and "names" in data:
        try:
            return ClassTable.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed class table ({exc})") from None
    if isinstance(data, Mapping) and dict(data) == OPENSCENE_CLASSES.id_names():
        return OPENSCENE_CLASSES
    raise ValueError("not a class table (expected names/free/foreground/background/unified)")


# -- OpenScene's table as constants (the default label table; format version 1 had only this one) ------

#: Class id -> name of OpenScene's table.
CLASS_NAMES: dict[int, str] = dict(enumerate(OPENSCENE_CLASSES.names))
#: Number of evaluated (non-free) class ids of OpenScene's table, 0..15.
NUM_CLASSES = OPENSCENE_CLASSES.num_classes
#: Class id of free voxels in OpenScene's table.
FREE = OPENSCENE_CLASSES.free
#: Class id of everything that is in no box (ground, buildings, poles, ...) in OpenScene's table.
BACKGROUND = 10
#: Classes below this id are foreground objects in OpenScene's table.
FOREGROUND_BELOW = 10
