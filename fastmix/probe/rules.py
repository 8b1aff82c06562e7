"""The probe's per-layer rules: a registry keyed by layer type (like Opacus's grad samplers),
and the general rule that scores any other module holding parameters.

Every module that holds trainable parameters directly (registered on it, not on a child) is
scored, in one of two ways:

1. **A rule for its type** (RULES, NAMED_RULES), which gives, for one call of the layer, each
   row's ⟨∂L_row/∂θ, V⟩ over the layer's own parameters θ:

       rule(layer, inputs, grad_output, target) -> per-row scores

   - `inputs`: the tuple of tensors the layer was called with (detached);
   - `grad_output`: the gradient of the loss with respect to the layer's output;
   - `target`: {parameter name: V} for the layer's parameters in the target (a parameter left
     out is absent), in the dtype the scores are computed in (float32 or float64);
   - the result has the shape of the rows: the output's dims that are not features, e.g.
     (batch, tokens) for a linear layer on (batch, tokens, features).

   Sums over the rows are never needed from a rule: the probe adds the rows of all layers and
   splits them by domain once per record. This is the fast path: one extra GEMM-sized product
   for a linear layer, an element-wise product for a norm.

2. **The general rule** (vjp_domain_scores) for a module no rule matches, including a subclass
   that overrides its base's forward: the probe runs the module again on the inputs it saved
   and takes, for each domain i present in the batch, the vector-Jacobian product of the output
   gradient restricted to domain i's rows with respect to the module's parameters, and its dot
   with V. It gives per-domain sums directly, not per-row scores (a row's score would need one
   VJP per row), and costs one backward of the module per domain present. It needs nothing of
   the module but that its rows do not interact, that each output it returns is one row per
   batch row (batch first; RNNs as their batch_first says, their hidden states with the batch
   in dim 1), and that autograd can differentiate it, which training already needs. It scores
   the module's own parameters and those of its children whose hooks did not run in the call
   (nn.MultiheadAttention applies out_proj's weight functionally), and reruns the module with
   the RNG state and autocast state of the call, so dropout and mixed precision are repeated.

Modules that mix the rows of a batch (ROW_MIXING: batch norms; an nn.Embedding that scales its
gradient by the tokens' frequency in the batch) cannot be split by domain: they are left out,
with a warning naming them and the fraction of parameters covered (strict=True raises).

A rule of your own makes a layer type take the fast path:

    import fastmix

    class Scale(nn.Module):                       # y = x ⊙ w
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return x * self.weight

    @fastmix.register_probe_rule(Scale)
    def scale_rule(layer, inputs, grad_output, target):
        return (grad_output * inputs[0] * target["weight"]).sum(-1)   # ⟨g_n, x_n ⊙ V⟩ per row

Rules here: nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, and, matched by the module and
name of their class so that fastmix never imports transformers (NAMED_RULES), transformers'
Conv1D (GPT-2's layers), its RMSNorm classes (Llama, Mistral, Mixtral, Qwen2/3, Gemma 1-3,
OLMo-2, Phi-3; jvp_rule, which runs the layer itself in forward mode) and Gemma's scaled
embeddings.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastmix import ops


@dataclass(frozen=True)
class ProbeRule:
    score: callable  # (layer, inputs, grad_output, target) -> per-row scores
    autocast_inputs: bool = False  # the layer multiplies its inputs in autocast's dtype (a matmul)


RULES = {}  # layer type -> ProbeRule


def register_probe_rule(layer_type, rule=None, *, autocast_inputs=False):
    """Makes the probe score layers of `layer_type` (and its subclasses without a rule of
    their own that keep its forward) with `rule(layer, inputs, grad_output, target)`; see this
    module's docstring. `jvp_rule` serves any layer whose rows do not interact.
    `autocast_inputs=True`: under autocast the layer multiplies its inputs cast to autocast's
    dtype, so the rule receives them cast. Usable as a decorator:

        @fastmix.register_probe_rule(Scale)
        def scale_rule(layer, inputs, grad_output, target):
            return (grad_output * inputs[0] * target["weight"]).sum(-1)
    """
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        raise TypeError(f"register_probe_rule: layer_type must be an nn.Module subclass, got {layer_type!r}")

    def register(fn):
        if not callable(fn):
            raise TypeError(f"register_probe_rule: rule must be callable, got {fn!r}")
        RULES[layer_type] = ProbeRule(fn, autocast_inputs)
        return fn

    return register if rule is None else register(rule)


def rule_for(module):
    """The rule registered for the module's type or its nearest base class, or None (the probe
    then uses the general rule, vjp_domain_scores). A class without a registered rule may have
    one by name (NAMED_RULES). A base class's rule is not for a subclass that overrides forward:
    it computes something else (Gemma's embedding scales nn.Embedding's output), which the rule
    knows nothing of."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


