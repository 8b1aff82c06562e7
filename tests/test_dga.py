"""DGA and Universal: the three estimators agree with the published one, the update rule,
robustness (simplex, floor, NaN), and state."""
import contextlib
import inspect
import json
import math
import re
import types
import warnings

import numpy as np
import pytest
import torch

from fastmix.mixing import DGA, MixerContext, Universal, build_mixer
from fastmix.mixing.base import mixer_options
from fastmix.mixing.bases import load_bases
from fastmix.mixing.dga import exact_scores, flat_grad, probe_scores
from fastmix.model import GPT, GPTConfig, lm_loss
from fastmix.probe import AlignmentProbe

K, VOCAB, T = 4, 29, 12


def tiny_gpt(dtype=torch.float32):
    return GPT(GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16)).to(dtype)


def tokens(rows):
    x = torch.randint(0, VOCAB, (rows, T + 1))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def balanced(rows_per_domain, k=K):
    x, y = tokens(rows_per_domain * k)
    return x, y, torch.arange(k).repeat_interleave(rows_per_domain)


class Data:
    """Deterministic batches for a fake MixerContext: the same draws for every mixer."""

    def __init__(self, seed, k=K):
        self.seed, self.k, self.calls = seed, k, 0

    def _gen(self):
        self.calls += 1
        return torch.Generator().manual_seed(self.seed * 1000 + self.calls)

    def target_batch(self, rows=None):
        x = torch.randint(0, VOCAB // 2, (rows or 4, T + 1), generator=self._gen())  # a "task": low tokens
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def balanced_batch(self, rows):
        x = torch.randint(0, VOCAB, (rows * self.k, T + 1), generator=self._gen())
        return x[:, :-1].contiguous(), x[:, 1:].contiguous(), torch.arange(self.k).repeat_interleave(rows)

    def basis_batch(self, bases, rows):
        """rows · P_j(i) rows of domain i for basis j (whole numbers in these tests)."""
        bases = torch.as_tensor(bases, dtype=torch.float64)
        counts = (bases * rows).round().long()
        assert bool((counts.sum(1) == rows).all()), "the fake basis batch needs rows · P_j(i) whole"
        ids = torch.cat([torch.arange(self.k).repeat_interleave(c) for c in counts])
        x = torch.randint(0, VOCAB, (ids.numel(), T + 1), generator=self._gen())
        basis_ids = torch.arange(len(bases)).repeat_interleave(rows)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous(), ids, basis_ids


def make_ctx(model, data, step=10, lr=1e-3, optimizer=None, batch=None, clip=1.0):
    return MixerContext(step=step, lr=lr, model=model, optimizer=optimizer or torch.optim.AdamW(model.parameters()),
                        batch=batch, loss_fn=lm_loss, target_batch=data.target_batch,
                        balanced_batch=data.balanced_batch, device=torch.device("cpu"),
                        autocast=contextlib.nullcontext, num_domains=data.k, grad_clip_coef=clip,
                        basis_batch=data.basis_batch)


def target_flat(model, x, y):
    model.zero_grad(set_to_none=True)
    lm_loss(model, x, y).backward()
    return flat_grad(model)


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_stratified_matches_exact_on_the_same_batch(seed, dtype):
    """The tested claim: one pass with the probe = k backward passes with flattened gradients."""
    model = tiny_gpt(dtype)
    tx, ty = tokens(3)
    probe = AlignmentProbe(model, K, strict=True)
    model.zero_grad()
    with probe.record_target():
        lm_loss(model, tx, ty).backward()
    target = flat_grad(model)
    x, y, ids = balanced(3)
    model.zero_grad(set_to_none=True)
    fast = probe_scores(probe, model, lm_loss, x, y, ids)
    slow = exact_scores(model, lm_loss, x, y, ids, target, K)
    assert rel_err(fast, slow) < (1e-3 if dtype == torch.float32 else 1e-9), (fast, slow)
    assert bool((slow != 0).all())


@pytest.mark.parametrize("precondition", ["none", "adam"])
def test_mixer_modes_exact_and_stratified_agree(seed, precondition):
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = tokens(4)
    lm_loss(model, x, y).backward()
    optimizer.step()  # Adam state for the preconditioner
    got = {}
    for mode in ("exact", "stratified"):
        mixer = DGA(K, mode=mode, precondition=precondition, rows_per_domain=2, interval=5)
        mixer.update(make_ctx(model, Data(seed), step=10, optimizer=optimizer))
        got[mode] = mixer.scores
        assert mixer.updates == 1
        assert all(p.grad is None for p in model.parameters())  # the mixer leaves no gradient behind
    assert rel_err(got["stratified"], got["exact"]) < 1e-3, got


def test_inline_scores_the_training_batch(seed):
    """Inline: the probe on the training pass (two micro-batches) gives the exact scores of
    that batch, against the target taken at the same parameters."""
    model = tiny_gpt(torch.float64)
    mixer = DGA(K, mode="inline", interval=2)
    data = Data(seed)
    micro = [balanced(2) for _ in range(2)]
    ctx = make_ctx(model, data, step=4)
    model.zero_grad(set_to_none=True)
    for x, y, ids in micro:
        with mixer.record(ctx, ids):
            (lm_loss(model, x, y) / 2).backward()
    mixer.update(ctx)
    tx, ty = Data(seed).target_batch(mixer.target_rows)  # the same draw the mixer made
    target = target_flat(model, tx, ty)
    x, y, ids = (torch.cat(parts) for parts in zip(*micro))
    want = exact_scores(model, lm_loss, x, y, ids, target, K)
    assert rel_err(mixer.scores, want) < 1e-9
    # a batch without domain 3: its score stays; off-interval steps record nothing
    last = mixer.scores.clone()
    x, y, ids = balanced(2)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    ctx = make_ctx(model, data, step=6)
    model.zero_grad(set_to_none=True)
    with mixer.record(ctx, ids):
        lm_loss(model, x, y).backward()
    mixer.update(ctx)
    assert mixer.scores[3] == last[3] and mixer.scores[0] != last[0]
    assert isinstance(mixer.record(make_ctx(model, data, step=7), ids), contextlib.nullcontext)


def test_only_inline_takes_the_fused_form(seed):
    """The stratified pass only scores (it computes no weight gradient to fold the dots into):
    its probe never takes the fused form, even with fused=True; inline's training backward does."""
    model = tiny_gpt()
    data = Data(seed)
    stratified = DGA(K, mode="stratified", rows_per_domain=2, interval=1, fused=True)
    inline = DGA(K, mode="inline", interval=1, fused=True)
    x, y, ids = balanced(2)
    for step in (1, 2):  # the first record watches how the model uses its weights: no fused form
        ctx = make_ctx(model, data, step=step)
        stratified.update(ctx)
        model.zero_grad(set_to_none=True)
        with inline.record(ctx, ids):
            lm_loss(model, x, y).backward()
        inline.update(ctx)
    assert stratified.probe(model).fused_layers == []
    assert inline.probe(model).fused_layers  # the Linear layers


def test_universal_target_is_the_training_gradient(seed):
    model = tiny_gpt(torch.float64)
    x, y = tokens(4)
    model.zero_grad()
    lm_loss(model, x, y).backward()
    for p in model.parameters():
        p.grad.mul_(0.5)  # as if clipping had halved it
    training = flat_grad(model) / 0.5
    mixer = Universal(K, rows_per_domain=2, interval=1)
    data = Data(seed)
    mixer.update(make_ctx(model, data, step=1, clip=torch.tensor(0.5)))
    bx, by, bids = Data(seed).balanced_batch(2)
    want = exact_scores(model, lm_loss, bx, by, bids, training, K)
    assert rel_err(mixer.scores, want) < 1e-9


def test_update_rule(seed):
    k, lr, step_size, ema, floor = 5, 2e-3, 100.0, 0.3, 0.1
    mixer = DGA(k, step_size=step_size, ema=ema, floor=floor)
    w = mixer.weights
    for _ in range(3):
        a = torch.randn(k, dtype=torch.float64)
        mixer.apply(a, lr)
        proposal = w * torch.exp(lr * step_size * a)
        proposal /= proposal.sum()
        w = (1 - floor) * (ema * w + (1 - ema) * proposal) + floor / k
        torch.testing.assert_close(mixer.weights, w, rtol=1e-12, atol=1e-15)
    assert torch.equal(mixer.scores, a)


@pytest.mark.parametrize("floor", [0.0, 0.05, 1.0])
def test_weights_stay_on_the_simplex_whatever_the_scores(seed, floor):
    k = 7
    mixer = DGA(k, floor=floor, ema=0.0)
    for scale in [1e-30, 1.0, 1e3, 1e30, 1e300]:
        for _ in range(3):
            mixer.apply(torch.randn(k, dtype=torch.float64) * scale, 3e-3)
            w = mixer.weights
            assert bool(torch.isfinite(w).all()) and abs(float(w.sum()) - 1) < 1e-6
            assert float(w.min()) >= floor / k * (1 - 1e-9)
    assert mixer.skipped == 0


def test_non_finite_scores_skip_the_update_with_one_warning():
    mixer = DGA(3)
    mixer.apply(torch.tensor([1.0, 2.0, 3.0]), 1e-3)
    before = mixer.weights
    with pytest.warns(RuntimeWarning, match="non-finite alignment scores"):
        assert mixer.apply(torch.tensor([1.0, math.nan, 0.0]), 1e-3) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second one is silent
        assert mixer.apply(torch.tensor([math.inf, 0.0, 0.0]), 1e-3) is False
    assert torch.equal(mixer.weights, before) and mixer.skipped == 2 and mixer.updates == 1


def test_state_round_trip_and_mismatch(seed):
    mixer = DGA(4, mode="inline")
    for _ in range(3):
        mixer.apply(torch.randn(4), 1e-2)
    other = DGA(4, mode="inline")
    other.load_state_dict(mixer.state_dict())
    assert torch.equal(other.weights, mixer.weights) and torch.equal(other.scores, mixer.scores)
    assert other.updates == 3
    other.apply(torch.ones(4), 1e-2)
    mixer.apply(torch.ones(4), 1e-2)
    assert torch.equal(other.weights, mixer.weights)
    with pytest.raises(ValueError, match="state is for 4 domains"):
        DGA(5).load_state_dict(mixer.state_dict())


def test_bad_options():
    with pytest.raises(ValueError, match="mode"):
        DGA(3, mode="fast")
    with pytest.raises(ValueError, match="precondition"):
        DGA(3, precondition="sgd")
    with pytest.raises(ValueError, match="ema"):
        DGA(3, ema=1.0)
    for name, value in (("interval", 0), ("interval", 2.7), ("target_every", 0), ("rows_per_domain", True)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got {value!r}"):
            DGA(3, **{name: value})
    with pytest.raises(ValueError, match="step_size must be a finite number >= 0, got '1'"):
        DGA(3, step_size="1")
    # what --mixer-option gives for null, a word, NaN: a message naming the option, not a TypeError
    for name, value in (("floor", None), ("floor", "x"), ("floor", math.nan), ("floor", True), ("ema", None),
                        ("ema", "x"), ("ema", math.inf), ("step_size", None), ("step_size", math.nan)):
        for cls in (DGA, Universal):
            with pytest.raises(ValueError, match=rf"^{name} must be a finite number .*, got {re.escape(repr(value))}$"):
                cls(3, **{name: value})
    assert (DGA(3, ema=0, floor=1, step_size=0).ema, DGA(3, floor=0).floor) == (0.0, 0.0)
    model = tiny_gpt()
    ctx = make_ctx(model, Data(0), step=10)
    ctx.target_batch = None
    with pytest.raises(ValueError, match="needs a target task"):
        DGA(K).update(ctx)


def test_dga_needs_a_target_when_built_universal_does_not():
    """Refused when the mixer is built, not at its first update, after a run directory and steps."""
    store = types.SimpleNamespace(num_domains=K, targets=[], path="/data/store")
    with pytest.raises(ValueError, match="DGA needs a target task, and the store /data/store has none.*universal"):
        build_mixer("dga", store)
    assert build_mixer("universal", store).num_domains == K


def test_unknown_options_are_named_with_the_ones_there_are():
    store = types.SimpleNamespace(num_domains=K, targets=["t"], path="/data/store")
    for name, cls in (("dga", DGA), ("universal", Universal)):
        options = list(inspect.signature(cls).parameters)[1:]  # after num_domains, which the store gives
        assert list(mixer_options(name)) == options
        with pytest.raises(ValueError) as e:
            build_mixer(name, store, stepsize=3)
        assert str(e.value) == f"unknown option 'stepsize' for mixer {name!r}; its options: {', '.join(options)}"
    assert "target_rows" not in mixer_options("universal")  # its target is the training gradient


def resumed_from(state, options):
    mixer = DGA(K, **options)
    mixer.load_state_dict(state)
    return mixer


@pytest.mark.parametrize("target_rows", [4, 1], ids=["dense", "ghost"])
def test_inline_reuses_its_target_for_target_every_steps(seed, target_rows):
    """A resumed run scores against the same target, bitwise, also where the target came from
    few enough rows for the ghost form (with 1 row of 12 tokens, the 16 → 64 MLP layers)."""
    model = tiny_gpt(torch.float64)

    def step(mixer, data, n, batch):
        ctx = make_ctx(model, data, step=n)
        model.zero_grad(set_to_none=True)
        with mixer.record(ctx, batch[2]):
            lm_loss(model, batch[0], batch[1]).backward()
        mixer.update(ctx)
        return mixer.scores.clone()

    # One form for both runs: the resumed probe's first record watches the model (the current
    # form) where the running one may take the fused form, whose dots differ in the last bits.
    options = dict(mode="inline", interval=1, target_every=3, target_rows=target_rows, fused=False)
    mixer, data = DGA(K, **options), Data(seed)
    for n in (1, 2):
        step(mixer, data, n, balanced(1))
    state = mixer.state_dict()
    assert state["target_step"] == 1 and "target" in state
    assert bool(state["target"]["rows"]) == (target_rows == 1)
    resumed = resumed_from(state, options)
    batch = balanced(1)
    assert torch.equal(step(mixer, data, 3, batch), step(resumed, Data(seed + 1), 3, batch))  # same reused target
    for n in (4, 5):
        step(mixer, data, n, balanced(1))
    assert data.calls == 2 and mixer.updates == 5  # targets drawn at steps 1 and 4 only
    state = mixer.state_dict()
    older = {**state, "target": state["target"]["dense"]}  # as saved before the rows were kept
    if target_rows == 4:  # (no rows to lose in the dense form)
        batch = balanced(1)
        assert torch.equal(step(resumed_from(older, options), Data(seed + 2), 6, batch),
                           step(resumed_from(state, options), Data(seed + 3), 6, batch))
    mixer.close()  # the run ends: the state keeps the target step 6 would reuse
    closed = mixer.state_dict()
    assert all(torch.equal(closed["target"]["dense"][n], t) for n, t in state["target"]["dense"].items())
    batch = balanced(1)
    assert torch.equal(step(mixer, data, 6, batch), step(resumed_from(state, options), Data(seed + 1), 6, batch))


def test_adam_preconditioner_gives_zero_to_parameters_adam_has_not_moved(seed):
    from fastmix.mixing.dga import adam_preconditioner

    model = tiny_gpt()
    frozen_out = [p for n, p in model.named_parameters() if n.endswith("ln_f.weight")]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p is not frozen_out[0]])
    assert adam_preconditioner(model, optimizer) is None  # before the first step
    lm_loss(model, *tokens(2)).backward()
    optimizer.step()
    factors = adam_preconditioner(model, optimizer)
    assert bool((factors["transformer.ln_f.weight"] == 0).all())
    assert bool((factors["transformer.h.0.mlp.c_fc.weight"] > 0).all())


