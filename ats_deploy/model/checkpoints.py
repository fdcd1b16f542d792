"""Load user checkpoints safely and infer the ViT architecture from tensor shapes.

Accepted: ``{"model": state_dict}`` (Facebook DeiT, the ATS authors' code), ``{"state_dict": ...}``,
a bare state_dict, ``.safetensors``, and (only with ``trust_pickle=True``) a pickled ``nn.Module``.
Pickles are opened with ``torch.load(weights_only=True)``: a file that needs arbitrary code to unpickle
is refused unless the user opts in, because unpickling runs whatever the file says.
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, InputError
from .config import ViTConfig

__all__ = ["LoadedCheckpoint", "load_checkpoint", "infer_config", "validate_state_dict", "expected_keys"]

_WRAPPERS = ("model", "state_dict", "model_state", "model_state_dict", "module", "net")
# Extra entries some training codes save beside the weights; they carry no weights we need.
_IGNORED = re.compile(r"(^|\.)(out_zero_mask|num_batches_tracked)$|^(fc_norm\.|pre_logits\.)")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A validated state_dict (NumPy float32 arrays, timm key names) and the inferred architecture."""

    config: ViTConfig
    state_dict: dict[str, np.ndarray]
    source: str


def _read_file(path: Path, *, trust_pickle: bool) -> object:
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist; pass the path of a .pt/.pth/.safetensors file")
    if path.is_dir():
        from ..artifacts import file_kind, wrong_kind

        if file_kind(path) == "export-dir":
            raise wrong_kind(path, "checkpoint", "export-dir")
        raise InputError(f"checkpoint {path} is a directory; pass the checkpoint file inside it")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc.strerror}; check the path and its permissions") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty; re-download or re-save it")
    from ..artifacts import file_kind, wrong_kind

    kind = file_kind(path)
    if kind == "safetensors" or (path.suffix == ".safetensors" and kind == "unknown"):
        return _read_safetensors(path)
    if kind == "unknown":  # neither zip nor pickle: torch.load could only fail, and --trust-pickle would not help
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint or .safetensors file (unknown format); "
            "pass a .pt/.pth/.safetensors checkpoint"
        )
    if kind not in ("torch-zip", "pickle"):  # ONNX, .npz, a plan...: no unpickling, no --trust-pickle
        raise wrong_kind(path, "checkpoint", kind)
    import pickle

    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"checkpoint {path} is a PyTorch file and torch is not installed here; install it "
            "(pip install 'ats-deploy[export]') or pass the checkpoint as .safetensors"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise CheckpointError(
                f"checkpoint {path} cannot be unpickled ({exc}); re-save it with torch.save"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} contains pickled code or objects, not only tensors; "
            "pass --trust-pickle if you trust its source, or re-save it as a state_dict"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({reason[:120]}); re-download or re-save it"
        ) from None
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise CheckpointError(
            f"checkpoint {path} needs code that is not importable here ({exc}); save its state_dict instead"
        ) from None
    except Exception as exc:  # the unpickler raises arbitrary errors on garbage (IndexError, KeyError...)
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}); re-download or re-save it"
        ) from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise CheckpointError("reading .safetensors needs the safetensors package; pip install safetensors") from exc
    try:
        return dict(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own SafetensorError and others on bad headers
        # bfloat16 cannot be a NumPy array: fall back to torch when it is available.
        if "bf16" in str(exc).lower() or "bfloat16" in str(exc).lower():
            from safetensors.torch import load_file as load_torch

            return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}
        raise CheckpointError(f"checkpoint {path} is not a valid .safetensors file ({exc}); re-save it") from None


