"""Chameleon as a mixer: domain weights from ridge leverage scores of domain embeddings
(fastmix.leverage_weights.chameleon_weights, whose docstring has the recipe).

source="offline": embeddings from a fastmix checkpoint (`checkpoint=PATH`, e.g. a short uniform
    run: the proxy model), computed once before the first step on `rows_per_domain` balanced
    rows per domain, weights computed once.
source="online" (default): embeddings of the model being trained, gathered for free from the
    training forward passes (an EmbeddingAccumulator on the middle block, fed the domain ids by
    the loop's `record` hook); every `interval` steps the weights are recomputed from the
    window's embeddings and the window restarts. Domains that had no row in the window get
    theirs from one no-grad forward of a balanced batch (rows of those domains only).
Transfer: a run resumed on a store with more domains (the checkpoint's first, in the same order,
    then the new ones: the loop checks it) gives the new domains embeddings before its first
    step (offline: with the checkpoint model; online: all domains re-embedded by the current
    model) and recomputes the weights from all of them: no restart, no proxy retraining.

Under torch.distributed the embedding sums and counts are all-reduced, so every rank computes
the same weights. `floor` mixes the weights with uniform (α ← (1 − ε)α + ε/k).
"""
import contextlib
import math
import os
import warnings

import torch

from fastmix.hidden_states import EmbeddingAccumulator, domain_embeddings, resolve_layer
from fastmix.leverage_weights import chameleon_weights, check_weight_options
from fastmix.mixing.base import Mixer, check_counts, check_number, register_mixer
from fastmix.distributed import all_gather_stacked, all_reduce_sum, rank_and_world, world_size
from fastmix.mixing.dga import shard_balanced

SOURCES = ("online", "offline")


