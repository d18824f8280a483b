"""The ``driveengine`` command line: one Typer app.

Each command only parses its options and calls one function of a stage; errors that DriveEngine
raises on purpose (:class:`~driveengine.errors.DriveEngineError`) are printed as one line naming the
file and the reason, with exit code 2, instead of a traceback. Heavy imports happen inside commands
so that ``driveengine --help`` stays instant.
"""

from __future__ import annotations

import sys

import typer

from driveengine.errors import DriveEngineError

app = typer.Typer(
    name="driveengine",
    help="DriveEngine: nuPlan / OpenScene driving data into training-ready frame shards and "
    "occupancy/flow labels, from download to pre-training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """DriveEngine: nuPlan / OpenScene driving data, from download to pre-training."""


@app.command()
def version() -> None:
    """Print the DriveEngine version and the on-disk format version."""
    from driveengine import __version__
    from driveengine.schemas import FORMAT_VERSION

    typer.echo(f"driveengine {__version__} (format version {FORMAT_VERSION})")


# -- foundation: inspect, synth ------------------------------------------------------------------
# (commands are added below by each stage; keep each one a thin parse-and-delegate)


def main() -> None:
    """Entry point of the ``driveengine`` console script."""
    try:
        app()
    except DriveEngineError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
