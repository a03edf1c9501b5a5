"""Training objective and loop: loss per image at any batch size, learning on synthetic data,
non-finite step handling, optimiser groups and schedules, config resolution."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import ToyTokenizer, make_args, tiny_model  # tests/ is on sys.path

import engine.train as train_mod
from engine.optim import (
    apply_schedules,
    build_optimizer,
    cosine_scheduler,
    param_groups_weight_decay,
)
from engine.train import NonFiniteLossError, compute_mim_loss, resolve_setting, run


# ---------------------------------------------------------------------------- loss
def _fake_outputs(batch, vocab=11, grids=(4, 2), ratio=0.5, seed=0, equal_counts=True):
    g = torch.Generator().manual_seed(seed)
    masks, targets, rw, logits, proj = {}, {}, {}, {}, {}
    for p, grid in zip((16, 32), grids):
        n = grid * grid
        if equal_counts:
            keys = torch.rand(batch, n, generator=g)
            k = max(1, int(ratio * n))
            m = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, keys.topk(k, 1).indices, True)
        else:
            m = torch.rand(batch, n, generator=g) < ratio
            m[:, 0] = True
        masks[p] = m
        targets[p] = torch.randint(0, vocab, (batch, n), generator=g)
        rw[p] = torch.where(m, 1 + 3 * torch.rand(batch, n, generator=g), torch.zeros(()))
        logits[p] = torch.randn(int(m.sum()), vocab, generator=g) * 2
        proj[p] = torch.randn(batch, 8, generator=g)
    return {"logits": logits, "proj": proj}, targets, masks, rw


def _slice(outputs, targets, masks, rw, i):
    out = {"logits": {}, "proj": {}}
    for p, m in masks.items():
        rows = m.nonzero(as_tuple=True)[0]
        out["logits"][p] = outputs["logits"][p][rows == i]
        out["proj"][p] = outputs["proj"][p][i:i + 1]
    return (out, {p: t[i:i + 1] for p, t in targets.items()}, {p: t[i:i + 1] for p, t in masks.items()},
            {p: t[i:i + 1] for p, t in rw.items()})


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("equal_counts", [True, False])
def test_batch_loss_is_mean_of_single_image_losses(dynamic, equal_counts):
    outputs, targets, masks, rw = _fake_outputs(4, equal_counts=equal_counts)
    full = compute_mim_loss(outputs, targets, masks, rw, dynamic=dynamic)
    singles = [compute_mim_loss(*_slice(outputs, targets, masks, rw, i), dynamic=dynamic) for i in range(4)]
    torch.testing.assert_close(full["loss"], torch.stack([s["loss"] for s in singles]).mean())
    torch.testing.assert_close(full["per_sample"], torch.stack([s["loss"] for s in singles]))
    for p in (16, 32):
        torch.testing.assert_close(full["ce"][p], torch.stack([s["ce"][p] for s in singles]).mean())
        for i in range(4):
            torch.testing.assert_close(full["per_patch_ce"][p][i:i + 1], singles[i]["per_patch_ce"][p])


@pytest.mark.parametrize("dynamic", [False, True])
def test_single_image_loss_matches_formula(dynamic):
    outputs, targets, masks, rw = _fake_outputs(1)
    got = compute_mim_loss(outputs, targets, masks, rw, dynamic=dynamic)
    expect = 0.0
    for p in (16, 32):
        lg, tg = outputs["logits"][p], targets[p][masks[p]]
        ce = F.cross_entropy(lg, tg, reduction="none")
        if dynamic:
            ce = ce * rw[p][masks[p]]
        bce = F.binary_cross_entropy_with_logits(lg, F.one_hot(tg, lg.shape[1]).float())  # authors: 'mean'
        expect = expect + ce.mean() + bce
        ppce = got["per_patch_ce"][p]
        assert (ppce[~masks[p]] == 0).all()
        torch.testing.assert_close(ppce[masks[p]], F.cross_entropy(lg, tg, reduction="none"))
        torch.testing.assert_close(got["acc"][p], (lg.argmax(1) == tg).float().mean())
    expect = expect + 1 - F.cosine_similarity(outputs["proj"][16], outputs["proj"][32]).squeeze()
    torch.testing.assert_close(got["loss"], expect)


def test_dynamic_weights_change_ce_only_when_enabled():
    outputs, targets, masks, rw = _fake_outputs(2)
    plain = compute_mim_loss(outputs, targets, masks, rw, dynamic=False)
    ones = compute_mim_loss(outputs, targets, masks, {p: m.float() for p, m in masks.items()}, dynamic=True)
    weighted = compute_mim_loss(outputs, targets, masks, rw, dynamic=True)
    torch.testing.assert_close(plain["loss"], ones["loss"])
    assert weighted["loss"] > plain["loss"]  # weights are >= 1
    torch.testing.assert_close(plain["bce"][16], weighted["bce"][16])


def test_model_batch_of_four_equals_singles():
    """End to end through the dual model (eval: no drop path): batch 4 == mean of 4 singles."""
    from datasets.masking import random_masks
    from datasets.transforms import normalize
    from engine.train import compute_tokens

    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    x01 = torch.rand(4, 3, 64, 64, generator=g)
    masks = {16: random_masks(4, 4, 0.5, g), 32: random_masks(4, 2, 0.5, g)}
    tokens = compute_tokens(ToyTokenizer(), x01)
    with torch.no_grad():
        full = compute_mim_loss(model(normalize(x01), masks), tokens, masks)
        singles = []
        for i in range(4):
            mi = {p: m[i:i + 1] for p, m in masks.items()}
            singles.append(compute_mim_loss(model(normalize(x01[i:i + 1]), mi),
                                            {p: t[i:i + 1] for p, t in tokens.items()}, mi)["loss"])
    torch.testing.assert_close(full["loss"], torch.stack(singles).mean(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- loop
def test_training_lowers_loss(synthetic_train, tmp_path):
    losses = []
    res = run(make_args(synthetic_train, tmp_path, "--max_steps", 20, "--no_auto_resume"), model=tiny_model(),
              tokenizer=ToyTokenizer(), on_step=lambda s, log: losses.append(log["loss"]))
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    # the uncertainty state reached the sampler: every branch has counts for the trained classes
    sd = res["mask_sampler"].state_dict()
    assert all(c.sum() > 0 for c in sd["count"].values())
    assert (tmp_path / "config.json").is_file() and (tmp_path / "log.txt").is_file()
    assert res["state"].skipped_steps == 0


def _nan_after(real, bad_steps):
    calls = {"n": 0}

    def fake(*a, **kw):
        out = real(*a, **kw)
        if calls["n"] in bad_steps:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += 1
        return out
    return fake


def test_nan_steps_are_skipped_and_leave_parameters_unchanged(synthetic_train, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "compute_mim_loss", _nan_after(compute_mim_loss, {1, 2}))
    model = tiny_model()
    snaps, logs = [], []

    def on_step(step, log):
        logs.append(log)
        snaps.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    res = run(make_args(synthetic_train, tmp_path, "--max_steps", 5, "--no_auto_resume", "--max_nan_steps", 3),
              model=model, tokenizer=ToyTokenizer(), on_step=on_step)
    assert [log["skipped"] for log in logs] == [False, True, True, False, False]
    assert res["state"].skipped_steps == 2
    assert torch.equal(snaps[0], snaps[1]) and torch.equal(snaps[1], snaps[2])  # skipped: untouched
    assert not torch.equal(snaps[2], snaps[3])                                  # training resumed
    assert all(torch.isfinite(s).all() for s in snaps)


def test_too_many_nan_steps_in_a_row_stop_with_clear_error(synthetic_train, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "compute_mim_loss", _nan_after(compute_mim_loss, set(range(100))))
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps.*max_nan_steps 3"):
        run(make_args(synthetic_train, tmp_path, "--max_steps", 10, "--no_auto_resume", "--max_nan_steps", 3),
            model=model, tokenizer=ToyTokenizer())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_config_records_keys_needed_to_rebuild_the_model(synthetic_train, tmp_path):
    import json

    run(make_args(synthetic_train, tmp_path, "--max_steps", 1, "--no_auto_resume", "--setting", "multi_class"),
        model=tiny_model(), tokenizer=ToyTokenizer())
    cfg = json.loads((tmp_path / "config.json").read_text())["config"]
    for key in ("model", "input_size", "vocab_size", "rel_pos_init", "tokenizer", "tokenizer_weight_path",
                "consistency_on", "drop_path", "layer_scale_init_value", "seed", "setting", "classes"):
        assert key in cfg, key
    assert cfg["vocab_size"] == 16 and cfg["setting"] == "multi_class" and len(cfg["classes"]) == 4


def test_setting_resolution_follows_the_authors_flags():
    from types import SimpleNamespace as NS

    assert resolve_setting(NS(setting=None, from_obj_to_texture=False)) == "texture_to_obj"
    assert resolve_setting(NS(setting=None, from_obj_to_texture=True)) == "obj_to_texture"
    assert resolve_setting(NS(setting="multi_class", from_obj_to_texture=True)) == "multi_class"


def test_missing_init_ckpt_is_a_clear_error(synthetic_train, tmp_path):
    with pytest.raises(FileNotFoundError, match="--init_ckpt .*nope.pth"):
        run(make_args(synthetic_train, tmp_path, "--max_steps", 1, "--no_auto_resume",
                      "--init_ckpt", tmp_path / "nope.pth"), tokenizer=ToyTokenizer())


def test_fp16_on_cpu_is_refused(synthetic_train, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        run(make_args(synthetic_train, tmp_path, "--amp", "fp16", "--no_auto_resume"), tokenizer=ToyTokenizer())


# ---------------------------------------------------------------------------- optimiser
def test_no_weight_decay_groups():
    model = tiny_model()
    groups = {g["apply_wd"]: g for g in param_groups_weight_decay(model, 0.05)}
    no_decay, decay = set(groups[False]["param_names"]), set(groups[True]["param_names"])
    for name, p in model.named_parameters():
        special = any(k in name for k in ("cls_token", "mask_token", "relative_position_bias_table"))
        if p.ndim <= 1 or name.endswith(".bias") or special:
            assert name in no_decay, name
        else:
            assert name in decay, name
    assert any("gamma" in n for n in no_decay) and any("norm" in n for n in no_decay)
    assert "branches.16.blocks.0.attn.qkv.weight" in decay and "head.weight" in decay

    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    apply_schedules(opt, lr=2e-4, wd=0.02)
    for g in opt.param_groups:
        assert g["lr"] == 2e-4
        assert g["weight_decay"] == (0.02 if g["apply_wd"] else 0.0)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_cosine_scheduler_warmup_and_end():
    s = cosine_scheduler(5e-4, 1e-5, epochs=10, niter_per_ep=7, warmup_epochs=2, start_warmup_value=1e-6)
    assert len(s) == 70
    assert s[0] == pytest.approx(1e-6) and s[13] == pytest.approx(5e-4) and s[14] == pytest.approx(5e-4)
    assert all(a >= b for a, b in itertools.pairwise(s[14:]))  # monotone decay after warm-up
    assert s[-1] == pytest.approx(1e-5, rel=0.05) and s[-1] >= 1e-5
    flat = cosine_scheduler(0.05, 0.05, epochs=3, niter_per_ep=4)
    assert flat.min() == pytest.approx(0.05) and flat.max() == pytest.approx(0.05)


def test_end_to_end_kmeans_tokenizer_is_fitted_when_missing(synthetic_train, tmp_path, capsys):
    """The un-injected path: k-means stand-in fitted and saved, model built by name, init ckpt absent."""
    from models.tokenizers import build_tokenizer

    tok_path = tmp_path / "tok" / "kmeans16.pt"
    args = make_args(synthetic_train, tmp_path / "run", "--max_steps", 2, "--no_auto_resume", "--tokenizer", "kmeans",
                     "--tokenizer_vocab", 16, "--tokenizer_weight_path", tok_path,
                     "--embed_dim", 32, "--depth", 2, "--num_heads", 2)
    res = run(args)
    err = capsys.readouterr().err
    assert "OFFLINE STAND-IN" in err and "RANDOM initialisation" in err
    assert tok_path.is_file() and build_tokenizer("kmeans", tok_path).vocab_size == 16
    assert res["state"].step == 2 and res["config"]["vocab_size"] == 16
    assert res["model"].branches["16"].lm_head.out_features == 16
    assert res["model"].embed_dim == 32 and res["config"]["depth"] == 2  # recorded for the rebuild


def test_init_ckpt_loads_beit_weights_into_both_branches(tmp_path):
    """The BEiT fixture (dim 32, depth 2, vocab 8192) through the run's model builder."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "beit_pt22k_tiny.pth"
    args = make_args(tmp_path, tmp_path, "--init_ckpt", fixture, "--embed_dim", 32, "--depth", 2, "--num_heads", 2)
    model = train_mod.build_model_for_run(args, vocab_size=8192, resuming=False)
    sd = torch.load(fixture, weights_only=True)["model"]
    for p in ("16", "32"):
        torch.testing.assert_close(model.branches[p].cls_token, sd["cls_token"])
        torch.testing.assert_close(model.branches[p].lm_head.weight, sd["lm_head.weight"])


