"""Compare two backends' outputs: logits error, top-1 agreement, exact kept-set agreement, K' statistics.

Tolerances live here (the library owns them, like Polygraphy's per-output tolerances with a default
key), so the CLI, the tests and the on-device verify gate on the same numbers.

Near-boundary picks: docs/ATS_RULE.md lets implementations decide differently where the float64 rule itself is
within 1e-5 of a decision (a grid point on a CDF step, near-tied scores). When the reference carries
``near_boundary_<block>`` flags (``TorchRunner(boundary=True)``), an image whose first kept-set
difference is at a block flagged for that image is "excused": its differences are reported but left out
of the gates (from that block on its tokens, and so its logits, legitimately differ). Every other
difference counts, including one after an earlier flagged block that both sides decided alike. Gates
also fail when fewer than half of the images are left to judge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "Tolerances",
    "BlockStats",
    "ParityResult",
    "compare_outputs",
    "format_parity",
    "TOLERANCES",
    "NEAR_BOUNDARY",
]

NEAR_BOUNDARY = "near_boundary_"  # + block: the reference's per-image near-boundary flags, bool [B]


@dataclass(frozen=True)
class Tolerances:
    """Gates for one precision. ``logits_atol`` is the max abs error allowed on logits."""

    logits_atol: float = 1e-4
    top1_min: float = 1.0  # fraction of images whose top-1 class agrees
    kept_min: float = 0.995  # fraction of (image, block) pairs whose kept ids agree exactly (set and order)


TOLERANCES: dict[str, Tolerances] = {
    "default": Tolerances(),
    "fp32": Tolerances(),
    "fp16": Tolerances(logits_atol=5e-2, top1_min=0.99, kept_min=0.98),
    "int8": Tolerances(logits_atol=float("inf"), top1_min=0.97, kept_min=0.0),
}


@dataclass(frozen=True)
class BlockStats:
    """Kept tokens per image at one ATS block (K' excludes CLS and other prefix tokens)."""

    block: int
    kept_mean: float
    kept_min: int
    kept_p10: float
    kept_p90: float
    kept_max: int
    agreement: float  # fraction of images with identical kept ids in both backends


@dataclass(frozen=True)
class ParityResult:
    images: int
    logits_max_abs: float
    logits_max_rel: float
    top1_agreement: float
    kept_agreement: float
    kept_pairs: int
    kept_mismatches: int
    blocks: list[BlockStats] = field(default_factory=list)
    tolerances: Tolerances = field(default_factory=Tolerances)
    failures: list[str] = field(default_factory=list)
    # Images whose differences start at a near-boundary pick (see the module docstring); -1: not known
    # (the reference had no near-boundary flags). Gated figures leave these images out.
    excused_images: int = -1
    excused_mismatches: int = 0
    gated_logits_max_abs: float | None = None
    gated_top1_agreement: float | None = None
    gated_kept_agreement: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _kept_lists(tokens: np.ndarray, counts: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in tokens[i, : int(counts[i])]) for i in range(len(counts))]


