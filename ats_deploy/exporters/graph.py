"""A small ONNX graph builder: named ops, deduplicated constants, initializers from NumPy.

The exporter writes the ViT graph op by op rather than tracing PyTorch: that keeps exact control over
what TensorRT sees (LayerNormalization as one op, the sampler's float32 path, plugin nodes in place of
the portable subgraph with every other node identical, size tensors in the dynamic mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["GraphBuilder", "Dim"]

Dim = int | str  # a static size, or the name of a 1-element int64 tensor holding it


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, name: str, *, opset: int, prefix: str = "") -> None:
        self.name = name
        self.prefix = prefix  # prepended to generated names, to splice into an existing graph safely
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.custom_domains: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self._counter = 0
        self.scope = ""

    # -- naming -------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{self.prefix}{self.scope}{hint}_{self._counter}"

    # -- values -------------------------------------------------------------------------------
    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-D
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A deduplicated constant initializer (scalars stay 0-D)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(f"{self.prefix}const_{len(self._consts)}", arr)
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str | None] | None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape)))
        return name

    # -- ops ----------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, domain: str = "", name=None, **attrs):
        """Add a node; returns its output name (one output) or a list of names."""
        hint = op_type.lower()
        outs = [self.fresh(hint) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        node = helper.make_node(op_type, list(inputs), outs, name=name or self.fresh(op_type), domain=domain, **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def dim(self, value: Dim) -> str:
        """A 1-element int64 tensor for a static or dynamic size."""
        return self.const([value]) if isinstance(value, int) else value

    def shape_of(self, tensor: str, axis: int) -> str:
        """Dimension ``axis`` of ``tensor`` as a 1-element int64 tensor."""
        return self.op("Shape", tensor, start=axis, end=axis + 1)

    def arange(self, start: int, end: Dim, dtype=np.int64) -> str:
        """[start, end) as a 1-D tensor; a constant when ``end`` is static."""
        if isinstance(end, int):
            return self.const(np.arange(start, end), dtype=dtype)
        stop = self.op("Squeeze", end, self.const([0]))
        rng = self.op("Range", self.const(start), stop, self.const(1))
        return rng if dtype == np.int64 else self.op("Cast", rng, to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def model(self, *, producer: str, version: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in sorted(self.custom_domains.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer, producer_version=version)
        model.ir_version = min(model.ir_version, 10)  # ONNX Runtime and TensorRT 10.3 read IR <= 10
        for k, v in (metadata or {}).items():
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        return model


FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT32 = TensorProto.INT32
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL
