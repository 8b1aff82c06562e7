"""Universal alignment (DoGE-style): DGA whose target is the mean training gradient itself.

No target task is needed: a domain is upweighted when its gradient agrees with the gradient
of the current mixture, Σ_j α_j ∇L_j, which is what the training step just backpropagated
(DoGE's "universal generalisation" objective). The target V is the training step's gradient,
read from `.grad` in `update` (it is still there: the loop clears gradients at the start of
the next step) and divided by the clipping factor, so that clipping does not change η.

- "stratified"/"exact": at an update step t, V = the gradient of step t (at θ_{t-1}), the scores
  from a balanced batch at θ_t, as in DGA.
- "inline": at step t-1 the mixer keeps that step's gradient; at update step t the training
  pass runs under the probe against it: no extra pass at all. The kept gradient is part of the
  state while it is pending, so a resumed run is exact.
"""
import torch

from fastmix.mixing.base import register_mixer
from fastmix.mixing.dga import DGA


class Universal(DGA):
    needs_target = False  # its target is the training gradient

    def __init__(self, num_domains, step_size=100.0, ema=0.2, floor=0.05, interval=10, precondition="none",
                 mode="stratified", rows_per_domain=1):
        super().__init__(num_domains, step_size=step_size, ema=ema, floor=floor, interval=interval,
                         precondition=precondition, mode=mode, rows_per_domain=rows_per_domain, target_every=1)
        self._pending = None  # inline: {name: gradient} of the step before an update step

    @staticmethod
    def _training_grads(ctx):
        coef = float(ctx.grad_clip_coef)
        grads = {}
        for name, p in ctx.model.named_parameters():
            if p.requires_grad:
                grads[name] = (p.grad.detach() / coef) if p.grad is not None else torch.zeros_like(p)
        return grads

    def update(self, ctx):
        if self.mode == "inline" and self.is_update_step(ctx.step + 1):
            grads = self._training_grads(ctx)
            self._pending = {n: g.clone() for n, g in grads.items()}
        super().update(ctx)

    def _set_target(self, ctx, probe):
        """V = the training step's gradient (unclipped), from `.grad`."""
        return self._finish_target(ctx, probe, grads=self._training_grads(ctx))

    def _set_inline_target(self, ctx, probe):
        if self._pending is None:
            return False
        device = {n: p.device for n, p in ctx.model.named_parameters()}
        self._finish_target(ctx, probe, grads={n: g.to(device[n]) for n, g in self._pending.items()})
        self._pending = None
        return True

    def state_dict(self):
        state = super().state_dict()
        if self._pending is not None:
            state["pending_target"] = {n: g.cpu().clone() for n, g in self._pending.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        pending = state.get("pending_target")
        self._pending = None if pending is None else {n: g.clone() for n, g in pending.items()}


register_mixer("universal", lambda store, **options: Universal(store.num_domains, **options), options_of=Universal)
