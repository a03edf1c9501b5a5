#!/usr/bin/env bash
# Fetch the published weight files into weights/ (needs internet; nothing else in the
# project does). Skips files that already exist, then verifies every file by loading it
# with the project's own safe loaders (python -m engine.weights). A file that fails to
# load is renamed to <file>.bad so that it is never used by accident.
#
#   bash scripts/download_weights.sh            # all four
#   bash scripts/download_weights.sh beit dall-e   # a subset
#
# URLs can be overridden with BEIT_URL, DALLE_URL, EFFNET_URL, PROTOFLOW_URL (file://
# URLs work, e.g. for a local mirror).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv requirements.txt
cd "$REPO_ROOT"
W=${WEIGHTS_DIR:-weights}

BEIT_URL=${BEIT_URL:-https://conversationhub.blob.core.windows.net/beit-share-public/beit/beit_base_patch16_224_pt22k.pth}
DALLE_URL=${DALLE_URL:-https://cdn.openai.com/dall-e/encoder.pkl}
EFFNET_URL=${EFFNET_URL:-https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_efficientnet_b6_aa-80ba17e4.pth}
# The authors publish ProtoFlow on the Hugging Face hub (huggingface.co/hrxxxxx/CDVM);
# set PROTOFLOW_URL to the file you want (e.g. .../resolve/main/<file>.pth).
PROTOFLOW_URL=${PROTOFLOW_URL:-}

fetch() {  # fetch KIND URL DEST
  local kind=$1 url=$2 dest=$3
  if [ -z "$url" ]; then
    echo "[$kind] no URL set (see the comment at the top of this script) — skipped"; return 0
  fi
  if [ -s "$dest" ]; then
    echo "[$kind] $dest exists — not downloading again"
  else
    mkdir -p "$(dirname "$dest")"
    echo "[$kind] downloading $url"
    curl -fL --retry 3 -o "$dest.part" "$url"
    mv "$dest.part" "$dest"
  fi
  if ! python -m engine.weights "$kind" "$dest"; then
    mv "$dest" "$dest.bad"
    echo "[$kind] $dest does not load; moved to $dest.bad" >&2
    return 1
  fi
}

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(beit dall-e efficientnet protoflow)
status=0
for kind in "${wanted[@]}"; do
  case "$kind" in
    beit) fetch beit "$BEIT_URL" "$W/beit_base_patch16_224_pt22k.pth" || status=1 ;;
    dall-e) fetch dall-e "$DALLE_URL" "$W/dall_e_tokenizer_weight/encoder.pkl" || status=1 ;;
    efficientnet) fetch efficientnet "$EFFNET_URL" "$W/tf_efficientnet_b6_aa-80ba17e4.pth" || status=1 ;;
    protoflow) fetch protoflow "$PROTOFLOW_URL" "$W/protoflow/$(basename "${PROTOFLOW_URL:-protoflow.pth}")" || status=1 ;;
    *) echo "unknown weight kind: $kind (beit, dall-e, efficientnet, protoflow)" >&2; status=2 ;;
  esac
done
exit $status
