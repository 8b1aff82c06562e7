"""AlignmentProbe(fused=True): linear layers score the domains inside their own weight-gradient
GEMM (fastmix.ops.fused_linear) on the training backward. Checked against the current form
(fused=False) and plain autograd: the same scores and the same `.grad`, on a fastmix GPT and on
Hugging Face's GPT-2 (Conv1D layers), and the same DGA weights over a 200-step inline run."""
import contextlib
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conftest import run_distributed
from fastmix import AlignmentProbe
from fastmix.data import DomainStore, MixtureSampler
from fastmix.mixing import DGA, OnlineMixing
from fastmix.model import GPT, GPTConfig, lm_loss
from fastmix.ops import alignment
from fastmix.ops.alignment import fused_is_cheaper

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

K, VOCAB, TOKENS = 3, 23, 8


def fastmix_gpt():
    return GPT(GPTConfig(block_size=TOKENS, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16))


def hf_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=TOKENS, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def loss_of(model, x):
    if isinstance(model, GPT):
        return model(x, torch.roll(x, -1, 1))[1]
    return model(input_ids=x, labels=x).loss


def linear_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)))


def data(seed, per_token, batches=3, batch_size=6):
    """A target batch, then micro-batches with their domain ids: one per token with padding (-1),
    or one per sequence."""
    generator = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(0, VOCAB, (n, TOKENS), generator=generator)  # noqa: E731
    shape = (batch_size, TOKENS) if per_token else (batch_size,)
    return tokens(3), [(tokens(batch_size), torch.randint(-1 if per_token else 0, K, shape, generator=generator))
                       for _ in range(batches)]


def run(make_model, dtype, target, batches, fused=None, autocast=contextlib.nullcontext, loss_scale=1.0):
    """The model (same initial weights every time) trained on `batches` with gradient accumulation:
    under a probe (fused=True/False) after its first record, which watches the model's weight uses
    (and always takes the current form), or without a probe (fused=None). Returns the dots, the
    accumulated `.grad` and the layers that took the fused form."""
    torch.manual_seed(0)
    model = make_model().to(dtype)
    probe = None if fused is None else AlignmentProbe(model, K, fused=fused)
    if probe is not None:
        loss_of(model, target).backward()
        probe.set_target()
        model.zero_grad()
        first_x, first_ids = batches[0]
        with probe.record(first_ids):
            loss_of(model, first_x).backward()
        probe.reset()
        model.zero_grad()
    for x, ids in batches:
        with probe.record(ids, loss_scale=loss_scale) if probe is not None else contextlib.nullcontext():
            with autocast():
                loss = loss_of(model, x)
            (loss * loss_scale).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    if probe is None:
        return None, grads, None
    return probe.result().dots, grads, probe.fused_layers


def assert_close(got, want, rtol, what):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rtol * max(want.abs().max().item(), 1e-300), f"{what}: error {err} against {want.abs().max()}"


class HeadOnTheEmbedding(nn.Module):
    """An embedding whose table is also applied with F.linear outside any hooked layer."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(VOCAB, 16), nn.Linear(16, 16)

    def forward(self, x):
        return F.cross_entropy(F.linear(self.lin(self.emb(x)), self.emb.weight).flatten(0, 1), x.flatten())


def test_a_probe_given_the_watch_state_takes_the_fused_form_in_its_first_record(seed):
    """What the first record learns by watching (a weight used outside its layer) is saved and
    given back, so a second probe's first record scores as the first probe's later ones do."""
    target, batches = data(seed, per_token=False, batches=1, batch_size=4)
    x, ids = batches[0]

    def probe_on_a_fresh_model(watch=None):
        torch.manual_seed(0)
        model = HeadOnTheEmbedding()
        probe = AlignmentProbe(model, K, fused=True)
        if watch is not None:
            probe.load_watch_state_dict(watch)
        model(target).backward()
        probe.set_target()
        return model, probe

    def scored(model, probe):
        model.zero_grad()
        probe.reset()
        with probe.record(ids):
            model(x).backward()
        return probe.result().dots, probe.fused_layers

    model, probe = probe_on_a_fresh_model()
    assert probe.watch_state_dict() is None
    with pytest.warns(UserWarning, match="also used outside their hooked layers"):
        assert scored(model, probe)[1] == []  # the first record watches: the current form
    watch = probe.watch_state_dict()
    assert watch == {"used_outside": ["emb.weight"]}
    dots, fused_layers = scored(model, probe)
    assert fused_layers == ["lin"]
    model, restored = probe_on_a_fresh_model(watch)
    restored_dots, restored_layers = scored(model, restored)  # no warning: it does not watch again
    assert restored_layers == ["lin"] and torch.equal(restored_dots, dots)
    with pytest.raises(ValueError, match=r"no trainable parameter \['head.weight'\]"):
        restored.load_watch_state_dict({"used_outside": ["head.weight"]})


@pytest.mark.parametrize("make_model", [fastmix_gpt, hf_gpt2], ids=["fastmix-gpt", "hf-gpt2"])
@pytest.mark.parametrize("dtype,dots_rtol,grad_rtol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-6, 1e-6)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token-padded", "per-sequence"])
def test_fused_scores_and_grads_equal_the_current_forms(seed, make_model, dtype, dots_rtol, grad_rtol, per_token):
    """Three micro-batches accumulated: the fused form's dots equal the current form's, and its
    `.grad` plain autograd's, every linear layer (the tied head too) in the fused form."""
    target, batches = data(seed, per_token)
    fused_dots, fused_grads, fused_layers = run(make_model, dtype, target, batches, fused=True)
    current_dots, current_grads, current_layers = run(make_model, dtype, target, batches, fused=False)
    _, plain_grads, _ = run(make_model, dtype, target, batches)
    assert fused_layers == linear_names(make_model()) and current_layers == []
    assert_close(fused_dots, current_dots, dots_rtol, "dots")
    assert (fused_dots != 0).all()
    for name, want in plain_grads.items():
        assert_close(fused_grads[name], want, grad_rtol, name)
        assert torch.equal(current_grads[name], want), name  # the current form leaves the backward as it is


