"""INT8 graph: post-training calibration on CPU and explicit QuantizeLinear/DequantizeLinear.

TensorRT 11 has no INT8 calibrators and no INT8 builder flag: an INT8 engine is a strongly typed build of
a graph that says where int8 is (docs/ATS_RULE.md section 5). The graph written here is the FP16 graph of
:mod:`.fp16` plus Q/DQ pairs on the inputs of the Linear MatMuls of the transformer blocks (qkv, proj,
fc1, fc2) and nothing else:

- weights: int8 initializers, symmetric, per output channel (axis 1 of the [in, out] MatMul B), with a
  DequantizeLinear; activations: QuantizeLinear -> DequantizeLinear, symmetric, per tensor; zero point 0
  everywhere, float16 scales (opset 19; older graphs are converted), so the DQ output feeds the float16
  MatMul directly and TensorRT fuses the pair into an int8 GEMM;
- no Q/DQ on LayerNorm, GELU, Softmax, residual adds, the patch-embedding Conv, the head or any */ats/*
  node; the attention batched MatMuls (q @ k^T, attn @ v) stay float16: their operands are per-head
  activations with outlier heads (one per-tensor scale fits them badly), softmax probabilities need
  more than 8 bits where ATS reads them, the CLS row of q @ k^T *is* the score path, and TensorRT's
  fused float16 attention kernels are already fast at ViT sizes.

Calibration runs the float32 graph in ONNX Runtime with the targeted activations as extra outputs, over
valid token rows only (ATS padding slots repeat CLS and would bias the histograms). Ranges come from ONNX
Runtime's calibration collectors: ``max`` (amax), ``entropy`` (KL-divergence threshold, TensorRT's
classic method) and ``percentile`` (of |x|). ``max`` is the default, as in NVIDIA ModelOpt's INT8
configuration: on the trained demo DeiT-Ti (512 held-out images, all four Linear kinds quantised) it keeps
99.0% top-1 agreement with float32 (logits cosine 0.998) where entropy's clipped ranges keep 95.3%
(0.986), and leaving qkv in float did not help entropy (94.7%). They are cached next to the output, keyed
by the sha256 of the model bytes, of the calibration data and of the settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import DependencyError, InputError
from ..inputs import Preprocess, load_inputs
from ..progress import progress_bar
from .precision import (
    LinearSite,
    check_graph,
    is_ats_node,
    linear_sites,
    load_model,
    model_sha256,
    refuse_fp16,
    refuse_quantized,
    upgrade_opset,
)

__all__ = [
    "CalibrationSettings",
    "CalibrationResult",
    "METHODS",
    "QUANTIZED_KINDS",
    "calibrate",
    "calibrate_export",
    "collect_ranges",
    "int8_violations",
    "quantize_int8",
]

log = logging.getLogger(__name__)

Method = Literal["entropy", "max", "percentile"]
METHODS: tuple[str, ...] = ("entropy", "max", "percentile")
QUANTIZED_KINDS = ("qkv", "proj", "fc1", "fc2")
QDQ_OPSET = 19  # float16 scales on QuantizeLinear/DequantizeLinear
MIN_IMAGES, WARN_IMAGES = 8, 100
CACHE_FORMAT = "ats-deploy-calibration/1"
QMAX = 127  # symmetric int8: [-127, 127] (TensorRT's explicit quantisation clamps to [-128, 127])
FP16_TINY = 2.0**-14  # smallest normal float16: a smaller scale would lose precision as a subnormal


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that changes the computed ranges (all of it goes into the cache key)."""

    method: str = "max"
    percentile: float = 99.99
    num_bins: int = 1024  # histogram bins (entropy: two-sided; percentile: of |x|, 2048 recommended)
    num_quantized_bins: int = 255  # entropy: 255 two-sided levels = symmetric int8
    valid_rows_only: bool = True

    def validate(self) -> CalibrationSettings:
        if self.method not in METHODS:
            raise InputError(f"calibration method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise InputError(f"percentile {self.percentile} is out of range; pass a value in (0, 100], e.g. 99.99")
        if self.method == "entropy" and self.num_bins < 2 * self.num_quantized_bins:
            raise InputError(f"entropy needs num_bins >= 2 * num_quantized_bins ({2 * self.num_quantized_bins})")
        return self


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` did; ``amax`` maps Linear layer names to their input's calibrated |x| range."""

    output: Path | None
    amax: dict[str, float]
    settings: CalibrationSettings
    images: int
    model_sha256: str
    data_sha256: str
    cache_path: Path | None
    cache_hit: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output) if self.output else None
        d["cache_path"] = str(self.cache_path) if self.cache_path else None
        return d


# -- data ------------------------------------------------------------------------------------------


def _as_batches(
    data, pre: Preprocess, *, limit: int | None, skip_unreadable: bool = False
) -> tuple[list[np.ndarray], int, str]:
    """Calibration data as float32 NCHW batches, the image count and the sha256 of the pixels.

    ``data`` is an image/.npy folder or file, an array [N, C, H, W], or any iterable of arrays ([B, C, H, W]
    or [C, H, W]): a user's own loader. Iterables are materialised once (they may be one-shot), which is
    what lets the data be hashed for the cache before any calibration work.
    """
    want = (pre.channels, pre.size, pre.size)
    if isinstance(data, (str, Path)):
        try:
            arr, _ = load_inputs(data, pre, limit=limit, skip_unreadable=skip_unreadable)
        except PermissionError as exc:
            raise InputError(f"calibration data {data} is not readable ({exc.strerror}); check permissions") from None
        items: Iterable = [arr]
    elif isinstance(data, np.ndarray):
        items = [data]
    else:
        try:
            items = iter(data)
        except TypeError:
            raise InputError(
                f"calibration data of type {type(data).__name__} is not a folder, an array or an iterable of arrays"
            ) from None
    batches: list[np.ndarray] = []
    h = hashlib.sha256(str(want).encode())  # then the pixels image by image: batching does not matter
    n = 0
    for k, b in enumerate(items):
        b = np.asarray(b)
        if b.ndim == 3:
            b = b[None]
        if b.ndim != 4 or tuple(b.shape[1:]) != want or not np.issubdtype(b.dtype, np.floating):
            raise InputError(
                f"calibration batch {k} has shape {list(b.shape)} and dtype {b.dtype}; expected float "
                f"[N, {want[0]}, {want[1]}, {want[2]}] preprocessed as the manifest says"
            )
        if limit is not None and n + len(b) > limit:
            b = b[: limit - n]
        if len(b) == 0:
            break
        b = np.ascontiguousarray(b, dtype=np.float32)
        h.update(b.tobytes())
        batches.append(b)
        n += len(b)
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise InputError("the calibration data is empty; pass a folder of images or a non-empty array/loader")
    return batches, n, h.hexdigest()


def _check_count(n: int) -> list[str]:
    if n < MIN_IMAGES:
        raise InputError(
            f"only {n} calibration image(s); INT8 ranges need at least {MIN_IMAGES} "
            f"(a few hundred representative images recommended)"
        )
    if n < WARN_IMAGES:
        return [f"only {n} calibration images: ranges may not represent the data (use {WARN_IMAGES} or more)"]
    return []


def _rechunk(batches: list[np.ndarray], size: int) -> Iterable[tuple[np.ndarray, int]]:
    """Chunks of exactly ``size`` images (a static-batch graph), the last padded with repeats; yields
    (chunk, number of real images in it)."""
    flat = np.concatenate(batches) if len(batches) > 1 else batches[0]
    for i in range(0, len(flat), size):
        c = flat[i : i + size]
        real = len(c)
        if real < size:
            c = np.concatenate([c, np.repeat(c[-1:], size - real, axis=0)])
        yield c, real


# -- range collection ------------------------------------------------------------------------------


def _governing_count(site: LinearSite, ats_blocks: list[int]) -> int | None:
    """The ATS block whose count says how many rows of this MatMul's input are valid (None: all).

    qkv reads the previous stage's tokens; so does an ATS block's projection when the block gathers after
    it (K_out = n, nodes scoped ``/all_rows/`` by the exporter); the rest read this stage's tokens."""
    from ..exporters.onnx import ALL_ROWS

    if site.block is None:
        return None
    before = site.kind == "qkv" or ALL_ROWS in site.node
    limit = site.block - 1 if before else site.block
    prior = [b for b in ats_blocks if b <= limit]
    return prior[-1] if prior else None


class _Collector:
    """Per-tensor range statistics over batches, through ONNX Runtime's calibration collectors."""

    def __init__(self, s: CalibrationSettings) -> None:
        self.s = s
        self.amax: dict[str, float] = {}
        self.hist = None
        if s.method != "max":
            try:
                from onnxruntime.quantization.calibrate import HistogramCollector
            except ImportError as exc:
                raise DependencyError("INT8 calibration needs ONNX Runtime; pip install 'ats-deploy[export]'") from exc
            self.hist = HistogramCollector(
                method=s.method,
                symmetric=True,
                num_bins=s.num_bins,
                num_quantized_bins=s.num_quantized_bins,
                percentile=s.percentile,
                scenario="same",  # required; read only by the float8 "distribution" method, not offered here
            )

    def add(self, values: dict[str, np.ndarray]) -> None:
        for k, v in values.items():
            if v.size:
                self.amax[k] = max(self.amax.get(k, 0.0), float(np.abs(v).max()))
        if self.hist is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints progress to stdout
                self.hist.collect({k: v for k, v in values.items() if v.size})

    def result(self) -> dict[str, float]:
        if self.hist is None:
            return dict(self.amax)
        with contextlib.redirect_stdout(io.StringIO()):
            res = self.hist.compute_collection_result()
        out = {}
        for k, v in res.items():
            lo, hi = float(v[0]), float(v[1])
            out[k] = min(max(abs(lo), abs(hi)), self.amax.get(k, np.inf))
        return out


def collect_ranges(
    model: onnx.ModelProto,
    batches: list[np.ndarray],
    settings: CalibrationSettings,
    *,
    batch_size: int = 16,
    threads: int = 0,
    progress: bool = True,
    label: str = "",
) -> dict[str, float]:
    """|x| range of each quantised Linear layer's input (keyed by layer name) of a float32 model."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DependencyError("INT8 calibration needs ONNX Runtime; pip install 'ats-deploy[export]'") from exc
    if any(n.domain == "ats" for n in model.graph.node):
        from ..exporters.convert import plugin_to_portable

        model = plugin_to_portable(model)
    sites = [s for s in linear_sites(model) if s.kind in QUANTIZED_KINDS]
    if not sites:
        raise InputError("the model has no Linear MatMul (blocks.*.weight.T) to quantise; pass an ats-deploy export")
    ats_blocks = sorted(int(o.name.split("_")[1]) for o in model.graph.output if o.name.startswith("count_"))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in dict.fromkeys(s.activation for s in sites):
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    static = inp.shape[0] if isinstance(inp.shape[0], int) else None
    size = static or batch_size
    total = sum(len(b) for b in batches)
    names = [o.name for o in sess.get_outputs()]
    col = _Collector(settings)
    desc = f"calibrating {label or f'{len(sites)} MatMul inputs ({settings.method})'}: images"
    with progress_bar(progress, total, desc) as advance:
        for chunk, real in _rechunk(batches, size):
            outs = dict(zip(names, sess.run(names, {inp.name: chunk})))
            vals = {}
            for s in sites:
                a = outs[s.activation][:real]
                cb = _governing_count(s, ats_blocks)
                if settings.valid_rows_only and cb is not None and a.ndim == 3:
                    cnt = outs[f"count_{cb}"][:real]
                    a = np.concatenate([a[i, : int(cnt[i])] for i in range(real)])
                vals[s.layer] = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
            col.add(vals)
            advance(real)
        advance(0, description=f"calibrating {label or 'ranges'}: computing {settings.method} thresholds")
        res = col.result()
    return res


# -- the quantised graph ---------------------------------------------------------------------------


def _fp16_scale(x: np.ndarray | float) -> np.ndarray:
    return np.maximum(np.asarray(x, dtype=np.float32), FP16_TINY).astype(np.float16)


def quantize_int8(model: onnx.ModelProto | str | Path, amax: dict[str, float]) -> onnx.ModelProto:
    """The INT8 graph of a float32 export: its FP16 graph plus Q/DQ on the block Linear MatMuls' inputs.

    ``amax`` maps each quantised Linear layer (timm name, e.g. ``blocks.3.attn.qkv``) to the calibrated |x|
    range of its input (from :func:`collect_ranges` or :func:`calibrate`). Layer names, unlike generated
    tensor names, are the same in the portable and the plugin form, so one calibration serves both.
    """
    from .fp16 import convert_to_fp16

    src, _ = load_model(model)
    refuse_quantized(src)
    refuse_fp16(src)
    fp32_weights = {t.name: t for t in src.graph.initializer}
    m16, _ = convert_to_fp16(upgrade_opset(src, QDQ_OPSET))
    sites = [s for s in linear_sites(m16) if s.kind in QUANTIZED_KINDS]
    missing = [s.layer for s in sites if s.layer not in amax]
    if missing:
        raise InputError(
            f"no calibrated range for {len(missing)} Linear layer(s) (first: {missing[0]}); "
            "the ranges belong to another model: re-run ats-deploy calibrate"
        )
    g = m16.graph
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    drop = set()
    for s in sites:
        layer = s.layer
        # Activation: per tensor, symmetric.
        a_scale = _fp16_scale(float(amax[s.layer]) / QMAX)
        sn, zn = f"{layer}.input_scale", f"{layer}.input_zero_point"
        g.initializer.extend([numpy_helper.from_array(a_scale, sn), numpy_helper.from_array(np.int8(0), zn)])
        q = helper.make_node("QuantizeLinear", [s.activation, sn, zn], [f"{layer}.input_q"], name=f"{layer}/input/Q")
        dq = helper.make_node(
            "DequantizeLinear", [f"{layer}.input_q", sn, zn], [f"{layer}.input_dq"], name=f"{layer}/input/DQ"
        )
        # Weight: per output channel (axis 1 of [in, out]), symmetric, quantised from the float32 values.
        w = numpy_helper.to_array(fp32_weights[s.weight]).astype(np.float32)
        w_amax = np.abs(w).max(axis=0)
        w_scale = _fp16_scale(np.where(w_amax > 0, w_amax / QMAX, 1.0))
        w_q = np.clip(np.rint(w / w_scale.astype(np.float32)), -QMAX, QMAX).astype(np.int8)
        wq, ws, wz = f"{s.weight}.int8", f"{layer}.weight_scale", f"{layer}.weight_zero_point"
        g.initializer.extend(
            [
                numpy_helper.from_array(w_q, wq),
                numpy_helper.from_array(w_scale, ws),
                numpy_helper.from_array(np.zeros(w.shape[1], np.int8), wz),
            ]
        )
        wdq = helper.make_node("DequantizeLinear", [wq, ws, wz], [f"{s.weight}.dq"], name=f"{layer}/weight/DQ", axis=1)
        new_nodes[s.node] = [q, dq, wdq]
        drop.add(s.weight)
    nodes = []
    for n in g.node:
        if n.name in new_nodes:
            layer = next(s.layer for s in sites if s.node == n.name)
            nodes.extend(new_nodes[n.name])
            n.input[0], n.input[1] = f"{layer}.input_dq", f"{n.input[1]}.dq"
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    still_used = {x for n in g.node for x in n.input}
    keep = [t for t in g.initializer if t.name not in drop or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
    for p in list(m16.metadata_props):
        if p.key == "ats_deploy.precision":
            p.value = "int8"
    check_graph(m16, what="int8")
    bad = int8_violations(m16)
    if bad:
        from ..errors import ExportError

        raise ExportError(f"internal error: the INT8 pass broke an invariant ({bad[0]}); please report it")
    return m16


def int8_violations(model: onnx.ModelProto) -> list[str]:
    """Invariants of an INT8 graph as readable strings (empty = all hold): Q/DQ feed only the block Linear
    MatMuls (both inputs of each), int8 symmetric zero points, positive finite float16 scales, per-channel
    weight scales on axis 1, per-tensor activation scales, nothing quantised on */ats/* or other nodes."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    bad = []
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        if is_ats_node(n):
            bad.append(f"{n.name}: Q/DQ on an ATS node")
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
            bad.append(f"{n.name}: zero point must be an int8 initializer of zeros")
        sc = inits.get(n.input[1])
        if sc is None or sc.dtype != np.float16 or not np.all(np.isfinite(sc)) or np.any(sc <= 0):
            bad.append(f"{n.name}: scale must be a positive finite float16 initializer")
        if n.op_type == "QuantizeLinear":
            users = consumers.get(n.output[0], [])
            if len(users) != 1 or users[0].op_type != "DequantizeLinear":
                bad.append(f"{n.name}: QuantizeLinear must feed exactly one DequantizeLinear")
        else:
            for u in consumers.get(n.output[0], []):
                if u.op_type != "MatMul" or is_ats_node(u):
                    bad.append(f"{n.name}: DequantizeLinear feeds {u.op_type} {u.name}, not a Linear MatMul")
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        srcs = [producer.get(x) for x in n.input]
        dq = [p is not None and p.op_type == "DequantizeLinear" for p in srcs]
        if any(dq) and not all(dq):
            bad.append(f"{n.name}: only one MatMul input is quantised")
        if all(dq):
            w_dq = srcs[1]
            assert w_dq is not None
            axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
            w, sc = inits.get(w_dq.input[0]), inits.get(w_dq.input[1])
            if w is None or w.dtype != np.int8 or sc is None or axis != 1 or sc.shape != (w.shape[1],):
                bad.append(f"{n.name}: weight must be int8 [in, out] with per-output-channel scales on axis 1")
            a_dq = srcs[0]
            assert a_dq is not None  # all(dq): both inputs come from a DequantizeLinear
            a_sc = inits.get(a_dq.input[1])
            if a_sc is None or a_sc.size != 1:
                bad.append(f"{n.name}: activation scale must be per tensor")
    return bad


# -- the cache and the entry points ----------------------------------------------------------------


def _cache_load(path: Path, *, model_sha: str, data_sha: str, settings: CalibrationSettings) -> tuple[dict | None, str]:
    """A matching cached range table, or None with the reason it was not used ("" when there was none)."""
    if not path.exists():
        return None, ""
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None, f"ignoring calibration cache {path}: not readable JSON; recalibrating"
    if d.get("format") != CACHE_FORMAT:
        return None, f"ignoring calibration cache {path}: not an ats-deploy calibration cache; recalibrating"
    if d.get("model_sha256") != model_sha:
        return None, (
            f"ignoring calibration cache {path}: it belongs to another model "
            f"(sha256 {str(d.get('model_sha256'))[:12]}..., this one {model_sha[:12]}...); recalibrating"
        )
    if d.get("data_sha256") != data_sha:
        return None, f"ignoring calibration cache {path}: it was computed on other calibration data; recalibrating"
    if d.get("settings") != asdict(settings):
        old = (d.get("settings") or {}).get("method")
        return None, f"ignoring calibration cache {path}: computed with other settings (method {old}); recalibrating"
    return d, ""


def _cache_save(path: Path, *, model_sha: str, data_sha: str, settings: CalibrationSettings, images: int, amax) -> None:
    from ..exporters.export import versions

    doc = {
        "format": CACHE_FORMAT,
        "model_sha256": model_sha,
        "data_sha256": data_sha,
        "settings": asdict(settings),
        "images": images,
        "amax": {k: float(v) for k, v in sorted(amax.items())},
        "versions": versions(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not write calibration cache %s (%s)", path, exc.strerror)


def _default_preprocess(model: onnx.ModelProto, onnx_path: Path | None) -> Preprocess:
    """The manifest's preprocessing when the model sits in an export directory, else ImageNet's at the
    graph's input size."""
    if onnx_path is not None and (onnx_path.parent / "manifest.json").exists():
        from ..artifacts import read_manifest

        return Preprocess.from_dict(read_manifest(onnx_path.parent)["preprocessing"])
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return Preprocess(size=int(dims[2].dim_value), channels=int(dims[1].dim_value))


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def calibrate(
    onnx_path: str | Path | onnx.ModelProto,
    data,
    *,
    method: str = "max",
    output: str | Path | None = None,
    cache: str | Path | None | Literal[False] = None,
    preprocess: Preprocess | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    percentile: float = 99.99,
    num_bins: int | None = None,
    threads: int = 0,
    progress: bool = True,
    skip_unreadable: bool = False,
) -> CalibrationResult:
    """Calibrate a float32 export on ``data`` and (with ``output``) write its INT8 graph there.

    ``data``: an image folder / .npy file or folder (preprocessed by the manifest's or ImageNet's rules; grey,
    RGBA, palette and 16-bit images are converted), an array [N, C, H, W], or any iterable of such arrays
    (your own loader). At least 8 images are required, fewer than 100 warn.
    ``cache``: the range cache file (default ``calibration.json`` beside ``output`` or the model; False
    disables it). A cache made for other model bytes, data or settings is ignored with a message.
    """
    t0 = time.perf_counter()
    settings = CalibrationSettings(
        method=method,
        percentile=percentile,
        num_bins=num_bins or (2048 if method == "percentile" else 1024),
    ).validate()
    path = None if isinstance(onnx_path, onnx.ModelProto) else Path(onnx_path)
    model, raw = load_model(onnx_path)
    refuse_quantized(model)
    refuse_fp16(model)
    pre = preprocess or _default_preprocess(model, path)
    batches, n, data_sha = _as_batches(data, pre, limit=limit, skip_unreadable=skip_unreadable)
    warnings = _check_count(n)
    for w in warnings:
        _warn(w)
    msha = model_sha256(raw)
    cache_path: Path | None = None
    if cache is not False:
        anchor = Path(output).parent if output else (path.parent if path else None)
        cache_path = Path(cache) if cache else (anchor / "calibration.json" if anchor else None)
    hit = None
    if cache_path is not None:
        hit, why = _cache_load(cache_path, model_sha=msha, data_sha=data_sha, settings=settings)
        if why:
            warnings.append(why)
            _warn(why)
    if hit is not None:
        amax = {k: float(v) for k, v in hit["amax"].items()}
    else:
        amax = collect_ranges(model, batches, settings, batch_size=batch_size, threads=threads, progress=progress)
        if cache_path is not None:
            _cache_save(cache_path, model_sha=msha, data_sha=data_sha, settings=settings, images=n, amax=amax)
    out_path = None
    if output is not None:
        from ..artifacts import AtomicWriter, save_onnx

        q = quantize_int8(model, amax)
        out_path = Path(output)
        with AtomicWriter(out_path.parent) as w:
            save_onnx(q, w.path(out_path.name))
    return CalibrationResult(
        output=out_path,
        amax=amax,
        settings=settings,
        images=n,
        model_sha256=msha,
        data_sha256=data_sha,
        cache_path=cache_path,
        cache_hit=hit is not None,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
    )


def calibrate_export(
    out_dir: str | Path,
    data,
    *,
    method: str = "max",
    limit: int | None = None,
    batch_size: int = 16,
    percentile: float = 99.99,
    num_bins: int | None = None,
    progress: bool = True,
    skip_unreadable: bool = False,
) -> tuple[CalibrationResult, dict[str, str]]:
    """Calibrate an export directory's ``model.onnx`` and write ``model.int8.onnx`` (and
    ``model.plugin.int8.onnx`` when the plugin form exists, with the same ranges), the cache
    ``calibration.json`` and the manifest entries; returns the result and {file name: sha256}."""
    from ..artifacts import read_manifest
    from .precision import artifact_name, record_artifacts

    out = Path(out_dir)
    read_manifest(out)  # a checkpoint or an ONNX file given here: say what to pass instead
    src = out / "model.onnx"
    if not src.exists():
        raise InputError(f"{out} has no model.onnx; run ats-deploy export -o {out} first")
    res = calibrate(
        src,
        data,
        method=method,
        cache=out / "calibration.json",
        limit=limit,
        batch_size=batch_size,
        percentile=percentile,
        num_bins=num_bins,
        progress=progress,
        skip_unreadable=skip_unreadable,
    )
    models = {}
    for base in ("model.onnx", "model.plugin.onnx"):
        if (out / base).exists():
            models[artifact_name(base, "int8")] = quantize_int8(out / base, res.amax)
    details = {
        "method": res.settings.method,
        "images": res.images,
        "data_sha256": res.data_sha256,
        "cache": "calibration.json",
        "quantized": list(QUANTIZED_KINDS),
        "weights": "int8 symmetric per output channel",
        "activations": "int8 symmetric per tensor",
    }
    files = record_artifacts(out, models, precision="int8", details=details)
    return replace(res, output=out / "model.int8.onnx"), files
