"""The AlignmentProbe around a training step, scoring k = 8 domains: the plain forward+backward
(the named baseline), the probe's current form (one extra GEMM-sized product per linear layer)
and its fused form (AlignmentProbe(fused=True): the dots inside the weight-gradient GEMM), on
8 x 256 tokens at width 768, one domain per sequence, fp32 on the CPU:

- "mlp": 2 linear layers of width 768 with tanh between (bench_fused_linear.py's layers, here
  under the probe), a summed loss;
- "gpt": a fastmix GPT of 2 blocks at width 768 (12 heads, 257-token vocabulary).

Run with a short --benchmark-min-time; every method is warmed up by one step first (which also
runs the probe's first record, the one that watches the model and never takes the fused form)."""
import pytest
import torch
from torch import nn

from conftest import synchronize
from fastmix import AlignmentProbe
from fastmix.model import GPT, GPTConfig

WIDTH, BATCH, TOKENS, K, VOCAB = 768, 8, 256, 8, 257


def mlp_setup():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
    x = torch.randn(BATCH, TOKENS, WIDTH)
    return model, lambda: model(x).sum(), lambda: model(torch.randn(2, TOKENS, WIDTH)).sum()


def gpt_setup():
    model = GPT(GPTConfig(block_size=TOKENS, vocab_size=VOCAB, n_layer=2, n_head=12, n_embd=WIDTH))
    x = torch.randint(0, VOCAB, (BATCH, TOKENS))
    target = torch.randint(0, VOCAB, (2, TOKENS))
    return model, lambda: model(x, torch.roll(x, -1, 1))[1], lambda: model(target, torch.roll(target, -1, 1))[1]


SETUPS = {"mlp": mlp_setup, "gpt": gpt_setup}


@pytest.mark.parametrize("model_name", sorted(SETUPS))
@pytest.mark.parametrize("method", ["plain", "probe-current", "probe-fused"])
def test_probe_fused_step(benchmark, model_name, method):
    benchmark.group = f"probe around a training step, {model_name} 2 layers x {WIDTH}, {BATCH}x{TOKENS} tokens, k={K} (CPU fp32)"
    torch.manual_seed(0)
    model, training_loss, target_loss = SETUPS[model_name]()
    ids = torch.arange(BATCH) % K
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
        synchronize("cpu")

    step()  # warm-up (and the probe's watched first record)
    if probe is not None:
        step()
        assert bool(probe.fused_layers) == (method == "probe-fused")
    if method == "plain":
        benchmark.extra_info["baseline"] = True
    benchmark(step)
