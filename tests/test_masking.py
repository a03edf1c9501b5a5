"""Tests for datasets.masking: exact counts, strategies, guidance, reproducibility, state."""

from __future__ import annotations

import io
import itertools
import os
import tempfile

import pytest
import torch
from scipy import ndimage

from datasets.masking import (
    STRATEGY_NAMES,
    GuidedMaskSampler,
    describe_strategy,
    frequency_weights,
    mask_count,
    pool_foreground,
    proposal_masks,
    random_masks,
    rank_weights,
)

S = 112  # input size; grids 14 and 7 as at 224 px with patches 16/32
GRIDS = {8: 14, 16: 7}


def forced(fg: int, guide: int, block: int, **kw) -> GuidedMaskSampler:
    """Sampler that always draws one strategy combination."""
    probs = [0.0, 0.0, 0.0]
    probs[guide] = 1.0
    kw.setdefault("mask_ratios", 0.3)
    kw.setdefault("num_classes", 3)
    return GuidedMaskSampler(
        GRIDS, input_size=S, fg_prob=float(fg), strategy_probs=probs, block_prob=float(block), **kw
    )


def images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, S, S, generator=torch.Generator().manual_seed(seed))


def fg_box(b: int, rows: slice, cols: slice) -> torch.Tensor:
    fg = torch.zeros(b, 1, S, S)
    fg[:, :, rows, cols] = 1
    return fg


def components(mask: torch.Tensor, g: int) -> list[int]:
    return [ndimage.label(m.view(g, g).numpy())[1] for m in mask]


# ---------------------------------------------------------------- counts
def test_mask_count_values():
    assert mask_count(14, 0.3) == 59 and mask_count(7, 0.3) == 15
    assert mask_count(14, 0.02) == 4 and mask_count(7, 0.02) == 1
    assert mask_count(14, 0.98) == 192 and mask_count(7, 0.98) == 48
    assert mask_count(7, 0.0) == 0 and mask_count(7, 1.0) == 49
    assert mask_count(7, 0.001) == 1  # a positive ratio never gives an empty mask
    assert mask_count(2, 0.125) == 1  # round half up (0.5 -> 1), not banker's rounding
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            mask_count(7, bad)


