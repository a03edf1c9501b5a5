"""Atomic checkpoints that load with ``weights_only=True`` and exact-resume RNG state.

Layout of a training checkpoint (written by ``engine.train``)::

    {"model": state_dict (unwrapped from DDP), "optimizer": ..., "scaler": ... | None,
     "epoch": epoch to (continue to) run, "epoch_step": batches of that epoch already done,
     "step": global optimiser steps done, "mask_sampler": sampler.state_dict(),
     "rng": rng_state(), "run_info": engine.runinfo.run_info(...), "config": vars(args)}

Everything is tensors / plain Python containers so the safe unpickler accepts it:
numpy's RNG state (which holds an ndarray) is converted to a tensor + ints.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from models.weight_io import atomic_torch_save

CHECKPOINT_GLOB = "checkpoint-*.pth"
REQUIRED_KEYS = ("model",)
RESUME_KEYS = ("model", "optimizer", "epoch", "step")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated/corrupt, or lacks required keys."""


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Torch (CPU + all CUDA devices), numpy and Python RNG states as safe-to-load values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": [int(v) for v in py_state[1]],
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`; missing parts are left alone."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), int(s["pos"]),
                             int(s["has_gauss"]), float(s["cached_gaussian"])))
    if "python" in state:
        s = state["python"]
        random.setstate((int(s["version"]), tuple(int(v) for v in s["state"]), s["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        n = min(len(cuda_states), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(cuda_states[:n])


# ----------------------------------------------------------------------------- save / load
def snapshot_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Keep a copy of an already written checkpoint under another name without serialising
    the state again: a hard link (the next atomic save of ``src`` gets a new file, so ``dst``
    keeps this one), or a plain copy where links are not possible; renamed into place."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Serialise ``state`` to memory and write it atomically (temp file + rename), so that a
    crash mid-write never leaves a half-written file under the final name."""
    atomic_torch_save(state, path)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu",
                    required_keys: Iterable[str] = REQUIRED_KEYS) -> dict:
    """Load with ``weights_only=True``; a clear :class:`CheckpointError` naming the file when it
    is missing, truncated/corrupt, not a dict, or lacks ``required_keys``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: truncated, corrupt or unsafe "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    missing = [k for k in required_keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing keys {missing} (has {sorted(ckpt)})")
    return ckpt


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``output_dir``, newest first (mtime; on ties ``-last`` first, then
    the higher number in the name)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []

    def key(p: Path):
        m = re.search(r"(\d+)", p.stem)
        return (p.stat().st_mtime_ns, p.stem.endswith("-last"), int(m.group(1)) if m else -1)

    return sorted((p for p in d.glob(CHECKPOINT_GLOB) if p.is_file()), key=key, reverse=True)


def load_resume_checkpoint(output_dir: str | os.PathLike, map_location="cpu",
                           verbose: bool = True) -> tuple[Path | None, dict | None]:
    """(path, contents) of the newest checkpoint in ``output_dir`` that loads and has the resume
    keys; unusable ones are skipped with a message naming them. ``(None, None)`` if none."""
    for p in list_checkpoints(output_dir):
        try:
            return p, load_checkpoint(p, map_location=map_location, required_keys=RESUME_KEYS)
        except CheckpointError as e:
            if verbose:
                print(f"[checkpoint] skipping unusable checkpoint {p}: {e}", flush=True)
    return None, None


def find_resume_checkpoint(output_dir: str | os.PathLike, verbose: bool = True) -> Path | None:
    """Path of the newest valid checkpoint in ``output_dir`` (see :func:`load_resume_checkpoint`)."""
    return load_resume_checkpoint(output_dir, verbose=verbose)[0]
