"""INT8 calibration: bad settings and bad data are one-line refusals; batches, limits and the data hash
behave as stated; int8_violations sees each broken invariant (each graph below breaks exactly one)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ats_deploy.calibration.int8 import CalibrationSettings, _as_batches, int8_violations, quantize_int8
from ats_deploy.errors import InputError
from ats_deploy.inputs import Preprocess


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "minmax"}, "calibration method 'minmax' is unknown"),
        ({"method": "percentile", "percentile": 0.0}, "percentile 0.0 is out of range"),
        ({"method": "percentile", "percentile": 100.5}, "percentile 100.5 is out of range"),
        ({"method": "entropy", "num_bins": 300}, "entropy needs num_bins >= 2 * num_quantized_bins (510)"),
    ],
)
def test_settings_are_refused_with_the_fix(kw, match):
    with pytest.raises(InputError) as err:
        CalibrationSettings(**kw).validate()
    assert match in str(err.value)
    assert CalibrationSettings(method="percentile", percentile=100.0).validate().percentile == 100.0


PRE = Preprocess(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_batches_from_a_loader_limit_and_hash():
    """A one-shot generator of mixed [B,C,H,W] / [C,H,W] items; the hash ignores batching, follows pixels."""
    x = _x(7)
    gen = (b for b in (x[:3], x[3], x[4:]))
    batches, n, sha = _as_batches(gen, PRE, limit=None)
    assert n == 7 and [len(b) for b in batches] == [3, 1, 3]
    _, n5, _ = _as_batches([x], PRE, limit=5)
    assert n5 == 5
    same = _as_batches([x[:2], x[2:]], PRE, limit=None)[2]
    assert same == sha and _as_batches([_x(7, seed=1)], PRE, limit=None)[2] != sha


@pytest.mark.parametrize(
    "data,match",
    [
        (42, "calibration data of type int is not a folder, an array or an iterable of arrays"),
        ([np.zeros((2, 3, 9, 9), np.float32)], "calibration batch 0 has shape [2, 3, 9, 9]"),
        ([np.zeros((2, 3, 8, 8), np.int64)], "calibration batch 0 has shape [2, 3, 8, 8] and dtype int64"),
        ([], "the calibration data is empty"),
    ],
)
def test_bad_calibration_data(data, match):
    with pytest.raises(InputError) as err:
        _as_batches(data, PRE, limit=None)
    assert match in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def int8_graph(tiny_ckpt):
    from ats_deploy.calibration.int8 import collect_ranges
    from ats_deploy.exporters.onnx import GraphOptions, build_graph
    from ats_deploy.model.config import resolve_ats

    model = build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, resolve_ats(tiny_ckpt.config), GraphOptions(batch=2))
    amax = collect_ranges(
        model, [_x(4).repeat(8, axis=2).repeat(8, axis=3)], CalibrationSettings(method="max"), progress=False
    )
    return quantize_int8(model, amax)


def _broken(model, edit):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    edit(m)
    return int8_violations(m)


def _init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def test_int8_violations_sees_each_broken_invariant(int8_graph):
    assert int8_violations(int8_graph) == []
    q = next(n for n in int8_graph.graph.node if n.op_type == "QuantizeLinear")

    def bad_zero_point(m):
        t = _init(m, q.input[2])
        t.CopyFrom(numpy_helper.from_array(np.ones_like(numpy_helper.to_array(t)), t.name))

    def bad_scale(m):
        t = _init(m, q.input[1])
        t.CopyFrom(numpy_helper.from_array(-np.abs(numpy_helper.to_array(t)), t.name))

    def fp32_scale(m):
        t = _init(m, q.input[1])
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def rename_to_ats(m):
        node = next(n for n in m.graph.node if n.name == q.name)
        node.name = "blocks.3/ats/" + node.name

    assert any("zero point must be an int8 initializer of zeros" in v for v in _broken(int8_graph, bad_zero_point))
    assert any("scale must be a positive finite float16" in v for v in _broken(int8_graph, bad_scale))
    assert any("scale must be a positive finite float16" in v for v in _broken(int8_graph, fp32_scale))

    def zero_scale(m):  # zero is not positive: every value would quantise to 0
        t = _init(m, q.input[1])
        t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))

    assert any("scale must be a positive finite float16" in v for v in _broken(int8_graph, zero_scale))
    assert any("Q/DQ on an ATS node" in v for v in _broken(int8_graph, rename_to_ats))


def _linear_matmul(m):
    """The first MatMul whose two inputs both come from DequantizeLinear, with its two DQ nodes."""
    producer = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        srcs = [producer.get(x) for x in n.input]
        if n.op_type == "MatMul" and all(p is not None and p.op_type == "DequantizeLinear" for p in srcs):
            return n, srcs[0], srcs[1]
    raise AssertionError("no quantised MatMul")


def test_int8_violations_see_the_matmul_and_scale_layout_breaks(int8_graph):
    def q_feeds_a_second_user(m):
        a_dq = _linear_matmul(m)[1]
        q_out = a_dq.input[0]
        m.graph.node.append(helper.make_node("Identity", [q_out], ["extra_user"], name="extra"))

    def activation_not_quantised(m):
        mm, a_dq, _ = _linear_matmul(m)
        q = next(n for n in m.graph.node if a_dq.input[0] in n.output)
        mm.input[0] = q.input[0]  # the float activation straight into the MatMul

    def weight_axis_0(m):
        _, _, w_dq = _linear_matmul(m)
        kept = [a for a in w_dq.attribute if a.name != "axis"]
        del w_dq.attribute[:]
        w_dq.attribute.extend(kept + [helper.make_attribute("axis", 0)])

    def weight_float(m):
        _, _, w_dq = _linear_matmul(m)
        t = _init(m, w_dq.input[0])
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def per_channel_activation(m):
        _, a_dq, _ = _linear_matmul(m)
        t = _init(m, a_dq.input[1])
        t.CopyFrom(numpy_helper.from_array(np.repeat(numpy_helper.to_array(t).reshape(1), 4), t.name))

    assert any("must feed exactly one DequantizeLinear" in v for v in _broken(int8_graph, q_feeds_a_second_user))
    assert any("only one MatMul input is quantised" in v for v in _broken(int8_graph, activation_not_quantised))
    per_channel = "weight must be int8 [in, out] with per-output-channel scales on axis 1"
    assert any(per_channel in v for v in _broken(int8_graph, weight_axis_0))
    assert any(per_channel in v for v in _broken(int8_graph, weight_float))
    assert any("activation scale must be per tensor" in v for v in _broken(int8_graph, per_channel_activation))


def test_a_calibration_cache_is_used_only_for_the_same_model_data_and_settings(tmp_path):
    """Each mismatch is named in the reason the cache is ignored; the matching cache is returned."""
    from ats_deploy.calibration.int8 import _cache_load, _cache_save

    path = tmp_path / "calib.json"
    st = CalibrationSettings(method="max")
    assert _cache_load(path, model_sha="m", data_sha="d", settings=st) == (None, "")
    _cache_save(path, model_sha="m", data_sha="d", settings=st, images=12, amax={"blocks.0.attn.qkv": 1.5})
    doc, why = _cache_load(path, model_sha="m", data_sha="d", settings=st)
    assert why == "" and doc["amax"] == {"blocks.0.attn.qkv": 1.5}
    assert "belongs to another model" in _cache_load(path, model_sha="x", data_sha="d", settings=st)[1]
    assert "other calibration data" in _cache_load(path, model_sha="m", data_sha="x", settings=st)[1]
    other = CalibrationSettings(method="entropy")
    assert "other settings (method max)" in _cache_load(path, model_sha="m", data_sha="d", settings=other)[1]
    path.write_text("{not json")
    assert "not readable JSON" in _cache_load(path, model_sha="m", data_sha="d", settings=st)[1]
    path.write_text('{"format": "something else"}')
    assert "not an ats-deploy calibration cache" in _cache_load(path, model_sha="m", data_sha="d", settings=st)[1]


def test_calibration_warns_below_a_hundred_images_and_refuses_below_eight():
    from ats_deploy.calibration.int8 import _check_count

    assert _check_count(100) == []
    assert "only 99 calibration images" in _check_count(99)[0]
    assert _check_count(8) != [] and "use 100 or more" in _check_count(8)[0]
    with pytest.raises(InputError, match="only 7 calibration image"):
        _check_count(7)


def test_max_is_the_default_calibration_method_everywhere():
    """max ranges are the default (measured on the demo model: 99.0% int8 top-1 agreement vs 95.3% with
    entropy); the settings, calibrate() and calibrate_export() all default to it."""
    import inspect

    from ats_deploy.calibration.int8 import calibrate, calibrate_export

    assert CalibrationSettings().method == "max"
    for fn in (calibrate, calibrate_export):
        assert inspect.signature(fn).parameters["method"].default == "max", fn.__name__
