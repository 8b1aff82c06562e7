"""AlignmentProbe's general rule: modules no type rule matches (convolutions, attention, RNNs,
layers of one's own) are scored by one VJP per domain of the module alone, exactly; only layers
that mix the rows of a batch are left out. Against the naive method: one backward per domain,
flattened gradients, dot."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmix import AlignmentProbe


def flat_grads(params):
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def assert_close_scores(got, want, rtol):
    scale = want.abs().max()
    assert bool(((got - want).abs() <= rtol * scale).all()), f"{got.tolist()} vs {want.tolist()}"


def row_loss(out, y, keep):
    """Σ of the squared error over the rows kept (`keep` of the domain ids' shape)."""
    return ((out - y) ** 2 * keep.reshape(keep.shape + (1,) * (out.dim() - keep.dim()))).sum()


def probe_and_naive(model, x, y, ids, k, forward=None):
    """The probe's scores for the summed squared error of the batch, and the naive ones: the
    same loss restricted to each domain's rows, one backward each (`forward` runs the model;
    it reseeds the RNG for a model with dropout)."""
    forward = forward or model
    probe = AlignmentProbe(model, k, strict=True)
    assert probe.coverage.fraction == 1.0
    model.zero_grad()
    row_loss(forward(x[:2]), y[:2], torch.ones(ids[:2].shape)).backward()
    probe.set_target()
    params = [p for p in model.parameters() if p.requires_grad]
    target = flat_grads(params)
    model.zero_grad()
    with probe.record(ids):
        row_loss(forward(x), y, ids >= 0).backward()
    result = probe.result()
    assert probe.coverage.fraction == 1.0 and result.missing == []
    want = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        row_loss(forward(x), y, ids == i).backward()
        want[i] = flat_grads(params) @ target
    probe.remove()
    return result.dots, want


class Weird(nn.Module):
    """A layer of one's own holding parameters next to a child Linear: tanh(fc(x) @ W) ⊙ s."""

    def __init__(self, width):
        super().__init__()
        self.W = nn.Parameter(torch.randn(width, width))
        self.s = nn.Parameter(torch.randn(width))
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.fc(x) @ self.W) * self.s


class Shifted(nn.Module):
    """A general-rule module around another one: y = inner(x) + shift."""

    def __init__(self, width):
        super().__init__()
        self.inner = Weird(width)
        self.shift = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return self.inner(x) + self.shift


class Attention(nn.Module):
    """nn.MultiheadAttention holds its input projection itself and applies out_proj's weight
    functionally: the general rule scores both."""

    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(6, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h)[0])


class Recurrent(nn.Module):
    """An RNN's output (batch first, or time first), and its last hidden state if `use_hidden`:
    the hidden states have the batch in dim 1."""

    def __init__(self, cls, batch_first=True, use_hidden=False):
        super().__init__()
        self.rnn, self.out = cls(6, 5, num_layers=2, batch_first=batch_first), nn.Linear(5, 3)
        self.use_hidden = use_hidden

    def forward(self, x):
        o, h = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        o = o if self.rnn.batch_first else o.transpose(0, 1)
        h = h[0] if isinstance(h, tuple) else h  # an LSTM's (h_n, c_n)
        return self.out(o) + (self.out(h[-1])[:, None] if self.use_hidden else 0)


def conv_net(conv, features):
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 3))


SEQUENCE_MODELS = dict(
    own_layer=lambda: nn.Sequential(Weird(6), nn.Linear(6, 3)),
    nested_own_layers=lambda: nn.Sequential(Shifted(6), nn.Linear(6, 3)),
    multihead_attention=Attention,
    lstm=lambda: Recurrent(nn.LSTM),
    lstm_last_hidden_state=lambda: Recurrent(nn.LSTM, use_hidden=True),
    gru_time_first=lambda: Recurrent(nn.GRU, batch_first=False, use_hidden=True),
)


# per-token ids too where the tokens of a sequence do not interact (there they split the gradient)
@pytest.mark.parametrize("name,per_token", [(name, False) for name in SEQUENCE_MODELS]
                         + [("own_layer", True), ("nested_own_layers", True)])
def test_general_rule_is_exact_on_sequence_layers_without_a_rule(seed, name, per_token):
    model = SEQUENCE_MODELS[name]().double()
    x, y = torch.randn(6, 4, 6, dtype=torch.float64), torch.randn(6, 4, 3, dtype=torch.float64)
    ids = torch.randint(-1, 3, (6, 4)) if per_token else torch.tensor([0, 1, 2, 0, 1, 1])
    got, want = probe_and_naive(model, x, y, ids, 3)
    assert_close_scores(got, want, 1e-8)


