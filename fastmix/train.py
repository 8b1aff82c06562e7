"""The training loop: a GPT on a mixture of domains whose weights a Mixer may change online.

    fastmix train --max-steps 300 --mixer uniform                # or: python -m fastmix train ...
    torchrun --nproc_per_node 2 -m fastmix train ...             # DDP (gloo on CPU, nccl on GPU)

Writes into --out: metrics.jsonl (one record per log step), ckpt.pt (model, optimizer,
sampler, mixer, RNG states) and ckpt.prev.pt (the one before), config.json, and weights.png at
the end; run.lock holds the run for one writer (fastmix.rundir says what the directory guarantees).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from fastmix.data import DomainStore, MixtureSampler, builtin_store
from fastmix.data.sampler import EpochCapReached, TooShortError
from fastmix.data.store import StoreError
from fastmix.distributed import all_gather_stacked, rank_and_world
from fastmix.errors import UsageError
from fastmix.mixing import MIXERS, MixerContext, build_mixer
from fastmix.mixing.base import check_number, mixer_options
from fastmix.mixing.bases import COARSE
from fastmix.mixing.dga import MODES
from fastmix.model import GPT, GPTConfig, checkpoint_config, lm_loss
from fastmix.rundir import (CHECKPOINT, FORMAT_KEY, PREVIOUS_CHECKPOINT, RunError, RunLock, load_checkpoint,
                            read_metrics, save_checkpoint, write_text_atomic, writing)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, installed as tomli
    import tomli as tomllib


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


# a run that skips this many steps in a row has diverged for good: its parameters are not finite
MAX_SKIPPED_IN_A_ROW = 10
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class TrainConfig:
    data: str = _opt("builtin", "token store directory (from `fastmix prepare`), or 'builtin' for the built-in corpus")
    out: str = _opt("runs/fastmix", "run directory: metrics.jsonl, ckpt.pt, config.json, weights.png")
    mixer: str = _opt("uniform", "mixer that sets the domain weights (see `--mixer-option`)")
    mixer_options: dict = _opt(None, "mixer option KEY=VALUE (VALUE parsed as JSON if it can be); repeatable. "
                                     "dga/universal: step_size, ema, floor, interval, precondition=none|adam, "
                                     "rows_per_domain, mode, and for dga target_rows, target_every, "
                                     "bases=PATH|coarse|[[...], ...] (reweight basis distributions over the "
                                     "domains), rows_per_basis, fused=auto|true|false (inline: score linear "
                                     "layers in their weight-gradient GEMM); chameleon: "
                                     "source=online|offline, checkpoint=PATH, lam, mode=pretrain|finetune, "
                                     "temperature, interval, rows_per_domain, floor, layer=middle|INDEX|MODULE; "
                                     "temperature: temperature; importance: target, smoothing, floor",
                               flag="--mixer-option")
    target: Optional[str] = _opt(None, "target task the mixer optimizes for (default: the store's first target)")
    dga_mode: Optional[str] = _opt(None, "how dga/universal estimate the alignment scores: 'stratified' (one balanced "
                                         "pass; the default), 'inline' (the training pass itself) or 'exact' (a "
                                         "backward per domain, slow); same as --mixer-option mode=...",
                                   choices=MODES)
    max_steps: int = _opt(300, "optimizer steps to train for (with --resume: up to this step)")
    lr_decay_steps: Optional[int] = _opt(None, "steps of the cosine schedule (default: --max-steps)")
    batch_size: int = _opt(16, "sequences per micro-batch, per process")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    block_size: int = _opt(64, "tokens per sequence (context length)")
    n_layer: int = _opt(2, "transformer blocks")
    n_head: int = _opt(4, "attention heads")
    n_embd: int = _opt(128, "model width")
    dropout: float = _opt(0.0, "dropout probability")
    bias: bool = _opt(True, "biases in Linear layers")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = _opt(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(20, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    eval_interval: int = _opt(50, "evaluate the held-out loss of every domain and target every N steps")
    eval_batches: int = _opt(2, "held-out batches per domain and target at each evaluation")
    log_interval: int = _opt(10, "write a metrics.jsonl record every N steps")
    checkpoint_interval: int = _opt(100, "write ckpt.pt every N steps (and always at the end)")
    max_epochs_per_domain: Optional[float] = _opt(None, "draw no more from a domain once its training tokens have "
                                                        "been drawn this many times over; its weight goes to the "
                                                        "others (default: no cap)")
    allocation: str = _opt("stratified", "rows per domain: 'stratified' (systematic) or 'multinomial'",
                           choices=("stratified", "multinomial"))
    device: str = _opt("auto", "'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    compile: bool = _opt(False, "torch.compile the model")
    fsdp: bool = _opt(False, "shard the model with FSDP2 (fully_shard each block, then the model) instead of "
                             "replicating it with DDP; under torchrun")
    seed: int = _opt(0, "seed of the model init and of the data order")
    resume: bool = _opt(False, "continue the run in --out from its checkpoint (its config.json, then --config, "
                               "then these flags; the mixer and the model's shape stay the checkpoint's)")
    overwrite: bool = _opt(False, "start afresh even if --out already holds a run")
    quiet: bool = _opt(False, "no progress bar and no summary")
    plot: bool = _opt(True, "write weights.png at the end")
    skip_nonfinite_steps: bool = _opt(False, "skip a step whose loss or gradient is not finite (as torch's GradScaler "
                                             f"does) instead of stopping the run; {MAX_SKIPPED_IN_A_ROW} in a row "
                                             "still stop it")

    def __post_init__(self):
        self.mixer_options = dict(self.mixer_options or {})
        for name in ("max_steps", "batch_size", "grad_accum", "block_size", "n_layer", "n_head", "n_embd",
                     "eval_interval", "log_interval", "checkpoint_interval"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_batches", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.lr_decay_steps is not None:
            _check_int("lr_decay_steps", self.lr_decay_steps, 1)
        if self.max_epochs_per_domain is not None:
            check_number("--max-epochs-per-domain", self.max_epochs_per_domain, 0, low_open=True)
        # numbers checked here, not where they are used: a TOML file can give any type, and a bad
        # value must stop the run before its directory is written (AdamW checks only its defaults)
        for name, low, high in (("beta1", 0, 1), ("beta2", 0, 1), ("dropout", 0, 1)):
            check_number(_flag(name), getattr(self, name), low, high, high_open=True)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            check_number(_flag(name), getattr(self, name), 0)
            if getattr(self, name) > FLOAT32_MAX:
                raise ValueError(f"{_flag(name)} {getattr(self, name)} is beyond float32's range "
                                 f"({FLOAT32_MAX:.4g}), in which the optimizer's state is kept")
        # AdamW's first step moves a parameter by up to lr / (1 - beta1), and decays it by lr * weight_decay
        peak_lr = max(self.lr, self.min_lr)
        if peak_lr / (1 - self.beta1) > FLOAT32_MAX or peak_lr * self.weight_decay > FLOAT32_MAX:
            raise ValueError(f"--lr {peak_lr} with --beta1 {self.beta1} and --weight-decay {self.weight_decay} "
                             "overflows float32 in AdamW's step: lower --lr")
        for f in dataclasses.fields(self):
            if f.type is bool and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{_flag(f.name)} must be true or false, got {getattr(self, f.name)!r}")
        for name in ("data", "out", "mixer", "device", "allocation"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"--{name} must be a string, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite starts it afresh: give one")
        # absolute: a resumed run (or `fastmix weights`) reads them back from config.json, maybe
        # from another directory
        if self.data != "builtin":
            self.data = os.path.abspath(self.data)
        if isinstance(self.mixer_options.get("checkpoint"), str):
            self.mixer_options["checkpoint"] = os.path.abspath(self.mixer_options["checkpoint"])
        bases = self.mixer_options.get("bases")
        if isinstance(bases, str) and bases != COARSE:  # DGA's basis file ("coarse" names no file)
            self.mixer_options["bases"] = os.path.abspath(bases)
        if self.allocation not in ("stratified", "multinomial"):
            raise ValueError(f"--allocation must be 'stratified' or 'multinomial', got {self.allocation!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} must be a multiple of --n-head {self.n_head} "
                             "(every head gets n_embd / n_head dimensions)")
        if self.dga_mode is not None and self.dga_mode not in MODES:
            raise ValueError(f"--dga-mode must be one of {', '.join(MODES)}, got {self.dga_mode!r}")
        mode = self.mixer_options.get("mode")
        if self.dga_mode is not None and mode is not None and mode != self.dga_mode:
            raise ValueError(f"--dga-mode {self.dga_mode!r} and --mixer-option mode={mode!r} disagree: give one")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_flag(name)} must be an integer >= {low}, got {value!r}")


def _flag(name):
    """The command-line flag of a TrainConfig field."""
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# setup

def _setup_distributed(device):
    """(rank, world_size, device, created_group) from torchrun's environment, if any."""
    if device != "auto":  # before a process group exists that an error would leave behind
        check_device(device)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device != "cpu" and torch.cuda.is_available() else "gloo")
        created = True
    rank, world = rank_and_world()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return rank, world, torch.device(device), created


