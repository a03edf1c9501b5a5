"""Readers and transforms: shapes, labels, masks, grayscale, and clear errors on bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.imagefolder import TrainImageFolder
from datasets.mvtec import (
    AUTHORS_MASK_RATIOS,
    MVTEC_CLASSES,
    OBJECTS,
    SETTINGS,
    TEXTURES,
    ClassGroups,
    MVTecTestDataset,
    load_class_groups,
    resolve_classes,
)
from datasets.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    image_transform,
    load_image,
    mask_transform,
    normalize,
    token_image_size,
    token_images,
)

S = 32


# ----------------------------------------------------------------------------- transforms

def test_image_transform_resizes_shorter_side_and_center_crops():
    arr = np.zeros((60, 90, 3), np.uint8)
    arr[:, 15:75] = 255                                  # centre 60×60 white, borders black
    x = image_transform(S)(Image.fromarray(arr))
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x.mean() > 0.97                               # the crop kept the centre only


def test_mask_transform_is_binary_and_nearest():
    arr = np.zeros((64, 64), np.uint8)
    arr[10:30, 10:30] = 255
    arr[40:50, 40:50] = 100                              # below 0.5 → background
    m = mask_transform(S)(Image.fromarray(arr))
    assert m.shape == (1, S, S)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert m.sum() == 10 * 10


def test_normalize_matches_imagenet_stats_any_rank():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    y = normalize(x)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(y, (x - mean) / std)
    assert y.dtype == torch.float64
    assert torch.allclose(normalize(x[0]), y[0])
    with pytest.raises(ValueError, match="3×H×W"):
        normalize(torch.rand(1, 4, 4, 4))


def test_token_image_size_rule():
    assert token_image_size(224, 16) == 112
    assert token_image_size(224, 32) == 56
    assert token_image_size(64, 32) == 16
    with pytest.raises(ValueError, match="multiple"):
        token_image_size(100, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_images_shape_range_dtype(dtype):
    x = torch.rand(2, 3, 64, 64).to(dtype)
    x[0, :, :8, :8] = 1.0
    x[0, :, 8:16, :8] = 0.0                              # sharp edge: bicubic would overshoot
    for patch, t in ((16, 32), (32, 16)):
        y = token_images(x, patch)
        assert y.shape == (2, 3, t, t) and y.dtype == dtype
        assert y.min() >= 0 and y.max() <= 1


def test_load_image_grayscale_to_rgb(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((5, 7), 80, np.uint8), mode="L").save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (7, 5)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(bad)
    good = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:200])            # truncated mid-stream
    with pytest.raises(ValueError, match="trunc.png"):
        load_image(good)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- dataset facts

def test_class_facts():
    assert set(TEXTURES) | set(OBJECTS) == set(MVTEC_CLASSES) and len(MVTEC_CLASSES) == 15
    assert set(AUTHORS_MASK_RATIOS) == set(MVTEC_CLASSES)
    assert AUTHORS_MASK_RATIOS["screw"] == 0.04 and AUTHORS_MASK_RATIOS["metal_nut"] == 0.48
    assert SETTINGS == ("multi_class", "obj_to_texture", "texture_to_obj")


def test_load_class_groups(tmp_path, synthetic_mvtec):
    g = load_class_groups(synthetic_mvtec)
    assert set(g.textures) == {"synth_weave", "synth_marble"}
    assert set(g.objects) == {"synth_nut", "synth_screw"}
    assert load_class_groups(tmp_path) == ClassGroups(TEXTURES, OBJECTS)
    assert load_class_groups(None) == ClassGroups(TEXTURES, OBJECTS)
    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset_info.json"):
        load_class_groups(tmp_path)


def test_resolve_classes():
    g = ClassGroups(("t1", "t2"), ("o1",))
    assert resolve_classes("multi_class", g) == (["t1", "t2", "o1"], ["t1", "t2", "o1"])
    assert resolve_classes("obj_to_texture", g) == (["o1"], ["t1", "t2"])
    assert resolve_classes("texture_to_obj", g) == (["t1", "t2"], ["o1"])
    assert resolve_classes("texture_to_obj", g, ["o1"]) == (["o1"], ["o1"])
    assert resolve_classes("multi_class", g, "a,b") == (["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_classes("nope", g)


# ----------------------------------------------------------------------------- test-set reader

def test_mvtec_test_dataset_items(synthetic_mvtec):
    classes = ["synth_nut", "synth_screw", "synth_weave", "synth_marble"]
    ds = MVTecTestDataset(synthetic_mvtec, classes, input_size=S)
    assert len(ds) == 4 * 6
    assert sorted(set(ds.labels)) == [0, 1]
    seen_types = set()
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].shape == (3, S, S) and it["mask"].shape == (1, S, S)
        assert 0 <= it["image"].min() and it["image"].max() <= 1
        assert set(it["mask"].unique().tolist()) <= {0.0, 1.0}
        assert it["class_name"] in classes and it["path"].endswith(".png")
        if it["defect_type"] == "good":
            assert it["label"] == 0 and it["mask"].sum() == 0
        else:
            assert it["label"] == 1 and it["mask"].sum() > 0
        seen_types.add(it["defect_type"])
    assert {"good", "scratch", "stain", "hole", "missing", "cut"} <= seen_types
    # grayscale class comes back as 3 equal channels
    gray = next(ds[i] for i in range(len(ds)) if ds[i]["class_name"] == "synth_screw")
    assert torch.equal(gray["image"][0], gray["image"][1])
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, S, S) and batch["label"].shape == (5,)


def test_mvtec_defect_without_mask_names_file(tmp_path, synthetic_mvtec):
    shutil.copytree(synthetic_mvtec / "synth_nut", tmp_path / "synth_nut")
    gt = tmp_path / "synth_nut" / "ground_truth" / "missing"
    victim = min(gt.glob("*_mask.png"))
    victim.unlink()
    stem = victim.name.replace("_mask.png", "")
    with pytest.raises(FileNotFoundError, match=rf"test/missing/{stem}\.png"):
        MVTecTestDataset(tmp_path, ["synth_nut"], input_size=S)


def test_mvtec_missing_class_and_empty_test(tmp_path):
    with pytest.raises(FileNotFoundError, match="class folder not found.*nope"):
        MVTecTestDataset(tmp_path, ["nope"], input_size=S)
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no test images"):
        MVTecTestDataset(tmp_path, ["empty"], input_size=S)


def test_btad_style_layout(tmp_path):
    """BTAD: normal folder 'ok', masks with the image's own stem and possibly .bmp."""
    root = tmp_path / "01"
    (root / "test" / "ok").mkdir(parents=True)
    (root / "test" / "ko").mkdir()
    (root / "ground_truth" / "ko").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("0000.bmp", "0001.bmp"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "test" / "ok" / name)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "test" / "ko" / "0002.bmp")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "test" / "ko" / "0003.png")
    m = np.zeros((40, 40), np.uint8)
    m[5:15, 5:15] = 255
    Image.fromarray(m).save(root / "ground_truth" / "ko" / "0002.bmp")
    Image.fromarray(m).save(root / "ground_truth" / "ko" / "0003.png")
    ds = MVTecTestDataset(tmp_path, ["01"], input_size=S)
    assert ds.labels == [1, 1, 0, 0]
    assert ds[0]["mask"].sum() > 0 and ds[2]["mask"].sum() == 0


