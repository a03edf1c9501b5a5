"""engine.report: result files carry every metric, a correct mean row and the protocol label; PNGs open."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from engine import report as R
from engine.metrics import METRIC_KEYS
from engine.runinfo import run_info

RESULTS = {
    "bottle": dict(zip(METRIC_KEYS, (0.99, 0.95, 0.97, 0.91, 0.60, 0.55))),
    "wood": dict(zip(METRIC_KEYS, (0.90, 0.85, 0.93, 0.80, 0.40, 0.35))),
    "grid": dict(zip(METRIC_KEYS, (0.70, 0.75, 0.88, 0.70, 0.20, 0.15))),
}
STRICT = "Protocol: strict (fixed mask ratio 0.30, no test labels used)"


def strict_info():
    return run_info({"protocol": "strict", "mask_ratio": 0.3, "seed": 0, "setting": "multi_class"},
                    checkpoint="out/checkpoint.pth", seeds=[0])


def leftovers(root):
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_write_results_files_columns_mean_and_label(tmp_path):
    paths = R.write_results(tmp_path, RESULTS, strict_info())
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.csv", "results.md"}
    assert set(paths) == {"json", "csv", "md"} and not leftovers(tmp_path)

    doc = json.loads(paths["json"].read_text())
    assert doc["protocol"] == "strict" and doc["protocol_label"] == STRICT
    assert doc["metrics"] == list(METRIC_KEYS)
    assert set(doc["per_class"]) == set(RESULTS) and set(doc["mean"]) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert doc["mean"][k] == pytest.approx(np.mean([RESULTS[c][k] for c in RESULTS]))
    info = doc["run_info"]
    assert info["protocol"] == "strict" and info["checkpoint"] == "out/checkpoint.pth" and "git_commit" in info
    assert info["config"]["mask_ratio"] == 0.3 and info["seeds"] == [0]

    rows = list(csv.DictReader(paths["csv"].open()))
    assert list(rows[0]) == ["class", *METRIC_KEYS, "protocol", "protocol_label"]
    assert [r["class"] for r in rows] == ["bottle", "wood", "grid", "mean"]
    assert all(r["protocol_label"] == STRICT and r["protocol"] == "strict" for r in rows)
    for k in METRIC_KEYS:
        assert float(rows[-1][k]) == pytest.approx(np.mean([float(r[k]) for r in rows[:-1]]))

    md = paths["md"].read_text()
    assert STRICT in md and "multi_class" in md and "out/checkpoint.pth" in md
    assert "| Class | Image AUROC | Pixel AUROC | Pixel AUPRO | Image F1 | Pixel F1 | Pixel AP |" in md
    assert "| bottle | 99.0 | 97.0 | 91.0 | 95.0 | 60.0 | 55.0 |" in md
    # mean image AUROC (99 + 90 + 70) / 3 = 86.333 → 86.3
    assert "| **Mean** | **86.3** |" in md


def test_paper_protocol_label_everywhere(tmp_path):
    info = run_info({"protocol": "paper", "mask_ratios": [0.02 * i for i in range(1, 25)]})
    paths = R.write_results(tmp_path, RESULTS, info)
    label = R.protocol_label_from_run_info(info)
    assert label.startswith("Protocol: paper") and "not comparable to strict" in label and "0.02-0.48" in label
    for p in paths.values():
        assert label in p.read_text()


def test_protocol_required_and_validated(tmp_path):
    with pytest.raises(ValueError, match="protocol"):
        R.write_results(tmp_path, RESULTS, {"config": {"seed": 0}})
    with pytest.raises(ValueError, match="unknown protocol"):
        R.protocol_label("optimistic")
    assert "authors' table" in R.protocol_label("strict", class_mask_ratios="authors")
    assert "z-score" in R.protocol_label("strict", 0.1, abnormality="zscore")
    assert "z-score" not in R.protocol_label("strict", 0.1, abnormality="authors")
    assert R.protocol_label_from_run_info({"protocol": "strict", "protocol_label": "Protocol: custom"}) == "Protocol: custom"


def test_nan_metrics_and_extras(tmp_path):
    results = {c: dict(v) for c, v in RESULTS.items()}
    results["grid"]["pixel_aupro"] = float("nan")
    results["grid"]["best_ratio"] = 0.16  # an extra per-class entry (e.g. paper protocol)
    results["mean"] = {"image_auroc": 0.0}  # stale caller-provided mean is recomputed
    paths = R.write_results(tmp_path, results, strict_info())
    doc = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert doc["per_class"]["grid"]["pixel_aupro"] is None and doc["mean"]["pixel_aupro"] is None
    assert doc["mean"]["image_auroc"] == pytest.approx(np.mean([0.99, 0.90, 0.70]))
    assert "mean" not in doc["per_class"]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[2]["best_ratio"] == "0.16" and rows[0]["best_ratio"] == ""
    assert "n/a" in paths["md"].read_text()


def test_format_table_rows_and_mean():
    table = R.format_table(RESULTS, STRICT)
    lines = table.strip().splitlines()
    assert lines[0] == STRICT
    assert len(lines) == 2 + 2 + len(RESULTS) + 1  # label, blank, header, rule, classes, mean
    assert all(line.count("|") == 8 for line in lines[2:])
    assert R.mean_over_classes(RESULTS)["pixel_ap"] == pytest.approx((0.55 + 0.35 + 0.15) / 3)
    assert STRICT not in R.format_table(RESULTS)
    with pytest.raises(ValueError, match="no classes"):
        R.format_table({})


def _panel_inputs(n=6, s=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 3, s, s)).astype(np.float32)
    masks = np.zeros((n, s, s), np.float32)
    masks[n // 2:, 8:16, 10:20] = 1
    maps = rng.random((n, s, s)).astype(np.float32) + masks
    labels = (masks.reshape(n, -1).max(1) > 0).astype(int)
    return images, masks, maps, maps.reshape(n, -1).max(1), labels


@pytest.mark.parametrize("proposals", ["none", "fused", "branches"])
def test_save_panels_png(tmp_path, proposals):
    images, masks, maps, scores, labels = _panel_inputs()
    rng = np.random.default_rng(1)
    prop = {"none": None, "fused": masks > 0,
            "branches": {16: rng.random((6, 4)) < 0.3, 32: rng.random((6, 2, 2)) < 0.3}}[proposals]
    path = R.save_panels(tmp_path, "bottle", images, masks, prop, maps, scores, labels,
                         max_images=4, protocol_label=STRICT)
    assert path == tmp_path / "panels" / "bottle.png" and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        assert im.info.get("Description") == STRICT
    assert not leftovers(tmp_path)


def test_save_panels_accepts_torch_and_grayscale(tmp_path):
    torch = pytest.importorskip("torch")
    images, masks, maps, scores, labels = _panel_inputs()
    path = R.save_panels(tmp_path, "screw", torch.from_numpy(images[:, :1]), torch.from_numpy(masks)[:, None],
                         None, torch.from_numpy(maps).bfloat16(), torch.from_numpy(scores), torch.from_numpy(labels),
                         protocol_label=STRICT)
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_save_panels_rejects_bad_shapes(tmp_path):
    images, masks, maps, scores, labels = _panel_inputs()
    with pytest.raises(ValueError, match="anomaly_maps"):
        R.save_panels(tmp_path, "x", images, masks, None, maps[:, :16], scores, labels, protocol_label=STRICT)
    with pytest.raises(ValueError, match="does not divide"):
        R.save_panels(tmp_path, "x", images, masks, masks[:, :5, :5], maps, scores, labels, protocol_label=STRICT)


def test_select_panel_indices_balanced():
    labels = np.array([0] * 20 + [1] * 40)
    idx = R.select_panel_indices(labels, 8)
    assert len(idx) == 8 and len(set(idx)) == 8
    assert (labels[idx] == 0).sum() == 4
    assert list(R.select_panel_indices(labels[:5], 8)) == [0, 1, 2, 3, 4]
    idx = R.select_panel_indices(np.array([0, 0] + [1] * 30), 8)  # few normals: fill with anomalous
    assert len(idx) == 8 and (idx < 2).sum() == 2


def test_save_roc_curves_png(tmp_path):
    _, masks, maps, scores, labels = _panel_inputs()
    per_class = {
        "bottle": (scores, labels, maps, masks),
        "wood": {"scores": scores[::-1], "labels": labels},
        "empty": (scores, np.zeros_like(labels)),  # one class only: listed, not plotted
    }
    path = R.save_roc_curves(tmp_path, per_class, protocol_label=STRICT, max_pixels_per_class=500)
    assert path == tmp_path / "roc_curves.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.info.get("Description") == STRICT
    assert not leftovers(tmp_path)
    assert math.isfinite(path.stat().st_size) and path.stat().st_size > 0
