"""The online mixers in the training loop: exact resume, Chameleon (online, offline, transfer to
new domains), DDP on 2 CPU processes (identical weights on every rank), the CLI."""
import contextlib
import json
import os
import re
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import run_distributed
from fastmix.leverage_weights import chameleon_weights
from fastmix.cli import build_parser
from fastmix.data import DomainStore, StoreWriter
from fastmix.mixing import MIXERS, Chameleon, Mixer, OnlineMixing, register_mixer
from fastmix.mixing.base import mixer_options
from fastmix.train import TrainConfig, UsageError, train

TINY = dict(batch_size=4, block_size=16, n_layer=2, n_head=2, n_embd=16, warmup_steps=2, eval_batches=1,
            quiet=True, plot=False, device="cpu")


def _run(store_dir, out, **overrides):
    return train(TrainConfig(data=store_dir, out=str(out), **{**TINY, **overrides}))


def _check_simplex(weights, floor=0.0):
    values = list(weights.values()) if isinstance(weights, dict) else weights.tolist()
    assert all(np.isfinite(values)) and abs(sum(values) - 1) < 1e-6
    assert min(values) >= floor / len(values) * (1 - 1e-9)


# Histograms of 3 bases over the built-in corpus's 10 domains: each domain in two of them, so that
# the floor on the basis weights keeps every domain weight >= floor / 10 (0.05 / 3 · (1/5 + 1/10)).
BASES = [[1] * 5 + [0] * 5, [0] * 5 + [1] * 5, [1] * 10]


@pytest.mark.parametrize("mixer,options", [
    ("dga", {"mode": "stratified"}), ("dga", {"mode": "inline", "precondition": "adam"}),
    ("dga", {"bases": BASES, "rows_per_basis": 2}),
    ("universal", {"mode": "inline", "interval": 1}), ("chameleon", {"interval": 2}),
    # the fused form on the tiny model (auto leaves it unfused): a resumed probe must not watch again
    ("dga", {"mode": "inline", "fused": True}),
], ids=["dga-stratified", "dga-inline-adam", "dga-bases", "universal-inline", "chameleon-online",
        "dga-inline-fused"])
def test_resume_is_exact(store_dir, tmp_path, mixer, options):
    common = dict(mixer=mixer, mixer_options={"interval": 2, **options}, log_interval=1, eval_interval=4,
                  checkpoint_interval=3, lr_decay_steps=8)
    full = _run(store_dir, tmp_path / "full", max_steps=8, **common).metrics
    _run(store_dir, tmp_path / "part", max_steps=3, **common)
    resumed = _run(store_dir, tmp_path / "part", max_steps=8, resume=True, **common).metrics
    for a, b in zip(full, resumed):
        assert a["train_loss"] == b["train_loss"] and a["weights"] == b["weights"], a["step"]
    assert full[-1]["weights"] != full[0]["weights"]  # it did move
    for r in full:
        _check_simplex(r["weights"], 0.05 if mixer != "chameleon" else 0.0)


def test_dga_bases_from_a_file_resume_exactly(store_dir, tmp_path, monkeypatch):
    """N steps equal N/2 then a resume to N, record for record; the basis file is kept as an absolute path."""
    np.save(tmp_path / "bases.npy", np.asarray(BASES, dtype=np.float64))
    monkeypatch.chdir(tmp_path)
    common = dict(mixer="dga", mixer_options={"interval": 2, "bases": "bases.npy", "rows_per_basis": 3},
                  log_interval=1, eval_interval=4, checkpoint_interval=4, lr_decay_steps=8)
    full = _run(store_dir, tmp_path / "full", max_steps=8, **common)
    _run(store_dir, tmp_path / "part", max_steps=4, **common)
    resumed = _run(store_dir, tmp_path / "part", max_steps=8, resume=True, **common)
    assert full.metrics == resumed.metrics
    saved = json.loads((tmp_path / "part" / "config.json").read_text())["mixer_options"]["bases"]
    assert saved == str(tmp_path / "bases.npy")
    mixer = full.mixer
    assert mixer.updates == 4 and mixer.scores.shape == (3,)
    assert full.metrics[-1]["weights"] != full.metrics[0]["weights"]
    torch.testing.assert_close(mixer.weights, mixer.state_dict()["basis_weights"] @ mixer.bases, rtol=1e-12, atol=0)
    with pytest.raises(UsageError, match="--resume: DGA state was saved with 3 bases, but this run has none"):
        _run(store_dir, tmp_path / "part", max_steps=10, resume=True, mixer="dga", mixer_options={"interval": 2})


