"""DomainMixture: live weights through DataLoader workers, exact resume, ranks' shares, sources."""
import numpy as np
import pytest
import torch

from fastmix.data import DomainMixture, DomainStore


class Tokens(torch.utils.data.Dataset):
    """Items of random lengths whose tokens all equal the domain's index: a row tells its domain."""

    def __init__(self, domain, items=20, seed=0):
        rng = np.random.default_rng([seed, domain])
        self.items = [[domain] * int(n) for n in rng.integers(9, 30, items)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


BASES = np.array([[1, 1, 0, 0], [0, 1, 1, 2]], dtype=np.float64)  # normalised by the draw


def _mixture(**options):
    domains = {f"d{i}": Tokens(i) for i in range(4)}
    return DomainMixture(domains, batch_size=8, block_size=8, targets={"t": Tokens(9)}, **options)


def test_two_workers_follow_a_weight_change_at_the_next_batch():
    mixture = _mixture()
    seen = []
    for step, (x, y, ids) in enumerate(mixture.loader(num_workers=2, prefetch_factor=2)):
        assert torch.equal(x[:, 0], ids) and torch.equal(y[:, -1], ids)  # rows come from their domain
        seen.append(torch.bincount(ids, minlength=4).tolist())
        if step == 3:
            mixture.set_weights([0, 0, 1, 0])
        if step == 5:
            mixture.set_weights([0.5, 0.5, 0, 0])
        if step == 7:
            break
    assert all(counts == [2, 2, 2, 2] for counts in seen[:4])  # uniform: stratified, 2 rows each
    assert seen[4] == seen[5] == [0, 0, 8, 0]
    assert seen[6] == seen[7] == [4, 4, 0, 0]


def test_resume_is_exact_with_workers():
    def run(mixture, steps):
        out = []
        for step, batch in zip(range(steps), mixture.loader(num_workers=2)):
            out.append(batch)
            mixture.set_weights(torch.rand(4, generator=torch.Generator().manual_seed(mixture.step)) + 0.1)
            mixture.balanced_batch(1)
            mixture.target_batch("t", 2)
            mixture.basis_batch(BASES, 2)
        return out

    whole = run(_mixture(seed=3), 10)
    first = _mixture(seed=3)
    head = run(first, 4)
    resumed = _mixture(seed=3)
    resumed.load_state_dict(first.state_dict())
    tail = run(resumed, 6)
    for a, b in zip(whole, head + tail):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    again = _mixture(seed=3)
    run(again, 10)
    assert torch.equal(resumed.balanced_batch(2)[0], again.balanced_batch(2)[0])
    assert torch.equal(resumed.basis_batch(BASES, 3)[0], again.basis_batch(BASES, 3)[0])


def test_basis_batches_follow_their_distributions_and_drive_dga():
    """Basis j's rows go to domains by P_j (floor or ceil of P_j(i) · rows, none where P_j(i) = 0),
    leave the training batches as they were, and feed DGA with distribution reweighting through
    OnlineMixing, which moves the basis weights."""
    from fastmix.mixing import DGA, OnlineMixing

    mixture, plain = _mixture(seed=1), _mixture(seed=1)
    for _ in range(3):
        x, y, ids, basis_ids = mixture.basis_batch(BASES, 4)
        assert basis_ids.tolist() == [j for j in range(2) for _ in range(4)]
        assert torch.equal(x[:, 0], ids)
        counts = np.stack([np.bincount(ids[basis_ids == j].numpy(), minlength=4) for j in range(2)])
        np.testing.assert_array_equal(counts, [[2, 2, 0, 0], [0, 1, 1, 2]])
        assert all(torch.equal(a, b) for a, b in zip(mixture.next_batch(), plain.next_batch()))
    with pytest.raises(ValueError, match="bases must have shape"):
        mixture.basis_batch(np.ones((2, 3)), 2)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dga = DGA(4, bases=BASES, interval=1, rows_per_basis=2)
    mixing = OnlineMixing(dga, model, optimizer, mixture, target="t",
                          loss_fn=lambda m, x, y: torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()))
    before = mixing.weights
    mixing.step(lr=0.1)
    assert not torch.equal(mixing.weights, before)
    torch.testing.assert_close(mixing.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_starting_a_loader_leaves_the_global_rng_alone():
    """A DataLoader draws its workers' base seed from torch's global generator when iterated; a
    MixtureLoader seeds them from the mixture, so a loader started on resume shifts no dropout."""
    mixture = _mixture()
    for workers in (0, 2):
        torch.manual_seed(5)
        before = torch.get_rng_state()
        next(iter(mixture.loader(num_workers=workers)))
        assert torch.equal(torch.get_rng_state(), before)


def test_ranks_take_disjoint_shares_of_one_global_allocation():
    weights = [0.1, 0.2, 0.3, 0.4]
    for step in range(5):
        ranks = [DomainMixture({f"d{i}": Tokens(i) for i in range(4)}, 8, 8, weights=weights, rank=r, world_size=2)
                 for r in range(2)]
        ids = [m.draw(step, np.asarray(weights))[2] for m in ranks]
        both = torch.bincount(torch.cat(ids), minlength=4)
        assert both.sum() == 16
        # the union is a stratified allocation of 16 rows: floor or ceil of w * 16 per domain
        expected = torch.tensor(weights) * 16
        assert bool(((both >= expected.floor()) & (both <= expected.ceil())).all()), both


def test_store_and_hf_dataset_domains(store_dir):
    datasets = pytest.importorskip("datasets")
    store = DomainStore(store_dir)
    mixture = DomainMixture.from_store(store, batch_size=4, block_size=16)
    assert mixture.domains == store.domains and mixture.targets == store.targets
    x, y, ids = mixture.next_batch()
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    tx, _ = mixture.target_batch(store.targets[0], 3)
    assert tx.shape == (3, 16)
    hf = {f"d{i}": datasets.Dataset.from_dict({"input_ids": Tokens(i).items}) for i in range(2)}
    x, y, ids = DomainMixture(hf, batch_size=6, block_size=8).next_batch()
    assert torch.equal(x[:, 0], ids)


def test_mistakes_are_one_line_errors():
    mixture = _mixture()
    with pytest.raises(ValueError, match="4 entries"):
        mixture.set_weights([1, 2])
    with pytest.raises(ValueError, match="not all zero"):
        mixture.set_weights([0, 0, 0, 0])
    with pytest.raises(ValueError, match="target 'x'"):
        mixture.target_batch("x", 1)
    with pytest.raises(ValueError, match="batch_size is the mixture's"):
        mixture.loader(batch_size=4)
    short = DomainMixture({"a": Tokens(0)}, batch_size=2, block_size=40)
    with pytest.raises(ValueError, match="fewer than block_size"):
        short.next_batch()
