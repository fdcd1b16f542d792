"""Where a static export's time over dense goes, measured without the profiler, side by side.

Static K = 197 keeps every slot, so its whole cost over dense is overhead; a smaller static K also saves
work, and the question is how close it gets to what those fewer slots alone would cost. This benchmark
splits the ATS graph's time by ablation: besides ``dense`` and the real ``static`` graph, it times three
graphs that differ from ``static`` only in what the ATS blocks compute (same weights, same slot counts):

- ``floor``: the first K_out slots kept in order, with no score path, no sampler and no key masks: the
  time of the smaller slot count alone, the best any sampler could reach (for K = n: dense plus a gather);
- ``glue``: the same fixed selection with the gathers, token-id outputs and key masks of the real graph;
- ``glue+scores``: the real score path (CLS attention x value norm) feeding that fixed selection;
- ``static``: the real score path and the real sampler;
- ``to <stage>`` (with ``--stages``, between ``glue+scores`` and ``static``): the real sampler cut after
  that stage (``emit_portable_sampler``'s ``stop_after``: sort + CDF, normalised CDF and grid, merge sort
  for each grid point's neighbours, the neighbour pair, the exact tie search), then the fixed selection;
  successive steps split the sampler's cost stage by stage, and the last one (``static``) is compaction;
- ``+N nodes`` (with ``--node-chain N``): ``glue+scores`` with N trivial elementwise nodes (alternating
  Add and Mul by constants ONNX Runtime does not fold away) chained on the scores before the fixed
  selection: what N more small nodes cost per ATS block, whatever they compute;
- ``sampler x2`` (with ``--second-copy``): ``static`` whose blocks run the sampler twice, the second copy
  on the first one's scores (tied to its output, so it runs after it): what one more sampler costs once
  its kernels and buffers are warm, against the first copy's cost in a block whose large matrix products
  have just evicted them.

Successive differences of the ratios to dense are the shares of the fewer slots, the glue, the score path
and the sampler. ONNX Runtime's profiler adds microseconds to each of the ~90 small nodes of an ATS block
and so overstates the sampler; these figures do not. The ablated graphs are timing probes only: their
outputs are not ATS.

    python benchmarks/ats_overhead_breakdown.py [--model deit_small_patch16_224] [--max-k 197] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cycling_timers, environment, percentiles, random_feeds  # noqa: E402

VARIANTS = ("dense", "floor", "glue", "glue+scores", "static")
SECOND = "sampler x2"
STAGE_NAMES = {"sort": "sort + CDF", "grid": "F~ and grid", "merge": "merge sort", "pair": "neighbours",
               "search": "tie search"}


def build(cfg, state_dict, kind: str, batch: int, max_k: int | None = None) -> bytes:
    """The ONNX model of ``kind`` (one of VARIANTS, ``to <stage>``, ``+N nodes`` or SECOND) at a static
    batch; ``max_k`` None: K = token count."""
    import ats_deploy.exporters.onnx as ox
    from ats_deploy.exporters.graph import FLOAT, INT64
    from ats_deploy.exporters.sampler import emit_portable_sampler
    from ats_deploy.model.config import ATSConfig, resolve_ats

    def fixed_selection(g, scores, count_in, *, n, k_max, **_):
        # Keep the first K_out slots in order; the ArgMax keeps the scores (and the score path) alive.
        k_out = min(k_max, n)
        live = g.op("Mul", g.cast(g.op("ArgMax", scores, axis=1, keepdims=1), INT64), g.const(0))
        idx = g.op("Add", live, g.const([list(range(k_out))]))
        return idx, g.op("Squeeze", g.op("Add", live, g.const(k_out)), g.const([1]))

    def chained(count):
        def emit(g, scores, count_in, **kw):
            x = scores
            for i in range(count):  # neither x + 0 nor x * 1: ONNX Runtime would remove those
                x = g.op("Mul" if i % 2 else "Add", x, g.const(0.999 if i % 2 else 0.25, "float32"))
            return fixed_selection(g, x, count_in, **kw)

        return emit

    def no_scores(self, q_all, k_t, v_all, bias):
        g = self.g
        return g.op("Slice", g.op("ReduceSum", q_all, g.const([2]), keepdims=0), g.const([0]),
                    g.const([self.cfg.num_tokens]), g.const([1]))

    def no_mask(self, count, n):
        return None, None

    def twice(g, scores, count_in, *, n, k_max, **kw):
        first, _ = real[0](g, scores, count_in, n=n, k_max=k_max, **kw)
        tie = g.op("Mul", g.cast(g.op("ReduceMax", first, axes=[1], keepdims=1), FLOAT), g.const(0.0, "float32"))
        return real[0](g, g.op("Add", scores, tie), count_in, n=n, k_max=k_max, **kw)

    def cut(stage):
        def emit(g, scores, count_in, *, n, k_max, n_ref, mode, form, **kw):
            return emit_portable_sampler(g, scores, count_in, n=n, k_max=k_max, n_ref=n_ref, mode=mode,
                                         index_type=INT64, stop_after=stage, **kw)

        return emit

    real = ox.emit_sampler, ox._VitEmitter.cls_scores, ox._VitEmitter.key_mask
    try:
        if kind.startswith("to "):
            ox.emit_sampler = cut(kind[3:])
        if kind in ("floor", "glue", "glue+scores"):
            ox.emit_sampler = fixed_selection
        if kind == SECOND:
            ox.emit_sampler = twice
        if kind.startswith("+") and kind.endswith(" nodes"):
            ox.emit_sampler = chained(int(kind[1:-6]))
        if kind in ("floor", "glue"):
            ox._VitEmitter.cls_scores = no_scores
        if kind == "floor":
            ox._VitEmitter.key_mask = no_mask
        ats = ATSConfig() if kind == "dense" else resolve_ats(cfg, max_k=max_k)
        return ox.build_graph(cfg, state_dict, ats, ox.GraphOptions(batch=batch)).SerializeToString()
    finally:
        ox.emit_sampler, ox._VitEmitter.cls_scores, ox._VitEmitter.key_mask = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--max-k", type=int, default=None, help="static K of every ATS block (default: the token count)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=150, help="rounds at batch 1 (divided by the batch size above it)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--second-copy", action="store_true", help=f"also time {SECOND!r} (see the docstring)")
    ap.add_argument("--stages", action="store_true", help="also time the sampler cut after each stage")
    ap.add_argument("--node-chain", type=int, default=0, metavar="N",
                    help="also time glue+scores with N trivial nodes more per ATS block")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    stages = tuple(f"to {s}" for s in STAGE_NAMES) if args.stages else ()
    chain = (f"+{args.node_chain} nodes",) if args.node_chain > 0 else ()
    variants = VARIANTS[:-1] + stages + VARIANTS[-1:] + chain + ((SECOND,) if args.second_copy else ())

    from ats_deploy.model.config import ATSConfig, resolve_ats
    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import preset
    from ats_deploy.reports.flops import model_flops
    from ats_deploy.reports.latency import measure_interleaved, paired_ratio
    from ats_deploy.runtime.ort_runner import OrtRunner

    cfg = preset(args.model)
    ck = default_checkpoint(cfg=cfg)
    flops = model_flops(cfg, resolve_ats(cfg, max_k=args.max_k)).total / model_flops(cfg, ATSConfig()).total
    k_text = "n" if args.max_k is None else str(args.max_k)
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        feeds = random_feeds(cfg, b, args.inputs)
        models = {k: build(cfg, ck.state_dict, k, b, args.max_k) for k in variants}
        runners = {k: OrtRunner(m, threads=args.threads, spin=False) for k, m in models.items()}
        reps = max(args.reps // b, 20)
        times = measure_interleaved(cycling_timers(runners, feeds), warmup=args.warmup, reps=reps)
        prev, medians = 1.0, {}
        for k in variants:
            r = paired_ratio(times[k], times["dense"])
            medians[k] = r.median
            base = medians["glue+scores"] if k in chain else prev  # the chain is an add-on to glue+scores
            results.append({"batch": b, "variant": k, "rounds": reps, **{q: round(v, 2) for q, v in
                            percentiles(times[k]).items()}, "ratio": round(r.median, 3),
                            "ratio_low": round(r.low, 3), "ratio_high": round(r.high, 3),
                            "step": round(r.median - base, 3)})
            prev = prev if k in chain else r.median
        for r in runners.values():
            r.close()
    env = environment()
    if args.json:
        out = {"model": args.model, "max_k": args.max_k, "flops_ratio": round(flops, 3), "results": results}
        print(json.dumps({**out, "env": env}, indent=2))
        return
    print(f"ATS overhead by ablation, {args.model}, static K = {k_text} (FLOPs ratio {flops:.3f}), "
          f"ONNX Runtime CPU, {args.threads} threads")
    print(f"{'batch':>5} {'variant':<12} {'rounds':>6} {'p50 ms':>8} {'p90':>8} {'p99':>8} "
          f"{'/dense [95% CI]':>24} {'added':>7}")
    names = {"floor": "fewer slots", "glue": "gathers+masks", "glue+scores": "score path",
             "static": "compaction" if args.stages else "sampler", SECOND: "second sampler, warm",
             **{c: "vs glue+scores" for c in chain},
             **{f"to {k}": v for k, v in STAGE_NAMES.items()}}
    for r in results:
        ci = f"{r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
        added = f"{r['step']:+.3f} {names[r['variant']]}" if r["variant"] in names else ""
        print(f"{r['batch']:>5} {r['variant']:<12} {r['rounds']:>6} {r['p50']:>8.1f} {r['p90']:>8.1f} "
              f"{r['p99']:>8.1f} {ci:>24} {added}")
    print("env:", json.dumps(env))


if __name__ == "__main__":
    main()
