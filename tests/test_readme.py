"""The README's commands and Python code run as written, on a small synthetic world.

Every fenced ``bash`` command of README.md either runs here (in README order, in one folder, after the
synthetic stand-in for what it expects exists) or is listed in :data:`SKIPPED` with the reason; every
fenced ``python`` block runs unchanged in the folder where the README's own ``collect`` wrote
``dataset/``. Commands are adapted only through :data:`SUBSTITUTIONS` (paths and names of real data).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

#: README commands this test does not run (matched by prefix), each with the reason.
SKIPPED: dict[str, str] = {
    "make demo": "the whole demo (synth, collect, show and a pre-training run: minutes on CI's 2 cores); "
    "its driveengine steps are the commands this test runs",
    "make test": "the test suite itself (CI runs it)",
    "pip install": "installs packages from the package index into the environment running this test",
    "driveengine download": "needs the network (the release mirrors); tests/test_download_*.py cover it on loopback",
    "make pretrain": "a GPU-sized run (--gpu-defaults: full-width ResNet, long schedule); tests/test_pretrain.py "
    "covers pretrain on CPU",
    "torchrun": "needs 8 GPUs (tests/test_ddp.py covers DDP with 2 CPU processes)",
    "FSSPEC_S3_ENDPOINT_URL=": "needs an S3-compatible server and a Dask cluster; tests/test_collect_s3.py runs "
    "collect to S3 on a Dask LocalCluster against a moto server on 127.0.0.1",
}

#: How README commands are adapted to the synthetic world (``{world}``: the synthetic nuPlan root,
#: ``{first_log}``: its first log); nothing else is changed.
SUBSTITUTIONS: dict[str, str] = {
    "/data/nuplan": "{world}",  # the nuPlan root: the synthetic world
    "tcp://scheduler:8786": "local:1",  # an existing Dask cluster: a LocalCluster on 127.0.0.1
    "2021.05.12.22.00.38_veh-35_01008_01518": "{first_log}",  # a real mini log: a synthetic one
}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def readme_commands() -> list[str]:
    text = README.read_text()
    return [
        c
        for lang, body in fenced_blocks(text)
        if lang in ("bash", "sh", "shell")
        for c in shell_commands(body)
    ]


def skip_reason(command: str) -> str | None:
    return next((reason for prefix, reason in SKIPPED.items() if command.startswith(prefix)), None)


def test_readme_blocks_are_known_and_start_with_make() -> None:
    blocks = fenced_blocks(README.read_text())
    assert blocks[0][0] == "bash" and shell_commands(blocks[0][1]) == ["make demo", "make test"]
    assert any(lang == "python" for lang, _ in blocks)
    commands = readme_commands()
    runnable = [c for c in commands if skip_reason(c) is None]
    assert runnable and all(c.startswith("driveengine ") for c in runnable), runnable
    for prefix in SKIPPED:  # the table names commands the README has
        assert any(c.startswith(prefix) for c in commands), prefix
    for old in SUBSTITUTIONS:
        assert any(old in c for c in commands), old


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert result.returncode == 0, (
        f"{shlex.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _driveengine() -> list[str]:
    script = Path(sys.executable).parent / "driveengine"
    return [str(script)] if script.exists() else [sys.executable, "-m", "driveengine"]


@pytest.mark.slow
def test_readme_commands_and_python_run_on_a_synthetic_world(tmp_path: Path) -> None:
    de = _driveengine()
    world, work = tmp_path / "world", tmp_path / "work"
    work.mkdir()
    # A synthetic nuPlan world (key frames 0..11 per log: the README shows frame 10), with sweeps dense enough
    # that `qa` passes its default thresholds (with 2048-ray sweeps most labelled voxels are unobserved).
    _run([*de, "synth", "--out", str(world), "--logs", "2", "--seconds", "6", "--key-frames-only",
          "--image-size", "32x18", "--seed", "3"], tmp_path)  # fmt: skip
    first_log = sorted(p.stem for p in (world / "splits" / "mini").glob("*.db"))[0]
    # What `driveengine download --split mini --out data/` leaves: data/openscene-v1.1/{meta_datas,sensor_blobs}/mini.
    _run([*de, "collect", "--nuplan-root", str(world), "--out", str(tmp_path / "scratch"), "--no-labels", "--no-progress"], tmp_path)  # fmt: skip
    release = work / "data" / "openscene-v1.1"
    _run(
        [*de, "export", str(tmp_path / "scratch" / "mini"), "--out", str(release), "--no-occupancy"], tmp_path
    )
    (release / "sensor_blobs").mkdir()
    (release / "sensor_blobs" / "mini").symlink_to(world / "sensor_blobs")

    ran = []
    for command in readme_commands():
        if skip_reason(command) is not None:
            continue
        for old, new in SUBSTITUTIONS.items():
            command = command.replace(old, new.format(world=world, first_log=first_log))
        words = shlex.split(command)
        _run([*de, *words[1:]], work)
        ran.append(words[1])
    assert ran == [
        "verify", "collect", "collect", "stats", "verify", "show", "report",  # on real data
        "collect", "collect", "collect", "qa", "show", "evaluate",  # labels
        "synth", "splits", "collect", "show", "export", "collect", "pretrain",  # nuScenes
        "pretrain", "export-backbone",  # camera backbones
    ]  # fmt: skip
    for picture in ("frame.png", "diff.png", "scene-0061.png", "v99.pth", "report.html", "qa/qa.json"):
        assert (work / picture).stat().st_size > 0, picture
    assert (work / "dataset" / "mini" / "manifest.json").is_file()

    python_blocks = [body for lang, body in fenced_blocks(README.read_text()) if lang == "python"]
    for k, body in enumerate(python_blocks):
        script = tmp_path / f"readme_block_{k}.py"
        script.write_text(body)
        _run([sys.executable, str(script)], work)
