"""Chameleon weights follow the recipe; domain embeddings and the online accumulator pool
the right hidden states, never padding."""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastmix
from fastmix.chameleon import EmbeddingAccumulator, chameleon_weights, domain_embeddings, masked_mean, resolve_layer


def recipe(e, lam=10.0, mode="pretrain", temperature=None):
    """The published recipe, in numpy float64."""
    e = np.asarray(e, dtype=np.float64)
    k = e.shape[0]
    h = np.eye(k) - np.ones((k, k)) / k
    kc = h @ (e @ e.T) @ h
    s = np.diag(kc @ np.linalg.inv(kc + lam * k * np.eye(k)))
    s = s / s.sum()
    t = temperature or (5.0 if mode == "pretrain" else 0.2)
    x = (1.0 / s) / t if mode == "pretrain" else s / t
    w = np.exp(x - x.max())
    return w / w.sum(), s


@pytest.mark.parametrize("k,d", [(2, 3), (5, 16), (7, 768), (12, 4)])
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
@pytest.mark.parametrize("lam", [0.1, 10.0])
def test_weights_follow_the_recipe(seed, k, d, mode, lam):
    e = torch.randn(k, d) * (1.0 / d**0.5)
    w, s = chameleon_weights(e, lam=lam, mode=mode, return_scores=True)
    want_w, want_s = recipe(e.numpy(), lam, mode)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), want_w, rtol=1e-5, atol=1e-6)
    assert abs(float(s.sum()) - 1) < 1e-6 and abs(float(w.sum()) - 1) < 1e-6
    assert fastmix.chameleon_weights is chameleon_weights


def test_temperature_and_ridge_scale_with_k(seed):
    e = torch.randn(6, 10)
    for t in (0.5, 2.0):
        np.testing.assert_allclose(chameleon_weights(e, mode="finetune", temperature=t).numpy(),
                                   recipe(e.numpy(), mode="finetune", temperature=t)[0], rtol=1e-5)
    # the ridge is λ·k: scores equal the plain ridge-leverage formula at λk, not at λ
    _, s = chameleon_weights(e, lam=3.0, return_scores=True)
    raw = fastmix.ops.ridge_leverage_scores(e.double(), 3.0 * 6, center=True)
    np.testing.assert_allclose(s.numpy(), (raw / raw.sum()).numpy(), rtol=1e-6)
    raw_k1 = fastmix.ops.ridge_leverage_scores(e.double(), 3.0, center=True)
    assert not np.allclose(s.numpy(), (raw_k1 / raw_k1.sum()).numpy(), rtol=1e-3)


def test_appending_a_domain_is_the_formula_on_k_plus_one(seed):
    """Transfer without retraining: a new domain enters only through its embedding; the
    weights are the recipe on the k + 1 embeddings, and in pretrain mode a domain far from
    the others (high leverage) gets less weight than one near their mean (low leverage)."""
    e = torch.randn(5, 32) / 32**0.5
    far = e.mean(0) + 3.0 * torch.randn(32) / 32**0.5
    near = e.mean(0) + 0.01 * torch.randn(32) / 32**0.5
    for new in (far, near):
        grown = torch.cat([e, new[None]])
        np.testing.assert_allclose(chameleon_weights(grown).numpy(), recipe(grown.numpy())[0], rtol=1e-5)
    w_far = chameleon_weights(torch.cat([e, far[None]]))[-1]
    w_near = chameleon_weights(torch.cat([e, near[None]]))[-1]
    assert w_near > w_far


def test_duplicated_domain_not_upweighted_per_copy_in_finetune(seed):
    """Duplicates share their leverage, so in finetune mode (softmax(S/T)) each copy gets
    less weight than the domain had alone."""
    e = torch.randn(5, 32) / 32**0.5
    alone = chameleon_weights(e, mode="finetune")[0]
    dup = torch.cat([e] + [e[:1]] * 9)
    w = chameleon_weights(dup, mode="finetune")
    copies = [0] + list(range(5, 14))
    assert float(w[copies].max()) < float(alone)
    np.testing.assert_allclose(w.numpy(), recipe(dup.numpy(), mode="finetune")[0], rtol=1e-5)


def test_duplicated_domain_is_upweighted_in_pretrain_as_the_recipe_implies(seed):
    """The issue asked that a domain duplicated many times not be upweighted in pretrain mode;
    the published recipe (DESIGN.md's contract) does the opposite, and fastmix keeps the
    recipe: copies pull the centring mean onto themselves, so their centred embeddings and
    leverage scores shrink, 1/S grows, and softmax((1/S)/T) gives them most of the weight.
    Pinned here so that a change of behaviour is a decision, not an accident."""
    e = torch.randn(5, 32) / 32**0.5
    alone = float(chameleon_weights(e)[0])
    dup = torch.cat([e] + [e[:1]] * 4)
    w, s = chameleon_weights(dup, return_scores=True)
    copies = [0, 5, 6, 7, 8]
    assert float(w[copies].sum()) > max(alone, 0.5)
    assert float(s[copies].max()) < float(s[[1, 2, 3, 4]].min())  # copies: the lowest leverage


