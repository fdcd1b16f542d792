"""ONNX -> TensorRT engine (plan), the only module that imports ``tensorrt`` (lazily, inside functions).

One build function serves the Jetson (real TensorRT, JetPack 6.1+) and CI (TensorRT-RTX on a CPU-only
machine): ``backend="tensorrt"`` (module ``tensorrt``) or ``backend="rtx"`` (module ``tensorrt_rtx``), or the
environment variable ``ATS_DEPLOY_TENSORRT=rtx``. Networks are always strongly typed: the precision is a
label read from the ONNX (an fp16 graph builds an fp16 engine, Q/DQ nodes an int8 one), never a builder
flag, because TensorRT 11 removed weak typing (docs/ATS_RULE.md section 5).

What a build writes, atomically (temporary name + ``os.replace``): ``<name>.plan`` and next to it
``<name>.plan.json``, the record a runner checks before loading (TensorRT and CUDA versions, GPU name and
compute capability, precision, ONNX and manifest hashes, settings, plugin library, network summary).
Built plans are cached (``~/.cache/ats-deploy/engines``) under a sha256 of the ONNX bytes, the settings in
:attr:`BuildSettings.REBUILD_FIELDS`, the backend and TensorRT version, and the GPU name and compute
capability; everything else (timing cache path, cache dir) never forces a rebuild.

The ``AdaptiveTokenSampler`` plugin: real TensorRT loads the C++ library (``ctypes.CDLL`` with
``RTLD_GLOBAL`` for the default self-registering build, else ``IPluginRegistry.load_library`` for a
``-DATS_SELF_REGISTER=OFF`` build) and checks that the creator (AdaptiveTokenSampler, "1", "ats") is then
registered. TensorRT-RTX without a library uses the Python plugin of :mod:`.rtx_plugin`, in a child process
whose ``LD_LIBRARY_PATH`` holds the ``libtensorrt_rtx.so`` shim (without it TensorRT-RTX aborts the process).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

from ..artifacts import MANIFEST, blocking_file, file_kind, read_manifest, sha256_file, wrong_kind
from ..artifacts import atomic_copy as _atomic_copy
from ..artifacts import atomic_write as _atomic_write
from ..errors import ConfigError, DependencyError, ExportError, InputError
from .plugin_lib import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = [
    "BACKEND_ENV",
    "BACKEND_MODULES",
    "BuildResult",
    "BuildSettings",
    "PLUGIN_ENV",
    "RECORD_FORMAT",
    "build_engine",
    "cache_key",
    "check_platform",
    "inspect_onnx",
    "gpu_info",
    "import_tensorrt",
    "load_plugin_library",
    "read_record",
    "record_path",
    "resolve_backend",
]

Backend = Literal["tensorrt", "rtx"]
Precision = Literal["fp32", "fp16", "int8"]
PluginLoad = Literal["auto", "dlopen", "registry"]

BACKEND_MODULES: dict[str, str] = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}
BACKEND_ENV = "ATS_DEPLOY_TENSORRT"
PLUGIN_ENV = "ATS_SAMPLER_PLUGIN"
CACHE_ENV = "ATS_DEPLOY_CACHE"
CHILD_ENV = "ATS_DEPLOY_BUILD_CHILD"  # set in the isolated build process (rtx_plugin.build_in_child)
RECORD_FORMAT = "ats-deploy-engine/1"
TEGRA_RELEASE = "/etc/nv_tegra_release"
MIN_TENSORRT = (10, 0)  # IPluginV3 and size tensors
MIN_TENSORRT_JETSON = (10, 3)  # JetPack 6.1
STAND_IN_NOTE = (
    "no --plugin-lib: the sampler nodes were built with the Python stand-in plugin (TensorRT-RTX build "
    "check only); this engine proves what TensorRT parses, not the CUDA kernel, and runs nowhere else"
)
DEFAULT_BATCH_PROFILE = (1, 1, 16)  # min/opt/max batch for graphs exported with --dynamic-batch
_FIX = {
    "tensorrt": "on a Jetson flash JetPack 6.1+ (TensorRT 10.3+) and use its python3-libnvinfer; "
    "on a workstation pip install tensorrt (NVIDIA's index)",
    "rtx": "pip install tensorrt-rtx-cu13 (or pip install 'ats-deploy[rtx]')",
}


# -- settings and results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSettings:
    """How to build an engine. Only :attr:`REBUILD_FIELDS` (plus the ONNX bytes, TensorRT and GPU) key the cache.

    ``precision`` is a check, not a switch: None takes the ONNX's own precision; a value must match it.
    ``batch`` is the (min, opt, max) optimisation profile for a dynamic-batch graph (None: 1, 1, 16).
    ``plugin_lib`` is the C++ plugin library for plugin-form graphs (default: $ATS_SAMPLER_PLUGIN; with the
    rtx backend and no library, the Python plugin is used, which builds but cannot run outside Python).
    """

    precision: Precision | None = None
    workspace_mib: int | None = None
    optimization_level: int = 3
    batch: tuple[int, int, int] | None = None
    timing_cache: Path | None = None
    plugin_lib: Path | None = None
    plugin_load: PluginLoad = "auto"
    backend: Backend | None = None

    REBUILD_FIELDS: ClassVar[tuple[str, ...]] = (
        "precision",
        "workspace_mib",
        "optimization_level",
        "batch",
        "plugin_lib",
    )

    def __post_init__(self) -> None:
        if self.precision not in (None, "fp32", "fp16", "int8"):
            raise ConfigError(f"precision {self.precision!r} is unknown; use fp32, fp16 or int8")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise ConfigError(f"workspace {self.workspace_mib} MiB must be positive")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"builder optimization level {self.optimization_level} is outside 0..5")
        if self.batch is not None:
            b = tuple(int(v) for v in self.batch)
            if len(b) != 3 or not 1 <= b[0] <= b[1] <= b[2]:
                raise ConfigError(f"batch profile {list(self.batch)} must be min <= opt <= max, all >= 1")
            object.__setattr__(self, "batch", b)
        if self.plugin_load not in ("auto", "dlopen", "registry"):
            raise ConfigError(f"plugin load mode {self.plugin_load!r} is unknown; use auto, dlopen or registry")
        for name in ("timing_cache", "plugin_lib"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    def to_dict(self) -> dict:
        return {
            f.name: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: dict) -> BuildSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class BuildResult:
    plan: Path
    record_path: Path
    record: dict
    cached: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "plan": str(self.plan),
            "record_path": str(self.record_path),
            "record": self.record,
            "cached": self.cached,
            "seconds": self.seconds,
            "warnings": list(self.warnings),
        }


# -- backend, versions, platform ------------------------------------------------------------------------------


def resolve_backend(backend: str | None = None) -> Backend:
    """``backend`` or $ATS_DEPLOY_TENSORRT or ``tensorrt``; ConfigError for anything else."""
    name = (backend or os.environ.get(BACKEND_ENV) or "tensorrt").strip().lower()
    name = {"trt": "tensorrt", "tensorrt_rtx": "rtx", "tensorrt-rtx": "rtx"}.get(name, name)
    if name not in BACKEND_MODULES:
        raise ConfigError(f"TensorRT backend {name!r} is unknown; use tensorrt or rtx (${BACKEND_ENV})")
    return name  # type: ignore[return-value]


def import_tensorrt(backend: str | None = None) -> ModuleType:
    """The TensorRT Python module of ``backend``; DependencyError (one line, with the fix) if absent."""
    name = resolve_backend(backend)
    module = BACKEND_MODULES[name]
    try:
        return __import__(module)
    except ImportError as exc:
        raise DependencyError(f"Python module {module!r} is not importable ({exc}); {_FIX[name]}") from None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def read_tegra_release(path: str | os.PathLike[str] = TEGRA_RELEASE) -> tuple[int, int] | None:
    """(L4T major, minor) from /etc/nv_tegra_release (``# R36 (release), REVISION: 4.3``), None off-Jetson."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def jetpack_name(l4t: tuple[int, int]) -> str:
    major, minor = l4t
    if major >= 38:
        return "JetPack 7.x"
    if major == 36:
        return "JetPack 6.1/6.2" if minor >= 4 else "JetPack 6.0"
    if major == 35:
        return "JetPack 5.x"
    return f"JetPack for L4T R{major}" if major else "an unknown JetPack"


def check_platform(version: str, *, backend: str = "tensorrt", l4t: tuple[int, int] | None = None) -> None:
    """Refuse TensorRT/JetPack releases that cannot host an IPluginV3 plugin (docs/ATS_RULE.md section 5)."""
    if backend == "rtx":
        return  # every TensorRT-RTX release has IPluginV3 and size tensors
    v = _version_tuple(version)
    fix = "flash JetPack 6.1/6.2 (TensorRT 10.3) or JetPack 7.x (TensorRT 10.13+) and build the engine there"
    if l4t is not None:
        old_l4t = l4t[0] < 36 or (l4t[0] == 36 and l4t[1] < 4)
        if old_l4t or v < MIN_TENSORRT_JETSON:
            raise DependencyError(
                f"{jetpack_name(l4t)} (L4T R{l4t[0]}.{l4t[1]}, TensorRT {version}) cannot host the IPluginV3 "
                f"AdaptiveTokenSampler plugin: {fix}"
            )
    elif v < MIN_TENSORRT:
        raise DependencyError(
            f"TensorRT {version} is too old: IPluginV3 and size tensors need TensorRT >= 10.0 (Jetson: {fix})"
        )


def gpu_info(device: int = 0) -> dict | None:
    """Name, compute capability and CUDA driver version of GPU ``device`` via libcuda; None without a GPU.

    The driver API through ctypes needs no Python CUDA package, so a CPU-only build machine reports None.
    """
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, major, minor, drv = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cu.cuInit(0) != 0 or cu.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return None
    cu.cuDeviceGetName(name, 256, dev)
    cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    cu.cuDriverGetVersion(ctypes.byref(drv))
    return {
        "name": name.value.decode(errors="replace"),
        "compute_capability": f"{major.value}.{minor.value}",
        "cuda_driver": f"{drv.value // 1000}.{drv.value % 1000 // 10}",
    }


def _cuda_runtime_version() -> str | None:
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = __import__(mod, fromlist=["cudaRuntimeGetVersion"])
            err, v = cudart.cudaRuntimeGetVersion()
            return f"{v // 1000}.{v % 1000 // 10}" if int(err) == 0 else None
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
    return None


# -- plugin -------------------------------------------------------------------------------------------------

_LOADED_LIBRARIES: dict[str, Any] = {}  # keeps dlopen handles alive for the process


def _creator(trt: ModuleType):
    return trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)


