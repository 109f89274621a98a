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
- ``scratch+lr-2x``: NO transfer, fresh weights at the doubled learning rates (the scratch
  baseline of the ``lr-2x`` variants).

Scores as in the experiment report (`rl_agnostic.experiments.report`): *final* = mean training
return over the last 10 % of iterations, normalized with the experiment's committed random and
reference scores, compared per env with the committed specific-agent transfer and agnostic
scratch runs of the same seed. ``auc`` = mean return over all iterations (less noisy than final).

Writes ``results/transfer_init/{results.md,results.json,curves.png}`` and keeps each variant's run
record (config.yaml, metrics.jsonl) under ``results/transfer_init/runs/seed<k>/<variant>/``.

    python benchmarks/transfer_init.py                      # seed 0: pretrain ~10 min + ~11 min per variant
    python benchmarks/transfer_init.py --pretrained DIR     # reuse an agnostic-s4 pretrain run
    python benchmarks/transfer_init.py --report-only        # tables and plot from the records
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
VARIANTS: dict[str, dict] = {
    "plain": {},
    "critic-reset": {"run": {"transfer_reinit": CRITIC}},
    "shrink-0.5": {"run": {"transfer_shrink": 0.5}},
    "lr-2x": {"ppo": {"actor_lr": 6e-4, "critic_lr": 1e-3, "ssm_lr": 2e-3}},
    "shrink-0.5+lr-2x": {"run": {"transfer_shrink": 0.5},
                         "ppo": {"actor_lr": 6e-4, "critic_lr": 1e-3, "ssm_lr": 2e-3}},
    "scratch+lr-2x": {"ppo": {"actor_lr": 6e-4, "critic_lr": 1e-3, "ssm_lr": 2e-3}},
}
SCRATCH = {"scratch+lr-2x"}  # trained from a fresh init: is a variant's gain the lr's alone?
COMPARED = {"specific (transfer)": "specific_transfer", "agnostic-s4 (scratch)": "agnostic-s4_scratch"}
FINAL_FRACTION = 0.1


def committed_run(seed: int, phase: str, name: str) -> Path:
    return EXPERIMENT / "runs" / phase / f"seed{seed}" / name


def variant_config(seed: int, variant: str, work: Path) -> dict:
    cfg = yaml.safe_load((committed_run(seed, "transfer", "agnostic-s4_transfer")
                          / "config.yaml").read_text())
    cfg["name"] = variant
    cfg["run"]["output_dir"] = str(work / "transfer")
    for section, values in VARIANTS[variant].items():
        cfg[section] = {**cfg[section], **values}
    return cfg


def pretrain(seed: int, work: Path) -> Path:
    from rl_agnostic.online.config import TrainConfig
    from rl_agnostic.online.trainer import train

    cfg = yaml.safe_load((committed_run(seed, "pretrain", "agnostic-s4") / "config.yaml").read_text())
    cfg["run"]["output_dir"] = str(work / "pretrain")
    train(TrainConfig.from_dict(cfg, source="pretrain config"))
    return work / "pretrain" / cfg["name"]


def run_variants(seed: int, variants: list[str], pretrained: Path | None, work: Path,
                 rerun_plain: bool, out: Path = OUT) -> None:
    from rl_agnostic.online.config import TrainConfig
    from rl_agnostic.online.trainer import train

    records = out / "runs" / f"seed{seed}"
    for variant in variants:
        dest = records / variant
        if (dest / "metrics.jsonl").is_file():
            print(f"{variant}: run record exists in {dest}, skipped")
            continue
        dest.mkdir(parents=True, exist_ok=True)
        if variant == "plain" and not rerun_plain:
            src = committed_run(seed, "transfer", "agnostic-s4_transfer")
            for f in ("config.yaml", "metrics.jsonl"):
                shutil.copy(src / f, dest / f)
            print(f"plain: the committed transfer run {src} (deterministic for a seed)")
            continue
        if pretrained is None and variant not in SCRATCH:
            pretrained = pretrain(seed, work)
        cfg = TrainConfig.from_dict(variant_config(seed, variant, work), source=variant)
        t0 = time.perf_counter()
        train(cfg, init_from=None if variant in SCRATCH else str(pretrained))
        run = work / "transfer" / variant
        for f in ("config.yaml", "metrics.jsonl"):
            shutil.copy(run / f, dest / f)
        (dest / "done.json").write_text(json.dumps({
            "wall_s": time.perf_counter() - t0,
            "init_from": None if variant in SCRATCH else str(pretrained)}))


