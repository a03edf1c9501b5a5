"""Mask generators for CDVM: guided training masks, test-time proposal and random masks.

Training masks (DESIGN.md §1.3) are drawn per sample and per branch: foreground-only or
anywhere; frequency-, uncertainty-guided or uniform; block-wise (BEiT-style blobs) or
scattered. Every draw comes from the sampler's own ``torch.Generator`` so that runs are
reproducible and a resumed run continues the identical sequence (``state_dict``).

Fixes to the authors' code (DESIGN.md §5): the count is ``round(ratio * N)`` of *that
branch's* grid; sampling is without replacement (Gumbel-top-k / exponential race), so
counts are exact; weights are never min-max normalised (no probability-0 / NaN paths);
``rank / (n - 1)`` is defined for one patch; ties never over-select.

Weighted sampling without replacement is written here (not taken from a library) because
``torch.multinomial`` is per-row sequential, has no per-row k and no priority tiers.
All sampling runs on CPU tensors; the trainer moves masks to its device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "STRATEGY_NAMES",
    "FrequencyWeightCache",
    "GuidedMaskSampler",
    "MaskBatch",
    "describe_strategy",
    "foreground_fractions",
    "frequency_weights",
    "mask_count",
    "pool_foreground",
    "proposal_masks",
    "random_masks",
    "rank_weights",
]

# Strategy code = 6 * foreground_only + 2 * guide + block_wise, guide: 0 uniform, 1 freq, 2 unc.
GUIDES = ("uniform", "frequency", "uncertainty")
STRATEGY_NAMES = tuple(
    f"{'fg' if fg else 'any'}-{guide}-{'block' if blk else 'scatter'}"
    for fg in (0, 1)
    for guide in GUIDES
    for blk in (0, 1)
)

# Priority tiers added to the sampling keys. Keys log(w) - log(E) lie in [-44, 17] (log w
# clamped at -40; E = -log U with U in [2**-30, 1 - 2**-24]), so tiers 128 apart never mix,
# and float32 still resolves ~2e-4 at the largest tier sum used (23 tiers).
_LOGW_MIN = -40.0
_TIER = 128.0


class MaskBatch(NamedTuple):
    """Masks of one branch for a batch."""

    mask: Tensor  # bool B×N, True = masked
    rank_weight: Tensor  # float B×N, (1 + r)^2 at masked positions (1 before dynamic epoch), 0 elsewhere
    strategy: Tensor  # long B, index into STRATEGY_NAMES


def describe_strategy(code: int) -> str:
    """Readable name of a strategy code, for logging."""
    return STRATEGY_NAMES[int(code)]


def mask_count(grid: int, ratio: float) -> int:
    """Number of masked patches on a ``grid × grid`` branch: round-half-up of ratio·N.

    At least one patch when ``ratio > 0`` (an empty mask would give a loss over nothing).
    """
    grid = int(grid)
    if grid < 1:
        raise ValueError(f"mask_count: grid must be >= 1, got {grid}")
    ratio = float(ratio)
    if not (0.0 <= ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"mask_count: ratio must be in [0, 1], got {ratio}")
    n = grid * grid
    k = math.floor(ratio * n + 0.5)
    if ratio > 0:
        k = max(k, 1)
    return min(k, n)


def _exp_race_keys(log_w: Tensor, generator: torch.Generator | None) -> Tensor:
    """Exponential-race keys log w − log E, E = −log U ~ Exp(1): the top-k of the keys is a
    weighted sample without replacement (the Gumbel-top-k trick; −log E is Gumbel)."""
    u = torch.rand(log_w.shape, generator=generator)
    log_e = u.clamp_min_(2.0**-30).log_().neg_().log_()  # uniform → Exp(1) → log; cheaper than exponential_
    return log_w - log_e


def _safe_log_weights(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row log of ``w / max(w)`` clamped to a finite floor, plus the positive-weight flag.

    Rows whose weights are all zero (or not finite) become uniform.
    """
    w = w.float()
    w = torch.where(torch.isfinite(w) & (w > 0), w, torch.zeros((), dtype=w.dtype))
    row_max = w.amax(dim=1, keepdim=True)
    dead = row_max <= 0
    w = torch.where(dead, torch.ones((), dtype=w.dtype), w / row_max.clamp_min(1e-30))
    positive = w > 0
    log_w = w.clamp_min(1e-30).log_().clamp_min_(_LOGW_MIN)
    return log_w, positive


