"""`fastmix weights`: Chameleon domain weights of a store, from a trained model.

The model (a `fastmix train` checkpoint, or a Hugging Face causal LM saved in a directory) embeds
random windows of every domain's training split (the masked mean of its middle layer's hidden
states; 2048 windows of 512 tokens per domain by default, as published); `chameleon_weights` turns
those embeddings into weights. A domain new to the store needs nothing but its data: no proxy
model is retrained."""
import json
import os

import torch

from fastmix.data import DomainStore, builtin_store
from fastmix.data.store import StoreError
from fastmix.hidden_states import WINDOWS_PER_DOMAIN, check_store, domain_embeddings, load_causal_lm
from fastmix.leverage_weights import chameleon_weights
from fastmix.model import GPT, checkpoint_file
from fastmix.rundir import peek_checkpoint
from fastmix.errors import UsageError
from fastmix.train import check_device


def domain_weights(model, store, mode="pretrain", lam=10.0, temperature=None, *,
                   windows_per_domain=WINDOWS_PER_DOMAIN, window_length=None, batch_size=16, seed=0,
                   device="cpu", progress=True):
    """{"domains", "scores", "weights"} of the store's domains under `model` (see domain_embeddings
    for the windows)."""
    embeddings = domain_embeddings(model, store, "middle", windows_per_domain=windows_per_domain,
                                   window_length=window_length, batch_size=batch_size, seed=seed, device=device,
                                   progress=progress)
    weights, scores = chameleon_weights(embeddings.double(), lam=lam, mode=mode, temperature=temperature,
                                        return_scores=True)
    return {"domains": store.domains, "scores": scores.tolist(), "weights": weights.tolist()}


def _open_store(data, hint=""):
    try:
        return builtin_store() if data == "builtin" else DomainStore(data)
    except StoreError as error:
        raise UsageError(f"--data: {error}{hint}") from None


def _checkpoint_model_and_store(args):
    path = checkpoint_file(args.checkpoint)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such checkpoint (give a run directory of `fastmix train`, or its ckpt.pt)")
    # mmap: the config and domain names without reading the weights (from_checkpoint loads the model)
    saved = peek_checkpoint(path)
    data = args.data or saved["config"]["data"]
    # without --data: the store the checkpoint was trained on, which must still be that store
    store = _open_store(data, "" if args.data else
                        " (the store the checkpoint was trained on: give --data to weigh another)")
    if args.data is None and saved.get("domains", store.domains) != store.domains:
        raise UsageError(f"the checkpoint was trained on {data}, whose domains have changed since: give --data "
                         "to weigh the domains of a store")
    return GPT.from_checkpoint(path, args.device).eval(), store


def _hf_model_and_store(args):
    if args.checkpoint is not None:
        raise UsageError(f"give either a checkpoint or --model, not both (got {args.checkpoint} and --model "
                         f"{args.model})")
    if args.data is None:
        raise UsageError("--model needs --data: the store whose domains to weigh (prepared with the model's "
                         "tokenizer)")
    store = _open_store(args.data)
    try:
        model = load_causal_lm(args.model, args.device)
    except ModuleNotFoundError as error:
        if error.name != "transformers":
            raise
        raise UsageError(f"--model: {error}") from None
    except ValueError as error:
        raise UsageError(f"--model {error}") from None
    return model, store


def run(args):
    check_device(args.device)
    if args.model is None and args.checkpoint is None:
        raise UsageError("give a checkpoint (a run directory of `fastmix train`) or --model DIR (a Hugging Face "
                         "causal LM)")
    model, store = _checkpoint_model_and_store(args) if args.model is None else _hf_model_and_store(args)
    try:
        window_length = check_store(model, store, args.windows_per_domain, args.window_length)
    except ValueError as error:  # the store, the model and the windows do not fit together
        raise UsageError(str(error)) from None
    result = domain_weights(model, store, args.mode, args.lam, args.temperature,
                            windows_per_domain=args.windows_per_domain, window_length=window_length,
                            batch_size=args.batch_size, seed=args.seed, device=args.device,
                            progress=not args.quiet)
    print(f"{'domain':<24} {'leverage':>9} {'weight':>8}")
    for name, score, weight in zip(result["domains"], result["scores"], result["weights"]):
        print(f"{name:<24} {score:9.4f} {weight:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"written to {args.json}")
