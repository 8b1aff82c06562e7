"""AlignmentProbe against the naive method: one backward per domain, flatten, dot."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmix import AlignmentProbe
from fastmix.model import GPT, GPTConfig


def tiny_gpt(dtype=torch.float32, bias=True):
    model = GPT(GPTConfig(block_size=8, vocab_size=23, n_layer=2, n_head=2, n_embd=16, bias=bias))
    return model.to(dtype)


def batch(model, batch_size=6, tokens=8, vocab=23):
    x = torch.randint(0, vocab, (batch_size, tokens))
    return x, torch.roll(x, -1, 1)


def domain_loss(model, x, y, keep):
    """The training loss restricted to the sequences in `keep`, with the full batch's
    normalisation, so the domain losses add up to the loss."""
    logits, _ = model(x)
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return (per_token.reshape(y.shape) * keep[:, None]).sum() / y.numel()


def flat_grads(model, params):
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def naive_scores(model, x, y, ids, k, target, params):
    """⟨∇L_i, V⟩ by a backward per domain and flattened gradients (what DoGE does)."""
    scores = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        domain_loss(model, x, y, (ids == i).to(torch.float32)).backward()
        scores[i] = flat_grads(model, params) @ target
    return scores


def naive_mse_scores(model, x, y, ids, k, target, params):
    """The same for a summed MSE loss on a model whose rows do not interact: each domain's
    rows alone through the model."""
    scores = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        F.mse_loss(model(x[ids == i]), y[ids == i], reduction="sum").backward()
        scores[i] = flat_grads(model, params) @ target
    return scores


def set_random_target(model, probe):
    """A target gradient: that of a different random batch."""
    model.zero_grad()
    x_t, y_t = batch(model, batch_size=3)
    model(x_t, y_t)[1].backward()
    probe.set_target()
    params = [p for p in model.parameters() if p.requires_grad]
    target = flat_grads(model, params)
    model.zero_grad()
    return target, params


def assert_close_scores(got, want, rtol):
    scale = want.abs().max()
    assert bool(((got - want).abs() <= rtol * scale).all()), f"{got.tolist()} vs {want.tolist()}"


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-5), (torch.float32, 1e-3)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_probe_matches_naive_on_gpt(seed, dtype, rtol, bias):
    """Tied embedding/head, LayerNorms, biases, position embeddings: all covered, exact."""
    model, k = tiny_gpt(dtype, bias), 4
    probe = AlignmentProbe(model, k, strict=True)
    assert probe.coverage.uncovered == [] and probe.coverage.fraction == 1.0
    target, params = set_random_target(model, probe)
    x, y = batch(model)
    ids = torch.tensor([0, 2, 2, 0, 3, 0])  # domain 1 empty
    with probe.record(ids):
        model(x, y)[1].backward()
    result = probe.result()
    want = naive_scores(model, x, y, ids, k, target, params)
    assert_close_scores(result.dots, want, rtol)
    assert result.counts.tolist() == [3, 0, 2, 1]
    assert result.dots[1] == 0


def test_probe_backward_scores_without_parameter_gradients(seed):
    """probe.backward(loss): the same scores as loss.backward(), no weight-gradient GEMM
    (checked with the profiler's op count), and `.grad` left exactly as it was."""
    model, k = tiny_gpt(torch.float64), 4
    probe = AlignmentProbe(model, k, strict=True)
    target, params = set_random_target(model, probe)
    x, y = batch(model)
    ids = torch.tensor([0, 2, 2, 0, 3, 1])
    for p in params:
        p.grad = torch.randn_like(p)  # a pending gradient the scoring pass must not touch
    before = [p.grad.clone() for p in params]
    with probe.record(ids):
        loss = model(x, y)[1]
        probe.backward(loss)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert_close_scores(probe.result().dots, naive_scores(model, x, y, ids, k, target, params), 1e-5)
    with pytest.raises(RuntimeError, match="inside `with probe.record"):
        probe.backward(model(x, y)[1])


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu-inplace"])
@pytest.mark.parametrize("tokens", [None, 5], ids=["2-d", "3-d"])
@pytest.mark.parametrize("scoring_only", [True, False], ids=["probe.backward", "loss.backward"])
def test_in_place_op_after_a_layer(seed, inplace, tokens, scoring_only):
    """ReLU(inplace=True) rewrites the layer's output: the scores must still use the gradient of
    the layer's output. On 3-D input F.linear returns a view, which the in-place op rebases onto
    its base; a hook on the view itself would never fire (the layer would score 0)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 3)).double()
    k = 3
    probe = AlignmentProbe(model, k, strict=True)
    rows = (8,) if tokens is None else (8, tokens)
    x, y = torch.randn(*rows, 6, dtype=torch.float64), torch.randn(*rows, 3, dtype=torch.float64)
    model.zero_grad()
    F.mse_loss(model(x[:4]), y[:4]).backward()
    probe.set_target()
    params = list(model.parameters())
    target = flat_grads(model, params)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    model.zero_grad(set_to_none=True)
    with probe.record(ids):
        loss = F.mse_loss(model(x), y, reduction="sum")
        probe.backward(loss) if scoring_only else loss.backward()
    assert not probe._output_edges  # nothing kept alive after the record
    assert_close_scores(probe.result().dots, naive_mse_scores(model, x, y, ids, k, target, params), 1e-9)


def test_probe_backward_skips_the_weight_gradient_gemms(seed):
    model, k = tiny_gpt(), 3
    probe = AlignmentProbe(model, k)
    set_random_target(model, probe)
    x, y = batch(model)
    ids = torch.randint(0, k, (x.shape[0],))

    def matmuls(backward):
        with torch.profiler.profile() as prof:
            with probe.record(ids):
                loss = model(x, y)[1]
                backward(loss)
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))

    full, scoring = matmuls(lambda loss: loss.backward()), matmuls(probe.backward)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())  # the tied head included
    assert full - scoring >= linears, (full, scoring)


def test_probe_accumulates_over_micro_batches(seed):
    model, k = tiny_gpt(torch.float64), 3
    probe = AlignmentProbe(model, k)
    target, params = set_random_target(model, probe)
    want = torch.zeros(k, dtype=torch.float64)
    for _ in range(3):  # gradient accumulation: three micro-batches, one result
        x, y = batch(model, batch_size=4)
        ids = torch.randint(0, k, (4,))
        with probe.record(ids):
            model(x, y)[1].backward()
        want += naive_scores(model, x, y, ids, k, target, params)
    assert_close_scores(probe.result().dots, want, 1e-5)
    probe.reset()
    assert bool((probe.result().dots == 0).all())


def test_probe_with_padding_and_per_token_ids(seed):
    """Per-token ids on a model whose rows don't interact; -1 marks padding."""
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()
    k = 3
    probe = AlignmentProbe(model, k, strict=True)
    x, target_y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    model.zero_grad()
    F.mse_loss(model(x[:2]), target_y[:2]).backward()
    probe.set_target()
    params = list(model.parameters())
    target = flat_grads(model, params)
    ids = torch.randint(-1, k, (4, 6))
    model.zero_grad()
    with probe.record(ids):
        ((model(x) - target_y) ** 2 * (ids >= 0)[..., None]).sum().backward()
    want = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        ((model(x) - target_y) ** 2 * (ids == i)[..., None]).sum().backward()
        want[i] = flat_grads(model, params) @ target
    assert_close_scores(probe.result().dots, want, 1e-8)


@pytest.mark.parametrize("layer_norm", [
    lambda: nn.LayerNorm(6),
    lambda: nn.LayerNorm(6, bias=False),
    lambda: nn.LayerNorm(6, elementwise_affine=False),
    lambda: nn.LayerNorm((2, 3)),
], ids=["affine", "no-bias", "no-affine", "2-d-shape"])
@pytest.mark.parametrize("freeze_weight", [False, True], ids=["trained", "frozen-weight"])
def test_probe_layer_norm_variants(seed, layer_norm, freeze_weight):
    """LayerNorm with and without weight or bias, a 2-D normalised shape, a frozen weight:
    each covered parameter scored, nothing else, against the naive method."""
    norm = layer_norm()
    two_d = len(norm.normalized_shape) == 2
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(-1, (2, 3)) if two_d else nn.Identity(), norm,
                          nn.Flatten(-2) if two_d else nn.Identity(), nn.Tanh(), nn.Linear(6, 2)).double()
    if norm.weight is not None:
        with torch.no_grad():  # away from the (1, 0) init, so a wrong x̂ scaling shows
            norm.weight.uniform_(0.5, 1.5)
            if norm.bias is not None:
                norm.bias.uniform_(-0.5, 0.5)
        norm.weight.requires_grad_(not freeze_weight)
    k = 3
    probe = AlignmentProbe(model, k)
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    model.zero_grad()
    F.mse_loss(model(x[:3]), y[:3]).backward()
    probe.set_target()
    params = [p for p in model.parameters() if p.requires_grad]
    target = flat_grads(model, params)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    model.zero_grad()
    with probe.record(ids):
        F.mse_loss(model(x), y, reduction="sum").backward()
    want = naive_mse_scores(model, x, y, ids, k, target, params)
    assert_close_scores(probe.result().dots, want, 1e-9)


