import argparse
import importlib.util
import json
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
        assert set(r) == {"step", "lr", "train_loss", "weights", "eval"}
        assert set(r["weights"]) == set(result.store.domains)
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
    # a checkpoint from before the names were saved resumes unchecked
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    assert (ckpt["domains"], ckpt["targets"]) == (domains, DomainStore(store_dir).targets)
    del ckpt["domains"], ckpt["targets"]
    torch.save(ckpt, path)
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
    """A --mixer-option sets one option: the others of the TOML file or the resumed run stay."""
    parser = add_train_arguments(argparse.ArgumentParser())
    toml = tmp_path / "c.toml"
    toml.write_text('resume = true\nout = "%s"\n[mixer_options]\ninterval = 5\nfloor = 0.1\n' % (tmp_path / "run"))
    os.makedirs(tmp_path / "run")
    saved = {**TrainConfig().__dict__, "resume": False, "mixer_options": {"floor": 0.2, "ema": 0.5}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    config = config_from_args(parser.parse_args(["--config", str(toml), "--mixer-option", "ema=0.1"]))
    assert config.mixer_options == {"interval": 5, "floor": 0.2, "ema": 0.1}
    assert config.resume  # from the TOML file, not the run's saved config


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
