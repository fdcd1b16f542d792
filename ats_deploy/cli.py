"""Command line: one command per verb, each a thin layer (parse -> call the library -> emit).

Help is plain text (``rich_markup_mode=None``): option help is never parsed as rich markup or emoji codes
(``shapes:train:N`` stays as written), flags show no metavar and fixed choices are listed as ``<a|b>``.

``--json`` writes one JSON document to stdout; human output goes to stdout, progress and logs to stderr.
Exit codes: 0 ok, 1 user error (one line, no traceback), 2 usage error, 3 a parity or latency gate failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from . import __version__
from ._cli_common import JsonOpt, handle_errors
from ._cli_common import print_json as _print_json
from .demo.cli import demo_app
from .errors import GateFailed

app = typer.Typer(
    name="ats-deploy",
    help="Ship Vision Transformers with Adaptive Token Sampling (ATS) to NVIDIA Jetson.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
plugin_app = typer.Typer(
    help="The AdaptiveTokenSampler TensorRT plugin.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(plugin_app, name="plugin")

# Shared option aliases (fastapi-cli habit).
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling arbitrary objects (runs code from the file).")
]
HeadsOpt = Annotated[
    int | None, typer.Option("--heads", min=1, help="Attention heads (default: embed_dim // 64).")
]
MaxKOpt = Annotated[
    str | None,
    typer.Option("--max-k", help="K per ATS block (CLS included): one integer or a comma list (default: token count)."),
]
BlocksOpt = Annotated[
    str | None,
    typer.Option(
        "--ats-blocks", help="ATS block indices, e.g. 3-11 or 3,5,7 (default: paper placement); 'none' = dense."
    ),
]
ShapeOpt = Annotated[
    Literal["static", "dynamic"],
    typer.Option("--shape", help="static (fixed K_out slots + count) or dynamic (slice to the batch's max count)."),
]
OrtOpsOpt = Annotated[
    Path | None,
    typer.Option(
        "--ort-ops",
        help="--backend onnxruntime: libats_sampler_ort.so (ats-deploy plugin build-ort); static ATS then runs its "
        "sampler as one op per block (default $ATS_ORT_OPS).",
    ),
]
SkipOpt = Annotated[
    bool,
    typer.Option(
        "--skip-unreadable", help="Leave out unreadable images of an input folder (named on stderr) instead of failing."
    ),
]
Precision = Literal["fp32", "fp16", "int8"]
CalibMethod = Literal["entropy", "max", "percentile"]
HostBackend = Literal["torch", "onnxruntime", "tensorrt"]
TrtBackend = Literal["tensorrt", "rtx"]


def _embedded_default():
    """The embedded default and its source record: the trained demo DeiT-Ti (``demo/weights``) when the
    package ships its weights, otherwise the seeded untrained DeiT-Ti (``model/default.py``)."""
    from .artifacts import sha256_file
    from .demo.weights import DEMO_WEIGHTS, demo_weights_available, load_demo_checkpoint
    from .model.default import DEFAULT_SEED, QK_GAIN, default_checkpoint

    if demo_weights_available():
        return load_demo_checkpoint(), {
            "kind": "demo",
            "name": "deit_tiny_shapes (DeiT-Ti/16 trained on the generated shapes, 10 classes)",
            "file": DEMO_WEIGHTS.name,
            "sha256": sha256_file(DEMO_WEIGHTS),
        }
    return default_checkpoint(), {
        "kind": "embedded",
        "name": "deit_tiny_patch16_224 (untrained)",
        "seed": DEFAULT_SEED,
        "qk_gain": QK_GAIN,
    }


def _load(model: Path | None, *, trust_pickle: bool, heads: int | None):
    """A user checkpoint, or the embedded default model when none is given; plus its source record."""
    from .artifacts import sha256_file
    from .model.checkpoints import load_checkpoint

    if model is None:
        ck, source = _embedded_default()
        if heads is not None and heads != ck.config.num_heads:
            from .errors import ConfigError

            raise ConfigError(
                f"--heads {heads} applies to a checkpoint file; the embedded default model has "
                f"{ck.config.num_heads} heads: pass your checkpoint or drop --heads"
            )
        return ck, source
    ck = load_checkpoint(model, trust_pickle=trust_pickle, heads=heads)
    return ck, {"kind": "checkpoint", "path": str(Path(model).resolve()), "sha256": sha256_file(model)}


def _ats(cfg, ats_blocks: str | None, max_k: str | None, shape: str):
    from .errors import ConfigError
    from .model.config import resolve_ats

    if ats_blocks is not None and ats_blocks.strip().lower() in ("none", "dense"):
        if max_k is not None:
            raise ConfigError(f"--max-k {max_k} has no ATS block to apply to with --ats-blocks {ats_blocks}; drop one")
        return resolve_ats(cfg, blocks=(), shape_mode=shape)
    return resolve_ats(cfg, blocks=ats_blocks, max_k=max_k, shape_mode=shape)


@app.command()
@handle_errors
def export(
    model: Annotated[
        Path | None, typer.Argument(help="Checkpoint (.pt/.pth/.safetensors); omit for the embedded default.")
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory.")] = Path("out"),
    max_k: MaxKOpt = None,
    ats_blocks: BlocksOpt = None,
    shape: ShapeOpt = "static",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Static batch size of the graph.")] = 1,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension dynamic.")] = False,
    sampler: Annotated[
        Literal["portable", "plugin"],
        typer.Option("--sampler", help="portable (standard ops) or plugin (also writes model.plugin.onnx)."),
    ] = "portable",
    opset: Annotated[
        int, typer.Option("--opset", min=17, max=23, help="ONNX opset (>= 17 for LayerNormalization).")
    ] = 17,
    heads: HeadsOpt = None,
    trust_pickle: TrustOpt = False,
    parity_count: Annotated[
        int, typer.Option("--parity-inputs", min=0, help="Default inputs for the PyTorch vs ONNX Runtime check.")
    ] = 8,
    inputs: Annotated[
        Path | None, typer.Option("--inputs", help="Images folder, .npy or shapes:heldout:N for the parity check.")
    ] = None,
    skip_unreadable: SkipOpt = False,
    precision: Annotated[
        Precision, typer.Option("--precision", help="fp16 adds model.fp16.onnx; int8 also needs --calib-data.")
    ] = "fp32",
    calib_data: Annotated[
        Path | None, typer.Option("--calib-data", help="Calibration images/.npy (or shapes:train:N) for int8.")
    ] = None,
    calib_method: Annotated[CalibMethod, typer.Option("--calib-method", help="INT8 range method.")] = "max",
    as_json: JsonOpt = False,
) -> None:
    """Export a ViT checkpoint with ATS to ONNX (+ manifest, reference outputs) and check parity."""
    from .errors import ConfigError
    from .exporters.export import export_model
    from .exporters.onnx import GraphOptions
    from .reports.parity import format_parity

    if precision == "int8" and calib_data is None:
        raise ConfigError("--precision int8 needs --calib-data (a folder of images or .npy arrays, 100+ samples)")
    if calib_data is not None and precision != "int8":
        raise ConfigError(f"--calib-data is for --precision int8 (this export is {precision}); add it or drop the data")
    if calib_data is not None:  # before the export replaces anything in OUT
        from .inputs import check_input_source

        check_input_source(calib_data)
    if inputs is not None:
        from .inputs import check_input_source

        check_input_source(inputs)
    ck, source = _load(model, trust_pickle=trust_pickle, heads=heads)
    ats = _ats(ck.config, ats_blocks, max_k, shape)
    opts = GraphOptions(batch=batch, dynamic_batch=dynamic_batch, sampler=sampler, opset=opset)  # type: ignore[arg-type]
    kw = dict(opts=opts, parity_count=parity_count, inputs=inputs, source=source, progress=not as_json)
    extra: dict[str, str] = {}
    if precision == "fp32":
        res = export_model(ck, ats, out, skip_unreadable=skip_unreadable, **kw)
    else:
        # The fp16/int8 passes run on a staged copy beside OUT; OUT changes only when all of them succeed.
        import dataclasses
        import shutil
        import tempfile

        from .artifacts import AtomicWriter
        from .calibration.fp16 import write_fp16
        from .exporters.export import promote_staged

        AtomicWriter(out).abort()  # the same checks of OUT as a plain export, before any work
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.resolve().parent))
        try:
            res = export_model(ck, ats, stage, skip_unreadable=skip_unreadable, **kw)
            extra.update(write_fp16(stage))
            if precision == "int8":
                from .calibration.int8 import calibrate_export

                _, written = calibrate_export(
                    stage, calib_data, method=calib_method, progress=not as_json, skip_unreadable=skip_unreadable
                )
                extra.update(written)
            removed = promote_staged(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        res = dataclasses.replace(res, out_dir=out, removed=removed)
    if res.removed:
        typer.echo(
            f"note: removed {', '.join(res.removed)} of the previous export in {res.out_dir} (not part of this one)",
            err=True,
        )
    hint = static_hint(ck.config, ats)
    if hint:
        typer.echo(hint, err=True)
    if as_json:
        from .artifacts import read_manifest

        manifest = read_manifest(out) if extra else res.manifest
        files = {**res.files, **extra}
        _print_json({"out_dir": str(res.out_dir), "files": files, "seconds": res.seconds, "manifest": manifest})
    else:
        names = ", ".join([*res.files, *extra])
        typer.echo(f"exported {ck.source} -> {res.out_dir}/ ({names}) in {res.seconds:.1f} s")
        typer.echo(
            f"ATS blocks {list(ats.blocks)}  K {list(ats.k_schedule)}  shape {ats.shape_mode}  n_ref {ck.config.n_ref}"
        )
        if res.parity is not None:
            typer.echo(format_parity(res.parity, title="PyTorch vs ONNX Runtime"))
    if res.parity is not None and not res.parity.passed:
        raise GateFailed("parity gate failed: " + "; ".join(res.parity.failures))


def static_hint(cfg, ats) -> str | None:
    """One line for a static export whose K keeps every slot in every ATS block (it cannot save time)."""
    from .reports.flops import slots_per_block

    if not ats.blocks or ats.shape_mode != "static":
        return None
    slots = slots_per_block(cfg, ats)
    if any(slots[b][1] < slots[b][0] for b in ats.blocks):
        return None
    return (
        f"hint: with --shape static and K >= {cfg.num_tokens} tokens every block keeps all its slots, so this graph "
        "cannot be faster than dense (it adds the sampler); for speed use --shape dynamic or a smaller --max-k "
        "(ats-deploy tune-k measures one)"
    )


@app.command()
@handle_errors
def parity(
    out_dir: Annotated[Path, typer.Argument(help="Directory written by ats-deploy export.")],
    inputs: Annotated[
        Path | None, typer.Option("--inputs", help="Images folder (PNG/JPEG), .npy file/folder or shapes:heldout:N.")
    ] = None,
    count: Annotated[int, typer.Option("--count", min=1, help="Default inputs when --inputs is not given.")] = 16,
    model: Annotated[Path | None, typer.Option("--model", help="The exported checkpoint, if it moved.")] = None,
    trust_pickle: TrustOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 1,
    skip_unreadable: SkipOpt = False,
    precision: Annotated[
        Precision, typer.Option("--precision", help="fp32 (model.onnx), fp16 or int8 (the converted graphs).")
    ] = "fp32",
    form: Annotated[
        Literal["portable", "plugin"], typer.Option("--form", help="Graph form (plugin: expanded for ONNX Runtime).")
    ] = "portable",
    as_json: JsonOpt = False,
) -> None:
    """Compare PyTorch with ONNX Runtime on an export; exit 3 when a gate fails."""
    from .reports.parity import run_parity

    if precision != "fp32":
        from .calibration.precision import format_precision_parity, run_precision_parity

        pres, pinfo = run_precision_parity(
            out_dir, precision, inputs=inputs, count=count, seed=seed, model=model, trust_pickle=trust_pickle, form=form
        )
        if as_json:
            _print_json({**pinfo, **pres.to_dict()})
        else:
            typer.echo(format_precision_parity(pres))
        if not pres.passed:
            raise GateFailed(f"{precision} parity gate failed")
        return

    res, info = run_parity(
        out_dir,
        inputs=inputs,
        count=count,
        model=model,
        trust_pickle=trust_pickle,
        seed=seed,
        skip_unreadable=skip_unreadable,
        progress=not as_json,
        form=form,
    )
    if as_json:
        _print_json({**info, **res.to_dict()})
    else:
        from .reports.parity import format_parity

        typer.echo(format_parity(res, title=f"PyTorch vs ONNX Runtime ({info['inputs']})"))
    if not res.passed:
        raise GateFailed("parity gate failed: " + "; ".join(res.failures))


@app.command()
@handle_errors
def calibrate(
    out_dir: Annotated[Path, typer.Argument(help="Directory written by ats-deploy export.")],
    data: Annotated[
        Path, typer.Option("--data", help="Calibration images folder, .npy or shapes:train:N (100+ samples).")
    ],
    method: Annotated[CalibMethod, typer.Option("--method", help="How activation ranges are chosen.")] = "max",
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use at most this many samples.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Calibration batch size.")] = 16,
    percentile: Annotated[float, typer.Option("--percentile", help="For --method percentile.")] = 99.99,
    skip_unreadable: SkipOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """INT8 on CPU: activation ranges with ONNX Runtime, explicit Q/DQ on the Linear inputs (model.int8.onnx)."""
    from .calibration.int8 import calibrate_export

    res, written = calibrate_export(
        out_dir,
        data,
        method=method,
        limit=limit,
        batch_size=batch,
        percentile=percentile,
        progress=not as_json,
        skip_unreadable=skip_unreadable,
    )
    if as_json:
        _print_json({**res.to_dict(), "files": written})
    else:
        typer.echo(f"calibrated ({method}) -> {', '.join(written)} in {out_dir}")


@app.command()
@handle_errors
def tokens(
    model: Annotated[Path | None, typer.Argument(help="Checkpoint; omit for the embedded default.")] = None,
    input: Annotated[
        Path | None,
        typer.Option(
            "--input",
            help=".npy [N,3,H,W] / image / folder / shapes:heldout:N (default: one held-out demo image or random).",
        ),
    ] = None,
    max_k: MaxKOpt = None,
    ats_blocks: BlocksOpt = None,
    heads: HeadsOpt = None,
    trust_pickle: TrustOpt = False,
    skip_unreadable: SkipOpt = False,
    png: Annotated[
        Path | None,
        typer.Option("--png", help="Also draw the kept patches per ATS block over each input, as DIR/<input>.png."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Kept original token ids per ATS block, and logits, from the PyTorch model (and token-map PNGs)."""
    from .exporters.export import preprocess_for
    from .inputs import default_inputs, load_inputs
    from .runtime.torch_runner import TorchRunner

    if png is not None:  # before the model runs: a --png under a file fails at once
        from .reports.tokenmap import check_png_folder

        check_png_folder(png)
    ck, source = _load(model, trust_pickle=trust_pickle, heads=heads)
    ats = _ats(ck.config, ats_blocks, max_k, "static")
    pre = preprocess_for(ck.config)
    if input is not None:
        x, names = load_inputs(input, pre, skip_unreadable=skip_unreadable)
    else:
        x, label = default_inputs(source, 1, pre)
        names = [label]
    with TorchRunner(ck, ats) as r:
        out = r.infer({"pixels": x})
    images = []
    for i, name in enumerate(names):
        blocks = {str(b): out[f"tokens_{b}"][i, : int(out[f"count_{b}"][i])].tolist() for b in ats.blocks}
        images.append(
            {"input": name, "top1": int(out["logits"][i].argmax()), "kept": blocks, "logits": out["logits"][i].tolist()}
        )
    if png is not None:
        from .reports.tokenmap import write_token_maps

        written = write_token_maps(png, x, images, pre=pre, cfg=ck.config, blocks=ats.blocks, demo=source)
        for img, path in zip(images, written):
            img["png"] = str(path)
    if as_json:
        _print_json({"ats_blocks": list(ats.blocks), "k_schedule": list(ats.k_schedule), "images": images})
        return
    for img in images:
        typer.echo(f"{img['input']}: top-1 class {img['top1']}" + (f"  -> {img['png']}" if "png" in img else ""))
        for b, ids in img["kept"].items():
            typer.echo(
                f"  block {b:>2}: K'={len(ids) - ck.config.num_prefix_tokens:>3}  "
                f"ids {ids[:12]}{' ...' if len(ids) > 12 else ''}"
            )


