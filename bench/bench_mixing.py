"""Overhead of online mixing: training step time with each DGA mode, as a ratio to plain training
(uniform weights) with the same sampler, model and optimizer.

    pytest bench/bench_mixing.py                      # CPU (and CUDA when a GPU is visible)
    pytest bench/bench_mixing.py -k k10
    python bench/bench_mixing.py                      # the same ratios from interleaved rounds

One benchmark round = `interval` training steps of the loop's own step, fastmix.train.TrainStep
(sampler batch, forward, backward, clip, the finite check, AdamW, mixer.update, set_weights,
with the mixer's `record` hook around the forward and backward), so a round holds exactly one
mixer update. Groups:

- k10-interval1 / k10-interval10: the built-in corpus (10 domains), 2-layer 128-wide GPT, batch 16
  × 64 tokens; plain (baseline), DGA stratified, inline and exact.
- k8-interval1 / k64-interval1: synthetic stores of 8 and 64 domains, the same model: plain,
  exact and stratified (the cost of an update against k).
- k10-interval1-cuda-gpt12x768 (on a GPU only): the built-in corpus on a 12-layer 768-wide GPT,
  plain and inline (the GPU goal of inline DGA at interval 1).
"""
import contextlib
import os
import statistics

import numpy as np
import pytest
import torch

from conftest import interleaved_times, ratio_quartiles
from fastmix.data import DomainStore, MixtureSampler, StoreWriter, builtin_store
from fastmix.mixing import DGA, Uniform
from fastmix.model import GPT, GPTConfig
from fastmix.train import MixerContexts, TrainStep

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH, BLOCK, LR = 16, 64, 3e-3
MODELS = {"small": dict(n_layer=2, n_head=4, n_embd=128), "gpt12x768": dict(n_layer=12, n_head=12, n_embd=768)}


def make_stores(directory):
    """{k: store}: the built-in corpus (k = 10) and random-token stores of 8 and 64 domains."""
    out = {10: builtin_store()}
    rng = np.random.default_rng(0)
    for k in (8, 64):
        path = os.path.join(directory, f"k{k}")
        with StoreWriter(path, {"type": "byte", "vocab_size": 257}) as w:
            for i in range(k):
                w.add(f"d{i}", rng.integers(0, 256, 5000, dtype=np.uint16), rng.integers(0, 256, 200, dtype=np.uint16))
            w.add("target", rng.integers(0, 256, 5000, dtype=np.uint16), rng.integers(0, 256, 200, dtype=np.uint16),
                  target=True)
        out[k] = DomainStore(path)
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("stores"))


class Loop:
    """The training loop's own step (fastmix.train.TrainStep), without evaluation, logging or
    checkpoints, at a fixed learning rate."""

    def __init__(self, store, mixer, device, model="small"):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = GPT(GPTConfig(block_size=BLOCK, vocab_size=store.vocab_size, **MODELS[model])).to(self.device)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=device == "cuda")
        self.sampler = MixtureSampler(store, mixer.weights, BATCH, BLOCK, seed=0)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" \
            else contextlib.nullcontext
        contexts = MixerContexts(self.model, optimizer, self.sampler, store.targets[0], self.device, autocast, BATCH)
        self.train_step = TrainStep(self.model, optimizer, self.sampler, mixer, contexts)
        self.step_count = 0

    def steps(self, n):
        for _ in range(n):
            self.train_step(self.step_count, LR)
            self.step_count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _bench(benchmark, stores, k, interval, mode, device, model="small"):
    store = stores[k]
    mixer = Uniform(store.num_domains) if mode == "plain" else DGA(store.num_domains, mode=mode, interval=interval)
    loop = Loop(store, mixer, device, model)
    loop.steps(interval)  # warm-up (one update)
    rounds = (3 if mode == "exact" else 8 if interval > 1 else 15) if device == "cpu" else 20
    benchmark.group = f"k{k}-interval{interval}-{device}" + ("" if model == "small" else f"-{model}")
    benchmark.pedantic(loop.steps, args=(interval,), rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(mode=mode, k=k, interval=interval, device=device)
    if benchmark.stats:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median * 1e3 / interval
    if mode == "plain":
        benchmark.extra_info["baseline"] = True
    loop.sampler.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["plain", "stratified", "inline", "exact"])
@pytest.mark.parametrize("interval", [1, 10])
def test_dga_overhead(benchmark, stores, interval, mode, device):
    _bench(benchmark, stores, 10, interval, mode, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["plain", "stratified", "exact"])
@pytest.mark.parametrize("k", [8, 64])
def test_exact_vs_stratified_in_k(benchmark, stores, k, mode, device):
    _bench(benchmark, stores, k, 1, mode, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU goal's model: minutes a step on a CPU")
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("mode", ["plain", "inline"])
def test_inline_on_a_12_layer_gpt(benchmark, stores, mode, device):
    _bench(benchmark, stores, 10, 1, mode, device, "gpt12x768")


def interleaved(pairs=15):
    """Ratios measured by alternating rounds of plain training and of each mode (the median of
    the per-pair ratios): robust to load that drifts during the run, unlike separate tests.

        python bench/bench_mixing.py [--pairs N]      # more pairs: a tighter median on a noisy machine
    """
    import tempfile

    stores = make_stores(tempfile.mkdtemp())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = [(10, 1, m, "small") for m in ("stratified", "inline", "exact")] + \
               [(10, 10, m, "small") for m in ("stratified", "inline", "exact")] + \
               [(k, 1, m, "small") for k in (8, 64) for m in ("stratified", "exact")] + \
               ([(10, 1, "inline", "gpt12x768")] if device == "cuda" else [])
    results = {}
    print(f"device {device}; ratio = step time / plain step time (median of {pairs} interleaved pairs)")
    for k, interval, mode, model in settings:
        plain = Loop(stores[k], Uniform(k), device, model)
        mixed = Loop(stores[k], DGA(k, mode=mode, interval=interval), device, model)
        plain.steps(interval)
        mixed.steps(interval)
        rounds = pairs if mode != "exact" or interval > 1 else max(5, pairs // 3)
        times = interleaved_times({"plain": lambda: plain.steps(interval), "mixed": lambda: mixed.steps(interval)},
                                  rounds)
        low, ratio, high = ratio_quartiles(times["mixed"], times["plain"])
        results[k, interval, mode, model] = ratio
        plain_ms = statistics.median(times["plain"]) / interval * 1e3
        print(f"k={k:<3} interval={interval:<3} {mode:<11} {ratio:5.2f}x "
              f"(quartiles {low:.2f}-{high:.2f}; plain {plain_ms:.1f} ms/step)"
              + ("" if model == "small" else f", {model}"), flush=True)
        plain.sampler.close()
        mixed.sampler.close()
    for k in (8, 10, 64):  # the update's own cost is the step's ratio minus the plain step
        exact, stratified = results[k, 1, "exact", "small"], results[k, 1, "stratified", "small"]
        print(f"k={k:<3} exact / stratified at interval 1: step {exact / stratified:.2f}x, "
              f"update alone {(exact - 1) / (stratified - 1):.2f}x")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="DGA step overheads from interleaved rounds (see the docstring)")
    parser.add_argument("--pairs", type=int, default=15, help="plain/mixed round pairs per setting (default: 15)")
    interleaved(parser.parse_args().pairs)
