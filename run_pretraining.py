#!/usr/bin/env python
"""CDVM pre-training entry point (argument parsing only; the logic is engine.train.run).

    python run_pretraining.py --data_path data/mvtec_train --output_dir runs/x \
        --init_ckpt weights/beit_base_patch16_224_pt22k.pth \
        --tokenizer_weight_path weights/dall_e_tokenizer_weight/encoder.pkl
    torchrun --nproc_per_node 4 run_pretraining.py ...       # multi-GPU (DDP)
    python run_pretraining.py protoflow ...                  # ProtoFlow prior (engine.protoflow_train)
    python run_pretraining.py kmeans_tokenizer ...           # fit the offline k-means stand-in only

Arguments follow the authors' script; see README for the ones added here.
"""
from __future__ import annotations

import argparse
import sys

from datasets.mvtec import SETTINGS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CDVM pre-training", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", required=True, help="ImageNet-format folder from setup_train_dataset.py")
    g.add_argument("--setting", choices=SETTINGS, default=None,
                   help="training classes; default from --from_obj_to_texture (authors: texture_to_obj without it)")
    g.add_argument("--from_obj_to_texture", action="store_true", help="authors' flag: train on objects")
    g.add_argument("--classes", default=None, help="comma-separated class list (overrides --setting)")
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--imagenet_default_mean_and_std", action="store_true", default=True,
                   help="accepted for compatibility; ImageNet mean/std are always used")
    g.add_argument("--num_workers", type=int, default=4)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224_8k_vocab_dual")
    g.add_argument("--init_ckpt", default=None, help="BEiT checkpoint (beit_base_patch16_224_pt22k.pth)")
    g.add_argument("--embed_dim", type=int, default=None, help="override the named model's width (small runs)")
    g.add_argument("--depth", type=int, default=None, help="override the named model's depth")
    g.add_argument("--num_heads", type=int, default=None, help="override the named model's head count")
    g.add_argument("--drop_path", type=float, default=0.1)
    g.add_argument("--layer_scale_init_value", type=float, default=0.1)
    g.add_argument("--rel_pos_init", choices=("resize", "zeros"), default="resize",
                   help="patch-32 relative position table: resized (default) or zeros (authors)")
    g.add_argument("--consistency_on", choices=("embed", "encoder"), default="embed",
                   help="cosine-consistency input: patch embeddings (authors) or encoder outputs")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=("dall-e", "kmeans"), default="dall-e")
    g.add_argument("--tokenizer_weight_path", default=None,
                   help="DALL-E encoder.pkl, or the k-means codebook (fitted and saved here if absent)")
    g.add_argument("--tokenizer_vocab", type=int, default=8192, help="vocabulary when fitting k-means")
    g.add_argument("--kmeans_max_patches", type=int, default=None,
                   help="patches sampled for the k-means fit (default: the fitter's)")
    g.add_argument("--tokenizer_amp", choices=("auto", "bf16", "off"), default="auto",
                   help="tokenizer precision; auto = bf16 for DALL-E under --amp, fp32 for k-means")
    g = p.add_argument_group("masking")
    g.add_argument("--mask_ratio", type=float, default=0.3)
    g.add_argument("--class_mask_ratios", choices=("none", "authors"), default="none",
                   help="'authors' = the per-class table hard-coded in the authors' code")
    g.add_argument("--dynamic_masking_epoch", type=int, default=100)
    g.add_argument("--freq_fft", choices=("1d", "2d"), default="1d")
    g.add_argument("--sync_uncertainty_every", type=int, default=1,
                   help="steps between cross-rank merges of the uncertainty state")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=32, help="per process (authors: 1)")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many global steps (0 = no limit)")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--min_lr", type=float, default=1e-5)
    g.add_argument("--warmup_lr", type=float, default=1e-6)
    g.add_argument("--warmup_epochs", type=int, default=10)
    g.add_argument("--warmup_steps", type=int, default=-1, help="overrides --warmup_epochs when > 0")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--weight_decay_end", type=float, default=None, help="default: = --weight_decay")
    g.add_argument("--clip_grad", type=float, default=3.0)
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16",
                   help="autocast dtype; fp16 (+GradScaler) only on CUDA")
    g.add_argument("--max_nan_steps", type=int, default=10,
                   help="stop after this many consecutive non-finite steps")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="output/pretrain")
    g.add_argument("--log_dir", default=None, help="tensorboard folder (default OUTPUT_DIR/tensorboard)")
    g.add_argument("--no_tensorboard", dest="tensorboard", action="store_false")
    g.add_argument("--no_progress", dest="progress", action="store_false", help="no tqdm bar")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda", help="cuda or cpu (cuda falls back to cpu when absent)")
    g.add_argument("--resume", default="", help="checkpoint to resume from")
    g.add_argument("--auto_resume", action="store_true", default=True,
                   help="resume from the newest valid checkpoint in --output_dir")
    g.add_argument("--no_auto_resume", dest="auto_resume", action="store_false")
    g.add_argument("--save_ckpt_freq", type=int, default=20, help="epochs between checkpoint-<epoch>.pth")
    g.add_argument("--save_ckpt_steps", type=int, default=0,
                   help="also refresh checkpoint-last.pth every N steps (0 = epoch ends only)")
    return p


def get_kmeans_args_parser() -> argparse.ArgumentParser:
    """``run_pretraining.py kmeans_tokenizer``: fit the offline stand-in tokenizer only."""
    p = argparse.ArgumentParser("run_pretraining.py kmeans_tokenizer",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("--setting", choices=SETTINGS, default=None)
    p.add_argument("--from_obj_to_texture", action="store_true")
    p.add_argument("--classes", default=None)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--tokenizer_vocab", type=int, default=8192)
    p.add_argument("--tokenizer_weight_path", required=True, help="where the codebook is saved")
    p.add_argument("--kmeans_max_patches", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "protoflow":
        from engine.protoflow_train import main as protoflow_main
        protoflow_main(argv[1:])
        return
    if argv and argv[0] == "kmeans_tokenizer":
        from engine.train import fit_kmeans_main
        fit_kmeans_main(get_kmeans_args_parser().parse_args(argv[1:]))
        return
    args = get_args_parser().parse_args(argv)
    from engine import distributed
    from engine.train import run
    try:
        run(args)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
