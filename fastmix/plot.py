"""The run plot: domain weights, held-out losses and each domain's epochs over steps, from
metrics.jsonl records."""
import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402

from fastmix.rundir import replace_atomic  # noqa: E402

_MAX_LINES = 20  # beyond this many domains, plot the heaviest ones only


def plot_run(records, domains, targets, path, final=None):
    """The plot of a run's records into `path`. `final` ({domain: w}): the mixer's weights at the
    end, after its last update (a record holds the weights its step's batch was drawn with):
    they pick the heaviest domains to show; default the last record's weights."""
    fig, (ax_w, ax_l, ax_e) = plt.subplots(1, 3, figsize=(19, 4.5))
    final = records[-1]["weights"] if final is None else final
    shown = sorted(domains, key=lambda d: -final.get(d, 0.0))[:_MAX_LINES]
    # one colour per domain in both panels; targets in greys, drawn thick
    palette = plt.cm.tab10 if len(shown) <= 10 else plt.cm.tab20
    colour = {d: palette(i % palette.N) for i, d in enumerate(shown)}
    colour.update({t: str(0.55 * i / max(1, len(targets) - 1)) for i, t in enumerate(targets)})
    for d in shown:  # a domain added on resume has no weight in the records before it
        present = [r for r in records if d in r["weights"]]
        ax_w.plot([r["step"] for r in present], [r["weights"][d] for r in present], label=d, color=colour[d])
    ax_w.set(title="domain weights", xlabel="step", ylabel="weight", ylim=(0, None))
    ax_w.legend(fontsize=7, ncol=2)

    evals = [r for r in records if r["eval"]]
    for name in list(targets) + shown:
        xs = [r["step"] for r in evals if name in r["eval"]]
        is_target = name in targets
        ax_l.plot(xs, [r["eval"][name] for r in evals if name in r["eval"]],
                  label=f"target: {name}" if is_target else name, color=colour[name],
                  linewidth=2.5 if is_target else 1, linestyle="-" if is_target else ":")
    ax_l.set(title="held-out loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax_l.legend(fontsize=7, ncol=2)

    # repetition: a domain past one epoch is being trained on again (the limited-data regime)
    for d in shown:
        present = [r for r in records if d in r.get("epochs", {})]
        ax_e.plot([r["step"] for r in present], [r["epochs"][d] for r in present], label=d, color=colour[d])
    ax_e.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--")
    ax_e.set(title="epochs per domain", xlabel="step", ylabel="training tokens drawn / tokens held", ylim=(0, None))
    ax_e.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:  # whole or not at all: a full disk mid-save keeps the plot there was
        replace_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
