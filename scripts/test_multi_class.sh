#!/usr/bin/env bash
# Score a multi-class checkpoint on all classes (DESIGN.md §1.4, §2).
#   bash scripts/test_multi_class.sh [extra run_test.py args, e.g. --vis]
#   PROTOCOL=paper bash scripts/test_multi_class.sh        # the authors' protocol (labelled)
# Env overrides:
#   MODEL_PATH     checkpoint (default: newest in output/pretrain_multi_class)
#   DATA_PATH      MVTec-layout test root (default data/mvtec_anomaly_detection)
#   PROTOCOL       strict (default) | paper
#   SAVE_PATH      results folder (default results/multi_class_<protocol>)
#   PROTOFLOW_PATH (default weights/protoflow/multi_class.pth)  PROTOTYPE_DIR (default weights/prototypes)
#   MASK_RATIO (strict, default 0.3)  DEVICE (default cuda)
# Assumes the project's Python environment is active (or `python` is the venv's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_PATH="${DATA_PATH:-data/mvtec_anomaly_detection}"
PROTOCOL="${PROTOCOL:-strict}"
SAVE_PATH="${SAVE_PATH:-results/multi_class_${PROTOCOL}}"
PROTOFLOW_PATH="${PROTOFLOW_PATH:-weights/protoflow/multi_class.pth}"
PROTOTYPE_DIR="${PROTOTYPE_DIR:-weights/prototypes}"
MASK_RATIO="${MASK_RATIO:-0.3}"
DEVICE="${DEVICE:-cuda}"
if [ -z "${MODEL_PATH:-}" ]; then
  MODEL_PATH=output/pretrain_multi_class/checkpoint-last.pth
  if [ ! -f "$MODEL_PATH" ]; then
    newest="$(ls -t output/pretrain_multi_class/checkpoint-*.pth 2>/dev/null | head -n 1 || true)"
    MODEL_PATH="${newest:-$MODEL_PATH}"
  fi
fi

exec python run_test.py --data_path "$DATA_PATH" --model_path "$MODEL_PATH" --setting multi_class \
  --class_name all --protocol "$PROTOCOL" --mask_ratio "$MASK_RATIO" \
  --protoflow_path "$PROTOFLOW_PATH" --prototype_dir "$PROTOTYPE_DIR" --device "$DEVICE" \
  --save_path "$SAVE_PATH" "$@"
