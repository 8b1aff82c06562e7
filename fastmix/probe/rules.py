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
    their own) with `rule(layer, inputs, grad_output, target)`; see this module's docstring.
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


# Rules for layer types of optional libraries, keyed by "module.QualName", so that finding them
# imports nothing (transformers' GPT-2 is built from its Conv1D, not nn.Linear).
RULES_BY_NAME = {}  # "module.QualName" -> ProbeRule


def rule_for(module):
    """The rule registered for the module's type or its nearest base class, or None."""
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
        named = RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return None


def _rows(x, feature_dims):
    return x.reshape(-1, math.prod(x.shape[x.dim() - feature_dims:]))


def linear_rule(layer, inputs, grad_output, target):
    """y = x Wᵀ + b: gᵀ V_W x + g·V_b per row (fastmix.ops.rowwise_bilinear, the product V_W x
    never written)."""
    x, g = inputs[0], grad_output
    x2, g2 = _rows(x, 1).to(g.dtype), _rows(g, 1)
    per_row = g2.new_zeros(g2.shape[0])
    if "weight" in target:
        per_row = per_row + ops.rowwise_bilinear(g2, target["weight"], x2)
    if "bias" in target:
        per_row = per_row + g2 @ target["bias"]
    return per_row.reshape(g.shape[:-1])


def conv1d_rule(layer, inputs, grad_output, target):
    """transformers' Conv1D, y = x W + b with W (in, out): xᵀ V_W g + g·V_b per row (the
    linear rule with the weight's roles swapped, so V_W is used as it is stored)."""
    x, g = inputs[0], grad_output
    x2, g2 = _rows(x, 1).to(g.dtype), _rows(g, 1)
    per_row = g2.new_zeros(g2.shape[0])
    if "weight" in target:
        per_row = per_row + ops.rowwise_bilinear(x2, target["weight"], g2)
    if "bias" in target:
        per_row = per_row + g2 @ target["bias"]
    return per_row.reshape(g.shape[:-1])


def embedding_rule(layer, inputs, grad_output, target):
    """Row n looks up table row idx_n: g_n · V[idx_n] (the padding row gets no gradient)."""
    idx, g = inputs[0], grad_output
    if "weight" not in target:
        return g.new_zeros(g.shape[:-1])
    per_row = torch.linalg.vecdot(g, target["weight"][idx])
    if layer.padding_idx is not None:
        per_row = torch.where(idx == layer.padding_idx, 0, per_row)
    return per_row


def layer_norm_rule(layer, inputs, grad_output, target):
    """⟨g, x̂ ⊙ V_w + V_b⟩ per row: layer_norm with the target as its affine part makes
    x̂ ⊙ V_w + V_b in one op (zero for a parameter that is absent)."""
    x, g = inputs[0], grad_output
    shape = layer.normalized_shape
    v_w = target.get("weight", g.new_zeros(shape))
    v = F.layer_norm(x.to(g.dtype), shape, v_w, target.get("bias"), layer.eps)
    return torch.linalg.vecdot(_rows(g, len(shape)), _rows(v, len(shape))).reshape(g.shape[:g.dim() - len(shape)])


register_probe_rule(nn.Linear, linear_rule, autocast_inputs=True)
register_probe_rule(nn.Embedding, embedding_rule)
register_probe_rule(nn.LayerNorm, layer_norm_rule)
RULES_BY_NAME["transformers.pytorch_utils.Conv1D"] = ProbeRule(conv1d_rule, autocast_inputs=True)
