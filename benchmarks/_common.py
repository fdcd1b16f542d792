"""Shared helpers for benchmarks: percentiles, interleaved timing, version block."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import numpy as np


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, reps: int) -> dict[str, list[float]]:
    """Time each function ``reps`` times, round-robin, so machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for mod in ("numpy", "onnx", "onnxruntime", "torch"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    except OSError:
        pass
    return env