def compare_outputs(
    ref: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    *,
    blocks: list[int] | tuple[int, ...],
    prefix_tokens: int = 1,
    tolerances: Tolerances | None = None,
) -> ParityResult:
    """Compare ``got`` against ``ref`` (both dicts of graph-named outputs over the same images)."""
    tol = tolerances or TOLERANCES["default"]
    a, b = ref["logits"].astype(np.float64), got["logits"].astype(np.float64)
    n = len(a)
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(a), 1e-6)).max()) if diff.size else 0.0
    agree = a.argmax(1) == b.argmax(1)
    top1 = float(np.mean(agree)) if n else 1.0
    flags_known = all(f"{NEAR_BOUNDARY}{blk}" in ref for blk in blocks)
    first_diff_excused = np.zeros(n, bool)
    differed = np.zeros(n, bool)
    stats: list[BlockStats] = []
    pairs = mismatches = 0
    same_by_block = []
    for blk in blocks:
        ra = _kept_lists(ref[f"tokens_{blk}"], ref[f"count_{blk}"])
        rb = _kept_lists(got[f"tokens_{blk}"], got[f"count_{blk}"])
        same = [x == y for x, y in zip(ra, rb)]
        same_by_block.append(np.asarray(same, bool))
        if flags_known:
            new = ~same_by_block[-1] & ~differed
            first_diff_excused |= new & np.asarray(ref[f"{NEAR_BOUNDARY}{blk}"], bool)[:n]
            differed |= new
        pairs += len(same)
        mismatches += len(same) - sum(same)
        k = np.asarray(ref[f"count_{blk}"], dtype=np.int64) - prefix_tokens
        stats.append(
            BlockStats(
                block=int(blk),
                kept_mean=float(k.mean()),
                kept_min=int(k.min()),
                kept_p10=float(np.percentile(k, 10)),
                kept_p90=float(np.percentile(k, 90)),
                kept_max=int(k.max()),
                agreement=float(np.mean(same)) if same else 1.0,
            )
        )
    kept = 1.0 - mismatches / pairs if pairs else 1.0
    judged = ~first_diff_excused
    g_abs, g_top1, g_kept = max_abs, top1, kept
    excused_mm = 0
    if flags_known and first_diff_excused.any():
        excused_mm = int((~np.stack(same_by_block)[:, first_diff_excused]).sum())
        g_abs = float(diff[judged].max()) if judged.any() and diff.size else 0.0
        g_top1 = float(np.mean(agree[judged])) if judged.any() else 1.0
        g_pairs = pairs - len(blocks) * int(first_diff_excused.sum())
        g_kept = 1.0 - (mismatches - excused_mm) / g_pairs if g_pairs else 1.0
    failures = []
    what = " (near-boundary images left out)" if excused_mm else ""
    if not g_abs <= tol.logits_atol:
        failures.append(f"logits max abs error {g_abs:.3g} > {tol.logits_atol:.3g}{what}")
    if g_top1 < tol.top1_min:
        failures.append(f"top-1 agreement {g_top1:.2%} < {tol.top1_min:.2%}{what}")
    if g_kept < tol.kept_min:
        failures.append(f"kept-set agreement {g_kept:.2%} < {tol.kept_min:.2%}{what}")
    if n and judged.sum() * 2 < n:
        failures.append(
            f"only {int(judged.sum())} of {n} images are free of near-boundary picks: too few to judge; "
            "pass other inputs (--inputs) or more of them"
        )
    return ParityResult(
        n,
        max_abs,
        max_rel,
        top1,
        kept,
        pairs,
        mismatches,
        stats,
        tol,
        failures,
        excused_images=int(first_diff_excused.sum()) if flags_known else -1,
        excused_mismatches=excused_mm,
        gated_logits_max_abs=g_abs,
        gated_top1_agreement=g_top1,
        gated_kept_agreement=g_kept,
    )


