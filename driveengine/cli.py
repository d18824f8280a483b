"""The ``driveengine`` command line: one Typer app.

Each command only parses its options and calls one function of a stage; errors that DriveEngine
raises on purpose (:class:`~driveengine.errors.DriveEngineError`) are printed as one line naming the
file and the reason, with exit code 2, instead of a traceback. Heavy imports happen inside commands
so that ``driveengine --help`` stays instant.

One vocabulary across commands (``tests/test_cli_vocabulary.py`` walks every command and checks it):

* a collected split is a positional ``SPLIT_DIR`` (a folder ``OUT/SPLIT``; with ``DRIVEENGINE_DATA``
  set, a bare split name under it);
* parallelism is ``--workers``, progress ``--progress/--no-progress``, the sensor-blob folder
  ``--blob-root``; every command that reports something has ``--json``;
* ``-h``/``--help``, an ``Example:`` in every help, defaults shown, shell completion
  (``--install-completion``), ``--quiet``/``--verbose`` (:mod:`driveengine.logs`), ``NO_COLOR``;
* old spellings (``--jobs``, ``--num-workers``, ``--sensor-root``, ``evaluate --pred/--gt``) still work as
  hidden aliases for one release.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from driveengine.errors import DriveEngineError
from driveengine.progress import no_color
from driveengine.train.config import PretrainConfig

logger = logging.getLogger(__name__)

#: Environment variable holding the default dataset root (collect's --out, pretrain's --data, and the
#: folder a bare SPLIT_DIR name is looked up in).
DATA_ENV = "DRIVEENGINE_DATA"


def _apply_no_color() -> None:
    """https://no-color.org: with ``NO_COLOR`` set, rich (help, usage errors) writes no ANSI code at all
    (rich's own NO_COLOR support drops colours but keeps bold and dim)."""
    from typer import rich_utils

    rich_utils.COLOR_SYSTEM = None if no_color() else "auto"


_apply_no_color()

app = typer.Typer(
    name="driveengine",
    help="DriveEngine: nuPlan / OpenScene / nuScenes driving data into training-ready frame shards and "
    "occupancy/flow labels, from download to pre-training.\n\n"
    f"Environment: {DATA_ENV} is the default dataset root (collect --out, pretrain --data; a bare split "
    "name as SPLIT_DIR is looked up under it). NO_COLOR=1 turns colours off.\n\n"
    "Example: driveengine collect --root /data/nuplan --split mini --out dataset/ --workers 4",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- the shared vocabulary ------------------------------------------------------------------------

#: Help of a positional collected split.
SPLIT_DIR_HELP = (
    "A collected split: a folder OUT/SPLIT (holds manifest.json) or its fsspec URL (s3://bucket/out/mini); with "
    f"{DATA_ENV} set, a bare split name (mini) is ${DATA_ENV}/mini."
)
#: Help of --progress/--no-progress.
PROGRESS_HELP = "Show progress on stderr: a bar on a terminal, a line every 10 s or 10 % in a file or pipe (off with --json)."


def progress_option() -> bool:
    """``--progress/--no-progress`` (default on), the same on every long-running command."""
    return typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP)


def json_option(what: str = "the result") -> bool:
    """``--json``: print ``what`` as JSON (strict: no NaN) on stdout instead of text."""
    return typer.Option(False, "--json", help=f"Print {what} as JSON instead of text.")


def alias_option(name: str, of: str) -> object:
    """A hidden old spelling ``name`` of the option ``of`` (still works, not listed in the help)."""
    return typer.Option(None, name, hidden=True, help=f"Old name of {of}.")


def split_dir_argument() -> str:
    """The positional ``SPLIT_DIR`` of the commands that read a collected split (a folder or an fsspec URL)."""
    return typer.Argument(..., metavar="SPLIT_DIR", help=SPLIT_DIR_HELP, show_default=False)


def resolve_split_dir(text: str | Path) -> Path | str:
    """A ``SPLIT_DIR`` as the stages open it: a URL as given (``s3://bucket/out/mini``), a folder as a path, or
    ``$DRIVEENGINE_DATA/NAME`` when ``text`` is a bare name that is not a folder here but one under the
    dataset root of the environment."""
    if "://" in str(text):
        return str(text)
    path = Path(text)
    root = os.environ.get(DATA_ENV)
    if root and not path.exists() and len(path.parts) == 1 and (Path(root) / path).is_dir():
        logger.debug("%s: taken as %s (%s)", path, Path(root) / path, DATA_ENV)
        return Path(root) / path
    return path


@contextmanager
def _progress_shown(show: bool) -> Iterator[None]:
    """No progress display of the stage inside the block when ``show`` is False (``--no-progress`` of a stage
    function that has no flag of its own); as before afterwards."""
    from driveengine import progress

    before = progress.is_quiet()
    progress.set_quiet(before or not show)
    try:
        yield
    finally:
        progress.set_quiet(before)


def _notes(json_out: bool) -> Callable[[str], None]:
    """Where a stage's running notes go: stdout, or the log on stderr (silent under --quiet) when stdout holds
    JSON or --quiet was given. The result itself is printed either way."""
    from driveengine.progress import is_quiet

    return logger.info if json_out or is_quiet() else typer.echo


def echo_json(value: object) -> None:
    """Print ``value`` as indented strict JSON (a NaN is an error, never written)."""
    typer.echo(json.dumps(value, indent=1, allow_nan=False))


def parse_image_size(text: str, option: str = "--image-size") -> tuple[int, int]:
    """``(width, height)`` pixels of a ``WIDTHxHEIGHT`` option value (e.g. ``160x90``)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DriveEngineError(f"{option} {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 160x90") from None
    if width < 1 or height < 1:
        raise DriveEngineError(f"{option} {text!r}: width and height must be positive")
    return width, height


def version_line() -> str:
    """``driveengine <version> (format version <n>)``, printed by ``version`` and ``--version``."""
    from driveengine import __version__
    from driveengine.schemas import FORMAT_VERSION

    return f"driveengine {__version__} (format version {FORMAT_VERSION})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the DriveEngine version and the on-disk format version, then exit.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only; no progress display."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug messages too."),
) -> None:
    """DriveEngine: nuPlan / OpenScene driving data, from download to pre-training."""
    from driveengine.logs import configure_logging, restore_logging

    if quiet and verbose:
        raise DriveEngineError("--quiet and --verbose: give one of them")
    _apply_no_color()
    state = configure_logging(-1 if quiet else 1 if verbose else 0)
    ctx.call_on_close(lambda: restore_logging(state))
    logger.debug("%s, command %s", version_line(), ctx.invoked_subcommand)


@app.command()
def version(json_out: bool = json_option("the versions")) -> None:
    """Print the DriveEngine version and the on-disk format version.

    Example: driveengine version --json
    """
    if json_out:
        from driveengine import __version__
        from driveengine.schemas import FORMAT_VERSION

        echo_json({"version": __version__, "format_version": FORMAT_VERSION})
        return
    typer.echo(version_line())


# -- foundation: inspect, synth ------------------------------------------------------------------
# (commands are added below by each stage; keep each one a thin parse-and-delegate)


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(
        ...,
        help="A nuPlan log (.db), point cloud (.pcd), OpenScene metadata (.pkl), frame shard (.parquet) or "
        "label group (.zarr).",
    ),
    json_out: bool = json_option("the summary"),
) -> None:
    """One-screen summary of a file: a log's sweeps and boxes, a PCD's fields, OpenScene metadata (read with a
    restricted unpickler), a frame shard's logs and times, a label group's grid, classes and arrays.

    Example: driveengine inspect dataset/mini/meta/LOG.parquet --json
    """
    from driveengine.inspect import format_summary, inspect_path

    summary = inspect_path(path)
    typer.echo(json.dumps(summary, indent=1) if json_out else format_summary(summary))


@app.command()
def synth(
    out: Path = typer.Option(
        ...,
        "--out",
        help="Output root (nuplan: splits/<split>/*.db, sensor_blobs/<log>/; nuscenes: <version>/*.json, "
        "samples/, sweeps/, maps/).",
    ),
    fmt: str = typer.Option(
        "nuplan", "--format", help="nuplan (SQLite logs) or nuscenes (a v1.0 release: JSON tables, .pcd.bin)."
    ),
    logs: int = typer.Option(2, "--logs", min=0, help="Number of logs (nuscenes: scenes)."),
    seconds: float = typer.Option(20.0, "--seconds", min=0.05, help="Duration of each log, seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes identical files."),
    split: str = typer.Option("mini", "--split", help="nuplan: split directory name under splits/."),
    version: str = typer.Option(
        "v1.0-mini",
        "--version",
        help="nuscenes: the table folder (v1.0-mini, v1.0-trainval, v1.0-test, ...).",
    ),
    lidarseg: bool = typer.Option(False, "--lidarseg", help="nuscenes: also write nuScenes-lidarseg labels."),
    points: int = typer.Option(32_768, "--points", min=64, help="LiDAR rays per sweep (full size: 150016)."),
    image_size: str = typer.Option("160x90", "--image-size", help="Camera image size WIDTHxHEIGHT, pixels."),
    key_frames_only: bool = typer.Option(
        False,
        "--key-frames-only",
        help="nuplan: .pcd only every 10th sweep; nuscenes: key-frame images only.",
    ),
    no_blobs: bool = typer.Option(False, "--no-blobs", help="Databases only (no .pcd/.jpg)."),
    static_only: bool = typer.Option(False, "--static-only", help="Objects never move (the ego does)."),
    progress: bool = progress_option(),
) -> None:
    """Write synthetic nuPlan logs or a nuScenes release with exactly known geometry (demo data, test oracle).

    The same --seed gives the same world in both formats (scene i of nuscenes = log i of nuplan).

    Example: driveengine synth --out world/ --logs 2 --seconds 20
    """
    from driveengine.progress import is_quiet, is_terminal
    from driveengine.synth import synthesize
    from driveengine.synth.api import format_summary
    from driveengine.synth.nuscenes import format_nuscenes_summary, write_nuscenes

    size = parse_image_size(image_size)
    # The writers show a per-log file count: a bar on a terminal; in a log file it would only be noise.
    progress = progress and not is_quiet() and is_terminal(sys.stderr)

    def nuplan_logs() -> str:
        return format_summary(
            synthesize(
                out, logs=logs, seconds=seconds, seed=seed, split=split, points=points, image_size=size,
                key_frames_only=key_frames_only, blobs=not no_blobs, static_only=static_only, progress=progress,
            )
        )  # fmt: skip

    def nuscenes_release() -> str:
        return format_nuscenes_summary(
            write_nuscenes(
                out, scenes=logs, seconds=seconds, seed=seed, version=version, points=points, image_size=size,
                blobs=not no_blobs, camera_sweeps=not key_frames_only, lidarseg=lidarseg,
                static_only=static_only, progress=progress,
            )
        )  # fmt: skip

    writers = {"nuplan": nuplan_logs, "nuscenes": nuscenes_release}
    if fmt not in writers:
        raise DriveEngineError(f"--format {fmt!r}: use one of {', '.join(writers)}")
    typer.echo(writers[fmt]())


# -- download, verify, md5 (driveengine.download) ------------------------------------------------


@app.command()
def download(
    split: str = typer.Option(
        "mini", "--split", help="Release split: mini, trainval, test, private_test_*, navtrain."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Download folder (archives and the extracted openscene-v1.1/ tree)."
    ),
    modality: str | None = typer.Option(
        None, "--modality", help="Comma-separated subset, e.g. metadata,lidar (default: all)."
    ),
    shards: str | None = typer.Option(
        None, "--shards", help="Shards of sharded modalities, e.g. 0-3,7 (default: all)."
    ),
    mirror: str | None = typer.Option(None, "--mirror", help="huggingface (default) or modelscope."),
    base_url: str | None = typer.Option(
        None, "--base-url", help="Any http(s):// or file:// prefix instead of a mirror."
    ),
    workers: int = typer.Option(4, "--workers", min=1, help="Files downloaded in parallel."),
    jobs: int | None = alias_option("--jobs", "--workers"),
    md5_file: Path | None = typer.Option(
        None, "--md5-file", help="md5sum/sha256sum file with expected digests (default: the release's)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List files, sizes and the disk space needed; download nothing."
    ),
    keep_archives: bool = typer.Option(
        False, "--keep-archives", help="Keep archives after a verified extraction."
    ),
    no_extract: bool = typer.Option(False, "--no-extract", help="Download (and verify) archives only."),
    retries: int = typer.Option(
        5, "--retries", min=0, help="Retries per file after failures without progress."
    ),
    backoff: float = typer.Option(
        1.0, "--backoff", min=0.0, help="First retry delay in seconds (doubles per retry)."
    ),
    timeout: float = typer.Option(
        60.0, "--timeout", min=0.1, help="Network timeout in seconds (connect, each read, size probes)."
    ),
    min_speed: float = typer.Option(
        1024.0,
        "--min-speed",
        min=0.0,
        help="Bytes/s a transfer must average over --speed-window, else it is retried as too slow (0: off).",
    ),
    speed_window: float = typer.Option(
        60.0, "--speed-window", min=0.1, help="Seconds over which --min-speed is averaged."
    ),
    deadline: float = typer.Option(
        86400.0,
        "--deadline",
        min=0.0,
        help="Most seconds one archive's download may take, retries included (0: none); .part is kept.",
    ),
    max_extract_ratio: float | None = typer.Option(
        None,
        "--max-extract-ratio",
        min=1.0,
        help="Most extracted bytes per archive byte, against decompression bombs "
        "(default: 5 x the archive's extract_ratio in release.json, i.e. 5.25-15; at least 1 MiB).",
    ),
    release_json: Path | None = typer.Option(
        None, "--release-json", help="Release manifest to use instead of the packaged release.json."
    ),
    progress: bool = progress_option(),
    json_out: bool = json_option("the plan (--dry-run) or the outcome of every archive"),
) -> None:
    """Download, verify and extract OpenScene release archives (resumable: run the same command again).

    The Hugging Face mirror honours HF_ENDPOINT (its base URL, e.g. a proxy) and HF_TOKEN (sent as
    'Authorization: Bearer <token>' to that mirror only). Archives holding links, paths outside --out or
    .driveengine/ members, or expanding past --max-extract-ratio, are refused and leave nothing behind.

    Example: driveengine download --split mini --out data/ --workers 4
    """
    from driveengine.download.download import DownloadRequest, run_download
    from driveengine.download.fetch import FetchOptions
    from driveengine.download.release import parse_shards

    req = DownloadRequest(
        split=split,
        out=out,
        modalities=[m.strip() for m in modality.split(",") if m.strip()] if modality else None,
        shards=parse_shards(shards),
        mirror=mirror,
        base_url=base_url,
        md5_file=md5_file,
        extract=not no_extract,
        keep_archives=keep_archives,
        dry_run=dry_run,
        options=FetchOptions(
            jobs=jobs or workers,
            retries=retries,
            backoff_s=backoff,
            timeout_s=timeout,
            min_speed_bps=min_speed,
            speed_window_s=speed_window,
            deadline_s=deadline,
        ),
        max_extract_ratio=max_extract_ratio,
        release_json=release_json,
    )
    # With --json, the plan and summary lines go to the log on stderr; stdout holds the JSON alone.
    report = run_download(
        req, echo=logger.info if json_out else typer.echo, show_progress=progress and not json_out
    )
    if json_out:
        echo_json(report.to_dict())
    if report.interrupted:
        raise typer.Exit(130)
    if report.failures:
        raise typer.Exit(1)


@app.command()
def verify(
    root: str = typer.Argument(
        ...,
        metavar="DIR",
        help="Download folder (holds openscene-v1.1/), or a collected dataset: OUT/<split> (or its fsspec URL) or OUT with "
        "--split (holds manifest.json), whose committed files are re-hashed against the manifest's sha256s.",
    ),
    split: str = typer.Option("mini", "--split", help="Split to check."),
    json_out: bool = json_option("the report"),
    shard_map: Path | None = typer.Option(
        None,
        "--shard-map",
        help="Published log-to-shard map JSON (e.g. openscene_sensor_trainval_0-199.json).",
    ),
    md5_file: Path | None = typer.Option(
        None,
        "--md5-file",
        help="md5sum file to re-check archives on disk against (default: the known checksums).",
    ),
    content: bool = typer.Option(
        True, "--content/--no-content", help="Check PCD and JPEG headers, not only presence."
    ),
    archives: bool = typer.Option(
        True, "--archives/--no-archives", help="Re-hash archives still on disk against known checksums."
    ),
    workers: int = typer.Option(
        8, "--workers", min=1, help="Threads reading file headers (hashing files, for a collected split)."
    ),
    jobs: int | None = alias_option("--jobs", "--workers"),
    progress: bool = progress_option(),
) -> None:
    """Check that every blob the metadata references exists and is readable; name the shard to fetch.

    Given a collected split (OUT/<split>, or OUT --split S), re-hash its committed files against the
    manifest's sha256s instead and name every file that is missing or differs (exit 1).

    Example: driveengine verify dataset/mini --json
    """
    from driveengine.progress import progress as progress_display
    from driveengine.store.check import collected_split_folder, verify_split

    workers = jobs or workers
    root = resolve_split_dir(root)
    split_dir = collected_split_folder(root, split)
    if split_dir is not None:
        if shard_map is not None or md5_file is not None:
            raise DriveEngineError(
                f"{root}: a collected split; --shard-map and --md5-file apply to a download folder"
            )
        with progress_display(desc="verify", unit="file", show=progress and not json_out) as bar:
            result = verify_split(split_dir, workers=workers, on_file=lambda _: bar.update(1))
        typer.echo(result.to_json() if json_out else result.format())
        if not result.ok:
            raise typer.Exit(1)
        return

    from driveengine.download.verify import verify_release

    report = verify_release(
        root,
        split,
        shard_map=shard_map,
        md5_file=md5_file,
        check_content=content,
        check_archives=archives,
        jobs=workers,
        show_progress=progress and not json_out,
    )
    typer.echo(report.to_json() if json_out else report.format())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def md5(
    files: list[Path] = typer.Argument(..., help="Files to hash.", show_default=False),
    workers: int = typer.Option(1, "--workers", min=1, help="Files hashed in parallel."),
    jobs: int | None = alias_option("--jobs", "--workers"),
    json_out: bool = json_option("a list of {file, md5}"),
) -> None:
    """Print md5sum-compatible lines ('<md5>  <file>') for FILES.

    Example: driveengine md5 data/*.tgz --workers 4 > md5sum.txt
    """
    from driveengine.download.checksums import md5sum_files, md5sum_line
    from driveengine.download.errors import DownloadError

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DownloadError(f"{', '.join(missing)}: no such file")
    digests = md5sum_files(files, jobs=jobs or workers)
    if json_out:
        echo_json([{"file": str(path), "md5": digest} for path, digest in digests])
        return
    for path, digest in digests:
        typer.echo(md5sum_line(digest, path))


# -- collect, schema, splits, stats, export (driveengine.collect, driveengine.store) --------------


@app.command()
def collect(
    split: str = typer.Option(
        "mini", "--split", help="Split name (see `driveengine splits`) or a split YAML file."
    ),
    out: str = typer.Option(
        ...,
        "--out",
        envvar=DATA_ENV,
        help="Output root, a folder or an fsspec URL (s3://bucket/prefix, gs://...; no shared file system "
        "needed with --scheduler); the split is written to OUT/<split>/. A URL's endpoint and credentials "
        f"come from the environment of every process (FSSPEC_S3_ENDPOINT_URL=..., AWS_ACCESS_KEY_ID...). "
        f"Default: ${DATA_ENV}.",
    ),
    source: str = typer.Option(
        "nuplan",
        "--source",
        help="Dataset source: nuplan (SQLite logs), openscene (v1.1 metadata pickles) or nuscenes (v1.0 "
        "JSON tables; logs are scenes, splits nuscenes_*).",
    ),
    root: Path | None = typer.Option(
        None,
        "--root",
        "--nuplan-root",
        "--openscene-root",
        "--nuscenes-root",
        help="The source's input root: nuplan: splits/<folder>/*.db + sensor_blobs/; openscene: "
        "meta_datas/<folder>/*.pkl + sensor_blobs/<folder>/; nuscenes: v1.0-*/*.json + samples/, sweeps/ "
        "(+ lidarseg/). Required.",
    ),
    blob_root: Path | None = typer.Option(
        None, "--blob-root", help="Sensor blob folder, if not the source's default under the root."
    ),
    sensor_root: Path | None = typer.Option(
        None, "--sensor-root", hidden=True, help="Old name of --blob-root."
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Local worker processes (one log per task)."),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        help="Dask: tcp://HOST:PORT (existing cluster) or local:N (LocalCluster on 127.0.0.1); default: local "
        "--workers processes.",
    ),
    logs: str | None = typer.Option(
        None, "--logs", help="Comma-separated log names to collect (default: all of the split)."
    ),
    sample_interval: int = typer.Option(
        10, "--sample-interval", min=1, help="Key frame every N lidar_pc (10 = 2 Hz)."
    ),
    is_test: bool = typer.Option(False, "--is-test", help="Test data: no boxes (null anns)."),
    filter_instance: bool = typer.Option(
        False, "--filter-instance", help="Drop traffic_cone, barrier, czone_sign, generic_object boxes."
    ),
    labels: bool = typer.Option(
        True, "--labels/--no-labels", help="Build occupancy/flow labels (occ/<log>.zarr)."
    ),
    label_window_s: float | None = typer.Option(
        None, "--label-window-s", min=0.0, help="Labels: aggregate sweeps within +-S seconds (default 10)."
    ),
    label_sweep_step: int | None = typer.Option(
        None,
        "--label-sweep-step",
        min=0,
        help="Labels: also aggregate every N-th sweep from each key frame (default 0 = key frames only).",
    ),
    label_box_margin_m: float | None = typer.Option(
        None, "--label-box-margin-m", min=0.0, help="Labels: grow boxes by M metres (default 0.2)."
    ),
    label_visibility: str | None = typer.Option(
        None,
        "--label-visibility",
        help="Labels: mask_lidar from the key frame's own sweep (frame, default) or every sweep (window).",
    ),
    label_whole_track: bool | None = typer.Option(
        None,
        "--label-whole-track/--no-label-whole-track",
        help="Labels: objects from every sweep of their track (default) or only the window's.",
    ),
    label_camera_mask: bool | None = typer.Option(
        None,
        "--label-camera-mask/--no-label-camera-mask",
        help="Labels: also compute mask_camera, the voxels the cameras see (default on).",
    ),
    grid: str | None = typer.Option(
        None,
        "--grid",
        help="Labels: the voxel grid: openscene ([-50,-50,-4,50,50,4] m, 0.5 m), occ3d ([-40,-40,-1,40,40,5.4] "
        "m, 0.4 m), fine (0.25 m over [-50,-50,-5,50,50,3]) or X0,Y0,Z0,X1,Y1,Z1:VOXEL in metres (default: the "
        "recipe's).",
    ),
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        help="Labels: a shipped recipe (openscene, occ3d, fine, openscene-v1) or a recipe YAML file (default: the "
        "source's: occ3d for nuscenes, else openscene); --grid and --label-* override it.",
    ),
    recipe_from: Path | None = typer.Option(
        None,
        "--recipe-from",
        help="Labels: the recipe recorded with another collected split OUT/<split> (rebuild its labels exactly; default: none).",
    ),
    openscene_occupancy: Path | None = typer.Option(
        None,
        "--openscene-occupancy",
        help="Import OpenScene v1.0 occupancy labels from this folder instead of building them.",
    ),
    occ3d_labels: Path | None = typer.Option(
        None,
        "--occ3d-labels",
        help="nuscenes: import Occ3D-nuScenes labels (gts/<scene>/<sample_token>/labels.npz) from this "
        "folder instead of building them.",
    ),
    check_blobs: bool = typer.Option(
        True,
        "--check-blobs/--no-check-blobs",
        help="Drop frames whose .pcd or images are missing or broken (headers and sizes are checked).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo logs even when their manifest entry is up to date."
    ),
    progress: bool = progress_option(),
    json_out: bool = json_option("the run's summary"),
) -> None:
    """Collect nuPlan logs / OpenScene metadata / nuScenes scenes into per-log frame shards (and labels); resumable.

    nuScenes labels default to Occ3D-nuScenes' grid and classes; nuScenes-lidarseg labels, when present,
    give the points in no box their class.

    Example: driveengine collect --root /data/nuplan --split mini --out dataset/ --workers 4
    """
    from driveengine.collect.runner import CollectConfig, CollectError, CollectInterrupted
    from driveengine.collect.runner import collect as run_collect

    if root is None:
        raise CollectError(f"--source {source} needs its input root: --root DIR (or --{source}-root DIR)")
    config = CollectConfig.from_options(
        source=source, root=root, out=out, split=split, blob_root=blob_root or sensor_root,
        sample_interval=sample_interval, is_test=is_test, filter_instance=filter_instance,
        check_blobs=check_blobs, labels=labels, label_window_s=label_window_s,
        label_sweep_step=label_sweep_step, label_box_margin_m=label_box_margin_m,
        label_visibility=label_visibility, label_whole_track=label_whole_track,
        label_camera_mask=label_camera_mask, grid=grid, recipe=recipe, recipe_from=recipe_from,
        openscene_occupancy=openscene_occupancy, occ3d_labels=occ3d_labels,
        overwrite=overwrite,
        logs=[x.strip() for x in logs.split(",") if x.strip()] if logs else None,
        workers=workers, scheduler=scheduler, progress=progress and not json_out,
    )  # fmt: skip
    try:
        summary = run_collect(config, echo=_notes(json_out))
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, exit 130 (128 + SIGINT)
        if isinstance(exc, CollectInterrupted):
            typer.echo(str(exc), err=True)
        else:
            typer.echo("interrupted before any log was collected; run the same command again", err=True)
        raise typer.Exit(130) from None
    if json_out:
        echo_json(summary.to_dict())
    else:
        typer.echo(summary.format())
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
def schema(json_out: bool = json_option("the version and a list of {field, type, doc}")) -> None:
    """Print the Arrow schema of a frame row (field, type, doc) and its version.

    Example: driveengine schema --json
    """
    from driveengine.schemas.frame import FRAME_SCHEMA_VERSION, describe_schema

    rows = describe_schema()
    if json_out:
        fields = [{"field": name, "type": str(dtype), "doc": doc} for name, dtype, doc in rows]
        echo_json({"version": FRAME_SCHEMA_VERSION, "fields": fields})
        return
    width = max(len(name) for name, _, _ in rows)
    typer.echo(f"frame row schema, version {FRAME_SCHEMA_VERSION} (meta/<log>.parquet)")
    for name, dtype, doc in rows:
        typer.echo(f"{name:<{width}}  {dtype}\n{'':<{width}}    {doc}")


