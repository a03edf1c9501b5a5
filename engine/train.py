"""CDVM pre-training: the MIM loss, one epoch of training, and the whole run (``run``).

The loss is computed per image and then averaged over the batch, so a batch of B
images gives exactly the mean of the B single-image losses (the authors' code only
works at batch size 1). Masks are sampled in the training process by the guided mask
sampler, so the uncertainty state it keeps is the one that drives the next masks.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist_utils
from .checkpoint import (
    RESUME_KEYS,
    load_checkpoint,
    load_resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    snapshot_checkpoint,
)
from .optim import apply_schedules, build_optimizer, cosine_scheduler
from .runinfo import run_info, to_jsonable, write_json

PATCH_SIZES = (16, 32)


# ============================================================================ loss
def rank_weight(ranks: torch.Tensor) -> torch.Tensor:
    """The dynamic-masking weight ``(1 + r)^2`` of a position whose rank is ``r`` ∈ [0, 1]."""
    return (1.0 + ranks) ** 2


def _per_sample_mean(values: torch.Tensor, sample_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean of ``values`` (M,) grouped by ``sample_idx`` (M,) → (B,); 0 for samples without entries."""
    sums = values.new_zeros(batch).index_add_(0, sample_idx, values)
    counts = values.new_zeros(batch).index_add_(0, sample_idx, torch.ones_like(values))
    return sums / counts.clamp_min(1)


def compute_mim_loss(outputs: dict, targets: dict[int, torch.Tensor], masks: dict[int, torch.Tensor],
                     rank_weights: dict[int, torch.Tensor] | None = None, dynamic: bool = False) -> dict:
    """CDVM objective (DESIGN.md §1.3), per image then averaged over the batch.

    Args:
        outputs: the model output ``{"logits": {p: M_p×V}, "proj": {p: B×d}}``; logits rows are
            the masked positions in batch-major raster order (``mask.nonzero()`` order).
        targets: ``{p: LongTensor B×N_p}`` visual tokens of the whole grid.
        masks: ``{p: bool B×N_p}``, True = masked.
        rank_weights: ``{p: float B×N_p}`` multiplier of each masked position's CE
            (``(1 + r)^2``); used only when ``dynamic``.
        dynamic: apply the rank weights (after ``dynamic_masking_epoch``).

    Returns a dict with ``loss`` (scalar, fp32), ``per_sample`` (B,), per-branch ``ce`` /
    ``bce`` / ``acc`` (scalars), ``cos`` (scalar) and ``per_patch_ce`` ``{p: B×N_p}``
    (unweighted CE at masked positions, 0 elsewhere; detached) for the uncertainty update.
    """
    proj = outputs["proj"]
    batch = next(iter(masks.values())).shape[0]
    per_sample = None
    parts: dict[str, Any] = {"ce": {}, "bce": {}, "acc": {}, "per_patch_ce": {}}
    for p, logits in outputs["logits"].items():
        mask = masks[p]
        logits = logits.float()
        sample_idx, pos_idx = mask.nonzero(as_tuple=True)
        if logits.shape[0] != sample_idx.numel():
            raise ValueError(f"branch {p}: {logits.shape[0]} logit rows but {sample_idx.numel()} masked positions")
        tgt = targets[p][sample_idx, pos_idx]
        ce = F.cross_entropy(logits, tgt, reduction="none")
        ce_used = ce
        if dynamic:
            if rank_weights is None or p not in rank_weights:
                raise ValueError(f"dynamic masking needs rank weights for branch {p}")
            ce_used = ce * rank_weights[p][sample_idx, pos_idx].to(ce.dtype)
        ce_s = _per_sample_mean(ce_used, sample_idx, batch)
        # BCE-with-logits vs one-hot, mean over the vocabulary then over a sample's masked positions
        # (equals the authors' global 'mean' over all M×V elements at batch size 1). Written as
        # softplus(x) - x·y, which is what BCE-with-logits computes, without building the M×V
        # one-hot (≈ 2x cheaper at vocab 8192; checked against F.binary_cross_entropy_with_logits).
        bce_pos = (F.softplus(logits).sum(-1) - logits.gather(1, tgt[:, None]).squeeze(1)) / logits.shape[-1]
        bce_s = _per_sample_mean(bce_pos, sample_idx, batch)
        term = ce_s + bce_s
        per_sample = term if per_sample is None else per_sample + term
        with torch.no_grad():
            correct = (logits.argmax(-1) == tgt).float()
            parts["acc"][p] = correct.mean() if correct.numel() else correct.new_zeros(())
            ppce = torch.zeros(mask.shape, dtype=ce.dtype, device=ce.device)
            ppce[sample_idx, pos_idx] = ce.detach()
            parts["per_patch_ce"][p] = ppce
        parts["ce"][p] = ce_s.mean()
        parts["bce"][p] = bce_s.mean()
    p_a, p_b = sorted(proj)[:2]
    cos = 1.0 - F.cosine_similarity(proj[p_a].float(), proj[p_b].float(), dim=-1)
    per_sample = per_sample + cos
    parts["cos"] = cos.mean()
    parts["per_sample"] = per_sample
    parts["loss"] = per_sample.mean()
    return parts


