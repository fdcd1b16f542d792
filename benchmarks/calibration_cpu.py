"""INT8 calibration on CPU: wall time for N images on a DeiT-S-shaped model (target: 512 images < 10 min).

Builds the seeded DeiT-S-shaped model (paper setting: ATS blocks 3..11, K = 197), exports its float32
graph, and times :func:`ats_deploy.calibration.int8.calibrate` end to end (ONNX Runtime forward passes
with the MatMul inputs as outputs, histograms, thresholds, Q/DQ graph) on random-normal 224x224 inputs.
With ``--parity N`` it also prints fp16 and int8 vs the fp32 PyTorch model on N held-out inputs.

    python benchmarks/calibration_cpu.py [--images 512] [--method entropy] [--model deit_s|default] [--parity 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--method", default="entropy", choices=["entropy", "max", "percentile"])
    ap.add_argument("--model", default="deit_s", choices=["deit_s", "default"])
    ap.add_argument("--batch", type=int, default=16, help="calibration batch (the graph has a dynamic batch)")
    ap.add_argument("--parity", type=int, default=0, help="held-out inputs for fp16/int8 vs fp32 PyTorch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import onnx

    from ats_deploy.calibration.fp16 import convert_to_fp16
    from ats_deploy.calibration.int8 import calibrate, quantize_int8
    from ats_deploy.calibration.precision import compare_precision, format_precision_parity
    from ats_deploy.exporters.onnx import GraphOptions, build_graph
    from ats_deploy.inputs import Preprocess, random_inputs
    from ats_deploy.model.config import resolve_ats
    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import deit_small_patch16_224

    ck = default_checkpoint(cfg=deit_small_patch16_224()) if args.model == "deit_s" else default_checkpoint()
    ats = resolve_ats(ck.config)
    pre = Preprocess(size=ck.config.img_size)
    fp32 = build_graph(ck.config, ck.state_dict, ats, GraphOptions(dynamic_batch=True))
    data = random_inputs(args.images, pre, seed=1234)
    figures: dict = {"model": ck.source, "shape": args.model, "images": args.images, "method": args.method}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(fp32, path)
        t0 = time.perf_counter()
        res = calibrate(path, data, method=args.method, output=Path(tmp) / "model.int8.onnx", batch_size=args.batch)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        calibrate(path, data, method=args.method, batch_size=args.batch, progress=False)  # cache hit
        figures |= {
            "calibrate_s": round(total, 1),
            "per_image_ms": round(total / args.images * 1e3, 1),
            "cache_hit_s": round(time.perf_counter() - t1, 2),
            "extrapolated_512_s": round(total / args.images * 512, 1),
        }
        amax = res.amax
    if args.parity:
        from ats_deploy.runtime.ort_runner import OrtRunner
        from ats_deploy.runtime.torch_runner import TorchRunner

        x = random_inputs(args.parity, pre, seed=99)  # held out: not the calibration seed
        with TorchRunner(ck, ats) as t:
            ref = t.infer({"pixels": x})
        for name, m in (("fp16", convert_to_fp16(fp32)[0]), ("int8", quantize_int8(fp32, amax))):
            with OrtRunner(m.SerializeToString()) as r:
                got = r.infer({"pixels": x})
            p = compare_precision(ref, got, precision=name, blocks=ats.blocks)
            figures[f"{name}_vs_fp32"] = {
                "top1_agreement": p.base.top1_agreement,
                "logits_cosine_mean": round(p.logits_cosine_mean, 5),
                "kept_exact_agreement": p.base.kept_agreement,
                "kept_set_agreement": p.kept_set_agreement,
                "flipped_tokens_per_image_mean": round(sum(p.flips_per_image) / len(p.flips_per_image), 2),
            }
            if not args.json:
                print(format_precision_parity(p, title=f"{name} vs fp32 PyTorch ({args.parity} held-out inputs)"))
    figures["environment"] = environment()
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"calibration ({args.method}, {args.images} images, {args.model}): {figures['calibrate_s']} s"
            f" = {figures['per_image_ms']} ms/image -> {figures['extrapolated_512_s']} s for 512"
            f" (target < 600 s); cache hit {figures['cache_hit_s']} s"
        )
        print("versions: " + ", ".join(f"{k} {v}" for k, v in figures["environment"].items()))


if __name__ == "__main__":
    main()
