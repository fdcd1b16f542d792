"""Where the static K = n export's time over dense goes, measured without the profiler, side by side.

Static K = 197 keeps every slot, so its whole cost over dense is overhead. This benchmark splits that
overhead by ablation: besides ``dense`` and the real ``static`` graph, it times two graphs that differ from
``static`` only in what the ATS blocks compute (same weights, same gathers, same key masks after each ATS
block):

- ``glue``: no score path and a fixed selection (every slot kept, in order): what the gathers, token-id
  outputs and key masks cost;
- ``glue+scores``: the real score path (CLS attention x value norm) feeding the same fixed selection;
- ``static``: the real score path and the real sampler.

Successive differences of the ratios to dense are the shares of the glue, the score path and the sampler.
ONNX Runtime's profiler adds microseconds to each of the ~90 small nodes of an ATS block and so
overstates the sampler; these figures do not. The ablated graphs are timing probes only: their outputs
are not ATS.

    python benchmarks/ats_overhead_breakdown.py [--model deit_small_patch16_224] [--batches 1,8] [--reps 150]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cycling_timers, environment, percentiles, random_feeds  # noqa: E402

VARIANTS = ("dense", "glue", "glue+scores", "static")


def build(cfg, state_dict, kind: str, batch: int) -> bytes:
    """The ONNX model of ``kind`` (one of VARIANTS) at a static batch."""
    import ats_deploy.exporters.onnx as ox
    from ats_deploy.exporters.graph import INT64
    from ats_deploy.model.config import ATSConfig, resolve_ats

    def fixed_selection(g, scores, count_in, *, n, k_max, **_):
        # Keep every slot in order; the ArgMax keeps the scores (and the score path) alive in the graph.
        live = g.op("Mul", g.cast(g.op("ArgMax", scores, axis=1, keepdims=1), INT64), g.const(0))
        idx = g.op("Add", live, g.const([list(range(n))]))
        return idx, g.op("Squeeze", g.op("Add", live, g.const(n)), g.const([1]))

    def no_scores(self, q_all, k_t, v_all, bias):
        g = self.g
        return g.op("Slice", g.op("ReduceSum", q_all, g.const([2]), keepdims=0), g.const([0]),
                    g.const([self.cfg.num_tokens]), g.const([1]))

    real_emit, real_scores = ox.emit_sampler, ox._VitEmitter.cls_scores
    try:
        if kind in ("glue", "glue+scores"):
            ox.emit_sampler = fixed_selection
        if kind == "glue":
            ox._VitEmitter.cls_scores = no_scores
        ats = ATSConfig() if kind == "dense" else resolve_ats(cfg)
        return ox.build_graph(cfg, state_dict, ats, ox.GraphOptions(batch=batch)).SerializeToString()
    finally:
        ox.emit_sampler, ox._VitEmitter.cls_scores = real_emit, real_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=150, help="rounds at batch 1 (divided by the batch size above it)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import preset
    from ats_deploy.reports.latency import measure_interleaved, paired_ratio
    from ats_deploy.runtime.ort_runner import OrtRunner

    cfg = preset(args.model)
    ck = default_checkpoint(cfg=cfg)
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        feeds = random_feeds(cfg, b, args.inputs)
        runners = {k: OrtRunner(build(cfg, ck.state_dict, k, b), threads=args.threads, spin=False) for k in VARIANTS}
        reps = max(args.reps // b, 20)
        times = measure_interleaved(cycling_timers(runners, feeds), warmup=args.warmup, reps=reps)
        prev = 1.0
        for k in VARIANTS:
            r = paired_ratio(times[k], times["dense"])
            results.append({"batch": b, "variant": k, "rounds": reps, **{q: round(v, 2) for q, v in
                            percentiles(times[k]).items()}, "ratio": round(r.median, 3),
                            "ratio_low": round(r.low, 3), "ratio_high": round(r.high, 3),
                            "step": round(r.median - prev, 3)})
            prev = r.median
        for r in runners.values():
            r.close()
    env = environment()
    if args.json:
        print(json.dumps({"model": args.model, "results": results, "env": env}, indent=2))
        return
    print(f"ATS overhead by ablation, {args.model}, static K = n, ONNX Runtime CPU, {args.threads} threads")
    print(f"{'batch':>5} {'variant':<12} {'rounds':>6} {'p50 ms':>8} {'p90':>8} {'p99':>8} "
          f"{'/dense [95% CI]':>24} {'added':>7}")
    names = {"glue": "gathers+masks", "glue+scores": "score path", "static": "sampler"}
    for r in results:
        ci = f"{r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
        added = f"{r['step']:+.3f} {names[r['variant']]}" if r["variant"] in names else ""
        print(f"{r['batch']:>5} {r['variant']:<12} {r['rounds']:>6} {r['p50']:>8.1f} {r['p90']:>8.1f} "
              f"{r['p99']:>8.1f} {ci:>24} {added}")
    print("env:", json.dumps(env))


if __name__ == "__main__":
    main()
