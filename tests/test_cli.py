import dataclasses
import json
import os
import subprocess
import sys

import pytest

from fastmix.cli import build_parser, main
from fastmix.data.prepare import BUILTIN_VERSION
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


def test_python_m_train_on_builtin_corpus(tmp_path):
    """What a new user runs: no data given, so the built-in corpus is built (cached) and used."""
    env = {**os.environ, "FASTMIX_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fastmix.train", "--out", str(tmp_path / "run"), "--max-steps", "3", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arith" in proc.stdout and "weights.png" in proc.stdout
    assert os.listdir(tmp_path / "cache") == [f"builtin-v{BUILTIN_VERSION}-seed0"]


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
    with pytest.raises(SystemExit, match=f"fastmix prepare: {data} exists and is not a fastmix store"):
        main([*prepare, str(data)])
    assert os.listdir(data) == ["notes.txt"]
    main([*prepare, str(tmp_path / "store")])
    main([*prepare, str(tmp_path / "store"), "--val-fraction", "0.5"])
    assert "1 domains" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "data", "store"]