def test_inline_does_not_reuse_a_target_taken_before_adam_had_statistics(seed):
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters())
    mixer, data = DGA(K, mode="inline", interval=1, target_every=10, precondition="adam"), Data(seed)
    for n in (1, 2, 3):
        ctx = make_ctx(model, data, step=n, optimizer=optimizer)
        optimizer.zero_grad(set_to_none=True)
        x, y, ids = balanced(1)
        with mixer.record(ctx, ids):
            lm_loss(model, x, y).backward()
        optimizer.step()
        mixer.update(ctx)
    assert data.calls == 2  # step 1's unpreconditioned target served step 1 alone; step 2's is reused


def test_inline_under_torch_compile_and_close(seed):
    """prepare() hooks the model before torch.compile traces it (hooks added later would be
    ignored: all-zero scores); close() takes the hooks off again."""
    model = tiny_gpt(torch.float64)
    compiled = torch.compile(model, backend="eager")
    mixer, data = DGA(K, mode="inline", interval=2), Data(seed)
    mixer.prepare(make_ctx(model, data, step=0))
    for step in (1, 2):  # step 1 is no update step: the compiled model runs before the probe records
        ctx = make_ctx(model, data, step=step)
        x, y, ids = balanced(2)
        model.zero_grad(set_to_none=True)
        with mixer.record(ctx, ids):
            lm_loss(compiled, x, y).backward()
        mixer.update(ctx)
    tx, ty = Data(seed).target_batch(mixer.target_rows)
    want = exact_scores(model, lm_loss, x, y, ids, target_flat(model, tx, ty), K)
    assert rel_err(mixer.scores, want) < 1e-9
    mixer.close()
    assert not any(m._forward_hooks for m in model.modules())


def test_resume_refuses_mode_precondition_and_target_changes_only_around_inline():
    """Only an inline run saves state that depends on mode, precondition and the target (its
    target's gradient): a resume may change them between the other modes, not from or to inline."""
    def changed(name, saved, options):
        mixer = build_mixer(name, types.SimpleNamespace(num_domains=K, targets=["t"], path="/s"), **options)
        defaults = {**mixer_options(name), "target": "t"}
        return mixer.changed_options({**defaults, **saved}, {**defaults, **options})

    assert DGA.needs_target and not Universal.needs_target  # the loop checks the target's length for DGA only
    for name in ("dga", "universal"):
        assert changed(name, {}, {"mode": "exact"}) == []  # stratified (the default) -> exact
        assert changed(name, {"mode": "exact"}, {"mode": "stratified", "precondition": "adam"}) == []
        assert changed(name, {"mode": "inline"}, {"mode": "inline", "interval": 5}) == []
        assert changed(name, {"target": "u"}, {}) == []
        assert changed(name, {}, {"mode": "inline"}) == ["mode"]
        assert changed(name, {"mode": "inline"}, {"mode": "exact"}) == ["mode"]
        assert changed(name, {"mode": "inline"}, {"mode": "inline", "precondition": "adam"}) == ["precondition"]
        assert changed(name, {"mode": "inline", "target": "u"}, {"mode": "inline"}) == ["target"]


