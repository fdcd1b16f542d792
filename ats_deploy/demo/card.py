"""Ship a training run as the demo weights: fp16 safetensors plus a model card filled from the run itself.

Every number on the card comes from the run directory (``train.log``: the recipe, the wall time, the
held-out curve) or from evaluating the shipped fp16 file (:func:`evaluate.evaluate`); nothing is typed
in by hand. ``ats-deploy demo ship RUN_DIR`` (or ``python -m ats_deploy.demo.card RUN_DIR``) does it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..model.config import ViTConfig
from .evaluate import OBJECT_COVER, EvalReport
from .shapes import CLASSES, DEFAULT_SCALE, HELDOUT_SEED, TRAIN_SEED
from .weights import DEMO_WEIGHTS

__all__ = ["RunLog", "read_run_log", "render_card", "ship_run", "machine_description"]


@dataclass(frozen=True)
class RunLog:
    """What a training run's ``train.log`` says about it."""

    config: dict
    argv: str  # the command line that started the run, as logged ("" in logs that predate it)
    torch: str
    threads: int
    wall_s: float
    steps: int
    curve: list[dict]  # one record per held-out check: global_step, phase, img_size, images, heldout_top1
    img_per_s: dict[int, float]  # image size -> median training images/s
    init_sha256: str | None = None  # the --init weights' sha256 when the run (last) started


def read_run_log(run_dir: str | Path) -> RunLog:
    """Parse ``run_dir/train.log``; refuses a run that did not finish or was resumed from another recipe."""
    path = Path(run_dir) / "train.log"
    if not path.is_file():
        raise InputError(f"{path} is missing; pass the --out directory of a finished `ats-deploy demo train` run")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
    if not starts:
        raise InputError(f"{path} has no start record; it is not a training log")
    recs = recs[starts[-1] :]  # the last run in this directory (earlier ones were restarted with --no-resume)
    done = [r for r in recs if r.get("event") == "done"]
    if not done:
        raise InputError(f"{path}: the run has not finished (no 'done' record); let it finish or resume it")
    config = json.loads(recs[0]["config"])
    bs = int(config["batch_size"])
    curve, speed = [], {}
    for r in recs:
        if r.get("event") != "train":
            continue
        speed.setdefault(int(r["img_size"]), []).append(float(r["img_per_s"]))
        if "heldout_top1" in r:
            curve.append(
                {
                    "global_step": int(r["global_step"]),
                    "phase": int(r["phase"]),
                    "img_size": int(r["img_size"]),
                    "images": int(r["global_step"]) * bs,
                    "heldout_top1": float(r["heldout_top1"]),
                    "heldout_top1_ats": float(r["heldout_top1_ats"]) if "heldout_top1_ats" in r else None,
                }
            )
    import statistics

    # Wall time: the training itself, summed over the run's segments (a resumed or extended run has idle
    # time between its segments that is not training).
    wall, seg_start = 0.0, recs[0]["time"]
    for prev, r in zip(recs, recs[1:]):
        if r.get("event") == "resume":
            wall += prev["time"] - seg_start
            seg_start = r["time"]
    wall += done[-1]["time"] - seg_start
    resumes = [r for r in recs if r.get("event") == "resume" and r.get("argv")]
    return RunLog(
        config=json.loads(resumes[-1]["config"]) if resumes and "config" in resumes[-1] else config,
        argv=str((resumes[-1] if resumes else recs[0]).get("argv", "")),
        torch=str(recs[0].get("torch", "?")),
        threads=int(recs[0].get("threads", 0)),
        wall_s=float(wall),
        steps=int(done[-1]["global_step"]),
        curve=curve,
        img_per_s={k: statistics.median(v) for k, v in sorted(speed.items())},
        init_sha256=(resumes[-1] if resumes else recs[0]).get("init_sha256"),
    )


