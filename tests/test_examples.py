"""The scripts in examples/ run as a user runs them (a subprocess, offline, a few steps) and
write what their docstrings say."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One FASTMIX_CACHE for the module: the built-in corpus is built once for all the scripts."""
    return tmp_path_factory.mktemp("cache")


def run_example(name, cache, cwd, *args, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FASTMIX_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),  # this checkout's fastmix
           "OMP_NUM_THREADS": "1"}  # two threads on two shared cores run ~10x slower
    result = subprocess.run([sys.executable, *launcher, str(ROOT / "examples" / name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_weights(weights, count):
    assert len(weights) == count and all(w >= 0 for w in weights)
    assert sum(weights) == pytest.approx(1, abs=1e-9)


def test_own_loop_llama(cache, tmp_path):
    stdout = run_example("own_loop_llama.py", cache, tmp_path, "--max-steps", "12", "--interval", "3",
                         "--out", str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert saved["domains"] == ["english", "code", "arithmetic", "noise"]
    assert [r["step"] for r in saved["history"]] == list(range(1, 13))
    for record in saved["history"]:
        assert_weights(list(record["weights"].values()), 4)
    assert saved["weights"] == saved["history"][-1]["weights"]
    # four DGA updates: the held-out English target already pulls weight to `english`
    assert saved["weights"]["english"] > 0.25 > saved["weights"]["noise"]
    assert "step   10  loss" in stdout


def test_hf_trainer_dga_checkpoints_and_resumes(cache, tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--logging-steps", "2", "--save-steps", "2"]
    run_example("hf_trainer_dga.py", cache, tmp_path, "--max-steps", "4", *common)
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "fastmix_mixing.pt").is_file()
    first = json.loads((out / "weights.json").read_text())
    assert [r["step"] for r in first["history"]] == [0, 2, 4]
    assert (out / "weights.png").read_bytes()[:8] == PNG_MAGIC
    stdout = run_example("hf_trainer_dga.py", cache, tmp_path, "--max-steps", "6", "--resume", *common)
    resumed = json.loads((out / "weights.json").read_text())
    assert [r["step"] for r in resumed["history"]] == [0, 2, 4, 6]  # the steps before the resume are kept
    assert resumed["history"][:3] == first["history"]
    for record in resumed["history"]:
        assert_weights(list(record["weights"].values()), 10)
    assert_weights(list(resumed["weights"].values()), 10)
    assert "final weights: " in stdout


def test_chameleon_from_hf_model_gives_the_cli_weights(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_example("chameleon_from_hf_model.py", cache, tmp_path, "--max-steps", "3", "--windows-per-domain", "8",
                "--out", str(out))
    saved = json.loads((out / "weights.json").read_text())
    assert len(saved["domains"]) == 10
    for mode in ("pretrain", "finetune"):
        assert_weights(saved[mode]["weights"], 10)
    assert_weights(saved["transfer"]["weights_without"], 9)
    assert saved["transfer"]["held_out"] == saved["domains"][-1]
    assert (out / "weights.png").read_bytes()[:8] == PNG_MAGIC
    # what `fastmix weights --model OUT/model --data builtin --windows-per-domain 8 --window-length 64` computes
    monkeypatch.setenv("FASTMIX_CACHE", str(cache))
    from fastmix.data import builtin_store
    from fastmix.hidden_states import load_causal_lm
    from fastmix.weights import domain_weights

    cli = domain_weights(load_causal_lm(out / "model"), builtin_store(), windows_per_domain=8, window_length=64,
                         progress=False)
    assert cli["domains"] == saved["domains"]
    assert cli["weights"] == pytest.approx(saved["pretrain"]["weights"], rel=1e-5)


def test_hf_trainer_dga_under_torchrun_gives_every_rank_the_same_weights(cache, tmp_path):
    """DDP through the Trainer (2 gloo CPU processes): each rank draws its share, DGA's update
    (step 10) moves the weights the same on both ranks, and only rank 0 writes the files."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    stdout = run_example("hf_trainer_dga.py", cache, tmp_path, "--max-steps", "10", "--out", str(tmp_path / "run"),
                         "--logging-steps", "5", "--save-steps", "10", launcher=torchrun)
    finals = [line for line in stdout.splitlines() if line.startswith("final weights: ")]
    assert len(finals) == 2 and finals[0] == finals[1], finals
    saved = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert_weights(list(saved["weights"].values()), 10)
    assert max(saved["weights"].values()) > 0.11  # the update moved them
    assert stdout.count("wrote ") == 1
