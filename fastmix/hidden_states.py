"""Embeddings from a model's hidden states: of token sequences, of domains, and of the forwards
training already does.

The model is a fastmix GPT or a Hugging Face causal LM (`load_causal_lm`). An embedding is the
masked mean of one layer's hidden states over a sequence's valid positions (padding never
enters). Layers are given as "middle" (default), an int block index, a submodule name
("transformer.h.3") or a module:
- a Hugging Face model with "middle" or an int is called with `output_hidden_states=True`, and
  block b's output is `hidden_states[b + 1]`; "middle" is block (n - 1) // 2 of n;
- otherwise the layer's forward output is captured by a hook; "middle" and an int index the
  first nn.ModuleList in `model.modules()` order (for fastmix's GPT, `transformer.h`: with 12
  blocks, "middle" is h[5], whose output is hidden_states[6] in Hugging Face's numbering).
Hugging Face models get the attention mask; other models are called as `model(ids)`, so their
padding must be on the right (as `embed_sequences` pads) for a causal model to ignore it.

`embed_sequences` embeds any token sequences or texts (e.g. documents to cluster);
`domain_embeddings` gives one row per domain (Chameleon's input, see fastmix.leverage_weights),
from a store by the published recipe (random windows of each domain's training split) or from
given batches; `EmbeddingAccumulator` gathers the same from training's own forward passes.
"""
import contextlib
import numbers
import os
import sys
import zlib

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fastmix.leverage_weights import chameleon_weights
from fastmix.ops.reference import accumulation_dtype

WINDOWS_PER_DOMAIN = 2048  # the published recipe: 2048 random windows of 512 tokens per domain
WINDOW_LENGTH = 512


# ---------------------------------------------------------------- models
def load_causal_lm(directory, device="cpu"):
    """The Hugging Face causal LM saved in `directory` (`save_pretrained`), loaded with
    AutoModelForCausalLM from local files only, in eval mode on `device`."""
    try:
        import transformers
    except ImportError as error:
        raise ModuleNotFoundError("a Hugging Face model needs the transformers package: pip install transformers",
                                  name="transformers") from error
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such directory")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory}: no config.json, so not a Hugging Face model directory "
                         "(save one there with save_pretrained)")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory}: transformers cannot read its config.json: "
                         f"{str(error).splitlines()[0]}") from None
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{directory}: a {config.model_type!r} model, which is not a causal language model "
                         "(AutoModelForCausalLM cannot load it)")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    return model.to(device).eval()


def _is_transformers_model(model):
    transformers = sys.modules.get("transformers")  # a model of it exists only if it was imported
    base = getattr(transformers, "PreTrainedModel", None)
    return base is not None and isinstance(model, base)


def context_length(model):
    """The longest sequence the model takes (fastmix GPT: block_size; Hugging Face:
    max_position_embeddings), or None when its config does not say."""
    config = getattr(model, "config", None)
    for name in ("block_size", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def vocab_size(model):
    """The number of token ids the model reads (Hugging Face: its input embedding's rows; fastmix
    GPT: config.vocab_size), or None when the model does not say."""
    if _is_transformers_model(model):
        return model.get_input_embeddings().num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


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
    if layer == "middle" or _is_index(layer):
        blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList)), None)
        if blocks is None or len(blocks) == 0:
            raise ValueError("layer='middle' (or an int) needs an nn.ModuleList of layers in "
                             "the model; pass a layer name or module instead")
        return blocks[_block_index(layer, len(blocks))]
    raise TypeError(f"layer must be 'middle', an int, a submodule name or a module, got {layer!r}")


def _is_index(layer):
    return isinstance(layer, int) and not isinstance(layer, bool)


def _block_index(layer, num_blocks):
    """The block that `layer` ("middle" or an int, negative from the end) names among num_blocks."""
    index = (num_blocks - 1) // 2 if layer == "middle" else layer
    if not -num_blocks <= index < num_blocks:
        raise ValueError(f"layer {layer} is out of range for {num_blocks} layers")
    return index % num_blocks


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


