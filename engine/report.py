"""Result files and figures: results.json / .csv / .md, per-class PNG panels, ROC curves.

Every output names its evaluation protocol in words (DESIGN.md §2): *strict* numbers and
the authors' optimistic *paper* numbers must never be confused once they leave the run
folder. JSON/CSV/MD carry the label as text; PNGs carry it in the title and in the PNG
``Description`` metadata. All files are written atomically (``engine.runinfo``).

Matplotlib is imported inside the plotting functions (object-oriented API, Agg canvas, no
pyplot global state) so that importing this module stays fast.
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.metrics import METRIC_KEYS, as_map_stack, to_numpy
from engine.runinfo import to_jsonable, write_json
from models.weight_io import atomic_write_bytes

PROTOCOLS = ("strict", "paper")
MEAN_ROW = "mean"
COLUMN_TITLES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pixel_aupro": "Pixel AUPRO",
    "image_f1_max": "Image F1",
    "pixel_f1_max": "Pixel F1",
    "pixel_ap": "Pixel AP",
}
# Column order of the markdown table (the authors' README lists image, then pixel AUROC).
TABLE_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max", "pixel_ap")


# ----------------------------------------------------------------------------- protocol label
def protocol_label(protocol: str, mask_ratio: float | None = None, mask_ratios: Any = None,
                   class_mask_ratios: str | None = None, abnormality: str | None = None) -> str:
    """One sentence saying how the numbers were obtained, e.g. ``Protocol: strict (...)``."""
    if protocol == "strict":
        if class_mask_ratios == "authors":
            how = ("per-class mask ratios from the authors' table, which may have been tuned on test "
                   "data; no test labels used here")
        elif mask_ratio is not None:
            how = f"fixed mask ratio {float(mask_ratio):.2f}, no test labels used"
        else:
            how = "fixed mask ratio, no test labels used"
        if abnormality == "zscore":
            how += "; flow abnormality as a z-score of normal training positions"
        return f"Protocol: strict ({how})"
    if protocol == "paper":
        sweep = ""
        if mask_ratios is not None and len(mask_ratios):
            r = [float(v) for v in mask_ratios]
            sweep = f" over mask ratios {min(r):.2f}-{max(r):.2f} ({len(r)} values)"
        return (f"Protocol: paper (authors' optimistic protocol: best-of-sweep per class{sweep}, "
                "image and pixel bests may come from different ratios, F1 threshold fitted on test "
                "labels) - not comparable to strict numbers")
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def protocol_label_from_run_info(run_info: Mapping[str, Any]) -> str:
    """The label for ``run_info`` (an explicit ``protocol_label`` entry wins)."""
    if run_info.get("protocol_label"):
        return str(run_info["protocol_label"])
    cfg = run_info.get("config") if isinstance(run_info.get("config"), Mapping) else {}

    def get(key: str) -> Any:
        return run_info.get(key, cfg.get(key))

    protocol = get("protocol")
    if protocol is None:
        raise ValueError("run_info carries no 'protocol' (strict or paper); every result file must state it")
    return protocol_label(protocol, get("mask_ratio"), get("mask_ratios"), get("class_mask_ratios"),
                          get("abnormality"))


# ----------------------------------------------------------------------------- tables
def _split(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Per-class rows; a ``mean`` entry given by the caller is dropped and recomputed."""
    per_class = {str(k): v for k, v in results.items() if k != MEAN_ROW}
    if not per_class:
        raise ValueError("results has no classes")
    return per_class


