"""Occupancy metrics: one confusion-matrix ``np.bincount`` per batch vs per-class boolean masks.

Baseline: the straightforward SSCMetrics update, three boolean reductions per class and per region
(near/far) over a frame, as written in many occupancy code bases, and its flow EPE (float32 norms, two
speed regions). Ours: :meth:`driveengine.evaluation.metrics.OccupancyMetrics.update` (one bincount over region,
gt, pred; the same float32 flow sums in OpenScene's voxel order).
Also the OpenScene sparse <-> dense conversion of one frame.
"""

from __future__ import annotations

import numpy as np
from driveengine.schemas.classes import FREE
from driveengine.schemas.grid import GRID

from benchmarks.harness import best_time, report, section
from driveengine.evaluation.metrics import OccupancyMetrics
from driveengine.formats.openscene_labels import dense_to_sparse, sparse_to_dense


def _frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    sem = rng.choice(np.array([0, 5, 7, 9, 10], np.uint8), size=GRID.shape)
    sem[rng.random(GRID.shape) < 0.85] = FREE
    pred = np.where(rng.random(GRID.shape) < 0.8, sem, FREE).astype(np.uint8)
    flow = rng.normal(0, 1, (*GRID.shape, 2)).astype(np.float16)
    return pred, sem, flow, flow


def main() -> None:
    rng = np.random.default_rng(0)
    pred, gt, pflow, gflow = _frame(rng)
    section("occupancy metrics, one 200x200x16 frame with flow")
    metrics = OccupancyMetrics()
    ours = best_time(lambda: metrics.update(pred, gt, pflow, gflow), repeat=5)

    centres = GRID.voxel_centres()
    near = np.hypot(centres[..., 0], centres[..., 1]) < 25.0

    def baseline() -> None:
        for region in (near, ~near):
            for j in range(16):
                g, p = (gt == j) & region, (pred == j) & region
                _ = (g & p).sum(), (~g & p & region).sum(), (g & ~p).sum()
        fg = (gt < 10) & (pred < 10)  # SSCMetrics' flow: float32, two speed regions, a float32 sum each
        g, p = gflow[fg].astype(np.float32), pflow[fg].astype(np.float32)
        speed = np.linalg.norm(g, axis=-1)
        for lo, hi in ((-0.2, 0.2), (0.2, 100.0)):
            sel = (speed >= lo) & (speed < hi)
            _ = np.sum(np.linalg.norm(g[sel] - p[sel], axis=-1))

    base = best_time(baseline, repeat=5)
    report("OccupancyMetrics.update (bincount) vs per-class masks", ours * 1e3, base * 1e3, "ms", "< 0.5")

    section("OpenScene sparse <-> dense, one frame (~15% occupied)")
    occ, rows = dense_to_sparse(gt, gflow)

    def naive_sparse() -> None:  # argwhere + flat index + sort
        ijk = np.argwhere(gt != FREE)
        flat = GRID.flat_index(ijk)
        order = np.argsort(flat)
        _ = flat[order], gt[tuple(ijk[order].T)], gflow[tuple(ijk[order].T)]

    def naive_dense() -> None:  # np.unique duplicate check + scatter through (x, y, z) indices
        _ = np.unique(occ[:, 0]).size == len(occ)
        ijk = GRID.unflatten_index(occ[:, 0])
        sem = np.full(GRID.shape, FREE, np.uint8)
        sem[tuple(ijk.T)] = occ[:, 1]
        f = np.zeros((*GRID.shape, 2), np.float32)
        f[tuple(ijk.T)] = rows

    ours = best_time(lambda: dense_to_sparse(gt, gflow), repeat=5)
    report(
        "dense_to_sparse ([z,y,x] order) vs argwhere+argsort", ours * 1e3, best_time(naive_sparse) * 1e3, "ms"
    )
    ours = best_time(lambda: sparse_to_dense(occ, rows), repeat=5)
    report(
        "sparse_to_dense (validated) vs unique+xyz scatter", ours * 1e3, best_time(naive_dense) * 1e3, "ms"
    )


if __name__ == "__main__":
    main()
