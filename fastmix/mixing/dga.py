"""DGA — Dynamic Gradient Alignment: online domain weights that follow the target's gradient.

Every `interval` steps each domain gets a score `a_i = ⟨∇L_i(θ), ∇L_target(θ)⟩` (L_i: the mean
loss of domain i's rows) and the weights move by exponentiated gradient:

    log α_i += η_t · a_i,   η_t = lr_t · step_size      (α renormalised: a softmax)
    α ← β · α_old + (1 − β) · α_new                        (EMA, β = `ema`)
    α ← (1 − ε) · α + ε / k                                (floor, ε = `floor`)

Three estimators of `a` (`mode`):

- "exact": the published way. A balanced batch (`rows_per_domain` rows of every domain), one
  forward and backward per domain, flattened gradients dotted with the flattened target
  gradient. k + 1 backward passes per update: the reference, slow by design.
- "stratified" (default): the same balanced batch in ONE forward and backward, with an
  AlignmentProbe splitting the gradient by domain. Same estimator as
  "exact" (equal up to float rounding; tested), at the cost of one pass plus the target's.
- "inline": no extra pass but the target's. At an update step the loop's own training
  forward and backward run under the probe (the `record` hook of fastmix.mixing.Mixer), so the
  scores come from the training batch itself. The target gradient must be known before that
  backward (gradients accumulate in `.grad`), so at the first micro-batch of an update step,
  while `.grad` is still zero, the mixer runs the target batch's forward and backward,
  snapshots `.grad` as V, and zeroes it again: V and the domain gradients are then taken at
  the same parameters θ_t, exactly like the other modes. Domains absent from the batch keep
  their last score (0 before their first appearance). The target pass is the one extra cost,
  so it is refreshed every `target_every` steps (default 10) and reused in between: at
  interval >= 10 every update gets a fresh target; at interval 1 nine steps in ten reuse a
  target up to 9 steps old (the reused target is saved with the state, for an exact resume).

Score normalisation: the probe returns ⟨∇ of the backpropagated loss restricted to domain i's
rows, V⟩. With a batch-mean loss over R rows that is (n_i / R) · ⟨∇L_i, V⟩, so
a_i = dots_i · R / n_i. Under torch.distributed the probe averages the dots over ranks (as DDP
averages gradients) and sums the counts, so R is the rows of all ranks together; the scores,
hence the weights, are then the same on every rank; the balanced batch is split between the ranks (each takes `rows_per_domain`
rows of every domain).

Distribution reweighting (`bases`, the DGA paper's variant for thousands of domains): the
weights are α = Σ_j β_j P_j over m basis distributions P_j (the rows of an (m, k) non-negative
matrix, each normalised to sum to 1), and the update above moves β over the m bases instead of
α (EMA and floor on β, floor ε / m; so α_i >= ε / m · Σ_j P_j(i), and a domain no basis weighs
is never drawn). Basis j's score is ⟨∇L_{P_j}, ∇L_target⟩, L_{P_j} the mean loss of
`rows_per_basis` rows (default 4) drawn from P_j (MixtureSampler.basis_batch: systematic
sampling, its own random stream), all bases in one forward and backward under the probe with a
row's segment its basis, not its domain: the cost grows with m, not with k. By linearity that is
Σ_i (n_ij / rows_per_basis) a_i, n_ij the rows of domain i, an unbiased estimate of
Σ_i P_j(i) a_i, and exact where rows_per_basis · P_j(i) are whole numbers (tested in float64).
"exact" mode runs a backward per basis; "inline" is refused (its rows are drawn by domain).
`bases` is a .npy / .pt / .json file of the matrix, the matrix itself (histograms: nested
lists, an array, a tensor), or "coarse": the coarse level of a store made with
`fastmix prepare --cluster K --coarse K1`, row j the training tokens of coarse cluster j's fine
clusters (fastmix.data.cluster.coarse_bases). The state holds β and the bases, so a resume
continues exactly and refuses other bases. `scores` then holds the m basis scores. Without
`bases` (the default) nothing of this runs and DGA is as described above.

`fused` ("auto", True, False: AlignmentProbe's `fused`, see fastmix.probe.fused): in inline mode,
whether the training backward's linear layers score inside their weight-gradient GEMM; "auto" where
the cost model says it is cheaper (on a CPU: domains of tens of rows or more). The weights are the
same either way, up to float rounding.

`precondition="adam"` scores ⟨g_i, V / (sqrt(v̂) + eps)⟩ with AdamW's bias-corrected second
moments v̂ (the direction Adam would actually move along V); "none" the plain dot product.

A score vector with a NaN or inf skips that update with one warning (the weights stay).
Defaults: step_size 100, interval 10, floor 5% (see docs/evidence.md); EMA 0.2, the
best of {0, 0.2, 0.5} on the built-in corpus (docs/evidence.md).
"""
import contextlib
import math
import warnings