def _rows(x, feature_dims):
    return x.reshape(-1, math.prod(x.shape[x.dim() - feature_dims:]))


def _affine_rows(x, g, target, weight_term):
    """Per-row scores of y = x·W + b (in either layout of W): weight_term(x_rows, g_rows, V_W)
    plus g·V_b."""
    x2, g2 = _rows(x, 1).to(g.dtype), _rows(g, 1)
    per_row = g2.new_zeros(g2.shape[0])
    if "weight" in target:
        per_row = per_row + weight_term(x2, g2, target["weight"])
    if "bias" in target:
        per_row = per_row + g2 @ target["bias"]
    return per_row.reshape(g.shape[:-1])


def linear_rule(layer, inputs, grad_output, target):
    """y = x Wᵀ + b: gᵀ V_W x + g·V_b per row (fastmix.ops.rowwise_bilinear, the product V_W x
    never written)."""
    return _affine_rows(inputs[0], grad_output, target, lambda x, g, v: ops.rowwise_bilinear(g, v, x))


def conv1d_rule(layer, inputs, grad_output, target):
    """transformers' Conv1D, y = x W + b with W of shape (in, out), Linear's transpose:
    xᵀ V_W g + g·V_b per row (x and g swap places, so V_W is used as it is stored)."""
    return _affine_rows(inputs[0], grad_output, target, lambda x, g, v: ops.rowwise_bilinear(x, v, g))


def embedding_rule(layer, inputs, grad_output, target):
    """Row n looks up table row idx_n: g_n · V[idx_n] (the padding row gets no gradient)."""
    idx, g = inputs[0], grad_output
    if "weight" not in target:
        return g.new_zeros(g.shape[:-1])
    per_row = torch.linalg.vecdot(g, F.embedding(idx, target["weight"]))  # 3x faster than V[idx] on the CPU
    if layer.padding_idx is not None:
        per_row = torch.where(idx == layer.padding_idx, 0, per_row)
    return per_row


def scaled_embedding_rule(layer, inputs, grad_output, target):
    """Gemma's embedding, nn.Embedding's output times embed_scale (a buffer, cast to the
    weight's dtype as its forward does)."""
    scale = layer.embed_scale.to(layer.weight.dtype).to(grad_output.dtype)
    return scale * embedding_rule(layer, inputs, grad_output, target)


def _feature_dots(g, v, feature_dims):
    """⟨g, v⟩ over the last `feature_dims` dims: one score per row."""
    return torch.linalg.vecdot(_rows(g, feature_dims), _rows(v, feature_dims)).reshape(g.shape[:g.dim() - feature_dims])


def layer_norm_rule(layer, inputs, grad_output, target):
    """⟨g, x̂ ⊙ V_w + V_b⟩ per row: layer_norm with the target as its affine part makes
    x̂ ⊙ V_w + V_b in one op (zero for a parameter that is absent)."""
    x, g = inputs[0], grad_output
    shape = layer.normalized_shape
    v_w = target.get("weight", g.new_zeros(shape))
    v = F.layer_norm(x.to(g.dtype), shape, v_w, target.get("bias"), layer.eps)
    return _feature_dots(g, v, len(shape))


def rms_norm_rule(layer, inputs, grad_output, target):
    """⟨g, x̂ ⊙ V_w⟩ per row: rms_norm with the target as its weight makes x̂ ⊙ V_w in one op."""
    x, g = inputs[0], grad_output
    shape = layer.normalized_shape
    eps = torch.finfo(x.dtype).eps if layer.eps is None else layer.eps  # the default follows the input's dtype
    v = F.rms_norm(x.to(g.dtype), shape, target["weight"], eps)
    return _feature_dots(g, v, len(shape))


def jvp_rule(layer, inputs, grad_output, target):
    """⟨g, J V⟩ per row, J V (the output's derivative in the layer's parameters along V) from
    one forward-mode pass of the layer itself (torch.func.jvp). Exact for any layer called with
    its tensors as positional arguments whose output rows (features: the last dim) depend on
    their own input row only, whatever it computes on the way: Hugging Face's RMSNorms
    normalise in float32 and cast back, Gemma's scales by (1 + w), and the pass does just that.
    The parameters run in the target's dtype, as precise as the scores."""
    names = list(target)
    primals = tuple(getattr(layer, name).detach().to(target[name].dtype) for name in names)

    def layer_of(*params):
        return torch.func.functional_call(layer, dict(zip(names, params)), inputs)

    _, along_target = torch.func.jvp(layer_of, primals, tuple(target.values()))
    return _feature_dots(grad_output, along_target.to(grad_output.dtype), 1)


