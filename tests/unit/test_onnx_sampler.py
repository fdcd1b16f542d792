"""The portable ONNX sampler on its own, against the NumPy float32 reference, full output rows included.

Expected values come from ``select_reference`` (plain loops over the rule, docs/ATS_RULE.md), never from
the graph under test. The score cases (tests/_helpers/score_cases.py) include rows where float32 rounding
decides the pick: several patches whose distance to a grid point rounds to the same value (the first
must win), exact ties, zeros, subnormals, -0.0, NaN and padding that holds large scores.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers.score_cases import cases

from ats_deploy.exporters.graph import FLOAT, INT32, GraphBuilder
from ats_deploy.exporters.sampler import emit_portable_sampler
from ats_deploy.model.ats import select_tokens
from ats_deploy.model.reference import grid_size, select_one, select_reference

KS = (2, 3, 50, 99, 197)


def _sampler_model(b: int, n: int, k: int, mode: str, *, dynamic_n: bool) -> onnx.ModelProto:
    g = GraphBuilder("sampler", opset=17)
    scores = g.input("scores", FLOAT, [b, "n" if dynamic_n else n])
    count = g.input("count_in", INT32, [b])
    n_dim = g.shape_of(scores, 1) if dynamic_n else n
    idx, cnt = emit_portable_sampler(g, scores, count, n=n_dim, k_max=k, n_ref=197, mode=mode, n_max=n)
    g.op("Identity", idx, outputs=["indices"])
    g.op("Identity", cnt, outputs=["count_out"])
    g.output("indices", INT32, None)
    g.output("count_out", INT32, None)
    return g.model(producer="test", version="0")


def _run(model: onnx.ModelProto, scores: np.ndarray, count: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"scores": scores, "count_in": count})


def _collapsed_grid_points(scores: np.ndarray, count: np.ndarray, k: int) -> int:
    """Grid points whose first float32 argmin lies below their lower neighbour (independent NumPy loop)."""
    hits = 0
    for row, c in zip(scores, count):
        d = select_one(row, int(c), k_max=k, n_ref=197, dtype=np.float32)
        if len(d.cdf) < 2:
            continue
        for y in d.grid:
            lower = int(np.searchsorted(d.cdf, y, side="right")) - 1
            hits += int(np.argmin(np.abs(y - d.cdf))) < lower
    return hits


@pytest.mark.parametrize("mode,dynamic_n", [("static", False), ("dynamic", False), ("dynamic", True)])
def test_onnx_sampler_equals_reference_on_full_rows(mode, dynamic_n):
    rows = 0
    for name, scores, count in cases(seed=0):
        b, n = scores.shape
        for k in KS:
            idx, cnt = _run(_sampler_model(b, n, k, mode, dynamic_n=dynamic_n), scores, count)
            ref_idx, ref_cnt = select_reference(scores, count, k_max=k, n_ref=197, dtype=np.float32)
            if mode == "dynamic":
                ref_idx = ref_idx[:, : int(ref_cnt.max())]
            assert idx.dtype == np.int32 and cnt.dtype == np.int32
            np.testing.assert_array_equal(cnt, ref_cnt, err_msg=f"{name} K={k}: counts")
            np.testing.assert_array_equal(idx, ref_idx, err_msg=f"{name} K={k}: indices incl. padding")
            rows += b
    assert rows >= 2000


def test_cases_exercise_rounding_collapse():
    """The peaky rows make the first-argmin search do real work, so a sampler that returns the lower
    neighbour instead of the first of equal float32 distances fails the test above."""
    hits = sum(_collapsed_grid_points(s, c, 197) for name, s, c in cases(seed=0) if name.startswith("peaky"))
    assert hits >= 100, hits


def test_torch_sampler_equals_reference_on_the_same_rows():
    for name, scores, count in cases(seed=1):
        for k in KS:
            idx, cnt = select_tokens(torch.from_numpy(scores), torch.from_numpy(count), k_max=k, n_ref=197)
            ref_idx, ref_cnt = select_reference(scores, count, k_max=k, n_ref=197, dtype=np.float32)
            np.testing.assert_array_equal(cnt.numpy(), ref_cnt, err_msg=f"{name} K={k}")
            np.testing.assert_array_equal(idx.numpy(), ref_idx, err_msg=f"{name} K={k}")


def test_onnx_sampler_hand_vectors(vectors):
    for case in vectors["sampling"]:
        row = np.array([[0.0] + case["scores"]], dtype=np.float32)
        n = row.shape[1]
        idx, cnt = _run(_sampler_model(1, n, case["k"], "static", dynamic_n=False), row, np.array([n], np.int32))
        kept = case["expected_kept"]
        assert int(cnt[0]) == 1 + len(kept)
        assert idx[0].tolist() == [0] + kept + [0] * (idx.shape[1] - 1 - len(kept))


@pytest.mark.parametrize("b", [1, 4])
def test_no_tensor_grows_with_grid_times_patches(b):
    """Every value the sampler computes, measured by running it with all intermediates exposed, holds
    at most M * (sqrt(P) + 2) elements per image: nothing of M x P."""
    n, k = 197, 197
    p, m = n - 1, grid_size(k, 197)
    model = _sampler_model(b, n, k, "static", dynamic_n=False)
    inner = [o for node in model.graph.node for o in node.output if o]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in inner if o not in ("indices",))
    scores = np.random.default_rng(3).dirichlet(np.full(n, 0.1), size=b).astype(np.float32)
    outs = _run(model, scores, np.full(b, n, np.int32))
    sizes = {o.name: v.size // b for o, v in zip(model.graph.output, outs)}
    bound = m * (math.isqrt(p) + 2)
    worst = max(sizes, key=sizes.get)
    assert sizes[worst] <= bound < m * p // 4, f"{worst} holds {sizes[worst]} elements per image (bound {bound})"


def test_onnx_sampler_clamps_count_in():
    """count_in outside [1, n] is clamped (docs/ATS_RULE.md 8): 0 and -3 keep only CLS; 15 of 10 = 10."""
    scores = np.random.default_rng(4).dirichlet(np.full(10, 0.5), size=4).astype(np.float32)
    scores[3] = scores[2]
    count = np.array([0, -3, 15, 10], np.int32)
    idx, cnt = _run(_sampler_model(4, 10, 5, "static", dynamic_n=False), scores, count)
    assert cnt[:2].tolist() == [1, 1] and idx[:2].tolist() == [[0] * 5, [0] * 5]
    assert cnt[2] == cnt[3] and idx[2].tolist() == idx[3].tolist() != [0] * 5  # rows 2, 3 differ only by count


def test_grid_points_lie_on_the_last_axis():
    """Per-grid-point values of rank 3 are [B, width, M]: ONNX Runtime's CPU broadcasting loops once per
    contiguous span, so a [B, M, width] layout with a short last axis (or a [B, M, 1] column) costs one
    call per grid point (measured 6-8 us per node against about 2 us for the same op on [B, width, M])."""
    n, k = 197, 99
    m = grid_size(k, 197)  # 98 grid points, 196 patches: the two axes cannot be confused
    model = _sampler_model(2, n, k, "static", dynamic_n=False)
    inner = [o for node in model.graph.node for o in node.output if o]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in inner if o not in ("indices",))
    scores = np.random.default_rng(5).dirichlet(np.full(n, 0.1), size=2).astype(np.float32)
    outs = _run(model, scores, np.full(2, n, np.int32))
    rank3 = {o.name: v.shape for o, v in zip(model.graph.output, outs) if v.ndim == 3}
    per_grid = {name: shape for name, shape in rank3.items() if m in shape}
    assert any(shape[1] > 2 for shape in per_grid.values()), rank3  # the search blocks are among them
    wrong = {name: shape for name, shape in per_grid.items() if shape[-1] != m}
    assert not wrong, f"grid axis not last: {wrong}"


def test_timing_probe_cuts_stage_by_stage():
    """stop_after (benchmarks only) keeps every node up to its stage and returns the first K_out slots."""
    from ats_deploy.exporters.sampler import STAGES

    def probe(stage):
        g = GraphBuilder("probe", opset=17)
        scores, count = g.input("scores", FLOAT, [2, 11]), g.input("count_in", INT32, [2])
        idx, cnt = emit_portable_sampler(g, scores, count, n=11, k_max=6, n_ref=197, mode="static", stop_after=stage)
        g.op("Identity", idx, outputs=["indices"])
        g.op("Identity", cnt, outputs=["count_out"])
        g.output("indices", INT32, None)
        g.output("count_out", INT32, None)
        return g.model(producer="test", version="0")

    x = np.random.default_rng(3).random((2, 11), dtype=np.float32)
    c = np.full(2, 11, np.int32)
    ops = []
    for stage in STAGES:
        m = probe(stage)
        ops.append([n.op_type for n in m.graph.node])
        idx, cnt = _run(m, x, c)
        assert idx.tolist() == [list(range(6))] * 2 and cnt.tolist() == [6, 6]
    full = [n.op_type for n in _sampler_model(2, 11, 6, "static", dynamic_n=False).graph.node]
    # Each cut keeps strictly more of the sampler: its op counts grow stage by stage up to the full graph's.
    sizes = [len(op) for op in ops]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) and sizes[-1] < len(full)
    assert "TopK" not in ops[0] and ops[1].count("TopK") == 1 and ops[3].count("TopK") == 2
    with pytest.raises(ValueError, match="stop_after must be one of"):
        probe("compact")
    g = GraphBuilder("probe", opset=17)
    with pytest.raises(ValueError, match="static slot count"):
        emit_portable_sampler(g, "s", "c", n="n", k_max=6, n_ref=197, mode="dynamic", stop_after="sort")