# ============================================================================ helpers
class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``--amp bf16|fp16``; a null context for ``off``."""
    if amp == "off":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def tokenizer_amp_mode(args, device: torch.device | str | None = None) -> str:
    """Precision of the tokenizer forward. ``auto``: bf16 autocast for the dVAE on CPU when
    ``--amp`` is on (the tokenizer is ~1/3 of a step's FLOPs and fp32 runs ~4x slower on CPU;
    bf16 argmax agreed with fp32 on ~97-98 % of tokens of a random-init encoder, see
    benchmarks/train_step.py), fp32 on CUDA (cheap there; same targets as BEiT/the authors) and
    always fp32 for k-means (nearest-centroid distances are too close for bf16)."""
    mode = getattr(args, "tokenizer_amp", "auto")
    if mode != "auto":
        return mode
    if device is None:
        want_cuda = str(getattr(args, "device", "cpu")).startswith("cuda") and torch.cuda.is_available()
        device = "cuda" if want_cuda else "cpu"
    on_cpu = torch.device(device).type == "cpu"
    return "bf16" if (args.tokenizer == "dall-e" and args.amp != "off" and on_cpu) else "off"


def _is_conv_tokenizer(tokenizer) -> bool:
    return any(p.ndim == 4 for p in tokenizer.parameters()) if isinstance(tokenizer, torch.nn.Module) else False


def prepare_tokenizer(tokenizer, device: torch.device):
    """Move to ``device``; conv tokenizers (the dVAE) go channels-last, which oneDNN/cuDNN run
    faster (−20 % tokenizer time on CPU, benchmarks/train_step.py); other layouts are untouched."""
    if _is_conv_tokenizer(tokenizer):
        return tokenizer.to(device, memory_format=torch.channels_last)
    return tokenizer.to(device) if isinstance(tokenizer, torch.nn.Module) else tokenizer


@torch.no_grad()
def compute_tokens(tokenizer, images01: torch.Tensor, patch_sizes=PATCH_SIZES, amp: str = "off") -> dict[int, torch.Tensor]:
    """Visual tokens ``{p: LongTensor B×N_p}`` of every branch (tokenizer input sized per branch)."""
    from datasets.transforms import token_images

    channels_last = _is_conv_tokenizer(tokenizer)
    out = {}
    for p in patch_sizes:
        x = token_images(images01, p)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(images01.device, amp):
            idx = tokenizer.get_codebook_indices(x)
        out[p] = idx.reshape(idx.shape[0], -1).long()
    return out


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _to_float(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


@dataclass
class TrainState:
    """Counters carried across epochs (and into checkpoints)."""
    step: int = 0              # global iterations done (skipped ones included)
    epoch: int = 0             # epoch in progress
    epoch_step: int = 0        # iterations of ``epoch`` already done
    skipped_steps: int = 0     # total non-finite steps skipped
    nan_in_row: int = 0        # current run of consecutive non-finite steps


class _SkipBatchesSampler(torch.utils.data.Sampler):
    """The epoch's index order (from a seeded DistributedSampler) minus the batches already
    done, so that a mid-epoch resume sees exactly the remaining batches."""

    def __init__(self, base: torch.utils.data.Sampler, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return max(len(self.base) - self.skip, 0)


# ============================================================================ one epoch
def train_one_epoch(model, data_loader, tokenizer, mask_sampler, optimizer, lr_schedule, wd_schedule,
                    epoch: int, args, *, state: TrainState, device: torch.device, scaler=None,
                    writer=None, save_fn: Callable[[], None] | None = None,
                    on_step: Callable[[int, dict], None] | None = None, freq_cache=None) -> dict:
    """Train over ``data_loader`` (already positioned after ``state.epoch_step`` batches).

    Per batch: masks from the guided sampler (CPU) → tokens (no grad) → forward under
    autocast → loss → skip if non-finite (same decision on every rank) → backward → clip →
    step → uncertainty update and cross-rank sync. Returns the epoch's mean loss parts.
    """
    from datasets.transforms import normalize

    model.train()
    net = dist_utils.unwrap_model(model)
    patch_sizes = tuple(getattr(net, "patch_sizes", PATCH_SIZES))
    params = [p for p in model.parameters() if p.requires_grad]
    dynamic = epoch >= args.dynamic_masking_epoch
    tok_amp = tokenizer_amp_mode(args, device)
    main = dist_utils.is_main_process()
    sync_every = max(int(getattr(args, "sync_uncertainty_every", 1)), 1)
    sums: dict[str, float] = {}
    n_ok = 0
    bar = None
    if main and getattr(args, "progress", True):
        from tqdm import tqdm
        bar = tqdm(total=len(data_loader), desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for batch in data_loader:
        it = min(state.step, len(lr_schedule) - 1)
        lr = float(lr_schedule[it])
        wd = float(wd_schedule[it]) if wd_schedule is not None else None
        apply_schedules(optimizer, lr, wd)

        images01 = batch["image"].to(device, non_blocking=True)
        class_index = batch["class_index"]
        # Masks are drawn on CPU by the sampler's own generator; only the frequency weights' FFT
        # runs where the images are (GPU when training there).
        freq = freq_cache.get(batch["path"], images01) if freq_cache is not None else None
        mb = mask_sampler.sample(images01, batch.get("fg_mask"), class_index, epoch, freq_weights=freq)
        masks = {p: mb[p].mask.to(device, non_blocking=True) for p in patch_sizes}
        rweights = {p: mb[p].rank_weight.to(device, non_blocking=True) for p in patch_sizes}
        tokens = compute_tokens(tokenizer, images01, patch_sizes, tok_amp)
        x = normalize(images01)

        with autocast_context(device, args.amp):
            outputs = model(x, masks, consistency_on=args.consistency_on)
        parts = compute_mim_loss(outputs, tokens, masks, rweights, dynamic=dynamic)
        loss = parts["loss"]

        bad = dist_utils.all_reduce_max((~torch.isfinite(loss.detach())).float().reshape(1))
        grad_norm = torch.tensor(float("nan"))
        if not bool(bad.item()):
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if args.clip_grad and args.clip_grad > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if scaler is not None:
                scaler.step(optimizer)  # skips internally on inf/NaN grads and lowers the scale
                scaler.update()
            elif not torch.isfinite(grad_norm):
                bad = torch.ones(1)  # gradients are all-reduced: every rank sees the same norm
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if bool(bad.item()):
            state.skipped_steps += 1
            state.nan_in_row += 1
            msg = (f"[train] non-finite loss/gradient at epoch {epoch} step {state.step} "
                   f"(loss={_to_float(loss):.4g}); step skipped ({state.nan_in_row} in a row, "
                   f"{state.skipped_steps} total)")
            if main:
                print(msg, flush=True)
            if writer is not None:
                writer.add_scalar("train/skipped_steps", state.skipped_steps, state.step)
            if state.nan_in_row >= args.max_nan_steps:
                raise NonFiniteLossError(
                    f"stopping: {state.nan_in_row} consecutive steps had a non-finite loss or gradient "
                    f"(--max_nan_steps {args.max_nan_steps}); last at epoch {epoch}, step {state.step}. "
                    "Lower --lr, check the data/tokenizer, or try --amp off.")
            log = {"step": state.step, "epoch": epoch, "skipped": True, "loss": _to_float(loss), "lr": lr}
        else:
            state.nan_in_row = 0
            for p in patch_sizes:
                mask_sampler.update(p, class_index, mb[p].mask, parts["per_patch_ce"][p].cpu())
            n_ok += 1
            log = {"step": state.step, "epoch": epoch, "skipped": False, "loss": _to_float(loss),
                   "cos": _to_float(parts["cos"]), "lr": lr, "wd": wd if wd is not None else 0.0,
                   "grad_norm": _to_float(grad_norm)}
            for p in patch_sizes:
                log[f"ce{p}"] = _to_float(parts["ce"][p])
                log[f"bce{p}"] = _to_float(parts["bce"][p])
                log[f"acc{p}"] = _to_float(parts["acc"][p])
            for k, v in log.items():
                if k not in ("step", "epoch", "skipped"):
                    sums[k] = sums.get(k, 0.0) + v
            if writer is not None:
                for k, v in log.items():
                    if k not in ("step", "epoch", "skipped"):
                        writer.add_scalar(f"train/{k}", v, state.step)
                writer.add_scalar("train/skipped_steps", state.skipped_steps, state.step)
        if (state.step + 1) % sync_every == 0:
            mask_sampler.sync_across_ranks()
        state.step += 1
        state.epoch_step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{log['loss']:.4f}", lr=f"{lr:.2e}")
        save_steps = int(getattr(args, "save_ckpt_steps", 0) or 0)
        if save_fn is not None and save_steps > 0 and state.step % save_steps == 0:
            save_fn()
        if on_step is not None:
            on_step(state.step, log)
        if args.max_steps and state.step >= args.max_steps:
            break
    if bar is not None:
        bar.close()
    mask_sampler.sync_across_ranks()
    stats = {k: v / max(n_ok, 1) for k, v in sums.items()}
    return {k: dist_utils.all_reduce_mean(v) for k, v in sorted(stats.items())} | {"ok_steps": n_ok}


# ============================================================================ configuration
def resolve_setting(args) -> str:
    """The authors' flags: neither → texture_to_obj, ``--from_obj_to_texture`` → obj_to_texture;
    an explicit ``--setting`` wins."""
    if getattr(args, "setting", None):
        return args.setting
    return "obj_to_texture" if getattr(args, "from_obj_to_texture", False) else "texture_to_obj"


def resolve_config(args, train_classes: list[str], vocab_size: int, world_size: int = 1,
                   device: torch.device | None = None) -> dict:
    """The run's resolved configuration (recorded in config.json and every checkpoint).

    Key names used by the evaluation side to rebuild the model: model, input_size,
    vocab_size, rel_pos_init, tokenizer, tokenizer_weight_path, consistency_on, drop_path,
    layer_scale_init_value, seed, setting, classes.
    """
    cfg = to_jsonable(dict(vars(args)))
    cfg.update({
        "setting": resolve_setting(args),
        "classes": list(train_classes),
        "vocab_size": int(vocab_size),
        "patch_sizes": list(PATCH_SIZES),
        "world_size": int(world_size),
        "effective_batch_size": int(args.batch_size) * int(world_size),
        "normalization": "imagenet_default_mean_std",
        "tokenizer_amp_resolved": tokenizer_amp_mode(args, device),
    })
    return cfg


def _log(msg: str) -> None:
    if dist_utils.is_main_process():
        print(msg, flush=True)


def _loud(msg: str) -> None:
    if dist_utils.is_main_process():
        bar = "!" * 78
        print(f"{bar}\n!! {msg}\n{bar}", file=sys.stderr, flush=True)


def build_tokenizer_for_run(args, dataset, device: torch.device):
    """``build_tokenizer(args.tokenizer, path)``; for k-means with no file at the path, fit it on
    the training images first (rank 0 fits and saves, the others wait)."""
    from models.tokenizers import build_tokenizer

    path = args.tokenizer_weight_path
    if args.tokenizer == "kmeans":
        if not path:
            raise ValueError("--tokenizer kmeans needs --tokenizer_weight_path (where the codebook is read or saved)")
        if not Path(path).is_file():
            if dist_utils.is_main_process():
                _loud(f"k-means tokenizer {path} not found: fitting the OFFLINE STAND-IN tokenizer "
                      f"(vocab {args.tokenizer_vocab}) on the training images. This is NOT the paper's "
                      "DALL-E tokenizer; results are not comparable with the paper.")
                fit_kmeans_for_run(args, dataset, path)
            dist_utils.barrier()
    # build_tokenizer names a missing file and returns the tokenizer frozen, in eval mode
    return build_tokenizer(args.tokenizer, path or None, device=str(device))


def fit_kmeans_for_run(args, dataset, path):
    """Fit the k-means stand-in tokenizer on the run's training images and save it at ``path``."""
    from torch.utils.data import DataLoader

    from datasets.transforms import token_images
    from models.kmeans_tokenizer import fit_kmeans_tokenizer

    loader = DataLoader(dataset, batch_size=32, shuffle=False, num_workers=args.num_workers)
    kw = {"max_patches": args.kmeans_max_patches} if getattr(args, "kmeans_max_patches", None) else {}
    tok = fit_kmeans_tokenizer(loader, vocab_size=args.tokenizer_vocab, patch_sizes=PATCH_SIZES,
                               input_size=args.input_size, seed=args.seed, token_images_fn=token_images, **kw)
    tok.save(path, run_info=run_info(to_jsonable(dict(vars(args))), role="kmeans_tokenizer_fit"))
    _log(f"[train] saved the k-means stand-in tokenizer to {path}")
    return tok


