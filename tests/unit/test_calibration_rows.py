"""INT8 calibration reads only valid token rows, and which count governs each Linear input.

An ATS block's projection runs before its gather when the block keeps every slot (K_out = n): its rows are
the previous stage's; with fewer slots the gather comes first and its rows are this stage's. Expected
ranges are recomputed here with NumPy from the graph's own intermediate tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ats_deploy.calibration.int8 import CalibrationSettings, _governing_count, collect_ranges
from ats_deploy.calibration.precision import linear_sites
from ats_deploy.exporters.onnx import GraphOptions, build_graph
from ats_deploy.model.config import resolve_ats


def _graph(tiny_ckpt, max_k):
    ats = resolve_ats(tiny_ckpt.config, max_k=max_k)  # tiny: 65 tokens, 6 blocks, ATS at 2..5
    return build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ats, GraphOptions(batch=4))


@pytest.mark.parametrize(
    "max_k,expected",
    [
        # K = 65 keeps every slot: block 2's proj runs over block 2's input rows (no count before block 2).
        (
            "65",
            {
                (0, "fc1"): None,
                (2, "qkv"): None,
                (2, "proj"): None,
                (2, "fc1"): 2,
                (3, "qkv"): 2,
                (3, "proj"): 2,
                (3, "fc2"): 3,
                (5, "proj"): 4,
            },
        ),
        # K = 40: block 2 (65 -> 40 slots) gathers first, so its projection reads its own kept rows; blocks
        # 3..5 get 40 slots and keep 40, so they are back to projecting their input rows.
        (
            "40",
            {
                (0, "fc1"): None,
                (2, "qkv"): None,
                (2, "proj"): 2,
                (2, "fc1"): 2,
                (3, "qkv"): 2,
                (3, "proj"): 2,
                (3, "fc2"): 3,
                (5, "proj"): 4,
            },
        ),
        # K = 30,65,65,20: block 5 (30 slots in, 20 out) gathers first again.
        ("30,65,65,20", {(2, "proj"): 2, (3, "proj"): 2, (4, "proj"): 3, (5, "proj"): 5, (5, "qkv"): 4}),
    ],
)
def test_governing_count_per_site(tiny_ckpt, max_k, expected):
    sites = {(s.block, s.kind): s for s in linear_sites(_graph(tiny_ckpt, max_k))}
    got = {key: _governing_count(sites[key], [2, 3, 4, 5]) for key in expected}
    assert got == expected


@pytest.mark.parametrize("max_k", ["65", "30"])
def test_ranges_come_from_valid_rows_only(tiny_ckpt, max_k):
    model = _graph(tiny_ckpt, max_k)
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    amax = collect_ranges(model, [x], CalibrationSettings(method="max"), progress=False)
    sites = {s.layer: s for s in linear_sites(model)}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    want = ["blocks.2.attn.proj", "blocks.3.attn.proj", "blocks.3.mlp.fc1", "blocks.4.attn.qkv"]
    for layer in want:
        m.graph.output.append(onnx.helper.make_tensor_value_info(sites[layer].activation, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = [dict(zip(names, sess.run(None, {"pixels": x[i : i + 4]}))) for i in (0, 4)]
    # K = 65 keeps every slot (block 2 has no count before it: all 65 rows); K = 30: block 2 gathers first
    # (its own count), block 3 keeps its 30 slots (projection over its input rows: count_2).
    rows_from = {
        "blocks.2.attn.proj": None if max_k == "65" else "count_2",
        "blocks.3.attn.proj": "count_2",
        "blocks.3.mlp.fc1": "count_3",
        "blocks.4.attn.qkv": "count_3",
    }

    def amax_over(act, count):
        rows = [o[act][i, : (int(o[count][i]) if count else None)] for o in outs for i in range(4)]
        return float(np.abs(np.concatenate(rows)).max())

    discriminating = 0
    for layer in want:
        act = sites[layer].activation
        expect = amax_over(act, rows_from[layer])
        assert amax[layer] == pytest.approx(expect, rel=1e-6), layer
        other = "count_3" if rows_from[layer] == "count_2" else "count_2"
        discriminating += amax_over(act, other) != expect
    assert discriminating, "no site where the other count's rows give another range: the check could not fail"


def test_histogram_methods_also_read_valid_rows_only(tiny_ckpt):
    """Padding slots repeat a kept token, so they never move a max range; they do move a percentile. With
    the 50th percentile of |x| (4096 bins) the range must sit at the median of the valid rows' |x|, not
    at the median of every row's (both computed here with NumPy, to two bins)."""
    model = _graph(tiny_ckpt, "30")
    x = np.random.default_rng(1).standard_normal((8, 3, 64, 64)).astype(np.float32)
    settings = CalibrationSettings(method="percentile", percentile=50.0, num_bins=4096)
    got = collect_ranges(model, [x], settings, progress=False)
    layer = "blocks.4.attn.qkv"  # 3-D input [B, 30 slots, C], rows governed by count_3
    act = {s.layer: s for s in linear_sites(model)}[layer].activation
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = [dict(zip(names, sess.run(None, {"pixels": x[i : i + 4]}))) for i in (0, 4)]
    valid = np.abs(np.concatenate([o[act][i, : int(o["count_3"][i])] for o in outs for i in range(4)]))
    every = np.abs(np.concatenate([o[act].reshape(-1, o[act].shape[-1]) for o in outs]))
    bin_w = float(max(valid.max(), every.max())) / 4096
    assert got[layer] == pytest.approx(np.percentile(valid, 50), abs=2 * bin_w)
    assert abs(np.percentile(every, 50) - np.percentile(valid, 50)) > 4 * bin_w  # the check could fail