@contextlib.contextmanager
def _pooling(model, layer, device, autocast):
    """Yields pool(ids, mask) -> (B, d): the masked mean of `layer`'s hidden states in one
    no-grad forward, with the model in eval mode (restored after) and bf16 autocast on CUDA."""
    hf = _is_transformers_model(model)
    # A Hugging Face causal LM's backbone gives the same hidden states without the head's logits
    # (batch x length x vocabulary: gigabytes for a 128k vocabulary at 16 x 512 tokens).
    backbone = model.base_model if hf else model
    use_autocast = autocast and device.type == "cuda"
    with contextlib.ExitStack() as stack:
        if hf and (layer == "middle" or _is_index(layer)):
            def hidden_states(ids, mask):
                states = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                return states[_block_index(layer, len(states) - 1) + 1]  # states[0]: the token embeddings
        else:
            module = resolve_layer(model, layer)
            outputs = stack.enter_context(_capture(module))
            if not any(m is module for m in backbone.modules()):  # e.g. the head itself
                backbone = model

            def hidden_states(ids, mask):
                outputs.clear()
                if hf:
                    backbone(input_ids=ids, attention_mask=mask)
                else:
                    model(ids)
                if not outputs:
                    raise RuntimeError("the layer produced no output during the forward pass")
                return outputs[-1]

        def pool(ids, mask):
            ids = ids.to(device) if isinstance(ids, torch.Tensor) else ids
            mask = None if mask is None else mask.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                return masked_mean(hidden_states(ids, mask), mask)

        stack.callback(model.train, model.training)
        model.eval()
        stack.enter_context(torch.no_grad())
        yield pool


def _model_device(model, device):
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    return torch.device(device)


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- sequences
def embed_sequences(model, sequences, layer="middle", *, tokenizer=None, batch_size=16, max_length=None,
                    device=None, progress=False):
    """Embeddings (N, d), float32, of N token sequences or texts: the masked mean of `layer`'s
    hidden states over each sequence's tokens, one row per sequence, in their order.

    sequences: an (N, T) tensor of token ids, or N sequences of ids (lists, arrays, 1-D tensors)
    of any lengths, or N strings with `tokenizer` (anything with `.encode(text) -> ids`: the
    store's tokenizer, a transformers tokenizer, or a `tokenizers.Tokenizer`). Each sequence keeps its first `max_length` tokens
    (default: the model's context length). Sequences of similar length are batched together,
    right-padded and masked: a sequence's row does not depend on its batch.
    """
    batch_size = _check_count("batch_size", batch_size)
    limit = context_length(model) if max_length is None else _check_count("max_length", max_length)
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"sequences given as a tensor must be 2-D (N, T), got shape {tuple(sequences.shape)}")
        sequences = list(sequences)
    ids = []
    for index, item in enumerate(sequences):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("sequences holds texts: pass tokenizer= (anything with .encode(text) -> ids)")
            item = tokenizer.encode(item)
            item = getattr(item, "ids", item)  # a `tokenizers` Tokenizer gives an Encoding
        row = torch.as_tensor(np.asarray(item, dtype=np.int64)).reshape(-1)[:limit]
        if row.numel() == 0:
            raise ValueError(f"sequence {index} is empty")
        ids.append(row)
    if not ids:
        raise ValueError("sequences is empty")
    device = _model_device(model, device)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    rows = [None] * len(ids)
    starts = range(0, len(order), batch_size)
    with _pooling(model, layer, device, autocast=True) as pool:
        for start in tqdm(starts, desc="embedding", leave=False, disable=not progress):
            chosen = order[start:start + batch_size]
            length = max(len(ids[i]) for i in chosen)
            batch = torch.zeros(len(chosen), length, dtype=torch.int64)  # 0 pads: a valid id, never read
            mask = torch.zeros(len(chosen), length, dtype=torch.bool)
            for j, i in enumerate(chosen):
                batch[j, :len(ids[i])], mask[j, :len(ids[i])] = ids[i], True
            for i, row in zip(chosen, pool(batch, mask).float().cpu()):
                rows[i] = row
    return torch.stack(rows)