@pytest.mark.parametrize("fg,guide,block", list(itertools.product((0, 1), (0, 1, 2), (0, 1))))
def test_exact_counts_every_strategy(fg, guide, block):
    ratios = (0.02, 0.3, 0.98)
    s = forced(fg, guide, block, mask_ratios=ratios, dynamic_masking_epoch=0)
    b = 24
    ci = torch.arange(b) % 3
    # give the uncertainty state data so guide 2 uses real weights
    for p, g in GRIDS.items():
        s.update(p, torch.arange(3), torch.ones(3, g * g, dtype=torch.bool), torch.rand(3, g * g) + 0.1)
    fgm = fg_box(b, slice(0, S // 2), slice(0, S))
    out = s.sample(images(b), fgm, ci, epoch=5)
    assert set(out) == set(GRIDS)
    for p, g in GRIDS.items():
        mb = out[p]
        assert mb.mask.dtype == torch.bool and mb.mask.shape == (b, g * g)
        expect = torch.tensor([mask_count(g, ratios[c]) for c in ci.tolist()])
        assert torch.equal(mb.mask.sum(1), expect)
        assert torch.all(mb.strategy == fg * 6 + guide * 2 + block)
        assert torch.isfinite(mb.rank_weight).all()


@pytest.mark.parametrize("ratio", [0.02, 0.04, 0.1, 0.16, 0.3, 0.48, 0.7, 0.98, 1.0])
def test_exact_counts_mixed_strategies(ratio):
    s = GuidedMaskSampler(GRIDS, 2, ratio, input_size=S, seed=3)
    b = 32
    out = s.sample(images(b), fg_box(b, slice(10, 60), slice(20, 90)), torch.randint(0, 2, (b,)), epoch=0)
    for p, g in GRIDS.items():
        assert torch.all(out[p].mask.sum(1) == mask_count(g, ratio))
        assert torch.equal(out[p].rank_weight, out[p].mask.float())  # before the dynamic epoch


def test_all_zero_weights_and_empty_foreground_are_safe():
    """Frequency weights of a black image are all zero and the fg mask is empty: still exact, no NaN."""
    for block in (0, 1):
        s = forced(1, 1, block, dynamic_masking_epoch=0)
        b = 6
        out = s.sample(torch.zeros(b, 3, S, S), torch.zeros(b, 1, S, S), torch.zeros(b, dtype=torch.long), epoch=1)
        for p, g in GRIDS.items():
            assert torch.all(out[p].mask.sum(1) == mask_count(g, 0.3))
            assert torch.isfinite(out[p].rank_weight).all()


# ---------------------------------------------------------------- foreground
@pytest.mark.parametrize("guide,block", list(itertools.product((0, 1, 2), (0, 1))))
def test_foreground_restriction(guide, block):
    b = 16
    s = forced(1, guide, block)
    # fg = left 3/4 of the image: enough patches for ratio 0.3 on both grids
    fgm = fg_box(b, slice(0, S), slice(0, 3 * S // 4))
    out = s.sample(images(b), fgm, torch.zeros(b, dtype=torch.long), epoch=0)
    for p, g in GRIDS.items():
        fgp = pool_foreground(fgm, g)
        assert torch.all(out[p].mask <= fgp), f"masked outside fg, patch {p}"
    # fg too small: every fg patch is masked and the rest comes from the background
    small = fg_box(b, slice(0, S // 4), slice(0, S // 4))
    out = s.sample(images(b), small, torch.zeros(b, dtype=torch.long), epoch=0)
    for p, g in GRIDS.items():
        fgp = pool_foreground(small, g)
        assert fgp.sum(1).max() < mask_count(g, 0.3)
        assert torch.all(fgp <= out[p].mask)
        assert torch.all(out[p].mask.sum(1) == mask_count(g, 0.3))


def test_anywhere_strategy_ignores_foreground():
    b = 64
    s = forced(0, 0, 0)
    fgm = fg_box(b, slice(0, S), slice(0, S // 2))
    out = s.sample(images(b), fgm, torch.zeros(b, dtype=torch.long), epoch=0)
    fgp = pool_foreground(fgm, 14)
    outside = (out[8].mask & ~fgp).float().mean() / out[8].mask.float().mean()
    assert 0.35 < outside < 0.65


def test_pool_foreground_rules():
    fg = torch.zeros(2, 1, 14, 14)
    fg[0, 0, :2, :2] = 1  # exactly one 2×2 cell of a 7×7 grid: > 50 %
    fg[1, 0, 0, 0] = 1  # one pixel: falls back to "any foreground"
    p = pool_foreground(fg, 7)
    assert p[0].sum() == 1 and p[0, 0]
    assert p[1].sum() == 1 and p[1, 0]
    assert pool_foreground(torch.zeros(1, 1, 14, 14), 7).all()  # nothing: no restriction


# ---------------------------------------------------------------- block shapes
def neighbour_share(mask: torch.Tensor, g: int) -> float:
    """Share of masked patches that have a masked 4-neighbour (1 for blobs)."""
    m = mask.view(-1, 1, g, g).float()
    k = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    nb = torch.nn.functional.conv2d(m, k, padding=1) > 0
    return ((nb & (m > 0)).sum() / m.sum()).item()


def test_block_masks_are_blobs():
    b = 48
    ci = torch.zeros(b, dtype=torch.long)
    blk = forced(0, 0, 1, seed=1).sample(images(b), None, ci, epoch=0)
    sct = forced(0, 0, 0, seed=1).sample(images(b), None, ci, epoch=0)
    for p, g in GRIDS.items():
        cb = torch.tensor(components(blk[p].mask, g), dtype=torch.float).mean()
        cs = torch.tensor(components(sct[p].mask, g), dtype=torch.float).mean()
        assert cb < 0.5 * cs, (p, cb, cs)
        assert neighbour_share(blk[p].mask, g) > 0.95
        assert neighbour_share(blk[p].mask, g) > neighbour_share(sct[p].mask, g) + 0.2


@pytest.mark.parametrize("patch", sorted(GRIDS))
def test_single_block_geometry(patch):
    """One attempt places one BEiT block per row: a filled rectangle of about the drawn
    area (>= 3 patches after rounding, >= min 4 before), aspect within 0.3–3.3 up to rounding,
    centred on the highest-weight patch when the weights are peaked."""
    g = GRIDS[patch]
    b = 200
    s = forced(0, 0, 1, seed=4)
    k = torch.full((b,), mask_count(g, 0.5))
    base = torch.zeros(b, g * g)
    m = s._grow_blocks(patch, base, torch.ones(b, g * g, dtype=torch.bool), k, attempts=1)
    sizes = m.sum(1)
    assert torch.all(sizes <= k)
    placed = 0
    for row in m.view(b, g, g).numpy():
        lab, n = ndimage.label(row)
        if n == 0:
            continue  # rejected (would overshoot): the BEiT rule
        assert n == 1
        sl = ndimage.find_objects(lab)[0]
        hh, ww = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        assert row.sum() == hh * ww  # a filled rectangle
        assert hh * ww >= 3 or min(hh, ww) == g
        if max(hh, ww) < g:  # not clipped by the grid
            assert max(hh / ww, ww / hh) <= 4.0
        placed += 1
    assert placed > 0.8 * b
    # peaked weights: the block covers the heaviest patch
    w = torch.zeros(b, g * g)
    w[:, g * (g // 2) + 1] = 1.0
    base = _safe_base(w)
    m = s._grow_blocks(patch, base, torch.ones(b, g * g, dtype=torch.bool), k, attempts=1)
    hit = m[:, g * (g // 2) + 1] | (m.sum(1) == 0)
    assert hit.all()


def _safe_base(w: torch.Tensor) -> torch.Tensor:
    from datasets.masking import _TIER, _safe_log_weights

    log_w, positive = _safe_log_weights(w)
    return log_w + positive.float() * _TIER


# ---------------------------------------------------------------- guidance
def test_uncertainty_guides_masks():
    b = 64
    g = 14
    hot = torch.zeros(g, g, dtype=torch.bool)
    hot[2:6, 3:8] = True  # 20 positions
    hot = hot.view(-1)
    s_unc = forced(0, 2, 0, num_classes=2)
    # before any data: uniform fallback
    assert torch.equal(s_unc.uncertainty(8, torch.tensor([0, 1])), torch.ones(2, g * g))
    ce = torch.where(hot, 10.0, 0.1).expand(4, -1)
    s_unc.update(8, torch.zeros(4, dtype=torch.long), torch.ones(4, g * g, dtype=torch.bool), ce)
    w = s_unc.uncertainty(8, torch.tensor([0, 1]))
    assert torch.allclose(w[0], torch.where(hot, 10.0, 0.1))
    assert torch.equal(w[1], torch.ones(g * g))  # class 1 has no data yet
    ci = torch.zeros(b, dtype=torch.long)

    def hit_rate(sampler, ratio_hot):
        out = sampler.sample(images(b), None, ci, epoch=0)[8].mask
        return (out & hot).sum().item() / out.sum().item()

    unc = hit_rate(s_unc, hot)
    uni = hit_rate(forced(0, 0, 0, num_classes=2), hot)
    assert unc > 0.3 and unc > 2.5 * uni, (unc, uni)
    # block-wise masks follow it too (centres drawn by weight)
    s_blk = forced(0, 2, 1, num_classes=2)
    s_blk.load_state_dict({**s_unc.state_dict(), "generator": s_blk.generator.get_state()})
    blk = hit_rate(s_blk, hot)
    uni_blk = hit_rate(forced(0, 0, 1, num_classes=2), hot)
    assert blk > 2 * uni_blk, (blk, uni_blk)


def test_uncertainty_partial_data_falls_back_to_uniform():
    s = forced(0, 2, 0, num_classes=1)
    n = 49
    m = torch.zeros(1, n, dtype=torch.bool)
    m[0, :10] = True
    s.update(16, torch.zeros(1, dtype=torch.long), m, torch.full((1, n), 5.0))
    assert torch.equal(s.uncertainty(16, torch.zeros(1, dtype=torch.long)), torch.ones(1, n))
    # non-finite CE values are skipped, not summed
    bad = torch.full((1, n), float("nan"))
    s.update(16, torch.zeros(1, dtype=torch.long), torch.ones(1, n, dtype=torch.bool), bad)
    assert torch.isfinite(s.state_dict()["sum"][16]).all()
    with pytest.raises(ValueError):
        s.update(16, torch.zeros(1, dtype=torch.long), torch.ones(1, 48, dtype=torch.bool), torch.ones(1, 48))
    with pytest.raises(ValueError):
        s.update(16, torch.tensor([3]), m, torch.ones(1, n))
    with pytest.raises(KeyError):
        s.uncertainty(7, torch.zeros(1, dtype=torch.long))


def half_noisy(b: int) -> torch.Tensor:
    x = torch.zeros(b, 3, S, S)
    x[:, :, S // 2 :, :] = torch.rand(b, 3, S // 2, S, generator=torch.Generator().manual_seed(1))
    return x


@pytest.mark.parametrize("block", [0, 1])
def test_frequency_guides_masks_to_noisy_half(block):
    b = 32
    x = half_noisy(b)
    ci = torch.zeros(b, dtype=torch.long)
    freq = forced(0, 1, block).sample(x, None, ci, epoch=0)
    uni = forced(0, 0, block).sample(x, None, ci, epoch=0)
    for p, g in GRIDS.items():
        flat = torch.zeros(g, g, dtype=torch.bool)
        flat[: g // 2] = True  # patches fully in the flat (all-zero) half: zero frequency weight
        flat = flat.view(-1)
        f = ((freq[p].mask & flat).sum() / freq[p].mask.sum()).item()
        u = ((uni[p].mask & flat).sum() / uni[p].mask.sum()).item()
        if block == 0:
            assert f == 0.0, (p, f)  # zero-weight patches only when nothing else is left
        else:
            assert f < 0.25 and f < u - 0.15, (p, f, u)


@pytest.mark.parametrize("fft", ["1d", "2d"])
@pytest.mark.parametrize("size,grid", [(56, 7), (56, 14), (45, 5), (50, 7)])
def test_frequency_weights_match_full_fft(fft, size, grid):
    """The rfft + conjugate-mirror shortcut equals the plain complex FFT definition."""
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    got = frequency_weights(x, [grid], fft)[grid]
    if fft == "1d":
        mag = torch.fft.fft(x, dim=-1, norm="ortho").abs().mean(1, keepdim=True)
    else:
        mag = torch.fft.fft2(x, norm="ortho").abs().mean(1, keepdim=True)
    ref = torch.nn.functional.adaptive_avg_pool2d(mag, grid).flatten(1)
    ref = ref / ref.amax(1, keepdim=True)
    assert got.shape == (3, grid * grid)
    assert torch.allclose(got, ref, atol=1e-5)
    assert got.max() <= 1 and got.min() > 0
    with pytest.raises(ValueError):
        frequency_weights(x, [grid], "3d")
    # several grids in one call (coarser ones pooled from the finest) agree with one-by-one
    both = frequency_weights(x, [grid, 1], fft)
    assert torch.allclose(both[grid], got, atol=1e-6)
    assert torch.allclose(both[1], torch.ones(3, 1))


def test_precomputed_frequency_weights_give_identical_masks():
    b = 8
    x = images(b)
    ci = torch.zeros(b, dtype=torch.long)
    a = forced(0, 1, 0).sample(x, None, ci, epoch=0)
    fw = forced(0, 1, 0).frequency_weights(x)
    assert torch.equal(fw[8], frequency_weights(x, [14])[14])
    c = forced(0, 1, 0).sample(None, None, ci, epoch=0, freq_weights=fw)
    for p in GRIDS:
        assert torch.equal(a[p].mask, c[p].mask)
    with pytest.raises(ValueError):
        forced(0, 1, 0).sample(None, None, ci, epoch=0)
    with pytest.raises(ValueError, match="freq_weights"):
        forced(0, 1, 0).sample(None, None, ci, epoch=0, freq_weights={8: fw[8]})


# ---------------------------------------------------------------- rank weights
def test_rank_weight_formula():
    w = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.2, 0.2, 0.2, 0.2], [0.7, 0.1, 0.3, 0.2]])
    m = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    rw = rank_weights(m, w)
    assert torch.allclose(rw[0], torch.tensor([1.0, 2.25, 0.0, 4.0]))
    assert torch.allclose(rw[1], torch.tensor([1.0, 0.0, 2.25, 4.0]))  # ties: by position
    assert torch.equal(rw[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # one masked patch: r = 0, no NaN


def test_rank_weights_in_sampler():
    b = 16
    s = GuidedMaskSampler(GRIDS, 2, [0.02, 0.3], input_size=S, dynamic_masking_epoch=3)
    ci = torch.arange(b) % 2
    before = s.sample(images(b), None, ci, epoch=2)
    after = s.sample(images(b), None, ci, epoch=3)
    for p in GRIDS:
        assert torch.equal(before[p].rank_weight, before[p].mask.float())
        rw, m = after[p].rank_weight, after[p].mask
        assert torch.isfinite(rw).all()
        assert torch.all(rw[~m] == 0)
        assert rw[m].min() >= 1 and rw[m].max() <= 4
        for row in range(b):
            k = int(m[row].sum())
            vals = rw[row][m[row]].sort().values
            expect = (1 + torch.arange(k) / max(k - 1, 1)) ** 2
            assert torch.allclose(vals, expect)
    # 7×7 at ratio 0.02 -> one masked patch with weight exactly 1
    one = after[16].rank_weight[ci == 0]
    assert torch.all(one.sum(1) == 1)


# ---------------------------------------------------------------- reproducibility / state
def _run(s, steps, b=8):
    outs = []
    for t in range(steps):
        ci = torch.arange(b) % 3
        out = s.sample(images(b, seed=t), fg_box(b, slice(0, 80), slice(0, 80)), ci, epoch=t)
        for p, g in GRIDS.items():
            s.update(p, ci, out[p].mask, torch.rand(b, g * g, generator=torch.Generator().manual_seed(t)) * 5)
        outs.append(out)
    return outs


def _same(a, b):
    return all(
        torch.equal(x[p].mask, y[p].mask)
        and torch.equal(x[p].rank_weight, y[p].rank_weight)
        and torch.equal(x[p].strategy, y[p].strategy)
        for x, y in zip(a, b)
        for p in GRIDS
    )


def test_reproducible_under_seed():
    mk = lambda seed: GuidedMaskSampler(GRIDS, 3, 0.3, input_size=S, dynamic_masking_epoch=2, seed=seed)
    assert _same(_run(mk(7), 4), _run(mk(7), 4))
    assert not _same(_run(mk(7), 4), _run(mk(8), 4))


def test_state_dict_round_trip_continues_sequence():
    mk = lambda: GuidedMaskSampler(GRIDS, 3, 0.3, input_size=S, dynamic_masking_epoch=2, seed=11)
    a = mk()
    _run(a, 3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    expected = _run(a, 3)
    b = mk()
    b.load_state_dict(sd)
    assert _same(_run(b, 3), expected)
    # mismatched config is refused with a clear message
    other = GuidedMaskSampler({16: 7}, 3, 0.3, input_size=S)
    with pytest.raises(ValueError, match="grids"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        mk().load_state_dict({"version": 1})


def test_strategy_mix_matches_probabilities():
    b = 3000
    s = GuidedMaskSampler({16: 7}, 1, 0.3, input_size=S, seed=0)
    fw = {16: torch.ones(b, 49)}
    code = s.sample(None, None, torch.zeros(b, dtype=torch.long), epoch=0, freq_weights=fw)[16].strategy
    fg, guide, blk = code // 6, (code // 2) % 3, code % 2
    assert abs(fg.float().mean() - 0.5) < 0.05
    assert abs(blk.float().mean() - 0.5) < 0.05
    for i in range(3):
        assert abs((guide == i).float().mean() - 1 / 3) < 0.05
    assert describe_strategy(11) == STRATEGY_NAMES[11] == "fg-uncertainty-block"


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mask ratios"):
        GuidedMaskSampler(GRIDS, 3, [0.1, 0.2], input_size=S)
    with pytest.raises(ValueError):
        GuidedMaskSampler(GRIDS, 3, 0.3, input_size=S, freq_fft="3d")
    s = GuidedMaskSampler(GRIDS, 3, 0.3, input_size=S)
    with pytest.raises(ValueError, match="input_size"):
        s.sample(torch.rand(2, 3, 64, 64), None, torch.zeros(2, dtype=torch.long), epoch=0)
    with pytest.raises(ValueError, match="class index"):
        s.sample(images(2), None, torch.tensor([0, 5]), epoch=0)


# ---------------------------------------------------------------- test-time masks
def test_proposal_masks_top_k():
    g = 7
    a = torch.randperm(49, generator=torch.Generator().manual_seed(0)).float().view(1, 7, 7).repeat(3, 1, 1)
    m = proposal_masks(a, g, 0.3)
    k = mask_count(g, 0.3)
    assert torch.equal(m[0], a[0].flatten() >= 49 - k)
    # resized from a finer map by area: a hot 4×4 pixel region = one 7×7 cell of a 28×28 map
    fine = torch.zeros(2, 28, 28)
    fine[:, 8:12, 12:16] = 5.0
    fine[:, 0:4, 0:4] = 1.0
    pm = proposal_masks(fine, g, 0.02)
    assert pm.sum(1).tolist() == [1, 1] and pm[0, 2 * 7 + 3]
    pm = proposal_masks(fine, g, 0.04)
    assert pm.sum(1).tolist() == [2, 2] and pm[0, 0]
    # ties never over-select; enlarging works
    assert torch.all(proposal_masks(torch.zeros(2, 28, 28), 14, 0.3).sum(1) == mask_count(14, 0.3))
    assert torch.all(proposal_masks(torch.rand(2, 4, 4), 14, 0.5).sum(1) == 98)
    with pytest.raises(ValueError):
        proposal_masks(torch.full((1, 7, 7), float("nan")), 7, 0.3)


def test_random_masks_exact_and_seeded():
    for g, r in ((14, 0.3), (7, 0.02), (7, 0.98)):
        m = random_masks(10, g, r, torch.Generator().manual_seed(0))
        assert m.shape == (10, g * g) and torch.all(m.sum(1) == mask_count(g, r))
    a = random_masks(4, 14, 0.3, torch.Generator().manual_seed(1))
    b = random_masks(4, 14, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    freq = torch.stack([random_masks(64, 7, 0.3, torch.Generator().manual_seed(i)) for i in range(20)]).float()
    assert freq.mean((0, 1)).min() > 0.15  # every position gets masked: uniform, not fixed


# ---------------------------------------------------------------- distributed merge
def _ddp_worker(rank, world, path, result_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    s = GuidedMaskSampler({16: 7}, 2, 0.3, input_size=S)
    m = torch.ones(1, 49, dtype=torch.bool)
    s.update(16, torch.tensor([rank]), m, torch.full((1, 49), float(rank + 1)))
    s.sync_across_ranks()
    s.update(16, torch.tensor([0]), m, torch.full((1, 49), 10.0))
    s.sync_across_ranks()
    s.sync_across_ranks()  # nothing new: must not double count
    if rank == 0:
        sd = s.state_dict()
        torch.save({"sum": sd["sum"][16], "count": sd["count"][16]}, result_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_across_ranks_is_exact():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        res = os.path.join(d, "res.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "store"), res), nprocs=2, join=True)
        out = torch.load(res, weights_only=True)
    assert torch.equal(out["count"][0], torch.full((49,), 3.0, dtype=torch.float64))
    assert torch.equal(out["count"][1], torch.full((49,), 1.0, dtype=torch.float64))
    assert torch.equal(out["sum"][0], torch.full((49,), 21.0, dtype=torch.float64))
    assert torch.equal(out["sum"][1], torch.full((49,), 2.0, dtype=torch.float64))


def test_sync_without_distributed_is_noop():
    s = GuidedMaskSampler({16: 7}, 1, 0.3, input_size=S)
    s.update(16, torch.zeros(1, dtype=torch.long), torch.ones(1, 49, dtype=torch.bool), torch.ones(1, 49))
    before = s.state_dict()["sum"][16].clone()
    s.sync_across_ranks()
    assert torch.equal(s.state_dict()["sum"][16], before)


def test_sync_merges_increments_once(monkeypatch):
    """Fast check of the bookkeeping with a fake 2-rank all-reduce: each sync adds the other
    rank's increments since the previous sync, never the totals."""
    import torch.distributed as dist

    other = {"delta": None}

    def fake_all_reduce(t, *a, **kw):
        t += other["delta"](t)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    s = GuidedMaskSampler({16: 7}, 1, 0.3, input_size=S)
    ones = torch.ones(1, 49, dtype=torch.bool)
    zero = torch.zeros(1, dtype=torch.long)
    s.update(16, zero, ones, torch.full((1, 49), 2.0))

    def peer(t):  # the other rank added CE 3 once per position
        d = torch.zeros_like(t)
        d[0], d[1] = 3.0, 1.0
        return d

    other["delta"] = peer
    s.sync_across_ranks()
    sd = s.state_dict()
    assert torch.all(sd["sum"][16] == 5.0) and torch.all(sd["count"][16] == 2.0)
    other["delta"] = torch.zeros_like  # nothing new anywhere: totals must not change
    s.sync_across_ranks()
    sd = s.state_dict()
    assert torch.all(sd["sum"][16] == 5.0) and torch.all(sd["count"][16] == 2.0)
    assert torch.allclose(s.uncertainty(16, zero), torch.full((1, 49), 2.5))


def test_two_d_fft_option_and_empty_batch():
    s = GuidedMaskSampler(GRIDS, 1, 0.3, input_size=S, freq_fft="2d", strategy_probs=(0, 1, 0))
    out = s.sample(images(4), None, torch.zeros(4, dtype=torch.long), epoch=0)
    for p, g in GRIDS.items():
        assert torch.all(out[p].mask.sum(1) == mask_count(g, 0.3))
    empty = s.sample(images(0), None, torch.zeros(0, dtype=torch.long), epoch=200)
    for p, g in GRIDS.items():
        assert empty[p].mask.shape == (0, g * g) and empty[p].rank_weight.shape == (0, g * g)


def test_rank_weight_ties_are_broken_randomly_not_by_position():
    """Uniform weights tie everywhere: the rank weight must not favour later raster positions."""
    from datasets.masking import rank_weights

    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4000, 16, dtype=torch.bool)
    rw = rank_weights(mask, torch.ones(4000, 16), gen)
    first, last = rw[:, 0].mean().item(), rw[:, -1].mean().item()
    assert abs(first - last) < 0.1, (first, last)
    # without a generator the documented positional tie-break applies
    rw_pos = rank_weights(mask[:1], torch.ones(1, 16))
    assert rw_pos[0, 0] == 1.0 and rw_pos[0, -1] == 4.0


def test_frequency_weight_cache_matches_direct_computation_and_computes_once(monkeypatch):
    from datasets.masking import FrequencyWeightCache, GuidedMaskSampler

    sampler = GuidedMaskSampler({16: 4, 32: 2}, num_classes=1, mask_ratios=0.3, input_size=64, seed=0)
    images = torch.rand(3, 3, 64, 64)
    cache = FrequencyWeightCache(sampler)
    first = cache.get(["a", "b", "c"], images)
    direct = sampler.frequency_weights(images)
    for p in (16, 32):
        assert torch.allclose(first[p], direct[p])
    calls = []
    orig = sampler.frequency_weights
    monkeypatch.setattr(sampler, "frequency_weights", lambda x: calls.append(len(x)) or orig(x))
    again = cache.get(["c", "a"], images[[2, 0]])
    assert calls == [] and torch.equal(again[16], first[16][[2, 0]])
    cache.get(["a", "d"], torch.rand(2, 3, 64, 64))
    assert calls == [1] and len(cache) == 4
