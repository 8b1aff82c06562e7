"""Pure-torch ground truth for every op: always available, and what the fast backends
are tested against. Inputs are the 2-D, already-checked forms the backends receive."""
import torch


def accumulation_dtype(dtype):
    """float64 for float64 inputs, else float32: the dtype of results and accumulation."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sum(rows, segment_ids, num_segments):
    """Σ of `rows` per segment id; ids outside [0, num_segments) are dropped (no host sync)."""
    if num_segments == 0:  # every row is dropped, and index_add_ has no slot to park them in
        return rows.new_zeros(0)
    keep = (segment_ids >= 0) & (segment_ids < num_segments)
    ids = torch.where(keep, segment_ids, 0)
    values = torch.where(keep, rows, 0)
    return torch.zeros(num_segments, dtype=rows.dtype, device=rows.device).index_add_(0, ids, values)


def rowwise_bilinear(a, m, b, segment_ids=None, num_segments=0):
    """r_n = a_n · (m @ b_n), per row or summed per segment."""
    acc = accumulation_dtype(a.dtype)
    rows = (a.to(acc) * (b.to(acc) @ m.to(acc).T)).sum(-1)
    return rows if segment_ids is None else segment_sum(rows, segment_ids, num_segments)


def ghost_dots(x, grad_out, target_x, target_grad_out, segment_ids, num_segments):
    """s_i = Σ_{seg(n)=i} Σ_t (x_n · target_x_t)(grad_out_n · target_grad_out_t)."""
    acc = accumulation_dtype(x.dtype)
    x_dots = x.to(acc) @ target_x.to(acc).T
    g_dots = grad_out.to(acc) @ target_grad_out.to(acc).T
    return segment_sum((x_dots * g_dots).sum(-1), segment_ids, num_segments)


def offsets_to_ids(offsets, n_rows):
    """The segment id of each of n_rows rows grouped by `offsets` (k + 1,): i for rows in
    [offsets[i], offsets[i + 1]), -1 before offsets[0] and k from offsets[k] on."""
    rows = torch.arange(n_rows, device=offsets.device)
    return torch.searchsorted(offsets, rows, right=True) - 1


def weight_grad_dots(x, grad_out, offsets, target, target_bias=None, with_bias=False):
    """(grad_out.T @ x, grad_out summed over rows or an empty tensor, the per-segment
    ⟨G_i, target⟩ + ⟨Σ_{n∈i} grad_out_n, target_bias⟩) for rows grouped by offsets."""
    acc = accumulation_dtype(x.dtype)
    x, g = x.to(acc), grad_out.to(acc)
    grad_weight = g.T @ x
    grad_bias = g.sum(0) if with_bias else g.new_zeros(0)
    rows = (g * (x @ target.to(acc).T)).sum(-1)
    if target_bias is not None:
        rows = rows + g @ target_bias.to(acc)
    num_segments = offsets.numel() - 1
    return grad_weight, grad_bias, segment_sum(rows, offsets_to_ids(offsets, x.shape[0]), num_segments)


def batched_svd(a):
    """Thin SVD of (..., m, n) in the accumulation dtype: torch.linalg.svd (LAPACK / cuSOLVER)."""
    return torch.linalg.svd(a.to(accumulation_dtype(a.dtype)), full_matrices=False)


def ridge_leverage_scores(a, lam, center=False, rtol=None):
    """τ_i = [K (K + λI)⁻¹]_ii, K = a aᵀ (H a aᵀ H when centred), computed in float64 from
    torch.linalg.svd; lam a number -> (..., m), a 1-D tensor -> (..., L, m). Singular
    values at or below rtol·σ_max (default max(m, n)·eps of a's accumulation dtype) count
    as zero, so lam = 0 gives the rank-aware ordinary leverage."""
    x = a.to(torch.float64)
    if center:
        x = x - x.mean(-2, keepdim=True)
    m, n = x.shape[-2:]
    if rtol is None:
        rtol = max(m, n) * torch.finfo(accumulation_dtype(a.dtype)).eps
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    lams = torch.as_tensor(lam, dtype=torch.float64, device=x.device)
    scalar = lams.dim() == 0
    lams = lams.reshape(-1, 1)
    s2 = (s * s).unsqueeze(-2)
    weights = torch.where(lams > 0, s2 / (s2 + lams), torch.ones_like(s2))
    top = s.amax(-1, keepdim=True) if s.shape[-1] else s
    weights = weights * (s > rtol * top).unsqueeze(-2)
    scores = torch.einsum("...mp,...lp->...lm", u * u, weights).to(accumulation_dtype(a.dtype))
    return scores.squeeze(-2) if scalar else scores
