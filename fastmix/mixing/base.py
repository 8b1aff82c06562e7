"""The Mixer base class, the context the training loop hands to mixers, and the mixer registry.

The loop calls `mixer.update(ctx)` once per optimizer step, after the step (gradients are
cleared at the start of the next one, so a mixer may run its own backward passes), then
feeds `mixer.weights` to the sampler for the next batch. A step whose loss or gradient is not
finite, which the loop skips (`--skip-nonfinite-steps`), gets no update. The mixer decides by
itself whether a step is an update step (e.g. every `interval` steps). Under
torch.distributed every rank must end up with the same weights (the sampler checks nothing;
the loop checks at evals).

A mixer subclasses `Mixer` and gives `weights`, `update`, `state_dict` and `load_state_dict`.
The other hooks do nothing in the base class, and the loop (fastmix train, OnlineMixing, the
Trainer integration) always calls them; a mixer overrides those it needs:

- `check_model(model)`: once after the model is built, before the run directory is written:
  raises ValueError when an option does not fit the model (e.g. Chameleon's `layer=99` on a
  2-layer model), which the loop reports as a mistake in what was asked for, not at a later step.
- `prepare(ctx)`: once before the first step of a run, fresh or resumed (`ctx.step` is the
  number of steps already taken, `ctx.batch` is None). E.g. Chameleon computes embeddings of
  domains added to the store since the checkpoint.
- `record(ctx, domain_ids)`: a context manager that the loop enters around the forward and
  backward of every micro-batch of the training step (`ctx.step` is the step being taken,
  1-based; `ctx.batch` is None). This is how a mixer observes the training pass itself
  (DGA's inline mode: AlignmentProbe; online Chameleon: hidden states). Gradients are zero
  when the first micro-batch's context is entered, so a mixer may run a backward of its own
  there (and must leave `.grad` zeroed).
- `close()`: releases what the mixer attached to the model (hooks, probes); the loop calls it
  when the run ends, also when it ends with an error.
- `summary()`: lines the loop prints under its table at the end of a run (DGA: the memory its
  target takes per rank, beside the model's size).
- `changed_options(saved, options)`: the options whose change a resumed run's saved state
  cannot follow, given the options of the run that saved it and those of the resumed run
  (defaults filled in; both also hold `target`, the target task). The loop refuses such a
  resume. By default: the names in `state_options` whose values differ (==). DGA overrides
  it: `mode`, `precondition` and `target` must stay only where the saved or the new mode is
  inline, the one mode that saves a target; Chameleon: the same proxy file named two ways is
  no change.

And one attribute, `needs_target`: True for a mixer that draws target batches
(`ctx.target_batch`; DGA): the loop then refuses, before the run, a missing target or one whose
training split is too short for one window.
"""
import contextlib
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Union

import torch


@dataclass
class MixerContext:
    step: int                      # the optimizer step just taken (1-based)
    lr: float                      # learning rate of that step
    model: torch.nn.Module         # the unwrapped model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    batch: tuple                   # (x, y, domain_ids) of the step, on `device`
    loss_fn: Callable              # loss_fn(model, x, y) -> scalar loss
    target_batch: Optional[Callable]  # target_batch(rows=None) -> (x, y) of the target task on `device`
    #                                   (rows: default the micro-batch size); None without a target
    balanced_batch: Callable       # balanced_batch(rows_per_domain) -> (x, y, domain_ids), rows of every domain
    device: torch.device
    autocast: Callable[[], ContextManager]  # autocast() -> the loop's mixed-precision context
    num_domains: int
    # the factor gradient clipping multiplied this step's gradients by (1.0: not clipped); the
    # gradients in `.grad` during `update` are the clipped ones. A float, or a 0-d tensor on the
    # model's device (the loop leaves it there: reading it would sync with the GPU every step);
    # use float(...) where a number is needed
    grad_clip_coef: Union[float, torch.Tensor] = 1.0
    # the factor the training loss is multiplied by before its backward (a GradScaler's scale):
    # a mixer observing the training backward (`record`) divides it out
    loss_scale: float = 1.0
    # basis_batch(bases, rows_per_basis) -> (x, y, domain_ids, basis_ids): rows_per_basis rows drawn
    # from each row of `bases` ((m, k) distributions over the domains), grouped by basis (DGA with
    # bases); None where the data has no such batches
    basis_batch: Optional[Callable] = None


