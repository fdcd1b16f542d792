"""The official ATS selection rule (docs/ATS_RULE.md section 2) as batched, static-shape PyTorch ops.

This is the eager sampler used by the PyTorch model. The portable ONNX subgraph in
``ats_deploy.exporters.sampler`` computes the same things (stable ascending sort with invalid slots pushed
to the end, float32 cumsum, min-max normalisation, grid, each grid point's first nearest patch from its two
neighbours plus an exact search where float32 distances collapse, de-duplication by flags, compaction by a
running count), so both agree with each other and with the NumPy reference in ``reference.py`` bit for bit
(tests/unit/test_sampler.py and test_onnx_sampler.py check it on rows of up to 577 tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import BIG, grid_size, output_slots

__all__ = ["BIG", "token_scores", "select_tokens", "nearest_first"]


def token_scores(cls_attn: Tensor, v: Tensor) -> Tensor:
    """Authors' significance score r_j = (sum_h A_h[0, j]) * ||V_j||_2, in float32.

    ``cls_attn`` is the CLS row of the softmax attention, [B, H, n]; ``v`` is [B, H, n, d]. The value
    norm is over all heads concatenated (length C), not a sum of per-head norms.
    """
    b, h, n, d = v.shape
    v_cat = v.float().transpose(1, 2).reshape(b, n, h * d)
    return cls_attn.float().sum(dim=1) * torch.linalg.vector_norm(v_cat, ord=2, dim=-1)


def nearest_first(ft: Tensor, ys: Tensor) -> Tensor:
    """For each grid point y_j, the first sorted position p minimising float32 |y_j - F~_p|.

    ``ft`` [B, P] ascending (padding as BIG), ``ys`` [B, M] ascending. Exactly the first argmin over all
    p, computed in O(P + M sqrt(P)) like the portable ONNX sampler: the two neighbours of y_j (nearer
    wins, the lower one on a tie); when the lower one L wins, the first p whose fl(y_j - F~_p) rounds to
    the same value as fl(y_j - F~_L), found by counting, over block starts and then inside one block of
    about sqrt(P) positions, the p with a larger difference (it does not increase with p).
    """
    b, p = ft.shape
    a = torch.searchsorted(ft, ys, right=True)  # #{p : F~_p <= y_j}
    both = torch.stack([(a - 1).clamp(0, p - 1), a.clamp(0, p - 1)], dim=2)  # [B, M, 2]
    dist = torch.abs(ys[:, :, None] - torch.gather(ft, 1, both.view(b, -1)).view(both.shape))
    take_hi = dist[:, :, 1] < dist[:, :, 0]
    d_lo = dist[:, :, :1]
    bs = max(int(round((p - 1) ** 0.5)), 1) if p > 1 else 1
    starts = ft[:, None, ::bs]  # [B, 1, nb]
    first = ((ys[:, :, None] - starts) > d_lo).sum(dim=2, keepdim=True) * bs  # [B, M, 1]
    inner = (first + torch.arange(-bs, 0, device=ft.device)).clamp(0, p - 1)  # [B, M, bs]
    inner_ft = torch.gather(ft, 1, inner.view(b, -1)).view(inner.shape)
    c2 = ((ys[:, :, None] - inner_ft) > d_lo).sum(dim=2, keepdim=True)
    first = (first + c2 - bs).clamp(min=0)[:, :, 0]
    return torch.where(take_hi, a, first)


def select_tokens(scores: Tensor, count_in: Tensor, *, k_max: int, n_ref: int) -> tuple[Tensor, Tensor]:
    """Select tokens per image: the sampler contract of docs/ATS_RULE.md section 4.

    Args:
        scores: [B, n] float32 scores (slot 0, the CLS token, is ignored). Need not be normalised.
        count_in: [B] number of valid slots including CLS (valid slots come first).
        k_max: the budget K (CLS included); output has K_out = min(K, n) slots.
        n_ref: the model's input token count (197 for 224/16); the grid has min(K, n_ref) - 1 points.

    Returns:
        indices [B, K_out] int64 (CLS first, kept slots in ascending-score order, padding 0) and
        count_out [B] int64 (1 + K').
    """
    scores = scores.float()
    b, n = scores.shape
    k_out = output_slots(k_max, n)
    dev = scores.device
    p = n - 1
    count_in = count_in.to(torch.int64).clamp(1, n)
    if p == 0:
        return torch.zeros(b, k_out, dtype=torch.int64, device=dev), torch.ones(b, dtype=torch.int64, device=dev)
    slot = torch.arange(1, n, device=dev)
    valid = slot[None, :] < count_in[:, None]  # [B, P] in slot order
    m = valid.sum(dim=1)  # valid patch count
    r = torch.where(valid, scores[:, 1:], torch.zeros((), device=dev))
    all_zero = ~(r.amax(dim=1, keepdim=True) > 0)
    r = torch.where(all_zero & valid, torch.ones((), device=dev), r)
    key = torch.where(valid, r, torch.full((), BIG, device=dev))
    _, order = torch.sort(key, dim=1, stable=True)  # ascending, ties by slot, invalid last
    r_sorted = torch.gather(r, 1, order)
    pos = torch.arange(p, device=dev)
    valid_sorted = pos[None, :] < m[:, None]
    cdf = torch.cumsum(r_sorted, dim=1)
    f0 = cdf[:, :1]
    f_last = torch.gather(cdf, 1, (m - 1).clamp(min=0)[:, None])
    span = f_last - f0
    ft = (cdf - f0) / torch.where(span > 0, span, torch.ones((), device=dev))
    positive = valid_sorted & (ft > 0)
    c0 = torch.where(positive, ft, torch.full((), BIG, device=dev)).amin(dim=1, keepdim=True)
    c0 = torch.where(c0 < BIG, c0, torch.zeros((), device=dev))  # m <= 1: no positive F~
    big_m = grid_size(k_max, n_ref)
    step = (1.0 - c0) / float(max(big_m - 1, 1)) if big_m > 1 else torch.zeros_like(c0)
    j = torch.arange(big_m, device=dev, dtype=torch.float32)
    ys = (c0 + j[None, :] * step).contiguous()  # [B, M]; two separate ops, never a fused multiply-add
    pick = nearest_first(torch.where(valid_sorted, ft, torch.full((), BIG, device=dev)), ys)
    picked = torch.zeros(b, p, dtype=torch.bool, device=dev).scatter_(1, pick, True) & valid_sorted
    rank = torch.cumsum(picked.to(torch.int64), dim=1)  # 1-based output slot of each kept token
    keep = picked & (rank < k_out)
    target = torch.where(keep, rank, torch.full((), k_out, device=dev, dtype=torch.int64))
    indices = torch.zeros(b, k_out + 1, dtype=torch.int64, device=dev)
    indices.scatter_(1, target, order + 1)
    indices = indices[:, :k_out].contiguous()  # column 0 (CLS) is never a scatter target: it stays 0
    count_out = 1 + keep.sum(dim=1)
    return indices, count_out