def machine_description() -> str:
    """CPU model and core count (Linux /proc/cpuinfo; the platform string elsewhere)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def _phases(config: dict) -> str:
    rows = [
        "| phase | image size | steps | images | peak lr | warm-up steps | ATS steps | attention guidance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bs = int(config["batch_size"])
    for i, p in enumerate(config["phases"]):
        every = int(p.get("ats_every", 2))
        ats = {1: "every step", 2: "every other"}.get(every, f"1 in {every}") if p.get("ats") else "none"
        guide = f"weight {p['guide']:g}" if p.get("guide") else "-"
        rows.append(
            f"| {i} | {p['img_size']} | {p['steps']} | {p['steps'] * bs:,} | {p['lr']:g} | {p['warmup']} "
            f"| {ats} | {guide} |"
        )
    return "\n".join(rows)


def _amp(amp: str) -> str:
    return "bf16 autocast" if amp == "bf16" else "float32 (no autocast)"


def base_training_section(init: str | Path, sha256: str | None = None) -> str | None:
    """The "## Training" section of the card beside ``init`` when that card describes exactly that file
    (its sha256 line matches; with ``sha256``, also the bytes the run started from), so a card of weights
    fine-tuned from shipped ones keeps their history."""
    from .weights import sha256_of

    init = Path(init)
    card = init.parent / "MODEL_CARD.md"
    if not (init.is_file() and card.is_file()):
        return None
    lines = card.read_text().splitlines()
    now = sha256_of(init)
    if f"- sha256: `{now}`" not in lines or (sha256 is not None and sha256 != now):
        return None
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    start = next((i for i in heads if lines[i].startswith("## Training")), None)
    if start is None:
        return None
    end = next((i for i in heads if i > start and not lines[i].startswith("## Training")), len(lines))
    return "\n".join(lines[start:end]).rstrip()


def render_card(
    *,
    sha256: str,
    command: str,
    log: RunLog,
    report: EvalReport,
    machine: str,
    eval_command: str,
    base: str | None = None,
    init_sha256: str | None = None,
    model: ViTConfig,
    params: int,
    file_name: str,
) -> str:
    """The model card (markdown) for the shipped weights; ``base``: the training section of the card of
    the weights the run started from (``--init``), kept as the first stage of the history; ``model``,
    ``params`` and ``file_name``: the shipped file's architecture, parameter count and name."""
    cfg = log.config
    stage = None
    if cfg.get("init"):
        what = "no card of them was found"
        if base is not None:  # a base that is already a history ends with its last stage: the one above
            what = "the stage above" if "## Training, last stage (" in base else "the first stage above"
        stage = f"- Started (`--init`) from weights with sha256 `{init_sha256 or '?'}` ({what})."
    title = "## Training" + (", last stage" if base is not None else "") + " (`ats_deploy/demo/train.py`)"
    guided = [p for p in cfg["phases"] if p.get("guide")]
    guidance = (
        f", attention guidance in the guided ATS phases ({cfg.get('guide_background', 0):.0%} of the target on "
        "background patches)"
        if guided
        else ""
    )
    dense = report.settings[0]
    name, arch = _architecture(model, params)
    lines = [
        f"# {Path(file_name).stem}: {name} trained on procedural shapes (model card)",
        "",
        "Generated by `ats-deploy demo ship` from the training run's log and an evaluation of this very file;",
        "no figure here was typed in by hand.",
        "",
        "## Model",
        "",
        f"- Architecture: {arch},",
        f"  {len(CLASSES)} classes, 224 x 224 input, ImageNet mean/std normalisation, timm key names.",
        f"- File: `{file_name}`, float16 on disk (cast to float32 by `load_demo_checkpoint()`);",
        "  metadata `num_heads`, `img_size`, `train_config` (the whole recipe as JSON), `global_step`.",
        f"- sha256: `{sha256}`",
        "",
        "## Data (`ats_deploy/demo/shapes.py`)",
        "",
        f"- Classes: {', '.join(CLASSES)}.",
        f"- One object per image, bounding-disc diameter {DEFAULT_SCALE[0]:.2f}-{DEFAULT_SCALE[1]:.2f} of the side",
        "  (mean object area about 8.7% of the image: most tokens are background), random position, colour,",
        "  rotation and aspect; cluttered backgrounds with distractors and pixel noise.",
        f"- Every image is fixed by (seed, index). Training: seed {TRAIN_SEED}, sample `step * batch + j`, never",
        f"  repeated. Held-out: seed {HELDOUT_SEED} (never drawn by training); the held-out curve below uses",
        "  indices from 10,000,000 on, the evaluation indices from 0.",
        "",
    ]
    if base is not None:
        lines += [_demote(base, "first stage"), ""]
    lines += [
        title,
        "",
        *([stage] if stage else []),
        f"- Command: `{command}`",
        f"- Machine: {machine}; torch {log.torch}, {log.threads} threads, no GPU.",
        f"- Wall time: {log.wall_s / 60:.1f} minutes for {log.steps:,} steps "
        f"({log.steps * int(cfg['batch_size']):,} images); training speed (median images/s): "
        + ", ".join(f"{v:.0f} at {k} px" for k, v in log.img_per_s.items())
        + ".",
        f"- Recipe: AdamW (weight decay {cfg['weight_decay']}), batch {cfg['batch_size']}, linear warm-up then "
        f"cosine to {cfg['min_lr']:g} per phase, label smoothing {cfg['label_smoothing']}, gradient clip "
        f"{cfg['clip_grad']}, {_amp(cfg['amp'])}, token labelling weight {cfg['token_label']} (patches "
        f"covered >= {cfg['token_threshold']:.0%} by the object labelled with its class), position "
        f"embedding resized bicubically between phases{guidance}.",
        "",
        _phases(cfg),
        "",
        f"Held-out top-1 during training ({cfg.get('eval_images', 500)} monitoring images at the phase's "
        "resolution; ATS phases also through ATS in the paper's placement):",
        "",
        "| step | phase | image size | images seen | held-out top-1 % | with ATS % |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['global_step']} | {c['phase']} | {c['img_size']} | {c['images']:,} | {c['heldout_top1']:.1f} | "
        + ("-" if c.get("heldout_top1_ats") is None else f"{c['heldout_top1_ats']:.1f}")
        + " |"
        for c in log.curve
    ]
    lines += [
        "",
        f"## Accuracy and token savings ({report.images:,} held-out images, seed {report.seed}, {report.img_size} px)",
        "",
        f"Command: `{eval_command}`",
        "",
        "| setting | top-1 % | same as dense % | GFLOPs/img (from K') | GFLOPs/img (static) | token work |"
        " object-patch recall, last ATS block | mean K' per ATS block |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report.settings:
        recall = f"{list(s.object_recall.values())[-1]:.3f}" if s.object_recall else "-"
        kept = " ".join(f"{v:.0f}" for v in s.mean_kept.values()) or "-"
        lines.append(
            f"| {s.name} | {s.top1:.2f} | {s.agreement:.2f} | {s.gflops_adaptive:.3f} | {s.gflops_static:.3f} "
            f"| {s.token_work:.3f} | {recall} | {kept} |"
        )
    lines += [
        "",
        "Dense per-class top-1 %: "
        + ", ".join(f"{c} {v:.1f}" for c, v in zip(CLASSES, dense.per_class_top1))
        + ".",
        "",
        "Token work: the rows the 12 blocks carry (each block's output tokens), summed over blocks and images,",
        "relative to the dense model (1.0). Object-patch recall: the fraction of the object's patches (covered",
        f">= {OBJECT_COVER:.0%} by the rendered object) still among the kept tokens after the last ATS block.",
        "GFLOPs follow `ats_deploy/reports/flops.py` (multiply-accumulates of the matrix products).",
        "",
        "## Limits",
        "",
        "Synthetic data only: the model recognises these ten drawn shapes and nothing else. It exists so that",
        "the toolchain's accuracy, K', fp16/int8 and latency reports have a real trained model to measure.",
        "",
    ]
    return "\n".join(lines)


def _architecture(model: ViTConfig, params: int) -> tuple[str, str]:
    """(short name, the card's architecture line) of the shipped model."""
    shape = f"embed {model.embed_dim}, depth {model.depth}, {model.num_heads} heads, {params:,} parameters"
    deit_ti_shape = model.depth == 12 and model.patch_size == 16 and model.num_heads == model.embed_dim // 64
    if deit_ti_shape and model.embed_dim == 192:
        return "DeiT-Ti", f"DeiT-Ti/16 (`deit_tiny_patch16_224`: {shape})"
    if deit_ti_shape:
        return (
            f"DeiT-Ti-shaped ViT, width {model.embed_dim}",
            f"DeiT-Ti/16's shape at width {model.embed_dim} (`demo train --width {model.embed_dim}`: {shape})",
        )
    return f"ViT/{model.patch_size}", f"ViT/{model.patch_size} ({shape})"


def _demote(section: str, what: str) -> str:
    """A card's "## Training ..." section as this card's first stage."""
    first, _, rest = section.partition("\n")
    if first.startswith("## Training ("):
        return f"## Training, {what}: the starting weights" + first[len("## Training") :] + "\n" + rest
    # Already a history of stages: its last stage becomes an earlier one.
    return section.replace("## Training, last stage (", "## Training, earlier stage (")


def ship_run(
    run_dir: str | Path,
    *,
    command: str | None = None,
    dst: str | Path | None = None,
    images: int = 2000,
    progress: bool = True,
) -> tuple[Path, Path, EvalReport]:
    """Export ``run_dir/final.safetensors`` as the fp16 demo weights, evaluate that file on ``images``
    held-out images and write ``MODEL_CARD.md`` beside it. Returns (weights, card, report).

    ``command`` is the training command shown on the card (default: the one the log recorded)."""
    from .evaluate import evaluate
    from .weights import export_demo_weights, load_demo_checkpoint, sha256_of

    run = Path(run_dir)
    log = read_run_log(run)
    command = command or log.argv
    if not command:
        raise InputError(f"{run}/train.log does not record its command line; pass --command 'the training command'")
    final = run / "final.safetensors"
    if not final.is_file():
        raise InputError(f"{final} is missing; the run in {run} did not write its final weights")
    dst = Path(dst or DEMO_WEIGHTS)
    # Read before the export: the starting weights may be the very file about to be replaced.
    init = log.config.get("init")
    base = base_training_section(init, log.init_sha256) if init else None
    init_sha = log.init_sha256 or (sha256_of(init) if init and Path(init).is_file() else None)
    # Nothing at dst changes until everything is ready: the fp16 file is exported and evaluated in a
    # temporary folder beside it (same name, so the report's source reads as the shipped file's), the
    # card and eval.json are written there too, then the three are renamed into place, weights last. A
    # failure or Ctrl-C before the renames leaves the old weights, card and eval.json as they were.
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.ship.", dir=dst.parent))
    try:
        staged = stage / dst.name
        digest = export_demo_weights(final, staged)
        shipped = load_demo_checkpoint(staged)
        report = evaluate(shipped, images=images, progress=progress)
        text = render_card(
            sha256=digest,
            command=command,
            log=log,
            report=report,
            machine=machine_description(),
            eval_command=f"ats-deploy demo eval --images {images}",
            base=base,
            init_sha256=init_sha,
            model=shipped.config,
            params=sum(int(v.size) for v in shipped.state_dict.values()),
            file_name=dst.name,
        )
        card = dst.parent / "MODEL_CARD.md"
        (stage / "eval.json").write_text(report.to_json() + "\n")
        (stage / card.name).write_text(text)
        os.replace(stage / "eval.json", dst.parent / "eval.json")
        os.replace(stage / card.name, card)
        os.replace(staged, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dst, card, report
