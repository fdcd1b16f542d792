"""The CUDA sampler kernel equals the float32 NumPy reference bit for bit (same ids, order and counts).

Builds libats_sampler_kernel.so (no TensorRT) into a temporary directory, drives its C API through ctypes
on device buffers (torch CUDA tensors, or CuPy without torch) and compares with
``select_reference(..., dtype=np.float32)`` over a batch x n x K x score-shape sweep, in static and dynamic
mode. Skipped with a printed reason where there is no CUDA device, nvcc or cmake.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ats_deploy.errors import DependencyError
from ats_deploy.exporters import plugin_lib
from ats_deploy.model.reference import output_slots, select_reference

pytestmark = pytest.mark.gpu

BATCHES = (1, 3, 64, 256)
SLOTS = (2, 9, 50, 197, 577)
BUDGETS = (2, 50, 108, 197, 577)
KINDS = ("peaky", "uniform", "tied", "padded")


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return count.value if cudart.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0
    return 0


class _Device:
    """Device buffers through torch (preferred) or CuPy: upload, empty, download, pointer, stream, sync."""

    def __init__(self) -> None:
        try:
            import torch

            self.torch: Any = torch
            self.cupy: Any = None
        except ImportError:
            try:
                import cupy
            except ImportError:
                pytest.skip("neither torch nor cupy is installed: no way to allocate device memory")
            self.torch, self.cupy = None, cupy

    def upload(self, array: np.ndarray) -> Any:
        if self.torch is not None:
            return self.torch.from_numpy(np.ascontiguousarray(array)).cuda()
        return self.cupy.asarray(np.ascontiguousarray(array))

    def empty(self, count: int, dtype: type, fill: int = -7) -> Any:
        return self.upload(np.full(count, fill, dtype=dtype))  # sentinel: unwritten slots show up

    def download(self, buffer: Any) -> np.ndarray:
        return buffer.cpu().numpy() if self.torch is not None else self.cupy.asnumpy(buffer)

    def ptr(self, buffer: Any) -> int:
        return buffer.data_ptr() if self.torch is not None else buffer.data.ptr

    def stream(self) -> int:
        if self.torch is not None:
            return self.torch.cuda.current_stream().cuda_stream
        return self.cupy.cuda.get_current_stream().ptr

    def sync(self) -> None:
        if self.torch is not None:
            self.torch.cuda.synchronize()
        else:
            self.cupy.cuda.Device().synchronize()


@pytest.fixture(scope="module")
def device() -> _Device:
    if _cuda_device_count() < 1:
        pytest.skip("no CUDA device (torch.cuda / cudaGetDeviceCount report none)")
    return _Device()


def _arch(dev: _Device) -> str:
    if dev.torch is not None:
        major, minor = dev.torch.cuda.get_device_capability()
        return f"{major}{minor}"
    return "native"


@pytest.fixture(scope="module")
def kernel_lib(device: _Device, tmp_path_factory: pytest.TempPathFactory) -> tuple[ctypes.CDLL, Path]:
    try:
        path = plugin_lib.build_plugin(
            build_dir=tmp_path_factory.mktemp("ats_kernel"), kernel_only=True, cuda_arch=_arch(device)
        )
    except DependencyError as exc:
        pytest.skip(f"cannot build the kernel library: {exc}")
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.atsSamplerLaunch.restype = i32
    lib.atsSamplerLaunch.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, i32, ptr]
    lib.atsSamplerLaunchDynamic.restype = i32
    lib.atsSamplerLaunchDynamic.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_size_t, i32, i32, i32, i32, ptr]
    lib.atsSamplerWorkspaceSize.restype = ctypes.c_size_t
    lib.atsSamplerWorkspaceSize.argtypes = [i32, i32, i32]
    lib.atsSamplerStatusString.restype = ctypes.c_char_p
    return lib, path


def _scores(kind: str, b: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Score shapes that stress different parts of the rule; count_in mostly n, some short or out of range."""
    if kind == "peaky":
        scores = rng.dirichlet(np.full(n, 0.05), size=b).astype(np.float32)
    elif kind == "uniform":
        scores = rng.random((b, n), dtype=np.float32)
    elif kind == "tied":  # repeated values: ties broken by slot index
        scores = (rng.integers(0, 4, size=(b, n)) * 0.25).astype(np.float32)
    else:  # zero-padded: count_in < n, slots past the count hold zeros
        scores = rng.dirichlet(np.full(n, 0.3), size=b).astype(np.float32)
    count = np.full(b, n, dtype=np.int32)
    if kind == "padded":
        count = rng.integers(1, n + 1, size=b).astype(np.int32)
        for i in range(b):
            scores[i, count[i] :] = 0
    elif b > 2:
        count[1] = 0  # clamped to 1: CLS only
        count[2] = n + 5  # clamped to n
    if b > 3:
        scores[3, 1:] = 0  # all-zero scores: treated as all-equal
    return scores, count