def test_chameleon_online_weights_come_from_the_training_forwards(seed):
    from fastmix.mixing import MixerContext
    from fastmix.model import GPT, GPTConfig, lm_loss

    k = 3
    model = GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=2, n_head=2, n_embd=8))
    mixer = Chameleon(k, interval=2, lam=1.0)
    x = torch.randint(0, 17, (6, 8))
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = MixerContext(step=2, lr=1e-3, model=model, optimizer=None, batch=None, loss_fn=lm_loss,
                       target_batch=None, balanced_batch=None, device=torch.device("cpu"),
                       autocast=contextlib.nullcontext, num_domains=k)
    hidden = []
    handle = model.transformer.h[0].register_forward_hook(lambda m, a, out: hidden.append(out.mean(1)))
    with mixer.record(ctx, ids):
        lm_loss(model, x, x).backward()
    handle.remove()
    mixer.update(ctx)
    pooled = hidden[0].double()
    embeddings = torch.stack([pooled[ids == i].mean(0) for i in range(k)])
    torch.testing.assert_close(mixer.weights, chameleon_weights(embeddings, 1.0).double(), rtol=1e-5, atol=1e-7)


def test_chameleon_skips_non_finite_embeddings_with_one_warning():
    import warnings

    mixer = Chameleon(3, floor=0.1)
    assert mixer._set_weights(torch.randn(3, 4))
    before = mixer.weights
    _check_simplex(before, 0.1)
    with pytest.warns(RuntimeWarning, match="non-finite domain embeddings"):
        assert not mixer._set_weights(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not mixer._set_weights(torch.full((3, 2), float("inf")))
    assert torch.equal(mixer.weights, before) and mixer.skipped == 2


def _chameleon_ctx(model, k, rows=8):
    from fastmix.mixing import MixerContext
    from fastmix.model import lm_loss

    def balanced_batch(rows_per_domain):
        tokens = torch.randint(0, model.config.vocab_size, (k * rows_per_domain, rows))
        return tokens, tokens, torch.arange(k).repeat_interleave(rows_per_domain)

    return MixerContext(step=1, lr=1e-3, model=model, optimizer=None, batch=None, loss_fn=lm_loss,
                        target_batch=None, balanced_batch=balanced_batch, device=torch.device("cpu"),
                        autocast=contextlib.nullcontext, num_domains=k)


def test_chameleon_online_skips_the_update_of_a_model_gone_nan(seed):
    """Non-finite hidden states leave every domain without a row: that is no embedding (the
    update is skipped with a warning), not a zero vector that resets the weights to uniform."""
    from fastmix.model import GPT, GPTConfig
    from fastmix.rundir import save_checkpoint

    k = 3
    model = GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=2, n_head=2, n_embd=8))
    mixer, ctx = Chameleon(k, interval=1, lam=0.1), _chameleon_ctx(model, k)
    x, ids = torch.randint(0, 17, (6, 8)), torch.tensor([0, 1, 2, 0, 1, 2])
    with mixer.record(ctx, ids), torch.no_grad():
        model(x)
    mixer.update(ctx)
    before = mixer.weights
    assert not torch.allclose(before, torch.full((k,), 1 / k, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with mixer.record(ctx, ids), torch.no_grad():
        model(x)
    with pytest.warns(RuntimeWarning, match="non-finite domain embeddings"):
        mixer.update(ctx)
    assert torch.equal(mixer.weights, before) and mixer.skipped == 1


def test_chameleon_offline_embeds_with_the_layer_it_was_given(tmp_path, seed):
    from fastmix.hidden_states import domain_embeddings
    from fastmix.model import GPT, GPTConfig
    from fastmix.rundir import save_checkpoint

    k = 3
    proxy = GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=4, n_head=2, n_embd=8))
    save_checkpoint(str(tmp_path / "ckpt.pt"),
                    {"step": 0, "config": dict(block_size=8, n_layer=4, n_head=2, n_embd=8, bias=True),
                     "model": proxy.state_dict()})
    ctx = _chameleon_ctx(proxy, k)
    batch = ctx.balanced_batch(4)
    ctx.balanced_batch = lambda rows: batch
    mixer = Chameleon(k, source="offline", checkpoint=str(tmp_path / "ckpt.pt"), layer=0)
    mixer.prepare(ctx)
    x, _, ids = batch
    want = domain_embeddings(proxy, [[x[ids == i]] for i in range(k)], 0, progress=False).double()
    middle = domain_embeddings(proxy, [[x[ids == i]] for i in range(k)], "middle", progress=False).double()
    torch.testing.assert_close(mixer.embeddings, want)
    assert not torch.allclose(mixer.embeddings, middle)


