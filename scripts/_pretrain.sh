#!/usr/bin/env bash
# Shared by train_cross_class.sh and train_multi_class.sh: the authors' hyper-parameters
# (lr 5e-4, warm-up 10, 300 epochs, mask ratio 0.3) in one place.
#   bash scripts/_pretrain.sh NAME [run_pretraining.py args...]   (NAME names the output folder)
# Env overrides: DATA_PATH OUTPUT_DIR INIT_CKPT TOKENIZER_WEIGHT_PATH BATCH_SIZE NPROC.
# BATCH_SIZE is per process (default 32; the authors used 1, which our loss also supports).
# Assumes the project's Python environment is active (or `python` is the venv's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NAME=$1; shift

DATA_PATH="${DATA_PATH:-data/Mvtec-ImageNet}"
OUTPUT_DIR="${OUTPUT_DIR:-output/pretrain_${NAME}}"
INIT_CKPT="${INIT_CKPT-weights/beit_base_patch16_224_pt22k.pth}"   # INIT_CKPT= (empty): random init
INIT_ARGS=(); [ -n "$INIT_CKPT" ] && INIT_ARGS=(--init_ckpt "$INIT_CKPT")
TOKENIZER_WEIGHT_PATH="${TOKENIZER_WEIGHT_PATH:-weights/dall_e_tokenizer_weight/encoder.pkl}"
BATCH_SIZE="${BATCH_SIZE:-32}"
NPROC="${NPROC:-1}"

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=(python)
fi

exec "${LAUNCH[@]}" run_pretraining.py \
  --data_path "$DATA_PATH" --output_dir "$OUTPUT_DIR" \
  "${INIT_ARGS[@]}" --tokenizer_weight_path "$TOKENIZER_WEIGHT_PATH" \
  --model vit_base_patch16_224_8k_vocab_dual --mask_ratio 0.3 \
  --batch_size "$BATCH_SIZE" --lr 5e-4 --min_lr 1e-5 --warmup_lr 1e-6 --warmup_epochs 10 --epochs 300 \
  --clip_grad 3.0 --drop_path 0.1 --layer_scale_init_value 0.1 --weight_decay 0.05 \
  --imagenet_default_mean_and_std "$@"