def check_device(device):
    """UsageError unless `device` names a torch device that is here (before any work is done)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA GPUs here "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def _open_store(data, rank, world):
    if data != "builtin":
        return DomainStore(data)
    if world == 1:
        return builtin_store()
    # Rank 0 builds the cached corpus once; the others wait for it, and hear if it failed
    # (a plain barrier would leave them waiting forever).
    error = [None]
    if rank == 0:
        try:
            builtin_store()
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = [f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"rank 0 could not build the built-in corpus: {error[0]}")
    return builtin_store()


def _lr_at(step, config):
    decay_steps = config.lr_decay_steps or config.max_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= decay_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def _optimizer(model, config, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay}, {"params": no_decay}]
    for group, settings in zip(groups, _group_settings(config)):
        group.update(settings)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda")


def _group_settings(config):
    """What the config sets in each of _optimizer's groups (matrices, then the others): applied
    when the optimizer is built, and again after a resumed run loads the checkpoint's optimizer
    (whose groups hold the settings of the run that saved it), so that config.json tells the truth."""
    betas = (config.beta1, config.beta2)
    return [{"weight_decay": config.weight_decay, "betas": betas}, {"weight_decay": 0.0, "betas": betas}]


def _autocast(device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# ---------------------------------------------------------------------------------------------
# evaluation, checkpoints, metrics

@torch.no_grad()
def _evaluate(model, eval_data, names, device, autocast, world):
    """Mean held-out loss per name; each rank evaluates its share of the names (world: the
    number of ranks sharing them, 1 where every rank evaluates all)."""
    model.eval()
    losses = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, batches in eval_data.items():
        total = 0.0
        for x, y in batches:
            with autocast():
                total += lm_loss(model, x.to(device), y.to(device)).double()
        losses[i] = total / len(batches)
    if world > 1:
        dist.all_reduce(losses)
    model.train()
    return {name: float(v) for name, v in zip(names, losses.cpu())}


def _check_same_on_all_ranks(weights, device):
    """Every rank must sample with the same weights, or the ranks' rows would not be disjoint."""
    reference = weights.to(device).clone()
    dist.broadcast(reference, 0)
    if not torch.equal(reference.cpu(), weights.cpu()):  # on the CPU, wherever the mixer keeps them
        raise RuntimeError("mixer weights differ between ranks: a mixer must all-reduce what it measures")


