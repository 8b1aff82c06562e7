import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastmix.cli import build_parser, main
from fastmix.data.prepare import BUILTIN_VERSION
from fastmix.mixing import MIXERS, register_mixer
from fastmix.mixing.base import mixer_options
from fastmix.mixing.baselines import StaticMixer
from fastmix.train import TrainConfig

TINY = ["--batch-size", "4", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--eval-batches", "1", "--device", "cpu"]


def _help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_explains_every_flag(capsys):
    top = _help([], capsys)
    for command in ("info", "prepare", "train"):
        assert command in top
    train_help = _help(["train"], capsys)
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in train_help
    for flag in ("--data", "--mixer", "--target", "--max-steps", "--resume", "--out", "--config"):
        assert flag in train_help
    prepare_help = _help(["prepare"], capsys)
    for flag in ("--domain", "--target", "--builtin", "--tokenizer", "--text-field", "--force"):
        assert flag in prepare_help


def test_prepare_then_train(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc " * 300)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"t": "xyz " * 20}) for _ in range(20)))
    (tmp_path / "q.txt").write_text("abxy " * 100)
    store = str(tmp_path / "store")
    main(["prepare", store, "--domain", f"a={tmp_path / 'a.txt'}", "--domain", f"b={tmp_path / 'b.jsonl'}",
          "--target", f"q={tmp_path / 'q.txt'}", "--text-field", "t", "--val-fraction", "0.2", "--quiet"])
    assert "2 domains, 1 targets" in capsys.readouterr().out
    out = str(tmp_path / "run")
    main(["train", "--data", store, "--out", out, "--max-steps", "4", "--eval-interval", "2", *TINY])
    printed = capsys.readouterr().out
    assert "loss@last" in printed and os.path.join(out, "weights.png") in printed
    assert os.path.exists(os.path.join(out, "weights.png"))
    main(["train", "--out", out, "--resume", "--max-steps", "6", "--quiet"])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[-1]["step"] == 6 and "q" in records[-1]["eval"]


def test_prepare_argument_errors(tmp_path):
    with pytest.raises(SystemExit, match="--builtin"):
        main(["prepare", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prepare", str(tmp_path / "x"), "--domain", "no-equals-sign"])


def test_python_m_fastmix_train_on_builtin_corpus(tmp_path):
    """What a new user runs: no data given, so the built-in corpus is built (cached) and used."""
    env = {**os.environ, "FASTMIX_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fastmix", "train", "--out", str(tmp_path / "run"), "--max-steps", "3", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arith" in proc.stdout and "weights.png" in proc.stdout
    # the built-in store, and the record that its tokens were checked once
    assert sorted(os.listdir(tmp_path / "cache")) == [f"builtin-v{BUILTIN_VERSION}-seed0", "validated"]


@pytest.mark.parametrize("extra, message", [
    (["--builtin", "--target", "q=q.txt"], "--target does not apply to --builtin"),
    (["--builtin", "--tokenizer", "bpe"], "--tokenizer does not apply to --builtin"),
    (["--builtin", "--val-fraction", "0.5"], "--val-fraction does not apply to --builtin"),
    (["--builtin", "--text-field", "body"], "--text-field does not apply to --builtin"),
    (["--domain", "a=a.txt", "--seed", "3"], "--seed applies only to --builtin"),
    (["--domain", "a=a.txt", "--bpe-vocab-size", "500"], "--bpe-vocab-size applies only to --tokenizer bpe"),
])
def test_prepare_rejects_options_that_do_not_apply(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["prepare", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_prepare_force_replaces_only_a_store(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc " * 100)
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    prepare = ["prepare", "--domain", f"a={tmp_path / 'a.txt'}", "--quiet", "--force"]
    with pytest.raises(SystemExit, match=f"fastmix prepare: error: {data} exists and is not a fastmix store"):
        main([*prepare, str(data)])
    assert os.listdir(data) == ["notes.txt"]
    main([*prepare, str(tmp_path / "store")])
    main([*prepare, str(tmp_path / "store"), "--val-fraction", "0.5"])
    assert "1 domains" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "data", "store"]


def _error(argv):
    """The message a command exits with: one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), e.value.code
    return e.value.code


def _truncated_copy(store_dir, dst):
    shutil.copytree(store_dir, dst)
    token_file = sorted((dst / "tokens").iterdir())[0]
    os.truncate(token_file, token_file.stat().st_size - 2)
    return str(dst)


@pytest.mark.parametrize("extra, message", [
    (["--target", "englsh"],
     "--target 'englsh' is not a target task of the store; its targets: arith, strings, english"),
    (["--data", "{tmp}/missing"], "--data: {tmp}/missing: no such store directory .build one with `fastmix prepare`"),
    (["--data", "{tmp}"], "--data: {tmp}: not a fastmix store"),
    (["--data", "truncated"], "--data: .*add_digits.train.bin: .* .truncated or corrupt store"),
    (["--mixer", "uniform", "--dga-mode", "inline"], "--dga-mode is for --mixer dga or universal, not 'uniform'"),
    (["--mixer", "dga", "--mixer-option", "stepsize=3"],
     "--mixer dga: unknown option 'stepsize' for mixer 'dga'; its options: step_size, ema, floor, interval, "
     "precondition, mode, rows_per_domain, target_rows, target_every, bases, rows_per_basis, fused"),
    # DGA's basis distributions: a matrix of the wrong shape, a store without a coarse level
    (["--mixer", "dga", "--mixer-option", "bases=[[1, 2], [3, 4]]"],
     r"--mixer dga: bases must be an \(m, 10\) matrix, one row per basis distribution over the 10 domains, got "
     r"shape \(2, 2\)"),
    (["--mixer", "dga", "--mixer-option", "bases=coarse"],
     "--mixer dga: bases=coarse: the store .* records no coarse clustering"),
    (["--mixer", "dga", "--mixer-option", "bases={tmp}/b.npy"], "--mixer dga: bases={tmp}/b.npy: no such file"),
    (["--mixer", "temperature", "--mixer-option", "temperature=-1"],
     "--mixer temperature: temperature must be a finite number > 0, got -1"),
    # options of the wrong type (JSON null, a string) or not finite: a message naming the option, not a TypeError
    (["--mixer", "temperature", "--mixer-option", "temperature=x"],
     "--mixer temperature: temperature must be a finite number > 0, got 'x'"),
    (["--mixer", "temperature", "--mixer-option", "temperature=NaN"],
     "--mixer temperature: temperature must be a finite number > 0, got nan"),
    (["--mixer", "dga", "--mixer-option", "floor=null"],
     "--mixer dga: floor must be a finite number in .0, 1., got None"),
    (["--mixer", "dga", "--mixer-option", "ema=x"], "--mixer dga: ema must be a finite number in .0, 1., got 'x'"),
    (["--mixer", "universal", "--mixer-option", "step_size=null"],
     "--mixer universal: step_size must be a finite number >= 0, got None"),
    # a layer the model does not have: found before the run, not at its first step
    (["--mixer", "chameleon", "--mixer-option", "layer=99"],
     "--mixer chameleon: layer 99 is out of range for 1 layers"),
    (["--mixer", "chameleon", "--mixer-option", "layer=foo"],
     "--mixer chameleon: layer 'foo' is not a submodule of the model"),
    (["--mixer", "chameleon", "--mixer-option", "layer=null"],
     "--mixer chameleon: layer must be 'middle', a block index or a submodule name, got None"),
    # DGA draws target batches: a target too short for a window is found before the run
    (["--mixer", "dga", "--target", "strings", "--block-size", "512"],
     "--target strings: its training split has 400 tokens, fewer than --block-size . 1 = 513, and the dga "
     "mixer draws target batches from it"),
    (["--n-embd", "18", "--n-head", "4"], "--n-embd 18 must be a multiple of --n-head 4"),
    (["--config", "{tmp}/missing.toml"], "--config {tmp}/missing.toml: No such file or directory"),
    (["--config", "bad.toml"], "--config {tmp}/bad.toml: not valid TOML: Invalid value .at line 1, column 13"),
    (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    (["--resume"], "--resume: no checkpoint at {tmp}/run/ckpt.pt"),
    # numbers and switches of the wrong kind, as a TOML file can give them
    (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--dropout", "2"], "--dropout must be a finite number in .0, 1., got 2.0"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0, got -1.0"),
    (["--config", "types.toml"], "--min-lr must be a finite number >= 0, got 'x'"),
    (["--config", "bool.toml"], "--bias must be true or false, got 'yes'"),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite starts it afresh: give one"),
])
def test_train_user_errors_are_one_line_and_leave_no_run(store_dir, tmp_path, extra, message):
    (tmp_path / "bad.toml").write_text("max_steps = \n")
    (tmp_path / "types.toml").write_text('min_lr = "x"\n')
    (tmp_path / "bool.toml").write_text('bias = "yes"\n')
    paths = {"truncated": _truncated_copy(store_dir, tmp_path / "truncated"),
             **{name: str(tmp_path / name) for name in ("bad.toml", "types.toml", "bool.toml")}}
    extra = [paths.get(arg, arg.replace("{tmp}", str(tmp_path))) for arg in extra]
    argv = ["train", "--data", store_dir, "--out", str(tmp_path / "run"), "--max-steps", "2", *TINY, *extra]
    error = _error(argv)
    assert re.fullmatch(f"fastmix train: error: {message.replace('{tmp}', str(tmp_path))}.*", error), error
    assert "\n" not in error and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_train_on_cuda_without_a_gpu_says_so(store_dir, tmp_path):
    error = _error(["train", "--data", store_dir, "--out", str(tmp_path / "run"), *TINY, "--device", "cuda"])
    assert error == "fastmix train: error: --device cuda: no CUDA GPU is visible here; use --device cpu"


@pytest.mark.parametrize("flag, value", [("--mixer", "dgaa"), ("--dga-mode", "fast")])
def test_train_choices(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_train_into_a_run_says_how_to_go_on(store_dir, tmp_path):
    argv = ["train", "--data", store_dir, "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY, "--quiet",
            "--no-plot"]
    main(argv)
    assert _error(argv) == (f"fastmix train: error: {tmp_path / 'run'} already holds a run: pass --resume to "
                            "continue it, --overwrite to start afresh, or another --out")


def test_resume_refuses_what_the_checkpoint_fixes(store_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", store_dir, "--out", str(out), *TINY, "--quiet", "--no-plot"]
    main([*argv, "--mixer", "dga", "--mixer-option", "interval=2", "--max-steps", "2"])
    config = (out / "config.json").read_text()
    for extra, message in [
        (["--mixer", "uniform"], "--mixer uniform differs from the checkpoint's 'dga'"),
        (["--mixer", "chameleon"], "--mixer chameleon differs from the checkpoint's 'dga'"),
        (["--n-embd", "32"], "--n-embd 32 differs from the checkpoint's 16"),
        (["--no-bias"], "--bias False differs from the checkpoint's True"),
        (["--dga-mode", "inline"], "mixer option mode='inline' differs from the checkpoint's 'stratified'"),
        (["--max-steps", "1"], "the checkpoint is at step 2 >= --max-steps 1: nothing to do"),
        (["--max-steps", "2"], "the checkpoint is at step 2 >= --max-steps 2: nothing to do"),
    ]:
        error = _error([*argv, "--resume", "--max-steps", "3", *extra])
        assert error.startswith(f"fastmix train: error: --resume: {message}"), error
        assert (out / "config.json").read_text() == config
    # what may change: --max-steps, options the mixer's state does not depend on (the others stay as saved)
    main([*argv, "--resume", "--max-steps", "3", "--mixer-option", "step_size=50"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["mixer_options"] == {"interval": 2, "step_size": 50} and saved["max_steps"] == 3


class Interrupted(StaticMixer):
    """Ctrl-C during step 3."""

    def update(self, ctx):
        if ctx.step == 3:
            raise KeyboardInterrupt


register_mixer("test-interrupted", lambda store: Interrupted(torch.ones(store.num_domains)))


def test_resume_from_another_directory_with_relative_paths(store_dir, tmp_path, monkeypatch):
    """config.json holds absolute paths: a run started with relative --data is resumed, and
    weighed, from anywhere."""
    import shutil

    shutil.copytree(store_dir, tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    main(["train", "--data", "store", "--out", "run", *TINY, "--quiet", "--no-plot", "--max-steps", "2"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "store")
    monkeypatch.chdir(tmp_path.parent)
    main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "3", "--quiet", "--no-plot"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 3


def test_dga_mode_by_either_name_overrides_the_saved_one(store_dir, tmp_path):
    """--dga-mode and --mixer-option mode= are one setting: given on resume by the other name
    than the saved run used, the new one wins instead of the two 'disagreeing'."""
    out = tmp_path / "run"
    argv = ["train", "--data", store_dir, "--out", str(out), *TINY, "--quiet", "--no-plot", "--mixer", "dga",
            "--mixer-option", "interval=2"]
    main([*argv, "--dga-mode", "stratified", "--max-steps", "2"])
    main([*argv, "--resume", "--max-steps", "3", "--mixer-option", "mode=exact"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["dga_mode"] is None and saved["mixer_options"]["mode"] == "exact"
    main([*argv, "--resume", "--max-steps", "4", "--dga-mode", "stratified"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["dga_mode"] == "stratified" and "mode" not in saved["mixer_options"]


def test_inline_resume_keeps_its_target(store_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", store_dir, "--out", str(out), *TINY, "--quiet", "--no-plot", "--mixer", "dga",
            "--dga-mode", "inline", "--target", "arith"]
    main([*argv, "--max-steps", "2"])
    error = _error([*argv[:-1], "strings", "--resume", "--max-steps", "3"])
    assert error.startswith("fastmix train: error: --resume: --target strings differs from the checkpoint's 'arith'")
    main([*argv, "--resume", "--max-steps", "3"])  # the same target resumes


@pytest.mark.parametrize("checkpoint_interval, where", [
    (2, "the last checkpoint (step 2) is in {out}: continue with --resume"),
    (5, "no checkpoint was written yet in {out}"),
])
def test_ctrl_c_says_where_the_run_can_go_on(store_dir, tmp_path, capsys, checkpoint_interval, where):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", store_dir, "--out", out, "--mixer", "test-interrupted", "--max-steps", "5",
              "--checkpoint-interval", str(checkpoint_interval), *TINY, "--quiet", "--no-plot"])
    assert e.value.code == 130
    assert capsys.readouterr().err == f"fastmix train: interrupted; {where.format(out=out)}\n"


def test_help_says_no_none_defaults_and_lists_every_mixer_option(capsys):
    train_help = _help(["train"], capsys)
    assert "(default: None)" not in train_help
    assert "(default: pretrain)" in " ".join(_help(["weights"], capsys).split())
    # "...; dga/universal: step_size, ...; chameleon: source=online|offline, ...": the options per mixer
    help_text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "mixer_options").metadata["help"]
    listed = {}
    for part in help_text.split("; "):
        names, sep, options = part.partition(": ")
        for name in names.split("/") if sep else ():
            listed[name.split()[-1]] = options
    for name in MIXERS:
        for option in mixer_options(name) or ():  # None: a factory that does not say (test mixers)
            assert re.search(rf"\b{option}\b", listed.get(name, "")), (name, option)


def _two_domain_store(tmp_path, out, domains=("a", "b")):
    for name in domains:
        (tmp_path / f"{name}.txt").write_text(f"{name}bc " * 400)
    main(["prepare", str(out), *[f"--domain={name}={tmp_path / f'{name}.txt'}" for name in domains],
          "--val-fraction", "0.2", "--quiet", "--force"])
    return str(out)


def test_weights_weighs_the_checkpoints_own_store(tmp_path, capsys):
    store = _two_domain_store(tmp_path, tmp_path / "store")
    run = str(tmp_path / "run")
    main(["train", "--data", store, "--out", run, "--max-steps", "1", *TINY, "--quiet", "--no-plot"])
    capsys.readouterr()
    main(["weights", run, "--quiet"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["a", "b"]
    _two_domain_store(tmp_path, tmp_path / "store", domains=("a", "c"))
    capsys.readouterr()
    assert _error(["weights", run, "--quiet"]) == (
        f"fastmix weights: error: the checkpoint was trained on {store}, whose domains have changed since: "
        "give --data to weigh the domains of a store")
    main(["weights", run, "--data", store, "--quiet"])  # named: any store with the model's tokenizer
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["a", "c"]
    missing = tmp_path / "nothing"
    assert _error(["weights", str(missing)]) == (f"fastmix weights: error: {missing}: no such checkpoint (give a run "
                                                 "directory of `fastmix train`, or its ckpt.pt)")


@pytest.mark.parametrize("extra, message", [
    (["--tokenizer", "BPE"],
     "--tokenizer 'BPE': expected byte, bpe or a tokenizer.json FILE, and there is no such file"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1), got 1.5"),
])
def test_prepare_errors_name_their_flag(tmp_path, extra, message):
    (tmp_path / "a.txt").write_text("abc " * 100)
    argv = ["prepare", str(tmp_path / "store"), "--domain", f"a={tmp_path / 'a.txt'}", "--quiet", *extra]
    assert _error(argv) == f"fastmix prepare: error: {message}"
    assert not (tmp_path / "store").exists()


def test_prepare_into_something_that_exists_names_force(tmp_path):
    (tmp_path / "a.txt").write_text("abc " * 100)
    assert _error(["prepare", str(tmp_path), "--domain", f"a={tmp_path / 'a.txt'}"]) == (
        f"fastmix prepare: error: {tmp_path} already exists: pass --force to replace it (only a fastmix store is "
        "ever replaced)")
