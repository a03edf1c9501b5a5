"""Tokenizers: the dVAE re-implementation against the real pickled-module format, the
allow-list unpickler against malicious files, the k-means stand-in, build_tokenizer."""

from __future__ import annotations

import os
import pickle
import sys
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from models import dalle
from models.dalle import Encoder, allow_list_load, load_dalle_encoder, map_pixels
from models.kmeans_tokenizer import KMeansTokenizer, fit_kmeans_tokenizer
from models.tokenizers import Tokenizer, build_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
PKL = FIXTURES / "dalle_encoder_tiny.pkl"


@pytest.fixture(scope="module")
def io_ref():
    return torch.load(FIXTURES / "dalle_encoder_tiny_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_encoder():
    return load_dalle_encoder(PKL)


def assert_matches_reference(enc: Encoder, io_ref) -> None:
    for size, grid in ((112, 14), (56, 7)):
        tokens = enc.get_codebook_indices(io_ref[f"raw_{size}"])
        assert tokens.dtype == torch.int64 and tokens.shape == (2, grid, grid)
        assert torch.equal(tokens, io_ref[f"tokens_{size}"])
        with torch.no_grad():
            logits = enc(io_ref[f"input_{size}"])
        assert logits.shape == (2, 8192, grid, grid)
        assert torch.equal(logits.argmax(1), io_ref[f"tokens_{size}"])
        torch.testing.assert_close(
            logits[:, :64], io_ref[f"logits_{size}_first64"], atol=1e-4, rtol=0
        )


# ------------------------------------------------------------------------- dVAE
def test_map_pixels_matches_reference(io_ref):
    torch.testing.assert_close(
        map_pixels(io_ref["raw_112"]), io_ref["input_112"], atol=1e-7, rtol=0
    )
    assert map_pixels(torch.zeros(1)).item() == pytest.approx(0.1)
    assert map_pixels(torch.ones(1)).item() == pytest.approx(0.9)


def test_fixture_pickle_loads_and_reproduces_tokens(tiny_encoder, io_ref):
    enc = tiny_encoder
    assert isinstance(enc, Encoder) and not enc.training
    assert (enc.n_hid, enc.n_blk_per_group, enc.group_count, enc.vocab_size) == (
        16,
        2,
        4,
        8192,
    )
    assert enc.vocab_size == 8192 and enc.downsample == 8
    assert all(not p.requires_grad for p in enc.parameters())
    assert_matches_reference(enc, io_ref)


def test_module_tree_and_parameter_names_match_official(tiny_encoder):
    names = dict(tiny_encoder.named_parameters())
    assert names["blocks.input.w"].shape == (16, 3, 7, 7)
    assert names["blocks.group_1.block_1.res_path.conv_1.w"].shape == (4, 16, 3, 3)
    assert names["blocks.group_2.block_1.id_path.w"].shape == (32, 16, 1, 1)
    assert "blocks.group_1.block_1.id_path.w" not in names  # identity where in == out
    assert names["blocks.group_4.block_2.res_path.conv_4.b"].shape == (128,)
    assert names["blocks.output.conv.w"].shape == (8192, 128, 1, 1)
    mods = dict(tiny_encoder.named_modules())
    assert (
        isinstance(mods["blocks.group_3.pool"], nn.MaxPool2d)
        and "blocks.group_4.pool" not in mods
    )
    assert all(n.endswith((".w", ".b")) for n in names)


def test_random_full_size_encoder_shapes():
    enc = Encoder()  # official size: 53.8 M parameters
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(53.8e6, rel=0.01)
    small = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32)
    assert small.get_codebook_indices(torch.rand(1, 3, 40, 40)).shape == (1, 5, 5)
    with pytest.raises(ValueError, match="multiples of 8"):
        small(torch.rand(1, 3, 36, 36))


