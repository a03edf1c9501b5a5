"""k-means visual tokenizer: an OFFLINE STAND-IN for the DALL-E dVAE, not the paper's tokenizer.

Exists so that the pipeline can be trained and tested where the dVAE weights cannot be
downloaded. Same interface as :class:`models.dalle.Encoder`: ``get_codebook_indices(x01)``
maps a B×3×t×t token image in [0,1] to a B×(t/8)×(t/8) LongTensor, one token per
non-overlapping 8×8 pixel patch (112 px → 14×14, 56 px → 7×7, as the dVAE).

Patch features: the raw 3×8×8 pixels, standardised per colour channel with the mean and
standard deviation of the fitting patches (dataset-level, not per patch). The patch's
mean colour and brightness are kept on purpose: colour and intensity defects (stains,
discolouration, burns) are anomalies the tokens must be able to express, while centring
and scaling stop one bright channel from dominating the Euclidean distance. The token
is the nearest codebook centroid (``torch.cdist``), the codebook is fitted with
scikit-learn's ``MiniBatchKMeans`` on patches of the normal training images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.weight_io import atomic_torch_save, load_weights_file

FORMAT = "cdvm-kmeans-tokenizer"
FORMAT_VERSION = 1
PATCH = 8


def patch_features(
    x01: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch: int = PATCH
) -> torch.Tensor:
    """B×3×t×t → (B·h·w)×(3·p·p) standardised patch vectors, raster order per image."""
    if x01.dim() != 4 or x01.shape[1] != 3:
        raise ValueError(f"expected B×3×t×t token images, got shape {tuple(x01.shape)}")
    b, c, h, w = x01.shape
    if h % patch or w % patch:
        raise ValueError(
            f"token image size {h}×{w} is not a multiple of the {patch}-px patch"
        )
    x = (x01.float() - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c * patch * patch)


class KMeansTokenizer(nn.Module):
    """Nearest-centroid tokenizer over 8×8 patches (offline stand-in; see module docstring)."""

    downsample = PATCH

    def __init__(
        self,
        codebook: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        info: dict | None = None,
        chunk_size: int = 65536,
    ) -> None:
        super().__init__()
        d = 3 * PATCH * PATCH
        if codebook.dim() != 2 or codebook.shape[1] != d or codebook.shape[0] < 1:
            raise ValueError(
                f"codebook must be K×{d}, got shape {tuple(codebook.shape)}"
            )
        if mean.shape != (3,) or std.shape != (3,) or not bool((std > 0).all()):
            raise ValueError("mean/std must be 3-vectors with std > 0")
        self.register_buffer("codebook", codebook.detach().float().clone())
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.info = dict(info or {})
        self.run_info: dict = {}  # provenance, filled by load()
        self.chunk_size = chunk_size

    @property
    def vocab_size(self) -> int:
        return int(self.codebook.shape[0])

    @torch.no_grad()
    def get_codebook_indices(self, x01: torch.Tensor) -> torch.Tensor:
        """Token images in [0,1] (B×3×t×t) → token ids, LongTensor B×(t/8)×(t/8)."""
        b, _, h, w = x01.shape
        feats = patch_features(x01.to(self.codebook.device), self.mean, self.std)
        ids = (
            torch.cat(
                [
                    torch.cdist(part, self.codebook).argmin(dim=1)
                    for part in feats.split(self.chunk_size)
                ]
            )
            if len(feats)
            else feats.new_zeros(0, dtype=torch.long)
        )
        return ids.view(b, h // PATCH, w // PATCH)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.get_codebook_indices(x01)

    def save(self, path: str | os.PathLike, run_info: dict | None = None) -> None:
        """Tensors + a small config only (loadable with ``weights_only=True``); atomic write.

        ``run_info`` (``engine.runinfo.run_info(...)``) is stored as JSON for provenance.
        """
        path = Path(path)
        obj = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "patch": PATCH,
            "vocab_size": self.vocab_size,
            "codebook": self.codebook.cpu(),
            "mean": self.mean.cpu(),
            "std": self.std.cpu(),
            "info": json.dumps(self.info),
            "run_info": json.dumps(run_info or {}),
        }
        atomic_torch_save(obj, path)

    @classmethod
    def load(cls, path: str | os.PathLike, **kw: Any) -> KMeansTokenizer:
        """Read a file written by :meth:`save`; clear errors for missing/corrupt/foreign files."""
        path = Path(path)
        obj = load_weights_file(path, "k-means tokenizer file",
                                "fit one with: python run_pretraining.py kmeans_tokenizer ...")
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a CDVM k-means tokenizer file (no format={FORMAT!r} marker)"
            )
        if obj.get("version") != FORMAT_VERSION or obj.get("patch") != PATCH:
            raise ValueError(
                f"{path}: unsupported k-means tokenizer version {obj.get('version')!r} "
                f"/ patch {obj.get('patch')!r} (expected {FORMAT_VERSION} / {PATCH})"
            )
        try:
            tok = cls(
                obj["codebook"],
                obj["mean"],
                obj["std"],
                info=json.loads(obj.get("info", "{}")),
                **kw,
            )
            tok.run_info = json.loads(obj.get("run_info", "{}"))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{path}: malformed k-means tokenizer file ({type(e).__name__}: {e})"
            ) from None
        if obj.get("vocab_size") != tok.vocab_size:
            raise ValueError(
                f"{path}: vocab_size {obj.get('vocab_size')} does not match the codebook "
                f"({tok.vocab_size} rows)"
            )
        return tok.eval().requires_grad_(False)


def _batches(images: Iterable[Any]) -> Iterable[torch.Tensor]:
    """Accept tensors (B×3×S×S or 3×S×S), dataset dicts with "image", or (image, ...) tuples."""
    for item in images:
        if isinstance(item, dict):
            item = item["image"]
        elif isinstance(item, (list, tuple)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"expected image tensors, got {type(item).__name__}")
        yield item.unsqueeze(0) if item.dim() == 3 else item


def fit_kmeans_tokenizer(
    images: Iterable[Any],
    vocab_size: int = 512,
    patch_sizes=(16, 32),
    input_size: int = 224,
    max_patches: int = 200_000,
    seed: int = 0,
    batch_size: int = 4096,
    max_iter: int = 50,
    n_init: int = 3,
    *,
    token_images_fn: Callable[[torch.Tensor, int], torch.Tensor],
) -> KMeansTokenizer:
    """Fit the stand-in tokenizer on 8×8 patches of every branch's token images.

    ``images``: an iterable/DataLoader of [0,1] images (see :func:`_batches`) at
    ``input_size``. Each image is turned into the token image of every patch size in
    ``patch_sizes`` by ``token_images_fn`` (the caller passes
    ``datasets.transforms.token_images``, where the size rule lives; ``models`` does not
    import ``datasets``), so one codebook serves both branches. At most ``max_patches`` patches are
    kept, a uniform sample drawn with ``seed`` (streaming: lowest random keys win);
    the result is deterministic for a given seed and input order.
    """
    from sklearn.cluster import MiniBatchKMeans

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    gen = torch.Generator().manual_seed(seed)
    keys: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    zero, one = torch.zeros(3), torch.ones(3)
    n_images = n_seen = n_held = 0
    for x in _batches(images):
        if (
            x.dim() != 4
            or x.shape[1] != 3
            or tuple(x.shape[-2:]) != (input_size, input_size)
        ):
            raise ValueError(
                f"expected B×3×{input_size}×{input_size} images in [0,1], got {tuple(x.shape)}"
            )
        n_images += x.shape[0]
        for p in patch_sizes:
            # raw pixels here; standardised once the sample's statistics are known
            feats = patch_features(token_images_fn(x.float(), p), zero, one)
            n_seen += len(feats)
            n_held += len(feats)
            keys.append(torch.rand(len(feats), generator=gen))
            chunks.append(feats)
        if n_held > 2 * max_patches:  # compact: keep the max_patches lowest keys so far
            k, c = torch.cat(keys), torch.cat(chunks)
            keep = k.topk(max_patches, largest=False).indices
            keys, chunks, n_held = [k[keep]], [c[keep]], max_patches
    if not chunks:
        raise ValueError("fit_kmeans_tokenizer got no images")
    k, pixels = torch.cat(keys), torch.cat(chunks)
    if len(k) > max_patches:
        pixels = pixels[k.topk(max_patches, largest=False).indices.sort().values]
    if len(pixels) < vocab_size:
        raise ValueError(
            f"only {len(pixels)} patches from {n_images} images for a vocabulary of "
            f"{vocab_size}: use more images or a smaller vocab_size"
        )
    chan = pixels.view(len(pixels), 3, -1).transpose(0, 1).reshape(3, -1)
    mean, std = chan.mean(dim=1), chan.std(dim=1).clamp_min(1e-3)
    feats = (pixels.view(len(pixels), 3, -1) - mean.view(1, 3, 1)) / std.view(1, 3, 1)
    km = MiniBatchKMeans(
        n_clusters=vocab_size,
        random_state=seed,
        batch_size=batch_size,
        max_iter=max_iter,
        n_init=n_init,
    )
    km.fit(feats.reshape(len(pixels), -1).numpy().astype(np.float32))
    info = {
        "vocab_size": vocab_size,
        "patch_sizes": list(patch_sizes),
        "input_size": input_size,
        "n_images": n_images,
        "n_patches_seen": n_seen,
        "n_patches_used": len(pixels),
        "seed": seed,
        "inertia_per_patch": float(km.inertia_) / len(pixels),
        "features": "8x8 RGB pixels standardised per channel (dataset mean/std)",
        "note": "offline stand-in for the DALL-E dVAE; not the paper's tokenizer",
    }
    return KMeansTokenizer(
        torch.from_numpy(km.cluster_centers_).float(), mean, std, info=info
    )