def test_chameleon_offline_refuses_a_proxy_of_a_smaller_vocabulary(tmp_path):
    from fastmix.mixing import build_mixer
    from fastmix.model import GPT, GPTConfig

    proxy = GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=1, n_head=2, n_embd=8))
    torch.save({"config": dict(block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True), "model": proxy.state_dict()},
               tmp_path / "ckpt.pt")
    options = dict(source="offline", checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="its model reads 17 tokens but the store's tokenizer has 257"):
        build_mixer("chameleon", types.SimpleNamespace(domains=["a", "b"], vocab_size=257), **options)
    rng = torch.get_rng_state()
    assert build_mixer("chameleon", types.SimpleNamespace(domains=["a", "b"], vocab_size=17), **options)
    assert torch.equal(torch.get_rng_state(), rng)  # the proxy's layers are looked at without drawing an init
    # the layer must be one of the proxy's (it embeds the domains, not the model being trained)
    for layer, message in ((1, "layer 1 is out of range for 1 layers"), ("foo", "layer 'foo' is not a submodule")):
        with pytest.raises(ValueError, match=f"checkpoint={re.escape(repr(str(tmp_path)))}: {message}"):
            build_mixer("chameleon", types.SimpleNamespace(domains=["a", "b"], vocab_size=17), layer=layer, **options)
    assert build_mixer("chameleon", types.SimpleNamespace(domains=["a", "b"], vocab_size=17), layer=-1, **options)


