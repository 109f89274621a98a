"""How the agnostic agent's transfer starts: weight-initialization variants on `mix_to_mix`.

`mix_to_mix` (cpu scale) transfers the agnostic S4 agent by copying every pretrained weight. This
benchmark re-runs that transfer phase for ONE seed with other starts, all from the same
pretrained checkpoint and with the committed transfer run's config otherwise unchanged:

- ``plain``: every weight copied (the experiment's own transfer; its committed run record is
  used, since pretraining and transfer are deterministic for a seed, unless ``--rerun-plain``);
- ``critic-reset``: the critic (``critic_trunk``, ``value_decoder``) keeps its fresh init
  (``run.transfer_reinit``): a critic fitted to the pretraining envs' returns gives the new
  envs' first advantages a state-dependent bias;
- ``shrink-0.5``: every weight 0.5·pretrained + 0.5·fresh init (``run.transfer_shrink``, Ash &
  Adams' shrink-and-perturb warm start), against the loss of plasticity of trained weights;
- ``lr-2x``: every weight copied, the three learning rates doubled;
- ``shrink-0.5+lr-2x``: both;
- ``shrink-0.5+lr-2x+std-reset``: as ``shrink-0.5+lr-2x``, with the Gaussian log-std decoder
  fresh (``run.transfer_reinit``), so every new continuous env starts at σ = 1 as a fresh
  decoder would: the pretrained one starts the new envs with less exploration (LunarLander-
  Continuous's initial policy entropy 1.99 vs 2.85 from scratch, Walker2d's 7.04 vs 8.56), while
  the specific agent's new envs always get fresh decoders, log-std included;
- ``scratch``, ``specific+plain``: the experiment's own agnostic scratch and specific transfer
  runs, re-trained (to re-draw the whole comparison on another machine, with ``plain`` and
  ``--rerun-plain``);
- ``scratch+lr-2x``: NO transfer, fresh weights at the doubled learning rates (the scratch
  baseline of the ``lr-2x`` variants);
- ``specific+shrink-0.5+lr-2x``: the SPECIFIC agent's transfer with the same start (its own
  pretraining re-run; its new envs' encoder/decoder layers are fresh in any case): is the
  agnostic agent's gain over the specific one the start's, available to both?

Scores as in the experiment report (`rl_agnostic.experiments.report`): *final* = mean training
return over the last 10 % of iterations, normalized with the experiment's committed random and
reference scores, compared per env with the committed specific-agent transfer and agnostic
scratch runs, on the mean over the seeds both have. ``auc`` = mean return over all iterations
(less noisy than final). A variant picked as the best of several on one seed needs another seed
to count: the report shows each seed.

Writes ``results/transfer_init/{results.md,results.json,curves.png}`` over every seed with run
records, which are kept (config.yaml, metrics.jsonl) under
``results/transfer_init/runs/seed<k>/<variant>/``.

    python benchmarks/transfer_init.py                      # seed 0: pretrain ~10 min + ~11 min per variant
    python benchmarks/transfer_init.py --pretrained DIR     # reuse an agnostic-s4 pretrain run
    python benchmarks/transfer_init.py --report-only        # tables and plot from the records
    python benchmarks/transfer_init.py --env-steps 100000 --variants plain specific+plain scratch \
        --baselines scratch specific+plain --out results/transfer_init/budget-100k
                                                            # the same starts at another budget
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from rl_agnostic.experiments.report import final_score, load_curves, normalize

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "results" / "mix_to_mix"
OUT = ROOT / "results" / "transfer_init"
CRITIC = ["critic_trunk", "value_decoder"]
LR_2X = {"actor_lr": 6e-4, "critic_lr": 1e-3, "ssm_lr": 2e-3}  # the paper's three lrs doubled
VARIANTS: dict[str, dict] = {
    "plain": {},
    "critic-reset": {"run": {"transfer_reinit": CRITIC}},
    "shrink-0.5": {"run": {"transfer_shrink": 0.5}},
    "lr-2x": {"ppo": LR_2X},
    "shrink-0.5+lr-2x": {"run": {"transfer_shrink": 0.5}, "ppo": LR_2X},
    "shrink-0.5+lr-2x+std-reset": {"run": {"transfer_shrink": 0.5,
                                           "transfer_reinit": ["log_std_decoder"]},
                                   "ppo": LR_2X},
    "scratch+lr-2x": {"ppo": LR_2X},
    "scratch": {},
    "specific+plain": {},
    "specific+shrink-0.5+lr-2x": {"run": {"transfer_shrink": 0.5}, "ppo": LR_2X},
}
# The agent a variant trains (default the agnostic S4 agent): its mix_to_mix run names.
AGENTS = {"agnostic": ("agnostic-s4", "agnostic-s4_transfer"),
          "specific": ("specific", "specific_transfer")}
# Trained from a fresh init (is a variant's gain the learning rate's alone?).
SCRATCH = {"scratch+lr-2x", "scratch"}
# Variants that are baselines: the agnostic variants are compared with them, not ranked.
BASELINE_VARIANTS = ["scratch+lr-2x", "specific+shrink-0.5+lr-2x"]
COMPARED = {"specific (transfer)": "specific_transfer", "agnostic-s4 (scratch)": "agnostic-s4_scratch"}
FINAL_FRACTION = 0.1


def committed_run(seed: int, phase: str, name: str) -> Path:
    return EXPERIMENT / "runs" / phase / f"seed{seed}" / name


def agent_of(variant: str) -> str:
    return "specific" if variant.startswith("specific+") else "agnostic"


def variant_config(seed: int, variant: str, work: Path, env_steps: int | None = None) -> dict:
    """The committed transfer run's config with the variant's changes (and, given ``env_steps``,
    that budget per new env instead of the experiment's)."""
    cfg = yaml.safe_load((committed_run(seed, "transfer", AGENTS[agent_of(variant)][1])
                          / "config.yaml").read_text())
    cfg["name"] = variant
    cfg["run"]["output_dir"] = str(work / "transfer")
    if env_steps is not None:
        cfg["run"]["env_steps_per_env"] = env_steps
    for section, values in VARIANTS[variant].items():
        cfg[section] = {**cfg[section], **values}
    return cfg


def pretrain(seed: int, work: Path, agent: str = "agnostic") -> Path:
    from rl_agnostic.online.config import TrainConfig
    from rl_agnostic.online.trainer import train

    cfg = yaml.safe_load((committed_run(seed, "pretrain", AGENTS[agent][0])
                          / "config.yaml").read_text())
    cfg["run"]["output_dir"] = str(work / "pretrain")
    train(TrainConfig.from_dict(cfg, source="pretrain config"))
    return work / "pretrain" / cfg["name"]


def run_variants(seed: int, variants: list[str], pretrained: Path | None, work: Path,
                 rerun_plain: bool, out: Path = OUT,
                 pretrained_specific: Path | None = None, env_steps: int | None = None) -> None:
    from rl_agnostic.online.config import TrainConfig
    from rl_agnostic.online.trainer import train

    records = out / "runs" / f"seed{seed}"
    pretrained_by_agent = {"agnostic": pretrained, "specific": pretrained_specific}
    for variant in variants:
        agent = agent_of(variant)
        dest = records / variant
        if (dest / "metrics.jsonl").is_file():
            print(f"{variant}: run record exists in {dest}, skipped")
            continue
        dest.mkdir(parents=True, exist_ok=True)
        if variant == "plain" and not rerun_plain and env_steps is None:
            src = committed_run(seed, "transfer", "agnostic-s4_transfer")
            _copy_record(src, dest)
            print(f"plain: the committed transfer run {src} (deterministic for a seed)")
            continue
        if pretrained_by_agent.get(agent) is None and variant not in SCRATCH:
            pretrained_by_agent[agent] = pretrain(seed, work, agent)
        start = None if variant in SCRATCH else str(pretrained_by_agent[agent])
        cfg = TrainConfig.from_dict(variant_config(seed, variant, work, env_steps), source=variant)
        t0 = time.perf_counter()
        train(cfg, init_from=start)
        _copy_record(work / "transfer" / cfg.name, dest)
        (dest / "done.json").write_text(json.dumps({
            "wall_s": time.perf_counter() - t0,
            "init_from": start}))


def _copy_record(run: Path, dest: Path) -> None:
    """A run's record (its config and metrics) into the committed results."""
    for f in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run / f, dest / f)


