import argparse
import importlib.util
import json
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

from fastmix.data import DomainStore, StoreWriter
from fastmix.mixing import MIXERS, Temperature, Uniform, register_mixer
from fastmix.mixing.baselines import StaticMixer
from fastmix.rundir import write_text_atomic
import fastmix.train
from fastmix.train import TrainConfig, UsageError, add_train_arguments, check_device, config_from_args, train

TINY = dict(batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16, warmup_steps=2, eval_batches=1,
            quiet=True, plot=False, device="cpu")


class Drifting(StaticMixer):
    """Test mixer: new weights every step, from the model's loss on target and balanced batches,
    so resuming must restore the model, the sampler's counters and this mixer exactly."""

    def __init__(self, store):
        super().__init__(torch.ones(store.num_domains))

    @torch.no_grad()
    def update(self, ctx):
        tx, ty = ctx.target_batch()
        bx, by, ids = ctx.balanced_batch(1)
        scores = torch.stack([ctx.loss_fn(ctx.model, bx[i:i + 1], by[i:i + 1]) for i in range(len(ids))]).double()
        self._weights = torch.softmax(scores - ctx.loss_fn(ctx.model, tx, ty).double(), 0).cpu()


register_mixer("test-drifting", lambda store, **options: Drifting(store))


def _run(store_dir, out, **overrides):
    return train(TrainConfig(data=store_dir, out=str(out), **{**TINY, **overrides}))


def test_run_writes_metrics_checkpoint_and_plot(store_dir, tmp_path):
    result = _run(store_dir, tmp_path / "run", max_steps=6, log_interval=2, eval_interval=3, plot=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 2, 3, 4, 6]
    for r in records:
        assert set(r) == {"step", "lr", "train_loss", "weights", "eval", "epochs"}
        assert set(r["weights"]) == set(result.store.domains)
        tokens_drawn = sum(r["epochs"][d] * n for d, n in zip(result.store.domains, result.store.train_tokens))
        assert tokens_drawn == pytest.approx(r["step"] * TINY["batch_size"] * TINY["block_size"], rel=1e-12)
        assert abs(sum(r["weights"].values()) - 1) < 1e-9
    assert set(records[1]["eval"]) == set() and set(records[2]["eval"]) == set(result.store.domains + result.store.targets)
    assert all(isinstance(r["train_loss"], float) for r in records[1:])
    assert (tmp_path / "run" / "weights.png").stat().st_size > 1000
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 6 and {"model", "optimizer", "sampler", "mixer", "rng", "config"} <= set(ckpt)
    with pytest.raises(UsageError, match="--resume"):
        _run(store_dir, tmp_path / "run", max_steps=6)


@pytest.mark.parametrize("mixer,log_interval", [("uniform", 1), ("test-drifting", 1), ("uniform", 3)])
def test_resume_matches_an_uninterrupted_run(store_dir, tmp_path, mixer, log_interval):
    """Every record of the uninterrupted run reappears, bitwise. With log_interval 3 the first
    part stops (step 5) inside a loss window that the resumed run must carry on."""
    common = dict(mixer=mixer, log_interval=log_interval, eval_interval=4, checkpoint_interval=3, lr_decay_steps=10)
    full = _run(store_dir, tmp_path / "full", max_steps=10, **common).metrics
    _run(store_dir, tmp_path / "part", max_steps=5, **common)
    resumed = _run(store_dir, tmp_path / "part", max_steps=10, resume=True, **common).metrics
    on_disk = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == resumed
    by_step = {r["step"]: r for r in resumed}
    assert set(by_step) == {r["step"] for r in full} | {5}  # the first part also recorded its last step
    for a in full:
        b = by_step[a["step"]]
        assert a["train_loss"] == b["train_loss"] and a["weights"] == b["weights"], a["step"]
        assert a["epochs"] == b["epochs"], a["step"]
        if a["eval"]:
            assert a["eval"] == b["eval"], a["step"]
    if mixer == "test-drifting":
        assert full[-1]["weights"] != full[1]["weights"]


