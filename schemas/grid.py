"""The occupancy voxel grid (DESIGN §3).

Ego frame of the key frame (x forward, y left, z up, origin at the rear axle), range
``[-50, -50, -4, 50, 50, 4]`` m, 0.5 m voxels, indexed ``[x, y, z]``; OpenScene's flat index is
``x + 200 * y + 40000 * z``. The range is half-open: a point exactly at a maximum is outside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class VoxelGrid:
    """An axis-aligned voxel grid in the ego frame.

    Attributes:
        range_min_m: (x, y, z) lower corner, metres, inclusive.
        range_max_m: (x, y, z) upper corner, metres, exclusive.
        voxel_size_m: edge length of a cubic voxel, metres.
    """

    range_min_m: tuple[float, float, float] = (-50.0, -50.0, -4.0)
    range_max_m: tuple[float, float, float] = (50.0, 50.0, 4.0)
    voxel_size_m: float = 0.5

    @property
    def shape(self) -> tuple[int, int, int]:
        """Number of voxels along x, y, z."""
        return tuple(  # type: ignore[return-value]
            round((hi - lo) / self.voxel_size_m)
            for lo, hi in zip(self.range_min_m, self.range_max_m, strict=True)
        )

    @property
    def num_voxels(self) -> int:
        nx, ny, nz = self.shape
        return nx * ny * nz

    def to_dict(self) -> dict:
        """JSON-ready form, stored in manifests and Zarr attributes."""
        return {**asdict(self), "shape": list(self.shape), "index_order": "xyz", "flat": "x + nx*y + nx*ny*z"}

    def __post_init__(self) -> None:
        lo, hi, size = self.range_min_m, self.range_max_m, self.voxel_size_m
        if len(lo) != 3 or len(hi) != 3 or not np.isfinite([*lo, *hi, size]).all() or not size > 0:
            raise ValueError(
                f"range_min_m/range_max_m need 3 finite numbers and voxel_size_m > 0, got {self}"
            )
        if any(b <= a for a, b in zip(lo, hi, strict=True)):
            raise ValueError(f"range_max_m must exceed range_min_m on every axis, got {self}")
        counts = [(b - a) / size for a, b in zip(lo, hi, strict=True)]
        if any(abs(c - round(c)) > 1e-6 for c in counts):
            raise ValueError(f"the range must be a whole number of voxels on every axis, got {self}")

    @classmethod
    def from_dict(cls, d: dict) -> VoxelGrid:
        """Inverse of :meth:`to_dict`. Raises ``ValueError`` (or ``KeyError``/``TypeError``) on a bad one."""
        return cls(
            tuple(float(v) for v in d["range_min_m"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["range_max_m"]),  # type: ignore[arg-type]
            float(d["voxel_size_m"]),
        )

    def describe(self) -> str:
        """One line: range, voxel size and shape, e.g. ``[-50, -50, -4, 50, 50, 4] m, 0.5 m voxels (200 x 200 x 16)``."""
        corners = ", ".join(f"{v:g}" for v in (*self.range_min_m, *self.range_max_m))
        return f"[{corners}] m, {self.voxel_size_m:g} m voxels ({' x '.join(map(str, self.shape))})"

    def voxel_centres(self) -> np.ndarray:
        """(nx, ny, nz, 3) float64 voxel centre coordinates, metres, ego frame."""
        axes = [
            lo + (np.arange(n) + 0.5) * self.voxel_size_m
            for lo, n in zip(self.range_min_m, self.shape, strict=True)
        ]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    def flat_index(self, ijk: np.ndarray) -> np.ndarray:
        """OpenScene flat index ``x + nx*y + nx*ny*z`` of (N, 3) integer voxel indices."""
        nx, ny, _ = self.shape
        ijk = np.asarray(ijk, dtype=np.int64)
        return ijk[..., 0] + nx * ijk[..., 1] + nx * ny * ijk[..., 2]

    def unflatten_index(self, flat: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices of OpenScene flat indices."""
        nx, ny, _ = self.shape
        flat = np.asarray(flat, dtype=np.int64)
        return np.stack([flat % nx, (flat // nx) % ny, flat // (nx * ny)], axis=-1)


#: The grid of format version 1.
GRID = VoxelGrid()

#: Named grids (``collect --grid NAME``): OpenScene's (the default), Occ3D-nuScenes' and a fine one.
GRID_PRESETS: dict[str, VoxelGrid] = {
    "openscene": GRID,  # [-50, -50, -4, 50, 50, 4] m, 0.5 m (200 x 200 x 16)
    "occ3d": VoxelGrid((-40.0, -40.0, -1.0), (40.0, 40.0, 5.4), 0.4),  # 200 x 200 x 16
    "fine": VoxelGrid((-50.0, -50.0, -5.0), (50.0, 50.0, 3.0), 0.25),  # 400 x 400 x 32
}

#: The most voxels a grid may have (``fine`` has 5.1 M): a label frame holds ~5 bytes per voxel in memory
#: per array, so larger grids would not fit a worker's memory budget.
MAX_GRID_VOXELS = 64_000_000


def parse_grid(text: str) -> VoxelGrid:
    """The grid of a ``--grid`` value: a preset name (:data:`GRID_PRESETS`) or ``x0,y0,z0,x1,y1,z1:voxel``
    (metres; e.g. ``-40,-40,-1,40,40,5.4:0.4``).

    Raises:
        ValueError: one line naming the value and what is wrong (unknown name, not six numbers and a voxel
            size, a range that is not a whole number of voxels, more than :data:`MAX_GRID_VOXELS` voxels).
    """
    name = text.strip()
    if name.lower() in GRID_PRESETS:
        return GRID_PRESETS[name.lower()]
    usage = f"use a preset ({', '.join(GRID_PRESETS)}) or x0,y0,z0,x1,y1,z1:voxel in metres, e.g. -40,-40,-1,40,40,5.4:0.4"
    corners, sep, size = name.partition(":")
    try:
        values = [float(v) for v in corners.split(",")]
        voxel = float(size)
    except ValueError:
        raise ValueError(f"grid {text!r}: not a preset or a range; {usage}") from None
    if not sep or len(values) != 6:
        raise ValueError(f"grid {text!r}: expected six corner coordinates and a voxel size; {usage}")
    try:
        grid = VoxelGrid(tuple(values[:3]), tuple(values[3:]), voxel)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"grid {text!r}: {str(exc).split(', got')[0]}") from None
    if grid.num_voxels > MAX_GRID_VOXELS:
        raise ValueError(
            f"grid {text!r}: {grid.num_voxels} voxels ({' x '.join(map(str, grid.shape))}), more than the "
            f"{MAX_GRID_VOXELS} allowed; use a larger voxel size or a smaller range"
        )
    return grid


def grid_name(grid: VoxelGrid) -> str:
    """The preset name of ``grid``, or its ``x0,y0,z0,x1,y1,z1:voxel`` form (inverse of :func:`parse_grid`)."""
    for name, preset in GRID_PRESETS.items():
        if preset == grid:
            return name
    return ",".join(f"{v:g}" for v in (*grid.range_min_m, *grid.range_max_m)) + f":{grid.voxel_size_m:g}"
