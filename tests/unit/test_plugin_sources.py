"""The sampler plugin's sources build and agree with the Python contract, without a GPU or TensorRT.

nvcc compiles the kernel for the Jetson targets, the kernel-only CMake build links and its C API rejects bad
arguments (validation runs before any CUDA call, so no device is needed), the C++ sources register the name,
version, namespace and fields that plugin_lib (and the ONNX exporter) use, and build_plugin turns a missing
TensorRT or cmake into a DependencyError. Each test compiles for one architecture to stay fast.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ats_deploy.errors import DependencyError, ExportError
from ats_deploy.exporters import plugin_lib

SRC = plugin_lib.plugin_source_dir()


def _nvcc_or_skip() -> str:
    try:
        return plugin_lib.find_nvcc()
    except DependencyError as exc:
        pytest.skip(f"nvcc not available: {exc}")


def _nvcc_arches(nvcc: str) -> set[str]:
    proc = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=False)
    return set(re.findall(r"compute_(\d+)", proc.stdout))


def test_sources_are_complete() -> None:
    missing = [name for name in plugin_lib.PLUGIN_SOURCES if not (SRC / name).is_file()]
    assert not missing, f"missing plugin sources in {SRC}: {missing}"
    assert (SRC / "README.md").is_file()


@pytest.mark.parametrize("arch", ["90", "87", "110"])
def test_kernel_compiles_for_arch(arch: str, tmp_path: Path) -> None:
    nvcc = _nvcc_or_skip()
    if arch not in _nvcc_arches(nvcc):
        pytest.skip(f"this nvcc has no sm_{arch} (CUDA 13 names Thor sm_110; CUDA 12.x lacks it)")
    obj = plugin_lib.kernel_compile_check(tmp_path, arch=arch)
    assert obj.is_file() and obj.stat().st_size > 0


def test_kernel_only_cmake_build_and_c_api_validation(tmp_path: Path) -> None:
    _nvcc_or_skip()
    if shutil.which("cmake") is None:
        pytest.skip("cmake not on PATH")
    lib_path = plugin_lib.build_plugin(build_dir=tmp_path / "build", kernel_only=True, cuda_arch="90")
    assert lib_path.name == plugin_lib.KERNEL_LIBRARY and lib_path.is_file()

    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as exc:  # libcudart not loadable here: the build itself was the check
        pytest.skip(f"built, but cannot load {lib_path.name} without the CUDA runtime: {exc}")
    lib.atsSamplerLaunch.restype = ctypes.c_int
    lib.atsSamplerLaunch.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    lib.atsSamplerWorkspaceSize.restype = ctypes.c_size_t
    lib.atsSamplerWorkspaceSize.argtypes = [ctypes.c_int] * 3
    lib.atsSamplerOutputSlots.restype = ctypes.c_int
    lib.atsSamplerStatusString.restype = ctypes.c_char_p

    def launch(b: int, n: int, k_max: int, n_ref: int) -> int:
        return lib.atsSamplerLaunch(None, None, None, None, b, n, k_max, n_ref, None)

    # Argument checks come before any CUDA call, so they run on a machine without a GPU.
    assert launch(0, 197, 108, 197) == 0  # empty batch: nothing to do
    assert launch(-1, 197, 108, 197) == -2
    assert launch(1, 0, 108, 197) == -3
    assert launch(1, 4096, 108, 197) == -4
    assert launch(1, 197, 1, 197) == -5
    assert launch(1, 197, 108, 0) == -6
    assert launch(1, 197, 108, 197) == -1  # null pointers
    assert b"k_max" in lib.atsSamplerStatusString(-5)
    assert lib.atsSamplerOutputSlots(197, 108) == 108
    assert lib.atsSamplerOutputSlots(50, 108) == 50
    assert lib.atsSamplerWorkspaceSize(3, 197, 108) == 1536  # 3 * 108 * 4 = 1296, 256-aligned
    assert lib.atsSamplerWorkspaceSize(0, 197, 108) == 0


def _cpp_string_constant(text: str, name: str) -> str:
    match = re.search(rf'constexpr\s+char\s+const\s*\*\s*{name}\s*\{{\s*"([^"]*)"\s*\}}', text)
    assert match, f"{name} not found in atsSamplerPlugin.h"
    return match.group(1)


def test_registered_identity_matches_python_constants() -> None:
    header = (SRC / "atsSamplerPlugin.h").read_text()
    assert _cpp_string_constant(header, "kPLUGIN_NAME") == plugin_lib.PLUGIN_NAME
    assert _cpp_string_constant(header, "kPLUGIN_VERSION") == plugin_lib.PLUGIN_VERSION
    assert _cpp_string_constant(header, "kPLUGIN_NAMESPACE") == plugin_lib.PLUGIN_NAMESPACE
    fields = tuple(_cpp_string_constant(header, f"kFIELD_{f.upper()}") for f in plugin_lib.PLUGIN_FIELDS)
    assert fields == plugin_lib.PLUGIN_FIELDS

    source = (SRC / "atsSamplerPlugin.cpp").read_text()
    # The creator declares the fields in the contract's order, all INT32 (INT attributes arrive as 32-bit).
    declared = re.findall(r"mFields\.emplace_back\((kFIELD_\w+), nullptr, PluginFieldType::kINT32, 1\)", source)
    assert declared == [f"kFIELD_{f.upper()}" for f in plugin_lib.PLUGIN_FIELDS]
    # Entry points IPluginRegistry::loadLibrary and trtexec --dynamicPlugins look up (TensorRT >= 10).
    assert re.search(r'extern "C" \w+ nvinfer1::IPluginCreatorInterface\* const\* getCreators\(int32_t&', source)
    assert re.search(r'extern "C" \w+ void setLoggerFinder\(nvinfer1::ILoggerFinder\*', source)
    # The creator registers under the contract namespace (not REGISTER_TENSORRT_PLUGIN's empty one).
    assert "registerCreator(creatorInstance(), kPLUGIN_NAMESPACE)" in source


def test_every_noexcept_entry_point_catches() -> None:
    """Each plugin/creator method that can throw has a try/catch (TensorRT aborts on escaping exceptions)."""
    source = (SRC / "atsSamplerPlugin.cpp").read_text()
    bodies = re.split(r"\n(?=\S[^\n]*\bAtsSamplerPlugin(?:Creator)?::\w+\()", source)
    for body in bodies[1:]:
        name = re.match(r"[^\n]*?(AtsSamplerPlugin(?:Creator)?::\w+)", body).group(1)
        if "ATS_VALIDATE" in body or "new " in body:
            assert "try" in body and "catch (std::exception const& e)" in body, f"{name} lacks try/catch"


def test_build_plugin_without_tensorrt_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nvcc_or_skip()
    if shutil.which("cmake") is None:
        pytest.skip("cmake not on PATH")
    empty = tmp_path / "no-tensorrt"
    empty.mkdir()
    with pytest.raises(DependencyError, match=r"TensorRT headers \(NvInfer\.h\).*TENSORRT_ROOT") as info:
        plugin_lib.build_plugin(build_dir=tmp_path / "build", tensorrt_root=empty)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "build").exists()  # nothing configured before the check


def test_tensorrt_headers_without_library_named(tmp_path: Path) -> None:
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "NvInfer.h").write_text("// header only\n")
    with pytest.raises(DependencyError, match="libnvinfer.so not found next to the TensorRT headers"):
        plugin_lib.find_tensorrt_root(tmp_path)


def test_jetson_multiarch_layout_found(tmp_path: Path) -> None:
    (tmp_path / "include" / "aarch64-linux-gnu").mkdir(parents=True)
    (tmp_path / "include" / "aarch64-linux-gnu" / "NvInfer.h").write_text("// header\n")
    (tmp_path / "lib" / "aarch64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib" / "aarch64-linux-gnu" / "libnvinfer.so").write_text("")
    assert plugin_lib.find_tensorrt_root(tmp_path) == tmp_path


def test_missing_cmake_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DependencyError, match="cmake not found"):
        plugin_lib.build_plugin(build_dir=tmp_path / "build", kernel_only=True)


def _cuda_include(nvcc: str) -> Path:
    """Directory with cuda_runtime_api.h (TensorRT's headers include it); nvcc may be a wrapper script."""
    proc = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, check=False)
    dirs = [Path(m) for m in re.findall(r"-I(\S+?)\"?\s", proc.stdout + proc.stderr)]
    candidates = [*dirs, Path(nvcc).resolve().parents[1] / "include"]
    candidates.append(Path("/usr/local/cuda/include"))
    for candidate in candidates:
        if (candidate / "cuda_runtime_api.h").is_file():
            return candidate
    pytest.skip("cuda_runtime_api.h not found next to nvcc")


