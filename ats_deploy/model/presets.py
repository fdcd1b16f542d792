"""Architecture presets (timm names), each three lines: the shapes of the public DeiT and ViT models."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .config import ViTConfig

__all__ = ["PRESETS", "preset"]

_INCEPTION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # timm's augreg ViT normalisation


def _cfg(overrides: dict, **defaults) -> ViTConfig:
    return ViTConfig(**{**defaults, **overrides})


def deit_tiny_patch16_224(**kw) -> ViTConfig:
    return _cfg(kw, embed_dim=192, depth=12, num_heads=3)


def deit_small_patch16_224(**kw) -> ViTConfig:
    return _cfg(kw, embed_dim=384, depth=12, num_heads=6)


def deit_base_patch16_224(**kw) -> ViTConfig:
    return _cfg(kw, embed_dim=768, depth=12, num_heads=12)


def deit_base_patch16_384(**kw) -> ViTConfig:
    return _cfg(kw, img_size=384, embed_dim=768, depth=12, num_heads=12)


def vit_small_patch16_224(**kw) -> ViTConfig:
    return _cfg(kw, embed_dim=384, depth=12, num_heads=6, **_INCEPTION)


def vit_small_patch16_384(**kw) -> ViTConfig:
    return _cfg(kw, img_size=384, embed_dim=384, depth=12, num_heads=6, **_INCEPTION)


def vit_base_patch16_224(**kw) -> ViTConfig:
    return _cfg(kw, embed_dim=768, depth=12, num_heads=12, **_INCEPTION)


def vit_base_patch16_384(**kw) -> ViTConfig:
    return _cfg(kw, img_size=384, embed_dim=768, depth=12, num_heads=12, **_INCEPTION)


def vit_large_patch16_224(**kw) -> ViTConfig:
    return _cfg(kw, embed_dim=1024, depth=24, num_heads=16, **_INCEPTION)


def vit_large_patch16_384(**kw) -> ViTConfig:
    return _cfg(kw, img_size=384, embed_dim=1024, depth=24, num_heads=16, **_INCEPTION)


PRESETS: dict[str, Callable[..., ViTConfig]] = {
    f.__name__: f
    for f in (
        deit_tiny_patch16_224,
        deit_small_patch16_224,
        deit_base_patch16_224,
        deit_base_patch16_384,
        vit_small_patch16_224,
        vit_small_patch16_384,
        vit_base_patch16_224,
        vit_base_patch16_384,
        vit_large_patch16_224,
        vit_large_patch16_384,
    )
}


def preset(name: str, **kw) -> ViTConfig:
    """Look up a preset by timm name; distilled DeiT names (``deit_*_distilled_*``) set ``distilled``."""
    base = name.replace("_distilled", "")
    if base not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    if "_distilled" in name:
        kw.setdefault("distilled", True)
    return PRESETS[base](**kw)
