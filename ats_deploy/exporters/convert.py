"""Turn the plugin form into the portable form, so ONNX Runtime can run (and check) its surroundings.

Each ``ats::AdaptiveTokenSampler`` node is replaced by the portable subgraph with the same inputs and
outputs (the dynamic mode's 0-D size tensor included); every other node, initializer and name is kept,
so running the converted graph in ONNX Runtime proves the plugin form's gathers, masks and shapes.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..errors import InputError
from .graph import INT64, Dim, GraphBuilder
from .sampler import MODES, PLUGIN_DOMAIN, PLUGIN_OP, _reduce, emit_portable_sampler

__all__ = ["plugin_to_portable", "plugin_nodes"]


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == PLUGIN_OP and n.domain == PLUGIN_DOMAIN]


def _static_dim(inferred: onnx.ModelProto, name: str, axis: int) -> int | None:
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) > axis and dims[axis].HasField("dim_value"):
                return int(dims[axis].dim_value)
    return None


def plugin_to_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every sampler plugin node expanded into standard ONNX ops.

    Nodes are expanded one at a time, in graph order, re-running shape inference in between: ONNX
    cannot infer through an unknown plugin op, and a later stage's static token count is only known
    once the earlier stage is standard ops.
    """
    if not plugin_nodes(model):
        raise InputError("the model has no AdaptiveTokenSampler nodes; it is already in the portable form")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    step = 0
    while plugin_nodes(out):
        out = _expand_first(out, step)
        step += 1
    keep = [o for o in out.opset_import if o.domain != PLUGIN_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _expand_first(model: onnx.ModelProto, step: int) -> onnx.ModelProto:
    node = plugin_nodes(model)[0]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    inferred = onnx.shape_inference.infer_shapes(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = {v: k for k, v in MODES.items()}[int(attrs["mode"])]
    g = GraphBuilder("expand", opset=opset, prefix=f"ats_expand_{step}/")
    g.scope = "ats/"
    n: Dim | None = _static_dim(inferred, node.input[0], 1)
    if n is None:
        if mode == "static":
            raise InputError(f"plugin node {node.name}: static mode needs a static token count; re-export the model")
        n = g.shape_of(node.input[0], 1)
    indices, count = emit_portable_sampler(
        g, node.input[0], node.input[1], n=n, k_max=int(attrs["k_max"]), n_ref=int(attrs["n_ref"]), mode=mode
    )
    g.op("Identity", indices, outputs=[node.output[0]])
    g.op("Identity", count, outputs=[node.output[1]])
    if len(node.output) > 2 and node.output[2]:
        size = _reduce(g, "ReduceMax", g.cast(count, INT64), [0], keepdims=0)
        g.op("Identity", size, outputs=[node.output[2]])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    at = next(i for i, nd in enumerate(nodes) if nd.name == node.name)
    del out.graph.node[:]
    out.graph.node.extend(nodes[:at] + g.nodes + nodes[at + 1 :])
    out.graph.initializer.extend(g.initializers)
    return out
