"""Evidence for the DGA paper's claims in its own setting: domains made by clustering unlabeled
documents, importance sampling (CRISP) as the baseline, and distribution reweighting.

    .venv/bin/python scripts/evidence_clusters.py               # every claim, 3 seeds (~15 min on 2 idle cores)
    .venv/bin/python scripts/evidence_clusters.py --seeds 0 --steps 200 --claims i   # a quick look

Real text that ships with every Python: the standard library's source (code, the generic
corpus's bulk) and the language reference of `pydoc_data.topics` (English prose, the
target-like part). Documents are chunks of about 1,000 characters. The target task is prose
from reference topics that never enter the generic corpus.

- Claim (i), the small generic set: the generic corpus holds little prose next to the token
  budget. 16 clusters. Uniform, importance sampling and DGA, held-out target loss over training,
  and how many epochs each run spends on the clusters importance sampling favours.
- Claim (ii), fine clusters and few target examples: at least 256 clusters (260 asked, 16
  coarse), a target of at most 100 documents. DGA over the 16 coarse bases (distribution reweighting), plain DGA over
  all 256 clusters, importance sampling and uniform.
- Cost: one update of each mixer at k = 64, 1024 and 4096 domains (random-token stores, the
  2-layer 128-wide GPT).

Writes into --out (default docs/evidence/clusters): results.json, claim_i.png, claim_ii.png and
report.md (the tables, the commit, the machine). Stores and runs are kept in --work and reused
when complete (delete it to rerun).
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

import numpy as np
import torch

from fastmix.cli import main as fastmix_main
from fastmix.data import DomainStore, MixtureSampler, StoreWriter
from fastmix.mixing import build_mixer
from fastmix.model import GPT, GPTConfig
from fastmix.train import MixerContexts, TrainConfig, train

CHUNK = 1000  # characters a document
MODEL = dict(n_layer=2, n_head=4, n_embd=128, batch_size=16, block_size=64)


# ---------------------------------------------------------------------------------------------
# the corpus

def _chunks(text):
    text = text.strip()
    return [text[i:i + CHUNK] for i in range(0, len(text), CHUNK) if len(text[i:i + CHUNK]) > CHUNK // 4]


def stdlib_code(max_chars):
    """Chunks of the standard library's top-level modules, in name order, up to max_chars."""
    directory = os.path.dirname(os.__file__)
    docs = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                docs += _chunks(f.read())
        if sum(map(len, docs)) >= max_chars:
            break
    return docs


def reference_prose():
    """{topic: chunks} of the language reference (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    return {name: _chunks(text) for name, text in sorted(topics.items())}


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def make_store(work, name, generic_prose_chars, target_docs, k, coarse=None, seed=0):
    """A cluster store: stdlib code plus `generic_prose_chars` of reference prose, clustered into
    k domains; the target: `target_docs` prose chunks from topics kept out of the generic corpus."""
    path = os.path.join(work, name)
    if os.path.exists(os.path.join(path, "meta.json")):
        return DomainStore(path)
    prose = reference_prose()
    topics = sorted(prose)
    held_out = topics[::4]  # every fourth topic: the target's, never in the generic corpus
    generic_prose = [c for t in topics if t not in held_out for c in prose[t]]
    rng = np.random.default_rng(seed)
    rng.shuffle(generic_prose)
    generic_prose = generic_prose[:max(1, generic_prose_chars // CHUNK)]
    target = [c for t in held_out for c in prose[t]][:target_docs]
    os.makedirs(work, exist_ok=True)
    generic_file, target_file = os.path.join(work, f"{name}.generic.jsonl"), os.path.join(work, f"{name}.target.jsonl")
    write_jsonl(generic_file, stdlib_code(1_500_000) + generic_prose)
    write_jsonl(target_file, target)
    argv = ["prepare", path, "--cluster", str(k), "--input", generic_file, "--target", f"prose={target_file}",
            "--seed", str(seed), "--quiet", "--val-fraction", "0.1"]
    fastmix_main(argv + (["--coarse", str(coarse)] if coarse else []))
    return DomainStore(path)


# ---------------------------------------------------------------------------------------------
# runs

def run(work, store, label, mixer, seed, steps, options=None):
    out = os.path.join(work, "runs", f"{os.path.basename(store.path)}-{label}-s{seed}")
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        records = [json.loads(line) for line in open(metrics, encoding="utf-8")]
        if records and records[-1]["step"] == steps and records[-1]["eval"]:
            return records
    config = TrainConfig(data=store.path, out=out, mixer=mixer, mixer_options=options or {}, target="prose",
                         seed=seed, max_steps=steps, eval_interval=max(steps // 5, 1), eval_batches=2,
                         log_interval=max(steps // 20, 1), checkpoint_interval=steps, overwrite=True, quiet=True,
                         plot=False, device="cpu", **MODEL)
    start = time.perf_counter()
    records = train(config).metrics
    print(f"  {os.path.basename(out)}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return records


def target_curve(records):
    return [(r["step"], r["eval"]["prose"]) for r in records if r["eval"]]


def summarise(curves):
    """Per step: mean and the spread (min, max) over seeds."""
    steps = [s for s, _ in curves[0]]
    values = np.array([[v for _, v in c] for c in curves])
    return steps, values.mean(0), values.min(0), values.max(0)


def favoured_epochs(records, histogram):
    """Epochs (tokens drawn / held) summed over the clusters holding half the target's documents."""
    order = np.argsort(histogram)[::-1]
    half, total, chosen = sum(histogram) / 2, 0, []
    for i in order:
        chosen.append(int(i))
        total += histogram[i]
        if total >= half:
            break
    epochs = records[-1]["epochs"]
    domains = list(epochs)
    return max(epochs[domains[i]] for i in chosen)


