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
source "$(dirname "${BASH_SOURCE[0]}")/_score.sh"
SAVE_PATH="${SAVE_PATH:-results/cross_class_${PROTOCOL}}"
DIRECTIONS="${DIRECTIONS:-tex2obj obj2tex}"

for dir in $DIRECTIONS; do
  case "$dir" in
    tex2obj)
      score texture_to_obj "${MODEL_PATH_TEX2OBJ:-$(newest_checkpoint output/pretrain_texture_to_obj)}" \
        "${PROTOFLOW_TEX2OBJ:-weights/protoflow/texture_to_obj.pth}" "$SAVE_PATH/texture_to_obj" "$@" ;;
    obj2tex)
      score obj_to_texture "${MODEL_PATH_OBJ2TEX:-$(newest_checkpoint output/pretrain_obj_to_texture)}" \
        "${PROTOFLOW_OBJ2TEX:-weights/protoflow/obj_to_texture.pth}" "$SAVE_PATH/obj_to_texture" "$@" ;;
    *) echo "unknown direction '$dir' in DIRECTIONS (use tex2obj and/or obj2tex)" >&2; exit 2 ;;
  esac
done
