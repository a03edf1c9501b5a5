"""File I/O shared by every package: atomic writes and safe weight-file reads.

:func:`atomic_write_bytes` is the one way files are written (results, checkpoints,
prototypes, tokenizers): temp file in the same folder, fsync, rename, normal permissions.
:func:`load_weights_file` reads weight files with ``torch.load(weights_only=True)`` and errors
that name the file (BEiT, k-means codebook, EfficientNet, ProtoFlow); the dVAE pickle has its
own allow-list loader (``models.dalle``) and training checkpoints their own checks
(``engine.checkpoint``).
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def load_weights_file(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """Load ``path`` with ``weights_only=True`` (no code execution) onto the CPU.

    Raises ``FileNotFoundError`` ("<what> not found: <path> (<hint>)") when it is absent and
    ``ValueError`` naming the file when it is truncated, not a torch file, or asks for
    globals outside the safe set.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read {what} — truncated, not a torch file, or unsafe? "
                         f"({type(e).__name__}: {e})") from e


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp creates 0600; outputs should be readable like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write_bytes` (no half-written file on a crash)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())