@app.command()
def splits(json_out: bool = json_option("a list of the splits")) -> None:
    """List the shipped splits with their dataset, input folder and log / token counts (nuScenes: logs are scenes).

    Example: driveengine splits --json
    """
    from driveengine.splits import list_splits

    shown = list_splits()
    if json_out:
        echo_json(
            [
                {"name": s.name, "dataset": s.dataset, "folder": s.folder, "description": s.description,
                 "logs": None if s.log_names is None else len(s.log_names),
                 "key_frames": None if s.tokens is None else len(s.tokens)}
                for s in shown
            ]
        )  # fmt: skip
        return
    width = max((len(s.name) for s in shown), default=0)
    folder = max((len(s.folder) for s in shown), default=0)
    for s in shown:
        logs = "all logs" if s.log_names is None else f"{len(s.log_names)} logs"
        tokens = "" if s.tokens is None else f", {len(s.tokens)} key frames"
        typer.echo(
            f"{s.name:<{width}}  {s.dataset:<8} folder {s.folder:<{folder}}  {logs}{tokens}  {s.description}"
        )


@app.command()
def stats(
    split_dir: str = split_dir_argument(),
    json_out: bool = json_option("the statistics"),
) -> None:
    """Logs, frames, boxes per class, dropped frames by reason and duration of a collected split.

    Example: driveengine stats dataset/mini --json
    """
    from driveengine.stats import compute_stats, format_stats

    result = compute_stats(resolve_split_dir(split_dir))
    typer.echo(json.dumps(result, indent=1) if json_out else format_stats(result))


