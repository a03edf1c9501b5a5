"""Tiny training fixtures shared by the training and checkpoint tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ToyTokenizer(nn.Module):
    """Deterministic stand-in tokenizer: mean brightness of each 8×8 block, 16 levels."""
    vocab_size = 16

    def get_codebook_indices(self, x01):
        m = F.avg_pool2d(x01.float().mean(1, keepdim=True), 8)[:, 0]
        return (m * self.vocab_size).long().clamp(0, self.vocab_size - 1)


def tiny_model(seed: int = 0):
    import models

    torch.manual_seed(seed)
    return models.create_model("vit_tiny_patch16_224_8k_vocab_dual", img_size=64, vocab_size=16,
                               embed_dim=32, depth=2, num_heads=2)


def make_args(data_path, out_dir, *extra):
    import run_pretraining

    return run_pretraining.get_args_parser().parse_args([
        "--data_path", str(data_path), "--output_dir", str(out_dir), "--model", "vit_tiny_patch16_224_8k_vocab_dual",
        "--input_size", "64", "--batch_size", "4", "--device", "cpu", "--num_workers", "0", "--epochs", "5",
        "--warmup_epochs", "0", "--lr", "2e-3", "--no_progress", "--no_tensorboard", *map(str, extra)])
