"""Optimiser parameter groups and step-level schedules (BEiT/MAE conventions).

Weight decay is applied only to matrices: biases, norm weights, layer-scale γ and
other ``ndim <= 1`` tensors, the cls/mask tokens and relative-position tables are
excluded (decaying them pulls useful offsets towards zero for no regularisation gain).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

# Name fragments that are never decayed even when they are ≥ 2-D.
NO_DECAY_FRAGMENTS = ("cls_token", "mask_token", "pos_embed", "relative_position_bias_table")


def _skip_names(model: torch.nn.Module) -> set[str]:
    """Names from ``no_weight_decay()`` of the model and of every sub-module, fully qualified."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            for n in fn():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def is_no_decay(name: str, param: torch.Tensor, skip: Iterable[str] = ()) -> bool:
    """True when ``param`` (named ``name``) should get no weight decay."""
    skip = set(skip)
    if param.ndim <= 1 or name.endswith(".bias") or name in skip:
        return True
    last = name.rsplit(".", 1)[-1]
    return any(frag in name for frag in NO_DECAY_FRAGMENTS) or last in skip


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              skip_list: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``; each carries an ``apply_wd`` flag
    so that :func:`apply_schedules` only changes the decay group's weight decay."""
    skip = _skip_names(model) | set(skip_list)
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_no_decay(name, p, skip):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "apply_wd": True,
                       "param_names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "apply_wd": False,
                       "param_names": no_decay_names})
    return groups


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.05,
                    betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the decay / no-decay split above.

    ``fused=None`` uses the fused kernel when every parameter is on CPU or CUDA in a floating
    dtype: on CPU it is ~25x faster than the default per-tensor loop for ViT-B-sized models
    (0.3 s vs 7.5 s per step for 170 M parameters, benchmarks/train_step.py).
    """
    groups = param_groups_weight_decay(model, weight_decay)
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                    for g in groups for p in g["params"])
    # ``param_names`` is bookkeeping for tests/logs; AdamW keeps unknown keys in the group.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=bool(fused))


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 1e-6,
                     warmup_steps: int = -1) -> np.ndarray:
    """Per-step values: linear warm-up from ``start_warmup_value`` to ``base_value`` over
    ``warmup_epochs`` (or ``warmup_steps`` when > 0), then cosine decay to ``final_value``.
    Length is exactly ``epochs * niter_per_ep``."""
    total = int(epochs * niter_per_ep)
    if total <= 0:
        raise ValueError(f"cosine_scheduler: epochs*niter_per_ep must be > 0 (got {epochs}*{niter_per_ep})")
    warm = int(warmup_steps) if warmup_steps > 0 else int(warmup_epochs * niter_per_ep)
    warm = min(warm, total)
    warmup = np.linspace(start_warmup_value, base_value, warm) if warm > 0 else np.array([])
    n = total - warm
    iters = np.arange(n)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * iters / max(n, 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float | None = None) -> None:
    """Set the step's LR on every group (× ``lr_scale`` if a group has one) and the step's
    weight decay on the groups that have decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if wd is not None and group.get("apply_wd", group.get("weight_decay", 0.0) > 0):
            group["weight_decay"] = wd
