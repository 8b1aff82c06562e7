"""Chameleon weights follow the recipe, with its degenerate cases at their limits."""
import numpy as np
import pytest
import torch

import fastmix
from fastmix.leverage_weights import chameleon_weights


def recipe(e, lam=10.0, mode="pretrain", temperature=None):
    """The published recipe, in numpy float64."""
    e = np.asarray(e, dtype=np.float64)
    k = e.shape[0]
    h = np.eye(k) - np.ones((k, k)) / k
    kc = h @ (e @ e.T) @ h
    s = np.diag(kc @ np.linalg.inv(kc + lam * k * np.eye(k)))
    s = s / s.sum()
    t = temperature or (5.0 if mode == "pretrain" else 0.2)
    x = (1.0 / s) / t if mode == "pretrain" else s / t
    w = np.exp(x - x.max())
    return w / w.sum(), s


@pytest.mark.parametrize("k,d", [(2, 3), (5, 16), (7, 768), (12, 4)])
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
@pytest.mark.parametrize("lam", [0.1, 10.0])
def test_weights_follow_the_recipe(seed, k, d, mode, lam):
    e = torch.randn(k, d) * (1.0 / d**0.5)
    w, s = chameleon_weights(e, lam=lam, mode=mode, return_scores=True)
    want_w, want_s = recipe(e.numpy(), lam, mode)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), want_w, rtol=1e-5, atol=1e-6)
    assert abs(float(s.sum()) - 1) < 1e-6 and abs(float(w.sum()) - 1) < 1e-6
    assert fastmix.chameleon_weights is chameleon_weights


def test_temperature_and_ridge_scale_with_k(seed):
    e = torch.randn(6, 10)
    for t in (0.5, 2.0):
        np.testing.assert_allclose(chameleon_weights(e, mode="finetune", temperature=t).numpy(),
                                   recipe(e.numpy(), mode="finetune", temperature=t)[0], rtol=1e-5)
    # the ridge is λ·k: scores equal the plain ridge-leverage formula at λk, not at λ
    _, s = chameleon_weights(e, lam=3.0, return_scores=True)
    raw = fastmix.ops.ridge_leverage_scores(e.double(), 3.0 * 6, center=True)
    np.testing.assert_allclose(s.numpy(), (raw / raw.sum()).numpy(), rtol=1e-6)
    raw_k1 = fastmix.ops.ridge_leverage_scores(e.double(), 3.0, center=True)
    assert not np.allclose(s.numpy(), (raw_k1 / raw_k1.sum()).numpy(), rtol=1e-3)


def test_appending_a_domain_is_the_formula_on_k_plus_one(seed):
    """Transfer without retraining: a new domain enters only through its embedding; the
    weights are the recipe on the k + 1 embeddings, and in pretrain mode a domain far from
    the others (high leverage) gets less weight than one near their mean (low leverage)."""
    e = torch.randn(5, 32) / 32**0.5
    far = e.mean(0) + 3.0 * torch.randn(32) / 32**0.5
    near = e.mean(0) + 0.01 * torch.randn(32) / 32**0.5
    for new in (far, near):
        grown = torch.cat([e, new[None]])
        np.testing.assert_allclose(chameleon_weights(grown).numpy(), recipe(grown.numpy())[0], rtol=1e-5)
    w_far = chameleon_weights(torch.cat([e, far[None]]))[-1]
    w_near = chameleon_weights(torch.cat([e, near[None]]))[-1]
    assert w_near > w_far


def test_duplicated_domain_not_upweighted_per_copy_in_finetune(seed):
    """Duplicates share their leverage, so in finetune mode (softmax(S/T)) each copy gets
    less weight than the domain had alone."""
    e = torch.randn(5, 32) / 32**0.5
    alone = chameleon_weights(e, mode="finetune")[0]
    dup = torch.cat([e] + [e[:1]] * 9)
    w = chameleon_weights(dup, mode="finetune")
    copies = [0] + list(range(5, 14))
    assert float(w[copies].max()) < float(alone)
    np.testing.assert_allclose(w.numpy(), recipe(dup.numpy(), mode="finetune")[0], rtol=1e-5)


def test_duplicated_domain_is_upweighted_in_pretrain_as_the_recipe_implies(seed):
    """One might want a domain duplicated many times not to be upweighted in pretrain mode;
    the published recipe does the opposite, and fastmix keeps the recipe: copies pull the centring mean onto themselves, so their centred embeddings and
    leverage scores shrink, 1/S grows, and softmax((1/S)/T) gives them most of the weight.
    Pinned here so that a change of behaviour is a decision, not an accident."""
    e = torch.randn(5, 32) / 32**0.5
    alone = float(chameleon_weights(e)[0])
    dup = torch.cat([e] + [e[:1]] * 4)
    w, s = chameleon_weights(dup, return_scores=True)
    copies = [0, 5, 6, 7, 8]
    assert float(w[copies].sum()) > max(alone, 0.5)
    assert float(s[copies].max()) < float(s[[1, 2, 3, 4]].min())  # copies: the lowest leverage


def test_degenerate_cases():
    assert chameleon_weights(torch.randn(1, 4)).tolist() == [1.0]
    w, s = chameleon_weights(torch.ones(3, 4), return_scores=True)  # identical domains
    np.testing.assert_allclose(w.numpy(), [1 / 3] * 3)
    np.testing.assert_allclose(s.numpy(), [1 / 3] * 3)
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])  # domain 1 is the mean: S = 0
    w = chameleon_weights(e.double())
    assert w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), [0.0, 1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("offset", [3e-156, 1e-158, 1e-160])
def test_a_score_below_float64_range_takes_the_limit_not_nan(offset):
    """S_1 ≈ 1e-312..1e-321 is not 0, but 1/S_1 overflows: the pretrain weights are the limit
    [0, 1, 0] (the softmax of an infinite logit would be NaN everywhere)."""
    e = torch.tensor([[1.0, 0.0], [offset, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(chameleon_weights(e).numpy(), [0.0, 1.0, 0.0], atol=1e-12)
    w = chameleon_weights(e, mode="finetune", temperature=1e-310)  # S/T overflows for the two others
    np.testing.assert_allclose(w.numpy(), [0.5, 0.0, 0.5], atol=1e-12)


def test_numpy_scalars_are_numbers(seed):
    e = torch.randn(5, 8, dtype=torch.float64)
    want = chameleon_weights(e, lam=3.0, temperature=2.0)
    assert torch.equal(chameleon_weights(e, lam=np.float32(3.0), temperature=np.float64(2.0)), want)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        chameleon_weights(torch.randn(4))
    with pytest.raises(ValueError, match="mode"):
        chameleon_weights(torch.randn(3, 4), mode="train")
    with pytest.raises(ValueError, match="lam"):
        chameleon_weights(torch.randn(3, 4), lam=0.0)
    with pytest.raises(ValueError, match="temperature"):
        chameleon_weights(torch.randn(3, 4), temperature=-1)
    with pytest.raises(ValueError, match="NaN"):
        chameleon_weights(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
