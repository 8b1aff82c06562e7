"""The Mixer protocol, the context the training loop hands to mixers, and the mixer registry.

The loop calls `mixer.update(ctx)` once per optimizer step, after the step (gradients are
cleared at the start of the next one, so a mixer may run its own backward passes), then
feeds `mixer.weights` to the sampler for the next batch. The mixer decides by itself whether
a step is an update step (e.g. every `interval` steps). Under torch.distributed every rank
must end up with the same weights (the sampler checks nothing; the loop checks at evals).
"""
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Protocol, runtime_checkable

import torch


@dataclass
class MixerContext:
    step: int                      # the optimizer step just taken (1-based)
    lr: float                      # learning rate of that step
    model: torch.nn.Module         # the unwrapped model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    batch: tuple                   # (x, y, domain_ids) of the step, on `device`
    loss_fn: Callable              # loss_fn(model, x, y) -> scalar loss
    target_batch: Optional[Callable]  # target_batch() -> (x, y) of the target task on `device`; None without a target
    balanced_batch: Callable       # balanced_batch(rows_per_domain) -> (x, y, domain_ids), rows of every domain
    device: torch.device
    autocast: Callable[[], ContextManager]  # autocast() -> the loop's mixed-precision context
    num_domains: int


@runtime_checkable
class Mixer(Protocol):
    @property
    def weights(self) -> torch.Tensor:
        """Current domain weights: float64 CPU tensor of shape (k,), non-negative, summing to 1."""

    def update(self, ctx: MixerContext) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# name -> factory(store, **options) -> Mixer. New mixers register with one entry.
MIXERS: dict = {}


def register_mixer(name, factory):
    MIXERS[name] = factory
    return factory


def build_mixer(name, store, **options):
    """The mixer `name` for a DomainStore; `options` are passed to its factory."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; available: {', '.join(sorted(MIXERS))}")
    return MIXERS[name](store, **options)