class Chameleon(Mixer):
    def __init__(self, domains, source="online", checkpoint=None, lam=10.0, mode="pretrain", temperature=None,
                 interval=10, rows_per_domain=4, floor=0.0, layer="middle"):
        # every option is checked here, not at the first update, which may come many steps later
        self.domains = [f"d{i}" for i in range(domains)] if isinstance(domains, int) else list(domains)
        if not self.domains:
            raise ValueError(f"domains must be a count >= 1 or a list of names, got {domains!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "offline":
            if not checkpoint:
                raise ValueError(f"source='offline' needs checkpoint=PATH (a fastmix ckpt.pt, the proxy model), "
                                 f"got checkpoint={checkpoint!r}")
            if not os.path.isfile(_checkpoint_file(checkpoint)):
                raise ValueError(f"checkpoint={checkpoint!r}: no such fastmix checkpoint (a ckpt.pt, or a run "
                                 "directory holding one)")
        check_weight_options(lam, mode, temperature)
        floor = check_number("floor", floor, 0, 1)
        check_counts(interval=interval, rows_per_domain=rows_per_domain)
        # the type here; whether the model has that layer, in check_model (or _build_chameleon, offline)
        if isinstance(layer, bool) or not isinstance(layer, (str, int, torch.nn.Module)):
            raise ValueError(f"layer must be 'middle', a block index or a submodule name, got {layer!r}")
        self.source, self.checkpoint, self.lam, self.mode = source, checkpoint, float(lam), mode
        self.temperature = temperature
        self.interval, self.rows_per_domain, self.floor, self.layer = interval, rows_per_domain, floor, layer
        k = len(self.domains)
        self._weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.embeddings = None      # (k, d) float64 CPU, the ones the weights were computed from
        self._missing = list(range(k)) if source == "offline" else []  # domains still without embedding
        self._acc = None
        self._acc_model = None
        self._acc_state = None      # accumulator sums/counts not in an accumulator (checkpoint, close)
        self.skipped = 0
        self._warned = False

    @property
    def num_domains(self):
        return len(self.domains)

    @property
    def weights(self):
        return self._weights.clone()

    def changed_options(self, saved, options):
        """The options a resumed run may not change (see fastmix.mixing.base): the saved embeddings
        (and the window's sums) come from this source, this layer and, offline, this proxy
        checkpoint (the same file however named: a run directory or its ckpt.pt)."""
        changed = [key for key in ("source", "layer") if saved.get(key) != options.get(key)]
        if "offline" in (saved.get("source"), options.get("source")) and \
                _checkpoint_file(saved.get("checkpoint")) != _checkpoint_file(options.get("checkpoint")):
            changed.append("checkpoint")
        return changed

    # ------------------------------------------------------------------ protocol
    def check_model(self, model):
        """ValueError unless `layer` names a layer of the training model (online: the one the
        embeddings come from; offline the proxy's was checked when the mixer was built)."""
        if self.source == "online":
            _check_layer(model, self.layer)

    def prepare(self, ctx):
        if not self._missing:
            return
        if self.source == "offline":
            new = self._offline_embeddings(ctx, self._missing)
            embeddings = self.embeddings if self.embeddings is not None else \
                torch.zeros(self.num_domains, new.shape[1], dtype=torch.float64)
            embeddings[self._missing] = new
        else:
            embeddings = self._balanced_embeddings(ctx, list(range(self.num_domains)), ctx.model, self.layer)
        self._missing = []
        if world_size() > 1:  # one rank's numbers for all (the balanced batch is the same on every rank)
            embeddings = embeddings.to(ctx.device)
            torch.distributed.broadcast(embeddings, 0)
        self._set_weights(embeddings)

    def record(self, ctx, domain_ids):
        if self.source == "online":
            self._accumulator(ctx.model).set_domains(domain_ids)
        return contextlib.nullcontext()

    def update(self, ctx):
        if self.source != "online" or ctx.step % self.interval != 0:
            return
        acc = self._accumulator(ctx.model)
        counts = all_reduce_sum(acc.counts.clone())
        missing = [i for i in range(self.num_domains) if float(counts[i]) <= 0]
        if missing:  # a no-grad forward of balanced rows of those domains, into the accumulator
            x, _, ids = shard_balanced(*ctx.balanced_batch(self.rows_per_domain * world_size()), self.num_domains)
            keep = torch.zeros(self.num_domains, dtype=torch.bool, device=ids.device)
            keep[missing] = True
            ids = torch.where(keep[ids], ids, torch.full_like(ids, -1))
            was_training = ctx.model.training
            ctx.model.eval()
            with torch.no_grad(), ctx.autocast():
                acc.set_domains(ids)
                ctx.model(x)
            ctx.model.train(was_training)
        sums = all_reduce_sum(acc.sums.clone())
        counts = all_reduce_sum(acc.counts.clone()).unsqueeze(1)
        acc.reset()
        # a domain still without a (finite) row has no embedding: NaN skips the update, where a
        # zero vector would pass for one (a model gone NaN would silently reset the weights)
        self._set_weights(torch.where(counts > 0, sums / counts.clamp(min=1e-300), math.nan).cpu())

    def state_dict(self):
        state = {"weights": self._weights.clone(), "domains": list(self.domains), "skipped": self.skipped,
                 "embeddings": None if self.embeddings is None else self.embeddings.clone(),
                 "missing": list(self._missing)}
        window = self._window()
        if window is not None:
            # every rank's own window (the ranks see different rows): (world, k, d) and (world, k)
            sums, counts = (all_gather_stacked(t) for t in window)
            state["accumulator"] = {"sums": sums.cpu(), "counts": counts.cpu()}
        return state

    def load_state_dict(self, state):
        old = list(state["domains"])
        gone = [d for d in old if d not in self.domains]
        if gone:
            raise ValueError(f"chameleon: domains {gone} of the checkpoint are not in the store any more")
        index = torch.tensor([self.domains.index(d) for d in old], dtype=torch.long)
        k, added = self.num_domains, [i for i, d in enumerate(self.domains) if d not in old]
        saved = state["weights"].to(torch.float64).cpu()
        if added:  # provisional until prepare(): the new domains get a uniform share
            weights = torch.zeros(k, dtype=torch.float64)
            weights[index] = saved * len(old) / k
            weights[added] = 1.0 / k
            saved = weights / weights.sum()
        self._weights = saved.clone()
        self.skipped = int(state.get("skipped", 0))
        self.embeddings = None
        if state.get("embeddings") is not None:
            saved = state["embeddings"].to(torch.float64).cpu()
            self.embeddings = torch.zeros(k, saved.shape[1], dtype=torch.float64)
            self.embeddings[index] = saved
        missing = {int(index[i]) for i in state.get("missing", [])}
        self._missing = sorted(missing | set(added))
        self._acc_state = None
        if "accumulator" in state:
            # .cpu(): the loop maps checkpoints to the training device
            saved_sums, saved_counts = (state["accumulator"][key].to(torch.float64).cpu() for key in ("sums", "counts"))
            if saved_counts.dim() == 1:  # saved by one process (before per-rank windows were saved)
                saved_sums, saved_counts = saved_sums[None], saved_counts[None]
            rank, world = rank_and_world()
            if saved_counts.shape[0] == world:  # each rank takes its own window back
                saved_sums, saved_counts = saved_sums[rank], saved_counts[rank]
            else:  # another world size: rank 0 holds the whole window, the next all-reduce spreads it
                scale = 1.0 if rank == 0 else 0.0
                saved_sums, saved_counts = saved_sums.sum(0) * scale, saved_counts.sum(0) * scale
            sums = torch.zeros(k, saved_sums.shape[1], dtype=torch.float64)
            counts = torch.zeros(k, dtype=torch.float64)
            sums[index], counts[index] = saved_sums, saved_counts
            self._acc_state = (sums, counts)
            if self._acc is not None:
                self._install_acc_state()

    def close(self):
        """Removes the accumulator's hook from the model; the window's sums stay in the state."""
        if self._acc is not None:
            self._acc_state = self._window()
            self._acc.remove()
            self._acc = self._acc_model = None

    # ------------------------------------------------------------------ internals
    def _window(self):
        """(sums, counts) of the embeddings gathered since the last update, or None if nothing was."""
        if self._acc is not None and self._acc.sums is not None:
            return self._acc.sums, self._acc.counts
        return self._acc_state

    def _accumulator(self, model):
        if self._acc is None or self._acc_model is not model:
            if self._acc is not None:
                self._acc.remove()
            self._acc = EmbeddingAccumulator(model, self.num_domains, self.layer)
            self._acc_model = model
            self._install_acc_state()
        return self._acc

    def _install_acc_state(self):
        if self._acc_state is None:
            return
        sums, counts = self._acc_state
        device = next(self._acc_model.parameters()).device
        self._acc.sums, self._acc.counts = sums.to(device), counts.to(device)
        self._acc_state = None

    def _set_weights(self, embeddings):
        embeddings = embeddings.to(torch.float64).cpu()
        if not bool(torch.isfinite(embeddings).all()):
            self.skipped += 1
            if not self._warned:
                warnings.warn("chameleon: non-finite domain embeddings; update skipped (weights unchanged)",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            return False
        self.embeddings = embeddings
        w = chameleon_weights(embeddings, self.lam, self.mode, self.temperature).to(torch.float64)
        w = (1 - self.floor) * w + self.floor / self.num_domains
        self._weights = w / w.sum()
        return True

    def _balanced_embeddings(self, ctx, domains, model, layer):
        """(len(domains), d) embeddings of `model` from balanced rows (the same on every rank)."""
        x, _, ids = ctx.balanced_batch(self.rows_per_domain)
        block = getattr(getattr(model, "config", None), "block_size", x.shape[1])
        x = x[:, :block]
        device = next(model.parameters()).device
        batches = [[x[ids == i].to(device)] for i in domains]
        return domain_embeddings(model, batches, layer, device=device, progress=False).to(torch.float64).cpu()

    def _offline_embeddings(self, ctx, domains):
        from fastmix.model import GPT

        model = GPT.from_checkpoint(self.checkpoint, ctx.device)
        return self._balanced_embeddings(ctx, domains, model, self.layer)


def _checkpoint_file(checkpoint):
    """The real path of the ckpt.pt that checkpoint=... names (a file, or a run directory holding
    one); None for None."""
    from fastmix.model import checkpoint_file

    return None if checkpoint is None else os.path.realpath(checkpoint_file(checkpoint))


def _check_layer(model, layer):
    """ValueError unless `layer` resolves to a module of `model`, the way the embeddings will."""
    try:
        resolve_layer(model, layer)
    except TypeError as error:
        raise ValueError(str(error)) from None


def _build_chameleon(store, **options):
    mixer = Chameleon(store.domains, **options)
    if mixer.source == "offline":  # the proxy must read the store's tokens (else an index error mid-forward)
        from fastmix.model import GPT, checkpoint_config

        config = checkpoint_config(torch.load(_checkpoint_file(mixer.checkpoint), map_location="cpu",
                                              weights_only=False, mmap=True))
        if store.vocab_size > config.vocab_size:
            raise ValueError(f"checkpoint={mixer.checkpoint!r}: its model reads {config.vocab_size} tokens but the "
                             f"store's tokenizer has {store.vocab_size}: the proxy must be trained on this tokenizer")
        # and it must have the layer (a skeleton of the proxy on the meta device: no weights, no RNG used)
        with torch.device("meta"):
            proxy = GPT(config)
        try:
            _check_layer(proxy, mixer.layer)
        except ValueError as error:
            raise ValueError(f"checkpoint={mixer.checkpoint!r}: {error}") from None
    return mixer


register_mixer("chameleon", _build_chameleon, options_of=Chameleon)
