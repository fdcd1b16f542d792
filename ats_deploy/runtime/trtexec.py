"""Engine latency from trtexec, TensorRT's own benchmark tool (on every JetPack), parsed for the report.

Why trtexec and not a timer of our own: it is the reference every TensorRT user trusts, it replays the
engine in a CUDA graph (``--useCudaGraph``), leaves host copies out (``--noDataTransfers``), and spins on
the stream (``--useSpinWait``) so wake-up jitter does not count. Per-iteration times come from
``--exportTimes`` and per-layer times (including the sampler plugin's own) from ``--exportProfile``, in a
separate profiling pass (``--separateProfileRun``) so the profiler never slows the timed iterations.

The JSON formats are those written by TensorRT's ``samples/common/sampleReporting.cpp``
(``exportJSONTrace``: a list of per-iteration records with ``startEnqMs`` ... ``computeMs``,
``latencyMs``, ``endToEndMs``; ``Profiler::exportJSONProfile``: ``[{"count": N}, {"name", "timeMs",
"averageMs", "percentage"}, ...]``), the code behind trtexec's documented ``--exportTimes`` and
``--exportProfile`` options.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError

__all__ = [
    "JETPACK_TRTEXEC",
    "TrtexecRun",
    "find_trtexec",
    "measure_interleaved",
    "parse_profile",
    "parse_times",
    "trtexec_command",
]

JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
TRTEXEC_ENV = "TRTEXEC"


def find_trtexec(path: str | os.PathLike[str] | None = None) -> str:
    """``path``, $TRTEXEC, ``trtexec`` on PATH or JetPack's copy; DependencyError naming the fix otherwise."""
    for cand in (path, os.environ.get(TRTEXEC_ENV), shutil.which("trtexec"), JETPACK_TRTEXEC):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise DependencyError(
        f"trtexec not found (looked at $TRTEXEC, PATH and {JETPACK_TRTEXEC}); it ships with TensorRT: on a Jetson "
        "install JetPack's tensorrt package, elsewhere put TensorRT's bin/ on PATH or set TRTEXEC"
    )


def trtexec_command(
    trtexec: str,
    plan: str | os.PathLike[str],
    *,
    times_json: str | os.PathLike[str],
    profile_json: str | os.PathLike[str] | None = None,
    plugin_lib: str | os.PathLike[str] | None = None,
    plugin_dynamic: bool = False,
    shapes: str | None = None,
    cuda_graph: bool = True,
    iterations: int = 100,
    warmup_ms: int = 200,
) -> list[str]:
    """The trtexec command line for one timed run of ``plan`` (a list, for ``subprocess``).

    ``plugin_dynamic``: the library is a ``-DATS_SELF_REGISTER=OFF`` build, registered through its
    ``getCreators`` (``--dynamicPlugins``); otherwise it registers itself when loaded (``--staticPlugins``).
    """
    cmd = [trtexec, f"--loadEngine={plan}", "--noDataTransfers", "--useSpinWait"]
    cmd += ["--useCudaGraph"] if cuda_graph else []  # data-dependent shapes cannot be captured
    if plugin_lib:
        cmd += [f"--{'dynamicPlugins' if plugin_dynamic else 'staticPlugins'}={plugin_lib}"]
    cmd += [f"--shapes={shapes}"] if shapes else []
    cmd += [f"--iterations={iterations}", "--duration=0", f"--warmUp={warmup_ms}", f"--exportTimes={times_json}"]
    if profile_json is not None:
        cmd += [f"--exportProfile={profile_json}", "--separateProfileRun"]
    return cmd


def _load(source: str | os.PathLike[str] | list, what: str):
    if isinstance(source, list):
        return source
    try:
        return json.loads(Path(source).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"trtexec's {what} {source} is not readable JSON ({exc}); rerun trtexec") from None