def _rng_states(device):
    """The RNG states a resumed run restores. CUDA: the training device's own state only (a
    process trains on one GPU; the others' states are not its to save)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_states(states, device):
    # RNG states must be CPU byte tensors, wherever the checkpoint was mapped to.
    torch.set_rng_state(states["torch"].cpu())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and device.type == "cuda":  # onto this process's device only
        torch.cuda.set_rng_state(cuda.cpu(), device)


def _how_to_go_on(ckpt_path, step):
    """(what is intact, how to go on) after a write error in a run whose checkpoint `ckpt_path`
    is at `step` (None: not written yet)."""
    if step is None:
        return "No checkpoint was written yet", "start the run again"
    return f"The checkpoint {ckpt_path} (step {step}) is intact", "continue with --resume"


def _upgraded(ckpt, device):
    """A checkpoint in the current format: one of format 1 (before fastmix wrote a format
    version) lacks the domain and target names (unchecked, then) and may lack the loss window
    (the first record after the resume averages fewer steps), holds one loss sum for every
    rank, and every GPU's CUDA RNG state."""
    if ckpt.get(FORMAT_KEY, 1) >= 2:
        return ckpt
    ckpt = {"domains": [], "targets": [], "loss_window": None, **ckpt}
    window = ckpt["loss_window"]
    if window is not None and window["sum"].dim() == 0:  # rank 0 holding it keeps the mean over ranks
        ckpt["loss_window"] = {**window, "sum": window["sum"][None]}
    cuda = ckpt["rng"].get("cuda")
    if isinstance(cuda, (list, tuple)):
        index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 0
        ckpt["rng"] = {**ckpt["rng"], "cuda": (cuda[index] if index < len(cuda) else cuda[0]) if cuda else None}
    return ckpt


def _own_window(saved, rank, world):
    """This rank's share of a saved training-loss window: (world,) sums, one per rank. Resumed on
    another number of ranks, rank 0 holds what makes the records' mean over ranks come out the same."""
    if saved.numel() == world and rank < world:
        return saved[rank].clone()
    return saved.sum() / saved.numel() * world if rank == 0 else torch.zeros_like(saved[0])


def _check_out_is_free(config, ckpt_path):
    if os.path.exists(ckpt_path) and not (config.resume or config.overwrite):
        raise UsageError(f"{config.out} already holds a run: pass --resume to continue it, "
                         "--overwrite to start afresh, or another --out")


# What a resumed run cannot change: the mixer (the checkpoint holds its state) and the model's
# shape (the checkpoint's weights would not fit).
_KEPT_ON_RESUME = ("mixer", "n_layer", "n_head", "n_embd", "block_size", "bias", "fsdp")


def _check_resumed_config(saved, step, config):
    """Refuses a resume that changes what the checkpoint fixes, or that has nothing to train."""
    for name in _KEPT_ON_RESUME:
        if name in saved and saved[name] != getattr(config, name):
            raise UsageError(f"--resume: {_flag(name)} {getattr(config, name)} differs from the "
                             f"checkpoint's {saved[name]!r}; a resumed run keeps its mixer and model shape "
                             "(leave the flag out, or start a new run in another --out)")
    if step >= config.max_steps:
        raise UsageError(f"--resume: the checkpoint is at step {step} >= --max-steps {config.max_steps}: "
                         "nothing to do (give a larger --max-steps to train on)")


def _check_resumed_store(ckpt, store, data):
    vocab = checkpoint_config(ckpt).vocab_size
    if vocab != store.vocab_size:
        raise UsageError(f"--resume: --data {data} has a vocabulary of {store.vocab_size} tokens, the "
                         f"checkpoint's model {vocab}: resume on a store made with the same tokenizer")
    _check_resumed_domains(ckpt["domains"], store.domains)


def _check_resumed_domains(saved, domains):
    """Mixer and sampler states are indexed by domain position: the store must hold the checkpoint's
    domains first, in the same order (domains appended since are fine: Chameleon embeds them)."""
    for i, name in enumerate(saved):
        if i >= len(domains) or domains[i] != name:
            now = repr(domains[i]) if i < len(domains) else "missing"
            raise UsageError(f"--resume: domain {i} of the store is {now}, but in the checkpoint it is {name!r}; "
                             "the store must hold the checkpoint's domains first, in the same order")


def _check_resumed_mixer(ckpt, options, target, mixer, name):
    """The options (and the target task) that the mixer's saved state depends on must stay: the
    mixer's `changed_options` (fastmix.mixing.base) names those it cannot follow."""
    saved = ckpt["config"]
    defaults = mixer_options(name) or {}
    saved_target = saved.get("target") or next(iter(ckpt.get("targets", [])), None)
    before = {**defaults, **_with_dga_mode(saved.get("mixer_options"), saved.get("dga_mode")), "target": saved_target}
    now = {**defaults, **options, "target": target}
    changed = mixer.changed_options(before, now)
    if not changed:
        return
    key = changed[0]
    if key == "target":
        raise UsageError(f"--resume: --target {target} differs from the checkpoint's {saved_target!r}, and the "
                         f"{name} mixer's saved state holds that target's gradient: keep the target, or start a "
                         "new run")
    raise UsageError(f"--resume: mixer option {key}={now.get(key)!r} differs from the checkpoint's "
                     f"{before.get(key)!r}; the {name} mixer's saved state depends on it")


