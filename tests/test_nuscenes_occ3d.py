"""Occ3D-nuScenes labels: import (``collect --occ3d-labels``) into the Zarr store with the optional
``mask_camera`` array, export back (``export --format occ3d``) with byte-equal arrays, and hostile files.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES
from driveengine.schemas.occ import LABEL_ARRAYS, REQUIRED_ARRAYS
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.collect.config import CollectConfig, CollectError
from driveengine.collect.runner import collect
from driveengine.errors import DriveEngineError
from driveengine.labels.occ3d_import import Occ3DLabelError, labels_path, read_labels_npz
from driveengine.store.dataset import open_split
from driveengine.synth.nuscenes import write_nuscenes

SHAPE = (200, 200, 16)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIVEENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "de-cache"))


def _labels(rng: np.random.Generator) -> dict[str, np.ndarray]:
    sem = rng.integers(0, 18, SHAPE).astype(np.uint8)
    sem[rng.random(SHAPE) < 0.8] = 17
    lidar = (rng.random(SHAPE) < 0.4).astype(np.uint8)
    camera = lidar & (rng.random(SHAPE) < 0.5).astype(np.uint8)
    return {"semantics": sem, "mask_lidar": lidar, "mask_camera": camera}


@pytest.fixture(scope="module")
def occ3d(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic release of 2 scenes and Occ3D files for every sample (as Occ3D ships them)."""
    root = tmp_path_factory.mktemp("ns_occ3d")
    scenes = write_nuscenes(root / "nuscenes", scenes=2, seconds=2.0, seed=4, points=512, image_size=(32, 18))
    rng = np.random.default_rng(0)
    truth = {}
    for scene in scenes:
        for token in scene.samples.token.tolist():
            arrays = _labels(rng)
            path = root / "occ3d" / "gts" / scene.name / token / "labels.npz"
            path.parent.mkdir(parents=True)
            np.savez_compressed(path, **arrays)
            truth[(scene.name, token)] = arrays
    split = root / "all.yaml"
    split.write_text(yaml.safe_dump({"name": "all", "dataset": "nuscenes", "folder": "v1.0-mini"}))
    return root, scenes, truth, split


def test_import_then_export_gives_byte_equal_arrays(occ3d, tmp_path: Path) -> None:
    root, _scenes, truth, split = occ3d
    runner = CliRunner()
    result = runner.invoke(app, ["collect", "--source", "nuscenes", "--nuscenes-root", str(root / "nuscenes"),
                                 "--split", str(split), "--out", str(tmp_path / "out"), "--occ3d-labels",
                                 str(root / "occ3d"), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    dataset = open_split(tmp_path / "out" / "all")
    assert dataset.classes == OCC3D_NUSCENES_CLASSES and dataset.grid.shape == SHAPE
    for log in dataset.logs:
        occ = log.labels()
        assert occ.arrays == ("semantics", "flow", "mask_lidar", "mask_camera")
        assert (
            occ.attrs["generator"]["kind"] == "occ3d-nuscenes-import"
            and "no flow" in occ.attrs["generator"]["flow"]
        )
        block = occ.read()
        tokens = log.frames(["token"]).column("token").to_pylist()
        assert not block["flow"].any() and block["mask_camera"].dtype == bool
        for i, token in enumerate(tokens):
            want = truth[(log.name, token)]
            assert np.array_equal(block["semantics"][i], want["semantics"])
            assert np.array_equal(block["mask_camera"][i], want["mask_camera"].astype(bool))
    result = runner.invoke(app, ["export", str(tmp_path / "out" / "all"), "--out", str(tmp_path / "exp"),
                                 "--format", "occ3d"])  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "exp" / "gts").glob("*/*/labels.npz"))
    assert len(files) == len(truth)
    for f in files:
        want = truth[(f.parent.parent.name, f.parent.name)]
        with np.load(f, allow_pickle=False) as got:
            assert sorted(got.files) == sorted(want)
            for name, array in want.items():
                assert got[name].dtype == array.dtype and got[name].shape == array.shape
                assert got[name].tobytes() == array.tobytes(), (f, name)
    # the exported tree imports again, identically
    summary = collect(CollectConfig.from_options(
        source="nuscenes", root=root / "nuscenes", out=tmp_path / "again", split=str(split),
        occ3d_labels=tmp_path / "exp", progress=False,
    ), echo=lambda _: None)  # fmt: skip
    assert summary.ok
    for a, b in zip(
        open_split(tmp_path / "out" / "all").logs, open_split(tmp_path / "again" / "all").logs, strict=True
    ):
        x, y = a.labels().read(), b.labels().read()
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_a_bad_label_file_fails_its_scene_only(occ3d, tmp_path: Path) -> None:
    root, scenes, truth, split = occ3d
    bad = tmp_path / "occ3d"
    for (scene, token), arrays in truth.items():
        path = bad / "gts" / scene / token / "labels.npz"
        path.parent.mkdir(parents=True)
        np.savez_compressed(path, **arrays)
    victim = bad / "gts" / scenes[0].name / scenes[0].samples.token[1] / "labels.npz"
    sem = truth[(scenes[0].name, scenes[0].samples.token[1])]["semantics"].copy()
    sem[0, 0, 0] = 18
    np.savez_compressed(victim, semantics=sem, mask_lidar=sem * 0, mask_camera=sem * 0)
    (bad / "gts" / scenes[0].name / scenes[0].samples.token[2] / "labels.npz").unlink()
    summary = collect(CollectConfig.from_options(
        source="nuscenes", root=root / "nuscenes", out=tmp_path / "out", split=str(split), occ3d_labels=bad,
        progress=False,
    ), echo=lambda _: None)  # fmt: skip
    assert summary.done == [scenes[1].name] and list(summary.failed) == [scenes[0].name]
    why = summary.failed[scenes[0].name]
    assert (
        "2 of" in why and "class id 18" in why and f"{scenes[0].samples.token[2]}/labels.npz: missing" in why
    )
    assert not (tmp_path / "out" / "all" / "occ" / f"{scenes[0].name}.zarr").exists()


