"""Checkpoints: safe loading, RNG round trip, truncated-file handling, and exact resume
(kill mid-epoch → auto-resume gives the same next losses as an uninterrupted run)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from train_helpers import ToyTokenizer, make_args, tiny_model  # tests/ is on sys.path

from engine.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from engine.train import run


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), \
        [random.random() for _ in range(3)], random.gauss(0, 1)


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    np.random.randn()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)
    save_checkpoint(tmp_path / "c.pth", {"model": {}, "rng": rng_state()})
    first = _draws()
    ckpt = load_checkpoint(tmp_path / "c.pth")  # weights_only=True inside
    set_rng_state(ckpt["rng"])
    assert _draws() == first


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    save_checkpoint(tmp_path / "checkpoint-0.pth", {"model": {"w": torch.ones(2)}})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0.pth"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    p = tmp_path / "trunc.pth"
    save_checkpoint(p, {"model": {"w": torch.randn(1000)}})
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="trunc.pth: truncated"):
        load_checkpoint(p)
    save_checkpoint(p, {"weights": {}})
    with pytest.raises(CheckpointError, match=r"trunc.pth: missing keys \['model'\]"):
        load_checkpoint(p)


def test_unsafe_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": np.dtype("float32").__class__}, p)  # needs code-executing unpickler
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(p)


def test_find_resume_skips_truncated_newest(tmp_path, capsys):
    old, new = tmp_path / "checkpoint-0.pth", tmp_path / "checkpoint-last.pth"
    state = {"model": {}, "optimizer": {}, "epoch": 1, "step": 4}
    save_checkpoint(old, state)
    save_checkpoint(new, {**state, "epoch": 2, "step": 8})
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    assert find_resume_checkpoint(tmp_path) == new
    new.write_bytes(new.read_bytes()[:100])
    assert find_resume_checkpoint(tmp_path) == old
    out = capsys.readouterr().out
    assert "skipping unusable checkpoint" in out and str(new) in out
    assert find_resume_checkpoint(tmp_path / "nothing") is None


class _Killed(Exception):
    pass


def test_kill_and_auto_resume_continues_identically(synthetic_train, tmp_path):
    """16 images, batch 4 → 4 steps per epoch; 7 steps straight vs. the same run killed and
    auto-resumed, once from an epoch-end checkpoint (step 4) and once from a mid-epoch one (step 3)."""
    n_steps = 7
    straight = []
    res_a = run(make_args(synthetic_train, tmp_path / "a", "--max_steps", n_steps, "--no_auto_resume"),
                model=tiny_model(), tokenizer=ToyTokenizer(), on_step=lambda s, log: straight.append(log["loss"]))

    first = []

    def killer(step, log):
        first.append(log["loss"])
        if step == 5:
            raise _Killed  # "killed" before step 5's end-of-step bookkeeping could save anything
    b_dir = tmp_path / "b"
    with pytest.raises(_Killed):
        run(make_args(synthetic_train, b_dir, "--max_steps", n_steps, "--save_ckpt_steps", 3),
            model=tiny_model(), tokenizer=ToyTokenizer(), on_step=killer)
    ckpt = load_checkpoint(find_resume_checkpoint(b_dir))
    # newest valid: the epoch-0 end (step 4) wrote checkpoint-last after the step-3 one
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["epoch_step"] == 0

    # make the resume start mid-epoch too: drop the epoch-end file, keep only the step-3 state
    mid = []
    c_dir = tmp_path / "c"
    with pytest.raises(_Killed):
        def kill3(step, log):
            mid.append(log["loss"])
            if step == 4:
                raise _Killed
        run(make_args(synthetic_train, c_dir, "--max_steps", n_steps, "--save_ckpt_steps", 3),
            model=tiny_model(), tokenizer=ToyTokenizer(), on_step=kill3)
    ckpt_c = load_checkpoint(find_resume_checkpoint(c_dir))
    assert ckpt_c["step"] == 3 and ckpt_c["epoch"] == 0 and ckpt_c["epoch_step"] == 3

    for d, done in ((b_dir, 4), (c_dir, 3)):
        rest: list[float] = []
        res = run(make_args(synthetic_train, d, "--max_steps", n_steps),  # auto_resume is the default
                  model=tiny_model(seed=123), tokenizer=ToyTokenizer(),
                  on_step=lambda s, log, rest=rest: rest.append(log["loss"]))
        assert rest == pytest.approx(straight[done:], abs=1e-6, rel=0), d
        for (n, a), b in zip(res_a["model"].state_dict().items(), res["model"].state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
        sa, sb = res_a["mask_sampler"].state_dict(), res["mask_sampler"].state_dict()
        for p in sa["sum"]:
            torch.testing.assert_close(sa["sum"][p], sb["sum"][p])
    assert first[:5] == pytest.approx(straight[:5], abs=1e-6, rel=0)


def test_checkpoint_holds_what_evaluation_needs(synthetic_train, tmp_path):
    import models

    run(make_args(synthetic_train, tmp_path, "--max_steps", 4, "--save_ckpt_freq", 1), model=tiny_model(),
        tokenizer=ToyTokenizer())
    ckpt = load_checkpoint(tmp_path / "checkpoint-0.pth")
    for key in ("model", "optimizer", "scaler", "epoch", "step", "mask_sampler", "rng", "run_info", "config"):
        assert key in ckpt, key
    cfg = ckpt["run_info"]["config"]
    assert cfg["vocab_size"] == 16 and cfg["input_size"] == 64 and cfg["rel_pos_init"] == "resize"
    assert ckpt["run_info"]["git_commit"]
    model = models.create_model(cfg["model"], img_size=cfg["input_size"], vocab_size=cfg["vocab_size"],
                                rel_pos_init=cfg["rel_pos_init"], embed_dim=32, depth=2, num_heads=2)
    model.load_state_dict(ckpt["model"])
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_evaluation_rebuilds_a_model_trained_with_size_overrides(synthetic_train, tmp_path):
    """Round trip with the scorer's loader: architecture overrides are recorded in the config."""
    from engine.evaluate import load_trained_model

    res = run(make_args(synthetic_train, tmp_path, "--max_steps", 1, "--embed_dim", 32, "--depth", 2,
                        "--num_heads", 2), tokenizer=ToyTokenizer())
    model, cfg = load_trained_model(tmp_path / "checkpoint-last.pth", torch.device("cpu"))
    assert cfg["vocab_size"] == 16 and not model.training
    for (name, a), b in zip(res["model"].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_auto_resume_into_a_different_model_is_a_clear_error(synthetic_train, tmp_path):
    run(make_args(synthetic_train, tmp_path, "--max_steps", 1), model=tiny_model(), tokenizer=ToyTokenizer())
    with pytest.raises(RuntimeError, match="cannot resume from .*checkpoint-last.pth"):
        run(make_args(synthetic_train, tmp_path, "--max_steps", 2, "--embed_dim", 48, "--depth", 1,
                      "--num_heads", 2), tokenizer=ToyTokenizer())


def test_explicit_resume_path(synthetic_train, tmp_path):
    run(make_args(synthetic_train, tmp_path / "a", "--max_steps", 2), model=tiny_model(), tokenizer=ToyTokenizer())
    steps = []
    res = run(make_args(synthetic_train, tmp_path / "b", "--max_steps", 3, "--no_auto_resume",
                        "--resume", tmp_path / "a" / "checkpoint-last.pth"),
              model=tiny_model(seed=5), tokenizer=ToyTokenizer(), on_step=lambda s, log: steps.append(s))
    assert steps == [3] and res["state"].step == 3
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        run(make_args(synthetic_train, tmp_path / "c", "--resume", tmp_path / "nope.pth"), tokenizer=ToyTokenizer())


def test_snapshot_keeps_its_content_when_the_source_is_saved_again(tmp_path):
    from engine.checkpoint import snapshot_checkpoint

    last = tmp_path / "checkpoint-last.pth"
    save_checkpoint(last, {"model": {"w": torch.zeros(2)}, "epoch": 0})
    snap = snapshot_checkpoint(last, tmp_path / "checkpoint-0.pth")
    save_checkpoint(last, {"model": {"w": torch.ones(2)}, "epoch": 1})
    assert load_checkpoint(snap)["epoch"] == 0 and torch.equal(load_checkpoint(snap)["model"]["w"], torch.zeros(2))
    assert load_checkpoint(last)["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp"))
