"""The AlignmentProbe around a training step, scoring k = 8 domains: the plain forward+backward
(the named baseline), the probe's current form (one extra GEMM-sized product per linear layer)
and its fused form (AlignmentProbe(fused=True): the dots inside the weight-gradient GEMM), on
8 x 256 tokens at width 768 (the demo model on its own batch, below), one domain per sequence
(cycling through the k), fp32, on the CPU (and on a GPU when one is visible):

- "mlp": 2 linear layers of width 768 with tanh between (bench_fused_linear.py's layers, here
  under the probe), a summed loss;
- "gpt": a fastmix GPT of 2 blocks at width 768 (12 heads, 257-token vocabulary);
- "demo": the demo's model, a GPT of 2 blocks at width 128 (4 heads), on its 16 x 64 tokens.

    pytest bench/bench_probe_fused.py --benchmark-min-time=0.05     # pytest-benchmark, one group per model
    python bench/bench_probe_fused.py --rounds 15                    # the same ratios from interleaved rounds

Every method is warmed up by two steps first (the first also runs the probe's first record, the
one that watches the model and never takes the fused form)."""
import statistics

import pytest
import torch
from torch import nn

from conftest import HAS_GPU, interleaved_times, ratio_quartiles, synchronize
from fastmix import AlignmentProbe
from fastmix.model import GPT, GPTConfig

WIDTH, BATCH, TOKENS, K, VOCAB = 768, 8, 256, 8, 257
METHODS = ["plain", "probe-current", "probe-fused"]
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def mlp_setup(device):
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)).to(device)
    x = torch.randn(BATCH, TOKENS, WIDTH, device=device)
    return model, lambda: model(x).sum(), lambda: model(torch.randn(2, TOKENS, WIDTH, device=device)).sum()


def gpt_setup(device, width=WIDTH, heads=12, batch=BATCH, tokens=TOKENS):
    model = GPT(GPTConfig(block_size=tokens, vocab_size=VOCAB, n_layer=2, n_head=heads, n_embd=width)).to(device)
    x = torch.randint(0, VOCAB, (batch, tokens), device=device)
    target = torch.randint(0, VOCAB, (2, tokens), device=device)
    return model, lambda: model(x, torch.roll(x, -1, 1))[1], lambda: model(target, torch.roll(target, -1, 1))[1]


# name: (setup, batch rows, description)
SETUPS = {"mlp": (mlp_setup, BATCH, f"2 linear layers x {WIDTH}, {BATCH}x{TOKENS} tokens"),
          "gpt": (gpt_setup, BATCH, f"GPT 2 layers x {WIDTH}, {BATCH}x{TOKENS} tokens"),
          "demo": (lambda device: gpt_setup(device, 128, 4, 16, 64), 16, "GPT 2 layers x 128 (the demo's), 16x64 tokens")}


def training_step(model_name, method, device="cpu"):
    """One training step's forward and backward (and the probe's result), warmed up."""
    torch.manual_seed(0)
    setup, batch, _ = SETUPS[model_name]
    model, training_loss, target_loss = setup(device)
    ids = torch.arange(batch, device=device) % K
    probe = None if method == "plain" else AlignmentProbe(model, K, fused=method == "probe-fused")
    if probe is not None:
        target_loss().backward()
        probe.set_target()

    def step():
        model.zero_grad(set_to_none=True)
        if probe is None:
            training_loss().backward()
        else:
            probe.reset()
            with probe.record(ids):
                training_loss().backward()
            probe.result()
        synchronize(device)

    step()
    step()
    assert probe is None or bool(probe.fused_layers) == (method == "probe-fused")
    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", sorted(SETUPS))
@pytest.mark.parametrize("method", METHODS)
def test_probe_fused_step(benchmark, device, model_name, method):
    benchmark.group = f"probe around a training step, {SETUPS[model_name][2]}, k={K} ({device} fp32)"
    step = training_step(model_name, method, device)
    if method == "plain":
        benchmark.extra_info["baseline"] = True
    benchmark(step)


def interleaved(rounds):
    """Each round times one step of every method in turn, so that a change in the machine's load
    hits them alike; prints the medians and each probe method's median ratio to plain (quartiles).
    On a GPU when one is visible, else on the CPU."""
    device = "cuda" if HAS_GPU else "cpu"
    for model_name in sorted(SETUPS):
        times = interleaved_times({method: training_step(model_name, method, device) for method in METHODS}, rounds)
        print(f"{model_name}: {SETUPS[model_name][2]}, k={K}, {rounds} interleaved rounds on {device}")
        for method in METHODS:
            q1, median, q3 = ratio_quartiles(times[method], times["plain"])
            print(f"    {method:<14} {statistics.median(times[method]) * 1e3:9.1f} ms   {median:5.2f}x plain "
                  f"(quartiles {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="probe step ratios from interleaved rounds (see the docstring)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of one step per method (default: 15)")
    interleaved(parser.parse_args().rounds)
