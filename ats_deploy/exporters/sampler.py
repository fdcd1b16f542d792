"""The sampler as ONNX: the portable subgraph of standard ops, or one ``ats::AdaptiveTokenSampler`` node.

Both forms have the sampler contract's inputs and outputs (docs/ATS_RULE.md section 4): ``scores`` [B, n] float32,
``count_in`` [B] int32 -> ``indices`` [B, K_out] int32, ``count_out`` [B] int32; in the dynamic shape
mode ``indices`` is [B, s] with s = max(count_out), and the plugin node has a third output, the 0-D int64
size tensor s. The portable form uses no Unique, NonZero or searchsorted: TopK (ascending, ties by
index, as the ONNX spec requires), CumSum, comparisons, ArgMin, ScatterElements (flags) and reductions,
all in float32 or int64.
It performs exactly the operations of :func:`ats_deploy.model.ats.select_tokens`.
"""

from __future__ import annotations

from ..model.reference import BIG, grid_size
from .graph import FLOAT, INT32, INT64, Dim, GraphBuilder
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


def _reduce(g: GraphBuilder, op: str, x: str, axes: list[int], *, keepdims: int) -> str:
    """Reductions moved ``axes`` from attribute to input at opset 18 (ReduceSum at 13)."""
    if op == "ReduceSum" or g.opset >= 18:
        return g.op(op, x, g.const(axes), keepdims=keepdims)
    return g.op(op, x, axes=axes, keepdims=keepdims)