# Three bases over the K = 4 domains; with 4 rows per basis every rows · P_j(i) is whole.
BASES = torch.tensor([[2, 1, 1, 0], [0, 0, 2, 2], [1, 1, 1, 1]], dtype=torch.float64) / 4


def by_domain_then_bases(model, x, y, ids, basis_ids, target, bases):
    """Σ_i P_j(i) a_ij: the domain scores of basis j's rows (a backward per domain), mixed by P_j."""
    mixed = torch.zeros(len(bases), dtype=torch.float64)
    for j in range(len(bases)):
        rows = basis_ids == j
        a = exact_scores(model, lm_loss, x[rows], y[rows], ids[rows], target, K)
        weighed = bases[j] > 0
        mixed[j] = (bases[j][weighed] * a[weighed]).sum()
    return mixed


def test_basis_scores_are_the_bases_mixtures_of_domain_scores(seed):
    """Linearity, exactly (float64): one probe pass with a row's segment its basis gives
    ⟨∇L_{P_j}, V⟩ = Σ_i P_j(i) ⟨∇L_ij, V⟩ where basis j's batch holds rows · P_j(i) rows of domain i."""
    model = tiny_gpt(torch.float64)
    m = len(BASES)
    probe = AlignmentProbe(model, m, strict=True)
    model.zero_grad()
    with probe.record_target():
        lm_loss(model, *tokens(3)).backward()
    target = flat_grad(model)
    x, y, ids, basis_ids = Data(seed).basis_batch(BASES, 4)
    model.zero_grad(set_to_none=True)
    by_basis = probe_scores(probe, model, lm_loss, x, y, basis_ids)
    want = by_domain_then_bases(model, x, y, ids, basis_ids, target, BASES)
    assert rel_err(by_basis, want) < 1e-10, (by_basis, want)
    assert rel_err(exact_scores(model, lm_loss, x, y, basis_ids, target, m), want) < 1e-10
    assert bool((want != 0).all())


