"""The export pipeline: checkpoint -> ONNX file(s) + manifest + reference outputs, written atomically.

Artifacts of one export (all in the output directory):
- ``model.onnx``: portable form (standard ONNX ops; runs in ONNX Runtime and any TensorRT >= 10.3),
- ``model.plugin.onnx``: plugin form (``ats::AdaptiveTokenSampler`` nodes), with ``--sampler plugin``,
- ``reference.npz``: inputs and PyTorch outputs, so parity can be proven later without torch (on a Jetson),
- ``parity_inputs.json`` / ``reference_outputs.json``: the same inputs and outputs in Polygraphy's formats
  (``polygraphy run ... --load-inputs/--load-outputs``; ``ats-deploy verify`` reads these too),
- ``manifest.json``: architecture, ATS blocks, K schedule, n_ref, shape mode, preprocessing, opset,
  versions and the sha256 of every artifact.
Every file is written under a temporary name and renamed into place only when all of them are done, so
a failed run leaves nothing half-written and never clobbers a previous good export with a partial one.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from .._json import json_default
from ..artifacts import EXTERNAL_DATA_LIMIT, FORMAT, MANIFEST, AtomicWriter, read_manifest, save_onnx, sha256_file
from ..errors import ExportError, InputError
from ..exported import checkpoint_from_manifest
from ..inputs import Preprocess, default_inputs, input_labels, load_inputs
from ..model.checkpoints import LoadedCheckpoint
from ..model.config import ATSConfig, ViTConfig
from ..reports.parity import ParityResult, compare_outputs, reference_outputs, run_chunks
from .onnx import GraphOptions, build_graph, output_names

__all__ = [
    "ExportResult",
    "MANIFEST",
    "export_model",
    "read_manifest",
    "checkpoint_from_manifest",
    "sha256_file",
    "AtomicWriter",
    "preprocess_for",
]


def preprocess_for(cfg: ViTConfig) -> Preprocess:
    return Preprocess(size=cfg.img_size, channels=cfg.in_chans, mean=tuple(cfg.mean), std=tuple(cfg.std))


def versions() -> dict[str, str]:
    """Versions of everything that shaped the artifacts (imported lazily, absent ones skipped)."""
    out = {"ats_deploy": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("onnx", "onnxruntime", "torch"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        out[mod] = getattr(m, "__version__", "?")
    return out


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: dict[str, str]  # name -> sha256
    manifest: dict
    parity: ParityResult | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # Files of an earlier export in the same directory that this one does not write (removed with the commit).
    removed: list[str] = field(default_factory=list)


def previous_artifacts(out_dir: Path) -> set[str]:
    """Names the manifest already in ``out_dir`` lists (artifacts, their external-data files and the
    precision passes' caches): what an export into ``out_dir`` replaces. Empty without a readable manifest."""
    try:
        man = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        return set()
    names = {n for n in (man.get("artifacts") or {}) if isinstance(n, str)}
    for entry in (man.get("precisions") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("cache"), str):
            names.add(entry["cache"])
    names |= {n + ".data" for n in names}
    # Only plain names inside the directory: a hand-edited manifest must not reach anything else.
    return {n for n in names if n and Path(n).name == n and n not in (".", "..", MANIFEST)}


def _reference_inputs(
    pre: Preprocess,
    *,
    inputs: str | Path | None,
    count: int,
    batch: int | None,
    source: dict | None,
    skip_unreadable: bool = False,
) -> np.ndarray:
    if inputs is not None:
        x, _ = load_inputs(inputs, pre, skip_unreadable=skip_unreadable)
    else:
        x = default_inputs(source, count, pre, seed=0)[0]
    if batch and len(x) % batch:
        keep = len(x) - len(x) % batch
        if keep == 0:
            raise InputError(
                f"{len(x)} inputs are fewer than the static batch {batch}; pass more or use --dynamic-batch"
            )
        x = x[:keep]
    return x


def export_model(
    ckpt: LoadedCheckpoint,
    ats: ATSConfig,
    out_dir: str | Path,
    *,
    opts: GraphOptions | None = None,
    parity_count: int = 8,
    inputs: str | Path | None = None,
    source: dict | None = None,
    skip_unreadable: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Write the ONNX form(s), reference outputs and manifest for ``ckpt`` with ``ats`` into ``out_dir``.

    ``parity_count`` random inputs (or the ``inputs`` folder/array) are run through PyTorch and ONNX
    Runtime; the comparison is returned (gating is the caller's decision). ``parity_count=0`` skips it.
    Files an earlier export in ``out_dir`` listed in its manifest and this one does not write (e.g. its
    plugin form, fp16/int8 graphs, reference outputs) are removed in the same commit, so every file an
    export directory holds belongs to its manifest.
    """
    t0 = time.perf_counter()
    opts = opts or GraphOptions()
    cfg = ckpt.config
    pre = preprocess_for(cfg)
    forms = ["portable"] + (["plugin"] if opts.sampler == "plugin" else [])
    files: dict[str, str] = {}
    parity = None
    with AtomicWriter(Path(out_dir)) as w:
        portable = build_graph(cfg, ckpt.state_dict, ats, GraphOptions(**{**opts.__dict__, "sampler": "portable"}))
        _check(portable)
        p_onnx = w.path("model.onnx")
        save_onnx(portable, p_onnx)
        files["model.onnx"] = sha256_file(p_onnx)
        if "plugin" in forms:
            plugin = build_graph(cfg, ckpt.state_dict, ats, opts)
            _check(plugin)
            p_plug = w.path("model.plugin.onnx")
            save_onnx(plugin, p_plug)
            files["model.plugin.onnx"] = sha256_file(p_plug)
        if parity_count or inputs is not None:
            from ..progress import progress_bar
            from ..runtime.ort_runner import OrtRunner

            batch = None if opts.dynamic_batch else opts.batch
            x = _reference_inputs(
                pre,
                inputs=inputs,
                count=max(parity_count, batch or 1),
                batch=batch,
                source=source,
                skip_unreadable=skip_unreadable,
            )
            with progress_bar(progress, 2 * len(x), f"parity: PyTorch on {len(x)} inputs") as advance:
                ref = reference_outputs(ckpt, ats, x, batch=batch, advance=advance)
                advance(0, description=f"parity: ONNX Runtime on {len(x)} inputs")
                with OrtRunner(p_onnx) as orr:
                    got = run_chunks(orr, x, batch, advance=advance)
            labels = input_labels(inputs, source, len(x))
            parity = compare_outputs(ref, got, blocks=ats.blocks, prefix_tokens=cfg.num_prefix_tokens, labels=labels)
            p_ref = w.path("reference.npz")
            with open(p_ref, "wb") as fh:
                np.savez_compressed(fh, pixels=x, **ref)
            files["reference.npz"] = sha256_file(p_ref)
            # The same inputs and outputs in Polygraphy's formats (polygraphy run --load-inputs/--load-outputs).
            from .polygraphy_io import INPUTS_FILE, OUTPUTS_FILE, write_parity_files

            p_in, p_out = w.path(INPUTS_FILE), w.path(OUTPUTS_FILE)
            dyn = ats.shape_mode == "dynamic"
            write_parity_files(p_in, p_out, x, ref, batch=batch, dynamic_tokens=dyn)
            files[INPUTS_FILE], files[OUTPUTS_FILE] = sha256_file(p_in), sha256_file(p_out)
        manifest = build_manifest(
            cfg, ats, opts, pre=pre, files=files, source=source or {"kind": "checkpoint", "path": ckpt.source}
        )
        if parity is not None:
            manifest["parity"] = {"backend": "onnxruntime", "reference": "torch", **parity.to_dict()}
        p_man = w.path(MANIFEST)
        p_man.write_text(json.dumps(manifest, indent=2, default=json_default) + "\n")
        written = set(files) | {n + ".data" for n in files} | {MANIFEST}
        removed = sorted(n for n in previous_artifacts(Path(out_dir)) - written if (Path(out_dir) / n).is_file())
        for name in removed:
            w.remove(name)
    return ExportResult(Path(out_dir), files, manifest, parity, time.perf_counter() - t0, removed=removed)


def promote_staged(staging: Path, out_dir: Path) -> list[str]:
    """Move every file of a finished export in ``staging`` into ``out_dir`` in one commit (the previous
    export's files that the new one does not have are removed in it); returns the removed names.

    Used where more passes follow the export (fp16, int8): they run on the staged copy, so a failing pass
    leaves ``out_dir`` as it was."""
    names = sorted(p.name for p in Path(staging).iterdir() if p.is_file())
    with AtomicWriter(Path(out_dir)) as w:
        for name in names:
            os.replace(Path(staging) / name, w.path(name))
        removed = sorted(n for n in previous_artifacts(Path(out_dir)) - set(names) if (Path(out_dir) / n).is_file())
        for name in removed:
            w.remove(name)
    return removed


def _check(model) -> None:
    import onnx

    try:
        if model.ByteSize() < EXTERNAL_DATA_LIMIT:
            onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not the user's: say so
        raise ExportError(
            f"internal error: the exported graph fails onnx.checker ({str(exc)[:200]}); please report it"
        ) from None


def build_manifest(
    cfg: ViTConfig, ats: ATSConfig, opts: GraphOptions, *, pre: Preprocess, files: dict, source: dict
) -> dict:
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"source": source, "architecture": cfg.to_dict()},
        "ats": {
            **ats.to_dict(),
            "n_ref": cfg.n_ref,
            "num_tokens": cfg.num_tokens,
            "prefix_tokens": cfg.num_prefix_tokens,
        },
        "graph": {
            "opset": opts.opset,
            "batch": None if opts.dynamic_batch else opts.batch,
            "dynamic_batch": opts.dynamic_batch,
            "sampler_forms": ["portable"] + (["plugin"] if opts.sampler == "plugin" else []),
            "precision": "fp32",
            "inputs": {
                "pixels": {
                    "dtype": "float32",
                    "shape": ["batch" if opts.dynamic_batch else opts.batch, cfg.in_chans, cfg.img_size, cfg.img_size],
                }
            },
            "outputs": output_names(ats),
        },
        "preprocessing": pre.to_dict(),
        "versions": versions(),
        "artifacts": {name: {"sha256": digest} for name, digest in files.items()},
    }
