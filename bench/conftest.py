"""Benchmarks: pytest-benchmark, one group per shape. The test that sets
`benchmark.extra_info["baseline"] = True` is its group's named baseline; the summary at
the end prints every other test's median as a ratio to it, measured in the same run."""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # only so triton modules import; GPU cases skip


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(calls, rounds):
    """Seconds of each of `rounds` calls of every callable in `calls` ({name: fn}), taken in turn
    within each round, so that a change in the machine's load hits them alike: {name: [s, ...]}."""
    import time

    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_quartiles(times, baseline):
    """(first quartile, median, third quartile) of the per-round ratios times / baseline."""
    ratios = torch.tensor(times, dtype=torch.float64) / torch.tensor(baseline, dtype=torch.float64)
    return tuple(float(ratios.quantile(q)) for q in (0.25, 0.5, 0.75))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("ratios to each group's baseline (median time; < 1 is faster than the baseline)")
    for group, benches in sorted(groups.items(), key=lambda item: str(item[0])):
        baseline = next((b for b in benches if b.extra_info.get("baseline")), None)
        write(f"[{group}]" + (f"  baseline: {baseline.name}" if baseline else "  (no baseline)"))
        for b in sorted(benches, key=lambda b: b.stats.median):
            ratio = f"{b.stats.median / baseline.stats.median:7.2f}x" if baseline else ""
            write(f"    {b.name:<60} {b.stats.median * 1e3:10.3f} ms {ratio}")
