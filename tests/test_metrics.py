"""OccupancyMetrics against OpenScene's SSCMetrics definitions.

Reference: OpenScene ``DriveEngine/projects/mmdet3d_plugin/datasets/occupancy_metrics.py`` (``SSCMetrics``)
and ``nuplan_dataset.py`` (``evaluate_occ_iou``, ``parse_flow_info``) at OpenDriveLab/OpenScene 7286074.
Line numbers in comments ("OS:NNN") are of ``occupancy_metrics.py``. Each rule has a small case whose
expected number is derived by hand from that definition; ``reference`` re-states the definitions as
plain per-frame loops for the randomised checks, which must agree bit for bit (``==``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from driveengine.schemas.classes import FREE, OCC3D_NUSCENES_CLASSES, OPENSCENE_CLASSES, ClassTable
from driveengine.schemas.grid import VoxelGrid

from driveengine.evaluation.metrics import OccupancyMetrics, distance_xy_m, format_metrics_table, summary_line

#: A small grid (20 x 20 x 4) so that both near (< 2.5 m here) and far voxels exist and tests are fast.
SMALL = VoxelGrid((-5.0, -5.0, -1.0), (5.0, 5.0, 1.0), 0.5)
SPLIT_M = 2.5


def openscene_order(a):
    """A dense ``[x, y, z, ...]`` array as OpenScene's flat vector (index ``x + X*y + X*Y*z``)."""
    return a.transpose(2, 1, 0, *range(3, a.ndim)).reshape(-1, *a.shape[3:])


def reference(preds, gts, pflows, gflows, masks, grid=SMALL, split_m=SPLIT_M):
    """OpenScene's SSCMetrics definitions as plain per-frame loops (written here, not OpenScene's code)."""
    dist = openscene_order(np.repeat(distance_xy_m(grid)[:, :, None], grid.shape[2], axis=2))
    regions = {"all": np.ones(dist.shape, bool), "near": dist < split_m, "far": dist > split_m}  # OS:84-85
    counts = {r: np.zeros((3, 16)) for r in regions}  # tp, fp, fn per class (float64, OS:292-294)
    binary = {r: {"occ": [0, 0, 0], "fg": [0, 0, 0]} for r in regions}  # Python ints, OS:284-300
    flow_sum, flow_num = np.zeros(2), np.zeros(2, np.int64)  # OS:330-331
    for pred, gt, pf, gf, mask in zip(preds, gts, pflows, gflows, masks, strict=True):
        pred, gt = openscene_order(pred).astype(np.int32), openscene_order(gt).astype(np.int32)
        valid = (gt != 255) & (openscene_order(mask) if mask is not None else True)  # OS:114-116
        for name, region in regions.items():
            v = valid & region
            for j in range(16):
                counts[name][:, j] += [
                    np.sum((gt == j) & (pred == j) & v),
                    np.sum((gt != j) & (pred == j) & v),
                    np.sum((gt == j) & (pred != j) & v),
                ]
            for key, g_pos, p_pos in (("occ", gt != FREE, pred != FREE), ("fg", gt < 10, pred < 10)):
                b = binary[name][key]
                b[0] += int(np.sum(g_pos & p_pos & v))
                b[1] += int(np.sum(~g_pos & p_pos & v))
                b[2] += int(np.sum(g_pos & ~p_pos & v))
        if pf is None:
            continue
        both = (gt < 10) & (pred < 10) & valid  # OS:185-190
        g = openscene_order(gf).astype(np.float32)[both]  # float32 dense flows (nuplan_dataset.py:554-559)
        p = openscene_order(pf).astype(np.float32)[both]
        speed = np.linalg.norm(g, axis=-1)
        for r, (lo, hi) in enumerate(((-0.2, 0.2), (0.2, 100.0))):  # flow_regions, OS:329
            sel = (speed >= np.float32(lo)) & (speed < np.float32(hi))
            if sel.any():
                flow_sum[r] += np.sum(np.linalg.norm(g[sel] - p[sel], axis=-1))  # float32 sum, OS:202-204
                flow_num[r] += int(sel.sum())

    def ratio(a, b, scale=1.0):
        return a / b * scale if b else None

    out = {}
    for name in regions:
        tp, fp, fn = counts[name]
        iou = tp / (tp + fp + fn + 1e-5) * 100.0  # OS:226
        present = (tp + fn) > 0
        (otp, ofp, ofn), (ftp, ffp, ffn) = binary[name]["occ"], binary[name]["fg"]
        if name == "all":
            out["iou"] = list(iou)
            out["present"] = [int(j) for j in np.flatnonzero(present)]
            out["miou"] = float(np.mean(iou))  # OS:276
            out["miou_present"] = float(iou[present].mean()) if present.any() else None
            out["foreground_miou"] = float(np.mean(iou[:10]))  # OS:277
            out["completion_iou"] = ratio(otp, otp + ofp + ofn, 100.0)  # OS:211-213, no epsilon
            out["precision"], out["recall"] = ratio(otp, otp + ofp), ratio(otp, otp + ofn)
            out["foreground_iou"] = ratio(ftp, ftp + ffp + ffn, 100.0)  # OS:220-222
            out["foreground_precision"], out["foreground_recall"] = (
                ratio(ftp, ftp + ffp),
                ratio(ftp, ftp + ffn),
            )
        else:
            out[f"{name}_miou"] = float(np.mean(iou[:10]))  # OS:244-246 / 259-261, class_num=10
            out[f"{name}_iou_ssc"] = list(iou[:10])
            out[f"{name}_iou"] = ratio(ftp, ftp + ffp + ffn, 100.0)  # foreground completion, OS:241 / 258
            out[f"{name}_precision"], out[f"{name}_recall"] = ratio(ftp, ftp + ffp), ratio(ftp, ftp + ffn)
    out["epe_stationary"] = ratio(flow_sum[0], flow_num[0])  # OS:228-233
    out["epe_moving"] = ratio(flow_sum[1], flow_num[1])
    out["epe"] = ratio(flow_sum.sum(), flow_num.sum())
    return out