def _store_with_domains(src, dst, domains):
    """A copy of the store `src` whose domains are `domains` (names of src's domains, in this order)."""
    store = DomainStore(src)
    with StoreWriter(dst, store.tokenizer, relations=store.relations) as writer:
        for name in domains + store.targets:
            writer.add(name, np.array(store.tokens(name, "train")), np.array(store.tokens(name, "val")),
                       target=name in store.targets)
    return str(dst)


def test_resume_needs_the_checkpoints_domains_first_in_the_same_order(store_dir, tmp_path):
    domains = DomainStore(store_dir).domains
    _run(store_dir, tmp_path / "run", max_steps=2)
    swapped = _store_with_domains(store_dir, tmp_path / "swapped", [domains[0], domains[2], domains[1], *domains[3:]])
    mismatch = f"domain 1 of the store is '{domains[2]}', but in the checkpoint it is '{domains[1]}'"
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        _run(swapped, tmp_path / "run", max_steps=4, resume=True)
    fewer = _store_with_domains(store_dir, tmp_path / "fewer", domains[:-1])
    with pytest.raises(ValueError, match=re.escape(f"domain {len(domains) - 1} of the store is missing")):
        _run(fewer, tmp_path / "run", max_steps=4, resume=True)
    # a checkpoint from before the names (and the checksum and format version) were saved resumes unchecked
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    assert (ckpt["domains"], ckpt["targets"]) == (domains, DomainStore(store_dir).targets)
    del ckpt["domains"], ckpt["targets"], ckpt["checksum"], ckpt["format_version"]
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match="has no checksum"):
        assert _run(store_dir, tmp_path / "run", max_steps=4, resume=True).metrics[-1]["step"] == 4


