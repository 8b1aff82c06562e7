"""OnlineMixing: the mixers driven from a loop written here, step for step like the built-in one."""
import contextlib
import math
import os

import pytest
import torch

from conftest import run_distributed
from fastmix.data import DomainStore, MixtureSampler
from fastmix.mixing import DGA, Chameleon, OnlineMixing, Universal, causal_lm_loss
from fastmix.model import GPT, GPTConfig, lm_loss
from fastmix.train import TrainConfig, train

TINY = dict(batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16, warmup_steps=2, eval_batches=0,
            quiet=True, plot=False, device="cpu", grad_clip=0.5)


def _lr(step, config):
    """The built-in loop's schedule: linear warm-up, cosine decay to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def _own_loop(config, store, mixer, steps, state=None, wrap=None):
    """A user's loop: GPT, AdamW, a MixtureSampler, clipping, gradient accumulation, OnlineMixing;
    `wrap`: what the training forward runs the model in (DistributedDataParallel)."""
    torch.manual_seed(config.seed)
    model = GPT(GPTConfig(block_size=config.block_size, vocab_size=store.vocab_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd, dropout=0.0, bias=True))
    train_model = model if wrap is None else wrap(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=config.lr,
                                  betas=(config.beta1, config.beta2))
    sampler = MixtureSampler(store, mixer.weights, config.batch_size, config.block_size, config.seed)
    mixing = OnlineMixing(mixer, train_model, optimizer, sampler, target=store.targets[0], loss_fn=lm_loss)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        mixing.load_state_dict(state["mixing"])
        start = mixing.step_count
    losses = []
    for step in range(start, steps):
        lr = _lr(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        for _ in range(config.grad_accum):
            x, y, domain_ids = sampler.next_batch()
            with mixing.record(domain_ids):
                loss = lm_loss(train_model, x, y) / config.grad_accum
                loss.backward()
            losses.append(float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        mixing.step(lr, grad_norm=norm, max_norm=config.grad_clip)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
             "mixing": mixing.state_dict()}
    mixing.close()
    sampler.close()
    return mixing.weights, losses, state


MIXERS = {
    "dga-stratified": ("dga", dict(mode="stratified", interval=3, precondition="adam")),
    "dga-exact": ("dga", dict(mode="exact", interval=3)),
    "dga-inline": ("dga", dict(mode="inline", interval=2, target_every=3)),
    "universal-inline": ("universal", dict(mode="inline", interval=2)),
    "dga-inline-fused": ("dga", dict(mode="inline", interval=2, target_every=3, fused=True)),
    "universal-stratified": ("universal", dict(mode="stratified", interval=3)),
    "chameleon-online": ("chameleon", dict(interval=3, rows_per_domain=1)),
}


def _mixer(name, options, store):
    if name == "dga":
        return DGA(store.num_domains, **options)
    if name == "universal":
        return Universal(store.num_domains, **options)
    return Chameleon(store.domains, **options)


@pytest.mark.parametrize("case", sorted(MIXERS))
def test_own_loop_gives_the_builtin_loops_weights(store_dir, tmp_path, case):
    """The same model, data order and seed in float64: the weights agree to 1e-10."""
    name, options = MIXERS[case]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        config = TrainConfig(data=store_dir, out=str(tmp_path / "run"), mixer=name, mixer_options=options,
                             max_steps=7, grad_accum=2, **TINY)
        builtin = train(config).mixer.weights
        store = DomainStore(store_dir)
        own, _, _ = _own_loop(config, store, _mixer(name, options, store), config.max_steps)
    finally:
        torch.set_default_dtype(default)
    uniform = torch.full_like(own, 1 / len(own))
    assert (own - uniform).abs().max() > 1e-4  # the weights moved: the comparison can fail
    assert torch.allclose(own, builtin, rtol=0, atol=1e-10), (own, builtin)


@pytest.mark.parametrize("case", ["dga-inline", "universal-inline", "chameleon-online", "dga-inline-fused"])
def test_resume_from_state_dict_is_exact(store_dir, case):
    name, options = MIXERS[case]
    store = DomainStore(store_dir)
    config = TrainConfig(data=store_dir, max_steps=7, grad_accum=2, **TINY)
    whole_weights, whole_losses, _ = _own_loop(config, store, _mixer(name, options, store), 7)
    _, first_losses, state = _own_loop(config, store, _mixer(name, options, store), 3)
    state = torch.load(_saved(state), weights_only=False)
    weights, losses, _ = _own_loop(config, store, _mixer(name, options, store), 7, state)
    assert torch.equal(weights, whole_weights)
    assert first_losses + losses == whole_losses


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _inline_run(store, scaler, autocast, steps=12):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=store.vocab_size, n_layer=1, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = MixtureSampler(store, batch_size=8, block_size=16, prefetch=False)
    mixer = DGA(store.num_domains, mode="inline", interval=1, target_every=1, step_size=300)
    mixing = OnlineMixing(mixer, model, optimizer, sampler, target="arith", autocast=autocast, grad_scaler=scaler)
    for _ in range(steps):
        optimizer.zero_grad()
        x, y, ids = sampler.next_batch()
        with mixing.record(ids):
            with autocast():
                loss = causal_lm_loss(model, x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        mixing.step()
    assert mixer.updates == steps
    return mixing.weights


def test_inline_dga_with_a_grad_scaler_and_autocast(store_dir):
    """A GradScaler's scale (2^12 here) is divided out of the inline scores: the same weights as
    unscaled; under bfloat16 autocast the target's related domains gain weight."""
    store = DomainStore(store_dir)
    plain = _inline_run(store, None, contextlib.nullcontext)
    scaled = _inline_run(store, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), contextlib.nullcontext)
    assert torch.allclose(scaled, plain, rtol=1e-4, atol=1e-6), (scaled, plain)
    weights = dict(zip(store.domains, _inline_run(store, None, lambda: torch.autocast("cpu", torch.bfloat16)).tolist()))
    related = store.relations["arith"]
    assert abs(sum(weights.values()) - 1) < 1e-12
    assert sum(weights[d] for d in related) > len(related) / store.num_domains