def load_plugin_library(trt: ModuleType, path: str | os.PathLike[str] | None, *, how: PluginLoad = "auto") -> str:
    """Load the sampler plugin library and check that its creator is registered; returns how it loaded.

    ``dlopen``: ``ctypes.CDLL(path, RTLD_GLOBAL)``, for the default self-registering build (the creator
    registers itself under namespace ``ats`` at load time). ``registry``: ``load_library`` (TensorRT calls the
    library's ``getCreators``), for a ``-DATS_SELF_REGISTER=OFF`` build. ``auto`` tries dlopen, then registry.
    """
    if not path:  # a plugin-form engine whose record, option and environment all lack the library
        raise DependencyError(
            f"this engine needs the sampler plugin library and none was given; pass --plugin-lib "
            f"build/ats_sampler/libats_sampler.so (from `ats-deploy plugin build`) or set ${PLUGIN_ENV}"
        )
    lib = Path(path).expanduser()
    if not lib.is_file():
        raise DependencyError(
            f"plugin library {lib} does not exist; build it with `ats-deploy plugin build` and pass its path "
            f"(or set ${PLUGIN_ENV})"
        )
    if _creator(trt) is not None:
        return "already registered"
    key = str(lib.resolve())
    if how in ("auto", "dlopen"):
        try:
            _LOADED_LIBRARIES[key] = ctypes.CDLL(key, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise DependencyError(
                f"cannot load plugin library {lib}: {str(exc).splitlines()[0]}; rebuild it against this TensorRT "
                "with `ats-deploy plugin build`"
            ) from None
        if _creator(trt) is not None:
            return "dlopen"
    if how in ("auto", "registry"):
        handle = trt.get_plugin_registry().load_library(key)
        if handle is not None:
            _LOADED_LIBRARIES[key + "#registry"] = handle
        if _creator(trt) is not None:
            return "registry"
    raise DependencyError(
        f"{lib} loaded but no creator {PLUGIN_NAME} version {PLUGIN_VERSION} namespace {PLUGIN_NAMESPACE!r} is "
        "registered; rebuild it from plugins/ats_sampler (`ats-deploy plugin build`) for this TensorRT"
    )


def _plugin_source(settings: BuildSettings, backend: str) -> Path | None:
    lib = settings.plugin_lib
    if lib is None and os.environ.get(PLUGIN_ENV):
        lib = Path(os.environ[PLUGIN_ENV])
    if lib is None and backend == "tensorrt":
        raise DependencyError(
            f"this ONNX has {PLUGIN_NAME} nodes: pass the plugin library (--plugin-lib build/ats_sampler/"
            f"libats_sampler.so, from `ats-deploy plugin build`) or set ${PLUGIN_ENV}"
        )
    return lib


def _register_plugin(trt: ModuleType, settings: BuildSettings, backend: str) -> dict:
    lib = _plugin_source(settings, backend)
    if lib is None:  # rtx without a library: the Python plugin (build-time only)
        from .rtx_plugin import register_python_plugin

        if not register_python_plugin(trt):
            raise DependencyError(f"could not register the Python {PLUGIN_NAME} creator with {trt.__name__}")
        return {"kind": "python", "path": None, "sha256": None, "loaded_by": "register_creator"}
    how = load_plugin_library(trt, lib, how=settings.plugin_load)
    return {"kind": "library", "path": str(Path(lib).resolve()), "sha256": sha256_file(lib), "loaded_by": how}


# -- ONNX inspection and manifest -----------------------------------------------------------------------------


def _onnx_digest(path: Path) -> str:
    """sha256 of the ONNX bytes (and of its external-data side file, when there is one)."""
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".data")):
        if p.is_file():
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class OnnxFacts:
    precision: Precision
    plugin_nodes: int
    batch: int | None  # static batch, None when the batch dimension is symbolic
    input_name: str
    input_shape: tuple


