"""Reference implementation of the ATS selection rule (docs/ATS_RULE.md section 2), in plain NumPy.

This is the yardstick every other implementation (the vectorised PyTorch sampler, the portable ONNX
subgraph, the CUDA kernel and the TensorRT plugin) is checked against. It is written per image with
explicit loops so that it reads like the rule, not like the optimised code it judges. It needs no torch,
so the on-device ``verify`` command and the GPU kernel tests can use it too.

The contract (docs/ATS_RULE.md section 4): ``scores`` is [B, n] (slot 0 = CLS, ignored), ``count_in`` is [B]
(valid slots including CLS, valid slots first). Scores need not be normalised: the normalised CDF is
invariant to their scale, so implementations run the cumulative sum on the raw scores in float32,
sequentially in ascending-score order, then F~ = (F - F_0) / (F_last - F_0), c0 = min positive F~,
step = (1 - c0) / (M - 1), y_j = c0 + j * step (no fused multiply-add), pick = first argmin |y_j - F~|.
That fixes every float32 rounding, so float32 implementations agree bit for bit.
The result is ``indices`` [B, K_out] int32 with
K_out = min(k_max, n): CLS (0) first, then the kept slots in ascending-score order, then padding (0),
and ``count_out`` [B] int32 = 1 + K'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Stands in for +inf on invalid slots in the vectorised samplers (torch and ONNX): finite, so no inf or
# nan can leak into a graph.
BIG = 1.0e30

# Key prefix of the per-image near-boundary flags a reference carries beside its outputs: NEAR_BOUNDARY +
# block index -> bool [B] (see near_boundary below; stored in reference.npz, read by every parity check).
NEAR_BOUNDARY = "near_boundary_"

__all__ = [
    "BIG",
    "NEAR_BOUNDARY",
    "SelectionDetail",
    "grid_size",
    "output_slots",
    "select_one",
    "select_reference",
    "near_boundary",
]


def grid_size(k_max: int, n_ref: int) -> int:
    """Number of grid points M = min(K, n_ref) - 1 (the authors' grid has n_ref - 1 points)."""
    return max(min(int(k_max), int(n_ref)) - 1, 1)


def output_slots(k_max: int, n: int) -> int:
    """Static slot count K_out = min(K, n) of a stage whose input has ``n`` slots."""
    return min(int(k_max), int(n))


def block_output_slots(k_max: int, n: int, num_prefix: int = 1) -> int:
    """Slots leaving an ATS block whose input has ``n`` slots: the sampler's K_out over the slots it sees,
    plus a distillation token (``num_prefix`` 2), which rides along outside the sampler."""
    extra = num_prefix - 1
    return output_slots(k_max, n - extra) + extra


@dataclass(frozen=True)
class SelectionDetail:
    """Everything the rule computed for one image; used by tests and by the near-boundary check."""

    kept: np.ndarray  # original slot ids (1-based), ascending-score order
    order: np.ndarray  # slot ids of the valid patches, ascending score, stable by slot
    cdf: np.ndarray  # normalised CDF F~ in sorted order
    grid: np.ndarray  # grid points y_j
    scores: np.ndarray  # normalised scores S in slot order (valid patches only)


def select_one(scores_row: np.ndarray, n_valid: int, *, k_max: int, n_ref: int, dtype=np.float64) -> SelectionDetail:
    """Apply the official rule to one image. ``scores_row`` has the CLS slot at index 0."""
    m = int(n_valid) - 1  # valid patch count
    empty = np.zeros(0, dtype=dtype)
    if m <= 0:
        return SelectionDetail(np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty, empty)
    r = np.asarray(scores_row[1 : m + 1], dtype=dtype)
    if not r.max() > 0:  # sum(r) = 0 (or nothing usable): all-equal scores
        r = np.ones(m, dtype=dtype)
    # F~ is invariant to the scale of r, so the CDF runs on the raw scores: no order-dependent sum
    # (and no division) before the cumsum, which lets every float32 implementation match bit for bit.
    order = np.argsort(r, kind="stable")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is refused just below
        s = r / r.sum()
        f = np.cumsum(r[order], dtype=dtype)
    if m == 1:
        return SelectionDetail(np.array([1]), order + 1, np.zeros(1, dtype), np.zeros(1, dtype), s)
    if not np.isfinite(f[-1]):  # finite scores whose sum overflows: outside the contract (docs/ATS_RULE.md)
        raise ValueError(f"the {np.dtype(dtype).name} sum of the scores overflows; scale the scores down")
    ft = ((f - f[0]) / (f[-1] - f[0])).astype(dtype)
    c0 = ft[ft > 0].min()
    big_m = grid_size(k_max, n_ref)
    j = np.arange(big_m, dtype=dtype)
    if big_m == 1:
        ys = np.array([c0], dtype=dtype)
    else:
        step = dtype((1 - c0) / dtype(big_m - 1))
        ys = (c0 + j * step).astype(dtype)
    picks = set()
    for y in ys:
        d = np.abs(y - ft)
        picks.add(int(np.argmin(d)))  # first minimum: the lower F~ on an exact tie
    positions = np.array(sorted(picks), dtype=np.int64)
    return SelectionDetail(order[positions] + 1, order + 1, ft, ys, s)


def select_reference(
    scores: np.ndarray, count_in: np.ndarray, *, k_max: int, n_ref: int, dtype=np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Batch form of the rule with the sampler contract's outputs (indices [B, K_out], count_out [B])."""
    scores = np.asarray(scores)
    b, n = scores.shape
    k_out = output_slots(k_max, n)
    indices = np.zeros((b, k_out), dtype=np.int32)
    count_out = np.ones(b, dtype=np.int32)
    for i in range(b):
        n_valid = int(min(max(int(count_in[i]), 1), n))
        kept = select_one(scores[i], n_valid, k_max=k_max, n_ref=n_ref, dtype=dtype).kept
        kept = kept[: k_out - 1]
        indices[i, 1 : 1 + len(kept)] = kept
        count_out[i] = 1 + len(kept)
    return indices, count_out


def near_boundary(scores_row: np.ndarray, n_valid: int, *, k_max: int, n_ref: int, rtol: float = 1e-5) -> bool:
    """True where docs/ATS_RULE.md allows implementations to disagree with the float64 rule.

    That is: a grid point lies within ``rtol`` (relative) of a decision boundary (the midpoint of two
    neighbouring F~ values), or two valid scores differ by less than rtol * max(the larger, 1/(n_valid-1)).
    """
    d = select_one(scores_row, n_valid, k_max=k_max, n_ref=n_ref, dtype=np.float64)
    m = len(d.order)
    if m < 2:
        return False
    s_sorted = np.sort(d.scores)
    gaps = np.diff(s_sorted)
    floor = 1.0 / m
    if np.any(gaps < rtol * np.maximum(s_sorted[1:], floor)):
        return True
    mids = (d.cdf[1:] + d.cdf[:-1]) / 2
    dist = np.abs(d.grid[:, None] - mids[None, :])
    return bool(np.any(dist <= rtol * np.maximum(np.abs(mids[None, :]), 1e-12)))