def collect(variants: list[str], out: Path = OUT,
            baselines: list[str] | tuple[str, ...] = BASELINE_VARIANTS,
            compared: dict[str, str] = COMPARED) -> dict:
    """Scores of every variant on every seed with a run record, and of the compared runs (the
    ``compared`` committed ones and the ``baselines`` variants)."""
    exp = json.loads((EXPERIMENT / "results.json").read_text())
    phase = exp["phases"]["transfer"]
    envs, ref, rand = phase["envs"], phase["reference"], exp["random"]
    seeds = sorted(int(d.name[4:]) for d in (out / "runs").glob("seed*"))
    paths: dict[str, dict[int, Path]] = {}
    for seed in seeds:
        for v in variants:
            paths.setdefault(v, {})[seed] = out / "runs" / f"seed{seed}" / v / "metrics.jsonl"
        for label, name in compared.items():
            paths.setdefault(label, {})[seed] = \
                committed_run(seed, "transfer", name) / "metrics.jsonl"
    runs: dict[str, dict[int, dict]] = {}  # label → seed → env → final, auc
    curves: dict[str, dict[int, dict]] = {}
    for label, by_seed in paths.items():
        for seed, path in by_seed.items():
            if not path.is_file():
                continue
            c = load_curves(path, envs)
            curves.setdefault(label, {})[seed] = c
            runs.setdefault(label, {})[seed] = {
                e: {"final": final_score(c[e], FINAL_FRACTION),
                    "auc": float(np.mean([r for _, r in c[e]])) if c[e] else None} for e in envs}

    def score(label: str, seeds_: list[int], key: str = "final") -> dict[str, float]:
        return {e: float(np.mean([runs[label][s][e][key] for s in seeds_])) for e in envs}

    rows, wins = {}, {}
    for label, by_seed in runs.items():
        own = sorted(by_seed)
        final, auc = score(label, own), score(label, own, "auc")
        rows[label] = {"seeds": own, **{e: {
            "final": final[e], "auc": auc[e], "finals": [by_seed[s][e]["final"] for s in own],
            "normalized_final": normalize(final[e], rand[e], ref.get(e))} for e in envs}}
    against = [label for label in [*compared, *baselines] if label in runs]
    for v in variants:
        if v not in runs or v in baselines:
            continue
        own = sorted(runs[v])
        wins[v] = {"seeds": own}
        for label in against:
            common = [s for s in own if s in runs[label]]
            if not common:
                continue
            mine, theirs = score(v, common), score(label, common)
            wins[v][label] = {
                "mean": sum(mine[e] >= theirs[e] for e in envs),
                "per_seed": [sum(runs[v][s][e]["final"] >= runs[label][s][e]["final"]
                                 for e in envs) for s in common]}
    means = {label: _mean([r[e]["normalized_final"] for e in envs]) for label, r in rows.items()}
    budgets = {yaml.safe_load((p.parent / "config.yaml").read_text())["run"]["env_steps_per_env"]
               for by_seed in paths.values() for p in by_seed.values() if p.is_file()}
    return {"seeds": seeds, "env_steps_per_env": sorted(budgets), "compared": list(compared),
            "envs": envs, "random": {e: rand[e] for e in envs}, "reference": ref, "rows": rows,
            "wins": wins, "normalized_final_mean": means, "curves": curves,
            "variants": {v: VARIANTS[v] for v in variants if v in rows},
            "baselines": [b for b in baselines if b in rows]}


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _plain_description(variant: str) -> str:
    return ("(fresh init, the experiment's own settings)" if variant in SCRATCH
            else "(every weight copied, the experiment's own settings)")


