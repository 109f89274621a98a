"""The transfer-init benchmark's report, from the committed mix_to_mix run records (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "transfer_init.py"


def test_plain_variant_reproduces_the_experiment_reports_seed0_scores(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--variants", "plain", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True)
    assert "plain" in out.stdout
    for name in ("results.md", "results.json", "curves.png", "runs/seed0/plain/metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    res = json.loads((tmp_path / "results.json").read_text())
    exp = json.loads((ROOT / "results/mix_to_mix/results.json").read_text())
    scores = exp["phases"]["transfer"]["scores"]
    for label, theirs in [("plain", "agnostic-s4 (transfer)"),
                          ("specific (transfer)", "specific (transfer)"),
                          ("agnostic-s4 (scratch)", "agnostic-s4 (scratch)")]:
        assert res["rows"][label]["seeds"] == [0]
        for env in res["envs"]:
            assert res["rows"][label][env]["final"] == pytest.approx(
                scores[theirs][env]["final"]["returns"][0]), env
    wins = res["wins"]["plain"]
    assert set(wins) == {"seeds", "specific (transfer)", "agnostic-s4 (scratch)"}
    for against, theirs in [("specific (transfer)", "specific (transfer)"),
                            ("agnostic-s4 (scratch)", "agnostic-s4 (scratch)")]:
        expected = sum(scores["agnostic-s4 (transfer)"][e]["final"]["returns"][0]
                       >= scores[theirs][e]["final"]["returns"][0] for e in res["envs"])
        assert wins[against] == {"mean": expected, "per_seed": [expected]}