def _run_static(lib: ctypes.CDLL, dev: _Device, scores: np.ndarray, count: np.ndarray, k_max: int, n_ref: int):
    b, n = scores.shape
    k_out = output_slots(k_max, n)
    d_scores, d_count = dev.upload(scores), dev.upload(count)
    d_idx, d_cnt = dev.empty(b * k_out, np.int32), dev.empty(b, np.int32)
    status = lib.atsSamplerLaunch(
        dev.ptr(d_scores), dev.ptr(d_count), dev.ptr(d_idx), dev.ptr(d_cnt), b, n, k_max, n_ref, dev.stream()
    )
    assert status == 0, lib.atsSamplerStatusString(status)
    dev.sync()
    return dev.download(d_idx).reshape(b, k_out), dev.download(d_cnt)


def _assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray], what: str) -> None:
    idx, cnt = got
    ref_idx, ref_cnt = want
    bad = np.flatnonzero((idx != ref_idx).any(axis=1) | (cnt != ref_cnt))
    assert bad.size == 0, (
        f"{what}: {bad.size} images differ, first b={bad[0]}: count {cnt[bad[0]]} vs {ref_cnt[bad[0]]}, "
        f"ids {idx[bad[0]].tolist()} vs {ref_idx[bad[0]].tolist()}"
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k_max", BUDGETS)
@pytest.mark.parametrize("n", SLOTS)
def test_static_matches_reference_bit_for_bit(kernel_lib, device, n: int, k_max: int, kind: str) -> None:
    lib, _ = kernel_lib
    rng = np.random.default_rng([n, k_max, KINDS.index(kind)])
    # Every shape at B=3; the large batches on a rotating subset keeps the NumPy reference affordable.
    batches = [3] + [BATCHES[(SLOTS.index(n) + BUDGETS.index(k_max) + KINDS.index(kind)) % len(BATCHES)]]
    for b in batches:
        for n_ref in sorted({n, 197}):
            scores, count = _scores(kind, b, n, rng)
            want = select_reference(scores, count, k_max=k_max, n_ref=n_ref, dtype=np.float32)
            got = _run_static(lib, device, scores, count, k_max, n_ref)
            _assert_same(got, want, f"B={b} n={n} K={k_max} n_ref={n_ref} {kind}")


@pytest.mark.parametrize("b", BATCHES)
def test_large_batches_match_reference(kernel_lib, device, b: int) -> None:
    lib, _ = kernel_lib
    rng = np.random.default_rng(b)
    for n, k_max in ((197, 108), (577, 197)):
        for kind in KINDS:
            scores, count = _scores(kind, b, n, rng)
            want = select_reference(scores, count, k_max=k_max, n_ref=n, dtype=np.float32)
            _assert_same(_run_static(lib, device, scores, count, k_max, n), want, f"B={b} n={n} K={k_max} {kind}")


def test_batch_independence(kernel_lib, device) -> None:
    """An image's row does not depend on the rest of the batch (docs/ATS_RULE.md section 2)."""
    lib, _ = kernel_lib
    rng = np.random.default_rng(7)
    scores, count = _scores("peaky", 64, 197, rng)
    full_idx, full_cnt = _run_static(lib, device, scores, count, 108, 197)
    for i in (0, 5, 63):
        one_idx, one_cnt = _run_static(lib, device, scores[i : i + 1], count[i : i + 1], 108, 197)
        assert np.array_equal(one_idx[0], full_idx[i]) and one_cnt[0] == full_cnt[i]


@pytest.mark.parametrize("b", (1, 3, 64, 256))
@pytest.mark.parametrize(("n", "k_max"), ((9, 50), (197, 108), (577, 197)))
def test_dynamic_mode_layout(kernel_lib, device, b: int, n: int, k_max: int) -> None:
    """Dynamic mode: s = max(count_out), indices laid out as [B, s] = the static rows cut to s columns."""
    lib, _ = kernel_lib
    dev = device
    rng = np.random.default_rng([b, n, k_max])
    scores, count = _scores("peaky", b, n, rng)
    ref_idx, ref_cnt = select_reference(scores, count, k_max=k_max, n_ref=n, dtype=np.float32)
    k_out = output_slots(k_max, n)
    ws_bytes = lib.atsSamplerWorkspaceSize(b, n, k_max)
    assert ws_bytes >= b * k_out * 4
    d_scores, d_count = dev.upload(scores), dev.upload(count)
    d_idx, d_cnt = dev.empty(b * k_out, np.int32), dev.empty(b, np.int32)
    d_size = dev.empty(1, np.int64)
    d_ws = dev.empty(ws_bytes // 4, np.int32)
    args = [dev.ptr(d_scores), dev.ptr(d_count), dev.ptr(d_idx), dev.ptr(d_cnt), dev.ptr(d_size)]
    status = lib.atsSamplerLaunchDynamic(*args, dev.ptr(d_ws), ws_bytes, b, n, k_max, n, dev.stream())
    assert status == 0, lib.atsSamplerStatusString(status)
    dev.sync()
    s = int(dev.download(d_size)[0])
    assert s == int(ref_cnt.max())
    assert np.array_equal(dev.download(d_cnt), ref_cnt)
    flat = dev.download(d_idx)
    assert np.array_equal(flat[: b * s].reshape(b, s), ref_idx[:, :s])
    # Too small a workspace is refused before anything is launched.
    status = lib.atsSamplerLaunchDynamic(*args, dev.ptr(d_ws), ws_bytes - 256, b, n, k_max, n, dev.stream())
    assert status == -7


_SANITIZER_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    import torch
    lib = ctypes.CDLL(sys.argv[1])
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.atsSamplerLaunch.argtypes = [p, p, p, p, i, i, i, i, p]
    lib.atsSamplerLaunchDynamic.argtypes = [p, p, p, p, p, p, ctypes.c_size_t, i, i, i, i, p]
    lib.atsSamplerWorkspaceSize.restype = ctypes.c_size_t
    rng = np.random.default_rng(0)
    for b, n, k in ((3, 2, 2), (5, 197, 108), (4, 577, 577), (2, 2048, 197)):
        s = torch.from_numpy(rng.dirichlet(np.full(n, 0.05), size=b).astype(np.float32)).cuda()
        c = torch.tensor([n, 1, max(n // 2, 1)] + [n] * (b - 3), dtype=torch.int32, device="cuda")[:b]
        ko = min(k, n)
        idx = torch.empty(b * ko, dtype=torch.int32, device="cuda")
        cnt = torch.empty(b, dtype=torch.int32, device="cuda")
        size = torch.empty(1, dtype=torch.int64, device="cuda")
        ws_bytes = lib.atsSamplerWorkspaceSize(b, n, k)
        ws = torch.empty(max(ws_bytes, 4), dtype=torch.uint8, device="cuda")
        assert lib.atsSamplerLaunch(s.data_ptr(), c.data_ptr(), idx.data_ptr(), cnt.data_ptr(), b, n, k, n, None) == 0
        assert lib.atsSamplerLaunchDynamic(s.data_ptr(), c.data_ptr(), idx.data_ptr(), cnt.data_ptr(),
                                           size.data_ptr(), ws.data_ptr(), ws_bytes, b, n, k, n, None) == 0
    torch.cuda.synchronize()
    print("sanitizer-run-ok")
    """
)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_clean(kernel_lib, device, tmp_path: Path, tool: str) -> None:
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not on PATH")
    if device.torch is None:
        pytest.skip("the sanitizer driver script uses torch")
    _, path = kernel_lib
    script = tmp_path / "drive.py"
    script.write_text(_SANITIZER_SCRIPT)
    proc = subprocess.run(
        [sanitizer, f"--tool={tool}", "--error-exitcode=99", sys.executable, str(script), str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "sanitizer-run-ok" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-4000:]