def test_probe_under_bf16_autocast_and_loss_scale(seed):
    """bf16 autocast with a loss scale (as GradScaler applies): scores match the naive
    method run the same way, unscaled. The tolerance is bf16's, not fp32's: under autocast
    the naive per-domain weight gradients come out of bf16 matmuls, each element rounded to
    8 bits (measured: ~0.4% of the largest score), while the probe accumulates in fp32."""
    model, k, scale = tiny_gpt(), 3, 1024.0
    probe = AlignmentProbe(model, k)
    target, params = set_random_target(model, probe)
    x, y = batch(model)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with probe.record(ids, loss_scale=scale):
            (model(x, y)[1] * scale).backward()
        want = naive_scores(model, x, y, ids, k, target, params)
    assert_close_scores(probe.result().dots, want, 1e-2)


def test_record_target_uses_ghost_form_where_cheaper(seed, monkeypatch):
    """With the target captured from few rows, linear layers use the ghost form (checked
    by counting calls) and the scores still match the naive method."""
    import fastmix.ops as ops

    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40)).double()
    k = 2
    probe = AlignmentProbe(model, k, strict=True)
    x_t, y_t = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    model.zero_grad()
    with probe.record_target():
        F.mse_loss(model(x_t), y_t).backward()
    params = list(model.parameters())
    target = flat_grads(model, params)
    calls = []
    ghost = ops.domain_grad_dots_ghost
    monkeypatch.setattr(ops, "domain_grad_dots_ghost", lambda *a, **kw: calls.append(1) or ghost(*a, **kw))
    x, y = torch.randn(10, 32, dtype=torch.float64), torch.randn(10, 40, dtype=torch.float64)
    ids = torch.randint(0, k, (10,))
    model.zero_grad()
    with probe.record(ids):
        F.mse_loss(model(x), y, reduction="sum").backward()
    want = naive_mse_scores(model, x, y, ids, k, target, params)
    assert len(calls) == 2
    assert_close_scores(probe.result().dots, want, 1e-8)