def fit_kmeans_main(args) -> Path:
    """``run_pretraining.py kmeans_tokenizer``: fit the offline stand-in tokenizer on the training
    classes of the setting and save it at ``--tokenizer_weight_path`` (overwrites)."""
    from datasets.imagefolder import TrainImageFolder
    from datasets.mvtec import load_class_groups, resolve_classes

    train_classes, _ = resolve_classes(resolve_setting(args), load_class_groups(args.data_path), args.classes)
    dataset = TrainImageFolder(args.data_path, train_classes, input_size=args.input_size)
    _loud(f"fitting the OFFLINE STAND-IN k-means tokenizer (vocab {args.tokenizer_vocab}) on {len(dataset)} images "
          f"of {dataset.classes}. This is NOT the paper's DALL-E tokenizer.")
    fit_kmeans_for_run(args, dataset, args.tokenizer_weight_path)
    return Path(args.tokenizer_weight_path)


def build_model_for_run(args, vocab_size: int, resuming: bool):
    """``models.create_model`` with the run's config; BEiT init from ``--init_ckpt`` unless resuming."""
    import models

    overrides = {k: getattr(args, k) for k in ("embed_dim", "depth", "num_heads") if getattr(args, k, None)}
    model = models.create_model(args.model, img_size=args.input_size, vocab_size=vocab_size,
                                drop_path_rate=args.drop_path, layer_scale_init_value=args.layer_scale_init_value,
                                rel_pos_init=args.rel_pos_init, **overrides)
    if args.init_ckpt and not resuming:  # a missing file was already reported by run()
        models.load_beit_checkpoint(model, args.init_ckpt, verbose=dist_utils.is_main_process())
    elif not args.init_ckpt and not resuming:
        _loud("no --init_ckpt given: the model starts from RANDOM initialisation "
              "(the paper starts from beit_base_patch16_224_pt22k.pth)")
    return model