#: Keys whose values must equal ``reference`` (OpenScene's definitions) bit for bit.
OPENSCENE_KEYS = (
    "miou", "miou_present", "foreground_miou", "completion_iou", "precision", "recall", "foreground_iou",
    "foreground_precision", "foreground_recall", "near_miou", "near_iou", "near_precision", "near_recall",
    "far_miou", "far_iou", "far_precision", "far_recall", "epe_stationary", "epe_moving", "epe",
)  # fmt: skip


def random_frame(rng, classes=(0, 4, 5, 7, 10, FREE), p_free=0.6, shape=SMALL.shape):
    """Random class grid: mostly free, the rest drawn from ``classes``."""
    sem = rng.choice(np.array(classes, dtype=np.uint8), size=shape)
    sem[rng.random(shape) < p_free] = FREE
    flow = rng.normal(0, 1.0, size=(*shape, 2)).astype(np.float16)
    flow[rng.random(shape) < 0.5] = 0.0  # many stationary voxels
    return sem, flow


def assert_matches(got, want):
    for key in OPENSCENE_KEYS:
        assert got[key] == want[key], key  # bit for bit (None where undefined)
    assert list(got["iou_per_class"].values()) == want["iou"]
    assert list(got["near_iou_ssc"].values()) == want["near_iou_ssc"]
    assert list(got["far_iou_ssc"].values()) == want["far_iou_ssc"]
    assert got["present_classes"] == want["present"]


@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_reference_over_several_frames(use_mask):
    rng = np.random.default_rng(0)
    preds, gts, pfs, gfs, masks = [], [], [], [], []
    for _ in range(3):
        gt, gf = random_frame(rng)
        pred, pf = random_frame(rng, classes=(0, 5, 7, 9, 10, 12, FREE))
        right = rng.random(pred.shape) < 0.5
        pred[right] = gt[right]  # partly right
        mask = rng.random(gt.shape) < 0.7 if use_mask else None
        preds.append(pred), gts.append(gt), pfs.append(pf), gfs.append(gf), masks.append(mask)
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    for args in zip(preds, gts, pfs, gfs, masks, strict=True):
        m.update(*args[:4], mask=args[4])
    got = m.compute()
    want = reference(preds, gts, pfs, gfs, masks)
    assert_matches(got, want)
    assert got["frames"] == 3
    # unused ids (1-3, 11-15 except the wrongly predicted 12) are absent from the ground truth and
    # count as 0 in the 16-id mean, so it is well below the mean over present classes
    assert got["present_classes"] == [0, 4, 5, 7, 10]
    assert got["iou_per_class"]["unused_12"] == 0.0
    assert got["miou"] < got["miou_present"]
    expected_voxels = sum(int(mk.sum()) for mk in masks) if use_mask else 3 * SMALL.num_voxels
    assert got["voxels"] == expected_voxels


def test_batched_torch_input_equals_frame_by_frame_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    frames = [random_frame(rng) for _ in range(4)]
    preds = [random_frame(rng)[0] for _ in range(4)]
    mask = rng.random((4, *SMALL.shape)) < 0.8
    gt = np.stack([f[0] for f in frames])
    gflow = np.stack([f[1] for f in frames])
    pred = np.stack(preds)
    pflow = gflow + np.float16(0.5)

    one = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    for i in range(4):
        one.update(pred[i], gt[i], pflow[i], gflow[i], mask=mask[i])
    batched = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    # batch of 2 x 2 frames as torch tensors, flow as float32
    batched.update(
        torch.from_numpy(pred.reshape(2, 2, *SMALL.shape)).long(),
        torch.from_numpy(gt.reshape(2, 2, *SMALL.shape)),
        torch.from_numpy(pflow.astype(np.float32).reshape(2, 2, *SMALL.shape, 2)),
        torch.from_numpy(gflow.astype(np.float32).reshape(2, 2, *SMALL.shape, 2)),
        mask=torch.from_numpy(mask.reshape(2, 2, *SMALL.shape)),
    )
    a, b = one.compute(), batched.compute()
    assert a["iou_per_class"] == b["iou_per_class"]
    # float16 -> float32 is exact and frames are summed one by one in both: the same bits
    assert (a["epe"], a["epe_moving"], a["epe_stationary"]) == (
        b["epe"],
        b["epe_moving"],
        b["epe_stationary"],
    )
    assert b["frames"] == 4
    # a constant 0.5 m/s error in vx and vy: EPE = 0.5 * sqrt(2) wherever both are foreground
    assert b["epe"] == pytest.approx(0.5 * math.sqrt(2), rel=1e-3)


