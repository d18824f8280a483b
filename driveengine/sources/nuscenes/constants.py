"""nuScenes' fixed names: sensor channels, the tables read, and how its categories map onto the
Occ3D-nuScenes class table (reference ``nuscenes.md``).

The category map is nuScenes-lidarseg's official 32 -> 16 mapping (the devkit's
``LidarSegEvalClassMapper`` / ``fine2coarse``), whose ``ignore`` class is Occ3D-nuScenes' ``others`` (id
0). Box categories and lidarseg classes use the same map (both are ``category`` rows).
"""

from __future__ import annotations

from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES
from driveengine.schemas.grid import VoxelGrid

#: The six nuScenes cameras, in the fixed order of the frame rows' ``cams``.
CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)

#: The LiDAR whose sweeps are read.
LIDAR_CHANNEL = "LIDAR_TOP"

#: Values per point of a ``.pcd.bin`` sweep: float32 x, y, z, intensity, ring index.
PCD_BIN_FIELDS = 5
PCD_BIN_POINT_BYTES = 4 * PCD_BIN_FIELDS

#: Occ3D-nuScenes' grid: ego frame of the key frame, [-40, -40, -1, 40, 40, 5.4] m, 0.4 m voxels,
#: 200 x 200 x 16 (the nuScenes source's default label grid).
OCC3D_GRID = VoxelGrid((-40.0, -40.0, -1.0), (40.0, 40.0, 5.4), 0.4)

#: The default table folder of each official release, by split folder name.
VERSIONS: tuple[str, ...] = ("v1.0-mini", "v1.0-trainval", "v1.0-test")

#: The tables the reader needs (``lidarseg`` is optional; ``attribute``, ``visibility`` and ``map`` are
#: not read).
REQUIRED_TABLES: tuple[str, ...] = (
    "scene", "log", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sensor", "category",
    "instance", "sample_annotation",
)  # fmt: skip

#: nuScenes category name -> Occ3D-nuScenes class name (nuScenes-lidarseg's 32 -> 16 map; ``ignore`` is
#: ``others``).
CATEGORY_TO_OCC3D: dict[str, str] = {
    "noise": "others",
    "animal": "others",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.personal_mobility": "others",
    "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.stroller": "others",
    "human.pedestrian.wheelchair": "others",
    "movable_object.barrier": "barrier",
    "movable_object.debris": "others",
    "movable_object.pushable_pullable": "others",
    "movable_object.trafficcone": "traffic_cone",
    "static_object.bicycle_rack": "others",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.emergency.ambulance": "others",
    "vehicle.emergency.police": "others",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
    "flat.driveable_surface": "driveable_surface",
    "flat.other": "other_flat",
    "flat.sidewalk": "sidewalk",
    "flat.terrain": "terrain",
    "static.manmade": "manmade",
    "static.other": "others",
    "static.vegetation": "vegetation",
    "vehicle.ego": "others",
}

#: nuScenes category name -> Occ3D-nuScenes class id.
CATEGORY_CLASS: dict[str, int] = {
    name: OCC3D_NUSCENES_CLASSES.id_of(cls) for name, cls in CATEGORY_TO_OCC3D.items()
}

#: The nuScenes(-lidarseg) categories in the devkit's order: the position is the lidarseg class index
#: (``category.index``) of releases whose ``category`` table has no ``index`` field.
LIDARSEG_ORDER: tuple[str, ...] = (
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child",
    "human.pedestrian.construction_worker", "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer", "human.pedestrian.stroller", "human.pedestrian.wheelchair",
    "movable_object.barrier", "movable_object.debris", "movable_object.pushable_pullable",
    "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle", "vehicle.bus.bendy",
    "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
    "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck",
    "flat.driveable_surface", "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade",
    "static.other", "static.vegetation", "vehicle.ego",
)  # fmt: skip

#: ``box_velocity``'s limit on the time between the two annotations of a velocity (s); twice this when
#: both neighbours exist (the devkit's rule).
VELOCITY_MAX_TIME_DIFF_S = 1.5
