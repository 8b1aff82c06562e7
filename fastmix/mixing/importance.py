"""Importance sampling over clusters (CRISP, Grangier et al.): the baseline of the DGA paper.

Each domain (cluster) weighs the share of the target's documents that fall in it: its
histogram, recorded by `fastmix prepare --cluster K --target NAME=PATH`, smoothed by adding
`smoothing` documents to every cluster and mixed with uniform by `floor`. Static: the weights
never change during training, whatever the model learns.
"""
import torch

from fastmix.mixing.base import check_number, register_mixer
from fastmix.mixing.baselines import StaticMixer


class ImportanceSampling(StaticMixer):
    """Weights (h_i + smoothing) / Σ (h + smoothing), then (1 − floor) · w + floor / k, for a
    target's cluster histogram h (documents per cluster)."""

    def __init__(self, histogram, smoothing=0.5, floor=0.01):
        self.smoothing = check_number("smoothing", smoothing, 0)
        self.floor = check_number("floor", floor, 0, 1)
        h = torch.as_tensor(histogram, dtype=torch.float64)
        if h.dim() != 1 or not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
            raise ValueError("the histogram must be a vector of finite, non-negative counts")
        if not float(h.sum() + self.smoothing * h.numel()) > 0:
            raise ValueError("the histogram is all zeros and smoothing is 0: no weights")
        smoothed = (h + self.smoothing) / (h + self.smoothing).sum()
        super().__init__((1 - self.floor) * smoothed + self.floor / h.numel())


def target_histogram(store, target=None):
    """The cluster histogram of `target` (default: the store's first target that has one)."""
    histograms = (store.meta.get("clusters") or {}).get("target_histograms") or {}
    if not histograms:
        raise ValueError(f"the store {store.path} has no target histograms: make it with "
                         "`fastmix prepare OUT --cluster K --input PATH --target NAME=PATH`")
    if target is None:
        target = next(name for name in store.targets if name in histograms)
    if target not in histograms:
        raise ValueError(f"target={target!r} has no histogram; the store's: {', '.join(histograms)}")
    return histograms[target]


def _build_importance(store, target=None, smoothing=0.5, floor=0.01):
    return ImportanceSampling(target_histogram(store, target), smoothing, floor)


register_mixer("importance", _build_importance)