def _npz_with(path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_hostile_label_files_are_refused_before_reading(tmp_path: Path) -> None:
    good = {k: _npy(v) for k, v in _labels(np.random.default_rng(1)).items()}
    assert (
        read_labels_npz(
            _npz_with(tmp_path / "ok.npz", {f"{k}.npy": v for k, v in good.items()})
        ).semantics.shape
        == SHAPE
    )
    cases = {
        "bomb": ({"semantics.npy": b"\0" * 50_000_000}, "declares 50000000 bytes"),
        "huge header": (
            {"semantics.npy": _npy(np.zeros(1, np.uint8)).replace(b"(1,)", b"(100000, 100000, 16)")},
            "expected uint8",
        ),
        "float": ({"semantics.npy": _npy(np.zeros(SHAPE, np.float32)[:10])}, "expected uint8"),
        "shape": (
            {"semantics.npy": _npy(np.zeros((200, 200, 15), np.uint8))},
            "expected uint8 (200, 200, 16)",
        ),
        "short": ({"semantics.npy": good["semantics"][:-10]}, "data bytes"),
        "missing member": ({}, "no array 'semantics'"),
        "mask 2": ({"mask_lidar.npy": _npy(np.full(SHAPE, 2, np.uint8))}, "mask_lidar holds 2"),
        "pickle": ({"semantics.npy": _npy(np.array([{"a": 1}], dtype=object))}, "expected uint8"),
    }
    for label, (override, message) in cases.items():
        members = {f"{k}.npy": v for k, v in good.items()}
        if label == "missing member":
            members.pop("semantics.npy")
        members.update(override)
        path = _npz_with(tmp_path / f"{label}.npz", members)
        with pytest.raises(Occ3DLabelError, match=re.escape(message)):
            read_labels_npz(path)
    (tmp_path / "not.npz").write_bytes(b"not a zip at all")
    with pytest.raises(Occ3DLabelError, match=r"not\.npz"):
        read_labels_npz(tmp_path / "not.npz")
    os.symlink(tmp_path / "ok.npz", tmp_path / "link.npz")
    with pytest.raises(Occ3DLabelError, match="symbolic link"):
        read_labels_npz(tmp_path / "link.npz")
    for scene, token in (("..", "a"), ("scene-1", "../../etc"), ("a/b", "c"), ("s", "")):
        with pytest.raises(Occ3DLabelError, match="not a plain file name"):
            labels_path(tmp_path, scene, token)


def test_mask_camera_is_a_registered_optional_array() -> None:
    spec = LABEL_ARRAYS["mask_camera"]
    assert not spec.required and spec.dtype == np.dtype(bool) and "mask_camera" not in REQUIRED_ARRAYS


def test_export_and_import_refuse_other_datasets(occ3d, tmp_path: Path) -> None:
    root, _scenes, _truth, split = occ3d
    with pytest.raises(CollectError, match="choose one"):
        CollectConfig.from_options(
            source="nuscenes", root=root, out=tmp_path, occ3d_labels=root, openscene_occupancy=root
        )
    with pytest.raises(DriveEngineError, match="use --source nuscenes"):
        collect(CollectConfig.from_options(source="nuplan", root=root, out=tmp_path / "x", split="mini",
                                           occ3d_labels=root / "occ3d", progress=False), echo=lambda _: None)  # fmt: skip
    # generated labels without a camera mask: exported without mask_camera, and said so
    summary = collect(CollectConfig.from_options(source="nuscenes", root=root / "nuscenes", out=tmp_path / "gen",
                                                 split=str(split), label_window_s=0.5, label_camera_mask=False,
                                                 progress=False),
                      echo=lambda _: None)  # fmt: skip
    assert summary.ok
    lines = list(__import__("driveengine.export", fromlist=["export_split"]).export_split(
        tmp_path / "gen" / "all", tmp_path / "exp", "occ3d"))  # fmt: skip
    assert any("without a camera mask" in line for line in lines)
    with np.load(next((tmp_path / "exp" / "gts").glob("*/*/labels.npz"))) as f:
        assert sorted(f.files) == ["mask_lidar", "semantics"] and f["semantics"].dtype == np.uint8
    no_labels = collect(CollectConfig.from_options(source="nuscenes", root=root / "nuscenes", out=tmp_path / "meta",
                                                   split=str(split), labels=False, progress=False),
                        echo=lambda _: None)  # fmt: skip
    assert no_labels.ok
    result = CliRunner().invoke(app, ["export", str(tmp_path / "meta" / "all"), "--out", str(tmp_path / "e2"),
                                      "--format", "occ3d"])  # fmt: skip
    assert result.exit_code != 0 and "no committed log has labels" in str(result.exception)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "gen" / "all"), "--out", str(tmp_path / "e3"),
                                      "--format", "nope"])  # fmt: skip
    assert "unknown export format 'nope'; available: openscene, occ3d" in str(result.exception)
