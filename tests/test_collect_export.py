"""stats, the OpenScene-compatible export and the process_data/ scripts on a collected synthetic split."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from driveengine.schemas.frame import frame_schema
from test_collect_e2e import _touch_blobs
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.collect.runner import CollectConfig, collect
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.sources.openscene.reader import load_openscene_pickle
from driveengine.stats import compute_stats, format_stats
from driveengine.store.frames import read_split_frames
from driveengine.store.manifest import load_manifest
from driveengine.synth import synthesize

FRAME_SCHEMA = frame_schema(CAMERA_CHANNELS)  # nuPlan's frame rows

REPO = Path(__file__).resolve().parents[1]

#: OpenScene v1.1's frame keys (reference §3).
OPENSCENE_KEYS = {
    "token", "frame_idx", "timestamp", "log_name", "log_token", "scene_name", "scene_token", "map_location",
    "roadblock_ids", "vehicle_name", "can_bus", "lidar_path", "lidar2ego_translation", "lidar2ego_rotation",
    "ego2global_translation", "ego2global_rotation", "ego_dynamic_state", "traffic_lights", "driving_command",
    "cams", "sample_prev", "sample_next", "ego2global", "lidar2ego", "lidar2global", "anns",
}  # fmt: skip


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "process_data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    root = tmp_path_factory.mktemp("nuplan")
    logs = synthesize(root, logs=2, seconds=3.0, seed=11, split="mini", blobs=False)
    first_key = logs[0].plan.sweep_filename  # drop some lidar files: frames dropped, counted
    _touch_blobs(logs, root / "sensor_blobs", skip=set(first_key[:40]))
    out = tmp_path_factory.mktemp("out")
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=root, out=out, labels=False, progress=False),
        echo=lambda _: None,
    )
    assert summary.ok
    return root, out / "mini", logs


def test_stats_count_what_the_shards_hold(collected) -> None:
    _, split_dir, logs = collected
    stats = compute_stats(split_dir)
    rows = read_split_frames(split_dir).to_pylist()
    assert stats["logs"] == len(logs) and stats["frames"] == len(rows)
    assert stats["boxes_per_class"] == dict(Counter(n for r in rows for n in r["anns"]["gt_names"]))
    manifest = load_manifest(split_dir)
    assert stats["dropped"] == dict(sum((Counter(e.dropped) for e in manifest.logs.values()), Counter()))
    assert stats["dropped"]["missing_lidar"] == 4  # key frames 0, 10, 20, 30 of log 0
    assert stats["duration_s"] == 0.5 * len(rows)
    text = format_stats(stats)
    assert "missing_lidar" in text and "vehicle" in text


def test_export_writes_openscene_metadata(collected, tmp_path: Path) -> None:
    _, split_dir, logs = collected
    result = subprocess.run(
        [sys.executable, "-m", "driveengine.cli", "export", str(split_dir), "--out", str(tmp_path), "--format", "openscene"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "meta_datas" / "mini").glob("*.pkl"))
    assert [f.stem for f in files] == sorted(log.log_name for log in logs)
    manifest = load_manifest(split_dir)
    for f in files:
        frames = load_openscene_pickle(f)
        assert len(frames) == manifest.logs[f.stem].frames
        for fr in frames:
            assert set(fr) == OPENSCENE_KEYS
            assert list(fr["cams"]) == list(CAMERA_CHANNELS)
            assert fr["can_bus"].shape == (18,) and fr["ego2global"].shape == (4, 4)
            assert fr["anns"]["gt_boxes"].shape[1] == 7 and fr["anns"]["gt_names"].dtype.kind == "U"
            assert isinstance(fr["lidar2ego_rotation"], list) and fr["driving_command"].sum() == 1


def test_process_data_scripts(collected, tmp_path: Path) -> None:
    root, split_dir, logs = collected
    out = tmp_path / "meta_datas" / "mini"
    code = _script("create_openscene_metadata").main(
        ["--nuplan-db-path", str(root / "splits" / "mini"), "--nuplan-sensor-path", str(root / "sensor_blobs"),
         "--out-dir", str(out), "--split", "mini", "--thread-num", "1"]
    )  # fmt: skip
    assert code == 0
    files = sorted(out.glob("*.pkl"))
    assert [f.stem for f in files] == sorted(log.log_name for log in logs)
    # The same frames as `driveengine export` of the collected split.
    export = tmp_path / "export"
    from driveengine.export.openscene import export_openscene_metadata

    for a, b in zip(files, export_openscene_metadata(split_dir, export), strict=True):
        fa, fb = load_openscene_pickle(a), load_openscene_pickle(b)
        assert [x["token"] for x in fa] == [x["token"] for x in fb]
        np.testing.assert_array_equal(
            np.stack([x["can_bus"] for x in fa]), np.stack([x["can_bus"] for x in fb])
        )
    merge = _script("collect_data")
    merge_args = [
        "--meta-dir", str(out), "--out", str(tmp_path / "train.pkl"),
        "--val-out", str(tmp_path / "val.pkl"), "--val-fraction", "0.5",
    ]  # fmt: skip
    assert merge.main(merge_args) == 0
    train = pickle.loads((tmp_path / "train.pkl").read_bytes())
    val = pickle.loads((tmp_path / "val.pkl").read_bytes())
    assert {f["log_name"] for f in train} == {files[0].stem} and {f["log_name"] for f in val} == {
        files[1].stem
    }
    assert [f["timestamp"] for f in train] == sorted(f["timestamp"] for f in train)
    first = (tmp_path / "train.pkl").read_bytes()
    merge.main(merge_args)
    assert (tmp_path / "train.pkl").read_bytes() == first  # deterministic


def test_cli_schema_splits_stats(collected) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["schema"])
    assert out.exit_code == 0
    lines = out.output.splitlines()
    assert all(any(line.startswith(f"{f.name} ") for line in lines) for f in FRAME_SCHEMA)
    assert "version 2" in lines[0]
    out = runner.invoke(app, ["splits"])
    assert out.exit_code == 0 and "navtrain" in out.output and "103288 key frames" in out.output
    _, split_dir, _ = collected
    out = runner.invoke(app, ["stats", str(split_dir), "--json"])
    assert out.exit_code == 0
    assert json.loads(out.output)["frames"] == compute_stats(split_dir)["frames"]


# -- pickles every numpy loads (issue 10.1) ------------------------------------------------------------

#: The modules a pickle of numpy data may name so that numpy 1.21-1.26 and 2.x all import them.
PORTABLE_MODULES = {"numpy", "numpy.core.multiarray"}
#: The old numpy the consumers pin: NAVSIM numpy==1.23.4 (wheels up to Python 3.11; 1.26.4 beyond).
OLD_NUMPY = "1.23.4" if sys.version_info < (3, 12) else "1.26.4"


def _stream_strings(data: bytes) -> tuple[set[str], set[str]]:
    """(``GLOBAL`` arguments, every string pushed) of a pickle, read with pickletools."""
    import pickletools

    globals_, strings = set(), set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            globals_.add(str(arg))
        elif isinstance(arg, str):
            strings.add(arg)
    return globals_, strings


def _written_pickles(collected, tmp_path: Path) -> list[Path]:
    """Every kind of pickle the project writes: `driveengine export`, both process_data/ scripts."""
    root, split_dir, _ = collected
    export = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-m", "driveengine", "export", str(split_dir), "--out", str(export)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = tmp_path / "meta"
    argv = ["--nuplan-db-path", str(root / "splits" / "mini"), "--nuplan-sensor-path", str(root / "sensor_blobs"),
            "--out-dir", str(meta), "--split", "mini", "--thread-num", "1"]  # fmt: skip
    assert _script("create_openscene_metadata").main(argv) == 0
    merged = tmp_path / "merged.pkl"
    assert _script("collect_data").main(["--meta-dir", str(meta), "--out", str(merged)]) == 0
    files = [*sorted((export / "meta_datas" / "mini").glob("*.pkl")), *sorted(meta.glob("*.pkl")), merged]
    assert len(files) == 5
    return files


def test_written_pickles_name_only_modules_numpy_1_and_2_share(collected, tmp_path: Path) -> None:
    import pickletools

    from driveengine.formats.pickles import pickle_module_names

    # the check can fail: a plain numpy-2 pickle names numpy._core
    plain = pickle.dumps({"a": np.zeros(3), "b": np.float64(1.0)}, protocol=4)
    assert "numpy._core.multiarray" in pickle_module_names(plain)
    assert any(s.startswith("numpy._core") for s in _stream_strings(plain)[1])
    for path in _written_pickles(collected, tmp_path):
        data = path.read_bytes()
        globals_, strings = _stream_strings(data)
        assert not globals_, f"{path}: protocol-4 pickles name globals with STACK_GLOBAL, got {globals_}"
        assert not [s for s in strings if s.startswith("numpy._core")], path
        assert pickle_module_names(data) == PORTABLE_MODULES, path
        assert pickletools.genops(data) and data[:2] == b"\x80\x04"  # protocol 4
        assert len(pickle.loads(data)) > 0


def test_only_the_portable_writer_writes_pickles() -> None:
    """Every pickle the package and process_data/ write goes through driveengine.formats.pickles."""
    import re

    allowed = {
        "driveengine/formats/pickles.py",
        # nuPlan-devkit calibration blobs of the synthetic world: lists of floats, never numpy objects
        "driveengine/synth/nuplan_db.py",
    }
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("driveengine", "process_data")
        for path in sorted((REPO / folder).rglob("*.py"))
        if re.search(r"pickle\.(dumps?|Pickler)\b", path.read_text())
        and str(path.relative_to(REPO)) not in allowed
    ]
    assert offenders == []


def _old_numpy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding numpy==OLD_NUMPY alone, installed once per machine (``pip install --target``).

    Cached in ``$DRIVEENGINE_TEST_CACHE`` (default ``~/.cache/driveengine-test``); the test skips, saying
    why, only when pip cannot reach the package index.
    """
    import os
    import shutil

    cache = Path(os.environ.get("DRIVEENGINE_TEST_CACHE", Path.home() / ".cache" / "driveengine-test"))
    target = cache / f"numpy-{OLD_NUMPY}-py{sys.version_info[0]}{sys.version_info[1]}"
    if (target / "numpy" / "__init__.py").is_file() and (target / ".complete").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp_path_factory.mktemp("pip")) / "target"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--retries", "1", "--timeout", "20", "--target", str(tmp), f"numpy=={OLD_NUMPY}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        offline = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                   "Connection refused", "ConnectTimeout", "ReadTimeout", "ProxyError")  # fmt: skip
        if any(s in result.stdout + result.stderr for s in offline):
            pytest.skip(
                f"cannot install numpy=={OLD_NUMPY} (no network to the package index): {result.stderr[-300:]}"
            )
        pytest.fail(f"pip install numpy=={OLD_NUMPY} failed:\n{result.stdout}\n{result.stderr}")
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, target)  # atomic: a concurrent run either sees the whole folder or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run put it there first
    return target


