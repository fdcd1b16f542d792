"""The fused CUDA sampler kernel vs the eager PyTorch chain of the same rule, side by side on one GPU.

Both run in the same process on the same device buffers, timed with CUDA events after warm-up: the
kernel through its C API (libats_sampler_kernel.so, built here with CMake for this GPU's architecture)
and the eager chain :func:`ats_deploy.model.ats.select_tokens` (about 40 small torch ops). Batch sizes
1, 64 and 256 at n = 197 (DeiT at 224/16), K = 197 (the paper setting) and K = 99.

Targets (issue: sampler plugin): <= 10 us per call at B = 1, and >= 10x faster than the eager chain
at every B. The kernel's outputs are also checked against the eager chain on the benchmark inputs.

    python benchmarks/sampler_gpu.py [--reps 200] [--batches 1,64,256] [--n 197] [--json]

Needs a CUDA GPU, torch with CUDA, nvcc and cmake. Exits with a message (code 2) where they are missing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, percentiles  # noqa: E402


def _load_kernel(build_dir: Path, arch: str) -> ctypes.CDLL:
    from ats_deploy.exporters.plugin_lib import build_plugin

    lib = ctypes.CDLL(str(build_plugin(build_dir=build_dir, kernel_only=True, cuda_arch=arch)))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.atsSamplerLaunch.restype = i32
    lib.atsSamplerLaunch.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, i32, ptr]
    return lib


def _time(fn, torch, *, warmup: int, reps: int) -> list[float]:
    """Per-call times in microseconds, each call bracketed by CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--n", type=int, default=197)
    ap.add_argument("--ks", default="197,99")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("needs torch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    from ats_deploy.errors import DependencyError
    from ats_deploy.model.ats import select_tokens
    from ats_deploy.model.reference import output_slots

    major, minor = torch.cuda.get_device_capability()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            lib = _load_kernel(Path(tmp), f"{major}{minor}")
        except DependencyError as exc:
            print(f"cannot build the kernel: {exc}", file=sys.stderr)
            return 2
        rows = []
        rng = np.random.default_rng(0)
        n = args.n
        for b in (int(x) for x in args.batches.split(",")):
            scores = torch.from_numpy(rng.dirichlet(np.full(n, 0.1), size=b).astype(np.float32)).cuda()
            count = torch.from_numpy(rng.integers(n // 2, n + 1, size=b).astype(np.int32)).cuda()
            count64 = count.long()
            for k in (int(x) for x in args.ks.split(",")):
                k_out = output_slots(k, n)
                idx = torch.empty(b, k_out, dtype=torch.int32, device="cuda")
                cnt = torch.empty(b, dtype=torch.int32, device="cuda")
                stream = torch.cuda.current_stream().cuda_stream

                def kernel(b=b, k=k, idx=idx, cnt=cnt, stream=stream, scores=scores, count=count):
                    rc = lib.atsSamplerLaunch(
                        scores.data_ptr(), count.data_ptr(), idx.data_ptr(), cnt.data_ptr(), b, n, k, 197, stream
                    )
                    if rc:
                        raise RuntimeError(f"atsSamplerLaunch returned {rc}")

                def eager(k=k, scores=scores, count64=count64):
                    return select_tokens(scores, count64, k_max=k, n_ref=197)

                kernel()
                ref_idx, ref_cnt = eager()
                torch.cuda.synchronize()
                same = bool(torch.equal(idx.long(), ref_idx) and torch.equal(cnt.long(), ref_cnt))
                tk = percentiles(_time(kernel, torch, warmup=args.warmup, reps=args.reps))
                te = percentiles(_time(eager, torch, warmup=args.warmup, reps=args.reps))
                rows.append(
                    {
                        "batch": b,
                        "n": n,
                        "k": k,
                        "kernel_us": {q: round(v, 2) for q, v in tk.items()},
                        "eager_us": {q: round(v, 2) for q, v in te.items()},
                        "speedup_p50": round(te["p50"] / tk["p50"], 1),
                        "outputs_equal": same,
                    }
                )
    env = {**environment(), "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    if args.json:
        print(json.dumps({"rows": rows, "env": env}, indent=2))
        return 0
    print(f"sampler: fused CUDA kernel vs eager torch chain, n={n}, {args.reps} timed calls after {args.warmup}")
    print(f"{'B':>4} {'K':>4} {'kernel p50/p90/p99 us':>24} {'eager p50/p90/p99 us':>24} {'speedup':>8} {'equal':>6}")
    for r in rows:
        kk, ee = r["kernel_us"], r["eager_us"]
        print(
            f"{r['batch']:>4} {r['k']:>4} {kk['p50']:>8.1f}{kk['p90']:>8.1f}{kk['p99']:>8.1f} "
            f"{ee['p50']:>8.1f}{ee['p90']:>8.1f}{ee['p99']:>8.1f} "
            f"{r['speedup_p50']:>7.1f}x {str(r['outputs_equal']):>6}"
        )
    print("targets: <= 10 us at B=1; >= 10x faster than eager at every B")
    print("env:", json.dumps(env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