@app.command()
def export(
    split_dir: str = split_dir_argument(),
    out: Path = typer.Option(..., "--out", help="Folder for the exported files."),
    fmt: str = typer.Option(
        "openscene",
        "--format",
        help="Export format: openscene (per-log .pkl as OpenScene v1.1) or occ3d (Occ3D-nuScenes "
        "gts/<scene>/<sample_token>/labels.npz of a nuScenes split's labels).",
    ),
    occupancy: bool = typer.Option(
        True,
        "--occupancy/--no-occupancy",
        help="openscene: also export the labels as OpenScene v1.0 occupancy/flow .npy files (logs with labels).",
    ),
) -> None:
    """Export a collected split in OpenScene's formats (metadata .pkl, occupancy .npy) or Occ3D-nuScenes'.

    Example: driveengine export dataset/mini --out openscene/ --format openscene
    """
    from driveengine.export import export_split

    for line in export_split(resolve_split_dir(split_dir), out, fmt, occupancy=occupancy):
        typer.echo(line)


# -- evaluate, show (driveengine.evaluation.evaluate, driveengine.viz) --------------------------------------


@app.command()
def evaluate(
    pred: Path | None = typer.Argument(
        None,
        metavar="PRED",
        show_default=False,
        help="Predicted labels: a collected split folder OUT/SPLIT or an OpenScene v1.0 .npy folder.",
    ),
    gt: Path | None = typer.Argument(
        None,
        metavar="GT",
        show_default=False,
        help="Ground-truth labels: a collected split folder OUT/SPLIT or an OpenScene v1.0 .npy folder.",
    ),
    pred_option: Path | None = typer.Option(None, "--pred", hidden=True, help="Old form of PRED."),
    gt_option: Path | None = typer.Option(None, "--gt", hidden=True, help="Old form of GT."),
    mask: str | None = typer.Option(
        None,
        "--mask",
        help="Count only the ground truth's observed voxels: lidar (mask_lidar), camera (mask_camera, Occ3D's "
        "camera protocol), both, or none (default: lidar when the ground truth has mask_lidar, else none).",
    ),
    mask_lidar: bool | None = typer.Option(
        None,
        "--mask-lidar/--no-mask-lidar",
        help="Older form of --mask lidar / --mask none.",
    ),
    json_out: bool = json_option("the metrics"),
    workers: int = typer.Option(4, "--workers", min=1, help="Threads loading and scoring frames."),
    progress: bool = progress_option(),
) -> None:
    """OpenScene's SSCMetrics numbers (mIoU, completion/foreground/near/far IoU, flow EPE) of PRED vs GT.

    Example: driveengine evaluate predictions/mini dataset/mini --json
    """
    from driveengine.evaluation.evaluate import evaluate as run_evaluate
    from driveengine.evaluation.evaluate import to_json_ready
    from driveengine.evaluation.metrics import format_metrics_table

    pred_dir, gt_dir = _one_of(pred, pred_option, "PRED", "--pred"), _one_of(gt, gt_option, "GT", "--gt")
    progress = progress and not json_out
    result = run_evaluate(
        resolve_split_dir(pred_dir), resolve_split_dir(gt_dir), mask_lidar=mask_lidar, mask=mask, workers=workers,
        progress=progress,
    )  # fmt: skip
    if json_out:  # undefined values are null: strict JSON has no NaN
        echo_json(to_json_ready(result))
    else:
        typer.echo(
            f"pred {result['pred']}\ngt   {result['gt']}\nmask {result['mask']}, matched by {result['matched_by']}"
        )
        typer.echo(format_metrics_table(result))


