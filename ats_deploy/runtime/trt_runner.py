"""TensorRT backend: a built plan run through NVIDIA Polygraphy's ``TrtRunner``, behind ``Runner``.

Device path only: numpy, tensorrt and polygraphy, all imported lazily; no torch. Polygraphy owns what a
hand-written runner gets wrong where nobody can test it (device memory, the stream, input shapes per call,
data-dependent output shapes through its output allocator, teardown); this module keeps only what it
cannot know: the checks against the build record before anything is deserialized (the plan's sha256, so a
corrupt or truncated file is one clear error and not a TensorRT crash; the TensorRT backend and version;
the GPU name and compute capability, since engines are not portable), loading the sampler plugin library,
and how trtexec should time the engine (latency comes from trtexec: CUDA graphs, no host copies).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError
from .base import Runner, check_pixels

__all__ = ["TrtRunner", "check_engine_compat"]


def check_engine_compat(record: dict, *, backend: str, trt_version: str, gpu: dict | None) -> None:
    """Refuse a plan built for another TensorRT backend/version or another GPU (one InputError line)."""
    name = record.get("backend")
    if name and name != backend:
        raise InputError(
            f"this engine was built with {name} but the runner uses {backend}; rebuild it here with ats-deploy build"
        )
    built = record.get("tensorrt_version")
    if built and built != trt_version:
        raise InputError(
            f"this engine was built with TensorRT {built} but this is TensorRT {trt_version}; engines are not "
            "portable across versions: rebuild it here with ats-deploy build"
        )
    want = record.get("gpu")
    if want is None:
        if gpu is not None:  # built on a CPU-only machine (TensorRT-RTX): never for this GPU
            raise InputError(
                f"this engine was built without a GPU (CI, {name}); "
                f"rebuild it on this {gpu['name']} with ats-deploy build"
            )
        return
    if gpu is None:
        raise DependencyError(f"no CUDA GPU found; this engine needs {want['name']} (sm {want['compute_capability']})")
    if (want.get("name"), want.get("compute_capability")) != (gpu["name"], gpu["compute_capability"]):
        raise InputError(
            f"this engine was built for {want['name']} (compute capability {want['compute_capability']}) but this "
            f"is {gpu['name']} ({gpu['compute_capability']}); rebuild it here with ats-deploy build"
        )


def _polygraphy_trt():
    try:
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
    except ImportError as exc:
        raise DependencyError(f"Polygraphy's TensorRT backend is unavailable ({exc}); pip install polygraphy") from None
    return PolygraphyTrtRunner


class TrtRunner(Runner):
    """Run a plan written by :func:`ats_deploy.exporters.trt.build_engine` (through Polygraphy's TrtRunner).

    ``plugin_lib``: the sampler plugin library for plugin-form engines (default: $ATS_SAMPLER_PLUGIN, then the
    path in the build record). Engines built with TensorRT-RTX (``--backend rtx``, the CPU checks of what
    TensorRT sees) are not run here: run NVIDIA TensorRT engines, built on the device.
    """

    name = "tensorrt"

    def __init__(
        self,
        plan: str | os.PathLike[str],
        *,
        plugin_lib: str | os.PathLike[str] | None = None,
        backend: str | None = None,
        verbose: bool = False,
    ) -> None:
        from ..exporters import trt as trt_build

        self._runner = None  # set last: close() is safe after any failure below
        self.plan = Path(plan)
        self.record = trt_build.read_record(self.plan)  # missing, unreadable or corrupt plan: InputError
        backend = trt_build.resolve_backend(backend or self.record.get("backend"))
        if backend != "tensorrt":
            raise DependencyError(
                f"{self.plan.name} is a {backend} engine: ats-deploy runs NVIDIA TensorRT engines (Polygraphy's "
                "TrtRunner); build one on the device with ats-deploy build --backend tensorrt"
            )
        self._plugin_path = self._plugin_library(trt_build, plugin_lib)  # before TensorRT: a plain input check
        trt = trt_build.import_tensorrt(backend)
        self.trt = trt
        check_engine_compat(self.record, backend=backend, trt_version=str(trt.__version__), gpu=trt_build.gpu_info())
        # How the library registers its creator: "registry" (a -DATS_SELF_REGISTER=OFF build, TensorRT's
        # load_library) or "dlopen" (self-registering); trtexec needs the matching flag.
        self._plugin_how = (self.record.get("plugin") or {}).get("loaded_by")
        if self._plugin_path is not None:
            how = self.record.get("settings", {}).get("plugin_load", "auto")
            loaded = trt_build.load_plugin_library(trt, self._plugin_path, how=how)
            if loaded in ("dlopen", "registry"):  # "already registered": keep the build record's answer
                self._plugin_how = loaded
        logger = trt_build._make_logger(trt, verbose)
        engine = trt.Runtime(logger).deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            last = logger.errors[-1] if logger.errors else "no message"
            raise InputError(
                f"TensorRT {trt.__version__} could not load {self.plan} ({trt_build._one_line(last, 160)}); "
                "rebuild it here with ats-deploy build"
            )
        self._io(engine)
        runner = _polygraphy_trt()(engine, name=self.plan.stem)
        try:
            runner.activate()  # creates and checks the execution context, stream and output allocator
        except Exception as exc:  # Polygraphy raises PolygraphyException (its G_LOGGER.critical)
            raise DependencyError(
                f"TensorRT could not create an execution context for {self.plan.name} ({str(exc).strip()[:160]}); "
                "free GPU memory or rebuild the engine with ats-deploy build"
            ) from None
        self._runner = runner

    # -- setup ---------------------------------------------------------------------------------------------
    def _plugin_library(self, trt_build, plugin_lib) -> Path | None:
        """The sampler plugin library a plugin-form engine needs (None for the portable form)."""
        plug = self.record.get("plugin") or {}
        if plug.get("kind") != "library":
            return None
        lib = plugin_lib or os.environ.get(trt_build.PLUGIN_ENV) or plug.get("path")
        if not lib:
            raise InputError(
                f"{self.plan.name} needs the sampler plugin library and none was given; pass --plugin-lib "
                f"PATH/libats_sampler.so or set {trt_build.PLUGIN_ENV}"
            )
        if not Path(lib).is_file():
            raise InputError(f"sampler plugin library {lib} does not exist; build it with ats-deploy plugin build")
        return Path(lib)

    def _io(self, engine) -> None:
        trt = self.trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1:
            raise InputError(f"{self.plan} has inputs {self.inputs}; an ats-deploy engine has one (pixels)")
        self.input_name = self.inputs[0]
        shape = tuple(engine.get_tensor_shape(self.input_name))
        self.channels, self.size = int(shape[1]), int(shape[2])
        self.static_batch = int(shape[0]) if shape[0] >= 0 else None
        if self.static_batch is None:
            lo, _, hi = engine.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = (int(lo[0]), int(hi[0]))
        else:
            self.batch_range = (self.static_batch, self.static_batch)
        # Data-dependent (size-tensor) outputs: --shape dynamic engines cannot be captured in a CUDA graph.
        self.dynamic_outputs = [n for n in self.outputs if any(d < 0 for d in engine.get_tensor_shape(n)[1:])]

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = check_pixels(x, channels=self.channels, size=self.size, batch=self.static_batch)
        lo, hi = self.batch_range
        if not lo <= len(x) <= hi:
            raise InputError(
                f"batch {len(x)} is outside this engine's profile {lo}..{hi}; rebuild with a wider --batch"
            )
        return np.ascontiguousarray(x, dtype=np.float32)

    # -- running ---------------------------------------------------------------------------------------------
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is None:
            raise InputError(f"the runner of {self.plan.name} is closed")
        out = self._runner.infer({self.input_name: self._check(feed["pixels"])})
        return {name: np.array(out[name]) for name in self.outputs}

    def time_inference(self, x: np.ndarray, *, iterations: int = 100, warmup: int = 10) -> np.ndarray:
        """Milliseconds of each run: Polygraphy's clock around enqueue and synchronize, the input already on
        the device and the outputs left there (no host copies timed). trtexec gives the CUDA-graph latency."""
        from polygraphy import cuda

        if self._runner is None:
            raise InputError(f"the runner of {self.plan.name} is closed")
        x = self._check(x)
        dev = cuda.DeviceArray(shape=x.shape, dtype=np.float32)
        try:
            dev.copy_from(x)
            feed = {self.input_name: dev}
            for _ in range(max(warmup, 1)):
                self._runner.infer(feed, copy_outputs_to_host=False)
            times = np.empty(iterations, dtype=np.float64)
            for i in range(iterations):
                self._runner.infer(feed, copy_outputs_to_host=False)
                times[i] = self._runner.last_inference_time() * 1e3
        finally:
            dev.free()
        return times

    def trtexec_run(self, batch: int):
        """How trtexec should time this engine at ``batch`` (see :mod:`ats_deploy.runtime.trtexec`)."""
        from .trtexec import TrtexecRun

        shapes = None
        if self.static_batch is None:
            shapes = f"{self.input_name}:{batch}x{self.channels}x{self.size}x{self.size}"
        layers = tuple(p["name"] for p in self.record.get("network", {}).get("plugin_layers", []))
        graph = not self.dynamic_outputs  # data-dependent shapes cannot be captured
        return TrtexecRun(
            self.plan,
            self._plugin_path,
            shapes,
            cuda_graph=graph,
            plugin_layers=layers,
            plugin_dynamic=self._plugin_how == "registry",
        )

    def close(self) -> None:
        runner, self._runner = getattr(self, "_runner", None), None
        if runner is not None and runner.is_active:
            runner.deactivate()  # frees the context, buffers and stream it made
