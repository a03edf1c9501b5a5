"""Verify a downloaded weight file by loading it with the project's own safe loaders.

    python -m engine.weights beit weights/beit_base_patch16_224_pt22k.pth
    python -m engine.weights dall-e weights/dall_e_tokenizer_weight/encoder.pkl
    python -m engine.weights efficientnet weights/tf_efficientnet_b6_aa-80ba17e4.pth
    python -m engine.weights protoflow weights/protoflow/<file>.pth

Used by ``scripts/download_weights.sh``: a file that does not load is reported (and kept
out of the way) instead of failing later, mid-training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def verify_beit(path: Path) -> str:
    """Build a ViT of the checkpoint's own size (dim, depth, heads read from its tensors) and load it."""
    from models import create_model
    from models.vit_mim import _read_state_dict, load_beit_checkpoint
    sd = _read_state_dict(path)
    try:
        dim = sd["cls_token"].shape[-1]
        heads = sd["rel_pos_bias.relative_position_bias_table"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        vocab = sd["lm_head.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a BEiT pre-training checkpoint (missing {e})") from None
    model = create_model("vit_base_patch16_224_8k_vocab", embed_dim=dim, depth=depth, num_heads=heads,
                         vocab_size=vocab, drop_path_rate=0.0)
    report = load_beit_checkpoint(model, path, verbose=False)
    if report.missing:
        raise ValueError(f"{path}: keys missing: {report.missing[:5]}")
    return f"BEiT checkpoint (dim {dim}, depth {depth}, heads {heads}), {len(report.loaded)} tensors loaded"


def verify_dalle(path: Path) -> str:
    from models.dalle import load_dalle_encoder
    enc = load_dalle_encoder(path)
    return f"DALL-E encoder, vocab {enc.vocab_size}, {sum(p.numel() for p in enc.parameters()) / 1e6:.1f} M parameters"


def verify_efficientnet(path: Path, backbone: str = "tf_efficientnet_b6") -> str:
    from models.protoflow import create_feature_extractor
    extractor = create_feature_extractor(backbone, path)
    return f"{backbone} feature extractor, channels {extractor.feature_info.channels()}"


def verify_protoflow(path: Path) -> str:
    from models.protoflow import ProtoFlow
    pf = ProtoFlow.load(path)
    return f"ProtoFlow: backbone {pf.backbone}, {pf.flow_blocks} flow blocks, feature dim {pf.feature_dim}"


VERIFIERS = {"beit": verify_beit, "dall-e": verify_dalle, "efficientnet": verify_efficientnet,
             "protoflow": verify_protoflow}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m engine.weights", description="load a weight file to verify it")
    p.add_argument("kind", choices=sorted(VERIFIERS))
    p.add_argument("path", type=Path)
    args = p.parse_args(argv)
    try:
        print(f"ok: {args.path}: {VERIFIERS[args.kind](args.path)}")
    except Exception as e:  # noqa: BLE001  (any loader failure means "this file is not usable")
        print(f"FAILED: {args.path}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
