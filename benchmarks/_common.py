"""Shared helpers for the benchmark scripts: thread setup, measured matmul peak, JSON output.

Achieved/peak ratios are against a *measured* peak (large square matmuls on this
machine, this dtype), not a datasheet number, so they say how close a workload gets to
what torch's GEMM backend can actually deliver here.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.runinfo import run_info, to_jsonable

__all__ = [
    "best_time",
    "machine_info",
    "matmul_peak_tflops",
    "print_json",
    "set_threads",
]


def set_threads(n: int | None = None) -> int:
    """Pin intra-op threads (default: $OMP_NUM_THREADS or all cores); returns the count used."""
    if n is None:
        n = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set or parallel work has started; harmless
        pass
    return torch.get_num_threads()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(
    fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, device: str = "cpu"
) -> float:
    """Best wall time (s) of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def matmul_peak_tflops(
    dtype: torch.dtype = torch.bfloat16,
    n: int = 4096,
    repeats: int = 5,
    device: str = "cpu",
) -> float:
    """Measured peak of an n×n @ n×n matmul in `dtype` (TFLOP/s, 2n³ flops, best of `repeats`).

    Best-of is used because on a shared machine the slow runs measure the neighbours.
    """
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    t = best_time(lambda: torch.mm(a, b), repeats=repeats, warmup=1, device=device)
    return 2 * n**3 / t / 1e12


def machine_info() -> dict:
    """What the numbers depend on: torch build, CPU capability, threads, load."""
    info = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def print_json(result: dict, config: Any = None, path: str | None = None) -> dict:
    """Print `result` (plus run_info provenance and machine info) as one JSON object."""
    obj = {**result, "machine": machine_info(), "run_info": run_info(config or {})}
    text = json.dumps(to_jsonable(obj), indent=2)
    print(text, flush=True)
    if path:
        from engine.runinfo import write_json

        write_json(path, obj)
    return obj
