"""A timm-compatible Vision Transformer (ViT / DeiT) with optional ATS blocks.

Parameter names are exactly timm's and Facebook DeiT's (cls_token, pos_embed, patch_embed.proj,
blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, head, and dist_token / head_dist for
distilled DeiT), so their checkpoints load without renaming and timm is not needed at run time.

ATS is fixed at construction (an :class:`ATSConfig`), never by a global flag. Shapes are static by
default: an ATS block emits K_out = min(K, n) slots plus a per-image count; padded slots point at CLS,
later blocks mask them as keys with a large finite negative, and they never reach the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .ats import select_tokens, token_scores
from .config import MASK_VALUE, ATSConfig, ViTConfig

__all__ = ["ATSOutput", "VisionTransformer", "MASK_VALUE"]


@dataclass(frozen=True)
class ATSOutput:
    """Logits plus, for each ATS block, the original token ids in its output slots and the valid count."""

    logits: Tensor
    token_ids: tuple[Tensor, ...]  # each [B, K_out] int64 (original token ids; padding = 0)
    counts: tuple[Tensor, ...]  # each [B] int64 (valid slots, CLS and prefix tokens included)
    # With forward_trace(x, sampler_inputs=True): per ATS block, what its sampler was given, (scores
    # [B, n] float32 in slot order, valid count [B]), as select_tokens sees them. Empty otherwise.
    sampler_inputs: tuple[tuple[Tensor, Tensor], ...] = ()

    def kept(self, image: int) -> list[list[int]]:
        """Kept original patch ids per ATS block for one image (prefix tokens left out)."""
        out = []
        for ids, cnt in zip(self.token_ids, self.counts):
            out.append(ids[image, : int(cnt[image])].tolist())
        return out


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def split_heads(self, t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    @staticmethod
    def merge_heads(t: Tensor) -> Tensor:
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1) @ v


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with ``k_max`` set it is an ATS block (docs/ATS_RULE.md section 2, step 7)."""

    def __init__(self, cfg: ViTConfig, *, k_max: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.k_max = k_max
        self.n_ref = cfg.n_ref
        self.num_prefix = cfg.num_prefix_tokens

    def forward(
        self, x: Tensor, count: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]:
        """Returns (tokens, sampler indices or None, new count or None, sampler input or None)."""
        c = x.shape[-1]
        qkv = self.attn.qkv(self.norm1(x))
        q_all, k_all, v_all = qkv.split(c, dim=-1)
        k = self.attn.split_heads(k_all)
        v = self.attn.split_heads(v_all)
        if self.k_max is None:
            out = self.attn.attend(self.attn.split_heads(q_all), k, v, bias)
            x = x + self.attn.proj(self.attn.merge_heads(out))
            return x + self.mlp(self.norm2(x)), None, None, None
        # ATS: score tokens from the CLS query row, select, then attend only for the selected queries.
        q_cls = self.attn.split_heads(q_all[:, :1])
        cls_logits = (q_cls @ k.transpose(-2, -1)) * self.attn.scale
        if bias is not None:
            cls_logits = cls_logits + bias
        cls_attn = cls_logits.float().softmax(dim=-1)[:, :, 0, :]  # [B, H, n], float32
        scores = token_scores(cls_attn, v)
        s_in, c_in = self.sampler_input(scores, count)
        idx, count_out = self.sample(s_in, c_in)
        gather = idx[:, :, None].expand(-1, -1, c)
        q_sel = self.attn.split_heads(torch.gather(q_all, 1, gather))
        out = self.attn.attend(q_sel, k, v, bias)
        x = torch.gather(x, 1, gather) + self.attn.proj(self.attn.merge_heads(out))
        return x + self.mlp(self.norm2(x)), idx, count_out, (s_in, c_in)

    def sampler_input(self, scores: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """What the sampler sees: CLS + patches; a distillation token (slot 1) is not sampled."""
        if self.num_prefix == 1:
            return scores, count
        return torch.cat([scores[:, :1], scores[:, 2:]], dim=1), count - 1

    def sample(self, s_in: Tensor, c_in: Tensor) -> tuple[Tensor, Tensor]:
        """Run the sampler on its input; a distillation token (slot 1) is put back right after CLS."""
        assert self.k_max is not None
        if self.num_prefix == 1:
            return select_tokens(s_in, c_in, k_max=self.k_max, n_ref=self.n_ref)
        idx, cnt = select_tokens(s_in, c_in, k_max=self.k_max, n_ref=self.n_ref)
        idx = torch.where(idx > 0, idx + 1, idx)
        idx = torch.cat([idx[:, :1], torch.ones_like(idx[:, :1]), idx[:, 1:]], dim=1)
        return idx, cnt + 1


class VisionTransformer(nn.Module):
    """ViT/DeiT with timm's parameter names; ATS blocks and shape mode fixed by ``ats``."""

    def __init__(self, cfg: ViTConfig, ats: ATSConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.ats = ats or ATSConfig()
        c = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, c))
        self.blocks = nn.ModuleList([Block(cfg, k_max=self.ats.k_for(i)) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.head = nn.Linear(c, cfg.num_classes)
        self.head_dist = nn.Linear(c, cfg.num_classes) if cfg.distilled else None

    def with_ats(self, ats: ATSConfig) -> VisionTransformer:
        """A model sharing these weights with another ATS configuration (the dense model: ATSConfig())."""
        other = VisionTransformer(self.cfg, ats)
        other.load_state_dict(self.state_dict())
        return other.eval()

    def embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        return torch.cat(prefix + [x], dim=1) + self.pos_embed

    def forward_features(
        self, x: Tensor, sampler_inputs: list | None = None
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Final normed tokens, and per ATS block the original ids and counts; ``sampler_inputs``, when a
        list, receives each ATS block's (scores, count) sampler input."""
        x = self.embed(x)
        b, n, _ = x.shape
        count = torch.full((b,), n, dtype=torch.int64, device=x.device)
        ids = torch.arange(n, device=x.device).expand(b, n)
        bias: Tensor | None = None
        trace_ids: list[Tensor] = []
        trace_counts: list[Tensor] = []
        for blk in self.blocks:
            x, idx, new_count, s_in = blk(x, count, bias)
            if idx is None:
                continue
            if sampler_inputs is not None:
                sampler_inputs.append(s_in)
            assert new_count is not None
            if self.ats.shape_mode == "dynamic":
                s = int(new_count.max())
                x, idx = x[:, :s], idx[:, :s]
            ids = torch.gather(ids, 1, idx)
            count = new_count
            trace_ids.append(ids)
            trace_counts.append(count)
            slots = torch.arange(x.shape[1], device=x.device)
            bias = torch.where(slots[None, :] < count[:, None], 0.0, MASK_VALUE)[:, None, None, :].to(x.dtype)
        return self.norm(x), trace_ids, trace_counts

    def forward_head(self, x: Tensor) -> Tensor:
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])

    def forward_trace(self, x: Tensor, *, sampler_inputs: bool = False) -> ATSOutput:
        recorded: list | None = [] if sampler_inputs else None
        feats, ids, counts = self.forward_features(x, recorded)
        return ATSOutput(self.forward_head(feats), tuple(ids), tuple(counts), tuple(recorded or ()))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_trace(x).logits
