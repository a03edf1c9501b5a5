#!/usr/bin/env bash
# Multi-class CDVM pre-training on all classes (authors' hyper-parameters, see scripts/_pretrain.sh).
#   bash scripts/train_multi_class.sh [extra run_pretraining.py args]
# Env overrides: DATA_PATH OUTPUT_DIR INIT_CKPT TOKENIZER_WEIGHT_PATH BATCH_SIZE NPROC.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/_pretrain.sh" multi_class --setting multi_class "$@"
