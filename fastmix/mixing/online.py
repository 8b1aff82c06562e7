"""OnlineMixing: a mixer (DGA, universal, Chameleon, ...) driven from any training loop.

    mixing = OnlineMixing(DGA(num_domains, mode="inline"), model, optimizer, data, target="english")
    for x, y, domain_ids in loader:                      # rows drawn with mixing.weights
        optimizer.zero_grad()
        with mixing.record(domain_ids):                  # every micro-batch's forward + backward
            loss_fn(model, x, y).backward()
        optimizer.step()
        mixing.step()                                    # once per optimizer step, before zero_grad
    torch.save(mixing.state_dict(), "mixing.pt")         # and mixing.load_state_dict(...) to resume

`data` is where the mixer draws its extra batches: any object with `balanced_batch(rows_per_domain)
-> (x, y, domain_ids)` (rows of every domain, grouped by domain) and `target_batch(name, rows) ->
(x, y)`, and optionally `set_weights(weights)`, which `step` calls with the new weights, and
`basis_batch(bases, rows_per_basis) -> (x, y, domain_ids, basis_ids)`, which DGA with `bases` needs.
fastmix.data.MixtureSampler (over a DomainStore) and fastmix.data.DomainMixture (over the user's
own per-domain datasets) are such objects; the batches are moved to `device`.

What the training loop must do, and why:
- `step(lr)` right after `optimizer.step()` (after `scaler.step(optimizer)` with a GradScaler),
  while `.grad` still holds the step's gradients (universal DGA reads them) and before the next
  `zero_grad()`. The mixer may run forwards and backwards of its own there (DGA's target and
  balanced batches) and leaves `.grad` zeroed. `lr` defaults to the first param group's.
- `record(domain_ids)` around the forward and backward of every micro-batch of a step (with
  gradient accumulation: each one). Mixers that watch the training pass (DGA/universal
  mode="inline", Chameleon source="online") do their work there; for the others it does
  nothing, so a loop may always use it. At the first micro-batch of an inline DGA update step
  the mixer runs the target batch's forward and backward and zeroes `.grad` again: enter it
  after `zero_grad()`, before the first forward.
- Under DDP pass the DDP-wrapped model or the module itself (the mixer's own passes use the
  module, without DDP's gradient hooks); train through the wrapper as usual. Every rank must
  call `step`, `record` and `state_dict` alike (they may be collective); the weights come out
  the same on every rank.
"""
import contextlib

import torch
import torch.nn.functional as F

from fastmix.mixing.base import MixerContext, check_mixer

STATE_FORMAT = 1


def causal_lm_loss(model, x, y):
    """Mean next-token cross-entropy of model(x) against y (the targets already shifted by one),
    in float32 at least. Takes a Hugging Face causal LM (its output's `.logits`), fastmix's GPT
    (a `(logits, loss)` tuple) or a model returning logits."""
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide.reshape(-1, logits.size(-1)), y.reshape(-1))


def unwrap_model(model):
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; any other model itself."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def grad_clip_coef(grad_norm, max_norm):
    """The factor torch.nn.utils.clip_grad_norm_(params, max_norm) multiplied the gradients by,
    from the norm it returned: min(1, max_norm / (grad_norm + 1e-6)). A tensor stays a tensor
    (reading it would sync with the GPU)."""
    if torch.is_tensor(grad_norm):
        return torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
    return min(1.0, max_norm / (float(grad_norm) + 1e-6))