def _one_of(positional: Path | None, option: Path | None, name: str, old: str) -> Path:
    """A positional argument, or its hidden old option form; exactly one of them."""
    if positional is not None and option is not None:
        raise DriveEngineError(f"{name} given twice ({positional} and {old} {option}): give {name} alone")
    if positional is None and option is None:
        raise DriveEngineError(f"missing {name}: see --help")
    return positional if positional is not None else option  # type: ignore[return-value]


@app.command()
def show(
    split_dir: str = split_dir_argument(),
    log: str = typer.Option(..., "--log", help="Log name (as listed in the manifest)."),
    frame: int = typer.Option(0, "--frame", min=0, help="Row index of the frame in the log (frame_index)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Picture to write (default frame.png); with --video a .mp4 or .gif (default <log>.mp4).",
    ),
    blob_root: Path | None = typer.Option(
        None,
        "--blob-root",
        help="Sensor-blob root for the camera images (default: from the manifest's source).",
    ),
    sensor_root: Path | None = alias_option("--sensor-root", "--blob-root"),
    camera: str = typer.Option(
        "all",
        "--camera",
        help="Cameras to show: all (laid out as on the car), none (BEV only), or names, e.g. CAM_F0,CAM_B0.",
    ),
    video: bool = typer.Option(
        False, "--video", help="Render every frame of the log as a video: MP4 or GIF by the --out suffix."
    ),
    three_d: bool = typer.Option(
        False, "--3d", help="Open an Open3D voxel view of the frame (needs a display and the o3d extra)."
    ),
    size: int | None = typer.Option(
        None, "--size", min=100, help="Picture height in pixels (default 800, 400 for --video)."
    ),
    diff: Path | None = typer.Option(
        None,
        "--diff",
        help="Another collected split with labels of the same frames (e.g. another recipe): picture the voxels "
        "where the two label sets differ (SPLIT_DIR is A, this one B).",
    ),
    progress: bool = progress_option(),
) -> None:
    """Picture of a frame: BEV of occupancy, flow (with a m/s scale), boxes, ego and unobserved voxels, next to
    the cameras as they sit on the car with the boxes projected into them; local time in the title.

    Example: driveengine show dataset/mini --log LOG --frame 10 --out frame.png
    """
    from driveengine.viz import bev

    split_dir = resolve_split_dir(split_dir)
    blob_root = blob_root or sensor_root

    if diff is not None:
        from driveengine.viz.diff import show_diff

        target = show_diff(
            split_dir, resolve_split_dir(diff), log, frame, out or Path("diff.png"), size_px=size or 600
        )
        typer.echo(f"wrote {target}")
        return
    if three_d:
        try:
            bev.show_frame_3d(split_dir, log, frame)
        except bev.VizError as exc:
            typer.echo(f"3D view skipped: {exc}")
        return
    if video:
        target = bev.show_video(
            split_dir, log, out or Path(f"{log}.mp4"), blob_root=blob_root, camera=camera, size_px=size or 400,
            quiet=None if progress else True,
        )  # fmt: skip
    else:
        target = bev.show_frame(
            split_dir,
            log,
            frame,
            out or Path("frame.png"),
            blob_root=blob_root,
            camera=camera,
            size_px=size or 800,
        )
    typer.echo(f"wrote {target}")