def _check_target_window(config, store, target):
    """UsageError unless the target's training split holds a window of --block-size + 1 tokens,
    where the mixer draws target batches (`target`: None where it does not). The sampler checks
    the domains' when it is built, but a target's only when its first batch is drawn."""
    window = config.block_size + 1
    if target is not None and store.num_tokens(target) < window:
        raise UsageError(f"--target {target}: its training split has {store.num_tokens(target)} tokens, fewer than "
                         f"--block-size + 1 = {window}, and the {config.mixer} mixer draws target batches from it "
                         "(a smaller --block-size fits it)")


def _with_dga_mode(options, dga_mode):
    """The options to build the mixer with: --mixer-option's, and mode from --dga-mode."""
    return dict(options or {}) if dga_mode is None else {"mode": dga_mode, **(options or {})}


def _build_mixer(config, store):
    if config.dga_mode is not None and config.mixer not in ("dga", "universal"):
        raise UsageError(f"--dga-mode is for --mixer dga or universal, not {config.mixer!r}")
    options = _with_dga_mode(config.mixer_options, config.dga_mode)
    try:
        return build_mixer(config.mixer, store, **options), options
    except ValueError as error:  # the mixer refuses an option, or the store
        raise UsageError(f"--mixer {config.mixer}: {error}") from None


def _weights_dict(weights, domains):
    return {d: float(w) for d, w in zip(domains, weights)}


@dataclass
class TrainResult:
    out: str
    metrics: list
    model: torch.nn.Module
    mixer: object
    store: DomainStore


# ---------------------------------------------------------------------------------------------
# the loop

def train(config):
    """Train as `config` says; returns a TrainResult (metrics are only complete on rank 0)."""
    rank, world, device, created_group = _setup_distributed(config.device)
    # one writer per run directory: rank 0, the only rank that writes it, holds its lock
    lock = RunLock(config.out) if rank == 0 else None
    try:
        return _train(config, rank, world, device, lock)
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            dist.destroy_process_group()


def _train(config, rank, world, device, lock):
    run = _open_run(config, rank, world, device, lock)  # every check, before the run directory is touched
    files = RunFiles(config.out, run.saved_step)
    records = files.start(config, run.start_step, lock) if rank == 0 else []
    evaluation = _Evaluation(config, run, rank, world, device)
    contexts = MixerContexts(run.model, run.optimizer, run.sampler, run.target, device, _autocast(device),
                             config.batch_size)
    train_step = TrainStep(run.model, run.optimizer, run.sampler, run.mixer, contexts,
                           train_model=_wrapped(run.model, config, world, device), grad_accum=config.grad_accum,
                           grad_clip=config.grad_clip, world=world, sharded=config.fsdp)

    def log(step, lr, train_loss, weights, evaluate, skipped=0):
        record = {"step": step, "lr": lr, "train_loss": train_loss,
                  "weights": _weights_dict(weights, run.store.domains), "eval": evaluation(evaluate),
                  "epochs": _weights_dict(run.sampler.epochs, run.store.domains)}
        if config.skip_nonfinite_steps:
            record["skipped_steps"] = skipped
        if config.max_epochs_per_domain is not None:  # the domains no longer drawn from
            record["capped"] = [d for d, capped in zip(run.store.domains, run.sampler.capped) if capped]
        if world > 1:
            _check_same_on_all_ranks(run.mixer.weights, device)
        records.append(record)
        if rank == 0:
            files.append(record)

    try:  # however the run ends, the mixer's hooks leave the model and the prefetch thread stops
        run.mixer.prepare(contexts(run.start_step, _lr_at(run.start_step, config)))
        run.sampler.set_weights(run.mixer.weights)
        if run.start_step == 0:
            log(0, _lr_at(0, config), None, run.mixer.weights, evaluate=True)
        window = LossWindow(run.loss_window, rank, world, device)
        progress = _Progress(config, run.start_step, world, quiet=config.quiet or rank != 0)
        skipped_in_a_row = 0
        run.model.train()
        for step in range(run.start_step, config.max_steps):
            lr, weights, done = _lr_at(step, config), run.mixer.weights, step + 1  # weights: this step's batches'
            try:
                loss, taken = train_step(step, lr)
            except EpochCapReached as error:
                kept = "no checkpoint was written yet" if files.saved_step is None else \
                    f"the checkpoint {files.ckpt_path} is at step {files.saved_step}"
                raise UsageError(f"--max-epochs-per-domain {config.max_epochs_per_domain}: at step {step}, {error}; "
                                 f"{kept} (train for fewer --max-steps, or allow more epochs)") from None
            skipped_in_a_row = 0 if taken else skipped_in_a_row + 1
            if not taken:
                _check_skip(config, done, skipped_in_a_row, files)
            window.add(loss, taken)
            progress.update()
            record_now = done % config.log_interval == 0 or done % config.eval_interval == 0
            # not while steps are being skipped: a run whose skips end in a stop keeps the checkpoint from before
            checkpoint_now = (done % config.checkpoint_interval == 0 and not skipped_in_a_row) or done == config.max_steps
            carried = window.carried(record_now) if checkpoint_now else None  # before a record empties it
            if record_now or done == config.max_steps:
                train_loss, skipped = window.take()
                progress.show(train_loss)
                log(done, lr, train_loss, weights, done % config.eval_interval == 0 or done == config.max_steps,
                    skipped)
            if checkpoint_now:
                _check_parameters(run.model, world, config, done, files)
                # on every rank: FSDP2 gathers the shards, and a mixer may gather per-rank state
                states, mixer_state = _model_and_optimizer_states(run, config), run.mixer.state_dict()
                if rank == 0:
                    files.save(done, _checkpoint_state(done, run, states, mixer_state, config, carried, device))
        progress.close()
        mixer_summary = run.mixer.summary()  # before close() takes the mixer's hooks off
    finally:
        run.sampler.close()
        run.mixer.close()
    if rank == 0 and records:
        _finish(config, run, records, files, mixer_summary)
    if world > 1:  # every rank returns with the run written (a next run in this process may resume it)
        dist.barrier()
    return TrainResult(out=config.out, metrics=records, model=run.model, mixer=run.mixer, store=run.store)


