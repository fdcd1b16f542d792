"""The sampler as an ONNX Runtime custom op: build ``libats_sampler_ort.so`` (C++ in ``plugins/ats_sampler_ort``)
and find it for a session.

The plugin-form ONNX (``ats-deploy export --sampler plugin`` writes ``model.plugin.onnx``) holds the sampler
as one ``ats::AdaptiveTokenSampler`` node, which TensorRT runs with the plugin. With this library registered,
ONNX Runtime runs the same file on the CPU: the portable subgraph's ~70 small nodes per ATS block become one
kernel call (static shape mode; a dynamic-mode node keeps the portable form). The library takes its API from the
runtime that loads it, so building it needs only ONNX Runtime's C API header (any release from 1.16 on, e.g.
the ``onnxruntime-linux-<arch>-<version>.tgz`` of its GitHub releases), a C++17 compiler and cmake.

Stdlib and subprocess only, like :mod:`ats_deploy.exporters.plugin_lib`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ats_deploy.errors import DependencyError, ExportError, InputError

from .plugin_lib import _make_build_dir, _run, find_cmake, source_dir

__all__ = [
    "ORT_OPS_ENV",
    "ORT_OP_LIBRARY",
    "ORT_OP_SOURCES",
    "build_ort_op",
    "find_onnxruntime_headers",
    "ort_op_library",
    "ort_op_source_dir",
]

ORT_OP_LIBRARY = "libats_sampler_ort.so"
ORT_OP_SOURCES = ("CMakeLists.txt", "atsSamplerCpu.h", "atsSamplerCpu.cpp", "atsSamplerOrtOp.cpp")
ORT_OPS_ENV = "ATS_ORT_OPS"  # path of the built library: OrtRunner registers it when set
_ORT_ROOT_ENV = "ONNXRUNTIME_ROOT"
_HEADER = "onnxruntime_c_api.h"
_HEADER_DIRS = ("include", "include/onnxruntime", "include/onnxruntime/core/session", ".")


def ort_op_source_dir() -> Path:
    """``plugins/ats_sampler_ort`` of a checkout, or the copy an installed wheel ships as package data."""
    return source_dir("ats_sampler_ort", "ONNX Runtime op sources")


def find_onnxruntime_headers(onnxruntime_root: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding onnxruntime_c_api.h under ``onnxruntime_root`` (default $ONNXRUNTIME_ROOT)."""
    root = onnxruntime_root if onnxruntime_root is not None else os.environ.get(_ORT_ROOT_ENV)
    fix = ("pass --onnxruntime-root an ONNX Runtime release (>= 1.16) that has include/onnxruntime_c_api.h, e.g. "
           "the onnxruntime-linux-<arch>-<version>.tgz of github.com/microsoft/onnxruntime/releases "
           "(the onnxruntime wheel ships no headers)")
    if root is None:
        raise DependencyError(f"ONNX Runtime's C API header is needed to build the op: {fix}")
    for sub in _HEADER_DIRS:
        if (Path(root) / sub / _HEADER).is_file():
            return (Path(root) / sub).resolve()
    raise DependencyError(f"{_HEADER} not found under {root}: {fix}")


def build_ort_op(
    *,
    build_dir: str | os.PathLike[str],
    onnxruntime_root: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    jobs: int | None = None,
) -> Path:
    """Configure and build libats_sampler_ort.so with CMake; return its path.

    Missing tools or headers raise DependencyError (one line with the fix); a failed compile raises ExportError
    with the build log's tail."""
    src = Path(source_dir) if source_dir is not None else ort_op_source_dir()
    if not (src / "CMakeLists.txt").is_file():
        raise DependencyError(f"no CMakeLists.txt in {src}: pass the plugins/ats_sampler_ort directory as source_dir")
    include = find_onnxruntime_headers(onnxruntime_root)
    cmake = find_cmake()
    build = Path(build_dir)
    _make_build_dir(build)
    _run([cmake, "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DONNXRUNTIME_ROOT={include}"],
         what="cmake configure")
    _run([cmake, "--build", str(build), "--target", "ats_sampler_ort", "--parallel", str(jobs or os.cpu_count() or 1)],
         what="cmake build")
    library = build / ORT_OP_LIBRARY
    if not library.is_file():
        raise ExportError(f"the build finished but {library} is missing: check the CMake output in {build}")
    return library


def ort_op_library(library: str | os.PathLike[str] | None = None) -> Path | None:
    """The library to register: ``library``, else $ATS_ORT_OPS, else None. A path that is not a file is an
    InputError naming where it came from."""
    source = "--ort-ops"
    if library is None:
        library, source = os.environ.get(ORT_OPS_ENV) or None, f"${ORT_OPS_ENV}"
    if library is None:
        return None
    path = Path(library)
    if not path.is_file():
        raise InputError(f"{source} {path} is not a file; build it with `ats-deploy plugin build-ort` and pass "
                         f"its path (or unset {ORT_OPS_ENV})")
    return path