@contextmanager
def registered_as_dall_e():
    """Pretend our classes are dall_e's so torch.save writes the official global names."""
    classes = {
        "dall_e.encoder": [dalle.Encoder, dalle.EncoderBlock],
        "dall_e.utils": [dalle.Conv2d],
    }
    saved = {c: c.__module__ for cs in classes.values() for c in cs}
    added = []
    try:
        for modname, cs in [("dall_e", []), *classes.items()]:
            mod = types.ModuleType(modname)
            for c in cs:
                setattr(mod, c.__name__, c)
                c.__module__ = modname
            sys.modules[modname] = mod
            added.append(modname)
        yield
    finally:
        for c, m in saved.items():
            c.__module__ = m
        for m in added:
            sys.modules.pop(m, None)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_resaved_pickled_module_loads_identically(
    tmp_path, tiny_encoder, io_ref, zip_format
):
    path = tmp_path / "encoder.pkl"
    with registered_as_dall_e(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy save: "couldn't retrieve source code"
        torch.save(tiny_encoder, path, _use_new_zipfile_serialization=zip_format)
    assert b"dall_e.encoder" in path.read_bytes() or zip_format
    assert __import__("zipfile").is_zipfile(path) == zip_format
    enc = load_dalle_encoder(path)
    assert enc is not tiny_encoder
    assert_matches_reference(enc, io_ref)


def test_allow_list_unpickler_returns_inert_records():
    root = allow_list_load(PKL)
    # no module code ran; tensors are copied into a fresh Encoder later
    assert not isinstance(root, nn.Module)
    assert type(root).__name__ == "_EncoderRecord" and root.state["n_hid"] == 16


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _evil_payloads(marker: Path):
    yield "bare", _Evil(marker)
    yield "dict", {"blocks.input.w": torch.zeros(1), "x": _Evil(marker)}
    enc = Encoder(n_hid=4, n_blk_per_group=1, vocab_size=8)
    enc.payload = _Evil(marker)  # hidden inside an otherwise valid encoder
    yield "nested", enc


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    for name, payload in _evil_payloads(marker):
        path = tmp_path / f"{name}.pkl"
        with registered_as_dall_e(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
        for load in (allow_list_load, load_dalle_encoder):
            with pytest.raises(pickle.UnpicklingError) as err:
                load(path)
            assert str(path) in str(err.value) and "system" in str(err.value), name
        assert not marker.exists(), f"payload {name} ran"


def test_unlisted_but_harmless_global_is_refused(tmp_path):
    path = tmp_path / "other.pkl"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(pickle.UnpicklingError, match="torch.nn.modules.linear.Linear"):
        load_dalle_encoder(path)


def test_state_dict_round_trip(tmp_path, tiny_encoder, io_ref):
    path = tmp_path / "encoder_sd.pt"
    torch.save(tiny_encoder.state_dict(), path)
    assert_matches_reference(load_dalle_encoder(path), io_ref)
    safetensors = pytest.importorskip("safetensors.torch")  # a timm dependency
    st = tmp_path / "encoder.safetensors"
    safetensors.save_file(
        {k: v.contiguous() for k, v in tiny_encoder.state_dict().items()}, str(st)
    )
    enc = load_dalle_encoder(st)
    assert torch.equal(enc.get_codebook_indices(io_ref["raw_56"]), io_ref["tokens_56"])


def test_state_dict_errors_name_file_and_key(tmp_path, tiny_encoder):
    sd = dict(tiny_encoder.state_dict())
    sd["blocks.group_2.block_1.res_path.conv_2.w"] = torch.zeros(8, 8, 5, 5)
    bad = tmp_path / "bad_shape.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"bad_shape\.pt.*conv_2\.w"):
        load_dalle_encoder(bad)
    sd = dict(tiny_encoder.state_dict())
    del sd["blocks.group_3.block_2.res_path.conv_1.b"]
    missing = tmp_path / "missing_key.pt"
    torch.save(sd, missing)
    with pytest.raises(ValueError, match=r"missing_key\.pt.*conv_1\.b"):
        load_dalle_encoder(missing)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises((ValueError, pickle.UnpicklingError), match="garbage.pkl"):
        load_dalle_encoder(garbage)


def test_missing_dalle_file_points_to_weights_readme(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl.*weights/README\.md"):
        load_dalle_encoder(tmp_path / "nope.pkl")


# ----------------------------------------------------------------------- k-means
def _stretch(x01: torch.Tensor, patch: int) -> torch.Tensor:
    """Local stand-in for datasets.transforms.token_images (size rule: S·8/patch)."""
    t = x01.shape[-1] * 8 // patch
    return torch.nn.functional.interpolate(
        x01, size=(t, t), mode="bilinear", align_corners=False
    )


def _images(n: int = 6, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # per-image colour + noise + a bright square
    base = torch.rand(n, 3, 1, 1, generator=g)
    x = (base + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    x[:, :, 8:24, 8:24] = 1.0
    return list(x.split(2))


@pytest.fixture(scope="module")
def kmeans_tok():
    return fit_kmeans_tokenizer(
        _images(),
        vocab_size=16,
        input_size=64,
        max_patches=80,
        seed=0,
        n_init=1,
        max_iter=20,
        token_images_fn=_stretch,
    )


def test_kmeans_grid_sizes_and_range(kmeans_tok):
    assert (
        isinstance(kmeans_tok, Tokenizer)
        and kmeans_tok.vocab_size == 16
        and kmeans_tok.downsample == 8
    )
    for size, grid in ((112, 14), (56, 7)):
        ids = kmeans_tok.get_codebook_indices(torch.rand(3, 3, size, size))
        assert ids.dtype == torch.int64 and ids.shape == (3, grid, grid)
        assert int(ids.min()) >= 0 and int(ids.max()) < 16
    assert kmeans_tok.info["n_patches_used"] == 80 < kmeans_tok.info["n_patches_seen"]
    # Centroids are means of pixel patches: back in pixel space they must lie in [0,1]
    # (catches fit/inference disagreeing on the channel layout of the standardisation).
    pix = kmeans_tok.codebook.view(16, 3, 64) * kmeans_tok.std.view(1, 3, 1)
    pix = pix + kmeans_tok.mean.view(1, 3, 1)
    assert pix.min() > -1e-4 and pix.max() < 1 + 1e-4
    from models import kmeans_tokenizer

    assert (
        "STAND-IN" in kmeans_tokenizer.__doc__ and "stand-in" in kmeans_tok.info["note"]
    )


def test_kmeans_tokens_are_informative(kmeans_tok):
    # Uniform patches of clearly different colours must not share a token.
    colours = (
        torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
        .view(2, 3, 1, 1)
        .expand(2, 3, 8, 8)
    )
    ids = kmeans_tok.get_codebook_indices(colours.contiguous()).flatten()
    assert ids[0] != ids[1]


def test_kmeans_nearest_centroid_is_exact(kmeans_tok):
    x = torch.rand(1, 3, 16, 16)
    feats = dalle_free_features(x, kmeans_tok)
    brute = ((feats[:, None] - kmeans_tok.codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(kmeans_tok.get_codebook_indices(x).flatten(), brute)


def dalle_free_features(x, tok):
    from models.kmeans_tokenizer import patch_features

    return patch_features(x, tok.mean, tok.std)


def test_kmeans_save_load_round_trip(tmp_path, kmeans_tok):
    path = tmp_path / "kmeans.pt"
    kmeans_tok.save(path, run_info={"seed": 0, "git_commit": "abc"})
    loaded = KMeansTokenizer.load(path)
    x = torch.rand(2, 3, 112, 112)
    assert torch.equal(
        loaded.get_codebook_indices(x), kmeans_tok.get_codebook_indices(x)
    )
    assert loaded.run_info["git_commit"] == "abc" and loaded.info == kmeans_tok.info
    assert set(torch.load(path, weights_only=True)) >= {
        "codebook",
        "mean",
        "std",
        "format",
    }
    built = build_tokenizer("kmeans", path)
    assert not built.training and torch.equal(
        built.get_codebook_indices(x), loaded.get_codebook_indices(x)
    )


def test_kmeans_fit_is_deterministic_and_seed_dependent(kmeans_tok):
    kw = {
        "vocab_size": 16,
        "input_size": 64,
        "max_patches": 80,
        "n_init": 1,
        "max_iter": 20,
        "token_images_fn": _stretch,
    }
    again = fit_kmeans_tokenizer(_images(), seed=0, **kw)
    assert torch.equal(again.codebook, kmeans_tok.codebook)
    other = fit_kmeans_tokenizer(_images(), seed=1, **kw)
    assert not torch.equal(other.codebook, kmeans_tok.codebook)


def test_kmeans_fit_accepts_dataset_dicts_and_the_project_token_images():
    from datasets.transforms import token_images

    batches = [{"image": x, "class_name": "a"} for x in _images(n=4)]
    tok = fit_kmeans_tokenizer(
        batches, vocab_size=8, input_size=64, seed=0, n_init=1, max_iter=5, token_images_fn=token_images
    )
    # 64 px input → 32 px (patch 16) and 16 px (patch 32) token images: 4×4 + 2×2 patches each
    assert tok.info["n_patches_seen"] == 4 * (16 + 4)
    with pytest.raises(ValueError, match="3×64×64"):
        fit_kmeans_tokenizer([torch.rand(1, 3, 32, 32)], vocab_size=8, input_size=64, token_images_fn=_stretch)
    with pytest.raises(ValueError, match="smaller vocab_size"):
        fit_kmeans_tokenizer(
            _images(n=2), vocab_size=512, input_size=64, token_images_fn=_stretch
        )


def test_kmeans_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_pretraining.py kmeans_tokenizer"):
        KMeansTokenizer.load(tmp_path / "none.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt.pt"):
        KMeansTokenizer.load(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"codebook": torch.zeros(4, 192)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a CDVM k-means"):
        KMeansTokenizer.load(foreign)
    wrong = tmp_path / "wrong.pt"
    torch.save(
        {
            "format": "cdvm-kmeans-tokenizer",
            "version": 1,
            "patch": 8,
            "vocab_size": 4,
            "codebook": torch.zeros(4, 100),
            "mean": torch.zeros(3),
            "std": torch.ones(3),
        },
        wrong,
    )
    with pytest.raises(ValueError, match=r"wrong\.pt.*K×192"):
        KMeansTokenizer.load(wrong)


# ---------------------------------------------------------------- build_tokenizer
def test_build_tokenizer_dalle(tmp_path, io_ref):
    tok = build_tokenizer("dall-e", PKL)
    assert isinstance(tok, Tokenizer) and not tok.training
    assert not any(p.requires_grad for p in tok.parameters())
    assert torch.equal(
        tok.get_codebook_indices(io_ref["raw_112"]), io_ref["tokens_112"]
    )
    with pytest.warns(RuntimeWarning, match="RANDOMLY INITIALISED"):
        rnd = build_tokenizer("dall-e", None, n_hid=8, n_blk_per_group=1, vocab_size=64)
    assert rnd.get_codebook_indices(torch.rand(1, 3, 56, 56)).shape == (1, 7, 7)


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'vqgan'"):
        build_tokenizer("vqgan")
    with pytest.raises(ValueError, match="fit_kmeans_tokenizer"):
        build_tokenizer("kmeans", None)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_tokenizer("kmeans", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="weights/README.md"):
        build_tokenizer("dall-e", tmp_path / "encoder.pkl")


def test_mixed_precision_setting_keeps_cpu_exact(io_ref):
    enc = load_dalle_encoder(PKL, mixed_precision=torch.bfloat16)
    assert (
        enc.mixed_precision == torch.bfloat16
        and enc.blocks.output.conv.use_float16 is False
    )
    assert_matches_reference(enc, io_ref)  # reduced precision applies on CUDA only
    with pytest.raises(ValueError, match="mixed_precision"):
        enc.set_mixed_precision(torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_cuda_tokens(io_ref, dtype):
    enc = build_tokenizer("dall-e", PKL, device="cuda", mixed_precision=dtype)
    tokens = enc.get_codebook_indices(io_ref["raw_112"].cuda()).cpu()
    agree = (tokens == io_ref["tokens_112"]).float().mean().item()
    assert agree == 1.0 if dtype is None else agree > 0.9