@pytest.mark.parametrize("conv,shape,features", [
    (lambda: nn.Conv1d(2, 3, 3), (2, 9), 21),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, bias=False), (2, 4, 4), 48),
], ids=["conv1d", "conv2d"])
def test_general_rule_is_exact_on_convolutions_over_a_batch(seed, conv, shape, features):
    model = conv_net(conv(), features).double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    got, want = probe_and_naive(model, x, y, torch.tensor([0, 1, 2, 0, 2, 2]), 3)
    assert_close_scores(got, want, 1e-8)


class DropoutLayer(nn.Module):
    """A layer of one's own with dropout inside: the rule must run it again with the same mask."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.dropout(x * self.scale, p=0.5, training=self.training)


def test_general_rule_repeats_the_dropout_of_the_call(seed):
    """The same seed before each forward gives the probe's pass and the naive ones the same
    masks; the rule's rerun must draw them again from the RNG state the call started with (and
    leave the RNG where the call left it)."""
    model = nn.Sequential(nn.Linear(6, 6), DropoutLayer(), nn.Linear(6, 3)).double()
    x, y = torch.randn(6, 4, 6, dtype=torch.float64), torch.randn(6, 4, 3, dtype=torch.float64)

    def forward(inputs):
        torch.manual_seed(seed)
        return model(inputs)

    got, want = probe_and_naive(model, x, y, torch.tensor([0, 1, 2, 0, 1, 1]), 3, forward)
    assert_close_scores(got, want, 1e-8)


class LearnedPositions(nn.Module):
    """A position table of one's own, called on the token ids only for their length: its output,
    (T, width), is one call for the whole batch."""

    def __init__(self, length, width):
        super().__init__()
        self.table = nn.Parameter(torch.randn(length, width))

    def forward(self, idx):
        return self.table[: idx.shape[1]]


class TinyLM(nn.Module):
    def __init__(self, vocab=11, width=6):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(vocab, width), LearnedPositions(8, width), nn.Linear(width, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.tok(idx) + self.pos(idx)))


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sequence", "per-token"])
def test_a_module_called_once_for_the_batch_is_split_by_row(seed, per_token):
    """As a position Embedding: while recording, its output is handed to the model broadcast to
    the batch, so its gradient has one row per batch row."""
    model = TinyLM().double()
    idx, y = torch.randint(0, 11, (6, 5)), torch.randn(6, 5, 3, dtype=torch.float64)
    ids = torch.randint(0, 3, (6, 5)) if per_token else torch.tensor([0, 1, 2, 0, 1, 1])
    got, want = probe_and_naive(model, idx, y, ids, 3)
    assert_close_scores(got, want, 1e-8)


def test_a_sparse_embedding_is_covered(seed):
    model = nn.Sequential(nn.Embedding(11, 6, sparse=True), nn.Tanh(), nn.Linear(6, 3)).double()
    idx, y = torch.randint(0, 11, (6, 5)), torch.randn(6, 5, 3, dtype=torch.float64)
    probe = AlignmentProbe(model, 3, strict=True)
    row_loss(model(idx[:2]), y[:2], torch.ones(2)).backward()
    probe.set_target()  # the embedding's .grad is sparse
    params = list(model.parameters())
    target = torch.cat([p.grad.to_dense().reshape(-1) for p in params])
    ids = torch.tensor([0, 1, 2, 0, 1, 1])
    model.zero_grad()
    with probe.record(ids):
        row_loss(model(idx), y, ids >= 0).backward()
    want = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        model.zero_grad()
        row_loss(model(idx), y, ids == i).backward()
        want[i] = torch.cat([p.grad.to_dense().reshape(-1) for p in params]) @ target
    assert_close_scores(probe.result().dots, want, 1e-8)


def test_general_rule_under_bf16_autocast(seed):
    """The forward runs under autocast and the backward after it: the rerun must repeat the
    call's autocast, the convolution multiplying in bf16 again. To bf16's precision, as the
    naive method's per-domain gradients come out of bf16 products."""
    model = conv_net(nn.Conv1d(2, 3, 3), 21)
    x, y = torch.randn(6, 2, 9), torch.randn(6, 3)

    def forward(inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inputs).float()

    got, want = probe_and_naive(model, x, y, torch.tensor([0, 1, 2, 0, 2, 2]), 3, forward)
    assert_close_scores(got, want, 1e-2)