def test_perfect_prediction_and_empty_classes():
    rng = np.random.default_rng(2)
    gt, gf = random_frame(rng, classes=(0, 10, FREE))
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(gt, gt, gf, gf)
    r = m.compute()
    assert r["iou_per_class"]["vehicle"] == pytest.approx(100.0)
    assert r["iou_per_class"]["background"] == pytest.approx(100.0)
    assert r["iou_per_class"]["pedestrian"] == 0.0  # absent everywhere: 0 / (0 + 1e-5)
    assert r["miou"] == pytest.approx(200.0 / 16)
    assert r["miou_present"] == pytest.approx(100.0)
    assert r["completion_iou"] == 100.0  # no epsilon: exactly 100 (OS:211-213)
    assert r["epe"] == 0.0
    assert_matches(r, reference([gt], [gt], [gf], [gf], [None]))
    # the summary line explains why a perfect prediction reads 12.5 % (2 of 16 ids present)
    line = summary_line(r)
    assert line.startswith("mIoU 12.50 % over all 16 ids") and "100.00 % over the 2 classes present" in line
    assert "14 ids absent from the ground truth count as 0" in line
    assert format_metrics_table(r).splitlines()[0] == line


def test_all_free_and_no_flow_gives_none_not_errors():
    # was: NaN; undefined values are now None (JSON null) with a note, as OpenScene's None
    m = OccupancyMetrics(grid=SMALL)
    free = np.full(SMALL.shape, FREE, dtype=np.uint8)
    m.update(free, free)
    r = m.compute()
    assert r["present_classes"] == []
    assert r["miou_present"] is None
    assert r["miou"] == 0.0
    assert r["epe_moving"] is None and r["epe_stationary"] is None and r["epe"] is None
    assert r["completion_iou"] is None  # 0/0: nothing occupied anywhere (OpenScene reports 0)
    assert any(
        n.startswith("completion_iou: no occupied voxel") and "OpenScene reports 0" in n for n in r["notes"]
    )
    assert not any(isinstance(v, float) and math.isnan(v) for v in r.values())
    assert "n/a" in format_metrics_table(r)
    assert "no class present in the ground truth" in summary_line(r)


def test_ignore_index_and_merge():
    rng = np.random.default_rng(3)
    gt, _ = random_frame(rng)
    pred, _ = random_frame(rng)
    gt_ignored = gt.copy()
    gt_ignored[:5] = 255
    a = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    a.update(pred, gt_ignored)
    b = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    b.update(pred, gt, mask=gt_ignored != 255)
    assert a.compute()["iou_per_class"] == b.compute()["iou_per_class"]
    a.merge(b)
    assert a.compute()["voxels"] == 2 * b.compute()["voxels"]


def test_bad_inputs_raise_clear_errors():
    m = OccupancyMetrics(grid=SMALL)
    good = np.zeros(SMALL.shape, dtype=np.uint8)
    with pytest.raises(ValueError, match="grid shape"):
        m.update(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="ground-truth voxels have ids outside"):
        m.update(good, good + 17)
    with pytest.raises(ValueError, match="flow arrays"):
        m.update(good, good, np.zeros((3, 2)), np.zeros((3, 2)))


# -- one hand-derived case per OpenScene rule --------------------------------------------------------


def _frame(grid=SMALL):
    """An all-free frame: (semantics uint8, flow float32) to fill in by hand."""
    return np.full(grid.shape, FREE, np.uint8), np.zeros((*grid.shape, 2), np.float32)


def test_completion_and_foreground_iou_have_no_epsilon():
    gt, flow = _frame()
    pred = gt.copy()
    a, b, c, d = (10, 10, 1), (10, 11, 1), (11, 10, 1), (12, 12, 1)  # all within 2.5 m
    gt[a], gt[b], gt[c] = 0, 0, 0  # three vehicle voxels
    pred[a], pred[b] = 0, 0  # two found
    pred[c] = 10  # one taken for background
    pred[d] = 7  # a pedestrian where the ground truth is free
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(pred, gt, flow, flow)
    r = m.compute()
    # OS:208-213: occupied (id != 16) tp = a, b, c = 3; fp = d = 1; fn = 0 -> 3 / 4 * 100, no 1e-5
    assert r["completion_iou"] == 75.0 and r["precision"] == 0.75 and r["recall"] == 1.0
    # OS:217-222 with OS:384-385: foreground (id < 10) tp = a, b = 2; fp = d = 1; fn = c = 1 -> 2 / 4 * 100
    assert r["foreground_iou"] == 50.0
    assert r["foreground_precision"] == 2 / 3 and r["foreground_recall"] == 2 / 3
    # OS:226: the per-class IoU keeps its 1e-5: vehicle tp 2, fp 0, fn 1
    vehicle = 2 / (2 + 0 + 1 + 1e-5) * 100.0
    assert r["iou_per_class"]["vehicle"] == vehicle
    assert r["iou_per_class"]["pedestrian"] == 0.0 and r["iou_per_class"]["background"] == 0.0
    assert r["miou"] == vehicle / 16  # OS:276, np.mean over all 16 ids
    assert r["foreground_miou"] == vehicle / 10  # OS:277, np.mean(iou_ssc[:10])
    assert r["miou_present"] == vehicle  # ours: vehicle is the only class in the ground truth


