"""The shipped trained demo weights: ``weights/deit_tiny_shapes.safetensors`` (fp16 on disk, fp32 loaded).

The file is produced by :func:`export_demo_weights` from a training run's ``final.safetensors``; its
data recipe, training command, accuracy and sha256 are in ``weights/MODEL_CARD.md``. Until a trained
file is committed, :func:`load_demo_checkpoint` raises a CheckpointError saying how to make one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..model.checkpoints import LoadedCheckpoint, infer_config, validate_state_dict

__all__ = [
    "WEIGHTS_DIR",
    "DEMO_WEIGHTS",
    "demo_weights_available",
    "load_demo_checkpoint",
    "export_demo_weights",
    "sha256_of",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEMO_WEIGHTS = WEIGHTS_DIR / "deit_tiny_shapes.safetensors"


def sha256_of(path: str | Path) -> str:
    from ..artifacts import sha256_file

    return sha256_file(path)


def demo_weights_available(path: str | Path | None = None) -> bool:
    """Whether the package ships trained demo weights (``path`` defaults to :data:`DEMO_WEIGHTS`)."""
    return Path(path or DEMO_WEIGHTS).is_file()


def _read(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types on bad headers
        raise CheckpointError(f"demo weights {p} are not a valid .safetensors file ({exc}); re-export them") from None


def load_demo_checkpoint(path: str | Path | None = None) -> LoadedCheckpoint:
    """The trained DeiT-Ti shapes model (10 classes, 224/16; default :data:`DEMO_WEIGHTS`), as float32."""
    p = Path(path or DEMO_WEIGHTS)
    if not p.is_file():
        raise CheckpointError(
            f"trained demo weights {p} are not there; pass a .safetensors file of `ats-deploy demo train` "
            "(e.g. runs/demo/final.safetensors) or reinstall the package to get the shipped weights"
        )
    raw, meta = _read(p)
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    # Head count is not visible in the tensor shapes: training records it (DeiT-Ti: 3).
    cfg = infer_config(sd, heads=int(meta.get("num_heads", 3)), source=f"demo weights {p}")
    return LoadedCheckpoint(cfg, validate_state_dict(sd, cfg, source=f"demo weights {p}"), f"demo weights {p.name}")


def export_demo_weights(src: str | Path, dst: str | Path | None = None, *, metadata: dict | None = None) -> str:
    """Convert a training checkpoint (fp32 safetensors) to the shipped fp16 file; returns its sha256.

    Refuses weights whose values do not fit float16 (an fp16 cast would turn them into inf).
    """
    from safetensors.numpy import save_file

    sd, src_meta = _read(Path(src))
    big = [k for k, v in sd.items() if np.abs(v).max() >= 65504]
    if big:
        raise CheckpointError(f"{src}: {', '.join(big[:3])} exceed the float16 range; ship float32 instead")
    half = {k: np.ascontiguousarray(v.astype(np.float16)) for k, v in sd.items()}
    dst = Path(dst or DEMO_WEIGHTS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    save_file(half, str(tmp), metadata={**src_meta, **{k: str(v) for k, v in (metadata or {}).items()}})
    os.replace(tmp, dst)
    return sha256_of(dst)
