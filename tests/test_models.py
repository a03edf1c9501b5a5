"""Tests for the MIM ViT backbone, the dual-branch model and BEiT checkpoint loading."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed, resize_rel_pos_bias_table

from models import (
    DualBranchMIM,
    MIMVisionTransformer,
    create_model,
    list_models,
    load_beit_checkpoint,
)

FIXTURES = Path(__file__).parent / "fixtures"
BEIT_CKPT = FIXTURES / "beit_pt22k_tiny.pth"
BEIT_IO = FIXTURES / "beit_pt22k_tiny_io.pt"
FIXTURE_CFG = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}  # config of the tiny BEiT fixture
SMALL = {
    "embed_dim": 24,
    "depth": 2,
    "num_heads": 2,
    "vocab_size": 50,
    "img_size": 64,
}  # fast CPU tests

SINGLE = [n for n in list_models() if not n.endswith("_dual")]
DUAL = [n for n in list_models() if n.endswith("_dual")]


@pytest.fixture(scope="module")
def beit_io():
    return torch.load(BEIT_IO, weights_only=True)


def _masks(batch, n, density, gen):
    """Exactly round(density*n) masked positions per row."""
    k = round(density * n)
    idx = torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :k]
    m = torch.zeros(batch, n, dtype=torch.bool)
    m.scatter_(1, idx, True)
    return m


def test_registry_names():
    for size in ("tiny", "small", "base", "large"):
        assert f"vit_{size}_patch16_224_8k_vocab" in SINGLE
        assert f"vit_{size}_patch16_224_8k_vocab_dual" in DUAL
    with pytest.raises(KeyError, match="unknown model"):
        create_model("vit_nope")
    with pytest.raises(TypeError):
        create_model("vit_tiny_patch16_224_8k_vocab", rel_pos_init="zeros")


@pytest.mark.parametrize(
    "name", ["vit_base_patch16_224_8k_vocab", "vit_large_patch16_224_8k_vocab"]
)
def test_full_size_configs_on_meta(name):
    with torch.device("meta"):
        m = create_model(name)
    dim, depth = {"base": (768, 12), "large": (1024, 24)}[name.split("_")[1]]
    assert m.embed_dim == dim and len(m.blocks) == depth and m.grid_size == 14
    # The real pt22k checkpoint has 15 keys per block + 9 others + relative_position_index.
    assert len(m.state_dict()) == 15 * depth + 9
    assert m.lm_head.out_features == 8192


@pytest.mark.parametrize("name", SINGLE)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_single_forward_shapes(name, density):
    torch.manual_seed(0)
    m = create_model(name, **SMALL).eval()
    assert isinstance(m, MIMVisionTransformer) and m.grid_size == 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    mask = _masks(2, 16, density, g)
    with torch.no_grad():
        logits = m(x, mask)
        all_logits = m(x, mask, return_all_tokens=True)
        tokens, emb = m.forward_features(x, mask)
    assert logits.shape == (int(mask.sum()), 50)
    assert all_logits.shape == (2, 16, 50)
    assert tokens.shape == emb.shape == (2, 16, 24)
    # masked logits = all-token logits picked in batch-major raster order
    torch.testing.assert_close(logits, all_logits[mask])
    # masked embeddings are exactly the mask token, others the patch embedding
    assert torch.equal(emb[mask], m.mask_token[0].expand(int(mask.sum()), -1))
    with torch.no_grad():
        assert torch.allclose(emb[~mask], m.patch_embed(x)[~mask])


def test_mask_validation():
    m = create_model("vit_tiny_patch16_224_8k_vocab", **SMALL)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(TypeError, match="bool"):
        m(x, torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(1, 16\)"):
        m(x, torch.zeros(1, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match="required"):
        m(x, None)


@pytest.mark.parametrize("name", SINGLE)
def test_single_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    m = create_model(name, **SMALL).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=g)
    mask = _masks(2, 16, 0.5, g)
    logits = m(x, mask)
    F.cross_entropy(
        logits, torch.randint(0, 50, (logits.shape[0],), generator=g)
    ).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224_8k_vocab", **SMALL, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    mask = _masks(2, 16, 0.5, torch.Generator().manual_seed(0))
    m(x, mask).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x, mask).square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_no_weight_decay_names_exist():
    m = create_model("vit_tiny_patch16_224_8k_vocab", **SMALL)
    names = dict(m.named_parameters())
    assert m.no_weight_decay() <= set(names)
    assert {"cls_token", "mask_token"} <= m.no_weight_decay()
    d = create_model("vit_tiny_patch16_224_8k_vocab_dual", **SMALL)
    assert d.no_weight_decay() <= set(dict(d.named_parameters()))
    assert (
        "branches.32.rel_pos_bias.relative_position_bias_table" in d.no_weight_decay()
    )


def test_drop_path_only_in_train():
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224_8k_vocab", **SMALL, drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    mask = _masks(4, 16, 0.3, torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x, mask), m(x, mask))
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(x, mask), m(x, mask))


# --------------------------------------------------------------------------- dual branch


@pytest.mark.parametrize("name", DUAL)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_dual_forward_shapes(name, density):
    torch.manual_seed(0)
    m = create_model(name, **SMALL).eval()
    assert isinstance(m, DualBranchMIM)
    assert m.patch_sizes == (16, 32) and m.grid_sizes == {16: 4, 32: 2}
    assert set(m.branches) == {"16", "32"} and m.head.in_features == 4 * 24
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 64, generator=g)
    masks = {16: _masks(2, 16, density, g), 32: _masks(2, 4, density, g)}
    with torch.no_grad():
        out = m(x, masks)
        scored = m.forward_masked_logits(x, masks)
    for p in (16, 32):
        assert out["logits"][p].shape == (int(masks[p].sum()), 50)
        assert out["proj"][p].shape == (2, 128)
        torch.testing.assert_close(scored[p], out["logits"][p])


def test_dual_224_shapes_and_pooling():
    torch.manual_seed(0)
    m = create_model(
        "vit_tiny_patch16_224_8k_vocab_dual",
        embed_dim=16,
        depth=1,
        num_heads=2,
        vocab_size=20,
    ).eval()
    assert m.grid_sizes == {16: 14, 32: 7} and m.head.in_features == 49 * 16
    x = torch.randn(1, 3, 224, 224)
    masks = {
        16: _masks(1, 196, 0.3, torch.Generator()),
        32: _masks(1, 49, 0.3, torch.Generator()),
    }
    with torch.no_grad():
        out = m(x, masks, consistency_on="encoder")
        _tokens, emb = m.branches["16"].forward_features(x, masks[16])
        # branch-16 grid is 2x2 average pooled to the 7x7 grid, flattened token-major
        pooled = emb.reshape(1, 7, 2, 7, 2, 16).mean(dim=(2, 4)).reshape(1, -1)
        torch.testing.assert_close(m._pooled(emb, 16), pooled)
        out_e = m(x, masks, consistency_on="embed")
        torch.testing.assert_close(out_e["proj"][16], m.head(pooled))
    assert out["logits"][16].shape == (59, 20) and out["logits"][32].shape == (15, 20)
    assert not torch.allclose(out["proj"][16], out_e["proj"][16])
    with pytest.raises(ValueError, match="consistency_on"):
        m(x, masks, consistency_on="tokens")
    with pytest.raises(KeyError, match="missing"):
        m(x, {16: masks[16]})
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("vit_tiny_patch16_224_8k_vocab_dual", img_size=80)


@pytest.mark.parametrize("consistency_on", ["embed", "encoder"])
def test_dual_backward_reaches_both_branches_and_head(consistency_on):
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224_8k_vocab_dual", **SMALL).train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 64, generator=g)
    masks = {16: _masks(2, 16, 0.5, g), 32: _masks(2, 4, 0.5, g)}
    out = m(x, masks, consistency_on=consistency_on)
    loss = 1 - F.cosine_similarity(out["proj"][16], out["proj"][32]).mean()
    for p in (16, 32):
        loss = loss + F.cross_entropy(
            out["logits"][p],
            torch.randint(0, 50, (out["logits"][p].shape[0],), generator=g),
        )
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("rel_pos_init", ["resize", "zeros"])
def test_dual_branches_share_init(rel_pos_init):
    torch.manual_seed(0)
    m = create_model(
        "vit_tiny_patch16_224_8k_vocab_dual", **SMALL, rel_pos_init=rel_pos_init
    )
    b16, b32 = m.branches["16"], m.branches["32"]
    torch.testing.assert_close(
        b32.patch_embed.proj.weight,
        resample_patch_embed(b16.patch_embed.proj.weight.detach(), [32, 32]),
    )
    for k, v in b16.state_dict().items():
        if not k.startswith(("patch_embed.proj.weight", "rel_pos_bias")):
            assert torch.equal(v, b32.state_dict()[k]), k


# --------------------------------------------------------------------------- BEiT checkpoint


def test_beit_fixture_patch16(beit_io):
    m = create_model("vit_base_patch16_224_8k_vocab", **FIXTURE_CFG).eval()
    report = load_beit_checkpoint(m, BEIT_CKPT, verbose=False)
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == 39
    with torch.no_grad():
        logits = m(beit_io["image"], beit_io["mask16"])
        all_logits = m(beit_io["image"], beit_io["mask16"], return_all_tokens=True)
    torch.testing.assert_close(
        logits[:, :512], beit_io["logits16_masked_first512"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        logits.logsumexp(-1), beit_io["lse16_masked"], atol=1e-4, rtol=0
    )
    assert torch.equal(logits.argmax(-1), beit_io["argmax16_masked"])
    assert torch.equal(all_logits.argmax(-1), beit_io["argmax16_all"])
    torch.testing.assert_close(
        all_logits.logsumexp(-1), beit_io["lse16_all"], atol=1e-4, rtol=0
    )


def test_beit_fixture_dual_authors_way(beit_io, capsys):
    m = create_model(
        "vit_base_patch16_224_8k_vocab_dual", **FIXTURE_CFG, rel_pos_init="zeros"
    ).eval()
    report = load_beit_checkpoint(m, BEIT_CKPT)
    assert "head.weight" in capsys.readouterr().out  # the report is printed
    assert (
        sorted(report.missing) == ["head.bias", "head.weight"]
        and report.unexpected == []
    )
    b32 = m.branches["32"]
    torch.testing.assert_close(
        b32.patch_embed.proj.weight, beit_io["patch_embed32_weight"], atol=1e-6, rtol=0
    )
    assert torch.equal(
        b32.rel_pos_bias.relative_position_bias_table, beit_io["rel_pos_bias_table32"]
    )
    masks = {16: beit_io["mask16"], 32: beit_io["mask32"]}
    with torch.no_grad():
        logits = m.forward_masked_logits(beit_io["image"], masks)
        _, emb32 = b32.forward_features(beit_io["image"], beit_io["mask32"])
        all32 = b32(beit_io["image"], beit_io["mask32"], return_all_tokens=True)
    torch.testing.assert_close(
        logits[16][:, :512], beit_io["logits16_masked_first512"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        logits[32][:, :512], beit_io["logits32_masked_first512"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        logits[32].logsumexp(-1), beit_io["lse32_masked"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        all32.logsumexp(-1), beit_io["lse32_all"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(emb32, beit_io["x_decoder32"], atol=1e-5, rtol=0)


def test_beit_dual_resize_rel_pos(beit_io):
    m = create_model(
        "vit_base_patch16_224_8k_vocab_dual", **FIXTURE_CFG
    )  # rel_pos_init="resize"
    load_beit_checkpoint(m, BEIT_CKPT, verbose=False)
    table16 = torch.load(BEIT_CKPT, weights_only=True)["model"][
        "rel_pos_bias.relative_position_bias_table"
    ]
    got = m.branches["32"].rel_pos_bias.relative_position_bias_table.detach()
    want = resize_rel_pos_bias_table(
        table16, (7, 7), (172, 2), old_window_size=(14, 14)
    )
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0
    assert torch.equal(
        m.branches["16"].rel_pos_bias.relative_position_bias_table.detach(), table16
    )
    # the 3 cls-related entries are carried over unchanged
    assert torch.equal(got[-3:], table16[-3:])


def _tiny_sd():
    return torch.load(BEIT_CKPT, weights_only=True)["model"]


@pytest.mark.parametrize("wrap", ["module", "plain"])
def test_beit_checkpoint_wrappers(tmp_path, wrap):
    sd = _tiny_sd()
    path = tmp_path / "ckpt.pth"
    torch.save({"module": sd} if wrap == "module" else sd, path)
    m = create_model("vit_base_patch16_224_8k_vocab", **FIXTURE_CFG)
    report = load_beit_checkpoint(m, path, verbose=False)
    assert len(report.loaded) == 39
    assert torch.equal(m.lm_head.weight.detach(), sd["lm_head.weight"])


def test_beit_checkpoint_shape_mismatch(tmp_path):
    sd = _tiny_sd()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    m = create_model("vit_base_patch16_224_8k_vocab", **FIXTURE_CFG)
    with pytest.raises(
        ValueError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(100, 32\).*\(128, 32\)"
    ):
        load_beit_checkpoint(m, path, verbose=False)


def test_beit_checkpoint_missing_and_unexpected(tmp_path):
    sd = _tiny_sd()
    del sd["norm.weight"], sd["blocks.0.gamma_1"]
    sd["decoder.extra"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save({"model": sd}, path)
    m = create_model("vit_base_patch16_224_8k_vocab", **FIXTURE_CFG)
    report = load_beit_checkpoint(m, path, verbose=False)
    assert sorted(report.missing) == ["blocks.0.gamma_1", "norm.weight"]
    assert report.unexpected == ["decoder.extra"]
    assert "norm.weight" in str(report)


def test_beit_checkpoint_missing_file_and_bad_content(tmp_path):
    m = create_model("vit_base_patch16_224_8k_vocab", **FIXTURE_CFG)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*weights/README\.md"):
        load_beit_checkpoint(m, missing)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pth"):
        load_beit_checkpoint(m, bad)
    notsd = tmp_path / "list.pth"
    torch.save([1, 2], notsd)
    with pytest.raises(ValueError, match="state dict"):
        load_beit_checkpoint(m, notsd)


def test_pi_resize_preserves_patch_tokens():
    """FlexiViT: <resize(x), PI-resize(w)> ≈ <x, w> for an upsampled patch."""
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224_8k_vocab_dual", **SMALL)
    w16 = m.branches["16"].patch_embed.proj.weight.detach()
    w32 = m.branches["32"].patch_embed.proj.weight.detach()
    x = torch.randn(5, 3, 16, 16)
    x_up = F.interpolate(
        x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False
    )
    ref = torch.einsum("nchw,dchw->nd", x, w16)
    got = torch.einsum("nchw,dchw->nd", x_up, w32)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # a naive (non-PI) bicubic resize of the kernel does not have this property
    naive = F.interpolate(w16, size=(32, 32), mode="bicubic", align_corners=False)
    assert not torch.allclose(
        torch.einsum("nchw,dchw->nd", x_up, naive), ref, atol=1e-2
    )


def test_bf16_autocast_close_to_fp32(beit_io):
    m = create_model("vit_base_patch16_224_8k_vocab_dual", **FIXTURE_CFG).eval()
    load_beit_checkpoint(m, BEIT_CKPT, verbose=False)
    masks = {16: beit_io["mask16"], 32: beit_io["mask32"]}
    with torch.no_grad():
        ref = m(beit_io["image"], masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(beit_io["image"], masks)
    for kind in ("logits", "proj"):
        for p in (16, 32):
            a, b = got[kind][p].float(), ref[kind][p]
            assert torch.isfinite(a).all()
            rel = (a - b).norm() / b.norm()
            assert rel < 0.02, (kind, p, float(rel))


def test_beit_checkpoint_other_input_size_resizes_table():
    m = create_model("vit_base_patch16_224_8k_vocab", **FIXTURE_CFG, img_size=128)
    report = load_beit_checkpoint(m, BEIT_CKPT, verbose=False)
    assert report.missing == [] and any("14x14 -> 8x8" in n for n in report.notes)
    table = m.rel_pos_bias.relative_position_bias_table
    assert table.shape == (15 * 15 + 3, 2) and table.abs().sum() > 0
    with torch.no_grad():
        out = m(torch.randn(1, 3, 128, 128), None, return_all_tokens=True)
    assert out.shape == (1, 64, 8192) and torch.isfinite(out).all()
