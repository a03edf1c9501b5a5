#!/usr/bin/env bash
# Shared by scripts/test.sh and scripts/demo.sh: make sure .venv exists and holds
# requirements*.txt, then put it first on PATH. Re-installs only when a
# requirements file changed since the last successful install.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CDVM_VENV:-$REPO_ROOT/.venv}"
PY="${PYTHON:-python3}"

ensure_venv() {
  local reqs=("$@")
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[cdvm] creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.cdvm-installed" want
  want="$(cd "$REPO_ROOT" && cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[cdvm] installing ${reqs[*]} (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    local args=()
    for r in "${reqs[@]}"; do args+=(-r "$REPO_ROOT/$r"); done
    "$VENV/bin/python" -m pip install -q "${args[@]}"
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}
