"""`fastmix train` where a user's machine fails it, driven through the command: a store whose
token ids do not fit its vocabulary."""
import os

import numpy as np
import pytest

from fastmix.cli import main
from fastmix.data import StoreWriter

TINY = ["--batch-size", "4", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--eval-batches", "1", "--device", "cpu", "--quiet", "--no-plot", "--warmup-steps", "2"]


def _error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert "\n" not in message, message
    return message


def _train(store_dir, out, *extra):
    main(["train", "--data", str(store_dir), "--out", str(out), *TINY, *extra])


# ---------------------------------------------------------------- a bad store

def _store(path, tokens_b):
    rng = np.random.default_rng(0)
    with StoreWriter(path, {"type": "byte", "vocab_size": 257, "eos_id": 256}) as w:
        w.add("a", rng.integers(0, 257, 3000), rng.integers(0, 257, 300))
        w.add("b", tokens_b, rng.integers(0, 257, 300))
        w.add("t", rng.integers(0, 257, 500), rng.integers(0, 257, 300), target=True)


def test_a_store_with_token_ids_past_the_vocabulary_stops_before_the_run_directory(tmp_path):
    rng = np.random.default_rng(1)
    _store(tmp_path / "good", rng.integers(0, 257, 3000))
    out = tmp_path / "run"
    _train(tmp_path / "good", out, "--max-steps", "2")
    config_before = (out / "config.json").read_text()
    bad = tmp_path / "good" / "tokens" / "b.train.bin"
    tokens = np.fromfile(bad, dtype=np.uint16)
    tokens[100] = 300
    tokens.tofile(bad)
    message = _error(["train", "--data", str(tmp_path / "good"), "--out", str(tmp_path / "new"), *TINY,
                      "--max-steps", "2"])
    assert message == (f"fastmix train: error: --data: {bad}: token id 300 >= the store's vocab_size 257 (corrupt, "
                       "or written with another tokenizer than meta.json names)")
    assert not (tmp_path / "new").exists()
    assert "token id 300" in _error(["train", "--data", str(tmp_path / "good"), "--out", str(out), *TINY,
                                     "--max-steps", "4", "--resume"])
    assert (out / "config.json").read_text() == config_before
