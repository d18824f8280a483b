"""PCD reader speed: a ~150k-point nuPlan-layout sweep.

* ``read_pcd`` of a ``DATA binary`` file vs ``np.fromfile`` of the same records with the right dtype
  (the floor: no header parsing, no checks). Goal: ratio <= 1.5.
* ``DATA binary_compressed`` decode (numba LZF, field-major) vs the ``binary`` decode. Goal: <= 8
  (LZF must touch every byte; ``binary`` is one read and a view).
* the numba LZF codec vs zlib level 1 (C) on the same bytes, for scale. Goal: <= 1.
* ``DATA ascii`` decode vs ``binary`` (for information: text is never the fast path).
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import numpy as np

from benchmarks.harness import best_time, report, section
from driveengine.sources.pcd import (
    NUPLAN_PCD_FIELDS,
    lzf_compress,
    lzf_decompress,
    read_pcd,
    read_pcd_header,
    write_pcd,
)

N_POINTS = 150_000


def _nuplan_like_fields(n: int) -> dict[str, np.ndarray]:
    """A sweep shaped like a merged nuPlan cloud: 64 rings of returns around the car, ego frame, metres."""
    rng = np.random.default_rng(0)
    ring = rng.integers(0, 64, n)
    azimuth = rng.uniform(-np.pi, np.pi, n)
    elevation = np.deg2rad(-25.0 + ring * (40.0 / 63.0))
    distance = rng.gamma(2.0, 12.0, n) + 2.0
    xyz = np.stack(
        [
            distance * np.cos(elevation) * np.cos(azimuth),
            distance * np.cos(elevation) * np.sin(azimuth),
            distance * np.sin(elevation) + 1.8,
        ],
        axis=1,
    )
    values = {
        "x": xyz[:, 0],
        "y": xyz[:, 1],
        "z": xyz[:, 2],
        "intensity": rng.integers(0, 256, n),
        "ring": ring,
        "lidar_info": rng.integers(0, 5, n),
    }
    return {name: np.asarray(values[name]).astype(dt) for name, dt in NUPLAN_PCD_FIELDS.items()}


def main() -> None:
    """Print read rates of the three encodings against ``np.fromfile``."""
    section(f"PCD reader, {N_POINTS} points, nuPlan layout (x y z intensity ring lidar_info, float32)")
    fields = _nuplan_like_fields(N_POINTS)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {enc: Path(tmp) / f"sweep_{enc}.pcd" for enc in ("binary", "binary_compressed", "ascii")}
        for enc, path in paths.items():
            write_pcd(path, fields, encoding=enc)
        binary = paths["binary"]
        header = read_pcd_header(binary)
        dtype = header.dtype

        def ours_binary() -> object:
            return read_pcd(binary).xyz

        def baseline_fromfile() -> object:
            records = np.fromfile(binary, dtype=dtype, count=N_POINTS, offset=header.data_offset)
            return np.stack([records["x"], records["y"], records["z"]], axis=1)

        t_ours = best_time(ours_binary, repeat=15)
        t_base = best_time(baseline_fromfile, repeat=15)
        report("read_pcd(binary) + xyz vs np.fromfile + stack", t_ours * 1e3, t_base * 1e3, "ms", "<= 1.5")
        report(
            "  rate: read_pcd(binary) vs np.fromfile",
            N_POINTS / t_ours / 1e6,
            N_POINTS / t_base / 1e6,
            "Mpts/s",
            ">= 0.67",
            higher_is_better=True,
        )

        t_comp = best_time(lambda: read_pcd(paths["binary_compressed"]).xyz, repeat=15)
        report("read_pcd(binary_compressed) vs read_pcd(binary)", t_comp * 1e3, t_ours * 1e3, "ms", "<= 8")
        raw_size = N_POINTS * dtype.itemsize
        comp_size = paths["binary_compressed"].stat().st_size
        report(
            "  file size: binary_compressed vs binary",
            comp_size / 2**20,
            binary.stat().st_size / 2**20,
            "MiB",
        )

        raw = np.concatenate([np.ascontiguousarray(a).view(np.uint8) for a in fields.values()])
        packed = lzf_compress(raw)
        zpacked = zlib.compress(raw.tobytes(), 1)
        t_lzf_dec = best_time(lambda: lzf_decompress(packed, raw_size), repeat=15)
        t_zlib_dec = best_time(lambda: zlib.decompress(zpacked), repeat=15)
        report(
            "  LZF decode (numba) vs zlib level-1 decode (C)", t_lzf_dec * 1e3, t_zlib_dec * 1e3, "ms", "<= 1"
        )
        t_lzf = best_time(lambda: lzf_compress(raw), repeat=5)
        t_zlib = best_time(lambda: zlib.compress(raw.tobytes(), 1), repeat=5)
        report("  LZF encode (numba) vs zlib level-1 encode (C)", t_lzf * 1e3, t_zlib * 1e3, "ms", "<= 1")

        t_ascii = best_time(lambda: read_pcd(paths["ascii"]).xyz, repeat=3)
        report("read_pcd(ascii) vs read_pcd(binary) (information)", t_ascii * 1e3, t_ours * 1e3, "ms")


if __name__ == "__main__":
    main()
