#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest args...]
# Creates .venv if absent, installs requirements.txt + requirements-dev.txt, runs pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv requirements.txt requirements-dev.txt
cd "$REPO_ROOT"
exec python -m pytest "$@"
