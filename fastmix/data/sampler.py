"""MixtureSampler: training batches whose rows are allocated to domains by mixture weights.

Every draw is a pure function of (seed, stream, counter, weights): no hidden RNG state. That is
what makes it exactly resumable (the state is a few counters), lets it prefetch the next batch
in the background (a prefetched batch is thrown away if the weights change before it is used),
and gives each torch.distributed rank a disjoint share of one global batch.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastmix.data.mixture import basis_domains
from fastmix.distributed import rank_and_world

# Stream ids keep the random numbers of training, balanced, target and basis batches independent.
_TRAIN, _BALANCED, _TARGET, _BASIS = 0, 1, 2, 3


class TooShortError(ValueError):
    """Data too short for one window of block_size + 1 tokens (a smaller block size fits it)."""


class EpochCapReached(RuntimeError):
    """Every domain has reached the sampler's max_epochs: no batch is left to draw."""


class MixtureSampler:
    """Batches `(x, y, domain_ids)` of shape (batch_size, block_size), int64, on the CPU.

    allocation="stratified" (default) allocates rows by systematic sampling: every domain gets
    floor or ceil of `weight * rows`, so the batch follows the weights with the least noise.
    allocation="multinomial" draws each row's domain independently.

    Under torch.distributed (or with explicit `rank`/`world_size`) one global batch of
    `batch_size * world_size` rows is drawn, grouped by domain, and rank r takes rows
    o, o + world_size, ... with o = (r + shift) % world_size, where `shift` is drawn anew at
    every step (the same on all ranks). So ranks see disjoint rows that together are the global
    batch, and with stratified allocation each rank's rows are themselves a stratified draw of
    batch_size rows from the mixture (a fixed o would favour the first domains on rank 0 and
    the last ones on the last rank). All ranks must hold the same weights.

    max_epochs (the limited-data regime): a domain whose training tokens drawn reach
    max_epochs × the tokens it holds (`epochs`, counted over the global batch) is drawn no more,
    and its weight goes to the others (`sampling_weights`); once every domain is capped,
    next_batch raises EpochCapReached. The counts are in the state, so a resume caps alike.

    Cost per batch is O(batch_size · log k): the weights' cumulative sum is computed once
    when they change, not per batch.
    """

    def __init__(self, store, weights=None, batch_size=16, block_size=64, seed=0,
                 allocation="stratified", prefetch=True, rank=None, world_size=None, max_epochs=None):
        if allocation not in ("stratified", "multinomial"):
            raise ValueError(f"allocation must be 'stratified' or 'multinomial', got {allocation!r}")
        if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float))
                                       or not 0 < max_epochs < float("inf")):
            raise ValueError(f"max_epochs must be a finite number > 0 or None, got {max_epochs!r}")
        self.max_epochs = max_epochs
        self.store = store
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.allocation = allocation
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.rank, self.world_size = int(rank), int(world_size)
        # Windows of block_size + 1 tokens (x and y shifted by one) can start at n - block_size places.
        self._starts = store.train_tokens - self.block_size
        too_short = np.flatnonzero(self._starts < 1)
        if too_short.size:
            names = ", ".join(store.domains[i] for i in too_short[:5]) + (", ..." if too_short.size > 5 else "")
            raise TooShortError(f"{too_short.size} domain(s) have fewer than block_size + 1 = "
                                f"{self.block_size + 1} training tokens: {names}")
        self.step = 0
        self._balanced_draws = 0
        self._target_draws = 0
        self._basis_draws = 0
        self._tokens_drawn = np.zeros(store.num_domains, dtype=np.int64)
        self._capped = np.zeros(store.num_domains, dtype=bool)
        self._version = 0
        self.set_weights(np.full(store.num_domains, 1.0 / store.num_domains) if weights is None else weights)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastmix-prefetch") if prefetch else None
        self._pending = None  # (step, weights version, future)

    # weights ---------------------------------------------------------------------------
    @property
    def weights(self):
        return self._weights.copy()

    def set_weights(self, weights):
        """Use `weights` (k non-negative numbers, normalised here) from the next batch on."""
        w = torch.as_tensor(weights, dtype=torch.float64).cpu().numpy() if torch.is_tensor(weights) \
            else np.asarray(weights, dtype=np.float64)
        if w.shape != (self.store.num_domains,):
            raise ValueError(f"weights must have shape ({self.store.num_domains},), got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        w = w / w.sum()
        if hasattr(self, "_weights") and np.array_equal(w, self._weights):
            return
        self._weights = w
        self._set_cdf()

    @property
    def capped(self):
        """Which domains have reached `max_epochs` (bool, k): no more rows are drawn from them."""
        return self._capped.copy()

    @property
    def sampling_weights(self):
        """The weights the batches are drawn with: `weights`, with the weight of capped domains
        given to the others in proportion to theirs (evenly where theirs is all zero)."""
        w = np.where(self._capped, 0.0, self._weights)
        if w.sum() == 0:
            w = (~self._capped).astype(np.float64)
        return w / w.sum()

    def _set_cdf(self):
        if self._capped.all():
            return  # nothing left to draw from: next_batch says so
        cdf = np.cumsum(self.sampling_weights)
        self._cdf = cdf / cdf[-1]
        self._version += 1  # a batch prefetched with the old weights is drawn again

    def _update_capped(self):
        if self.max_epochs is None:
            return
        capped = self.epochs >= self.max_epochs
        if not np.array_equal(capped, self._capped):
            self._capped = capped
            self._set_cdf()

    # training batches ------------------------------------------------------------------
    def _rng(self, stream, counter):
        return np.random.default_rng([self.seed, stream, counter])

    def _allocate(self, rng, rows, cdf):
        """Domain of each of `rows` rows, sorted (grouped by domain)."""
        u = rng.random(1) + np.arange(rows) if self.allocation == "stratified" else np.sort(rng.random(rows) * rows)
        ids = np.searchsorted(cdf, u / rows, side="right")
        return np.minimum(ids, self.store.num_domains - 1)

    def _read(self, names_or_ids, starts, split="train"):
        windows = np.empty((len(starts), self.block_size + 1), dtype=np.int64)
        for row, (name, start) in enumerate(zip(names_or_ids, starts)):
            name = name if isinstance(name, str) else int(name)
            windows[row] = self.store.read(name, split, int(start), self.block_size + 1)
        x = torch.from_numpy(windows[:, :-1].copy())
        y = torch.from_numpy(windows[:, 1:].copy())
        return x, y

    def _draw(self, step, cdf):
        rng = self._rng(_TRAIN, step)
        global_rows = self.batch_size * self.world_size
        ids = self._allocate(rng, global_rows, cdf)
        starts = (rng.random(global_rows) * self._starts[ids]).astype(np.int64)
        # Drawn after the rows, so that a single process (where it is always 0) draws as before.
        shift = int(rng.integers(self.world_size))
        mine = slice((self.rank + shift) % self.world_size, global_rows, self.world_size)
        x, y = self._read(ids[mine], starts[mine])
        rows_per_domain = np.bincount(ids, minlength=self.store.num_domains)
        return (x, y, torch.from_numpy(ids[mine].astype(np.int64))), rows_per_domain

    def next_batch(self):
        if self._capped.all():
            raise EpochCapReached(f"every domain has been drawn for max_epochs = {self.max_epochs} epochs: "
                                  "nothing is left to draw from")
        pending, self._pending = self._pending, None
        if pending is not None and pending[:2] == (self.step, self._version):
            batch, rows_per_domain = pending[2].result()
        else:
            batch, rows_per_domain = self._draw(self.step, self._cdf)
        # Counted over the global batch, so every rank holds the same counts.
        self._tokens_drawn += rows_per_domain * self.block_size
        self._update_capped()
        self.step += 1
        if self._executor is not None:
            self._pending = (self.step, self._version, self._executor.submit(self._draw, self.step, self._cdf))
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    @property
    def epochs(self):
        """Each domain's epochs so far: training tokens drawn / training tokens held (float64, k)."""
        return self._tokens_drawn / self.store.train_tokens

    # batches for mixers and evaluation ----------------------------------------------------
    def balanced_batch(self, rows_per_domain):
        """`rows_per_domain` rows of every domain, grouped by domain: (x, y, domain_ids)."""
        rng = self._rng(_BALANCED, self._balanced_draws)
        self._balanced_draws += 1
        ids = np.repeat(np.arange(self.store.num_domains), rows_per_domain)
        starts = (rng.random(ids.size) * self._starts[ids]).astype(np.int64)
        x, y = self._read(ids, starts)
        return x, y, torch.from_numpy(ids)

    def basis_batch(self, bases, rows_per_basis):
        """`rows_per_basis` rows drawn from each basis distribution, a row of `bases` ((m, k)):
        (x, y, domain_ids, basis_ids), grouped by basis (see fastmix.data.mixture.basis_domains)."""
        rng = self._rng(_BASIS, self._basis_draws)
        ids, basis_ids = basis_domains(rng, bases, rows_per_basis, self.store.num_domains)
        self._basis_draws += 1
        starts = (rng.random(ids.size) * self._starts[ids]).astype(np.int64)
        x, y = self._read(ids, starts)
        return x, y, torch.from_numpy(ids), torch.from_numpy(basis_ids)

    def target_batch(self, name, rows):
        """`rows` training windows of target task `name`: (x, y)."""
        rng = self._rng(_TARGET, self._target_draws)
        self._target_draws += 1
        return self._read([name] * rows, _window_starts(rng, self.store.num_tokens(name), rows, self.block_size, name))

    def eval_batches(self, name, num_batches, seed=0):
        """Fixed held-out batches of a domain or target (the same at every call): list of (x, y)."""
        rng = np.random.default_rng([seed, 0xE7A1, *name.encode()])
        n = self.store.num_tokens(name, "val")
        starts = _window_starts(rng, n, num_batches * self.batch_size, self.block_size, f"{name} (val)")
        return [self._read([name] * self.batch_size, starts[i::num_batches], "val") for i in range(num_batches)]

    # state -------------------------------------------------------------------------------
    def state_dict(self):
        return {"step": self.step, "balanced_draws": self._balanced_draws, "target_draws": self._target_draws,
                "basis_draws": self._basis_draws, "weights": self._weights.copy(), "seed": self.seed,
                "allocation": self.allocation, "tokens_drawn": self._tokens_drawn.copy()}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self._balanced_draws = int(state["balanced_draws"])
        self._target_draws = int(state["target_draws"])
        self._basis_draws = int(state.get("basis_draws", 0))  # states saved before basis batches had none
        # Counts start at zero for states saved before epochs were counted and for domains
        # appended to the store since the state was saved.
        drawn = np.asarray(state.get("tokens_drawn", ()), dtype=np.int64)
        if len(drawn) > self.store.num_domains:
            raise ValueError(f"state: tokens_drawn has {len(drawn)} domains, the store {self.store.num_domains}")
        self._tokens_drawn = np.zeros(self.store.num_domains, dtype=np.int64)
        self._tokens_drawn[:len(drawn)] = drawn
        self.set_weights(state["weights"])
        self._update_capped()  # the cap of this run, on the counts of the saved one
        self._pending = None

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            self._pending = None


def _window_starts(rng, num_tokens, rows, block_size, what):
    if num_tokens < block_size + 1:
        raise TooShortError(f"{what} has {num_tokens} tokens, fewer than block_size + 1 = {block_size + 1}")
    return (rng.random(rows) * (num_tokens - block_size)).astype(np.int64)