import torch

from fastmix.distributed import all_reduce_sum, rank_and_world, world_size
from fastmix.data.cluster import coarse_bases
from fastmix.mixing.base import Mixer, check_counts, check_number, register_mixer
from fastmix.mixing.bases import COARSE, load_bases
from fastmix.probe import AlignmentProbe
from fastmix.probe.fused import check_fused

MODES = ("exact", "stratified", "inline")
PRECONDITIONS = ("none", "adam")


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adam_preconditioner(model, optimizer):
    """{name: 1 / (sqrt(v̂) + eps)} from an Adam/AdamW optimizer's state; None before its first
    step (no state at all). A trainable parameter without state (not in the optimizer, or no
    gradient yet) gets 0: Adam has not moved it, so it does not count in the direction."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = _trainable(model)
    if not any("exp_avg_sq" in optimizer.state.get(p, {}) for _, p in trainable):
        return None
    out = {}
    for name, p in trainable:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or id(p) not in groups:
            out[name] = torch.zeros_like(p, dtype=torch.float32)
            continue
        group = groups[id(p)]
        step = float(state["step"]) if "step" in state else 1.0
        v_hat = state["exp_avg_sq"].float() / (1 - group["betas"][1] ** max(step, 1.0))
        out[name] = 1.0 / (v_hat.sqrt() + group["eps"])
    return out


def shard_balanced(x, y, ids, num_groups):
    """This rank's share of a batch of `num_groups` equal groups of rows, grouped by `ids` (the
    domains of a balanced batch, the bases of a basis batch), each of rows_per_group * world
    rows: the same number of rows of every group on every rank, disjoint."""
    rank, world = rank_and_world()
    if world == 1:
        return x, y, ids
    per = ids.numel() // num_groups
    index = torch.arange(ids.numel(), device=ids.device).reshape(num_groups, per)[:, rank::world].reshape(-1)
    return x[index], y[index], ids[index]


def normalise_dots(dots, counts, rows):
    """a_i = dots_i · rows / n_i from the probe's result (see the module docstring); NaN where
    n_i = 0 (the domain had no rows)."""
    dots = dots.detach().to("cpu", torch.float64)
    counts = counts.detach().to("cpu", torch.float64)
    return torch.where(counts > 0, dots * rows / counts.clamp(min=1), torch.full_like(dots, math.nan))


def probe_scores(probe, model, loss_fn, x, y, ids, autocast=contextlib.nullcontext):
    """Stratified estimator: a_i for every domain in (x, y, ids) from ONE forward and backward
    under `probe` (whose target must be set). The backward stops at the layers' output
    gradients: no parameter gradient is computed, `.grad` is left as it was."""
    probe.reset()
    with probe.record(ids):
        with autocast():
            loss = loss_fn(model, x, y)
        probe.backward(loss)
    result = checked_result(probe)
    rows = float(result.counts.sum())  # all ranks: the probe averages the dots over ranks, like DDP
    return normalise_dots(result.dots, result.counts, rows)


def checked_result(probe):
    """probe.result(), with a warning when layers scored nothing (e.g. a model compiled before
    the probe hooked it, or weights used functionally): the scores then leave them out."""
    result = probe.result()
    if result.missing:
        warnings.warn(f"DGA: no gradient reached the probe for {result.missing}; their parameters are left out "
                      "of the alignment scores", RuntimeWarning, stacklevel=3)
    return result


def flat_grad(model):
    """All trainable parameters' `.grad`, flattened into one float64 vector (zeros for None)."""
    return _flat_grads([p for _, p in _trainable(model)])


