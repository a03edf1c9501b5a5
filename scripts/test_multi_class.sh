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
source "$(dirname "${BASH_SOURCE[0]}")/_score.sh"
score multi_class "${MODEL_PATH:-$(newest_checkpoint output/pretrain_multi_class)}" \
  "${PROTOFLOW_PATH:-weights/protoflow/multi_class.pth}" "${SAVE_PATH:-results/multi_class_${PROTOCOL}}" "$@"