@app.command()
def qa(
    split_dir: str = split_dir_argument(),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for qa.json and qa.png (default: print only; --json prints the JSON)."
    ),
    threshold: list[str] | None = typer.Option(
        None,
        "--threshold",
        help="NAME=VALUE overriding a threshold (repeatable), e.g. flicker=0.1, empty_boxes=2, box_range_m=30.",
    ),
    logs: str | None = typer.Option(
        None, "--logs", help="Comma-separated log names to check (default: all)."
    ),
    json_out: bool = json_option("the result"),
    print_recipe: bool = typer.Option(
        False, "--print-recipe", help="Print the split's label recipe as a recipe YAML file and exit."
    ),
    progress: bool = progress_option(),
) -> None:
    """Check a split's labels without ground truth: occupied voxels outside the observed masks, flow on static
    classes, observed boxes without voxels, static voxels that flicker between frames, class-share outliers
    across logs. Exit 1 when a check fails its threshold.

    Example: driveengine qa dataset/mini --out qa/ --threshold flicker=0.1
    """
    from driveengine.labels.qa import QAThresholds, format_qa, run_qa, write_qa_png

    split_dir = resolve_split_dir(split_dir)
    if print_recipe:
        from driveengine.labels.recipe import recipe_from_split, recipe_yaml

        typer.echo(recipe_yaml(recipe_from_split(split_dir)), nl=False)
        return
    thresholds = QAThresholds.with_overrides(list(threshold or []))
    chosen = [x.strip() for x in logs.split(",") if x.strip()] if logs else None
    with _progress_shown(progress and not json_out):
        result = run_qa(split_dir, thresholds, logs=chosen)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "qa.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        write_qa_png(result, out / "qa.png")
    typer.echo(json.dumps(result, indent=1, allow_nan=False) if json_out else format_qa(result))
    if out is not None and not json_out:
        typer.echo(f"wrote {out / 'qa.json'} and {out / 'qa.png'}")
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def report(
    split_dir: str = split_dir_argument(),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write (self-contained)."),
    frames_per_log: int = typer.Option(
        8,
        "--frames-per-log",
        min=1,
        help="Label frames per log read for the voxel statistics (evenly spaced).",
    ),
    thumbnails: bool = typer.Option(
        True, "--thumbnails/--no-thumbnails", help="A BEV thumbnail of the middle frame of each log."
    ),
    progress: bool = progress_option(),
) -> None:
    """One self-contained HTML page about a collected split: voxels per class, boxes per category, frames per log,
    dropped frames by reason, label statistics and generator settings, a BEV thumbnail per log.

    Example: driveengine report dataset/mini --out report.html
    """
    from driveengine.viz.report import write_report

    target = write_report(
        resolve_split_dir(split_dir), out, frames_per_log=frames_per_log, thumbnails=thumbnails,
        quiet=None if progress else True,
    )  # fmt: skip
    typer.echo(f"wrote {target}")