def test_loaded_state_is_float64_on_the_cpu_wherever_the_checkpoint_was_mapped():
    """train.py loads checkpoints with map_location=device: a state mapped to CUDA must still give
    CPU weights. Fake tensors stand in for CUDA ones on a machine without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmix.mixing import Temperature, Uniform

    static, chameleon = [Uniform(3), Temperature([1, 2, 3])], Chameleon(3)
    with FakeTensorMode():
        def on_cuda(*shape):
            return torch.ones(*shape, device="cuda")

        for mixer in static:
            mixer.load_state_dict({"weights": on_cuda(3)})
        chameleon.load_state_dict({"weights": on_cuda(3), "domains": ["d0", "d1", "d2"], "embeddings": on_cuda(3, 4),
                                   "accumulator": {"sums": on_cuda(3, 4), "counts": on_cuda(3)}})
        loaded = [m._weights for m in static] + [chameleon._weights, chameleon.embeddings, *chameleon._acc_state]
        for tensor in loaded:
            assert (tensor.device.type, tensor.dtype) == ("cpu", torch.float64)


@pytest.mark.parametrize("option,value", [
    ("domains", 0), ("domains", []), ("source", "cache"), ("checkpoint", None), ("lam", -5), ("lam", "10"),
    ("mode", "train"), ("temperature", -1), ("temperature", 0), ("floor", 1.5), ("floor", float("nan")),
    ("interval", 0), ("interval", 2.5), ("rows_per_domain", 0), ("checkpoint", "no/such/ckpt.pt"),
])
def test_chameleon_rejects_bad_options_when_built(option, value):
    options = {"domains": 3, option: value}
    if option == "checkpoint":
        options["source"] = "offline"
    with pytest.raises(ValueError, match=rf"{option}.*{re.escape(repr(value))}"):
        Chameleon(**options)


def _hooks_left(model):
    return [(name, kind) for name, module in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            if getattr(module, kind)]


def test_chameleon_online_hooks_leave_the_model_when_the_run_ends(store_dir, tmp_path, monkeypatch):
    options = {"interval": 2}
    result = _run(store_dir, tmp_path / "run", max_steps=3, mixer="chameleon", mixer_options=options)
    assert _hooks_left(result.model) == []
    # close() keeps the window gathered since the last update (step 3) in the mixer's state
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["mixer"]["accumulator"]
    after_close = result.mixer.state_dict()["accumulator"]
    assert float(saved["counts"].sum()) > 0
    assert all(torch.equal(saved[key], after_close[key]) for key in ("sums", "counts"))

    seen = {}

    def failing_update(mixer, ctx):
        seen["model"] = ctx.model
        raise RuntimeError("update failed")

    monkeypatch.setattr(Chameleon, "update", failing_update)
    with pytest.raises(RuntimeError, match="update failed"):
        _run(store_dir, tmp_path / "failing", max_steps=3, mixer="chameleon", mixer_options=options)
    assert _hooks_left(seen["model"]) == []


def _store_with_extra_domain(src, dst):
    """A copy of the store `src` with one more domain ('extra', copied from a target's text)."""
    store = DomainStore(src)
    with StoreWriter(dst, store.tokenizer, relations=store.relations) as w:
        for name in store.domains:
            w.add(name, np.array(store.tokens(name, "train")), np.array(store.tokens(name, "val")))
        w.add("extra", np.array(store.tokens("strings", "train")), np.array(store.tokens("strings", "val")))
        for name in store.targets:
            w.add(name, np.array(store.tokens(name, "train")), np.array(store.tokens(name, "val")), target=True)
    return str(dst)


@pytest.mark.parametrize("source", ["offline", "online"])
def test_chameleon_transfer_to_domains_added_on_resume(store_dir, tmp_path, source):
    proxy = _run(store_dir, tmp_path / "proxy", max_steps=2)
    options = {"interval": 2}
    if source == "offline":
        options.update(source="offline", checkpoint=os.path.join(proxy.out, "ckpt.pt"))
    first = _run(store_dir, tmp_path / "run", max_steps=2, mixer="chameleon", mixer_options=options)
    if source == "offline":
        assert first.metrics[0]["weights"] == first.metrics[-1]["weights"]  # computed once, before step 1
        assert len(set(first.metrics[0]["weights"].values())) > 1
    bigger = _store_with_extra_domain(store_dir, tmp_path / "bigger")
    resumed = _run(bigger, tmp_path / "run", max_steps=4, resume=True, mixer="chameleon", mixer_options=options,
                   plot=True)  # the plot has records from before the new domain existed
    assert (tmp_path / "run" / "weights.png").exists()
    mixer = resumed.mixer
    assert mixer.domains[-1] == "extra" and mixer.weights.shape == (11,)
    weights = resumed.metrics[-1]["weights"]
    _check_simplex(weights)
    assert weights["extra"] > 0
    if source == "offline":  # the saved embeddings plus the new domain's, through the same recipe
        torch.testing.assert_close(mixer.weights, chameleon_weights(mixer.embeddings).double())


def test_chameleon_resumed_keeps_the_options_its_embeddings_come_from(store_dir, tmp_path):
    _run(store_dir, tmp_path / "run", max_steps=2, mixer="chameleon", mixer_options={"interval": 2})
    with pytest.raises(UsageError, match="--resume: mixer option layer=0 differs from the checkpoint's 'middle'"):
        _run(store_dir, tmp_path / "run", max_steps=4, resume=True, mixer="chameleon",
             mixer_options={"interval": 2, "layer": 0})
    resumed = _run(store_dir, tmp_path / "run", max_steps=4, resume=True, mixer="chameleon",
                   mixer_options={"interval": 2, "lam": 5.0})  # the weights' recipe may change
    assert resumed.metrics[-1]["step"] == 4


def test_chameleon_checks_its_layer_on_the_model_before_the_run(store_dir, tmp_path):
    from fastmix.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=2, n_head=2, n_embd=8))
    for layer in ("middle", 0, -2, 1, "transformer.h.1"):
        Chameleon(3, layer=layer).check_model(model)
    for layer, message in ((2, "layer 2 is out of range for 2 layers"), ("foo", "layer 'foo' is not a submodule")):
        with pytest.raises(ValueError, match=message):
            Chameleon(3, layer=layer).check_model(model)
    for layer in (None, 1.5, True, [1]):
        with pytest.raises(ValueError, match=f"layer must be 'middle', a block index or a submodule name, got "
                                             f"{re.escape(repr(layer))}"):
            Chameleon(3, layer=layer)
    with pytest.raises(UsageError, match="--mixer chameleon: layer 5 is out of range for 2 layers"):
        _run(store_dir, tmp_path / "run", max_steps=1, mixer="chameleon", mixer_options={"layer": 5})
    assert not (tmp_path / "run").exists()


