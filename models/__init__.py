"""CDVM models: the MIM ViT backbone and dual-branch model (registry below), tokenizers,
ProtoFlow. See docs/architecture.md."""

from .dual_branch import DualBranchMIM
from .vit_mim import (
    LoadReport,
    MIMVisionTransformer,
    create_model,
    list_models,
    load_beit_checkpoint,
)

__all__ = [
    "DualBranchMIM",
    "LoadReport",
    "MIMVisionTransformer",
    "create_model",
    "list_models",
    "load_beit_checkpoint",
]