REPRODUCE = ("`python benchmarks/transfer_init.py --seed K [--variants ...]` per seed "
             "(`--report-only` rewrites this from the run records)")


def write_markdown(res: dict, path: Path, note: str = "", reproduce: str = REPRODUCE) -> None:
    labels, envs, rows = list(res["rows"]), res["envs"], res["rows"]
    names = [f"{lab} (seed{'s' if len(rows[lab]['seeds']) > 1 else ''} "
             f"{', '.join(map(str, rows[lab]['seeds']))})" for lab in labels]
    head = "| env | " + " | ".join(names) + " |\n|---|" + "---|" * len(labels)
    lines = [
        "# Agnostic transfer: how the weights start (mix_to_mix, cpu scale)", "",
        f"{' / '.join(f'{b:,}' for b in res['env_steps_per_env'])} env steps per new env. The "
        "agnostic S4 agent's `mix_to_mix` pretraining (the "
        "committed config of each seed, re-run: pretraining and transfer are deterministic for a "
        "seed on one CPU), then the transfer phase with each start; `specific+…` does the same "
        "with the specific agent's pretraining and transfer"
        + ("; the specific-transfer and agnostic-scratch columns are `mix_to_mix`'s committed "
           "runs" if res["compared"] else "") + ". Variants: "
        + "; ".join(f"`{v}` {json.dumps(o) if o else _plain_description(v)}"
                    for v, o in res["variants"].items()) + "." + (f" {note}" if note else ""), "",
        ("Final normalized score (final = mean training return over the last 10 % of iterations, "
        "mean over the seeds in the column's name; normalized with the experiment's random and "
        "reference scores), final return in brackets:"), "", head]
    for e in envs:
        lines.append(f"| {e} | " + " | ".join(
            f"{_f(rows[lab][e]['normalized_final'])} ({_f(rows[lab][e]['final'])})"
            for lab in labels) + " |")
    lines.append("| **mean** (defined envs) | " + " | ".join(
        f"**{_f(res['normalized_final_mean'][lab])}**" for lab in labels) + " |")
    lines += ["", "Mean return over all iterations (area under the learning curve):", "", head]
    for e in envs:
        lines.append(f"| {e} | " + " | ".join(_f(rows[lab][e]["auc"]) for lab in labels) + " |")
    against = [a for a in [*res["compared"], *res["baselines"]] if a in rows]
    lines += ["", ("New envs (of 8) where the variant's final return is ≥ the compared run's, on "
              "the mean over the seeds both have (per seed in brackets):"), "",
              "| variant | seeds | " + " | ".join(against) + " |",
              "|---|---|" + "---|" * len(against)]
    for v, w in res["wins"].items():
        cells = [f"{w[a]['mean']}/8 ({', '.join(map(str, w[a]['per_seed']))})" if a in w else "–"
                 for a in against]
        lines.append(f"| {v} | {', '.join(map(str, w['seeds']))} | " + " | ".join(cells) + " |")
    lines += ["", "![learning curves](curves.png)", "", f"Reproduce: {reproduce}."]
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = res["envs"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 6.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, e in zip(axes.ravel(), envs):
        for i, (label, by_seed) in enumerate(res["curves"].items()):
            for k, seed in enumerate(sorted(by_seed)):
                if by_seed[seed][e]:
                    x, y = zip(*by_seed[seed][e])
                    ax.plot(x, y, color=colors[i % len(colors)], lw=1.0,
                            ls="--" if label in res["compared"] or label in res["baselines"]
                            else "-",
                            alpha=1.0 if k == 0 else 0.5, label=label if k == 0 else None)
        ax.axhline(res["random"][e], color="grey", ls=":", label="random")
        ax.set_title(e, fontsize=10)
        ax.set_xlabel("env steps (this env)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("mix_to_mix transfer, agnostic S4 weight-init variants (dashed: baselines) "
                 f"(seeds {', '.join(map(str, res['seeds']))}; a lighter line per further seed)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a budget of 0 steps would train nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of env steps, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="to train (and to report)")
    parser.add_argument("--pretrained", type=Path,
                        help="agnostic-s4 pretrain run directory (else it is re-run)")
    parser.add_argument("--pretrained-specific", type=Path,
                        help="specific pretrain run directory for the specific+ variants")
    parser.add_argument("--work", type=Path, default=Path("runs/transfer_init"),
                        help="where the checkpoints go (not committed)")
    parser.add_argument("--rerun-plain", action="store_true",
                        help="train the plain transfer too instead of using the committed record")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help="results and run records")
    parser.add_argument("--baselines", nargs="*", default=BASELINE_VARIANTS, choices=list(VARIANTS),
                        help="variants the others are compared with (columns, not ranked rows)")
    parser.add_argument("--note", default="", help="a sentence added to the report's introduction")
    parser.add_argument("--env-steps", type=positive_int,
                        help="env steps per new env for every trained variant, instead of the "
                             "experiment's; the experiment's committed runs (another budget) are "
                             "then not compared: use --out for a separate report")
    args = parser.parse_args()
    if not args.report_only:
        run_variants(args.seed, args.variants, args.pretrained, args.work.absolute(),
                     args.rerun_plain, args.out, args.pretrained_specific, args.env_steps)
    res = collect(args.variants, args.out, args.baselines,
                  COMPARED if args.env_steps is None else {})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    reproduce = REPRODUCE
    if args.env_steps is not None:
        reproduce = (f"`python benchmarks/transfer_init.py --seed K --env-steps {args.env_steps} "
                     f"--variants {' '.join(args.variants)} --baselines {' '.join(args.baselines)} "
                     f"--out {args.out}` per seed (add `--report-only` to rewrite this from the "
                     "run records)")
    write_markdown(res, args.out / "results.md", args.note, reproduce)
    plot(res, args.out / "curves.png")
    for v, w in res["wins"].items():
        print(f"{v:16s} seeds {w['seeds']}: normalized final mean "
              f"{_f(res['normalized_final_mean'][v])}; "
              + ", ".join(f"≥ {c} on {w[c]['mean']}/8 {w[c]['per_seed']}"
                          for c in w if c != "seeds"))
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
