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
