"""Evidence that the online mixers work, on the built-in corpus (known ground truth).

    .venv/bin/python scripts/evidence.py                  # runs everything (~2.5 min on 2 idle CPU cores)
    .venv/bin/python scripts/evidence.py --steps 100 --seeds 0   # a quick look

For each seed: uniform, universal (DoGE-style) and online Chameleon once (they ignore the
target: one run serves all three targets, whose held-out losses every run evaluates), and DGA
(stratified, default options) once per target task. Same model, data order seed, schedule and
steps for all. Writes into --out (default docs/evidence/): evidence.md (the table), weights.png
(DGA's weight trajectories, one panel per target), losses.png (held-out target loss over steps,
mean over seeds), results.json; prints the table. Runs are kept in --runs and reused when
complete (delete them to rerun).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from fastmix.data import BUILTIN_PARTIAL_RELATIONS, BUILTIN_RELATIONS, BUILTIN_TARGETS
from fastmix.train import TrainConfig, train

MIXERS = ("uniform", "dga", "universal", "chameleon")


def run_one(args, mixer, seed, target):
    name = f"{mixer}-{target}-s{seed}" if mixer == "dga" else f"{mixer}-s{seed}"
    out = os.path.join(args.runs, name)
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        records = [json.loads(line) for line in open(metrics, encoding="utf-8")]
        if records and records[-1]["step"] == args.steps and records[-1]["eval"]:
            return records
    config = TrainConfig(out=out, mixer=mixer, target=target if mixer == "dga" else None, seed=seed,
                         max_steps=args.steps, eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                         log_interval=10, checkpoint_interval=args.steps, overwrite=True, quiet=True, plot=False,
                         device="cpu", n_layer=2, n_embd=128, n_head=4, batch_size=16, block_size=64)
    start = time.perf_counter()
    records = train(config).metrics
    print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return records


def final_eval(records, name):
    return [r for r in records if r["eval"]][-1]["eval"][name]


def weight_on(records, domains, step=None):
    record = records[-1] if step is None else min(records, key=lambda r: abs(r["step"] - step))
    return sum(record["weights"][d] for d in domains)


def fmt(values):
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def table(results, targets, seeds, steps):
    lines = [f"Held-out target loss (nats/token) after {steps} steps, mean ± std over seeds {list(seeds)}; "
             "DGA weight on the domains that help the target (ground truth) at step 100 and at the end.", "",
             "| target | uniform | DGA (stratified) | universal | chameleon (online) | DGA − uniform (per seed) "
             "| DGA wins | DGA weight on helpers @100 / end | on partly related (end) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        loss = {m: [final_eval(results[(m, t, s)], t) for s in seeds] for m in MIXERS}
        diffs = [d - u for d, u in zip(loss["dga"], loss["uniform"])]
        helpers, partial = BUILTIN_RELATIONS[t], BUILTIN_PARTIAL_RELATIONS[t]
        w100 = statistics.mean(weight_on(results[("dga", t, s)], helpers, 100) for s in seeds)
        wend = statistics.mean(weight_on(results[("dga", t, s)], helpers) for s in seeds)
        wpart = statistics.mean(weight_on(results[("dga", t, s)], partial) for s in seeds) if partial else 0.0
        lines.append(f"| {t} | {fmt(loss['uniform'])} | {fmt(loss['dga'])} | {fmt(loss['universal'])} "
                     f"| {fmt(loss['chameleon'])} | {', '.join(f'{d:+.3f}' for d in diffs)} "
                     f"| {sum(d < 0 for d in diffs)}/{len(diffs)} | {w100:.2f} / {wend:.2f} "
                     f"({'+'.join(helpers)}; uniform: {len(helpers) / 10:.2f}) | {wpart:.2f} |")
    return "\n".join(lines)


def plots(results, targets, seeds, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        records = results[("dga", t, seeds[0])]
        steps = [r["step"] for r in records]
        for d in records[0]["weights"]:
            helper, partial = d in BUILTIN_RELATIONS[t], d in BUILTIN_PARTIAL_RELATIONS[t]
            ax.plot(steps, [r["weights"][d] for r in records], label=d + (" (helps)" if helper else
                                                                          " (partly)" if partial else ""),
                    linewidth=2.5 if helper else 1.5 if partial else 0.8,
                    linestyle="-" if helper or partial else ":")
        ax.set(title=f"DGA weights, target {t} (seed {seeds[0]})", xlabel="step", ylabel="weight", ylim=(0, 1))
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "weights.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for m in MIXERS:
            curves = [[(r["step"], r["eval"][t]) for r in results[(m, t, s)] if r["eval"]] for s in seeds]
            xs = [x for x, _ in curves[0]]
            ys = [statistics.mean(c[i][1] for c in curves) for i in range(len(xs))]
            ax.plot(xs[1:], ys[1:], label=m, linewidth=2.5 if m == "dga" else 1.2)
        ax.set(title=f"held-out loss of target {t} (mean of {len(seeds)} seeds)", xlabel="step",
               ylabel="nats/token")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "losses.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=list(BUILTIN_TARGETS))
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--runs", default="runs/evidence")
    parser.add_argument("--out", default="docs/evidence")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for seed in args.seeds:
        for m in ("uniform", "universal", "chameleon"):
            records = run_one(args, m, seed, None)
            for t in args.targets:
                results[(m, t, seed)] = records
        for t in args.targets:
            results[("dga", t, seed)] = run_one(args, "dga", seed, t)
    measured = provenance()
    text = table(results, args.targets, args.seeds, args.steps) + "\n\nMeasured: " + \
        ", ".join(f"{key} {value}" for key, value in measured.items())
    plots(results, args.targets, args.seeds, args.out)
    with open(os.path.join(args.out, "evidence.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"measured": measured,
                   "runs": {f"{m}/{t}/{s}": {"final_target_loss": final_eval(r, t), "final_weights": r[-1]["weights"]}
                            for (m, t, s), r in results.items()}}, f, indent=1)
    print(text)


def provenance():
    """What the figures were measured with: commit, date, machine, versions."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"commit": commit, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
            "torch": torch.__version__, "device": "cpu"}


if __name__ == "__main__":
    main()