def claim(work, args, name, store, mixers):
    histogram = store.meta["clusters"]["target_histograms"]["prose"]
    results = {}
    for label, (mixer, options) in mixers.items():
        runs = [run(work, store, label, mixer, seed, args.steps, options) for seed in args.seeds]
        steps, mean, low, high = summarise([target_curve(r) for r in runs])
        results[label] = {"steps": steps, "target_loss": mean.tolist(), "min": low.tolist(), "max": high.tolist(),
                          "final": [target_curve(r)[-1][1] for r in runs],
                          "best": [min(v for _, v in target_curve(r)) for r in runs],
                          "favoured_epochs": [favoured_epochs(r, histogram) for r in runs]}
    return {"store": {"domains": store.num_domains, "train_tokens": int(store.train_tokens.sum()),
                      "target_docs": int(sum(histogram)), "budget_tokens": args.steps * 16 * 64},
            "mixers": results}


def plot(result, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, r in result["mixers"].items():
        ax.plot(r["steps"], r["target_loss"], label=label, marker="o", markersize=3)
        ax.fill_between(r["steps"], r["min"], r["max"], alpha=0.15)
    ax.set(title=title, xlabel="step", ylabel="held-out target loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# cost of an update

def random_store(path, k):
    if not os.path.exists(os.path.join(path, "meta.json")):
        rng = np.random.default_rng(0)
        with StoreWriter(path, {"type": "byte", "vocab_size": 257}) as w:
            for i in range(k):
                w.add(f"d{i}", rng.integers(0, 256, 300, dtype=np.uint16), rng.integers(0, 256, 100, dtype=np.uint16))
            w.add("target", rng.integers(0, 256, 3000, dtype=np.uint16), rng.integers(0, 256, 300, dtype=np.uint16),
                  target=True)
    return DomainStore(path)


def update_seconds(store, mixer_name, options, repeats=3):
    """Median wall time of one update step's mixer.update (interval 1: every step updates)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=4, n_embd=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mixer = build_mixer(mixer_name, store, **options)
    sampler = MixtureSampler(store, mixer.weights, 16, 64, seed=0, prefetch=False)
    contexts = MixerContexts(model, optimizer, sampler, "target", torch.device("cpu"), batch_size=16)
    mixer.prepare(contexts(0, 3e-3))
    times = []
    for step in range(1, repeats + 1):
        ctx = contexts(step, 3e-3, sampler.next_batch())
        start = time.perf_counter()
        mixer.update(ctx)
        times.append(time.perf_counter() - start)
    sampler.close()
    mixer.close()
    return statistics.median(times)


def costs(work, sizes):
    table = {}
    for k in sizes:
        store = random_store(os.path.join(work, f"random-k{k}"), k)
        m = 16
        bases = np.random.default_rng(1).random((m, k)).tolist()
        # importance sampling is static like uniform: its update does nothing
        settings = {"uniform or importance": ("uniform", {}),
                    "dga stratified": ("dga", {"interval": 1}),
                    f"dga bases (m = {m})": ("dga", {"interval": 1, "bases": bases}),
                    "dga exact": ("dga", {"interval": 1, "mode": "exact"})}
        row = {}
        for label, setting in settings.items():
            if label == "dga exact" and k > 1024:
                row[label] = None  # k one-row backward passes: minutes per update at this k
                continue
            row[label] = update_seconds(store, *setting, repeats=1 if label == "dga exact" else 3)
            print(f"  cost k={k} {label}: {row[label] * 1e3:.1f} ms", file=sys.stderr, flush=True)
        table[k] = row
    return table


# ---------------------------------------------------------------------------------------------
# report

def report(results, args):
    lines = []
    for name, title in (("claim_i", "Claim (i): a small generic set"),
                        ("claim_ii", "Claim (ii): at least 256 clusters, few target documents")):
        if name not in results:
            continue
        r = results[name]
        s = r["store"]
        lines += [f"### {title}", "",
                  f"{s['domains']} clusters, {s['train_tokens']:,} training tokens, {s['target_docs']} target "
                  f"documents, a budget of {s['budget_tokens']:,} tokens ({args.steps} steps); seeds "
                  f"{', '.join(map(str, args.seeds))}.", "",
                  "| mixer | final target loss | best target loss | epochs on IS's favoured clusters |",
                  "|---|---|---|---|"]
        for label, m in r["mixers"].items():
            lines.append(f"| {label} | {_mean_sd(m['final'])} | {_mean_sd(m['best'])} | "
                         f"{_mean_sd(m['favoured_epochs'], '.1f')} |")
        lines.append("")
    if "cost" in results:
        sizes = list(results["cost"])
        labels = list(next(iter(results["cost"].values())))
        lines += ["### Cost of one update (ms, 2-layer 128-wide GPT, CPU)", "",
                  "| mixer | " + " | ".join(f"k = {k}" for k in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for label in labels:
            cells = [results["cost"][k].get(label) for k in sizes]
            lines.append(f"| {label} | " + " | ".join("not run" if c is None else f"{c * 1e3:,.0f}" for c in cells)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def _mean_sd(values, spec=".3f"):
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def main():
    parser = argparse.ArgumentParser(description="Evidence for the DGA paper's claims on clustered real text "
                                                 "(see the module docstring)")
    parser.add_argument("--claims", nargs="+", default=["i", "ii", "cost"], choices=["i", "ii", "cost"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="training steps of every run (default: 400)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 1024, 4096], help="k of the cost table")
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/fastmix/evidence-clusters"),
                        help="stores and runs, reused when complete")
    parser.add_argument("--out", default="docs/evidence/clusters")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path, encoding="utf-8")) if os.path.exists(results_path) else {}
    if "i" in args.claims:
        store = make_store(args.work, "small-generic", generic_prose_chars=40_000, target_docs=100, k=16)
        results["claim_i"] = claim(args.work, args, "claim_i", store, {
            "uniform": ("uniform", None), "importance": ("importance", None), "dga": ("dga", None)})
        plot(results["claim_i"], os.path.join(args.out, "claim_i.png"), "Claim (i): small generic set, 16 clusters")
    if "ii" in args.claims:
        # 260 asked: k-means may leave a few empty (dropped), and the claim wants at least 256
        store = make_store(args.work, "fine-clusters", generic_prose_chars=300_000, target_docs=60, k=260, coarse=16)
        results["claim_ii"] = claim(args.work, args, "claim_ii", store, {
            "uniform": ("uniform", None), "importance": ("importance", None), "dga (every cluster)": ("dga", None),
            "dga bases (16 coarse)": ("dga", {"bases": "coarse"})})
        plot(results["claim_ii"], os.path.join(args.out, "claim_ii.png"),
             f"Claim (ii): {store.num_domains} clusters, 60 target documents")
    if "cost" in args.claims:
        results["cost"] = {str(k): v for k, v in costs(args.work, args.sizes).items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results["run"] = {"commit": commit, "date": datetime.date.today().isoformat(), "steps": args.steps,
                      "seeds": args.seeds, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                      "python": platform.python_version(), "torch": torch.__version__}
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    text = report(results, args)
    text += (f"\nMeasured at commit `{commit}` on {results['run']['date']}, {results['run']['machine']}, "
             f"Python {results['run']['python']}, torch {results['run']['torch']}.\n")
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