def test_flow_speed_of_exactly_0_2_is_moving_in_float32():
    gt, flow = _frame()
    gt[10, 10, 1] = 0
    gflow = flow.copy()
    gflow[10, 10, 1] = (0.12, 0.16)  # float32 norm: sqrt(0.0144f + 0.0256f) = 0.2f exactly
    assert np.hypot(*gflow[10, 10, 1].astype(np.float64)) < 0.2  # in float64 the speed is below 0.2
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(gt, gt, flow, gflow)  # predicted flow 0: the error is the speed
    r = m.compute()
    # OS:193-197: magnitude in float32 (flows are float32, nuplan_dataset.py:554-559), compared in float32
    # with the region bounds [-0.2, 0.2) and [0.2, 100): 0.2f >= 0.2f, so the voxel is moving
    assert (r["flow_voxels_stationary"], r["flow_voxels_moving"]) == (0, 1)
    assert r["epe_moving"] == float(np.float32(0.2))
    assert r["epe_stationary"] is None  # OS:228-229: OpenScene reports None (no stationary voxel)
    assert any(n.startswith("epe_stationary: no voxel") and "None" in n for n in r["notes"])


def test_per_frame_flow_sums_are_float32():
    gt, flow = _frame()
    gt[10, 10, 1] = gt[11, 10, 1] = 0
    pflow = flow.copy()
    pflow[10, 10, 1] = (-(2.0**24), 0.0)  # an error of 2**24 m/s on a stationary voxel ...
    pflow[11, 10, 1] = (1.0, 0.0)  # ... and one of 1 m/s
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(gt, gt, pflow, flow)
    r = m.compute()
    # OS:202-204: np.sum of the float32 norms is a float32 sum: 2**24 + 1 rounds to 2**24 (ties to even),
    # then OS:233 divides by the count 2 in float64. A float64 sum would give 8388608.5.
    assert r["epe_stationary"] == 2.0**24 / 2 == 8388608.0
    # frames are summed separately (OS:177, one add per frame): the same errors in two frames keep the 1
    two = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    for keep in ((10, 10, 1), (11, 10, 1)):
        g = np.full(SMALL.shape, FREE, np.uint8)
        g[keep] = 0
        two.update(g, g, pflow, flow)
    assert two.compute()["epe_stationary"] == (2.0**24 + 1.0) / 2


def test_flow_sums_follow_openscenes_voxel_order():
    # Three stationary errors whose float32 sum depends on the order: OpenScene sums in its flat index
    # order x + X*y + X*Y*z (z slowest), not in the [x, y, z] memory order of our arrays.
    gt, flow = _frame()
    cells = {(0, 0, 1): 2.0**24, (1, 0, 0): 1.0, (2, 0, 0): 1.0}
    pflow = flow.copy()
    for cell, err in cells.items():
        gt[cell] = 0
        pflow[cell] = (err, 0.0)
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(gt, gt, pflow, flow)
    nx, ny, _ = SMALL.shape
    by_openscene = sorted(cells, key=lambda c: c[0] + nx * c[1] + nx * ny * c[2])
    want = float(np.sum(np.array([cells[c] for c in by_openscene], np.float32))) / 3  # OS:203, OS:233
    memory_order = float(np.sum(np.array([cells[c] for c in sorted(cells)], np.float32))) / 3
    assert want != memory_order  # the case tells the two orders apart
    assert m.compute()["epe_stationary"] == want


def test_speeds_of_100_mps_or_more_are_left_out():
    gt, flow = _frame()
    gflow, pflow = flow.copy(), flow.copy()
    cells = [(10, 10, 1), (11, 10, 1), (12, 10, 1), (13, 10, 1)]
    for c in cells:
        gt[c] = 0
    gflow[cells[0]] = (60.0, 80.0)  # 100 m/s: in no flow region (OS:329, [0.2, 100))
    gflow[cells[1]] = (0.5, 0.0)  # moving, predicted exactly: error 0
    pflow[cells[1]] = (0.5, 0.0)
    pflow[cells[2]] = (0.375, 0.5)  # stationary, error sqrt(0.140625 + 0.25) = 0.625 exactly
    gflow[cells[3]] = (np.nan, 0.0)  # not finite: in no region either
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(gt, gt, pflow, gflow)
    r = m.compute()
    assert (r["flow_voxels_stationary"], r["flow_voxels_moving"], r["flow_voxels_excluded"]) == (1, 1, 2)
    assert r["epe_stationary"] == 0.625 and r["epe_moving"] == 0.0
    assert r["epe"] == 0.3125  # OS:230-233: (0.625 + 0) / (1 + 1)
    assert any(n.startswith("flow_voxels_excluded: 2") for n in r["notes"])


def test_no_moving_voxel_is_none_not_zero():
    gt, flow = _frame()
    gt[10, 10, 1] = 0
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(gt, gt, flow, flow)
    r = m.compute()
    assert r["epe_stationary"] == 0.0 and r["epe"] == 0.0
    assert r["epe_moving"] is None  # OpenScene: 0/0 = NaN; never reported as 0
    assert any(n.startswith("epe_moving: no voxel") for n in r["notes"])
    assert "EPE moving" in format_metrics_table(r) and "n/a" in format_metrics_table(r)