def _gather(obj) -> list:
    """Every rank's ``obj`` (a one-element list when single-process)."""
    if not dist_utils.is_dist_avail_and_initialized():
        return [obj]
    out = [None] * dist_utils.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ============================================================================ the run
def run(args, *, model=None, tokenizer=None, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Whole pre-training run from parsed ``run_pretraining.py`` arguments.

    ``model`` / ``tokenizer`` may be injected (tests, notebooks); ``on_step(step, log)`` is
    called after every iteration. Returns ``{"model", "mask_sampler", "optimizer", "state",
    "config", "output_dir"}`` (model unwrapped from DDP).
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from datasets.imagefolder import TrainImageFolder
    from datasets.masking import FrequencyWeightCache, GuidedMaskSampler
    from datasets.mvtec import AUTHORS_MASK_RATIOS, load_class_groups, resolve_classes

    dinfo = dist_utils.init_distributed(args.device)
    device, rank, world = dinfo.device, dinfo.rank, dinfo.world_size
    main = rank == 0
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (GradScaler); use --amp bf16 or off on CPU")
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)

    setting = resolve_setting(args)
    groups = load_class_groups(args.data_path)
    train_classes, _ = resolve_classes(setting, groups, args.classes)
    dataset = TrainImageFolder(args.data_path, train_classes, input_size=args.input_size)
    _log(f"[train] setting {setting}: {len(dataset)} images of {len(dataset.classes)} classes {dataset.classes}")

    # Exact resume: find the checkpoint before building anything that consumes RNG.
    ckpt_path, ckpt = None, None
    if args.resume:
        ckpt_path, ckpt = Path(args.resume), load_checkpoint(args.resume, required_keys=RESUME_KEYS)
    elif args.auto_resume and out_dir is not None:
        ckpt_path, ckpt = load_resume_checkpoint(out_dir, verbose=main)
    resuming = ckpt is not None
    if args.init_ckpt and not resuming and not Path(args.init_ckpt).is_file():  # fail before slow setup
        raise FileNotFoundError(f"--init_ckpt {args.init_ckpt}: file not found "
                                "(expected e.g. weights/beit_base_patch16_224_pt22k.pth; see weights/README.md)")

    set_seed(args.seed)  # identical model init on every rank (DDP also broadcasts rank 0's)
    if tokenizer is None:
        tokenizer = build_tokenizer_for_run(args, dataset, device)
    tokenizer = prepare_tokenizer(tokenizer, device)
    vocab = int(tokenizer.vocab_size)
    if model is None:
        model = build_model_for_run(args, vocab, resuming)
    model = model.to(device)
    net = model
    patch_sizes = tuple(getattr(net, "patch_sizes", PATCH_SIZES))
    config = resolve_config(args, dataset.classes, vocab, world, device)
    info = run_info(config)
    if main and out_dir is not None:
        write_json(out_dir / "config.json", info)

    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    _log(f"[train] model {args.model}: {n_params / 1e6:.1f} M trainable parameters, vocab {vocab}, device {device}")

    if args.class_mask_ratios == "authors":
        missing = [c for c in dataset.classes if c not in AUTHORS_MASK_RATIOS]
        if missing:
            raise ValueError(f"--class_mask_ratios authors: no authors' ratio for classes {missing}")
        ratios = [AUTHORS_MASK_RATIOS[c] for c in dataset.classes]
    else:
        ratios = args.mask_ratio
    mask_sampler = GuidedMaskSampler({p: args.input_size // p for p in patch_sizes}, len(dataset.classes), ratios,
                                     input_size=args.input_size, dynamic_masking_epoch=args.dynamic_masking_epoch,
                                     freq_fft=args.freq_fft, seed=args.seed + rank)
    freq_cache = FrequencyWeightCache(mask_sampler)  # training images are not augmented

    optimizer = build_optimizer(net, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    # Seeded per epoch (set_epoch) and independent of the global RNG: the order of any epoch can
    # be replayed on resume. Ranks get equal shares (padding by repetition, as DDP needs).
    base_sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    drop_last = len(base_sampler) >= args.batch_size  # keep a lone partial batch for tiny datasets
    niter_per_ep = len(base_sampler) // args.batch_size if drop_last else math.ceil(len(base_sampler) / args.batch_size)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, niter_per_ep, args.warmup_epochs,
                                   start_warmup_value=args.warmup_lr, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_scheduler(args.weight_decay, wd_end, args.epochs, niter_per_ep)

    state = TrainState()
    if resuming:
        try:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise RuntimeError(f"cannot resume from {ckpt_path}: it does not match this run's model/optimizer "
                               f"({str(e).splitlines()[0]}). Use another --output_dir or --no_auto_resume.") from e
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        samplers = ckpt.get("mask_sampler_per_rank") or [ckpt.get("mask_sampler")]
        rngs = ckpt.get("rng_per_rank") or [ckpt.get("rng")]
        if len(rngs) != world and main:
            print(f"[train] checkpoint was written by {len(rngs)} processes, now {world}: "
                  "the continuation is valid but not step-identical", flush=True)
        if samplers[rank % len(samplers)] is not None:
            mask_sampler.load_state_dict(samplers[rank % len(samplers)])
        if rngs[rank % len(rngs)] is not None:
            set_rng_state(rngs[rank % len(rngs)])
        state.step, state.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        state.epoch_step = int(ckpt.get("epoch_step", 0))
        state.skipped_steps = int(ckpt.get("skipped_steps", 0))
        _log(f"[train] resumed from {ckpt_path}: epoch {state.epoch}, {state.epoch_step} batches into it, "
             f"global step {state.step}")
        del ckpt
    else:
        set_seed(args.seed + rank)

    writer = None
    if main and out_dir is not None and args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=args.log_dir or str(out_dir / "tensorboard"))

    def checkpoint_state() -> dict:
        return {
            "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": state.epoch, "epoch_step": state.epoch_step, "step": state.step,
            "skipped_steps": state.skipped_steps,
            "mask_sampler": mask_sampler.state_dict(), "rng": rng_state(),
            "run_info": info, "config": to_jsonable(dict(vars(args))),
        }

    def save(name: str) -> None:
        # every rank's RNG and sampler generator, so a multi-process resume is step-identical
        rngs, samplers = _gather(rng_state()), _gather(mask_sampler.state_dict())
        if main and out_dir is not None:
            st = checkpoint_state()
            st["rng_per_rank"], st["mask_sampler_per_rank"] = rngs, samplers
            save_checkpoint(out_dir / name, st)
        dist_utils.barrier()

    loader_gen = torch.Generator().manual_seed(args.seed)  # keeps DataLoader off the global RNG
    t0 = time.time()
    last_stats: dict = {}
    try:
        while state.epoch < args.epochs and not (args.max_steps and state.step >= args.max_steps):
            epoch = state.epoch
            base_sampler.set_epoch(epoch)
            skip = state.epoch_step * args.batch_size
            loader = DataLoader(dataset, batch_size=args.batch_size, sampler=_SkipBatchesSampler(base_sampler, skip),
                                num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                drop_last=drop_last, generator=loader_gen,
                                persistent_workers=False)
            stats = train_one_epoch(model, loader, tokenizer, mask_sampler, optimizer, lr_schedule, wd_schedule,
                                    epoch, args, state=state, device=device, scaler=scaler, writer=writer,
                                    save_fn=lambda: save("checkpoint-last.pth"), on_step=on_step,
                                    freq_cache=freq_cache)
            finished = state.epoch_step >= niter_per_ep
            if finished:
                state.epoch, state.epoch_step = epoch + 1, 0
            last_stats = stats
            if out_dir is not None and (finished or (args.max_steps and state.step >= args.max_steps)):
                save("checkpoint-last.pth")
                if (main and finished and args.save_ckpt_freq
                        and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs)):
                    snapshot_checkpoint(out_dir / "checkpoint-last.pth", out_dir / f"checkpoint-{epoch}.pth")
            if main and out_dir is not None and stats.get("ok_steps", 0) > 0:
                rec = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, "step": state.step,
                       "epoch_complete": finished, "skipped_steps": state.skipped_steps,
                       "n_parameters": n_params, "time_s": round(time.time() - t0, 1)}
                with open(out_dir / "log.txt", "a") as f:
                    f.write(json.dumps(rec) + "\n")
    finally:
        if writer is not None:
            writer.close()
    _log(f"[train] done: {state.step} steps, {state.skipped_steps} skipped, {time.time() - t0:.1f} s")
    return {"model": net, "mask_sampler": mask_sampler, "optimizer": optimizer, "state": state,
            "config": config, "output_dir": out_dir, "last_stats": last_stats}
