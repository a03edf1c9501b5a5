"""Reader of the ImageNet-format training folder written by ``setup_train_dataset.py``.

Layout: ``<root>/<split>/<cls>/<file>`` and optional foreground masks
``<root>/fg_mask/<cls>/<same stem>.<any image ext>`` (used by foreground-only masking;
all ones when absent, so every patch counts as foreground).
"""
from __future__ import annotations

import os
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


class TrainImageFolder(Dataset):
    """Normal images of ``classes``; ``class_index`` indexes ``sorted(classes)``."""

    def __init__(self, root: str | os.PathLike, classes, input_size: int = 224, split: str = "train",
                 use_fg_mask: bool = True):
        self.root = Path(root)
        if isinstance(classes, str):
            classes = [classes]
        self.classes = sorted(set(classes))
        if not self.classes:
            raise ValueError("TrainImageFolder: no classes given")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"split folder not found: {split_dir} (run setup_train_dataset.py first)")
        self.split = split
        self.input_size = input_size
        self.use_fg_mask = use_fg_mask
        self.image_tf = image_transform(input_size)
        self.mask_tf = mask_transform(input_size)
        self.samples: list[tuple[str, str | None, str, int]] = []  # path, fg mask, class, index
        self.fg_mask_count = 0
        for index, cls in enumerate(self.classes):
            cls_dir = split_dir / cls
            if not cls_dir.is_dir():
                raise FileNotFoundError(f"class folder not found: {cls_dir}")
            files = sorted(p for p in cls_dir.iterdir() if p.is_file() and is_image_file(p))
            if not files:
                raise FileNotFoundError(f"class folder has no images: {cls_dir}")
            masks = ({k: str(v) for k, v in images_by_stem(self.root / "fg_mask" / cls).items()}
                     if use_fg_mask else {})
            for f in files:
                m = masks.get(f.stem)
                self.fg_mask_count += m is not None
                self.samples.append((str(f), m, cls, index))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        path, mask_path, cls, index = self.samples[idx]
        image = self.image_tf(load_image(path))
        if mask_path is None:
            fg = torch.ones(1, self.input_size, self.input_size)
        else:
            fg = self.mask_tf(load_mask(mask_path))
        return {"image": image, "fg_mask": fg, "class_name": cls, "class_index": index, "path": path}
