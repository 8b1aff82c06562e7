import numpy as np
import pytest
import torch

from fastmix.data import DomainStore, MixtureSampler, StoreWriter
from fastmix.data.sampler import EpochCapReached

K = 5
BLOCK = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Domain i holds tokens in [10 i, 10 i + 10): each row's domain can be read off its tokens."""
    path = tmp_path_factory.mktemp("s") / "store"
    rng = np.random.default_rng(0)
    with StoreWriter(path, {"type": "byte", "vocab_size": 257}) as w:
        for i in range(K):
            w.add(f"d{i}", 10 * i + rng.integers(0, 10, 200 + 50 * i), 10 * i + rng.integers(0, 10, 40))
        w.add("t", 200 + rng.integers(0, 10, 100), 200 + rng.integers(0, 10, 100), target=True)
    return DomainStore(path)


def _batches(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def _same(a, b):
    return all(torch.equal(u, v) for pa, pb in zip(a, b) for u, v in zip(pa, pb))


def test_rows_come_from_their_domain_and_y_is_x_shifted(store):
    sampler = MixtureSampler(store, np.ones(K), batch_size=32, block_size=BLOCK, seed=0)
    for x, y, ids in _batches(sampler, 5):
        assert x.shape == y.shape == (32, BLOCK) and x.dtype == torch.int64 and ids.shape == (32,)
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
        assert torch.equal(x // 10, ids[:, None].expand_as(x))
    sampler.close()


def test_stratified_allocation_is_within_one_row(store):
    rng = np.random.default_rng(1)
    sampler = MixtureSampler(store, np.ones(K), batch_size=37, block_size=BLOCK, seed=3)
    for _ in range(50):
        w = rng.dirichlet(np.ones(K) * 0.5)
        sampler.set_weights(w)
        counts = np.bincount(sampler.next_batch()[2].numpy(), minlength=K)
        assert np.all(np.abs(counts - w * 37) < 1 + 1e-9), (counts, w * 37)
    sampler.close()


def test_multinomial_allocation_matches_weights_on_average(store):
    w = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    sampler = MixtureSampler(store, w, batch_size=64, block_size=BLOCK, seed=0, allocation="multinomial")
    counts = sum(np.bincount(sampler.next_batch()[2].numpy(), minlength=K) for _ in range(200))
    freq = counts / counts.sum()
    assert counts[-1] == 0
    assert np.all(np.abs(freq - w) < 4 * np.sqrt(w * (1 - w) / counts.sum()) + 1e-12), freq
    sampler.close()


def test_deterministic_by_seed_with_or_without_prefetch(store):
    make = lambda seed, prefetch: MixtureSampler(store, np.ones(K), 16, BLOCK, seed=seed, prefetch=prefetch)
    a, b, c = make(7, True), make(7, False), make(8, True)
    weights = np.random.default_rng(0).dirichlet(np.ones(K), size=10)
    out = {id(s): [] for s in (a, b, c)}
    for step in range(10):
        for s in (a, b, c):
            if step % 3 == 0:  # weights change at some steps: prefetched batches must be redrawn
                s.set_weights(weights[step])
            out[id(s)].append(s.next_batch())
    assert _same(out[id(a)], out[id(b)])
    assert not _same(out[id(a)], out[id(c)])
    for s in (a, b, c):
        s.close()


def test_state_dict_resumes_exactly(store):
    a = MixtureSampler(store, [1, 2, 3, 4, 5], 16, BLOCK, seed=1)
    _batches(a, 3)
    a.target_batch("t", 4)
    a.balanced_batch(2)
    state = a.state_dict()
    expected = _batches(a, 4) + [a.target_batch("t", 4) + (None,), a.balanced_batch(2)]
    b = MixtureSampler(store, None, 16, BLOCK, seed=1)
    b.load_state_dict(state)
    got = _batches(b, 4) + [b.target_batch("t", 4) + (None,), b.balanced_batch(2)]
    assert all(torch.equal(u, v) for pe, pg in zip(expected, got) for u, v in zip(pe, pg) if u is not None)
    a.close()
    b.close()


def test_ranks_take_disjoint_interleaved_shares_of_one_global_batch(store):
    single = MixtureSampler(store, [1, 2, 3, 4, 5], 16, BLOCK, seed=2, rank=0, world_size=1)
    ranks = [MixtureSampler(store, [1, 2, 3, 4, 5], 8, BLOCK, seed=2, rank=r, world_size=2) for r in range(2)]
    shifts = set()
    for _ in range(8):
        x, _, ids = single.next_batch()
        (x0, _, ids0), (x1, _, ids1) = (r.next_batch() for r in ranks)
        shift = 0 if torch.equal(x0, x[0::2]) else 1  # the same on both ranks, drawn per step
        assert torch.equal(x0, x[shift::2]) and torch.equal(x1, x[1 - shift::2])
        assert torch.equal(ids0, ids[shift::2]) and torch.equal(ids1, ids[1 - shift::2])
        shifts.add(shift)
    assert shifts == {0, 1}
    for s in [single, *ranks]:
        s.close()


def test_each_rank_gets_an_unbiased_stratified_share(store):
    """The global batch is grouped by domain: without a per-step shift rank 0 would always get
    the first rows, so the first domains. Here each rank's rows follow the weights."""
    w = np.array([0.5, 0.5, 0, 0, 0])
    ranks = [MixtureSampler(store, w, 1, BLOCK, seed=0, rank=r, world_size=2, prefetch=False) for r in range(2)]
    first = [sum(int(r.next_batch()[2][0] == 0) for _ in range(400)) for r in ranks]
    assert all(150 < n < 250 for n in first), first  # domain 0 about half the time on every rank

    rng = np.random.default_rng(4)
    ranks = [MixtureSampler(store, None, 7, BLOCK, seed=5, rank=r, world_size=3, prefetch=False) for r in range(3)]
    for _ in range(30):
        w = rng.dirichlet(np.ones(K) * 0.5)
        for r in ranks:
            r.set_weights(w)
            counts = np.bincount(r.next_batch()[2].numpy(), minlength=K)
            assert np.all(np.abs(counts - w * 7) < 1 + 1e-9), (counts, w * 7)


def test_balanced_target_and_eval_batches(store):
    sampler = MixtureSampler(store, None, 6, BLOCK, seed=0)
    x, y, ids = sampler.balanced_batch(3)
    assert ids.tolist() == [i for i in range(K) for _ in range(3)]
    assert torch.equal(x // 10, ids[:, None].expand_as(x))
    tx, ty = sampler.target_batch("t", 5)
    assert tx.shape == (5, BLOCK) and bool((tx >= 200).all())
    e1, e2 = sampler.eval_batches("d3", 2), sampler.eval_batches("d3", 2)
    assert len(e1) == 2 and all(torch.equal(a, b) for p, q in zip(e1, e2) for a, b in zip(p, q))
    assert bool((e1[0][0] // 10 == 3).all())
    sampler.close()


def test_bad_inputs(store):
    with pytest.raises(ValueError, match="block_size"):
        MixtureSampler(store, None, 4, block_size=240)
    sampler = MixtureSampler(store, None, 4, BLOCK, prefetch=False)
    with pytest.raises(ValueError, match="shape"):
        sampler.set_weights([1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        sampler.set_weights([1, -1, 0, 0, 0])
    with pytest.raises(ValueError, match="allocation"):
        MixtureSampler(store, None, 4, BLOCK, allocation="other")


def test_many_domains(tmp_path):
    """2000 small domains: allocation still follows the weights; only touched files are opened."""
    k = 2000
    with StoreWriter(tmp_path / "many", {"type": "byte", "vocab_size": 2**16 + 1}) as w:
        for i in range(k):
            w.add(f"d{i}", np.full(BLOCK + 2, i), np.full(2, i))
    store = DomainStore(tmp_path / "many")
    weights = np.zeros(k)
    weights[[5, 1500]] = [0.25, 0.75]
    sampler = MixtureSampler(store, weights, 16, BLOCK, seed=0)
    x, _, ids = sampler.next_batch()
    assert sorted(ids.tolist()) == [5] * 4 + [1500] * 12
    assert torch.equal(x[:, 0], ids)
    sampler.close()


def test_epochs_count_training_tokens_drawn_over_tokens_held_and_resume(store):
    a = MixtureSampler(store, [1, 2, 3, 4, 5], 16, BLOCK, seed=3)
    rows = np.zeros(K, dtype=np.int64)
    for _ in range(5):
        rows += np.bincount(a.next_batch()[2].numpy(), minlength=K)
    a.balanced_batch(2)  # mixer batches are not training tokens
    a.target_batch("t", 4)
    np.testing.assert_array_equal(a.epochs, rows * BLOCK / store.train_tokens)
    b = MixtureSampler(store, None, 16, BLOCK, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        a.next_batch()
        b.next_batch()
    np.testing.assert_array_equal(a.epochs, b.epochs)
    assert np.all(a.epochs > 0)
    a.close()
    b.close()


def test_domains_appended_since_the_state_start_at_zero_epochs(store):
    a = MixtureSampler(store, None, 16, BLOCK, seed=3)
    a.next_batch()
    state = a.state_dict()
    fewer = {**state, "tokens_drawn": state["tokens_drawn"][:-1]}  # saved before the last domain was added
    b = MixtureSampler(store, None, 16, BLOCK, seed=3)
    b.load_state_dict(fewer)
    np.testing.assert_array_equal(b.epochs[:-1], a.epochs[:-1])
    assert b.epochs[-1] == 0
    with pytest.raises(ValueError, match="tokens_drawn has 6 domains, the store 5"):
        b.load_state_dict({**state, "tokens_drawn": np.ones(K + 1, dtype=np.int64)})
    a.close()
    b.close()


def test_basis_batches_follow_their_distributions_on_their_own_stream(store):
    """Basis j's rows go to domains by P_j: floor or ceil of P_j(i) · rows, exactly that where it
    is whole, none where P_j(i) = 0; drawing them leaves the training batches as they were."""
    bases = np.array([[2, 1, 1, 0, 0], [0, 0, 0, 0, 3], [1, 1, 1, 1, 0]], dtype=np.float64)
    plain = MixtureSampler(store, [1, 2, 3, 4, 5], 8, BLOCK, seed=4, prefetch=False)
    sampler = MixtureSampler(store, [1, 2, 3, 4, 5], 8, BLOCK, seed=4, prefetch=False)
    for _ in range(3):
        x, y, ids, basis_ids = sampler.basis_batch(bases, 4)
        assert basis_ids.tolist() == [j for j in range(3) for _ in range(4)]
        assert torch.equal(x // 10, ids[:, None].expand_as(x)) and torch.equal(x[:, 1:], y[:, :-1])
        counts = np.stack([np.bincount(ids[basis_ids == j].numpy(), minlength=K) for j in range(3)])
        np.testing.assert_array_equal(counts, [[2, 1, 1, 0, 0], [0, 0, 0, 0, 4], [1, 1, 1, 1, 0]])
        assert _same([sampler.next_batch()], [plain.next_batch()])
    rng = np.random.default_rng(5)
    uneven = rng.dirichlet(np.ones(K) * 0.5, size=4)
    uneven[:, 2] = 0
    uneven /= uneven.sum(axis=1, keepdims=True)
    for _ in range(20):
        _, _, ids, basis_ids = sampler.basis_batch(uneven, 7)
        counts = np.stack([np.bincount(ids[basis_ids == j].numpy(), minlength=K) for j in range(4)])
        assert np.all(np.abs(counts - uneven * 7) < 1 + 1e-9) and not counts[:, 2].any(), (counts, uneven * 7)
    for bad in (np.ones((2, K - 1)), np.ones(K), -np.eye(K), np.zeros((1, K)), np.full((1, K), np.nan)):
        with pytest.raises(ValueError, match="bases must"):
            sampler.basis_batch(bad, 2)
    sampler.close()
    plain.close()


def test_basis_batches_resume_exactly(store):
    bases = np.random.default_rng(6).dirichlet(np.ones(K), size=3)
    a = MixtureSampler(store, None, 8, BLOCK, seed=2)
    a.basis_batch(bases, 3)
    state = a.state_dict()
    expected = [a.basis_batch(bases, 3), a.next_batch()]
    b = MixtureSampler(store, None, 8, BLOCK, seed=2)
    b.load_state_dict(state)
    assert _same(expected, [b.basis_batch(bases, 3), b.next_batch()])
    # a state saved before basis batches existed: they start from the first draw
    b.load_state_dict({key: value for key, value in state.items() if key != "basis_draws"})
    fresh = MixtureSampler(store, None, 8, BLOCK, seed=2)
    assert _same([b.basis_batch(bases, 3)], [fresh.basis_batch(bases, 3)])
    for s in (a, b, fresh):
        s.close()


# ---------------------------------------------------------------- the limited-data regime

def _tiny_store(path, sizes):
    with StoreWriter(path, {"type": "byte", "vocab_size": 257}) as w:
        rng = np.random.default_rng(0)
        for i, n in enumerate(sizes):
            w.add(f"d{i}", rng.integers(0, 256, n, dtype=np.uint16), rng.integers(0, 256, 100, dtype=np.uint16))
    return DomainStore(path)


def test_a_capped_domain_is_drawn_no_more_and_its_weight_goes_to_the_others(tmp_path):
    store = _tiny_store(tmp_path / "s", [400, 4000, 4000])
    sampler = MixtureSampler(store, [0.6, 0.3, 0.1], batch_size=10, block_size=8, seed=0, max_epochs=1.0)
    seen_after_cap, steps = [], 0
    while not sampler.capped[0]:
        sampler.next_batch()
        steps += 1
    # capped as soon as its count reaches one epoch, not a batch later
    assert 1.0 <= sampler.epochs[0] < 1.0 + 6 * 8 / 400 and steps == 9  # 6 of its rows a batch
    np.testing.assert_allclose(sampler.sampling_weights, [0, 0.75, 0.25])
    for _ in range(40):
        seen_after_cap.append(sampler.next_batch()[2])
    ids = torch.cat(seen_after_cap)
    assert not bool((ids == 0).any())
    assert abs(float((ids == 1).float().mean()) - 0.75) < 0.02  # stratified: the weights up to one row a batch
    np.testing.assert_allclose(sampler.weights, [0.6, 0.3, 0.1])  # the mixer's weights stay what they were
    sampler.close()


def test_the_cap_resumes_exactly_and_a_store_drawn_dry_says_so(tmp_path):
    store = _tiny_store(tmp_path / "s", [400, 600])
    first = MixtureSampler(store, [0.5, 0.5], batch_size=10, block_size=8, seed=3, max_epochs=1.0)
    for _ in range(6):
        first.next_batch()
    resumed = MixtureSampler(store, [0.5, 0.5], batch_size=10, block_size=8, seed=3, max_epochs=1.0)
    resumed.load_state_dict(first.state_dict())
    for _ in range(4):
        a, b = first.next_batch(), resumed.next_batch()
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        assert np.array_equal(first.capped, resumed.capped)
    with pytest.raises(EpochCapReached, match=r"every domain has been drawn for max_epochs = 1.0 epochs"):
        for _ in range(20):
            first.next_batch()
    assert first.capped.all()
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="max_epochs must be a finite number > 0 or None"):
            MixtureSampler(store, max_epochs=bad)
    first.close()
    resumed.close()