# ---------------------------------------------------------------- domains
def domain_windows(store, name, count=WINDOWS_PER_DOMAIN, length=WINDOW_LENGTH, seed=0, split="train"):
    """(count, length) int64 token ids: windows of `length` consecutive tokens at random starts
    in the domain's `split`, drawn with replacement. The draw depends only on (seed, name), so a
    domain's windows stay the same when others are added to the store."""
    count, length = _check_count("count", count), _check_count("length", length)
    tokens = store.num_tokens(name, split)
    if tokens < length:
        raise ValueError(f"domain {name!r} has {tokens} {split} tokens, fewer than one window of {length}: "
                         "give shorter windows")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    starts = rng.integers(0, tokens - length + 1, size=count)
    return torch.from_numpy(np.stack([store.read(name, split, int(s), length) for s in starts]).astype(np.int64))


def check_store(model, store, windows_per_domain=WINDOWS_PER_DOMAIN, window_length=None):
    """Raises ValueError, saying which number does not fit, unless the model can embed windows of
    the store by the recipe; returns the window length to use (default: 512, or the model's
    context when shorter)."""
    _check_count("windows_per_domain", windows_per_domain)
    context = context_length(model)
    if window_length is None:
        window_length = WINDOW_LENGTH if context is None else min(WINDOW_LENGTH, context)
    window_length = _check_count("window_length", window_length)
    if context is not None and window_length > context:
        raise ValueError(f"windows of {window_length} tokens are longer than the model's context of {context}")
    vocab = vocab_size(model)
    if vocab is not None and store.vocab_size > vocab:
        raise ValueError(f"the store's tokenizer has {store.vocab_size} tokens but the model's vocabulary only "
                         f"{vocab}: prepare the store with the model's own tokenizer")
    for name in store.domains:
        if store.num_tokens(name, "train") < window_length:
            raise ValueError(f"domain {name!r} has {store.num_tokens(name, 'train')} training tokens, fewer than "
                             f"one window of {window_length}: give shorter windows")
    return window_length


def _is_store(data):
    return all(hasattr(data, name) for name in ("domains", "num_tokens", "read", "vocab_size"))


def domain_embeddings(model, data, layer="middle", *, windows_per_domain=WINDOWS_PER_DOMAIN, window_length=None,
                      batch_size=16, seed=0, pad_id=None, device=None, autocast=True, progress=True):
    """Domain embeddings (k, d), float32: for each domain, the masked mean of `layer`'s hidden
    states over each sample's valid positions, then the mean over its samples.

    data: a DomainStore, embedded by the published recipe: `windows_per_domain` (2048) random
    windows of `window_length` tokens (512, or the model's context when shorter) from each
    domain's training split, drawn from `seed` (see domain_windows), `batch_size` windows a
    forward; `check_store` says why a store does not fit the model.
    Or a sequence (or a dict, in its order) of k iterables of batches: a batch is a tensor of
    input ids (B, T), an (ids, mask) pair, or a dict with 'input_ids' and optionally
    'attention_mask'; with `pad_id`, positions holding it are masked out. Padding never enters.
    Runs under no_grad with the model in eval mode (restored after), with bf16 autocast on CUDA
    when `autocast`, and torch's RNG seeded with `seed` (restored after).
    A domain without any sample raises ValueError.
    """
    if _is_store(data):
        window_length = check_store(model, data, windows_per_domain, window_length)
        batch_size = _check_count("batch_size", batch_size)
        names = list(data.domains)

        def batches_of(name):
            windows = domain_windows(data, name, windows_per_domain, window_length, seed)
            return list(windows.split(batch_size))
    else:
        domains = dict(data) if isinstance(data, dict) else dict(enumerate(data))
        names = list(domains)

        def batches_of(name):
            return domains[name]
    if not names:
        raise ValueError("no domains to embed")
    device = _model_device(model, device)
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            _pooling(model, layer, device, autocast) as pool:
        torch.manual_seed(seed)
        for name in names:
            total, count = None, 0
            batches = batches_of(name)
            size = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=size, desc=f"domain {name}", leave=False, disable=not progress):
                pooled = pool(*_split_batch(batch, pad_id))
                valid = torch.isfinite(pooled).all(1)  # samples with no valid position
                batch_sum = pooled[valid].sum(0)
                total = batch_sum if total is None else total + batch_sum
                count += int(valid.sum())
            if count == 0:
                raise ValueError(f"domain {name!r} has no sample with a valid position")
            rows.append(total / count)
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
