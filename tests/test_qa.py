"""Label QA (``driveengine qa``, driveengine/labels/qa.py) and label diffs (``show --diff``, viz/diff.py).

A small split of three synthetic logs is collected once with labels on a small custom grid; ``qa``
passes on it. Each check is then broken on its own in a copy of the split, by rewriting the label arrays
of one log with zarr (the manifest's sha256s then disagree with the files: ``qa`` reads the data, it
does not verify), and ``qa`` must fail that check and only that one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from driveengine.schemas.classes import OPENSCENE_CLASSES
from driveengine.schemas.grid import VoxelGrid, parse_grid

from driveengine.collect.runner import CollectConfig, collect
from driveengine.errors import DriveEngineError
from driveengine.labels.qa import CHECKS, QAError, QAThresholds, flicker_rate, format_qa, run_qa
from driveengine.store.dataset import open_split
from driveengine.synth import synthesize
from driveengine.viz.bev import VizError
from driveengine.viz.diff import CHANGED, ONLY_A, ONLY_B, diff_frames, show_diff

#: A small grid (96 x 96 x 12) keeps the split fast; qa and diff must take it from the data.
QA_GRID = "-24,-24,-3,24,24,3:0.5"
FREE = OPENSCENE_CLASSES.free
BACKGROUND = OPENSCENE_CLASSES.background


@dataclass(frozen=True)
class QASplit:
    root: Path  #: synthetic nuPlan inputs (``root/in``)
    split_dir: Path  #: collected with the openscene recipe on QA_GRID
    logs: tuple[str, ...]


def _collect(root: Path, out: Path, **options) -> None:
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=root / "in", out=out, progress=False, **options),
        echo=lambda _: None,
    )
    assert summary.ok, summary.format()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> QASplit:
    root = tmp_path_factory.mktemp("qa")
    synthesize(
        root / "in", logs=3, seconds=2.0, seed=7, points=2048, image_size=(64, 36), key_frames_only=True
    )
    _collect(root, root / "out", grid=QA_GRID)
    split_dir = root / "out" / "mini"
    return QASplit(root, split_dir, tuple(sorted(log.name for log in open_split(split_dir).logs)))


def _invoke(*args: str) -> tuple[int, str]:
    """``driveengine ARGS`` in this process: (exit code, output); a DriveEngineError gives 2 as in main()."""
    from typer.testing import CliRunner

    from driveengine.cli import app

    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, DriveEngineError):
        return 2, str(result.exception)
    return result.exit_code, result.output


def _broken(good: QASplit, tmp_path: Path, edit: Callable[[zarr.Group], None], log: int = 0) -> Path:
    """A copy of the good split whose log ``log``'s label arrays ``edit`` rewrote in place."""
    split_dir = tmp_path / "out" / "mini"
    shutil.copytree(good.split_dir, split_dir)
    entry = open_split(split_dir).log(good.logs[log]).entry
    edit(zarr.open_group(str(split_dir / entry.occ), mode="r+"))
    return split_dir


def _failing(result: dict) -> set[str]:
    return {name for name, c in result["checks"].items() if not c["ok"]}


