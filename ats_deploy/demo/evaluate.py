"""Top-1 of a shapes model dense vs with ATS on held-out generated images, with K' and GFLOPs.

Settings (default): dense; ATS in the paper's placement (blocks 3..11 of 12) with K = n_ref (197 at
224/16: the authors' setting, compute falls only through K'); the same with K = 99 (static shapes then
process at most 99 slots per ATS block). GFLOPs per image follow ``reports/flops.py``: "adaptive" is
the paper's number (mean over images of the FLOPs of the tokens really kept, what the dynamic shape
mode approaches), "static" is what a static-shape engine computes.

The held-out images use ``HELDOUT_SEED``, which training never draws from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ..model.checkpoints import LoadedCheckpoint
from ..model.config import ATSConfig, resolve_ats
from ..reports.flops import gflops_per_image, static_gflops
from .shapes import CLASSES, DEFAULT_SCALE, HELDOUT_SEED, ShapesDataset

__all__ = [
    "SettingResult",
    "EvalReport",
    "evaluate",
    "ats_settings",
    "check_max_ks",
    "render_report",
    "token_work",
    "object_recall",
    "OBJECT_COVER",
]

# A patch counts as part of the object when the rendered object covers at least half of it.
OBJECT_COVER = 0.5


@dataclass
class SettingResult:
    name: str
    ats: dict
    top1: float  # percent
    agreement: float  # percent of images whose prediction equals the dense model's
    gflops_adaptive: float  # mean per image from the kept counts (the paper's measure)
    gflops_static: float  # the static-shape graph's work per image
    mean_kept: dict[int, float] = field(default_factory=dict)  # ATS block -> mean K' (patches kept, CLS not counted)
    per_class_top1: list[float] = field(default_factory=list)
    # Tokens the 12 blocks carry (each block's output rows, the rows its proj and MLP process), summed and
    # divided by the dense model's depth x token count: 1.0 dense. Data-dependent, from the kept counts.
    token_work: float = 1.0
    # ATS block -> mean over images of the fraction of the object's patches (covered >= OBJECT_COVER by
    # the rendered object) still kept after that block; 1.0 for the dense model.
    object_recall: dict[int, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    source: str
    images: int
    seed: int
    img_size: int
    settings: list[SettingResult]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "images": self.images,
            "seed": self.seed,
            "img_size": self.img_size,
            "classes": list(CLASSES),
            "settings": [asdict(s) for s in self.settings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_max_ks(cfg, max_ks) -> None:
    """Refuse a K the user asked for that this model cannot use (below 2 or above its token count n_ref),
    with the valid range; :func:`ats_settings` leaves such a K out silently (the default 99 on small models)."""
    for k in max_ks:
        if k is not None:
            resolve_ats(cfg, max_k=int(k))  # ConfigError: "--max-k K is above the token count ...; use 2..n_ref"


def ats_settings(cfg, max_ks=(None, 99), blocks=None) -> list[tuple[str, ATSConfig]]:
    """dense plus one ATS setting per K in ``max_ks`` (None = n_ref); K above n_ref is left out."""
    out = [("dense", ATSConfig())]
    for k in max_ks:
        if k is not None and int(k) > cfg.n_ref:
            continue
        ats = resolve_ats(cfg, blocks=blocks, max_k=k)
        blk = ats.blocks
        span = f"{blk[0]}..{blk[-1]}" if blk == tuple(range(blk[0], blk[-1] + 1)) else ",".join(map(str, blk))
        out.append((f"ATS blocks {span}, K={ats.k_schedule[0]}", ats))
    return out


def evaluate(
    ckpt: LoadedCheckpoint,
    *,
    images: int = 2000,
    seed: int = HELDOUT_SEED,
    batch_size: int = 50,
    max_ks=(None, 99),
    blocks=None,
    device: str = "cpu",
    scale: tuple[float, float] = DEFAULT_SCALE,
    progress: bool = True,
) -> EvalReport:
    """Evaluate every setting on the same ``images`` held-out images (each batch generated once)."""
    import sys

    import torch
    from rich.progress import Progress

    from ..model import build_model
    from .train import _resolve_device

    device = _resolve_device(device, auto=False)  # cpu, cuda, cuda:N (one-line ConfigError otherwise)
    cfg = ckpt.config
    settings = ats_settings(cfg, max_ks, blocks)
    dense = build_model(ckpt).to(device)
    models = [(name, ats, dense if not ats.enabled else dense.with_ats(ats).to(device)) for name, ats in settings]
    ds = ShapesDataset(seed, images, cfg.img_size, scale=scale, mean=cfg.mean, std=cfg.std)
    labels = np.empty(images, np.int64)
    preds = {name: np.empty(images, np.int64) for name, _, _ in models}
    counts: dict[str, dict[int, list[np.ndarray]]] = {name: {b: [] for b in ats.blocks} for name, ats, _ in models}
    recall: dict[str, dict[int, list[np.ndarray]]] = {name: {b: [] for b in ats.blocks} for name, ats, _ in models}
    prefix = cfg.num_prefix_tokens
    with Progress(disable=not progress or not sys.stderr.isatty(), transient=True) as prog, torch.inference_mode():
        task = prog.add_task(f"evaluating {len(models)} settings", total=images)
        for s in range(0, images, batch_size):
            n = min(batch_size, images - s)
            x, y, tok = ds.batch_with_tokens(s, n, cfg.patch_size, threshold=OBJECT_COVER)
            obj = tok != len(CLASSES)  # [n, patches]: the object's patches
            labels[s : s + n] = y
            xt = torch.from_numpy(x).to(device)
            for name, ats, model in models:
                out = model.forward_trace(xt)
                preds[name][s : s + n] = out.logits.argmax(-1).cpu().numpy()
                for b, c, ids in zip(ats.blocks, out.counts, out.token_ids):
                    c = c.cpu().numpy()
                    counts[name][b].append(c)
                    recall[name][b].append(object_recall(ids.cpu().numpy(), c, obj, prefix))
            prog.advance(task, n)
    ref = preds["dense"]
    results = []
    for name, ats, _ in models:
        p = preds[name]
        per_class = [
            float(100 * (p[labels == c] == c).mean()) if (labels == c).any() else float("nan")
            for c in range(len(CLASSES))
        ]
        cnt = {b: np.concatenate(v) for b, v in counts[name].items()}
        static = static_gflops(cfg, ats)
        adaptive = float(gflops_per_image(cfg, ats, cnt).mean()) if ats.enabled else static
        results.append(
            SettingResult(
                name=name,
                ats=ats.to_dict(),
                top1=float(100 * (p == labels).mean()),
                agreement=float(100 * (p == ref).mean()),
                gflops_adaptive=adaptive,
                gflops_static=static,
                mean_kept={int(b): float(v.mean() - prefix) for b, v in cnt.items()},
                per_class_top1=per_class,
                token_work=token_work(cfg, ats, cnt),
                object_recall={int(b): float(np.nanmean(np.concatenate(v))) for b, v in recall[name].items()},
            )
        )
    return EvalReport(ckpt.source, images, seed, cfg.img_size, results)


def object_recall(token_ids: np.ndarray, counts: np.ndarray, obj: np.ndarray, prefix: int = 1) -> np.ndarray:
    """Per image, the fraction of its object patches (``obj`` bool [B, patches]) among the kept token ids
    (``token_ids`` [B, slots] original ids, the first ``counts`` valid); NaN for an image with none."""
    b, patches = obj.shape
    kept = np.zeros((b, patches), bool)
    for i in range(b):
        ids = token_ids[i, : int(counts[i])] - prefix
        kept[i, ids[ids >= 0]] = True
    total = obj.sum(1)
    hit = (obj & kept).sum(1)
    return np.where(total > 0, hit / np.maximum(total, 1), np.nan)


def token_work(cfg, ats: ATSConfig, counts: dict[int, np.ndarray]) -> float:
    """Mean over images of the tokens the blocks carry (each block's output rows), relative to dense.

    A block before the first ATS block carries all ``n_ref`` tokens; an ATS block carries its kept count
    (1 + K', prefix included) and so does every later non-ATS block until the next ATS block.
    """
    n = float(cfg.num_tokens)
    if not ats.enabled:
        return 1.0
    current = np.full(len(next(iter(counts.values()))), n)
    total = np.zeros_like(current)
    for blk in range(cfg.depth):
        if blk in counts:
            current = counts[blk].astype(np.float64)
        total += current
    return float((total / (cfg.depth * n)).mean())


def render_report(report: EvalReport) -> str:
    """A plain-text table (what ``ats-deploy demo eval`` prints)."""
    lines = [
        f"{report.source}: {report.images} held-out shapes images (seed {report.seed}, {report.img_size}px)",
        f"{'setting':32s} {'top-1 %':>8s} {'= dense %':>9s} {'GFLOPs':>7s} {'static':>7s} {'work':>5s} "
        f"{'recall':>6s}  mean K' per ATS block",
    ]
    for s in report.settings:
        kept = " ".join(f"{v:.0f}" for v in s.mean_kept.values()) or "-"
        rec = f"{list(s.object_recall.values())[-1]:6.3f}" if s.object_recall else f"{'-':>6s}"
        lines.append(
            f"{s.name:32s} {s.top1:8.2f} {s.agreement:9.2f} {s.gflops_adaptive:7.3f} {s.gflops_static:7.3f} "
            f"{s.token_work:5.3f} {rec}  {kept}"
        )
    lines.append(
        "work: tokens carried by the blocks relative to dense (from K'); recall: fraction of the object's "
        f"patches (>= {OBJECT_COVER:.0%} covered) kept at the last ATS block"
    )
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    """``python -m ats_deploy.demo.evaluate WEIGHTS [--images 2000] [--max-k 99] [--json out.json]``."""
    import argparse
    from pathlib import Path

    from .weights import DEMO_WEIGHTS

    p = argparse.ArgumentParser(description="dense vs ATS top-1, K' and GFLOPs on held-out shapes images")
    p.add_argument("weights", nargs="?", default=str(DEMO_WEIGHTS))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=HELDOUT_SEED)
    p.add_argument("--max-k", type=int, action="append", help="K of an extra ATS setting (repeatable; default 99)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from ..errors import AtsDeployError

    try:
        return _run_main(a)
    except AtsDeployError as exc:  # bad input: one line (argparse's usage error), no traceback
        p.error(str(exc).splitlines()[0])


def _run_main(a) -> int:
    from pathlib import Path

    from ..model.checkpoints import load_checkpoint
    from .weights import load_demo_checkpoint

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    w = Path(a.weights)
    ck = load_demo_checkpoint(w) if w.suffix == ".safetensors" else load_checkpoint(w)
    check_max_ks(ck.config, a.max_k or [])
    rep = evaluate(
        ck, images=a.images, seed=a.seed, batch_size=a.batch_size, max_ks=(None, *(a.max_k or [99])), device=a.device
    )
    print(render_report(rep))
    if a.json:
        a.json.write_text(rep.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
