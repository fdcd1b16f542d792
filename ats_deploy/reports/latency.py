"""Latency report: the ATS model and the dense model with the same weights, measured side by side.

Why side by side: on a shared or thermally throttled device (a Jetson in a box), two runs minutes apart
differ by more than ATS saves. Both models are timed round-robin in one process (alternating which goes
first), so noise hits both alike, and only their ratio is gated.

Timers: TensorRT engines are timed by trtexec (:mod:`ats_deploy.runtime.trtexec`: CUDA graph, no host
copies, spin-wait; ATS and dense engines in alternating rounds), which also gives the sampler plugin's own
time per layer profile; CUDA events around a CUDA-graph replay when the runner offers ``stage(x)`` +
``timed_step()`` (the torch CUDA runner), so no host copy is timed; otherwise ``time.perf_counter`` around
``infer`` (CPU backends, where outputs are host arrays anyway).

The report also holds kept tokens per ATS block (from the ``count_<i>`` outputs), GFLOPs per image
(static slots and data-dependent, see :mod:`.flops`), a parity summary against the PyTorch reference (or
the export's ``reference.npz`` where torch is absent) and the environment (versions, device, Jetson power
mode and clocks). Files (report.json, report.md, PNG plots) are written under temporary names and renamed
into place together.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._json import json_default
from ..errors import ConfigError, DependencyError, GateFailed, InputError
from ..model.checkpoints import LoadedCheckpoint
from ..model.config import ATSConfig
from ..progress import progress_bar
from ..runtime.base import Runner
from ..runtime.ort_runner import OrtRunner
from .flops import CONVENTION, gflops_per_image, model_flops, slots_per_block

__all__ = [
    "BACKENDS",
    "REPORT_FORMAT",
    "LatencyReport",
    "summarize",
    "step_timer",
    "measure_interleaved",
    "ort_ats_share",
    "paired_ratio",
    "Ratio",
    "make_factory",
    "ort_sampler_form",
    "environment",
    "progress_bar",
    "report",
    "check_gate",
]

BACKENDS = ("torch", "onnxruntime", "tensorrt")
REPORT_FORMAT = "ats-deploy-report/1"

RunnerFactory = Callable[[ATSConfig, int], Runner]


# -- statistics and timing ----------------------------------------------------------------------------
def summarize(samples_ms: Sequence[float], batch: int) -> dict:
    """p50/p90/p99/mean/min in ms and throughput (images/s at the median) of one model at one batch."""
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "samples": int(a.size),
        "throughput_ips": batch * 1e3 / p50 if p50 > 0 else float("inf"),
    }


def step_timer(runner: Runner, x: np.ndarray) -> tuple[Callable[[], float], str]:
    """A no-argument callable returning the ms of one forward on ``x``, and the timer's name.

    Runners with ``stage(x)`` and ``timed_step() -> ms`` (device timers, no host copies) are used as such,
    and ``time_inference(x, iterations, warmup)`` (TrtRunner) one timed run at a time; any other runner is
    timed with ``perf_counter`` around ``infer`` (host copies included).
    """
    stage, timed = getattr(runner, "stage", None), getattr(runner, "timed_step", None)
    if callable(stage) and callable(timed):
        stage(x)
        graph = getattr(runner, "uses_graph", False)
        return timed, "cuda-events" + (" (CUDA graph replay)" if graph else "")
    device_times = getattr(runner, "time_inference", None)  # TrtRunner: CUDA events around the launch
    if callable(device_times):
        graph = getattr(runner, "use_graph", False)

        def one() -> float:
            return float(device_times(x, iterations=1, warmup=1)[0])

        return one, "cuda-events" + (" (CUDA graph launch)" if graph else "")
    feed = {"pixels": x}

    def run() -> float:
        t0 = time.perf_counter()
        runner.infer(feed)
        return (time.perf_counter() - t0) * 1e3

    return run, "perf_counter (around infer)"


def measure_interleaved(
    timers: Mapping[str, Callable[[], float]],
    *,
    warmup: int,
    reps: int,
    advance: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Run every timer ``warmup`` then ``reps`` times round-robin, reversing the order on odd rounds."""
    names = list(timers)
    for _ in range(warmup):
        for name in names:
            timers[name]()
            if advance:
                advance(1)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(float(timers[name]()))
            if advance:
                advance(1)
    return out


