"""The sampler as ONNX: the portable subgraph of standard ops, or one ``ats::AdaptiveTokenSampler`` node.

Both forms have the sampler contract's inputs and outputs (docs/ATS_RULE.md section 4): ``scores`` [B, n] float32,
``count_in`` [B] int32 -> ``indices`` [B, K_out] int32, ``count_out`` [B] int32; in the dynamic shape
mode ``indices`` is [B, s] with s = max(count_out), and the plugin node has a third output, the 0-D int64
size tensor s. The portable form uses no Unique, NonZero or searchsorted: TopK (ascending, ties by
index, as the ONNX spec requires), CumSum, comparisons, GatherElements, MatMuls of ones that count
0/1 values, ScatterElements (every scatter with unique targets, or writing one value to duplicates) and
reductions, all in float32 or int64, and no tensor of grid points x patches. It picks exactly what
:func:`ats_deploy.model.ats.select_tokens` and the NumPy reference pick.
"""

from __future__ import annotations

import numpy as np

from ..model.reference import BIG, grid_size
from .graph import BOOL, FLOAT, INT32, INT64, Dim, GraphBuilder
from .plugin_lib import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = [
    "PLUGIN_OP",
    "PLUGIN_DOMAIN",
    "PLUGIN_VERSION",
    "emit_sampler",
    "emit_portable_sampler",
    "emit_plugin_sampler",
]

# One definition of the plugin's identity, shared with the C++ sources' checks in plugin_lib.
PLUGIN_OP = PLUGIN_NAME
PLUGIN_DOMAIN = PLUGIN_NAMESPACE
MODES = {"static": 0, "dynamic": 1}
# Where a timing probe may cut the portable sampler (emit_portable_sampler's stop_after), in graph order.
STAGES = ("scores", "sort", "grid", "merge", "pair", "search")


def _reduce(g: GraphBuilder, op: str, x: str, axes: list[int], *, keepdims: int) -> str:
    """Reductions moved ``axes`` from attribute to input at opset 18 (ReduceSum at 13)."""
    if op == "ReduceSum" or g.opset >= 18:
        return g.op(op, x, g.const(axes), keepdims=keepdims)
    return g.op(op, x, axes=axes, keepdims=keepdims)


def emit_sampler(
    g: GraphBuilder,
    scores: str,
    count_in: str,
    *,
    n: Dim,
    k_max: int,
    n_ref: int,
    mode: str,
    form: str,
    n_max: int | None = None,
    valid: str | None = None,
    all_valid: bool = False,
) -> tuple[str, str]:
    """Emit the sampler in ``form`` ('portable' or 'plugin') inside a model graph.

    Returns (indices, count_out) as int64, what the graph around it gathers with. The plugin node keeps
    the contract's int32 outputs (cast here); the portable form uses the graph's ``valid`` mask
    (``all_valid`` where every slot is real) instead of rebuilding it from ``count_in`` (int64 here).
    """
    if form == "plugin":
        idx, cnt = emit_plugin_sampler(g, scores, g.cast(count_in, INT32), k_max=k_max, n_ref=n_ref, mode=mode)
        return g.cast(idx, INT64), g.cast(cnt, INT64)
    return emit_portable_sampler(
        g, scores, count_in, n=n, k_max=k_max, n_ref=n_ref, mode=mode, n_max=n_max, valid=valid,
        all_valid=all_valid, index_type=INT64,
    )


def emit_plugin_sampler(g: GraphBuilder, scores: str, count_in: str, *, k_max: int, n_ref: int, mode: str):
    """One plugin node; the ONNX parser finds the creator by (op_type, plugin_version, plugin_namespace)."""
    g.custom_domains[PLUGIN_DOMAIN] = 1
    n_out = 3 if mode == "dynamic" else 2
    outs = g.op(
        PLUGIN_OP,
        scores,
        count_in,
        outputs=n_out,
        domain=PLUGIN_DOMAIN,
        plugin_namespace=PLUGIN_DOMAIN,
        plugin_version=PLUGIN_VERSION,
        k_max=int(k_max),
        n_ref=int(n_ref),
        mode=MODES[mode],
    )
    return outs[0], outs[1]