@app.command()
@handle_errors
def convert(
    model: Annotated[Path, typer.Argument(help="A plugin-form ONNX (model.plugin.onnx).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the portable-form ONNX.")],
) -> None:
    """Expand AdaptiveTokenSampler plugin nodes into standard ONNX ops (runs in ONNX Runtime)."""
    import json

    import onnx

    from .artifacts import AtomicWriter, save_onnx
    from .errors import InputError
    from .exporters.convert import plugin_to_portable

    if model.is_dir():
        hint = f" ({model / 'model.plugin.onnx'})" if (model / "model.plugin.onnx").is_file() else ""
        raise InputError(
            f"{model} is a directory; pass the plugin-form ONNX file inside it{hint}, written by "
            "ats-deploy export --sampler plugin"
        )
    if not model.is_file():
        raise InputError(
            f"{model} does not exist; pass a plugin-form ONNX written by ats-deploy export --sampler plugin"
        )
    if out.is_dir():
        raise InputError(f"-o {out} is a directory; pass the file to write, e.g. {out / 'model.portable.onnx'}")
    if out.resolve() == model.resolve():
        raise InputError(f"-o {out} is the input itself; write the portable form to another file")
    try:
        listed = json.loads((out.parent / "manifest.json").read_text()).get("artifacts") or {}
    except (OSError, ValueError, AttributeError):
        listed = {}
    if out.name in listed:
        raise InputError(
            f"-o {out} is an artifact of the export in {out.parent} (listed in its manifest); write elsewhere"
        )
    try:
        src = onnx.load(str(model))
    except Exception as exc:  # protobuf raises DecodeError and others on garbage
        raise InputError(f"{model} is not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    if not src.graph.node:  # an empty file parses as an empty model
        raise InputError(f"{model} holds no ONNX graph (empty or not an ONNX file); pass model.plugin.onnx")
    converted = plugin_to_portable(src)
    with AtomicWriter(out.parent if str(out.parent) else Path(".")) as w:
        save_onnx(converted, w.path(out.name))
    typer.echo(f"wrote {out} ({len(converted.graph.node)} nodes, portable form)")


@app.command()
@handle_errors
def report(
    out_dir: Annotated[Path, typer.Argument(help="Directory written by ats-deploy export.")],
    backend: Annotated[HostBackend, typer.Option("--backend", help="Where to time the models.")] = "onnxruntime",
    batches: Annotated[str, typer.Option("--batch", "--batches", help="Batch sizes, e.g. 1,8,64.")] = "1,8,64",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Report directory (default OUT_DIR/report).")] = None,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Timed runs per model and batch.")] = 30,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs before timing, per batch.")] = 5,
    images: Annotated[
        int | None,
        typer.Option("--images", min=1, help="Default inputs for token stats and parity (default: largest batch)."),
    ] = None,
    inputs: Annotated[
        Path | None, typer.Option("--inputs", help="Images folder, .npy or shapes:heldout:N for tokens and parity.")
    ] = None,
    skip_unreadable: SkipOpt = False,
    model: Annotated[Path | None, typer.Option("--model", help="The exported checkpoint, if it moved.")] = None,
    trust_pickle: TrustOpt = False,
    max_slowdown: Annotated[
        float | None, typer.Option("--max-slowdown", help="Gate: exit 3 when ATS p50 > this x dense p50.")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads (0 = all).")] = 0,
    fp32: Annotated[bool, typer.Option("--fp32", help="torch on CUDA: no fp16 autocast.")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the default inputs.")] = 0,
    plugin_lib: Annotated[
        Path | None,
        typer.Option("--plugin-lib", help="--backend tensorrt: libats_sampler.so (default $ATS_SAMPLER_PLUGIN)."),
    ] = None,
    ort_ops: OrtOpsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Latency, tokens kept, GFLOPs and parity of ATS vs the dense model, side by side; writes report/.

    Exits 3 when the parity gate (the same verdict as ats-deploy parity) or --max-slowdown fails."""
    from .model.config import parse_int_list
    from .reports.latency import check_gate
    from .reports.latency import report as make_report

    rep = make_report(
        out_dir,
        backend=backend,
        batches=parse_int_list(batches, what="--batch", example="1,8,64") or (1,),
        out=out,
        reps=reps,
        warmup=warmup,
        images=images,
        inputs=inputs,
        model=model,
        trust_pickle=trust_pickle,
        max_slowdown=max_slowdown,
        raise_on_gate=False,
        threads=threads,
        fp16=not fp32,
        plots=not no_plots,
        progress=not as_json,
        seed=seed,
        skip_unreadable=skip_unreadable,
        plugin_lib=plugin_lib,
        ort_ops=ort_ops,
    )
    if as_json:
        _print_json(rep.data)
    else:
        typer.echo((rep.out / "report.md").read_text())
        typer.echo(f"wrote {rep.out}/ ({', '.join(rep.files)})")
    check_gate(rep)


@app.command("tune-k")
@handle_errors
def tune_k_cmd(
    source: Annotated[
        Path | None, typer.Argument(help="Checkpoint or export directory; omit for the embedded default.")
    ] = None,
    backend: Annotated[HostBackend, typer.Option("--backend", help="Where to measure.")] = "onnxruntime",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size to tune for.")] = 1,
    ats_blocks: BlocksOpt = None,
    target: Annotated[float, typer.Option("--target", help="ATS/dense latency ratio to stay under.")] = 1.0,
    margin: Annotated[float, typer.Option("--margin", help="Kept in hand for measurement noise.")] = 0.02,
    k_min: Annotated[int, typer.Option("--k-min", min=2, help="Smallest K to propose (CLS included).")] = 2,
    step: Annotated[int, typer.Option("--step", min=1, help="Token-count step of the sweep.")] = 8,
    refine: Annotated[bool, typer.Option("--refine", help="Re-sweep token by token inside each jump.")] = False,
    stack_depth: Annotated[
        int, typer.Option("--stack-depth", min=1, help="Dense blocks stacked per timed graph (steadier timings).")
    ] = 2,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Timed runs per token count.")] = 15,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs before timing.")] = 3,
    check_reps: Annotated[
        int, typer.Option("--check-reps", min=5, help="Rounds timing each checked schedule against dense.")
    ] = 40,
    checks: Annotated[int, typer.Option("--checks", min=1, help="Most schedules to measure before giving up.")] = 4,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads (0 = all).")] = 0,
    fp32: Annotated[bool, typer.Option("--fp32", help="torch on CUDA: no fp16 autocast.")] = False,
    heads: HeadsOpt = None,
    trust_pickle: TrustOpt = False,
    ort_ops: OrtOpsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure dense latency vs token count and propose per-block K on its steps, never slower than dense.

    A schedule is proposed only if its measured ATS/dense ratio, with its 95% interval, stays at or below
    --target; otherwise the answer is "not feasible at this batch"."""
    from .reports.tune import format_tune, tune_k

    src = (
        source
        if source is not None and (source / "manifest.json").is_file()
        else _load(source, trust_pickle=trust_pickle, heads=heads)[0]
    )
    res = tune_k(
        src,
        backend=backend,
        batch=batch,
        ats_blocks=ats_blocks,
        target_ratio=target,
        margin=margin,
        k_min=k_min,
        step=step,
        refine=refine,
        stack_depth=stack_depth,
        reps=reps,
        warmup=warmup,
        check_reps=check_reps,
        checks=checks,
        threads=threads,
        fp16=not fp32,
        trust_pickle=trust_pickle,
        progress=not as_json,
        ort_ops=ort_ops,
    )
    if as_json:
        _print_json(res.to_dict())
    else:
        typer.echo(format_tune(res))
        with_op = res.ort_ops is not None
        if res.feasible:
            op = " --sampler plugin (then run model.plugin.onnx with $ATS_ORT_OPS set)" if with_op else ""
            typer.echo(f"use: ats-deploy export ... --max-k {','.join(map(str, res.k_schedule))}{op}")
        else:
            op = "" if with_op or backend != "onnxruntime" else (
                ", or the sampler as one op (ats-deploy plugin build-ort, then --ort-ops)"
            )
            typer.echo(
                "hint: static ATS does not beat dense here at this batch; try --shape dynamic (compute follows K'),"
                f" a larger batch, or a looser --target{op}"
            )


@app.command()
@handle_errors
def build(
    onnx_path: Annotated[Path, typer.Argument(help="model.onnx or model.plugin.onnx from ats-deploy export.")],
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="Plan path (default: the ONNX path with .plan).")
    ] = None,
    precision: Annotated[
        Precision | None, typer.Option("--precision", help="Checked against the ONNX's own precision.")
    ] = None,
    plugin_lib: Annotated[Path | None, typer.Option("--plugin-lib", help="libats_sampler.so (plugin form).")] = None,
    batch: Annotated[
        str | None, typer.Option("--batch", help="MIN,OPT,MAX profile for a dynamic-batch graph (default 1,1,16).")
    ] = None,
    workspace: Annotated[int | None, typer.Option("--workspace", min=1, help="Workspace limit in MiB.")] = None,
    opt_level: Annotated[int, typer.Option("--opt-level", min=0, max=5, help="Builder optimisation level.")] = 3,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Timing cache file (reused).")] = None,
    backend: Annotated[
        TrtBackend | None, typer.Option("--backend", help="tensorrt (default) or rtx (TensorRT-RTX, build checks).")
    ] = None,
    plugin_load: Annotated[
        Literal["auto", "dlopen", "registry"], typer.Option("--plugin-load", help="How the plugin library is loaded.")
    ] = "auto",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Engine cache directory.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Always rebuild.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="TensorRT's verbose log.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a strongly typed TensorRT engine (run it on the Jetson itself: engines are not portable)."""
    from .errors import ConfigError
    from .exporters.trt import BuildSettings, build_engine
    from .model.config import parse_int_list

    profile = parse_int_list(batch, what="--batch", example="1,4,16") if batch else None
    if profile is not None and len(profile) != 3:
        raise ConfigError(f"--batch {batch!r} needs three values MIN,OPT,MAX, e.g. 1,4,16")
    settings = BuildSettings(
        precision=precision,  # type: ignore[arg-type]
        workspace_mib=workspace,
        optimization_level=opt_level,
        batch=profile,  # type: ignore[arg-type]
        timing_cache=timing_cache,
        plugin_lib=plugin_lib,
        plugin_load=plugin_load,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
    )
    res = build_engine(onnx_path, out, settings=settings, cache_dir=cache_dir, use_cache=not no_cache, verbose=verbose)
    if as_json:
        _print_json(res.to_dict())
        return
    rec = res.record
    how = "from the engine cache" if res.cached else f"in {res.seconds:.1f} s"
    typer.echo(f"built {res.plan} {how} ({rec.get('precision')}, {rec.get('backend')} {rec.get('tensorrt_version')})")
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)


