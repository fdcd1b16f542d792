"""FP16 graph: a float32 export turned into float16, with the ATS score/CDF/sampler path kept float32.

What TensorRT's strongly typed mode needs (docs/ATS_RULE.md section 5): the precision is in the graph. This pass

- converts every float tensor and initializer to float16, except the nodes named ``*/ats/*`` (score
  MatMul, Softmax, norms, TopK, CumSum, comparisons) and the ``ats::AdaptiveTokenSampler`` plugin node,
  whose float inputs and outputs stay float32; the plugin node's attributes are not touched;
- keeps the graph's float inputs and outputs float32 (``pixels`` in, ``logits`` out);
- keeps LayerNormalization as one fused op with float16 data and ``stash_type=1``: ONNX defines that as
  "mean and variance in float32", ONNX Runtime's CPU kernel accumulates in float, and TensorRT's ONNX
  parser turns ``stash_type`` into ``INormalizationLayer::setComputePrecision(kFLOAT)``;
- gives float constants shared between the two regions one copy per precision (no float16 rounding of a
  float32 constant, no Cast on a constant), and folds the converter's float32 -> float16 -> float32
  round trips between float32 nodes, so the score path never passes through float16 storage.

The conversion itself is ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16``
(the maintained descendant of onnxconverter-common's converter, shipped inside onnxruntime, so no new
dependency); the name-based block list and the clean-up around it are ours.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import DependencyError, InputError
from .precision import (
    check_graph,
    is_ats_node,
    load_model,
    opset_of,
    refuse_fp16,
    refuse_quantized,
    tensor_types,
    topological_sort,
)

__all__ = ["FP16Report", "convert_to_fp16", "fp16_violations", "write_fp16"]

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
MIN_OPSET = 17  # LayerNormalization; a decomposed LayerNorm overflows in float16


@dataclass(frozen=True)
class FP16Report:
    """What the pass did, for logs and tests."""

    nodes: int
    fp32_nodes: int  # */ats/* and plugin nodes kept float32
    casts_before: int
    casts_after: int
    folded_round_trips: int
    split_constants: int


def _ort_converter():
    try:
        from onnxruntime.transformers import float16
    except ImportError as exc:
        raise DependencyError(
            "the FP16 pass needs ONNX Runtime's float16 converter; pip install 'ats-deploy[export]'"
        ) from exc
    return float16


def _split_shared_constants(model: onnx.ModelProto, blocked: set[str]) -> int:
    """Give float initializers used by both float32 (blocked) and float16 nodes a float32 twin."""
    inits = {t.name: t for t in model.graph.initializer if t.data_type == FLOAT}
    users: dict[str, set[bool]] = {}
    for n in model.graph.node:
        for x in n.input:
            if x in inits:
                users.setdefault(x, set()).add(n.name in blocked)
    shared = {name for name, kinds in users.items() if kinds == {True, False}}
    for name in shared:
        twin = onnx.TensorProto()
        twin.CopyFrom(inits[name])
        twin.name = name + ".fp32"
        model.graph.initializer.append(twin)
    for n in model.graph.node:
        if n.name in blocked:
            for i, x in enumerate(n.input):
                if x in shared:
                    n.input[i] = x + ".fp32"
    return len(shared)


def _clean_casts(model: onnx.ModelProto) -> int:
    """Fold float32 -> float16 -> float32 Cast pairs and drop Casts to the type a value already has."""
    types = tensor_types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    folded = 0
    for n in model.graph.node:
        if n.op_type != "Cast":
            continue
        to = next(a.i for a in n.attribute if a.name == "to")
        src = n.input[0]
        p = producer.get(src)
        p_to = None
        if p is not None and p.op_type == "Cast":
            p_to = next((a.i for a in p.attribute if a.name == "to"), None)
        if to == FLOAT and p_to == FLOAT16 and types.get(p.input[0]) == FLOAT:
            rename[n.output[0]] = p.input[0]  # fp32 -> fp16 -> fp32: use the fp32 value itself
            folded += 1
        elif types.get(src) == to and n.output[0] not in outputs:
            rename[n.output[0]] = src
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            while x in rename:
                x = rename[x]
            n.input[i] = x
    _prune(model)
    _restore_names(model)
    return folded


def _restore_names(model: onnx.ModelProto) -> None:
    """The converter renames a float32 node's output ``x`` to ``x_cast_to_fp16`` and re-creates ``x`` as a
    float16 Cast; once that Cast is folded away, give the float32 value its original name back."""
    suffix = "_cast_to_fp16"
    names = {x for n in model.graph.node for x in list(n.input) + list(n.output)}
    names |= {v.name for v in list(model.graph.input) + list(model.graph.output)}
    rename = {}
    for n in model.graph.node:
        for o in n.output:
            if o.endswith(suffix) and o[: -len(suffix)] not in names:
                rename[o] = o[: -len(suffix)]
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            n.input[i] = rename.get(x, x)
        for i, x in enumerate(n.output):
            n.output[i] = rename.get(x, x)
    for v in model.graph.value_info:
        v.name = rename.get(v.name, v.name)


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    live = {o.name for o in model.graph.output}
    keep = []
    for n in reversed(list(model.graph.node)):
        if any(o in live for o in n.output) or n.domain not in ("", "ai.onnx"):
            keep.append(n)
            live.update(x for x in n.input if x)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    used = {x for n in model.graph.node for x in n.input} | live
    inits = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    vis = [v for v in model.graph.value_info if v.name in used or v.name in live]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vis)


def _infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape/type inference; through plugin nodes via their portable expansion (same tensor names).

    ONNX cannot infer through an unknown custom op, and the converter only inserts Casts where it knows
    a value is float, so every value after the first plugin node would be left untyped otherwise.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    if not any(n.domain == "ats" for n in model.graph.node):
        return inferred
    from ..exporters.convert import plugin_to_portable

    full = onnx.shape_inference.infer_shapes(plugin_to_portable(model))
    names = {x for n in model.graph.node for x in list(n.input) + list(n.output)}
    have = {v.name for v in inferred.graph.value_info} | {v.name for v in inferred.graph.output}
    for vi in full.graph.value_info:
        if vi.name in names and vi.name not in have:
            inferred.graph.value_info.append(vi)
    return inferred


def convert_to_fp16(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, FP16Report]:
    """The float16 form of a float32 export (portable or plugin form); see the module docstring."""
    src, _ = load_model(model)
    refuse_quantized(src)
    refuse_fp16(src)
    if opset_of(src) < MIN_OPSET:
        raise InputError(
            f"the graph has opset {opset_of(src)}; FP16 needs opset >= {MIN_OPSET} (fused LayerNormalization): "
            f"re-export with --opset {MIN_OPSET}"
        )
    m = onnx.ModelProto()
    m.CopyFrom(src)
    for n in m.graph.node:
        if not n.name:
            raise InputError("the graph has unnamed nodes; pass a model written by ats-deploy export")
        if n.op_type == "LayerNormalization":
            del_attr = [a for a in n.attribute if a.name == "stash_type"]
            for a in del_attr:
                n.attribute.remove(a)
            n.attribute.append(helper.make_attribute("stash_type", FLOAT))
    blocked = {n.name for n in m.graph.node if is_ats_node(n)}
    casts_before = sum(n.op_type == "Cast" for n in m.graph.node)
    split = _split_shared_constants(m, blocked)
    m = _infer_types(m)
    float16 = _ort_converter()
    quiet = logging.getLogger("onnxruntime.transformers.float16")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            m = float16.convert_float_to_float16(
                m,
                keep_io_types=True,
                disable_shape_infer=True,
                op_block_list=[],  # only our named nodes: the default list would also pin TopK/Min/Max/Range
                node_block_list=sorted(blocked),
            )
    finally:
        quiet.setLevel(level)
    topological_sort(m)
    folded = _clean_casts(m)
    topological_sort(m)
    del m.graph.value_info[:]  # stale after the renames; inference recreates them, the export had none
    check_graph(m, what="float16")
    bad = fp16_violations(m)
    if bad:
        from ..errors import ExportError

        raise ExportError(f"internal error: the float16 pass broke an invariant ({bad[0]}); please report it")
    report = FP16Report(
        nodes=len(m.graph.node),
        fp32_nodes=len(blocked),
        casts_before=casts_before,
        casts_after=sum(n.op_type == "Cast" for n in m.graph.node),
        folded_round_trips=folded,
        split_constants=split,
    )
    m.metadata_props.append(onnx.StringStringEntryProto(key="ats_deploy.precision", value="fp16"))
    return m, report


def fp16_violations(model: onnx.ModelProto, *, reference: onnx.ModelProto | None = None) -> list[str]:
    """Invariants of a float16 graph, as readable strings (empty = all hold).

    Float inputs/outputs of */ats/* and plugin nodes are float32; graph float IO is float32; every
    LayerNormalization is one op with stash_type 1; no float16 constant is non-finite; and, given the
    float32 ``reference``, the plugin nodes' attributes are unchanged.
    """
    inferred = _infer_types(model)
    types = tensor_types(inferred)
    bad = []
    for n in model.graph.node:
        if is_ats_node(n):
            for x in list(n.input) + list(n.output):
                t = types.get(x)
                if t == FLOAT16:
                    bad.append(f"{n.name} ({n.op_type}) touches float16 value {x}")
        if n.op_type == "LayerNormalization":
            st = next((a.i for a in n.attribute if a.name == "stash_type"), 1)
            if st != FLOAT:
                bad.append(f"{n.name}: LayerNormalization stash_type {st} (want 1, float32 statistics)")
    for vi in list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type.elem_type
        if t == FLOAT16:
            bad.append(f"graph IO {vi.name} is float16")
    for t in model.graph.initializer:
        if t.data_type == FLOAT16 and not np.isfinite(numpy_helper.to_array(t)).all():
            bad.append(f"initializer {t.name} has non-finite float16 values")
    if reference is not None:
        ref = {n.name: n for n in reference.graph.node if n.domain == "ats"}
        for n in model.graph.node:
            if n.name in ref and list(n.attribute) != list(ref[n.name].attribute):
                bad.append(f"plugin node {n.name} attributes changed")
    return bad


def write_fp16(out_dir: str | Path) -> dict[str, str]:
    """Write ``model.fp16.onnx`` (and ``model.plugin.fp16.onnx`` when the plugin form exists) next to an
    export's float32 graphs and record them in its manifest; returns {file name: sha256}."""
    from .precision import artifact_name, record_artifacts

    out = Path(out_dir)
    written: dict[str, onnx.ModelProto] = {}
    for base in ("model.onnx", "model.plugin.onnx"):
        if (out / base).exists():
            m, _ = convert_to_fp16(out / base)
            written[artifact_name(base, "fp16")] = m
    if not written:
        raise InputError(f"{out} has no model.onnx; run ats-deploy export -o {out} first")
    return record_artifacts(out, written, precision="fp16", details={"io": "float32", "ats_path": "float32"})