ROW_MIXING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # and their subclasses


def mixes_rows(module):
    """Whether a module's parameter gradient mixes the rows of the batch, so that it cannot be
    split by domain: a batch norm (statistics over the batch), an nn.Embedding scaling its
    gradient by the tokens' frequency in the batch."""
    return isinstance(module, ROW_MIXING) or (isinstance(module, nn.Embedding) and module.scale_grad_by_freq)


def output_batch_dims(module, outputs):
    """The dim of each of a module's output tensors (`outputs`, its output's tensors in pytree
    order) that holds the batch: 0, but for an RNN (nn.RNN, nn.LSTM, nn.GRU) the output's as
    batch_first says and 1 for the hidden states (h_n, c_n)."""
    if isinstance(module, nn.RNNBase):
        return [0 if module.batch_first else 1] + [1] * (len(outputs) - 1)
    return [0] * len(outputs)


def vjp_domain_scores(output_of, primals, grad_output, row_domains, num_domains, target):
    """The general rule: each domain's ⟨Σ_{rows n of domain i} J_nᵀ g_n, V⟩, J_n the Jacobian of
    output row n in the parameters, from one VJP per domain present (torch.autograd.grad of the
    output again, the gradient restricted to the domain's rows). Exact for any module whose
    rows do not interact.

    - `output_of(params)`: the output the gradient is of, computed again with `params`
      ({dotted name: tensor}) in place of the module's (torch.func.functional_call);
    - `primals`: {dotted name: the parameter's value}, the parameters to score;
    - `grad_output`: the gradient of the loss with respect to that output;
    - `row_domains`: the domain id of each row, broadcastable to `grad_output` (-1: no domain);
    - `target`: {dotted name: V} in the dtype the scores are computed in.

    Returns (num_domains,) sums in the target's dtype."""
    leaves = {name: value.detach().requires_grad_() for name, value in primals.items()}
    work = next(iter(target.values())).dtype
    scores = torch.zeros(num_domains, dtype=work, device=grad_output.device)
    with torch.enable_grad():
        out = output_of(leaves)
    if not out.requires_grad:  # the call used none of the parameters scored
        return scores
    g = grad_output.to(out.dtype)
    names = list(leaves)
    for domain in row_domains.unique().tolist():
        if domain < 0:
            continue
        cotangent = torch.where(row_domains == domain, g, 0)
        grads = torch.autograd.grad(out, [leaves[n] for n in names], cotangent, retain_graph=True, allow_unused=True)
        scores[domain] = sum(torch.linalg.vecdot(grad.reshape(-1).to(work), target[n].reshape(-1))
                             for n, grad in zip(names, grads) if grad is not None)
    return scores


register_probe_rule(nn.Linear, linear_rule, autocast_inputs=True)
register_probe_rule(nn.Embedding, embedding_rule)
register_probe_rule(nn.LayerNorm, layer_norm_rule)
register_probe_rule(nn.RMSNorm, rms_norm_rule)

# Rules for classes of libraries fastmix does not import, keyed by "module.QualifiedName":
# rule_for looks a class up here when no rule is registered for it, so the library is never
# imported for it (register_probe_rule on the class itself takes precedence).
_HF_RMS_NORMS = [("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("mixtral", "MixtralRMSNorm"),
                 ("qwen2", "Qwen2RMSNorm"), ("qwen3", "Qwen3RMSNorm"), ("gemma", "GemmaRMSNorm"),
                 ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm"), ("olmo2", "Olmo2RMSNorm"),
                 ("phi3", "Phi3RMSNorm")]
_HF_SCALED_EMBEDDINGS = [("gemma", "GemmaTextScaledWordEmbedding"), ("gemma2", "Gemma2TextScaledWordEmbedding"),
                         ("gemma3", "Gemma3TextScaledWordEmbedding")]
NAMED_RULES = {
    "transformers.pytorch_utils.Conv1D": ProbeRule(conv1d_rule, autocast_inputs=True),
    **{f"transformers.models.{model}.modeling_{model}.{name}": ProbeRule(jvp_rule) for model, name in _HF_RMS_NORMS},
    **{f"transformers.models.{model}.modeling_{model}.{name}": ProbeRule(scaled_embedding_rule)
       for model, name in _HF_SCALED_EMBEDDINGS},
}
