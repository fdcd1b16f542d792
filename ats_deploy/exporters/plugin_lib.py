"""Build the AdaptiveTokenSampler plugin library (C++/CUDA in ``plugins/ats_sampler``) with CMake.

Engines are built on the Jetson itself, so the plugin is compiled there too, against the TensorRT that
JetPack installed: this module finds the sources (a checkout or the installed package), nvcc, cmake and
TensorRT, and turns every missing piece into one :class:`~ats_deploy.errors.DependencyError` line that says
what is missing and how to get it. No torch, no tensorrt import: stdlib and subprocess only, so it works in
the bare Jetson environment.

The identity constants below are the single Python source of the plugin contract (docs/ATS_RULE.md section 4); the
unit tests check that the C++ sources register exactly these.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ats_deploy.errors import DependencyError, ExportError

__all__ = [
    "KERNEL_LIBRARY",
    "PLUGIN_FIELDS",
    "PLUGIN_LIBRARY",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_SOURCES",
    "PLUGIN_VERSION",
    "build_plugin",
    "find_cmake",
    "find_nvcc",
    "find_tensorrt_root",
    "kernel_compile_check",
    "plugin_source_dir",
    "source_dir",
]

PLUGIN_NAME = "AdaptiveTokenSampler"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "ats"
PLUGIN_FIELDS = ("k_max", "n_ref", "mode")

PLUGIN_LIBRARY = "libats_sampler.so"
KERNEL_LIBRARY = "libats_sampler_kernel.so"
PLUGIN_SOURCES = (
    "CMakeLists.txt",
    "atsSampler.h",
    "atsSamplerKernel.h",
    "atsSamplerKernel.cu",
    "atsSamplerPlugin.h",
    "atsSamplerPlugin.cpp",
)

# Where TensorRT usually lives when no root is given: tarball installs, then Debian/JetPack packages
# (/usr: headers in /usr/include/<multiarch>, libnvinfer in /usr/lib/<multiarch>).
_TENSORRT_PREFIXES = ("/usr/local/tensorrt", "/opt/tensorrt", "/usr/local", "/usr")
_MULTIARCH = ("aarch64-linux-gnu", "x86_64-linux-gnu")
_TENSORRT_ENV = ("TENSORRT_ROOT", "TensorRT_ROOT")
_BUILD_LOG_TAIL = 40


def plugin_source_dir() -> Path:
    """Directory holding the plugin's C++/CUDA sources and CMakeLists.txt.

    A checkout has them at ``<repo>/plugins/ats_sampler``; an installed wheel ships them as package data at
    ``ats_deploy/_plugin_src/ats_sampler`` (see pyproject.toml). Raises DependencyError when neither exists.
    """
    return source_dir("ats_sampler", "plugin sources")


def source_dir(name: str, what: str) -> Path:
    """``<repo>/plugins/<name>`` of a checkout, else the package-data copy ``ats_deploy/_plugin_src/<name>`` an
    installed wheel ships; the first holding a CMakeLists.txt. DependencyError naming ``what`` when neither does."""
    package_root = Path(__file__).resolve().parents[1]  # .../ats_deploy
    candidates = (package_root.parent / "plugins" / name, package_root / "_plugin_src" / name)
    for candidate in candidates:
        if (candidate / "CMakeLists.txt").is_file():
            return candidate
    raise DependencyError(
        f"{what} not found (looked in {', '.join(str(c) for c in candidates)}): "
        "reinstall ats-deploy or run from a checkout of the repository"
    )


def find_cmake() -> str:
    """Path of cmake (>= 3.18), or DependencyError."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise DependencyError(
            "cmake not found on PATH: install it (apt install cmake, or pip install cmake) to build the plugin"
        )
    return cmake