@dataclass(frozen=True)
class Ratio:
    """A measured latency ratio (variant / baseline) with a bootstrap confidence interval."""

    median: float  # median over rounds of the per-round ratio
    low: float
    high: float
    rounds: int
    confidence: float

    def text(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.confidence:.0%}, {self.rounds} rounds)"


def paired_ratio(
    variant_ms: Sequence[float],
    baseline_ms: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Ratio:
    """Median of the per-round ratios variant/baseline, with a percentile-bootstrap interval.

    The samples must come from :func:`measure_interleaved` (round r of both lists ran side by side), so a
    slow spell of the machine hits both terms of a ratio alike; the interval says how far the median
    could move on another run of the same length.
    """
    v = np.asarray(variant_ms, dtype=np.float64)
    b = np.asarray(baseline_ms, dtype=np.float64)
    if v.shape != b.shape or v.size == 0:
        raise ValueError(f"paired samples differ in length ({v.size} vs {b.size}) or are empty")
    r = v / b
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, r.size, size=(resamples, r.size))], axis=1)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Ratio(float(np.median(r)), float(lo), float(hi), int(r.size), confidence)


# -- backends -------------------------------------------------------------------------------------------
def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def make_factory(
    backend: str,
    ckpt: LoadedCheckpoint,
    *,
    opset: int = 17,
    threads: int = 0,
    fp16: bool = True,
    exported: tuple[ATSConfig, Path, int | None] | None = None,
    plugin_lib: str | os.PathLike[str] | None = None,
    ort_ops: str | os.PathLike[str] | None = None,
) -> tuple[RunnerFactory, dict]:
    """``factory(ats, batch) -> Runner`` for one backend, and a description of it for the report.

    ``exported`` = (ATS config, model.onnx path, static batch or None): the exported file is used as is
    where its ATS config and batch fit; every other (ATS config, batch) pair is rebuilt in memory from
    the same weights with :func:`build_graph` (the dense model always is).
    ``ort_ops`` (onnxruntime; default $ATS_ORT_OPS): libats_sampler_ort.so. With it, static-shape ATS models
    run in the plugin form, the sampler as one op per block (``model.plugin.onnx`` where the export has it);
    dynamic-shape ones keep the portable form, which the op does not serve.
    """
    cfg, sd = ckpt.config, ckpt.state_dict
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if ort_ops is not None and backend != "onnxruntime":
        raise ConfigError(f"--ort-ops is for --backend onnxruntime (the {backend} backend does not load it); drop it")

    def onnx_model(ats: ATSConfig, batch: int, sampler: str = "portable"):
        from ..exporters.onnx import GraphOptions, build_graph

        return build_graph(cfg, sd, ats, GraphOptions(batch=batch, opset=opset, sampler=sampler))  # type: ignore[arg-type]

    if backend == "torch":
        if _torch_cuda_available():
            from ..runtime.torch_cuda import TorchCudaRunner

            info = {"name": "torch", "device": "cuda", "precision": "fp16" if fp16 else "fp32", "cuda_graphs": True,
                    "sampler": "PyTorch (select_tokens)"}
            return (lambda ats, b: TorchCudaRunner(ckpt, ats, batch=b, fp16=fp16)), info
        try:
            from ..runtime.torch_runner import TorchRunner
        except ImportError as exc:  # pragma: no cover - torch missing entirely
            raise DependencyError("the torch backend needs PyTorch; pip install torch") from exc
        info = {"name": "torch", "device": "cpu", "precision": "fp32", "cuda_graphs": False,
                "sampler": "PyTorch (select_tokens)"}
        return (lambda ats, b: TorchRunner(ckpt, ats)), info

    if backend == "onnxruntime":

        from ..exporters.ort_op import ort_op_library

        lib = ort_op_library(ort_ops)

        def ort(ats: ATSConfig, batch: int) -> Runner:
            form = ort_sampler_form(ats, lib)
            if exported is not None and exported[0] == ats and exported[2] in (None, batch):
                path = exported[1] if form == "portable" else exported[1].with_name("model.plugin.onnx")
                if path.is_file():
                    return OrtRunner(path, threads=threads, spin=False, custom_ops=lib)
            proto = onnx_model(ats, batch, form)
            return OrtRunner(proto.SerializeToString(), threads=threads, spin=False, custom_ops=lib)

        info = {
            "name": "onnxruntime",
            "device": "cpu",
            "precision": "fp32",
            "cuda_graphs": False,
            "sampler": "portable subgraph" if lib is None else f"one op per block in static mode ({lib})",
            "ort_ops": None if lib is None else str(lib),
        }
        return ort, info

    trt = trt_runner_factory(fp16=fp16, plugin_lib=plugin_lib)

    def trt_model(ats: ATSConfig, batch: int) -> Runner:
        # ATS models use the plugin form (one fused sampler call per stage: what ships to the Jetson).
        proto = onnx_model(ats, batch, "plugin" if ats.enabled else "portable")
        return trt(proto, f"{'ats' if ats.enabled else 'dense'}_b{batch}", batch, cfg=cfg, ats=ats)

    info = {"name": "tensorrt", "device": "cuda", "precision": "fp32", "cuda_graphs": True,
            "sampler": "one plugin node per block (libats_sampler.so)"}
    return trt_model, info


