"""Scoring (engine/evaluate.py) and run_test.py on the synthetic dataset, tiny everything.

A tiny ProtoFlow (resnet18, random init, 2 flow blocks, 10 short epochs — a randomly
initialised EfficientNet gives near-degenerate features at 64 px) is fitted once per module
on the fixture's normal training images; the MIM model is a 2-block, 32-d dual ViT at
64 px. Nothing here measures speed (see benchmarks/eval_class.py).
"""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import evaluate as ev
from engine.evaluate import GroundTruth, ScoringConfig

SIZE = 64
VOCAB = 64


class ColorTokenizer(torch.nn.Module):
    """Test stand-in tokenizer: token = 4-level quantised mean colour of each 8×8 cell (64 tokens).

    Deterministic and cheap; defects that change colour change tokens, which is all the
    scoring path needs. The real tokenizers are tested in their own files.
    """

    vocab_size = VOCAB

    def get_codebook_indices(self, x01: torch.Tensor) -> torch.Tensor:
        q = (F.avg_pool2d(x01.float(), 8) * 4).clamp(0, 3.999).long()
        return q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]


def _classes(root: Path) -> list[str]:
    info = json.loads((Path(root) / "dataset_info.json").read_text())
    return list(info["textures"]) + list(info["objects"])


def _tiny_model(drop_path_rate: float = 0.0, size: int = SIZE):
    from models import create_model

    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224_8k_vocab_dual", img_size=size, vocab_size=VOCAB, embed_dim=32,
                        depth=2, num_heads=2, drop_path_rate=drop_path_rate)


def _fit_prior(train_root, out_dir: Path, classes, size: int = SIZE, epochs: int = 10) -> Path:
    from engine.protoflow_train import main as fit

    flow = out_dir / "flow.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init backbone warning is expected here
        fit(["--data_path", str(train_root), "--setting", "multi_class", "--classes", ",".join(classes),
             "--backbone", "resnet18", "--flow_blocks", "2", "--epochs", str(epochs), "--lr", "2e-3",
             "--input_size", str(size), "--coreset_size", "32", "--prototype_dir", str(out_dir / "protos"),
             "--output", str(flow), "--device", "cpu", "--batch_size", "8", "--seed", "0"])
    return flow


@pytest.fixture(scope="module")
def setup(synthetic_mvtec, synthetic_train, tmp_path_factory):
    """Fitted tiny prior + tiny model + prepared inputs of one class (prepared once for the module)."""
    from engine.protoflow_train import load_prior

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = tmp_path_factory.mktemp("evalprior")
    classes = _classes(synthetic_train)
    flow = _fit_prior(synthetic_train, out, classes)
    prior, protos, stats = load_prior(flow, out / "protos", classes, "cpu")
    model = _tiny_model().eval()
    cls = classes[0]
    inputs, truth = _prepare(synthetic_mvtec, cls, prior, protos[cls], model)
    return {"out": out, "flow": flow, "classes": classes, "prior": prior, "protos": protos, "stats": stats,
            "model": model, "cls": cls, "inputs": inputs, "truth": truth}


def _prepare(root, cls, prior, protos, model, batch_size=4):
    from torch.utils.data import DataLoader

    from datasets.mvtec import MVTecTestDataset

    ds = MVTecTestDataset(root, [cls], input_size=SIZE)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    return ev.prepare_class(cls, loader, prior, protos, ColorTokenizer(), model.patch_sizes,
                            torch.device("cpu"))


def _wrong(truth: GroundTruth) -> GroundTruth:
    return GroundTruth(1 - truth.labels, ~truth.masks, list(reversed(truth.defect_types)))


# ----------------------------------------------------------------------------- protocol rules
def test_default_sweep_is_24_ratios_and_strict_is_one():
    assert ScoringConfig(protocol="paper").ratios == pytest.approx([0.02 * i for i in range(1, 25)])
    assert ScoringConfig().ratios == [0.3]
    assert ScoringConfig(protocol="paper").authors_double_smoothing is True
    assert ScoringConfig().authors_double_smoothing is False
    with pytest.raises(ValueError, match="paper-protocol"):
        ScoringConfig(protocol="strict", authors_double_smoothing=True)
    assert ev.parse_ratios("0.1,0.3") == [0.1, 0.3]
    with pytest.raises(ValueError):
        ev.parse_ratios("0.5:0.1:0.1")


