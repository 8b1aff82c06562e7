"""Chameleon domain weights from ridge leverage scores of domain embeddings.

Recipe (DESIGN.md): E the k x d matrix of domain embeddings, K = E Eᵀ, K_c = H K H with
H = I − 11ᵀ/k, S_i = [K_c (K_c + λ·k·I)⁻¹]_ii, S ← S / ΣS. Pretraining and transfer to new
domains: α = softmax((1/S) / T), T = 5 by default; finetuning: α = softmax(S / T), T = 0.2.
New domains need only their embeddings (no proxy retraining).

Embeddings: `domain_embeddings` runs a model over batches of each domain and takes the
masked mean of one layer's hidden states per sample, then the mean over the domain's
samples; `EmbeddingAccumulator` gathers the same from the forward passes training already
does. Layers are given as a module, a submodule name ("transformer.h.3"), an int (an index
into the model's first nn.ModuleList) or "middle": element (len - 1) // 2 of the first
nn.ModuleList found in `model.modules()` order (for fastmix's GPT, `transformer.h`; with
12 blocks, h[5], whose output is hidden_states[6] in Hugging Face's numbering).
"""
import contextlib
import math
import numbers
import sys

import torch
import torch.nn as nn

from fastmix.ops.linalg import ridge_leverage_scores
from fastmix.ops.reference import accumulation_dtype

DEFAULT_TEMPERATURE = {"pretrain": 5.0, "finetune": 0.2}


# ---------------------------------------------------------------- weights
def chameleon_weights(embeddings, lam=10.0, mode="pretrain", temperature=None, *,
                      return_scores=False):
    """Domain weights (k,) from domain embeddings (k, d), by the Chameleon recipe.

    lam: the ridge, scaled by k (K_c + lam·k·I). mode: "pretrain" (also for transfer to new
    domains; softmax((1/S)/T), T = 5) or "finetune" (softmax(S/T), T = 0.2); `temperature`
    overrides T. S is normalised to sum 1. With `return_scores`, returns (weights, S).
    Computed in float64; returned in the embeddings' float dtype (float32 for half types).

    Degenerate cases follow the limits of the formula: one domain gets weight 1; if all
    centred embeddings are zero (identical domains) S is uniform; in pretrain mode, domains
    with S_i = 0 (an embedding equal to the mean of all) have 1/S = ∞ and share the weight,
    as do domains whose 1/S or S/T overflows float64.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be 2-D (k domains, d) with k, d >= 1, got shape "
                         f"{tuple(embeddings.shape)}")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings contain NaN or infinity (a domain without samples?)")
    temperature = check_weight_options(lam, mode, temperature)
    out_dtype = embeddings.dtype if embeddings.dtype in (torch.float32, torch.float64) else torch.float32

    e = embeddings.detach().to(torch.float64)
    k = e.shape[0]
    raw = ridge_leverage_scores(e, float(lam) * k, center=True)  # [K_c (K_c + λkI)⁻¹]_ii
    total = raw.sum()
    scores = raw / total if total > 0 else torch.full_like(raw, 1.0 / k)
    if mode == "finetune":
        logits = scores / temperature
    else:
        logits = torch.where(scores > 0, 1.0 / scores, math.inf) / temperature
    # An infinite logit (S = 0, an S below float64's range, or an extreme T) takes the
    # softmax's limit: those domains share the weight, where the softmax itself gives NaN.
    infinite = torch.isinf(logits)
    if bool(infinite.any()):
        weights = infinite.to(torch.float64) / infinite.sum()
    else:
        weights = torch.softmax(logits, 0)
    weights, scores = weights.to(out_dtype), scores.to(out_dtype)
    return (weights, scores) if return_scores else weights


def check_weight_options(lam=10.0, mode="pretrain", temperature=None):
    """Raises ValueError, naming the argument and its value, if chameleon_weights cannot take these
    options (so a caller can check them before it has embeddings); returns the temperature to use."""
    if mode not in DEFAULT_TEMPERATURE:
        raise ValueError(f"mode must be 'pretrain' or 'finetune', got {mode!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not lam > 0:
        raise ValueError(f"lam must be a number > 0, got {lam!r}")
    temperature = DEFAULT_TEMPERATURE[mode] if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


# ---------------------------------------------------------------- layers and pooling
def resolve_layer(model, layer="middle"):
    """The module whose output holds the hidden states (see the module docstring)."""
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str) and layer != "middle":
        try:
            return model.get_submodule(layer)
        except AttributeError as error:
            raise ValueError(f"layer {layer!r} is not a submodule of the model") from error
    if layer == "middle" or (isinstance(layer, int) and not isinstance(layer, bool)):
        blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList)), None)
        if blocks is None or len(blocks) == 0:
            raise ValueError("layer='middle' (or an int) needs an nn.ModuleList of layers in "
                             "the model; pass a layer name or module instead")
        index = (len(blocks) - 1) // 2 if layer == "middle" else layer
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(f"layer {layer} is out of range for {len(blocks)} layers")
        return blocks[index]
    raise TypeError(f"layer must be 'middle', an int, a submodule name or a module, got {layer!r}")


def _hidden(output):
    """The hidden-state tensor in a layer's output (the first tensor of a tuple/list/dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find the hidden states in a layer output of type {type(output).__name__}")


