"""`fastmix weights`: Chameleon domain weights of a store, from a trained checkpoint.

The checkpoint's model embeds held-out windows of every domain (mean hidden state of its
middle block); `chameleon_weights` turns those embeddings into weights. A domain new to
the store needs nothing but its data: no proxy model is retrained."""
import json
import os

import torch

from fastmix.chameleon import chameleon_weights, domain_embeddings
from fastmix.data import DomainStore, builtin_store
from fastmix.data.store import StoreError
from fastmix.model import GPT, checkpoint_file
from fastmix.train import UsageError, check_device


def held_out_windows(store, name, rows, block_size):
    """Up to `rows` consecutive windows of `block_size` tokens from a domain's held-out split."""
    split = "val" if store.num_tokens(name, "val") >= block_size else "train"
    count = min(rows, store.num_tokens(name, split) // block_size)
    if count == 0:
        raise UsageError(f"domain {name!r} has fewer than {block_size} tokens, the checkpoint's block size")
    tokens = store.read(name, split, 0, count * block_size)
    return torch.from_numpy(tokens.astype("int64")).view(count, block_size)


def domain_weights(checkpoint, store, mode="pretrain", lam=10.0, temperature=None, rows=16, device="cpu",
                   progress=True):
    """{"domains", "scores", "weights"} of the store's domains under the checkpoint's model."""
    model = GPT.from_checkpoint(checkpoint, device).eval()
    if store.vocab_size > model.config.vocab_size:
        raise UsageError(f"the store's tokenizer has {store.vocab_size} tokens but the checkpoint's model "
                         f"{model.config.vocab_size}: embed the store with a model trained on its tokenizer")
    block = model.config.block_size
    batches = [[held_out_windows(store, name, rows, block).to(device)] for name in store.domains]
    embeddings = domain_embeddings(model, batches, "middle", device=device, progress=progress)
    weights, scores = chameleon_weights(embeddings.double(), lam=lam, mode=mode, temperature=temperature,
                                        return_scores=True)
    return {"domains": store.domains, "scores": scores.tolist(), "weights": weights.tolist()}


def run(args):
    path = checkpoint_file(args.checkpoint)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such checkpoint (give a run directory of `fastmix train`, or its ckpt.pt)")
    check_device(args.device)
    # mmap: the config and domain names without reading the weights (domain_weights loads the model)
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    data = args.data or saved["config"]["data"]
    # without --data: the store the checkpoint was trained on, which must still be that store
    hint = "" if args.data else " (the store the checkpoint was trained on: give --data to weigh another)"
    try:
        store = builtin_store() if data == "builtin" else DomainStore(data)
    except StoreError as error:
        raise UsageError(f"--data: {error}{hint}") from None
    if args.data is None and saved.get("domains", store.domains) != store.domains:
        raise UsageError(f"the checkpoint was trained on {data}, whose domains have changed since: give --data "
                         "to weigh the domains of a store")
    result = domain_weights(path, store, args.mode, args.lam, args.temperature, args.rows,
                            args.device, progress=not args.quiet)
    print(f"{'domain':<24} {'leverage':>9} {'weight':>8}")
    for name, score, weight in zip(result["domains"], result["scores"], result["weights"]):
        print(f"{name:<24} {score:9.4f} {weight:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"written to {args.json}")