# ----------------------------------------------------------------------------- training reader

def test_train_image_folder(synthetic_train):
    classes = ["synth_screw", "synth_nut", "synth_weave"]
    ds = TrainImageFolder(synthetic_train, classes, input_size=S)
    assert ds.classes == sorted(classes)
    assert len(ds) == 3 * 8
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].shape == (3, S, S) and it["fg_mask"].shape == (1, S, S)
        assert ds.classes[it["class_index"]] == it["class_name"]
        assert set(it["fg_mask"].unique().tolist()) <= {0.0, 1.0}
        if it["class_name"] == "synth_weave":
            assert it["fg_mask"].min() == 1                   # textures: all foreground
        else:
            assert 0 < it["fg_mask"].mean() < 0.8             # objects: the part only
    assert ds.fg_mask_count == 16
    no_fg = TrainImageFolder(synthetic_train, ["synth_nut"], input_size=S, use_fg_mask=False)
    assert no_fg[0]["fg_mask"].min() == 1
    val = TrainImageFolder(synthetic_train, ["synth_nut"], input_size=S, split="val")
    assert len(val) == 2
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, S, S) and batch["class_index"].dtype == torch.int64


def test_train_image_folder_errors(tmp_path, synthetic_train):
    with pytest.raises(FileNotFoundError, match="class folder not found.*nope"):
        TrainImageFolder(synthetic_train, ["nope"], input_size=S)
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images.*empty"):
        TrainImageFolder(tmp_path, ["empty"], input_size=S)
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        TrainImageFolder(tmp_path / "nowhere", ["x"], input_size=S)


def test_train_image_folder_corrupt_image_names_file(tmp_path):
    d = tmp_path / "train" / "c"
    d.mkdir(parents=True)
    (d / "bad.png").write_bytes(b"garbage")
    ds = TrainImageFolder(tmp_path, ["c"], input_size=S)
    with pytest.raises(ValueError, match="bad.png"):
        ds[0]


def test_converted_dataset_info_copied(synthetic_train):
    info = json.loads((synthetic_train / "dataset_info.json").read_text())
    assert info["generator"] == "cdvm synthetic"
