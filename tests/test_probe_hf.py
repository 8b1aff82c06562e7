"""AlignmentProbe on Hugging Face causal LMs (built from tiny configs, nothing downloaded) and on
a torch model with nn.RMSNorm: every parameter covered, and the scores equal to the naive
method (one backward per domain, flattened gradients)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmix import AlignmentProbe

transformers = pytest.importorskip("transformers")

VOCAB, K = 50, 3
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             max_position_embeddings=32)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def llama():  # grouped-query attention, untied head
    config = transformers.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def mistral():
    config = transformers.MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    return transformers.MistralForCausalLM(config)


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_attention_heads=4,
                                                                  num_key_value_heads=2))


def qwen3():  # RMSNorms on each head's queries and keys too: rows of shape (batch, tokens, heads)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, num_attention_heads=4,
                                                                  num_key_value_heads=2, head_dim=4))


def olmo2():  # (w ⊙ x̂) cast after the product, and RMSNorms on the whole query and key projections
    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SMALL, num_attention_heads=4,
                                                                  num_key_value_heads=2))


def gemma():  # x̂ ⊙ (1 + w), all in float32, and a tied head
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(**SMALL, num_attention_heads=4,
                                                                  num_key_value_heads=2, head_dim=4))


def gpt_neox():
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32,
                                        use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0)
    return transformers.GPTNeoXForCausalLM(config)


class RMSNormLM(nn.Module):
    """A torch model with nn.RMSNorm: the default eps (its input dtype's) and a 2-D normalised shape."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, 16)
        self.norm = nn.RMSNorm(16)
        self.fc = nn.Linear(16, 16)
        self.norm_2d = nn.RMSNorm((4, 4), eps=1e-5)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels, num_items_in_batch=None):
        h = torch.tanh(self.fc(self.norm(self.wte(input_ids))))
        h = self.norm_2d(h.unflatten(-1, (4, 4))).flatten(-2)
        logits = self.head(h)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
        count = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
        return transformers.modeling_outputs.CausalLMOutput(loss=loss / count)


MODELS = dict(gpt2=gpt2, llama=llama, mistral=mistral, qwen2=qwen2, qwen3=qwen3, olmo2=olmo2, gemma=gemma,
              gpt_neox=gpt_neox, torch_rms_norm=RMSNormLM)


def tiny_model(name, dtype):
    model = MODELS[name]().to(dtype)
    with torch.no_grad():  # norm weights and biases away from their (1, 0) or 0 init, so a wrong x̂ scaling shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def flat_grads(params):
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def naive_scores(model, x, ids, target, params):
    """⟨∇L_i, V⟩ by a backward per domain: L_i is the model's own loss on the tokens of domain
    i's sequences (the others' labels ignored), over the whole batch's token count, so the
    L_i add up to the training loss."""
    tokens = x.shape[0] * (x.shape[1] - 1)  # each sequence predicts all its tokens but the first
    scores = torch.zeros(K, dtype=torch.float64)
    for i in range(K):
        model.zero_grad()
        labels = torch.where((ids == i)[:, None], x, -100)
        model(input_ids=x, labels=labels, num_items_in_batch=tokens).loss.backward()
        scores[i] = flat_grads(params) @ target
    return scores


def assert_close_scores(got, want, rtol):
    scale = want.abs().max()
    assert bool(((got - want).abs() <= rtol * scale).all()), f"{got.tolist()} vs {want.tolist()}"


# Gemma's RMSNorm multiplies by (1 + w) in float32 even in a float64 model, so even the naive
# per-domain gradients of its weights are float32 sums: fp64 agrees to float32's precision.
FP64_RTOL = dict(gemma=1e-6)


