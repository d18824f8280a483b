"""OpenScene-compatible entry point: nuPlan ``.db`` logs -> OpenScene v1.1 ``meta_datas`` pickles.

Takes OpenScene's ``create_openscene_metadata.py`` flags and writes ``<out-dir>/<log>.pkl`` with
OpenScene's key set and value types, via DriveEngine: the logs are collected (resumably, in parallel,
without labels) into ``<out-dir>/.driveengine/<split>/`` and exported with
:func:`driveengine.export.openscene.export_openscene_metadata`. The documented differences from the
original files (wrapped yaw, scene-local prev/next, gap-free frame_idx, deterministic scene names,
``driving_command`` from the ego's future path instead of the map) are listed in
:mod:`driveengine.schemas.frame`. No nuplan-devkit and no maps are needed.

Example::

    python process_data/create_openscene_metadata.py \\
        --nuplan-db-path $NUPLAN_PATH/splits/mini --nuplan-sensor-path $NUPLAN_PATH/sensor_blobs \\
        --out-dir openscene-v1.1/meta_datas/mini --split mini --thread-num 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--thread-num", type=int, default=16, help="worker processes (one log per task)")
    parser.add_argument("--nuplan-root-path", type=Path, help="nuPlan root (holds splits/ and sensor_blobs/)")
    parser.add_argument(
        "--nuplan-db-path", type=Path, help="folder of the .db logs (default: <root>/splits/<split>)"
    )
    parser.add_argument(
        "--nuplan-sensor-path", type=Path, help="sensor blob folder (default: <root>/sensor_blobs)"
    )
    parser.add_argument("--nuplan-map-version", help="accepted for compatibility; maps are not read")
    parser.add_argument("--nuplan-map-root", help="accepted for compatibility; maps are not read")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for <log>.pkl")
    parser.add_argument(
        "--sample-interval", type=int, default=10, help="key frame every N lidar_pc (10 = 2 Hz)"
    )
    parser.add_argument("--is-test", action="store_true", help="test data: no anns")
    parser.add_argument(
        "--filter-instance",
        action="store_true",
        help="drop traffic_cone, barrier, czone_sign, generic_object",
    )
    parser.add_argument("--split", default="train", help="split name (label of the output)")
    parser.add_argument(
        "--no-check-blobs", action="store_true", help="keep frames whose .pcd/.jpg files are missing"
    )
    args = parser.parse_args(argv)
    if args.nuplan_db_path is None and args.nuplan_root_path is None:
        parser.error("give --nuplan-db-path or --nuplan-root-path")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit code (1 when a log failed)."""
    from driveengine.splits import SplitDef

    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.errors import DriveEngineError
    from driveengine.export.openscene import export_openscene_metadata

    args = parse_args(argv)
    root = args.nuplan_root_path or args.nuplan_db_path.parent.parent
    db_dir = args.nuplan_db_path or root / "splits" / args.split
    sensor = args.nuplan_sensor_path or root / "sensor_blobs"
    config = CollectConfig.from_options(
        source="nuplan",
        root=root,
        out=args.out_dir / ".driveengine",
        split=SplitDef(name=args.split, folder=db_dir.name),
        input_dir=db_dir,
        blob_root=sensor,
        sample_interval=args.sample_interval,
        is_test=args.is_test,
        filter_instance=args.filter_instance,
        check_blobs=not args.no_check_blobs,
        labels=False,
        workers=max(1, args.thread_num),
    )
    try:
        summary = collect(config)
        print(summary.format())
        files = export_openscene_metadata(summary.split_dir, args.out_dir)
    except DriveEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} OpenScene metadata files to {args.out_dir}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
