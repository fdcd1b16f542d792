"""ONNX Runtime CPU latency: ATS ONNX vs the dense ONNX of the same weights, measured side by side.

For each batch size the dense graph and the ATS graphs run round-robin in one process (order reversed on
odd rounds), each round on the next of a fixed set of inputs, so machine noise and input content hit all
variants alike. The headline figure is the median over rounds of the per-round ratio ATS / dense with a
95% bootstrap interval; p50/p90/p99 of each variant are printed too.

Each ATS variant is set against what it can save at most: the token-work ratio (token slots the blocks
process, ATS over dense, in dynamic mode from the counts each input really kept) and the FLOPs ratio
(matrix-product MACs, the paper's convention). Static K = 197 saves nothing (every block keeps 197
slots): its ratio is the sampler's and the glue's overhead. ``--profile`` adds, per variant, the share
of ONNX Runtime's node time spent in the score and sampler nodes (``*/ats/*``), from its profiler.

Targets (issue 13): static K=197 <= 1.03 at batch 1 and 8; dynamic within 0.05 of its token-work ratio
at batch 1; --max-k 99 static within 0.05 of its FLOPs ratio.

    python benchmarks/ort_cpu_latency.py [--model deit_small_patch16_224] [--batches 1,8] [--reps 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cycling_timers, environment, percentiles, random_feeds  # noqa: E402


def token_work(cfg, ats, counts: dict[int, float] | None = None) -> float:
    """Sum over blocks of input token slots; ``counts`` (block -> mean slots) gives the dynamic-mode work."""
    n, total = float(cfg.num_tokens), 0.0
    for i in range(cfg.depth):
        total += n
        k = ats.k_for(i)
        if k is not None:
            extra = cfg.num_prefix_tokens - 1
            n = float(min(k, int(n) - extra) + extra)
            if counts is not None:
                n = counts[i]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=40, help="rounds (each variant once per round)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=8, help="distinct inputs cycled over the rounds")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = all cores)")
    ap.add_argument("--profile", action="store_true", help="also report the */ats/* share of node time")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from ats_deploy.exporters.onnx import GraphOptions, build_graph
    from ats_deploy.model.config import ATSConfig, resolve_ats
    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import preset
    from ats_deploy.reports.flops import model_flops
    from ats_deploy.reports.latency import measure_interleaved, ort_ats_share, paired_ratio
    from ats_deploy.runtime.ort_runner import OrtRunner

    cfg = preset(args.model)
    ck = default_checkpoint(cfg=cfg)
    variants = {
        "dense": ATSConfig(),
        "static_k197": resolve_ats(cfg),
        "static_k99": resolve_ats(cfg, max_k="99"),
        "dynamic_k197": resolve_ats(cfg, shape_mode="dynamic"),
        "dynamic_k99": resolve_ats(cfg, max_k="99", shape_mode="dynamic"),
    }
    dense_flops = model_flops(cfg, ATSConfig()).total
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        feeds = random_feeds(cfg, b, args.inputs)
        runners, models, counts = {}, {}, {}
        for name, ats in variants.items():
            models[name] = build_graph(cfg, ck.state_dict, ats, GraphOptions(batch=b)).SerializeToString()
            runners[name] = OrtRunner(models[name], threads=args.threads, spin=False)
            outs = [runners[name].infer(f) for f in feeds]
            # per ATS block: the slots the next block processed (dynamic: the batch's largest count)
            counts[name] = {blk: [float(o[f"tokens_{blk}"].shape[1]) for o in outs] for blk in ats.blocks}
            counts[name]["kept"] = {blk: np.concatenate([o[f"count_{blk}"] for o in outs]) for blk in ats.blocks}
        times = measure_interleaved(cycling_timers(runners, feeds), warmup=args.warmup, reps=args.reps)
        dense_work = token_work(cfg, variants["dense"])
        for name, ats in variants.items():
            p = percentiles(times[name])
            ratio = paired_ratio(times[name], times["dense"])
            dyn = ats.shape_mode == "dynamic"
            mean_slots = {blk: float(np.mean(v)) for blk, v in counts[name].items() if blk != "kept"}
            work = token_work(cfg, ats, mean_slots if dyn else None) / dense_work
            if dyn:  # FLOPs of the slots the graph really ran (largest count of each batch)
                flops = float(np.mean([
                    model_flops(cfg, ats, counts={blk: counts[name][blk][i] for blk in ats.blocks}).total
                    for i in range(len(feeds))
                ])) / dense_flops
            else:
                flops = model_flops(cfg, ats).total / dense_flops
            kept = counts[name]["kept"]
            row = {
                "batch": b,
                "variant": name,
                **{k: round(v, 2) for k, v in p.items()},
                "ratio": round(ratio.median, 3),
                "ratio_low": round(ratio.low, 3),
                "ratio_high": round(ratio.high, 3),
                "token_work_ratio": round(work, 3),
                "flops_ratio": round(flops, 3),
                "slots_per_block": {blk: round(v, 1) for blk, v in mean_slots.items()},
                "kept_mean_per_block": {blk: round(float(np.mean(v)) - 1, 1) for blk, v in kept.items()},
            }
            if args.profile and ats.blocks:
                row["ats_node_share"] = round(ort_ats_share(models[name], feeds, threads=args.threads)["overall"], 3)
            results.append(row)
        for r in runners.values():
            r.close()
    env = environment()
    if args.json:
        print(json.dumps({"model": args.model, "reps": args.reps, "results": results, "env": env}, indent=2))
        return
    print(f"ONNX Runtime CPU latency, {args.model}, {args.reps} interleaved rounds after {args.warmup} warm-up, "
          f"{args.inputs} inputs cycled")
    print(f"{'batch':>5} {'variant':<13} {'p50 ms':>7} {'p90':>7} {'p99':>7} {'ATS/dense [95% CI]':>24} "
          f"{'work':>6} {'FLOPs':>6} {'ratio-work':>10}" + (f" {'ats share':>9}" if args.profile else ""))
    for r in results:
        ci = f"{r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
        line = (f"{r['batch']:>5} {r['variant']:<13} {r['p50']:>7.1f} {r['p90']:>7.1f} {r['p99']:>7.1f} {ci:>24} "
                f"{r['token_work_ratio']:>6.3f} {r['flops_ratio']:>6.3f} {r['ratio'] - r['token_work_ratio']:>+10.3f}")
        if "ats_node_share" in r:
            line += f" {r['ats_node_share']:>9.1%}"
        print(line)
    for r in results:
        if r["variant"].startswith("dynamic"):
            print(f"  batch {r['batch']} {r['variant']}: slots per block {r['slots_per_block']}, "
                  f"mean K' {r['kept_mean_per_block']}")
    print("env:", json.dumps(env))


if __name__ == "__main__":
    main()
