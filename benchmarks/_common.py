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


def random_feeds(cfg, batch: int, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` distinct standard-normal pixel batches [batch, C, H, W] for the model of ``cfg``."""
    rng = np.random.default_rng(seed)
    shape = (batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    return [{"pixels": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def cycling_timers(runners: dict, feeds: list[dict[str, np.ndarray]]) -> dict[str, Callable[[], float]]:
    """One timer per runner: each call runs the runner's next feed (cycling) and returns its milliseconds."""
    turn = {k: 0 for k in runners}

    def timer(name: str) -> Callable[[], float]:
        def run() -> float:
            feed = feeds[turn[name] % len(feeds)]
            turn[name] += 1
            t0 = time.perf_counter()
            runners[name].infer(feed)
            return (time.perf_counter() - t0) * 1e3

        return run

    return {k: timer(k) for k in runners}


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
