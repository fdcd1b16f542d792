"""tune-k run several times on the same model and batch: does it agree with itself, and does it keep its promise?

For each (model, batch) tune-k runs ``--runs`` times from scratch (sweep, path, measured checks). Printed
per run: the accepted schedule (or "not feasible"), its measured ATS/dense ratio with the 95% interval,
and the measured K = n_ref overhead; then how many runs gave the same answer. The models are the
architecture presets with the project's deterministic initialisation (latency does not depend on the
weights' values, only K' in dynamic mode does, and tune-k proposes static schedules).

    python benchmarks/tune_k_repeat.py [--models deit_tiny_patch16_224,deit_small_patch16_224] [--batches 1,8]
        [--ort-ops build/ats_ort/libats_sampler_ort.so]

``--ort-ops`` (default $ATS_ORT_OPS) times the ATS models with the sampler as one ONNX Runtime op per block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--check-reps", type=int, default=40)
    ap.add_argument("--ort-ops", type=Path, help="libats_sampler_ort.so (default $ATS_ORT_OPS)")
    ap.add_argument("--json", type=Path, help="also write every run's result here")
    args = ap.parse_args()

    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import preset
    from ats_deploy.reports.tune import tune_k

    rows = []
    for name in args.models.split(","):
        ck = default_checkpoint(cfg=preset(name))
        for b in [int(x) for x in args.batches.split(",")]:
            answers = []
            for run in range(args.runs):
                t0 = time.perf_counter()
                res = tune_k(
                    ck, batch=b, reps=args.reps, check_reps=args.check_reps, progress=False, ort_ops=args.ort_ops
                )
                secs = time.perf_counter() - t0
                ans = tuple(res.k_schedule) if res.feasible else "not feasible"
                answers.append(ans)
                o = res.overhead_ratio
                print(
                    f"{name} batch {b} run {run + 1}: "
                    + (f"K {list(res.k_schedule)}" if res.feasible else "not feasible")
                    + f", measured {res.measured_ratio:.3f} [{res.ratio_low:.3f}, {res.ratio_high:.3f}]"
                    f" after {len(res.checks)} check(s); K=n_ref overhead {o[0]:.3f} [{o[1]:.3f}, {o[2]:.3f}];"
                    f" {secs:.0f} s",
                    flush=True,
                )
                rows.append({"model": name, "batch": b, "run": run + 1, "seconds": round(secs, 1), **res.to_dict()})
            top, times = Counter(answers).most_common(1)[0]
            print(f"{name} batch {b}: {times}/{args.runs} runs agree on {top if top == 'not feasible' else list(top)}")
    env = environment()
    print("sampler:", rows[0]["sampler"] if rows else "-")
    print("env:", json.dumps(env))
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "env": env}, indent=1, default=str))


if __name__ == "__main__":
    main()
