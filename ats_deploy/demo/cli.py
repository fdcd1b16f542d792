"""``ats-deploy demo train``, ``demo eval`` and ``demo ship``: typer commands over the demo modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from .._cli_common import JsonOpt, handle_errors

__all__ = ["demo_app", "stage_config", "train_config"]

demo_app = typer.Typer(
    help="The procedural shapes demo: train and evaluate a DeiT-Ti on generated images.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Pair = tuple[float, float]
# The same option as the main CLI's TrustOpt (ats_deploy/cli.py imports this module: not imported from there).
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling arbitrary objects (runs code from the file).")
]


def train_config(**opts):
    """The one mapping from ``demo train``'s options to :class:`ats_deploy.demo.train.TrainConfig` (the
    same as ``python -m ats_deploy.demo.train``): ``None`` leaves the trainer's default; ``--phase`` (any
    number, in order) replaces the two-phase ``--*-low`` / ``--*-high`` options."""
    from dataclasses import fields

    from ..errors import ConfigError
    from .train import TrainConfig, _parse_phase, width_arch

    d = TrainConfig()
    lo, hi = d.phases[0], d.phases[-1]

    def pick(v, default):
        return default if v is None else v

    if opts["phase"]:
        try:
            phases = tuple(_parse_phase(p) for p in opts["phase"])
        except ValueError as exc:
            raise ConfigError(f"--phase: {exc}; write it like 112:6000:5e-4:300") from None
    else:
        low, high = _two_phases(opts, lo, hi, pick)
        phases = tuple(ph for ph in (low, high) if ph.steps > 0)
    given = {
        "phases": phases,
        "out_dir": opts["out"],
        "token_label": opts["token_label"],
        "batch_size": opts["batch_size"],
        "amp": opts["amp"],
        "ema": opts["ema"],
        "scale": tuple(opts["scale"]) if opts["scale"] else None,
        "seed": opts["seed"],
        "device": opts["device"],
        "threads": opts["threads"],
        "ckpt_every_s": opts["ckpt_every_s"],
        "eval_every": opts["eval_every"],
        "eval_images": opts["eval_images"],
        "workers": opts["workers"],
        "init": _init_path(opts.get("init")),
        "guide_background": opts.get("guide_background"),
        "arch": width_arch(opts.get("width")),
    }
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(k for k, v in given.items() if v is not None and k not in known)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"{flags}: not supported by this version's trainer; drop the option or update ats-deploy")
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def stage_config(stage, amp: str | None = None):
    """(TrainConfig, whether ``--amp`` was given) of a ``demo reproduce`` stage
    (:class:`ats_deploy.demo.reproduce.Stage`): its options parsed by the ``demo train`` command itself and
    mapped by :func:`train_config`, defaults included; ``amp`` overrides every stage's ``--amp``. Handed
    to :func:`ats_deploy.demo.reproduce.reproduce` and ``estimate`` as their ``read_stage``."""
    from ..errors import ConfigError
    from .reproduce import _with_amp

    cmd = typer.main.get_command(demo_app).commands["train"]
    try:
        params = dict(cmd.make_context("train", list(_with_amp(stage.args, amp))).params)
    except typer.TyperException as exc:  # click's: an unknown option, a bad value
        why = exc.format_message()
        raise ConfigError(f"{stage.name}: {why}; write its options as `demo train` takes them") from None
    params.pop("no_resume", None)
    try:
        return train_config(**params), params["amp"] is not None
    except ConfigError as exc:
        raise ConfigError(f"{stage.name}: {exc}") from None


def _two_phases(opts, lo, hi, pick):
    """The low- and high-resolution phases of the ``--*-low`` / ``--*-high`` options (a value out of range:
    a ConfigError naming the options of that phase)."""
    from dataclasses import replace

    from ..errors import ConfigError

    try:
        low = replace(
            lo,
            img_size=pick(opts["img_low"], lo.img_size),
            steps=pick(opts["steps_low"], lo.steps),
            lr=pick(opts["lr"], lo.lr),
            warmup=pick(opts["warmup"], lo.warmup),
            scale=tuple(opts["scale_low"]) if opts["scale_low"] else lo.scale,
        )
    except ConfigError as exc:
        raise ConfigError(f"--img-low/--steps-low/--lr/--warmup/--scale-low: {exc}") from None
    try:
        high = replace(
            hi,
            img_size=pick(opts["img_high"], hi.img_size),
            steps=pick(opts["steps_high"], hi.steps),
            lr=pick(opts["lr_high"], hi.lr),
            warmup=pick(opts["warmup_high"], hi.warmup),
        )
    except ConfigError as exc:
        raise ConfigError(f"--img-high/--steps-high/--lr-high/--warmup-high: {exc}") from None
    return low, high


def _init_path(init: str | None) -> str | None:
    """``--init demo`` names the shipped demo weights; anything else is a path."""
    if init == "demo":
        from .weights import DEMO_WEIGHTS

        return str(DEMO_WEIGHTS)
    return init


@demo_app.command("train")
@handle_errors
def demo_train(
    out: Annotated[str, typer.Option("--out", help="Run directory (checkpoints, final.safetensors).")] = "runs/demo",
    phase: Annotated[
        list[str] | None,
        typer.Option(
            "--phase",
            metavar="IMG:STEPS:LR:WARMUP[:SMIN:SMAX][:ats[=N][:guide=W]]",
            help="A training phase (repeat for several, in order); replaces the --*-low/--*-high options. "
            "':ats' runs every other step through ATS (':ats=N': one step in N); "
            "':guide=W' adds attention guidance with weight W.",
        ),
    ] = None,
    steps_low: Annotated[int | None, typer.Option("--steps-low", help="Steps of the low-resolution phase.")] = None,
    steps_high: Annotated[int | None, typer.Option("--steps-high", help="Steps of the 224 px phase.")] = None,
    img_low: Annotated[int | None, typer.Option("--img-low", help="Image size of the low-resolution phase.")] = None,
    img_high: Annotated[int | None, typer.Option("--img-high", help="Image size of the high-resolution phase.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate of the low-resolution phase.")] = None,
    lr_high: Annotated[float | None, typer.Option("--lr-high", help="Peak learning rate of the 224 px phase.")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Warm-up steps of the low-resolution phase.")] = None,
    warmup_high: Annotated[int | None, typer.Option("--warmup-high", help="Warm-up steps of the 224 px phase.")] = None,
    scale_low: Annotated[
        Pair | None, typer.Option("--scale-low", metavar="MIN MAX", help="Object diameter range of the low phase.")
    ] = None,
    token_label: Annotated[
        float | None, typer.Option("--token-label", help="Token-labelling loss weight (0: off).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per step.")] = None,
    amp: Annotated[Literal["bf16", "none"] | None, typer.Option("--amp", help="bf16 autocast or fp32.")] = None,
    ema: Annotated[float | None, typer.Option("--ema", help="EMA decay of the saved weights (0: off).")] = None,
    scale: Annotated[
        Pair | None, typer.Option("--scale", metavar="MIN MAX", help="Object diameter range (fraction of the side).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Training seed.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads.")] = None,
    ckpt_every_s: Annotated[
        float | None, typer.Option("--ckpt-every-s", help="Seconds between resumable checkpoints.")
    ] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Steps between held-out top-1 checks.")] = None,
    eval_images: Annotated[int | None, typer.Option("--eval-images", help="Images per held-out check.")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=0, help="Data-generating processes (GPU boxes: 8-16).")
    ] = None,
    guide_background: Annotated[
        float | None,
        typer.Option("--guide-background", min=0.0, max=1.0, help="Attention guidance's share on background patches."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init", metavar="WEIGHTS", help="Start from these .safetensors weights ('demo': the shipped ones)."
        ),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option("--width", help="Embed dim (heads = width // 64); default 192, DeiT-Ti's."),
    ] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start over instead of resuming --out.")] = False,
) -> None:
    """Train the demo DeiT-Ti on generated shapes (2-core CPU with bf16 units: ~2 h from scratch); prints the path."""
    from ..errors import ConfigError
    from . import train as tr

    cfg = train_config(**{k: v for k, v in locals().items() if k != "no_resume"})
    if amp is None and cfg.amp == "bf16":
        refusal = tr.default_amp_refusal(tr._resolve_device(cfg.device), tr.bf16_slowdown())
        if refusal:
            raise ConfigError(refusal)
    res = tr.train(cfg, resume=not no_resume)
    typer.echo(str(res.final_weights))


@demo_app.command("eval")
@handle_errors
def demo_eval(
    weights: Annotated[
        Path | None,
        typer.Argument(help="Trained weights (final.safetensors or a checkpoint); default: the shipped demo weights."),
    ] = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Held-out images.")] = 2000,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the held-out images (default: held-out).")] = None,
    max_k: Annotated[
        list[int] | None, typer.Option("--max-k", min=2, help="K of an extra ATS setting (repeatable; default 99).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 50,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads.")] = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Top-1 of dense vs ATS, mean K' per block and GFLOPs on held-out generated images."""
    from ..model.checkpoints import load_checkpoint
    from .evaluate import check_max_ks, evaluate, render_report
    from .shapes import HELDOUT_SEED, NUM_CLASSES
    from .train import _resolve_device
    from .weights import DEMO_WEIGHTS, load_demo_checkpoint

    device = _resolve_device(device, auto=False)  # before any work: cpu, cuda, cuda:N on a machine that has it
    if threads:
        import torch

        torch.set_num_threads(threads)
    w = weights or DEMO_WEIGHTS
    ck = load_demo_checkpoint(w) if w.suffix == ".safetensors" else load_checkpoint(w, trust_pickle=trust_pickle)
    check_max_ks(ck.config, max_k or [])  # a K above this model's token count would be left out silently
    if ck.config.num_classes != NUM_CLASSES:
        typer.echo(
            f"warning: {w.name} has {ck.config.num_classes} classes but the shapes demo has {NUM_CLASSES}: "
            "top-1 will be meaningless; pass weights trained with ats-deploy demo train",
            err=True,
        )
    rep = evaluate(
        ck,
        images=images,
        seed=HELDOUT_SEED if seed is None else seed,
        batch_size=batch_size,
        max_ks=(None, *(max_k or [99])),
        device=device,
        progress=not as_json,
    )
    if as_json:
        typer.echo(rep.to_json())
    else:
        typer.echo(render_report(rep))