def test_precondition_scales_the_target(seed):
    model, k = tiny_gpt(torch.float64), 2
    probe = AlignmentProbe(model, k)
    x_t, y_t = batch(model, 3)
    model(x_t, y_t)[1].backward()
    precondition = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    probe.set_target(precondition=precondition)
    params = [p for _, p in model.named_parameters()]
    target = torch.cat([(p.grad * precondition[n]).reshape(-1) for n, p in model.named_parameters()])
    x, y = batch(model, 4)
    ids = torch.tensor([0, 1, 1, 0])
    model.zero_grad()
    with probe.record(ids):
        model(x, y)[1].backward()
    assert_close_scores(probe.result().dots, naive_scores(model, x, y, ids, k, target, params), 1e-5)


class BroadcastPositions(nn.Module):
    """Position embedding called on arange(T) and broadcast over the batch: positions of shape
    (T,) as nanoGPT has them, or (1, T) as Hugging Face's GPT-2."""

    def __init__(self, leading_one):
        super().__init__()
        self.tok = nn.Embedding(11, 8)
        self.pos = nn.Embedding(5, 8)
        self.out = nn.Linear(8, 11)
        self.leading_one = leading_one

    def forward(self, idx):
        positions = torch.arange(idx.shape[1])
        return self.out(self.tok(idx) + self.pos(positions[None] if self.leading_one else positions))


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sequence", "per-token"])
@pytest.mark.parametrize("leading_one", [False, True], ids=["(T,)", "(1,T)"])
def test_a_position_embedding_broadcast_over_the_batch_is_split_by_row(seed, leading_one, per_token):
    """While recording, the position embedding hands the model its output expanded to the
    batch: its gradient then has one row per batch row, so it is covered and exact, and the
    model computes exactly what it does without the probe."""
    model, k = BroadcastPositions(leading_one).double(), 2
    probe = AlignmentProbe(model, k, strict=True)
    idx = torch.randint(0, 11, (3, 5))
    model(idx[:1]).pow(2).sum().backward()
    probe.set_target()
    params = list(model.parameters())
    target = flat_grads(model, params)
    ids = torch.randint(0, k, (3, 5) if per_token else (3,))
    model.zero_grad()
    with probe.record(ids):
        out = model(idx)
        out.pow(2).sum().backward()
    assert torch.equal(out, model(idx))
    assert probe.coverage.uncovered == [] and probe.result().missing == []
    want = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        keep = (ids == i).reshape(ids.shape + (1,) * (3 - ids.dim()))
        (model(idx).pow(2) * keep).sum().backward()
        want[i] = flat_grads(model, params) @ target
    assert_close_scores(probe.result().dots, want, 1e-9)


