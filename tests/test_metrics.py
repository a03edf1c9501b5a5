"""engine.metrics against scikit-learn, a brute-force PRO reference, and hand-computed cases."""
import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from engine import metrics as M


# ----------------------------------------------------------------------------- references
def brute_force_aupro(maps, masks, fpr_limit=0.3):
    """Straightforward reference: one pass over all pixels per threshold (every unique score)."""
    maps = np.asarray(maps, dtype=np.float64)
    gt = np.asarray(masks) > 0.5
    regions = []  # boolean masks (full stack shape) of each 8-connected region
    for i, m in enumerate(gt):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        for k in range(1, n + 1):
            r = np.zeros_like(gt)
            r[i] = lab == k
            regions.append(r)
    normal = ~gt
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([(above & r).sum() / r.sum() for r in regions])
        pts.append((fpr, pro))
    pts.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 >= fpr_limit or x1 == x0:
            continue
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


def sklearn_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return f.max()


def random_case(rng, n=4, h=12, w=14, ties=False):
    """Blob-shaped masks (several regions, some images defect-free) and scores correlated with them."""
    noise = ndimage.gaussian_filter(rng.random((n, h, w)), sigma=(0, 1.2, 1.2))
    masks = (noise > np.quantile(noise, 0.8)).astype(np.float32)
    masks[0] = 0  # one normal image
    maps = rng.random((n, h, w)) + 0.7 * masks
    if ties:
        maps = np.round(maps * 4) / 4  # few distinct values, ties across classes
    return maps, masks


# ----------------------------------------------------------------------------- AUPRO
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_aupro_matches_brute_force(seed, ties):
    maps, masks = random_case(np.random.default_rng(seed), ties=ties)
    for limit in (0.3, 0.05, 1.0):
        assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(brute_force_aupro(maps, masks, limit), abs=1e-6)


def test_aupro_perfect_inverted_and_constant_maps():
    masks = np.zeros((2, 8, 8), np.float32)
    masks[1, 2:5, 3:6] = 1
    masks[1, 6, 6] = 1
    assert M.aupro(masks + 0.1, masks) == pytest.approx(1.0)
    assert M.aupro(1.0 - masks, masks) == pytest.approx(0.0)
    # one threshold: the curve is the diagonal (0,0)→(1,1); area to 0.3 is 0.045, /0.3
    assert M.aupro(np.full_like(masks, 0.7), masks) == pytest.approx(0.15)


def test_aupro_hand_computed():
    # one region of 2 pixels scored 0.9 / 0.5; normal pixels: one at 0.8, seven at 0.1.
    # curve: (0,0) (0,.5) (.125,.5) (.125,1) (1,1) → area to 0.3 = .125*.5 + .175*1 = .2375
    maps = np.array([[[0.9, 0.5, 0.8, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1]]])
    masks = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]], dtype=float)
    assert M.aupro(maps, masks) == pytest.approx(0.2375 / 0.3, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # (0,0) touches (1,1) only diagonally: one region of 3 pixels with 8-connectivity
    # (PRO 1/3 once (0,0) is above threshold); 4-connectivity would give two regions (PRO 1/2).
    masks = np.zeros((1, 3, 3))
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = 1
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2] = 1.0, 0.0, 0.0
    assert M.aupro(maps, masks) == pytest.approx(1 / 3)


def test_aupro_regions_are_per_image():
    # the same pixel defective in two images = two regions, not one.
    masks = np.zeros((2, 4, 4))
    masks[:, 1, 1] = 1
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1], maps[1, 1, 1] = 1.0, -1.0  # first region found before any normal pixel, second after all
    assert M.aupro(maps, masks) == pytest.approx(0.5)


def test_aupro_quantised_thresholds():
    rng = np.random.default_rng(3)
    maps, masks = random_case(rng)
    levels = np.round(maps * 5)  # integer levels 0..n
    n_levels = int(levels.max() - levels.min()) + 1
    assert M.aupro(levels, masks, num_thresholds=n_levels) == pytest.approx(M.aupro(levels, masks), abs=1e-12)
    assert M.aupro(maps, masks, num_thresholds=2000) == pytest.approx(M.aupro(maps, masks), abs=0.02)
    with pytest.raises(ValueError, match="num_thresholds"):
        M.aupro(maps, masks, num_thresholds=1)


def test_pro_curve_endpoints_and_monotone():
    maps, masks = random_case(np.random.default_rng(1))
    x, y = M.pro_curve(maps, masks)
    assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= -1e-12)


# ----------------------------------------------------------------------------- pixel metrics vs sklearn
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_pixel_metrics_equal_sklearn(seed, ties):
    maps, masks = random_case(np.random.default_rng(seed), ties=ties)
    y, s = masks.ravel() > 0.5, maps.ravel()
    got = M.compute_pixel_metrics(maps, masks)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert got["pixel_f1_max"] == pytest.approx(sklearn_f1_max(y, s), abs=1e-9)
    assert M.pixel_auroc(maps, masks) == got["pixel_auroc"]
    assert M.pixel_ap(maps, masks) == got["pixel_ap"]
    assert M.pixel_f1_max(maps, masks) == got["pixel_f1_max"]


