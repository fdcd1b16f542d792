"""Compile the real ``atsSamplerKernel.cu`` for the host with ``tests/kernel_emu/cuda_emu.h`` and drive it.

The kernel source is copied with exactly three lines rewritten (the ``extern __shared__`` buffer and the two
``<<<...>>>`` launches); a ``#line`` directive keeps compiler messages pointing at the original file. The
copy is built twice over: a shared library called through ctypes (the sweep) and an instrumented driver
executable (AddressSanitizer + UndefinedBehaviorSanitizer, or ThreadSanitizer), see ``driver.cpp``.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "plugins" / "ats_sampler" / "atsSamplerKernel.cu"
EMU = ROOT / "tests" / "kernel_emu"
BASE_FLAGS = ["-std=c++20", "-ffp-contract=off", "-pthread", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
SANITIZERS = {
    "address,undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}

_EXTERN_SHARED = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];")
_LAUNCH = re.compile(r"([\w:]+)<<<([^<>]*)>>>\(")


def emulated_source(dest: Path, source: Path = KERNEL) -> Path:
    """Write the host-compilable copy of ``source`` into ``dest``; fails loudly if the kernel's shape changed."""
    text = source.read_text()
    text, shared = _EXTERN_SHARED.subn(r"unsigned char* \1 = ::ats_emu::dynamicShared();", text)
    text, launches = _LAUNCH.subn(r"::ats_emu::launch(\1, \2, ", text)
    if shared != 1 or launches != 2:
        raise AssertionError(
            f"{source.name}: expected 1 extern __shared__ buffer and 2 launches to rewrite, found {shared} and "
            f"{launches}; update tests/_helpers/kernel_emu.py"
        )
    out = dest / "atsSamplerKernel_host.cpp"
    out.write_text(f'#line 1 "{source}"\n' + text)
    return out


def compiler() -> str:
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ or clang++) on PATH: cannot build the kernel for the CPU")
    return cxx


def _compile(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError("host build of the kernel failed:\n" + " ".join(cmd) + "\n" + proc.stderr[-4000:])


def _includes() -> list[str]:
    # The emulation folder comes first: its cuda_runtime*.h stand in for the CUDA toolkit's.
    return ["-I", str(EMU), "-I", str(KERNEL.parent)]


def build_library(dest: Path, source: Path = KERNEL) -> Path:
    src = emulated_source(dest, source)
    lib = dest / "libats_sampler_host.so"
    _compile([compiler(), *BASE_FLAGS, "-O2", "-fPIC", "-shared", *_includes(), str(src), "-o", str(lib)])
    return lib


def build_driver(dest: Path, sanitizer: str, source: Path = KERNEL) -> Path:
    src = emulated_source(dest, source)
    exe = dest / f"driver_{sanitizer.replace(',', '_')}"
    flags = [*BASE_FLAGS, "-O1", "-g", *SANITIZERS[sanitizer]]
    _compile([compiler(), *flags, *_includes(), str(src), str(EMU / "driver.cpp"), "-o", str(exe)])
    return exe


def load_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.atsSamplerLaunch.restype = i32
    lib.atsSamplerLaunch.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, i32, ptr]
    lib.atsSamplerLaunchDynamic.restype = i32
    lib.atsSamplerLaunchDynamic.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_size_t, i32, i32, i32, i32, ptr]
    lib.atsSamplerWorkspaceSize.restype = ctypes.c_size_t
    lib.atsSamplerWorkspaceSize.argtypes = [i32, i32, i32]
    lib.atsSamplerOutputSlots.restype = i32
    lib.atsSamplerOutputSlots.argtypes = [i32, i32]
    return lib


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def run_static(lib: ctypes.CDLL, scores: np.ndarray, count: np.ndarray, k_max: int, n_ref: int):
    """(status, indices [B, K_out], count_out [B]) from atsSamplerLaunch; outputs pre-filled with -7."""
    b, n = scores.shape
    k_out = min(k_max, n)
    scores, count = np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(count, np.int32)
    idx, cnt = np.full((b, k_out), -7, np.int32), np.full(b, -7, np.int32)
    status = lib.atsSamplerLaunch(_p(scores), _p(count), _p(idx), _p(cnt), b, n, k_max, n_ref, None)
    return status, idx, cnt


def run_dynamic(lib: ctypes.CDLL, scores: np.ndarray, count: np.ndarray, k_max: int, n_ref: int):
    """(status, s, indices as [B, s], count_out [B], untouched tail) from atsSamplerLaunchDynamic."""
    b, n = scores.shape
    k_out = min(k_max, n)
    scores, count = np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(count, np.int32)
    flat, cnt, size = np.full(b * k_out, -7, np.int32), np.full(b, -7, np.int32), np.full(1, -7, np.int64)
    ws_bytes = int(lib.atsSamplerWorkspaceSize(b, n, k_max))
    ws = np.zeros(max(ws_bytes, 1), np.uint8)
    status = lib.atsSamplerLaunchDynamic(
        _p(scores), _p(count), _p(flat), _p(cnt), _p(size), _p(ws), ws_bytes, b, n, k_max, n_ref, None
    )
    s = int(size[0])
    return status, s, flat[: b * s].reshape(b, s) if s >= 0 else flat, cnt, flat[b * max(s, 0) :]


def write_cases(path: Path, cases) -> None:
    """The driver's input file: (scores [B, n] float32, count_in [B] int32, k_max, n_ref) per case."""
    with open(path, "wb") as fh:
        for scores, count, k_max, n_ref in cases:
            b, n = scores.shape
            fh.write(np.array([b, n, k_max, n_ref], "<i4").tobytes())
            fh.write(np.ascontiguousarray(scores, "<f4").tobytes())
            fh.write(np.ascontiguousarray(count, "<i4").tobytes())


def read_results(path: Path, cases) -> list[dict]:
    """The driver's output file, one dict per case (static and dynamic layouts)."""
    data = path.read_bytes()
    pos, out = 0, []

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
        pos += arr.nbytes
        return arr

    for scores, _, k_max, _ in cases:
        b, n = scores.shape
        k_out = min(k_max, n)
        rec = {"status": int(take("<i4", 1)[0]), "indices": take("<i4", b * k_out).reshape(b, k_out)}
        rec["count"] = take("<i4", b)
        rec["dyn_status"] = int(take("<i4", 1)[0])
        rec["s"] = int(take("<i8", 1)[0])
        rec["dyn_flat"] = take("<i4", b * k_out)
        rec["dyn_count"] = take("<i4", b)
        out.append(rec)
    if pos != len(data):
        raise AssertionError(f"driver output has {len(data) - pos} unread bytes")
    return out