def test_mistakes_are_one_line_errors(store_dir):
    store = DomainStore(store_dir)
    model = GPT(GPTConfig(block_size=16, vocab_size=store.vocab_size, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters())
    sampler = MixtureSampler(store, batch_size=2, block_size=16, prefetch=False)
    with pytest.raises(ValueError, match="target=NAME"):
        OnlineMixing(DGA(store.num_domains), model, optimizer, sampler)
    with pytest.raises(TypeError, match="balanced_batch"):
        OnlineMixing(Universal(store.num_domains), model, optimizer, object())
    mixing = OnlineMixing(Universal(store.num_domains), model, optimizer, sampler)
    with pytest.raises(ValueError, match="grad_norm and max_norm"):
        mixing.step(grad_norm=1.0)
    other = OnlineMixing(Chameleon(store.domains), model, optimizer, sampler)
    with pytest.raises(ValueError, match="Chameleon mixer, not Universal"):
        mixing.load_state_dict(other.state_dict())


def _ddp_worker(rank, world, store_dir, out):
    torch.set_default_dtype(torch.float64)
    name, options = MIXERS["dga-stratified"]
    config = TrainConfig(data=store_dir, out=os.path.join(out, "run"), mixer=name, mixer_options=options,
                         max_steps=7, grad_accum=2, **TINY)
    builtin = train(config).mixer.weights
    store = DomainStore(store_dir)
    own, _, _ = _own_loop(config, store, _mixer(name, options, store), config.max_steps,
                          wrap=torch.nn.parallel.DistributedDataParallel)
    torch.save({"builtin": builtin, "own": own}, os.path.join(out, f"rank{rank}.pt"))


def test_own_loop_under_ddp_gives_the_builtin_loops_weights_on_every_rank(store_dir, tmp_path):
    """2 gloo processes, float64: OnlineMixing with the model in DistributedDataParallel and each
    rank drawing its share gives the built-in DDP loop's weights, the same on both ranks."""
    run_distributed(_ddp_worker, tmp_path, store_dir, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(ranks[0]["own"], ranks[1]["own"])
    for result in ranks:
        assert torch.allclose(result["own"], result["builtin"], rtol=0, atol=1e-10), result
    assert (ranks[0]["own"] - 1 / len(ranks[0]["own"])).abs().max() > 1e-4  # the weights moved