# -- pretrain (driveengine.train) -------------------------------------------------------------------


#: Defaults of ``pretrain``'s options (a run's config) and those of ``--gpu-defaults``, shown in its help.
_PRETRAIN = PretrainConfig()
_PRETRAIN_GPU = PretrainConfig.for_gpu()


def _pretrain_default(name: str) -> object:
    """The default of the config field ``name`` (shown in the help; the field's, or --gpu-defaults')."""
    return getattr(_PRETRAIN, name)


def _pretrain_help(text: str, name: str) -> str:
    """``text`` plus the ``--gpu-defaults`` value of field ``name`` when it differs from the default."""
    gpu = getattr(_PRETRAIN_GPU, name)
    return text if gpu == getattr(_PRETRAIN, name) else f"{text} (--gpu-defaults: {gpu})"


def _pretrain_number(name: str, flag: str, text: str, *aliases: str) -> object:
    """A numeric ``pretrain`` option whose default is the config field ``name``'s."""
    return typer.Option(_pretrain_default(name), flag, *aliases, help=_pretrain_help(text, name))


#: pretrain's options that are config fields of the same name (given on the command line, they override
#: --config FILE, which overrides --gpu-defaults, which overrides the defaults).
_PRETRAIN_FIELDS: dict[str, str] = {
    "depth": "depth", "width": "width", "stem_stride": "stem_stride", "batch_size": "batch_size",
    "grad_accum": "grad_accum", "max_steps": "max_steps", "lr": "lr", "warmup_steps": "warmup_steps",
    "workers": "num_workers", "num_workers_alias": "num_workers", "eval_every": "eval_every",
    "eval_frames": "eval_frames", "ckpt_every": "ckpt_every", "cpu_threads": "cpu_threads", "seed": "seed",
    "samples_per_epoch": "samples_per_epoch", "classes": "classes", "eval_split": "eval_split",
    "blob_root": "blob_root", "sensor_root": "blob_root", "name": "name", "run_dir": "run_dir",
    "resume": "resume", "device": "device", "compile_model": "compile", "progress": "progress",
    "modality": "modality", "lift_voxel": "lift_voxel_size_m", "history": "camera_history",
    "backbone_weights": "backbone_weights",
}  # fmt: skip


