"""DomainMixture: live-weighted training batches over the user's own per-domain datasets.

    mixture = DomainMixture({"code": code_ds, "web": web_ds}, batch_size=16, block_size=512,
                            targets={"math": math_ds})
    loader = mixture.loader(num_workers=2)     # a torch DataLoader
    for x, y, domain_ids in loader:            # (B, T), (B, T) shifted by one, (B,)
        ...
        mixture.set_weights(new_weights)       # the next batch follows them

A domain is a map-style torch Dataset (HF `datasets.Dataset` included) whose items are token
sequences (a list, a tensor, or a dict holding one under "input_ids") of at least block_size + 1
tokens, or a domain of a fastmix DomainStore (`DomainMixture.from_store`). A row is a window of
block_size + 1 tokens at a random place of a random item of its domain.

Batch `step` is a pure function of (seed, step, weights), allocated to domains by systematic
sampling (each domain gets floor or ceil of weight · rows), like fastmix's MixtureSampler. So:
- workers: the weights live in a shared-memory tensor that the DataLoader's workers read when they
  draw a batch; a batch drawn before the last `set_weights` (a stale prefetch) is drawn again in
  the main process when the loader hands it out. The batch after a weight change always follows
  the new weights, with any num_workers.
- resume: state_dict() holds the step and the draw counters; a loader made after
  load_state_dict() continues exactly where the saved one stopped. Starting to iterate a loader
  draws nothing from torch's global random generator (a plain DataLoader draws its workers' base
  seed from it), so a loader started on resume leaves dropout and the rest of the run's random
  numbers where a checkpoint's saved RNG state put them.
- torch.distributed: one global batch of batch_size · world_size rows is drawn and rank r takes
  every world_size-th row from a shift drawn per step (the same on all ranks), so the ranks see
  disjoint rows that together are the global batch. All ranks must set the same weights.
"""
import numpy as np
import torch

from fastmix.distributed import rank_and_world

# Stream ids keep the random numbers of training, balanced and target batches (and the loader's
# worker seeds) independent.
TRAIN_STREAM, BALANCED_STREAM, TARGET_STREAM, LOADER_STREAM, BASIS_STREAM = 0, 1, 2, 3, 4


def stratified_domains(rng, rows, weights):
    """The domain of each of `rows` rows by systematic sampling of `weights`, sorted."""
    cdf = np.cumsum(weights)
    u = (rng.random(1) + np.arange(rows)) / rows
    return np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), len(weights) - 1)


def basis_domains(rng, bases, rows_per_basis, num_domains):
    """The rows of a basis batch: (domain ids, basis ids), `rows_per_basis` rows for each row of
    `bases` ((m, num_domains), non-negative, each row normalised here), grouped by basis and
    within a basis by domain. The rows of basis j go to domains by systematic sampling: domain i
    gets floor or ceil of P_j(i) · rows_per_basis rows (exactly that where it is a whole number),
    and none where P_j(i) = 0."""
    bases = np.asarray(bases, dtype=np.float64)
    if bases.ndim != 2 or bases.shape[0] < 1 or bases.shape[1] != num_domains:
        raise ValueError(f"bases must have shape (m, {num_domains}) with m >= 1, got {bases.shape}")
    if not np.all(np.isfinite(bases)) or np.any(bases < 0) or np.any(bases.sum(axis=1) <= 0):
        raise ValueError("bases must be finite and non-negative, with no row all zero")
    if isinstance(rows_per_basis, bool) or not isinstance(rows_per_basis, int) or rows_per_basis < 1:
        raise ValueError(f"rows_per_basis must be an integer >= 1, got {rows_per_basis!r}")
    cdf = np.cumsum(bases, axis=1)
    cdf /= cdf[:, -1:]
    positions = (rng.random((len(bases), 1)) + np.arange(rows_per_basis)) / rows_per_basis
    ids = np.stack([np.searchsorted(c, p, side="right") for c, p in zip(cdf, positions)])
    # a position rounded up to 1.0 stays with the last domain the basis weighs, not past it
    last_weighed = num_domains - 1 - np.argmax(bases[:, ::-1] > 0, axis=1)
    ids = np.minimum(ids, last_weighed[:, None]).reshape(-1).astype(np.int64)
    return ids, np.repeat(np.arange(len(bases), dtype=np.int64), rows_per_basis)


def _tokens(item):
    if isinstance(item, dict):
        item = item["input_ids"]
    return torch.as_tensor(item, dtype=torch.long).reshape(-1)


