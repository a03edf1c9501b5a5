"""Test-time scoring of a trained dual-branch MIM model, under both protocols (DESIGN.md §1.6, §2).

Per test class the work is split so that only what depends on the mask ratio repeats:

1. :func:`prepare_class` runs the test set through once: images (kept on the host),
   ProtoFlow log-likelihood grids and the visual tokens of both branches. Ground truth is
   returned in a *separate* object that the scoring functions never receive.
2. :func:`abnormality_maps` turns log-likelihoods into an abnormality map, with the
   reference maximum taken from normal *training* images (``strict``) or from the test
   set itself (``paper``, the authors' protocol); ``--abnormality zscore`` (strict only)
   measures log p in standard deviations of the normal training positions instead.
3. :func:`score_ratio` builds the masks of one ratio and runs the batched masked forward
   → per-patch CE → pixel maps and image scores. This is the only step a sweep repeats.
4. :func:`evaluate_class` ties these together and calls ``engine.metrics.compute_all``;
   that call is the only place where ``strict`` touches test labels or masks.

``paper`` additionally sweeps ratios, reports the best image and pixel AUROC per class
(possibly from different ratios), normalises flow likelihoods by the test-set maximum and
uses an image threshold fitted by F1 on the *test labels* to decide which images get
proposal masks (the rest get seeded random masks). Every output names its protocol.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms.functional import gaussian_blur

from datasets.masking import proposal_masks, random_masks
from datasets.transforms import normalize, token_images

PROTOCOLS = ("strict", "paper")
DEFAULT_MASK_RATIO = 0.3
DEFAULT_SWEEP = "0.02:0.48:0.02"
SMOOTHING_SIGMA = 4.0


# --------------------------------------------------------------------------- configuration
def parse_ratios(spec: str | Iterable[float]) -> list[float]:
    """``"start:stop:step"`` (inclusive stop) or ``"a,b,c"`` or an iterable → sorted ratios in (0, 1)."""
    if isinstance(spec, str):
        spec = spec.strip()
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ValueError(f"ratio sweep {spec!r}: expected start:stop:step")
            start, stop, step = (float(p) for p in parts)
            if step <= 0 or stop < start:
                raise ValueError(f"ratio sweep {spec!r}: need step > 0 and stop >= start")
            n = math.floor((stop - start) / step + 1e-6) + 1
            ratios = [round(start + i * step, 6) for i in range(n)]
        else:
            ratios = [float(p) for p in spec.split(",") if p.strip()]
    else:
        ratios = [float(r) for r in spec]
    if not ratios:
        raise ValueError("empty list of mask ratios")
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise ValueError(f"mask ratio {r} is outside (0, 1)")
    return sorted(set(ratios))


@dataclass
class ScoringConfig:
    """Everything that decides a score; recorded verbatim in results.json."""

    protocol: str = "strict"
    mask_ratio: float = DEFAULT_MASK_RATIO          # strict: the one ratio
    sweep_ratios: list = field(default_factory=lambda: parse_ratios(DEFAULT_SWEEP))  # paper
    batch_size: int = 8
    sigma: float = SMOOTHING_SIGMA
    authors_double_smoothing: bool | None = None    # None → on under paper, off under strict
    seed: int = 0
    amp: bool = True                                # bf16 autocast for the ViT forwards
    tokenizer_amp: bool = False                     # tokens in float32 unless asked (exact targets)
    abnormality: str = "authors"                    # ProtoFlow map: authors' 1−exp(logp−max) or zscore

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}")
        if self.authors_double_smoothing is None:
            self.authors_double_smoothing = self.protocol == "paper"
        if self.protocol == "strict" and self.authors_double_smoothing:
            raise ValueError("authors_double_smoothing is a paper-protocol option; strict smooths once")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {self.mask_ratio} is outside (0, 1)")
        self.sweep_ratios = parse_ratios(self.sweep_ratios)
        check_abnormality(self.abnormality, self.protocol)

    @property
    def ratios(self) -> list[float]:
        return [float(self.mask_ratio)] if self.protocol == "strict" else list(self.sweep_ratios)


# --------------------------------------------------------------------------- containers
@dataclass
class ClassInputs:
    """Everything label-free that scoring needs for one class, computed once."""

    class_name: str
    images: torch.Tensor            # B×3×S×S, uint8 when lossless (PIL-decoded data) else float32
    logp: torch.Tensor              # B×h×w float32 ProtoFlow log-likelihoods (higher = more normal)
    tokens: dict                    # {patch: LongTensor B×N} tokenizer targets per branch
    paths: list

    def __len__(self) -> int:
        return self.images.shape[0]

    def images01(self, idx: slice | torch.Tensor) -> torch.Tensor:
        return as_float01(self.images[idx])


def as_float01(x: torch.Tensor) -> torch.Tensor:
    """Images stored by :func:`_compact_images` (uint8 or float) → float32 in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@dataclass
