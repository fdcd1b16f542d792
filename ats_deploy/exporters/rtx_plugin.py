"""A Python ``AdaptiveTokenSampler`` IPluginV3 for building engines where the C++ library cannot be loaded.

TensorRT-RTX (``pip install tensorrt-rtx-cu13``) parses ONNX and builds engines on a CPU-only machine, so CI
can prove that TensorRT's own parser and builder accept the plugin form of our graphs. The C++ plugin
(``plugins/ats_sampler``) is compiled against real TensorRT on the Jetson; here a Python plugin with the same
identity (name ``AdaptiveTokenSampler``, version ``"1"``, namespace ``"ats"``), the same fields (``k_max``,
``n_ref``, ``mode``, INT32) and the same shape logic stands in for it at build time:

- outputs ``indices`` [B, K_out] int32 and ``count_out`` [B] int32 with K_out = min(k_max, n);
- dynamic mode: ``indices`` is [B, s] with s a 0-D INT64 size tensor (output 2), declared with
  ``declare_size_tensor(2, opt, upper=K_out)``, exactly like the C++ plugin: opt = K_out in the first
  dynamic block, min(k_max, n_ref) // 2 after it, where n comes from an earlier size tensor (TensorRT:
  opt must not depend on a size tensor, and opt <= upper, or the build fails late).

Only the build-time methods matter; ``enqueue`` runs the NumPy reference on host copies if it is ever
executed (real TensorRT with cuda-python), which is slow but correct.

The crash guard (see ``shared/notes/tensorrt-rtx-plugins.md``): when the parser finds a registered creator
for a plugin node, TensorRT-RTX aborts the whole process unless an unversioned ``libtensorrt_rtx.so`` can be
found through ``LD_LIBRARY_PATH`` as it was when the process started. :func:`ensure_rtx_shim` makes a
directory (in the user cache, never in the repository) holding that symlink, and :func:`guarded_env` the
environment a child process needs; :mod:`ats_deploy.exporters.trt` runs RTX plugin builds in such a child.
Nothing here imports tensorrt at import time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import DependencyError
from .plugin_lib import PLUGIN_FIELDS, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = [
    "GUARD_ENV",
    "RTX_LIBRARY",
    "build_in_child",
    "ensure_rtx_shim",
    "guarded_env",
    "plugin_classes",
    "register_python_plugin",
    "rtx_library_path",
    "shim_active",
]

RTX_LIBRARY = "libtensorrt_rtx.so"
RTX_SONAME = "libtensorrt_rtx.so.1"
GUARD_ENV = "ATS_DEPLOY_RTX_GUARDED"  # set in the child process that may parse plugin nodes
SHIM_ENV = "ATS_DEPLOY_RTX_SHIM"  # optional: where to put the shim directory
MODE_STATIC, MODE_DYNAMIC = 0, 1


# -- the crash guard -------------------------------------------------------------------------------------


def rtx_library_path() -> Path:
    """``<site-packages>/tensorrt_rtx_libs/libtensorrt_rtx.so.1``, found without importing anything."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        lib = Path(d) / RTX_SONAME
        if lib.is_file():
            return lib
    raise DependencyError(
        f"{RTX_SONAME} not found (package tensorrt_rtx_libs {'has no such file' if dirs else 'is not installed'}); "
        "pip install tensorrt-rtx-cu13"
    )