def test_near_and_far_are_openscenes_foreground_figures():
    gt, _ = _frame()
    pred = gt.copy()
    near, far = (10, 10, 1), (0, 0, 0)  # centre distances 0.35 m and 6.4 m (split 2.5 m)
    assert distance_xy_m(SMALL)[10, 10] < SPLIT_M < distance_xy_m(SMALL)[0, 0]
    gt[near] = pred[near] = 0  # a vehicle found near
    gt[far] = 7  # a pedestrian far away, taken for background
    pred[far] = 10
    gt[0, 10, 0] = pred[0, 10, 0] = 10  # far background, right (not foreground: no effect on far_*)
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(pred, gt)
    r = m.compute()
    hit = 1 / (1 + 0 + 0 + 1e-5) * 100.0  # OS:259, the per-class IoU with its 1e-5
    assert r["near_miou"] == hit / 10  # OS:261: mean over the 10 foreground ids only
    assert r["near_iou_ssc"]["vehicle"] == hit and len(r["near_iou_ssc"]) == 10
    assert r["near_iou"] == 100.0 and r["near_precision"] == 1.0 and r["near_recall"] == 1.0  # OS:256-258
    # far: foreground tp 0, fp 0, fn 1 (OS:238-243 would report 0, 0, 0 for all three)
    assert r["far_miou"] == 0.0 and r["far_iou"] == 0.0 and r["far_recall"] == 0.0
    assert r["far_precision"] is None  # 0/0
    assert any(n.startswith("far_precision: no foreground voxel beyond 2.5 m predicted") for n in r["notes"])
    # ours, distinct names: the 16-id mIoU and completion IoU of everything at or beyond 2.5 m
    assert r["miou_far"] == (1 / (1 + 1 + 0 + 1e-5) * 100.0) / 16  # background: tp 1, fp 1 (the pedestrian)
    assert r["completion_iou_far"] == 100.0


def test_a_voxel_exactly_at_the_split_is_in_neither_of_openscenes_regions():
    gt, _ = _frame()
    dist = distance_xy_m(SMALL)
    split = float(dist[12, 13])  # make that ring of centres lie exactly on the split
    gt[12, 13, 0] = 0
    m = OccupancyMetrics(grid=SMALL, near_far_m=split)
    m.update(gt, gt)
    r = m.compute()
    # OS:84-85: far is ``distance > far_distance``, near is ``distance < near_distance``
    assert r["near_iou"] is None and r["far_iou"] is None
    assert r["completion_iou_far"] == 100.0 and r["completion_iou_near"] is None  # ours: far is >= split


def test_edge_cases_where_openscene_crashes_give_none_with_a_note():
    rng = np.random.default_rng(5)
    gt, flow = random_frame(rng)
    # 1. an all-free prediction: OS:256 divides 0 by 0 (Python ints) and raises ZeroDivisionError
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(np.full_like(gt, FREE), gt, flow, flow)
    r = m.compute()
    assert r["near_precision"] is None and r["precision"] is None and r["foreground_precision"] is None
    assert r["completion_iou"] == 0.0 and r["near_iou"] == 0.0 and r["recall"] == 0.0
    assert r["epe"] is None  # no voxel is foreground in both
    assert any("near_precision" in n and "ZeroDivisionError" in n for n in r["notes"])
    # 2. nothing observed within the split distance (mask): OS:256-258 raise as well
    mask = distance_xy_m(SMALL)[:, :, None].repeat(SMALL.shape[2], axis=2) > SPLIT_M
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M)
    m.update(gt, gt, flow, flow, mask=mask)
    r = m.compute()
    assert r["near_iou"] is None and r["near_precision"] is None and r["near_recall"] is None
    assert r["near_miou"] == 0.0  # OS:259-261: every class 0 / (0 + 1e-5)
    assert r["far_iou"] == 100.0 and r["completion_iou"] == 100.0
    assert sum("ZeroDivisionError" in n for n in r["notes"]) == 3
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in r.values())


# -- other class tables (the dataset's, recorded in its manifest) -----------------------------------------