class _DatasetDomain:
    """Windows from the items of a map-style dataset."""

    def __init__(self, name, dataset):
        self.name, self.dataset = name, dataset
        if len(dataset) < 1:
            raise ValueError(f"domain {name!r} is empty")

    def window(self, rng, length):
        index = int(rng.integers(len(self.dataset)))
        tokens = _tokens(self.dataset[index])
        if tokens.numel() < length:
            raise ValueError(f"domain {self.name!r}: item {index} has {tokens.numel()} tokens, fewer than "
                             f"block_size + 1 = {length} (pack the documents into longer items)")
        start = int(rng.integers(tokens.numel() - length + 1))
        return tokens[start:start + length]


class _StoreDomain:
    """Windows from a domain (or target) of a DomainStore's training split."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def window(self, rng, length):
        n = self.store.num_tokens(self.name)
        if n < length:
            raise ValueError(f"{self.name!r} has {n} training tokens, fewer than block_size + 1 = {length}")
        start = int(rng.integers(n - length + 1))
        return torch.from_numpy(self.store.read(self.name, "train", start, length).astype(np.int64))


class DomainMixture(torch.utils.data.Dataset):
    """Batches `(x, y, domain_ids)` of the mixture of `domains` (see the module docstring); item
    `step` of this Dataset is training batch `step`, drawn with the current shared weights.

    domains: {name: dataset}, in domain order. targets: {name: dataset} of target tasks (never
    trained on; DGA's target batches). weights: the initial weights (default uniform).
    rank / world_size: default torch.distributed's, when it is initialised.
    """

    def __init__(self, domains, batch_size, block_size, *, targets=None, weights=None, seed=0, rank=None,
                 world_size=None):
        if not isinstance(domains, dict) or not domains:
            raise ValueError("domains must be a non-empty dict {name: dataset}")
        self._domains = [d if hasattr(d, "window") else _DatasetDomain(name, d) for name, d in domains.items()]
        self._targets = {name: t if hasattr(t, "window") else _DatasetDomain(name, t)
                         for name, t in (targets or {}).items()}
        self.domains = list(domains)
        self.targets = list(self._targets)
        for name, value in (("batch_size", batch_size), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.batch_size, self.block_size, self.seed = batch_size, block_size, int(seed)
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.rank, self.world_size = int(rank), int(world_size)
        k = len(self.domains)
        # weights and, last, their version: shared with the DataLoader's workers
        self._shared = torch.zeros(k + 1, dtype=torch.float64).share_memory_()
        self.step = 0  # training batches handed out
        self._balanced_draws = 0
        self._target_draws = 0
        self._basis_draws = 0
        self.set_weights(torch.full((k,), 1.0 / k) if weights is None else weights)

    @classmethod
    def from_store(cls, store, batch_size, block_size, **options):
        """The domains and targets of a fastmix DomainStore (their training splits)."""
        return cls({name: _StoreDomain(store, name) for name in store.domains}, batch_size, block_size,
                   targets={name: _StoreDomain(store, name) for name in store.targets}, **options)

    # weights -----------------------------------------------------------------------------
    @property
    def num_domains(self):
        return len(self.domains)

    @property
    def weights(self):
        return self._shared[:-1].clone()

    @property
    def version(self):
        return int(self._shared[-1])

    def set_weights(self, weights):
        """Draw from the next batch on with `weights` (k non-negative numbers, normalised here)."""
        w = torch.as_tensor(weights, dtype=torch.float64).cpu().reshape(-1)
        if w.numel() != self.num_domains:
            raise ValueError(f"weights must have {self.num_domains} entries (one per domain), got {w.numel()}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        w = w / w.sum()
        if torch.equal(w, self._shared[:-1]):
            return
        self._shared[:-1] = w  # weights first, then the version a worker checks them by
        self._shared[-1] += 1

    def _read_shared(self):
        while True:  # a worker may read while the main process writes: retry a torn read
            version = float(self._shared[-1])
            weights = self._shared[:-1].numpy().copy()
            if float(self._shared[-1]) == version:
                return int(version), weights

    # batches -----------------------------------------------------------------------------
    def _rng(self, stream, counter):
        return np.random.default_rng([self.seed, stream, counter])

    def _rows(self, sources, rng):
        windows = [source.window(rng, self.block_size + 1) for source in sources]
        rows = torch.stack(windows) if windows else torch.zeros(0, self.block_size + 1, dtype=torch.long)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def draw(self, step, weights):
        """Training batch `step` with `weights` (numpy, normalised): (x, y, domain_ids) of this rank."""
        rng = self._rng(TRAIN_STREAM, step)
        global_rows = self.batch_size * self.world_size
        ids = stratified_domains(rng, global_rows, weights)
        shift = int(rng.integers(self.world_size))
        mine = ids[(self.rank + shift) % self.world_size::self.world_size]
        row_rng = np.random.default_rng([self.seed, TRAIN_STREAM, step, self.rank + 1])  # this rank's windows
        x, y = self._rows([self._domains[i] for i in mine], row_rng)
        return x, y, torch.from_numpy(mine.astype(np.int64))

    def __getitem__(self, step):
        """(step, weights version, batch): what the loader checks for staleness."""
        version, weights = self._read_shared()
        return step, version, self.draw(step, weights)

    def __len__(self):
        raise TypeError("a DomainMixture is endless: iterate mixture.loader(), not len()")

    def next_batch(self):
        """The next training batch, drawn in this process (no DataLoader)."""
        batch = self.draw(self.step, self._read_shared()[1])
        self.step += 1
        return batch

    def balanced_batch(self, rows_per_domain):
        """`rows_per_domain` rows of every domain, grouped by domain: (x, y, domain_ids). The same
        rows on every rank (mixers split them)."""
        rng = self._rng(BALANCED_STREAM, self._balanced_draws)
        self._balanced_draws += 1
        ids = np.repeat(np.arange(self.num_domains), rows_per_domain)
        x, y = self._rows([self._domains[i] for i in ids], rng)
        return x, y, torch.from_numpy(ids.astype(np.int64))

    def basis_batch(self, bases, rows_per_basis):
        """`rows_per_basis` rows drawn from each basis distribution, a row of `bases` ((m, k)):
        (x, y, domain_ids, basis_ids), grouped by basis, as DGA with `bases` asks (see
        basis_domains). The same rows on every rank (mixers split them)."""
        rng = self._rng(BASIS_STREAM, self._basis_draws)
        ids, basis_ids = basis_domains(rng, bases, rows_per_basis, self.num_domains)
        self._basis_draws += 1
        x, y = self._rows([self._domains[i] for i in ids], rng)
        return x, y, torch.from_numpy(ids), torch.from_numpy(basis_ids)

    def target_batch(self, name, rows):
        """`rows` rows of target task `name`: (x, y)."""
        if name not in self._targets:
            raise ValueError(f"target {name!r} is not one of the mixture's targets: {', '.join(self.targets) or 'none'}")
        rng = self._rng(TARGET_STREAM, self._target_draws)
        self._target_draws += 1
        return self._rows([self._targets[name]] * rows, rng)

    # loading -----------------------------------------------------------------------------
    def loader(self, **dataloader_options):
        """A torch DataLoader of this mixture's training batches from `step` on (num_workers,
        pin_memory, prefetch_factor, ... as for any DataLoader; batching is the mixture's)."""
        return MixtureLoader(self, **dataloader_options)

    # state -------------------------------------------------------------------------------
    def state_dict(self):
        return {"step": self.step, "balanced_draws": self._balanced_draws, "target_draws": self._target_draws,
                "basis_draws": self._basis_draws, "weights": self.weights, "seed": self.seed}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self._balanced_draws = int(state["balanced_draws"])
        self._target_draws = int(state["target_draws"])
        self._basis_draws = int(state["basis_draws"])
        self.set_weights(state["weights"])


class _Steps(torch.utils.data.Sampler):
    """The training steps from the mixture's current step on, endlessly."""

    def __init__(self, mixture):
        self.mixture = mixture

    def __iter__(self):
        step = self.mixture.step
        while True:
            yield step
            step += 1


def _no_collate(item):
    return item


class MixtureLoader(torch.utils.data.DataLoader):
    """A DataLoader of a DomainMixture: workers draw batches ahead with the shared weights; a batch
    drawn before the last weight change is drawn again here, with the weights now in force. The
    workers' base seed comes from (the mixture's seed, its step), not from torch's global generator
    (unless `generator` is given)."""

    def __init__(self, mixture, **options):
        for key in ("batch_size", "sampler", "batch_sampler", "shuffle", "collate_fn", "drop_last"):
            if key in options:
                raise ValueError(f"MixtureLoader: {key} is the mixture's (DomainMixture batch_size=...); leave it out")
        self.seeds_from_mixture = options.get("generator") is None
        super().__init__(mixture, batch_size=None, sampler=_Steps(mixture), collate_fn=_no_collate, **options)
        self.mixture = mixture

    def __iter__(self):
        if self.seeds_from_mixture:
            seed = np.random.default_rng([self.mixture.seed, LOADER_STREAM, self.mixture.step]).integers(2**63)
            self.generator = torch.Generator().manual_seed(int(seed))
        for step, version, batch in super().__iter__():
            if version != self.mixture.version:  # drawn before the last set_weights
                batch = self.mixture.draw(step, self.mixture.weights.numpy())
            self.mixture.step = step + 1
            yield batch
