"""Image/mask transforms shared by every reader, and the token-image size rule.

Images travel between packages as float tensors in [0, 1]; normalisation is applied
by the consumer with :func:`normalize`, so the same tensor can feed both the ViT
(normalised) and the tokenizer (raw [0, 1]).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def images_by_stem(folder: str | os.PathLike) -> dict[str, Path]:
    """stem → image file of one folder (first by sorted name if extensions differ; {} if absent).
    How masks are matched to images everywhere: ground truth, foreground masks, conversion."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image_file(p):
            out.setdefault(p.stem, p)
    return out


def _open_verified(path: str | os.PathLike, mode: str) -> Image.Image:
    """Open and fully decode an image so truncated files fail here, naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: corrupt or not an image ({e})") from e


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load an image as RGB (grayscale/palette/RGBA are converted); clear error if unreadable."""
    return _open_verified(path, "RGB")


def load_mask(path: str | os.PathLike) -> Image.Image:
    """Load a mask as 8-bit grayscale; clear error if unreadable."""
    return _open_verified(path, "L")


def image_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB → 3×S×S float [0,1]: shorter side to S (bicubic, antialiased), centre crop."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(size),
        T.ToTensor(),
    ])


def mask_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL mask → 1×S×S float {0,1}: nearest resize + centre crop, then binarise > 0.5."""
    base = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.NEAREST),
        T.CenterCrop(size),
        T.ToTensor(),
    ])

    def _apply(mask: Image.Image) -> torch.Tensor:
        if mask.mode != "L":
            mask = mask.convert("L")
        return (base(mask) > 0.5).float()

    return _apply


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a 3×H×W or B×3×H×W tensor in [0,1], on its own device/dtype."""
    if x01.dim() not in (3, 4) or x01.shape[-3] != 3:
        raise ValueError(f"normalize expects 3×H×W or B×3×H×W, got shape {tuple(x01.shape)}")
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x01.device, dtype=x01.dtype).view(shape)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x01.device, dtype=x01.dtype).view(shape)
    return (x01 - mean) / std


def token_image_size(input_size: int, patch: int) -> int:
    """Side of the tokenizer input: the dVAE downsamples by 8, giving one token per patch."""
    if input_size % patch:
        raise ValueError(f"input_size {input_size} is not a multiple of patch size {patch}")
    return input_size * 8 // patch


def token_images(x01: torch.Tensor, patch: int) -> torch.Tensor:
    """B×3×S×S in [0,1] → B×3×t×t tokenizer input (bicubic, antialias, clamped to [0,1])."""
    if x01.dim() != 4:
        raise ValueError(f"token_images expects B×3×S×S, got shape {tuple(x01.shape)}")
    t = token_image_size(x01.shape[-1], patch)
    if x01.shape[-2:] == (t, t):
        return x01.clamp(0, 1)
    src = x01.float() if x01.dtype in (torch.float16, torch.bfloat16) else x01
    out = F.interpolate(src, size=(t, t), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 1).to(x01.dtype)
