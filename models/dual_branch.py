"""CDVM dual-branch MIM model (DESIGN.md §1): a patch-16 and a patch-32 BEiT ViT that see
the same image, plus a shared linear head for the cross-branch cosine-consistency loss.

Both branches start from the same init: the patch-32 branch is initialised from the
patch-16 branch's weights (patch kernel PI-resized as in FlexiViT, relative position table
resized or zeroed per ``rel_pos_init``), with or without a BEiT checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .vit_mim import (
    _CFGS,
    MIMVisionTransformer,
    adapt_beit_state_dict,
    load_state_dict_checked,
    register_model,
)

__all__ = ["DualBranchMIM"]


class DualBranchMIM(nn.Module):
    """Two MIMVisionTransformers (patch 16 and 32) and a shared projection head.

    Args:
        img_size: input side, a multiple of 32.
        rel_pos_init: how the patch-32 branch gets its relative position table from the
            patch-16 one (and from a checkpoint): "resize" (timm's table resize, default) or
            "zeros" (the authors' behaviour).
        proj_dim: output size of the shared head (128).
        **vit_kwargs: forwarded to both `MIMVisionTransformer`s (embed_dim, depth, ...).
    """

    patch_sizes = (16, 32)

    def __init__(
        self,
        img_size: int = 224,
        rel_pos_init: str = "resize",
        proj_dim: int = 128,
        **vit_kwargs,
    ):
        super().__init__()
        if img_size % 32:
            raise ValueError(
                f"img_size must be a multiple of 32 for the dual-branch model, got {img_size}"
            )
        if rel_pos_init not in ("resize", "zeros"):
            raise ValueError(
                f"rel_pos_init must be 'resize' or 'zeros', got {rel_pos_init!r}"
            )
        if "patch_size" in vit_kwargs:
            raise TypeError("DualBranchMIM fixes the patch sizes to (16, 32)")
        self.img_size = img_size
        self.rel_pos_init = rel_pos_init
        self.branches = nn.ModuleDict(
            {
                str(p): MIMVisionTransformer(
                    img_size=img_size, patch_size=p, **vit_kwargs
                )
                for p in self.patch_sizes
            }
        )
        self.grid_sizes = {p: img_size // p for p in self.patch_sizes}
        self.embed_dim = self.branches["16"].embed_dim
        self.vocab_size = self.branches["16"].vocab_size
        self.head = nn.Linear(self.grid_sizes[32] ** 2 * self.embed_dim, proj_dim)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # Same init for both branches: branch 32 <- branch 16 (PI-resized kernel, table per rel_pos_init).
        with torch.no_grad():
            sd, _ = adapt_beit_state_dict(
                self.branches["16"].state_dict(), self.branches["32"], rel_pos_init
            )
            load_state_dict_checked(self.branches["32"], sd, "branch 16 init")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {
            f"branches.{n}.{k}"
            for n, b in self.branches.items()
            for k in b.no_weight_decay()
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for b in self.branches.values():
            b.set_grad_checkpointing(enable)

    def _check_masks(self, masks: dict[int, torch.Tensor]) -> None:
        missing = [p for p in self.patch_sizes if p not in masks]
        if missing:
            raise KeyError(
                f"masks must have one entry per patch size {self.patch_sizes}; missing {missing}"
            )

    def _pooled(self, feats: torch.Tensor, patch: int) -> torch.Tensor:
        """B×N×D on branch `patch`'s grid -> B×(g32²·D), average-pooled to the patch-32 grid,
        flattened token-major (token 0's D features first)."""
        b, _n, d = feats.shape
        g, g32 = self.grid_sizes[patch], self.grid_sizes[32]
        if g != g32:
            f = feats.transpose(1, 2).reshape(b, d, g, g)
            f = F.avg_pool2d(f, kernel_size=g // g32)
            feats = f.flatten(2).transpose(1, 2)
        return feats.reshape(b, -1)

    def forward(
        self,
        x_norm: torch.Tensor,
        masks: dict[int, torch.Tensor],
        consistency_on: str = "embed",
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Returns {"logits": {p: M_p×V at masked positions}, "proj": {p: B×proj_dim}}.

        consistency_on: "embed" projects the input patch embeddings after mask-token
        substitution (the authors' behaviour), "encoder" the final normed tokens.
        """
        if consistency_on not in ("embed", "encoder"):
            raise ValueError(
                f"consistency_on must be 'embed' or 'encoder', got {consistency_on!r}"
            )
        self._check_masks(masks)
        logits, proj = {}, {}
        for p in self.patch_sizes:
            br = self.branches[str(p)]
            tokens, emb = br.forward_features(x_norm, masks[p])
            logits[p] = br.lm_head(tokens[masks[p]])
            proj[p] = self.head(
                self._pooled(emb if consistency_on == "embed" else tokens, p)
            )
        return {"logits": logits, "proj": proj}

    def forward_masked_logits(
        self, x_norm: torch.Tensor, masks: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """Per-branch lm_head logits at the masked positions (no head; used for scoring)."""
        self._check_masks(masks)
        return {p: self.branches[str(p)](x_norm, masks[p]) for p in self.patch_sizes}


def _create_dual(default_cfg: dict, **kwargs) -> DualBranchMIM:
    cfg = {"img_size": 224, "vocab_size": 8192, **default_cfg, **kwargs}
    return DualBranchMIM(**cfg)


@register_model
def vit_tiny_patch16_224_8k_vocab_dual(**kwargs) -> DualBranchMIM:
    return _create_dual(_CFGS["tiny"], **kwargs)


@register_model
def vit_small_patch16_224_8k_vocab_dual(**kwargs) -> DualBranchMIM:
    return _create_dual(_CFGS["small"], **kwargs)


@register_model
def vit_base_patch16_224_8k_vocab_dual(**kwargs) -> DualBranchMIM:
    return _create_dual(_CFGS["base"], **kwargs)


@register_model
def vit_large_patch16_224_8k_vocab_dual(**kwargs) -> DualBranchMIM:
    return _create_dual(_CFGS["large"], **kwargs)
