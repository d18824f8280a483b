"""The official nuscenes-devkit as a test oracle, in a virtualenv of its own (it pins numpy < 2).

:func:`devkit_python` builds the venv once per machine (cached under ``$DRIVEENGINE_TEST_CACHE``,
default ``~/.cache/driveengine-test``, reused by later runs and CI) with exactly the packages that
``from nuscenes.nuscenes import NuScenes`` imports (``--no-deps``: the devkit also declares
descartes, fire, shapely, pycocotools, parameterized, which its table loading never imports).
:func:`devkit_dump` runs :data:`DUMP_SCRIPT` there: it loads a release with
``NuScenes(version, dataroot)`` and writes what the devkit computes (poses, calibration, boxes in
sensor frames, interpolated boxes of sweeps, box velocities, global LiDAR points, lidarseg counts, map
lookups) as JSON, for tests to compare with DriveEngine's truth or with DriveEngine's reader.

Usage from a test::

    from nuscenes_oracle import DevkitUnavailable, devkit_dump
    try:
        dump = devkit_dump(root, "v1.0-mini", tmp_path / "dump.json")
    except DevkitUnavailable as exc:
        pytest.skip(str(exc))
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: Everything ``from nuscenes.nuscenes import NuScenes`` needs, pinned (numpy < 2 as the devkit requires;
#: opencv 4.10 is the last that accepts numpy 1.x).
DEVKIT_PINS: tuple[str, ...] = (
    "nuscenes-devkit==1.2.0",
    "numpy==1.26.4",
    "opencv-python-headless==4.10.0.84",
    "matplotlib==3.8.4",
    "contourpy==1.2.1",
    "cycler==0.12.1",
    "fonttools==4.53.1",
    "kiwisolver==1.4.5",
    "packaging==24.1",
    "pyparsing==3.1.2",
    "python-dateutil==2.9.0.post0",
    "six==1.16.0",
    "pillow==10.4.0",
    "scikit-learn==1.5.2",
    "scipy==1.13.1",
    "joblib==1.4.2",
    "threadpoolctl==3.5.0",
    "pyquaternion==0.9.9",
    "tqdm==4.66.5",
    "cachetools==5.5.0",
)
#: pip output that means "no route to the package index" (skip), as opposed to a real failure.
OFFLINE_MARKERS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
)


class DevkitUnavailable(RuntimeError):
    """The devkit venv cannot be built because the package index cannot be reached (tests skip)."""


def cache_dir() -> Path:
    """``$DRIVEENGINE_TEST_CACHE`` or ``~/.cache/driveengine-test``."""
    return Path(os.environ.get("DRIVEENGINE_TEST_CACHE", Path.home() / ".cache" / "driveengine-test"))


def venv_dir() -> Path:
    """The cached venv's folder (named by the Python version and a hash of the pins)."""
    digest = hashlib.sha256("\n".join(DEVKIT_PINS).encode()).hexdigest()[:10]
    return cache_dir() / f"nuscenes-devkit-1.2.0-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (one builder at a time across processes), waited for at most ``timeout_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{path}: another process builds the devkit venv for over {timeout_s} s"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def _usable(venv: Path) -> bool:
    """A finished build (``build.json`` is written last) whose interpreter still resolves."""
    return (venv / "build.json").is_file() and _python_of(venv).resolve().is_file()