def find_nvcc() -> str:
    """Path of nvcc: $CUDACXX, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin; DependencyError if none."""
    candidates: list[str] = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(str(Path(os.environ[env]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise DependencyError(
        "nvcc (the CUDA compiler) not found: install the CUDA toolkit (on Jetson: apt install cuda-toolkit / "
        "nvidia-jetpack) and put its bin/ on PATH or set CUDA_HOME"
    )


def _tensorrt_parts(root: Path) -> tuple[Path | None, Path | None]:
    """(directory holding NvInfer.h, directory holding libnvinfer.so) under ``root``; None where missing."""
    include_dirs = [root / "include"] + [root / "include" / arch for arch in _MULTIARCH]
    lib_dirs = [root / "lib", root / "lib64"] + [root / "lib" / arch for arch in _MULTIARCH]
    header = next((d for d in include_dirs if (d / "NvInfer.h").is_file()), None)
    library = next((d for d in lib_dirs if (d / "libnvinfer.so").exists()), None)
    return header, library


def find_tensorrt_root(tensorrt_root: str | os.PathLike[str] | None = None) -> Path:
    """TensorRT prefix holding NvInfer.h and libnvinfer.so.

    An explicit ``tensorrt_root`` is authoritative; otherwise $TENSORRT_ROOT / $TensorRT_ROOT, then the usual
    install prefixes. Raises DependencyError naming what is missing (headers, library, or both) and the fix.
    """
    if tensorrt_root is not None:
        roots = [Path(tensorrt_root)]
    else:
        roots = [Path(os.environ[e]) for e in _TENSORRT_ENV if os.environ.get(e)]
        roots += [Path(p) for p in _TENSORRT_PREFIXES]
    seen_headers: Path | None = None
    for root in roots:
        header, library = _tensorrt_parts(root)
        if header is not None and library is not None:
            return root
        seen_headers = seen_headers or header
    where = ", ".join(str(r) for r in roots)
    if seen_headers is not None:
        missing = f"libnvinfer.so not found next to the TensorRT headers in {seen_headers} (looked under {where})"
    else:
        missing = f"TensorRT headers (NvInfer.h) and libnvinfer.so not found under {where}"
    raise DependencyError(
        f"{missing}: install TensorRT >= 10 with its development files (on Jetson: JetPack >= 6.1, "
        "apt install libnvinfer-dev) and pass --tensorrt-root PREFIX (or set TENSORRT_ROOT)"
    )


def _arch_list(cuda_arch: str | int | Sequence[str | int] | None) -> str | None:
    """Normalise '87', 87, 'sm_87', ['80', 'sm_90'] to CMake's '87' / '80;90' form."""
    if cuda_arch is None:
        return None
    items = [cuda_arch] if isinstance(cuda_arch, (str, int)) else list(cuda_arch)
    parts: list[str] = []
    for item in items:
        for piece in str(item).replace(",", ";").split(";"):
            piece = piece.strip().lower().removeprefix("sm_").removeprefix("compute_")
            if piece:
                parts.append(piece)
    if not parts:
        raise ExportError(f"empty CUDA architecture list {cuda_arch!r}: pass e.g. '87' (Orin) or '110' (Thor)")
    return ";".join(parts)


def _run(cmd: Sequence[str], *, what: str) -> None:
    """Run a build step; on failure raise ExportError with the command's output tail."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-_BUILD_LOG_TAIL:])
        raise ExportError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _make_build_dir(build: Path) -> None:
    """Create (or reuse) the CMake build folder; a file in the way or no write access is one ExportError line."""
    import tempfile

    try:
        build.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=build):  # writable? (cmake's own failure would be 40 lines later)
            pass
    except OSError as exc:
        blocker = next((p for p in (build, *build.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            why = f"{blocker} is a file, not a folder"
        else:
            why = exc.strerror or type(exc).__name__
        raise ExportError(
            f"cannot use {build} as the build folder ({why}); pass --build-dir a writable folder"
        ) from None


def build_plugin(
    *,
    source_dir: str | os.PathLike[str] | None = None,
    build_dir: str | os.PathLike[str],
    tensorrt_root: str | os.PathLike[str] | None = None,
    cuda_arch: str | int | Sequence[str | int] | None = None,
    kernel_only: bool = False,
    jobs: int | None = None,
) -> Path:
    """Configure and build the plugin with CMake; return the path of the built shared library.

    ``kernel_only`` builds libats_sampler_kernel.so (the kernel's C API, no TensorRT needed); otherwise
    libats_sampler.so (plugin + kernel), which needs TensorRT >= 10. ``cuda_arch`` defaults to CMake's list
    (80;87;90;110 with CUDA 13); on a Jetson pass its own (87 Orin, 110 Thor) for a faster build.
    Missing tools raise DependencyError (one line with the fix); a failed compile raises ExportError.
    """
    src = Path(source_dir) if source_dir is not None else plugin_source_dir()
    if not (src / "CMakeLists.txt").is_file():
        raise DependencyError(f"no CMakeLists.txt in {src}: pass the plugins/ats_sampler directory as source_dir")
    cmake = find_cmake()
    nvcc = find_nvcc()
    trt = None if kernel_only else find_tensorrt_root(tensorrt_root)
    build = Path(build_dir)
    _make_build_dir(build)

    configure = [
        cmake,
        "-S",
        str(src),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DATS_KERNEL_ONLY={'ON' if kernel_only else 'OFF'}",
    ]
    if trt is not None:
        configure.append(f"-DTensorRT_ROOT={trt}")
    archs = _arch_list(cuda_arch)
    if archs is not None:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
    _run(configure, what="cmake configure")

    target = "ats_sampler_kernel" if kernel_only else "ats_sampler"
    build_cmd = [cmake, "--build", str(build), "--target", target, "--parallel", str(jobs or os.cpu_count() or 1)]
    _run(build_cmd, what="cmake build")

    library = build / (KERNEL_LIBRARY if kernel_only else PLUGIN_LIBRARY)
    if not library.is_file():
        raise ExportError(f"the build finished but {library} is missing: check the CMake output in {build}")
    return library


def kernel_compile_check(
    out_dir: str | os.PathLike[str],
    *,
    arch: str | int = "90",
    source_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Compile the kernel .cu to an object file for one architecture (no GPU needed); return its path.

    A quick check that the sources build with this nvcc for a target GPU (e.g. 87 for Orin, 110 for Thor)
    before a full CMake build. Raises DependencyError without nvcc, ExportError if the compile fails.
    """
    src = Path(source_dir) if source_dir is not None else plugin_source_dir()
    nvcc = find_nvcc()
    sm = _arch_list(arch)
    if sm is None or ";" in sm:
        raise ExportError(f"kernel_compile_check takes one architecture, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj = out / f"atsSamplerKernel_sm{sm}.o"
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        "-fmad=false",
        "-Xcompiler=-Wall",
        f"-gencode=arch=compute_{sm},code=sm_{sm}",
        "-I",
        str(src),
        "-c",
        str(src / "atsSamplerKernel.cu"),
        "-o",
        str(obj),
    ]
    _run(cmd, what=f"nvcc compile for sm_{sm}")
    return obj