class GroundTruth:
    """Test labels and masks of one class: only metric computation (and paper's threshold) reads it."""

    labels: np.ndarray              # B int {0,1}
    masks: torch.Tensor             # B×S×S bool
    defect_types: list


def _compact_images(x01: torch.Tensor) -> torch.Tensor:
    """Store as uint8 when that is exact (images decoded from 8-bit files), else float32."""
    q = (x01 * 255.0).round()
    if torch.equal(q / 255.0, x01):
        return q.to(torch.uint8)
    return x01.float()


# --------------------------------------------------------------------------- smoothing
def smooth_maps(maps: torch.Tensor, sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """Gaussian blur of B×H×W maps: torchvision ``gaussian_blur``, kernel 2·round(4σ)+1, reflect padding.

    The kernel reaches 4σ on each side like ``scipy.ndimage.gaussian_filter`` (which the
    authors used); it is clipped to the odd size that still fits the reflect padding.
    """
    if sigma <= 0:
        return maps
    k = 2 * round(4 * sigma) + 1
    limit = 2 * (min(maps.shape[-2:]) - 1) - 1   # reflect padding must be < the side
    if k > limit:
        k = limit if limit % 2 else limit - 1
    return gaussian_blur(maps.unsqueeze(1).float(), kernel_size=[k, k], sigma=[sigma, sigma]).squeeze(1)


# --------------------------------------------------------------------------- ProtoFlow adapter
def flow_log_prob(prior, x01: torch.Tensor, prototypes) -> torch.Tensor:
    """Per-position log p / C (B×h×w) of images under the class's ProtoFlow prior."""
    feats = prior.extract_features(normalize(x01))
    return prior.log_prob(feats, prototypes.to(feats.device)).float()


def check_abnormality(kind: str, protocol: str) -> None:
    """The abnormality kinds and which protocol each belongs to (one rule for config and maps)."""
    from models.protoflow import ABNORMALITY_KINDS

    if kind not in ABNORMALITY_KINDS:
        raise ValueError(f"unknown abnormality {kind!r}; expected one of {ABNORMALITY_KINDS}")
    if kind == "zscore" and protocol != "strict":
        raise ValueError("--abnormality zscore is a strict-protocol option (it uses normal training statistics); "
                         "the paper protocol keeps the authors' abnormality normalised by the test-set maximum")


def abnormality_maps(logp: torch.Tensor, protocol: str, train_stats: Any = None,
                     kind: str = "authors") -> tuple[torch.Tensor, dict]:
    """Log-likelihood grids → abnormality maps (higher = worse) and the reference used.

    ``kind="authors"``: ``1 − exp(log p − max)``; under strict the maximum comes from the
    class's normal *training* images (``train_stats``), under paper from the class's test set,
    as the authors did. ``kind="zscore"`` (strict only): standard deviations below the mean
    log p of the normal training positions (see ``models.protoflow.abnormality_zscore``).
    """
    from models.protoflow import abnormality_from_logp, abnormality_zscore

    check_abnormality(kind, protocol)
    if protocol == "strict" and train_stats is None:
        raise ValueError("strict protocol needs the class's ProtoFlow train_stats (from normal training images)")
    if kind == "zscore":
        if not isinstance(train_stats, dict) or not {"logp_mean", "logp_std"} <= set(train_stats):
            raise ValueError("z-score abnormality needs logp_mean and logp_std in the class's train_stats.json "
                             "(re-run `run_pretraining.py protoflow` to write them)")
        mean, std = float(train_stats["logp_mean"]), float(train_stats["logp_std"])
        return abnormality_zscore(logp, mean, std).float(), {"kind": kind, "reference": "train_stats",
                                                             "logp_mean": mean, "logp_std": std}
    if protocol == "strict":
        ref_max = train_stats["logp_max"] if isinstance(train_stats, dict) else train_stats
        source = "train_stats"
    else:
        ref_max = logp.max()
        source = "test_set_max"
    ref_max = float(ref_max)
    return abnormality_from_logp(logp, ref_max).float(), {"kind": kind, "reference": source, "ref_max": ref_max}


# --------------------------------------------------------------------------- one pass over the data
def prepare_for_inference(*modules) -> None:
    """Conv weights in channels-last: with channels-last inputs, oneDNN/cuDNN pick much faster
    conv kernels (measured on this project's CPU: EfficientNet-B6 stages several times faster,
    the dVAE ~1.4x). Values are unchanged; only the memory layout differs."""
    for m in modules:
        if isinstance(m, torch.nn.Module):
            m.to(memory_format=torch.channels_last)


def _split_batch(batch: dict) -> tuple[torch.Tensor, dict]:
    """Separate the label-free image from the ground truth as early as possible."""
    gt = {k: batch[k] for k in ("label", "mask", "defect_type")}
    return batch["image"], gt


@torch.no_grad()
def prepare_class(class_name: str, loader: Iterable, prior, prototypes, tokenizer, patch_sizes,
                  device: torch.device, tokenizer_amp: bool = False,
                  progress: Callable | None = None) -> tuple[ClassInputs, GroundTruth]:
    """One pass: images, ProtoFlow log p and tokens per branch; ground truth kept apart.

    Tokens are computed in float32 by default (exact targets; k-means distances are too close
    for bf16); ``tokenizer_amp`` runs the tokenizer under bf16 autocast. Conv inputs are
    passed channels-last (see :func:`prepare_for_inference`).
    """
    images, logps, paths = [], [], []
    tokens = {p: [] for p in patch_sizes}
    labels, masks, types = [], [], []
    use_amp = tokenizer_amp and device.type in ("cpu", "cuda")
    for batch in loader:
        x01, gt = _split_batch(batch)
        labels.append(torch.as_tensor(gt["label"]).view(-1))
        masks.append(gt["mask"].view(x01.shape[0], *x01.shape[-2:]) > 0.5)
        types.extend(gt["defect_type"])
        paths.extend(batch["path"])
        images.append(_compact_images(x01))
        xd = x01.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        logps.append(flow_log_prob(prior, xd, prototypes).cpu())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            for p in patch_sizes:
                ti = token_images(xd, p).contiguous(memory_format=torch.channels_last)
                t = tokenizer.get_codebook_indices(ti)
                tokens[p].append(t.reshape(t.shape[0], -1).long().cpu())
        if progress is not None:
            progress(x01.shape[0])
    if any(im.dtype != torch.uint8 for im in images):  # one inexact batch: keep the whole class in float
        images = [as_float01(im) for im in images]
    inputs = ClassInputs(class_name, torch.cat(images), torch.cat(logps),
                         {p: torch.cat(v) for p, v in tokens.items()}, paths)
    truth = GroundTruth(torch.cat(labels).numpy().astype(np.int64), torch.cat(masks), types)
    return inputs, truth


# --------------------------------------------------------------------------- masks of one ratio
def build_masks(abnormality: torch.Tensor, grid_sizes: dict, ratio: float,
                use_proposal: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Masks of all images of a class for one ratio: {patch: bool B×N}.

    Proposal masks (top-k of the abnormality on the branch's grid, k = ratio·N) for every
    image, except where ``use_proposal`` is False (paper protocol): those get random masks
    from a generator seeded with ``seed`` (drawn for the whole class so the result does not
    depend on batching or on which images are selected).
    """
    out = {}
    for i, (p, g) in enumerate(sorted(grid_sizes.items())):
        m = proposal_masks(abnormality, g, ratio)
        if use_proposal is not None and not bool(use_proposal.all()):
            gen = torch.Generator().manual_seed(int(seed) * 1000 + i)
            r = random_masks(abnormality.shape[0], g, ratio, gen).to(m.device)
            m = torch.where(use_proposal.view(-1, 1).to(m.device), m, r)
        out[p] = m.bool().cpu()
    return out


def ratio_key(ratio: float) -> str:
    """Stable string key of a ratio in results (``0.02``, ``0.3``)."""
    return f"{float(ratio):g}"


def ratio_seed(seed: int, ratio: float) -> int:
    """Per-ratio seed, independent of the sweep's order."""
    return int(seed) * 100003 + round(ratio * 10000)


# --------------------------------------------------------------------------- masked forward
@torch.no_grad()
def masked_ce_maps(model, inputs: ClassInputs, masks: dict, device: torch.device, batch_size: int = 8,
                   amp: bool = True) -> dict:
    """Per-patch cross-entropy at masked positions (0 elsewhere): {patch: float B×g×g}.

    Each branch runs on its own (``model.branches``, lm_head at masked positions only) in
    token-balanced batches: ``batch_size`` images for the finest grid and proportionally more
    for coarser ones (×4 for patch 32), so every forward holds about the same number of
    tokens — small matmuls waste most of a CPU's throughput, and memory stays the same.
    """
    if model.training:
        raise RuntimeError("scoring needs model.eval() (drop path must be off at test time)")
    grids = model.grid_sizes
    finest = max(grids[p] for p in masks)
    use_amp = amp and device.type in ("cpu", "cuda")
    out = {}
    for p in masks:
        g = grids[p]
        bs = max(1, batch_size * (finest * finest) // (g * g))
        branch = model.branches[str(p)]
        ce_p = torch.zeros(len(inputs), g * g)
        for s in range(0, len(inputs), bs):
            sl = slice(s, min(s + bs, len(inputs)))
            x = normalize(inputs.images01(sl).to(device, non_blocking=True))
            m = masks[p][sl].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = branch(x, m)
            target = inputs.tokens[p][sl].to(device)[m]
            grid = torch.zeros(m.shape, device=device)
            grid[m] = F.cross_entropy(logits.float(), target, reduction="none")
            ce_p[sl] = grid.cpu()
        out[p] = ce_p.view(-1, g, g)
    return out


def combine_maps(ce_maps: dict, abnormality: torch.Tensor, image_size: int, sigma: float = SMOOTHING_SIGMA,
                 double_smoothing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CE grids → pixel maps B×S×S and image scores B.

    Bilinear to image size, mean over branches, × abnormality (bilinear), Gaussian blur;
    image score = max of the once-smoothed map. ``double_smoothing`` blurs the pixel maps a
    second time (authors' behaviour), leaving the image scores as they were.
    """
    size = (image_size, image_size)
    ups = [F.interpolate(m.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
           for m in ce_maps.values()]
    ce = torch.stack(ups).mean(0).squeeze(1)
    ab = F.interpolate(abnormality.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)
    maps = smooth_maps(ce * ab, sigma)
    scores = maps.flatten(1).amax(1)
    if double_smoothing:
        maps = smooth_maps(maps, sigma)
    return maps, scores


def score_ratio(model, inputs: ClassInputs, abnormality: torch.Tensor, ratio: float, device: torch.device,
                cfg: ScoringConfig, use_proposal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Pixel maps B×S×S, image scores B and the masks used, of one class at one ratio (no labels)."""
    masks = build_masks(abnormality, model.grid_sizes, ratio, use_proposal, ratio_seed(cfg.seed, ratio))
    ce = masked_ce_maps(model, inputs, masks, device, cfg.batch_size, cfg.amp)
    maps, scores = combine_maps(ce, abnormality, inputs.images.shape[-1], cfg.sigma, cfg.authors_double_smoothing)
    return maps, scores, masks


# --------------------------------------------------------------------------- paper-only helper
def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising F1 of ``score >= t``, fitted on *test labels* (paper protocol only)."""
    from engine.metrics import f1_max_threshold

    labels = np.asarray(labels).astype(int)
    if not labels.any():
        return float(np.min(scores))  # no anomalies: every image gets proposal masks
    return f1_max_threshold(scores, labels)[1]


# --------------------------------------------------------------------------- one class
def _metrics(scores, truth: GroundTruth, maps) -> dict:
    from engine.metrics import compute_all

    res = compute_all(scores.numpy(), truth.labels, maps.numpy(), truth.masks.numpy())
    return {k: float(v) for k, v in res.items()}


def _rank(value: float) -> float:
    """Sort key for metrics: an undefined (NaN) value never wins."""
    return -math.inf if value is None or math.isnan(value) else value


def select_best(per_ratio: dict) -> dict:
    """Paper summary of a sweep: best image AUROC and best pixel AUROC (possibly different ratios).

    Image metrics are reported at the ratio with the best image AUROC, pixel metrics at the
    ratio with the best pixel AUROC; ties go to the smallest ratio. Both ratios are recorded.
    """
    ratios = sorted(per_ratio, key=float)
    best_img = max(ratios, key=lambda r: (_rank(per_ratio[r]["image_auroc"]), -float(r)))
    best_pix = max(ratios, key=lambda r: (_rank(per_ratio[r]["pixel_auroc"]), -float(r)))
    out = {}
    for k in per_ratio[ratios[0]]:
        out[k] = per_ratio[best_img if k.startswith("image_") else best_pix][k]
    out["image_auroc_ratio"] = float(best_img)
    out["pixel_auroc_ratio"] = float(best_pix)
    return out


def evaluate_class(model, inputs: ClassInputs, truth: GroundTruth, train_stats, device: torch.device,
                   cfg: ScoringConfig, keep_maps: bool = False, progress: Callable | None = None) -> dict:
    """Score one prepared class under ``cfg.protocol``; metrics are the only reader of ``truth`` in strict."""
    abnormality, ref = abnormality_maps(inputs.logp, cfg.protocol, train_stats, cfg.abnormality)
    use_proposal = None
    extra: dict = {"abnormality_reference": ref}
    if cfg.protocol == "paper":
        flow_scores = abnormality.flatten(1).amax(1).numpy()
        thr = f1_threshold(flow_scores, truth.labels)
        use_proposal = torch.from_numpy(flow_scores >= thr)
        extra.update(image_threshold=thr, image_threshold_fitted_on="test labels (F1-max)",
                     n_proposal=int(use_proposal.sum()), n_random=int((~use_proposal).sum()))
    per_ratio, kept = {}, None
    for ratio in cfg.ratios:
        maps, scores, masks = score_ratio(model, inputs, abnormality, ratio, device, cfg, use_proposal)
        key = ratio_key(ratio)
        per_ratio[key] = _metrics(scores, truth, maps)
        # for figures keep only the maps of the best pixel AUROC so far (memory: one ratio's maps)
        if keep_maps and (kept is None or _rank(per_ratio[key]["pixel_auroc"]) > _rank(kept[4])):
            kept = (maps, scores, masks, key, per_ratio[key]["pixel_auroc"])
        if progress is not None:
            progress(1)
    result: dict = {"class_name": inputs.class_name, "protocol": cfg.protocol, "n_images": len(inputs),
                    "n_anomalous": int(truth.labels.sum()), **extra}
    if cfg.protocol == "strict":
        result.update(metrics=per_ratio[next(iter(per_ratio))], mask_ratio=float(cfg.mask_ratio))
    else:
        result.update(metrics=select_best(per_ratio), per_ratio=per_ratio, mask_ratios=[float(r) for r in per_ratio])
    if keep_maps:
        maps, scores, masks, key, _ = kept
        result["_maps"] = {"ratio": key, "maps": maps, "scores": scores, "proposal_masks": masks,
                           "abnormality": abnormality}
    return result


# --------------------------------------------------------------------------- loading
def _need(path: str | os.PathLike | None, what: str, how: str) -> Path:
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}. {how}")
    return Path(path)


def load_trained_model(path, device, model_name: str | None = None, input_size: int | None = None):
    """Dual-branch model from a training checkpoint, in eval() mode, with its run config.

    Architecture arguments come from the checkpoint's ``run_info['config']`` unless given.
    """
    from engine.checkpoint import load_checkpoint
    from models import create_model

    path = _need(path, "model checkpoint", "Train one with run_pretraining.py (scripts/train_*.sh) "
                 "or pass --model_path to an existing checkpoint.")
    ckpt = load_checkpoint(path)  # refuses files without a 'model' state dict, naming the file
    cfg = dict((ckpt.get("run_info") or {}).get("config") or {})
    name = model_name or cfg.get("model")
    if not name:
        raise ValueError(f"{path}: checkpoint records no model name in run_info.config; pass --model")
    size = int(input_size or cfg.get("input_size") or 224)
    kw = {"img_size": size, "drop_path_rate": 0.0}
    if cfg.get("vocab_size"):
        kw["vocab_size"] = int(cfg["vocab_size"])
    if cfg.get("rel_pos_init"):
        kw["rel_pos_init"] = cfg["rel_pos_init"]
    for k in ("embed_dim", "depth", "num_heads"):  # architecture overrides, when the run used them
        if cfg.get(k):
            kw[k] = int(cfg[k])
    model = create_model(name, **kw)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit model {name!r} at input size {size}: {e}") from e
    model.to(device).eval()
    cfg.setdefault("model", name)
    cfg["input_size"] = size
    return model, cfg


def prototypes_source(prior) -> str:
    """Which images the prototypes came from (``--prototypes_from`` of the flow fit), as the file records."""
    cfg = ((getattr(prior, "run_info", None) or {}).get("config") or {})
    return cfg.get("prototypes_from") or "target (flow file records none: the authors' default)"


TRAIN_STATS_KEYS = {"authors": ("logp_max",), "zscore": ("logp_mean", "logp_std")}


def check_train_stats(train_stats: dict, classes, prototype_dir, abnormality: str = "authors") -> None:
    """strict needs every class's training likelihood statistics (the ones ``abnormality`` reads);
    name the missing files before any scoring work."""
    from models.protoflow import COMMAND_HINT, TRAIN_STATS

    missing = [c for c in classes if c not in (train_stats or {})]
    if missing:
        raise FileNotFoundError(
            f"--protocol strict needs likelihood statistics of normal training images for class(es) {missing} "
            f"({TRAIN_STATS} next to each class's coreset.npy under {prototype_dir}); write them by fitting "
            f"ProtoFlow with: {COMMAND_HINT} (or use --protocol paper)")
    keys = TRAIN_STATS_KEYS[abnormality]
    incomplete = [c for c in classes if not isinstance(train_stats[c], dict) or not set(keys) <= set(train_stats[c])]
    if incomplete:
        raise ValueError(
            f"--abnormality {abnormality} needs {', '.join(keys)} in {TRAIN_STATS} of class(es) {incomplete} under "
            f"{prototype_dir}; re-fit ProtoFlow to write them: {COMMAND_HINT}")


# --------------------------------------------------------------------------- all classes
def mean_metrics(per_class: dict) -> dict:
    keys = set.intersection(*(set(r["metrics"]) for r in per_class.values())) if per_class else set()
    keys = [k for k in next(iter(per_class.values()))["metrics"] if k in keys and not k.endswith("_ratio")] \
        if per_class else []
    return {k: float(np.mean([r["metrics"][k] for r in per_class.values()])) for k in keys}


def run_evaluation(model, tokenizer, prior, prototypes: dict, train_stats: dict, data_path, classes,
                   device, cfg: ScoringConfig, input_size: int, num_workers: int = 0,
                   keep_maps: bool = False, progress_factory: Callable | None = None) -> dict:
    """Evaluate every class; returns ``{"per_class": {cls: result}, "mean": metrics}``."""
    from datasets.mvtec import MVTecTestDataset

    model.eval()
    prepare_for_inference(prior, tokenizer)
    per_class = {}
    for cls in classes:
        ds = MVTecTestDataset(data_path, [cls], input_size=input_size)
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=num_workers)
        total = len(ds) + len(cfg.ratios)
        bar = progress_factory(cls, total) if progress_factory else None
        step = bar.update if bar is not None else None
        torch.manual_seed(cfg.seed)
        inputs, truth = prepare_class(cls, loader, prior, prototypes[cls], tokenizer, model.patch_sizes,
                                      device, cfg.tokenizer_amp, step)
        per_class[cls] = evaluate_class(model, inputs, truth, train_stats.get(cls) if train_stats else None,
                                        device, cfg, keep_maps, step)
        if keep_maps:
            per_class[cls]["_maps"].update(images=inputs.images, truth=truth, paths=inputs.paths)
        if bar is not None:
            bar.close()
    return {"per_class": per_class, "mean": mean_metrics(per_class)}


# --------------------------------------------------------------------------- entry point (run_test.py)
def resolve_tokenizer_amp(mode: str, ckpt_cfg: dict, device: torch.device) -> bool:
    """Score with the token targets the model was trained on: ``auto`` follows the checkpoint's
    resolved training precision (bf16 dVAE on CPU by default) on CPU and uses float32 on CUDA."""
    if mode != "auto":
        return mode == "bf16"
    return device.type == "cpu" and ckpt_cfg.get("tokenizer_amp_resolved") == "bf16"


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"[cdvm] --device {name} requested but CUDA is not available: using cpu", flush=True)
        return torch.device("cpu")
    return torch.device(name)


def resolve_test_classes(args, ckpt_cfg: dict) -> tuple[str, list]:
    """(setting, test classes) from --classes / --class_name / --from_obj_to_texture / --setting / checkpoint."""
    from datasets.mvtec import load_class_groups, resolve_classes

    # same precedence as training (engine.train.resolve_setting): --setting, then the authors' flag
    setting = (args.setting or ("obj_to_texture" if getattr(args, "from_obj_to_texture", False) else None)
               or ckpt_cfg.get("setting") or "texture_to_obj")
    groups = load_class_groups(args.data_path)
    _, test_classes = resolve_classes(setting, groups)
    if args.classes:
        test_classes = [c for c in str(args.classes).split(",") if c]
    elif args.class_name and args.class_name != "all":
        test_classes = [args.class_name]
    for c in test_classes:
        if not (Path(args.data_path) / c / "test").is_dir():
            raise FileNotFoundError(f"test class {c!r} not found: {Path(args.data_path) / c / 'test'} does not "
                                    f"exist (check --data_path / --class_name; prepare data with "
                                    f"setup_train_dataset.py or python -m datasets.synthetic)")
    return setting, test_classes


def evaluate_checkpoint(args) -> dict:
    """Everything ``run_test.py`` does after parsing: load, score, write the report."""
    from tqdm import tqdm

    from engine import report
    from engine.protoflow_train import load_prior
    from engine.runinfo import run_info
    from models.tokenizers import build_tokenizer

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = resolve_device(args.device)
    model, ckpt_cfg = load_trained_model(args.model_path, device, args.model, args.input_size)
    input_size = int(ckpt_cfg["input_size"])
    setting, classes = resolve_test_classes(args, ckpt_cfg)
    flow_path = args.protoflow_path or str(Path("weights") / "protoflow" / f"{setting}.pth")
    prior, prototypes, train_stats = load_prior(flow_path, args.prototype_dir, classes, device)
    prior.eval()
    if args.protocol == "strict":
        check_train_stats(train_stats, classes, args.prototype_dir, getattr(args, "abnormality", "authors"))

    tok_kind = args.tokenizer or ckpt_cfg.get("tokenizer") or "dall-e"
    tok_path = args.tokenizer_weight_path or ckpt_cfg.get("tokenizer_weight_path")
    if tok_path is not None and not Path(tok_path).exists():
        raise FileNotFoundError(f"tokenizer weights not found: {tok_path} (recorded in the checkpoint or given "
                                f"by --tokenizer_weight_path; see weights/README.md)")
    tokenizer = build_tokenizer(tok_kind, tok_path, device=str(device))  # frozen, eval mode
    if int(getattr(tokenizer, "vocab_size", model.vocab_size)) != int(model.vocab_size):
        raise ValueError(f"tokenizer {tok_kind} ({tok_path}) has vocabulary {tokenizer.vocab_size} but the model "
                         f"in {args.model_path} predicts {model.vocab_size} tokens")

    cfg = ScoringConfig(protocol=args.protocol, mask_ratio=args.mask_ratio, sweep_ratios=args.sweep_ratios,
                        batch_size=args.batch_size, authors_double_smoothing=args.authors_double_smoothing,
                        abnormality=getattr(args, "abnormality", "authors"),
                        seed=args.seed, amp=not getattr(args, "no_amp", False),
                        tokenizer_amp=resolve_tokenizer_amp(getattr(args, "tokenizer_amp", "auto"), ckpt_cfg, device))

    def bar(cls, total):
        return tqdm(total=total, desc=f"{cls} [{cfg.protocol}]", unit="step", dynamic_ncols=True)

    results = run_evaluation(model, tokenizer, prior, prototypes, train_stats, args.data_path, classes, device,
                             cfg, input_size, args.num_workers, keep_maps=bool(args.vis), progress_factory=bar)
    config = dict(vars(args))
    config.update(protocol=cfg.protocol, setting=setting, classes=classes, input_size=input_size,
                  model=ckpt_cfg.get("model"), protoflow_path=flow_path, tokenizer=tok_kind,
                  tokenizer_weight_path=tok_path, scoring=vars(cfg),
                  mask_ratio=cfg.mask_ratio if cfg.protocol == "strict" else None,
                  mask_ratios=cfg.ratios, authors_double_smoothing=cfg.authors_double_smoothing)
    rows, details = report_rows(results)
    info = run_info(config, checkpoint=str(args.model_path), checkpoint_config=ckpt_cfg,
                    seeds={"scoring": cfg.seed, "checkpoint": ckpt_cfg.get("seed")},
                    prototypes_from=prototypes_source(prior), protocol_note=PROTOCOL_NOTES[cfg.protocol],
                    smoothing=SMOOTHING_NOTE, per_class_details=details)
    label = report.protocol_label_from_run_info(info)
    save_path = Path(args.save_path)
    if args.vis:
        curves = {}
        for cls, res in results["per_class"].items():
            m = res["_maps"]
            images = as_float01(m["images"])
            report.save_panels(save_path, cls, images, m["truth"].masks, m["proposal_masks"], m["maps"],
                               m["scores"], m["truth"].labels, max_images=int(args.max_vis_images),
                               protocol_label=label if cfg.protocol == "strict"  # label names the ratio
                               else f"{label} [maps of mask ratio {m['ratio']}]")
            curves[cls] = (m["scores"], m["truth"].labels, m["maps"], m["truth"].masks)
        report.save_roc_curves(save_path, curves, protocol_label=label)
    for res in results["per_class"].values():
        res.pop("_maps", None)
    paths = report.write_results(save_path, rows, info)
    return {"results": results, "run_info": info, "table": report.format_table(rows, label),
            "save_path": str(save_path), "paths": {k: str(v) for k, v in paths.items()}}


def report_rows(results: dict) -> tuple[dict, dict]:
    """Flat per-class rows for ``engine.report`` (metrics + the ratio(s) used) and the full details
    (per-ratio tables of a sweep, abnormality reference, paper threshold) for results.json."""
    rows, details = {}, {}
    for cls, res in results["per_class"].items():
        row = dict(res["metrics"])
        if "mask_ratio" in res:
            row["mask_ratio"] = res["mask_ratio"]
        row["n_images"] = res["n_images"]
        rows[cls] = row
        details[cls] = {k: v for k, v in res.items() if k not in ("metrics", "_maps")}
    return rows, details


SMOOTHING_NOTE = (f"Gaussian blur sigma={SMOOTHING_SIGMA:g}: torchvision gaussian_blur, kernel 2*round(4*sigma)+1 "
                  "(33 px), reflect padding")


PROTOCOL_NOTES = {
    "strict": "one fixed mask ratio, proposal masks for every image, flow likelihoods normalised with "
              "normal training images; no test label or test statistic chooses anything",
    "paper": "authors' protocol: best image and best pixel AUROC over a mask-ratio sweep (chosen on test "
             "results, possibly different ratios), image threshold fitted by F1 on test labels decides "
             "proposal vs random masks, flow likelihoods normalised by the test-set maximum",
}
