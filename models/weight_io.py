"""One way to read a weight file: ``torch.load(weights_only=True)`` with errors that name it.

Every loader in ``models`` (BEiT, dVAE state dicts, k-means codebook, EfficientNet,
ProtoFlow) goes through :func:`load_weights_file`, so a missing, truncated or unsafe file
always produces the same kind of message: which file, what it should have been, and how
to get a good one.
"""
from __future__ import annotations

import os
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
