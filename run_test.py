"""Score a trained CDVM checkpoint on an MVTec-layout test set (DESIGN.md §1.6, §2).

Argument names follow the authors' test script (--model, --data_path, --model_path,
--class_name, --device, --vis, --save_path, --from_obj_to_texture) plus the protocol
switch. ``--protocol strict`` (default) uses one fixed mask ratio and no test statistics;
``--protocol paper`` reproduces the authors' sweep (best ratio per class chosen on test
results, image threshold fitted on test labels) and is labelled as such in every output.

Example:
    python run_test.py --model_path output/texture_to_obj/checkpoint-last.pth \\
        --data_path data/mvtec --save_path results/texture_to_obj
"""
from __future__ import annotations

import argparse
import sys

from datasets.mvtec import SETTINGS
from engine.evaluate import DEFAULT_MASK_RATIO, DEFAULT_SWEEP, PROTOCOLS
from models.protoflow import ABNORMALITY_KINDS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CDVM test", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model name (default: from the checkpoint's run_info)")
    p.add_argument("--data_path", required=True, help="MVTec-layout test root (<root>/<class>/test/...)")
    p.add_argument("--model_path", required=True, help="trained checkpoint (run_pretraining.py output)")
    p.add_argument("--class_name", default="all", help="one test class, or 'all' (the setting's test classes)")
    p.add_argument("--classes", default=None, help="comma-separated test classes (overrides --class_name/--setting)")
    p.add_argument("--setting", default=None, choices=SETTINGS,
                   help="which classes are tested (default: the checkpoint's setting)")
    p.add_argument("--from_obj_to_texture", action="store_true",
                   help="authors' flag: test the texture classes (objects→textures setting)")
    p.add_argument("--protocol", default="strict", choices=PROTOCOLS,
                   help="strict: one fixed ratio, no test statistics (default); paper: the authors' "
                        "best-of-sweep protocol with a test-label threshold (labelled in every output)")
    p.add_argument("--mask_ratio", type=float, default=DEFAULT_MASK_RATIO, help="strict: the one mask ratio")
    p.add_argument("--sweep_ratios", default=DEFAULT_SWEEP,
                   help="paper: start:stop:step (inclusive) or a comma list of ratios")
    p.add_argument("--abnormality", default="authors", choices=ABNORMALITY_KINDS,
                   help="ProtoFlow abnormality that multiplies the cross-entropy. authors (default): "
                        "1 - exp(log p - max); zscore (strict only): standard deviations below the mean "
                        "log p of normal training positions, 0 above it (better with a weak ViT, see README)")
    p.add_argument("--authors_double_smoothing", default=None, action=argparse.BooleanOptionalAction,
                   help="paper only: smooth pixel maps twice like the authors (default on under paper)")
    p.add_argument("--protoflow_path", default=None,
                   help="ProtoFlow weights (default: weights/protoflow/<setting>.pth)")
    p.add_argument("--prototype_dir", default="weights/prototypes")
    p.add_argument("--tokenizer", default=None, choices=("dall-e", "kmeans"),
                   help="default: from the checkpoint's run_info")
    p.add_argument("--tokenizer_weight_path", default=None, help="default: from the checkpoint's run_info")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--input_size", type=int, default=None, help="default: from the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (falls back to cpu without CUDA)")
    p.add_argument("--no_amp", action="store_true", help="run the ViT forwards in float32 (default bf16 autocast)")
    p.add_argument("--tokenizer_amp", choices=("auto", "bf16", "off"), default="auto",
                   help="tokenizer precision; auto = the precision the checkpoint was trained with "
                        "(its config's tokenizer_amp_resolved) on CPU, float32 on CUDA")
    p.add_argument("--vis", action="store_true", help="write per-class PNG panels and ROC curves")
    p.add_argument("--max_vis_images", type=int, default=16)
    p.add_argument("--save_path", default="results", help="output folder for results.json/.csv/.md")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from engine.checkpoint import CheckpointError
    from engine.evaluate import evaluate_checkpoint

    try:
        out = evaluate_checkpoint(args)
    except (FileNotFoundError, ValueError, KeyError, CheckpointError) as e:
        # Missing/invalid inputs: one clear line instead of a traceback (set CDVM_DEBUG=1 for it).
        import os
        if os.environ.get("CDVM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out["table"])
    print(f"\nreport written to {out['save_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
