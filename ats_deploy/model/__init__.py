"""The PyTorch side: a timm-compatible ViT with ATS, the reference rule, checkpoints and presets."""

from __future__ import annotations

from .checkpoints import LoadedCheckpoint, load_checkpoint
from .config import ATSConfig, ViTConfig, resolve_ats

__all__ = ["ATSConfig", "LoadedCheckpoint", "ViTConfig", "build_model", "load_checkpoint", "resolve_ats"]


def build_model(ckpt: LoadedCheckpoint, ats: ATSConfig | None = None):
    """A float32 eval-mode :class:`VisionTransformer` holding ``ckpt``'s weights (imports torch)."""
    import torch

    from .vit import VisionTransformer

    model = VisionTransformer(ckpt.config, ats)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.state_dict.items()}, strict=True)
    return model.eval()