def test_resume_needs_a_checkpoint(store_dir, tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        _run(store_dir, tmp_path / "none", max_steps=2, resume=True)


def test_grad_accum_and_temperature_mixer(store_dir, tmp_path):
    result = _run(store_dir, tmp_path / "r", max_steps=2, grad_accum=2, mixer="temperature",
                  mixer_options={"temperature": 3.0}, target="strings")
    assert result.metrics[-1]["step"] == 2


def test_resume_needs_a_store_of_the_same_vocabulary(store_dir, tmp_path):
    _run(store_dir, tmp_path / "run", max_steps=2)
    store = DomainStore(store_dir)
    with StoreWriter(tmp_path / "bpe", {"type": "byte", "vocab_size": 300}) as writer:  # another tokenizer's size
        for name in store.domains:
            writer.add(name, np.array(store.tokens(name, "train")), np.array(store.tokens(name, "val")))
    with pytest.raises(UsageError, match="has a vocabulary of 300 tokens, the checkpoint's model 257"):
        _run(str(tmp_path / "bpe"), tmp_path / "run", max_steps=4, resume=True)


def test_domains_too_short_for_a_window_name_block_size(store_dir, tmp_path):
    with pytest.raises(UsageError, match=r"fewer than block_size \+ 1 = 4097 training tokens.*a smaller --block-size"):
        _run(store_dir, tmp_path / "run", max_steps=1, block_size=4096)
    assert not (tmp_path / "run").exists()


def test_device_must_be_here():
    check_device("cpu")
    with pytest.raises(UsageError, match="--device 'gpu' is not a torch device"):
        check_device("gpu")
    if torch.cuda.is_available():
        with pytest.raises(UsageError, match="there are only"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(UsageError, match="no CUDA GPU is visible here"):
            check_device("cuda:0")


def test_bad_target_and_mixer(store_dir, tmp_path):
    with pytest.raises(ValueError, match="not a target task"):
        _run(store_dir, tmp_path / "a", max_steps=1, target="add_digits")
    with pytest.raises(ValueError, match="unknown mixer"):
        _run(store_dir, tmp_path / "b", max_steps=1, mixer="nope")


def test_baseline_mixers():
    assert torch.equal(Uniform(4).weights, torch.full((4,), 0.25, dtype=torch.float64))
    t = Temperature([100, 300], temperature=1.0).weights
    torch.testing.assert_close(t, torch.tensor([0.25, 0.75], dtype=torch.float64))
    flat = Temperature([100, 300], temperature=1e6).weights
    torch.testing.assert_close(flat, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-5, rtol=0)
    assert {"uniform", "temperature"} <= set(MIXERS)
    with pytest.raises(ValueError, match="temperature"):
        Temperature([1, 2], temperature=0)


def test_config_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('max_steps = 77\nn_embd = 48\n[mixer_options]\ntemperature = 2.5\n')
    parser = add_train_arguments(argparse.ArgumentParser())
    config = config_from_args(parser.parse_args(["--config", str(toml), "--n-embd", "32", "--no-bias"]))
    assert (config.max_steps, config.n_embd, config.bias) == (77, 32, False)
    assert config.mixer_options == {"temperature": 2.5}
    config = config_from_args(parser.parse_args(["--mixer-option", "temperature=4", "--mixer-option", "name=x"]))
    assert config.mixer_options == {"temperature": 4, "name": "x"}
    # --resume starts from the run's saved config; flags still override it
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "config.json").write_text(json.dumps({**TrainConfig().__dict__, "n_embd": 24, "max_steps": 5}))
    config = config_from_args(parser.parse_args(["--out", str(out), "--resume", "--max-steps", "9"]))
    assert (config.n_embd, config.max_steps, config.resume) == (24, 9, True)
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_field = 1\n")
    with pytest.raises(SystemExit, match=f"fastmix train: error: --config {bad}: unknown keys no_such_field"):
        config_from_args(parser.parse_args(["--config", str(bad)]))
    bad.write_text("mixer_options = 3\n")
    with pytest.raises(SystemExit, match="mixer_options must be a table"):
        config_from_args(parser.parse_args(["--config", str(bad)]))


def test_mixer_options_add_up_over_the_layers(tmp_path):
    """A --mixer-option sets one option: the others of the TOML file or the resumed run stay.
    The layers: the resumed run's saved config < the TOML file < flags."""
    parser = add_train_arguments(argparse.ArgumentParser())
    toml = tmp_path / "c.toml"
    toml.write_text('resume = true\nout = "%s"\n[mixer_options]\ninterval = 5\nfloor = 0.1\n' % (tmp_path / "run"))
    os.makedirs(tmp_path / "run")
    saved = {**TrainConfig().__dict__, "resume": False, "mixer_options": {"floor": 0.2, "ema": 0.5, "mode": "exact"}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    config = config_from_args(parser.parse_args(["--config", str(toml), "--mixer-option", "ema=0.1"]))
    assert config.mixer_options == {"interval": 5, "floor": 0.1, "ema": 0.1, "mode": "exact"}
    assert config.resume  # from the TOML file, not the run's saved config


def test_a_toml_file_overrides_the_resumed_runs_saved_config(tmp_path):
    """defaults < saved config.json < --config TOML < flags: the TOML given now is a request, like a flag."""
    parser = add_train_arguments(argparse.ArgumentParser())
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "config.json").write_text(json.dumps({**TrainConfig().__dict__, "max_steps": 5, "lr": 0.01, "seed": 3}))
    toml = tmp_path / "c.toml"
    toml.write_text("max_steps = 20\nlr = 0.002\n")
    args = parser.parse_args(["--config", str(toml), "--out", str(out), "--resume", "--lr", "0.001"])
    config = config_from_args(args)
    assert (config.max_steps, config.lr, config.seed) == (20, 0.001, 3)


def test_python_3_10_reads_toml_with_tomli(monkeypatch):
    tomli = types.ModuleType("tomli")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on 3.10: importing it fails
    monkeypatch.setitem(sys.modules, "tomli", tomli)
    spec = importlib.util.spec_from_file_location("train_on_py310", fastmix.train.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.tomllib is tomli


def test_a_short_held_out_split_is_skipped_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "store", {"type": "byte", "vocab_size": 257}) as writer:
        for name in ("a", "b"):
            writer.add(name, rng.integers(0, 256, 2000), rng.integers(0, 256, 200))
        writer.add("t", rng.integers(0, 256, 2000), rng.integers(0, 256, 5), target=True)  # 5 < block + 1
    with pytest.warns(UserWarning, match=r"not evaluated: the held-out split of \['t'\]"):
        result = train(TrainConfig(data=str(tmp_path / "store"), out=str(tmp_path / "run"), max_steps=2, **TINY))
    assert set(result.metrics[-1]["eval"]) == {"a", "b"}


def test_bad_numbers_name_their_flag(tmp_path):
    for flag, value in (("eval_interval", 0), ("grad_accum", 0), ("batch_size", 0), ("seed", -1)):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be an integer >= "):
            TrainConfig(**{flag: value})
    with pytest.raises(ValueError, match="--dga-mode 'inline' and --mixer-option mode='exact' disagree"):
        TrainConfig(mixer="dga", dga_mode="inline", mixer_options={"mode": "exact"})
    parser = add_train_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit, match="fastmix train: error: --log-interval must be an integer >= 1"):
        config_from_args(parser.parse_args(["--log-interval", "0"]))


