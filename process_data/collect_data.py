"""OpenScene-compatible: merge per-log metadata pickles into one custom split pickle.

Reads ``<meta-dir>/*.pkl`` (untrusted pickles: loaded with DriveEngine's restricted unpickler, which
admits only builtins and numpy arrays), keeps the logs of ``--split`` if given, and writes the frames
sorted by (log name, timestamp), so the output is deterministic. As OpenScene's script does for the
mini split, ``--val-out`` sends the last ``--val-fraction`` of the (sorted) logs to a second file.
The outputs are written by :func:`driveengine.formats.pickles.write_pickle`: numpy 1.21-2.x load them
with plain ``pickle.load``.

Example::

    python process_data/collect_data.py --meta-dir openscene-v1.1/meta_datas/mini \\
        --out openscene_mini_train.pkl --val-out openscene_mini_val.pkl --val-fraction 0.15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def merge(files: list[Path]) -> list[dict]:
    """Frames of ``files`` (restricted unpickling), sorted by (log name, timestamp, token)."""
    from driveengine.sources.openscene.reader import load_openscene_pickle

    frames = [f for path in files for f in load_openscene_pickle(path)]
    return sorted(frames, key=lambda f: (str(f["log_name"]), int(f["timestamp"]), str(f["token"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meta-dir", type=Path, required=True, help="folder of per-log <log>.pkl files")
    parser.add_argument("--out", type=Path, required=True, help="merged pickle (train part with --val-out)")
    parser.add_argument("--split", help="keep only the logs of this split (name or YAML path)")
    parser.add_argument("--val-out", type=Path, help="second pickle for the last --val-fraction of the logs")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="fraction of logs for --val-out")
    args = parser.parse_args(argv)

    from driveengine.splits import load_split

    from driveengine.errors import DriveEngineError
    from driveengine.formats.pickles import write_pickle

    try:
        files = sorted(args.meta_dir.glob("*.pkl"))
        if args.split:
            keep = set(load_split(args.split).select_logs([f.stem for f in files]))
            files = [f for f in files if f.stem in keep]
        if not files:
            print(f"error: {args.meta_dir}: no .pkl files to merge", file=sys.stderr)
            return 2
        n_val = int(len(files) * args.val_fraction) if args.val_out else 0
        train, val = files[: len(files) - n_val], files[len(files) - n_val :]
        write_pickle(args.out, merge(train))
        print(f"{args.out}: {len(train)} logs")
        if args.val_out:
            write_pickle(args.val_out, merge(val))
            print(f"{args.val_out}: {len(val)} logs")
    except DriveEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
