"""Frozen configuration of a ViT and of its ATS stages: the single source of truth for model shapes.

Everything that changes the exported graph lives in these two dataclasses, so the manifest can record
them and an engine cache can key on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["ViTConfig", "ATSConfig", "default_ats_blocks", "parse_int_list", "resolve_ats"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ShapeMode = Literal["static", "dynamic"]

# Added to masked (padded) attention logits in later blocks: finite, and safe in float16 (max 65504).
MASK_VALUE = -30000.0


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a timm-compatible ViT / DeiT (class token, learned position embedding, pre-norm)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = False
    norm_eps: float = 1e-6
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f"image size {self.img_size} is not a multiple of patch size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed dim {self.embed_dim} is not divisible by {self.num_heads} heads; pass --heads with a divisor"
            )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:
        """Input token count of the first block (197 for 224/16, 198 for a distilled DeiT)."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def n_ref(self) -> int:
        """Token count the sampler's grid refers to: CLS plus patches (197 for 224/16)."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


def default_ats_blocks(depth: int) -> tuple[int, ...]:
    """The paper's placement: blocks 3..11 of 12; the same relative placement for other depths."""
    start = round(depth * 3 / 12)
    return tuple(range(start, depth))


@dataclass(frozen=True)
class ATSConfig:
    """Where ATS runs and with which budget. ``k_schedule[i]`` is K (CLS included) for ``blocks[i]``."""

    blocks: tuple[int, ...] = ()
    k_schedule: tuple[int, ...] = ()
    shape_mode: ShapeMode = "static"

    @property
    def enabled(self) -> bool:
        return bool(self.blocks)

    def k_for(self, block: int) -> int | None:
        if block in self.blocks:
            return self.k_schedule[self.blocks.index(block)]
        return None

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "k_schedule": list(self.k_schedule), "shape_mode": self.shape_mode}


def parse_int_list(
    text: str | int | list | tuple | None, *, what: str, example: str = "3,4,5 or 3-11"
) -> tuple[int, ...] | None:
    """Parse "3,4,5" / "3-11" / 197 / [3, 4] into a tuple of ints; None stays None. ``example`` is what the
    error message suggests (a value that makes sense for ``what``)."""
    if text is None:
        return None
    if isinstance(text, int):
        return (text,)
    if isinstance(text, (list, tuple)):
        return tuple(int(t) for t in text)
    out: list[int] = []
    bad = ConfigError(f"{what} {text!r} is not a comma list of integers; write it like {example}")
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ConfigError(f"{what} range {part!r} runs backwards; write it low to high like {example}")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise bad from None
    if not out:  # "", "," or ",,": an empty list is never what was meant
        raise bad
    return tuple(out)


def resolve_ats(
    cfg: ViTConfig,
    *,
    blocks: str | tuple[int, ...] | None = None,
    max_k: str | int | tuple[int, ...] | None = None,
    shape_mode: str = "static",
) -> ATSConfig:
    """Validate and complete user ATS options against an architecture (defaults: the paper's setting)."""
    if shape_mode not in ("static", "dynamic"):
        raise ConfigError(f"shape mode {shape_mode!r} is unknown; use --shape static or --shape dynamic")
    blk = parse_int_list(blocks, what="--ats-blocks")
    if blk is None:
        blk = default_ats_blocks(cfg.depth)
    if len(set(blk)) != len(blk):
        raise ConfigError(f"--ats-blocks {list(blk)} repeats a block; list each block once")
    bad = [b for b in blk if not 0 <= b < cfg.depth]
    if bad:
        raise ConfigError(
            f"--ats-blocks {bad} out of range: this model has blocks 0..{cfg.depth - 1}; pick blocks in that range"
        )
    blk = tuple(sorted(blk))
    ks = parse_int_list(max_k, what="--max-k", example="99 (every ATS block) or 120,110,100 (one per block)")
    if ks is None:
        ks = (cfg.n_ref,) * len(blk)
    elif len(ks) == 1:
        ks = ks * len(blk)
    elif len(ks) != len(blk):
        raise ConfigError(
            f"--max-k lists {len(ks)} values for {len(blk)} ATS blocks {list(blk)}; give one value or one per block"
        )
    for k in ks:
        if k < 2:
            raise ConfigError(f"--max-k {k} is below 2 (CLS plus one patch); use a value in 2..{cfg.n_ref}")
        if k > cfg.n_ref:
            raise ConfigError(
                f"--max-k {k} is above the token count {cfg.n_ref} of this model; use a value in 2..{cfg.n_ref}"
            )
    return ATSConfig(blocks=blk, k_schedule=tuple(int(k) for k in ks), shape_mode=shape_mode)  # type: ignore[arg-type]