def _flat_grads(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params])


def exact_scores(model, loss_fn, x, y, ids, target, num_domains, autocast=contextlib.nullcontext):
    """Exact estimator (the published way): for each domain a forward and backward of its rows
    alone, the flattened gradient dotted with the flattened `target` (float64). NaN for domains
    without rows. Averaged over ranks."""
    scores = torch.full((num_domains,), math.nan, dtype=torch.float64)
    target = target.to(next(model.parameters()).device)
    params = [p for _, p in _trainable(model)]  # listed once: k backward passes follow
    for i in range(num_domains):
        rows = ids == i
        if not bool(rows.any()):
            continue
        for p in params:
            p.grad = None
        with autocast():
            loss = loss_fn(model, x[rows], y[rows])
        loss.backward()
        scores[i] = float(_flat_grads(params) @ target)
    model.zero_grad(set_to_none=True)
    world = world_size()
    return all_reduce_sum(scores.to(target.device)).cpu() / world if world > 1 else scores


class DGA(Mixer):
    """Dynamic Gradient Alignment (see the module docstring). `weights` is a float64 CPU
    tensor on the simplex, every entry >= floor / k (with bases: >= floor / m · Σ_j P_j(i))."""

    needs_target = True  # every update draws a target batch (see fastmix.mixing.base)

    def __init__(self, num_domains, step_size=100.0, ema=0.2, floor=0.05, interval=10,
                 precondition="none", mode="stratified", rows_per_domain=1, target_rows=4, target_every=10,
                 bases=None, rows_per_basis=4, fused="auto"):
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if precondition not in PRECONDITIONS:
            raise ValueError(f"precondition must be one of {PRECONDITIONS}, got {precondition!r}")
        # numbers checked as numbers: --mixer-option floor=null or ema=x give None or a string
        ema = check_number("ema", ema, 0, 1, high_open=True)
        floor = check_number("floor", floor, 0, 1)
        check_counts(interval=interval, rows_per_domain=rows_per_domain, target_rows=target_rows,
                     target_every=target_every, rows_per_basis=rows_per_basis)
        if bases is not None and mode == "inline":
            raise ValueError("bases need mode 'stratified' or 'exact', which draw a batch from every basis "
                             "distribution; 'inline' scores the training batch, whose rows are drawn by domain")
        step_size = check_number("step_size", step_size, 0)
        check_fused(fused)
        self.fused = fused
        self.num_domains = int(num_domains)
        self.step_size, self.ema, self.floor = step_size, ema, floor
        self.interval, self.mode, self.precondition = int(interval), mode, precondition
        self.rows_per_domain, self.target_rows = int(rows_per_domain), int(target_rows)
        self.target_every, self.rows_per_basis = int(target_every), int(rows_per_basis)
        # (m, k) basis distributions, or None: the update then moves the domain weights themselves
        self.bases = None if bases is None else load_bases(bases, num_domains)
        self.num_scored = num_domains if self.bases is None else len(self.bases)  # domains, or bases
        if self.bases is None:
            self._weights = torch.full((num_domains,), 1.0 / num_domains, dtype=torch.float64)
        else:
            self._basis_weights = torch.full((self.num_scored,), 1.0 / self.num_scored, dtype=torch.float64)
            self._weights = self._mixture_of_bases()
        self.scores = torch.zeros(self.num_scored, dtype=torch.float64)  # last score of every domain (or basis)
        self.updates = 0   # updates applied
        self.skipped = 0   # updates skipped (non-finite scores)
        self._warned = False
        self._probe = None
        self._probe_model = None
        self._inline_step = None  # the step whose training pass the probe is recording
        self._target_step = None  # inline: the step the probe's target was taken at
        self._target_state = None  # inline: the target restored from a checkpoint, not yet on the probe
        self._target_final = True  # False for a target taken before the preconditioner existed
        self._watch_state = None  # the probe's watch_state_dict, restored from a checkpoint or kept by close()

    # ------------------------------------------------------------------ protocol
    @property
    def weights(self):
        return self._weights.clone()

    def changed_options(self, saved, options):
        """The options (`mode`, `precondition`, `target`) a resumed run may not change (see
        fastmix.mixing.base): only an inline run saves state that depends on them (its target's
        gradient, taken in the inline way and preconditioned as `precondition` says), so they must
        stay where the saved or the new mode is inline; the other modes save weights and scores only."""
        if "inline" not in (saved.get("mode"), options.get("mode")):
            return []
        return [key for key in ("mode", "precondition", "target") if saved.get(key) != options.get(key)]

    def summary(self):
        """The memory the target gradient takes on this rank, beside the model's (under FSDP2
        the target is sharded like the parameters and gathered one layer at a time)."""
        if self._probe is None:
            return []
        memory = self._probe.target_memory
        mib = 2.0 ** 20
        return [f"dga target per rank: {memory.held_bytes / mib:.2f} MiB held + at most "
                f"{memory.peak_gathered_bytes / mib:.2f} MiB gathered, for a model of {memory.model_bytes / mib:.2f} "
                f"MiB ({memory.model_bytes_held / mib:.2f} MiB on this rank)"]

    def prepare(self, ctx):
        """Inline mode hooks the training model now, before its first forward: torch.compile
        ignores hooks added to a model it has already traced."""
        if self.mode == "inline":
            self.probe(ctx.model)

    def close(self):
        """Detaches the probe from the model (the loop calls this when the run ends). A target
        that later updates would reuse stays in the state, as on resume."""
        if self._probe is not None:
            if self.mode == "inline" and self._target_step is not None and self._target_state is None:
                self._target_state = self._probe.target_state_dict()
            self._watch_state = self._probe.watch_state_dict() or self._watch_state
            self._probe.remove()
        self._probe = self._probe_model = None

    def is_update_step(self, step):
        return step % self.interval == 0

    def update(self, ctx):
        if not self.is_update_step(ctx.step):
            return
        scores = self._inline_scores(ctx) if self.mode == "inline" else self._scores(ctx)
        if scores is not None:
            self.apply(scores, ctx.lr)

    def record(self, ctx, domain_ids):
        """Inline mode, update steps: the probe around the training step's forward + backward."""
        if self.mode != "inline" or not self.is_update_step(ctx.step):
            return contextlib.nullcontext()
        probe = self.probe(ctx.model)
        if self._inline_step != ctx.step:  # first micro-batch of this step: .grad is zero
            if self._target_state is not None:  # resumed: the target the run was using
                probe.load_target_state_dict(self._target_state)
                self._target_state = None
            stale = self._target_step is None or ctx.step - self._target_step >= self.target_every
            if stale:
                if not self._set_inline_target(ctx, probe):
                    self._inline_step = None
                    return contextlib.nullcontext()
                # an unpreconditioned stand-in (Adam has no statistics yet) serves this step only
                self._target_step = ctx.step if self._target_final else None
            probe.reset()
            self._inline_step = ctx.step
        return probe.record(domain_ids, loss_scale=ctx.loss_scale)

    def state_dict(self):
        state = {"weights": self._weights.clone(), "scores": self.scores.clone(), "updates": self.updates,
                 "skipped": self.skipped, "num_domains": self.num_domains}
        if self.bases is not None:  # the bases too: a resume checks that it reweights the same ones
            state.update(basis_weights=self._basis_weights.clone(), bases=self.bases.clone())
        if self.mode == "inline" and self._target_step is not None and self.target_every > self.interval:
            # the target is reused by later updates: keep it for an exact resume
            target = self._target_state if self._target_state is not None else self._probe.target_state_dict()
            state.update(target_step=self._target_step, target=target)
        watch = self._probe.watch_state_dict() if self._probe is not None else None
        if watch is not None or self._watch_state is not None:  # a resumed probe does not watch again
            state["probe_watch"] = watch if watch is not None else self._watch_state
        return state

    def load_state_dict(self, state):
        k = int(state.get("num_domains", len(state["weights"])))
        if k != self.num_domains:
            raise ValueError(f"{type(self).__name__} state is for {k} domains, but the store has {self.num_domains} "
                             "(only the chameleon mixer takes domains added since the checkpoint)")
        self._check_same_bases(state.get("bases"))
        if self.bases is not None:
            self._basis_weights = state["basis_weights"].to(torch.float64).cpu().clone()
        self._weights = state["weights"].to(torch.float64).cpu().clone()
        self.scores = state["scores"].to(torch.float64).cpu().clone()
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self._target_step = state.get("target_step")
        self._target_state = state.get("target")
        self._watch_state = state.get("probe_watch")

    def _check_same_bases(self, saved):
        """ValueError unless the state was saved with the bases (or without) that this mixer has:
        its basis weights β mean nothing over other bases."""
        if saved is None and self.bases is None:
            return
        saved = None if saved is None else saved.to(torch.float64).cpu()
        if saved is not None and self.bases is not None and torch.equal(saved, self.bases):
            return
        if saved is not None and self.bases is not None and saved.shape == self.bases.shape:
            what = "other bases of the same shape"
        else:
            what = "no bases" if saved is None else f"{len(saved)} bases"
        now = "none" if self.bases is None else f"{len(self.bases)} bases"
        raise ValueError(f"{type(self).__name__} state was saved with {what}, but this run has {now}: resume with "
                         "the bases option the run started with")

    # ------------------------------------------------------------------ the update rule
    def apply(self, scores, lr):
        """One exponentiated-gradient step with scores (k,) at learning rate lr. NaN or inf
        in the scores (or the step) skips the update, with one warning per mixer."""
        scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
        eta = float(lr) * self.step_size
        step = eta * scores
        if not bool(torch.isfinite(step).all()) or not math.isfinite(eta):
            self.skipped += 1
            if not self._warned:
                warnings.warn(f"{type(self).__name__}: non-finite alignment scores {scores.tolist()}; "
                              "update skipped (weights unchanged)", RuntimeWarning, stacklevel=2)
                self._warned = True
            return False
        self.scores = scores.clone()
        if self.bases is None:
            self._weights = self._moved(self._weights, step)
        else:
            self._basis_weights = self._moved(self._basis_weights, step)
            self._weights = self._mixture_of_bases()
        self.updates += 1
        return True

    def _moved(self, weights, step):
        """`weights` (domain or basis weights) after the exponentiated-gradient step, EMA and floor."""
        proposal = torch.softmax(torch.log(weights) + step, 0)
        mixed = self.ema * weights + (1 - self.ema) * proposal
        floored = (1 - self.floor) * mixed + self.floor / len(weights)
        return floored / floored.sum()

    def _mixture_of_bases(self):
        """α = Σ_j β_j P_j, renormalised against rounding."""
        mixture = self._basis_weights @ self.bases
        return mixture / mixture.sum()

    # ------------------------------------------------------------------ estimators
    def probe(self, model):
        if self._probe is None or self._probe_model is not model:
            if self._probe is not None:
                self._probe.remove()
            # a segment per domain, or per basis
            # only inline mode records a training backward: the other modes' passes score alone,
            # where the fused form saves nothing
            self._probe = AlignmentProbe(model, self.num_scored, fused=self.fused if self.mode == "inline" else False)
            self._probe_model = model
            if self._watch_state is not None:
                self._probe.load_watch_state_dict(self._watch_state)
        return self._probe

    def _precondition(self, ctx):
        if self.precondition == "adam":
            return adam_preconditioner(ctx.model, ctx.optimizer)
        return None

    def _target_batch(self, ctx):
        if ctx.target_batch is None:
            raise ValueError(f"{type(self).__name__} needs a target task (--target); the store has none")
        return ctx.target_batch(self.target_rows)

    def _set_target(self, ctx, probe):
        """V = ∇L_target at the current parameters, set on the probe; `.grad` left zeroed.
        Returns V flattened (float64) in the exact mode, else None."""
        model = ctx.model
        model.zero_grad(set_to_none=True)
        tx, ty = self._target_batch(ctx)
        with probe.record_target():  # sets the target from .grad (and keeps rows for the ghost form)
            with ctx.autocast():
                loss = ctx.loss_fn(model, tx, ty)
            loss.backward()
        return self._finish_target(ctx, probe, already_set=True)

    def _finish_target(self, ctx, probe, scale=1.0, grads=None, already_set=False):
        """Sets the probe's target to `grads` (default: the current `.grad`) / scale, times
        the preconditioner if any; zeroes `.grad`; returns the same target flattened (float64)
        in the exact mode, else None."""
        model = ctx.model
        precondition = self._precondition(ctx)
        self._target_final = self.precondition == "none" or precondition is not None
        if precondition is not None or scale != 1.0 or not already_set:
            probe.set_target(grads, precondition=precondition, loss_scale=scale)
        flat = None
        if self.mode == "exact":
            if grads is None:
                flat = flat_grad(model)
            else:
                flat = torch.cat([grads[n].reshape(-1).double() for n, _ in _trainable(model)])
            flat = flat / scale
            if precondition is not None:
                flat = flat * torch.cat([precondition[n].reshape(-1).double() for n, _ in _trainable(model)])
        model.zero_grad(set_to_none=True)
        return flat

    def _set_inline_target(self, ctx, probe):
        self._set_target(ctx, probe)
        return True

    def _scores(self, ctx):
        """Scores of the exact and stratified modes, on a balanced batch (or a basis batch)."""
        model = ctx.model
        probe = self.probe(model)
        target = self._set_target(ctx, probe)
        x, y, ids = self._scoring_batch(ctx)
        if self.mode == "exact":
            scores = exact_scores(model, ctx.loss_fn, x, y, ids, target, self.num_scored, ctx.autocast)
        else:
            scores = probe_scores(probe, model, ctx.loss_fn, x, y, ids, ctx.autocast)
        model.zero_grad(set_to_none=True)
        return scores

    def _scoring_batch(self, ctx):
        """This rank's (x, y, segment ids): a balanced batch by domain, or with bases a batch of
        `rows_per_basis` rows drawn from every basis distribution, each row's segment its basis
        (one score per basis: the cost grows with m, not with the number of domains)."""
        world = world_size()
        if self.bases is None:
            return shard_balanced(*ctx.balanced_batch(self.rows_per_domain * world), self.num_domains)
        if ctx.basis_batch is None:
            raise ValueError(f"{type(self).__name__} with bases needs basis batches, and the data has no "
                             "basis_batch(bases, rows_per_basis) (fastmix.data.MixtureSampler has one)")
        x, y, _, basis_ids = ctx.basis_batch(self.bases, self.rows_per_basis * world)
        return shard_balanced(x, y, basis_ids, self.num_scored)

    def _inline_scores(self, ctx):
        if self._inline_step != ctx.step:  # nothing was recorded at this step (no target yet)
            return None
        self._inline_step = None
        result = checked_result(self._probe)
        rows = float(result.counts.sum())  # all ranks (the probe averages dots over ranks)
        fresh = normalise_dots(result.dots, result.counts, rows)
        seen = result.counts.cpu() > 0
        scores = self.scores.clone()
        scores[seen] = fresh[seen]  # absent domains keep their last score
        return scores


def _build_dga(store, **options):
    # refused now rather than at the first update, after steps of training and a run directory
    if not store.targets:
        raise ValueError(f"DGA needs a target task, and the store {store.path} has none: add one "
                         "(`fastmix prepare ... --target NAME=PATH`), or use --mixer universal, which needs none")
    if isinstance(options.get("bases"), str) and options["bases"] == COARSE:
        options = {**options, "bases": coarse_bases(store)}
    return DGA(store.num_domains, **options)


register_mixer("dga", _build_dga, options_of=DGA)
