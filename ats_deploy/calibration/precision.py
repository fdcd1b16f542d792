"""Shared pieces of the precision passes (fp16.py, int8.py): graph facts, checks, and precision parity.

TensorRT 11 builds strongly typed networks only, so the precision of every layer is decided here, in the
ONNX graph, not by builder flags (docs/ATS_RULE.md section 5). Both passes rely on names the exporter guarantees:
nodes of the ATS score and sampler path are named ``blocks.<i>/ats/...`` (plugin nodes are also found by
their ``ats`` domain), and a Linear layer is a MatMul whose second input is the initializer
``<timm name>.weight.T`` ([in, out]).
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import InputError
from ..reports.parity import ParityResult, Tolerances, compare_outputs

__all__ = [
    "ATS_MARK",
    "PRECISIONS",
    "PRECISION_TOLERANCES",
    "LinearSite",
    "PrecisionParity",
    "artifact_name",
    "compare_precision",
    "format_precision_parity",
    "is_ats_node",
    "linear_sites",
    "load_model",
    "model_sha256",
    "refuse_quantized",
    "run_precision_parity",
    "tensor_types",
    "topological_sort",
    "upgrade_opset",
]

ATS_MARK = "/ats/"  # exporters/onnx.py names every score/sampler node "blocks.<i>/ats/..."
PLUGIN_DOMAIN = "ats"
PRECISIONS = ("fp16", "int8")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul", "MatMulInteger")
_LINEAR = re.compile(r"^(?P<prefix>.+)\.weight\.T$")
_BLOCK = re.compile(r"^blocks\.(?P<i>\d+)\.")

# Gates measured against the fp32 PyTorch model (not against the fp32 ONNX graph): top-1 agreement and
# the logits' cosine. Kept sets are reported, not gated: ATS picks are discontinuous (a 1e-3 change of a
# score moves a grid point across a decision boundary, and the low-scored background tokens a trained
# model keeps as a buffer have near-equal scores), so reduced precision swaps near-tied tokens without
# changing what the model sees of the object; top-1 and logits measure whether that matters.
PRECISION_TOLERANCES: dict[str, Tolerances] = {
    "fp16": Tolerances(logits_atol=float("inf"), top1_min=0.99, kept_min=0.0),
    "int8": Tolerances(logits_atol=float("inf"), top1_min=0.97, kept_min=0.0),
}
# Logits cosine, mean over images. Measured on the trained demo model (512 held-out images): fp16 0.9997,
# int8 (max calibration) 0.998; top-1 agreement 99.0% for both.
COSINE_MIN = {"fp16": 0.995, "int8": 0.99}


def artifact_name(base: str, precision: str) -> str:
    """``model.onnx`` -> ``model.fp16.onnx``; ``model.plugin.onnx`` -> ``model.plugin.fp16.onnx``."""
    stem = base[: -len(".onnx")] if base.endswith(".onnx") else base
    return f"{stem}.{precision}.onnx"


def load_model(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, bytes]:
    """A model and its serialised bytes (the bytes are what caches and manifests hash)."""
    if isinstance(model, onnx.ModelProto):
        return model, model.SerializeToString()
    p = Path(model)
    if not p.is_file():
        raise InputError(f"ONNX file {p} does not exist; run ats-deploy export first")
    data = p.read_bytes()
    try:
        m = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises its own DecodeError; any failure here means "not ONNX"
        raise InputError(f"{p} is not a readable ONNX model ({str(exc)[:80]}); pass an exported model.onnx") from None
    if any(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer):
        m = onnx.load(str(p))
    return m, data


def model_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_ats_node(node: onnx.NodeProto) -> bool:
    """A node of the score/CDF/sampler path: kept float32 and never quantised."""
    return ATS_MARK in node.name or node.domain == PLUGIN_DOMAIN


def refuse_quantized(model: onnx.ModelProto, *, what: str = "model") -> None:
    """One-line error for a graph that already holds quantisation ops (quantising twice compounds error)."""
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QDQ_OPS})
    if ops:
        raise InputError(
            f"the {what} is already quantised (has {', '.join(ops)}); pass the float32 model.onnx of ats-deploy export"
        )


def refuse_fp16(model: onnx.ModelProto, *, what: str = "model") -> None:
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        raise InputError(f"the {what} is already float16; pass the float32 model.onnx from ats-deploy export")


@dataclass(frozen=True)
class LinearSite:
    """One Linear layer's MatMul: its activation input, weight initializer and where it sits."""

    node: str  # MatMul node name
    activation: str  # input A, [.., in]
    weight: str  # initializer B, [in, out]
    layer: str  # timm prefix, e.g. blocks.3.attn.qkv
    block: int | None  # transformer block index (None outside the blocks)
    kind: str  # qkv | proj | fc1 | fc2 | head | other