def devkit_python(timeout_s: float = 900.0) -> Path:
    """The Python of the cached devkit venv, building it first if needed.

    The venv is built in a temporary folder next to its final place and renamed into place only after
    ``from nuscenes.nuscenes import NuScenes`` worked, so an interrupted build (kill -9, disk full) is
    never mistaken for a finished one. ``build.json`` inside records the pins, build seconds and bytes.

    Raises:
        DevkitUnavailable: pip cannot reach the package index.
        RuntimeError: the build failed for another reason (message has pip's output).
    """
    final = venv_dir()
    if _usable(final):
        return _python_of(final)
    with _locked(cache_dir() / ".nuscenes-devkit.lock", timeout_s):
        if _usable(final):  # built by another process while we waited
            return _python_of(final)
        shutil.rmtree(final, ignore_errors=True)  # e.g. its base interpreter is gone: build afresh
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        for stale in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(tmp)],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
            pip = [
                str(_python_of(tmp)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--only-binary=:all:", "--retries", "1", "--timeout", "30", *DEVKIT_PINS,
            ]  # fmt: skip
            left = max(60.0, timeout_s - (time.monotonic() - start))
            result = subprocess.run(pip, capture_output=True, text=True, check=False, timeout=left)
            if result.returncode != 0:
                text = result.stdout + result.stderr
                if any(m in text for m in OFFLINE_MARKERS):
                    raise DevkitUnavailable(
                        f"cannot install nuscenes-devkit (package index unreachable): {text[-300:]}"
                    )
                raise RuntimeError(f"pip install of the devkit venv failed:\n{text[-3000:]}")
            env = _env(tmp)
            check = subprocess.run(
                [str(_python_of(tmp)), "-I", "-c", "from nuscenes.nuscenes import NuScenes; import numpy; print(numpy.__version__)"],
                capture_output=True, text=True, check=False, timeout=300, env=env,
            )  # fmt: skip
            if check.returncode != 0:
                raise RuntimeError(f"the devkit venv cannot import NuScenes:\n{check.stderr[-3000:]}")
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
            build = {
                "pins": list(DEVKIT_PINS),
                "numpy": check.stdout.strip(),
                "seconds": round(time.monotonic() - start, 1),
                "bytes": size,
            }
            (tmp / "build.json").write_text(json.dumps(build, indent=1))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _python_of(final)


def _env(venv: Path) -> dict[str, str]:
    """A minimal environment: no PYTHONPATH, headless matplotlib with its cache inside the venv."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(venv)),
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(venv / "mplconfig"),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }


def run_devkit(script: str, *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (Python source) with ``args`` in the devkit venv (isolated: ``python -I``)."""
    python = devkit_python()
    return subprocess.run(
        [str(python), "-I", "-c", script, *args],
        capture_output=True, text=True, check=False, timeout=timeout_s, env=_env(python.parent.parent),
    )  # fmt: skip


#: Loads a release with the devkit and writes what the devkit computes as JSON (NaN -> null).
#: argv: dataroot, version, output path.
DUMP_SCRIPT = r"""
import json, math, os, sys, time
import numpy as np
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.data_io import load_bin_file
from pyquaternion import Quaternion

dataroot, version, out_path = sys.argv[1:4]
t0 = time.time()
nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
load_s = time.time() - t0

def fl(a):
    return [None if (isinstance(x, float) and math.isnan(x)) else x for x in np.asarray(a, dtype=float).ravel().tolist()]

def box(b):
    return {"center": fl(b.center), "wlh": fl(b.wlh), "rotation": fl(b.orientation.elements), "name": b.name}

out = {"load_s": load_s, "numpy": np.__version__, "scenes": [], "sample_data": {}, "annotations": {}, "lidar": {}}
for scene in nusc.scene:
    log = nusc.get("log", scene["log_token"])
    tokens, tok = [], scene["first_sample_token"]
    while tok:
        s = nusc.get("sample", tok)
        tokens.append(tok)
        tok = s["next"]
    out["scenes"].append({"token": scene["token"], "name": scene["name"], "nbr_samples": scene["nbr_samples"],
                          "logfile": log["logfile"], "location": log["location"], "samples": tokens,
                          "map_token": log["map_token"]})
for sd in nusc.sample_data:
    path, boxes, intrinsic = nusc.get_sample_data(sd["token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    out["sample_data"][sd["token"]] = {
        "channel": sd["channel"], "modality": sd["sensor_modality"], "timestamp": sd["timestamp"],
        "is_key_frame": sd["is_key_frame"], "sample_token": sd["sample_token"], "exists": os.path.exists(path),
        "ego_translation": fl(pose["translation"]), "ego_rotation": fl(pose["rotation"]),
        "cs_translation": fl(cs["translation"]), "cs_rotation": fl(cs["rotation"]),
        "intrinsic": None if intrinsic is None else fl(intrinsic),
        "boxes": {b.token: box(b) for b in boxes},
    }
for ann in nusc.sample_annotation:
    b = nusc.get_box(ann["token"])
    rec = box(b)
    rec.update({"velocity": fl(nusc.box_velocity(ann["token"])), "sample_token": ann["sample_token"],
                "instance_token": ann["instance_token"], "num_lidar_pts": ann["num_lidar_pts"],
                "visibility": nusc.get("visibility", ann["visibility_token"])["level"],
                "attributes": [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]})
    out["annotations"][ann["token"]] = rec
lidarseg = hasattr(nusc, "lidarseg")
for sample in nusc.sample:
    sd_token = sample["data"]["LIDAR_TOP"]
    sd = nusc.get("sample_data", sd_token)
    pc = LidarPointCloud.from_file(nusc.get_sample_data_path(sd_token))
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    pc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
    pc.translate(np.array(cs["translation"]))
    pc.rotate(Quaternion(pose["rotation"]).rotation_matrix)
    pc.translate(np.array(pose["translation"]))
    rec = {"n": int(pc.points.shape[1]), "global_xyz": np.round(pc.points[:3].T, 4).tolist()}
    if lidarseg:
        labels = load_bin_file(os.path.join(dataroot, nusc.get("lidarseg", sd_token)["filename"]))
        rec["labels"] = np.bincount(labels, minlength=32).tolist()
    log = nusc.get("log", nusc.get("scene", sample["scene_token"])["log_token"])
    mask = nusc.get("map", log["map_token"])["mask"]
    rec["ego_on_map"] = bool(mask.is_on_mask(pose["translation"][0], pose["translation"][1])[0])
    out["lidar"][sd_token] = rec
with open(out_path, "w") as f:
    json.dump(out, f)
"""


def devkit_dump(
    dataroot: str | os.PathLike[str],
    version: str,
    out_json: str | os.PathLike[str],
    *,
    timeout_s: float = 600.0,
) -> dict:
    """Run :data:`DUMP_SCRIPT` on a release and return its JSON (see the script for the keys).

    Raises:
        DevkitUnavailable: the devkit venv cannot be built offline.
        AssertionError: the devkit failed on the release (message has its traceback).
    """
    result = run_devkit(DUMP_SCRIPT, str(dataroot), version, str(out_json), timeout_s=timeout_s)
    assert result.returncode == 0, f"the nuscenes-devkit failed on {dataroot}:\n{result.stderr[-4000:]}"
    return json.loads(Path(out_json).read_text())
