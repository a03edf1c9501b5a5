"""BEiT-style masked-image-modeling ViT (DESIGN.md §1.2), built from timm's BEiT blocks.

Only the MIM wiring (mask-token substitution, masked-position lm_head, BEiT init) is
written here; attention, MLP, layer scale, drop path and the shared relative position
bias are timm's (`timm.models.beit.Block` / `RelativePositionBias`).

Registered names (timm style: registered factories + the private builder
`_create_mim_vit`); any of `embed_dim`, `depth`, `num_heads` can be overridden by keyword,
e.g. ``create_model("vit_base_patch16_224_8k_vocab", embed_dim=32, depth=2, num_heads=2)``
builds the config of the tiny BEiT test fixture.

| name                              | dim  | depth | heads | note                          |
|-----------------------------------|------|-------|-------|-------------------------------|
| vit_tiny_patch16_224_8k_vocab     | 192  | 4     | 3     | CPU-friendly smoke-test size  |
| vit_small_patch16_224_8k_vocab    | 384  | 12    | 6     |                               |
| vit_base_patch16_224_8k_vocab     | 768  | 12    | 12    | the paper's backbone (BEiT-B) |
| vit_large_patch16_224_8k_vocab    | 1024 | 24    | 16    | optional                      |

Each has a ``..._dual`` counterpart (`models.dual_branch.DualBranchMIM`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.utils.checkpoint
from timm.layers import (
    PatchEmbed,
    resample_patch_embed,
    resize_rel_pos_bias_table,
    trunc_normal_,
)
from timm.models.beit import Block, RelativePositionBias
from torch import nn

from models.weight_io import load_weights_file

__all__ = [
    "LoadReport",
    "MIMVisionTransformer",
    "adapt_beit_state_dict",
    "create_model",
    "list_models",
    "load_beit_checkpoint",
    "register_model",
]

# --------------------------------------------------------------------------- registry

_MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name (timm convention)."""
    if fn.__name__ in _MODEL_REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODEL_REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by an fnmatch pattern."""
    import fnmatch

    names = sorted(_MODEL_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; keyword args override the registered config."""
    if name not in _MODEL_REGISTRY:
        raise KeyError(
            f"unknown model {name!r}; registered: {', '.join(list_models())}"
        )
    return _MODEL_REGISTRY[name](**kwargs)


# --------------------------------------------------------------------------- model


