#!/usr/bin/env bash
# Cross-class CDVM pre-training (authors' hyper-parameters, see scripts/_pretrain.sh).
#   textures→objects (default) :  bash scripts/train_cross_class.sh
#   objects→textures           :  FROM_OBJ_TO_TEXTURE=1 bash scripts/train_cross_class.sh
# Env overrides: DATA_PATH OUTPUT_DIR INIT_CKPT TOKENIZER_WEIGHT_PATH BATCH_SIZE NPROC.
# Extra arguments are passed through, e.g. `--tokenizer kmeans --max_steps 100`.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
if [ "${FROM_OBJ_TO_TEXTURE:-0}" = "1" ]; then
  exec bash "$here/_pretrain.sh" obj_to_texture --from_obj_to_texture "$@"
fi
exec bash "$here/_pretrain.sh" texture_to_obj "$@"