def test_bf16_autocast_and_a_grad_scaler(seed):
    """Under bf16 autocast with a GradScaler's scale the dots are taken in fp32 from the bf16 rows
    the layers multiplied, the scale divided out: the current form's, up to fp32 rounding; `.grad`
    as plain autograd's (both bf16 products of the same rows, rounded once)."""
    target, batches = data(seed, per_token=True)
    scale = torch.amp.GradScaler("cpu", init_scale=2.0**10).get_scale()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    fused_dots, fused_grads, fused_layers = run(fastmix_gpt, torch.float32, target, batches, True, autocast, scale)
    current_dots, _, _ = run(fastmix_gpt, torch.float32, target, batches, False, autocast, scale)
    unscaled_dots, _, _ = run(fastmix_gpt, torch.float32, target, batches, False, autocast)
    _, plain_grads, _ = run(fastmix_gpt, torch.float32, target, batches, None, autocast, scale)
    assert fused_layers and fused_dots.dtype == torch.float64
    assert_close(fused_dots, current_dots, 1e-5, "dots")
    assert_close(fused_dots, unscaled_dots, 1e-5, "dots without the scale")
    for name, want in plain_grads.items():
        assert fused_grads[name].dtype == want.dtype
        assert_close(fused_grads[name], want, 1e-2, name)


def weight_grad_dots_calls(step):
    with torch.profiler.profile() as prof:
        step()
    return sum(e.count for e in prof.key_averages() if e.key == "fastmix::weight_grad_dots")


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu-inplace"])
def test_scoring_only_backward_scores_fused_layers_the_current_way(seed, inplace):
    """probe.backward() computes no parameter gradient: the fused layers' backward then gives the
    input gradient alone (no weight_grad_dots call) and the hooks score them from their output
    gradients. The training backward runs one weight_grad_dots per layer. An in-place ReLU after a
    layer changes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 3)).double()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    ids = torch.randint(-1, K, (4, 6))
    loss = lambda: ((model(x) - y) ** 2 * (ids >= 0)[..., None]).sum()  # noqa: E731
    dots = {}
    for fused in (True, False):
        probe = AlignmentProbe(model, K, fused=fused, strict=True)
        model.zero_grad()
        F.mse_loss(model(x[:2]), y[:2]).backward()
        probe.set_target()
        for backward in ("warm-up", "probe.backward", "loss.backward"):
            model.zero_grad(set_to_none=True)
            probe.reset()

            def step():
                with probe.record(ids):
                    (probe.backward if backward == "probe.backward" else torch.Tensor.backward)(loss())

            calls = weight_grad_dots_calls(step)
            dots[fused, backward] = probe.result().dots
            if fused and backward != "warm-up":
                assert probe.fused_layers == ["0", "2"]
                assert calls == (2 if backward == "loss.backward" else 0)
            if backward == "probe.backward":
                assert all(p.grad is None for p in model.parameters())
        probe.remove()
    for backward in ("probe.backward", "loss.backward"):
        assert_close(dots[True, backward], dots[False, backward], 1e-12, backward)
    assert_close(dots[True, "loss.backward"], dots[False, "probe.backward"], 1e-12, "loss.backward")


def test_auto_follows_the_cost_model_and_leaves_layers_as_they_are(seed, monkeypatch):
    """"auto" (the default) takes the fused form where the cost model says it is cheaper: on a CPU
    for domains of many rows (MKL forms their pieces) or of tens of rows, not of a few rows; on a
    GPU for many rows. A layer that would be cheaper for no batch keeps its forward untouched."""
    assert fused_is_cheaper(2048, 8, 768, 768, "cpu")  # 8 x 256 rows, k = 8: ≈ 1.1x the GEMM, not 2x
    assert fused_is_cheaper(4096, 64, 768, 768, "cpu")  # 64 rows per domain: the op's own kernel
    assert not fused_is_cheaper(4096, 1024, 768, 768, "cpu")  # 4 rows per domain: the epilogue dominates
    assert fused_is_cheaper(2048, 8, 768, 768, "cuda")
    assert not fused_is_cheaper(4, 1024, 768, 768, "cuda")
    target, batches = data(seed, per_token=False)

    def recorded(fused_layers):
        """The probe's records over the batches with "auto", after the first (which watches)."""
        torch.manual_seed(0)
        model = fastmix_gpt()
        probe = AlignmentProbe(model, K)
        assert probe.fused == "auto"
        loss_of(model, target).backward()
        probe.set_target()
        for step, (x, ids) in enumerate(batches):
            with probe.record(ids):
                routed = sorted(name for name, m in model.named_modules() if "forward" in vars(m))
                loss_of(model, x).backward()
            assert probe.fused_layers == ([] if step == 0 else fused_layers)
        assert not any("forward" in vars(m) for m in model.modules())
        return model, probe, routed

    model, _, routed = recorded(linear_names(fastmix_gpt()))  # 6 sequences of 8 rows, 3 domains: cheaper
    assert routed == linear_names(model)
    # A CPU whose op GEMM cost three of MKL's: cheaper for no batch, so no forward is touched.
    monkeypatch.setitem(alignment.FUSED_GEMM_OVERHEAD, "cpu", 2.0)
    model, probe, routed = recorded([])
    assert routed == []
    probe.fused = True  # now the layers' forwards are routed through fused_linear, only while recording
    with probe.record(batches[0][1]):
        assert all("forward" in vars(m) for m in model.modules() if isinstance(m, nn.Linear))
        loss_of(model, batches[0][0]).backward()
    assert not any("forward" in vars(m) for m in model.modules())
    assert probe.fused_layers == linear_names(model)


