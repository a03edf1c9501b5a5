#!/usr/bin/env bash
# Score both cross-class directions (DESIGN.md §1.4, §2):
#   textures→objects (tests the object classes) and objects→textures (tests the textures).
#   bash scripts/test_cross_class.sh [extra run_test.py args]
#   PROTOCOL=paper bash scripts/test_cross_class.sh        # the authors' protocol (labelled)
# Env overrides:
#   MODEL_PATH_TEX2OBJ  checkpoint trained on textures (default: newest in output/pretrain_texture_to_obj)
#   MODEL_PATH_OBJ2TEX  checkpoint trained on objects  (default: newest in output/pretrain_obj_to_texture)
#   DATA_PATH           MVTec-layout test root (default data/mvtec_anomaly_detection)
#   PROTOCOL            strict (default) | paper
#   SAVE_PATH           results root (default results/cross_class_<protocol>; one sub-folder per direction)
#   PROTOFLOW_TEX2OBJ / PROTOFLOW_OBJ2TEX  ProtoFlow files (default weights/protoflow/<setting>.pth)
#   PROTOTYPE_DIR (default weights/prototypes)  MASK_RATIO (strict, default 0.3)  DEVICE (default cuda)
#   DIRECTIONS          which to run: "tex2obj obj2tex" (default), or one of them
# Assumes the project's Python environment is active (or `python` is the venv's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_PATH="${DATA_PATH:-data/mvtec_anomaly_detection}"
PROTOCOL="${PROTOCOL:-strict}"
SAVE_PATH="${SAVE_PATH:-results/cross_class_${PROTOCOL}}"
PROTOTYPE_DIR="${PROTOTYPE_DIR:-weights/prototypes}"
MASK_RATIO="${MASK_RATIO:-0.3}"
DEVICE="${DEVICE:-cuda}"
DIRECTIONS="${DIRECTIONS:-tex2obj obj2tex}"

newest_checkpoint() {  # $1 = training output dir; prints checkpoint-last.pth or the newest checkpoint-*.pth
  local dir="$1"
  if [ -f "$dir/checkpoint-last.pth" ]; then echo "$dir/checkpoint-last.pth"; return; fi
  local f
  f="$(ls -t "$dir"/checkpoint-*.pth 2>/dev/null | head -n 1 || true)"
  echo "${f:-$dir/checkpoint-last.pth}"
}

for dir in $DIRECTIONS; do
  case "$dir" in
    tex2obj)
      SETTING=texture_to_obj; FLAG=()
      MODEL_PATH="${MODEL_PATH_TEX2OBJ:-$(newest_checkpoint output/pretrain_texture_to_obj)}"
      FLOW="${PROTOFLOW_TEX2OBJ:-weights/protoflow/texture_to_obj.pth}" ;;
    obj2tex)
      SETTING=obj_to_texture; FLAG=(--from_obj_to_texture)
      MODEL_PATH="${MODEL_PATH_OBJ2TEX:-$(newest_checkpoint output/pretrain_obj_to_texture)}"
      FLOW="${PROTOFLOW_OBJ2TEX:-weights/protoflow/obj_to_texture.pth}" ;;
    *) echo "unknown direction '$dir' in DIRECTIONS (use tex2obj and/or obj2tex)" >&2; exit 2 ;;
  esac
  echo "[cdvm] $SETTING: $MODEL_PATH ($PROTOCOL protocol)"
  python run_test.py --data_path "$DATA_PATH" --model_path "$MODEL_PATH" --setting "$SETTING" "${FLAG[@]}" \
    --class_name all --protocol "$PROTOCOL" --mask_ratio "$MASK_RATIO" \
    --protoflow_path "$FLOW" --prototype_dir "$PROTOTYPE_DIR" --device "$DEVICE" \
    --save_path "$SAVE_PATH/$SETTING" "$@"
done