def emit_sampler(
    g: GraphBuilder, scores: str, count_in: str, *, n: Dim, k_max: int, n_ref: int, mode: str, form: str
) -> tuple[str, str]:
    """Emit the sampler in the requested ``form`` ('portable' or 'plugin'); returns (indices, count_out)."""
    if form == "plugin":
        return emit_plugin_sampler(g, scores, count_in, k_max=k_max, n_ref=n_ref, mode=mode)
    return emit_portable_sampler(g, scores, count_in, n=n, k_max=k_max, n_ref=n_ref, mode=mode)


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
    g: GraphBuilder, scores: str, count_in: str, *, n: Dim, k_max: int, n_ref: int, mode: str
) -> tuple[str, str]:
    """Standard-op sampler; ``n`` is the static slot count or a 1-element int64 tensor holding it."""
    zero_f, one_f, big_f = g.const(0.0, "float32"), g.const(1.0, "float32"), g.const(BIG, "float32")
    ax1 = g.const([1])
    n_t = g.dim(n)
    p_dim: Dim = n - 1 if isinstance(n, int) else g.op("Sub", n_t, g.const([1]))
    k_out_static = min(k_max, n) if isinstance(n, int) else None

    r = g.op("Slice", scores, g.const([1]), g.const([2**62]), ax1)  # [B, P]
    cnt = g.op("Max", g.op("Min", g.cast(count_in, INT64), g.op("Squeeze", n_t, g.const([0]))), g.const(1))
    slot = g.arange(1, n if isinstance(n, int) else n_t)
    valid = g.op("Less", g.op("Unsqueeze", slot, g.const([0])), g.op("Unsqueeze", cnt, ax1))
    r = g.op("Where", valid, r, zero_f)
    all_zero = g.op("Not", g.op("Greater", _reduce(g, "ReduceMax", r, [1], keepdims=1), zero_f))
    r = g.op("Where", g.op("And", all_zero, valid), one_f, r)
    key = g.op("Where", valid, r, big_f)
    # Ascending sort, ties by slot index (ONNX TopK semantics), invalid slots (BIG) last.
    vals, order = g.op("TopK", key, g.dim(p_dim), axis=1, largest=0, sorted=1, outputs=2)
    m = g.op("Sub", cnt, g.const(1))  # valid patch count per image
    pos = g.arange(0, p_dim)
    valid_sorted = g.op("Less", g.op("Unsqueeze", pos, g.const([0])), g.op("Unsqueeze", m, ax1))
    r_sorted = g.op("Where", valid_sorted, vals, zero_f)
    cdf = g.op("CumSum", r_sorted, g.const(1))
    f0 = g.op("Slice", cdf, g.const([0]), g.const([1]), ax1)
    last = g.op("Unsqueeze", g.op("Max", g.op("Sub", m, g.const(1)), g.const(0)), ax1)
    f_last = g.op("GatherElements", cdf, last, axis=1)
    span = g.op("Sub", f_last, f0)
    ft = g.op("Div", g.op("Sub", cdf, f0), g.op("Where", g.op("Greater", span, zero_f), span, one_f))
    positive = g.op("And", valid_sorted, g.op("Greater", ft, zero_f))
    c0 = _reduce(g, "ReduceMin", g.op("Where", positive, ft, big_f), [1], keepdims=1)
    c0 = g.op("Where", g.op("Less", c0, big_f), c0, zero_f)
    big_m = grid_size(k_max, n_ref)
    if big_m > 1:
        step = g.op("Div", g.op("Sub", one_f, c0), g.const(float(big_m - 1), "float32"))
        j = g.const([list(range(big_m))], "float32")  # [1, M]
        ys = g.op("Add", c0, g.op("Mul", j, step))  # [B, M]
    else:
        ys = c0
    dist = g.op("Abs", g.op("Sub", g.op("Unsqueeze", ys, g.const([2])), g.op("Unsqueeze", ft, ax1)))
    dist = g.op("Where", g.op("Unsqueeze", valid_sorted, ax1), dist, big_f)  # [B, M, P]
    pick = g.op("ArgMin", dist, axis=2, keepdims=0, select_last_index=0)  # first minimum: lower F~ on a tie
    # De-duplicate: flag each picked sorted position. Every update writes the same value 1, so the result
    # is the same whatever order duplicate indices are applied in.
    ones = g.op("Add", g.op("Mul", g.cast(pick, FLOAT), zero_f), one_f)  # [B, M] of 1.0
    flags = g.op("ScatterElements", g.op("Mul", r_sorted, zero_f), pick, ones, axis=1)
    picked = g.op("And", g.op("Greater", flags, g.const(0.5, "float32")), valid_sorted)  # [B, P] sorted order
    rank = g.op("CumSum", g.cast(picked, INT64), g.const(1))  # 1-based output slot of each kept token
    k_out_t = g.const(k_out_static) if k_out_static is not None else g.op("Min", g.const([k_max]), n_t)
    keep = g.op("And", picked, g.op("Less", rank, k_out_t))  # at most K_out - 1 kept patches
    count_out = g.op("Add", _reduce(g, "ReduceSum", g.cast(keep, INT64), [1], keepdims=0), g.const(1))
    # Compact: the kept sorted positions in ascending order are the first T entries of an ascending TopK
    # over (position if kept else BIG); T = K_out - 1 (static) or max(count_out) - 1 (dynamic).
    if mode == "dynamic":
        t_dim = g.op("Sub", _reduce(g, "ReduceMax", count_out, [0], keepdims=1), g.const([1]))
    else:
        assert k_out_static is not None, "static mode needs a static slot count"
        t_dim = g.const([k_out_static - 1])
    key2 = g.op("Where", keep, g.cast(pos, FLOAT), big_f)
    vals2, sel = g.op("TopK", key2, t_dim, axis=1, largest=0, sorted=1, outputs=2)  # [B, T]
    slot_ids = g.op("Add", g.op("GatherElements", order, sel, axis=1), g.const(1))
    body = g.op("Where", g.op("Less", vals2, big_f), slot_ids, g.const(0))
    cls_col = g.op("Mul", g.op("Unsqueeze", count_out, ax1), g.const(0))
    indices = g.op("Concat", cls_col, body, axis=1)
    return g.cast(indices, INT32), g.cast(count_out, INT32)
