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
  # one stamp per requirements file: its hash at the last successful install
  local todo=() r stamp
  for r in "${reqs[@]}"; do
    stamp="$VENV/.cdvm-installed-$(basename "$r")"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$(sha256sum < "$REPO_ROOT/$r")" ]; then
      todo+=("$r")
    fi
  done
  if [ ${#todo[@]} -gt 0 ]; then
    echo "[cdvm] installing ${todo[*]} into $VENV (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    local args=()
    for r in "${todo[@]}"; do args+=(-r "$REPO_ROOT/$r"); done
    "$VENV/bin/python" -m pip install -q "${args[@]}"
    for r in "${todo[@]}"; do sha256sum < "$REPO_ROOT/$r" > "$VENV/.cdvm-installed-$(basename "$r")"; done
  fi
  export PATH="$VENV/bin:$PATH"
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}