def mean_over_classes(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Unweighted mean over classes of each metric (NaN if any class's value is NaN or missing)."""
    per_class = _split(results)
    keys = [k for k in METRIC_KEYS if any(k in row for row in per_class.values())]
    return {k: float(np.mean([float(row.get(k, math.nan)) for row in per_class.values()])) for k in keys}


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100.0 * float(v):.1f}"


def format_table(results: Mapping[str, Mapping[str, Any]], protocol_label: str | None = None) -> str:
    """Markdown table (values in %, 1 decimal) with a mean row; the protocol line first when given."""
    per_class = _split(results)
    mean = mean_over_classes(results)
    lines = [protocol_label, ""] if protocol_label else []
    lines.append("| Class | " + " | ".join(COLUMN_TITLES[k] for k in TABLE_KEYS) + " |")
    lines.append("| :-- | " + " | ".join("--:" for _ in TABLE_KEYS) + " |")
    for name, row in per_class.items():
        lines.append(f"| {name} | " + " | ".join(_pct(row.get(k)) for k in TABLE_KEYS) + " |")
    lines.append("| **Mean** | " + " | ".join(f"**{_pct(mean.get(k))}**" for k in TABLE_KEYS) + " |")
    return "\n".join(lines) + "\n"


def _nan_to_none(obj: Any) -> Any:
    """Strict JSON has no NaN: undefined metrics are written as null."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _plain(v: Any) -> Any:
    """numpy / torch scalars → Python numbers."""
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v


def write_results(save_path: str | Path, results: Mapping[str, Mapping[str, Any]],
                  run_info: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``results.{json,csv,md}`` into the folder ``save_path``; returns their paths.

    ``results`` maps class name → ``{metric: value in [0, 1], ...}``; extra per-class
    entries (e.g. the ratio a paper-protocol best came from) go to JSON and CSV.
    ``run_info`` (``engine.runinfo.run_info(...)``) must say the protocol; it is stored
    whole in the JSON and summarised under the markdown table.
    """
    save_path = Path(save_path)
    label = protocol_label_from_run_info(run_info)
    cfg = run_info.get("config") if isinstance(run_info.get("config"), Mapping) else {}
    protocol = run_info.get("protocol", cfg.get("protocol"))
    per_class = {c: {k: _plain(v) for k, v in row.items()} for c, row in _split(results).items()}
    mean = mean_over_classes(per_class)
    metrics = [k for k in METRIC_KEYS if k in mean]
    extras = sorted({k for row in per_class.values() for k in row} - set(METRIC_KEYS))

    paths = {"json": save_path / "results.json", "csv": save_path / "results.csv", "md": save_path / "results.md"}
    write_json(paths["json"], _nan_to_none(to_jsonable({
        "protocol": protocol,
        "protocol_label": label,
        "metrics": metrics,
        "per_class": per_class,
        "mean": mean,
        "run_info": dict(run_info),
    })))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", *metrics, *extras, "protocol", "protocol_label"])
    for name, row in per_class.items():
        writer.writerow([name, *(row.get(k, "") for k in metrics), *(row.get(k, "") for k in extras), protocol, label])
    writer.writerow([MEAN_ROW, *(mean[k] for k in metrics), *("" for _ in extras), protocol, label])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())

    setting = run_info.get("setting", cfg.get("setting"))
    title = "# CDVM results" + (f" - {setting}" if setting else "")
    facts = []
    for key, name in (("checkpoint", "checkpoint"), ("seed", "seed"), ("seeds", "seeds"),
                      ("git_commit", "git commit"), ("created_utc", "created")):
        value = run_info.get(key, cfg.get(key))
        if value is not None:
            facts.append(f"{name}: `{value}`")
    md = [title, "", f"**{label}**", "", format_table(per_class), "Values in %."]
    if facts:
        md.append(" · ".join(facts))
    atomic_write_bytes(paths["md"], ("\n".join(md) + "\n").encode())
    return paths


