"""Anomaly-detection metrics: image AUROC / F1-max, pixel AUROC / AUPRO / F1-max / AP.

Image-level metrics call scikit-learn directly (a few hundred scores per class).

Pixel-level metrics run over every pixel of a test set (MVTec AD: 1,725 images at 224² ≈
86.6M pixels). scikit-learn would argsort all of them and build several float64 copies,
once per metric. Here all four pixel metrics come, exactly, from one ``np.sort`` of the
normal pixels and one argsort of the (few) defect pixels: every curve only changes shape
at the distinct *defect-pixel* scores, and the normal-pixel counts there are
``searchsorted`` look-ups. Tests check the results equal scikit-learn (AUROC, AP, F1-max)
and a brute-force per-threshold PRO reference on small inputs.

Conventions (DESIGN.md §2):
- Ground-truth masks are binarised as ``> 0.5``; image labels must be 0 (normal) / 1.
- AUPRO follows MVTec AD's official evaluation code: ground-truth regions are the
  connected components of each mask with **8-connectivity** (``structure = ones(3, 3)``,
  as the official ``compute_pro`` does); FPR over all normal pixels of the set; PRO =
  mean over regions of the fraction of the region above the threshold; the curve starts
  at (0, 0), ends at (1, 1), is integrated with the trapezoid rule up to ``fpr_limit``
  (default 0.3, value at the limit linearly interpolated) and divided by ``fpr_limit``,
  so a perfect map scores 1.
- Undefined metrics return ``float('nan')`` with a ``RuntimeWarning`` instead of raising,
  so one degenerate class does not abort a whole evaluation: AUROC and AUPRO need both
  classes; F1-max and AP need at least one positive.
- Anomaly maps with NaN or infinite values are rejected (``ValueError``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

IMAGE_METRIC_KEYS = ("image_auroc", "image_f1_max")
PIXEL_METRIC_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_ap")
METRIC_KEYS = IMAGE_METRIC_KEYS + PIXEL_METRIC_KEYS

# 8-connectivity, as in MVTec AD's official evaluation code (np.ones((3, 3))).
PRO_STRUCTURE = np.ones((3, 3), dtype=int)
DEFAULT_FPR_LIMIT = 0.3


def to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, lists or torch tensors (any device, bf16/fp16 upcast to fp32)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point() and str(x.dtype) not in ("torch.float32", "torch.float64"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def as_map_stack(x: Any, name: str) -> np.ndarray:
    """N×H×W view of maps/masks given as N×H×W or N×1×H×W."""
    a = to_numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected shape N×H×W or N×1×H×W, got {tuple(a.shape)}")
    return a


def _as_scores(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def _as_labels(x: Any, n: int) -> np.ndarray:
    a = to_numpy(x).reshape(-1)
    if a.shape[0] != n:
        raise ValueError(f"labels: expected {n} values (one per score), got {a.shape[0]}")
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"labels: must be 0 (normal) or 1 (anomalous), got values {np.unique(a)[:10]}")
    return a.astype(bool)


def binarize_masks(masks: Any) -> np.ndarray:
    """Ground-truth masks as bool N×H×W (``> 0.5``, DESIGN.md §2)."""
    m = as_map_stack(masks, "ground-truth masks")
    return m if m.dtype == bool else m > 0.5


def _nan(metric: str, why: str) -> float:
    warnings.warn(f"{metric} is undefined ({why}); returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


# ----------------------------------------------------------------------------- image level
def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """(best F1, threshold): predicting ``score >= threshold`` as anomalous attains the best F1.

    The threshold is what the authors' *paper* protocol fits on test labels.
    """
    from sklearn.metrics import precision_recall_curve

    s = _as_scores(scores, "scores").reshape(-1)
    y = _as_labels(labels, s.shape[0])
    if not y.any():
        return _nan("F1-max", "no anomalous samples"), float("nan")
    precision, recall, thresholds = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def compute_image_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """``{"image_auroc", "image_f1_max"}`` from per-image scores (N) and labels (N, 0/1)."""
    from sklearn.metrics import roc_auc_score

    s = _as_scores(scores, "scores").reshape(-1)
    y = _as_labels(labels, s.shape[0])
    if y.all() or not y.any():
        auroc = _nan("image AUROC", "test set has only one class of images")
    else:
        auroc = float(roc_auc_score(y, s))
    return {"image_auroc": auroc, "image_f1_max": f1_max_threshold(s, y)[0]}


# ----------------------------------------------------------------------------- pixel level
@dataclass
class PixelCurves:
    """Counts at every distinct defect-pixel score (descending) — all pixel metrics derive from these.

    ``tp[g]`` defect pixels and ``fp_ge[g]`` normal pixels have score >= ``values[g]``;
    ``fp_gt[g]`` normal pixels have score > ``values[g]``; ``pro[g]`` is the mean
    per-region overlap at threshold ``values[g]`` (None when not requested).
    """

    n_pos: int
    n_neg: int
    n_regions: int
    values: np.ndarray
    tp: np.ndarray
    fp_ge: np.ndarray
    fp_gt: np.ndarray
    pro: np.ndarray | None


def _region_overlap_weights(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """1/region-size for every defect pixel (C order, like ``maps[gt]``) and the number of regions.

    Looping over images keeps memory at one image's int32 label map.
    """
    parts, n_regions = [], 0
    for m in gt:
        if not m.any():
            continue
        lab, n = ndimage.label(m, structure=PRO_STRUCTURE)
        sizes = np.bincount(lab.ravel())
        parts.append(1.0 / sizes[lab[m]])
        n_regions += n
    w = np.concatenate(parts) if parts else np.zeros(0)
    return w, n_regions


def _quantize(maps: np.ndarray, num_thresholds: int) -> np.ndarray:
    """Replace each score by the largest of ``num_thresholds`` evenly spaced levels <= it."""
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
    levels = np.linspace(float(maps.min()), float(maps.max()), num_thresholds)
    return levels[np.searchsorted(levels, maps, side="right") - 1]


def pixel_curves(maps: Any, masks: Any, with_pro: bool = True, num_thresholds: int | None = None) -> PixelCurves:
    """Sort once, count everywhere: see the module docstring.

    Memory: one sorted copy of the normal pixels, plus a few arrays the size of the
    defect pixels; no float64 or int64 copy of the whole pixel set.
    """
    a = _as_scores(as_map_stack(maps, "anomaly maps"), "anomaly maps")
    gt = binarize_masks(masks)
    if a.shape != gt.shape:
        raise ValueError(f"anomaly maps {tuple(a.shape)} and ground-truth masks {tuple(gt.shape)} differ in shape")
    if num_thresholds is not None:
        a = _quantize(a, num_thresholds)

    neg = a[~gt]  # copy of the normal pixels ...
    neg.sort()  # ... sorted in place (ascending)
    pos = a[gt]
    n_pos, n_neg = int(pos.size), int(neg.size)

    order = np.argsort(pos, kind="stable")[::-1]  # descending
    pos_sorted = pos[order]
    ends = np.append(np.flatnonzero(pos_sorted[1:] != pos_sorted[:-1]), n_pos - 1) if n_pos else np.zeros(0, int)
    values = pos_sorted[ends]
    tp = ends.astype(np.int64) + 1
    fp_ge = n_neg - np.searchsorted(neg, values, side="left").astype(np.int64)
    fp_gt = n_neg - np.searchsorted(neg, values, side="right").astype(np.int64)

    pro, n_regions = None, 0
    if with_pro:
        w, n_regions = _region_overlap_weights(gt)
        if n_regions:
            pro = np.minimum(np.cumsum(w[order])[ends] / n_regions, 1.0)
        else:
            pro = np.zeros(0)
    return PixelCurves(n_pos, n_neg, n_regions, values, tp, fp_ge, fp_gt, pro)


def _auroc_from(c: PixelCurves) -> float:
    """Mann-Whitney form: P(defect > normal) + ½ P(tie) — equals the trapezoidal ROC area."""
    if c.n_pos == 0 or c.n_neg == 0:
        return _nan("pixel AUROC", "needs both defect and normal pixels")
    count = np.diff(c.tp, prepend=0)  # defect pixels per distinct value
    below = c.n_neg - c.fp_ge  # normal pixels strictly below the value
    at_or_below = c.n_neg - c.fp_gt
    twice_u = int(np.dot(count, below + at_or_below))  # exact in int64 (≤ 2·P·N_neg)
    return twice_u / (2.0 * c.n_pos * c.n_neg)


def _ap_from(c: PixelCurves) -> float:
    """sklearn's AP: Σ (recall step) × precision; recall only steps at defect-pixel values."""
    if c.n_pos == 0:
        return _nan("pixel AP", "no defect pixels")
    count = np.diff(c.tp, prepend=0)
    precision = c.tp / (c.tp + c.fp_ge)
    return float(np.dot(count, precision) / c.n_pos)