def collect(seed: int, variants: list[str], out: Path = OUT) -> dict:
    exp = json.loads((EXPERIMENT / "results.json").read_text())
    phase = exp["phases"]["transfer"]
    envs, ref, rand = phase["envs"], phase["reference"], exp["random"]
    paths = {v: out / "runs" / f"seed{seed}" / v / "metrics.jsonl" for v in variants}
    paths |= {label: committed_run(seed, "transfer", name) / "metrics.jsonl"
              for label, name in COMPARED.items()}
    rows: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    for label, path in paths.items():
        if not path.is_file():
            continue
        curves[label] = load_curves(path, envs)
        rows[label] = {}
        for e in envs:
            final = final_score(curves[label][e], FINAL_FRACTION)
            auc = float(np.mean([r for _, r in curves[label][e]])) if curves[label][e] else None
            rows[label][e] = {"final": final, "auc": auc,
                              "normalized_final": normalize(final, rand[e], ref.get(e))}
    against = [label for label in [*COMPARED, *sorted(SCRATCH)] if label in rows]
    wins = {v: {label: sum(rows[v][e]["final"] >= rows[label][e]["final"] for e in envs)
                for label in against}
            for v in variants if v in rows and v not in SCRATCH}
    means = {label: _mean([r[e]["normalized_final"] for e in envs]) for label, r in rows.items()}
    return {"seed": seed, "envs": envs, "random": {e: rand[e] for e in envs},
            "reference": ref, "rows": rows, "wins": wins, "normalized_final_mean": means,
            "curves": curves, "variants": {v: VARIANTS[v] for v in variants if v in rows}}


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def write_markdown(res: dict, path: Path) -> None:
    labels, envs = list(res["rows"]), res["envs"]
    head = "| env | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels)
    lines = [
        "# Agnostic transfer: how the weights start (mix_to_mix, cpu scale)", "",
        f"Seed {res['seed']}, 25k env steps per new env. One agnostic S4 pretraining on the 8 "
        "pretraining envs, then the transfer phase with each start; the specific-transfer and "
        "agnostic-scratch columns are `mix_to_mix`'s committed runs of the same seed. Variants: "
        + "; ".join(f"`{v}` {json.dumps(o) if o else '(every weight copied)'}"
                    for v, o in res["variants"].items()) + ".", "",
        "Final normalized score (final = mean training return over the last 10 % of iterations; "
        "normalized with the experiment's random and reference scores):", "", head]
    for e in envs:
        lines.append(f"| {e} | " + " | ".join(
            f"{_f(res['rows'][lab][e]['normalized_final'])} ({_f(res['rows'][lab][e]['final'])})"
            for lab in labels) + " |")
    lines.append("| **mean** (defined envs) | " + " | ".join(
        f"**{_f(res['normalized_final_mean'][lab])}**" for lab in labels) + " |")
    lines += ["", "Mean return over all iterations (area under the learning curve):", "", head]
    for e in envs:
        lines.append(f"| {e} | " + " | ".join(_f(res["rows"][lab][e]["auc"]) for lab in labels)
                     + " |")
    against = list(next(iter(res["wins"].values()), {}))
    lines += ["", "New envs (of 8) where the variant's final return is ≥ the compared run's:", "",
              "| variant | " + " | ".join(against) + " |", "|---|" + "---|" * len(against)]
    for v, w in res["wins"].items():
        lines.append(f"| {v} | " + " | ".join(f"{w[c]}/8" for c in against) + " |")
    lines += ["", "![learning curves](curves.png)", "",
              "Reproduce: `python benchmarks/transfer_init.py --seed "
              f"{res['seed']}` (`--report-only` rewrites this from the run records)."]
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = res["envs"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 6.6), squeeze=False)
    for ax, e in zip(axes.ravel(), envs):
        for label, curve in res["curves"].items():
            if curve[e]:
                x, y = zip(*curve[e])
                ax.plot(x, y, label=label,
                        ls="--" if label in COMPARED or label in SCRATCH else "-")
        ax.axhline(res["random"][e], color="grey", ls=":", label="random")
        ax.set_title(e, fontsize=10)
        ax.set_xlabel("env steps (this env)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(f"mix_to_mix transfer, agnostic S4, weight-init variants (seed {res['seed']})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrained", type=Path, help="agnostic-s4 pretrain run directory")
    parser.add_argument("--work", type=Path, default=Path("runs/transfer_init"),
                        help="where the checkpoints go (not committed)")
    parser.add_argument("--rerun-plain", action="store_true",
                        help="train the plain transfer too instead of using the committed record")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help="results and run records")
    args = parser.parse_args()
    if not args.report_only:
        run_variants(args.seed, args.variants, args.pretrained, args.work.absolute(),
                     args.rerun_plain, args.out)
    res = collect(args.seed, args.variants, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, args.out / "results.md")
    plot(res, args.out / "curves.png")
    for v, w in res["wins"].items():
        print(f"{v:13s} normalized final mean {_f(res['normalized_final_mean'][v])}; "
              + ", ".join(f"≥ {c} on {n}/8" for c, n in w.items()))
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