def masked_mean(hidden, mask=None):
    """Per-sample mean of hidden (B, T, d) over the positions where mask (B, T) is true (or
    weighted by it, for a soft mask of weights >= 0), in float32 (float64 for float64).
    hidden (B, d) is returned as is. A sample without any valid position gives NaN."""
    acc = accumulation_dtype(hidden.dtype)
    hidden = hidden.detach().to(acc)
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be (B, T, d) or (B, d), got {tuple(hidden.shape)}")
    if mask is None:
        return hidden.mean(1)
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    weights = mask.to(device=hidden.device, dtype=acc)
    weights = torch.where(weights > 0, weights, 0)
    # where(), not only a product: padded positions never enter, even if they hold inf or NaN
    total = torch.where(weights.unsqueeze(-1) > 0, hidden * weights.unsqueeze(-1), 0).sum(1)
    return total / weights.sum(1, keepdim=True)


def _split_batch(batch, pad_id):
    """(inputs, mask) from a batch: a tensor of ids, an (ids, mask) pair, or a dict with
    'input_ids' and optionally 'attention_mask'."""
    if isinstance(batch, dict):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError("a batch given as a tuple must be (input_ids, mask)")
        ids, mask = batch
    else:
        ids, mask = batch, None
    if mask is None and pad_id is not None and isinstance(ids, torch.Tensor):
        mask = ids != pad_id
    return ids, mask


@contextlib.contextmanager
def _capture(module):
    """Records the hidden states of each forward of `module` in a list."""
    captured = []
    handle = module.register_forward_hook(lambda mod, args, output: captured.append(_hidden(output)))
    try:
        yield captured
    finally:
        handle.remove()