def _f1_max_from(c: PixelCurves) -> float:
    """For a fixed TP, F1 = 2TP/(TP+FP+P) is largest at the highest threshold reaching it."""
    if c.n_pos == 0:
        return _nan("pixel F1-max", "no defect pixels")
    return float(np.max(2.0 * c.tp / (c.tp + c.fp_ge + c.n_pos)))


def _pro_points(c: PixelCurves) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) vertices of the official piecewise-linear curve, (0,0) … (1,1).

    At each distinct defect value the curve first moves horizontally (normal pixels with
    higher scores) to ``(fp_gt/N, pro_prev)``, then to ``(fp_ge/N, pro)`` — a diagonal when
    normal and defect pixels tie. Points at normal-only scores lie on the horizontal parts.
    """
    n = float(c.n_neg)
    pro_prev = np.concatenate(([0.0], c.pro[:-1]))
    x = np.empty(2 * c.values.size + 3)
    y = np.empty_like(x)
    x[0], y[0] = 0.0, 0.0
    x[1:-2:2], y[1:-2:2] = c.fp_gt / n, pro_prev
    x[2:-2:2], y[2:-2:2] = c.fp_ge / n, c.pro
    x[-2], y[-2] = 1.0, c.pro[-1]
    x[-1], y[-1] = 1.0, 1.0
    return x, y


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area for x in [0, limit], y linearly interpolated at the limit (x sorted)."""
    j = int(np.searchsorted(x, limit, side="right"))  # first vertex beyond the limit
    if j < x.size:
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x, y = np.append(x[:j], limit), np.append(y[:j], y_lim)
    return float(np.trapezoid(y, x))


