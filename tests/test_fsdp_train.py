"""`fastmix train --fsdp`: DGA under FSDP2 (fully_shard) on 2 gloo CPU processes. The run
follows the same DDP run, resumes exactly, and its checkpoint holds whole tensors."""
import json
import re
import subprocess
import sys
import os

import pytest
import torch
import torch.distributed as dist

from conftest import run_distributed
from fastmix.cli import main
from fastmix.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TINY = dict(batch_size=4, block_size=16, n_layer=2, n_head=2, n_embd=16, warmup_steps=1, eval_batches=1,
            eval_interval=2, log_interval=1, quiet=True, plot=False, device="cpu", mixer="dga",
            mixer_options={"interval": 2}, lr_decay_steps=6, grad_accum=2)


def _worker(rank, world, store_dir, runs):
    for out, fsdp, steps, resume in runs:
        train(TrainConfig(data=store_dir, out=out, fsdp=fsdp, max_steps=steps, resume=resume, **TINY))


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]


def test_dga_under_fsdp_follows_ddp_and_resumes_exactly(store_dir, tmp_path):
    fsdp, ddp, resumed = (str(tmp_path / name) for name in ("fsdp", "ddp", "resumed"))
    run_distributed(_worker, tmp_path, store_dir, [(fsdp, True, 6, False), (ddp, False, 6, False),
                                                   (resumed, True, 4, False), (resumed, True, 6, True)])
    sharded, replicated = _records(fsdp), _records(ddp)
    assert [r["step"] for r in sharded] == list(range(7))
    for a, b in zip(sharded, replicated):  # the same run up to the order of float sums
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, nan_ok=True) or a["train_loss"] is None
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-4)
        assert a["eval"] == pytest.approx(b["eval"], rel=1e-4)
    assert sharded[-1]["weights"] != sharded[0]["weights"]  # DGA moved them
    assert _records(resumed) == sharded
    state = torch.load(os.path.join(fsdp, "ckpt.pt"), weights_only=False)
    plain = torch.load(os.path.join(ddp, "ckpt.pt"), weights_only=False)
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in plain["model"].items()}
    assert all(type(v) is torch.Tensor for v in state["model"].values())


def test_fsdp_without_torchrun_is_one_line(store_dir, tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["train", "--data", store_dir, "--out", str(tmp_path / "run"), "--fsdp", "--max-steps", "1",
              "--device", "cpu", "--quiet"])
    assert str(error.value.code) == ("fastmix train: error: --fsdp shards the model over the processes of a torchrun: "
                                     "run it with torchrun --nproc_per_node N -m fastmix train ... (N >= 2)")
    assert not (tmp_path / "run").exists()


def test_torchrun_fsdp_reports_the_targets_memory_per_rank_beside_the_models(store_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastmix",
           "train", "--fsdp", "--data", store_dir, "--out", str(tmp_path / "run"), "--batch-size", "4",
           "--block-size", "16", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--max-steps", "2",
           "--eval-batches", "1", "--device", "cpu", "--no-plot", "--mixer", "dga", "--mixer-option", "interval=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("dga target per rank: "))
    held, gathered, model, model_here = (float(x) for x in re.findall(r"([\d.]+) MiB", line))
    assert model_here == pytest.approx(model / 2, rel=0.1)  # each rank holds half the model ...
    assert held == pytest.approx(model_here, rel=0.1)  # ... and half the target, like the parameters
    assert 0 < gathered < model / 2  # one layer at a time, never the whole
