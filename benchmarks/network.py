"""Speed, memory and MFU of the agnostic network on this machine (issue: foundation/network).

For (obs, act) = CartPole (4, 2 discrete), HalfCheetah (17, 6), Humanoid (376, 17) at d_model 64
and 256 (paper layer counts, separate actor and critic, dropout 0.1 in training as in the paper):

- PPO-style train samples/s at minibatch 512: actor log-prob + entropy + value, clipped PPO loss,
  backward, grad-norm clip 0.5, Adam (the clip folded into fused Adam's step,
  `rl_agnostic.nn.optim.clipped_step`), with subnormal floats flushed to zero, as the learners run
  (`rl_agnostic.nn.native.flush_denormals`). A minibatch is processed in micro-batches of at most
  ``--max-activation`` (samples × observation length × d_model) with gradient accumulation: the
  same gradient, with memory bounded for long observations (only Humanoid is split).
- act latency at batch 8 and 64 (eval mode, actor forward + sampling, median of repeats),
- peak RSS of a fresh process running that configuration,
- analytic FLOPs per trained sample (`rl_agnostic.nn.flops`, counted as in shared/mfu.md) and
  MFU = FLOPs/sample × samples/s ÷ the 2048² fp32 matmul rate measured in the same process.

Each configuration runs in its own subprocess (so its peak RSS is its own). Results go to
``results/network.md``, ``results/network.json`` and ``results/network.png``. Every full run is
also appended to ``results/network_runs.json`` (CPU, commit, matmul rate, each row's figures), and
network.md checks issue 2's targets on each CPU at the median of that CPU's recorded runs: MFU is a
ratio to the machine's own matmul rate, so a CPU whose big products are relatively faster than its
memory-bound work (the 375 GFLOP/s Xeon) gives a lower MFU than one where they are not.

    python benchmarks/network.py                 # full table (~15 min on 2 cores)
    python benchmarks/network.py --quick         # d_model 64 only, shorter timings
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"

ENVS = {
    "CartPole": ("CartPole-v1", 4, "discrete", 2),
    "HalfCheetah": ("HalfCheetah-v4", 17, "continuous", 6),
    "Humanoid": ("Humanoid-v4", 376, "continuous", 17),
}
# The paper implementation on this kind of machine (issue table): train samples/s, act ms (b=8).
PAPER = {
    (256, "CartPole"): (489, 44), (256, "HalfCheetah"): (105, 95), (256, "Humanoid"): (None, 1500),
    (64, "CartPole"): (2117, 28), (64, "HalfCheetah"): (555, 51), (64, "Humanoid"): (14.5, 490),
}
# The fp32 matmul rate of the machine the PAPER figures were measured on (issue 2).
PAPER_MACHINE_GFLOPS = 82
# Issue 2's targets: (what, d_model, env, key, bound, "≥" or "≤").
TARGETS = [
    *[("MFU", 256, env, "mfu", 0.6, "≥") for env in ("CartPole", "HalfCheetah", "Humanoid")],
    *[("train samples/s", 64, env, "train_samples_per_s", bound, "≥")
      for env, bound in (("CartPole", 8500), ("HalfCheetah", 2200), ("Humanoid", 60))],
    *[("act ms, batch 8", 64, env, "act_ms_b8", bound, "≤")
      for env, bound in (("CartPole", 3), ("HalfCheetah", 5), ("Humanoid", 60))],
    ("peak RSS GB", 256, "Humanoid", "peak_rss_gb", 6, "≤"),
]
RUNS = RESULTS / "network_runs.json"
# The figures of a row that network.json's "rows" and network_runs.json keep.
ROW_KEYS = ("d_model", "env", "train_samples_per_s", "mfu", "act_ms_b8", "act_ms_b64",
            "peak_rss_gb")
# Paper Fig. 2's 16 environments (obs, action) for parameter counts; gymnasium v4/v3 shapes.
MIX16 = [
    ("Acrobot-v1", 6, "discrete", 3), ("BipedalWalker-v3", 24, "continuous", 4),
    ("CartPole-v1", 4, "discrete", 2), ("LunarLander-v3", 8, "discrete", 4),
    ("LunarLanderContinuous-v3", 8, "continuous", 2), ("MountainCarContinuous-v0", 2, "continuous", 1),
    ("Ant-v4", 27, "continuous", 8), ("HalfCheetah-v4", 17, "continuous", 6),
    ("Hopper-v4", 11, "continuous", 3), ("Humanoid-v4", 376, "continuous", 17),
    ("HumanoidStandup-v4", 376, "continuous", 17), ("InvertedDoublePendulum-v4", 11, "continuous", 1),
    ("InvertedPendulum-v4", 4, "continuous", 1), ("Reacher-v4", 10, "continuous", 2),
    ("Swimmer-v4", 8, "continuous", 2), ("Walker2d-v4", 17, "continuous", 6),
]


def make_spec(env_id: str, obs: int, kind: str, act: int):
    from rl_agnostic.envs.spec import EnvSpec

    if kind == "discrete":
        return EnvSpec(env_id, obs, kind, act)
    return EnvSpec(env_id, obs, kind, act, (-1.0,) * act, (1.0,) * act)


def matmul_gflops(seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform's processor string)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(d_model: int, env: str, minibatch: int, seconds: float, max_activation: int) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    import torch

    from rl_agnostic.nn import flops
    from rl_agnostic.nn.agnostic import AgnosticActorCritic
    from rl_agnostic.nn.config import NetworkConfig
    from rl_agnostic.nn.optim import clipped_step, make_optimizer
    from rl_agnostic.nn.native import flush_denormals
    from rl_agnostic.nn.s4 import shared_s4_operators

    flushed = flush_denormals()  # as the learners do
    torch.manual_seed(0)
    spec = make_spec(*ENVS[env])
    cfg = NetworkConfig(d_model=d_model)
    net = AgnosticActorCritic(cfg, [spec])
    opt = make_optimizer(net)  # paper lrs: actor 3e-4, critic 5e-4; S4 group 1e-3
    obs = torch.randn(minibatch, spec.obs_dim)
    actions = (torch.randint(0, spec.action_dim, (minibatch,)) if spec.is_discrete
               else torch.randn(minibatch, spec.action_dim) * 0.3)
    old_logp = torch.randn(minibatch) * 0.1 - 1.0
    adv = torch.randn(minibatch)
    returns = torch.randn(minibatch)
    chunk = max(1, min(minibatch, max_activation // (spec.obs_dim * d_model)))

    def train_step() -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        with shared_s4_operators(net):  # S4 operators built once for all micro-batches
            for lo in range(0, minibatch, chunk):
                sl = slice(lo, lo + chunk)
                dist, value = net.actor_critic(obs[sl], spec)
                logp = net.log_prob(spec, dist, actions[sl])
                ratio = torch.exp(logp - old_logp[sl])
                pg = -torch.min(ratio * adv[sl], ratio.clamp(0.8, 1.2) * adv[sl]).sum()
                vf = 0.5 * (value - returns[sl]).square().sum()
                ent = net.entropy(spec, dist).sum()
                ((pg + vf - 0.0 * ent) / minibatch).backward()
        clipped_step(opt, 0.5)  # grad-norm clip 0.5 folded into fused Adam, as the learners

    rate_before = matmul_gflops()
    train_step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < 1 or time.perf_counter() - t0 < seconds:
        train_step()
        n += 1
    samples_per_s = n * minibatch / (time.perf_counter() - t0)
    rate_after = matmul_gflops()
    rate = (rate_before + rate_after) / 2

    act_ms = {}
    net.eval()
    for batch in (8, 64):
        x = torch.randn(batch, spec.obs_dim)
        times = []
        with torch.inference_mode():
            for _ in range(3):
                net.sample(spec, net.actor(x, spec))
            t_end = time.perf_counter() + min(seconds, 5.0)
            while len(times) < 5 or time.perf_counter() < t_end:
                t = time.perf_counter()
                net.sample(spec, net.actor(x, spec))
                times.append(time.perf_counter() - t)
                if len(times) >= 200:
                    break
        times.sort()
        act_ms[batch] = 1e3 * times[len(times) // 2]

    flops_per_sample = flops.ppo_train_step(cfg, spec)
    return {
        "d_model": d_model,
        "env": env,
        "obs_dim": spec.obs_dim,
        "act_dim": spec.action_dim,
        "train_samples_per_s": samples_per_s,
        "train_steps_timed": n,
        "micro_batch": chunk,
        "flops_per_sample": flops_per_sample,
        "matmul_gflops": rate,
        "mfu": flops_per_sample * samples_per_s / (rate * 1e9),
        "act_ms_b8": act_ms[8],
        "act_ms_b64": act_ms[64],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "threads": torch.get_num_threads(),
        "flush_denormal_threads": flushed,
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "params": sum(p.numel() for p in net.parameters()),
    }


def measure_in_subprocess(d_model: int, env: str, seconds: float, minibatch: int = 512,
                          max_activation: int = 2**22, extra_env: dict | None = None) -> dict:
    """`run_one` in a fresh process (its own peak RSS; ``extra_env`` added to its environment)."""
    cmd = [sys.executable, __file__, "--one", str(d_model), env, "--seconds", str(seconds),
           "--minibatch", str(minibatch), "--max-activation", str(max_activation)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**os.environ, **(extra_env or {})})
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
    if out.returncode != 0 or not line:
        sys.exit(f"benchmark row d={d_model} {env} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][4:])


def param_counts() -> dict:
    from rl_agnostic.nn import build_actor_critic
    from rl_agnostic.nn.config import NetworkConfig

    cfg = NetworkConfig.cpu()
    specs = [make_spec(*e) for e in MIX16]
    out: dict[str, dict[str, int]] = {}
    for kind in ("agnostic", "specific", "padded"):
        out[kind] = {}
        for n in (1, 8, 16):
            net = build_actor_critic(kind, cfg, specs[:n])
            out[kind][str(n)] = sum(p.numel() for p in net.parameters())
    return out


def checkout_commit() -> str:
    """The measured code's commit, ``-dirty`` when tracked files outside results/ differ from it
    (results/ changes with every run); "unknown" outside a git checkout."""
    def git(*args: str) -> str | None:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             check=False)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return commit + ("-dirty" if changed else "")


def recorded_runs() -> list[dict]:
    """The full runs in ``network_runs.json`` (none before the first)."""
    return json.loads(RUNS.read_text()) if RUNS.exists() else []


def mean_matmul_rate(rows: list[dict]) -> float:
    """GFLOP/s: the mean of the rows' own matmul rates (each measured beside its row)."""
    return sum(r["matmul_gflops"] for r in rows) / len(rows)