def test_pixel_metrics_float32_larger_set_equal_sklearn():
    rng = np.random.default_rng(7)
    maps, masks = random_case(rng, n=12, h=48, w=48)
    maps = maps.astype(np.float32)
    y, s = masks.ravel() > 0.5, maps.ravel()
    got = M.compute_pixel_metrics(maps, masks)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert got["pixel_f1_max"] == pytest.approx(sklearn_f1_max(y, s), abs=1e-9)


def test_masks_binarised_above_half_and_channel_dim_accepted():
    torch = pytest.importorskip("torch")
    maps, masks = random_case(np.random.default_rng(2))
    soft = masks * 0.6 + (1 - masks) * 0.5  # 0.6 → defect, 0.5 → normal
    ref = M.compute_pixel_metrics(maps, masks)
    assert M.compute_pixel_metrics(maps, soft) == ref
    t_maps = torch.from_numpy(maps).float()[:, None]  # N×1×H×W tensor
    t_masks = torch.from_numpy(masks)[:, None]
    got = M.compute_pixel_metrics(t_maps, t_masks)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-6)
    M.compute_pixel_metrics(t_maps.bfloat16(), t_masks)  # bf16 maps are upcast, not rejected


def test_constant_maps_pixel_values():
    masks = np.zeros((2, 5, 5))
    masks[0, :2, :2] = 1  # prevalence 4/50
    got = M.compute_pixel_metrics(np.zeros((2, 5, 5)), masks)
    p = 4 / 50
    assert got["pixel_auroc"] == pytest.approx(0.5)
    assert got["pixel_ap"] == pytest.approx(p)
    assert got["pixel_f1_max"] == pytest.approx(2 * p / (1 + p))
    assert got["pixel_aupro"] == pytest.approx(0.15)


# ----------------------------------------------------------------------------- image metrics, F1-max
def test_f1_max_known_values():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # thresholds .8: F1 2/3; .4: 1/2; .35: 4/5; .1: 2/3
    f1, thr = M.f1_max_threshold(scores, labels)
    assert f1 == pytest.approx(0.8) and thr == pytest.approx(0.35)
    assert M.f1_max_threshold([0.1, 0.2, 0.9, 0.95], [0, 0, 1, 1]) == (pytest.approx(1.0), pytest.approx(0.9))
    img = M.compute_image_metrics(np.array(scores), np.array(labels))
    assert img == {"image_auroc": pytest.approx(0.75), "image_f1_max": pytest.approx(0.8)}


def test_pixel_f1_max_known_value():
    maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])
    masks = np.array([[[0, 0], [1, 1]]])
    assert M.pixel_f1_max(maps, masks) == pytest.approx(0.8)


def test_compute_all_keys_and_values():
    rng = np.random.default_rng(0)
    maps, masks = random_case(rng, n=6)
    labels = masks.reshape(6, -1).max(1).astype(int)
    scores = maps.reshape(6, -1).max(1)
    out = M.compute_all(scores, labels, maps, masks)
    assert tuple(out) == M.METRIC_KEYS == (
        "image_auroc", "image_f1_max", "pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_ap")
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["pixel_aupro"] == pytest.approx(brute_force_aupro(maps, masks), abs=1e-6)
    assert all(0.0 <= v <= 1.0 for v in out.values())
    with pytest.raises(ValueError, match="image scores"):
        M.compute_all(scores[:-1], labels[:-1], maps, masks)


# ----------------------------------------------------------------------------- edge cases
def test_image_metrics_single_class_give_nan():
    with pytest.warns(RuntimeWarning, match="undefined"):
        out = M.compute_image_metrics([0.1, 0.5, 0.3], [0, 0, 0])
    assert math.isnan(out["image_auroc"]) and math.isnan(out["image_f1_max"])
    with pytest.warns(RuntimeWarning):
        out = M.compute_image_metrics([0.1, 0.5], [1, 1])
    assert math.isnan(out["image_auroc"]) and out["image_f1_max"] == pytest.approx(1.0)


def test_pixel_metrics_without_defect_pixels_are_nan():
    with pytest.warns(RuntimeWarning):
        out = M.compute_pixel_metrics(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4)))
    assert all(math.isnan(v) for v in out.values())


def test_pixel_metrics_all_defective():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = M.compute_pixel_metrics(np.random.default_rng(0).random((1, 4, 4)), np.ones((1, 4, 4)))
    assert math.isnan(out["pixel_auroc"]) and math.isnan(out["pixel_aupro"])
    assert out["pixel_ap"] == pytest.approx(1.0) and out["pixel_f1_max"] == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
    maps, masks = np.zeros((2, 4, 4)), np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        M.compute_pixel_metrics(maps, np.zeros((2, 4, 5)))
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.compute_pixel_metrics(bad, masks)
    with pytest.raises(ValueError, match="N×H×W"):
        M.compute_pixel_metrics(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        M.compute_image_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(*random_case(np.random.default_rng(0)), fpr_limit=0.0)