def reference_for_table(preds, gts, pflows, gflows, table, grid=SMALL, split_m=SPLIT_M):
    """The same definitions as :func:`reference`, for any class table: per-id loops over its evaluated
    ids ``0 .. free - 1``, its free id and its foreground ids (written here, not derived from the code)."""
    dist = np.repeat(distance_xy_m(grid)[:, :, None], grid.shape[2], axis=2)
    regions = {"all": np.ones(dist.shape, bool), "near": dist < split_m, "far": dist > split_m}
    fg = list(table.foreground)
    out = {}
    for name, region in regions.items():
        ids = range(table.free) if name == "all" else fg
        iou = []
        for j in ids:
            tp = sum(int(np.sum((g == j) & (p == j) & region)) for p, g in zip(preds, gts, strict=True))
            fp = sum(int(np.sum((g != j) & (p == j) & region)) for p, g in zip(preds, gts, strict=True))
            fn = sum(int(np.sum((g == j) & (p != j) & region)) for p, g in zip(preds, gts, strict=True))
            iou.append(tp / (tp + fp + fn + 1e-5) * 100.0)
        out[f"{name}_iou_ssc"] = iou
        fg_g = [np.isin(g, fg) & region for g in gts]
        fg_p = [np.isin(p, fg) & region for p in preds]
        tp = sum(int(np.sum(a & b)) for a, b in zip(fg_g, fg_p, strict=True))
        den = tp + sum(int(np.sum(~a & b)) + int(np.sum(a & ~b)) for a, b in zip(fg_g, fg_p, strict=True))
        out[f"{name}_fg_iou"] = tp / den * 100.0 if den else None
    occ_g, occ_p = [g != table.free for g in gts], [p != table.free for p in preds]
    tp = sum(int(np.sum(a & b)) for a, b in zip(occ_g, occ_p, strict=True))
    den = tp + sum(int(np.sum(~a & b)) + int(np.sum(a & ~b)) for a, b in zip(occ_g, occ_p, strict=True))
    out["completion_iou"] = tp / den * 100.0 if den else None
    errors = []
    for p, g, pf, gf in zip(preds, gts, pflows, gflows, strict=True):
        both = np.isin(g, fg) & np.isin(p, fg)
        speed = np.linalg.norm(gf.astype(np.float32)[both], axis=-1)
        err = np.linalg.norm(gf.astype(np.float32)[both] - pf.astype(np.float32)[both], axis=-1)
        errors.append(err[speed < np.float32(100.0)])
    flat = np.concatenate(errors).astype(np.float64)
    out["epe"] = float(flat.mean()) if len(flat) else None
    return out


#: A made-up table whose foreground ids are not 0 .. k - 1 (free = 5).
SCATTERED = ClassTable(
    "scattered", ("road", "car", "wall", "person", "bike", "free"), 5, (1, 3, 4), 0,
    ("driveable_surface", "vehicle", "manmade", "pedestrian", "bicycle", "free"),
)  # fmt: skip


@pytest.mark.parametrize("table", [OCC3D_NUSCENES_CLASSES, SCATTERED], ids=lambda t: t.name)
def test_metrics_follow_the_class_table(table):
    """Evaluated ids, free, foreground and names come from the table: Occ3D-nuScenes' 17 classes + free 17,
    and a table whose foreground ids are scattered."""
    rng = np.random.default_rng(11)
    ids = np.arange(table.free + 1, dtype=np.uint8)
    preds, gts, pfs, gfs = [], [], [], []
    for _ in range(3):
        gt = rng.choice(ids, size=SMALL.shape)
        gt[rng.random(SMALL.shape) < 0.5] = table.free
        pred = np.where(rng.random(SMALL.shape) < 0.6, gt, rng.choice(ids, size=SMALL.shape)).astype(np.uint8)
        gf = rng.normal(0, 1.0, size=(*SMALL.shape, 2)).astype(np.float16)
        preds.append(pred), gts.append(gt), pfs.append(gf + np.float16(0.25)), gfs.append(gf)
    m = OccupancyMetrics(grid=SMALL, near_far_m=SPLIT_M, classes=table)
    for args in zip(preds, gts, pfs, gfs, strict=True):
        m.update(*args)
    r = m.compute()
    want = reference_for_table(preds, gts, pfs, gfs, table)
    assert m.confusion.shape == (3, table.free + 1, table.free + 1)
    assert list(r["iou_per_class"]) == list(table.names[: table.free])
    assert list(r["iou_per_class"].values()) == want["all_iou_ssc"]  # integer counts: bit for bit
    assert r["miou"] == pytest.approx(np.mean(want["all_iou_ssc"]), rel=1e-12)
    assert r["foreground_miou"] == pytest.approx(np.mean([want["all_iou_ssc"][j] for j in table.foreground]))
    assert list(r["near_iou_ssc"]) == [table.names[j] for j in table.foreground]
    assert list(r["near_iou_ssc"].values()) == want["near_iou_ssc"]
    assert list(r["far_iou_ssc"].values()) == want["far_iou_ssc"]
    assert r["completion_iou"] == want["completion_iou"]
    assert r["foreground_iou"] == want["all_fg_iou"]
    assert r["near_iou"] == want["near_fg_iou"] and r["far_iou"] == want["far_fg_iou"]
    assert r["epe"] == pytest.approx(want["epe"], rel=1e-6)
    assert r["flow_voxels_stationary"] + r["flow_voxels_moving"] == sum(
        int(np.sum(np.isin(g, table.foreground) & np.isin(p, table.foreground)))
        for p, g in zip(preds, gts, strict=True)
    )
    n = table.free
    fg = "0-10" if table is OCC3D_NUSCENES_CLASSES else "1, 3, 4"
    line = summary_line(r)
    assert (
        line.startswith(f"mIoU {r['miou']:.2f} % over all {n} ids")
        and f"over the {n} classes present" in line
    )
    text = format_metrics_table(r)
    assert f"mIoU (all {n} ids)" in text and f"foreground mIoU (ids {fg})" in text
    assert f"near_miou / far_miou (ids {fg})" in text and f"mIoU near / far ({n} ids)" in text
    # ids of the table are checked against its free id
    with pytest.raises(ValueError, match=f"ids outside 0..{n}"):
        m.update(gts[0], np.full_like(gts[0], n + 1))