def inspect_onnx(path: Path) -> OnnxFacts:
    """What the build needs from the graph, read without loading external weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ValueError...
        raise InputError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}); re-run ats-deploy export"
        ) from None
    g = model.graph
    ops = {n.op_type for n in g.node}
    plugin_nodes = sum(1 for n in g.node if n.op_type == PLUGIN_NAME)
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        precision: Precision = "int8"
    else:
        f16 = onnx.TensorProto.FLOAT16
        half = any(t.data_type == f16 for t in g.initializer)
        half = half or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute) for n in g.node
        )
        half = half or any(v.type.tensor_type.elem_type == f16 for v in list(g.input) + list(g.output))
        precision = "fp16" if half else "fp32"
    inits = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in inits]
    if len(inputs) != 1:
        raise InputError(f"{path} has {len(inputs)} graph inputs; an ats-deploy graph has one (pixels)")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    return OnnxFacts(precision, plugin_nodes, batch, inputs[0].name, shape)


def _read_manifest(onnx_path: Path, manifest: str | os.PathLike[str] | None) -> tuple[Path, dict]:
    p = Path(manifest) if manifest is not None else onnx_path.parent / MANIFEST
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise InputError(
            f"{onnx_path.name} has no {MANIFEST} beside it ({p}); build the ONNX inside the directory written "
            "by ats-deploy export, with its manifest next to it"
        )
    return p, read_manifest(p, allow_file=True, sections=("artifacts",))


def _manifest_facts(onnx_path: Path, man_path: Path, man: dict) -> dict:
    arts = man.get("artifacts", {})
    want = arts.get(onnx_path.name, {}).get("sha256")
    if want and want != sha256_file(onnx_path):
        raise InputError(
            f"{onnx_path} does not match its manifest {man_path} (sha256); re-run ats-deploy export into that directory"
        )
    return {
        "path": str(man_path.resolve()),
        "sha256": sha256_file(man_path),
        "reference_sha256": arts.get("reference.npz", {}).get("sha256"),
        "artifacts": {k: v.get("sha256") for k, v in arts.items()},
        "ats": man.get("ats", {}),
        "graph": man.get("graph", {}),
        "preprocessing": man.get("preprocessing", {}),
    }


# -- cache and records ------------------------------------------------------------------------------------------


def record_path(plan: str | os.PathLike[str]) -> Path:
    """The JSON record beside a plan: ``model.plan`` -> ``model.plan.json``."""
    p = Path(plan)
    return p.with_name(p.name + ".json")


def read_record(plan: str | os.PathLike[str], *, check_plan: bool = True) -> dict:
    """The build record of ``plan`` (InputError when missing/unreadable, or when the plan was changed)."""
    p = Path(plan)
    if p.is_dir():
        raise InputError(f"{p} is a directory, not a TensorRT engine; pass the .plan written by ats-deploy build")
    if not p.is_file():
        raise InputError(f"engine {p} does not exist; build it with ats-deploy build")
    kind = file_kind(p)
    if kind in ("onnx", "safetensors", "torch-zip", "pickle", "npz", "json"):  # plans have no magic to check
        raise wrong_kind(p, "plan", kind)
    rp = record_path(p)
    if not rp.is_file():
        raise InputError(f"{p.name} has no build record {rp.name} beside it; rebuild the engine with ats-deploy build")
    try:
        rec = json.loads(rp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{rp} is not readable JSON ({exc}); rebuild the engine with ats-deploy build") from None
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        raise InputError(f"{rp} is not an ats-deploy engine record; rebuild the engine with ats-deploy build")
    if check_plan:
        want = rec.get("engine", {}).get("sha256")
        if want and sha256_file(p) != want:
            raise InputError(
                f"{p} is corrupt or changed since it was built (sha256 differs from {rp.name}); "
                "rebuild it with ats-deploy build"
            )
    return rec


def _default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "engines"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ats-deploy" / "engines"


def cache_key(
    onnx_sha256: str, settings: BuildSettings, *, backend: str, trt_version: str, gpu: dict | None, plugin_sha256=None
) -> str:
    """sha256 over what decides the engine's bytes: ONNX, REBUILD_FIELDS, backend, TensorRT, GPU."""
    parts: dict[str, Any] = {"onnx": onnx_sha256, "backend": backend, "tensorrt": trt_version}
    for name in BuildSettings.REBUILD_FIELDS:
        value = getattr(settings, name)
        if name == "plugin_lib":
            value = plugin_sha256 or ("python" if value is None else str(value))
        parts[name] = list(value) if isinstance(value, tuple) else value
    parts["gpu"] = None if gpu is None else [gpu.get("name"), gpu.get("compute_capability")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _write_outputs(plan: Path, plan_bytes: bytes | None, record: dict, *, src: Path | None = None) -> None:
    """Plan first, record second: a record never describes a plan that is not there."""
    try:
        if src is not None:
            _atomic_copy(src, plan)
        else:
            _atomic_write(plan, plan_bytes or b"")
        _atomic_write(record_path(plan), json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise ExportError(f"cannot write {plan} ({exc.strerror}); free space or choose another -o") from None


# -- the build --------------------------------------------------------------------------------------------------


def _make_logger(trt: ModuleType, verbose: bool):
    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg) -> None:
            text = str(msg).strip()
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(text)
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(text)
            if verbose:
                print(f"[TensorRT] {text}", file=sys.stderr)

    return _Logger()


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_errors(parser, logger) -> str:
    msgs = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = ""
        try:
            if err.node_name():
                node = f"node {err.node_name()} ({err.node_operator()}): "
        except (AttributeError, TypeError):
            pass
        msgs.append(node + err.desc())
    msgs = msgs or logger.errors or ["unknown parser error"]
    return _one_line("; ".join(msgs))


def _dtype_name(dt) -> str:
    return str(getattr(dt, "name", dt)).lower()


def _network_summary(trt: ModuleType, network) -> dict:
    def tensor(t) -> dict:
        return {"name": t.name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}

    plugins = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            outs = [tensor(layer.get_output(j)) for j in range(layer.num_outputs)]
            plugins.append({"name": layer.name, "outputs": outs})
    return {
        "layers": network.num_layers,
        "inputs": [tensor(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [tensor(network.get_output(i)) for i in range(network.num_outputs)],
        "plugin_layers": plugins,
    }


def _configure(trt: ModuleType, builder, network, settings: BuildSettings):
    config = builder.create_builder_config()
    if settings.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mib) << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = settings.optimization_level
    inp = network.get_input(0)
    shape = list(inp.shape)
    if shape and shape[0] == -1:
        lo, opt, hi = settings.batch or DEFAULT_BATCH_PROFILE
        rest = shape[1:]
        if any(d < 0 for d in rest):
            raise InputError(
                f"input {inp.name} has dynamic non-batch dimensions {shape}; only the batch may be dynamic"
            )
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (lo, *rest), (opt, *rest), (hi, *rest))
        config.add_optimization_profile(profile)
    cache = None
    if settings.timing_cache is not None and hasattr(config, "create_timing_cache"):
        blob = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=True)
    return config, cache


