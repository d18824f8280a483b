"""nuPlan's fixed names: sensor channels, box categories, traffic-light codes, and how its categories map
onto OpenScene's class table (reference §1)."""

from __future__ import annotations

from driveengine.schemas.classes import OPENSCENE_CLASSES

#: The eight nuPlan cameras in the fixed order used everywhere (OpenScene's ``cams`` dict order varied
#: with SQL row order; DriveEngine always uses this one).
CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_F0",
    "CAM_L0",
    "CAM_R0",
    "CAM_L1",
    "CAM_R1",
    "CAM_L2",
    "CAM_R2",
    "CAM_B0",
)

#: The merged LiDAR channel of nuPlan.
LIDAR_CHANNEL = "MergedPointCloud"

#: nuPlan's categories in a fixed order (index = category index used in columnar arrays).
CATEGORIES: tuple[str, ...] = (
    "vehicle", "bicycle", "pedestrian", "traffic_cone", "barrier", "czone_sign", "generic_object",
)  # fmt: skip

#: nuPlan ``category.name`` -> occupancy class id of OpenScene's table (the same names).
CATEGORY_TO_CLASS: dict[str, int] = {name: OPENSCENE_CLASSES.id_of(name) for name in CATEGORIES}
#: The class id of each of :data:`CATEGORIES`, in their order (``LogData.category_class``).
CATEGORY_CLASS: tuple[int, ...] = tuple(CATEGORY_TO_CLASS[name] for name in CATEGORIES)

#: ``traffic_light_status.status`` -> code.
TRAFFIC_LIGHT_CODES: dict[str, int] = {"green": 0, "yellow": 1, "red": 2}
TRAFFIC_LIGHT_UNKNOWN = 3
