"""The embedded default model: DeiT-Ti-shaped, deterministic seeded weights, no file needed.

The weights are UNTRAINED: drawn from NumPy's PCG64 generator (stable across NumPy versions and
platforms) so ``ats-deploy export`` runs offline and gives the same graph everywhere. The query and key
projections are scaled up so the CLS attention is peaky and the number of kept tokens K' varies from
image to image, which is what the sampler, the exporters and the reports need to exercise.
"""

from __future__ import annotations

import numpy as np

from .checkpoints import LoadedCheckpoint, expected_keys
from .config import ViTConfig
from .presets import deit_tiny_patch16_224

__all__ = ["DEFAULT_SEED", "default_config", "default_checkpoint"]

DEFAULT_SEED = 20220723  # ECCV 2022
QK_GAIN = 1.5  # sharpens attention logits: K' at block 3 spreads over ~80-110 of 197 on noise


def default_config() -> ViTConfig:
    return deit_tiny_patch16_224(num_classes=1000)


def default_checkpoint(
    seed: int = DEFAULT_SEED, cfg: ViTConfig | None = None, *, qk_gain: float = QK_GAIN
) -> LoadedCheckpoint:
    """Seeded weights for ``cfg`` (default: DeiT-Ti), in timm key names; reproducible on any platform."""
    cfg = cfg or default_config()
    rng = np.random.default_rng(seed)
    c = cfg.embed_dim
    sd: dict[str, np.ndarray] = {}
    for key, shape in expected_keys(cfg).items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            arr = np.ones(shape)
        elif key.endswith(("norm1.bias", "norm2.bias", "norm.bias")) or key.endswith(".bias"):
            arr = rng.normal(0.0, 0.02, shape)
        elif key in ("cls_token", "dist_token", "pos_embed"):
            arr = rng.normal(0.0, 0.5, shape)
        elif key.endswith("patch_embed.proj.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            arr = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        else:
            arr = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), shape)
            if key.endswith("attn.qkv.weight"):
                arr[: 2 * c] *= qk_gain
        sd[key] = arr.astype(np.float32)
    return LoadedCheckpoint(cfg, sd, f"embedded default (untrained, seed {seed})")