# ----------------------------------------------------------------------------- figures
def _to_image_res(mask: Any, n: int, size: tuple[int, int], name: str) -> np.ndarray:
    """Proposal masks at image resolution; patch-grid masks (N×g×g or N×g²) are upsampled nearest."""
    m = to_numpy(mask)
    if m.ndim == 2 and m.shape[0] == n and m.shape[1] != size[1]:
        g = math.isqrt(m.shape[1])
        if g * g != m.shape[1]:
            raise ValueError(f"{name}: flattened masks of length {m.shape[1]} are not a square grid")
        m = m.reshape(n, g, g)
    m = as_map_stack(m, name).astype(np.float32)
    if m.shape[0] != n:
        raise ValueError(f"{name}: {m.shape[0]} masks for {n} images")
    h, w = m.shape[1:]
    if (h, w) != size:
        if size[0] % h or size[1] % w:
            raise ValueError(f"{name}: mask size {h}×{w} does not divide image size {size}")
        m = m.repeat(size[0] // h, axis=1).repeat(size[1] // w, axis=2)
    return m


def select_panel_indices(labels: np.ndarray, max_images: int) -> np.ndarray:
    """Up to ``max_images`` indices, half anomalous and half normal when possible, evenly spread."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size <= max_images:
        return np.arange(labels.size)
    bad, good = np.flatnonzero(labels != 0), np.flatnonzero(labels == 0)
    n_bad = min(bad.size, max(max_images - good.size, max_images // 2))
    n_good = min(good.size, max_images - n_bad)

    def spread(idx: np.ndarray, k: int) -> np.ndarray:
        return idx[np.linspace(0, idx.size - 1, k).round().astype(int)] if k else idx[:0]

    return np.sort(np.concatenate([spread(bad, n_bad), spread(good, n_good)]))


def _save_figure(fig: Any, path: Path, label: str, dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Description": label})
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_panels(save_path: str | Path, class_name: str, images01: Any, gt_masks: Any, proposal_masks: Any,
                anomaly_maps: Any, scores: Any, labels: Any, max_images: int = 16, *,
                protocol_label: str, dpi: int = 72) -> Path:
    """PNG grid ``<save_path>/panels/<class_name>.png``: image | ground truth | proposal mask(s) | heatmap.

    ``proposal_masks``: None, one N×H×W array (fused), or ``{branch: masks}`` (one column
    each); patch-grid masks are upsampled. The heatmap colour scale is shared by all rows
    (min..max over the class's maps) so rows can be compared; ground truth is outlined.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    imgs = to_numpy(images01).astype(np.float32)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"images01: expected N×3×H×W (or N×1×H×W), got {tuple(imgs.shape)}")
    n, size = imgs.shape[0], tuple(imgs.shape[2:])
    gts = as_map_stack(gt_masks, "gt_masks") > 0.5
    maps = as_map_stack(anomaly_maps, "anomaly_maps").astype(np.float32)
    scores = to_numpy(scores).reshape(-1)
    labels = to_numpy(labels).reshape(-1)
    for name, arr in (("gt_masks", gts), ("anomaly_maps", maps)):
        if arr.shape != (n, *size):
            raise ValueError(f"{name}: shape {arr.shape} does not match images {(n, *size)}")
    if scores.size != n or labels.size != n:
        raise ValueError(f"scores/labels: expected {n} values, got {scores.size}/{labels.size}")
    if proposal_masks is None:
        proposals = {}
    elif isinstance(proposal_masks, Mapping):
        proposals = {f"proposal p{k}": _to_image_res(v, n, size, f"proposal_masks[{k}]")
                     for k, v in proposal_masks.items()}
    else:
        proposals = {"proposal": _to_image_res(proposal_masks, n, size, "proposal_masks")}

    rows = select_panel_indices(labels, max_images)
    vmin, vmax = float(maps.min()), float(maps.max())
    jet = colormaps["jet"]
    titles = ["image", "ground truth", *proposals, f"anomaly map [{vmin:.3g}, {vmax:.3g}]"]
    height = 2.0 * len(rows) + 1.2
    fig = Figure(figsize=(2.0 * len(titles), height))
    # margins in inches, not figure fractions: matplotlib's default top=0.88 leaves a tall
    # panel of 16 rows with 4 inches of blank space under the title
    fig.subplots_adjust(top=1 - 1.1 / height, bottom=0.1 / height, hspace=0.15)
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for r, i in enumerate(rows):
        img = np.clip(imgs[i].transpose(1, 2, 0), 0, 1)
        img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
        heat = jet((maps[i] - vmin) / (vmax - vmin) if vmax > vmin else np.zeros(size))[..., :3]
        cells = [img, gts[i].astype(np.float32)]
        for m in proposals.values():
            tint = m[i][..., None] * 0.55
            cells.append(img * (1 - tint) + tint * np.array([1.0, 0.0, 0.0]))
        cells.append(0.5 * img + 0.5 * heat)
        for c, (ax, cell) in enumerate(zip(axes[r], cells)):
            ax.imshow(cell, cmap="gray" if cell.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        if gts[i].any():
            axes[r][-1].contour(gts[i].astype(np.float32), levels=[0.5], colors="white", linewidths=0.8)
        kind = "defect" if labels[i] else "good"
        axes[r][0].set_ylabel(f"#{i} {kind}\nscore {float(scores[i]):.4g}", fontsize=7)
    fig.suptitle(f"{class_name}\n" + textwrap.fill(protocol_label, 30 * len(titles) // 2), fontsize=9)
    return _save_figure(fig, Path(save_path) / "panels" / f"{class_name}.png", protocol_label, dpi)


def _curve_inputs(value: Any) -> tuple[Any, Any, Any, Any]:
    if isinstance(value, Mapping):
        return value["scores"], value["labels"], value.get("maps"), value.get("masks")
    value = tuple(value)
    if len(value) not in (2, 4):
        raise ValueError("per_class values must be (scores, labels) or (scores, labels, maps, masks)")
    return (*value, None, None) if len(value) == 2 else value


def save_roc_curves(save_path: str | Path, per_class: Mapping[str, Any], *, protocol_label: str,
                    max_pixels_per_class: int = 200_000, seed: int = 0, dpi: int = 100) -> Path:
    """One PNG ``<save_path>/roc_curves.png``: image-level ROC per class, and pixel-level when maps are given.

    Pixel curves are drawn from at most ``max_pixels_per_class`` randomly sampled pixels
    (plotting only — the reported metrics are always exact, see ``engine.metrics``).
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    items = {name: _curve_inputs(v) for name, v in per_class.items()}
    with_pixels = any(m is not None and k is not None for _, _, m, k in items.values())
    fig = Figure(figsize=(11 if with_pixels else 5.5, 5.5))
    axes = fig.subplots(1, 2 if with_pixels else 1, squeeze=False)[0]
    rng = np.random.default_rng(seed)
    for name, (scores, labels, maps, masks) in items.items():
        s, y = to_numpy(scores).reshape(-1), to_numpy(labels).reshape(-1) != 0
        if y.all() or not y.any():
            axes[0].plot([], [], label=f"{name} (n/a: one class)")
        else:
            fpr, tpr, _ = roc_curve(y, s)
            axes[0].plot(fpr, tpr, lw=1, label=f"{name} ({100 * roc_auc_score(y, s):.1f})")
        if with_pixels and maps is not None and masks is not None:
            ps, py = as_map_stack(maps, "maps").reshape(-1), as_map_stack(masks, "masks").reshape(-1) > 0.5
            if ps.size > max_pixels_per_class:
                take = rng.integers(0, ps.size, max_pixels_per_class)
                ps, py = ps[take], py[take]
            if py.any() and not py.all():
                fpr, tpr, _ = roc_curve(py, ps)
                axes[1].plot(fpr, tpr, lw=1, label=name)
    axes[0].set_title("image-level ROC (legend: AUROC %)", fontsize=9)
    if with_pixels:
        axes[1].set_title(f"pixel-level ROC (<= {max_pixels_per_class:,} sampled pixels per class; plot only)",
                          fontsize=9)
    for ax in axes:
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(textwrap.fill(protocol_label, 110 if with_pixels else 60), fontsize=9)
    return _save_figure(fig, Path(save_path) / "roc_curves.png", protocol_label, dpi)
