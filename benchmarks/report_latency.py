"""ATS vs dense on ONNX Runtime CPU for a DeiT-S-shaped model: K = 197 and the tune-k schedule.

First ``tune_k`` proposes a K schedule from this machine's token-count staircase (target: never slower
than dense). Then the dense graph, the paper setting (K = 197 in blocks 3..11) and the tuned schedule run
round-robin in one process (ORT thread spinning off), so machine noise hits all alike. Prints p50/p90/p99,
the latency ratio ATS/dense (p50) and the token-work ratio (sum over blocks of the token slots each block
processes, ATS over dense; static shapes), the static GFLOPs ratio, the batch and the versions.

    python benchmarks/report_latency.py [--model deit_small_patch16_224] [--batch 1] [--reps 30]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def token_work(cfg, ats) -> int:
    from ats_deploy.reports.flops import slots_per_block

    return sum(n_in for n_in, _ in slots_per_block(cfg, ats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tune-reps", type=int, default=10)
    ap.add_argument("--step", type=int, default=8, help="tune-k sweep step in tokens")
    ap.add_argument("--target", type=float, default=1.0, help="tune-k target ratio ATS/dense")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from ats_deploy.exporters.export import preprocess_for
    from ats_deploy.exporters.onnx import GraphOptions, build_graph
    from ats_deploy.inputs import random_inputs
    from ats_deploy.model.config import ATSConfig, resolve_ats
    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import preset
    from ats_deploy.reports.flops import static_gflops
    from ats_deploy.reports.latency import environment, measure_interleaved, step_timer, summarize
    from ats_deploy.reports.tune import format_tune, tune_k
    from ats_deploy.runtime.ort_runner import OrtRunner

    cfg = preset(args.model)
    ck = default_checkpoint(cfg=cfg)
    tuned = tune_k(
        ck,
        backend="onnxruntime",
        batch=args.batch,
        step=args.step,
        reps=args.tune_reps,
        warmup=args.warmup,
        target_ratio=args.target,
        threads=args.threads,
        progress=not args.json,
    )
    variants = {"dense": ATSConfig(), "ats_k197": resolve_ats(cfg), "ats_tuned": tuned.ats_config()}
    x = random_inputs(args.batch, preprocess_for(cfg), seed=0)
    runners = {
        name: OrtRunner(
            build_graph(cfg, ck.state_dict, ats, GraphOptions(batch=args.batch)).SerializeToString(),
            threads=args.threads,
            spin=False,
        )
        for name, ats in variants.items()
    }
    kept = {}
    for name, ats in variants.items():
        out = runners[name].infer({"pixels": x})
        kept[name] = {b: float(np.mean(out[f"count_{b}"]) - 1) for b in ats.blocks}
    timers = {name: step_timer(r, x)[0] for name, r in runners.items()}
    samples = measure_interleaved(timers, warmup=args.warmup, reps=args.reps)
    dense = summarize(samples["dense"], args.batch)
    work0, flops0 = token_work(cfg, variants["dense"]), static_gflops(cfg, variants["dense"])
    rows = []
    for name, ats in variants.items():
        s = summarize(samples[name], args.batch)
        rows.append(
            {
                "variant": name,
                "batch": args.batch,
                "k_schedule": list(ats.k_schedule),
                **{k: round(s[k], 3) for k in ("p50_ms", "p90_ms", "p99_ms")},
                "ratio_p50": round(s["p50_ms"] / dense["p50_ms"], 3),
                "token_work_ratio": round(token_work(cfg, ats) / work0, 3),
                "gflops_ratio": round(static_gflops(cfg, ats) / flops0, 3),
                "mean_kept": {str(b): round(v, 1) for b, v in kept[name].items()},
            }
        )
    env = environment({"name": "onnxruntime", "device": "cpu", "threads": args.threads or "all"})
    if args.json:
        doc = {"model": args.model, "reps": args.reps, "results": rows, "tune": tuned.to_dict(), "env": env}
        print(json.dumps(doc, indent=2))
        return
    print(format_tune(tuned))
    print(f"\nONNX Runtime CPU, {args.model}, batch {args.batch}, {args.reps} interleaved reps, {args.warmup} warm-up")
    head = f"{'variant':<10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'ATS/dense':>9} {'work ratio':>10}"
    print(head + f" {'GFLOPs':>7}  K")
    for r in rows:
        ks = sorted(set(r["k_schedule"]))
        kdesc = "-" if not ks else (str(ks[0]) if len(ks) == 1 else str(r["k_schedule"]))
        print(
            f"{r['variant']:<10} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['ratio_p50']:>9.3f} "
            f"{r['token_work_ratio']:>10.3f} {r['gflops_ratio']:>7.3f}  {kdesc}"
        )
    print("versions:", json.dumps(env["versions"]), "| cpu:", env.get("cpu"), f"x{env.get('cpu_count')}")


if __name__ == "__main__":
    main()