def _build_in_process(
    trt: ModuleType,
    backend: str,
    onnx_path: Path,
    facts: OnnxFacts,
    settings: BuildSettings,
    verbose: bool,
) -> tuple[bytes, dict, dict | None, list[str]]:
    """Parse and build; returns (plan bytes, network summary, plugin info, warnings)."""
    logger = _make_logger(trt, verbose)
    plugin = _register_plugin(trt, settings, backend) if facts.plugin_nodes else None
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {_parse_errors(parser, logger)}")
    summary = _network_summary(trt, network)
    if facts.plugin_nodes and len(summary["plugin_layers"]) != facts.plugin_nodes:
        raise ExportError(
            f"{onnx_path.name} has {facts.plugin_nodes} {PLUGIN_NAME} nodes but the network has "
            f"{len(summary['plugin_layers'])} plugin layers; is another creator shadowing ours?"
        )
    config, cache = _configure(trt, builder, network, settings)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        last = logger.errors[-1] if logger.errors else "no error message"
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name}: {_one_line(last)}")
    ours: list[str] = []  # our warnings; TensorRT's own go to stderr with verbose=True
    if cache is not None and settings.timing_cache is not None:
        try:
            _atomic_write(settings.timing_cache, bytes(config.get_timing_cache().serialize()))
        except OSError as exc:
            ours.append(f"timing cache {settings.timing_cache} not written ({exc.strerror})")
    return bytes(serialized), summary, plugin, ours