#: Run by the old numpy: load each pickle with plain pickle.load and describe what came back.
_OLD_NUMPY_READER = r"""
import json, pickle, sys
import numpy

out = {"numpy": numpy.__version__, "files": []}
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        frames = pickle.load(f)
    desc = []
    for fr in frames:
        desc.append({
            "token": fr["token"], "frame_idx": fr["frame_idx"],
            "can_bus": [type(fr["can_bus"]).__name__, str(fr["can_bus"].dtype), fr["can_bus"].tolist()],
            "lidar2ego": [str(fr["lidar2ego"].dtype), fr["lidar2ego"].tolist()],
            "intrinsic": fr["cams"]["CAM_F0"]["cam_intrinsic"].tolist(),
            "gt_boxes": [str(fr["anns"]["gt_boxes"].dtype), fr["anns"]["gt_boxes"].tolist()],
            "gt_names": [str(fr["anns"]["gt_names"].dtype.kind), fr["anns"]["gt_names"].tolist()],
            "velocity": fr["anns"]["gt_velocity_3d"].tolist(),
            "driving_command": [str(fr["driving_command"].dtype), fr["driving_command"].tolist()],
        })
    out["files"].append(desc)
print(json.dumps(out))
"""


def test_an_export_loads_under_the_numpy_navsim_pins(collected, tmp_path: Path, tmp_path_factory) -> None:
    """A separate interpreter that sees only numpy==1.23.4 (no site-packages) loads the files with pickle.load."""
    import os

    target = _old_numpy(tmp_path_factory)
    files = _written_pickles(collected, tmp_path)
    env = {"PYTHONPATH": str(target), "PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", _OLD_NUMPY_READER, *map(str, files)],
        capture_output=True, text=True, check=False, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["numpy"] == OLD_NUMPY
    for path, desc in zip(files, seen["files"], strict=True):
        frames = load_openscene_pickle(path)  # what numpy 2 reads, through the restricted unpickler
        assert len(desc) == len(frames) > 0
        for d, fr in zip(desc, frames, strict=True):
            assert d["token"] == fr["token"] and d["frame_idx"] == fr["frame_idx"]
            assert d["can_bus"] == ["ndarray", "float64", fr["can_bus"].tolist()]
            assert d["lidar2ego"] == ["float64", fr["lidar2ego"].tolist()]
            assert d["intrinsic"] == fr["cams"]["CAM_F0"]["cam_intrinsic"].tolist()
            assert d["gt_boxes"] == ["float64", fr["anns"]["gt_boxes"].tolist()]
            assert d["gt_names"] == ["U", fr["anns"]["gt_names"].tolist()]
            assert d["velocity"] == fr["anns"]["gt_velocity_3d"].tolist()
            assert d["driving_command"] == ["int64", fr["driving_command"].tolist()]