def ort_sampler_form(ats: ATSConfig, ort_ops: object) -> str:
    """The sampler form ONNX Runtime runs ``ats`` in: "plugin" (one op per block) when the op library is
    there and the shapes are static, else "portable" (the op serves static mode only)."""
    return "plugin" if ort_ops is not None and ats.enabled and ats.shape_mode == "static" else "portable"


def trt_runner_factory(
    *, fp16: bool = True, plugin_lib: str | os.PathLike[str] | None = None
) -> Callable[..., Runner]:
    """``build(onnx_proto, tag, batch) -> Runner``: a TensorRT engine built on this device, in a TrtRunner.

    TensorRT is imported only here (through :mod:`ats_deploy.exporters.trt`). Each graph is written with
    a manifest into its own private temporary folder (removed at exit), built with
    :func:`~ats_deploy.exporters.trt.build_engine` (its engine cache makes reruns cheap) and loaded by
    :class:`~ats_deploy.runtime.trt_runner.TrtRunner`. Engines are strongly typed: their precision is the
    ONNX's (float32 here until an fp16 ONNX pass exists; ``fp16`` is accepted for symmetry and unused).
    ``plugin_lib``: the sampler plugin library the plugin-form (ATS) graphs need (default:
    $ATS_SAMPLER_PLUGIN).
    """
    try:
        from ..exporters import trt as trt_build
        from ..runtime.trt_runner import TrtRunner
    except ImportError as exc:
        raise DependencyError(
            f"the tensorrt backend is not available here ({exc}); run on the Jetson with TensorRT installed"
        ) from None
    import atexit

    from ..artifacts import MANIFEST, save_onnx, sha256_file
    from ..exporters.export import build_manifest, preprocess_for
    from ..exporters.onnx import GraphOptions

    root = Path(tempfile.mkdtemp(prefix="ats-deploy-trt-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)

    def build(proto, tag: str, batch: int, *, cfg, ats: ATSConfig | None = None) -> Runner:
        d = root / tag
        d.mkdir(parents=True, exist_ok=True)
        path = d / "model.onnx"
        save_onnx(proto, path)
        # build_engine only accepts graphs of ours: each one gets its manifest beside it.
        man = build_manifest(
            cfg,
            ats or ATSConfig(),
            GraphOptions(batch=batch),
            pre=preprocess_for(cfg),
            files={"model.onnx": sha256_file(path)},
            source={"kind": "report", "tag": tag},
        )
        (d / MANIFEST).write_text(json.dumps(man, indent=2))
        lib = Path(plugin_lib) if plugin_lib else None
        res = trt_build.build_engine(path, settings=trt_build.BuildSettings(plugin_lib=lib))
        return TrtRunner(res.plan, plugin_lib=lib)

    return build


# -- environment ----------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip().replace("\x00", "")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (res.stdout or "").strip()
    return text if res.returncode == 0 and text else None


def _jetson() -> dict | None:
    """Jetson identity, power mode and clocks where readable (None on anything that is not a Jetson)."""
    model = _read("/proc/device-tree/model") or ""
    release = _read("/etc/nv_tegra_release")
    if "jetson" not in model.lower() and release is None:
        return None
    out: dict = {"model": model or None, "l4t": release.splitlines()[0] if release else None}
    nv = _run(["nvpmodel", "-q"])
    out["power_mode"] = " ".join(nv.split()) if nv else "not readable (nvpmodel missing or not permitted)"
    clocks: dict[str, str] = {}
    for dev in sorted(Path("/sys/class/devfreq").glob("*")) if Path("/sys/class/devfreq").exists() else []:
        if any(s in dev.name for s in ("gpu", "ga10b", "gv11b", "gb10b")):
            cur, mx = _read(str(dev / "cur_freq")), _read(str(dev / "max_freq"))
            if cur:
                clocks[f"gpu {dev.name}"] = f"{int(cur) / 1e6:.0f} MHz (max {int(mx) / 1e6:.0f})" if mx else cur
    for cpu in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*"))[:16]:
        cur = _read(str(cpu / "cpufreq/scaling_cur_freq"))
        if cur:
            clocks[cpu.name] = f"{int(cur) / 1e3:.0f} MHz"
    emc = _read("/sys/kernel/debug/bpmp/debug/clk/emc/rate")
    if emc:
        clocks["emc"] = f"{int(emc) / 1e6:.0f} MHz"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        jc = _run(["jetson_clocks", "--show"])
        if jc:
            out["jetson_clocks"] = jc.splitlines()[:40]
    out["clocks"] = clocks or "not readable"
    return out


def environment(backend_info: Mapping | None = None) -> dict:
    """Versions, host, device and (on a Jetson) power mode and clocks; absent pieces are skipped."""
    from ..exporters.export import versions

    env: dict = {"versions": versions(), "platform": platform.platform(), "machine": platform.machine()}
    env["cpu_count"] = os.cpu_count()
    cpuinfo = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Model"):
        line = next((ln for ln in cpuinfo.splitlines() if ln.startswith(key)), None)
        if line:
            env["cpu"] = line.split(":", 1)[1].strip()
            break
    if backend_info:
        env["backend"] = dict(backend_info)
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    if _torch_cuda_available():
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    jetson = _jetson()
    if jetson is not None:
        env["jetson"] = jetson
    return env


# -- the report -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyReport:
    """What :func:`report` measured and wrote. ``data`` is exactly report.json."""

    out: Path
    data: dict
    files: tuple[str, ...]
    gate_failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.gate_failures


def check_gate(rep: LatencyReport) -> None:
    """Raise :class:`GateFailed` (CLI exit 3) when the latency gate or the parity gate of ``rep`` failed."""
    if rep.gate_failures:
        what = "parity" if all(f.startswith("parity: ") for f in rep.gate_failures) else "latency"
        raise GateFailed(f"{what} gate failed: " + "; ".join(rep.gate_failures))


def _pad_to(x: np.ndarray, batch: int) -> np.ndarray:
    """``x`` repeated cyclically to a whole number of batches (at least one)."""
    total = -(-len(x) // batch) * batch
    return x[np.arange(total) % len(x)]


def _run_padded(runner: Runner, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Outputs for ``x`` from a static-batch runner: pad with repeats to whole batches, trim back."""
    from ..runtime.ort_runner import stack_outputs

    n = len(x)
    xp = _pad_to(x, batch)
    parts = [runner.infer({"pixels": xp[i : i + batch]}) for i in range(0, len(xp), batch)]
    out = stack_outputs(parts) if len(parts) > 1 else parts[0]
    return {k: v[:n] for k, v in out.items()}


def _token_stats(cfg, ats: ATSConfig, outs: Mapping[str, np.ndarray]) -> dict:
    prefix = cfg.num_prefix_tokens
    slots = dict(zip(range(cfg.depth), slots_per_block(cfg, ats)))
    blocks, per_image = [], {}
    for blk, k in zip(ats.blocks, ats.k_schedule):
        counts = np.asarray(outs[f"count_{blk}"], dtype=np.int64)
        kp = counts - prefix
        n_in, n_out = slots[blk]
        # Bins over the K' actually seen (about 24, width >= 1), not over 0..slots: a late block keeping
        # 30-40 of 196 tokens gets its own spread, not two bars squeezed at the left of a 0-200 axis.
        lo, hi = int(kp.min()), int(kp.max())
        width = max(1, -(-(hi - lo + 1) // 24))
        edges = np.arange(lo, hi + width + 1, width)
        hist, _ = np.histogram(kp, bins=edges)
        blocks.append(
            {
                "block": int(blk),
                "k": int(k),
                "slots_in": int(n_in),
                "slots_out": int(n_out),
                "kept_mean": float(kp.mean()),
                "kept_p10": float(np.percentile(kp, 10)),
                "kept_p90": float(np.percentile(kp, 90)),
                "kept_min": int(kp.min()),
                "kept_max": int(kp.max()),
                "hist": {"edges": edges.tolist(), "counts": hist.tolist()},
            }
        )
        per_image[str(blk)] = counts.tolist()
    return {"images": int(len(outs["logits"])), "prefix_tokens": prefix, "blocks": blocks, "counts": per_image}


def _flops(cfg, ats: ATSConfig, outs: Mapping[str, np.ndarray] | None) -> dict:
    dense = model_flops(cfg, ATSConfig())
    static = model_flops(cfg, ats)
    d: dict = {
        "convention": CONVENTION,
        "dense_gflops": dense.gflops,
        "ats_static_gflops": static.gflops,
        "static_blocks": [b.to_dict() for b in static.blocks],
    }
    if outs is not None and ats.blocks:
        per = gflops_per_image(cfg, ats, {b: outs[f"count_{b}"] for b in ats.blocks})
        d.update(
            ats_data_dependent_gflops=float(per.mean()),
            ats_data_dependent_p10=float(np.percentile(per, 10)),
            ats_data_dependent_p90=float(np.percentile(per, 90)),
        )
    else:
        d["ats_data_dependent_gflops"] = static.gflops
    return d


def _parity(
    backend_info: Mapping,
    factory: RunnerFactory,
    ckpt: LoadedCheckpoint,
    ats: ATSConfig,
    pool: np.ndarray,
    export_dir: Path,
    batch: int | None,
    advance,
) -> dict:
    """The parity section, from the one parity engine (:mod:`.parity`): the backend's ATS model against the
    PyTorch fp32 CPU reference with near-boundary flags, both in chunks of the export's graph batch (the
    chunks ``ats-deploy parity`` uses), on the report's inputs; reference.npz where torch is absent or is
    the backend itself."""
    from .parity import compare_outputs, reference_outputs, run_chunks, tolerances_for

    self_ref = backend_info.get("name") == "torch" and backend_info.get("device") == "cpu"
    ref = None
    if not self_ref:
        try:
            ref = reference_outputs(ckpt, ats, pool, batch=batch, advance=advance)
            label, x = "torch (cpu, fp32)", pool
        except ImportError:
            ref = None
    if ref is None:
        npz = export_dir / "reference.npz"
        if not npz.exists():
            return {"reference": None, "skipped": "no reference: torch and reference.npz are absent"}
        from ..runtime.verify import load_reference

        ref = load_reference(npz)
        label, x = "reference.npz (PyTorch outputs saved at export)", ref.pop("pixels")
    runner = factory(ats, batch or len(x))
    try:
        got = run_chunks(runner, x, batch, advance=advance)
    finally:
        runner.close()
    tol = tolerances_for(backend_info.get("precision"))
    res = compare_outputs(ref, got, blocks=ats.blocks, prefix_tokens=ckpt.config.num_prefix_tokens, tolerances=tol)
    return {"reference": label, "precision": backend_info.get("precision"), "batch": batch, **res.to_dict()}


def _cycling_timer(runner: Runner, chunks: Sequence[np.ndarray]) -> Callable[[], float] | None:
    """perf_counter around ``infer`` on the next chunk each call (inputs change, as in service), or None for
    runners with their own device timers (those time one staged input)."""
    if callable(getattr(runner, "timed_step", None)) or callable(getattr(runner, "time_inference", None)):
        return None
    turn = [0]

    def run() -> float:
        x = chunks[turn[0] % len(chunks)]
        turn[0] += 1
        t0 = time.perf_counter()
        runner.infer({"pixels": x})
        return (time.perf_counter() - t0) * 1e3

    return run


def _slots_processed(cfg, ats: ATSConfig, runner: Runner, chunks: Sequence[np.ndarray]) -> list[float]:
    """Mean input slots of every block over ``chunks``: static from the graph's shapes; dynamic from what
    each batch really ran (the next block processes the batch's largest count)."""
    static = [float(n_in) for n_in, _ in slots_per_block(cfg, ats)]
    if ats.shape_mode != "dynamic":
        return static
    widths: dict[int, list[int]] = {b: [] for b in ats.blocks}
    for x in chunks:
        out = runner.infer({"pixels": x})
        for b in ats.blocks:
            widths[b].append(int(np.asarray(out[f"tokens_{b}"]).shape[1]))
    n, slots = float(cfg.num_tokens), []
    for i in range(cfg.depth):
        slots.append(n)
        if i in widths:
            n = float(np.mean(widths[i]))
    return slots


def ort_ats_share(
    model: bytes,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    threads: int = 0,
    runs: int = 10,
    custom_ops: str | os.PathLike[str] | None = None,
) -> dict:
    """Share of ONNX Runtime's node time spent in each ATS block's score and sampler nodes (``*/ats/*``),
    from its profiler: per block (of that block's node time) and overall (of the whole graph's).

    The profiler adds a few microseconds to every node, so many small nodes weigh a little more than
    they do unprofiled: read it as an upper estimate. One warm-up run precedes the ``runs`` profiled ones.
    ``custom_ops``: the sampler op library, for a plugin-form model (its one sampler node is under ``*/ats/``).
    """
    import json as _json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    if custom_ops is not None:
        so.register_custom_ops_library(str(custom_ops))
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for i in range(runs + 1):
            sess.run(None, dict(feeds[i % len(feeds)]))
        events = _json.loads(Path(sess.end_profiling()).read_text())
    # The first run is a warm-up (first-touch allocations, weight packing): its nodes are left out.
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: float(e["ts"]), default=None)
    warm_from = float(first["ts"]) + float(first["dur"]) if first is not None else float("-inf")
    total, per_block, ats_per_block = 0.0, {}, {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if float(e["ts"]) < warm_from:
            continue
        name, dur = e["name"], float(e["dur"])
        total += dur
        if name.startswith("blocks."):
            blk = int(name.split(".", 2)[1].split("/", 1)[0])
            per_block[blk] = per_block.get(blk, 0.0) + dur
            if "/ats/" in name:
                ats_per_block[blk] = ats_per_block.get(blk, 0.0) + dur
    return {
        "overall": sum(ats_per_block.values()) / total if total else 0.0,
        "per_block": {str(b): ats_per_block[b] / per_block[b] for b in sorted(ats_per_block)},
        "runs": runs,
        "note": "ONNX Runtime profiler; its per-node overhead makes this an upper estimate",
    }


def report(
    out_dir: str | Path,
    *,
    backend: str = "onnxruntime",
    batches: Sequence[int] = (1, 8, 64),
    out: str | Path | None = None,
    reps: int = 30,
    warmup: int = 5,
    images: int | None = None,
    inputs: str | Path | None = None,
    model: str | Path | None = None,
    trust_pickle: bool = False,
    max_slowdown: float | None = None,
    raise_on_gate: bool = True,
    threads: int = 0,
    fp16: bool = True,
    plots: bool = True,
    progress: bool = True,
    seed: int = 0,
    skip_unreadable: bool = False,
    plugin_lib: str | os.PathLike[str] | None = None,
    ort_ops: str | os.PathLike[str] | None = None,
) -> LatencyReport:
    """Measure the export's ATS model against its dense twin on ``backend``; write report.{json,md} + PNGs.

    ``out`` defaults to ``<out_dir>/report``. ``images`` (default: the largest batch) default inputs
    (held-out demo images for the demo model, random ones otherwise), or the ``inputs`` folder/array,
    give the kept-token statistics, data-dependent GFLOPs and parity.
    ``max_slowdown`` gates the p50 ratio ATS/dense at every batch: when exceeded, the report is still
    written, then :class:`GateFailed` is raised (exit 3) unless ``raise_on_gate`` is False (then call
    :func:`check_gate` yourself).
    """
    from ..artifacts import read_manifest
    from ..exported import ats_from_manifest, checkpoint_from_manifest
    from ..inputs import Preprocess, default_inputs, load_inputs

    export_dir = Path(out_dir)
    bs = sorted({int(b) for b in batches})
    if not bs or bs[0] < 1:
        raise ConfigError(f"batches {list(batches)} must be positive integers, e.g. 1,8,64")
    if reps < 1 or warmup < 0:
        raise ConfigError(f"reps {reps} must be >= 1 and warmup {warmup} >= 0")
    if max_slowdown is not None and not max_slowdown > 0:
        raise ConfigError(f"max slowdown {max_slowdown} must be a positive factor such as 1.02")
    if plugin_lib is not None and backend != "tensorrt":
        raise ConfigError(f"--plugin-lib is for --backend tensorrt (the {backend} backend runs no plugin); drop it")
    if plugin_lib is not None and not Path(plugin_lib).is_file():
        raise InputError(f"plugin library {plugin_lib} does not exist; build it with `ats-deploy plugin build`")
    if backend == "tensorrt":  # engine latency comes from trtexec: refuse before building anything
        from ..runtime.trtexec import find_trtexec

        find_trtexec()
    man = read_manifest(export_dir)
    ats, ckpt = ats_from_manifest(man), checkpoint_from_manifest(man, model=model, trust_pickle=trust_pickle)
    if not ats.enabled:
        raise InputError(f"{export_dir} holds a dense export (no ATS blocks); export with ATS to compare")
    cfg = ckpt.config
    pre = Preprocess.from_dict(man["preprocessing"])
    if inputs is not None:
        pool, pool_label = load_inputs(inputs, pre, skip_unreadable=skip_unreadable)[0], str(inputs)
    else:
        pool, pool_label = default_inputs(man["model"].get("source"), images or bs[-1], pre, seed=seed)
    onnx_path = export_dir / "model.onnx"
    exported = (ats, onnx_path, man["graph"].get("batch")) if onnx_path.exists() else None
    opset = int(man["graph"].get("opset", 17))
    factory, info = make_factory(
        backend, ckpt, opset=opset, threads=threads, fp16=fp16, exported=exported, plugin_lib=plugin_lib,
        ort_ops=ort_ops,
    )
    ort_form = ort_sampler_form(ats, info.get("ort_ops"))  # how ONNX Runtime runs this export's ATS model
    if backend == "onnxruntime" and ort_form == "portable":
        info["sampler"] = "portable subgraph"  # dynamic shapes: the op does not serve them
    dense = ATSConfig()
    rows: list[dict] = []
    timer_name = ""
    pool_outs: dict[str, np.ndarray] | None = None
    parity: dict | None = None
    t_start = time.perf_counter()
    with progress_bar(progress, len(bs) * (warmup + reps) * 2, "latency") as advance:
        for b in bs:
            advance(0, description=f"batch {b}: building")
            runners = {"ats": factory(ats, b), "dense": factory(dense, b)}
            try:
                padded = _pad_to(pool, b)
                x = padded[:b]
                chunks = [padded[i : i + b] for i in range(0, min(len(padded), 16 * b), b)]
                advance(0, description=f"batch {b}: slots")
                slots = _slots_processed(cfg, ats, runners["ats"], chunks) if backend != "tensorrt" else None
                advance(0, description=f"batch {b}: timing")
                if backend == "tensorrt":  # trtexec times the engines (CUDA graph, no host copies)
                    from ..runtime.trtexec import measure_interleaved as trtexec_interleaved

                    timed = trtexec_interleaved({n: r.trtexec_run(b) for n, r in runners.items()}, iterations=reps)
                    samples = {n: v["samples"] for n, v in timed.items()}
                    profiles = {n: v["profile"] for n, v in timed.items()}
                    timer_name = "trtexec (--useCudaGraph --noDataTransfers --useSpinWait, computeMs)"
                    advance((warmup + reps) * 2)
                else:
                    timers = {}
                    for name, r in runners.items():
                        timers[name], timer_name = step_timer(r, x)
                        cycling = _cycling_timer(r, chunks)
                        if cycling is not None:  # the inputs change every round, the same for both models
                            timers[name] = cycling
                            timer_name += f", cycling over {len(chunks)} input batches"
                    samples = measure_interleaved(timers, warmup=warmup, reps=reps, advance=advance)
                    profiles = {}
                    if backend == "onnxruntime":
                        from ..exporters.onnx import GraphOptions, build_graph

                        advance(0, description=f"batch {b}: profiling")
                        opts = GraphOptions(batch=b, opset=opset, sampler=ort_form)  # type: ignore[arg-type]
                        proto = build_graph(cfg, ckpt.state_dict, ats, opts)
                        feeds = [{"pixels": c} for c in chunks]
                        share = ort_ats_share(proto.SerializeToString(), feeds, threads=threads,
                                              custom_ops=info["ort_ops"] if ort_form == "plugin" else None)
                info["precision"] = getattr(runners["ats"], "precision", info["precision"])
                if b == bs[-1]:
                    advance(0, description="token statistics")
                    pool_outs = _run_padded(runners["ats"], pool, b)
            finally:
                for r in runners.values():
                    r.close()
            a, d = summarize(samples["ats"], b), summarize(samples["dense"], b)
            pr = paired_ratio(samples["ats"], samples["dense"])
            row = {
                "batch": b,
                "ats": a,
                "dense": d,
                "ratio_p50": a["p50_ms"] / d["p50_ms"],
                "ratio_paired": {"median": pr.median, "low": pr.low, "high": pr.high, "confidence": pr.confidence},
            }
            if slots is not None:  # what ran: input slots per block, and the work ratio it implies
                row["slots_per_block"] = [round(v, 2) for v in slots]
                row["token_work_ratio"] = sum(slots) / (cfg.depth * cfg.num_tokens)
            if backend == "onnxruntime":
                row["ats_node_share"] = share
            if profiles.get("ats"):  # the sampler plugin's own time, from trtexec's per-layer profile
                row["plugin_ms"] = profiles["ats"]["plugin_ms"]
                row["profile_total_ms"] = {n: p["total_ms"] for n, p in profiles.items() if p}
            rows.append(row)
    with progress_bar(progress, 2 * len(pool), f"parity on {len(pool)} inputs") as advance:
        parity = _parity(info, factory, ckpt, ats, pool, export_dir, man["graph"].get("batch"), advance)
    info["timer"] = timer_name
    failures = []
    if max_slowdown is not None:
        for row in rows:
            if row["ratio_p50"] > max_slowdown:
                failures.append(
                    f"batch {row['batch']}: ATS p50 {row['ats']['p50_ms']:.3f} ms is {row['ratio_p50']:.3f}x "
                    f"dense {row['dense']['p50_ms']:.3f} ms (max {max_slowdown:g}x)"
                )
    data = {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export": {"dir": str(export_dir.resolve()), "source": man["model"]["source"]},
        "model": {
            "architecture": cfg.to_dict(),
            "ats": {**ats.to_dict(), "n_ref": cfg.n_ref, "num_tokens": cfg.num_tokens},
        },
        "backend": info,
        "settings": {
            "batches": bs,
            "reps": reps,
            "warmup": warmup,
            "interleaved": True,
            "images": int(len(pool)),
            "inputs": pool_label,
            "max_slowdown": max_slowdown,
            "gate_statistic": "p50 ATS / p50 dense",
        },
        "latency": rows,
        "tokens": _token_stats(cfg, ats, pool_outs) if pool_outs is not None else None,
        "flops": _flops(cfg, ats, pool_outs),
        "parity": parity,
        "gate": {"max_slowdown": max_slowdown, "passed": not failures, "failures": failures},
        "environment": environment(info),
        "seconds": time.perf_counter() - t_start,
        "plots": [],
        "warnings": [],
    }
    files = _write(Path(out) if out is not None else export_dir / "report", data, plots=plots)
    failures += [f"parity: {f}" for f in parity.get("failures", [])]
    rep = LatencyReport(Path(out) if out is not None else export_dir / "report", data, files, tuple(failures))
    if raise_on_gate:
        check_gate(rep)
    return rep


def _write(out: Path, data: dict, *, plots: bool) -> tuple[str, ...]:
    """report.json, the PNGs and report.md, all renamed into place together."""
    from ..artifacts import AtomicWriter
    from .render import render_markdown, render_plots

    with AtomicWriter(out) as w:
        if plots:
            try:
                data["plots"] = render_plots(data, w.path)
            except DependencyError as exc:
                data["warnings"].append(f"PNG plots skipped: {exc}")
        p_json = w.path("report.json")
        p_json.write_text(json.dumps(data, indent=2, default=json_default) + "\n")
        w.path("report.md").write_text(render_markdown(data))
    return ("report.json", "report.md", *data["plots"])