@pytest.mark.parametrize("mode", ["stratified", "exact"])
def test_dga_with_bases_moves_the_basis_weights(seed, mode):
    """The mixer scores a batch drawn from every basis and moves β by the update rule; α = β @ P."""
    model = tiny_gpt(torch.float64)
    lr, step_size, ema, floor = 1e-3, 100.0, 0.2, 0.05
    mixer = DGA(K, bases=BASES * 7, rows_per_basis=4, interval=5, mode=mode, ema=ema, floor=floor)  # rows normalised
    m = len(BASES)
    assert mixer.num_scored == m and torch.equal(mixer.bases, BASES)
    torch.testing.assert_close(mixer.weights, BASES.mean(0), rtol=1e-15, atol=0)  # β uniform
    mixer.update(make_ctx(model, Data(seed), step=10, lr=lr))
    replay = Data(seed)  # the same draws: the target first, then the basis batch
    target = target_flat(model, *replay.target_batch(mixer.target_rows))
    x, y, ids, basis_ids = replay.basis_batch(BASES, 4)
    want = by_domain_then_bases(model, x, y, ids, basis_ids, target, BASES)
    assert rel_err(mixer.scores, want) < 1e-9
    beta = torch.full((m,), 1 / m, dtype=torch.float64)
    proposal = beta * torch.exp(lr * step_size * mixer.scores)
    beta = (1 - floor) * (ema * beta + (1 - ema) * proposal / proposal.sum()) + floor / m
    torch.testing.assert_close(mixer.weights, beta @ BASES / (beta @ BASES).sum(), rtol=1e-12, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_basis_weights_keep_their_floor_whatever_the_scores(seed):
    floor = 0.1
    mixer = DGA(K, bases=BASES, floor=floor, ema=0.0)
    for scale in (1.0, 1e3, 1e300):
        mixer.apply(torch.randn(len(BASES), dtype=torch.float64) * scale, 3e-3)
        w = mixer.weights
        assert bool(torch.isfinite(w).all()) and abs(float(w.sum()) - 1) < 1e-12
        assert bool((w >= floor / len(BASES) * BASES.sum(0) * (1 - 1e-9)).all())


def test_bases_come_from_files_or_histograms(tmp_path):
    counts = (BASES * 8).tolist()
    np.save(tmp_path / "b.npy", np.asarray(counts))
    torch.save(torch.tensor(counts), tmp_path / "b.pt")
    (tmp_path / "rows.json").write_text(json.dumps(counts))
    (tmp_path / "named.json").write_text(json.dumps({f"coarse{j}": row for j, row in enumerate(counts)}))
    files = [str(tmp_path / name) for name in ("b.npy", "b.pt", "rows.json", "named.json")]
    for given in (counts, np.asarray(counts), *files):
        assert torch.equal(load_bases(given, K), BASES), given
        assert torch.equal(DGA(K, bases=given).bases, BASES)


@pytest.mark.parametrize("bases,message", [
    ([[1, 2, 3]], r"^bases must be an \(m, 4\) matrix, one row per basis distribution .*got shape \(1, 3\)$"),
    ([1, 2, 3, 4], r"got shape \(4,\)$"),
    (np.zeros((0, K)), r"got shape \(0, 4\)$"),
    ([[1, 2], [3]], r"^bases must be an \(m, 4\) matrix of numbers"),
    ([["a", 1, 1, 1]], r"^bases must be an \(m, 4\) matrix of numbers"),
    ([[1, 1, 1, 1], [1, math.nan, 0, 0]], r"^bases must be finite; row 1 is not$"),
    ([[1, 1, -0.5, 1]], r"^bases must be non-negative; row 0 has -0.5 at domain 2$"),
    ([[1, 1, 1, 1], [0, 0, 0, 0]], r"^bases: row 1 is all zero"),
    ("coarse", r"^bases='coarse' is the store's coarse clustering: build the mixer from the store"),
    ("missing.npy", r"^bases=missing.npy: no such file$"),
    ("bases.csv", r"^bases=bases.csv: expected a .npy, .pt, .json file"),
])
def test_bad_bases_are_refused_in_one_line_naming_the_option(bases, message):
    with pytest.raises(ValueError, match=message):
        DGA(K, bases=bases)


def test_bad_bases_files_and_options(tmp_path):
    (tmp_path / "broken.json").write_text("[[1, 2")
    with pytest.raises(ValueError, match=r"^bases=.*broken.json: cannot read it \(JSONDecodeError: "):
        DGA(K, bases=str(tmp_path / "broken.json"))
    np.save(tmp_path / "wide.npy", np.ones((2, K + 1)))
    with pytest.raises(ValueError, match=r"^bases=.*wide.npy must be an \(m, 4\) matrix.*got shape \(2, 5\)$"):
        DGA(K, bases=str(tmp_path / "wide.npy"))
    with pytest.raises(ValueError, match="bases need mode 'stratified' or 'exact'"):
        DGA(K, bases=BASES, mode="inline")
    with pytest.raises(ValueError, match="rows_per_basis must be an integer >= 1, got 0"):
        DGA(K, bases=BASES, rows_per_basis=0)
    ctx = make_ctx(tiny_gpt(), Data(0), step=10)
    ctx.basis_batch = None
    with pytest.raises(ValueError, match="with bases needs basis batches"):
        DGA(K, bases=BASES).update(ctx)


def test_state_with_bases_round_trips_and_refuses_other_bases(seed):
    mixer = DGA(K, bases=BASES)
    for _ in range(3):
        mixer.apply(torch.randn(len(BASES), dtype=torch.float64), 1e-2)
    state = mixer.state_dict()
    other = DGA(K, bases=BASES * 3)  # the same distributions
    other.load_state_dict(state)
    assert torch.equal(other.weights, mixer.weights) and torch.equal(other.scores, mixer.scores)
    step = torch.randn(len(BASES), dtype=torch.float64)
    mixer.apply(step, 1e-2)
    other.apply(step, 1e-2)
    assert torch.equal(other.weights, mixer.weights)
    for bases, plain, message in ((BASES, DGA(K).state_dict(), "saved with no bases, but this run has 3 bases"),
                                  (BASES.flip(0), state, "saved with other bases of the same shape"),
                                  (BASES[:2], state, "saved with 3 bases, but this run has 2 bases")):
        with pytest.raises(ValueError, match=message):
            DGA(K, bases=bases).load_state_dict(plain)
    with pytest.raises(ValueError, match="saved with 3 bases, but this run has none: resume with the bases option"):
        DGA(K).load_state_dict(state)