def _to_numpy_state(obj: object, path: Path) -> dict[str, np.ndarray]:
    """Unwrap {"model": ...}-style containers and modules into a flat {name: float32 array}."""
    try:
        import torch
    except ImportError:  # safetensors path without torch
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for _ in range(3):
        if isinstance(obj, dict) and not _looks_like_state(obj):
            inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None and torch is not None:
                inner = next((obj[k].state_dict() for k in _WRAPPERS if isinstance(obj.get(k), torch.nn.Module)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict; save model.state_dict() instead"
        )
    out: dict[str, np.ndarray] = {}
    for key, val in obj.items():
        name = str(key)
        for prefix in ("module.", "model.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if torch is not None and isinstance(val, torch.Tensor):
            out[name] = val.detach().float().cpu().numpy()
        elif isinstance(val, np.ndarray):
            out[name] = val.astype(np.float32)
    if not out:
        raise CheckpointError(f"checkpoint {path} holds no tensors; save model.state_dict() instead")
    return out


def _looks_like_state(d: dict) -> bool:
    return any(isinstance(k, str) and k.endswith((".weight", ".bias")) for k in d) or "cls_token" in d


def infer_config(sd: dict[str, np.ndarray], *, heads: int | None = None, source: str = "checkpoint") -> ViTConfig:
    """Derive the architecture from shapes: embed dim, depth, patch and image size, classes, heads."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        some = ", ".join(sorted(sd)[:5])
        raise CheckpointError(
            f"{source} is not a timm/DeiT ViT: missing {', '.join(missing[:4])} (has {some}, ...); "
            "export a ViT/DeiT checkpoint with timm key names"
        )
    c = int(sd["cls_token"].shape[-1])
    pe = sd["patch_embed.proj.weight"]
    if pe.ndim != 4 or pe.shape[2] != pe.shape[3]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {pe.shape}, expected [C, 3, p, p]")
    patch = int(pe.shape[2])
    distilled = "dist_token" in sd
    prefix = 2 if distilled else 1
    tokens = int(sd["pos_embed"].shape[1])
    grid = math.isqrt(tokens - prefix)
    if grid * grid != tokens - prefix:
        raise CheckpointError(
            f"{source}: pos_embed has {tokens} tokens, not {prefix} prefix token(s) plus a square patch grid"
        )
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ConfigError(f"--heads {heads} must be a positive integer (a divisor of the embed dim {c})")
    num_heads = heads if heads is not None else max(c // 64, 1)
    if c % num_heads:
        raise ConfigError(f"embed dim {c} is not divisible by {num_heads} heads; pass --heads with a divisor of {c}")
    return ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=int(pe.shape[1]),
        num_classes=int(sd["head.weight"].shape[0]),
        embed_dim=c,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / c if "blocks.0.mlp.fc1.weight" in sd else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        distilled=distilled,
    )


def expected_keys(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape a timm-compatible model of ``cfg`` has."""
    c, h = cfg.embed_dim, cfg.mlp_hidden
    keys: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, c),
        "pos_embed": (1, cfg.num_tokens, c),
        "patch_embed.proj.weight": (c, cfg.in_chans, cfg.patch_size, cfg.patch_size),
        "patch_embed.proj.bias": (c,),
        "norm.weight": (c,),
        "norm.bias": (c,),
        "head.weight": (cfg.num_classes, c),
        "head.bias": (cfg.num_classes,),
    }
    if cfg.distilled:
        keys.update(
            {"dist_token": (1, 1, c), "head_dist.weight": (cfg.num_classes, c), "head_dist.bias": (cfg.num_classes,)}
        )
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        keys.update(
            {
                p + "norm1.weight": (c,),
                p + "norm1.bias": (c,),
                p + "attn.qkv.weight": (3 * c, c),
                p + "attn.proj.weight": (c, c),
                p + "attn.proj.bias": (c,),
                p + "norm2.weight": (c,),
                p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (h, c),
                p + "mlp.fc1.bias": (h,),
                p + "mlp.fc2.weight": (c, h),
                p + "mlp.fc2.bias": (c,),
            }
        )
        if cfg.qkv_bias:
            keys[p + "attn.qkv.bias"] = (3 * c,)
    return keys


def validate_state_dict(
    sd: dict[str, np.ndarray], cfg: ViTConfig, *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """Check names and shapes against ``cfg``; list a few missing/unexpected keys when they differ."""
    want = expected_keys(cfg)
    have = {k: v for k, v in sd.items() if not _IGNORED.search(k)}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source} is not a timm/DeiT ViT state_dict: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(have[k].shape)} != {want[k]}" for k in want if tuple(have[k].shape) != want[k]]
    if wrong:
        raise CheckpointError(f"{source} has tensors of unexpected shape: {'; '.join(wrong[:3])}")
    return {k: np.ascontiguousarray(have[k], dtype=np.float32) for k in want}


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False, heads: int | None = None) -> LoadedCheckpoint:
    """Read, unwrap, infer and validate a checkpoint; every failure is a one-line CheckpointError."""
    p = Path(path)
    obj = _read_file(p, trust_pickle=trust_pickle)
    sd = _to_numpy_state(obj, p)
    cfg = infer_config(sd, heads=heads, source=f"checkpoint {p}")
    return LoadedCheckpoint(cfg, validate_state_dict(sd, cfg, source=f"checkpoint {p}"), str(p))
