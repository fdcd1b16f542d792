"""TensorRT backend: a built plan behind the ``Runner`` interface (``infer(feed) -> dict``).

Device path only: numpy, tensorrt (through :mod:`ats_deploy.exporters.trt`) and cuda-python
(``cuda.bindings.runtime``, or ``cuda.cudart`` in cuda-python < 12.6), all imported lazily; no torch. It runs
unchanged on a Jetson and on a workstation GPU.

Before anything is deserialized the plan is checked against its JSON record (written by the build): the
plan's sha256 (a corrupt or truncated file is one clear error, not a TensorRT crash), the TensorRT backend and
version, and the GPU name and compute capability (TensorRT engines are not portable). Static-shape engines
run as a captured CUDA graph per batch size (launch overhead matters at batch 1 on Jetson); engines with
data-dependent outputs (``--shape dynamic``: ``tokens_<i>`` is [B, s]) get their outputs through an
``IOutputAllocator`` and run with ``execute_async_v3``, which cannot be captured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DependencyError, InputError
from .base import Runner, check_pixels

__all__ = ["TrtRunner", "check_engine_compat", "load_cuda"]


def load_cuda():
    """cuda-python's runtime module; DependencyError with the fix when it is missing."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef]

        return cudart
    except ImportError:
        raise DependencyError(
            "cuda-python is not installed; pip install cuda-python (the major version of your CUDA, e.g. "
            "'cuda-python>=12,<13' on JetPack 6)"
        ) from None


class _Cuda:
    """Checked calls into the CUDA runtime: ``call('cudaMalloc', n)`` returns the values after the error."""

    def __init__(self) -> None:
        self.rt = load_cuda()
        self.h2d = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.d2h = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def call(self, name: str, *args: Any) -> Any:
        out = getattr(self.rt, name)(*args)
        err, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        if int(err) != 0:
            text = self.rt.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise DependencyError(
                f"CUDA {name} failed: {getattr(err, 'name', err)} ({text}); "
                "run on a machine with a working NVIDIA GPU and driver"
            )
        return rest[0] if len(rest) == 1 else rest or None


def _ptr(handle: Any) -> int:
    """A cuda-python handle (stream, pointer) as an integer address."""
    try:
        return int(handle)
    except TypeError:
        return int(handle.getPtr())


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


