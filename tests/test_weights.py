"""Weight-file verification (engine.weights) and scripts/download_weights.sh with file:// URLs."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.weights import main as verify_main

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"


def test_verify_accepts_the_real_formats(capsys):
    assert verify_main(["beit", str(FIX / "beit_pt22k_tiny.pth")]) == 0
    assert verify_main(["dall-e", str(FIX / "dalle_encoder_tiny.pkl")]) == 0
    assert "BEiT checkpoint (dim 32, depth 2, heads 2)" in capsys.readouterr().out


def test_verify_rejects_wrong_files(tmp_path, capsys):
    assert verify_main(["beit", str(FIX / "dalle_encoder_tiny.pkl")]) == 1
    missing = tmp_path / "nope.pth"
    assert verify_main(["dall-e", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_download_script_fetches_skips_and_quarantines(tmp_path):
    env = {**os.environ, "WEIGHTS_DIR": str(tmp_path / "w"),
           "BEIT_URL": (FIX / "beit_pt22k_tiny.pth").as_uri(),
           "DALLE_URL": (FIX / "beit_pt22k_tiny.pth").as_uri()}  # wrong file on purpose
    run = subprocess.run(["bash", "scripts/download_weights.sh", "beit", "dall-e"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 1, run.stdout + run.stderr
    assert (tmp_path / "w" / "beit_pt22k_tiny.pth").exists() is False
    beit = tmp_path / "w" / "beit_base_patch16_224_pt22k.pth"
    assert beit.stat().st_size == (FIX / "beit_pt22k_tiny.pth").stat().st_size
    bad = tmp_path / "w" / "dall_e_tokenizer_weight" / "encoder.pkl.bad"
    assert bad.exists() and not bad.with_suffix("").exists()
    # second run: the existing valid file is not fetched again
    env["BEIT_URL"] = (tmp_path / "does-not-exist.pth").as_uri()
    run = subprocess.run(["bash", "scripts/download_weights.sh", "beit"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not downloading again" in run.stdout
