"""Exact FLOP count of the ViT with ATS, block by block, from the token counts each block processes.

Convention (the paper's and fvcore's): one multiply-accumulate = 1 FLOP, counted on the matrix products
only (patch-embedding convolution, qkv, attention, proj, MLP, head) plus the ATS score path. LayerNorm,
softmax, GELU, bias adds and the sampler's sort/CDF are not counted (well under 1% of a DeiT block).
With this convention dense DeiT-S/16 at 224 is 4.6 GFLOPs, as the paper reports.

Per block with ``n`` input slots, embed dim C, MLP hidden H:

- dense block: qkv n*C*3C, attention 2*n*n*C (Q K^T and A V over all heads), proj n*C*C, MLP 2*n*C*H.
- ATS block (``n_out`` = K_out output slots): qkv n*C*3C over all input slots; score n*C for the CLS
  query row against n keys plus n*C for the value norms ||V_j||; attention 2*n_out*n*C (the selected
  query rows over all n keys); proj n_out*C*C; MLP 2*n_out*C*H.

Two ways to count an ATS model, both reported:

- static: the slots the static-shape graph processes (K_out = min(K, n) per stage). This is the work an
  engine really does in static mode; it only falls when K < n.
- data-dependent: per image from the kept counts (count_<i> = 1 + K' incl. prefix tokens), averaged
  over images, as the paper reports GFLOPs (and as the dynamic shape mode approaches at batch 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from ..model.config import ATSConfig, ViTConfig
from ..model.reference import block_output_slots

__all__ = [
    "BlockFlops",
    "ModelFlops",
    "block_flops",
    "model_flops",
    "static_gflops",
    "gflops_per_image",
    "slots_per_block",
    "CONVENTION",
]

CONVENTION = "multiply-accumulates of matrix products (fvcore / paper convention: 1 MAC = 1 FLOP)"


@dataclass(frozen=True)
class BlockFlops:
    """FLOPs of one transformer block at given token counts (``ats`` blocks have a score term)."""

    block: int
    ats: bool
    tokens_in: float
    tokens_out: float
    qkv: float
    score: float
    attention: float
    proj: float
    mlp: float

    @property
    def total(self) -> float:
        return self.qkv + self.score + self.attention + self.proj + self.mlp

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class ModelFlops:
    patch_embed: float
    blocks: tuple[BlockFlops, ...]
    head: float

    @property
    def total(self) -> float:
        return self.patch_embed + sum(b.total for b in self.blocks) + self.head

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def to_dict(self) -> dict:
        return {
            "patch_embed": self.patch_embed,
            "head": self.head,
            "blocks": [b.to_dict() for b in self.blocks],
            "total": self.total,
            "gflops": self.gflops,
        }


def block_flops(cfg: ViTConfig, n_in: float, n_out: float | None = None, *, block: int = 0) -> BlockFlops:
    """FLOPs of block ``block`` with ``n_in`` input slots; ``n_out`` set makes it an ATS block."""
    c, h = cfg.embed_dim, cfg.mlp_hidden
    qkv = n_in * c * 3 * c
    if n_out is None:
        return BlockFlops(block, False, n_in, n_in, qkv, 0.0, 2.0 * n_in * n_in * c, n_in * c * c, 2.0 * n_in * c * h)
    score = 2.0 * n_in * c  # CLS query row against n keys (all heads), and the value norms
    return BlockFlops(block, True, n_in, n_out, qkv, score, 2.0 * n_out * n_in * c, n_out * c * c, 2.0 * n_out * c * h)


def _embed_head(cfg: ViTConfig) -> tuple[float, float]:
    patch = float(cfg.num_patches * cfg.embed_dim * cfg.in_chans * cfg.patch_size * cfg.patch_size)
    head = float(cfg.embed_dim * cfg.num_classes * (2 if cfg.distilled else 1))
    return patch, head


def slots_per_block(cfg: ViTConfig, ats: ATSConfig) -> list[tuple[int, int]]:
    """(input slots, output slots) of every block in static mode (K_out = min(K, n) per ATS stage)."""
    n, out = cfg.num_tokens, []
    for i in range(cfg.depth):
        k = ats.k_for(i)
        n_out = n if k is None else block_output_slots(k, n, cfg.num_prefix_tokens)
        out.append((n, n_out))
        n = n_out
    return out


def model_flops(cfg: ViTConfig, ats: ATSConfig, *, counts: Mapping[int, float] | None = None) -> ModelFlops:
    """FLOPs of the whole model for one image.

    Without ``counts``: static mode (the slots the graph processes). With ``counts`` (ATS block ->
    valid tokens after it, prefix tokens included, i.e. a ``count_<i>`` value): data-dependent, the
    tokens that are really kept flow into the next block.
    """
    patch, head = _embed_head(cfg)
    n: float = float(cfg.num_tokens)
    blocks = []
    for i in range(cfg.depth):
        k = ats.k_for(i)
        if k is None:
            blocks.append(block_flops(cfg, n, block=i))
            continue
        n_out = float(counts[i]) if counts is not None else float(block_output_slots(k, int(n), cfg.num_prefix_tokens))
        blocks.append(block_flops(cfg, n, n_out, block=i))
        n = n_out
    return ModelFlops(patch, tuple(blocks), head)


def static_gflops(cfg: ViTConfig, ats: ATSConfig) -> float:
    """GFLOPs per image of the static-shape graph (dense when ``ats`` has no blocks)."""
    return model_flops(cfg, ats).gflops


def gflops_per_image(cfg: ViTConfig, ats: ATSConfig, counts: Mapping[int, np.ndarray]) -> np.ndarray:
    """Data-dependent GFLOPs of each image from its ``count_<i>`` values (block -> [N] counts).

    The count is bilinear in consecutive stages (attention is n_out x n_in), so the paper's average
    GFLOPs is the mean of this per-image vector, not the FLOPs of the mean counts.
    """
    if not ats.blocks:
        return np.zeros(0)
    num = len(np.asarray(counts[ats.blocks[0]]))
    out = np.empty(num, dtype=np.float64)
    for j in range(num):
        out[j] = model_flops(cfg, ats, counts={b: float(np.asarray(counts[b])[j]) for b in ats.blocks}).gflops
    return out
