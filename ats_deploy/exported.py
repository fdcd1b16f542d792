"""An export directory as the commands that read it open it: manifest, ATS config, preprocessing and the
exported weights (the shipped demo model, the seeded default, or the checkpoint file, sha256-checked).

``parity``, ``report``, ``calibrate`` and ``tune-k`` all start here, so they refuse the same wrong
inputs with the same one-line messages (see :func:`ats_deploy.artifacts.read_manifest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import read_manifest, sha256_file
from .errors import CheckpointError, InputError
from .inputs import Preprocess, default_inputs, input_labels, load_inputs
from .model.checkpoints import LoadedCheckpoint, load_checkpoint
from .model.config import ATSConfig, ViTConfig

__all__ = ["ExportSetup", "ats_from_manifest", "checked_artifact", "checkpoint_from_manifest", "load_export_setup"]


def ats_from_manifest(manifest: dict) -> ATSConfig:
    a = manifest["ats"]
    return ATSConfig(blocks=tuple(a["blocks"]), k_schedule=tuple(a["k_schedule"]), shape_mode=a["shape_mode"])


def checked_artifact(out_dir: str | Path, name: str, manifest: dict) -> Path:
    """``out_dir/name``, refused when missing or when it differs from the manifest's sha256."""
    out = Path(out_dir)
    path = out / name
    if not path.is_file():
        raise InputError(f"{path} is missing; re-run ats-deploy export -o {out}")
    want = manifest.get("artifacts", {}).get(name, {}).get("sha256")
    try:
        got = sha256_file(path) if want else None
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    if want and got != want:
        raise InputError(f"{path} does not match its manifest (sha256); re-run ats-deploy export -o {out}")
    return path


def checkpoint_from_manifest(
    manifest: dict, *, model: str | Path | None = None, trust_pickle: bool = False
) -> LoadedCheckpoint:
    """Reload the exported weights: the shipped demo model or the seeded generator (both part of the
    package), or the checkpoint file; demo weights and checkpoints are sha256-checked."""
    src = manifest["model"]["source"]
    arch = ViTConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["model"]["architecture"].items()}
    )
    if model is None and src.get("kind") == "embedded":
        from .model.default import default_checkpoint

        return default_checkpoint(int(src["seed"]), arch, qk_gain=float(src.get("qk_gain", 1.5)))
    if model is None and src.get("kind") == "demo":
        from .demo.weights import DEMO_WEIGHTS, load_demo_checkpoint

        if src.get("sha256") and DEMO_WEIGHTS.is_file() and sha256_file(DEMO_WEIGHTS) != src["sha256"]:
            raise CheckpointError(
                f"this export was made from other demo weights than the installed {DEMO_WEIGHTS.name} (sha256 "
                "mismatch); re-run ats-deploy export with this version"
            )
        return load_demo_checkpoint()
    path = Path(model) if model is not None else Path(src.get("path", ""))
    if model is None and not path.exists():
        raise InputError(f"the exported checkpoint {path} is gone; pass it again with --model PATH")
    ck = load_checkpoint(path, trust_pickle=trust_pickle, heads=arch.num_heads)
    want = src.get("sha256")
    if want and sha256_file(path) != want:
        raise CheckpointError(
            f"checkpoint {path} differs from the one exported (sha256 mismatch); pass the original with --model"
        )
    return ck


@dataclass(frozen=True)
class ExportSetup:
    """What a check of an export directory needs: manifest, inputs, ATS config and weights."""

    manifest: dict
    pixels: np.ndarray
    label: str
    batch: int | None  # the graph's static batch (None: dynamic): the chunks every backend runs in
    ats: ATSConfig
    checkpoint: LoadedCheckpoint
    prefix_tokens: int
    labels: np.ndarray | None = None  # true classes of the inputs, where known (generated demo images)


def load_export_setup(
    out_dir,
    *,
    inputs=None,
    count: int = 16,
    seed: int = 1,
    model=None,
    trust_pickle: bool = False,
    skip_unreadable: bool = False,
) -> ExportSetup:
    """Manifest, inputs (``inputs``, or ``count`` of :func:`default_inputs` with ``seed``), ATS config and
    the exported weights of an export directory."""
    man = read_manifest(out_dir)
    pre = Preprocess.from_dict(man["preprocessing"])
    if inputs is not None:
        x, _ = load_inputs(inputs, pre, skip_unreadable=skip_unreadable)
        label = f"{len(x)} inputs from {inputs}"
    else:
        x, label = default_inputs(man["model"].get("source"), count, pre, seed=seed)
    ck = checkpoint_from_manifest(man, model=model, trust_pickle=trust_pickle)
    prefix = int(man["ats"].get("prefix_tokens", 1))
    labels = input_labels(inputs, man["model"].get("source"), len(x))
    return ExportSetup(man, x, label, man["graph"]["batch"], ats_from_manifest(man), ck, prefix, labels)
