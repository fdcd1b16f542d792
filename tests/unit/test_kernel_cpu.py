"""The real CUDA sampler kernel, compiled for the host, equals the float32 NumPy reference bit for bit.

``atsSamplerKernel.cu`` is built with g++ against the project's CUDA emulation (``tests/kernel_emu``: one
std::thread per CUDA thread, ``__syncthreads`` as a barrier, warp shuffles through a per-warp exchange,
``extern __shared__`` exactly as large as the launch asks and filled with noise) and driven through its C
API: a sweep of n, K, batch, n_ref and score kinds (ties, zeros, subnormals, NaN, -0.0, short/zero/too-large
counts), static and dynamic layouts, then the same kernel under AddressSanitizer + UBSan and under
ThreadSanitizer (which proves the pick-flag write race-free). No GPU needed; skipped without a C++ compiler.
The GPU twin of this file is tests/gpu/test_kernel.py.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import kernel_emu as ke

from ats_deploy.model.reference import output_slots, select_reference

SLOTS = (2, 3, 4, 9, 33, 197, 577, 2048)
KINDS = ("peaky", "uniform", "ties", "zeros", "subnormal", "nan", "negzero", "counts", "large")
N_REFS = (None, 197, 1, 1 << 24)  # None: n itself


def _budgets(n: int) -> list[int]:
    return sorted({2, 3, 50, 197, n, n + 7})


def _scores(kind: str, b: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[B, n] float32 scores (slot 0 = CLS, ignored) and count_in [B] for one score kind."""
    count = np.full(b, n, np.int32)
    if kind == "peaky":
        s = rng.dirichlet(np.full(n, 0.05), size=b)
    elif kind == "uniform":
        s = rng.random((b, n))
    elif kind == "ties":  # few distinct values: ties broken by slot index
        s = rng.integers(0, 4, size=(b, n)) * 0.25
    elif kind == "zeros":  # all-zero patches: treated as all-equal
        s = np.zeros((b, n))
    elif kind == "subnormal":  # below float32's smallest normal (1.2e-38), some exact zeros
        s = rng.integers(0, 50, size=(b, n)) * 1e-41
    elif kind == "nan":  # one NaN anywhere among the valid patches: treated as all-equal
        s = rng.random((b, n))
        s[:, 1 + rng.integers(0, max(n - 1, 1))] = np.nan
    elif kind == "negzero":  # -0.0 ties with +0.0 (stable by slot), a few positives
        s = np.where(rng.random((b, n)) < 0.7, -0.0, rng.random((b, n)))
    elif kind == "counts":  # zero, short and too-large count_in; slots past the count hold junk
        s = rng.random((b, n))
        count = rng.integers(0, n + 6, size=b).astype(np.int32)
        count[0] = [0, n + 5, max(n // 2, 1)][n % 3]
        for i in range(b):
            s[i, max(int(count[i]), 1) :] = rng.choice([np.nan, 1e30, -1.0])
    else:  # "large": big but with a finite float32 sum
        s = rng.random((b, n)) * 1e35
    return s.astype(np.float32), count


def _cases(full: bool, seed: int = 0):
    """(label, scores, count_in, k_max, n_ref): every (n, K) pair, kinds rotated (all of them when ``full``)."""
    rng = np.random.default_rng(seed)
    i = 0
    for n in SLOTS:
        for k in _budgets(n):
            kinds = KINDS if full else [KINDS[(i + j) % len(KINDS)] for j in range(2)]
            for kind in kinds:
                b = 1 + i % 3
                n_ref = N_REFS[i % len(N_REFS)] or n
                scores, count = _scores(kind, b, n, rng)
                yield f"n={n} K={k} B={b} n_ref={n_ref} {kind}", scores, count, k, n_ref
                i += 1


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return ke.load_library(ke.build_library(tmp_path_factory.mktemp("kernel_host")))


def _check(label: str, got_static, got_dynamic, want) -> None:
    ref_idx, ref_cnt = want
    status, idx, cnt = got_static
    assert status == 0, f"{label}: static status {status}"
    bad = np.flatnonzero((idx != ref_idx).any(axis=1) | (cnt != ref_cnt))
    assert bad.size == 0, (
        f"{label} static: image {bad[0]}: count {cnt[bad[0]]} vs {ref_cnt[bad[0]]}, "
        f"ids {idx[bad[0]].tolist()} vs reference {ref_idx[bad[0]].tolist()}"
    )
    status, s, rows, dcnt, tail = got_dynamic
    assert status == 0, f"{label}: dynamic status {status}"
    assert s == int(ref_cnt.max()), f"{label} dynamic: s = {s}, want max(count_out) = {ref_cnt.max()}"
    assert np.array_equal(rows, ref_idx[:, :s]) and np.array_equal(dcnt, ref_cnt), f"{label} dynamic rows"
    assert np.all(tail == -7), f"{label} dynamic: wrote past [B, s]"


def test_sweep_matches_reference_bit_for_bit(lib, capsys):
    t0 = time.perf_counter()
    cases = list(_cases(full=False))
    for label, scores, count, k, n_ref in cases:
        want = select_reference(scores, count, k_max=k, n_ref=n_ref, dtype=np.float32)
        _check(label, ke.run_static(lib, scores, count, k, n_ref), ke.run_dynamic(lib, scores, count, k, n_ref), want)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nkernel on CPU: {len(cases)} cases x 2 layouts (static, dynamic) bit-exact in {seconds:.1f} s")
    assert len(cases) >= 80


@pytest.mark.slow
def test_full_sweep_matches_reference_bit_for_bit(lib):
    """Every score kind at every (n, K) pair, three seeds (about ten times the default sweep)."""
    for seed in range(3):
        for label, scores, count, k, n_ref in _cases(full=True, seed=seed):
            want = select_reference(scores, count, k_max=k, n_ref=n_ref, dtype=np.float32)
            got = ke.run_static(lib, scores, count, k, n_ref), ke.run_dynamic(lib, scores, count, k, n_ref)
            _check(f"seed {seed} {label}", *got, want)


def test_batch_independence(lib):
    rng = np.random.default_rng(5)
    scores, count = _scores("counts", 3, 197, rng)
    _, idx, cnt = ke.run_static(lib, scores, count, 108, 197)
    for i in range(3):
        _, one, one_cnt = ke.run_static(lib, scores[i : i + 1], count[i : i + 1], 108, 197)
        assert np.array_equal(one[0], idx[i]) and one_cnt[0] == cnt[i]


def test_float32_sum_overflow_stays_in_bounds(lib):
    """Finite scores whose float32 sum overflows are outside the contract: the reference refuses them,
    the kernel must still return in-range ids (its fallback keeps the highest-scored token)."""
    scores = np.array([[0.0, 3e38, 3e38, 1.0, 2.0]], np.float32)
    count = np.array([5], np.int32)
    with pytest.raises(ValueError, match="overflow"):
        select_reference(scores, count, k_max=5, n_ref=5, dtype=np.float32)
    status, idx, cnt = ke.run_static(lib, scores, count, 5, 5)
    assert status == 0 and 1 <= cnt[0] <= 5
    assert idx[0, 0] == 0 and np.all((idx[0, 1 : cnt[0]] >= 1) & (idx[0, 1 : cnt[0]] <= 4))
    assert idx[0, 1 : cnt[0]].tolist() == [2]


@pytest.mark.parametrize(
    ("b", "n", "k", "n_ref", "status"),
    [(-1, 9, 3, 9, -2), (1, 0, 3, 9, -3), (1, 2049, 3, 9, -4), (1, 9, 1, 9, -5), (1, 9, 3, 0, -6)],
)
def test_bad_arguments_are_refused_before_launch(lib, b, n, k, n_ref, status):
    assert lib.atsSamplerLaunch(None, None, None, None, b, n, k, n_ref, None) == status


def test_null_pointers_and_short_workspace_are_refused(lib):
    scores, count = np.ones((2, 9), np.float32), np.full(2, 9, np.int32)
    assert lib.atsSamplerLaunch(None, count.ctypes.data, None, None, 2, 9, 5, 9, None) == -1
    ws_bytes = int(lib.atsSamplerWorkspaceSize(2, 9, 5))
    assert ws_bytes >= 2 * output_slots(5, 9) * 4
    ws, idx, cnt, size = np.zeros(ws_bytes, np.uint8), np.zeros(10, np.int32), np.zeros(2, np.int32), np.zeros(1)
    args = [scores.ctypes.data, count.ctypes.data, idx.ctypes.data, cnt.ctypes.data, size.ctypes.data]
    assert lib.atsSamplerLaunchDynamic(*args, ws.ctypes.data, ws_bytes - 1, 2, 9, 5, 9, None) == -7


def _sanitizer_cases() -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    rng = np.random.default_rng(11)
    cases = []
    shapes = ((2, 2, "peaky", 2), (9, 50, "counts", 3), (197, 108, "nan", 2), (2048, 2055, "negzero", 1))
    for n, k, kind, b in shapes:
        scores, count = _scores(kind, b, n, rng)
        cases.append((scores, count, k, n))
    return cases


def _run_driver(exe: Path, cases, tmp: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    ke.write_cases(tmp / "cases.bin", cases)
    proc = subprocess.run(
        [str(exe), str(tmp / "cases.bin"), str(tmp / "out.bin")], capture_output=True, text=True, timeout=300
    )
    results = ke.read_results(tmp / "out.bin", cases) if proc.returncode == 0 else []
    return proc, results


def _check_driver(cases, results) -> None:
    for (scores, count, k, n_ref), rec in zip(cases, results):
        ref_idx, ref_cnt = select_reference(scores, count, k_max=k, n_ref=n_ref, dtype=np.float32)
        b = len(ref_cnt)
        s = rec["s"]
        assert rec["status"] == 0 and rec["dyn_status"] == 0
        assert np.array_equal(rec["indices"], ref_idx) and np.array_equal(rec["count"], ref_cnt)
        assert s == ref_cnt.max() and np.array_equal(rec["dyn_flat"][: b * s].reshape(b, s), ref_idx[:, :s])


def test_address_and_undefined_behaviour_sanitizers_clean(tmp_path, capsys):
    exe = ke.build_driver(tmp_path, "address,undefined")
    cases = _sanitizer_cases()
    proc, results = _run_driver(exe, cases, tmp_path)
    assert proc.returncode == 0 and "driver-ok" in proc.stdout, proc.stderr[-4000:]
    assert "runtime error" not in proc.stderr and "ERROR: AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    _check_driver(cases, results)
    with capsys.disabled():
        print(f"\nkernel on CPU under ASan+UBSan: {len(cases)} cases x 2 layouts clean")


def test_pick_flag_store_is_atomic():
    """The pick-flag store must stay atomic: several grid points can pick one token, and a plain store from
    several threads is a data race (compute-sanitizer racecheck, and the ThreadSanitizer test below)."""
    text = ke.KERNEL.read_text()
    assert "atomicExch(&flags[nearestFirst(cdf, m, y)], 1);" in text
    assert not re.search(r"flags\[nearestFirst\([^]]*\)\]\s*=", text)


@pytest.mark.slow
def test_thread_sanitizer_finds_no_race(tmp_path):
    """ThreadSanitizer sees every emulated CUDA thread; the pick-flag store is atomic, so it reports nothing.

    Control: the same kernel with the former plain store (``flags[...] = 1`` from several threads) is
    reported as a data race, so this check is able to fail."""
    small = _sanitizer_cases()[:3]
    exe = ke.build_driver(tmp_path, "thread")
    proc, results = _run_driver(exe, small, tmp_path)
    assert proc.returncode == 0 and "WARNING: ThreadSanitizer" not in proc.stderr, proc.stderr[-4000:]
    _check_driver(small, results)

    text = ke.KERNEL.read_text()
    racy = text.replace("atomicExch(&flags[nearestFirst(cdf, m, y)], 1);", "flags[nearestFirst(cdf, m, y)] = 1;")
    assert racy != text, "the pick-flag store changed: update this control"
    (tmp_path / "racy").mkdir()
    src = tmp_path / "racy" / ke.KERNEL.name
    src.write_text(racy)
    exe = ke.build_driver(tmp_path / "racy", "thread", source=src)
    proc, _ = _run_driver(exe, small, tmp_path / "racy")  # every case: more chances to interleave
    assert "WARNING: ThreadSanitizer: data race" in proc.stderr, proc.stderr[-2000:]