class Mixer:
    """Base class of every mixer (see the module docstring): subclasses give `weights`,
    `update`, `state_dict` and `load_state_dict`; the optional hooks here do nothing."""

    needs_target = False
    state_options = ()  # the options the saved state depends on (see changed_options)

    @property
    def weights(self) -> torch.Tensor:
        """Current domain weights: float64 CPU tensor of shape (k,), non-negative, summing to 1."""
        raise NotImplementedError

    def update(self, ctx: MixerContext) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Called on every rank at a checkpoint (so it may be collective); rank 0's is saved."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Called on every rank with the saved state (rank 0's)."""
        raise NotImplementedError

    def check_model(self, model: torch.nn.Module) -> None:
        pass

    def prepare(self, ctx: MixerContext) -> None:
        pass

    def record(self, ctx: MixerContext, domain_ids: torch.Tensor) -> ContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass

    def changed_options(self, saved: dict, options: dict) -> list:
        return [key for key in self.state_options if saved.get(key) != options.get(key)]

    def summary(self) -> list:
        return []


def check_mixer(mixer, what):
    """TypeError unless `mixer` is a Mixer (its hooks are called without looking for them)."""
    if not isinstance(mixer, Mixer):
        raise TypeError(f"{what} must be a fastmix.mixing.Mixer (subclass it: its optional hooks do nothing "
                        f"until overridden), got {type(mixer).__name__}")
    return mixer


# name -> factory(store, **options) -> Mixer. New mixers register with one entry.
MIXERS: dict = {}


def check_counts(**counts):
    """Raises ValueError naming the first option that is not an integer >= 1 (a float such as
    2.7 would be truncated silently, a bool taken for 0 or 1)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_number(name, value, low=-math.inf, high=math.inf, *, low_open=False, high_open=False):
    """float(value), or a ValueError naming the option unless `value` is a finite real number
    (not a bool, a string or None, as --mixer-option can give) within [low, high] (an open end
    where low_open / high_open)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if math.isinf(high):
            bound = f"{'>' if low_open else '>='} {low}"
        else:
            bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def register_mixer(name, factory, options_of=None):
    """Registers factory(store, **options) -> Mixer as `name`. A factory that passes its options
    on to a class names it in `options_of`: the class's parameters after its first (which the
    factory fills from the store) become the factory's signature, so that build_mixer can tell
    an unknown option, and list the known ones."""
    if options_of is not None:
        options = list(inspect.signature(options_of).parameters.values())[1:]
        store = inspect.Parameter("store", inspect.Parameter.POSITIONAL_ONLY)
        factory.__signature__ = inspect.Signature([store, *options])
    MIXERS[name] = factory
    return factory


def mixer_options(name):
    """{option: default} of the mixer `name`, from its factory's signature; None when the factory
    takes **options that it passes on unnamed (they are then not checked)."""
    options = list(inspect.signature(MIXERS[name]).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in options):
        return None
    return {p.name: p.default for p in options}


def build_mixer(name, store, **options):
    """The mixer `name` for a DomainStore; `options` are passed to its factory."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; available: {', '.join(sorted(MIXERS))}")
    known = mixer_options(name)
    unknown = [key for key in options if known is not None and key not in known]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for mixer {name!r}; its options: "
                         f"{', '.join(known) or 'none'}")
    return check_mixer(MIXERS[name](store, **options), f"what the factory of mixer {name!r} returned")