class Crashing(StaticMixer):
    def update(self, ctx):
        raise RuntimeError("crash in the first step")


register_mixer("test-crashing", lambda store, **options: Crashing(torch.ones(store.num_domains)))


def test_overwrite_leaves_nothing_of_the_old_run(store_dir, tmp_path):
    """A run started with --overwrite that dies before its first checkpoint must not leave the
    old run's checkpoint behind, for --resume to mix with the new metrics."""
    _run(store_dir, tmp_path / "run", max_steps=2, plot=True)
    assert (tmp_path / "run" / "ckpt.pt").exists() and (tmp_path / "run" / "weights.png").exists()
    with pytest.raises(RuntimeError, match="crash in the first step"):
        _run(store_dir, tmp_path / "run", max_steps=2, overwrite=True, mixer="test-crashing")
    assert not (tmp_path / "run" / "ckpt.pt").exists() and not (tmp_path / "run" / "weights.png").exists()


def test_resume_applies_the_adamw_settings_it_is_given(store_dir, tmp_path):
    """The optimizer's state_dict holds the saved run's groups: --weight-decay, --beta1 and --beta2
    given on resume must still be what the resumed run uses (and what its config.json says)."""
    _run(store_dir, tmp_path / "run", max_steps=2)
    groups = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.1, (0.9, 0.95)), (0.0, (0.9, 0.95))]
    result = _run(store_dir, tmp_path / "run", max_steps=3, resume=True, weight_decay=0.5, beta1=0.8, beta2=0.9)
    groups = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.5, (0.8, 0.9)), (0.0, (0.8, 0.9))]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["weight_decay"], saved["beta1"], saved["beta2"]) == (0.5, 0.8, 0.9)
    assert result.metrics[-1]["step"] == 3
    for flag, value in (("beta1", 1.0), ("beta2", -0.1), ("weight_decay", -1.0)):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be a finite number"):
            TrainConfig(**{flag: value})