@app.command()
def pretrain(
    ctx: typer.Context,
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="A run's config.json (as pretrain writes it in the run folder) to start from; options given on "
        "the command line override its values (default: none).",
    ),
    data: list[str] | None = typer.Option(
        None,
        "--data",
        envvar=DATA_ENV,
        help="Collect output folder OUT (local or s3://...), or a split folder OUT/SPLIT; required (here or in "
        f"--config; default: ${DATA_ENV}). Repeat to train on a mix of splits. Demo data: `make pretrain`, or "
        "`python -m driveengine.demo --data-only` then --data demo_data/dataset.",
    ),
    split: list[str] | None = typer.Option(
        None,
        "--split",
        help="Split folder under --data to train on (default mini, or the split of --data OUT/SPLIT); once "
        "for every --data, or once per --data in the same order.",
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Mix weights, one per --data, e.g. 0.7,0.3: each split's expected share of the samples (default: "
        "every frame of every split once per epoch).",
    ),
    classes: str = typer.Option(
        _pretrain_default("classes"),
        "--classes",
        help="Label classes: native (the splits' own table, which they must share), unified (mapped onto the "
        "unified table), auto (native if the splits share a table, else unified).",
    ),
    samples_per_epoch: int = _pretrain_number(
        "samples_per_epoch", "--samples-per-epoch", "Weighted mixes: samples per epoch (0: all the frames)."
    ),
    eval_split: str | None = typer.Option(
        None, "--eval-split", help="Split to evaluate on (default: --split; with several --data, for each)."
    ),
    blob_root: str | None = typer.Option(
        None, "--blob-root", help="Folder the sensor paths start from (default: as each log was collected)."
    ),
    sensor_root: str | None = alias_option("--sensor-root", "--blob-root"),
    name: str = typer.Option(
        _pretrain_default("name"), "--name", help="Run name: outputs go to <run-dir>/<name>/."
    ),
    run_dir: str = typer.Option(_pretrain_default("run_dir"), "--run-dir", help="Parent folder of runs."),
    gpu_defaults: bool = typer.Option(
        False,
        "--gpu-defaults",
        help="Start from the defaults of a real GPU run (full-width ResNet, long schedule; shown with each "
        "option).",
    ),
    modality: str = typer.Option(
        _pretrain_default("modality"),
        "--modality",
        help="A registered pre-training task: lidar (points -> BEV) or camera (images -> image backbone + lift).",
    ),
    backbone: str | None = typer.Option(
        None,
        "--backbone",
        help="Camera runs: resnet18 (default), resnet34, resnet50, resnet101 or vovnet99 (V-99-eSE).",
    ),
    image_size: str | None = typer.Option(
        None, "--image-size", help="Camera runs: images resized to WIDTHxHEIGHT pixels (default 384x216)."
    ),
    lift_voxel: float | None = typer.Option(
        None, "--lift-voxel", help="Camera runs: voxel size (m) of the lift grid (default: the label grid's)."
    ),
    history: int = _pretrain_number("camera_history", "--history", "Camera runs: previous key frames fused."),
    backbone_weights: str | None = typer.Option(
        None,
        "--backbone-weights",
        help="Camera runs: a local weights file to start from (torchvision ResNet .pth; VoVNet-99 in the "
        "mmdet3d-plugin names, e.g. fcos3d_vovnet_imgbackbone-remapped.pth; default: random); needs --width 64.",
    ),
    depth: int = _pretrain_number(
        "depth",
        "--depth",
        "ResNet depth of the LiDAR encoder: 18, 34, 50 or 101 (camera runs: = --backbone resnetN).",
    ),
    width: int = _pretrain_number(
        "width",
        "--width",
        "Channels of the backbone's first convolution (64 = the published network; smaller scales every layer).",
    ),
    stem_stride: int = _pretrain_number("stem_stride", "--stem-stride", "ResNet stem stride: 1, 2 or 4."),
    batch_size: int = _pretrain_number("batch_size", "--batch-size", "Samples per rank per micro-step."),
    grad_accum: int = _pretrain_number("grad_accum", "--grad-accum", "Micro-steps per optimiser step."),
    max_steps: int = _pretrain_number("max_steps", "--max-steps", "Optimiser steps."),
    lr: float = _pretrain_number("lr", "--lr", "Peak learning rate (AdamW)."),
    warmup_steps: int = _pretrain_number("warmup_steps", "--warmup-steps", "Linear warmup steps."),
    workers: int = _pretrain_number("num_workers", "--workers", "DataLoader worker processes per rank."),
    num_workers_alias: int | None = alias_option("--num-workers", "--workers"),
    eval_every: int = _pretrain_number("eval_every", "--eval-every", "Evaluate every N steps (0 = never)."),
    eval_frames: int = _pretrain_number(
        "eval_frames", "--eval-frames", "Frames per evaluation (0 = the whole eval split)."
    ),
    ckpt_every: int = _pretrain_number(
        "ckpt_every", "--ckpt-every", "Checkpoint every N steps (0 = only at the end)."
    ),
    resume: str | None = typer.Option(
        None,
        "--resume",
        help="Checkpoint to resume from, or 'auto' (<run>/last.pt if present; default: none).",
    ),
    device: str = typer.Option(_pretrain_default("device"), "--device", help="auto, cpu or cuda."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    cpu_threads: int = _pretrain_number(
        "cpu_threads", "--cpu-threads", "torch intra-op threads (0 = torch's default)."
    ),
    seed: int = _pretrain_number("seed", "--seed", "Seed of the data order and the initialisation."),
    progress: bool = progress_option(),
    json_out: bool = json_option("the run's summary"),
) -> None:
    """Occupancy/flow pre-training from LiDAR or 8 cameras (ResNet, VoVNet-99); DDP under torchrun; resumable.

    Writes <run-dir>/<name>/config.json; --config reads one back (a run again, or a variant of it).

    Example: driveengine pretrain --data dataset/mini --max-steps 100 --workers 4
    """
    from driveengine.models.backbones import camera_backbone_option
    from driveengine.train.config import data_options, data_sources, load_config
    from driveengine.train.loop import pretrain as run_pretrain

    given = {
        key: value
        for key, value in ctx.params.items()
        if key in _PRETRAIN_FIELDS and value is not None and _from_command_line(ctx, key)
    }
    chosen = {_PRETRAIN_FIELDS[key]: value for key, value in given.items()}
    if data and (config_file is None or _from_command_line(ctx, "data", environment=False)):
        chosen.update(data_options(data_sources(data, split or [], weights)))
    elif split:
        if len(split) > 1 or weights:
            raise DriveEngineError("several --split, or --weights, need as many --data (see --help)")
        chosen["split"] = split[0]
    if image_size:
        chosen["image_size"] = parse_image_size(image_size)
    if json_out:  # stdout holds the JSON alone, stderr no progress
        chosen["progress"] = False
    base = PretrainConfig.for_gpu() if gpu_defaults else PretrainConfig()
    if config_file is not None:
        base = load_config(config_file, base)
    if config_file is None or backbone is not None or "depth" in chosen or "modality" in chosen:
        chosen["backbone"] = camera_backbone_option(
            str(chosen.get("modality", base.modality)), backbone, chosen.get("depth")
        )
    config = PretrainConfig.from_dict({**base.to_dict(), **chosen})
    logger.debug("pretrain config: %s", config.to_dict())
    summary = run_pretrain(config)
    if summary.world_size > 1 and summary.rank != 0:
        return
    last = summary.train_loss[-1][1] if summary.train_loss else float("nan")
    if json_out:
        from driveengine.evaluation.evaluate import to_json_ready

        echo_json(
            to_json_ready(
                {"run_dir": summary.run_dir, "steps": summary.step, "device": summary.device,
                 "world_size": summary.world_size, "last_loss": last, "eval": summary.eval,
                 "checkpoint": summary.checkpoint}
            )
        )  # fmt: skip
        return
    typer.echo(
        f"pretrain: {summary.step} steps on {summary.device} x{summary.world_size}, last loss {last:.4f}"
    )
    if summary.eval:
        from driveengine.evaluation.metrics import summary_line

        typer.echo(f"eval: {summary_line(summary.eval)}")
    typer.echo(f"run folder {summary.run_dir} (metrics.csv, config.json, checkpoints)")


