"""The exported graphs: contents (what TensorRT will see) and ONNX Runtime vs PyTorch parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ats_deploy.exporters.onnx import GraphOptions, build_graph
from ats_deploy.model.config import ATSConfig, resolve_ats
from ats_deploy.reports.parity import compare_outputs
from ats_deploy.runtime.ort_runner import OrtRunner
from ats_deploy.runtime.torch_runner import TorchRunner

FORBIDDEN = {"Unique", "NonZero", "Loop", "If", "Scan"}


def _run_both(ckpt, ats, x, opts):
    model = build_graph(ckpt.config, ckpt.state_dict, ats, opts)
    onnx.checker.check_model(model, full_check=True)
    with TorchRunner(ckpt, ats) as t:
        ref = t.infer({"pixels": x})
    with OrtRunner(model.SerializeToString()) as o:
        got = o.infer({"pixels": x})
    return model, ref, got


@pytest.mark.parametrize("shape", ["static", "dynamic"])
@pytest.mark.parametrize("max_k", [None, "33", "40,30,20,60"])
def test_ort_matches_torch(tiny_ckpt, tiny_inputs, shape, max_k):
    ats = resolve_ats(tiny_ckpt.config, max_k=max_k, shape_mode=shape)
    _, ref, got = _run_both(tiny_ckpt, ats, tiny_inputs, GraphOptions(batch=8))
    res = compare_outputs(ref, got, blocks=ats.blocks)
    assert res.logits_max_abs <= 1e-4
    assert res.top1_agreement == 1.0
    assert res.kept_agreement >= 0.995, res
    for b in ats.blocks:
        assert got[f"tokens_{b}"].shape == ref[f"tokens_{b}"].shape


def test_dynamic_batch(tiny_ckpt, tiny_inputs):
    ats = resolve_ats(tiny_ckpt.config, max_k="30")
    model = build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ats, GraphOptions(dynamic_batch=True))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with OrtRunner(model.SerializeToString()) as o, TorchRunner(tiny_ckpt, ats) as t:
        for n in (1, 3, 8):
            res = compare_outputs(
                t.infer({"pixels": tiny_inputs[:n]}), o.infer({"pixels": tiny_inputs[:n]}), blocks=ats.blocks
            )
            assert res.passed, res.failures


def test_distilled_export(tiny_distilled_ckpt, tiny_inputs):
    ck = tiny_distilled_ckpt
    for shape in ("static", "dynamic"):
        ats = resolve_ats(ck.config, max_k="25", shape_mode=shape)
        _, ref, got = _run_both(ck, ats, tiny_inputs, GraphOptions(batch=8))
        res = compare_outputs(ref, got, blocks=ats.blocks, prefix_tokens=2)
        assert res.passed, res.failures


def test_dense_graph_has_no_sampler(tiny_ckpt, tiny_inputs):
    _, ref, got = _run_both(tiny_ckpt, ATSConfig(), tiny_inputs, GraphOptions(batch=8))
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4)
    assert set(got) == {"logits"}


def test_graph_contents(tiny_ckpt):
    ats = resolve_ats(tiny_ckpt.config)
    model = build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ats, GraphOptions())
    ops = [n.op_type for n in model.graph.node]
    assert not FORBIDDEN & set(ops)
    assert ops.count("LayerNormalization") == 2 * tiny_ckpt.config.depth + 1
    assert model.opset_import[0].version >= 17
    assert ops.count("CumSum") >= len(ats.blocks)
    # Score and sampler path in float32: every tensor feeding CumSum / TopK / a comparison is float32 or int64.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in inferred.graph.node:
        if node.op_type in ("CumSum", "TopK", "Greater", "Less") and node.name.split("/")[1:2] == ["ats"]:
            allowed = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
            assert {types.get(i) for i in node.input[:2] if i in types} <= allowed
    sampler_nodes = [n for n in model.graph.node if "/ats/" in n.name]
    assert sampler_nodes and {n.op_type for n in sampler_nodes} >= {"TopK", "CumSum", "GatherElements"}
    assert [o.name for o in model.graph.output][:3] == ["logits", "tokens_2", "count_2"]


@pytest.mark.parametrize("shape", ["static", "dynamic"])
def test_plugin_form(tiny_ckpt, shape):
    ats = resolve_ats(tiny_ckpt.config, max_k="40", shape_mode=shape)
    plugin = build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ats, GraphOptions(sampler="plugin"))
    portable = build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ats, GraphOptions())
    onnx.checker.check_model(plugin)
    nodes = [n for n in plugin.graph.node if n.op_type == "AdaptiveTokenSampler"]
    assert len(nodes) == len(ats.blocks)
    for node, k in zip(nodes, ats.k_schedule):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "ats"
        assert attrs == {
            "plugin_namespace": b"ats",
            "plugin_version": b"1",
            "k_max": k,
            "n_ref": tiny_ckpt.config.n_ref,
            "mode": 1 if shape == "dynamic" else 0,
        }
        assert len(node.output) == (3 if shape == "dynamic" else 2)
    assert any(o.domain == "ats" for o in plugin.opset_import)

    # Everything outside the score/sampler path is identical between the two forms.
    def outside(m):
        return [
            (n.op_type, [onnx.helper.get_attribute_value(a) for a in n.attribute])
            for n in m.graph.node
            if "/ats/" not in n.name
        ]

    assert outside(plugin) == outside(portable)
    weights = {i.name for i in portable.graph.initializer if not i.name.startswith("const_")}
    assert weights and weights == {i.name for i in plugin.graph.initializer if not i.name.startswith("const_")}


@pytest.mark.parametrize("shape", ["static", "dynamic"])
@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_plugin_form_surroundings_run_in_ort(tiny_ckpt, tiny_inputs, shape, dynamic_batch):
    """Expanding the plugin nodes back to standard ops gives exactly the portable form's outputs."""
    from ats_deploy.exporters.convert import plugin_nodes, plugin_to_portable

    ats = resolve_ats(tiny_ckpt.config, max_k="40,30,50,20", shape_mode=shape)
    opts = GraphOptions(batch=8, dynamic_batch=dynamic_batch)
    plugin = build_graph(
        tiny_ckpt.config, tiny_ckpt.state_dict, ats, GraphOptions(**{**opts.__dict__, "sampler": "plugin"})
    )
    portable = build_graph(tiny_ckpt.config, tiny_ckpt.state_dict, ats, opts)
    expanded = plugin_to_portable(plugin)
    assert not plugin_nodes(expanded) and len(plugin_nodes(plugin)) == 4
    onnx.checker.check_model(expanded, full_check=True)
    with OrtRunner(expanded.SerializeToString()) as a, OrtRunner(portable.SerializeToString()) as b:
        got, want = a.infer({"pixels": tiny_inputs}), b.infer({"pixels": tiny_inputs})
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