@app.command()
@handle_errors
def verify(
    plan: Annotated[Path, typer.Argument(help="Engine built by ats-deploy build.")],
    reference: Annotated[Path, typer.Option("--reference", help="reference.npz written by ats-deploy export.")],
    plugin_lib: Annotated[Path | None, typer.Option("--plugin-lib", help="libats_sampler.so (plugin form).")] = None,
    backend: Annotated[TrtBackend | None, typer.Option("--backend", help="tensorrt (default) or rtx.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare an engine with the PyTorch outputs stored at export time (no torch needed); exit 3 on failure.

    The engine runs through Polygraphy's TensorRT runner; the same check with Polygraphy alone is
    `polygraphy run` on the export's parity_inputs.json and reference_outputs.json (the bundle README)."""
    from .reports.parity import format_parity
    from .runtime.verify import verify as run_verify

    res = run_verify(plan, reference, plugin_lib=plugin_lib, backend=backend)
    if as_json:
        _print_json(res.to_dict())
    else:
        typer.echo(format_parity(res.parity, title=f"TensorRT ({res.precision}) vs PyTorch reference"))
    if not res.parity.passed:
        raise GateFailed("verify gate failed: " + "; ".join(res.parity.failures))


@app.command()
@handle_errors
def bundle(
    out_dir: Annotated[Path, typer.Argument(help="Directory written by ats-deploy export.")],
    output: Annotated[Path, typer.Option("-o", "--out", help="Archive to write, e.g. ats_bundle.tar.gz.")],
    plugin_src: Annotated[Path | None, typer.Option("--plugin-src", help="Plugin sources (default: shipped).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Top folder inside the archive.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pack everything a Jetson needs (ONNX forms, plugin sources, manifest, reference, README)."""
    from .exporters.bundle import make_bundle

    res = make_bundle(out_dir, output, plugin_src=plugin_src, name=name)
    if as_json:
        _print_json(res.to_dict())
    else:
        typer.echo(f"wrote {res.path} ({len(res.files)} files, {res.bytes / 1e6:.1f} MB, sha256 {res.sha256[:12]}...)")


app.add_typer(demo_app, name="demo")


@plugin_app.command("build")
@handle_errors
def plugin_build(
    tensorrt_root: Annotated[
        Path | None, typer.Option("--tensorrt-root", help="TensorRT install (headers + libnvinfer).")
    ] = None,
    cuda_arch: Annotated[
        str | None, typer.Option("--cuda-arch", help="CUDA architectures, e.g. 87 (Orin) or 110 (Thor).")
    ] = None,
    build_dir: Annotated[Path, typer.Option("--build-dir", help="CMake build directory.")] = Path("build/ats_sampler"),
    kernel_only: Annotated[
        bool, typer.Option("--kernel-only", help="Build only the CUDA kernel library (no TensorRT).")
    ] = False,
    source_dir: Annotated[
        Path | None, typer.Option("--source-dir", help="Plugin sources (default: the ones shipped with ats-deploy).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build libats_sampler.so (the TensorRT plugin) where TensorRT is installed."""
    from .exporters.plugin_lib import build_plugin

    lib = build_plugin(
        source_dir=source_dir,
        build_dir=build_dir,
        tensorrt_root=tensorrt_root,
        cuda_arch=cuda_arch,
        kernel_only=kernel_only,
    )
    if as_json:
        _print_json({"library": str(lib)})
    else:
        typer.echo(f"built {lib}")


@plugin_app.command("build-ort")
@handle_errors
def plugin_build_ort(
    onnxruntime_root: Annotated[
        Path | None,
        typer.Option("--onnxruntime-root", help="ONNX Runtime release holding include/onnxruntime_c_api.h (>= 1.16)."),
    ] = None,
    build_dir: Annotated[Path, typer.Option("--build-dir", help="CMake build directory.")] = Path("build/ats_ort"),
    source_dir: Annotated[
        Path | None, typer.Option("--source-dir", help="Op sources (default: the ones shipped with ats-deploy).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build libats_sampler_ort.so: the sampler node of a plugin-form ONNX as an ONNX Runtime CPU op."""
    from .exporters.ort_op import ORT_OPS_ENV, build_ort_op

    lib = build_ort_op(build_dir=build_dir, onnxruntime_root=onnxruntime_root, source_dir=source_dir)
    if as_json:
        _print_json({"library": str(lib)})
    else:
        typer.echo(f"built {lib}; ONNX Runtime runs model.plugin.onnx with it once {ORT_OPS_ENV}={lib.resolve()}")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ats-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Ship Vision Transformers with Adaptive Token Sampling (ATS) to NVIDIA Jetson."""


def main() -> None:
    app(prog_name="ats-deploy")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