def ddp_worker(rank, world, out):
    """Each rank: its share of the batches through a DDP-wrapped GPT, the probe on the inner model."""
    target, batches = data(0, per_token=True, batches=2 * world)
    saved = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = fastmix_gpt().double()
        ddp = nn.parallel.DistributedDataParallel(model)
        probe = AlignmentProbe(model, K, fused=fused)
        loss_of(model, target).backward()  # the same target batch on every rank
        probe.set_target()
        for x, ids in batches[rank::world]:  # the first record is the watched one
            ddp.zero_grad()
            probe.reset()
            with probe.record(ids):
                ddp(x, torch.roll(x, -1, 1))[1].backward()
        saved[fused] = {"dots": probe.result().dots, "fused_layers": probe.fused_layers,
                        "grads": {name: p.grad for name, p in model.named_parameters()}}
    torch.save(saved, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_under_ddp(tmp_path):
    """DDP (2 gloo CPU processes): the fused layers' `.grad` are all-reduced as plain ones, and
    the scores, averaged over the ranks, are the current form's."""
    run_distributed(ddp_worker, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        fused, current = rank[True], rank[False]
        assert fused["fused_layers"] == linear_names(fastmix_gpt()) and current["fused_layers"] == []
        assert_close(fused["dots"], current["dots"], 1e-10, "dots")
        assert_close(fused["dots"], ranks[0][True]["dots"], 0, "dots on rank 0")
        for name, want in current["grads"].items():
            assert_close(fused["grads"][name], want, 1e-12, name)


@pytest.mark.parametrize("fused", ["yes", 1, None])
def test_fused_must_be_auto_true_or_false(fused):
    with pytest.raises(ValueError, match="fused must be 'auto', True or False"):
        AlignmentProbe(fastmix_gpt(), K, fused=fused)
    with pytest.raises(ValueError, match="fused must be 'auto', True or False"):
        DGA(K, fused=fused)


def inline_dga_weights(store, fused, steps=200, grad_accum=2):
    """DGA inline at interval 1 driven by OnlineMixing over `steps` steps of a tiny float64 GPT
    (AdamW, clipping, gradient accumulation); the weights and the layers fused in the last record."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=store.vocab_size, n_layer=1, n_head=2, n_embd=16)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = MixtureSampler(store, batch_size=4, block_size=16, seed=0, prefetch=False)
    mixer = DGA(store.num_domains, mode="inline", interval=1, step_size=300, fused=fused)
    mixing = OnlineMixing(mixer, model, optimizer, sampler, target=store.targets[0], loss_fn=lm_loss)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(grad_accum):
            x, y, ids = sampler.next_batch()
            with mixing.record(ids):
                (lm_loss(model, x, y) / grad_accum).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        mixing.step(3e-3, grad_norm=norm, max_norm=0.5)
    fused_layers = mixer.probe(model).fused_layers
    mixing.close()
    sampler.close()
    return mixing.weights, fused_layers


def test_inline_dga_weights_over_200_steps_equal_the_current_forms(store_dir):
    store = DomainStore(store_dir)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fused, fused_layers = inline_dga_weights(store, True)
        current, current_layers = inline_dga_weights(store, False)
    finally:
        torch.set_default_dtype(default)
    assert fused_layers and current_layers == []
    uniform = torch.full_like(current, 1 / len(current))
    assert (current - uniform).abs().max() > 1e-3  # the weights moved: the comparison can fail
    assert math.isclose(float(fused.sum()), 1.0, abs_tol=1e-12)
    assert torch.allclose(fused, current, rtol=0, atol=1e-10), (fused, current)