def test_numpy_scalars_and_types_load_under_old_numpy(tmp_path: Path, tmp_path_factory) -> None:
    """Scalars (OpenScene pickles hold some, and collect_data.py re-writes them), numpy.bool_, object arrays."""
    import os

    from driveengine.formats.pickles import PickleWriteError, dumps

    target = _old_numpy(tmp_path_factory)
    value = {
        "f64": np.float64(0.1), "f32": np.float32(1.25), "i64": np.int64(-7), "u8": np.uint8(200),
        "bool": np.bool_(True), "bool_type": np.bool_, "str": np.str_("CAM_F0"),
        "f16": np.arange(4, dtype=np.float16), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "objects": np.array([None, "x", 3], dtype=object), "empty": np.zeros((0, 7)),
    }  # fmt: skip
    (tmp_path / "v.pkl").write_bytes(dumps(value))
    reader = (
        "import pickle, sys, numpy as np\n"
        "v = pickle.load(open(sys.argv[1], 'rb'))\n"
        "assert np.__version__ == sys.argv[2]\n"
        "assert type(v['f64']) is np.float64 and v['f64'] == 0.1 and type(v['f32']) is np.float32 and v['f32'] == 1.25\n"
        "assert type(v['i64']) is np.int64 and v['i64'] == -7 and type(v['u8']) is np.uint8 and v['u8'] == 200\n"
        "assert type(v['bool']) is np.bool_ and v['bool'] and v['bool_type'] is np.bool_\n"
        "assert type(v['str']) is np.str_ and v['str'] == 'CAM_F0'\n"
        "assert v['f16'].dtype == np.float16 and v['f16'].tolist() == [0, 1, 2, 3]\n"
        "assert v['fortran'].flags.f_contiguous and v['fortran'].tolist() == [[0, 1, 2], [3, 4, 5]]\n"
        "assert v['objects'].dtype == object and v['objects'].tolist() == [None, 'x', 3]\n"
        "assert v['empty'].shape == (0, 7)\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", reader, str(tmp_path / "v.pkl"), OLD_NUMPY],
        capture_output=True, text=True, check=False, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # numpy 2 reads the same file without a DeprecationWarning (numpy.core's pickle names are silent)
    check = (
        "import pickle, sys, warnings; warnings.simplefilter('error'); pickle.load(open(sys.argv[1], 'rb'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "v.pkl")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # a numpy-2-only object is refused, not written unreadable
    with pytest.raises(PickleWriteError, match="exists only in numpy 2"):
        dumps(np.array(["a"], dtype=np.dtypes.StringDType()))
