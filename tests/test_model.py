import math

import pytest
import torch

from fastmix.model import GPT, GPTConfig, lm_loss

CFG = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(CFG)
    x, y = torch.randint(0, 50, (2, 3, 16))
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.2  # near-uniform predictions at init
    assert model(x)[1] is None
    torch.testing.assert_close(lm_loss(model, x, y), loss)


def test_tied_head_biases_and_scaled_init():
    model = GPT(CFG)
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.h[0].mlp.c_fc.bias is not None
    assert GPT(GPTConfig(**{**CFG.__dict__, "bias": False})).transformer.h[0].mlp.c_fc.bias is None
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    proj, fc = model.transformer.h[0].mlp.c_proj.weight, model.transformer.h[0].mlp.c_fc.weight
    assert proj.std() < 0.75 * fc.std()


def test_hooks_see_hidden_states_and_batched_positions():
    model = GPT(CFG)
    seen = {}
    model.transformer.h[1].register_forward_hook(lambda m, i, o: seen.update(hidden=o))
    model.transformer.wpe.register_forward_hook(lambda m, i, o: seen.update(pos=i[0]))
    model(torch.randint(0, 50, (3, 10)))
    assert seen["hidden"].shape == (3, 10, 32)
    assert seen["pos"].shape == (3, 10)  # positions carry the batch dimension


def test_causal_and_backward():
    model = GPT(CFG)
    x = torch.randint(0, 50, (2, 16))
    logits = model(x)[0]
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 50
    torch.testing.assert_close(model(x2)[0][:, :8], logits[:, :8])  # the future does not leak back
    model(x, x)[1].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_too_long_input():
    with pytest.raises(ValueError, match="block_size"):
        GPT(CFG)(torch.zeros(1, 17, dtype=torch.long))