def test_degenerate_cases():
    assert chameleon_weights(torch.randn(1, 4)).tolist() == [1.0]
    w, s = chameleon_weights(torch.ones(3, 4), return_scores=True)  # identical domains
    np.testing.assert_allclose(w.numpy(), [1 / 3] * 3)
    np.testing.assert_allclose(s.numpy(), [1 / 3] * 3)
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])  # domain 1 is the mean: S = 0
    w = chameleon_weights(e.double())
    assert w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), [0.0, 1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("offset", [3e-156, 1e-158, 1e-160])
def test_a_score_below_float64_range_takes_the_limit_not_nan(offset):
    """S_1 ≈ 1e-312..1e-321 is not 0, but 1/S_1 overflows: the pretrain weights are the limit
    [0, 1, 0] (the softmax of an infinite logit would be NaN everywhere)."""
    e = torch.tensor([[1.0, 0.0], [offset, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(chameleon_weights(e).numpy(), [0.0, 1.0, 0.0], atol=1e-12)
    w = chameleon_weights(e, mode="finetune", temperature=1e-310)  # S/T overflows for the two others
    np.testing.assert_allclose(w.numpy(), [0.5, 0.0, 0.5], atol=1e-12)


def test_numpy_scalars_are_numbers(seed):
    e = torch.randn(5, 8, dtype=torch.float64)
    want = chameleon_weights(e, lam=3.0, temperature=2.0)
    assert torch.equal(chameleon_weights(e, lam=np.float32(3.0), temperature=np.float64(2.0)), want)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        chameleon_weights(torch.randn(4))
    with pytest.raises(ValueError, match="mode"):
        chameleon_weights(torch.randn(3, 4), mode="train")
    with pytest.raises(ValueError, match="lam"):
        chameleon_weights(torch.randn(3, 4), lam=0.0)
    with pytest.raises(ValueError, match="temperature"):
        chameleon_weights(torch.randn(3, 4), temperature=-1)
    with pytest.raises(ValueError, match="NaN"):
        chameleon_weights(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ---------------------------------------------------------------- embeddings
class Tiny(nn.Module):
    """Per-token layers (no mixing across positions), so padding can only leak by pooling."""

    def __init__(self, vocab=11, d=6, n_layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def hidden(self, ids, upto):
        x = self.embed(ids)
        for layer in self.layers[: upto + 1]:
            x = layer(x)
        return x


def manual_embedding(model, batches, layer_index, pad_id):
    pooled = []
    with torch.no_grad():
        for ids in batches:
            h = model.hidden(ids, layer_index)
            for row, mask in zip(h, ids != pad_id):
                pooled.append(row[mask].mean(0))
    return torch.stack(pooled).mean(0)


def random_batches(generator, count, pad_id=0, vocab=11):
    batches = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (3, 7), generator=generator)
        lengths = torch.randint(1, 8, (3,), generator=generator)
        ids[torch.arange(7)[None, :] >= lengths[:, None]] = pad_id
        batches.append(ids)
    return batches


def test_domain_embeddings_masked_mean(seed):
    g = torch.Generator().manual_seed(seed)
    model = Tiny()
    domains = [random_batches(g, 2), random_batches(g, 3)]
    emb = domain_embeddings(model, domains, pad_id=0, progress=False)
    assert emb.shape == (2, 6) and emb.dtype == torch.float32
    assert resolve_layer(model) is model.layers[1]  # (3 - 1) // 2
    for i, batches in enumerate(domains):
        np.testing.assert_allclose(emb[i].numpy(), manual_embedding(model, batches, 1, 0).numpy(),
                                   rtol=1e-5, atol=1e-6)
    # another layer, by name or by module
    by_name = domain_embeddings(model, domains, layer="layers.2", pad_id=0, progress=False)
    by_module = domain_embeddings(model, domains, layer=model.layers[2], pad_id=0, progress=False)
    np.testing.assert_allclose(by_name.numpy(), by_module.numpy())
    np.testing.assert_allclose(by_name[0].numpy(), manual_embedding(model, domains[0], 2, 0).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_masked_mean_weights_by_a_soft_mask(seed):
    hidden = torch.randn(2, 4, 3)
    hidden[1, 3] = float("nan")  # a padded position: never enters
    mask = torch.tensor([[1.0, 0.5, 0.0, 2.0], [0.25, 1.0, 1.0, 0.0]])
    want = (hidden.nan_to_num() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(masked_mean(hidden, mask), want)
    binary = mask > 0
    torch.testing.assert_close(masked_mean(hidden, binary), torch.stack(
        [hidden[i][binary[i]].mean(0) for i in range(2)]))


def test_padding_never_enters_and_domains_are_independent(seed):
    g = torch.Generator().manual_seed(seed)
    model = Tiny()
    domains = [random_batches(g, 2), random_batches(g, 2)]
    masks = [[b != 0 for b in d] for d in domains]
    base = domain_embeddings(model, [list(zip(d, m)) for d, m in zip(domains, masks)], progress=False)
    # change every padded token: nothing moves
    noisy = [[torch.where(m, b, torch.randint(1, 11, b.shape)) for b, m in zip(d, ms)]
             for d, ms in zip(domains, masks)]
    again = domain_embeddings(model, [list(zip(d, m)) for d, m in zip(noisy, masks)], progress=False)
    np.testing.assert_allclose(again.numpy(), base.numpy(), rtol=1e-6, atol=1e-7)
    # a new domain alone gets the row it gets among all (transfer needs no recomputation)
    alone = domain_embeddings(model, {"new": [{"input_ids": b, "attention_mask": m}
                                              for b, m in zip(domains[1], masks[1])]}, progress=False)
    np.testing.assert_allclose(alone[0].numpy(), base[1].numpy(), rtol=1e-6)


def test_domain_embeddings_restores_mode_and_is_seeded(seed):
    model = Tiny()
    model.layers[1].append(nn.Dropout(0.5))
    model.train()
    batches = [[torch.randint(1, 11, (2, 5))]]
    first = domain_embeddings(model, batches, progress=False, seed=3)
    second = domain_embeddings(model, batches, progress=False, seed=3)
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    assert model.training
    with pytest.raises(ValueError, match="no sample"):
        domain_embeddings(model, [[torch.zeros(2, 3, dtype=torch.long)]], pad_id=0, progress=False)


@pytest.mark.skipif(importlib.util.find_spec("fastmix.model") is None, reason="no fastmix.model")
def test_domain_embeddings_with_fastmix_gpt(seed):
    from fastmix.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=13, n_layer=3, n_head=2, n_embd=8))
    assert resolve_layer(model) is model.transformer.h[1]
    ids = torch.randint(0, 13, (2, 6))
    emb = domain_embeddings(model, [[ids], [ids[:1]]], progress=False)
    captured = []
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        model.eval()
        model(ids)
    handle.remove()
    np.testing.assert_allclose(emb[0].numpy(), captured[0].mean(1).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[1].numpy(), captured[0][0].mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_accumulator_segment_sums_decay_and_reset(seed):
    model = Tiny()
    acc = EmbeddingAccumulator(model, num_domains=3)
    assert fastmix.EmbeddingAccumulator is EmbeddingAccumulator
    g = torch.Generator().manual_seed(seed)
    batches = random_batches(g, 3)
    ids_per_batch = [torch.tensor([0, 2, 1]), torch.tensor([2, 2, -1]), torch.tensor([0, 1, 1])]
    pooled = {i: [] for i in range(3)}
    for ids, domains in zip(batches, ids_per_batch):
        acc.set_domains(domains, ids != 0)
        model(ids).sum().backward()  # a training forward/backward
        h = model.hidden(ids, 1).detach()
        for row, mask, d in zip(h, ids != 0, domains.tolist()):
            if d >= 0:
                pooled[d].append(row[mask].mean(0))
    model(batches[0])  # a forward without set_domains is ignored
    want = torch.stack([torch.stack(pooled[i]).mean(0) for i in range(3)])
    np.testing.assert_allclose(acc.embeddings().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.counts.numpy(), [2, 3, 3])
    w = acc.weights(lam=1.0)
    np.testing.assert_allclose(w.numpy(), chameleon_weights(acc.embeddings(), lam=1.0).numpy())
    acc.reset()
    with pytest.raises(ValueError, match="no samples"):
        acc.embeddings()
    with pytest.raises(ValueError, match="num_domains"):
        acc.set_domains(torch.tensor([3]))
    acc.remove()

    decayed = EmbeddingAccumulator(model, num_domains=1, layer="layers.0", decay=0.5)
    x1, x2 = torch.randint(1, 11, (1, 4)), torch.randint(1, 11, (1, 4))
    for x in (x1, x2):
        decayed.set_domains(torch.tensor([0]))
        model(x)
    h1, h2 = (model.hidden(x, 0).detach().mean(1)[0] for x in (x1, x2))
    np.testing.assert_allclose(decayed.counts.numpy(), [1.5])
    np.testing.assert_allclose(decayed.embeddings()[0].numpy(), ((0.5 * h1 + h2) / 1.5).numpy(),
                               rtol=1e-5, atol=1e-6)
    decayed.remove()