def record_run(rows: list[dict], load: tuple[float, float, float]) -> list[dict]:
    """Append this full run to ``network_runs.json`` (written atomically); all recorded runs."""
    runs = recorded_runs()
    runs.append({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": checkout_commit(),
        "cpu": rows[0]["cpu"],
        "cpu_capability": rows[0]["cpu_capability"],
        "threads": rows[0]["threads"],
        "matmul_gflops": mean_matmul_rate(rows),
        "load_average": load[0],
        "rows": [{k: r[k] for k in ROW_KEYS} for r in rows],
    })
    tmp = RUNS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1) + "\n")
    os.replace(tmp, RUNS)
    return runs


def _short(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def runs_section(runs: list[dict]) -> list[str]:
    """Markdown: every recorded full run, and issue 2's targets per CPU at its runs' median."""
    if not runs:
        return []

    def value(run: dict, d_model: int, env: str, key: str) -> float | None:
        return next((r[key] for r in run["rows"] if r["d_model"] == d_model and r["env"] == env),
                    None)

    envs = list(ENVS)
    lines = ["", "## Recorded full runs (`results/network_runs.json`)", "",
             "| date | commit | CPU | matmul GFLOP/s | MFU d256 " + " / ".join(envs)
             + " | samples/s d64 " + " / ".join(envs) + " | act ms b8 d64 " + " / ".join(envs)
             + " |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        cells = []
        for d_model, key, fmt in ((256, "mfu", "{:.3f}"), (64, "train_samples_per_s", "{:,.0f}"),
                                  (64, "act_ms_b8", "{:.2f}")):
            vals = [value(run, d_model, env, key) for env in envs]
            cells.append(" / ".join("–" if v is None else fmt.format(v) for v in vals))
        lines.append(f"| {run['date']} | {run['commit']} | {run['cpu']} "
                     f"| {run['matmul_gflops']:.0f} | " + " | ".join(cells) + " |")

    cpus = list(dict.fromkeys(run["cpu"] for run in runs))
    lines += ["", "Issue 2's targets on each CPU, at the median of its recorded runs (✓ met, "
              "✗ not; in brackets the runs' range):", "",
              "| target | " + " | ".join(
                  f"{cpu} (runs: {sum(r['cpu'] == cpu for r in runs)})" for cpu in cpus) + " |",
              "|---|" + "---|" * len(cpus)]
    for what, d_model, env, key, bound, op in TARGETS:
        cells = []
        for cpu in cpus:
            vals = [v for run in runs if run["cpu"] == cpu
                    if (v := value(run, d_model, env, key)) is not None]
            if not vals:
                cells.append("–")
                continue
            med = statistics.median(vals)
            ok = med >= bound if op == "≥" else med <= bound
            spread = f" ({_short(min(vals))}–{_short(max(vals))})" if len(vals) > 1 else ""
            cells.append(f"{'✓' if ok else '✗'} {_short(med)}{spread}")
        lines.append(f"| {what}, d_model {d_model}, {env} {op} {bound} | " + " | ".join(cells)
                     + " |")
    return lines


def write_results(rows: list[dict], params: dict, load: tuple[float, float, float],
                  runs: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    rate = mean_matmul_rate(rows)
    (RESULTS / "network.json").write_text(json.dumps({
        "rows": [{k: r[k] for k in ROW_KEYS} for r in rows],
        "params": params,
        "matmul_gflops": rate,
        "details": rows,
        "load_average": load,
    }, indent=2))

    lines = [
        "# Agnostic network: speed on CPU",
        "",
        f"Machine: {rows[0]['cpu']} ({rows[0]['cpu_capability']} kernels), {os.cpu_count()} "
        f"cores, torch threads {rows[0]['threads']}, fp32 2048² matmul rate {rate:.0f} GFLOP/s "
        "(mean of the per-row measurements, taken in the same process as each row), load average "
        f"before the run {load[0]:.2f}. Paper layer counts (2 S4 + 2 Transformer layers per block, "
        "residual MLP depth 2), every width = d_model, separate actor and critic, dropout 0.1 "
        "active in training, subnormal floats flushed to zero (as in the learners). PPO minibatch "
        "512.",
        "",
        "The *paper impl.* column is the issue's measurement of the paper's code on a 2-core "
        f"machine with an fp32 matmul rate of about {PAPER_MACHINE_GFLOPS} GFLOP/s, not "
        "re-measured here: on a faster CPU, *× paper* overstates the gain by up to the ratio of "
        "the two matmul rates. MFU is the figure that compares across machines.",
        "",
        "| d_model | env (obs, act) | train samples/s | paper impl. | × paper | MFU | matmul GFLOP/s"
        " | GFLOP/sample | act ms b8 | act ms b64 | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper_sps, _ = PAPER[(r["d_model"], r["env"])]
        ratio = f"{r['train_samples_per_s'] / paper_sps:.1f}×" if paper_sps else "—"
        lines.append(
            f"| {r['d_model']} | {r['env']} ({r['obs_dim']}, {r['act_dim']}) "
            f"| {r['train_samples_per_s']:.1f} | {paper_sps or 'OOM'} | {ratio} | {r['mfu']:.2f} "
            f"| {r['matmul_gflops']:.0f} | {r['flops_per_sample'] / 1e9:.3f} "
            f"| {r['act_ms_b8']:.2f} | {r['act_ms_b64']:.2f} | {r['peak_rss_gb']:.2f} |"
        )
    lines += ["", "## Parameter counts (d_model 64) for 1, 8 and 16 environments (paper Fig. 2 set)",
              "", "| agent | 1 env | 8 envs | 16 envs |", "|---|---|---|---|"]
    for kind, counts in params.items():
        lines.append(f"| {kind} | {counts['1']:,} | {counts['8']:,} | {counts['16']:,} |")
    lines += runs_section(runs)
    lines += ["", "Reproduce: `python benchmarks/network.py` (writes this file, network.json and "
              "network.png, and appends a full run to network_runs.json)."]
    (RESULTS / "network.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, d in zip(axes, (64, 256)):
        sub = [r for r in rows if r["d_model"] == d]
        if not sub:
            ax.set_visible(False)
            continue
        xs = range(len(sub))
        ours = [r["train_samples_per_s"] for r in sub]
        paper = [PAPER[(d, r["env"])][0] or 0 for r in sub]
        ax.bar([x - 0.2 for x in xs], paper, 0.4, label="paper implementation")
        ax.bar([x + 0.2 for x in xs], ours, 0.4, label="rl_agnostic")
        ax.set_xticks(list(xs), [r["env"] for r in sub])
        ax.set_yscale("log")
        ax.set_title(f"PPO train samples/s, d_model {d}, minibatch 512")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "network.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="d_model 64 only, 3 s per timing")
    parser.add_argument("--seconds", type=float, default=8.0, help="timing window per row")
    parser.add_argument("--minibatch", type=int, default=512)
    parser.add_argument("--max-activation", type=int, default=2**22,
                        help="max samples × obs length × d_model per micro-batch (memory bound)")
    parser.add_argument("--one", nargs=2, metavar=("D_MODEL", "ENV"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        row = run_one(int(args.one[0]), args.one[1], args.minibatch, args.seconds,
                      args.max_activation)
        print("ROW " + json.dumps(row))
        return

    load = os.getloadavg()
    d_models = (64,) if args.quick else (64, 256)
    seconds = 3.0 if args.quick else args.seconds
    rows = []
    print(f"{'d':>4} {'env':<12} {'samples/s':>10} {'MFU':>5} {'act b8':>8} {'act b64':>8} "
          f"{'RSS GB':>7}", flush=True)
    for d in d_models:
        for env in ENVS:
            r = measure_in_subprocess(d, env, seconds, args.minibatch, args.max_activation)
            rows.append(r)
            print(f"{d:>4} {env:<12} {r['train_samples_per_s']:>10.1f} {r['mfu']:>5.2f} "
                  f"{r['act_ms_b8']:>8.2f} {r['act_ms_b64']:>8.2f} {r['peak_rss_gb']:>7.2f}",
                  flush=True)
    params = param_counts()
    for kind, counts in params.items():
        print(f"params {kind:<9} 1: {counts['1']:>10,}  8: {counts['8']:>10,}  16: {counts['16']:>10,}")
    if args.quick:  # not recorded: it times d_model 64 alone, in shorter windows
        runs = recorded_runs()
    else:
        runs = record_run(rows, load)
    write_results(rows, params, load, runs)
    print(f"wrote {RESULTS / 'network.md'}, network.json, network.png")


if __name__ == "__main__":
    main()