def test_the_default_table_is_openscenes_and_tables_do_not_mix():
    assert OccupancyMetrics(grid=SMALL).classes == OPENSCENE_CLASSES
    occ3d = OccupancyMetrics(grid=SMALL, classes=OCC3D_NUSCENES_CLASSES)
    free17 = np.full(SMALL.shape, 17, np.uint8)
    occ3d.update(free17, free17)  # 17 is Occ3D's free id: no occupied voxel
    assert occ3d.compute()["completion_iou"] is None
    with pytest.raises(ValueError, match=r"predicted class ids must be in 0\.\.16"):
        OccupancyMetrics(grid=SMALL).update(free17, np.zeros_like(free17))
    openscene = OccupancyMetrics(grid=SMALL)
    with pytest.raises(ValueError, match="cannot merge metrics of class table occ3d-nuscenes into openscene"):
        openscene.merge(occ3d)
    with pytest.raises(ValueError, match="do not fit the class table openscene"):
        openscene.add(occ3d.frame_stats(free17, free17))


# -- the evaluate stage ------------------------------------------------------------------------------


def write_split(root, logs, grid=SMALL):
    """A collected split folder: ``logs`` maps log name -> (tokens, scene names, frame_idx, sem, flow, mask)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from driveengine.store.manifest import DatasetInfo, LogEntry, Manifest, SourceRef, save_manifest
    from driveengine.store.occ import create_occ

    SHARD_META = {b"driveengine.format_version": b"2"}  # a frame shard of format version 2

    manifest = Manifest(split="mini", dataset=DatasetInfo(name="nuplan", grid=grid))
    for log, (tokens, scenes, idx, sem, flow, mask) in logs.items():
        (root / "meta").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"token": tokens, "scene_name": scenes, "frame_idx": idx}).replace_schema_metadata(
                SHARD_META
            ),
            root / "meta" / f"{log}.parquet",
        )
        with create_occ(root / "occ" / f"{log}.zarr", len(tokens), generator={}, grid=grid) as w:
            for i in range(len(tokens)):
                w.append(semantics=sem[i], flow=flow[i], mask_lidar=mask[i])
        manifest.logs[log] = LogEntry(
            frames=len(tokens),
            meta=f"meta/{log}.parquet",
            occ=f"occ/{log}.zarr",
            checksums={},
            source=SourceRef("nuplan", ""),
        )
    save_manifest(root, manifest)
    return root


@pytest.fixture
def two_splits(tmp_path):
    rng = np.random.default_rng(7)
    gt_logs, pred_logs = {}, {}
    for log, n in (("log_a", 3), ("log_b", 2)):
        frames = [random_frame(rng) for _ in range(n)]
        sem = np.stack([f[0] for f in frames])
        flow = np.stack([f[1] for f in frames])
        mask = rng.random(sem.shape) < 0.6
        pred = np.where(rng.random(sem.shape) < 0.7, sem, random_frame(rng)[0][None]).astype(np.uint8)
        pflow = (flow.astype(np.float32) + rng.normal(0, 0.3, flow.shape)).astype(np.float16)
        meta = ([f"{log}-{i:012x}" for i in range(n)], [f"{log}-scene-{log[-1]}"] * n, list(range(n)))
        gt_logs[log] = (*meta, sem, flow, mask)
        pred_logs[log] = (*meta, pred, pflow, np.zeros_like(mask))
    gt = write_split(tmp_path / "gt" / "mini", gt_logs)
    pred = write_split(tmp_path / "pred" / "mini", pred_logs)
    return pred, gt, pred_logs, gt_logs


@pytest.mark.parametrize("mask_lidar", [None, False])
def test_evaluate_collected_splits_equals_accumulator(two_splits, mask_lidar):
    from driveengine.evaluation.evaluate import evaluate

    pred, gt, pred_logs, gt_logs = two_splits
    got = evaluate(pred, gt, mask_lidar=mask_lidar, workers=3)  # threads: frames added in order
    want = OccupancyMetrics(grid=SMALL)
    frames = {k: [] for k in ("pred", "gt", "pflow", "gflow", "mask")}
    for log in gt_logs:
        g, p = gt_logs[log], pred_logs[log]
        want.update(p[3], g[3], p[4], g[4], mask=g[5] if mask_lidar is None else None)
        for i in range(len(g[0])):
            for key, value in (
                ("pred", p[3]),
                ("gt", g[3]),
                ("pflow", p[4]),
                ("gflow", g[4]),
                ("mask", g[5]),
            ):
                frames[key].append(value[i])
    w = want.compute()
    assert got["matched_by"] == "token" and got["frames"] == 5
    assert got["mask_lidar"] is (mask_lidar is None)
    assert got["iou_per_class"] == w["iou_per_class"]
    assert got["voxels"] == w["voxels"]
    for key in OPENSCENE_KEYS:  # bit for bit, whatever the number of threads
        assert got[key] == w[key], key
    masks = frames["mask"] if mask_lidar is None else [None] * 5
    ref = reference(frames["pred"], frames["gt"], frames["pflow"], frames["gflow"], masks, split_m=25.0)
    assert_matches(got, ref)


def test_evaluate_against_openscene_files(two_splits, tmp_path):
    from driveengine.evaluation.evaluate import EvaluationError, evaluate
    from driveengine.export.openscene import export_openscene_occupancy

    pred, gt, _, _ = two_splits
    export_openscene_occupancy(gt, tmp_path / "gt_npy")
    by_files = evaluate(pred, tmp_path / "gt_npy", grid=SMALL)
    by_split = evaluate(pred, gt, mask_lidar=False)
    assert by_files["matched_by"] == "scene_frame" and by_files["mask_lidar"] is False
    assert by_files["iou_per_class"] == by_split["iou_per_class"]
    assert by_files["epe"] == by_split["epe"]  # float16 labels are exact in float32 files
    # OpenScene names scene folders by the source's scene name, without DriveEngine's "<log>-" prefix
    for log in ("log_a", "log_b"):
        (tmp_path / "gt_npy" / "mini" / f"{log}-scene-{log[-1]}").rename(
            tmp_path / "gt_npy" / "mini" / f"scene-{log[-1]}"
        )
    renamed = evaluate(pred, tmp_path / "gt_npy", grid=SMALL)
    assert renamed["iou_per_class"] == by_split["iou_per_class"] and renamed["frames"] == 5
    with pytest.raises(EvaluationError, match="carry no mask_lidar"):
        evaluate(pred, tmp_path / "gt_npy", grid=SMALL, mask_lidar=True)


def test_evaluate_mismatched_inputs_fail_clearly(two_splits, tmp_path, monkeypatch, capsys):
    import json

    from driveengine import cli
    from driveengine.evaluation.evaluate import EvaluationError, evaluate
    from driveengine.store.manifest import load_manifest, save_manifest

    pred, gt, _, _ = two_splits
    m = load_manifest(pred)
    del m.logs["log_b"]
    save_manifest(pred, m)
    with pytest.raises(EvaluationError, match="2 of 5 ground-truth frames have no prediction"):
        evaluate(pred, gt)
    with pytest.raises(EvaluationError, match=r"no manifest\.json and no"):
        evaluate(tmp_path, gt)
    from dataclasses import replace

    from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES

    m = load_manifest(pred)
    m.dataset = replace(m.dataset, classes=OCC3D_NUSCENES_CLASSES)  # labels of another dataset's table
    save_manifest(pred, m)
    with pytest.raises(
        EvaluationError, match="class table occ3d-nuscenes differs from the ground truth's openscene"
    ):
        evaluate(pred, gt)
    m.dataset = replace(m.dataset, classes=load_manifest(gt).dataset.classes)
    save_manifest(pred, m)

    def run_cli(*args):
        monkeypatch.setattr("sys.argv", ["driveengine", "evaluate", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        return exc.value.code, capsys.readouterr()

    code, out = run_cli("--pred", pred, "--gt", gt)
    assert code == 2
    assert "have no prediction" in out.err
    # the matching subset evaluates fine through the command line, as JSON
    code, out = run_cli("--pred", pred, "--gt", pred, "--json", "--no-mask-lidar")
    assert code == 0
    result = json.loads(out.out)
    assert result["frames"] == 3 and result["completion_iou"] == pytest.approx(100.0)
    code, out = run_cli("--pred", pred, "--gt", pred, "--no-mask-lidar")
    assert code == 0 and "mIoU (all 16 ids)" in out.out


def test_evaluate_json_has_null_never_nan(two_splits, tmp_path, monkeypatch, capsys):
    from driveengine import cli

    _, gt, pred_logs, _ = two_splits
    free_logs = {}
    for log, (tokens, scenes, idx, sem, flow, mask) in pred_logs.items():
        free_logs[log] = (tokens, scenes, idx, np.full_like(sem, FREE), flow, mask)
    free = write_split(tmp_path / "free" / "mini", free_logs)  # an all-free prediction: OpenScene crashes

    def run_cli(*args):
        monkeypatch.setattr("sys.argv", ["driveengine", "evaluate", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        return exc.value.code, capsys.readouterr()

    code, out = run_cli("--pred", free, "--gt", gt, "--json")
    assert code == 0, out.err

    def no_constants(name):
        raise AssertionError(f"JSON holds {name}")

    result = json.loads(out.out, parse_constant=no_constants)  # NaN / Infinity are not JSON
    # every voxel of the small grid is within 25 m: far_* have no data; nothing predicted at all
    for key in (
        "precision",
        "foreground_precision",
        "near_precision",
        "far_iou",
        "far_precision",
        "epe",
        "miou_far",
    ):
        assert result[key] is None, key
    assert result["completion_iou"] == 0.0 and result["near_iou"] == 0.0
    assert any("near_precision" in n and "ZeroDivisionError" in n for n in result["notes"])
    code, out = run_cli("--pred", gt, "--gt", gt)  # text: the summary line explains the 16-id mean
    assert code == 0
    assert f"100.00 % over the {len(result['present_classes'])} classes present" in out.out
    assert "ids absent from the ground truth count as 0" in out.out


def test_frames_are_scored_in_order_with_a_bounded_number_in_flight():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from driveengine.evaluation.evaluate import _ordered_map

    started = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # out-of-order completion
        return i

    got = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        for value in _ordered_map(pool, work, range(40), ahead=5):
            got.append(value)
            time.sleep(0.001)
            with lock:
                assert len(started) - len(got) <= 5  # never more than `ahead` results waiting
    assert got == list(range(40))
