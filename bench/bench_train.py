"""Training throughput and sampler cost.

    pytest bench/bench_train.py                     # CPU (and CUDA when a GPU is visible)
    pytest bench/bench_train.py -k sampler

GPT step: tokens/s of one optimizer step (forward, backward, AdamW) at two model sizes; the
figure is in the benchmark's extra_info (and printed with -s). Group "gpt step DEVICE", baseline
the small (demo) model. Sampler: cost of one batch with 10, 10³ and 10⁵ domains under uniform
weights (every batch touches new domains); group "sampler", baseline 10 domains: the ratios
should stay near 1, flat in the number of domains.
"""
import numpy as np
import pytest
import torch

from fastmix.data import DomainStore, MixtureSampler, StoreWriter
from fastmix.model import GPT, GPTConfig, lm_loss

SIZES = {
    "small": dict(n_layer=2, n_head=4, n_embd=128, block_size=64, batch=16),   # the demo's model
    "medium": dict(n_layer=6, n_head=8, n_embd=384, block_size=256, batch=16),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
def test_gpt_step(benchmark, size, device):
    s = SIZES[size]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=s["block_size"], vocab_size=257, n_layer=s["n_layer"], n_head=s["n_head"],
                          n_embd=s["n_embd"])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 257, (s["batch"], s["block_size"]), device=device)
    y = torch.randint(0, 257, (s["batch"], s["block_size"]), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = lm_loss(model, x, y)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    benchmark.group = f"gpt step {device}"
    benchmark.pedantic(step, rounds=10 if device == "cpu" else 50, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(baseline=size == "small", params=model.num_params(), device=device)
    if benchmark.stats:  # None under --benchmark-disable (a smoke run)
        tokens_per_s = s["batch"] * s["block_size"] / benchmark.stats.stats.median
        benchmark.extra_info["tokens_per_s"] = round(tokens_per_s)
        print(f"\nGPT {size} on {device}: {tokens_per_s:,.0f} tokens/s ({model.num_params():,} parameters)")


@pytest.fixture(scope="module", params=[10, 1_000, 100_000], ids=lambda k: f"{k}-domains")
def many_domain_store(request, tmp_path_factory):
    k = request.param
    path = tmp_path_factory.mktemp(f"k{k}") / "store"
    tokens = np.arange(200, dtype=np.uint16)
    with StoreWriter(path, {"type": "byte", "vocab_size": 257}) as w:
        for i in range(k):
            w.add(f"d{i}", tokens, tokens[:2])
    return DomainStore(path)


def test_sampler_batch(benchmark, many_domain_store):
    sampler = MixtureSampler(many_domain_store, None, batch_size=16, block_size=64, seed=0, prefetch=False)
    benchmark.group = "sampler"
    benchmark(sampler.next_batch)
    benchmark.extra_info.update(domains=many_domain_store.num_domains, baseline=many_domain_store.num_domains == 10)
    sampler.close()
