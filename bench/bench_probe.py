"""The AlignmentProbe inside a GPT training step vs the plain step (the named baseline)
and vs the naive method (a backward per domain, flattened gradients, as DoGE does).

CPU: 4 layers x 256 wide, 2048 tokens a batch (16 sequences of 128, one domain each),
k = 16. GPU: 12 layers x 768 wide, 16 x 1024 tokens, bf16 autocast."""
import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_GPU, synchronize
from fastmix import AlignmentProbe
from fastmix.model import GPT, GPTConfig

K = 16
SETUPS = [("cpu", dict(n_layer=4, n_head=4, n_embd=256), 16, 128)]
if HAS_GPU:
    SETUPS.append(("cuda", dict(n_layer=12, n_head=12, n_embd=768), 16, 1024))


def setup(device, shape, batch, tokens):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=tokens, vocab_size=257, **shape)).to(device)
    x = torch.randint(0, 257, (batch, tokens), device=device)
    ids = torch.arange(batch, device=device) % K
    return model, x, torch.roll(x, -1, 1), ids


def autocast(device):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def naive_scores(model, x, y, ids, target):
    """One forward, then a backward per domain with flattened gradients."""
    with autocast(x.device.type):
        logits, _ = model(x)
    per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    params = [p for p in model.parameters()]
    scores = torch.zeros(K, device=x.device)
    for i in range(K):
        loss = (per_token * (ids == i)[:, None]).sum() / y.numel()
        grads = torch.autograd.grad(loss, params, retain_graph=i < K - 1)
        scores[i] = torch.cat([g.flatten() for g in grads]) @ target
    return scores


@pytest.mark.parametrize("device,shape,batch,tokens", SETUPS, ids=[s[0] for s in SETUPS])
@pytest.mark.parametrize("method", ["plain", "probe", "naive"])
def test_probe_overhead(benchmark, device, shape, batch, tokens, method):
    benchmark.group = f"probe {device} {shape['n_layer']}x{shape['n_embd']} {batch}x{tokens} tokens k={K}"
    model, x, y, ids = setup(device, shape, batch, tokens)
    probe = AlignmentProbe(model, K)
    with autocast(device):
        model(x, y)[1].backward()
    probe.set_target()
    target = torch.cat([p.grad.flatten() for p in model.parameters()])

    def step():
        model.zero_grad(set_to_none=True)
        if method == "naive":
            naive_scores(model, x, y, ids, target)
        elif method == "probe":
            probe.reset()
            with probe.record(ids), autocast(device):
                model(x, y)[1].backward()
            probe.result()
        else:
            with autocast(device):
                model(x, y)[1].backward()
        synchronize(device)

    if method == "plain":
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(step, rounds=3 if method == "naive" else 5, iterations=1, warmup_rounds=1)
