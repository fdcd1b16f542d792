"""ONNX Runtime CPU latency: ATS ONNX vs the dense ONNX of the same weights, measured side by side.

For each batch size, the dense graph and the ATS graphs (K = 197, the paper setting, and --max-k 99)
run round-robin in one process, so machine noise hits all alike. Reports p50/p90/p99 and the ratio of
ATS to dense, next to the token-work ratio: the sum over blocks of the token slots each block processes
(its input slots), ATS over dense. Static shape mode is what the ratio targets refer to; the dynamic
mode (compute follows K') is reported too.

Targets (issue: ATS core): K = 197 ratio <= 1.10 (sampler overhead only: static slots stay 197);
--max-k 99 ratio within 0.10 of the token-work ratio.

    python benchmarks/ort_cpu_latency.py [--model deit_small_patch16_224] [--batches 1,8] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, interleaved, percentiles  # noqa: E402


def token_work(cfg, ats, counts: dict[int, float] | None = None) -> int | float:
    """Sum over blocks of input token slots; ``counts`` (block -> mean slots) gives the dynamic-mode work."""
    n, total = cfg.num_tokens, 0.0
    for i in range(cfg.depth):
        total += n
        k = ats.k_for(i)
        if k is not None:
            extra = cfg.num_prefix_tokens - 1
            n = min(k, n - extra) + extra
            if counts is not None:
                n = counts[i]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = all cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from ats_deploy.exporters.onnx import GraphOptions, build_graph
    from ats_deploy.model.config import ATSConfig, resolve_ats
    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import preset
    from ats_deploy.runtime.ort_runner import OrtRunner

    cfg = preset(args.model)
    ck = default_checkpoint(cfg=cfg)
    variants = {
        "dense": ATSConfig(),
        "ats_k197": resolve_ats(cfg),
        "ats_k99": resolve_ats(cfg, max_k="99"),
        "ats_k99_dynamic": resolve_ats(cfg, max_k="99", shape_mode="dynamic"),
    }
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        x = np.random.default_rng(0).standard_normal((b, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
        runners, counts = {}, {}
        for name, ats in variants.items():
            model = build_graph(cfg, ck.state_dict, ats, GraphOptions(batch=b))
            runners[name] = OrtRunner(model.SerializeToString(), threads=args.threads, spin=False)
            out = runners[name].infer({"pixels": x})
            counts[name] = {blk: float(out[f"tokens_{blk}"].shape[1]) for blk in ats.blocks}
        times = interleaved(
            {k: (lambda r=r, x=x: r.infer({"pixels": x})) for k, r in runners.items()},
            warmup=args.warmup,
            reps=args.reps,
        )
        dense_p = percentiles(times["dense"])
        dense_work = token_work(cfg, variants["dense"])
        for name, ats in variants.items():
            p = percentiles(times[name])
            dyn = ats.shape_mode == "dynamic"
            work = token_work(cfg, ats, counts[name] if dyn else None) / dense_work
            row = {
                "batch": b,
                "variant": name,
                **{k: round(v, 2) for k, v in p.items()},
                "ratio_p50": round(p["p50"] / dense_p["p50"], 3),
                "token_work_ratio": round(work, 3),
            }
            results.append(row)
        for r in runners.values():
            r.close()
    env = environment()
    if args.json:
        print(json.dumps({"model": args.model, "reps": args.reps, "results": results, "env": env}, indent=2))
        return
    print(f"ONNX Runtime CPU latency, {args.model}, {args.reps} interleaved reps after {args.warmup} warm-up")
    print(f"{'batch':>5} {'variant':<16} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'ATS/dense':>9} {'work ratio':>10}")
    for r in results:
        print(
            f"{r['batch']:>5} {r['variant']:<16} {r['p50']:>8.1f} {r['p90']:>8.1f} {r['p99']:>8.1f} "
            f"{r['ratio_p50']:>9.3f} {r['token_work_ratio']:>10.3f}"
        )
    print("env:", json.dumps(env))


if __name__ == "__main__":
    main()
