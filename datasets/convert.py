"""Dataset conversions behind ``setup_train_dataset.py``.

* :func:`convert_mvtec` — MVTec layout → the ImageNet-format training folder
  ``<root>/train/<cls>/*`` (normal training images), ``<root>/val/<cls>/*`` (normal
  test images, ``test/good``), ``<root>/fg_mask/<cls>/*`` (foreground masks, same stem
  as the training image) and a copy of ``dataset_info.json``.
* :func:`visa_to_mvtec` — VisA + its split CSV → the MVTec layout.

Both build into a temporary folder next to the output and swap it into place only
after every file was checked, so a failure never leaves a half-written dataset and a
re-run replaces the previous output atomically. Files are hard links by default (no
extra disk space); across file systems that falls back to copies.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .mvtec import DATASET_INFO, load_class_groups
from .transforms import images_by_stem, is_image_file, load_image, load_mask

LINK_MODES = ("hardlink", "symlink", "copy")
MARKER = "conversion.json"   # written into every output; lets re-runs recognise their own folders


class ConversionError(RuntimeError):
    """Input that cannot be converted (message names the offending path)."""


# ----------------------------------------------------------------------------- file placement

class _Placer:
    """Places files by hard link / symlink / copy; hard links fall back to copies (e.g. EXDEV)."""

    def __init__(self, mode: str):
        if mode not in LINK_MODES:
            raise ValueError(f"link mode must be one of {LINK_MODES}, got {mode!r}")
        self.mode = mode
        self.fell_back = False

    def __call__(self, src: Path, dst: Path) -> None:
        if dst.exists() or dst.is_symlink():
            raise ConversionError(f"two source files map to the same output file {dst} (second: {src})")
        if self.mode == "hardlink" and not self.fell_back:
            try:
                os.link(src, dst)
                return
            except OSError as e:
                self.fell_back = True
                tqdm.write(f"hard link {src} -> {dst} failed ({e.strerror or e}); copying files instead")
        if self.mode == "symlink":
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copy2(src, dst)

    @property
    def effective_mode(self) -> str:
        return "copy" if self.fell_back else self.mode


def _check_image(path: Path) -> None:
    try:
        load_image(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(str(e)) from e


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)) if folder.is_dir() else []


def _prepare_output(root: Path, protected: list[Path]) -> Path:
    """Check the output may be (re)written and create a fresh temporary build folder beside it."""
    root = root.resolve()
    for p in protected:
        p = p.resolve()
        if root == p or p in root.parents or root in p.parents:
            raise ConversionError(f"output folder {root} overlaps the input folder {p}; choose another --root")
    if root.exists():
        if not root.is_dir():
            raise ConversionError(f"output path exists and is not a folder: {root}")
        if any(root.iterdir()) and not (root / MARKER).is_file():
            raise ConversionError(f"output folder {root} is not empty and was not written by this tool "
                                  f"(no {MARKER}); refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _swap_into_place(tmp: Path, root: Path) -> None:
    root = root.resolve()
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        root.rename(old)
    tmp.rename(root)
    if old.exists():
        shutil.rmtree(old)


def _write_marker(folder: Path, info: dict) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- MVTec → ImageNet format

def default_classes(data_path: Path) -> list[str]:
    """Classes listed in ``dataset_info.json`` if present, else every sub-folder with ``train/good``."""
    if (data_path / DATASET_INFO).is_file():
        return list(load_class_groups(data_path).all)
    return sorted(p.name for p in data_path.iterdir() if (p / "train" / "good").is_dir())


def _fg_mask_folder(fg_mask_dir: Path | None, data_path: Path, cls: str) -> Path | None:
    """Where the masks of ``cls`` live: ``<dir>/<cls>/`` or the synthetic layout
    ``<dir>/<cls>/fg_mask/train/good/``; without ``--fg_mask_dir`` the dataset's own
    ``<data_path>/<cls>/fg_mask/train/good/`` (written by ``datasets.synthetic``) is used."""
    candidates = []
    if fg_mask_dir is not None:
        candidates += [fg_mask_dir / cls / "fg_mask" / "train" / "good", fg_mask_dir / cls]
    else:
        candidates += [data_path / cls / "fg_mask" / "train" / "good"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def convert_mvtec(data_path, root, classes=None, link: str = "hardlink", fg_mask_dir=None,
                  progress: bool = True) -> list[dict]:
    """Write the ImageNet-format training folder; returns one summary row per class."""
    data_path = Path(data_path)
    root = Path(root)
    if not data_path.is_dir():
        raise ConversionError(f"data path not found: {data_path}")
    fg_dir = Path(fg_mask_dir) if fg_mask_dir else None
    if fg_dir is not None and not fg_dir.is_dir():
        raise ConversionError(f"--fg_mask_dir not found: {fg_dir}")
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c]
    classes = list(classes) if classes else default_classes(data_path)
    if not classes:
        raise ConversionError(f"no class folders with train/good found under {data_path}")

    # Check everything first (cheap) so most errors come before any file is written.
    plan = []
    for cls in classes:
        cdir = data_path / cls
        if not cdir.is_dir():
            raise ConversionError(f"class folder not found: {cdir}")
        train_dir = cdir / "train" / "good"
        if not train_dir.is_dir():
            raise ConversionError(f"class folder {cdir} has no train/good folder")
        train = _images_in(train_dir)
        if not train:
            raise ConversionError(f"no images in {train_dir}")
        val = _images_in(cdir / "test" / "good")
        if not val:
            val = _images_in(cdir / "test" / "ok")       # BTAD names its normal folder "ok"
        mdir = _fg_mask_folder(fg_dir, data_path, cls)
        masks = images_by_stem(mdir) if mdir is not None else {}
        plan.append((cls, train, val, masks))

    tmp = _prepare_output(root, [data_path])
    place = _Placer(link)
    rows = []
    try:
        total = sum(len(t) + len(v) for _, t, v, _ in plan)
        bar = tqdm(total=total, desc="converting", unit="img", disable=not progress)
        for cls, train, val, masks in plan:
            n_masks = 0
            for split, files in (("train", train), ("val", val)):
                out_dir = tmp / split / cls
                out_dir.mkdir(parents=True, exist_ok=True)
                for f in files:
                    _check_image(f)
                    place(f, out_dir / f.name)
                    if split == "train" and f.stem in masks:
                        m = masks[f.stem]
                        try:
                            load_mask(m)
                        except (ValueError, FileNotFoundError) as e:
                            raise ConversionError(f"foreground mask unreadable: {e}") from e
                        mdst = tmp / "fg_mask" / cls
                        mdst.mkdir(parents=True, exist_ok=True)
                        place(m, mdst / (f.stem + m.suffix))
                        n_masks += 1
                    bar.update(1)
            rows.append({"class": cls, "train": len(train), "val": len(val), "fg_masks": n_masks})
        bar.close()
        if (data_path / DATASET_INFO).is_file():
            shutil.copy2(data_path / DATASET_INFO, tmp / DATASET_INFO)
        _write_marker(tmp, {"tool": "setup_train_dataset.py", "source": str(data_path.resolve()),
                            "link": place.effective_mode, "fg_mask_dir": str(fg_dir) if fg_dir else None,
                            "classes": rows})
        _swap_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def format_summary(rows: list[dict]) -> str:
    """Plain-text table: class, train count, val count, foreground masks found."""
    head = ("class", "train", "val", "fg_masks")
    width = max([len(head[0])] + [len(r["class"]) for r in rows])
    lines = [f"{head[0]:<{width}}  {head[1]:>6}  {head[2]:>6}  {head[3]:>8}"]
    lines += [f"{r['class']:<{width}}  {r['train']:>6}  {r['val']:>6}  {r['fg_masks']:>8}" for r in rows]
    tot = {k: sum(r[k] for r in rows) for k in ("train", "val", "fg_masks")}
    lines.append(f"{'total':<{width}}  {tot['train']:>6}  {tot['val']:>6}  {tot['fg_masks']:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- VisA → MVTec layout

VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def visa_to_mvtec(visa_root, csv_path, out, link: str = "hardlink", progress: bool = True) -> list[dict]:
    """Convert VisA (images + split CSV with columns object,split,label,image,mask; labels
    'normal'/'anomaly') to ``<cls>/train/good``, ``<cls>/test/good``, ``<cls>/test/bad``,
    ``<cls>/ground_truth/bad/<stem>_mask.png`` (masks binarised to 0/255)."""
    visa_root, out = Path(visa_root), Path(out)
    if not visa_root.is_dir():
        raise ConversionError(f"VisA root not found: {visa_root}")
    csv_path = Path(csv_path)
    if not csv_path.is_absolute() and not csv_path.is_file():
        csv_path = visa_root / csv_path
    if not csv_path.is_file():
        raise ConversionError(f"VisA split CSV not found: {csv_path}")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConversionError(f"{csv_path}: missing columns {missing} (need {list(VISA_COLUMNS)})")
        records = list(reader)
    if not records:
        raise ConversionError(f"{csv_path}: no rows")

    plan = []
    for n, r in enumerate(records, start=2):   # line numbers as a spreadsheet shows them
        cls, split, label = r["object"].strip(), r["split"].strip().lower(), r["label"].strip().lower()
        img = visa_root / r["image"].strip()
        where = f"{csv_path} line {n}"
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise ConversionError(f"{where}: split must be train/test and label normal/anomaly, "
                                  f"got {split!r}/{label!r}")
        if split == "train" and label == "anomaly":
            raise ConversionError(f"{where}: anomalous image in the training split ({img})")
        if not img.is_file():
            raise ConversionError(f"{where}: image not found: {img}")
        mask = None
        if label == "anomaly":
            if not r["mask"].strip():
                raise ConversionError(f"{where}: anomalous image {img} has no mask")
            mask = visa_root / r["mask"].strip()
            if not mask.is_file():
                raise ConversionError(f"{where}: mask not found: {mask}")
        sub = "train/good" if split == "train" else ("test/good" if label == "normal" else "test/bad")
        plan.append((cls, sub, img, mask))

    tmp = _prepare_output(out, [visa_root])
    place = _Placer(link)
    counts: dict[str, dict] = {}
    try:
        for cls, sub, img, mask in tqdm(plan, desc="VisA → MVTec", unit="img", disable=not progress):
            _check_image(img)
            d = tmp / cls / sub
            d.mkdir(parents=True, exist_ok=True)
            place(img, d / img.name)
            if mask is not None:
                try:
                    m = np.asarray(load_mask(mask)) > 0
                except (ValueError, FileNotFoundError) as e:
                    raise ConversionError(f"mask unreadable: {e}") from e
                gd = tmp / cls / "ground_truth" / "bad"
                gd.mkdir(parents=True, exist_ok=True)
                Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(gd / f"{img.stem}_mask.png")
            c = counts.setdefault(cls, {"class": cls, "train": 0, "test_good": 0, "test_bad": 0})
            c[{"train/good": "train", "test/good": "test_good", "test/bad": "test_bad"}[sub]] += 1
        classes = sorted(counts)
        # VisA has no texture classes; record the split so load_class_groups does not fall back to MVTec's.
        (tmp / DATASET_INFO).write_text(json.dumps(
            {"textures": [], "objects": classes, "generator": "visa_to_mvtec"}, indent=2) + "\n")
        _write_marker(tmp, {"tool": "setup_train_dataset.py --visa", "source": str(visa_root.resolve()),
                            "csv": str(csv_path), "link": place.effective_mode,
                            "classes": [counts[c] for c in classes]})
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [counts[c] for c in sorted(counts)]


# ----------------------------------------------------------------------------- CLI

def build_parser():
    import argparse
    ap = argparse.ArgumentParser(
        prog="setup_train_dataset.py",
        description="Build the ImageNet-format training folder (<root>/train/<cls>, <root>/val/<cls>, "
                    "<root>/fg_mask/<cls>) from an MVTec-layout dataset, or convert VisA to the MVTec layout.",
        epilog="Examples:\n"
               "  python setup_train_dataset.py --data_path data/mvtec_anomaly_detection --root data/Mvtec-ImageNet\n"
               "  python setup_train_dataset.py --data_path data/synthetic --root data/synthetic-ImageNet\n"
               "  python setup_train_dataset.py --visa --data_path data/VisA --visa_csv split_csv/1cls.csv "
               "--root data/visa_mvtec\n"
               "    (then run again on data/visa_mvtec to build its training folder)\n"
               "Re-running replaces the output folder only after the new one was built successfully.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", default="data/mvtec_anomaly_detection",
                    help="input root: MVTec layout (<cls>/train/good, <cls>/test/good), or VisA with --visa")
    ap.add_argument("--root", default=None,
                    help="output folder (default data/Mvtec-ImageNet; with --visa: data/visa_mvtec)")
    ap.add_argument("--classes", default=None,
                    help="comma-separated classes (default: dataset_info.json or every folder with train/good)")
    ap.add_argument("--link", choices=LINK_MODES, default="hardlink",
                    help="how files are placed; hardlink falls back to copy across file systems")
    ap.add_argument("--fg_mask_dir", default=None,
                    help="foreground masks laid out <dir>/<cls>/<file> or <dir>/<cls>/fg_mask/train/good/<file> "
                         "(matched to training images by file stem); without it, masks shipped inside the "
                         "dataset at <cls>/fg_mask/train/good are used (synthetic data)")
    ap.add_argument("--visa", action="store_true",
                    help="convert VisA at --data_path to the MVTec layout at --root using --visa_csv")
    ap.add_argument("--visa_csv", default="split_csv/1cls.csv",
                    help="VisA split CSV (columns object,split,label,image,mask), relative to --data_path or absolute")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.visa:
            out = args.root or "data/visa_mvtec"
            rows = visa_to_mvtec(args.data_path, args.visa_csv, out, link=args.link, progress=not args.no_progress)
            print(f"VisA converted to MVTec layout at {out}")
            w = max([5] + [len(r["class"]) for r in rows])
            print(f"{'class':<{w}}  {'train':>6}  {'test_good':>9}  {'test_bad':>8}")
            for r in rows:
                print(f"{r['class']:<{w}}  {r['train']:>6}  {r['test_good']:>9}  {r['test_bad']:>8}")
        else:
            out = args.root or "data/Mvtec-ImageNet"
            rows = convert_mvtec(args.data_path, out, classes=args.classes, link=args.link,
                                 fg_mask_dir=args.fg_mask_dir, progress=not args.no_progress)
            print(f"training folder written to {out}")
            print(format_summary(rows))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
