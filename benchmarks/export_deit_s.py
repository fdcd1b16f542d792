"""DeiT-S export: wall time and peak memory of `ats-deploy export` (targets: < 60 s, < 4 GB).

Runs the real CLI in a child process on a seeded DeiT-S-shaped checkpoint (paper setting: ATS blocks
3..11, K = 197) and reads the child's peak RSS from the kernel (getrusage of children). The export
includes the PyTorch vs ONNX Runtime parity check on 8 inputs, as a user would run it.

    python benchmarks/export_deit_s.py [--max-k 197] [--parity-inputs 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-k", default="197")
    ap.add_argument("--parity-inputs", default="8")
    args = ap.parse_args()
    import torch

    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.model.presets import deit_small_patch16_224

    with tempfile.TemporaryDirectory() as tmp:
        ck = default_checkpoint(cfg=deit_small_patch16_224())
        pt = Path(tmp) / "deit_s.pth"
        torch.save({"model": {k: torch.from_numpy(v) for k, v in ck.state_dict.items()}}, pt)
        cmd = [sys.executable, "-m", "ats_deploy.cli", "export", str(pt), "--max-k", args.max_k, "-o", f"{tmp}/out"]
        cmd += ["--parity-inputs", args.parity_inputs, "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
        if proc.returncode:
            print(proc.stdout, proc.stderr)
            raise SystemExit(proc.returncode)
        res = json.loads(proc.stdout)
        size_mb = (Path(tmp) / "out" / "model.onnx").stat().st_size / 1e6
    parity = res["manifest"]["parity"]
    print(
        f"DeiT-S export (K={args.max_k}, parity on {args.parity_inputs} inputs): wall {wall:.1f} s (target < 60 s), "
        f"peak RSS {peak_gb:.2f} GB (target < 4 GB), model.onnx {size_mb:.0f} MB"
    )
    print(
        f"  in-process time {res['seconds']:.1f} s; parity logits max abs {parity['logits_max_abs']:.2e}, "
        f"top-1 {parity['top1_agreement']:.0%}, kept {parity['kept_agreement']:.1%}"
    )
    print(f"  ratios to target: time {wall / 60:.2f}, memory {peak_gb / 4:.2f}")
    print("  env:", json.dumps(environment()))


if __name__ == "__main__":
    main()
