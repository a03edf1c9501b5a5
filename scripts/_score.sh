#!/usr/bin/env bash
# Shared by test_cross_class.sh and test_multi_class.sh (sourced): defaults and one scoring call.
# Env overrides: DATA_PATH PROTOCOL PROTOTYPE_DIR MASK_RATIO DEVICE.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_PATH="${DATA_PATH:-data/mvtec_anomaly_detection}"
PROTOCOL="${PROTOCOL:-strict}"
PROTOTYPE_DIR="${PROTOTYPE_DIR:-weights/prototypes}"
MASK_RATIO="${MASK_RATIO:-0.3}"
DEVICE="${DEVICE:-cuda}"

newest_checkpoint() {  # $1 = training output dir; prints checkpoint-last.pth or the newest checkpoint-*.pth
  local dir="$1" f
  if [ -f "$dir/checkpoint-last.pth" ]; then echo "$dir/checkpoint-last.pth"; return; fi
  f="$(ls -t "$dir"/checkpoint-*.pth 2>/dev/null | head -n 1 || true)"
  echo "${f:-$dir/checkpoint-last.pth}"
}

score() {  # score SETTING MODEL_PATH PROTOFLOW_PATH SAVE_PATH [run_test.py args...]
  local setting=$1 model=$2 flow=$3 save=$4; shift 4
  echo "[cdvm] $setting: $model ($PROTOCOL protocol)"
  python run_test.py --data_path "$DATA_PATH" --model_path "$model" --setting "$setting" \
    --class_name all --protocol "$PROTOCOL" --mask_ratio "$MASK_RATIO" \
    --protoflow_path "$flow" --prototype_dir "$PROTOTYPE_DIR" --device "$DEVICE" \
    --save_path "$save" "$@"
}