def _needs_guard(backend: str, facts: OnnxFacts) -> bool:
    """TensorRT-RTX aborts on plugin nodes unless the shim was on LD_LIBRARY_PATH at process start."""
    if backend != "rtx" or not facts.plugin_nodes:
        return False
    from .rtx_plugin import shim_active

    return not shim_active()


def build_engine(
    onnx_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    settings: BuildSettings | None = None,
    manifest: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    verbose: bool = False,
    isolate: bool | None = None,
) -> BuildResult:
    """Build (or fetch from the cache) a strongly typed engine for ``onnx_path``; write plan + record.

    ``output`` defaults to the ONNX path with ``.plan``. The manifest written by ``ats-deploy export`` must
    sit beside the ONNX (or be passed as ``manifest``). ``isolate`` runs the build in a child process
    (default: only where TensorRT-RTX must parse plugin nodes, see the module docstring).
    """
    t0 = time.perf_counter()
    settings = settings or BuildSettings()
    backend = resolve_backend(settings.backend)
    onnx_path = Path(onnx_path)
    kind = file_kind(onnx_path)
    if kind == "missing":
        raise InputError(f"ONNX file {onnx_path} does not exist; run ats-deploy export first")
    if kind != "onnx":
        raise wrong_kind(onnx_path, "onnx", kind)
    plan = Path(output) if output is not None else onnx_path.with_suffix(".plan")
    if plan.is_dir():
        raise InputError(f"-o {plan} is a directory; pass the engine file to write, e.g. {plan / 'model.plan'}")
    blocker = blocking_file(plan.parent)
    if blocker is not None:  # found before the build, not after minutes of it
        raise InputError(f"-o {plan} cannot be written: {blocker} is a file, not a folder; choose another -o")
    if settings.plugin_lib is not None and not Path(settings.plugin_lib).is_file():
        raise DependencyError(
            f"plugin library {settings.plugin_lib} does not exist; build it with `ats-deploy plugin build`"
        )
    man_path, man = _read_manifest(onnx_path, manifest)
    onnx_sha = _onnx_digest(onnx_path)
    man_info = _manifest_facts(onnx_path, man_path, man)
    facts = inspect_onnx(onnx_path)
    if settings.precision is not None and settings.precision != facts.precision:
        raise ConfigError(
            f"{onnx_path.name} is a {facts.precision} graph but precision {settings.precision} was requested: "
            "engines are strongly typed, so export an ONNX of that precision first"
        )
    # Effective settings: what the engine really is (the cache keys on these, not on what was left unset).
    batch = None if facts.batch is not None else (settings.batch or DEFAULT_BATCH_PROFILE)
    if facts.batch is not None and settings.batch is not None and tuple(settings.batch) != (facts.batch,) * 3:
        raise ConfigError(
            f"a batch profile {list(settings.batch)} was given but {onnx_path.name} has a static batch of "
            f"{facts.batch}; re-export with --dynamic-batch or drop the profile"
        )
    settings = replace(settings, precision=facts.precision, batch=batch, backend=backend)
    trt = import_tensorrt(backend)
    version = str(trt.__version__)
    check_platform(version, backend=backend, l4t=read_tegra_release())

    gpu = gpu_info()
    plugin_sha = None
    if facts.plugin_nodes:
        lib = _plugin_source(settings, backend)
        plugin_sha = sha256_file(lib) if lib is not None and Path(lib).is_file() else None
    key = cache_key(onnx_sha, settings, backend=backend, trt_version=version, gpu=gpu, plugin_sha256=plugin_sha)
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cached_plan, cached_rec = cache / f"{key}.plan", cache / f"{key}.plan.json"
    if use_cache and cached_plan.is_file() and cached_rec.is_file():
        try:
            rec = json.loads(cached_rec.read_text())
            if rec.get("engine", {}).get("sha256") == sha256_file(cached_plan):
                if facts.plugin_nodes and (rec.get("plugin") or {}).get("kind") == "library":
                    _register_plugin(trt, settings, backend)  # the same library checks as a fresh build
                rec = {**rec, "onnx": {**rec["onnx"], "path": str(onnx_path.resolve())}}
                _write_outputs(plan, None, rec, src=cached_plan)
                notes = [STAND_IN_NOTE] if (rec.get("plugin") or {}).get("kind") == "python" else []
                return BuildResult(plan, record_path(plan), rec, True, time.perf_counter() - t0, notes)
        except (OSError, json.JSONDecodeError, KeyError):
            pass  # a damaged cache entry is rebuilt

    if isolate is None:
        isolate = _needs_guard(backend, facts)
    if isolate and not os.environ.get(CHILD_ENV):
        from .rtx_plugin import build_in_child

        r = build_in_child(
            onnx_path,
            plan,
            settings,
            env={CHILD_ENV: "1", BACKEND_ENV: backend},
            manifest=man_path,
            cache_dir=cache_dir,
            use_cache=use_cache,
            verbose=verbose,
        )
        return BuildResult(
            Path(r["plan"]), Path(r["record_path"]), r["record"], r["cached"], time.perf_counter() - t0, r["warnings"]
        )
    if _needs_guard(backend, facts):
        raise DependencyError(
            "TensorRT-RTX would abort parsing plugin nodes: libtensorrt_rtx.so is not on LD_LIBRARY_PATH of this "
            "process; build with isolate=True (a child process gets the shim from rtx_plugin.ensure_rtx_shim)"
        )

    plan_bytes, summary, plugin, warnings = _build_in_process(trt, backend, onnx_path, facts, settings, verbose)
    if plugin and plugin.get("kind") == "python":
        plugin = {**plugin, "note": STAND_IN_NOTE}
        warnings.append(STAND_IN_NOTE)
    record = {
        "format": RECORD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": backend,
        "tensorrt_version": version,
        "cuda": {"driver": (gpu or {}).get("cuda_driver"), "runtime": _cuda_runtime_version()},
        "gpu": None if gpu is None else {"name": gpu["name"], "compute_capability": gpu["compute_capability"]},
        "platform": {"machine": platform.machine(), "l4t": _l4t_text()},
        "precision": facts.precision,
        "onnx": {
            "name": onnx_path.name,
            "path": str(onnx_path.resolve()),
            "sha256": onnx_sha,
            "plugin_nodes": facts.plugin_nodes,
            "input": {"name": facts.input_name, "shape": list(facts.input_shape)},
        },
        "manifest": man_info,
        "settings": settings.to_dict(),
        "plugin": plugin,
        "network": summary,
        "engine": {"sha256": hashlib.sha256(plan_bytes).hexdigest(), "bytes": len(plan_bytes)},
        "cache_key": key,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    _write_outputs(plan, plan_bytes, record)
    if use_cache:
        try:
            _atomic_copy(plan, cached_plan)
            _atomic_write(cached_rec, json.dumps(record, indent=2) + "\n")
        except OSError as exc:
            warnings.append(f"engine cache {cache} not updated ({exc.strerror})")
    return BuildResult(plan, record_path(plan), record, False, time.perf_counter() - t0, warnings)


def child_main(request: str) -> None:
    """Entry point of the isolated build process (:func:`.rtx_plugin.build_in_child`): run build_engine
    here, report the result or the error as JSON."""
    from ..errors import AtsDeployError

    req = json.loads(Path(request).read_text())
    try:
        res = build_engine(
            req["onnx"],
            req["output"],
            settings=BuildSettings.from_dict(req["settings"]),
            manifest=req["manifest"],
            cache_dir=req["cache_dir"],
            use_cache=req["use_cache"],
            verbose=req["verbose"],
            isolate=False,
        )
        out: dict = {"result": res.to_dict()}
    except AtsDeployError as exc:
        out = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    tmp = Path(req["result"] + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, req["result"])


def _l4t_text() -> str | None:
    rel = read_tegra_release()
    return None if rel is None else f"R{rel[0]}.{rel[1]}"
