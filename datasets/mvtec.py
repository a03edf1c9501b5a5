"""MVTec-AD facts (classes, settings, the authors' mask ratios) and the test-set reader.

The reader accepts any dataset in the MVTec layout — MVTec AD itself, MPDD, BTAD
(normal folder ``ok``, masks named like the image), VisA after
``setup_train_dataset.py --visa`` and the synthetic data of ``datasets.synthetic``:

    <root>/<cls>/test/<type>/<name>.<ext>
    <root>/<cls>/ground_truth/<type>/<name>_mask.<ext>   (or <name>.<ext>)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .transforms import (
    image_transform,
    images_by_stem,
    is_image_file,
    load_image,
    load_mask,
    mask_transform,
)

TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw",
           "toothbrush", "transistor", "zipper")
MVTEC_CLASSES = tuple(sorted(TEXTURES + OBJECTS))

# Per-class mask ratios hard-coded in the authors' code (all on their test sweep's grid);
# only used behind ``--class_mask_ratios authors``.
AUTHORS_MASK_RATIOS: dict[str, float] = {
    "bottle": 0.42, "cable": 0.28, "capsule": 0.16, "carpet": 0.16, "grid": 0.16,
    "hazelnut": 0.36, "leather": 0.12, "metal_nut": 0.48, "pill": 0.48, "screw": 0.04,
    "tile": 0.38, "toothbrush": 0.22, "transistor": 0.48, "wood": 0.46, "zipper": 0.20,
}

SETTINGS = ("multi_class", "obj_to_texture", "texture_to_obj")

# Folder names of normal test images (MVTec/MPDD/VisA-converted use "good", BTAD "ok").
NORMAL_TYPES = ("good", "ok")

DATASET_INFO = "dataset_info.json"


@dataclass(frozen=True)
class ClassGroups:
    textures: tuple
    objects: tuple

    @property
    def all(self) -> tuple:
        return tuple(self.textures) + tuple(self.objects)


def load_class_groups(root: str | os.PathLike | None = None) -> ClassGroups:
    """Texture/object split of a dataset: ``<root>/dataset_info.json`` if present, else MVTec's."""
    if root is not None:
        info_path = Path(root) / DATASET_INFO
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text())
                textures, objects = info["textures"], info["objects"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{info_path}: expected JSON with 'textures' and 'objects' lists ({e})") from e
            if not all(isinstance(c, str) for c in list(textures) + list(objects)):
                raise ValueError(f"{info_path}: 'textures' and 'objects' must be lists of class names")
            return ClassGroups(tuple(textures), tuple(objects))
    return ClassGroups(TEXTURES, OBJECTS)


def resolve_classes(setting: str, groups: ClassGroups, classes=None) -> tuple[list, list]:
    """(train_classes, test_classes) of a setting; explicit ``classes`` override both.

    Classes are resolved from the groups only; the readers raise a clear error when a
    resolved class folder is missing on disk.
    """
    if classes:
        if isinstance(classes, str):
            classes = [c for c in classes.split(",") if c]
        return list(classes), list(classes)
    if setting == "multi_class":
        return list(groups.all), list(groups.all)
    if setting == "obj_to_texture":
        return list(groups.objects), list(groups.textures)
    if setting == "texture_to_obj":
        return list(groups.textures), list(groups.objects)
    raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")


def find_mask(index: dict[str, Path], stem: str) -> Path | None:
    """Mask of image ``stem``: ``<stem>_mask.*`` (MVTec/MPDD/VisA) or ``<stem>.*`` (BTAD)."""
    return index.get(stem + "_mask") or index.get(stem)


class MVTecTestDataset(Dataset):
    """Test images of the given classes with labels and pixel masks (zeros for normal images)."""

    def __init__(self, root: str | os.PathLike, classes, input_size: int = 224):
        self.root = Path(root)
        if isinstance(classes, str):
            classes = [classes]
        self.classes = list(classes)
        if not self.classes:
            raise ValueError("MVTecTestDataset: no classes given")
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root}")
        self.input_size = input_size
        self.image_tf = image_transform(input_size)
        self.mask_tf = mask_transform(input_size)
        self.samples: list[tuple[str, str | None, int, str, str]] = []  # path, mask, label, type, class
        for cls in self.classes:
            self.samples.extend(self._scan_class(cls))

    def _scan_class(self, cls: str) -> list:
        test_dir = self.root / cls / "test"
        if not (self.root / cls).is_dir():
            raise FileNotFoundError(f"class folder not found: {self.root / cls}")
        if not test_dir.is_dir():
            raise FileNotFoundError(f"class {cls!r} has no test folder: {test_dir}")
        out = []
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect_type = type_dir.name
            label = 0 if defect_type in NORMAL_TYPES else 1
            masks = images_by_stem(self.root / cls / "ground_truth" / defect_type) if label else {}
            for img in sorted(p for p in type_dir.iterdir() if p.is_file() and is_image_file(p)):
                mask = None
                if label:
                    mask = find_mask(masks, img.stem)
                    if mask is None:
                        raise FileNotFoundError(
                            f"no ground-truth mask for defect image {img} (looked for "
                            f"{self.root / cls / 'ground_truth' / defect_type / (img.stem + '_mask.*')} "
                            f"and {img.stem}.*)")
                out.append((str(img), None if mask is None else str(mask), label, defect_type, cls))
        if not out:
            raise FileNotFoundError(f"class {cls!r} has no test images under {test_dir}")
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        path, mask_path, label, defect_type, cls = self.samples[idx]
        image = self.image_tf(load_image(path))
        if mask_path is None:
            mask = torch.zeros(1, self.input_size, self.input_size)
        else:
            mask = self.mask_tf(load_mask(mask_path))
        return {"image": image, "mask": mask, "label": label, "defect_type": defect_type,
                "path": path, "class_name": cls}

    @property
    def labels(self) -> list[int]:
        return [s[2] for s in self.samples]
