"""Build the ViT + ATS ONNX graph from a checkpoint's weights (no tracing).

Inputs: ``pixels`` [B, 3, H, W] float32 (normalised as the manifest says).
Outputs: ``logits`` [B, classes] float32; per ATS block i: ``tokens_<i>`` [B, K_out] int64 (original token
ids in the block's output slots, padding 0) and ``count_<i>`` [B] int32 (valid slots incl. prefix tokens).

The graph does exactly what :class:`ats_deploy.model.vit.VisionTransformer` does: the sampler (portable or
plugin form, identical surroundings) selects, the graph gathers query rows, tokens and token ids, and
masks padded keys with a large finite negative in later blocks. The score path is float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from .. import __version__
from ..model.config import MASK_VALUE, ATSConfig, ViTConfig
from ..model.reference import block_output_slots
from .graph import FLOAT, INT32, INT64, Dim, GraphBuilder
from .sampler import _reduce, emit_sampler

__all__ = ["ALL_ROWS", "GraphOptions", "build_graph", "DEFAULT_OPSET", "output_names"]

DEFAULT_OPSET = 17  # LayerNormalization exists from 17; TensorRT 10.3 (JetPack 6.1) parses it
SamplerForm = Literal["portable", "plugin"]
# Scope of the nodes of an ATS block that still run over its input rows (K_out = n: the gather comes after
# the attention projection), so INT8 calibration reads their valid rows from the previous stage's count.
ALL_ROWS = "/all_rows/"


@dataclass(frozen=True)
class GraphOptions:
    """Settings that change the exported graph (and therefore any engine built from it)."""

    batch: int = 1
    dynamic_batch: bool = False
    sampler: SamplerForm = "portable"
    opset: int = DEFAULT_OPSET


def output_names(ats: ATSConfig) -> list[str]:
    names = ["logits"]
    for b in ats.blocks:
        names += [f"tokens_{b}", f"count_{b}"]
    return names


class _VitEmitter:
    def __init__(self, g: GraphBuilder, cfg: ViTConfig, sd: dict[str, np.ndarray], ats: ATSConfig, opts: GraphOptions):
        self.g, self.cfg, self.sd, self.ats, self.opts = g, cfg, sd, ats, opts
        self.scale = g.const(cfg.head_dim**-0.5, "float32")

    # -- layers ---------------------------------------------------------------------------------
    def weight(self, name: str, *, transpose: bool = False) -> str:
        arr = self.sd[name]
        if transpose:
            return self.g.initializer(name + ".T", np.ascontiguousarray(arr.T))
        return self.g.initializer(name, arr)

    def linear(self, x: str, prefix: str) -> str:
        y = self.g.op("MatMul", x, self.weight(prefix + ".weight", transpose=True))
        if prefix + ".bias" in self.sd:
            y = self.g.op("Add", y, self.weight(prefix + ".bias"))
        return y

    def layer_norm(self, x: str, prefix: str) -> str:
        w, b = self.weight(prefix + ".weight"), self.weight(prefix + ".bias")
        return self.g.op("LayerNormalization", x, w, b, axis=-1, epsilon=self.cfg.norm_eps)

    def gelu(self, x: str) -> str:
        g = self.g
        if g.opset >= 20:
            return g.op("Gelu", x)
        inner = g.op("Erf", g.op("Div", x, g.const(np.sqrt(2.0), "float32")))
        return g.op("Mul", g.op("Mul", x, g.const(0.5, "float32")), g.op("Add", inner, g.const(1.0, "float32")))

    def heads(self, t: str, *, transpose_k: bool = False) -> str:
        """[B, n, C] -> [B, H, n, d] (or [B, H, d, n] for keys)."""
        c = self.cfg
        r = self.g.op("Reshape", t, self.g.const([0, 0, c.num_heads, c.head_dim]))
        return self.g.op("Transpose", r, perm=[0, 2, 3, 1] if transpose_k else [0, 2, 1, 3])

    def merge(self, t: str) -> str:
        tr = self.g.op("Transpose", t, perm=[0, 2, 1, 3])
        return self.g.op("Reshape", tr, self.g.const([0, 0, self.cfg.embed_dim]))

    def attend(self, q: str, k_t: str, v: str, bias: str | None) -> str:
        g = self.g
        logits = g.op("Mul", g.op("MatMul", q, k_t), self.scale)
        if bias is not None:
            logits = g.op("Add", logits, bias)
        return g.op("MatMul", g.op("Softmax", logits, axis=-1), v)

    def mlp(self, x: str, prefix: str) -> str:
        h = self.layer_norm(x, prefix + ".norm2")
        return self.g.op("Add", x, self.linear(self.gelu(self.linear(h, prefix + ".mlp.fc1")), prefix + ".mlp.fc2"))

    # -- graph ----------------------------------------------------------------------------------
    def embed(self, pixels: str) -> tuple[str, str]:
        g, c = self.g, self.cfg
        w, b = self.weight("patch_embed.proj.weight"), self.weight("patch_embed.proj.bias")
        pe = g.op("Conv", pixels, w, b, kernel_shape=[c.patch_size] * 2, strides=[c.patch_size] * 2)
        pe = g.op("Transpose", g.op("Reshape", pe, g.const([0, c.embed_dim, -1])), perm=[0, 2, 1])  # [B, N, C]
        batch = g.shape_of(pixels, 0)
        prefix_shape = g.op("Concat", batch, g.const([1, c.embed_dim]), axis=0)
        parts = [g.op("Expand", self.weight("cls_token"), prefix_shape)]
        if c.distilled:
            parts.append(g.op("Expand", self.weight("dist_token"), prefix_shape))
        x = g.op("Add", g.op("Concat", *parts, pe, axis=1), self.weight("pos_embed"))
        return x, batch

    def block(self, i: int, x: str, count: str, n: Dim, mask: tuple[str, str] | None):
        """One block; ``mask`` is (additive key bias [B, 1, 1, n], valid slots [B, n]) after an ATS block."""
        g, c = self.g, self.cfg
        bias, valid = mask if mask is not None else (None, None)
        p = f"blocks.{i}"
        g.scope = p + "/"
        qkv = self.linear(self.layer_norm(x, p + ".norm1"), p + ".attn.qkv")
        q_all, k_all, v_all = g.op("Split", qkv, g.const([c.embed_dim] * 3), axis=2, outputs=3)
        k_t, v = self.heads(k_all, transpose_k=True), self.heads(v_all)
        k_max = self.ats.k_for(i)
        if k_max is None:
            out = self.attend(self.heads(q_all), k_t, v, bias)
            x = g.op("Add", x, self.linear(self.merge(out), p + ".attn.proj"))
            return self.mlp(x, p), None, None
        # Scores from the CLS query row, in float32. Nodes of the score and sampler path are named
        # "blocks.<i>/ats/..." so precision passes can keep them in float32 by name.
        g.scope = p + "/ats/"
        scores = self.cls_scores(q_all, k_t, v_all, bias)
        idx, count_out = self.sample(scores, count, n, k_max, valid)
        g.scope = p + "/"
        idx3 = g.op("Unsqueeze", idx, g.const([2]))  # [B, K, 1] int64
        if self.keeps_every_slot(k_max, n):
            # K_out = n (static, K >= n): every query row survives anyway, so the block attends as a
            # dense one and gathers its output once, instead of gathering queries and residual apart.
            out = self.attend(self.heads(q_all), k_t, v, bias)
            g.scope = p + ALL_ROWS  # the projection runs over the block's input rows, before the gather
            x = g.op("Add", x, self.linear(self.merge(out), p + ".attn.proj"))
            g.scope = p + "/"
            return self.mlp(g.op("GatherND", x, idx3, batch_dims=1), p), idx, count_out
        q_sel = self.heads(g.op("GatherND", q_all, idx3, batch_dims=1))
        out = self.attend(q_sel, k_t, v, bias)
        x = g.op("Add", g.op("GatherND", x, idx3, batch_dims=1), self.linear(self.merge(out), p + ".attn.proj"))
        return self.mlp(x, p), idx, count_out

    def cls_scores(self, q_all: str, k_t: str, v_all: str, bias: str | None) -> str:
        """r_j = (sum over heads of the CLS row's softmax) * ||V_j||, [B, n] float32.

        As the PyTorch model computes it: the CLS query of each head ([B, H, 1, d]) times the block's keys as
        laid out for its attention ([B, H, d, n], shared, not recomputed), scaled, key-masked, softmax over
        the last axis. (An earlier form multiplied the keys [B, n, C] by the CLS query laid out
        block-diagonally, giving [B, n, H] logits; its softmax over a middle axis and its reshapes cost
        about 2% more of a DeiT-S forward pass in ONNX Runtime at batch 1, measured side by side.)
        """
        g, c = self.g, self.cfg
        q_cls = self.heads(g.op("Slice", q_all, g.const([0]), g.const([1]), g.const([1])))  # [B, H, 1, d]
        logits = g.op("MatMul", g.cast(q_cls, FLOAT), g.cast(k_t, FLOAT))  # [B, H, 1, n]
        logits = g.op("Mul", logits, g.const(c.head_dim**-0.5, "float32"))
        if bias is not None:
            logits = g.op("Add", logits, g.cast(bias, FLOAT))
        cls_attn = _reduce(g, "ReduceSum", g.op("Softmax", logits, axis=-1), [1, 2], keepdims=0)  # [B, n]
        v = g.cast(v_all, FLOAT)
        v_norm = g.op("Sqrt", _reduce(g, "ReduceSum", g.op("Mul", v, v), [2], keepdims=0))  # [B, n]
        return g.op("Mul", cls_attn, v_norm)

    def keeps_every_slot(self, k_max: int, n: Dim) -> bool:
        """Static mode with K_out = n: the block's output has as many slots as its input."""
        return isinstance(n, int) and self.next_slots(k_max, n) == n

    def next_slots(self, k_max: int, n: int) -> int:
        return block_output_slots(k_max, n, self.cfg.num_prefix_tokens)

    def sample(self, scores: str, count: str, n: Dim, k_max: int, valid: str | None) -> tuple[str, str]:
        """Indices [B, K_out] and counts [B], both int64; ``valid`` None means every slot is real."""
        g = self.g
        extra = self.cfg.num_prefix_tokens - 1
        kw = dict(k_max=k_max, n_ref=self.cfg.n_ref, mode=self.ats.shape_mode, form=self.opts.sampler)
        kw.update(n_max=self.cfg.num_tokens - extra, all_valid=valid is None)
        ax1 = g.const([1])
        if valid is not None:  # the patches' part of the key mask: slot p + 1 + extra is patch p
            kw["valid"] = g.op("Slice", valid, g.const([1 + extra]), g.const([2**62]), ax1)
        if not self.cfg.distilled:
            return emit_sampler(g, scores, count, n=n, **kw)
        # Distilled DeiT: the sampler sees CLS + patches; the distillation token is kept after CLS.
        s = g.op(
            "Concat",
            g.op("Slice", scores, g.const([0]), ax1, ax1),
            g.op("Slice", scores, g.const([2]), g.const([2**62]), ax1),
            axis=1,
        )
        n_s: Dim = n - 1 if isinstance(n, int) else g.op("Sub", n, g.const([1]))
        idx, cnt = emit_sampler(g, s, g.op("Sub", count, g.const(1)), n=n_s, **kw)
        idx = g.op("Where", g.op("Greater", idx, g.const(0)), g.op("Add", idx, g.const(1)), idx)
        first = g.op("Slice", idx, g.const([0]), ax1, ax1)
        rest = g.op("Slice", idx, ax1, g.const([2**62]), ax1)
        idx = g.op("Concat", first, g.op("Add", g.op("Mul", first, g.const(0)), g.const(1)), rest, axis=1)
        return idx, g.op("Add", cnt, g.const(1))

    def key_mask(self, count: str, n: Dim) -> tuple[str, str]:
        """([B, 1, 1, n] additive mask: 0 on valid keys, a large finite negative on padding; [B, n] valid)."""
        g = self.g
        slots = g.arange(0, n)
        valid = g.op("Less", g.op("Unsqueeze", slots, g.const([0])), g.op("Unsqueeze", count, g.const([1])))
        bias = g.op("Where", valid, g.const(0.0, "float32"), g.const(MASK_VALUE, "float32"))
        return g.op("Unsqueeze", bias, g.const([1, 2])), valid

    def build(self) -> None:
        g, c, opts = self.g, self.cfg, self.opts
        batch_dim: int | str = "batch" if opts.dynamic_batch else opts.batch
        pixels = g.input("pixels", FLOAT, [batch_dim, c.in_chans, c.img_size, c.img_size])
        x, batch = self.embed(pixels)
        n: Dim = c.num_tokens
        count = g.op("Expand", g.const([c.num_tokens]), batch)  # [B] int64
        ids = g.op(
            "Expand", g.const([list(range(c.num_tokens))]), g.op("Concat", batch, g.const([c.num_tokens]), axis=0)
        )
        mask = None
        for i in range(c.depth):
            x, idx, count_out = self.block(i, x, count, n, mask)
            if idx is None:
                continue
            g.scope = f"blocks.{i}/"
            ids = g.op("GatherElements", ids, idx, axis=1)
            count = count_out  # int64 inside the graph
            if self.ats.shape_mode == "dynamic":
                n = g.shape_of(idx, 1)
                k_dim: int | str = f"s_{i}"
            else:
                n = self.next_slots(self.ats.k_for(i) or 0, int(n))
                k_dim = n
            g.op("Identity", ids, outputs=[f"tokens_{i}"])
            g.op("Cast", count, to=INT32, outputs=[f"count_{i}"])
            g.output(f"tokens_{i}", INT64, [batch_dim, k_dim])
            g.output(f"count_{i}", INT32, [batch_dim])
            mask = self.key_mask(count, n)
        g.scope = "head/"
        x = self.layer_norm(x, "norm")
        cls = g.op("Gather", x, g.const(0), axis=1)
        logits = self.linear(cls, "head")
        if c.distilled:
            dist = self.linear(g.op("Gather", x, g.const(1), axis=1), "head_dist")
            logits = g.op("Mul", g.op("Add", logits, dist), g.const(0.5, "float32"))
        g.op("Identity", logits, outputs=["logits"])
        g.outputs.insert(0, onnx.helper.make_tensor_value_info("logits", FLOAT, [batch_dim, c.num_classes]))


def build_graph(
    cfg: ViTConfig, state_dict: dict[str, np.ndarray], ats: ATSConfig, opts: GraphOptions | None = None
) -> onnx.ModelProto:
    """The float32 ONNX model of ``cfg`` with ``state_dict`` and ``ats`` (dense when ``ats`` has no blocks)."""
    opts = opts or GraphOptions()
    g = GraphBuilder("ats_vit" if ats.enabled else "vit", opset=opts.opset)
    _VitEmitter(g, cfg, state_dict, ats, opts).build()
    return g.model(producer="ats-deploy", version=__version__)