@demo_app.command("ship")
@handle_errors
def demo_ship(
    run_dir: Annotated[Path, typer.Argument(help="The --out directory of a finished `demo train` run.")],
    images: Annotated[int, typer.Option("--images", min=1, help="Held-out images to evaluate.")] = 2000,
    command: Annotated[
        str | None, typer.Option(
            "--command", metavar="COMMAND", help="Training command for the card (default: the one the log recorded)."
        )
    ] = None,
) -> None:
    """Ship a run as the demo weights: fp16 safetensors, eval on held-out images, MODEL_CARD.md from the run."""
    import sys

    from .card import ship_run
    from .evaluate import render_report

    weights, card, report = ship_run(run_dir, command=command, images=images, progress=sys.stderr.isatty())
    typer.echo(render_report(report))
    typer.echo(f"shipped {weights} and {card}")


@demo_app.command("reproduce")
@handle_errors
def demo_reproduce(
    out: Annotated[str, typer.Option("--out", help="Directory of the stages' runs.")] = "runs/reproduce",
    estimate: Annotated[
        bool, typer.Option("--estimate", help="Only predict the training time here (measured speeds), run nothing.")
    ] = False,
    amp: Annotated[
        Literal["bf16", "none"] | None,
        typer.Option("--amp", help="Override every stage's precision (default: each stage's own; weights differ)."),
    ] = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Held-out images of the final check.")] = 2000,
    stage_images: Annotated[
        int, typer.Option("--stage-images", min=1, help="Held-out images of the earlier stages' cards.")
    ] = 200,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="Allowed top-1 difference from the shipped weights, points.")
    ] = 1.0,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", metavar="EVAL_JSON", help="eval.json to compare with (default: the shipped one)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the shipped demo weights' recipe (all stages, one command) and check the result against them."""
    import sys

    from . import reproduce as rp

    if estimate:
        rows = rp.estimate(read_stage=stage_config, amp=amp)
        typer.echo(json.dumps(rows, indent=2) if as_json else rp.render_estimate(rows))
        return
    rep = rp.reproduce(out, read_stage=stage_config, images=images, stage_images=stage_images,
                       tolerance=tolerance, amp=amp, reference=reference, progress=sys.stderr.isatty() and not as_json)
    typer.echo(json.dumps(rep.to_dict(), indent=2) if as_json else rp.render_report(rep))
