"""AlignmentProbe under torch.distributed (2 gloo CPU processes): result() averages the
ranks' scores, as DDP averages their gradients, so every rank sees the same numbers."""
import os

import pytest
import torch
import torch.distributed as dist

from conftest import run_distributed
from fastmix import AlignmentProbe
from fastmix.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
K = 3


def _model_and_batches():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=19, n_layer=1, n_head=2, n_embd=8)).double()
    target = torch.randint(0, 19, (2, 8))
    batches = [torch.randint(0, 19, (4, 8)) for _ in range(2)]  # one per rank
    ids = [torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 0])]
    return model, target, batches, ids


def _scores(model, probe, x, ids):
    model.zero_grad()
    with probe.record(ids):
        model(x, torch.roll(x, -1, 1))[1].backward()


def _worker(rank, world, out):
    model, target, batches, ids = _model_and_batches()
    probe = AlignmentProbe(model, K)
    model(target, torch.roll(target, -1, 1))[1].backward()
    probe.set_target()
    _scores(model, probe, batches[rank], ids[rank])
    result = probe.result()
    torch.save({"dots": result.dots, "counts": result.counts}, os.path.join(out, f"rank{rank}.pt"))


def test_result_is_averaged_over_ranks(tmp_path):
    run_distributed(_worker, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model, target, batches, ids = _model_and_batches()  # the same, in one process
    probe = AlignmentProbe(model, K)
    model(target, torch.roll(target, -1, 1))[1].backward()
    probe.set_target()
    for x, domain_ids in zip(batches, ids):
        _scores(model, probe, x, domain_ids)
    want = probe.result(all_reduce=False)
    for rank in ranks:
        torch.testing.assert_close(rank["dots"], want.dots / 2, rtol=1e-10, atol=1e-12)
        assert rank["counts"].tolist() == want.counts.tolist() == [3, 2, 3]
