"""OccupancyMetrics against a straightforward reference implementation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from driveengine.schemas.classes import FREE
from driveengine.schemas.grid import VoxelGrid

from driveengine.train.metrics import OccupancyMetrics, format_metrics_table

#: A small grid (20 x 20 x 4) so that both near (< 2.5 m here) and far voxels exist and tests are fast.
SMALL = VoxelGrid((-5.0, -5.0, -1.0), (5.0, 5.0, 1.0), 0.5)
SPLIT_M = 2.5


def reference(preds, gts, pflows, gflows, masks, grid=SMALL, split_m=SPLIT_M):
    """Plain per-class loops over every frame, mirroring OpenScene's SSCMetrics definitions."""
    centres = grid.voxel_centres()
    near = np.hypot(centres[..., 0], centres[..., 1]) < split_m
    out = {}
    for region_name, region in (("all", np.ones_like(near)), ("near", near), ("far", ~near)):
        tps, fps, fns = np.zeros(16), np.zeros(16), np.zeros(16)
        ctp = cfp = cfn = ftp = ffp = ffn = 0
        for pred, gt, mask in zip(preds, gts, masks, strict=True):
            valid = region & (gt != 255) & (mask if mask is not None else True)
            for j in range(16):
                tps[j] += np.sum((gt == j) & (pred == j) & valid)
                fps[j] += np.sum((gt != j) & (pred == j) & valid)
                fns[j] += np.sum((gt == j) & (pred != j) & valid)
            ctp += np.sum((gt != FREE) & (pred != FREE) & valid)
            cfp += np.sum((gt == FREE) & (pred != FREE) & valid)
            cfn += np.sum((gt != FREE) & (pred == FREE) & valid)
            ftp += np.sum((gt < 10) & (pred < 10) & valid)
            ffp += np.sum((gt >= 10) & (pred < 10) & valid)
            ffn += np.sum((gt < 10) & (pred >= 10) & valid)
        ious = [tps[j] / (tps[j] + fps[j] + fns[j] + 1e-5) * 100 for j in range(16)]
        present = [ious[j] for j in range(16) if tps[j] + fns[j] > 0]
        suffix = "" if region_name == "all" else f"_{region_name}"
        out["miou" + suffix] = sum(ious) / 16
        out["miou_present" + suffix] = sum(present) / len(present) if present else math.nan
        out["completion_iou" + suffix] = ctp / (ctp + cfp + cfn + 1e-5) * 100
        if region_name == "all":
            out["iou"] = ious
            out["present"] = [j for j in range(16) if tps[j] + fns[j] > 0]
            out["foreground_iou"] = ftp / (ftp + ffp + ffn + 1e-5) * 100
    errs = {"stationary": [], "moving": []}
    for pred, gt, pf, gf, mask in zip(preds, gts, pflows, gflows, masks, strict=True):
        if pf is None:
            continue
        for idx in zip(
            *np.nonzero((gt < 10) & (pred < 10) & (mask if mask is not None else True)), strict=True
        ):
            e = float(np.linalg.norm(pf[idx].astype(np.float64) - gf[idx].astype(np.float64)))
            speed = float(np.linalg.norm(gf[idx].astype(np.float64)))
            errs["moving" if speed >= 0.2 else "stationary"].append(e)
    out["epe_stationary"] = float(np.mean(errs["stationary"])) if errs["stationary"] else math.nan
    out["epe_moving"] = float(np.mean(errs["moving"])) if errs["moving"] else math.nan
    allerr = errs["stationary"] + errs["moving"]
    out["epe"] = float(np.mean(allerr)) if allerr else math.nan
    return out


def random_frame(rng, classes=(0, 4, 5, 7, 10, FREE), p_free=0.6, shape=SMALL.shape):
    """Random class grid: mostly free, the rest drawn from ``classes``."""
    sem = rng.choice(np.array(classes, dtype=np.uint8), size=shape)
    sem[rng.random(shape) < p_free] = FREE
    flow = rng.normal(0, 1.0, size=(*shape, 2)).astype(np.float16)
    flow[rng.random(shape) < 0.5] = 0.0  # many stationary voxels
    return sem, flow


