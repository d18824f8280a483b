"""One CLI vocabulary: a walk over every command of the Typer/click tree checks the options (``--workers``,
``--progress/--no-progress``, ``--json``, ``-h``, an example, defaults shown, no visible old spellings), then
real runs on a small collected split check that the JSON parses, the hidden old spellings still work,
``NO_COLOR``, ``--quiet``/``--verbose``, ``DRIVEENGINE_DATA`` and ``pretrain --config``."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import typer
from collected_fixture import Collected, collected_split
from stream_fixtures import build_split
from typer.core import TyperArgument, TyperCommand, TyperOption
from typer.testing import CliRunner

from driveengine.cli import app

ANSI = re.compile(r"\x1b\[")

#: Old spellings that must never be listed in a help (they work as hidden aliases).
OLD_NAMES = {"--jobs", "--num-workers", "--sensor-root"}
#: Commands that run work in parallel.
PARALLEL = {"collect", "download", "verify", "md5", "evaluate", "pretrain"}
#: Commands that run long enough to show progress.
LONG_RUNNING = {"collect", "download", "verify", "evaluate", "pretrain", "show", "report", "qa", "synth"}
#: Commands that report something a script may want to read: each has --json.
REPORTING = {
    "version", "inspect", "download", "verify", "md5", "collect", "schema", "splits", "stats", "evaluate",
    "qa", "pretrain",
}  # fmt: skip
#: Commands that write files and print only where they went (no --json), with the reason.
NOT_REPORTING = {
    "synth": "writes a synthetic world; prints the folders it wrote",
    "export": "writes OpenScene/Occ3D files; prints one line per file group",
    "show": "writes a picture or a video",
    "report": "writes an HTML page",
    "export-backbone": "writes backbone.pth and backbone.json",
}
#: Commands whose positional argument is a collected split (metavar SPLIT_DIR).
SPLIT_DIR_COMMANDS = {"stats", "show", "export", "qa", "report"}
#: Options whose None default is not a value (the help says what happens without them).
NONE_MEANS_ABSENT = re.compile(r"default|optional|instead|required|none|only|repeat|e\.g\.", re.I)


def commands() -> dict[str, TyperCommand]:
    """Every command of the app, from the click tree Typer builds (typer carries its own click)."""
    group = typer.main.get_command(app)
    found = dict(group.commands)  # type: ignore[attr-defined]
    assert found and all(isinstance(c, TyperCommand) for c in found.values())
    return found


def visible_options(command: TyperCommand) -> list[TyperOption]:
    return [p for p in command.params if isinstance(p, TyperOption) and not p.hidden]


def names(command: TyperCommand, hidden: bool = False) -> set[str]:
    return {
        name
        for p in command.params
        if isinstance(p, TyperOption) and (hidden or not p.hidden)
        for name in (*p.opts, *p.secondary_opts)
    }


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


# -- the walk ------------------------------------------------------------------------------------


def test_every_command_is_classified() -> None:
    assert set(commands()) == REPORTING | set(NOT_REPORTING), "classify new commands in this test"
    assert not REPORTING & set(NOT_REPORTING)


@pytest.mark.parametrize("name", sorted(commands()))
def test_vocabulary_of_every_command(name: str) -> None:
    command = commands()[name]
    visible = names(command)
    assert not visible & OLD_NAMES, f"{name}: old option names listed in its help"
    if name in PARALLEL or names(command, hidden=True) & {"--jobs", "--num-workers"}:
        assert "--workers" in visible, f"{name}: parallelism is --workers"
    if name in LONG_RUNNING:
        (flag,) = [p for p in command.params if "--progress" in p.opts]
        assert flag.secondary_opts == ["--no-progress"] and flag.default is True
    if "--blob-root" in names(command, hidden=True) or "--sensor-root" in names(command, hidden=True):
        assert "--blob-root" in visible
    assert ("--json" in visible) is (name in REPORTING)
    assert f"Example: driveengine {name} " in (command.help or ""), f"{name}: no example in its help"
    if name in SPLIT_DIR_COMMANDS:
        (argument,) = [p for p in command.params if isinstance(p, TyperArgument)]
        assert argument.metavar == "SPLIT_DIR"
    for option in visible_options(command):
        assert option.show_default is not False, f"{name} {option.opts}: default hidden"
        absent = option.default is None and not option.required and not option.is_flag
        if absent:  # no default value: the help must say what happens without it
            assert NONE_MEANS_ABSENT.search(option.help or ""), f"{name} {option.opts}: default not explained"


def test_pretrain_shows_its_defaults() -> None:
    """Every pretrain option that is a config field shows the field's default (they were all None)."""
    from driveengine.train.config import PretrainConfig

    pretrain = commands()["pretrain"]
    by_name = {p.name: p for p in pretrain.params}
    defaults = PretrainConfig()
    for param, field in (
        ("max_steps", "max_steps"),
        ("lr", "lr"),
        ("workers", "num_workers"),
        ("depth", "depth"),
    ):
        assert by_name[param].default == getattr(defaults, field)
    gpu = PretrainConfig.for_gpu()
    assert f"(--gpu-defaults: {gpu.max_steps})" in by_name["max_steps"].help
    result = invoke("pretrain", "-h", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert re.search(r"--max-steps\s.*\[default: 10\]", result.output)


def test_dash_h_and_completion() -> None:
    root = invoke("-h")
    assert root.exit_code == 0 and "Usage:" in root.output
    assert "--install-completion" in root.output and "DRIVEENGINE_DATA" in root.output
    for name in commands():
        result = invoke(name, "-h")
        assert result.exit_code == 0 and "Usage:" in result.output, name
    # the real command under bash, as a user runs it: the completion script is for the shell it runs in
    # (typer finds it among the process's parents; in CliRunner, without a shell parent, detection fails)
    command = shlex.quote(os.path.join(os.path.dirname(sys.executable), "driveengine"))
    shown = subprocess.run(
        ["bash", "-c", f"{command} --show-completion; exit $?"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0 and "complete -o default -F _driveengine_completion" in shown.stdout, shown


# -- real runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Collected:
    return collected_split(tmp_path_factory)


def _json(result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_output_parses(collected: Collected, tmp_path) -> None:
    split = str(collected.split_dir)
    assert _json(invoke("version", "--json"))["format_version"] >= 2
    assert any(s["name"] == "mini" for s in _json(invoke("splits", "--json")))
    assert any(f["field"] == "token" for f in _json(invoke("schema", "--json"))["fields"])
    assert _json(invoke("stats", split, "--json"))["frames"] > 0
    verified = _json(invoke("verify", split, "--json", "--workers", "2"))
    assert verified["ok"] is True
    metrics = _json(invoke("evaluate", split, split, "--json", "--workers", "1"))
    assert metrics["matched_by"]
    shard = next((collected.split_dir / "meta").glob("*.parquet"))
    assert _json(invoke("inspect", str(shard), "--json"))
    hashed = _json(invoke("md5", str(shard), "--json"))
    assert hashed[0]["file"] == str(shard) and len(hashed[0]["md5"]) == 32
    out = tmp_path / "again"
    summary = _json(
        invoke("collect", "--root", str(collected.root / "in"), "--out", str(out), "--no-labels", "--json")
    )
    assert summary["ok"] is True and summary["done"] == [collected.log] and summary["frames"] > 0


def test_qa_json_parses(collected: Collected) -> None:
    result = invoke("qa", str(collected.split_dir), "--json")
    assert result.exit_code in (0, 1), result.output  # 1: a check failed its threshold (still a report)
    assert "checks" in json.loads(result.stdout)


def test_download_dry_run_json_and_jobs_alias(tmp_path_factory, tmp_path) -> None:
    from download_server import FileServer, cached_release

    release = cached_release(tmp_path_factory)
    with FileServer(release["server"]) as server:
        args = ["download", "--split", "mini", "--shards", "0", "--out", str(tmp_path / "data"), "--dry-run"]
        args += ["--base-url", server.url, "--release-json", str(release["release_json"])]
        plan = _json(invoke(*args, "--json"))
        old = invoke(*args, "--jobs", "2")  # the old spelling still works
    assert plan["plan"] and all(p["state"] == "todo" and p["size"] > 0 for p in plan["plan"])
    assert plan["needed_bytes"] > 0 and plan["outcomes"] == []
    assert old.exit_code == 0 and "state" in old.stdout


def test_hidden_aliases_still_work(collected: Collected, tmp_path) -> None:
    split = str(collected.split_dir)
    hashed = invoke("md5", split + "/manifest.json", "--jobs", "2")
    assert hashed.exit_code == 0 and hashed.stdout.endswith("manifest.json\n")
    assert _json(invoke("verify", split, "--json", "--jobs", "2"))["ok"] is True
    both = _json(invoke("evaluate", "--pred", split, "--gt", split, "--json"))
    assert both == _json(invoke("evaluate", split, split, "--json"))
    twice = invoke("evaluate", split, split, "--pred", split)
    assert twice.exit_code != 0 and "given twice" in str(twice.exception)
    picture = tmp_path / "f.png"
    shown = invoke(
        "show",
        split,
        "--log",
        collected.log,
        "--sensor-root",
        str(collected.blob_root),
        "--out",
        str(picture),
    )
    assert shown.exit_code == 0, shown.output
    assert picture.stat().st_size > 0


def test_no_color_means_no_ansi_codes(collected: Collected) -> None:
    """FORCE_COLOR makes rich colour the help even into a pipe; NO_COLOR must win."""
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    args = [sys.executable, "-m", "driveengine.cli", "stats", "-h"]
    coloured = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert ANSI.search(coloured.stdout)  # the check below can fail
    plain = subprocess.run(
        args, env={**env, "NO_COLOR": "1"}, capture_output=True, text=True, timeout=120, check=True
    )
    assert not ANSI.search(plain.stdout) and "SPLIT_DIR" in plain.stdout
    bad = [sys.executable, "-m", "driveengine.cli", "stats", str(collected.split_dir / "nothing")]
    error = subprocess.run(bad, env={**env, "NO_COLOR": "1"}, capture_output=True, text=True, timeout=120)
    assert error.returncode == 2 and error.stderr.startswith("error: ") and not ANSI.search(error.stderr)


def test_quiet_silences_progress_and_verbose_adds_debug(collected: Collected) -> None:
    split = str(collected.split_dir)
    loud = invoke("verify", split)
    assert loud.exit_code == 0 and re.search(r"^verify: \d+ files, .*done in", loud.stderr, re.M)
    quiet = invoke("--quiet", "verify", split)
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout
    off = invoke("verify", split, "--no-progress")
    assert off.exit_code == 0 and "verify:" not in off.stderr
    verbose = invoke("-v", "stats", split)
    assert verbose.exit_code == 0 and "debug driveengine.cli: driveengine " in verbose.stderr
    assert invoke("-q", "-v", "stats", split).exit_code != 0
    # the options of one in-process run do not leak into the next
    from driveengine import progress

    assert not progress.is_quiet()


def test_split_dir_by_name_under_driveengine_data_or_by_url(collected: Collected) -> None:
    env = {"DRIVEENGINE_DATA": str(collected.split_dir.parent)}
    by_name = _json(invoke("stats", "mini", "--json", env=env))
    assert by_name == _json(invoke("stats", str(collected.split_dir), "--json"))
    missing = invoke("stats", "mini", "--json")  # without the variable: a folder named mini here
    assert missing.exit_code != 0
    as_url = _json(invoke("stats", collected.split_dir.as_uri(), "--json"))  # an fsspec URL as SPLIT_DIR
    assert as_url["frames"] == by_name["frames"] and as_url["logs"] == by_name["logs"]


# -- pretrain --config ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_split(tmp_path_factory.mktemp("tiny"), scenes_per_log=((2,),), points=True)


def test_pretrain_config_round_trip(tiny, tmp_path) -> None:
    runs = tmp_path / "runs"
    first_args = ["pretrain", "--data", str(tiny.root / tiny.split), "--run-dir", str(runs), "--name", "a"]
    first_args += ["--max-steps", "1", "--width", "4", "--stem-stride", "1", "--cpu-threads", "1"]
    first_args += [
        "--eval-every",
        "0",
        "--num-workers",
        "0",
        "--batch-size",
        "1",
        "--json",
    ]  # --num-workers: alias
    first = _json(invoke(*first_args))
    assert first["steps"] == 1
    written = json.loads((runs / "a" / "config.json").read_text())
    assert written["width"] == 4 and written["num_workers"] == 0 and written["split"] == tiny.split
    second = _json(invoke("pretrain", "--config", str(runs / "a" / "config.json"), "--name", "b", "--json"))
    assert second["steps"] == 1
    again = json.loads((runs / "b" / "config.json").read_text())
    assert again == {**written, "name": "b"}  # the file's values, the command line's --name

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**written, "widht": 8}))
    refused = invoke("pretrain", "--config", str(bad))
    assert refused.exit_code != 0
    message = str(refused.exception)
    assert str(bad) in message and "'widht'" in message and "\n" not in message
    bad.write_text(json.dumps({"max_steps": "many"}))
    assert "'max_steps'" in str(invoke("pretrain", "--config", str(bad)).exception)


def test_pretrain_config_error_is_one_line_exit_2(tmp_path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"data": "x", "lr": 0.1, "learning_rate": 3}')
    proc = subprocess.run(
        [sys.executable, "-m", "driveengine.cli", "pretrain", "--config", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {bad}: unknown pretrain config key 'learning_rate'")


def test_no_output_of_a_real_collect_has_carriage_returns(collected: Collected, tmp_path) -> None:
    """collect through a pipe (as `make demo > demo.log` does): lines only."""
    shutil.copytree(collected.root / "in", tmp_path / "in")
    proc = subprocess.run(
        [sys.executable, "-m", "driveengine.cli", "collect", "--root", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
         "--no-labels"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False,
    )  # fmt: skip
    text = proc.stdout.decode()
    assert proc.returncode == 0, text
    assert "\r" not in text and not ANSI.search(text)
    assert re.search(r"^collect: 1/1 log \(100 %\), .*frames/s, done in", text, re.M), text


def test_readme_command_table_matches_the_cli() -> None:
    """Every command is in README.md's table, and every option the table shows exists (visible) on it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("| command | what it does |")
    rows = text[start : text.index("\n\n", start)].splitlines()[2:]
    listed: dict[str, set[str]] = {}
    for row in rows:
        for cell in re.findall(r"`([^`]+)`", row.split("|")[1]):
            words = cell.split()
            listed.setdefault(words[0], set()).update(w for w in words if w.startswith("--"))
    found = commands()
    assert set(listed) == set(found)
    for name, options in listed.items():
        assert options <= names(found[name]), (name, options - names(found[name]))
    vocabulary = text[start : text.index("###", start)]
    for name in (
        "--workers",
        "--progress/--no-progress",
        "--blob-root",
        "--json",
        "DRIVEENGINE_DATA",
        "NO_COLOR",
    ):
        assert name in vocabulary
