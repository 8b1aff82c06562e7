"""A training step's forward and backward through 2 linear layers of width 768 (8 x 256 tokens,
k = 8 domains): plain nn.Linear (the named baseline), the current probe form's extra work
(plain backward + domain_grad_dots per layer) and fused_linear (.grad and the dots in one pass)."""
import pytest
import torch
from torch import nn

import fastmix.ops as ops

WIDTH, BATCH, TOKENS, K = 768, 8, 256, 8


@pytest.mark.parametrize("method", ["plain", "current", "fused"])
def test_linear_training_step(benchmark, method):
    benchmark.group = f"2 x Linear({WIDTH}) forward+backward, {BATCH}x{TOKENS} tokens, k={K} (CPU fp32)"
    torch.manual_seed(0)
    layers = [nn.Linear(WIDTH, WIDTH) for _ in range(2)]
    x = torch.randn(BATCH, TOKENS, WIDTH, requires_grad=True)
    ids = torch.randint(0, K, (BATCH,))
    targets = [torch.randn(WIDTH, WIDTH) for _ in layers]

    def step():
        h, seen = x, []
        for layer, target in zip(layers, targets):
            if method == "fused":
                h = ops.fused_linear(h, layer.weight, layer.bias, ops.DomainDots(target, ids, K, validate_ids=False))
            else:
                inp, h = h, layer(h)
                if method == "current":
                    h.register_hook(lambda g, inp=inp, target=target: seen.append(ops.domain_grad_dots(
                        inp.detach(), g, ids, K, target, validate_ids=False)))
            h = torch.tanh(h)
        h.sum().backward()

    if method == "plain":
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=1)