def test_chameleon_resume_compares_the_proxy_file_not_how_it_is_named(tmp_path, monkeypatch):
    """checkpoint=DIR and checkpoint=DIR/ckpt.pt (or a relative path to it) are the same proxy."""
    for name in ("proxy", "other"):
        os.makedirs(tmp_path / name)
        torch.save({}, tmp_path / name / "ckpt.pt")
    monkeypatch.chdir(tmp_path)

    def changed(saved, now, **options):
        defaults = mixer_options("chameleon")
        mixer = Chameleon(3, checkpoint=now, **options)
        return mixer.changed_options({**defaults, "checkpoint": saved, **options},
                                     {**defaults, "checkpoint": now, **options})

    offline = dict(source="offline")
    for saved, now in ((tmp_path / "proxy", tmp_path / "proxy" / "ckpt.pt"), ("proxy/ckpt.pt", tmp_path / "proxy"),
                       ("proxy", "./proxy/../proxy")):
        assert changed(str(saved), str(now), **offline) == []
    assert changed("proxy", "other", **offline) == ["checkpoint"]
    assert changed("proxy", "other") == []  # online: the checkpoint is not used, its embeddings are the trained model's
    defaults = mixer_options("chameleon")
    assert Chameleon(3, layer=0).changed_options(defaults, {**defaults, "layer": 0}) == ["layer"]


def test_static_mixers_name_their_options():
    from fastmix.mixing import build_mixer

    store = types.SimpleNamespace(num_domains=2, train_tokens=np.array([10, 30]))  # what the factories read
    with pytest.raises(ValueError, match="unknown option 'foo' for mixer 'uniform'; its options: none"):
        build_mixer("uniform", store, foo=1)
    with pytest.raises(ValueError, match="unknown option 'temp' for mixer 'temperature'; its options: temperature"):
        build_mixer("temperature", store, temp=2)


def test_a_static_mixer_resumed_on_more_domains_says_why_it_cannot(store_dir, tmp_path):
    _run(store_dir, tmp_path / "run", max_steps=2)
    bigger = _store_with_extra_domain(store_dir, tmp_path / "bigger")
    with pytest.raises(ValueError, match="Uniform state is for 10 domains, but the store has 11 .only the chameleon"):
        _run(bigger, tmp_path / "run", max_steps=4, resume=True)