def _default_shim_dir() -> Path:
    if os.environ.get(SHIM_ENV):
        return Path(os.environ[SHIM_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ats-deploy" / "rtx-shim"


def ensure_rtx_shim(shim_dir: str | os.PathLike[str] | None = None) -> Path:
    """A directory holding ``libtensorrt_rtx.so -> .../tensorrt_rtx_libs/libtensorrt_rtx.so.1``; returns it.

    Created (or repaired) atomically: the link is made under a temporary name and renamed into place, so
    concurrent builds never see a half-made shim. Raises DependencyError when the wheel's library is absent
    or the directory cannot be written.
    """
    target = rtx_library_path()
    d = Path(shim_dir) if shim_dir is not None else _default_shim_dir()
    link = d / RTX_LIBRARY
    try:
        if link.is_symlink() and Path(os.readlink(link)) == target and target.is_file():
            return d
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{RTX_LIBRARY}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except OSError as exc:
        raise DependencyError(
            f"cannot create the TensorRT-RTX shim {link} ({exc.strerror}); set {SHIM_ENV} to a writable directory"
        ) from None
    return d


def shim_active(environ: dict[str, str] | None = None) -> bool:
    """True when this process can find ``libtensorrt_rtx.so`` the way TensorRT-RTX looks for it.

    That is: a directory of ``LD_LIBRARY_PATH`` (as set when the process started; this reads the current
    environment, which a child started by :func:`guarded_env` inherits unchanged) or the wheel's own library
    directory holds the unversioned name.
    """
    env = os.environ if environ is None else environ
    dirs = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    try:
        dirs.append(str(rtx_library_path().parent))
    except DependencyError:
        return False
    return any((Path(p) / RTX_LIBRARY).exists() for p in dirs)


def guarded_env(shim_dir: str | os.PathLike[str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that may parse plugin nodes with TensorRT-RTX."""
    env = dict(os.environ if base is None else base)
    d = str(ensure_rtx_shim(shim_dir))
    old = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = d + (os.pathsep + old if old else "")
    env[GUARD_ENV] = "1"
    return env


# -- the plugin --------------------------------------------------------------------------------------------


def _field_int(data: Any) -> int:
    """INT fields reach the creator as INT32 arrays (the parser narrows INT64 attributes silently)."""
    arr = np.asarray(data).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"expected one integer, got {arr.size} values")
    return int(arr[0])


@lru_cache(maxsize=4)
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """The (plugin, creator) classes bound to one TensorRT Python module (``tensorrt`` or ``tensorrt_rtx``)."""

    class AtsSamplerPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, k_max: int, n_ref: int, mode: int) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            if k_max < 2 or n_ref < 2 or mode not in (MODE_STATIC, MODE_DYNAMIC):
                raise ValueError(f"bad AdaptiveTokenSampler fields k_max={k_max} n_ref={n_ref} mode={mode}")
            self.k_max, self.n_ref, self.mode = int(k_max), int(n_ref), int(mode)
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.num_outputs = 3 if self.mode == MODE_DYNAMIC else 2

        # core / build
        def get_capability_interface(self, _type):
            return self

        def clone(self):
            return AtsSamplerPlugin(self.k_max, self.n_ref, self.mode)

        def get_output_data_types(self, input_types):
            if len(input_types) != 2 or input_types[0] != trt.float32 or input_types[1] != trt.int32:
                raise ValueError("AdaptiveTokenSampler takes scores float32 [B, n] and count_in int32 [B]")
            types = [trt.int32, trt.int32]
            return types + [trt.int64] if self.mode == MODE_DYNAMIC else types

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            scores = inputs[0]
            batch, n = scores[0], scores[1]
            k_out = expr_builder.operation(trt.DimensionOperation.MIN, expr_builder.constant(self.k_max), n)
            indices = trt.DimsExprs(2)
            indices[0] = batch
            count = trt.DimsExprs(1)
            count[0] = batch
            if self.mode == MODE_STATIC:
                indices[1] = k_out
                return [indices, count]
            # s = max(count_out) <= K_out. The tuning value must not depend on a size tensor (TensorRT's
            # rule), and after the first dynamic ATS block n is the previous block's s: as the C++ plugin
            # does, tune for K_out in the first block and for half the grid's bound after it.
            opt = k_out if n.is_constant() else expr_builder.constant(max(1, min(self.k_max, self.n_ref) // 2))
            indices[1] = expr_builder.declare_size_tensor(2, opt, k_out)
            return [indices, count, trt.DimsExprs(0)]

        def supports_format_combination(self, pos, in_out, num_inputs):
            want = [trt.float32, trt.int32, trt.int32, trt.int32, trt.int64][pos]
            desc = in_out[pos].desc
            return desc.type == want and desc.format == trt.TensorFormat.LINEAR

        def configure_plugin(self, inputs, outputs):
            return None

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        # runtime
        def on_shape_change(self, inputs, outputs):
            return None

        def set_tactic(self, tactic):
            return None

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(
                [
                    trt.PluginField(name, np.array([value], dtype=np.int32), trt.PluginFieldType.INT32)
                    for name, value in zip(PLUGIN_FIELDS, (self.k_max, self.n_ref, self.mode))
                ]
            )

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            _enqueue_reference(self, input_desc, inputs, outputs, stream)

    class AtsSamplerCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField(name, np.array([], dtype=np.int32), trt.PluginFieldType.INT32)
                    for name in PLUGIN_FIELDS
                ]
            )

        def create_plugin(self, name, fc, phase):
            values = {f.name: _field_int(f.data) for f in fc if f.name in PLUGIN_FIELDS}
            missing = [k for k in PLUGIN_FIELDS if k not in values]
            if missing:
                raise ValueError(f"AdaptiveTokenSampler node {name!r} lacks attribute(s) {missing}")
            return AtsSamplerPlugin(values["k_max"], values["n_ref"], values["mode"])

    return AtsSamplerPlugin, AtsSamplerCreator


_REGISTERED: dict[int, Any] = {}  # keeps each module's creator alive for the registry (it holds a raw pointer)


def register_python_plugin(trt: ModuleType) -> bool:
    """Register the Python creator under namespace ``ats`` (once per module); True when it is registered.

    The registry keeps a non-owning reference, so the creator object is kept alive here for the process.
    """
    key = id(trt)
    if key in _REGISTERED:
        return True
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:
        return True  # a C++ library (or another registration) already provides it
    _, creator_cls = plugin_classes(trt)
    creator = creator_cls()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        return False
    _REGISTERED[key] = creator
    return True


def _enqueue_reference(plugin: Any, input_desc, inputs, outputs, stream) -> None:
    """Run the NumPy reference on host copies (only if real TensorRT ever executes this plugin)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]

    from ..model.reference import select_reference

    b, n = (int(d) for d in input_desc[0].dims)
    scores = np.empty((b, n), np.float32)
    count_in = np.empty((b,), np.int32)
    d2h, h2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    cudart.cudaMemcpyAsync(scores.ctypes.data, inputs[0], scores.nbytes, d2h, stream)
    cudart.cudaMemcpyAsync(count_in.ctypes.data, inputs[1], count_in.nbytes, d2h, stream)
    cudart.cudaStreamSynchronize(stream)
    indices, count_out = select_reference(scores, count_in, k_max=plugin.k_max, n_ref=plugin.n_ref, dtype=np.float32)
    if plugin.mode == MODE_DYNAMIC:
        s = int(count_out.max()) if b else 1
        indices = np.ascontiguousarray(indices[:, :s])
        size = np.array(s, dtype=np.int64)
        cudart.cudaMemcpyAsync(outputs[2], size.ctypes.data, size.nbytes, h2d, stream)
    cudart.cudaMemcpyAsync(outputs[0], indices.ctypes.data, indices.nbytes, h2d, stream)
    cudart.cudaMemcpyAsync(outputs[1], count_out.ctypes.data, count_out.nbytes, h2d, stream)
    cudart.cudaStreamSynchronize(stream)  # host buffers die with this frame


# -- the isolated build process ------------------------------------------------------------------------------


def build_in_child(
    onnx_path: Path,
    plan: Path,
    settings: Any,
    *,
    env: dict[str, str],
    manifest: Path | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    verbose: bool = False,
    timeout: float | None = None,
) -> dict:
    """Run :func:`ats_deploy.exporters.trt.child_main` (its ``build_engine``) in a child process started
    with the shim and ``env`` added; returns the child's ``BuildResult.to_dict()``.

    An abort inside TensorRT then kills the child, not the caller, and becomes one ExportError line;
    library errors raised in the child come back as the same error class with the same message. This
    module never imports :mod:`.trt` (trt calls in here, not the other way round).
    """
    from .. import errors

    child_env = {**guarded_env(), **env}
    shim = child_env["LD_LIBRARY_PATH"].split(os.pathsep)[0]
    with tempfile.TemporaryDirectory(prefix="ats-deploy-build-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request = {
            "onnx": str(onnx_path),
            "output": str(plan),
            "settings": settings.to_dict(),
            "manifest": None if manifest is None else str(manifest),
            "cache_dir": None if cache_dir is None else str(cache_dir),
            "use_cache": use_cache,
            "verbose": verbose,
            "result": str(res),
        }
        req.write_text(json.dumps(request))
        code = f"from ats_deploy.exporters.trt import child_main; child_main({str(req)!r})"
        try:
            cmd = [sys.executable, "-c", code]
            proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise errors.ExportError(f"the TensorRT build of {onnx_path.name} took over {timeout} s; stopped") from None
        if verbose and proc.stderr:
            sys.stderr.write(proc.stderr)
        if not res.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["no output"]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            raise errors.ExportError(
                f"the TensorRT build process for {onnx_path.name} died ({how}: {lines[-1].strip()[:160]}); "
                f"check the libtensorrt_rtx.so shim in {shim}"
            )
        out = json.loads(res.read_text())
    if "error" in out:
        cls = getattr(errors, out["error"]["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, errors.AtsDeployError)):
            cls = errors.ExportError
        raise cls(out["error"]["message"])
    return out["result"]
