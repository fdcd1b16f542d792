"""INT8 calibration: bad settings and bad data are one-line refusals; batches, limits and the data hash
behave as stated; int8_violations sees each broken invariant (each graph below breaks exactly one)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

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
    assert any("Q/DQ on an ATS node" in v for v in _broken(int8_graph, rename_to_ats))
