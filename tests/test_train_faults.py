"""`fastmix train` where a user's machine fails it, driven through the command: a second
process on the same run, a torn metrics line, a damaged checkpoint, a diverged model, numbers
the optimizer cannot take, and a store whose token ids do not fit its vocabulary."""
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastmix.cli import main
from fastmix.data import StoreWriter
from fastmix.mixing import register_mixer
from fastmix.mixing.baselines import Uniform
from fastmix.mixing.base import MIXERS
from fastmix.rundir import checkpoint_step, load_checkpoint

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


# ---------------------------------------------------------------- one writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every step recorded and evaluated, on a schedule that does not depend on --max-steps: a run
# cut anywhere and resumed can be compared record for record with one that was not
EVERY_STEP = ["--log-interval", "1", "--eval-interval", "1", "--checkpoint-interval", "1", "--lr-decay-steps", "40",
              "--mixer", "dga"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_train_is_refused_naming_the_pid_and_a_sigkilled_run_resumes_as_if_never_stopped(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "fastmix", "train", "--out", str(out), *TINY, *EVERY_STEP,
                              "--max-steps", "40"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": REPO})
    try:
        deadline = time.monotonic() + 120
        while (checkpoint_step(str(out / "ckpt.pt")) if (out / "ckpt.pt").exists() else 0) < 3:
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.1)
        for extra in ([], ["--resume"], ["--overwrite"]):
            message = _error(["train", "--out", str(out), *TINY, "--max-steps", "40", *extra])
            assert message.startswith(f"fastmix train: error: {out} is in use by another fastmix train "
                                      f"(PID {first.pid}, lock {out / 'run.lock'})"), message
    finally:
        first.kill()  # SIGKILL, wherever it is: maybe inside a checkpoint's write
        first.wait()
    # the killed holder's lock is no obstacle: the run goes on from its last whole checkpoint
    step = checkpoint_step(str(out / "ckpt.pt"))
    assert step < 40, "the first run ended before it was killed"
    main(["train", "--out", str(out), *TINY, *EVERY_STEP, "--max-steps", str(step + 2), "--resume"])
    main(["train", "--out", str(tmp_path / "whole"), *TINY, *EVERY_STEP, "--max-steps", str(step + 2)])
    assert _records(out) == _records(tmp_path / "whole")


@pytest.mark.skipif(subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0,
                    reason="cannot mount a tmpfs in a user namespace here")
def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_there_is_room(tmp_path):
    """A real ENOSPC: `fastmix train` on a tmpfs that holds one checkpoint but not a second beside it."""
    main(["train", "--out", str(tmp_path / "probe"), *TINY, "--max-steps", "1", "--no-plot"])
    size = os.path.getsize(tmp_path / "probe" / "ckpt.pt")
    disk = tmp_path / "disk"
    disk.mkdir()
    command = (f"mount -t tmpfs -o size={int(size * 1.6)} tmpfs {disk} && {sys.executable} -m fastmix train "
               f"--out {disk / 'run'} {' '.join(TINY)} --max-steps 4 --checkpoint-interval 2 --no-plot; "
               f"echo EXIT $?; cp -r {disk / 'run'} {tmp_path / 'saved'}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert "EXIT 1" in result.stdout, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"fastmix train: error: could not write {disk / 'run' / 'ckpt.pt'}: No space left on device. "
                    f"The previous checkpoint {disk / 'run' / 'ckpt.pt'} (step 2) is intact. Free some space, then "
                    "continue with --resume"), last
    saved = tmp_path / "saved"
    assert sorted(os.listdir(saved)) == ["ckpt.pt", "config.json", "metrics.jsonl", "run.lock"]
    main(["train", "--out", str(saved), *TINY, "--max-steps", "4", "--checkpoint-interval", "2", "--resume"])
    assert checkpoint_step(str(saved / "ckpt.pt")) == 4


# ---------------------------------------------------------------- a torn metrics line

def test_a_torn_last_metrics_line_is_dropped_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path):
    flags = [*TINY, "--log-interval", "1", "--checkpoint-interval", "2", "--eval-interval", "2", "--lr-decay-steps", "8",
             "--mixer", "dga"]
    main(["train", "--out", str(tmp_path / "whole"), *flags, "--max-steps", "8"])
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    out = tmp_path / "run"
    main(["train", "--out", str(out), *flags, "--max-steps", "6"])
    with open(out / "metrics.jsonl", "a") as f:  # the append of record 7 cut by a full disk
        f.write(whole[7][:len(whole[7]) // 2])
    with pytest.warns(UserWarning, match="torn"):
        main(["train", "--out", str(out), *flags, "--max-steps", "8", "--resume"])
    assert [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()] == [json.loads(r) for r in whole]


# ---------------------------------------------------------------- a damaged checkpoint

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    main(["train", "--out", str(out), *TINY, "--max-steps", "4", "--checkpoint-interval", "2"])
    return out


DAMAGES = {
    "truncated": lambda data: data[:len(data) // 2],
    "empty": lambda data: b"",
    "text": lambda data: b"this is not a checkpoint\n",
    "bytes flipped": lambda data: data[:len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2:][:2000])
    + data[len(data) // 2 + 2000:],
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_stops_resume_and_weights_naming_the_last_good_one(finished_run, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = out / "ckpt.pt"
    ckpt.write_bytes(DAMAGES[damage](ckpt.read_bytes()))
    for argv in (["train", "--out", str(out), *TINY, "--max-steps", "6", "--resume"], ["weights", str(out)]):
        message = _error(argv)
        assert str(ckpt) in message and f"{out / 'ckpt.prev.pt'} (step 2)" in message, message
    assert load_checkpoint(str(out / "ckpt.prev.pt"))["step"] == 2


# ---------------------------------------------------------------- divergence

def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    good = (out / "ckpt.pt").read_bytes()
    message = _error(["train", "--out", str(out), *TINY, "--max-steps", "40", "--resume", "--lr", "1e30"])
    assert message.startswith("fastmix train: error: the run diverged: "), message
    assert f"{out / 'ckpt.pt'} (step 4) holds the last good state" in message
    assert "--skip-nonfinite-steps" in message
    assert (out / "ckpt.pt").read_bytes() == good
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] is None or math.isfinite(r["train_loss"]) for r in records)


def test_skipping_non_finite_steps_still_stops_a_run_that_never_recovers(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    message = _error(["train", "--out", str(out), *TINY, "--max-steps", "40", "--resume", "--lr", "1e30",
                      "--skip-nonfinite-steps", "--log-interval", "1"])
    assert "in 10 steps in a row at step" in message, message
    assert checkpoint_step(str(out / "ckpt.pt")) == 4
    last = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()][-3:]
    assert [(r["train_loss"], r["skipped_steps"]) for r in last] == [(None, 1)] * 3


class _NonFiniteGradientOnce(Uniform):
    """A uniform mixer that makes one step's gradient NaN from inside the training pass, as an
    fp16 overflow would."""
    bad_step = 3

    @contextlib.contextmanager
    def record(self, ctx, domain_ids):
        yield
        if ctx.step == self.bad_step:
            next(ctx.model.parameters()).grad.view(-1)[0] = float("nan")


@pytest.fixture
def nan_once_mixer():
    register_mixer("nan-once", lambda store: _NonFiniteGradientOnce(store.num_domains))
    yield "nan-once"
    del MIXERS["nan-once"]


@pytest.mark.parametrize("grad_clip", ["1.0", "0"])
def test_a_skipped_step_leaves_the_parameters_untouched_and_the_run_goes_on(tmp_path, nan_once_mixer, grad_clip):
    flags = [*TINY, "--mixer", nan_once_mixer, "--log-interval", "1", "--grad-clip", grad_clip]
    message = _error(["train", "--out", str(tmp_path / "stops"), *flags, "--max-steps", "6"])
    assert "the loss or a gradient is not finite at step 3" in message and "no checkpoint was written yet" in message
    out = tmp_path / "skips"
    main(["train", "--out", str(out), *flags, "--max-steps", "6", "--skip-nonfinite-steps",
          "--checkpoint-interval", "2"])
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records[1:]] == [0, 0, 1, 0, 0, 0]
    assert records[3]["train_loss"] is None
    assert all(math.isfinite(r["train_loss"]) for r in records[1:] if r["step"] != 3)
    model = load_checkpoint(str(out / "ckpt.pt"))["model"]
    assert all(torch.isfinite(t).all() for t in model.values())


# ---------------------------------------------------------------- numbers the optimizer cannot take

@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--weight-decay", "--grad-clip"])
def test_a_number_beyond_float32_is_refused_naming_its_flag(tmp_path, flag):
    message = _error(["train", "--out", str(tmp_path / "run"), *TINY, flag, "1e39"])
    assert message.startswith(f"fastmix train: error: {flag} 1e+39 is beyond float32's range"), message
    assert not (tmp_path / "run").exists()


def test_a_learning_rate_whose_adamw_step_overflows_is_refused(tmp_path):
    message = _error(["train", "--out", str(tmp_path / "run"), *TINY, "--lr", "1e38"])
    assert message == ("fastmix train: error: --lr 1e+38 with --beta1 0.9 and --weight-decay 0.1 overflows float32 "
                       "in AdamW's step: lower --lr")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- checkpoint formats

def test_a_checkpoint_of_the_format_before_versions_resumes(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    state = torch.load(out / "ckpt.pt", weights_only=False)
    for key in ("format_version", "checksum", "domains", "targets"):
        del state[key]
    state["loss_window"] = {"sum": state["loss_window"]["sum"].sum(), "steps": state["loss_window"]["steps"]}
    torch.save(state, out / "ckpt.pt")
    with pytest.warns(UserWarning, match="no checksum"):
        main(["train", "--out", str(out), *TINY, "--max-steps", "6", "--resume"])
    assert load_checkpoint(str(out / "ckpt.pt"))["format_version"] == 2


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    state = torch.load(out / "ckpt.pt", weights_only=False)
    del state["checksum"]
    torch.save({**state, "format_version": 99}, out / "ckpt.pt")
    for argv in (["train", "--out", str(out), *TINY, "--max-steps", "6", "--resume"], ["weights", str(out)]):
        with pytest.warns(UserWarning, match="no checksum"):
            message = _error(argv)
        assert message.endswith(f"{out / 'ckpt.pt'}: written by a newer fastmix (checkpoint format 99; this one "
                                "reads formats up to 2): upgrade fastmix to use it"), message


# ---------------------------------------------------------------- limited data

def test_a_domain_at_its_epoch_cap_is_drawn_no_more_and_a_store_drawn_dry_stops_in_one_line(tmp_path):
    rng = np.random.default_rng(2)
    _store(tmp_path / "store", rng.integers(0, 257, 600))  # a: 3000 training tokens, b: 600
    out = tmp_path / "run"
    _train(tmp_path / "store", out, "--max-steps", "30", "--log-interval", "1", "--max-epochs-per-domain", "1")
    records = _records(out)[1:]
    capped_at = next(r["step"] for r in records if r["capped"])
    assert all(r["capped"] == ["b"] for r in records if r["step"] >= capped_at)
    # b stops within the batch that took it past one epoch (2 of 4 rows, 16 tokens each)
    assert 1.0 <= records[-1]["epochs"]["b"] < 1.0 + 2 * 16 / 600
    assert records[-1]["epochs"]["b"] == records[capped_at - 1]["epochs"]["b"]
    assert records[-1]["epochs"]["a"] > records[capped_at - 1]["epochs"]["a"]
    message = _error(["train", "--data", str(tmp_path / "store"), "--out", str(tmp_path / "dry"), *TINY,
                      "--max-steps", "500", "--checkpoint-interval", "10", "--max-epochs-per-domain", "1"])
    assert re.fullmatch(r"fastmix train: error: --max-epochs-per-domain 1.0: at step \d+, every domain has been "
                        r"drawn for max_epochs = 1.0 epochs: nothing is left to draw from; the checkpoint .*ckpt.pt "
                        r"is at step \d+0 \(train for fewer --max-steps, or allow more epochs\)", message), message