class BatchContext(nn.Module):
    """A layer on the batch's mean over sequences: rows that are neither the batch's nor one
    call broadcast over it (its input carries the batch's gradient)."""

    def __init__(self):
        super().__init__()
        self.inp, self.ctx = nn.Linear(4, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return h + self.ctx(h.mean(0))


def test_unsplittable_module_is_reported_not_guessed(seed):
    model = BatchContext().double()
    probe = AlignmentProbe(model, 2)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    model(x).sum().backward()
    probe.set_target()
    with pytest.warns(UserWarning, match="'ctx' sees inputs of leading shape"):
        with probe.record(torch.tensor([0, 1, 1])):
            model(x).sum().backward()
    assert probe.coverage.uncovered == ["ctx.bias", "ctx.weight"]
    strict = AlignmentProbe(model, 2, strict=True)
    strict.set_target()
    with pytest.raises(RuntimeError, match="cannot be split by domain"):
        with strict.record(torch.tensor([0, 1, 1])):
            model(x)


def test_a_batch_norm_is_left_out_with_a_warning_and_strict_raises():
    """BatchNorm's statistics mix the rows of the batch, so its gradient cannot be split by
    domain: the one kind of layer left out, named in a warning with the fraction covered."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match=r"\['1'\] mix the rows of a batch.*cover 66.7% of the trainable"):
        assert AlignmentProbe(model, 2).coverage.uncovered == ["1.bias", "1.weight"]
    with pytest.raises(ValueError, match=r"not covered: \['1.bias', '1.weight'\] \(\['1'\] mix the rows"):
        AlignmentProbe(model, 2, strict=True)


def test_probe_input_errors():
    model = tiny_gpt()
    probe = AlignmentProbe(model, 3)
    with pytest.raises(RuntimeError, match="call set_target"):
        with probe.record(torch.zeros(2, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="has no .grad"):
        probe.set_target()
    with pytest.raises(ValueError, match="missing from grads"):
        probe.set_target({})
    probe.set_target({n: torch.randn_like(p) for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match="domain_ids contains 3, but num_domains is 3"):
        with probe.record(torch.tensor([0, 3])):
            pass
    with pytest.raises(TypeError, match="domain_ids must be an integer tensor"):
        with probe.record(torch.tensor([0.0, 1.0])):
            pass


def test_set_target_drops_ghost_rows_of_an_earlier_record_target(seed):
    model = nn.Sequential(nn.Linear(64, 64)).double()
    probe = AlignmentProbe(model, 2)
    with probe.record_target():
        model(torch.randn(1, 64, dtype=torch.float64)).sum().backward()
    new_target = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    probe.set_target(new_target)  # a dense target now: the old rows must not be used
    x, ids = torch.randn(8, 64, dtype=torch.float64), torch.tensor([0, 1] * 4)
    model.zero_grad()
    with probe.record(ids):
        model(x).pow(2).sum().backward()
    want = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        model.zero_grad()
        model(x[ids == i]).pow(2).sum().backward()
        want[i] = sum((p.grad * new_target[n]).sum() for n, p in model.named_parameters())
    assert_close_scores(probe.result().dots, want, 1e-8)


def test_ghost_rows_keep_their_precision_under_a_loss_scale(seed):
    """fp16 output gradients unscaled in fp16 would underflow; the ghost form must agree
    with the dense form."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64)).half()
    x_t, x = torch.randn(1, 64).half(), torch.randn(8, 64).half()
    ids, scale = torch.tensor([0, 1] * 4), 65536.0
    scores = []
    for capture_rows in (True, False):
        probe = AlignmentProbe(model, 2)
        model.zero_grad()
        if capture_rows:
            with probe.record_target(loss_scale=scale):
                (model(x_t).float().sum() * 1e-7 * scale).backward()
        else:
            (model(x_t).float().sum() * 1e-7 * scale).backward()
            probe.set_target(loss_scale=scale)
        model.zero_grad()
        with probe.record(ids):
            model(x).float().pow(2).sum().backward()
        scores.append(probe.result().dots)
        probe.remove()
    assert_close_scores(scores[0], scores[1], 1e-2)


def test_layers_whose_hooks_never_run_are_reported():
    """nn.MultiheadAttention uses out_proj.weight without calling out_proj. (Excluded here, so
    that out_proj is a layer whose hook never runs; not excluded, the general rule scores the
    attention with out_proj's weight: tests/test_probe_general.py.)"""
    model = nn.ModuleDict(dict(attn=nn.MultiheadAttention(8, 2, batch_first=True), head=nn.Linear(8, 1)))
    def loss(x):
        return model["head"](model["attn"](x, x, x)[0]).sum()
    probe = AlignmentProbe(model, 2, exclude=[model["attn"]])
    loss(torch.randn(2, 3, 8)).backward()
    probe.set_target()
    assert "attn.out_proj.weight" not in probe.coverage.uncovered  # not known before a record
    with pytest.warns(UserWarning, match="out_proj.*used outside their hooked layers"):
        with probe.record(torch.tensor([0, 1])):  # F.multi_head_attention_forward takes out_proj.weight
            loss(torch.randn(2, 3, 8)).backward()
    assert probe.result().missing == ["attn.out_proj"]
    assert {"attn.out_proj.weight", "attn.out_proj.bias"} <= set(probe.coverage.uncovered)
    probe.strict = True
    with pytest.raises(RuntimeError, match=r"scored nothing: \['attn.out_proj'\] \(never ran while recording"):
        probe.result()


def test_a_layer_first_seen_after_the_target_was_set_is_reported_not_guessed(seed):
    """The target covers the layers seen so far; a layer that runs for the first time later
    scores nothing (it is reported as missing) until the target is set again."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Embedding(10, 4), nn.Embedding(10, 4), nn.Linear(4, 10)

        def forward(self, x, use_b):
            h = self.a(x) + (self.b(x) if use_b else 0)
            return F.cross_entropy(self.head(h).reshape(-1, 10), x.reshape(-1))

    model, ids = Net().double(), torch.tensor([0, 0, 1, 1])
    x = torch.randint(0, 10, (4, 3))
    probe = AlignmentProbe(model, 2)
    model(x, True).backward()
    probe.set_target()
    model.zero_grad()
    with probe.record(ids):
        model(x, False).backward()  # `b` unused: the next target leaves it out
    model.zero_grad()
    model(x, True).backward()
    probe.set_target()
    assert "b.weight" in probe.coverage.uncovered
    model.zero_grad()
    probe.reset()
    with probe.record(ids):
        model(x, True).backward()
    assert probe.result().missing == ["b"]
    model.zero_grad()
    model(x, True).backward()
    probe.set_target()  # now it covers `b`
    assert probe.coverage.uncovered == []
    model.zero_grad()
    probe.reset()
    with probe.record(ids):
        model(x, True).backward()
    assert probe.result().missing == []


class TiedLM(nn.Module):
    """A tied head applied outside any hooked layer, as many GPT codebases do."""

    def __init__(self, head="F.linear", vocab=17, width=8):
        super().__init__()
        self.wte, self.fc, self.ln = nn.Embedding(vocab, width), nn.Linear(width, width), nn.LayerNorm(width)
        self.head = head

    def forward(self, x, y):
        h = self.ln(torch.tanh(self.fc(self.wte(x))))
        logits = F.linear(h, self.wte.weight) if self.head == "F.linear" else h @ self.wte.weight.T
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("strict", [False, True], ids=["warn", "strict"])
@pytest.mark.parametrize("head", ["F.linear", "matmul"])
def test_a_weight_also_used_outside_its_layer_is_left_out_not_mis_scored(seed, strict, head):
    """A tied head applied with F.linear(h, wte.weight) or h @ wte.weight.T: the Embedding hook
    sees one use of the weight, the gradient has both. The first record finds the other use,
    drops the weight from the target and the coverage (strict: raises), and the scores are exact
    for the rest."""
    model, k = TiedLM(head).double(), 2
    probe = AlignmentProbe(model, k, strict=strict)
    x, y = torch.randint(0, 17, (4, 8)), torch.randint(0, 17, (4, 8))
    ids = torch.tensor([0, 0, 1, 1])
    model(x[:2], y[:2]).backward()
    probe.set_target()
    if strict:
        with pytest.raises(RuntimeError, match=r"\['wte.weight'\] are also used outside"):
            with probe.record(ids):
                model(x, y).backward()
        return
    params = [p for n, p in model.named_parameters() if n != "wte.weight"]
    target = flat_grads(model, params)
    model.zero_grad()
    with pytest.warns(UserWarning, match=r"\['wte.weight'\] are also used outside"):
        with probe.record(ids):
            model(x, y).backward()
    assert probe.coverage.uncovered == ["wte.weight"]
    model.zero_grad()
    model(x[:2], y[:2]).backward()
    probe.set_target()  # without wte.weight now: a layer left out on purpose is not "missing"
    model.zero_grad()
    with probe.record(ids):
        model(x, y).backward()
    assert probe.result().missing == []
    probe.reset()
    with probe.record(ids):
        model(x, y).backward()
    want = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        (model(x[ids == i], y[ids == i]) * (ids == i).sum() / len(ids)).backward()
        want[i] = flat_grads(model, params) @ target
    assert_close_scores(probe.result().dots, want, 1e-9)


def test_a_weight_penalty_in_the_loss_is_not_a_use_outside_the_layers(seed):
    """Σ p² added to the loss takes every weight outside its layer, but not per row: it is no
    reason to leave a weight out (the watch looks for row ops only)."""
    plain = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()
    probe = AlignmentProbe(plain, 2, strict=True)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def loss_of(rows):
        penalty = 1e-3 * sum(p.pow(2).sum() for p in plain.parameters())
        return F.mse_loss(plain(x[rows]), y[rows], reduction="sum") + penalty

    loss_of(slice(0, 3)).backward()
    probe.set_target()
    with probe.record(torch.tensor([0, 0, 1, 1, 0, 1])):
        loss_of(slice(None)).backward()  # no warning, no error under strict
    assert probe.coverage.uncovered == [] and probe.result().missing == []


def test_keyword_input_and_unsupported_embeddings():
    model = nn.ModuleDict(dict(emb=nn.Embedding(5, 4, scale_grad_by_freq=True), lin=nn.Linear(4, 2)))
    with pytest.warns(UserWarning, match=r"\['emb'\] mix the rows of a batch"):
        probe = AlignmentProbe(model, 2)
    assert probe.coverage.uncovered == ["emb.weight"]  # frequency-scaled gradients can't be split by row
    x = torch.randn(3, 4)
    model["lin"](input=x).sum().backward()
    probe.set_target()
    with probe.record(torch.tensor([0, 1, 1])):
        model["lin"](input=x).sum().backward()
    assert probe.result().dots.abs().sum() > 0


def test_tied_weight_never_takes_the_ghost_form_even_when_a_use_is_excluded(seed):
    """lm_head shares wte's weight: its target is the sum over both uses, which lm_head's
    target rows alone do not give, so the ghost form must not serve it."""
    model = tiny_gpt(torch.float64)
    x_t, y_t = batch(model, batch_size=1)
    x, y = batch(model)
    ids = torch.tensor([0, 1, 0, 1, 0, 1])
    scores = []
    for capture_rows in (True, False):
        probe = AlignmentProbe(model, 2, exclude=[model.transformer.wte])
        model.zero_grad()
        if capture_rows:
            with probe.record_target():
                model(x_t, y_t)[1].backward()
        else:
            model(x_t, y_t)[1].backward()
            probe.set_target()
        model.zero_grad()
        with pytest.warns(UserWarning, match=r"\['transformer.wte.weight'\] are also used outside"):
            with probe.record(ids):  # the excluded embedding is a use the hooks do not see
                model(x, y)[1].backward()
        assert probe.coverage.uncovered == ["transformer.wte.weight"]
        scores.append(probe.result().dots)
        probe.remove()
    assert_close_scores(scores[0], scores[1], 1e-8)


class Scale(nn.Module):
    """A layer type of the user's own: y = x ⊙ w."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("factor", [1.0, 2.0], ids=["right-rule", "doubled-rule"])
def test_a_registered_rule_scores_its_layer_type(seed, factor):
    """register_probe_rule(Scale, rule): the probe covers Scale layers with that rule and its
    scores are what the rule says (a rule giving twice the truth doubles that layer's part)."""
    from fastmix import register_probe_rule
    from fastmix.probe.rules import RULES

    calls = []

    def scale_rule(layer, inputs, grad_output, target):
        calls.append(layer)
        return factor * (grad_output * inputs[0].to(grad_output.dtype) * target["weight"]).sum(-1)

    model = nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3)).double()
    register_probe_rule(Scale, scale_rule)
    try:
        probe = AlignmentProbe(model, 3, strict=True)
        x, y = torch.randn(8, 4, 5, dtype=torch.float64), torch.randn(8, 4, 3, dtype=torch.float64)
        model.zero_grad()
        F.mse_loss(model(x[:3]), y[:3]).backward()
        probe.set_target()
        params = list(model.parameters())
        target = flat_grads(model, params)
        ids = torch.randint(0, 3, (8,))
        model.zero_grad()
        with probe.record(ids):
            F.mse_loss(model(x), y, reduction="sum").backward()
    finally:
        del RULES[Scale]
    probe.remove()
    assert calls == [model[1]]
    scale_part = torch.zeros_like(target)  # the Scale weight's slice of the flattened target
    offset = sum(p.numel() for p in params[:2])
    scale_part[offset:offset + 6] = target[offset:offset + 6]
    want = naive_mse_scores(model, x, y, ids, 3, target + (factor - 1) * scale_part, params)
    assert_close_scores(probe.result().dots, want, 1e-9)
    with pytest.raises(TypeError, match="layer_type must be an nn.Module subclass"):
        register_probe_rule(int, scale_rule)


