"""Shared pytest fixtures: a tiny synthetic MVTec-layout dataset and its converted training folder.

Generated once per test session (about a second) so every package can test against
real files in the real layouts without downloads.
"""
from __future__ import annotations

import pytest

SYNTH_SEED = 0
SYNTH_IMAGE_SIZE = 64
SYNTH_N_TRAIN = 8
SYNTH_N_TEST = 6          # 2 normal + 4 defective per class


@pytest.fixture(scope="session")
def synthetic_mvtec(tmp_path_factory):
    """Path to a tiny MVTec-layout dataset (2 texture + 2 object classes, ``synth_screw`` grayscale,
    64 px, 8 train / 6 test images per class, ``dataset_info.json`` at the root)."""
    from datasets.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic_mvtec") / "mvtec"
    return generate(out, seed=SYNTH_SEED, image_size=SYNTH_IMAGE_SIZE, n_train=SYNTH_N_TRAIN,
                    n_test=SYNTH_N_TEST)


@pytest.fixture(scope="session")
def synthetic_train(synthetic_mvtec, tmp_path_factory):
    """Path to the ImageNet-format folder converted from ``synthetic_mvtec``
    (train/<cls>, val/<cls>, fg_mask/<cls> for the object classes, dataset_info.json)."""
    from datasets.convert import convert_mvtec

    out = tmp_path_factory.mktemp("synthetic_train") / "imagenet"
    convert_mvtec(synthetic_mvtec, out, link="copy", progress=False)
    return out