class TrtRunner(Runner):
    """Run a plan written by :func:`ats_deploy.exporters.trt.build_engine`.

    ``plugin_lib``: the sampler plugin library for plugin-form engines (default: $ATS_SAMPLER_PLUGIN, then the
    path in the build record). ``cuda_graph``: capture static-shape engines in a CUDA graph (per batch size).
    """

    name = "tensorrt"

    def __init__(
        self,
        plan: str | os.PathLike[str],
        *,
        plugin_lib: str | os.PathLike[str] | None = None,
        backend: str | None = None,
        cuda_graph: bool = True,
        verbose: bool = False,
    ) -> None:
        from ..exporters import trt as trt_build

        self.plan = Path(plan)
        self.record = trt_build.read_record(self.plan)  # missing, unreadable or corrupt plan: InputError
        backend = trt_build.resolve_backend(backend or self.record.get("backend"))
        trt = trt_build.import_tensorrt(backend)
        self.trt = trt
        check_engine_compat(self.record, backend=backend, trt_version=str(trt.__version__), gpu=trt_build.gpu_info())
        self._load_plugin(trt_build, plugin_lib)
        self.cuda = _Cuda()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._graphs: dict[int, tuple[Any, Any]] = {}  # batch -> (graph, graph exec)
        self.stream = self.cuda.call("cudaStreamCreate")
        self._logger = trt_build._make_logger(trt, verbose)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            last = self._logger.errors[-1] if self._logger.errors else "no message"
            self.close()
            raise InputError(
                f"TensorRT {trt.__version__} could not load {self.plan} ({trt_build._one_line(last, 160)}); "
                "rebuild it here with ats-deploy build"
            )
        self.context = self.engine.create_execution_context()
        self._io()
        self._allocator = _make_output_allocator(trt, self.cuda) if self.dynamic_outputs else None
        if self._allocator is not None:
            for name in self.dynamic_outputs:
                self.context.set_output_allocator(name, self._allocator)
        self.use_graph = bool(cuda_graph) and not self.dynamic_outputs

    # -- setup ---------------------------------------------------------------------------------------------
    def _load_plugin(self, trt_build, plugin_lib) -> None:
        plug = self.record.get("plugin") or {}
        self._plugin_path = None
        if plug.get("kind") == "library":
            lib = plugin_lib or os.environ.get(trt_build.PLUGIN_ENV) or plug.get("path")
            trt_build.load_plugin_library(self.trt, lib, how=self.record.get("settings", {}).get("plugin_load", "auto"))
            self._plugin_path = Path(lib)
        elif plug.get("kind") == "python":
            from ..exporters.rtx_plugin import register_python_plugin

            register_python_plugin(self.trt)

    def _io(self) -> None:
        trt, e = self.trt, self.engine
        self.inputs, self.outputs = [], []
        for i in range(e.num_io_tensors):
            name = e.get_tensor_name(i)
            (self.inputs if e.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        if len(self.inputs) != 1:
            raise InputError(f"{self.plan} has inputs {self.inputs}; an ats-deploy engine has one (pixels)")
        self.input_name = self.inputs[0]
        shape = tuple(e.get_tensor_shape(self.input_name))
        self.channels, self.size = int(shape[1]), int(shape[2])
        self.static_batch = int(shape[0]) if shape[0] >= 0 else None
        if self.static_batch is None:
            lo, _, hi = e.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = (int(lo[0]), int(hi[0]))
        else:
            self.batch_range = (self.static_batch, self.static_batch)
        self.dtypes = {n: np.dtype(trt.nptype(e.get_tensor_dtype(n))) for n in self.inputs + self.outputs}
        # Outputs whose shape is unknown even for a given batch: data-dependent (size-tensor) outputs.
        probe = self.batch_range[1]
        self.context.set_input_shape(self.input_name, (probe, self.channels, self.size, self.size))
        self.dynamic_outputs = [n for n in self.outputs if any(d < 0 for d in self.context.get_tensor_shape(n))]

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` bound to tensor ``name`` (grows; captured graphs are dropped)."""
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                self.cuda.call("cudaFree", ptr)
            self._drop_graphs()
            cap = max(nbytes, 256)
            ptr = _ptr(self.cuda.call("cudaMalloc", cap))
            self._buffers[name] = (ptr, cap)
            self.context.set_tensor_address(name, ptr)
        return ptr

    # -- running ---------------------------------------------------------------------------------------------
    def _prepare(self, x: np.ndarray) -> tuple[int, dict[str, tuple[int, ...]]]:
        b = int(x.shape[0])
        lo, hi = self.batch_range
        if not lo <= b <= hi:
            raise InputError(f"batch {b} is outside this engine's profile {lo}..{hi}; rebuild with a wider --batch")
        if self.static_batch is None:
            self.context.set_input_shape(self.input_name, x.shape)
        ptr = self._buffer(self.input_name, x.nbytes)
        self.cuda.call("cudaMemcpyAsync", ptr, x.ctypes.data, x.nbytes, self.cuda.h2d, self.stream)
        shapes = {}
        for name in self.outputs:
            if name in self.dynamic_outputs:
                continue
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            shapes[name] = shape
            self._buffer(name, int(np.prod(shape)) * self.dtypes[name].itemsize)
        return b, shapes

    def _enqueue(self, batch: int) -> None:
        if not self.use_graph:
            if not self.context.execute_async_v3(_ptr(self.stream)):
                raise DependencyError(f"TensorRT could not run {self.plan.name} (execute_async_v3 returned False)")
            return
        if batch not in self._graphs:
            self._capture(batch)
        if batch in self._graphs:
            self.cuda.call("cudaGraphLaunch", self._graphs[batch][1], self.stream)
        else:  # the context was not capturable: plain enqueue from now on
            self.use_graph = False
            self._enqueue(batch)

    def _capture(self, batch: int) -> None:
        rt, s = self.cuda.rt, _ptr(self.stream)
        if not self.context.execute_async_v3(s):  # warm-up: lets TensorRT finish lazy setup outside the capture
            raise DependencyError(f"TensorRT could not run {self.plan.name} (execute_async_v3 returned False)")
        self.cuda.call("cudaStreamSynchronize", self.stream)
        if hasattr(self.context, "is_stream_capturable") and not self.context.is_stream_capturable(s):
            return
        self.cuda.call("cudaStreamBeginCapture", self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        ok = self.context.execute_async_v3(s)
        graph = self.cuda.call("cudaStreamEndCapture", self.stream)
        if not ok:
            self.cuda.call("cudaGraphDestroy", graph)
            return
        self._graphs[batch] = (graph, self.cuda.call("cudaGraphInstantiate", graph, 0))

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = check_pixels(feed["pixels"], channels=self.channels, size=self.size, batch=self.static_batch)
        batch, shapes = self._prepare(x)
        self._enqueue(batch)
        if self.dynamic_outputs:  # data-dependent shapes are final (notify_shape) once the run is done
            self.cuda.call("cudaStreamSynchronize", self.stream)
        out: dict[str, np.ndarray] = {}
        for name in self.outputs:
            if name in self.dynamic_outputs:
                shape = self._allocator.shapes[name]
                ptr = self._allocator.buffers[name][0]
            else:
                shape, ptr = shapes[name], self._buffers[name][0]
            host = np.empty(shape, dtype=self.dtypes[name])
            if host.nbytes:
                self.cuda.call("cudaMemcpyAsync", host.ctypes.data, ptr, host.nbytes, self.cuda.d2h, self.stream)
            out[name] = host
        self.cuda.call("cudaStreamSynchronize", self.stream)
        return out

    def time_inference(self, x: np.ndarray, *, iterations: int = 100, warmup: int = 10) -> np.ndarray:
        """Device time of each run in milliseconds (CUDA events around the launch; no host copies timed)."""
        x = check_pixels(x, channels=self.channels, size=self.size, batch=self.static_batch)
        batch, _ = self._prepare(x)
        for _ in range(max(warmup, 1)):
            self._enqueue(batch)
        start, stop = self.cuda.call("cudaEventCreate"), self.cuda.call("cudaEventCreate")
        times = np.empty(iterations, dtype=np.float64)
        try:
            for i in range(iterations):
                self.cuda.call("cudaEventRecord", start, self.stream)
                self._enqueue(batch)
                self.cuda.call("cudaEventRecord", stop, self.stream)
                self.cuda.call("cudaEventSynchronize", stop)
                times[i] = self.cuda.call("cudaEventElapsedTime", start, stop)
        finally:
            self.cuda.call("cudaEventDestroy", start)
            self.cuda.call("cudaEventDestroy", stop)
        return times

    def trtexec_run(self, batch: int):
        """How trtexec should time this engine at ``batch`` (see :mod:`ats_deploy.runtime.trtexec`)."""
        from .trtexec import TrtexecRun

        plug = self.record.get("plugin") or {}
        lib = self._plugin_path if plug.get("kind") == "library" else None
        shapes = None
        if self.static_batch is None:
            shapes = f"{self.input_name}:{batch}x{self.channels}x{self.size}x{self.size}"
        layers = tuple(p["name"] for p in self.record.get("network", {}).get("plugin_layers", []))
        return TrtexecRun(self.plan, lib, shapes, cuda_graph=not self.dynamic_outputs, plugin_layers=layers)

    # -- teardown --------------------------------------------------------------------------------------------
    def _drop_graphs(self) -> None:
        for graph, exe in self._graphs.values():
            self.cuda.call("cudaGraphExecDestroy", exe)
            self.cuda.call("cudaGraphDestroy", graph)
        self._graphs.clear()

    def close(self) -> None:
        if getattr(self, "cuda", None) is None:
            return
        if getattr(self, "stream", None) is not None:
            self.cuda.call("cudaStreamSynchronize", self.stream)
        self._drop_graphs()
        self.context = None  # the context goes before the engine, the engine before the runtime
        self.engine = None
        self.runtime = None
        for ptr, _ in self._buffers.values():
            self.cuda.call("cudaFree", ptr)
        self._buffers.clear()
        if getattr(self, "_allocator", None) is not None:
            self._allocator.free()
        if getattr(self, "stream", None) is not None:
            self.cuda.call("cudaStreamDestroy", self.stream)
            self.stream = None
        self.cuda = None


def _make_output_allocator(trt, cuda: _Cuda):
    """An IOutputAllocator that grows one device buffer per output and remembers each output's shape."""

    class _OutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, tuple[int, int]] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            ptr, cap = self.buffers.get(tensor_name, (0, 0))
            if size > cap:
                if ptr:
                    cuda.call("cudaFree", ptr)
                cap = max(int(size), 256)
                ptr = _ptr(cuda.call("cudaMalloc", cap))
                self.buffers[tensor_name] = (ptr, cap)
            return ptr

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream=None):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

        def free(self) -> None:
            for ptr, _ in self.buffers.values():
                cuda.call("cudaFree", ptr)
            self.buffers.clear()

    return _OutputAllocator()