def test_a_good_split_passes_and_writes_json_and_png(good: QASplit, tmp_path: Path) -> None:
    code, output = _invoke("qa", str(good.split_dir), "--out", str(tmp_path / "qa"))
    assert code == 0, output
    assert "QA of" in output and "PASS" in output and "FAIL" not in output
    result = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert result["ok"] is True and list(result["checks"]) == list(CHECKS)
    assert all(c["skipped"] is None for c in result["checks"].values())  # three logs: every check ran
    assert set(result["logs"]) == set(good.logs) and all(d["frames"] == 4 for d in result["logs"].values())
    assert VoxelGrid.from_dict(result["grid"]) == parse_grid(QA_GRID)  # the grid of the data
    assert result["recipe"]["recipe"] == "custom" and result["recipe"]["camera_mask"] is True
    assert result["thresholds"] == {**QAThresholds().__dict__}
    png = (tmp_path / "qa" / "qa.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # the checks looked at something: labels, observed voxels, compared static voxels
    shares = result["logs"][good.logs[0]]["class_shares"]
    assert shares["background"] > 0.2 and shares["vehicle"] > 0
    assert 0 < result["checks"]["unobserved_occupied"]["worst"] < 0.6


def _invalid(group: zarr.Group) -> None:  # a class id beyond the table, a NaN flow on an object voxel
    sem, flow = group["semantics"][1], group["flow"][1]
    sem[0, 0, 0] = 200
    flow[tuple(np.argwhere(sem == OPENSCENE_CLASSES.id_of("vehicle"))[0])] = (np.nan, 0.0)
    group["semantics"][1], group["flow"][1] = sem, flow


def _unobserved(group: zarr.Group) -> None:  # the masks of frame 1 no longer belong to its labels
    for name in ("mask_lidar", "mask_camera"):
        group[name][1] = np.zeros(group[name].shape[1:], dtype=bool)


def _static_flow(group: zarr.Group) -> None:  # flow on background voxels of frame 1
    sem, flow = group["semantics"][1], group["flow"][1]
    flow[sem == BACKGROUND] = (1.5, 0.0)
    group["flow"][1] = flow


def _empty_boxes(group: zarr.Group) -> None:  # the objects of frame 1 lost their voxels (and flow)
    sem, flow = group["semantics"][1], group["flow"][1]
    objects = np.isin(sem, list(OPENSCENE_CLASSES.foreground))
    assert objects.any()
    sem[objects] = FREE
    flow[objects] = 0.0
    group["semantics"][1], group["flow"][1] = sem, flow


def _flicker(group: zarr.Group) -> None:  # static structure 2..12 m ahead vanishes in frame 2 only
    sem = group["semantics"][2]
    x = -24.0 + (np.arange(sem.shape[0]) + 0.5) * 0.5
    band = (x > 2.0) & (x < 12.0)
    sub = sem[band]
    sub[sub == BACKGROUND] = FREE
    sem[band] = sub
    group["semantics"][2] = sem


def _class_outlier(group: zarr.Group) -> None:  # a broken class map: background written as barrier
    sem = group["semantics"][:]
    sem[sem == BACKGROUND] = OPENSCENE_CLASSES.id_of("barrier")
    group["semantics"][:] = sem


@pytest.mark.parametrize(
    "check, edit",
    [
        ("invalid_values", _invalid),
        ("unobserved_occupied", _unobserved),
        ("static_flow", _static_flow),
        ("empty_boxes", _empty_boxes),
        ("flicker", _flicker),
        ("class_outlier", _class_outlier),
    ],
)
def test_each_broken_check_fails_alone_and_is_named(good: QASplit, tmp_path: Path, check: str, edit) -> None:
    split_dir = _broken(good, tmp_path, edit)
    result = run_qa(split_dir)
    assert not result["ok"] and _failing(result) == {check}, format_qa(result)
    failure = result["checks"][check]["failures"][0]
    assert failure["log"] == good.logs[0]
    if check != "class_outlier":  # per frame; the class outlier is per log
        assert failure["frame"] == (2 if check == "flicker" else 1)
    code, output = _invoke("qa", str(split_dir), "--out", str(tmp_path / "qa"))
    assert code == 1 and f"FAIL {check}" in output and good.logs[0] in output, output
    result = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert result["ok"] is False and not result["checks"][check]["ok"]
    assert (tmp_path / "qa" / "qa.png").read_bytes().startswith(b"\x89PNG")


def test_thresholds_are_configurable_and_recorded(good: QASplit, tmp_path: Path) -> None:
    split_dir = _broken(good, tmp_path, _flicker)
    worst = run_qa(split_dir)["checks"]["flicker"]["worst"]
    code, output = _invoke("qa", str(split_dir), "--threshold", f"flicker={worst + 0.01}", "--json")
    assert code == 0, output
    result = json.loads(output)
    assert result["ok"] and result["thresholds"]["max_flicker"] == pytest.approx(worst + 0.01)
    assert result["checks"]["flicker"]["threshold"] == pytest.approx(worst + 0.01)
    # a parameter, not only a max_: boxes beyond 1 m are not checked, so none is empty
    emptied = _broken(good, tmp_path / "e", _empty_boxes)
    assert run_qa(emptied, QAThresholds.with_overrides(["box_range_m=1"]))["ok"]
    assert QAThresholds.with_overrides(["empty_boxes=3"]).max_empty_boxes == 3.0
    for bad, why in (("flickr=1", "expected NAME=VALUE"), ("flicker=nan", "finite"),
                     ("flicker=-1", "finite number >= 0"), ("flicker", "expected NAME=VALUE"),
                     ("flicker=x", "not a number")):  # fmt: skip
        with pytest.raises(QAError, match=why):
            QAThresholds.with_overrides([bad])
        code, output = _invoke("qa", str(good.split_dir), "--threshold", bad)
        assert code == 2 and "\n" not in output.strip() and "--threshold" in output, output


def test_the_class_outlier_check_needs_three_logs(good: QASplit) -> None:
    result = run_qa(good.split_dir, logs=list(good.logs[:2]))
    assert result["ok"] and "needs at least 3 labelled logs" in result["checks"]["class_outlier"]["skipped"]
    assert set(result["logs"]) == set(good.logs[:2])


def test_a_split_without_labels_is_one_line(good: QASplit, tmp_path: Path) -> None:
    _collect(good.root, tmp_path / "out", labels=False, logs=[good.logs[0]])
    with pytest.raises(QAError, match="no labelled log to check; collect with labels first"):
        run_qa(tmp_path / "out" / "mini")


def test_flicker_compensates_the_ego_motion() -> None:
    """A wall 3 voxels further ahead after the ego moved 1.5 m back is the same wall: no flicker; taking the
    frames as if the ego stood still sees all of it vanish."""
    grid = VoxelGrid((-8.0, -8.0, -2.0), (8.0, 8.0, 2.0), 0.5)
    a = np.zeros(grid.shape, dtype=bool)
    b = np.zeros(grid.shape, dtype=bool)
    a[20, 4:28, 2:6] = True  # x = 2.25 m in frame a
    b[23, 4:28, 2:6] = True  # x = 3.75 m in frame b: the ego drove 1.5 m backwards
    observed = np.ones(grid.shape, dtype=bool)
    b_from_a = np.eye(4)
    b_from_a[0, 3] = 1.5  # a point of frame a is 1.5 m further ahead in frame b
    vanished, compared = flicker_rate(a, b, observed, b_from_a, grid, ~b)
    assert (vanished, compared) == (0, a.sum())
    vanished, compared = flicker_rate(a, b, observed, np.eye(4), grid, ~b)
    assert vanished == compared == a.sum()
    # a rotation too: the ego turned by 90 degrees (a's +x is b's +y)
    c = np.zeros(grid.shape, dtype=bool)
    c[4:28, 20, 2:6] = True
    turn = np.array([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert flicker_rate(a, c, observed, turn, grid, ~c)[0] == 0
    # unobserved landing voxels are not compared
    assert flicker_rate(a, b, np.zeros(grid.shape, dtype=bool), np.eye(4), grid, ~b) == (0, 0)


def test_run_qa_compares_frames_in_each_others_ego_frame(
    good: QASplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flicker check is given ``ego_this_from_ego_prev = inv(ego2global_this) @ ego2global_prev`` (and its
    inverse for the other direction), from the frame rows' poses; the synthetic ego drives ~4.6 m a frame."""
    from driveengine.labels import qa

    calls: list[np.ndarray] = []
    real = qa.flicker_rate

    def spy(static_a, static_b, observed_b, b_from_a, grid, free_b):
        calls.append(b_from_a.copy())
        return real(static_a, static_b, observed_b, b_from_a, grid, free_b)

    monkeypatch.setattr(qa, "flicker_rate", spy)
    log = open_split(good.split_dir).log(good.logs[0])
    qa.run_qa(good.split_dir, logs=[log.name])
    poses = [
        np.asarray(p, dtype=np.float64).reshape(4, 4)
        for p in log.frames(["ego2global"]).column("ego2global").to_pylist()
    ]
    assert len(calls) == 2 * (len(poses) - 1)
    for i in range(1, len(poses)):
        this_from_prev = np.linalg.inv(poses[i]) @ poses[i - 1]
        assert np.linalg.norm(this_from_prev[:3, 3]) > 2.0  # the ego moved: the transform matters
        np.testing.assert_allclose(calls[2 * (i - 1)], this_from_prev, atol=1e-9)
        np.testing.assert_allclose(calls[2 * i - 1], np.linalg.inv(this_from_prev), atol=1e-9)


# -- show --diff ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def window_0s(good: QASplit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first log of the good split labelled again with another recipe (no window: the key frame's own sweep)."""
    out = tmp_path_factory.mktemp("qa-window") / "out"
    _collect(good.root, out, grid=QA_GRID, label_window_s=0.0, logs=[good.logs[0]])
    return out / "mini"


def test_show_diff_counts_the_voxels_that_differ(good: QASplit, window_0s: Path, tmp_path: Path) -> None:
    log = good.logs[0]
    split_a, split_b = open_split(good.split_dir), open_split(window_0s)
    assert split_b.log(log).labels().attrs["generator"]["window_s"] == 0.0
    a = np.asarray(
        zarr.open_group(str(good.split_dir / split_a.log(log).entry.occ), mode="r")["semantics"][2]
    )
    b = np.asarray(zarr.open_group(str(window_0s / split_b.log(log).entry.occ), mode="r")["semantics"][2])
    expected = {
        "only in A": int(np.sum((a != FREE) & (b == FREE))),
        "only in B": int(np.sum((b != FREE) & (a == FREE))),
        "class differs": int(np.sum((a != FREE) & (b != FREE) & (a != b))),
    }
    assert expected["only in A"] > 0  # a +-10 s window aggregates more than one sweep
    token, diff = diff_frames(good.split_dir, window_0s, log, 2)
    assert diff.counts == expected
    assert token == split_a.log(log).frames(["token"]).column("token")[2].as_py()
    assert np.count_nonzero(diff.kind == ONLY_A) == expected["only in A"]
    assert np.count_nonzero(diff.kind == ONLY_B) == expected["only in B"]
    assert np.count_nonzero(diff.kind == CHANGED) == expected["class differs"]
    # the same label set: nothing differs
    assert diff_frames(good.split_dir, good.split_dir, log, 2)[1].counts == dict.fromkeys(expected, 0)
    code, output = _invoke("show", str(good.split_dir), "--log", log, "--frame", "2", "--diff", str(window_0s),
                           "--out", str(tmp_path / "diff.png"), "--size", "300")  # fmt: skip
    assert code == 0 and "diff.png" in output, output
    png = (tmp_path / "diff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_show_diff_refuses_other_frames_and_grids_in_one_line(
    good: QASplit, window_0s: Path, tmp_path: Path
) -> None:
    log, other = good.logs[0], good.logs[1]
    cases = [
        ((window_0s, good.split_dir, other, 0), f"no log {other!r}"),  # B (here A) lacks the log
        ((good.split_dir, window_0s, log, 9), "has 4 frames, no frame 9"),
    ]
    _collect(good.root, tmp_path / "coarse", grid="-24,-24,-3,24,24,3:1", logs=[log])
    cases.append(((good.split_dir, tmp_path / "coarse" / "mini", log, 0), "differs from"))
    for (a, b, name, frame), why in cases:
        with pytest.raises(VizError, match=why) as info:
            show_diff(a, b, name, frame, tmp_path / "x.png")
        assert "\n" not in str(info.value)
        code, output = _invoke("show", str(a), "--log", name, "--frame", str(frame), "--diff", str(b),
                               "--out", str(tmp_path / "x.png"))  # fmt: skip
        assert code == 2 and why in output and "\n" not in output.strip(), output
    assert not (tmp_path / "x.png").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, why in ((blocker / "d.png", "cannot write the picture"), (tmp_path / "d.xyz", "Format 'xyz'")):
        with pytest.raises(VizError, match=why) as info:
            show_diff(good.split_dir, window_0s, log, 0, out)
        assert "\n" not in str(info.value) and str(out) in str(info.value)