def _aupro_from(c: PixelCurves, fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if c.n_regions == 0 or c.n_neg == 0:
        return _nan("pixel AUPRO", "needs defect regions and normal pixels")
    x, y = _pro_points(c)
    return _area_up_to(x, y, fpr_limit) / fpr_limit


def pro_curve(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) vertices of the PRO curve (for plots); see ``aupro``."""
    c = pixel_curves(maps, masks)
    if c.n_regions == 0 or c.n_neg == 0:
        raise ValueError("PRO curve needs at least one defect region and one normal pixel")
    return _pro_points(c)


def aupro(maps: Any, masks: Any, fpr_limit: float = DEFAULT_FPR_LIMIT, num_thresholds: int | None = None) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by it (∈ [0, 1]).

    ``num_thresholds=None`` (default) is exact: every distinct score is a threshold.
    An int quantises the scores to that many evenly spaced levels first (an approximation,
    like binned implementations; only for comparison).
    """
    return _aupro_from(pixel_curves(maps, masks, num_thresholds=num_thresholds), fpr_limit)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Exact pixel-level ROC AUC (equals ``sklearn.metrics.roc_auc_score`` on flattened pixels)."""
    return _auroc_from(pixel_curves(maps, masks, with_pro=False))


def pixel_ap(maps: Any, masks: Any) -> float:
    """Exact pixel-level average precision (equals ``sklearn.metrics.average_precision_score``)."""
    return _ap_from(pixel_curves(maps, masks, with_pro=False))


def pixel_f1_max(maps: Any, masks: Any) -> float:
    """Best F1 over all thresholds on flattened pixels (as from ``precision_recall_curve``)."""
    return _f1_max_from(pixel_curves(maps, masks, with_pro=False))


def compute_pixel_metrics(maps: Any, masks: Any, fpr_limit: float = DEFAULT_FPR_LIMIT) -> dict[str, float]:
    """``{"pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_ap"}`` from N×H×W maps and masks, one sort."""
    c = pixel_curves(maps, masks)
    return {
        "pixel_auroc": _auroc_from(c),
        "pixel_aupro": _aupro_from(c, fpr_limit),
        "pixel_f1_max": _f1_max_from(c),
        "pixel_ap": _ap_from(c),
    }


def compute_all(scores: Any, labels: Any, maps: Any, masks: Any, fpr_limit: float = DEFAULT_FPR_LIMIT) -> dict[str, float]:
    """All six metrics, keys in ``METRIC_KEYS`` order."""
    n_scores, n_maps = len(to_numpy(scores).reshape(-1)), as_map_stack(maps, "anomaly maps").shape[0]
    if n_scores != n_maps:
        raise ValueError(f"{n_scores} image scores but {n_maps} anomaly maps")
    out = {**compute_image_metrics(scores, labels), **compute_pixel_metrics(maps, masks, fpr_limit)}
    return {k: out[k] for k in METRIC_KEYS}