def assert_matches(got, want):
    for key in (
        "miou",
        "miou_present",
        "completion_iou",
        "foreground_iou",
        "miou_near",
        "miou_far",
        "miou_present_near",
        "miou_present_far",
        "completion_iou_near",
        "completion_iou_far",
        "epe",
        "epe_stationary",
        "epe_moving",
    ):
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key
    assert list(got["iou_per_class"].values()) == pytest.approx(want["iou"], rel=1e-9, abs=1e-12)
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
    assert a["epe_moving"] == pytest.approx(b["epe_moving"], rel=1e-6)
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
    assert r["completion_iou"] == pytest.approx(100.0)
    assert r["epe"] == 0.0
    assert_matches(r, reference([gt], [gt], [gf], [gf], [None]))


def test_all_free_and_no_flow_gives_nan_not_errors():
    m = OccupancyMetrics(grid=SMALL)
    free = np.full(SMALL.shape, FREE, dtype=np.uint8)
    m.update(free, free)
    r = m.compute()
    assert r["present_classes"] == []
    assert math.isnan(r["miou_present"])
    assert r["miou"] == 0.0
    assert math.isnan(r["epe_moving"]) and math.isnan(r["epe_stationary"])
    assert "n/a" in format_metrics_table(r)


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


# -- the evaluate stage ------------------------------------------------------------------------------


def write_split(root, logs, grid=SMALL):
    """A collected split folder: ``logs`` maps log name -> (tokens, scene names, frame_idx, sem, flow, mask)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from driveengine.store.manifest import Manifest, save_manifest
    from driveengine.store.occ import create_occ

    manifest = Manifest(split="mini")
    for log, (tokens, scenes, idx, sem, flow, mask) in logs.items():
        (root / "meta").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"token": tokens, "scene_name": scenes, "frame_idx": idx}),
            root / "meta" / f"{log}.parquet",
        )
        with create_occ(root / "occ" / f"{log}.zarr", len(tokens), generator={}, grid=grid) as w:
            for i in range(len(tokens)):
                w.append(sem[i], flow[i], mask[i])
        manifest.logs[log] = {"frames": len(tokens), "meta": f"meta/{log}.parquet", "occ": f"occ/{log}.zarr"}
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
    from driveengine.evaluate import evaluate

    pred, gt, pred_logs, gt_logs = two_splits
    got = evaluate(pred, gt, mask_lidar=mask_lidar, workers=3)  # threads: same sums as one accumulator
    want = OccupancyMetrics(grid=SMALL)
    for log in gt_logs:
        g, p = gt_logs[log], pred_logs[log]
        want.update(p[3], g[3], p[4], g[4], mask=g[5] if mask_lidar is None else None)
    w = want.compute()
    assert got["matched_by"] == "token" and got["frames"] == 5
    assert got["mask_lidar"] is (mask_lidar is None)
    assert got["iou_per_class"] == w["iou_per_class"]
    assert got["epe_moving"] == pytest.approx(w["epe_moving"])
    assert got["voxels"] == w["voxels"]


def test_evaluate_against_openscene_files(two_splits, tmp_path):
    from driveengine.evaluate import EvaluationError, evaluate
    from driveengine.store.openscene_occ import export_openscene_occupancy

    pred, gt, _, _ = two_splits
    export_openscene_occupancy(gt, tmp_path / "gt_npy")
    by_files = evaluate(pred, tmp_path / "gt_npy", grid=SMALL)
    by_split = evaluate(pred, gt, mask_lidar=False)
    assert by_files["matched_by"] == "scene_frame" and by_files["mask_lidar"] is False
    assert by_files["iou_per_class"] == by_split["iou_per_class"]
    assert by_files["epe"] == pytest.approx(by_split["epe"], rel=1e-6)
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
    from driveengine.evaluate import EvaluationError, evaluate
    from driveengine.store.manifest import load_manifest, save_manifest

    pred, gt, _, _ = two_splits
    m = load_manifest(pred)
    del m.logs["log_b"]
    save_manifest(pred, m)
    with pytest.raises(EvaluationError, match="2 of 5 ground-truth frames have no prediction"):
        evaluate(pred, gt)
    with pytest.raises(EvaluationError, match=r"no manifest\.json and no"):
        evaluate(tmp_path, gt)

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