@pytest.mark.parametrize("self_register", [False, True], ids=["getCreators", "self-registering"])
def test_plugin_compiles_against_tensorrt_headers_if_present(tmp_path: Path, self_register: bool) -> None:
    """Syntax-checks the plugin against whatever TensorRT this machine has (skipped where there is none), in
    both registration builds (the default self-registering one compiles the registrar block too)."""
    try:
        root = plugin_lib.find_tensorrt_root()
    except DependencyError as exc:
        pytest.skip(f"no TensorRT here: {exc}")
    cxx = shutil.which("g++") or shutil.which("c++")
    nvcc = _nvcc_or_skip()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_include = _cuda_include(nvcc)
    includes = [p for p in (root / "include", root / "include" / "aarch64-linux-gnu") if p.is_dir()]
    cmd = [cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I", str(SRC)]
    cmd += ["-DATS_SELF_REGISTER=1"] if self_register else []
    for inc in [*includes, cuda_include]:
        cmd += ["-isystem", str(inc)]
    cmd.append(str(SRC / "atsSamplerPlugin.cpp"))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _chmod_binds(tmp: Path) -> bool:
    """Whether file modes stop this process (not for root, unless run without CAP_DAC_OVERRIDE)."""
    probe = tmp / ".chmod-probe"
    probe.write_text("")
    probe.chmod(0)
    try:
        probe.read_text()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()


@pytest.fixture
def no_cmake_run(monkeypatch: pytest.MonkeyPatch) -> list:
    """cmake/nvcc 'found', and any command build_plugin would run recorded instead of run."""
    ran: list = []
    monkeypatch.setattr(plugin_lib, "find_cmake", lambda: "cmake")
    monkeypatch.setattr(plugin_lib, "find_nvcc", lambda: "nvcc")
    monkeypatch.setattr(plugin_lib, "_run", lambda cmd, what: ran.append(cmd))
    return ran


@pytest.mark.parametrize("sub", ["", "sub"])
def test_build_dir_under_a_file_is_one_line_before_cmake(tmp_path: Path, no_cmake_run: list, sub: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    build = afile / sub if sub else afile
    with pytest.raises(ExportError, match=r"afile is a file, not a folder\); pass --build-dir a writable") as info:
        plugin_lib.build_plugin(build_dir=build, kernel_only=True)
    assert "\n" not in str(info.value)
    assert no_cmake_run == []  # refused before cmake ran
    assert afile.read_text() == "keep me"


def test_read_only_build_dir_is_one_line_before_cmake(tmp_path: Path, no_cmake_run: list) -> None:
    if not _chmod_binds(tmp_path):
        pytest.skip("chmod does not bind this user (root): see test_build_dir_under_a_file_is_one_line_before_cmake")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for build in (ro, ro / "build"):
            with pytest.raises(ExportError, match=r"\(Permission denied\); pass --build-dir a writable folder"):
                plugin_lib.build_plugin(build_dir=build, kernel_only=True)
        assert no_cmake_run == [] and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