def _set_target(model, probe):
    """The probe's target from a random target batch: (the trainable parameters, their flat
    target gradient), with .grad cleared again."""
    x_t = torch.randint(0, VOCAB, (3, 8))
    model(input_ids=x_t, labels=x_t).loss.backward()
    probe.set_target()
    params = [p for p in model.parameters() if p.requires_grad]
    target = flat_grads(params)
    model.zero_grad()
    return params, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_probe_covers_and_matches_naive_on_hf_models(seed, name, dtype):
    """GPT-2 (Conv1D layers, a tied head, wpe called on positions of shape (1, T)), Llama with
    GQA and an untied head, Mistral, Qwen2/3, OLMo-2, Gemma, GPT-NeoX with the parallel
    residual, a torch model with nn.RMSNorm: all parameters covered, scores exact."""
    model = tiny_model(name, dtype)
    probe = AlignmentProbe(model, K, strict=True)  # strict: a parameter left out raises
    assert probe.coverage.fraction == 1.0
    params, target = _set_target(model, probe)
    x, ids = torch.randint(0, VOCAB, (6, 8)), torch.tensor([0, 2, 1, 0, 2, 0])
    with probe.record(ids):
        model(input_ids=x, labels=x).loss.backward()
    result = probe.result()
    assert probe.coverage.fraction == 1.0 and result.missing == []
    rtol = FP64_RTOL.get(name, 1e-8) if dtype == torch.float64 else 1e-4
    assert_close_scores(result.dots, naive_scores(model, x, ids, target, params), rtol)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_probe_on_hf_models_under_bf16_autocast_and_loss_scale(seed, name):
    """Conv1D multiplies its inputs in bf16 under autocast, the RMSNorms run again under it:
    scores match the naive method run the same way to bf16's precision (as in test_probe.py)."""
    model, scale = tiny_model(name, torch.float32), 1024.0
    probe = AlignmentProbe(model, K, strict=True)
    params, target = _set_target(model, probe)
    x, ids = torch.randint(0, VOCAB, (6, 8)), torch.tensor([0, 2, 1, 0, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with probe.record(ids, loss_scale=scale):
            (model(input_ids=x, labels=x).loss * scale).backward()
        want = naive_scores(model, x, ids, target, params)
    assert_close_scores(probe.result().dots, want, 1e-2)


def enable_checkpointing(model, use_reentrant):
    """transformers 5 renamed gradient_checkpointing_enable (kept, deprecated) activation_checkpointing_enable."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", [name for name in MODELS if name != "torch_rms_norm"])
def test_probe_under_hf_gradient_checkpointing_counts_each_layer_once(seed, name, use_reentrant):
    """gradient_checkpointing_enable(): each block runs again in the backward (checked by
    counting an MLP's calls), and the scores are those without checkpointing."""
    model = tiny_model(name, torch.float64).train()  # HF checkpoints only in training mode
    mlp = next(m for n, m in model.named_modules() if n.endswith(".mlp"))
    calls = []
    # a pre-hook: a non-reentrant recomputation stops once it has what the backward needs, inside the MLP
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    probe = AlignmentProbe(model, K, strict=True)
    x_t = torch.randint(0, VOCAB, (3, 8))
    model(input_ids=x_t, labels=x_t).loss.backward()
    probe.set_target()
    x, ids = torch.randint(0, VOCAB, (6, 8)), torch.tensor([0, 2, 1, 0, 2, 0])
    scores = []
    for checkpointed in (False, True):
        if checkpointed:
            enable_checkpointing(model, use_reentrant)
        calls.clear()
        probe.reset()
        with probe.record(ids):
            model(input_ids=x, labels=x).loss.backward()
        assert len(calls) == (2 if checkpointed else 1)
        scores.append(probe.result().dots)
    assert probe.result().missing == []
    assert_close_scores(scores[1], scores[0], 1e-8)


def scores_against_naive(model, ids, labels, domain_labels, **inputs):
    """The probe's scores for the model's loss on `labels` and the naive ones, from the loss on
    `domain_labels(i)` (the labels of domain i's tokens, the others -100) for each domain, all with
    the batch's count of labels as the normaliser, so that the domain losses add up to the loss."""
    probe = AlignmentProbe(model, K, strict=True)
    x_t = torch.randint(0, VOCAB, (3, 8))
    model(input_ids=x_t, labels=x_t).loss.backward()
    probe.set_target()
    params = [p for p in model.parameters() if p.requires_grad]
    target = flat_grads(params)
    count = (labels[:, 1:] != -100).sum()  # each label is predicted from the token before it
    model.zero_grad()
    with probe.record(ids):
        model(labels=labels, num_items_in_batch=count, **inputs).loss.backward()
    assert probe.result().missing == []
    want = torch.zeros(K, dtype=torch.float64)
    for i in range(K):
        model.zero_grad()
        model(labels=domain_labels(i), num_items_in_batch=count, **inputs).loss.backward()
        want[i] = flat_grads(params) @ target
    return probe.result().dots, want


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sequence-ids", "per-token-ids"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_probe_on_llama_with_padding_and_ignored_labels(seed, padding_side, per_token):
    """Sequences of different lengths padded left or right, with an attention mask, labels -100 on
    the pads and on some real tokens too; per-token ids mark the pads -1. A label is predicted from
    the row before it, so a left-padded sequence's first token, which only a pad precedes, has none."""
    model = tiny_model("llama", torch.float64)
    batch, tokens = 6, 8
    lengths = torch.randint(3, tokens + 1, (batch,))
    positions = torch.arange(tokens)
    real = positions < lengths[:, None] if padding_side == "right" else positions >= tokens - lengths[:, None]
    x = torch.where(real, torch.randint(1, VOCAB, (batch, tokens)), 0)
    first = real & ~torch.roll(real, 1, 1)
    labels = torch.where(real & ~first & (torch.rand(batch, tokens) > 0.2), x, -100)
    sequence_ids = torch.tensor([0, 2, 1, 0, 2, 0])
    ids = torch.where(real, sequence_ids[:, None], -1) if per_token else sequence_ids
    got, want = scores_against_naive(
        model, ids, labels, lambda i: torch.where((sequence_ids == i)[:, None], labels, -100),
        input_ids=x, attention_mask=real.long())
    assert_close_scores(got, want, 1e-8)


def test_probe_on_llama_with_packed_sequences_and_per_token_domains(seed):
    """Documents of different domains packed in each row, told apart by their position ids (which
    restart at 0), so that none attends to another; ids per token give each token its document's
    domain, and a document's first token is not predicted from the one before."""
    model = tiny_model("llama", torch.float64)
    batch, tokens = 3, 12
    starts = [sorted({0, *torch.randperm(tokens - 2)[:2].add(2).tolist()}) for _ in range(batch)]
    document = torch.stack([torch.bucketize(torch.arange(tokens), torch.tensor(row[1:]), right=True)
                            for row in starts])  # which document of its row each token is in
    first = torch.stack([torch.tensor([t in row for t in range(tokens)]) for row in starts])
    position_ids = torch.stack([torch.arange(tokens) - torch.tensor(row)[d] for row, d in zip(starts, document)])
    ids = torch.randint(0, K, (batch, 3)).gather(1, document)
    x = torch.randint(0, VOCAB, (batch, tokens))
    labels = torch.where(first, -100, x)
    inputs = dict(input_ids=x, position_ids=position_ids, use_cache=False)
    # the documents do not see each other: a row's last document alone gives the same logits
    last = starts[0][-1]
    alone = model(input_ids=x[:1, last:], use_cache=False).logits
    torch.testing.assert_close(model(**inputs).logits[:1, last:], alone, rtol=1e-10, atol=1e-10)
    got, want = scores_against_naive(model, ids, labels, lambda i: torch.where(ids == i, labels, -100), **inputs)
    assert_close_scores(got, want, 1e-8)


def test_gpt2_position_embedding_is_split_by_row_without_changing_the_model(seed):
    """wpe runs on positions of shape (1, T): while recording it hands the model its output
    expanded to the batch, and the model computes exactly what it does without the probe."""
    model = tiny_model("gpt2", torch.float64)
    x = torch.randint(0, VOCAB, (4, 8))
    want = model(input_ids=x).logits
    probe = AlignmentProbe(model, 2, strict=True)
    model(input_ids=x, labels=x).loss.backward()
    probe.set_target()
    with probe.record(torch.tensor([0, 1, 1, 0])):
        got = model(input_ids=x).logits
        got.sum().backward()
    assert torch.equal(got, want)
    assert "transformer.wpe.weight" in probe.coverage.covered and probe.result().missing == []


def test_a_registered_rule_takes_precedence_over_a_named_one():
    from transformers.pytorch_utils import Conv1D

    from fastmix import register_probe_rule
    from fastmix.probe.rules import NAMED_RULES, RULES, rule_for

    layer = Conv1D(3, 4)
    assert rule_for(layer) is NAMED_RULES["transformers.pytorch_utils.Conv1D"]
    register_probe_rule(Conv1D, lambda layer, inputs, grad_output, target: grad_output.sum(-1))
    try:
        assert rule_for(layer) is RULES[Conv1D]
    finally:
        del RULES[Conv1D]


def test_fastmix_and_a_probe_do_not_import_transformers():
    """The rules for transformers' layers are matched by class name: neither importing fastmix
    nor making a probe imports transformers."""
    code = ("import sys; import fastmix; from torch import nn; "
            "fastmix.AlignmentProbe(nn.Sequential(nn.Embedding(5, 4), nn.RMSNorm(4), nn.Linear(4, 2)), 2); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)