class AutocastAware(nn.Module):
    """A layer of one's own computing differently under autocast (as a kernel picking its
    precision by it would), here by a factor a rerun without autocast could not hide."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return x * self.weight * (2.0 if torch.is_autocast_enabled("cpu") else 1.0)


def test_general_rule_reruns_a_call_under_the_autocast_it_ran_in(seed):
    model = nn.Sequential(AutocastAware(6), nn.Tanh(), AutocastAware(6)).double()
    x, y = torch.randn(6, 4, 6, dtype=torch.float64), torch.randn(6, 4, 6, dtype=torch.float64)

    def forward(inputs):  # no op here that autocast casts: only the factor changes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inputs)

    got, want = probe_and_naive(model, x, y, torch.tensor([0, 1, 2, 0, 2, 2]), 3, forward)
    assert_close_scores(got, want, 1e-8)


class BatchMean(nn.Module):
    """A layer of one's own whose output is the batch's mean: not one row per batch row."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return (x * self.weight).mean(0)


def test_a_module_whose_output_is_not_one_row_per_batch_row_is_left_out(seed):
    model = nn.Sequential(nn.Linear(4, 6), BatchMean(6))
    x = torch.randn(5, 3, 4)
    probe = AlignmentProbe(model, 2)
    model(x).sum().backward()
    probe.set_target()
    with pytest.warns(UserWarning, match=r"'1' returns an output of shape \(3, 6\), not one row per batch row"):
        with probe.record(torch.tensor([0, 1, 1, 0, 1])):
            model(x).sum().backward()
    assert probe.coverage.uncovered == ["1.weight"]
    probe.remove()
    strict = AlignmentProbe(model, 2, strict=True)
    strict.set_target()
    with pytest.raises(RuntimeError, match="cannot be split by domain"):
        with strict.record(torch.tensor([0, 1, 1, 0, 1])):
            model(x).sum().backward()


class CheckpointedNet(nn.Module):
    """A block run under torch.utils.checkpoint: a Linear, a LayerNorm and a layer of one's own
    (the general rule), recomputed in the backward."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.inp, self.fc, self.norm, self.own, self.out = (nn.Linear(5, 6), nn.Linear(6, 6), nn.LayerNorm(6),
                                                            Weird(6), nn.Linear(6, 3))
        self.use_reentrant = use_reentrant
        self.checkpointed = True

    def block(self, h):
        return self.own(self.norm(torch.tanh(self.fc(h)))) + h

    def forward(self, x):
        h = self.inp(x)
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        else:
            h = self.block(h)
        return self.out(h)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_a_checkpointed_block_counts_once(seed, use_reentrant):
    """The block's layers run twice (the forward, the recomputation in the backward): the scores
    are those without checkpointing, and the naive ones."""
    model = CheckpointedNet(use_reentrant).double()
    calls = []
    model.fc.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randn(6, 4, 3, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, 1])
    got, want = probe_and_naive(model, x, y, ids, 3)
    assert len(calls) == 2 * 5  # target, record and 3 naive passes, each forward and recomputation
    assert_close_scores(got, want, 1e-8)
    model.checkpointed = False
    plain, _ = probe_and_naive(model, x, y, ids, 3)
    assert_close_scores(got, plain, 1e-8)


def test_general_rule_with_probe_backward_and_over_micro_batches(seed):
    """probe.backward(loss) reaches the general-rule modules' outputs too, and their sums add up
    over records as the rules' rows do."""
    model, k = Attention().double(), 3
    probe = AlignmentProbe(model, k, strict=True)
    x, y = torch.randn(6, 4, 6, dtype=torch.float64), torch.randn(6, 4, 3, dtype=torch.float64)
    row_loss(model(x[:2]), y[:2], torch.ones(2)).backward()
    probe.set_target()
    params = list(model.parameters())
    target = flat_grads(params)
    ids = torch.tensor([0, 1, 2, 0, 1, 1])
    for _ in range(2):
        with probe.record(ids):
            probe.backward(row_loss(model(x), y, ids >= 0))
    want = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        model.zero_grad()
        row_loss(model(x), y, ids == i).backward()
        want[i] = flat_grads(params) @ target
    assert_close_scores(probe.result().dots, 2 * want, 1e-8)