def emit_portable_sampler(
    g: GraphBuilder,
    scores: str,
    count_in: str,
    *,
    n: Dim,
    k_max: int,
    n_ref: int,
    mode: str,
    n_max: int | None = None,
    valid: str | None = None,
    all_valid: bool = False,
    index_type: int = INT32,
    stop_after: str | None = None,
) -> tuple[str, str]:
    """Standard-op sampler; ``n`` is the static slot count or a 1-element int64 tensor holding it.

    Cost grows with P + M (patches + grid points), never with M x P: each grid point's neighbours come from
    one ascending sort of the patches' F~ merged with the grid (how many F~ lie at or below each grid
    point); the nearer neighbour wins, the lower one on a tie; when the lower one wins, an exact two-level
    search (blocks of about sqrt(P) patches) finds the first patch whose float32 distance rounds to the
    same value, which is what the reference's first argmin returns.

    Graph-internal options (the sampler contract's inputs and outputs are unchanged without them):
    ``n_max`` bounds a dynamic ``n`` (it sizes the search blocks); ``valid`` is a ready [B, P] bool mask
    ``p < count_in - 1`` (the model builds it once per block for its key mask); ``all_valid`` says every
    slot is valid (the first ATS block), which drops the masking; ``index_type`` INT64 skips the casts a
    graph that gathers with int64 would undo. ``stop_after`` (one of :data:`STAGES`) is for timing probes
    only, static ``n`` only: the subgraph ends after that stage and returns the first K_out slots in order,
    tied to the stage's last result so that nothing before it is pruned
    (benchmarks/ats_overhead_breakdown.py).
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, not {stop_after!r}")
    if stop_after is not None and not isinstance(n, int):
        raise ValueError("stop_after needs a static slot count n: timing probes build static graphs only")
    ax1, ax2 = g.const([1]), g.const([2])
    zero_f, one_f, big_f = g.const(0.0, "float32"), g.const(1.0, "float32"), g.const(BIG, "float32")
    n_t = g.dim(n)
    static = isinstance(n, int)
    p_dim: Dim = n - 1 if static else g.op("Sub", n_t, ax1)
    p_bound = (n if static else int(n_max or n_ref)) - 1
    k_out: Dim = min(k_max, n) if static else g.op("Min", g.const([k_max]), n_t)
    big_m = grid_size(k_max, n_ref)
    end = g.const([2**62])

    def stop(stage: str, tensor: str) -> tuple[str, str] | None:
        """A timing probe's fixed selection after ``stage`` (None: go on)."""
        if stop_after != stage:
            return None
        k = int(k_out)
        flat = g.op("Reshape", g.cast(tensor, FLOAT), g.const([0, -1]))
        live = g.op("Mul", g.cast(g.op("ArgMax", flat, axis=1, keepdims=1), INT64), g.const(0))
        idx, cnt = g.op("Add", live, g.const([list(range(k))])), g.op("Squeeze", g.op("Add", live, g.const(k)), ax1)
        return (idx, cnt) if index_type == INT64 else (g.cast(idx, INT32), g.cast(cnt, INT32))

    def masked(x: str, other: str) -> str:
        return x if all_valid else g.op("Where", valid, x, other)

    r = g.op("Slice", scores, ax1, end, ax1)  # [B, P]
    if not all_valid and valid is None:
        # Valid patches come first in slot order and are sorted ahead of padding, so one mask
        # V[p] = p < m (m = valid patches) serves both orders.
        cnt = g.op("Max", g.op("Min", g.cast(count_in, INT64), g.op("Squeeze", n_t, g.const([0]))), g.const(1))
        m_col = g.op("Unsqueeze", g.op("Sub", cnt, g.const(1)), ax1)  # [B, 1]
        valid = g.op("Less", g.op("Unsqueeze", g.arange(0, p_dim), g.const([0])), m_col)
    r = masked(r, zero_f)
    if (cut := stop("scores", r)) is not None:
        return cut
    # No valid score > 0 (all zero, or NaN among them): every valid patch gets the same score. The sum
    # (not the max, which may skip NaN) carries a NaN through; non-negative scores sum to 0 only if all are 0.
    no_mass = g.op("Not", g.op("Greater", _reduce(g, "ReduceSum", r, [1], keepdims=1), zero_f))
    key = masked(g.op("Where", no_mass, one_f, r), big_f)
    # Ascending sort, ties by slot index (ONNX TopK semantics), padding (BIG) last.
    vals, order = g.op("TopK", key, g.dim(p_dim), axis=1, largest=0, sorted=1, outputs=2)
    cdf = g.op("CumSum", masked(vals, zero_f), ax1)  # padding adds 0.0: the last column is F_last
    if (cut := stop("sort", cdf)) is not None:
        return cut
    f0 = g.op("Slice", cdf, g.const([0]), ax1, ax1)
    span = g.op("Sub", g.op("Slice", cdf, g.const([-1]), end, ax1), f0)
    ft = g.op("Div", g.op("Sub", cdf, f0), g.op("Where", g.op("Greater", span, zero_f), span, one_f))
    # c0 = smallest positive F~ (padding sits at F~ = 1, never below it). Without one (m <= 1) c0 = 1:
    # every grid point is then 1 and picks sorted position 0, the only patch if there is one.
    c0 = _reduce(g, "ReduceMin", g.op("Where", g.op("Greater", ft, zero_f), ft, big_f), [1], keepdims=1)
    c0 = g.op("Min", c0, one_f)  # [B, 1]
    if big_m > 1:
        step = g.op("Div", g.op("Sub", one_f, c0), g.const(float(big_m - 1), "float32"))
        ys = g.op("Add", c0, g.op("Mul", g.const([list(range(big_m))], "float32"), step))  # [B, M]; no FMA
    else:
        ys = c0
    ft_v = masked(ft, big_f)  # padding far above every grid point
    if (cut := stop("grid", ys)) is not None:
        return cut

    # a_j = #{valid p : F~_p <= y_j}: ascending sort of [F~ | y] (equal values: F~ first, by index); the
    # running count of F~ entries, read at each y's position through the inverse permutation.
    _, perm = g.op(
        "TopK", g.op("Concat", ft_v, ys, axis=1), g.op("Add", g.dim(p_dim), g.const([big_m])),
        axis=1, largest=0, sorted=1, outputs=2,
    )
    running = g.op("CumSum", g.cast(g.op("Less", perm, g.dim(p_dim)), INT64), ax1)
    a = g.op("Slice", g.op("ScatterElements", perm, perm, running, axis=1), g.dim(p_dim), end, ax1)  # [B, M]
    # Everything per grid point below is laid out [B, width, M], grid points on the last axis: ONNX
    # Runtime's CPU broadcasting runs one inner loop per contiguous span, so [B, M, width] with a short
    # last axis (and a [B, M, 1] operand) costs one call per grid point, measured 6-8 us per node against
    # about 2 us for the same op on [B, width, M].
    a3 = g.op("Unsqueeze", a, ax1)  # [B, 1, M]
    if (cut := stop("merge", a3)) is not None:
        return cut

    # F~ between two runs of bs columns of BIG, so no position needs clamping (sorted position p is column
    # p + bs): R = a <= P reads BIG where no F~ lies above y, L = a - 1 >= -1 (-1: no valid patch), and
    # the search reads positions -bs .. nb * bs - 1 < P + bs; no index is negative, which TensorRT's
    # GatherElements would not accept. (A shape-only Expand: constant-folded for a static batch.)
    bs = max(int(round(p_bound**0.5)), 1)
    pad = g.op("Expand", big_f, g.op("Concat", g.shape_of(order, 0), g.const([bs]), axis=0))
    ft_x = g.op("Concat", pad, ft_v, pad, axis=1)  # [B, bs + P + bs]

    def take(positions: str, width: int) -> str:
        """F~ at sorted positions [B, width, M] (given as column indices of ``ft_x``), as [B, width, M].

        One GatherElements over [B, width * M] positions per row: in ONNX Runtime's CPU executor about 5x
        faster than a Gather from the flattened [B * P] tensor with row offsets, and it needs no offsets."""
        flat = g.op("Reshape", positions, g.const([0, -1]))
        return g.op("Reshape", g.op("GatherElements", ft_x, flat, axis=1), g.const([0, width, big_m]))

    # The two neighbours L = a - 1 (F~ <= y) and R = a (F~ > y): [y - F~_L, y - F~_R] = [d_lo, -d_hi]
    # (float32 rounding is symmetric, so fl(F~_R - y) = -fl(y - F~_R)). R wins only if strictly nearer,
    # i.e. d_lo - d_hi > 0: the sign of a rounded sum of two floats is the sign of their exact sum.
    ys3 = g.op("Unsqueeze", ys, ax1)  # [B, 1, M]
    diff = g.op("Sub", ys3, take(g.op("Add", a3, g.const([[bs - 1], [bs]])), 2))  # [B, 2, M]
    d_lo = g.op("Slice", diff, g.const([0]), ax1, ax1)  # [B, 1, M]
    take_hi = g.op("Greater", g.op("Add", d_lo, g.op("Slice", diff, ax1, ax2, ax1)), zero_f)
    if (cut := stop("pair", take_hi)) is not None:
        return cut

    # First argmin on the lower side: the first patch p with fl(y - F~_p) == d_lo. fl(y - F~_p) does not
    # increase with p, and patches above y or padding give negative differences, so that patch is
    # #{p : fl(y - F~_p) > d_lo}: counted over block starts, then inside the block where the run begins.
    starts = g.op("Slice", g.op("Unsqueeze", ft_v, ax2), g.const([0]), end, ax1, g.const([bs]))  # [B, nb, 1]

    def count_true(cond: str, width: int, *, dynamic: bool = False) -> str:
        """#true over axis 1 of a [B, width, M] bool, as [B, 1, M] int64: a [1, width] x [B, width, M] MatMul
        of ones (exact: the operands are 0 and 1, the counts far below 2^24) costs ONNX Runtime a quarter
        of an int64 ReduceSum over that axis (measured 2.8 against 11 us at batch 1, 5.4 against 18 at
        batch 8). ``dynamic``: the width varies with a dynamic P (at most ``width``)."""
        ones = g.const(np.ones((1, width)), "float32")
        if dynamic:
            ones = g.op("Slice", ones, g.const([0]), g.shape_of(cond, 1), ax1)
        return g.cast(g.op("MatMul", ones, g.cast(cond, FLOAT)), INT64)

    c1 = count_true(g.op("Greater", g.op("Sub", ys3, starts), d_lo), -(-p_bound // bs), dynamic=not static)
    first = g.op("Mul", c1, g.const(bs))  # [B, 1, M]: one past the last block start before the run
    inner_ft = take(g.op("Add", first, g.const([[i] for i in range(bs)])), bs)  # positions first - bs ..
    c2 = count_true(g.op("Greater", g.op("Sub", ys3, inner_ft), d_lo), bs)
    first = g.op("Max", g.op("Add", first, g.op("Sub", c2, g.const(bs))), g.const(0))
    pick = g.op("Squeeze", g.op("Where", take_hi, a3, first), ax1)  # [B, M] sorted positions
    if (cut := stop("search", pick)) is not None:
        return cut

    # Kept = picked at least once; every update writes the same 1, so duplicate picks are harmless.
    ones = g.op("Expand", g.const(1), g.op("Shape", pick))  # shape-only: constant-folded for a static batch
    zeros_p = g.op("Expand", g.const(0), g.op("Shape", order))  # [B, P] int64
    flags = g.op("ScatterElements", zeros_p, pick, ones, axis=1)
    picked = g.op("Cast", flags, to=BOOL)
    if not all_valid:
        picked = g.op("And", picked, valid)
    # 1-based output slot of each kept patch. No cap to K_out - 1 is needed: the M = min(K, n_ref) - 1 grid
    # points pick at most M distinct patches, and at most the P = n - 1 there are: at most min(K, n) - 1.
    rank = g.op("CumSum", g.cast(picked, INT64), ax1)
    count_out = g.op("Add", _reduce(g, "ReduceSum", g.cast(picked, INT64), [1], keepdims=0), g.const(1))
    # Compact: kept patch -> its rank; any other sorted position -> a slot of its own past K_out (targets
    # stay unique, so the scatter is deterministic on every backend); keep the first K_out (or s) slots.
    target = g.op("Where", picked, rank, g.op("Add", g.arange(0, p_dim), g.dim(k_out)))
    rows = g.op("Concat", g.shape_of(order, 0), g.dim(k_out), axis=0)
    buf = g.op("Concat", zeros_p, g.op("Expand", g.const([[0]]), rows), axis=1)
    placed = g.op("ScatterElements", buf, target, g.op("Add", order, g.const(1)), axis=1)
    width = _reduce(g, "ReduceMax", count_out, [0], keepdims=1) if mode == "dynamic" else g.dim(k_out)
    indices = g.op("Slice", placed, g.const([0]), width, ax1)
    if index_type == INT64:
        return indices, count_out
    return g.cast(indices, INT32), g.cast(count_out, INT32)