def _progress(iterable, total, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _plain_progress(iterable, total, desc):
    for i, item in enumerate(iterable):
        print(f"\r{desc}: {i + 1}/{total if total is not None else '?'}", end="", file=sys.stderr)
        yield item
    print(file=sys.stderr)


def domain_embeddings(model, batches_by_domain, layer="middle", *, pad_id=None, forward=None,
                      device=None, autocast=True, progress=True, seed=0):
    """Domain embeddings (k, d), float32: for each domain, the masked mean of `layer`'s
    hidden states over each sample's valid positions, then the mean over its samples.

    batches_by_domain: a sequence (or a dict, in its order) of k iterables of batches. A
    batch is a tensor of input ids (B, T), an (ids, mask) pair, or a dict with 'input_ids'
    and optionally 'attention_mask'; with `pad_id`, positions holding it are masked out.
    Padding never enters the mean. `forward(model, ids)` runs the model (default
    `model(ids)`). Runs under no_grad with the model in eval mode (restored after), with
    bf16 autocast on CUDA when `autocast`, and a fixed RNG seed (restored after).
    A domain without any sample raises ValueError.
    """
    domains = list(batches_by_domain.values()) if isinstance(batches_by_domain, dict) else list(batches_by_domain)
    if not domains:
        raise ValueError("batches_by_domain is empty")
    module = resolve_layer(model, layer)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    run = forward or (lambda mdl, ids: mdl(ids))
    use_autocast = autocast and device.type == "cuda"
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.no_grad(), _capture(module) as captured:
            torch.manual_seed(seed)
            for index, batches in enumerate(domains):
                total, count = None, 0
                total_batches = len(batches) if hasattr(batches, "__len__") else None
                for batch in _progress(batches, total_batches, progress, f"domain {index}"):
                    ids, mask = _split_batch(batch, pad_id)
                    if isinstance(ids, torch.Tensor):
                        ids = ids.to(device)
                    captured.clear()
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                        run(model, ids)
                    if not captured:
                        raise RuntimeError("the layer produced no output during the forward pass")
                    pooled = masked_mean(captured[-1], None if mask is None else mask.to(device))
                    valid = torch.isfinite(pooled).all(1)  # samples with no valid position
                    batch_sum = pooled[valid].sum(0)
                    total = batch_sum if total is None else total + batch_sum
                    count += int(valid.sum())
                if count == 0:
                    raise ValueError(f"domain {index} has no sample with a valid position")
                rows.append(total / count)
    finally:
        model.train(was_training)
    return torch.stack(rows).float()


# ---------------------------------------------------------------- online accumulation
class EmbeddingAccumulator:
    """Per-domain sums and counts of pooled hidden states, from forward passes that training
    already does: Chameleon online at no extra forward cost.

        acc = EmbeddingAccumulator(model, num_domains)        # hooks the middle layer
        acc.set_domains(domain_ids, mask)   # before a forward: (B,) ids, optional (B, T) mask
        loss = model(x)...                  # the hook pools (B, T, d) -> (B, d) and adds
        acc.embeddings()                    # (k, d) means;  acc.weights(lam=10.0, ...)

    Each `set_domains` applies to the next forward only (other forwards, e.g. evaluation,
    are ignored). Samples with a negative domain id are skipped. `decay` in (0, 1]: before
    each update, sums and counts are multiplied by it (an exponential moving average over
    steps). `reset()` zeroes them; `remove()` detaches the hook.
    """

    def __init__(self, model, num_domains, layer="middle", *, decay=None):
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"num_domains must be an int >= 1, got {num_domains!r}")
        if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise ValueError(f"decay must be in (0, 1] or None, got {decay!r}")
        self.num_domains = num_domains
        self.decay = decay
        self.module = resolve_layer(model, layer)
        self.sums = None  # (k, d) float64, allocated at the first update
        self.counts = torch.zeros(num_domains, dtype=torch.float64)
        self._pending = None
        self._handle = self.module.register_forward_hook(self._hook)

    def set_domains(self, domain_ids, mask=None):
        """Domain id per sample (B,) (negative: skip), and an optional (B, T) mask of valid
        positions, for the next forward pass."""
        if not isinstance(domain_ids, torch.Tensor) or domain_ids.dim() != 1:
            raise ValueError("domain_ids must be a 1-D tensor with one id per sample")
        if domain_ids.dtype.is_floating_point or domain_ids.dtype == torch.bool:
            raise TypeError(f"domain_ids must be an integer tensor, got {domain_ids.dtype}")
        if domain_ids.numel() and int(domain_ids.max()) >= self.num_domains:
            raise ValueError(f"domain_ids contains {int(domain_ids.max())}, but num_domains is "
                             f"{self.num_domains}")
        self._pending = (domain_ids, mask)

    def _hook(self, module, args, output):
        if self._pending is None:
            return
        ids, mask = self._pending
        self._pending = None
        with torch.no_grad():
            pooled = masked_mean(_hidden(output), mask)  # (B, d)
            if pooled.shape[0] != ids.shape[0]:
                raise ValueError(f"domain_ids has {ids.shape[0]} entries but the batch has "
                                 f"{pooled.shape[0]} samples")
            ids = ids.to(pooled.device)
            keep = (ids >= 0) & torch.isfinite(pooled).all(1)
            pooled, ids = pooled[keep].to(torch.float64), ids[keep]
            if self.sums is None:
                self.sums = torch.zeros(self.num_domains, pooled.shape[1], dtype=torch.float64,
                                        device=pooled.device)
                self.counts = self.counts.to(pooled.device)
            if self.decay is not None:
                self.sums.mul_(self.decay)
                self.counts.mul_(self.decay)
            self.sums.index_add_(0, ids, pooled)  # segment sum by domain id
            self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    def embeddings(self):
        """Mean pooled hidden state per domain (k, d), float32; raises if a domain has none."""
        if self.sums is None or bool((self.counts <= 0).any()):
            missing = [i for i in range(self.num_domains)
                       if self.sums is None or float(self.counts[i]) <= 0]
            raise ValueError(f"no samples recorded yet for domains {missing}")
        return (self.sums / self.counts.unsqueeze(1)).float()

    def weights(self, lam=10.0, mode="pretrain", temperature=None, **kwargs):
        """chameleon_weights of the current embeddings."""
        return chameleon_weights(self.embeddings(), lam, mode, temperature, **kwargs)

    def reset(self):
        if self.sums is not None:
            self.sums.zero_()
        self.counts.zero_()
        self._pending = None

    def remove(self):
        self._handle.remove()