# ---------------------------------------------------------------------------------------------
# one training step: the loop's, and the benchmarks'

class MixerContexts:
    """The MixerContext of each step of a run: the model, optimizer and sampler, and the target
    and balanced batches the mixer may draw, moved to `device`."""

    def __init__(self, model, optimizer, sampler, target, device, autocast=contextlib.nullcontext, batch_size=16):
        self.model, self.optimizer, self.sampler, self.target = model, optimizer, sampler, target
        self.device, self.autocast, self.batch_size = device, autocast, batch_size

    def to_device(self, *tensors):
        return tuple(t.to(self.device, non_blocking=True) for t in tensors)

    def __call__(self, step, lr, batch=None, grad_clip_coef=1.0):
        def target_batch(rows=None):
            return self.to_device(*self.sampler.target_batch(self.target, rows or self.batch_size))

        return MixerContext(
            step=step, lr=lr, model=self.model, optimizer=self.optimizer, batch=batch, loss_fn=lm_loss,
            target_batch=target_batch if self.target else None,
            balanced_batch=lambda rows: self.to_device(*self.sampler.balanced_batch(rows)),
            device=self.device, autocast=self.autocast, num_domains=self.sampler.store.num_domains,
            grad_clip_coef=grad_clip_coef,
            basis_batch=lambda bases, rows: self.to_device(*self.sampler.basis_batch(bases, rows)))


class TrainStep:
    """One optimizer step as `fastmix train` takes it (the benchmarks time this very step):
    `grad_accum` micro-batches from the sampler, each forward and backward inside the mixer's
    `record`; gradient clipping; then, if the loss and every gradient are finite, the optimizer's
    step, the mixer's update and the sampler's new weights. `step(index, lr)` returns the step's
    loss (a 0-d tensor on the device, not synchronised) and whether the step was taken."""

    def __init__(self, model, optimizer, sampler, mixer, contexts, *, train_model=None, grad_accum=1,
                 grad_clip=1.0, world=1, sharded=False):
        self.model, self.optimizer, self.sampler, self.mixer, self.contexts = model, optimizer, sampler, mixer, contexts
        self.train_model = model if train_model is None else train_model  # compiled, or under DDP
        self.grad_accum, self.grad_clip, self.world = grad_accum, grad_clip, world
        self.sharded = sharded  # FSDP2: parameters and gradients are DTensors

    def __call__(self, step, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = []
        loss_sum = torch.zeros((), device=self.contexts.device)
        record_ctx = self.contexts(step + 1, lr)
        for micro in range(self.grad_accum):
            x, y, domain_ids = self.contexts.to_device(*self.sampler.next_batch())
            micro_batches.append((x, y, domain_ids))
            syncs = micro == self.grad_accum - 1 or self.world == 1  # DDP all-reduces on the last one only
            with self.mixer.record(record_ctx, domain_ids):  # the mixer's view of the training pass, if it wants one
                with (contextlib.nullcontext() if syncs else _without_gradient_sync(self.train_model)), \
                        self.contexts.autocast():
                    loss = lm_loss(self.train_model, x, y) / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        clip_coef = 1.0
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            norm = _whole(norm) if self.sharded else norm
            clip_coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)  # what clipping multiplied by
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            norm = _whole(norm) if self.sharded else norm
        # the norm of every gradient is finite when they all are: one number tells, as GradScaler's check
        if not _all_finite([loss_sum, norm], self.world):
            return loss_sum, False  # neither the parameters nor the mixer see this step
        self.optimizer.step()
        batch = tuple(torch.cat(parts) for parts in zip(*micro_batches))
        self.mixer.update(self.contexts(step + 1, lr, batch, clip_coef))
        self.sampler.set_weights(self.mixer.weights)
        return loss_sum, True


@contextlib.contextmanager
def _without_gradient_sync(train_model):
    """A micro-batch whose gradients stay on this rank (all but the last of a step's): DDP's
    no_sync, or FSDP2's gradient sync turned off."""
    if isinstance(train_model, torch.nn.parallel.DistributedDataParallel):
        with train_model.no_sync():
            yield
        return
    train_model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        train_model.set_requires_gradient_sync(True)