def parse_times(source: str | os.PathLike[str] | list) -> np.ndarray:
    """GPU compute time of each iteration (ms) from an ``--exportTimes`` file (or its parsed list).

    With ``--noDataTransfers`` there is no host copy, so ``computeMs`` is the engine's latency.
    """
    data = _load(source, "--exportTimes file")
    if not isinstance(data, list) or not data:
        raise InputError(f"trtexec's --exportTimes file {source} holds no iterations; rerun with --iterations > 0")
    try:
        times = np.array([float(rec["computeMs"]) for rec in data], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise InputError(
            f"{source} is not trtexec --exportTimes output (records without computeMs); pass the file it wrote"
        ) from None
    return times


def parse_profile(source: str | os.PathLike[str] | list, *, plugin_layers: Sequence[str] = ()) -> dict:
    """Per-layer average times from an ``--exportProfile`` file, and the sampler plugin layers' share.

    ``plugin_layers``: the plugin layer names (from the build record); layers whose name contains
    ``AdaptiveTokenSampler`` count too.
    """
    data = _load(source, "--exportProfile file")
    if not isinstance(data, list) or not data or "count" not in data[0]:
        raise InputError(f"{source} is not trtexec --exportProfile output (no count record); pass the file it wrote")
    layers = []
    for rec in data[1:]:
        try:
            layers.append({"name": str(rec["name"]), "average_ms": float(rec["averageMs"])})
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{source}: a layer record lacks name/averageMs; pass trtexec's own file") from None
    names = set(plugin_layers)
    plugin = [la for la in layers if la["name"] in names or "AdaptiveTokenSampler" in la["name"]]
    total = sum(la["average_ms"] for la in layers)
    return {
        "iterations": int(data[0]["count"]),
        "total_ms": total,
        "plugin_ms": sum(la["average_ms"] for la in plugin),
        "plugin_layers": [la["name"] for la in plugin],
        "layers": layers,
    }


@dataclass(frozen=True)
class TrtexecRun:
    """One engine to time: its plan, plugin library (plugin form) and trtexec ``--shapes`` (dynamic batch)."""

    plan: Path
    plugin_lib: Path | None = None
    shapes: str | None = None
    cuda_graph: bool = True
    plugin_layers: tuple[str, ...] = ()
    plugin_dynamic: bool = False  # a -DATS_SELF_REGISTER=OFF library: --dynamicPlugins


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        plan = Path(cmd[1].split("=", 1)[1]).name
        raise DependencyError(f"trtexec failed on {plan} (exit {proc.returncode}): {tail}")


def measure_interleaved(
    runs: Mapping[str, TrtexecRun],
    *,
    rounds: int = 3,
    iterations: int = 100,
    warmup_ms: int = 200,
    trtexec: str | None = None,
) -> dict[str, dict]:
    """Time every engine ``rounds`` times, round-robin (order reversed on odd rounds), so drift and thermal
    throttling hit all alike; returns per engine its samples (ms) over all rounds and the last profile."""
    exe = find_trtexec(trtexec)
    names = list(runs)
    out: dict[str, dict] = {n: {"samples": [], "profile": None} for n in names}
    with tempfile.TemporaryDirectory(prefix="ats-trtexec-") as tmp:
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                run = runs[name]
                times, prof = Path(tmp) / f"{name}_{r}.times.json", Path(tmp) / f"{name}_{r}.profile.json"
                last = r == rounds - 1
                cmd = trtexec_command(
                    exe, run.plan, times_json=times, profile_json=prof if last else None, plugin_lib=run.plugin_lib,
                    plugin_dynamic=run.plugin_dynamic, shapes=run.shapes, cuda_graph=run.cuda_graph,
                    iterations=iterations, warmup_ms=warmup_ms,
                )  # fmt: skip
                _run(cmd)
                out[name]["samples"].extend(parse_times(times).tolist())
                if last:
                    out[name]["profile"] = parse_profile(prof, plugin_layers=run.plugin_layers)
    return out
