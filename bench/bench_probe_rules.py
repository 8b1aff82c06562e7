"""Each probe rule's cost: a forward and backward through a stack of one layer type under
`AlignmentProbe.record`, against the same forward and backward without the probe (the named
baseline). The fast rules should sit in the Linear rule's cost class; `jvp_rule` (one more
forward-mode pass of the layer) and the general rule (a backward of the layer per domain
present, for layers without a rule) are stated as they are.

    pytest bench/bench_probe_rules.py
    python bench/bench_probe_rules.py [--rounds N]    # the same ratios from interleaved rounds

CPU, fp32: 4096 rows of width 512 (8 sequences of 512), k = 8 domains, 4 layers of each type
between fixed (untracked) linear mixes so that every layer sees a fresh gradient.
"""
import statistics

import pytest
import torch
from torch import nn

from conftest import interleaved_times, ratio_quartiles
from fastmix import AlignmentProbe
from fastmix.probe.rules import jvp_rule, register_probe_rule

ROWS, WIDTH, K, DEPTH = (8, 512), 512, 8, 4
METHODS = ["plain", "probe"]


class ScaledTanh(nn.Module):
    """A row-wise layer without a fast rule of its own, scored by jvp_rule here."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return torch.tanh(x) * self.weight


register_probe_rule(ScaledTanh, jvp_rule)


class Gated(ScaledTanh):
    """The same layer without a rule (a subclass that overrides forward does not inherit its
    base's): the general rule scores it, one VJP of the layer per domain."""

    def forward(self, x):
        return super().forward(x)


def _conv1d(width):
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(width, width)


LAYERS = {
    "linear": lambda: nn.Linear(WIDTH, WIDTH),
    "conv1d (transformers)": lambda: _conv1d(WIDTH),
    "layer_norm": lambda: nn.LayerNorm(WIDTH),
    "rms_norm": lambda: nn.RMSNorm(WIDTH),
    "jvp_rule (a row-wise layer)": lambda: ScaledTanh(WIDTH),
    "general rule (per-domain VJPs)": lambda: Gated(WIDTH),
}


class Stack(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(DEPTH))
        self.mix = torch.randn(WIDTH, WIDTH) / WIDTH ** 0.5  # a buffer-like fixed map, not a parameter

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) @ self.mix
        return x


def rule_step(layer, method):
    """One forward and backward of a stack of `layer`, plain or under the probe's record."""
    torch.manual_seed(0)
    model = Stack(LAYERS[layer])
    x = torch.randn(*ROWS, WIDTH)
    ids = torch.arange(ROWS[0]) % K
    probe = AlignmentProbe(model, K, strict=True)
    model(x).square().mean().backward()
    probe.set_target()

    def step():
        model.zero_grad(set_to_none=True)
        if method == "plain":
            model(x).square().mean().backward()
        else:
            with probe.record(ids):
                model(x).square().mean().backward()

    step()
    return step


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", LAYERS)
def test_rule_cost(benchmark, layer, method):
    step = rule_step(layer, method)
    benchmark.group = f"probe rule: {layer}, {DEPTH} layers, {ROWS[0]}x{ROWS[1]} rows of {WIDTH}, k={K}"
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["baseline"] = method == "plain"


def interleaved(rounds):
    """Each round times a plain and a probed step in turn, so that a change in the machine's load
    hits them alike; prints each rule's median ratio to plain (quartiles)."""
    print(f"{DEPTH} layers, {ROWS[0]}x{ROWS[1]} rows of {WIDTH}, k={K}, {rounds} interleaved rounds")
    for layer in LAYERS:
        times = interleaved_times({method: rule_step(layer, method) for method in METHODS}, rounds)
        q1, median, q3 = ratio_quartiles(times["probe"], times["plain"])
        print(f"    {layer:<32} plain {statistics.median(times['plain']) * 1e3:7.1f} ms   probe {median:5.2f}x "
              f"(quartiles {q1:.2f}-{q3:.2f})", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="probe rule costs from interleaved rounds (see the docstring)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of one step per method (default: 15)")
    interleaved(parser.parse_args().rounds)
