"""One entry point for the visual tokenizers that give the MIM targets.

``build_tokenizer("dall-e", path)`` → the paper's DALL-E dVAE encoder (models/dalle.py);
``build_tokenizer("kmeans", path)`` → the offline k-means stand-in (models/kmeans_tokenizer.py).
Both are frozen modules with the :class:`Tokenizer` interface.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from models.dalle import Encoder, load_dalle_encoder
from models.kmeans_tokenizer import KMeansTokenizer

log = logging.getLogger(__name__)

TOKENIZER_KINDS = ("dall-e", "kmeans")
_ALIASES = {
    "dall-e": "dall-e",
    "dalle": "dall-e",
    "dall_e": "dall-e",
    "kmeans": "kmeans",
    "k-means": "kmeans",
}


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer.

    ``get_codebook_indices(x01)``: token images B×3×t×t in [0,1] (no normalisation; the
    dVAE applies its own ``map_pixels``) → LongTensor B×(t/downsample)×(t/downsample) with
    values in ``[0, vocab_size)``.
    """

    vocab_size: int
    downsample: int

    def get_codebook_indices(self, x01: torch.Tensor) -> torch.Tensor: ...


def build_tokenizer(
    kind: str,
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    **kw: Any,
) -> nn.Module:
    """Frozen tokenizer in eval mode on ``device``.

    ``kind="dall-e"``: ``path`` = ``encoder.pkl`` (or a state-dict/.safetensors file);
    ``path=None`` builds a randomly initialised full-size encoder (or sized by ``kw``,
    e.g. ``n_hid``) with a loud warning — only good for speed benchmarks and smoke tests.
    ``kind="kmeans"``: ``path`` = a file written by ``KMeansTokenizer.save``.
    Other ``kw`` go to the module's constructor.
    """
    key = _ALIASES.get(str(kind).lower())
    if key is None:
        raise ValueError(
            f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}"
        )
    if key == "dall-e":
        if path is None:
            msg = (
                "no dVAE weight path given: using a RANDOMLY INITIALISED DALL-E encoder. Its tokens "
                "are meaningless as training targets; use this only for benchmarks/smoke tests "
                "(see weights/README.md for encoder.pkl)"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
            tok: nn.Module = Encoder(**kw)
        else:
            tok = load_dalle_encoder(path, **kw)
    else:
        if path is None:
            raise ValueError(
                "the 'kmeans' tokenizer needs a path to a fitted codebook; fit one with "
                "models.kmeans_tokenizer.fit_kmeans_tokenizer(train_images) and .save(path)"
            )
        tok = KMeansTokenizer.load(path, **kw)
    return tok.to(device).eval().requires_grad_(False)
