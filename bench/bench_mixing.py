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

    def __init__(self, store, mixer, device):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = GPT(GPTConfig(block_size=BLOCK, vocab_size=store.vocab_size, n_layer=2, n_head=4,
                                   n_embd=128)).to(self.device)
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


def _bench(benchmark, stores, k, interval, mode, device):
    store = stores[k]
    mixer = Uniform(store.num_domains) if mode == "plain" else DGA(store.num_domains, mode=mode, interval=interval)
    loop = Loop(store, mixer, device)
    loop.steps(interval)  # warm-up (one update)
    rounds = (3 if mode == "exact" else 8 if interval > 1 else 15) if device == "cpu" else 20
    benchmark.group = f"k{k}-interval{interval}-{device}"
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


def interleaved(pairs=15):
    """Ratios measured by alternating rounds of plain training and of each mode (the median of
    the per-pair ratios): robust to load that drifts during the run, unlike separate tests.

        python bench/bench_mixing.py [--pairs N]      # more pairs: a tighter median on a noisy machine
    """
    import tempfile

    stores = make_stores(tempfile.mkdtemp())
    settings = [(10, 1, m) for m in ("stratified", "inline", "exact")] + \
               [(10, 10, m) for m in ("stratified", "inline", "exact")] + \
               [(k, 1, m) for k in (8, 64) for m in ("stratified", "exact")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    print(f"device {device}; ratio = step time / plain step time (median of {pairs} interleaved pairs)")
    for k, interval, mode in settings:
        plain = Loop(stores[k], Uniform(k), device)
        mixed = Loop(stores[k], DGA(k, mode=mode, interval=interval), device)
        plain.steps(interval)
        mixed.steps(interval)
        rounds = pairs if mode != "exact" or interval > 1 else max(5, pairs // 3)
        times = interleaved_times({"plain": lambda: plain.steps(interval), "mixed": lambda: mixed.steps(interval)},
                                  rounds)
        low, results[k, interval, mode], high = ratio_quartiles(times["mixed"], times["plain"])
        plain_ms = statistics.median(times["plain"]) / interval * 1e3
        print(f"k={k:<3} interval={interval:<3} {mode:<11} {results[k, interval, mode]:5.2f}x "
              f"(quartiles {low:.2f}-{high:.2f}; plain {plain_ms:.1f} ms/step)", flush=True)
        plain.sampler.close()
        mixed.sampler.close()
    for k in (8, 10, 64):  # the update's own cost is the step's ratio minus the plain step
        exact, stratified = results[k, 1, "exact"], results[k, 1, "stratified"]
        print(f"k={k:<3} exact / stratified at interval 1: step {exact / stratified:.2f}x, "
              f"update alone {(exact - 1) / (stratified - 1):.2f}x")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="DGA step overheads from interleaved rounds (see the docstring)")
    parser.add_argument("--pairs", type=int, default=15, help="plain/mixed round pairs per setting (default: 15)")
    interleaved(parser.parse_args().pairs)
