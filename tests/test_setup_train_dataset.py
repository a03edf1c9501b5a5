"""MVTec → ImageNet-format conversion and VisA → MVTec conversion (setup_train_dataset.py)."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import convert
from datasets.convert import (
    ConversionError,
    convert_mvtec,
    format_summary,
    visa_to_mvtec,
)
from datasets.mvtec import MVTecTestDataset, load_class_groups
from datasets.synthetic import generate

CLASSES = ["synth_marble", "synth_nut", "synth_screw", "synth_weave"]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


@pytest.fixture()
def small_src(tmp_path):
    """A private, mutable MVTec-layout dataset (two classes)."""
    return generate(tmp_path / "src", seed=5, image_size=40, n_train=3, n_test=4,
                    classes=["synth_weave", "synth_nut"])


def test_fixture_counts(synthetic_mvtec, synthetic_train):
    for cls in CLASSES:
        train = sorted(os.listdir(synthetic_train / "train" / cls))
        assert train == sorted(os.listdir(synthetic_mvtec / cls / "train" / "good"))
        assert sorted(os.listdir(synthetic_train / "val" / cls)) == sorted(
            os.listdir(synthetic_mvtec / cls / "test" / "good"))
    assert sorted(os.listdir(synthetic_train / "fg_mask")) == ["synth_nut", "synth_screw"]
    assert sorted(os.listdir(synthetic_train / "fg_mask" / "synth_nut")) == sorted(
        os.listdir(synthetic_train / "train" / "synth_nut"))
    assert load_class_groups(synthetic_train) == load_class_groups(synthetic_mvtec)


def test_summary_rows_and_table(small_src, tmp_path):
    rows = convert_mvtec(small_src, tmp_path / "out", progress=False)
    assert rows == [{"class": "synth_weave", "train": 3, "val": 2, "fg_masks": 0},
                    {"class": "synth_nut", "train": 3, "val": 2, "fg_masks": 3}]
    table = format_summary(rows)
    assert "fg_masks" in table and "synth_nut" in table and table.splitlines()[-1].split() == ["total", "6", "4", "3"]


def test_hardlink_shares_inodes(small_src, tmp_path):
    out = tmp_path / "out"
    convert_mvtec(small_src, out, link="hardlink", progress=False)
    a, b = out / "train" / "synth_nut" / "000.png", small_src / "synth_nut" / "train" / "good" / "000.png"
    assert os.stat(a).st_ino == os.stat(b).st_ino
    m = out / "fg_mask" / "synth_nut" / "000.png"
    assert os.stat(m).st_ino == os.stat(small_src / "synth_nut" / "fg_mask" / "train" / "good" / "000.png").st_ino
    assert json.loads((out / "conversion.json").read_text())["link"] == "hardlink"


def test_copy_and_symlink_modes(small_src, tmp_path):
    src = small_src / "synth_nut" / "train" / "good" / "000.png"
    convert_mvtec(small_src, tmp_path / "c", link="copy", progress=False)
    c = tmp_path / "c" / "train" / "synth_nut" / "000.png"
    assert not c.is_symlink() and os.stat(c).st_ino != os.stat(src).st_ino and c.read_bytes() == src.read_bytes()
    convert_mvtec(small_src, tmp_path / "s", link="symlink", progress=False)
    s = tmp_path / "s" / "train" / "synth_nut" / "000.png"
    assert s.is_symlink() and s.resolve() == src.resolve()


def test_hardlink_falls_back_to_copy(small_src, tmp_path, monkeypatch):
    def no_link(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(convert.os, "link", no_link)
    out = tmp_path / "out"
    convert_mvtec(small_src, out, link="hardlink", progress=False)
    assert len(list((out / "train" / "synth_nut").iterdir())) == 3
    assert json.loads((out / "conversion.json").read_text())["link"] == "copy"


def test_idempotent_rerun(small_src, tmp_path):
    out = tmp_path / "out"
    convert_mvtec(small_src, out, progress=False)
    first = _files(out)
    convert_mvtec(small_src, out, progress=False)
    assert _files(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]   # no temp folders left


def test_classes_subset(small_src, tmp_path):
    rows = convert_mvtec(small_src, tmp_path / "out", classes="synth_nut", progress=False)
    assert [r["class"] for r in rows] == ["synth_nut"]
    assert os.listdir(tmp_path / "out" / "train") == ["synth_nut"]


def test_fg_mask_dir_plain_and_synthetic_layouts(small_src, tmp_path):
    plain = tmp_path / "masks"
    (plain / "synth_weave").mkdir(parents=True)
    for i in range(2):   # masks for 2 of the 3 images
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(plain / "synth_weave" / f"{i:03d}.png")
    rows = convert_mvtec(small_src, tmp_path / "a", fg_mask_dir=plain, progress=False)
    assert {r["class"]: r["fg_masks"] for r in rows} == {"synth_weave": 2, "synth_nut": 0}
    assert sorted(os.listdir(tmp_path / "a" / "fg_mask" / "synth_weave")) == ["000.png", "001.png"]
    rows = convert_mvtec(small_src, tmp_path / "b", fg_mask_dir=small_src, progress=False)
    assert {r["class"]: r["fg_masks"] for r in rows} == {"synth_weave": 0, "synth_nut": 3}
    with pytest.raises(ConversionError, match="fg_mask_dir not found"):
        convert_mvtec(small_src, tmp_path / "c", fg_mask_dir=tmp_path / "none", progress=False)


# ----------------------------------------------------------------------------- bad input

def _assert_no_output(parent: Path, out: Path):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith("." + out.name)]


def test_error_data_path_missing(tmp_path):
    with pytest.raises(ConversionError, match="data path not found.*nowhere"):
        convert_mvtec(tmp_path / "nowhere", tmp_path / "out", progress=False)
    _assert_no_output(tmp_path, tmp_path / "out")


def test_error_class_without_train_good(small_src, tmp_path):
    shutil.rmtree(small_src / "synth_nut" / "train")
    with pytest.raises(ConversionError, match=r"synth_nut has no train/good"):
        convert_mvtec(small_src, tmp_path / "out", classes=["synth_weave", "synth_nut"], progress=False)
    _assert_no_output(tmp_path, tmp_path / "out")
    with pytest.raises(ConversionError, match="class folder not found.*nope"):
        convert_mvtec(small_src, tmp_path / "out", classes=["nope"], progress=False)


def test_error_zero_images(small_src, tmp_path):
    for p in (small_src / "synth_nut" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(ConversionError, match=r"no images in .*synth_nut/train/good"):
        convert_mvtec(small_src, tmp_path / "out", progress=False)
    _assert_no_output(tmp_path, tmp_path / "out")


def test_error_unreadable_image_keeps_previous_output(small_src, tmp_path):
    out = tmp_path / "out"
    convert_mvtec(small_src, out, progress=False)
    before = _files(out)
    (small_src / "synth_nut" / "train" / "good" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    with pytest.raises(ConversionError, match=r"synth_nut/train/good/002\.png"):
        convert_mvtec(small_src, out, progress=False)
    assert _files(out) == before                                        # old output untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # temp build removed
    shutil.rmtree(out)
    with pytest.raises(ConversionError, match="002.png"):
        convert_mvtec(small_src, out, progress=False)
    _assert_no_output(tmp_path, out)


def test_error_unreadable_fg_mask(small_src, tmp_path):
    (small_src / "synth_nut" / "fg_mask" / "train" / "good" / "001.png").write_bytes(b"nope")
    with pytest.raises(ConversionError, match=r"fg_mask/train/good/001\.png"):
        convert_mvtec(small_src, tmp_path / "out", progress=False)
    _assert_no_output(tmp_path, tmp_path / "out")


def test_refuses_foreign_or_overlapping_output(small_src, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep")
    with pytest.raises(ConversionError, match="not written by this tool"):
        convert_mvtec(small_src, foreign, progress=False)
    assert (foreign / "thesis.txt").read_text() == "keep"
    with pytest.raises(ConversionError, match="overlaps the input"):
        convert_mvtec(small_src, small_src / "imagenet", progress=False)


def test_cli(small_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert.main(["--data_path", str(small_src), "--root", str(out), "--link", "copy",
                         "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "synth_nut" in printed and "fg_masks" in printed
    assert convert.main(["--data_path", str(tmp_path / "nope"), "--root", str(out), "--no_progress"]) == 2
    assert "nope" in capsys.readouterr().err
    help_text = convert.build_parser().format_help()
    assert "--visa" in help_text and "--fg_mask_dir" in help_text and "--link" in help_text


def test_script_entry_point_exists():
    root = Path(__file__).resolve().parents[1]
    text = (root / "setup_train_dataset.py").read_text()
    assert "datasets.convert" in text


# ----------------------------------------------------------------------------- VisA

def _fake_visa(root: Path) -> Path:
    """Tiny VisA-like tree: two objects, masks stored with values 0/1 as in the real release."""
    rng = np.random.default_rng(0)
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        imgs = root / obj / "Data" / "Images"
        masks = root / obj / "Data" / "Masks" / "Anomaly"
        (imgs / "Normal").mkdir(parents=True)
        (imgs / "Anomaly").mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(4):
            name = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / name, format="JPEG")
            rows.append(f"{obj},{'train' if i < 3 else 'test'},normal,{name},")
        for i in range(2):
            name = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / name, format="JPEG")
            m = np.zeros((30, 40), np.uint8)
            m[5:12, 8:20] = 1
            mname = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            Image.fromarray(m).save(root / mname)
            rows.append(f"{obj},test,anomaly,{name},{mname}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_to_mvtec(tmp_path):
    visa = _fake_visa(tmp_path / "visa")
    out = tmp_path / "visa_mvtec"
    rows = visa_to_mvtec(visa, "split_csv/1cls.csv", out, progress=False)
    assert rows == [{"class": "candle", "train": 3, "test_good": 1, "test_bad": 2},
                    {"class": "pcb1", "train": 3, "test_good": 1, "test_bad": 2}]
    assert sorted(os.listdir(out / "candle" / "train" / "good")) == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert sorted(os.listdir(out / "candle" / "ground_truth" / "bad")) == ["000_mask.png", "001_mask.png"]
    m = np.asarray(Image.open(out / "candle" / "ground_truth" / "bad" / "000_mask.png"))
    assert set(np.unique(m)) == {0, 255} and (m == 255).sum() == 7 * 12
    assert load_class_groups(out).objects == ("candle", "pcb1")
    ds = MVTecTestDataset(out, ["candle", "pcb1"], input_size=16)
    assert ds.labels.count(1) == 4 and ds[0]["mask"].sum() > 0
    # and the converted tree feeds the MVTec → ImageNet conversion
    rows = convert_mvtec(out, tmp_path / "visa_imagenet", progress=False)
    assert [(r["class"], r["train"], r["val"]) for r in rows] == [("candle", 3, 1), ("pcb1", 3, 1)]


def test_visa_cli_and_errors(tmp_path, capsys):
    visa = _fake_visa(tmp_path / "visa")
    out = tmp_path / "o"
    assert convert.main(["--visa", "--data_path", str(visa), "--root", str(out), "--no_progress"]) == 0
    assert "candle" in capsys.readouterr().out
    csv_path = visa / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("pcb1/Data/Masks/Anomaly/001.png", "pcb1/Data/Masks/Anomaly/404.png"))
    with pytest.raises(ConversionError, match="mask not found.*404.png"):
        visa_to_mvtec(visa, csv_path, tmp_path / "o2", progress=False)
    _assert_no_output(tmp_path, tmp_path / "o2")
    csv_path.write_text(text.replace("test,anomaly", "test,weird", 1))
    with pytest.raises(ConversionError, match="1cls.csv line .*'weird'"):
        visa_to_mvtec(visa, csv_path, tmp_path / "o2", progress=False)
    csv_path.write_text("object,split,image\n")
    with pytest.raises(ConversionError, match="missing columns"):
        visa_to_mvtec(visa, csv_path, tmp_path / "o2", progress=False)
    csv_path.write_text(text)
    (visa / "candle" / "Data" / "Images" / "Normal" / "0001.JPG").write_bytes(b"\xff\xd8junk")
    with pytest.raises(ConversionError, match="0001.JPG"):
        visa_to_mvtec(visa, csv_path, tmp_path / "o2", progress=False)
    _assert_no_output(tmp_path, tmp_path / "o2")