def linear_sites(model: onnx.ModelProto) -> list[LinearSite]:
    """Every MatMul whose B is a ``*.weight.T`` initializer, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        m = _LINEAR.match(n.input[1])
        if not m:
            continue
        layer = m.group("prefix")
        b = _BLOCK.match(layer)
        kind = layer.rsplit(".", 1)[-1]
        if kind not in ("qkv", "proj", "fc1", "fc2"):
            kind = "head" if layer.startswith("head") else "other"
        out.append(LinearSite(n.name, n.input[0], n.input[1], layer, int(b.group("i")) if b else None, kind))
    return out


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value known to the graph (inputs, initializers, value_info, outputs)."""
    types: dict[str, int] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    for n in model.graph.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            types[n.output[0]] = to
        elif n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def topological_sort(model: onnx.ModelProto) -> None:
    """Stable topological order in place (passes that append nodes at the end leave the graph unsorted)."""
    nodes = list(model.graph.node)
    produced_by: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            produced_by[o] = i
    deps = [{produced_by[x] for x in n.input if x in produced_by and produced_by[x] != i} for i, n in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    pending = [len(d) for d in deps]
    ready = [i for i, c in enumerate(pending) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise RuntimeError("internal error: the graph has a cycle after the precision pass; please report it")
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at default-domain ``opset`` or later (ONNX's version converter), unnamed nodes named.

    Float16 scales on QuantizeLinear/DequantizeLinear need opset 19; the converter moves the reduction
    axes of opset 17 graphs into Constant inputs, which get the consumer's name (so ``/ats/`` stays true).
    """
    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if cur >= opset:
        return model
    from onnx import version_converter

    try:
        up = version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise InputError(
            f"cannot convert the graph from opset {cur} to {opset} ({str(exc)[:120]}); re-export with --opset {opset}"
        ) from None
    consumers: dict[str, onnx.NodeProto] = {}
    for n in up.graph.node:
        for x in n.input:
            consumers.setdefault(x, n)
    for k, n in enumerate(up.graph.node):
        if not n.name:
            user = consumers.get(n.output[0]) if n.output else None
            n.name = f"{user.name}/{n.op_type.lower()}_{k}" if user is not None else f"{n.op_type.lower()}_{k}"
    up.ir_version = min(up.ir_version, 10)  # ONNX Runtime and TensorRT 10.3 read IR <= 10
    return up


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_graph(model: onnx.ModelProto, *, what: str) -> None:
    """onnx.checker with full type checking; a failure is our bug, so the message says so."""
    from ..errors import ExportError

    try:
        if model.ByteSize() < 1_800_000_000:
            onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"internal error: the {what} graph fails onnx.checker ({str(exc)[:200]}); please report it"
        ) from None


def make_value(name: str, elem_type: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None)


# -- precision parity ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockFlips:
    """Kept-set differences at one ATS block, per image: |kept_ref symmetric-difference kept_got|."""

    block: int
    set_agreement: float  # fraction of images whose kept SET (order ignored) is identical
    flips_mean: float
    flips_max: int
    kept_mean: float  # K' of the reference, for scale


@dataclass(frozen=True)
class PrecisionParity:
    """A reduced-precision graph vs the fp32 PyTorch model; ``base`` is the standard parity record."""

    precision: str
    base: ParityResult
    logits_cosine_mean: float
    logits_cosine_min: float
    kept_set_agreement: float  # over (image, block) pairs, order ignored
    flips_per_image: list[int] = field(default_factory=list)  # summed over blocks
    blocks: list[BlockFlips] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base"] = self.base.to_dict()
        d["passed"] = self.passed
        d["flips_per_image_mean"] = float(np.mean(self.flips_per_image)) if self.flips_per_image else 0.0
        return d


def _kept_sets(tokens: np.ndarray, counts: np.ndarray, prefix: int) -> list[set[int]]:
    return [set(int(t) for t in tokens[i, prefix : int(counts[i])]) for i in range(len(counts))]


def compare_precision(
    ref: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    *,
    precision: str,
    blocks: Iterable[int],
    prefix_tokens: int = 1,
    tolerances: Tolerances | None = None,
    cosine_min: float | None = None,
    labels: np.ndarray | None = None,
) -> PrecisionParity:
    """Compare a precision variant's outputs with the fp32 reference's (same images, same output names)."""
    blocks = tuple(blocks)
    tol = tolerances or PRECISION_TOLERANCES.get(precision, Tolerances())
    base = compare_outputs(ref, got, blocks=blocks, prefix_tokens=prefix_tokens, tolerances=tol, labels=labels)
    a, b = ref["logits"].astype(np.float64), got["logits"].astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    per_image = np.zeros(len(a), dtype=np.int64)
    stats, same_pairs, pairs = [], 0, 0
    for blk in blocks:
        sa = _kept_sets(ref[f"tokens_{blk}"], ref[f"count_{blk}"], prefix_tokens)
        sb = _kept_sets(got[f"tokens_{blk}"], got[f"count_{blk}"], prefix_tokens)
        flips = np.array([len(x ^ y) for x, y in zip(sa, sb)], dtype=np.int64)
        per_image += flips
        same_pairs += int((flips == 0).sum())
        pairs += len(flips)
        stats.append(
            BlockFlips(
                block=int(blk),
                set_agreement=float(np.mean(flips == 0)) if len(flips) else 1.0,
                flips_mean=float(flips.mean()) if len(flips) else 0.0,
                flips_max=int(flips.max()) if len(flips) else 0,
                kept_mean=float(np.mean([len(x) for x in sa])) if sa else 0.0,
            )
        )
    failures = list(base.failures)
    cmin = COSINE_MIN.get(precision, 0.0) if cosine_min is None else cosine_min
    cos_mean = float(cos.mean()) if len(cos) else 1.0
    if cos_mean < cmin:
        failures.append(f"logits cosine mean {cos_mean:.4f} < {cmin:.4f}")
    return PrecisionParity(
        precision=precision,
        base=base,
        logits_cosine_mean=cos_mean,
        logits_cosine_min=float(cos.min()) if len(cos) else 1.0,
        kept_set_agreement=same_pairs / pairs if pairs else 1.0,
        flips_per_image=[int(v) for v in per_image],
        blocks=stats,
        failures=failures,
    )


def format_precision_parity(res: PrecisionParity, *, title: str | None = None) -> str:
    b = res.base
    fl = np.asarray(res.flips_per_image) if res.flips_per_image else np.zeros(1)
    lines = [
        f"{title or res.precision + ' vs fp32 PyTorch'}: {b.images} images, {'PASS' if res.passed else 'FAIL'}",
        f"  top-1    agreement {b.top1_agreement:.2%}  (gate {b.tolerances.top1_min:.2%})",
        *(
            [
                f"  accuracy vs true labels ({b.labelled} images): fp32 {b.ref_accuracy:.2%}, "
                f"{res.precision} {b.accuracy:.2%}"
            ]
            if b.labelled
            else []
        ),
        f"  logits   cosine mean {res.logits_cosine_mean:.5f}  min {res.logits_cosine_min:.5f}"
        f"  max abs {b.logits_max_abs:.3g}",
        f"  kept     exact (set+order) {b.kept_agreement:.2%}  set {res.kept_set_agreement:.2%}"
        f" of {b.kept_pairs} (image, block) pairs",
        f"  flipped  tokens per image (all blocks) mean {fl.mean():.1f}  p90 {np.percentile(fl, 90):.0f}"
        f"  max {fl.max()}",
    ]
    if res.blocks:
        lines.append("  block  K' mean  set agree  flips mean  max")
        for s in res.blocks:
            lines.append(
                f"  {s.block:>5}  {s.kept_mean:7.1f}  {s.set_agreement:9.1%}  {s.flips_mean:10.2f}  {s.flips_max:3d}"
            )
    if res.kept_set_agreement < 1.0:
        lines.append(
            "  kept sets are reported, not gated: a patch whose score puts it within rounding of a grid point "
            f"moves in or out when {res.precision} rounding shifts the scores; top-1 and logits judge the effect"
        )
    lines += [f"  FAILED: {f}" for f in res.failures]
    return "\n".join(lines)


def run_precision_parity(
    out_dir: str | Path,
    precision: str,
    *,
    inputs: str | Path | None = None,
    count: int = 256,
    seed: int = 1,
    model: str | Path | None = None,
    trust_pickle: bool = False,
    form: str = "portable",
) -> tuple[PrecisionParity, dict]:
    """The ``precision`` graph of an export directory vs the fp32 PyTorch model, through ONNX Runtime.

    ``form='plugin'`` runs ``model.plugin.<precision>.onnx`` with its plugin nodes expanded to the portable
    sampler (exporters/convert.py), which proves the plugin form's float16/int8 surroundings on CPU.
    Held-out inputs: random normal pixels with ``seed`` (calibration uses its own data) or ``inputs``.
    """
    from ..exported import load_export_setup
    from ..reports.parity import run_chunks
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.torch_runner import TorchRunner

    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    out = Path(out_dir)
    name = artifact_name("model.plugin.onnx" if form == "plugin" else "model.onnx", precision)
    path = out / name
    if not path.exists():
        how = "ats-deploy export --precision fp16" if precision == "fp16" else "ats-deploy calibrate"
        raise InputError(f"{path} is missing; create it with {how}")
    st = load_export_setup(out, inputs=inputs, count=count, seed=seed, model=model, trust_pickle=trust_pickle)
    x, label, batch, ats, ck = st.pixels, st.label, st.batch, st.ats, st.checkpoint
    src: bytes | Path = path
    if form == "plugin":
        from ..exporters.convert import plugin_to_portable

        src = plugin_to_portable(onnx.load(str(path))).SerializeToString()
    with TorchRunner(ck, ats) as tr:
        ref = run_chunks(tr, x, batch)
    with OrtRunner(src) as orr:
        got = run_chunks(orr, x, batch)
    res = compare_precision(
        ref, got, precision=precision, blocks=ats.blocks, prefix_tokens=st.prefix_tokens, labels=st.labels
    )
    return res, {"inputs": label, "backend": "onnxruntime", "reference": "torch", "onnx": str(path)}


def record_artifacts(
    out_dir: Path, models: dict[str, onnx.ModelProto], *, precision: str, details: dict | None = None
) -> dict[str, str]:
    """Write ``models`` into an export directory and record them in its manifest, atomically together."""
    import json

    from ..artifacts import MANIFEST, AtomicWriter, read_manifest, save_onnx, sha256_file

    man = read_manifest(out_dir)
    files: dict[str, str] = {}
    with AtomicWriter(Path(out_dir)) as w:
        for name, m in models.items():
            tmp = w.path(name)
            save_onnx(m, tmp)
            files[name] = sha256_file(tmp)
        for name, digest in files.items():
            man.setdefault("artifacts", {})[name] = {"sha256": digest, "precision": precision}
        man.setdefault("precisions", {})[precision] = {"files": sorted(files), **(details or {})}
        w.path(MANIFEST).write_text(json.dumps(man, indent=2, default=str) + "\n")
    return files
