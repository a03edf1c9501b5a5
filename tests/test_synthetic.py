"""The synthetic generator: layout, exact masks, determinism, visible defects."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import synthetic
from datasets.synthetic import CLASS_SPECS, CLASSES, generate


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_info(synthetic_mvtec):
    info = json.loads((synthetic_mvtec / "dataset_info.json").read_text())
    assert info["generator"] == "cdvm synthetic" and info["seed"] == 0
    assert len(info["textures"]) >= 2 and len(info["objects"]) >= 2
    assert set(info["textures"]) | set(info["objects"]) == set(CLASSES)
    for cls in CLASSES:
        kind, _, defects, gray = CLASS_SPECS[cls]
        root = synthetic_mvtec / cls
        train = sorted((root / "train" / "good").glob("*.png"))
        assert len(train) == 8
        assert len(list((root / "test" / "good").glob("*.png"))) == 2
        types = sorted(p.name for p in (root / "test").iterdir() if p.name != "good")
        assert types == sorted(defects)
        for t in types:
            for img in (root / "test" / t).glob("*.png"):
                mask = np.asarray(Image.open(root / "ground_truth" / t / f"{img.stem}_mask.png"))
                assert set(np.unique(mask)) <= {0, 255}
                frac = (mask > 0).mean()
                assert 0.0005 < frac < 0.12, (img, frac)   # visible but small
        with Image.open(train[0]) as im:
            assert im.mode == ("L" if gray else "RGB") and im.size == (64, 64)
        fg_dir = root / "fg_mask" / "train" / "good"
        if kind == "object":
            assert sorted(p.name for p in fg_dir.glob("*.png")) == [p.name for p in train]
            fg = np.asarray(Image.open(fg_dir / train[0].name)) > 0
            assert 0.02 < fg.mean() < 0.6        # the part, not the whole image
        else:
            assert not fg_dir.exists()


def test_normal_images_vary(synthetic_mvtec):
    for cls in CLASSES:
        a, b = (np.asarray(Image.open(synthetic_mvtec / cls / "train" / "good" / f"00{i}.png"), np.float32)
                for i in (0, 1))
        assert np.abs(a - b).mean() > 2.0, cls


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    kw = {"image_size": 48, "n_train": 2, "n_test": 3}
    a = _tree_bytes(generate(tmp_path / "a", seed=3, **kw))
    b = _tree_bytes(generate(tmp_path / "b", seed=3, **kw))
    c = _tree_bytes(generate(tmp_path / "c", seed=4, **kw))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != c[k] for k in images)


def test_class_subset_gives_identical_images(tmp_path, synthetic_mvtec):
    out = generate(tmp_path / "nut", seed=0, image_size=64, n_train=8, n_test=6, classes=["synth_nut"])
    assert _tree_bytes(out / "synth_nut") == _tree_bytes(synthetic_mvtec / "synth_nut")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["textures"] == [] and info["objects"] == ["synth_nut"]


@pytest.mark.parametrize("cls", CLASSES)
def test_defects_change_pixels_inside_their_mask(cls):
    _kind, render, defects, _ = CLASS_SPECS[cls]
    S = 96
    for d in defects:
        rng = np.random.default_rng(11)
        scene = render(rng, S)
        img, m = synthetic.make_defect(rng, S, scene, d)
        diff = np.abs(img - scene.img).mean(axis=2)
        assert m.any()
        assert diff[m].mean() > 0.05, (cls, d)           # visible
        assert diff[~m].mean() < 0.01 * diff[m].mean() + 1e-3, (cls, d)  # confined to the mask
        if scene.fg is not None and d != "cut":
            assert not (m & ~scene.fg).any()             # object defects stay on the part


def test_cli_and_regeneration(tmp_path):
    out = tmp_path / "s"
    assert synthetic.main(["--out", str(out), "--seed", "1", "--image_size", "40", "--n_train", "1",
                           "--n_test", "3", "--classes", "synth_weave"]) == 0
    first = _tree_bytes(out)
    (out / "synth_weave" / "stale.txt").write_text("x")
    synthetic.main(["--out", str(out), "--seed", "1", "--image_size", "40", "--n_train", "1",
                    "--n_test", "3", "--classes", "synth_weave"])
    assert _tree_bytes(out) == first                     # re-run replaces, no stale files


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "synth_nut").mkdir()
    (tmp_path / "synth_nut" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        generate(tmp_path, seed=0, image_size=40, n_train=1, n_test=3, classes=["synth_nut"])
    assert (tmp_path / "synth_nut" / "precious.txt").read_text() == "keep"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic classes"):
        generate(tmp_path, classes=["nope"])
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, image_size=8)