def _whole(tensor):
    """A DTensor (an FSDP2 gradient norm) as the plain tensor it stands for."""
    from torch.distributed.tensor import DTensor  # here: torch.distributed's tensor modules take a second to import

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor):
    """This rank's shard of a DTensor (an FSDP2 parameter; one FSDP2 keeps unsharded is whole)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class LossWindow:
    """The training loss summed since the last record, over the steps taken (skipped steps
    counted apart), carried over a resume: each rank keeps its own sum."""

    def __init__(self, saved, rank, world, device):
        self.world = world
        self.sum = torch.zeros((), device=device)
        self.steps = self.skipped = 0
        if saved is not None:
            self.sum = _own_window(saved["sum"], rank, world).to(device)
            self.steps, self.skipped = saved["steps"], saved.get("skipped", 0)

    def add(self, loss, taken):
        if taken:
            self.sum += loss
            self.steps += 1
        else:
            self.skipped += 1

    def carried(self, recorded_now):
        """What a checkpoint saves: the window an uninterrupted run carries past this step (empty
        after a record), every rank's own sum, so that a resumed record adds up as the uninterrupted one."""
        carried = torch.zeros_like(self.sum) if recorded_now else self.sum.clone()
        return {"sum": all_gather_stacked(carried).cpu(), "steps": 0 if recorded_now else self.steps,
                "skipped": 0 if recorded_now else self.skipped}

    def take(self):
        """(mean loss over the ranks and the steps taken, or None if every step was skipped;
        skipped steps), and the window starts afresh."""
        if self.world > 1:
            dist.all_reduce(self.sum)
            self.sum /= self.world
        mean = self.sum.item() / self.steps if self.steps else None
        taken = self.skipped
        self.sum.zero_()
        self.steps = self.skipped = 0
        return mean, taken


def _all_finite(tensors, world):
    """Whether every tensor is finite on every rank: one flag all-reduced, so the ranks stop
    (or skip a step) together."""
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(torch.int32)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


class DivergedError(RunError):
    """The loss, a gradient or the parameters stopped being finite: the run stops before any
    checkpoint holds them."""


def _check_skip(config, step, skipped_in_a_row, files):
    what = "the loss or a gradient is not finite"
    if not config.skip_nonfinite_steps:
        raise DivergedError(_diverged_message(what, step, config, files))
    if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
        raise DivergedError(_diverged_message(f"{what} in {MAX_SKIPPED_IN_A_ROW} steps in a row", step, config, files))


def _check_parameters(model, world, config, step, files):
    """A good checkpoint is never replaced by a model that diverged."""
    local = [_local(p.detach()) if config.fsdp else p.detach() for p in model.parameters()]
    if not _all_finite(local, world):  # each rank checks its shards
        raise DivergedError(_diverged_message("the parameters are not finite", step, config, files))


def _diverged_message(what, step, config, files):
    if files.saved_step is None:
        kept, again = "no checkpoint was written yet", "start again"
    else:
        kept, again = f"{files.ckpt_path} (step {files.saved_step}) holds the last good state", "continue with --resume"
    return (f"the run diverged: {what} at step {step} (--lr {config.lr}); {kept}. Lower --lr or --grad-clip and "
            f"{again}, or pass --skip-nonfinite-steps to skip such steps")


# ---------------------------------------------------------------------------------------------
# the run: built and checked, restored on resume

@dataclass
class _Run:
    store: DomainStore
    target: Optional[str]
    model: GPT
    optimizer: torch.optim.Optimizer
    mixer: object
    sampler: MixtureSampler
    start_step: int = 0
    loss_window: Optional[dict] = None
    saved_step: Optional[int] = None  # the step of the checkpoint in --out (None: none yet)


def _open_run(config, rank, world, device, lock):
    """The run's parts, restored from its checkpoint on resume, once everything the user may have
    got wrong has been checked: nothing of the run directory is written here."""
    ckpt_path = os.path.join(config.out, CHECKPOINT)
    if lock is not None and os.path.isdir(config.out):  # a run there is locked before any of it is read
        lock.acquire()
    _check_out_is_free(config, ckpt_path)
    ckpt = None
    if config.resume:
        if not os.path.exists(ckpt_path):
            raise UsageError(f"--resume: no checkpoint at {ckpt_path} (leave out --resume to start a run there)")
        # verified (a damaged one names the last good one), in the current format
        ckpt = _upgraded(load_checkpoint(ckpt_path, map_location=device), device)
        _check_resumed_config(ckpt["config"], ckpt["step"], config)
    try:
        store = _open_store(config.data, rank, world)
    except StoreError as error:  # missing, not a store, truncated: the message says which
        raise UsageError(f"--data: {error}") from None
    target = config.target or (store.targets[0] if store.targets else None)
    if target is not None and target not in store.targets:
        raise UsageError(f"--target {target!r} is not a target task of the store; its targets: "
                         f"{', '.join(store.targets) or 'none'}")
    if ckpt is not None:
        _check_resumed_store(ckpt, store, config.data)

    torch.manual_seed(config.seed)
    model = GPT(GPTConfig(block_size=config.block_size, vocab_size=store.vocab_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
                          bias=config.bias)).to(device)
    if config.fsdp:
        _shard(model, world)
    optimizer = _optimizer(model, config, device)
    mixer, options = _build_mixer(config, store)
    if ckpt is not None:
        _check_resumed_mixer(ckpt, options, target, mixer, config.mixer)
    try:  # an option that does not fit the model (Chameleon's layer)
        mixer.check_model(model)
    except ValueError as error:
        raise UsageError(f"--mixer {config.mixer}: {error}") from None
    _check_target_window(config, store, target if mixer.needs_target else None)
    try:
        sampler = MixtureSampler(store, mixer.weights, config.batch_size, config.block_size, config.seed,
                                 allocation=config.allocation, max_epochs=config.max_epochs_per_domain)
    except TooShortError as error:  # any other error of the sampler is a bug, with its traceback
        raise UsageError(f"--data {config.data}: {error} (a smaller --block-size fits them)") from None
    run = _Run(store, target, model, optimizer, mixer, sampler)
    if ckpt is not None:
        _restore(run, ckpt, config, device)
    return run