def format_parity(res: ParityResult, *, title: str = "parity") -> str:
    """Human-readable summary (plain text, one screen)."""
    lines = [
        f"{title}: {res.images} images, {'PASS' if res.passed else 'FAIL'}",
        f"  logits   max abs {res.logits_max_abs:.3g}  max rel {res.logits_max_rel:.3g}"
        f"  (gate {res.tolerances.logits_atol:.3g})",
        f"  top-1    agreement {res.top1_agreement:.2%}  (gate {res.tolerances.top1_min:.2%})",
        f"  kept     agreement {res.kept_agreement:.2%} of {res.kept_pairs} (image, block) pairs, "
        f"{res.kept_mismatches} differ  (gate {res.tolerances.kept_min:.2%})",
    ]
    if res.excused_images > 0:
        lines.append(
            f"  near-boundary: {res.excused_images} image(s) first differ at a pick docs/ATS_RULE.md leaves open "
            f"({res.excused_mismatches} pairs)\n"
            f"  gated on the other images: logits max abs {res.gated_logits_max_abs:.3g}, "
            f"top-1 {res.gated_top1_agreement:.2%}, kept {res.gated_kept_agreement:.2%}"
        )
    if res.blocks:
        lines.append("  block  K' mean   min   p10   p90   max  agree")
        for s in res.blocks:
            lines.append(
                f"  {s.block:>5}  {s.kept_mean:7.1f} {s.kept_min:5d} {s.kept_p10:5.0f} {s.kept_p90:5.0f}"
                f" {s.kept_max:5d}  {s.agreement:6.1%}"
            )
    for f in res.failures:
        lines.append(f"  FAILED: {f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ExportSetup:
    """What a parity run needs from an export directory: manifest, inputs, ATS config and weights."""

    manifest: dict
    pixels: np.ndarray
    label: str
    batch: int | None
    ats: object  # ATSConfig (kept untyped here so this module imports without the model package)
    checkpoint: object  # LoadedCheckpoint
    prefix_tokens: int


def load_export_setup(out_dir, *, inputs=None, count: int = 16, seed: int = 1, model=None, trust_pickle=False):
    """Manifest, held-out inputs (``inputs``, or ``count`` of :func:`default_inputs`, padded to whole static
    batches), ATS config and the exported weights of an export directory."""
    from ..calibration.data import Preprocess, default_inputs, load_inputs
    from ..exporters.export import checkpoint_from_manifest, read_manifest
    from ..model.config import ATSConfig

    man = read_manifest(out_dir)
    pre = Preprocess.from_dict(man["preprocessing"])
    if inputs is not None:
        x, _ = load_inputs(inputs, pre)
        label = f"{len(x)} inputs from {inputs}"
    else:
        x, label = default_inputs(man["model"].get("source"), count, pre, seed=seed)
    batch = man["graph"]["batch"]
    if batch and len(x) % batch:
        x = np.concatenate([x, x[: batch - len(x) % batch]])  # pad with repeats to whole batches
    a = man["ats"]
    ats = ATSConfig(blocks=tuple(a["blocks"]), k_schedule=tuple(a["k_schedule"]), shape_mode=a["shape_mode"])
    ck = checkpoint_from_manifest(man, model=model, trust_pickle=trust_pickle)
    return ExportSetup(man, x, label, batch, ats, ck, int(a.get("prefix_tokens", 1)))


def run_parity(
    out_dir,
    *,
    inputs=None,
    count: int = 16,
    model=None,
    trust_pickle: bool = False,
    seed: int = 1,
) -> tuple[ParityResult, dict]:
    """PyTorch vs ONNX Runtime on an export directory (random inputs unless ``inputs`` is given)."""
    from pathlib import Path

    from ..errors import InputError
    from ..exporters.export import read_manifest, sha256_file
    from ..runtime.ort_runner import OrtRunner, run_batched
    from ..runtime.torch_runner import TorchRunner

    out = Path(out_dir)
    man = read_manifest(out)
    onnx_path = out / "model.onnx"
    if not onnx_path.exists():
        raise InputError(f"{onnx_path} is missing; re-run ats-deploy export -o {out}")
    want = man["artifacts"].get("model.onnx", {}).get("sha256")
    if want and sha256_file(onnx_path) != want:
        raise InputError(f"{onnx_path} does not match its manifest (sha256); re-run ats-deploy export -o {out}")
    st = load_export_setup(out, inputs=inputs, count=count, seed=seed, model=model, trust_pickle=trust_pickle)
    with TorchRunner(st.checkpoint, st.ats, boundary=True) as tr:
        ref = run_batched(tr, st.pixels, st.batch)
    with OrtRunner(onnx_path) as orr:
        got = run_batched(orr, st.pixels, st.batch)
    res = compare_outputs(ref, got, blocks=st.ats.blocks, prefix_tokens=st.prefix_tokens)
    return res, {"inputs": st.label, "backend": "onnxruntime", "reference": "torch", "onnx": str(onnx_path)}