def _topk_mask(keys: Tensor, k: Tensor) -> Tensor:
    """bool B×N with exactly ``k[b]`` True per row: the positions of the largest keys."""
    b, n = keys.shape
    kmax = int(k.max()) if b else 0
    mask = torch.zeros(b, n, dtype=torch.bool)
    if kmax == 0:
        return mask
    idx = keys.topk(kmax, dim=1, sorted=True).indices
    keep = torch.arange(kmax).unsqueeze(0) < k.unsqueeze(1)
    return mask.scatter_(1, idx, keep)


def _interval_table(g: int) -> Tensor:
    """bool [(g + 1) * g, g]: row ``length * g + centre`` marks ``length`` cells around
    ``centre`` (start = centre − (length − 1) // 2), shifted to lie inside [0, g)."""
    length = torch.arange(g + 1).view(g + 1, 1)
    centre = torch.arange(g).view(1, g)
    start = (centre - (length - 1).clamp_min(0) // 2).clamp_min(0)
    start = torch.minimum(start, g - length)
    pos = torch.arange(g).view(1, 1, g)
    table = (pos >= start.unsqueeze(2)) & (pos < (start + length).unsqueeze(2))
    return table.reshape((g + 1) * g, g)


def rank_weights(mask: Tensor, weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(1 + r)^2 at masked positions, r = rank/(n − 1) of the position's sampling weight
    among the masked positions of its row (ascending; r = 0 when n = 1). Unmasked positions
    get 0. Ties are broken by a random permutation drawn from ``generator`` (by position
    index without one): with uniform weights every masked patch ties, and a positional
    tie-break would weight bottom-right patches 4× top-left ones for no reason."""
    b, n = mask.shape
    if b == 0 or n == 0:
        return torch.zeros(b, n, dtype=torch.float32)
    vals = torch.nan_to_num(weights.detach().to("cpu", torch.float32), nan=0.0)
    vals = torch.where(mask, vals, torch.full((), float("inf")))
    # unique integer keys ordered by (weight, position): float bits made monotone, times n, plus index
    bits = vals.view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    tiebreak = (torch.rand(b, n, generator=generator).argsort(dim=1) if generator is not None
                else torch.arange(n).expand(b, n))
    key = bits * n + tiebreak
    count = mask.sum(dim=1)
    kmax = int(count.max())
    rank = torch.zeros(b, n, dtype=torch.float32)
    if kmax == 0:
        return rank
    order = key.topk(kmax, dim=1, largest=False, sorted=True).indices  # cheaper than a full sort
    rank.scatter_(1, order, torch.arange(kmax, dtype=torch.float32).expand(b, kmax).contiguous())
    r = rank / (count.unsqueeze(1).float() - 1).clamp_min(1.0)
    return torch.where(mask, (1.0 + r).square(), torch.zeros((), dtype=torch.float32))


def frequency_weights(images01: Tensor, grids: Iterable[int], fft: str = "1d") -> dict[int, Tensor]:
    """Per-patch frequency energy for each grid: Σ over the patch of |FFT| (mean over channels),
    divided by its per-image maximum → (0, 1] (all ones for an image with no energy).

    ``fft="1d"``: the authors' FFT along the image width, its spectrum patchified as if spatial;
    ``"2d"``: ``fft2`` (PMAD). Computed on the images' device with one real FFT (the mirrored
    half of the spectrum is rebuilt from conjugate symmetry); results are CPU float32 B×N.
    """
    if fft not in ("1d", "2d"):
        raise ValueError(f"frequency_weights: fft must be '1d' or '2d', got {fft!r}")
    if images01.ndim != 4:
        raise ValueError(f"frequency_weights: images must be B×C×H×W, got shape {tuple(images01.shape)}")
    x = images01.float()
    b, _, h, w = x.shape
    grids = sorted({int(g) for g in grids}, reverse=True)
    spec = torch.fft.rfft(x, dim=-1, norm="ortho") if fft == "1d" else torch.fft.rfft2(x, norm="ortho")
    ri = torch.view_as_real(spec)  # |X| as sqrt(re² + im²): ~3× faster than complex abs() here
    half = torch.addcmul(ri[..., 0] * ri[..., 0], ri[..., 1], ri[..., 1]).sqrt_()  # B×C×H×(W//2+1)
    finest = grids[0]
    sums: dict[int, Tensor] = {}
    if h % finest == 0 and w % finest == 0:
        # Patch sums straight from the half spectrum: a bin→column-patch matrix counts each bin
        # and its conjugate mirror (|X[W-v]| = |X[v]|, rows negated for 2-D), so the full
        # spectrum is never built; channels and row bands are summed after the small matmul.
        n_half = half.shape[-1]
        v = torch.arange(n_half)
        mirrored = (v >= 1) & (v < w - w // 2)  # bins whose mirror W - v is not in the half
        direct = F.one_hot(v * finest // w, finest).float()
        mirror = F.one_hot(((w - v) % w) * finest // w, finest).float() * mirrored.unsqueeze(1).float()
        direct, mirror = direct.to(half.device), mirror.to(half.device)
        ph = h // finest
        if fft == "1d":
            cols = (half @ (direct + mirror)).sum(dim=1)  # B×H×G
        else:
            neg_rows = (-torch.arange(h, device=half.device)) % h
            cols = (half @ direct).sum(dim=1) + (half @ mirror).sum(dim=1)[:, neg_rows]
        sums[finest] = cols.reshape(b, finest, ph, finest).sum(dim=2)
        for g in grids[1:]:
            if finest % g == 0:
                r = finest // g
                sums[g] = sums[finest].reshape(b, g, r, g, r).sum(dim=(2, 4))
    missing = [g for g in grids if g not in sums]
    if missing:  # sizes that do not tile: area-weighted pooling of the full spectrum
        mag = half.mean(dim=1)
        if fft == "1d":
            mirror_part = mag[..., 1 : w - w // 2].flip(-1)
        else:
            neg_rows = (-torch.arange(h, device=mag.device)) % h
            mirror_part = mag[:, neg_rows, 1 : w - w // 2].flip(-1)
        full = torch.cat([mag, mirror_part], dim=-1).unsqueeze(1)  # B×1×H×W
        for g in missing:
            sums[g] = F.adaptive_avg_pool2d(full, g).squeeze(1)
    out = {}
    for g in grids:
        p = sums[g].reshape(b, g * g)
        mx = p.amax(dim=1, keepdim=True)
        p = torch.where(mx > 0, p / mx.clamp_min(1e-30), torch.ones((), device=p.device))
        out[g] = p.to("cpu", torch.float32)
    return out


def _pool_mean(x: Tensor, grid: int) -> Tensor:
    """Mean of B×1×H×W over each cell of a grid×grid partition → B×grid×grid (reshape when exact)."""
    b, _, h, w = x.shape
    if h % grid == 0 and w % grid == 0:
        ph, pw = h // grid, w // grid  # rows first (contiguous adds), then the short column runs
        return x.reshape(b, grid, ph, w).sum(dim=2).reshape(b, grid, grid, pw).sum(dim=3) / (ph * pw)
    return F.adaptive_avg_pool2d(x, grid).reshape(b, grid, grid)


def foreground_fractions(fg_masks: Tensor, grids: Iterable[int]) -> dict[int, Tensor]:
    """Fraction of foreground pixels per patch for each grid (CPU float32 B×N).

    Masks are expected in {0, 1} (bool or float, as the datasets produce them); the image
    is read once, at the finest grid, and coarser grids that divide it are pooled from there.
    """
    if fg_masks.ndim == 3:
        fg_masks = fg_masks.unsqueeze(1)
    if fg_masks.ndim != 4 or fg_masks.shape[1] != 1:
        raise ValueError(f"foreground masks must be B×1×H×W, got shape {tuple(fg_masks.shape)}")
    x = fg_masks if fg_masks.is_floating_point() else fg_masks.float()
    grids = sorted({int(g) for g in grids}, reverse=True)
    out: dict[int, Tensor] = {}
    finest = grids[0]
    base = _pool_mean(x.float(), finest)
    for g in grids:
        if g == finest:
            frac = base
        elif finest % g == 0:
            frac = _pool_mean(base.unsqueeze(1), g)
        else:
            frac = _pool_mean(x.float(), g)
        out[g] = frac.reshape(frac.shape[0], g * g).to("cpu", torch.float32)
    return out


def foreground_patches(frac: Tensor) -> Tensor:
    """bool B×N from foreground fractions: > 50 % foreground; rows where that leaves nothing
    fall back to "any foreground"; rows with no foreground at all are all True."""
    fg = frac > 0.5
    fg = torch.where(fg.any(dim=1, keepdim=True), fg, frac > 0)
    return torch.where(fg.any(dim=1, keepdim=True), fg, torch.ones((), dtype=torch.bool))


def pool_foreground(fg_masks: Tensor, grid: int) -> Tensor:
    """bool B×N foreground patches of one grid (see ``foreground_patches``)."""
    return foreground_patches(foreground_fractions(fg_masks, [grid])[grid])


def _check_ratio(ratio: float, where: str) -> float:
    ratio = float(ratio)
    if not (0.0 <= ratio <= 1.0):
        raise ValueError(f"{where}: mask ratio must be in [0, 1], got {ratio}")
    return ratio


def proposal_masks(abnormality: Tensor, grid: int, ratio: float) -> Tensor:
    """Test-time masks: the exact top-k positions of the abnormality map resized to the
    branch grid (area pooling when shrinking, bilinear when enlarging); k = mask_count."""
    if abnormality.ndim == 4 and abnormality.shape[1] == 1:
        abnormality = abnormality[:, 0]
    if abnormality.ndim != 3:
        raise ValueError(f"proposal_masks: abnormality must be B×h×w, got shape {tuple(abnormality.shape)}")
    if not torch.isfinite(abnormality).all():
        raise ValueError("proposal_masks: abnormality map contains NaN or inf")
    ratio = _check_ratio(ratio, "proposal_masks")
    a = abnormality.float().unsqueeze(1)
    h, w = a.shape[-2:]
    if (h, w) != (grid, grid):
        if h >= grid and w >= grid:
            a = F.adaptive_avg_pool2d(a, grid)
        else:
            a = F.interpolate(a, size=(grid, grid), mode="bilinear", align_corners=False)
    keys = a.reshape(a.shape[0], grid * grid).cpu()
    k = torch.full((keys.shape[0],), mask_count(grid, ratio), dtype=torch.long)
    return _topk_mask(keys, k)


def random_masks(batch: int, grid: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Uniform masks without replacement, exactly mask_count(grid, ratio) per row (CPU)."""
    ratio = _check_ratio(ratio, "random_masks")
    keys = torch.rand(batch, grid * grid, generator=generator)
    k = torch.full((batch,), mask_count(grid, ratio), dtype=torch.long)
    return _topk_mask(keys, k)


class FrequencyWeightCache:
    """Per-image frequency weights, computed once per image and reused every epoch.

    Training images are resized and centre-cropped without random augmentation, so an
    image's FFT energy never changes; on a CPU the FFT is most of the cost of drawing
    masks. Keyed by image path; clear it (or don't use it) if random augmentation is added.
    """

    def __init__(self, sampler: GuidedMaskSampler):
        self.sampler = sampler
        self._store: dict[str, dict[int, Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, keys: Sequence[str], images01: Tensor) -> dict[int, Tensor]:
        """``{patch: B×N}`` for the images named ``keys`` (computing only the unseen ones)."""
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing:
            new = self.sampler.frequency_weights(images01[missing])
            for j, i in enumerate(missing):
                self._store[keys[i]] = {p: w[j].clone() for p, w in new.items()}
        return {p: torch.stack([self._store[k][p] for k in keys]) for p in self.sampler.grid_sizes}


class GuidedMaskSampler:
    """Training-time guided masks for every branch, plus the per-class uncertainty state.

    Uncertainty is kept as float64 ``sum`` and ``count`` tensors [num_classes, N] per branch
    (not as a mean) so that merging ranks is exact; ``sync_across_ranks`` all-reduces what
    was added since the previous sync.
    """

    def __init__(
        self,
        grid_sizes: dict[int, int],
        num_classes: int,
        mask_ratios: Sequence[float] | float,
        input_size: int = 224,
        dynamic_masking_epoch: int = 100,
        freq_fft: str = "1d",
        fg_prob: float = 0.5,
        strategy_probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
        block_prob: float = 0.5,
        min_block_patches: int = 4,
        seed: int = 0,
        min_aspect: float = 0.3,
        block_attempts: int = 8,
    ):
        if not grid_sizes:
            raise ValueError("GuidedMaskSampler: grid_sizes is empty")
        self.grid_sizes = {int(p): int(g) for p, g in grid_sizes.items()}
        for p, g in self.grid_sizes.items():
            if g < 1:
                raise ValueError(f"GuidedMaskSampler: grid size for patch {p} must be >= 1, got {g}")
        if num_classes < 1:
            raise ValueError(f"GuidedMaskSampler: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        if isinstance(mask_ratios, (int, float)):
            ratios = [float(mask_ratios)] * self.num_classes
        else:
            ratios = [float(r) for r in mask_ratios]
            if len(ratios) != self.num_classes:
                raise ValueError(
                    f"GuidedMaskSampler: {len(ratios)} mask ratios for {self.num_classes} classes"
                )
        for r in ratios:
            _check_ratio(r, "GuidedMaskSampler")
        self.mask_ratios = ratios
        self.input_size = int(input_size)
        self.dynamic_masking_epoch = int(dynamic_masking_epoch)
        if freq_fft not in ("1d", "2d"):
            raise ValueError(f"GuidedMaskSampler: freq_fft must be '1d' or '2d', got {freq_fft!r}")
        self.freq_fft = freq_fft
        sp = torch.tensor([float(s) for s in strategy_probs], dtype=torch.float64)
        if sp.numel() != 3 or (sp < 0).any() or sp.sum() <= 0:
            raise ValueError(f"GuidedMaskSampler: strategy_probs must be 3 non-negative numbers, got {strategy_probs}")
        self.strategy_probs = tuple((sp / sp.sum()).tolist())
        self._strategy_cdf = torch.cumsum(sp / sp.sum(), 0).float()
        self._strategy_cdf[-1] = 1.0
        self.fg_prob = float(fg_prob)
        self.block_prob = float(block_prob)
        self.min_block_patches = int(min_block_patches)
        self.min_aspect = float(min_aspect)
        self.block_attempts = int(block_attempts)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        # counts per class per branch, for per-class ratios
        self._k = {
            p: torch.tensor([mask_count(g, r) for r in ratios], dtype=torch.long)
            for p, g in self.grid_sizes.items()
        }
        self._sum = {p: torch.zeros(self.num_classes, g * g, dtype=torch.float64) for p, g in self.grid_sizes.items()}
        self._count = {p: torch.zeros_like(s) for p, s in self._sum.items()}
        self._synced_sum = {p: s.clone() for p, s in self._sum.items()}
        self._synced_count = {p: s.clone() for p, s in self._count.items()}
        # coordinates of each grid, reused by the block sampler
        self._tables = {p: _interval_table(g) for p, g in self.grid_sizes.items()}
        self._row_col = {p: (torch.arange(g * g) // g, torch.arange(g * g) % g) for p, g in self.grid_sizes.items()}

    # ------------------------------------------------------------------ uncertainty state
    def _check_patch(self, patch: int) -> int:
        patch = int(patch)
        if patch not in self.grid_sizes:
            raise KeyError(f"GuidedMaskSampler: unknown patch size {patch}; known {sorted(self.grid_sizes)}")
        return patch

    def update(self, patch: int, class_index: Tensor, mask: Tensor, per_patch_ce: Tensor) -> None:
        """Add the CE of masked positions to the class's running sums (non-finite values skipped)."""
        patch = self._check_patch(patch)
        n = self.grid_sizes[patch] ** 2
        ci = class_index.detach().to("cpu", torch.long).reshape(-1)
        m = mask.detach().to("cpu").bool()
        ce = per_patch_ce.detach().to("cpu", torch.float64)
        if m.shape != (ci.numel(), n) or ce.shape != m.shape:
            raise ValueError(
                f"GuidedMaskSampler.update: expected mask and CE of shape {(ci.numel(), n)}, "
                f"got {tuple(mask.shape)} and {tuple(per_patch_ce.shape)}"
            )
        if ci.numel() and (ci.min() < 0 or ci.max() >= self.num_classes):
            raise ValueError(f"GuidedMaskSampler.update: class index out of range [0, {self.num_classes})")
        valid = m & torch.isfinite(ce)
        self._sum[patch].index_add_(0, ci, torch.where(valid, ce, torch.zeros((), dtype=ce.dtype)))
        self._count[patch].index_add_(0, ci, valid.double())

    def uncertainty(self, patch: int, class_index: Tensor) -> Tensor:
        """Sampling weights B×N: running mean CE of the sample's class per position; all ones
        (uniform) while any position of that class has no data yet."""
        patch = self._check_patch(patch)
        ci = class_index.to("cpu", torch.long).reshape(-1)
        s, c = self._sum[patch][ci], self._count[patch][ci]
        mean = (s / c.clamp_min(1.0)).float()
        ready = (c > 0).all(dim=1, keepdim=True) & (mean > 0).any(dim=1, keepdim=True)
        return torch.where(ready, mean, torch.ones((), dtype=torch.float32))

    def sync_across_ranks(self) -> None:
        """All-reduce the sums/counts added since the last sync (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            for p in self._sum:
                self._synced_sum[p] = self._sum[p].clone()
                self._synced_count[p] = self._count[p].clone()
            return
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        for p in sorted(self._sum):
            delta = torch.stack([self._sum[p] - self._synced_sum[p], self._count[p] - self._synced_count[p]])
            delta = delta.to(device)
            dist.all_reduce(delta)
            delta = delta.cpu()
            self._sum[p] = self._synced_sum[p] + delta[0]
            self._count[p] = self._synced_count[p] + delta[1]
            self._synced_sum[p] = self._sum[p].clone()
            self._synced_count[p] = self._count[p].clone()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "generator": self.generator.get_state(),
            "grid_sizes": dict(self.grid_sizes),
            "num_classes": self.num_classes,
            "sum": {p: t.clone() for p, t in self._sum.items()},
            "count": {p: t.clone() for p, t in self._count.items()},
            "synced_sum": {p: t.clone() for p, t in self._synced_sum.items()},
            "synced_count": {p: t.clone() for p, t in self._synced_count.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        try:
            grids = {int(p): int(g) for p, g in sd["grid_sizes"].items()}
            if grids != self.grid_sizes or int(sd["num_classes"]) != self.num_classes:
                raise ValueError(
                    f"GuidedMaskSampler.load_state_dict: state is for grids {grids} and "
                    f"{sd['num_classes']} classes, sampler has {self.grid_sizes} and {self.num_classes}"
                )
            tensors = {}
            for name in ("sum", "count", "synced_sum", "synced_count"):
                tensors[name] = {}
                for p, g in self.grid_sizes.items():
                    t = sd[name].get(p, sd[name].get(str(p)))
                    if t is None or tuple(t.shape) != (self.num_classes, g * g):
                        raise ValueError(
                            f"GuidedMaskSampler.load_state_dict: '{name}' for patch {p} missing or not "
                            f"of shape {(self.num_classes, g * g)}"
                        )
                    tensors[name][p] = t.to("cpu", torch.float64).clone()
            gen_state = sd["generator"]
        except KeyError as e:
            raise ValueError(f"GuidedMaskSampler.load_state_dict: missing entry {e}") from None
        self.generator.set_state(gen_state)
        self._sum, self._count = tensors["sum"], tensors["count"]
        self._synced_sum, self._synced_count = tensors["synced_sum"], tensors["synced_count"]

    # ------------------------------------------------------------------ sampling
    def frequency_weights(self, images01: Tensor) -> dict[int, Tensor]:
        """``frequency_weights`` of the images for every branch, keyed by patch size (CPU B×N)."""
        by_grid = frequency_weights(images01, set(self.grid_sizes.values()), self.freq_fft)
        return {p: by_grid[g] for p, g in self.grid_sizes.items()}

    def _draw_strategy(self, b: int) -> Tensor:
        u = torch.rand(b, 3, generator=self.generator)
        fg = (u[:, 0] < self.fg_prob).long()
        guide = torch.searchsorted(self._strategy_cdf, u[:, 1].contiguous(), right=True).clamp_max_(2)
        blk = (u[:, 2] < self.block_prob).long()
        return fg * 6 + guide * 2 + blk

    def sample(
        self,
        images01: Tensor | None,
        fg_masks: Tensor | None,
        class_index: Tensor,
        epoch: int,
        freq_weights: dict[int, Tensor] | None = None,
    ) -> dict[int, MaskBatch]:
        """Masks for every branch, as CPU tensors.

        ``images01`` (B×3×H×W in [0, 1], any device) is read only for the rows some branch
        samples frequency-guided: one FFT over those images, on their device. On a CPU that
        FFT dominates (~1 ms per 224-px image per core, vs ~0.05 ms for the rest of the
        sampler); hand in CUDA images, or precomputed ``freq_weights`` keyed by patch size
        (``self.frequency_weights(images01)``, e.g. computed per image in DataLoader workers).
        """
        ci = class_index.to("cpu", torch.long).reshape(-1)
        b = ci.numel()
        if b and (ci.min() < 0 or ci.max() >= self.num_classes):
            raise ValueError(f"GuidedMaskSampler.sample: class index out of range [0, {self.num_classes})")
        if images01 is not None:
            if images01.ndim != 4 or images01.shape[0] != b:
                raise ValueError(
                    f"GuidedMaskSampler.sample: images must be B×C×H×W with B = {b}, got {tuple(images01.shape)}"
                )
            if tuple(images01.shape[-2:]) != (self.input_size, self.input_size):
                raise ValueError(
                    f"GuidedMaskSampler.sample: images are {tuple(images01.shape[-2:])}, "
                    f"sampler was built for input_size {self.input_size}"
                )
        patches = sorted(self.grid_sizes)
        strategies = {p: self._draw_strategy(b) for p in patches}

        # frequency weights: one FFT over the images some branch needs them for
        need_freq = torch.zeros(b, dtype=torch.bool)
        for p in patches:
            need_freq |= (strategies[p] // 2) % 3 == 1
        fw: dict[int, Tensor] = {}
        if need_freq.any():
            if freq_weights is not None:
                for p in patches:
                    t = freq_weights.get(p)
                    n = self.grid_sizes[p] ** 2
                    if t is None or tuple(t.shape) != (b, n):
                        raise ValueError(
                            f"GuidedMaskSampler.sample: freq_weights[{p}] must be a {b}×{n} tensor, got "
                            f"{None if t is None else tuple(t.shape)}"
                        )
                    fw[self.grid_sizes[p]] = t.to("cpu", torch.float32)
            elif images01 is not None:
                idx = need_freq.nonzero().squeeze(1)
                sub = frequency_weights(
                    images01[idx.to(images01.device)], {self.grid_sizes[p] for p in patches}, self.freq_fft
                )
                for g, t in sub.items():
                    full = torch.ones(b, g * g, dtype=torch.float32)
                    full[idx] = t
                    fw[g] = full
            else:
                raise ValueError("GuidedMaskSampler.sample: frequency-guided masks need images or freq_weights")

        need_fg = torch.zeros(b, dtype=torch.bool)
        fg_frac: dict[int, Tensor] = {}
        if fg_masks is not None:
            if fg_masks.shape[0] != b:
                raise ValueError(
                    f"GuidedMaskSampler.sample: {fg_masks.shape[0]} foreground masks for {b} images"
                )
            for p in patches:
                need_fg |= strategies[p] >= 6
            fg_frac = foreground_fractions(fg_masks, [self.grid_sizes[p] for p in patches]) if need_fg.any() else {}

        out = {}
        dynamic = int(epoch) >= self.dynamic_masking_epoch
        for p in patches:
            g = self.grid_sizes[p]
            n = g * g
            code = strategies[p]
            guide = (code // 2) % 3
            weights = torch.ones(b, n, dtype=torch.float32)
            if fw:
                sel = guide == 1
                weights = torch.where(sel.unsqueeze(1), fw[g], weights)
            sel = guide == 2
            if sel.any():
                weights = torch.where(sel.unsqueeze(1), self.uncertainty(p, ci), weights)
            allowed = torch.ones(b, n, dtype=torch.bool)
            if fg_frac:
                allowed = torch.where((code >= 6).unsqueeze(1), foreground_patches(fg_frac[g]), allowed)
            k = self._k[p][ci]
            mask = self._sample_masks(p, weights, allowed, k, code % 2 == 1)
            rw = rank_weights(mask, weights, self.generator) if dynamic else mask.float()
            out[p] = MaskBatch(mask=mask, rank_weight=rw, strategy=code)
        return out

    def _sample_masks(self, patch: int, weights: Tensor, allowed: Tensor, k: Tensor, block: Tensor) -> Tensor:
        """Exact-count masks: scattered rows by weighted top-k, block rows by BEiT-style blobs
        whose centres are drawn by weight. Keys carry priority tiers: allowed (foreground)
        positions always come first; scattered picks take positive-weight positions before
        zero-weight ones (so weights of 0 are only used when nothing else is left)."""
        log_w, positive = _safe_log_weights(weights)
        base = log_w + positive.float() * _TIER + allowed.float() * (4 * _TIER)
        mask = torch.zeros(base.shape, dtype=torch.bool)
        if bool(block.all()):
            return self._block_masks(patch, base, allowed, k)
        if not bool(block.any()):
            return _topk_mask(_exp_race_keys(base, self.generator), k)
        si, bi = (~block).nonzero().squeeze(1), block.nonzero().squeeze(1)
        mask[si] = _topk_mask(_exp_race_keys(base[si], self.generator), k[si])
        mask[bi] = self._block_masks(patch, base[bi], allowed[bi], k[bi])
        return mask

    def _block_masks(self, patch: int, base: Tensor, allowed: Tensor, k: Tensor) -> Tensor:
        """Exact-count block masks: BEiT-style blobs (``_grow_blocks``), then rows still short
        are topped up by weight, preferring patches that touch the blobs (8-neighbours), so
        the result stays blob-shaped. Blocks never overshoot, so nothing is ever trimmed."""
        g = self.grid_sizes[patch]
        b, n = base.shape
        mask = self._grow_blocks(patch, base, allowed, k, self.block_attempts)
        if bool((mask.sum(dim=1) < k).any()):
            m = mask.view(b, 1, g, g).float()
            touch = F.max_pool2d(m, 3, stride=1, padding=1).view(b, n) > 0
            fill = base + (touch & ~mask).float() * (2 * _TIER) + mask.float() * (16 * _TIER)
            mask = _topk_mask(_exp_race_keys(fill, self.generator), k)
        return mask

    def _grow_blocks(self, patch: int, base: Tensor, allowed: Tensor, k: Tensor, attempts: int) -> Tensor:
        """BEiT-style block masking for a batch of rows at once (loop over attempts only).

        Each attempt draws, per row, an area U(min_block, remaining), a log-uniform aspect
        ratio in [min_aspect, 1/min_aspect] and a centre by weight among untried, unmasked
        (allowed first) patches; the block, clipped to the allowed region, is kept when it
        adds between 1 and `remaining` new patches, as in BEiT's MaskingGenerator. Returns
        at most k[b] masked patches per row.
        """
        g = self.grid_sizes[patch]
        b, n = base.shape
        gen = self.generator
        tab = self._tables[patch]
        row_of, col_of = self._row_col[patch]
        log_lo, log_hi = math.log(self.min_aspect), math.log(1.0 / self.min_aspect)
        min_area = float(self.min_block_patches)
        # all random numbers of the attempts at once: area fraction and sqrt(aspect)
        u = torch.rand(attempts, b, 2, generator=gen)
        frac = u[..., 0]
        sqrt_aspect = torch.exp((log_lo + u[..., 1] * (log_hi - log_lo)) * 0.5)
        inv_sqrt_aspect = sqrt_aspect.reciprocal()
        # One race over the patches orders the candidate centres by weight: each attempt
        # takes the earliest untried, unmasked centre (exponential races are memoryless,
        # so this is a weighted draw among those candidates) without drawing new keys.
        centre_keys = _exp_race_keys(base, gen)
        arange_b = torch.arange(b)
        free = allowed.view(b, g, g).clone()  # allowed and not yet masked
        remaining = k.float()
        for a in range(attempts):
            if a % 3 == 0 and not bool((remaining > 0).any()):
                break
            side = (min_area + frac[a] * (remaining.clamp_min(min_area) - min_area)).sqrt_()
            h = (side * sqrt_aspect[a]).round_().clamp_(1, g).long()
            w = (side * inv_sqrt_aspect[a]).round_().clamp_(1, g).long()
            top_key, c = centre_keys.max(dim=1)
            centre_keys[arange_b, c] = -math.inf
            # interval tables: [length * g + centre] -> bool g, clipped into the grid like BEiT
            row_in = tab[h * g + row_of[c]]
            col_in = tab[w * g + col_of[c]]
            new = row_in.unsqueeze(2) & col_in.unsqueeze(1) & free
            delta = new.view(b, n).sum(dim=1)
            accept = (delta > 0) & (delta <= remaining) & (top_key > -math.inf)
            new &= accept.view(b, 1, 1)
            free ^= new
            centre_keys.masked_fill_(new.view(b, n), -math.inf)
            remaining -= delta * accept
        return allowed & ~free.view(b, n)