def _restore(run, ckpt, config, device):
    if config.fsdp:  # the checkpoint holds whole tensors: each rank takes its shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(run.model, ckpt["model"], options=options)
        set_optimizer_state_dict(run.model, run.optimizer, ckpt["optimizer"], options=options)
    else:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    for group, settings in zip(run.optimizer.param_groups, _group_settings(config)):  # --weight-decay, --beta1/2
        group.update(settings)
    try:
        run.mixer.load_state_dict(ckpt["mixer"])
    except ValueError as error:  # e.g. a static mixer's state on a store with domains added since
        raise UsageError(f"--resume: {error}") from None
    sampler_state = ckpt["sampler"]
    if len(sampler_state["weights"]) != run.store.num_domains:  # domains added to the store since
        sampler_state = {**sampler_state, "weights": run.mixer.weights.numpy()}
    run.sampler.load_state_dict(sampler_state)
    _set_rng_states(ckpt["rng"], device)
    run.start_step = run.saved_step = ckpt["step"]
    run.loss_window = ckpt["loss_window"]


def _model_and_optimizer_states(run, config):
    """The model's and the optimizer's state dicts; under FSDP2 whole tensors on the CPU,
    gathered from every rank (a collective: every rank calls it)."""
    if not config.fsdp:
        return run.model.state_dict(), run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(run.model, options=options),
            get_optimizer_state_dict(run.model, run.optimizer, options=options))


def _checkpoint_state(step, run, states, mixer_state, config, loss_window, device):
    return {"step": step, "model": states[0], "optimizer": states[1],
            "sampler": run.sampler.state_dict(), "mixer": mixer_state, "rng": _rng_states(device),
            "config": dataclasses.asdict(config), "domains": list(run.store.domains),
            "targets": list(run.store.targets), "loss_window": loss_window}


def _shard(model, world):
    if world == 1:
        raise UsageError("--fsdp shards the model over the processes of a torchrun: run it with torchrun "
                         "--nproc_per_node N -m fastmix train ... (N >= 2)")
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def _wrapped(model, config, world, device):
    """What the training forward runs: the model (sharded already with --fsdp), compiled with
    --compile, under DDP with several ranks."""
    train_model = torch.compile(model) if config.compile else model
    if world > 1 and not config.fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return train_model


# ---------------------------------------------------------------------------------------------
# the run directory, evaluation, progress

class RunFiles:
    """What rank 0 writes into --out: config.json, metrics.jsonl, ckpt.pt (fastmix.rundir says how);
    a write error ends the run in one line saying what is intact and how to go on."""

    def __init__(self, out, saved_step):
        self.out = out
        self.ckpt_path = os.path.join(out, CHECKPOINT)
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.saved_step = saved_step  # the step of the checkpoint in --out (None: none yet)

    def writing(self, path):
        return writing(path, *_how_to_go_on(self.ckpt_path, self.saved_step))

    def start(self, config, start_step, lock):
        """The records kept from before (a torn last line dropped with a warning), once the
        directory is locked, with config.json written and metrics.jsonl cut at the checkpoint."""
        records = read_metrics(self.metrics_path, start_step) if config.resume else []
        if not lock.held:  # a new directory, made with its lock once every check has passed
            lock.acquire()
            _check_out_is_free(config, self.ckpt_path)  # another run may have started there meanwhile
        if not config.resume:  # --overwrite: nothing of the old run may outlive it (a crash would mix them)
            for stale in (self.ckpt_path, os.path.join(self.out, PREVIOUS_CHECKPOINT),
                          os.path.join(self.out, "weights.png")):
                if os.path.exists(stale):
                    os.remove(stale)
        # atomic: a Ctrl-C or a full disk mid-write must not lose the run's history (nor its config)
        config_path = os.path.join(self.out, "config.json")
        with self.writing(config_path):
            write_text_atomic(config_path, json.dumps(dataclasses.asdict(config), indent=1))
        with self.writing(self.metrics_path):  # drops the records past the checkpoint
            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def append(self, record):
        with self.writing(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, step, state):
        # verified and swapped in whole: a crash or a full disk mid-save keeps the previous checkpoint
        save_checkpoint(self.ckpt_path, state, _how_to_go_on(self.ckpt_path, self.saved_step)[1])
        self.saved_step = step


class _Evaluation:
    """The held-out loss of every domain and target (each rank evaluates its share of them);
    splits too short for one window are left out with a warning."""

    def __init__(self, config, run, rank, world, device):
        names = run.store.domains + run.store.targets
        too_short = [n for n in names if run.store.num_tokens(n, "val") < config.block_size + 1]
        if too_short and config.eval_batches > 0 and rank == 0:
            warnings.warn(f"not evaluated: the held-out split of {too_short} in {config.data} is shorter than "
                          f"--block-size + 1 = {config.block_size + 1} tokens (`fastmix prepare --val-fraction` "
                          "sets its size)", stacklevel=3)
        self.names = [n for n in names if n not in too_short]
        # under FSDP2 a forward is collective, so every rank evaluates every name
        self.world, rank = (1, 0) if config.fsdp else (world, rank)
        self.batches = {i: run.sampler.eval_batches(name, config.eval_batches, config.seed)
                        for i, name in enumerate(self.names) if i % self.world == rank and config.eval_batches > 0}
        self.model, self.device = run.model, device
        self.autocast, self.enabled = _autocast(device), config.eval_batches > 0

    def __call__(self, evaluate):
        if not (evaluate and self.enabled):
            return {}
        return _evaluate(self.model, self.batches, self.names, self.device, self.autocast, self.world)


