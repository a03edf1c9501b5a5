"""Provenance recorded next to every checkpoint and result file.

One place for "which code, which configuration, which seed, which protocol",
so that a number found on disk can always be traced back to how it was made.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.weight_io import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The current commit hash, with ``-dirty`` when the tree has local changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def to_jsonable(value: Any) -> Any:
    """Turn argparse namespaces, paths and tuples into plain JSON values."""
    if hasattr(value, "__dict__") and not isinstance(value, type):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def run_info(config: Any, **extra: Any) -> dict:
    """Resolved configuration plus seed/protocol (when the config has them) and the git commit."""
    cfg = to_jsonable(config)
    info = {
        "config": cfg,
        "seed": cfg.get("seed") if isinstance(cfg, dict) else None,
        "protocol": cfg.get("protocol") if isinstance(cfg, dict) else None,
        "git_commit": git_commit(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    info.update(to_jsonable(extra))
    return info


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode())