def test_scoring_functions_take_no_labels():
    """Structure: the label-free scoring steps have no parameter that could carry ground truth."""
    for fn in (ev.score_ratio, ev.build_masks, ev.masked_ce_maps, ev.combine_maps, ev.abnormality_maps):
        params = set(inspect.signature(fn).parameters)
        assert not params & {"truth", "labels", "masks_gt", "gt"}, fn.__name__


def test_strict_never_reads_labels(setup):
    """All-wrong labels and inverted masks → identical maps and scores (only metrics change)."""
    s = setup
    cfg = ScoringConfig(protocol="strict", mask_ratio=0.3, batch_size=4)
    a = ev.evaluate_class(s["model"], s["inputs"], s["truth"], s["stats"][s["cls"]], torch.device("cpu"), cfg,
                          keep_maps=True)
    b = ev.evaluate_class(s["model"], s["inputs"], _wrong(s["truth"]), s["stats"][s["cls"]],
                          torch.device("cpu"), cfg, keep_maps=True)
    assert torch.equal(a["_maps"]["maps"], b["_maps"]["maps"])
    assert torch.equal(a["_maps"]["scores"], b["_maps"]["scores"])
    assert a["abnormality_reference"]["reference"] == "train_stats"
    assert a["abnormality_reference"]["ref_max"] == pytest.approx(s["stats"][s["cls"]]["logp_max"])
    assert a["metrics"]["image_auroc"] == pytest.approx(1 - b["metrics"]["image_auroc"], abs=1e-9)
    assert a["protocol"] == "strict" and a["mask_ratio"] == 0.3
    # the test set's own statistics are not used: its maximum differs from the training one
    assert float(s["inputs"].logp.max()) != pytest.approx(a["abnormality_reference"]["ref_max"])


def test_strict_zscore_abnormality_uses_training_mean_and_std(setup):
    """--abnormality zscore: same proposal ranking, a map from the *training* mean/std only, and
    a different score (it multiplies the cross-entropy)."""
    s = setup
    st = s["stats"][s["cls"]]
    cfg_a = ScoringConfig(protocol="strict", mask_ratio=0.3, batch_size=4)
    cfg_z = ScoringConfig(protocol="strict", mask_ratio=0.3, batch_size=4, abnormality="zscore")
    a = ev.evaluate_class(s["model"], s["inputs"], s["truth"], st, torch.device("cpu"), cfg_a, keep_maps=True)
    z = ev.evaluate_class(s["model"], s["inputs"], s["truth"], st, torch.device("cpu"), cfg_z, keep_maps=True)
    ref = z["abnormality_reference"]
    assert ref["kind"] == "zscore" and ref["reference"] == "train_stats"
    assert ref["logp_mean"] == pytest.approx(st["logp_mean"]) and ref["logp_std"] == pytest.approx(st["logp_std"])
    for p in a["_maps"]["proposal_masks"]:
        assert torch.equal(a["_maps"]["proposal_masks"][p], z["_maps"]["proposal_masks"][p])
    assert not torch.equal(a["_maps"]["scores"], z["_maps"]["scores"])
    # labels still never reach the scores
    w = ev.evaluate_class(s["model"], s["inputs"], _wrong(s["truth"]), st, torch.device("cpu"), cfg_z, keep_maps=True)
    assert torch.equal(z["_maps"]["scores"], w["_maps"]["scores"])


def test_zscore_abnormality_is_strict_only_and_needs_mean_and_std(setup):
    with pytest.raises(ValueError, match="strict-protocol option"):
        ScoringConfig(protocol="paper", abnormality="zscore")
    with pytest.raises(ValueError, match="unknown abnormality"):
        ev.abnormality_maps(setup["inputs"].logp, "strict", setup["stats"][setup["cls"]], kind="minmax")
    with pytest.raises(ValueError, match="logp_mean and logp_std"):
        ev.abnormality_maps(setup["inputs"].logp, "strict", {"logp_max": 0.0}, kind="zscore")
    # run_test checks the statistics files up front, naming the classes and the folder
    ev.check_train_stats({"a": {"logp_max": 0.0}}, ["a"], "protos")
    with pytest.raises(ValueError, match=r"logp_mean, logp_std in train_stats.json of class\(es\) \['a'\] under protos"):
        ev.check_train_stats({"a": {"logp_max": 0.0}}, ["a"], "protos", "zscore")