def test_kmeans_tokenizer_subcommand(synthetic_train, tmp_path):
    import run_pretraining
    from models.tokenizers import build_tokenizer

    out = tmp_path / "tok.pt"
    run_pretraining.main(["kmeans_tokenizer", "--data_path", str(synthetic_train), "--setting", "obj_to_texture",
                          "--input_size", "64", "--tokenizer_vocab", "8", "--tokenizer_weight_path", str(out),
                          "--kmeans_max_patches", "500", "--num_workers", "0"])
    assert build_tokenizer("kmeans", out).vocab_size == 8


def test_dalle_tokens_through_the_training_path_match_the_reference():
    """compute_tokens (channels-last dVAE, fp32) reproduces the official encoder's tokens."""
    from pathlib import Path

    from engine.train import compute_tokens, prepare_tokenizer
    from models.tokenizers import build_tokenizer

    fx = Path(__file__).parent / "fixtures"
    tok = prepare_tokenizer(build_tokenizer("dall-e", fx / "dalle_encoder_tiny.pkl"), torch.device("cpu"))
    io = torch.load(fx / "dalle_encoder_tiny_io.pt", weights_only=True)
    # patch size 8 makes the token image the input itself (input_size * 8 / 8)
    got = compute_tokens(tok, io["raw_112"], patch_sizes=(8,))[8]
    assert torch.equal(got, io["tokens_112"].flatten(1))


@pytest.mark.parametrize("script,env,setting", [
    ("train_multi_class.sh", {}, "multi_class"),
    ("train_cross_class.sh", {"FROM_OBJ_TO_TEXTURE": "1"}, "obj_to_texture"),
    ("train_cross_class.sh", {}, "texture_to_obj"),
])
def test_training_scripts_pass_the_setting_and_overrides(synthetic_train, tmp_path, script, env, setting):
    """The shell entry points: authors' hyper-parameters, setting switch, env overrides, extra args."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    run_env = {**os.environ, **env, "INIT_CKPT": "", "DATA_PATH": str(synthetic_train), "OUTPUT_DIR": str(out),
               "BATCH_SIZE": "4", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(repo / "scripts" / script), "--tokenizer", "kmeans",
                        "--tokenizer_weight_path", str(tmp_path / "km.pt"), "--tokenizer_vocab", "16",
                        "--input_size", "64", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
                        "--max_steps", "1", "--device", "cpu", "--num_workers", "0", "--no_progress",
                        "--no_tensorboard"], env=run_env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["setting"] == setting
    assert cfg["lr"] == 5e-4 and cfg["epochs"] == 300 and cfg["batch_size"] == 4 and cfg["init_ckpt"] is None
