"""Embeddings from hidden states: domain embeddings and the online accumulator pool the right
hidden states, never padding; fastmix GPT and Hugging Face models alike."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fastmix
from fastmix.hidden_states import (EmbeddingAccumulator, domain_embeddings, embed_sequences, masked_mean,
                                   resolve_layer)
from fastmix.leverage_weights import chameleon_weights


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


def test_embed_sequences_with_fastmix_gpt(seed):
    from fastmix.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=13, n_layer=3, n_head=2, n_embd=8)).eval()
    sequences = [torch.randint(0, 13, (n,)) for n in (5, 11, 2)]  # the 11 tokens keep their first 8
    rows = embed_sequences(model, sequences, batch_size=2)
    captured = []
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        for s in sequences:
            model(s[None, :8])
    handle.remove()
    want = torch.cat([h.mean(1) for h in captured])
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-6)
    assert model.training is False and rows.shape == (3, 8)


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