def test_paper_protocol_uses_labels_and_test_max(setup):
    """Counter-check: under paper the (test-label) threshold changes which images get proposals."""
    s = setup
    cfg = ScoringConfig(protocol="paper", sweep_ratios=[0.3], batch_size=4)
    a = ev.evaluate_class(s["model"], s["inputs"], s["truth"], None, torch.device("cpu"), cfg)
    assert a["abnormality_reference"]["reference"] == "test_set_max"
    assert a["abnormality_reference"]["ref_max"] == pytest.approx(float(s["inputs"].logp.max()))
    assert a["image_threshold_fitted_on"].startswith("test labels")
    assert a["n_proposal"] + a["n_random"] == len(s["inputs"])


def test_paper_sweep_bookkeeping(setup):
    s = setup
    cfg = ScoringConfig(protocol="paper", batch_size=8)
    res = ev.evaluate_class(s["model"], s["inputs"], s["truth"], None, torch.device("cpu"), cfg)
    per = res["per_ratio"]
    assert len(per) == 24 and res["mask_ratios"] == pytest.approx([0.02 * i for i in range(1, 25)])
    best_img = max(v["image_auroc"] for v in per.values())
    best_pix = max(v["pixel_auroc"] for v in per.values())
    assert res["metrics"]["image_auroc"] == best_img
    assert res["metrics"]["pixel_auroc"] == best_pix
    assert per[ev.ratio_key(res["metrics"]["image_auroc_ratio"])]["image_auroc"] == best_img
    assert per[ev.ratio_key(res["metrics"]["pixel_auroc_ratio"])]["pixel_auroc"] == best_pix
    # the per-ratio results really differ (the sweep is not 24 copies of one pass)
    assert len({v["pixel_auroc"] for v in per.values()}) > 1
    # deterministic: seeded random masks, eval mode → the same sweep twice
    again = ev.evaluate_class(s["model"], s["inputs"], s["truth"], None, torch.device("cpu"), cfg)
    assert again["per_ratio"] == per


def test_select_best_picks_each_metric_ratio():
    per = {"0.1": {"image_auroc": 0.7, "image_f1_max": 0.5, "pixel_auroc": 0.9, "pixel_ap": 0.2},
           "0.2": {"image_auroc": 0.8, "image_f1_max": 0.6, "pixel_auroc": 0.85, "pixel_ap": 0.3},
           "0.3": {"image_auroc": 0.8, "image_f1_max": 0.7, "pixel_auroc": 0.5, "pixel_ap": 0.1}}
    best = ev.select_best(per)
    assert best["image_auroc"] == 0.8 and best["image_auroc_ratio"] == 0.2  # tie → smaller ratio
    assert best["image_f1_max"] == 0.6
    assert best["pixel_auroc"] == 0.9 and best["pixel_auroc_ratio"] == 0.1 and best["pixel_ap"] == 0.2
    per["0.05"] = {"image_auroc": float("nan"), "image_f1_max": 1.0, "pixel_auroc": float("nan"), "pixel_ap": 1.0}
    assert ev.select_best(per) == best  # undefined (NaN) values never win


def test_masks_exact_counts_and_seeded_random_masks():
    from datasets.masking import mask_count

    torch.manual_seed(1)
    ab = torch.rand(6, 8, 8)
    use = torch.tensor([True, False, True, False, False, True])
    grids = {16: 4, 32: 2}
    m1 = ev.build_masks(ab, grids, 0.3, use, seed=ev.ratio_seed(0, 0.3))
    m2 = ev.build_masks(ab, grids, 0.3, use, seed=ev.ratio_seed(0, 0.3))
    m3 = ev.build_masks(ab, grids, 0.3, use, seed=ev.ratio_seed(1, 0.3))
    prop = ev.build_masks(ab, grids, 0.3, None)
    for p, g in grids.items():
        assert (m1[p].sum(1) == mask_count(g, 0.3)).all()
        assert torch.equal(m1[p], m2[p])
        assert torch.equal(m1[p][use], prop[p][use])  # selected images keep their proposal masks
    assert not torch.equal(m1[16][~use], m3[16][~use])  # another seed → other random masks
    # proposal masks are the top-k positions of the (pooled) abnormality
    pooled = F.adaptive_avg_pool2d(ab.unsqueeze(1), 4).flatten(1)
    k = mask_count(4, 0.3)
    top = pooled.topk(k, dim=1).indices
    assert torch.equal(prop[16], torch.zeros_like(prop[16]).scatter_(1, top, True))


