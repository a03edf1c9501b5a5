"""torchrun / DDP helpers: one process per device, rank 0 logs and saves.

Initialisation reads the standard torchrun variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without them the run is a single
process and every helper degrades to a no-op, so the same code path serves both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    distributed: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def init_distributed(device: str = "cuda", backend: str | None = None) -> DistInfo:
    """Join the process group described by the torchrun env vars (nccl on CUDA, else gloo).

    ``device`` is the requested device type; ``cuda`` falls back to CPU with a message when
    CUDA is not available. Each rank uses ``cuda:LOCAL_RANK``.
    """
    want_cuda = str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        print("[distributed] CUDA requested but not available: running on CPU", flush=True)
        want_cuda = False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world_size <= 1:
        dev = torch.device(device if want_cuda else "cpu")
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        return DistInfo(False, 0, 1, 0, dev, None)
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not is_dist_avail_and_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", world_size=world_size,
                                rank=rank, **kwargs)
    if is_main_process():
        print(f"[distributed] {world_size} processes, backend {backend}", flush=True)
    return DistInfo(True, rank, world_size, local_rank, dev, backend)


def cleanup() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks (a new tensor, or a float when given a float); identity if single-process."""
    if not is_dist_avail_and_initialized():
        return value
    is_float = not torch.is_tensor(value)
    t = torch.tensor(float(value), dtype=torch.float64) if is_float else value.detach().clone()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / get_world_size()
    return float(t) if is_float else t.to(value.device)


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (used so every rank takes the same skip decision)."""
    if not is_dist_avail_and_initialized():
        return value
    t = value.detach().clone()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(value.device)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP (or compiled) wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
