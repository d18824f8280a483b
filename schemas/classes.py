"""Class table of the occupancy labels and fixed sensor orders (OpenScene's ids)."""

from __future__ import annotations

#: Occupancy class id -> name. Ids 1-3 and 11-15 are unused by OpenScene but keep their slots so that
#: ids, the 16-class metrics and OpenScene's files agree. 16 is FREE (empty space).
CLASS_NAMES: dict[int, str] = {
    0: "vehicle",
    1: "unused_1",
    2: "unused_2",
    3: "unused_3",
    4: "czone_sign",
    5: "bicycle",
    6: "generic_object",
    7: "pedestrian",
    8: "traffic_cone",
    9: "barrier",
    10: "background",
    11: "unused_11",
    12: "unused_12",
    13: "unused_13",
    14: "unused_14",
    15: "unused_15",
    16: "free",
}

#: Number of evaluated (non-free) class ids, 0..15.
NUM_CLASSES = 16
#: Class id of free voxels in the dense grids.
FREE = 16
#: Class id of everything that is in no box (ground, buildings, poles, ...).
BACKGROUND = 10
#: Classes below this id are foreground objects.
FOREGROUND_BELOW = 10

#: nuPlan ``category.name`` -> occupancy class id.
CATEGORY_TO_CLASS: dict[str, int] = {
    "vehicle": 0,
    "czone_sign": 4,
    "bicycle": 5,
    "generic_object": 6,
    "pedestrian": 7,
    "traffic_cone": 8,
    "barrier": 9,
}

#: nuPlan's categories in a fixed order (index = category index used in columnar arrays).
CATEGORIES: tuple[str, ...] = (
    "vehicle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
    "barrier",
    "czone_sign",
    "generic_object",
)

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

#: ``traffic_light_status.status`` -> code.
TRAFFIC_LIGHT_CODES: dict[str, int] = {"green": 0, "yellow": 1, "red": 2}
TRAFFIC_LIGHT_UNKNOWN = 3
