"""Chameleon domain weights from ridge leverage scores of domain embeddings.

E the k x d matrix of domain embeddings, K = E Eᵀ, K_c = H K H with H = I − 11ᵀ/k,
S_i = [K_c (K_c + λ·k·I)⁻¹]_ii, S ← S / ΣS. Pretraining and transfer to new domains:
α = softmax((1/S) / T), T = 5 by default; finetuning: α = softmax(S / T), T = 0.2.
New domains need only their embeddings (no proxy retraining); fastmix.hidden_states makes them.
"""
import math
import numbers

import torch

from fastmix.ops.linalg import ridge_leverage_scores

DEFAULT_TEMPERATURE = {"pretrain": 5.0, "finetune": 0.2}


def chameleon_weights(embeddings, lam=10.0, mode="pretrain", temperature=None, *,
                      return_scores=False):
    """Domain weights (k,) from domain embeddings (k, d), by the Chameleon recipe.

    lam: the ridge, scaled by k (K_c + lam·k·I). mode: "pretrain" (also for transfer to new
    domains; softmax((1/S)/T), T = 5) or "finetune" (softmax(S/T), T = 0.2); `temperature`
    overrides T. S is normalised to sum 1. With `return_scores`, returns (weights, S).
    Computed in float64; returned in the embeddings' float dtype (float32 for half types).

    Degenerate cases follow the limits of the formula: one domain gets weight 1; if all
    centred embeddings are zero (identical domains) S is uniform; in pretrain mode, domains
    with S_i = 0 (an embedding equal to the mean of all) have 1/S = ∞ and share the weight,
    as do domains whose 1/S or S/T overflows float64.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be 2-D (k domains, d) with k, d >= 1, got shape "
                         f"{tuple(embeddings.shape)}")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings contain NaN or infinity (a domain without samples?)")
    temperature = check_weight_options(lam, mode, temperature)
    out_dtype = embeddings.dtype if embeddings.dtype in (torch.float32, torch.float64) else torch.float32

    e = embeddings.detach().to(torch.float64)
    k = e.shape[0]
    raw = ridge_leverage_scores(e, float(lam) * k, center=True)  # [K_c (K_c + λkI)⁻¹]_ii
    total = raw.sum()
    scores = raw / total if total > 0 else torch.full_like(raw, 1.0 / k)
    if mode == "finetune":
        logits = scores / temperature
    else:
        logits = torch.where(scores > 0, 1.0 / scores, math.inf) / temperature
    # An infinite logit (S = 0, an S below float64's range, or an extreme T) takes the
    # softmax's limit: those domains share the weight, where the softmax itself gives NaN.
    infinite = torch.isinf(logits)
    if bool(infinite.any()):
        weights = infinite.to(torch.float64) / infinite.sum()
    else:
        weights = torch.softmax(logits, 0)
    weights, scores = weights.to(out_dtype), scores.to(out_dtype)
    return (weights, scores) if return_scores else weights


def check_weight_options(lam=10.0, mode="pretrain", temperature=None):
    """Raises ValueError, naming the argument and its value, if chameleon_weights cannot take these
    options (so a caller can check them before it has embeddings); returns the temperature to use."""
    if mode not in DEFAULT_TEMPERATURE:
        raise ValueError(f"mode must be 'pretrain' or 'finetune', got {mode!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not lam > 0:
        raise ValueError(f"lam must be a number > 0, got {lam!r}")
    temperature = DEFAULT_TEMPERATURE[mode] if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)

