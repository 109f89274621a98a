"""Compiled CPU kernels and allocator tuning on vs off, side by side (rl_agnostic/nn/native.py).

Runs `benchmarks/network.py`'s PPO training row (minibatch 512, paper layer counts, dropout 0.1,
separate actor and critic) in fresh processes, alternating "on" (the default) and "off"
(RL_AGNOSTIC_NATIVE=0 RL_AGNOSTIC_MALLOC_TUNING=0: every compiled kernel replaced by its torch
path, numpy-mask dropout, glibc's default allocator) for several rounds, and reports the median
samples/s of each and their ratio. Writes results/kernels.md and results/kernels.json.

    python benchmarks/kernels.py                  # d_model 64: CartPole, HalfCheetah, Humanoid
    python benchmarks/kernels.py --rows 256:CartPole --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import network  # benchmarks/network.py: its training row, run in a fresh process

RESULTS = network.RESULTS
OFF = {"RL_AGNOSTIC_NATIVE": "0", "RL_AGNOSTIC_MALLOC_TUNING": "0"}


def measure(d_model: int, env: str, seconds: float, off: bool) -> float:
    row = network.measure_in_subprocess(d_model, env, seconds, extra_env=OFF if off else None)
    return row["train_samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["64:CartPole", "64:HalfCheetah", "64:Humanoid"],
                        help="D_MODEL:ENV rows (envs of benchmarks/network.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per run")
    args = parser.parse_args()

    load = os.getloadavg()
    table = []
    for row in args.rows:
        d, env = row.split(":")
        runs: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(args.rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for which in order:
                runs[which].append(measure(int(d), env, args.seconds, which == "off"))
            print(f"d{d} {env:<12} round {r + 1}: on {runs['on'][-1]:8.1f}  "
                  f"off {runs['off'][-1]:8.1f} samples/s", flush=True)
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        table.append({"d_model": int(d), "env": env, "on": on, "off": off, "speedup": on / off,
                      "runs_on": runs["on"], "runs_off": runs["off"]})
        print(f"d{d} {env:<12} median on {on:.1f}  off {off:.1f}  ×{on / off:.2f}", flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.json").write_text(json.dumps({"rows": table, "load_before": load},
                                                     indent=2) + "\n")
    lines = [
        "# Compiled CPU kernels and allocator tuning: on vs off",
        "",
        (f"PPO training samples/s of `benchmarks/network.py` rows (minibatch 512, dropout 0.1), "
         f"{args.rounds} alternating rounds of fresh processes, {args.seconds:g} s windows, "
         f"medians; {os.cpu_count()} cores, load average before {load[0]:.2f}. *off* = "
         "`RL_AGNOSTIC_NATIVE=0 RL_AGNOSTIC_MALLOC_TUNING=0`: the torch paths of the S4 kernel, "
         "convolution, attention, residual LayerNorm and GELU, numpy-mask dropout, glibc's default "
         "allocator."),
        "",
        "| d_model | env | on | off | speed-up | runs on | runs off |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(f"| {t['d_model']} | {t['env']} | {t['on']:.1f} | {t['off']:.1f} | "
                     f"**{t['speedup']:.2f}×** | {', '.join(f'{v:.0f}' for v in t['runs_on'])} | "
                     f"{', '.join(f'{v:.0f}' for v in t['runs_off'])} |")
    lines += ["", "Reproduce: `python benchmarks/kernels.py` (writes this file and kernels.json)."]
    (RESULTS / "kernels.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'kernels.md'}, kernels.json")


if __name__ == "__main__":
    main()