def _from_command_line(ctx: typer.Context, name: str, environment: bool = True) -> bool:
    """Whether option ``name`` was given on the command line (or, with ``environment``, by its environment
    variable), not left at its default."""
    source = ctx.get_parameter_source(name)  # an enum of the click that typer carries: compared by name
    return source is not None and source.name in (
        ("COMMANDLINE", "ENVIRONMENT") if environment else ("COMMANDLINE",)
    )


@app.command("export-backbone")
def export_backbone(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint of `driveengine pretrain --modality camera` (e.g. runs/<name>/last.pt)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output file (default: backbone.pth next to the checkpoint)."
    ),
    key_prefix: str = typer.Option(
        "", "--key-prefix", help="Prefix for every key, e.g. img_backbone. for an mmdet3d load_from."
    ),
) -> None:
    """Save the camera model's backbone alone, named as downstream code names it (backbone.pth + backbone.json
    with the config lines that load it).

    Example: driveengine export-backbone runs/camera/last.pt --key-prefix img_backbone.
    """
    from driveengine.models.export import export_backbone as run_export

    exported = run_export(checkpoint, out, key_prefix)
    typer.echo(f"wrote {exported.path} ({exported.info.format}) and {exported.meta_path}")


def main() -> None:
    """Entry point of the ``driveengine`` console script."""
    try:
        app()
    except DriveEngineError as exc:
        typer.secho(f"error: {exc}", err=True, fg=None if no_color() else typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