def test_protoflow_and_tokens_computed_once_per_class(setup, synthetic_mvtec, monkeypatch):
    """A sweep repeats only the masked forward: the flow sees each image once."""
    from torch.utils.data import DataLoader

    from datasets.mvtec import MVTecTestDataset

    s = setup
    calls = {"flow": 0, "flow_images": 0, "tok": 0}
    real_flow = ev.flow_log_prob

    def spy_flow(prior, x01, protos):
        calls["flow"] += 1
        calls["flow_images"] += x01.shape[0]
        return real_flow(prior, x01, protos)

    class SpyTok(ColorTokenizer):
        def get_codebook_indices(self, x01):
            calls["tok"] += 1
            return super().get_codebook_indices(x01)

    model = s["model"]
    seen = {p: 0 for p in model.patch_sizes}
    hooks = [model.branches[str(p)].register_forward_hook(
        lambda mod, args, out, p=p: seen.__setitem__(p, seen[p] + args[0].shape[0])) for p in model.patch_sizes]
    monkeypatch.setattr(ev, "flow_log_prob", spy_flow)
    ds = MVTecTestDataset(synthetic_mvtec, [s["cls"]], input_size=SIZE)
    loader = DataLoader(ds, batch_size=4)
    inputs, truth = ev.prepare_class(s["cls"], loader, s["prior"], s["protos"][s["cls"]], SpyTok(),
                                     model.patch_sizes, torch.device("cpu"))
    cfg = ScoringConfig(protocol="paper", sweep_ratios="0.1,0.2,0.3", batch_size=4)
    ev.evaluate_class(model, inputs, truth, None, torch.device("cpu"), cfg)
    for h in hooks:
        h.remove()
    n_batches = -(-len(ds) // 4)
    assert calls["flow_images"] == len(ds) and calls["flow"] == n_batches
    assert calls["tok"] == n_batches * len(model.patch_sizes)
    assert seen == {p: 3 * len(ds) for p in model.patch_sizes}  # the only step that repeats per ratio


def test_masked_ce_matches_the_dual_model_api(setup):
    """Per-branch, token-balanced batching gives the CE of ``forward_masked_logits`` on the whole class."""
    s = setup
    model, inputs = s["model"], s["inputs"]
    torch.manual_seed(0)
    masks = ev.build_masks(torch.rand(len(inputs), 8, 8), model.grid_sizes, 0.3)
    ce = ev.masked_ce_maps(model, inputs, masks, torch.device("cpu"), batch_size=2, amp=False)
    with torch.no_grad():
        logits = model.forward_masked_logits(ev.normalize(inputs.images01(slice(None))), masks)
    for p, g in model.grid_sizes.items():
        ref = torch.zeros(len(inputs), g * g)
        ref[masks[p]] = F.cross_entropy(logits[p], inputs.tokens[p][masks[p]], reduction="none")
        assert torch.allclose(ce[p].flatten(1), ref, atol=1e-4)
        assert (ce[p].flatten(1)[~masks[p]] == 0).all() and (ce[p].flatten(1)[masks[p]] > 0).all()


def test_eval_mode_is_used(setup, synthetic_mvtec):
    """Drop path is active in train(); scoring refuses train mode and run_evaluation switches to eval()."""
    s = setup
    model = _tiny_model(drop_path_rate=0.5)
    model.load_state_dict(s["model"].state_dict())
    model.train()
    x = torch.rand(2, 3, SIZE, SIZE)
    masks = ev.build_masks(torch.rand(2, 8, 8), model.grid_sizes, 0.3)
    with torch.no_grad():
        a, b = model.forward_masked_logits(x, masks), model.forward_masked_logits(x, masks)
    assert not torch.equal(a[16], b[16])  # train mode is stochastic: the bug eval() avoids
    with pytest.raises(RuntimeError, match="eval"):
        ev.masked_ce_maps(model, s["inputs"], ev.build_masks(torch.rand(len(s["inputs"]), 8, 8),
                                                             model.grid_sizes, 0.3), torch.device("cpu"))
    cfg = ScoringConfig(batch_size=4)
    r1 = ev.run_evaluation(model, ColorTokenizer(), s["prior"], s["protos"], s["stats"], synthetic_mvtec,
                           [s["cls"]], torch.device("cpu"), cfg, SIZE, keep_maps=True)
    assert not model.training
    r2 = ev.run_evaluation(model, ColorTokenizer(), s["prior"], s["protos"], s["stats"], synthetic_mvtec,
                           [s["cls"]], torch.device("cpu"), cfg, SIZE, keep_maps=True)
    assert torch.equal(r1["per_class"][s["cls"]]["_maps"]["maps"], r2["per_class"][s["cls"]]["_maps"]["maps"])


def test_smoothing_is_a_normalised_gaussian():
    x = torch.zeros(1, 65, 65)
    x[0, 32, 32] = 1.0
    y = ev.smooth_maps(x, 4.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert y[0, 32, 32] == y.max()
    # σ = 4: the profile falls to exp(-1/2) of the peak at 4 px
    assert (y[0, 32, 36] / y[0, 32, 32]).item() == pytest.approx(np.exp(-0.5), rel=0.02)


def test_double_smoothing_keeps_image_scores():
    ab = torch.rand(3, 8, 8)
    ce = {16: torch.rand(3, 4, 4), 32: torch.rand(3, 2, 2)}
    m1, s1 = ev.combine_maps(ce, ab, SIZE, double_smoothing=False)
    m2, s2 = ev.combine_maps(ce, ab, SIZE, double_smoothing=True)
    assert torch.equal(s1, s2) and not torch.equal(m1, m2)
    assert torch.allclose(m2, ev.smooth_maps(m1))


# ----------------------------------------------------------------------------- run_test.py end to end
@pytest.fixture(scope="module")
def trained_files(setup, synthetic_train, tmp_path_factory):
    """Checkpoint (tiny model + run_info) and a fitted k-means tokenizer file, as training would leave them."""
    from datasets.imagefolder import TrainImageFolder
    from engine.checkpoint import save_checkpoint
    from engine.runinfo import run_info
    from models.kmeans_tokenizer import fit_kmeans_tokenizer

    out = tmp_path_factory.mktemp("evalrun")
    ds = TrainImageFolder(synthetic_train, setup["classes"], input_size=SIZE, use_fg_mask=False)
    from datasets.transforms import token_images

    tok = fit_kmeans_tokenizer([ds[i]["image"] for i in range(len(ds))], vocab_size=VOCAB, input_size=SIZE,
                               n_init=1, max_iter=20, token_images_fn=token_images)
    tok_path = out / "kmeans_tokenizer.pt"
    tok.save(tok_path)
    cfg = {"model": "vit_tiny_patch16_224_8k_vocab_dual", "input_size": SIZE, "vocab_size": VOCAB,
           "rel_pos_init": "resize", "embed_dim": 32, "depth": 2, "num_heads": 2, "tokenizer": "kmeans",
           "tokenizer_weight_path": str(tok_path), "setting": "multi_class", "classes": setup["classes"],
           "seed": 0}
    ckpt = out / "checkpoint-last.pth"
    save_checkpoint(ckpt, {"model": setup["model"].state_dict(), "run_info": run_info(cfg)})
    return {"ckpt": ckpt, "tok": tok_path, "out": out}


def _run(argv):
    import run_test

    return run_test.main([str(a) for a in argv])


def _base_args(setup, files, root, save):
    return ["--data_path", root, "--model_path", files["ckpt"], "--protoflow_path", setup["flow"],
            "--prototype_dir", setup["out"] / "protos", "--device", "cpu", "--num_workers", 0,
            "--batch_size", 4, "--save_path", save]


def test_run_test_strict_writes_labelled_results(setup, trained_files, synthetic_mvtec, tmp_path, capsys):
    cls = setup["classes"][:2]
    rc = _run(_base_args(setup, trained_files, synthetic_mvtec, tmp_path) + ["--classes", ",".join(cls)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["protocol"] == "strict" and "strict" in res["protocol_label"]
    assert set(res["per_class"]) == set(cls)
    for row in res["per_class"].values():
        assert row["mask_ratio"] == 0.3 and 0.0 <= row["pixel_auroc"] <= 1.0
    ri = res["run_info"]
    assert ri["checkpoint"] == str(trained_files["ckpt"]) and ri["git_commit"]
    assert ri["config"]["setting"] == "multi_class" and ri["prototypes_from"].startswith("target")
    assert ri["per_class_details"][cls[0]]["abnormality_reference"]["reference"] == "train_stats"
    assert "strict" in (tmp_path / "results.md").read_text()
    assert "strict" in (tmp_path / "results.csv").read_text()
    out = capsys.readouterr().out
    assert "| Class |" in out and str(tmp_path) in out


def test_run_test_zscore_abnormality_is_labelled_and_strict_only(setup, trained_files, synthetic_mvtec,
                                                                  tmp_path, capsys):
    cls = setup["classes"][0]
    rc = _run(_base_args(setup, trained_files, synthetic_mvtec, tmp_path)
              + ["--class_name", cls, "--mask_ratio", "0.1", "--abnormality", "zscore"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert "z-score" in res["protocol_label"] and "z-score" in (tmp_path / "results.md").read_text()
    assert res["run_info"]["config"]["scoring"]["abnormality"] == "zscore"
    assert res["run_info"]["per_class_details"][cls]["abnormality_reference"]["kind"] == "zscore"
    rc = _run(_base_args(setup, trained_files, synthetic_mvtec, tmp_path / "p")
              + ["--class_name", cls, "--protocol", "paper", "--abnormality", "zscore"])
    assert rc == 2 and "strict-protocol option" in capsys.readouterr().err
    assert not (tmp_path / "p" / "results.json").exists()


def test_run_test_paper_sweep_and_vis(setup, trained_files, synthetic_mvtec, tmp_path):
    cls = setup["classes"][0]
    rc = _run(_base_args(setup, trained_files, synthetic_mvtec, tmp_path)
              + ["--class_name", cls, "--protocol", "paper", "--sweep_ratios", "0.1:0.3:0.1", "--vis"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["protocol"] == "paper" and "paper" in res["protocol_label"]
    det = res["run_info"]["per_class_details"][cls]
    assert sorted(det["per_ratio"]) == ["0.1", "0.2", "0.3"]
    row = res["per_class"][cls]
    assert row["pixel_auroc"] == max(v["pixel_auroc"] for v in det["per_ratio"].values())
    assert row["pixel_auroc_ratio"] in (0.1, 0.2, 0.3)
    assert det["abnormality_reference"]["reference"] == "test_set_max"
    assert res["run_info"]["config"]["authors_double_smoothing"] is True
    assert (tmp_path / "panels" / f"{cls}.png").is_file() and (tmp_path / "roc_curves.png").is_file()


@pytest.mark.parametrize("what", ["checkpoint", "flow", "prototypes", "class", "train_stats"])
def test_missing_inputs_give_clear_errors(what, setup, trained_files, synthetic_mvtec, tmp_path, capsys):
    import shutil

    args = _base_args(setup, trained_files, synthetic_mvtec, tmp_path / "res")
    cls = setup["classes"][0]
    extra = ["--class_name", cls]
    expect = []
    if what == "checkpoint":
        args[args.index("--model_path") + 1] = tmp_path / "nope.pth"
        expect = ["nope.pth", "run_pretraining.py"]
    elif what == "flow":
        args[args.index("--protoflow_path") + 1] = tmp_path / "noflow.pth"
        expect = ["noflow.pth", "protoflow"]
    elif what in ("prototypes", "train_stats"):
        protos = tmp_path / "protos"
        shutil.copytree(setup["out"] / "protos", protos)
        victim = protos / cls / ("coreset.npy" if what == "prototypes" else "train_stats.json")
        victim.unlink()
        args[args.index("--prototype_dir") + 1] = protos
        expect = [cls, victim.name]
    else:
        extra = ["--class_name", "no_such_class"]
        expect = ["no_such_class"]
    assert _run(args + extra) == 2
    err = capsys.readouterr().err
    for e in expect:
        assert e in err, (e, err)
    assert not (tmp_path / "res" / "results.json").exists()


# ----------------------------------------------------------------------------- does it detect anything?
def test_tiny_trained_setup_ranks_defect_pixels_higher(setup, trained_files, synthetic_mvtec, synthetic_train):
    """A few MIM steps on normal images + the fitted tiny prior: pixel AUROC clearly above chance.

    Measured on the fixture data (4 classes, strict, ratio 0.3): mean pixel AUROC 0.697
    (0.658 with the untrained model, 0.710 after 40 epochs; ProtoFlow alone ≈ 0.67)
    (printed). The bound 0.6 keeps a margin above chance (0.5) and below the measured value.
    """
    from torch.utils.data import DataLoader

    from datasets.imagefolder import TrainImageFolder
    from datasets.masking import random_masks
    from datasets.transforms import normalize, token_images
    from models.tokenizers import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("kmeans", trained_files["tok"])
    model = _tiny_model()
    ds = TrainImageFolder(synthetic_train, setup["classes"], input_size=SIZE, use_fg_mask=False)
    loader = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(20):  # 20 epochs × 4 batches of normal images
        for batch in loader:
            x = batch["image"]
            masks = {p: random_masks(x.shape[0], g, 0.4, gen) for p, g in model.grid_sizes.items()}
            with torch.no_grad():
                tokens = {p: tok.get_codebook_indices(token_images(x, p)).flatten(1) for p in masks}
            logits = model(normalize(x), masks)["logits"]
            loss = sum(F.cross_entropy(logits[p], tokens[p][masks[p]]) for p in masks)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    res = ev.run_evaluation(model, tok, setup["prior"], setup["protos"], setup["stats"], synthetic_mvtec,
                            setup["classes"], torch.device("cpu"), ScoringConfig(batch_size=8), SIZE)
    per_class = {c: r["metrics"]["pixel_auroc"] for c, r in res["per_class"].items()}
    mean = float(np.mean(list(per_class.values())))
    print(f"\n[tiny trained setup] pixel AUROC per class {per_class}, mean {mean:.3f}")
    assert mean > 0.6


@pytest.mark.slow  # three fresh Python processes (torch/timm imports): ~20 s each on a busy 2-core machine
def test_shell_scripts_wire_run_test(setup, trained_files, synthetic_mvtec, tmp_path):
    """scripts/test_{multi,cross}_class.sh pass their env vars through to run_test.py."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DATA_PATH": str(synthetic_mvtec), "PROTOTYPE_DIR": str(setup["out"] / "protos"), "DEVICE": "cpu",
           "OMP_NUM_THREADS": "1"}
    extra = ["--num_workers", "0", "--batch_size", "4"]
    multi = {**env, "MODEL_PATH": str(trained_files["ckpt"]), "PROTOFLOW_PATH": str(setup["flow"]),
             "SAVE_PATH": str(tmp_path / "multi")}
    r = subprocess.run(["bash", str(repo / "scripts" / "test_multi_class.sh"), "--classes", setup["classes"][0],
                        *extra], env=multi, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "multi" / "results.json").read_text())["protocol"] == "strict"
    cross = {**env, "MODEL_PATH_TEX2OBJ": str(trained_files["ckpt"]), "MODEL_PATH_OBJ2TEX": str(trained_files["ckpt"]),
             "PROTOFLOW_TEX2OBJ": str(setup["flow"]), "PROTOFLOW_OBJ2TEX": str(setup["flow"]),
             "PROTOCOL": "paper", "SAVE_PATH": str(tmp_path / "cross")}
    r = subprocess.run(["bash", str(repo / "scripts" / "test_cross_class.sh"), "--sweep_ratios", "0.2,0.4", *extra],
                       env=cross, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((synthetic_mvtec / "dataset_info.json").read_text())
    for setting, tested in (("texture_to_obj", info["objects"]), ("obj_to_texture", info["textures"])):
        res = json.loads((tmp_path / "cross" / setting / "results.json").read_text())
        assert res["protocol"] == "paper" and sorted(res["per_class"]) == sorted(tested)