class MIMVisionTransformer(nn.Module):
    """BEiT pre-training ViT: patch embed, mask token, shared rel-pos bias, blocks, lm_head.

    Args:
        img_size: input side in pixels (multiple of ``patch_size``); fixes the token grid.
        patch_size: patch side (16 or 32 in CDVM).
        vocab_size: visual-token vocabulary (8192 for the DALL-E dVAE).
        embed_dim, depth, num_heads, mlp_ratio: transformer config.
        drop_path_rate: stochastic depth, linearly increasing over blocks (off in eval()).
        layer_scale_init_value: initial γ of the layer scale (BEiT: 0.1).
        grad_checkpointing: recompute blocks in backward to save memory.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        vocab_size: int = 8192,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        layer_scale_init_value: float = 0.1,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"img_size {img_size} is not a multiple of patch_size {patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grad_checkpointing = grad_checkpointing
        self.init_std = init_std

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # One bias table shared by all blocks (BEiT pre-training), so blocks get window_size=None.
        self.rel_pos_bias = RelativePositionBias(
            window_size=(self.grid_size, self.grid_size), num_heads=num_heads
        )

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        # stochastic depth rising linearly 0 -> drop_path_rate (plain floats: meta-device safe)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    qkv_bias=True,  # timm: learnable q_bias/v_bias, fixed-zero k_bias (as BEiT)
                    mlp_ratio=mlp_ratio,
                    drop_path=dpr[i],
                    init_values=layer_scale_init_value,
                    norm_layer=norm_layer,
                    window_size=None,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self._init_weights_beit()

    # -- init (BEiT: trunc-normal 0.02 on Linear/tokens, residual projections scaled by depth)
    def _init_weights_beit(self) -> None:
        std = self.init_std
        trunc_normal_(self.cls_token, std=std)
        trunc_normal_(self.mask_token, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for layer_id, blk in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (layer_id + 1))
                blk.attn.proj.weight.div_(scale)
                blk.mlp.fc2.weight.div_(scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (plus every ndim<=1 param, by the optimizer)."""
        return {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check_mask(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None
    ) -> None:
        if bool_masked_pos is None:
            return
        if bool_masked_pos.dtype != torch.bool:
            raise TypeError(
                f"bool_masked_pos must be a bool tensor, got {bool_masked_pos.dtype}"
            )
        expect = (x.shape[0], self.num_patches)
        if tuple(bool_masked_pos.shape) != expect:
            raise ValueError(
                f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}, expected {expect} "
                f"(batch, ({self.img_size}/{self.patch_size})^2 patches)"
            )

    def forward_features(
        self, x_norm: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode; returns (tokens B×N×D after the final norm without cls, embeddings B×N×D
        after mask-token substitution, before the blocks)."""
        self._check_mask(x_norm, bool_masked_pos)
        x = self.patch_embed(x_norm)
        if bool_masked_pos is not None:
            w = bool_masked_pos.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        embeddings = x
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        # 1×H×(N+1)×(N+1): a 4-D mask lets CPU SDPA take its flash kernel (a 3-D one falls
        # back to the ~5x slower math path).
        rel_pos_bias = self.rel_pos_bias().unsqueeze(0)
        if torch.is_autocast_enabled(x.device.type):
            # SDPA wants attn_mask in the query dtype; avoids an fp32 island under autocast.
            rel_pos_bias = rel_pos_bias.to(torch.get_autocast_dtype(x.device.type))
        for blk in self.blocks:
            if (
                self.grad_checkpointing
                and torch.is_grad_enabled()
                and not torch.jit.is_scripting()
            ):
                x = torch.utils.checkpoint.checkpoint(
                    blk, x, rel_pos_bias, use_reentrant=False
                )
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        x = self.norm(x)
        return x[:, 1:], embeddings

    def forward(
        self,
        x_norm: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        return_all_tokens: bool = False,
    ) -> torch.Tensor:
        """lm_head logits: M×V at masked positions (batch-major raster order), or B×N×V."""
        if bool_masked_pos is None and not return_all_tokens:
            raise ValueError(
                "bool_masked_pos is required unless return_all_tokens=True"
            )
        tokens, _ = self.forward_features(x_norm, bool_masked_pos)
        if return_all_tokens:
            return self.lm_head(tokens)
        return self.lm_head(tokens[bool_masked_pos])


def _create_mim_vit(variant: str, default_cfg: dict, **kwargs) -> MIMVisionTransformer:
    """Private builder: registered config overridden by kwargs."""
    cfg = {**default_cfg, **kwargs}
    if "rel_pos_init" in cfg:
        raise TypeError(
            f"{variant}: rel_pos_init only applies to the dual-branch models (…_dual)"
        )
    return MIMVisionTransformer(**cfg)


_CFGS = {
    "tiny": {"embed_dim": 192, "depth": 4, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}
_COMMON = {"patch_size": 16, "img_size": 224, "vocab_size": 8192}


@register_model
def vit_tiny_patch16_224_8k_vocab(**kwargs) -> MIMVisionTransformer:
    return _create_mim_vit(
        "vit_tiny_patch16_224_8k_vocab", {**_COMMON, **_CFGS["tiny"]}, **kwargs
    )


@register_model
def vit_small_patch16_224_8k_vocab(**kwargs) -> MIMVisionTransformer:
    return _create_mim_vit(
        "vit_small_patch16_224_8k_vocab", {**_COMMON, **_CFGS["small"]}, **kwargs
    )


@register_model
def vit_base_patch16_224_8k_vocab(**kwargs) -> MIMVisionTransformer:
    return _create_mim_vit(
        "vit_base_patch16_224_8k_vocab", {**_COMMON, **_CFGS["base"]}, **kwargs
    )


@register_model
def vit_large_patch16_224_8k_vocab(**kwargs) -> MIMVisionTransformer:
    return _create_mim_vit(
        "vit_large_patch16_224_8k_vocab", {**_COMMON, **_CFGS["large"]}, **kwargs
    )


# --------------------------------------------------------------------------- checkpoint loading

_REL_TABLE = "rel_pos_bias.relative_position_bias_table"
_PATCH_W = "patch_embed.proj.weight"


@dataclass
class LoadReport:
    """What a checkpoint load did. Keys are the model's state-dict names."""

    missing: list[str] = field(
        default_factory=list
    )  # in the model, not in the file (left at init)
    unexpected: list[str] = field(
        default_factory=list
    )  # in the file, not in the model (ignored)
    loaded: list[str] = field(default_factory=list)
    notes: list[str] = field(
        default_factory=list
    )  # adaptations (resizes, zeroed tables, dropped keys)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for label, keys in (
            ("missing (kept at init)", self.missing),
            ("unexpected (ignored)", self.unexpected),
        ):
            lines.append(
                f"{label}: {len(keys)}"
                + ("" if not keys else "\n    " + "\n    ".join(keys))
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _window_of_table(num_rows: int) -> int:
    """Square window W such that the BEiT table has (2W-1)²+3 rows (3 = cls↔token terms)."""
    side = math.isqrt(num_rows - 3)
    if side * side != num_rows - 3 or side % 2 == 0:
        raise ValueError(
            f"relative position table with {num_rows} rows is not a square BEiT window table"
        )
    return (side + 1) // 2


def adapt_beit_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: MIMVisionTransformer,
    rel_pos_init: str = "resize",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit a BEiT state dict to `model`'s patch size and window.

    Patch kernel: FlexiViT PI-resize (`timm.layers.resample_patch_embed`, bicubic+antialias).
    Relative position table: `timm.layers.resize_rel_pos_bias_table` from the file's window
    to the model's, or zeros with ``rel_pos_init="zeros"`` (the CDVM authors' behaviour for
    the patch-32 branch). A table whose window already matches is copied as is. The stored
    `relative_position_index` is dropped: it is recomputed from the window.
    Returns (new state dict, notes).
    """
    if rel_pos_init not in ("resize", "zeros"):
        raise ValueError(
            f"rel_pos_init must be 'resize' or 'zeros', got {rel_pos_init!r}"
        )
    notes: list[str] = []
    sd = {
        k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")
    }
    if len(sd) != len(state_dict):
        notes.append("relative_position_index dropped (recomputed from the window)")
    w = sd.get(_PATCH_W)
    p = model.patch_size
    if w is not None and w.ndim == 4 and tuple(w.shape[-2:]) != (p, p):
        sd[_PATCH_W] = resample_patch_embed(w.float(), [p, p]).to(w.dtype)
        notes.append(f"{_PATCH_W}: PI-resized {tuple(w.shape[-2:])} -> {(p, p)}")
    t = sd.get(_REL_TABLE)
    if t is not None and t.ndim == 2:
        g = model.grid_size
        target = tuple(model.rel_pos_bias.relative_position_bias_table.shape)
        src_w = _window_of_table(t.shape[0])
        if src_w != g:
            if t.shape[1] != target[1]:
                raise ValueError(
                    f"{_REL_TABLE}: checkpoint has {t.shape[1]} heads, model has {target[1]}"
                )
            if rel_pos_init == "zeros":
                sd[_REL_TABLE] = t.new_zeros(target)
                notes.append(
                    f"{_REL_TABLE}: window {src_w}x{src_w} -> {g}x{g} set to zeros (rel_pos_init='zeros')"
                )
            else:
                # timm's scipy-free interpolator warns about its own indexing
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    sd[_REL_TABLE] = resize_rel_pos_bias_table(
                        t.float(),
                        new_window_size=(g, g),
                        new_bias_shape=target,
                        old_window_size=(src_w, src_w),
                    ).to(t.dtype)
                notes.append(f"{_REL_TABLE}: resized window {src_w}x{src_w} -> {g}x{g}")
    return sd, notes


def load_state_dict_checked(
    model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "state dict"
) -> LoadReport:
    """load_state_dict(strict=False) that refuses shape mismatches and reports key sets."""
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: shape mismatch for {k!r}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport(
        missing=[k for k in own if k not in sd],
        unexpected=[k for k in sd if k not in own],
        loaded=[k for k in own if k in sd],
    )


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    obj = load_weights_file(path, "BEiT checkpoint",
                            "download beit_base_patch16_224_pt22k.pth; see weights/README.md")
    for wrapper in ("model", "module", "state_dict"):
        if (
            isinstance(obj, Mapping)
            and wrapper in obj
            and isinstance(obj[wrapper], Mapping)
        ):
            obj = obj[wrapper]
            break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise ValueError(
            f"{path}: expected a state dict (or {{'model': state_dict}}) of tensors"
        )
    return dict(obj)


def load_beit_checkpoint(
    model: nn.Module, path: str | os.PathLike, verbose: bool = True
) -> LoadReport:
    """Load a BEiT pre-training checkpoint into a MIMVisionTransformer or a DualBranchMIM.

    For a dual-branch model every branch receives the checkpoint, adapted to its patch size
    and window (see `adapt_beit_state_dict`, with the model's ``rel_pos_init``); report keys
    are then prefixed ``branches.<p>.`` and the untouched shared head shows up as missing.
    """
    sd = _read_state_dict(path)
    src = os.fspath(path)
    branches = getattr(model, "branches", None)
    if isinstance(branches, nn.ModuleDict):
        report = LoadReport()
        rel_pos_init = getattr(model, "rel_pos_init", "resize")
        for name, branch in branches.items():
            bsd, notes = adapt_beit_state_dict(sd, branch, rel_pos_init=rel_pos_init)
            r = load_state_dict_checked(branch, bsd, src)
            pre = f"branches.{name}."
            report.missing += [pre + k for k in r.missing]
            report.unexpected += [pre + k for k in r.unexpected]
            report.loaded += [pre + k for k in r.loaded]
            report.notes += [f"branch {name}: {n}" for n in notes]
        report.missing += [
            k for k in model.state_dict() if not k.startswith("branches.")
        ]
    elif isinstance(model, MIMVisionTransformer):
        bsd, notes = adapt_beit_state_dict(sd, model)
        report = load_state_dict_checked(model, bsd, src)
        report.notes += notes
    else:
        raise TypeError(
            f"load_beit_checkpoint: unsupported model type {type(model).__name__}"
        )
    if verbose:
        print(f"[load_beit_checkpoint] {src}\n{report}")
    return report
