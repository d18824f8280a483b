#!/usr/bin/env bash
# OpenScene-compatible processing of nuPlan logs into OpenScene v1.1 metadata, with DriveEngine.
# No nuplan-devkit, NAVSIM or maps needed (driving_command comes from the ego's future path).
# Resumable: run it again after an interruption; finished logs are kept.
set -euo pipefail

split=${SPLIT:-mini}
# Download nuPlan from https://www.nuscenes.org/nuplan (or use `driveengine download`).
export NUPLAN_PATH=${NUPLAN_PATH:-/path/to/nuplan/dataset/nuplan-v1.1}
export NUPLAN_DB_PATH=${NUPLAN_DB_PATH:-${NUPLAN_PATH}/splits/${split}}
export NUPLAN_SENSOR_PATH=${NUPLAN_SENSOR_PATH:-${NUPLAN_PATH}/sensor_blobs}

OUT_DIR=${OUT_DIR:-./openscene-v1.1/meta_datas/${split}}
HERE=$(cd "$(dirname "$0")" && pwd)

python "${HERE}/create_openscene_metadata.py" \
  --nuplan-root-path "${NUPLAN_PATH}" \
  --nuplan-db-path "${NUPLAN_DB_PATH}" \
  --nuplan-sensor-path "${NUPLAN_SENSOR_PATH}" \
  --out-dir "${OUT_DIR}" \
  --split "${split}" \
  --thread-num "${THREADS:-8}"

# Optional: one merged pickle per custom split (as OpenScene's collect_data.py).
# python "${HERE}/collect_data.py" --meta-dir "${OUT_DIR}" --out "openscene_${split}_train.pkl" \
#   --val-out "openscene_${split}_val.pkl" --val-fraction 0.15