DDP_RUNS = [("dga", {"mode": "stratified", "interval": 1}), ("dga", {"mode": "inline", "interval": 1}),
            ("dga", {"mode": "exact", "interval": 2}), ("universal", {"mode": "stratified", "interval": 1}),
            ("chameleon", {"interval": 1}), ("dga", {"bases": BASES, "rows_per_basis": 1, "interval": 1})]


def _ddp_worker(rank, world, store_dir, out):
    weights = {}
    for i, (mixer, options) in enumerate(DDP_RUNS):
        # the loop itself checks at every log step that all ranks hold the same weights
        result = train(TrainConfig(data=store_dir, out=os.path.join(out, str(i)), mixer=mixer,
                                   mixer_options=options, max_steps=3, log_interval=1, eval_interval=3,
                                   **TINY))
        weights[i] = result.mixer.weights
    torch.save(weights, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_ranks_hold_identical_weights(store_dir, tmp_path):
    run_distributed(_ddp_worker, tmp_path, store_dir, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for i in r0:
        assert torch.equal(r0[i], r1[i]), DDP_RUNS[i]
        assert not torch.equal(r0[i], torch.full_like(r0[i], 0.1)), DDP_RUNS[i]  # updated


def _ddp_resume_worker(rank, world, store_dir, out):
    # log_interval 3: the checkpoint at step 2 falls inside a window of the training loss too
    common = dict(mixer="chameleon", mixer_options={"interval": 4}, log_interval=3, eval_interval=100,
                  checkpoint_interval=2, lr_decay_steps=4, **TINY)
    full = train(TrainConfig(data=store_dir, out=os.path.join(out, "full"), max_steps=4, **common))
    train(TrainConfig(data=store_dir, out=os.path.join(out, "part"), max_steps=2, **common))
    dist.barrier()  # rank 0 has written the checkpoint
    resumed = train(TrainConfig(data=store_dir, out=os.path.join(out, "part"), max_steps=4, resume=True,
                                **common))
    losses = [[r["train_loss"] for r in result.metrics if r["step"] > 2] for result in (full, resumed)]
    torch.save({"full": full.mixer.weights, "resumed": resumed.mixer.weights, "losses": losses},
               os.path.join(out, f"resume{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_resume_mid_window_is_exact(store_dir, tmp_path):
    """Online Chameleon's window of embeddings, and the loop's window of the training loss, differ
    per rank (each sees its own rows): a checkpoint in mid-window must keep every rank's, not
    rank 0's for all nor their mean (the records after the resume would differ in the last bits)."""
    run_distributed(_ddp_resume_worker, tmp_path, store_dir, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"resume{rank}.pt")
        assert torch.equal(got["full"], got["resumed"]), rank
        full_losses, resumed_losses = got["losses"]
        assert full_losses == resumed_losses and (rank > 0 or len(full_losses) == 2), rank
        assert not torch.equal(got["full"], torch.full_like(got["full"], 0.1))  # updated at step 4


def test_chameleon_window_saved_by_ddp_resumes_in_one_process():
    """A checkpoint of 2 ranks' windows, resumed by one process: it holds their sum."""
    mixer = Chameleon(2)
    sums, counts = torch.randn(2, 2, 3, dtype=torch.float64), torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mixer.load_state_dict({"weights": torch.full((2,), 0.5), "domains": ["d0", "d1"],
                           "accumulator": {"sums": sums, "counts": counts}})
    assert torch.equal(mixer._acc_state[0], sums.sum(0)) and torch.equal(mixer._acc_state[1], counts.sum(0))


def test_cli_help_and_dga_run(store_dir, tmp_path, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "--dga-mode" in text and "inline" in text and "chameleon" in text and "universal" in text
    args = parser.parse_args(["train", "--data", store_dir, "--out", str(tmp_path / "cli"), "--mixer", "dga",
                              "--target", "strings", "--dga-mode", "inline", "--mixer-option", "interval=1",
                              "--max-steps", "2", "--batch-size", "4", "--block-size", "16", "--n-layer", "1",
                              "--n-embd", "16", "--n-head", "2", "--eval-batches", "1", "--quiet", "--no-plot",
                              "--device", "cpu"])
    args.func(args)
    records = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["weights"] != records[0]["weights"]
    with pytest.raises(ValueError, match="--dga-mode is for"):
        _run(store_dir, tmp_path / "bad", max_steps=1, mixer="uniform", dga_mode="inline")


def _score_worker(rank, world, out):
    from fastmix.mixing.dga import exact_scores, flat_grad, probe_scores, shard_balanced
    from fastmix.model import GPT, GPTConfig, lm_loss
    from fastmix.probe import AlignmentProbe

    data = torch.load(os.path.join(out, "data.pt"))
    model = GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=1, n_head=2, n_embd=8)).double()
    model.load_state_dict(data["model"])
    probe = AlignmentProbe(model, 3)
    model.zero_grad()
    lm_loss(model, *data["target"]).backward()
    probe.set_target()
    target = flat_grad(model)
    model.zero_grad(set_to_none=True)
    x, y, ids = shard_balanced(*data["balanced"], 3)
    fast = probe_scores(probe, model, lm_loss, x, y, ids)
    slow = exact_scores(model, lm_loss, x, y, ids, target, 3)
    torch.save({"fast": fast, "slow": slow}, os.path.join(out, f"scores{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_scores_equal_the_single_process_scores(tmp_path, seed):
    """Each rank scores its half of a balanced batch; the all-reduced scores are those of the
    whole batch in one process (the normalisation follows the probe's reduction)."""
    from fastmix.mixing.dga import exact_scores, flat_grad
    from fastmix.model import GPT, GPTConfig, lm_loss

    model = GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=1, n_head=2, n_embd=8)).double()
    tokens = torch.randint(0, 17, (3 * 4, 9))
    balanced = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.arange(3).repeat_interleave(4))
    t = torch.randint(0, 17, (2, 9))
    target = (t[:, :-1].contiguous(), t[:, 1:].contiguous())
    torch.save({"model": model.state_dict(), "balanced": balanced, "target": target}, tmp_path / "data.pt")
    run_distributed(_score_worker, tmp_path, str(tmp_path))
    lm_loss(model, *target).backward()
    want = exact_scores(model, lm_loss, *balanced, flat_grad(model), 3)
    for rank in range(2):
        got = torch.load(tmp_path / f"scores{rank}.pt")
        torch.testing.assert_close(got["fast"], want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["slow"], want, rtol=1e-9, atol=1e-12)


class _Halves(Mixer):
    """The least a mixer gives: weights, update and its state; every other hook is the base class's."""

    def __init__(self, num_domains):
        self._weights = torch.full((num_domains,), 1.0 / num_domains, dtype=torch.float64)
        self.updates = 0

    @property
    def weights(self):
        return self._weights.clone()

    def update(self, ctx):
        self.updates += 1

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


def test_a_mixer_needs_only_its_four_methods_and_a_duck_typed_one_is_refused(store_dir, tmp_path):
    register_mixer("test-halves", lambda store: _Halves(store.num_domains))
    register_mixer("test-duck", lambda store: types.SimpleNamespace(weights=torch.ones(store.num_domains)))
    try:
        result = _run(store_dir, tmp_path / "run", max_steps=3, mixer="test-halves")
        assert result.mixer.updates == 3
        with pytest.raises(TypeError, match="what the factory of mixer 'test-duck' returned must be a "
                                            "fastmix.mixing.Mixer .*got SimpleNamespace"):
            _run(store_dir, tmp_path / "duck", max_steps=1, mixer="test-duck")
        with pytest.raises(TypeError, match="mixer must be a fastmix.mixing.Mixer"):
            OnlineMixing(object(), torch.nn.Linear(2, 2), None, None)
    finally:
        del MIXERS["test-halves"], MIXERS["test-duck"]
