"""The network benchmark still runs: one small row end to end in a subprocess (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "network.py"


def test_one_row_reports_every_field():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--one", "64", "HalfCheetah", "--seconds", "0.2",
         "--minibatch", "32", "--max-activation", str(32 * 17 * 64 // 2)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    row = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("ROW "))[4:])
    assert row["micro_batch"] == 16  # the activation budget split the minibatch in two
    for key in ("train_samples_per_s", "mfu", "act_ms_b8", "act_ms_b64", "peak_rss_gb",
                "matmul_gflops", "flops_per_sample"):
        assert row[key] > 0, key
    assert row["params"] == 589_824  # NetworkConfig(d_model=64): the same for any env
