"""The probe's per-layer rules, a registry keyed by layer type (like Opacus's grad samplers).

A rule gives, for one call of a layer, each row's ⟨∂L_row/∂θ, V⟩ over the layer's own
parameters θ (those registered directly on it):

    rule(layer, inputs, grad_output, target) -> per-row scores

- `inputs`: the tuple of tensors the layer was called with (detached);
- `grad_output`: the gradient of the loss with respect to the layer's output;
- `target`: {parameter name: V} for the layer's parameters in the target (a parameter left
  out is absent), in the dtype the scores are computed in (float32 or float64);
- the result has the shape of the rows: the output's dims that are not features, e.g.
  (batch, tokens) for a linear layer on (batch, tokens, features).

Sums over the rows are never needed from a rule: the probe adds the rows of all layers and
splits them by domain once per record.

Rules here: nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, and, matched by the module and
name of their class so that fastmix never imports transformers (NAMED_RULES), transformers'
Conv1D (GPT-2's layers), its RMSNorm classes (Llama, Mistral, Mixtral, Qwen2/3, Gemma 1-3,
OLMo-2, Phi-3; jvp_rule, which runs the layer itself in forward mode) and Gemma's scaled
embeddings. A layer no rule covers is left out of the scores and reported in probe.coverage.
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
    """The rule registered for the module's type or its nearest base class, or None. A class
    without a registered rule may have one by name (NAMED_RULES). A base class's rule is not
    for a subclass that overrides forward: it computes something else (Gemma's embedding
    scales nn.Embedding's output), which the rule knows nothing of."""
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
    per_row = torch.linalg.vecdot(g, target["weight"][idx])
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
