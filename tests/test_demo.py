"""The README's main job: scripts/demo.sh end to end (DEMO_FAST=1 smoke version) and its stage checks."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from engine.demo import main as demo_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_fast_runs_end_to_end_and_skips_finished_stages(tmp_path):
    env = {**os.environ, "DEMO_FAST": "1", "DEMO_OUT": str(tmp_path / "out"),
           "DEMO_DATA": str(tmp_path / "data"), "DEMO_THREADS": "2"}
    run = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = tmp_path / "out" / "report.md"
    assert report.exists()
    text = report.read_text()
    for setting in ("obj_to_texture", "multi_class"):
        res = json.loads((tmp_path / "out" / setting / "results" / "results.json").read_text())
        assert res["protocol"] == "strict"
        assert res["per_class"] and all(0.0 <= row["pixel_auroc"] <= 1.0 for row in res["per_class"].values())
        assert f"{setting}/results/roc_curves.png" in text
    assert "Protocol: strict" in run.stdout and "Demo report:" in run.stdout
    # objects→textures is tested on the textures only
    o2t = json.loads((tmp_path / "out" / "obj_to_texture" / "results" / "results.json").read_text())
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    assert sorted(o2t["per_class"]) == sorted(info["textures"])

    again = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("already done") >= 10
    assert "Demo report:" in again.stdout


def test_stage_checks_reject_missing_and_corrupt_outputs(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-last.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    assert demo_main(["check", "trainrun", str(ckpt.parent)]) == 1
    assert demo_main(["check", "results", str(tmp_path / "nothing")]) == 1
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "results.json").write_text(json.dumps({"per_class": {}, "protocol": "strict"}))
    assert demo_main(["check", "results", str(tmp_path / "res")]) == 1
    (tmp_path / "res" / "results.json").write_text(json.dumps({"per_class": {"a": {}}, "protocol": "strict"}))
    assert demo_main(["check", "results", str(tmp_path / "res")]) == 0