class ScaledEmbedding(nn.Embedding):
    """An nn.Embedding whose forward scales its output, as Gemma's does."""

    def forward(self, idx):
        return super().forward(idx) * 3.0


class SameEmbedding(nn.Embedding):
    """A subclass that keeps nn.Embedding's forward."""


def test_a_subclass_that_overrides_forward_takes_the_general_rule_not_its_bases(seed):
    """nn.Embedding's rule would score the scaled embedding a third of its true value: the general
    rule scores it instead, exactly, while a subclass keeping the forward keeps the fast rule."""
    from fastmix.probe.rules import rule_for

    assert rule_for(ScaledEmbedding(5, 4)) is None
    assert rule_for(SameEmbedding(5, 4)) is rule_for(nn.Embedding(5, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaled, self.same, self.head = ScaledEmbedding(5, 4), SameEmbedding(5, 4), nn.Linear(4, 5)

        def forward(self, idx):
            return self.head(torch.tanh(self.scaled(idx) + self.same(idx)))

    model, k = Net().double(), 2
    probe = AlignmentProbe(model, k, strict=True)
    idx, ids = torch.randint(0, 5, (6, 3)), torch.tensor([0, 1, 1, 0, 1, 0])
    model(idx[:2]).pow(2).sum().backward()
    probe.set_target()
    params = list(model.parameters())
    target = flat_grads(model, params)
    model.zero_grad()
    with probe.record(ids):
        model(idx).pow(2).sum().backward()
    assert probe.coverage.fraction == 1.0 and probe.result().missing == []
    want = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        model(idx[ids == i]).pow(2).sum().backward()
        want[i] = flat_grads(model, params) @ target
    assert_close_scores(probe.result().dots, want, 1e-8)