class OnlineMixing:
    """Drives `mixer` from a training loop (see the module docstring).

    mixer: a Mixer (fastmix.mixing.DGA, Universal, Chameleon, ...), built for the same number of
        domains as `data` has.
    model: the model being trained (DDP-wrapped or not).
    optimizer: its optimizer (DGA's precondition="adam" reads Adam's second moments from it).
    data: the mixer's batches (see the module docstring).
    target: the name of the target task `data.target_batch` is asked for (DGA needs one).
    loss_fn(model, x, y) -> scalar: the training loss (default: causal_lm_loss).
    autocast: a factory of the loop's mixed-precision context, e.g.
        `lambda: torch.autocast("cuda", torch.bfloat16)`; the mixer's own passes run under it.
    grad_scaler: the loop's torch.amp.GradScaler, if any: the inline probe divides the scaled
        training gradients by its scale.
    device: where the mixer's batches go (default: the model's first parameter's device).
    """

    def __init__(self, mixer, model, optimizer, data, *, target=None, loss_fn=causal_lm_loss,
                 autocast=contextlib.nullcontext, grad_scaler=None, device=None):
        check_mixer(mixer, "mixer")
        for name in ("balanced_batch", "target_batch"):
            if not callable(getattr(data, name, None)):
                raise TypeError(f"data must have a {name}() method (a fastmix.data.MixtureSampler or "
                                f"DomainMixture), got {type(data).__name__}")
        if mixer.needs_target and target is None:
            raise ValueError(f"{type(mixer).__name__} needs a target task: pass target=NAME (a target of data)")
        self.mixer = mixer
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.data = data
        self.target = target
        self.loss_fn = loss_fn
        self.autocast = autocast
        self.grad_scaler = grad_scaler
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.step_count = 0  # optimizer steps taken
        self._prepared = False
        mixer.check_model(self.model)

    @property
    def weights(self):
        """The domain weights to draw the next batch with: float64 CPU tensor (k,), summing to 1."""
        return self.mixer.weights

    def context(self, lr, grad_clip_coef=1.0, step=None):
        """The MixerContext of optimizer step `step` (default: the next one) at learning rate `lr`."""
        def to_device(*tensors):
            return tuple(t.to(self.device, non_blocking=True) for t in tensors)

        def target_batch(rows):
            return to_device(*self.data.target_batch(self.target, rows))

        def basis_batch(bases, rows):
            return to_device(*self.data.basis_batch(bases, rows))

        scale = self.grad_scaler.get_scale() if self.grad_scaler is not None and self.grad_scaler.is_enabled() \
            else 1.0
        return MixerContext(
            step=self.step_count + 1 if step is None else step, lr=float(lr), model=self.model,
            optimizer=self.optimizer, batch=None, loss_fn=self.loss_fn,
            target_batch=target_batch if self.target is not None else None,
            balanced_batch=lambda rows: to_device(*self.data.balanced_batch(rows)), device=self.device,
            autocast=self.autocast, num_domains=len(self.mixer.weights), grad_clip_coef=grad_clip_coef,
            loss_scale=scale, basis_batch=basis_batch if hasattr(self.data, "basis_batch") else None)

    def _current_lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def prepare(self):
        """Runs the mixer's preparation (e.g. Chameleon's embeddings of domains it has none of) once,
        before the first step of a run, fresh or resumed; `record` and `step` call it when it has
        not run. Call it yourself before torch.compile, which ignores hooks added to a traced model."""
        if self._prepared:
            return
        self._prepared = True
        self.mixer.prepare(self.context(self._current_lr(), step=self.step_count))
        self._publish()

    def record(self, domain_ids, lr=None):
        """Context manager around one micro-batch's forward and backward of the coming optimizer
        step: `domain_ids` (B,) the domain of each row of the micro-batch. `lr`: that step's
        learning rate (default: the first param group's)."""
        self.prepare()
        return self.mixer.record(self.context(self._current_lr() if lr is None else lr), domain_ids)

    def step(self, lr=None, *, grad_norm=None, max_norm=None):
        """Call once per optimizer step, after it (see the module docstring). `lr`: the learning rate
        of the step just taken (default: the first param group's). With gradient clipping, pass
        the norm clip_grad_norm_ returned and its max_norm (universal DGA unclips the gradients).
        Returns the new weights, and gives them to data.set_weights if it has one."""
        self.prepare()
        if (grad_norm is None) != (max_norm is None):
            raise ValueError("grad_norm and max_norm go together: give both (clipping) or neither")
        coef = 1.0 if grad_norm is None else grad_clip_coef(grad_norm, max_norm)
        self.step_count += 1
        self.mixer.update(self.context(self._current_lr() if lr is None else lr, coef, step=self.step_count))
        return self._publish()

    def _publish(self):
        weights = self.mixer.weights
        set_weights = getattr(self.data, "set_weights", None)
        if set_weights is not None:
            set_weights(weights)
        return weights

    def state_dict(self):
        """The step count and the mixer's state. Call on every rank (the mixer may gather)."""
        return {"format_version": STATE_FORMAT, "mixer_class": type(self.mixer).__name__,
                "step": self.step_count, "mixer": self.mixer.state_dict()}

    def load_state_dict(self, state):
        """Restores a state_dict() (before the resumed run's first step); the data side restores
        its own state (its state_dict holds its weights and draw counters)."""
        version = state.get("format_version")
        if version != STATE_FORMAT:
            raise ValueError(f"OnlineMixing state of format version {version!r}; this fastmix reads {STATE_FORMAT}")
        if state["mixer_class"] != type(self.mixer).__name__:
            raise ValueError(f"OnlineMixing state is of a {state['mixer_class']} mixer, not {type(self.mixer).__name__}")
        self.mixer.load_state_dict(state["mixer"])
        self.step_count = int(state["step"])
        self._prepared = False

    def close(self):
        """Detaches what the mixer attached to the model (hooks, probes)."""
        self.mixer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

