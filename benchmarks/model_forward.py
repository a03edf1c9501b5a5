"""Forward speed of the dual-branch MIM ViT (scoring path) against the measured matmul peak.

    python -m benchmarks.model_forward [--batch 8 --threads 2 --dtypes fp32,bf16]

Random init (speed does not depend on the weights), eval mode, masks at --mask_ratio per
branch, `forward_masked_logits` (what scoring runs). FLOPs come from
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convs, attention); the ratio
achieved/peak uses a matmul peak measured on this machine in the same dtype.
Also times the patch-16 branch alone (a plain ViT-B/16 masked forward).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import best_time, matmul_peak_tflops, print_json, set_threads
from models import create_model

# "bf16": fp32 weights + bf16 autocast (what training/scoring use); "bf16_weights": the
# model cast to bf16, no autocast (shows the cost of autocast's per-call weight casts).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_weights": torch.bfloat16}


def _masks(batch: int, grid: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    n = grid * grid
    k = round(ratio * n)
    idx = torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :k]
    return torch.zeros(batch, n, dtype=torch.bool).scatter_(1, idx, True)


def _count_flops(fn) -> int:
    """Algorithmic FLOPs. The math SDPA backend is forced while counting because the
    counter does not see CPU flash attention (the flops are the same)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="vit_base_patch16_224_8k_vocab_dual")
    ap.add_argument("--img_size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mask_ratio", type=float, default=0.3)
    ap.add_argument("--dtypes", default="fp32,bf16,bf16_weights")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--peak_n",
        type=int,
        default=4096,
        help="side of the square matmuls for the peak",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    threads = set_threads(args.threads)
    dev = args.device
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size).eval().to(dev)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(dev)
    masks = {
        p: _masks(args.batch, g, args.mask_ratio, gen).to(dev)
        for p, g in model.grid_sizes.items()
    }
    b16 = model.branches["16"]

    workloads = {
        "dual_masked_logits": lambda: model.forward_masked_logits(x, masks),
        "vit16_masked_logits": lambda: b16(x, masks[16]),
    }  # closures read `x`, which the bf16_weights pass rebinds
    with torch.no_grad():
        flops = {k: _count_flops(fn) for k, fn in workloads.items()}

    result: dict = {
        "benchmark": "model_forward",
        "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch,
        "threads": threads,
        "mask_ratio": args.mask_ratio,
        "gflops_per_image": {k: v / args.batch / 1e9 for k, v in flops.items()},
        "peak_tflops": {},
        "results": {},
    }
    t_start = time.perf_counter()
    names = args.dtypes.split(",")
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        ap.error(f"unknown --dtypes {unknown}; choose from {list(DTYPES)}")
    for name in sorted(
        names, key=lambda n: n == "bf16_weights"
    ):  # casts the model: run it last
        dtype = DTYPES[name]
        peak_key = str(dtype).removeprefix("torch.")
        if peak_key not in result["peak_tflops"]:
            result["peak_tflops"][peak_key] = matmul_peak_tflops(
                dtype, n=args.peak_n, device=dev
            )
        if name == "bf16_weights":
            model.to(dtype)
            x = x.to(dtype)
        use_amp = dtype != torch.float32 and name != "bf16_weights"
        amp = (
            torch.autocast(dev.split(":")[0], dtype=dtype)
            if use_amp
            else contextlib.nullcontext()
        )
        for wname, fn in workloads.items():
            with torch.no_grad(), amp:
                t = best_time(fn, repeats=args.repeats, warmup=1, device=dev)
            achieved = flops[wname] / t / 1e12
            result["results"][f"{wname}_{name}"] = {
                "s_per_batch": t,
                "ms_per_image": 1e3 * t / args.batch,
                "achieved_tflops": achieved,
                "fraction_of_peak": achieved / result["peak_tflops"][peak_key],
            }
    result["bench_wall_s"] = time.perf_counter() - t_start
    return print_json(result, config=vars(args), path=args.out)


if __name__ == "__main__":
    main()