class _Progress:
    """The progress bar (rank 0, unless --quiet), with the loss and tokens per second of each window."""

    def __init__(self, config, start_step, world, quiet):
        self.tokens_per_step = config.batch_size * config.block_size * config.grad_accum * world
        self.bar = tqdm(total=config.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=True if quiet else None)
        self.start, self.steps = time.perf_counter(), 0

    def update(self):
        self.steps += 1
        self.bar.update(1)

    def show(self, train_loss):
        elapsed = time.perf_counter() - self.start
        if train_loss is not None:
            self.bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{self.tokens_per_step * self.steps / elapsed:,.0f}")
        self.start, self.steps = time.perf_counter(), 0

    def close(self):
        self.bar.close()


def _finish(config, run, records, files, mixer_summary):
    """The plot and the summary of a finished run."""
    final = _weights_dict(run.mixer.weights, run.store.domains)  # after the last update: what ckpt.pt holds
    plot_path = os.path.join(config.out, "weights.png")
    if config.plot:
        from fastmix.plot import plot_run

        with writing(plot_path, f"The run is complete: {files.ckpt_path} (step {files.saved_step}) and "
                                f"{files.metrics_path} are intact, only the plot is missing",
                     "draw it from metrics.jsonl with fastmix.plot.plot_run"):
            plot_run(records, run.store.domains, run.store.targets, plot_path, final)
    if not config.quiet:
        print(summary_table(records, run.store, final))
        for line in mixer_summary:
            print(line)
        if config.plot:
            print(f"plot: {plot_path}")


def summary_table(records, store, weights=None):
    """Final weights and first/last held-out losses of every domain and target. `weights`
    ({domain: w}): the mixer's weights at the end, after its last update (a record holds the
    weights its step's batch was drawn with, before that step's update); default the last record's."""
    evals = [r for r in records if r["eval"]]
    first, last = (evals[0]["eval"], evals[-1]["eval"]) if evals else ({}, {})
    weights = records[-1]["weights"] if weights is None else weights
    helps = {}
    for t, domains in store.relations.items():
        for d in domains:
            helps.setdefault(d, []).append(t)
    rows = [("name", "kind", "weight", "loss@first", "loss@last", "helps")]
    for name in store.domains + store.targets:
        kind = "target" if name in store.targets else "domain"
        rows.append((name, kind, f"{weights[name]:.3f}" if kind == "domain" else "",
                     f"{first[name]:.3f}" if name in first else "", f"{last[name]:.3f}" if name in last else "",
                     ",".join(helps.get(name, []))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return f"step {records[-1]['step']}\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line: every TrainConfig field is a flag; a resumed run's config.json, then a TOML file
# give the values that flags do not override.

def add_train_arguments(parser):
    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="TOML file of TrainConfig fields (e.g. max_steps = 500); flags override it, and "
                             "it overrides a resumed run's config.json")
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag", _flag(f.name))
        help_text = f.metadata["help"]
        if f.default is not None and "default:" not in help_text:  # a None default: the help says what it means
            help_text += f" (default: {f.default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "mixer":  # the registry, as it is now (mixers may be registered after import)
            kwargs["choices"] = sorted(MIXERS)
            kwargs["help"] += f"; available: {', '.join(kwargs['choices'])}"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.type is dict:
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", type=_key_value, **kwargs)
        else:
            kind = {int: int, float: float, str: str, Optional[int]: int, Optional[float]: float,
                    Optional[str]: str}[f.type]
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), **kwargs)
    return parser


def _key_value(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def config_from_args(args):
    """TrainConfig from parsed flags: defaults < a resumed run's saved config.json < --config TOML
    < flags. The saved config is where a resumed run starts from; a TOML file given now is a request,
    like a flag, so it overrides the saved config. Each option of a layer's mixer_options (a
    --mixer-option, a key of the TOML's [mixer_options] table) sets that one option over those below
    it; the others stay."""
    try:
        return TrainConfig(**_config_values(args))
    except ValueError as error:  # a bad value or file (UsageError included): a message, not a traceback
        raise SystemExit(f"fastmix train: error: {error}") from None


def _config_values(args):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if "mixer_options" in given:
        given["mixer_options"] = dict(given["mixer_options"])
    layers = []  # lowest first
    toml = _read_toml(args.config) if getattr(args, "config", None) else {}
    resume = given.get("resume", toml.get("resume", False))
    if resume:
        saved = os.path.join(given.get("out", toml.get("out", TrainConfig.out)), "config.json")
        if os.path.exists(saved):
            try:
                with open(saved, encoding="utf-8") as f:
                    layers.append((saved, json.load(f)))
            except json.JSONDecodeError as error:
                raise UsageError(f"--resume: {saved} is corrupt ({error})") from None
    if getattr(args, "config", None):
        layers.append((f"--config {args.config}", toml))
    values, options = {}, {}
    for source, layer in layers + [("flags", given)]:
        unknown = set(layer) - fields
        if unknown:
            raise UsageError(f"{source}: unknown keys {', '.join(sorted(unknown))} (the keys are the flags' "
                             "names, e.g. max_steps for --max-steps)")
        if not isinstance(layer.get("mixer_options", {}), dict):
            raise UsageError(f"{source}: mixer_options must be a table of option = value")
        layer_options = layer.get("mixer_options") or {}
        # --dga-mode and the mixer option mode are one setting: a layer's, by either name,
        # replaces the lower layers' (both names in one layer must agree: TrainConfig checks)
        if layer.get("dga_mode") is not None:
            options.pop("mode", None)
        if "mode" in layer_options:
            values["dga_mode"] = None
        options.update(layer_options)
        values.update(layer)
    # resume and overwrite say what to do now: never taken from a saved config
    overwrite = given.get("overwrite", toml.get("overwrite", False))
    return {**values, "mixer_options": options, "resume": resume, "overwrite": overwrite}


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
    except OSError as error:
        raise UsageError(f"--config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path}: not valid TOML: {error}") from None