def test_only_rank_0_reads_the_old_metrics(store_dir, tmp_path):
    """Under DDP rank 0 rewrites metrics.jsonl at resume: another rank reading it then could see a
    half-written file. The other ranks do not read it at all (nor write it)."""
    _run(store_dir, tmp_path / "run", max_steps=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text('{"step": 0, "lr"')  # what rank 0 may be in the middle of writing
    config = TrainConfig(data=store_dir, out=str(tmp_path / "run"), max_steps=3, resume=True, **TINY)
    result = fastmix.train._train(config, rank=1, world=1, device=torch.device("cpu"), lock=None)
    assert [r["step"] for r in result.metrics] == [3]
    assert metrics.read_text() == '{"step": 0, "lr"'


def test_ctrl_c_while_resume_rewrites_the_metrics_loses_nothing(store_dir, tmp_path, monkeypatch):
    _run(store_dir, tmp_path / "run", max_steps=3, log_interval=1)
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = metrics.read_text()
    assert [json.loads(line)["step"] for line in before.splitlines()] == [0, 1, 2, 3]
    calls = []

    def dumps(obj, *args, **kwargs):
        calls.append(obj)
        if len(calls) == 3:  # the config, then records: a Ctrl-C between two records
            raise KeyboardInterrupt
        return json.dumps(obj, *args, **kwargs)

    monkeypatch.setattr(fastmix.train, "json", types.SimpleNamespace(
        dumps=dumps, loads=json.loads, load=json.load, dump=json.dump, JSONDecodeError=json.JSONDecodeError))
    with pytest.raises(KeyboardInterrupt):
        _run(store_dir, tmp_path / "run", max_steps=5, log_interval=1, resume=True)
    assert metrics.read_text() == before
    monkeypatch.undo()
    # an interruption after the temporary file is written, before it replaces the old one
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(str(metrics), "new\n")
    monkeypatch.undo()
    assert metrics.read_text() == before

    def interrupted_save(obj, f, *args, **kwargs):  # a Ctrl-C in the middle of writing a checkpoint
        f.write(b"partial")
        raise KeyboardInterrupt

    ckpt = (tmp_path / "run" / "ckpt.pt").read_bytes()
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        _run(store_dir, tmp_path / "run", max_steps=5, log_interval=1, checkpoint_interval=1, resume=True)
    monkeypatch.undo()
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == ckpt
    # no temporary file left, and no ckpt.prev.pt: the new checkpoint never replaced the old one
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt.pt", "config.json", "metrics.jsonl", "run.lock"]
    json.loads((tmp_path / "run" / "config.json").read_text())
    assert _run(store_dir, tmp_path / "run", max_steps=5, log_interval=1, resume=True).metrics[-1]["step"] == 5


class NaNWeights(StaticMixer):
    def __init__(self, store):
        super().__init__(torch.full((store.num_domains,), math.nan))


register_mixer("test-nan-weights", lambda store: NaNWeights(store))


def test_temperature_weights_are_finite_or_refused_and_no_block_size_hint_for_them(store_dir, tmp_path):
    for value in (math.nan, math.inf, -math.inf, "x", None, True, 0, -1.0):
        with pytest.raises(ValueError, match=re.escape(f"temperature must be a finite number > 0, got {value!r}")):
            Temperature([1, 2], temperature=value)
    for value in (1e-300, 1e-3):  # p^(1/T) underflows to 0 for every domain: all the weight on the largest
        torch.testing.assert_close(Temperature([100, 300, 200], value).weights,
                                   torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert _run(store_dir, tmp_path / "tiny-t", max_steps=1, mixer="temperature",
                mixer_options={"temperature": 1e-300}).metrics[-1]["step"] == 1
    # invalid weights are not "too short data": no --block-size hint (a mixer's bug keeps its traceback)
    with pytest.raises(ValueError, match="weights must be finite") as error:
        _run(store_dir, tmp_path / "nan", max_steps=1, mixer="test-nan-weights")
    assert "block-size" not in str(error.value) and not isinstance(error.value, UsageError)


class _FakeCuda:
    """Stands in for torch.cuda's RNG functions: one state per device index."""

    def __init__(self, count):
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.set = []

    def get_rng_state(self, device="cuda"):
        return self.states[torch.device(device).index].clone()

    def set_rng_state(self, state, device="cuda"):
        self.set.append((torch.device(device).index, int(state[0])))

    def get_rng_state_all(self):
        raise AssertionError("every device's state is not this process's to save")

    def set_rng_state_all(self, states):
        raise AssertionError("every device's state is not this process's to restore")


def test_cuda_rng_state_of_the_training_device_only(monkeypatch):
    fake = _FakeCuda(4)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    states = fastmix.train._rng_states(torch.device("cuda", 2))  # e.g. rank 0 of a DDP run on cuda:2
    assert torch.equal(states["cuda"], torch.tensor([2], dtype=torch.uint8))
    fastmix.train._set_rng_states(states, torch.device("cuda", 1))  # onto this process's device only
    assert fake.set == [(1, 2)]
    # checkpoints of format 1: a list of every GPU's state; upgraded to this device's entry, or the
    # first one when there are fewer GPUs now than then
    old = {"rng": {**states, "cuda": [torch.tensor([10 + i], dtype=torch.uint8) for i in range(2)]}}
    fake.set.clear()
    for device in (torch.device("cuda", 1), torch.device("cuda", 3)):
        fastmix.train._set_rng_states(fastmix.train._upgraded(old, device)["rng"], device)
    assert fake.set == [(1, 11), (3, 10)]
    # a CPU run saves and restores no CUDA state
    fake.set.clear()
    assert fastmix.train._rng_states(torch.device("cpu"))["cuda"] is None
    fastmix.train._set_rng_states(states, torch.device("cpu"))
    assert fake.set == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_rng_state_round_trip_on_a_gpu():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    states = fastmix.train._rng_states(device)
    first = torch.rand(8, device=device)
    old = {**states, "cuda": [states["cuda"]] * torch.cuda.device_count()}  # the older format
    for saved in (states, fastmix.train._upgraded({"rng": old}, device)["rng"]):
        torch.rand(8, device=device)
        fastmix.train._set_rng_states(saved, device)
        assert torch.equal(torch.rand(8, device=device), first)


class Stepping(StaticMixer):
    """Test mixer: after step s, domain 0 weighs 10 s against 1 for each other domain."""

    def __init__(self, store):
        super().__init__(torch.ones(store.num_domains))

    def update(self, ctx):
        weights = torch.ones_like(self._weights)
        weights[0] = 10.0 * ctx.step
        self._weights = weights / weights.sum()


register_mixer("test-stepping", lambda store: Stepping(store))


def test_summary_shows_the_final_weights(store_dir, tmp_path, capsys):
    """The table's weights are the mixer's after its last update (those of ckpt.pt), not those
    the last step's batch was drawn with (the last record's)."""
    result = _run(store_dir, tmp_path / "run", max_steps=2, mixer="test-stepping", quiet=False, plot=True)
    domain = result.store.domains[0]
    k = result.store.num_domains
    assert result.metrics[-1]["weights"][domain] == pytest.approx(10 / (10 + k - 1))  # drawn with: after step 1
    final = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["mixer"]["weights"]
    assert float(final[0]) == pytest.approx(20 / (20 + k - 1))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(domain + " "))
    assert row.split()[1:3] == ["domain", f"{float(final[0]):.3f}"]


def test_a_saved_loss_window_is_shared_out_whatever_the_number_of_ranks():
    from fastmix.train import _own_window, _upgraded

    per_rank = torch.tensor([1.0, 3.0])  # two ranks' sums: their records show the mean, 2.0
    assert [float(_own_window(per_rank, r, 2)) for r in range(2)] == [1.0, 3.0]
    assert float(_own_window(per_rank, 0, 1)) == 2.0  # one process: the same mean
    shares = [float(_own_window(per_rank, r, 4)) for r in range(4)]
    assert sum(shares) / 4 == 2.0 and shares[1:] == [0.0, 0.0, 0.0]
    # a checkpoint of format 1 held one sum for all ranks: upgraded, the records' mean stays
    old = {"rng": {"cuda": None}, "loss_window": {"sum": torch.tensor(2.5), "steps": 3}}
    upgraded = _upgraded(old, torch.device("cpu"))["loss_window"]["sum"]
    assert sum(float(_own_window(upgraded, r, 2)) for r in range(2)) / 2 == 2.5


def test_plot_gives_a_domain_one_colour_in_every_panel_and_shows_its_epochs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fastmix import plot

    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)  # keep the figure to look at it
    records = [{"step": s, "weights": {"a": 0.6, "b": 0.4}, "eval": {"a": 2.0 - s, "b": 2.0, "t": 3.0, "u": 1.0},
                "epochs": {"a": 0.5 * s, "b": 0.25 * s}} for s in range(3)]
    plot.plot_run(records, ["a", "b"], ["t", "u"], str(tmp_path / "p.png"))
    weights_ax, loss_ax, epochs_ax = figures[0].axes
    colour = {line.get_label(): line.get_color() for line in weights_ax.lines}
    for line in loss_ax.lines + [line for line in epochs_ax.lines if not line.get_label().startswith("_")]:
        if not line.get_label().startswith("target: "):
            assert line.get_color() == colour[line.get_label()], line.get_label()
    assert len(set(colour.values())) == 2
    epochs = {line.get_label(): list(line.get_ydata()) for line in epochs_ax.lines if not line.get_label().startswith("_")}
    assert epochs == {"a": [0.0, 0.5, 1.0], "b": [0.0, 0.25, 0.5]}
    assert (tmp_path / "p.png").stat().st_size > 0 and not list(tmp_path.glob("*.tmp"))
    plt.close(figures[0])
