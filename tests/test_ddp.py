"""DDP on 2 CPU processes (gloo): through torchrun as users run it, and with torch.multiprocessing
to check that the ranks drew disjoint rows and ended with identical models."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import run_distributed
from fastmix.data import MixtureSampler
from fastmix.data.store import DomainStore
from fastmix.train import TrainConfig, train

TINY = dict(batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16, warmup_steps=1, eval_batches=1,
            eval_interval=2, log_interval=1, max_steps=4, quiet=True, plot=False, device="cpu")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _worker(rank, world, store_dir, out):
    # the sampler the loop builds draws exactly these rows first (draws are pure functions of the seed)
    sampler = MixtureSampler(DomainStore(store_dir), None, TINY["batch_size"], TINY["block_size"], seed=0,
                             prefetch=False)
    first_x = sampler.next_batch()[0]
    result = train(TrainConfig(data=store_dir, out=out, **TINY))
    torch.save({"first_x": first_x, "model": result.model.state_dict(),
                "losses": [r["train_loss"] for r in result.metrics]}, os.path.join(out, f"rank{rank}.pt"))


def test_ranks_draw_disjoint_rows_and_stay_identical(store_dir, tmp_path):
    run_distributed(_worker, tmp_path, store_dir, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    rows0, rows1 = ({tuple(row.tolist()) for row in r["first_x"]} for r in (r0, r1))
    assert not rows0 & rows1
    for name, p in r0["model"].items():
        assert torch.equal(p, r1["model"][name]), name
    assert r0["losses"] == r1["losses"]  # the logged loss is averaged over ranks
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and records[-1]["eval"]


def test_torchrun(store_dir, tmp_path):
    # --standalone: torchrun picks its own free port for the rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastmix", "train", "--data", store_dir, "--out", str(tmp_path / "run"),
           "--batch-size", "4", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
           "--max-steps", "3", "--eval-batches", "1", "--device", "cpu", "--quiet", "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 3
