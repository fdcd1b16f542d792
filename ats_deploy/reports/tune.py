"""Latency-aware K schedule: measure what a token costs on this device, then pick K on the steps.

Why: the static-shape ATS model only saves time where K_out < n, and what a token saves depends on the
device and batch. GEMM tiles make block latency a staircase in the token count (docs/ATS_RULE.md section 5): within one
step, dropping tokens saves nothing, so a K just above a step boundary wastes the accuracy it costs. And
every sampler stage costs a fixed overhead, so K = n_ref is always a little slower than dense.

Method (``tune_k``):

1. Sweep: a stack of ``stack_depth`` dense blocks (patch embedding, then the first n tokens, blocks,
   head) timed at token counts n (every ``step`` tokens, optionally refined token by token inside each
   detected jump), round-robin with the full dense model and the full ATS model at K = n_ref (no slot
   saved: its extra time over dense, per stage, is the sampler overhead).
2. Steps: a non-decreasing fit of the sweep (pool-adjacent-violators), cut into plateaus whose rise stays
   below the noise threshold; the largest n on each plateau is a candidate (the cheapest count on its step).
3. Path: start every ATS block at the top candidate (K = n_ref) and lower, one step at a time, the
   block whose step saves the most predicted time per token slot lost, down to ``k_min``. Prediction:
   dense latency plus, per block, the change of its per-block time at its token counts (an ATS block runs
   qkv over its input slots and the rest over its output slots, split by FLOP share) plus the sampler
   overhead per stage, measured (ATS at K = n_ref against dense, paired per round; not clamped, so a
   noisy estimate shows as such).
4. Decide on measurements, not on the prediction: the first schedule on the path predicted to reach
   ``target_ratio`` x dense (minus ``margin``) is built and timed against dense, interleaved, and the
   median of the per-round ratios gets a bootstrap interval. It is accepted only if the whole interval
   is at or below the target; otherwise the next schedule measured is the first one further down the
   path predicted to save what the last one missed by (at most ``checks`` in all). If none qualifies
   the answer is "not feasible at this batch", with what was measured,
   never a schedule that measured slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..model.checkpoints import LoadedCheckpoint
from ..model.config import ATSConfig, ViTConfig, resolve_ats
from ..model.reference import block_output_slots
from ..runtime.base import Runner, check_pixels
from ..runtime.ort_runner import OrtRunner
from .flops import block_flops
from .latency import (
    make_factory,
    measure_interleaved,
    paired_ratio,
    progress_bar,
    step_timer,
    summarize,
    trt_runner_factory,
)

SWEEP_QUANTILE = 20  # percentile of the sweep timings: contention only adds time

__all__ = [
    "TuneResult",
    "tune_k",
    "format_tune",
    "TorchStackRunner",
    "isotonic",
    "plateau_ends",
    "predict_ms",
    "stack_onnx",
]


@dataclass(frozen=True)
class TuneResult:
    """The proposed schedule, the sweep it rests on, and predicted vs measured latency (ms, p50)."""

    backend: str
    batch: int
    blocks: tuple[int, ...]
    k_schedule: tuple[int, ...]  # the accepted schedule; the last one measured when not feasible
    feasible: bool  # a schedule's whole measured interval is at or below the target
    target_ratio: float
    sweep_tokens: tuple[int, ...]
    sweep_ms: tuple[float, ...]  # p20 of the block stack at each token count (see SWEEP_QUANTILE)
    fit_ms: tuple[float, ...]  # its non-decreasing fit
    stack_depth: int
    step_ends: tuple[int, ...]  # largest token count on each plateau
    overhead_ms: float  # sampler overhead per ATS stage, measured (may be negative when noise wins)
    overhead_ratio: tuple[float, float, float]  # ATS at K = n_ref / dense: median and interval
    dense_sweep_ms: float  # dense model p20 measured during the sweep
    predicted_ms: float  # predicted_ratio x the dense p50 measured in the check run
    predicted_ratio: float  # predicted ATS / dense, from the sweep
    measured_ms: dict  # summarize() of the ATS model with the schedule
    measured_dense_ms: dict  # summarize() of the dense model, same run
    measured_ratio: float  # median of the per-round ATS / dense ratios of the final check
    ratio_low: float
    ratio_high: float
    confidence: float
    checks: tuple[dict, ...]  # every schedule measured: k_schedule, predicted, ratio, low, high
    sampler: str = "portable subgraph"  # how the ATS models ran their sampler, in words
    ort_ops: str | None = None  # the ONNX Runtime op library the ATS models ran with (None: standard ops)

    def to_dict(self) -> dict:
        return asdict(self)

    def ats_config(self, shape_mode: str = "static") -> ATSConfig:
        return ATSConfig(blocks=self.blocks, k_schedule=self.k_schedule, shape_mode=shape_mode)  # type: ignore[arg-type]


# -- fitting ---------------------------------------------------------------------------------------------
def isotonic(y: Sequence[float]) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators): more tokens never cost less."""
    vals: list[float] = []
    sizes: list[int] = []
    for v in y:
        vals.append(float(v))
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w = sizes[-2] + sizes[-1]
            vals[-2] = (vals[-2] * sizes[-2] + vals[-1] * sizes[-1]) / w
            sizes[-2] = w
            vals.pop()
            sizes.pop()
    return np.repeat(vals, sizes)


def plateau_ends(tokens: Sequence[int], fit: Sequence[float], threshold: float) -> list[int]:
    """Largest token count of each plateau: a new step starts when the fit rises > ``threshold``."""
    ends: list[int] = []
    start = fit[0]
    for j in range(1, len(tokens)):
        if fit[j] - start > threshold:
            ends.append(int(tokens[j - 1]))
            start = fit[j]
    ends.append(int(tokens[-1]))
    return ends


def predict_ms(
    cfg: ViTConfig,
    ats: ATSConfig,
    per_block: Callable[[float], float],
    *,
    dense_ms: float,
    overhead_ms: float,
) -> float:
    """Predicted latency of ``ats``: dense plus, per block, the change of its time at its token counts.

    ``per_block(n)`` is one dense block's time at n tokens (only its differences matter).
    """
    n_ref_tok = cfg.num_tokens
    base = per_block(n_ref_tok)
    n, total = n_ref_tok, dense_ms
    for i in range(cfg.depth):
        k = ats.k_for(i)
        if k is None:
            total += per_block(n) - base
            continue
        n_out = block_output_slots(k, n, cfg.num_prefix_tokens)
        f = block_flops(cfg, n)
        share = f.qkv / f.total  # the part of an ATS block that still runs over all its input slots
        total += share * (per_block(n) - base) + (1 - share) * (per_block(n_out) - base) + overhead_ms
        n = n_out
    return total


# -- block-stack models -----------------------------------------------------------------------------------
def stack_onnx(cfg: ViTConfig, sd: dict, *, tokens: int, depth: int, k: int | None, batch: int, opset: int = 17):
    """ONNX of: patch embedding, the first ``tokens`` tokens, ``depth`` blocks (ATS at K=``k``), head.

    Input ``pixels`` and output ``logits`` like the full model, so any runner can time it. Uses the
    exporter's own emitter, so the blocks are exactly the exported ones.
    """
    from onnx import helper

    from ..exporters.graph import FLOAT, GraphBuilder
    from ..exporters.onnx import GraphOptions, _VitEmitter

    ids = tuple(range(cfg.depth - depth, cfg.depth))
    ats = ATSConfig(blocks=ids, k_schedule=(k,) * depth) if k else ATSConfig()
    g = GraphBuilder("block_stack", opset=opset)
    em = _VitEmitter(g, cfg, sd, ats, GraphOptions(batch=batch, opset=opset))
    pixels = g.input("pixels", FLOAT, [batch, cfg.in_chans, cfg.img_size, cfg.img_size])
    x, b = em.embed(pixels)
    x = g.op("Slice", x, g.const([0]), g.const([tokens]), g.const([1]))
    count = g.op("Expand", g.const([tokens]), b)
    n, mask = tokens, None
    for i in ids:
        x, idx, cnt = em.block(i, x, count, n, mask)
        if idx is not None:
            count, n = cnt, block_output_slots(k or n, n, cfg.num_prefix_tokens)
            mask = em.key_mask(count, n)
    g.scope = "head/"
    cls = g.op("Gather", em.layer_norm(x, "norm"), g.const(0), axis=1)
    g.op("Identity", em.linear(cls, "head"), outputs=["logits"])
    g.outputs.append(helper.make_tensor_value_info("logits", FLOAT, [batch, cfg.num_classes]))
    return g.model(producer="ats-deploy", version="stack")


class TorchStackRunner(Runner):
    """The same block stack in PyTorch: eager on CPU, a CUDA graph (fp16 autocast) on CUDA."""

    name = "torch-stack"

    def __init__(self, ckpt: LoadedCheckpoint, *, tokens: int, depth: int, k: int | None, batch: int, fp16=True):
        import torch

        from ..model import build_model
        from ..model.vit import MASK_VALUE

        cfg = ckpt.config
        ids = list(range(cfg.depth - depth, cfg.depth))
        ats = ATSConfig(blocks=tuple(ids), k_schedule=(k,) * depth) if k else ATSConfig()
        self._torch, self.cfg, self.batch = torch, cfg, batch
        self.cuda = torch.cuda.is_available()
        self.model = build_model(ckpt, ats).to("cuda" if self.cuda else "cpu")
        model = self.model

        def forward(x):
            with (
                torch.no_grad(),
                torch.autocast("cuda", torch.float16, enabled=self.cuda and fp16, cache_enabled=False),
            ):
                t = model.embed(x)[:, :tokens]
                count = torch.full((t.shape[0],), tokens, dtype=torch.int64, device=t.device)
                bias = None
                for i in ids:
                    t, idx, cnt, _ = model.blocks[i](t, count, bias)
                    if idx is not None:
                        count = cnt
                        slots = torch.arange(t.shape[1], device=t.device)
                        bias = torch.where(slots[None, :] < count[:, None], 0.0, MASK_VALUE)[:, None, None, :]
                        bias = bias.to(t.dtype)
                return model.head(model.norm(t)[:, 0]).float()

        self._forward = forward
        self._call = None
        if self.cuda:
            from ..runtime.torch_cuda import CudaGraphCallable

            self.static_x = torch.zeros(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device="cuda")
            self._call = CudaGraphCallable(forward, (self.static_x,))
            self.uses_graph = True
            self.stage = self._stage
            self.timed_step = self._call.timed_replay

    def _stage(self, x: np.ndarray) -> None:
        x = check_pixels(x, channels=self.cfg.in_chans, size=self.cfg.img_size, batch=self.batch)
        self.static_x.copy_(self._torch.from_numpy(x))
        self._torch.cuda.synchronize()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = check_pixels(feed["pixels"], channels=self.cfg.in_chans, size=self.cfg.img_size)
        if self._call is not None:
            self._stage(x)
            return {"logits": self._call.replay().cpu().numpy()}
        with self._torch.inference_mode():
            return {"logits": self._forward(self._torch.from_numpy(x)).numpy()}


def _stack_factory(backend: str, ckpt: LoadedCheckpoint, *, opset: int, threads: int, fp16: bool):
    if backend == "onnxruntime":

        def ort(tokens: int, depth: int, k: int | None, batch: int) -> Runner:
            proto = stack_onnx(ckpt.config, ckpt.state_dict, tokens=tokens, depth=depth, k=k, batch=batch, opset=opset)
            return OrtRunner(proto.SerializeToString(), threads=threads, spin=False)

        return ort
    if backend == "torch":
        return lambda tokens, depth, k, batch: TorchStackRunner(
            ckpt, tokens=tokens, depth=depth, k=k, batch=batch, fp16=fp16
        )
    build = trt_runner_factory(fp16=fp16)

    def trt(tokens: int, depth: int, k: int | None, batch: int) -> Runner:
        proto = stack_onnx(ckpt.config, ckpt.state_dict, tokens=tokens, depth=depth, k=k, batch=batch, opset=opset)
        ats = ATSConfig(blocks=tuple(range(ckpt.config.depth - depth, ckpt.config.depth)), k_schedule=(k,) * depth)
        tag = f"stack_n{tokens}_d{depth}_k{k or 0}_b{batch}"
        return build(proto, tag, batch, cfg=ckpt.config, ats=ats if k else ATSConfig())

    return trt


# -- the tuner ---------------------------------------------------------------------------------------------
def _source(source, model, trust_pickle: bool, ats_blocks) -> tuple[LoadedCheckpoint, tuple[int, ...], int]:
    """(checkpoint, ATS blocks, opset) from a LoadedCheckpoint or an export directory."""
    if isinstance(source, LoadedCheckpoint):
        ats = resolve_ats(source.config, blocks=ats_blocks)
        return source, ats.blocks, 17
    from ..artifacts import read_manifest
    from ..exported import checkpoint_from_manifest

    man = read_manifest(Path(source))
    ckpt = checkpoint_from_manifest(man, model=model, trust_pickle=trust_pickle)
    blocks = tuple(man["ats"]["blocks"]) or resolve_ats(ckpt.config).blocks
    if ats_blocks is not None:
        blocks = resolve_ats(ckpt.config, blocks=ats_blocks).blocks
    return ckpt, blocks, int(man["graph"].get("opset", 17))


def _sweep_tokens(cfg: ViTConfig, step: int, tokens: Sequence[int] | None) -> list[int]:
    lo, hi = cfg.num_prefix_tokens + 1, cfg.num_tokens
    if tokens is not None:
        out = sorted({int(t) for t in tokens} | {hi})
        bad = [t for t in out if not lo <= t <= hi]
        if bad:
            raise ConfigError(f"sweep token counts {bad} are outside {lo}..{hi}")
        return out
    if step < 1:
        raise ConfigError(f"sweep step {step} must be >= 1")
    return sorted({lo, hi} | set(range(step, hi, step)))


def tune_k(
    source: LoadedCheckpoint | str | Path,
    *,
    backend: str = "onnxruntime",
    batch: int = 1,
    ats_blocks: str | Sequence[int] | None = None,
    target_ratio: float = 1.0,
    margin: float = 0.02,
    k_min: int = 2,
    step: int = 8,
    tokens: Sequence[int] | None = None,
    refine: bool = False,
    step_rel: float = 0.02,
    stack_depth: int = 2,
    reps: int = 15,
    warmup: int = 3,
    threads: int = 0,
    fp16: bool = True,
    model: str | Path | None = None,
    trust_pickle: bool = False,
    progress: bool = True,
    check_reps: int = 40,
    checks: int = 4,
    confidence: float = 0.95,
    ort_ops: str | Path | None = None,
) -> TuneResult:
    """Propose per-block K on the latency steps of ``backend`` at ``batch``, then measure it against dense.

    ``source`` is a checkpoint or an export directory (its ATS blocks are kept; ``ats_blocks`` overrides).
    ``target_ratio`` 1.0 asks for "never slower than dense"; 0.8 for 20% faster. ``margin`` is kept in
    hand for measurement noise. ``refine`` re-sweeps token by token inside each detected jump (finds the
    exact step edge; costs up to ``step - 1`` points per jump). ``step_rel`` is the smallest rise, relative
    to the stack's time at full tokens, that counts as a new step (the noise estimate may raise it).
    ``check_reps`` rounds time each checked schedule against dense; at most ``checks`` schedules are
    measured; ``confidence`` is the level of the bootstrap interval that must lie at or below the target.
    ``ort_ops`` (onnxruntime; default $ATS_ORT_OPS): the sampler op library; with it the ATS models are judged
    as they run with it (one sampler op per block), which lowers the overhead every schedule pays.
    """
    if batch < 1:
        raise ConfigError(f"batch {batch} must be >= 1")
    if not 0 < target_ratio <= 2:
        raise ConfigError(f"target ratio {target_ratio} must be in (0, 2]; 1.0 = never slower than dense")
    if not 0 <= margin < 0.5:
        raise ConfigError(f"margin {margin} must be in [0, 0.5)")
    if check_reps < 5 or checks < 1:
        raise ConfigError(f"check reps {check_reps} must be >= 5 and checks {checks} >= 1 (they decide the schedule)")
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence {confidence} must be in [0.5, 1)")
    ckpt, blocks, opset = _source(source, model, trust_pickle, ats_blocks)
    cfg = ckpt.config
    if not blocks:
        raise ConfigError("no ATS blocks to tune; pass --ats-blocks")
    if not 1 <= stack_depth <= cfg.depth:
        raise ConfigError(f"stack depth {stack_depth} must be in 1..{cfg.depth}")
    if not 2 <= k_min <= cfg.n_ref:
        raise ConfigError(f"k_min {k_min} must be in 2..{cfg.n_ref}")
    from ..exporters.export import preprocess_for
    from ..inputs import random_inputs

    full, info = make_factory(backend, ckpt, opset=opset, threads=threads, fp16=fp16, ort_ops=ort_ops)
    stack = _stack_factory(backend, ckpt, opset=opset, threads=threads, fp16=fp16)
    x = random_inputs(batch, preprocess_for(cfg), seed=0)
    ns = _sweep_tokens(cfg, step, tokens)
    big_n = cfg.num_tokens
    dense = ATSConfig()

    def sweep(points: list[int], *, with_models: bool, advance) -> dict[str, list[float]]:
        runners: dict[str, Runner] = {f"n{n}": stack(n, stack_depth, None, batch) for n in points}
        if with_models:
            runners["ats_full"] = full(ATSConfig(blocks=tuple(blocks), k_schedule=(cfg.n_ref,) * len(blocks)), batch)
            runners["dense"] = full(dense, batch)
        try:
            timers = {k: step_timer(r, x)[0] for k, r in runners.items()}
            return measure_interleaved(timers, warmup=warmup, reps=reps, advance=advance)
        finally:
            for r in runners.values():
                r.close()

    with progress_bar(progress, (len(ns) + 2) * (warmup + reps), f"tune-k sweep ({backend}, batch {batch})") as adv:
        samples = sweep(ns, with_models=True, advance=adv)
    # Contention on a shared device only ever adds time, so the sweep curve uses a low quantile (p20),
    # far steadier than the median; the noise estimate is how far the median sits above it.
    p50 = {n: float(np.percentile(samples[f"n{n}"], SWEEP_QUANTILE)) for n in ns}
    spread = [
        (np.percentile(samples[f"n{n}"], 50) - np.percentile(samples[f"n{n}"], SWEEP_QUANTILE)) / np.sqrt(reps)
        for n in ns
    ]
    fit = isotonic([p50[n] for n in ns])
    threshold = max(step_rel * fit[-1], 2.0 * float(np.median(spread)))
    if refine:
        extra_pts: list[int] = []
        for a, b, fa, fb in zip(ns[:-1], ns[1:], fit[:-1], fit[1:]):
            if fb - fa > threshold and b - a > 1:
                extra_pts.extend(range(a + 1, b))
        extra_pts = extra_pts[:64]
        if extra_pts:
            with progress_bar(progress, len(extra_pts) * (warmup + reps), "tune-k refine") as adv:
                more = sweep(extra_pts, with_models=False, advance=adv)
            p50.update({n: float(np.percentile(more[f"n{n}"], SWEEP_QUANTILE)) for n in extra_pts})
            ns = sorted(p50)
            fit = isotonic([p50[n] for n in ns])
    # The sampler overhead per stage: the full model with K = n_ref (no slot saved anywhere) over dense,
    # from the per-round ratios (paired, so a slow spell of the machine hits both terms alike).
    dense_ms = float(np.percentile(samples["dense"], SWEEP_QUANTILE))
    over = paired_ratio(samples["ats_full"], samples["dense"], confidence=confidence)
    overhead = (over.median - 1.0) * dense_ms / len(blocks)
    ends = plateau_ends(ns, fit, threshold)
    fit_arr = np.asarray(fit)

    def per_block(n: float) -> float:
        return float(np.interp(n, ns, fit_arr)) / stack_depth

    extra = cfg.num_prefix_tokens - 1
    cands = sorted({min(e - extra, cfg.n_ref) for e in ends if e - extra >= k_min} | {cfg.n_ref})
    sched = dict.fromkeys(blocks, cfg.n_ref)

    def pred(s: dict[int, int]) -> float:
        ats = ATSConfig(blocks=tuple(blocks), k_schedule=tuple(s[b] for b in blocks))
        return predict_ms(cfg, ats, per_block, dense_ms=dense_ms, overhead_ms=overhead)

    def slots(s: dict[int, int]) -> int:
        n, tot = big_n, 0
        for i in range(cfg.depth):
            if i in s:
                n = block_output_slots(s[i], n, cfg.num_prefix_tokens)
            tot += n
        return tot

    # The path: lower one block by one step at a time, best predicted saving per slot lost first.
    path = [(dict(sched), pred(sched))]
    while True:
        current = path[-1][1]
        best = None
        for b in blocks:
            lower = [c for c in cands if c < sched[b]]
            if not lower:
                continue
            trial = {**sched, b: lower[-1]}
            saving, lost = current - pred(trial), slots(sched) - slots(trial)
            score = saving / max(lost, 1)
            if best is None or score >= best[0]:  # ties go to the later block
                best = (score, trial)
        if best is None:
            break
        sched = best[1]
        path.append((dict(sched), pred(sched)))
    goal = target_ratio * dense_ms * (1.0 - margin)
    i = next((j for j, (_, p) in enumerate(path) if p <= goal), len(path) - 1)
    tried: list[dict] = []
    chosen = None
    with progress_bar(progress, checks * 2 * (warmup + check_reps), "tune-k check") as adv:
        while len(tried) < checks:
            ks = _effective(cfg, blocks, path[i][0])
            ats = ATSConfig(blocks=tuple(blocks), k_schedule=ks)
            runners = {"ats": full(ats, batch), "dense": full(dense, batch)}
            try:
                timers = {k: step_timer(r, x)[0] for k, r in runners.items()}
                meas = measure_interleaved(timers, warmup=warmup, reps=check_reps, advance=adv)
            finally:
                for r in runners.values():
                    r.close()
            ratio = paired_ratio(meas["ats"], meas["dense"], confidence=confidence)
            check = {
                "k_schedule": list(ks),
                "predicted_ratio": round(path[i][1] / dense_ms, 4),
                "ratio": round(ratio.median, 4),
                "low": round(ratio.low, 4),
                "high": round(ratio.high, 4),
                "ats": summarize(meas["ats"], batch),
                "dense": summarize(meas["dense"], batch),
                "path_index": i,
            }
            tried.append(check)
            if ratio.high <= target_ratio:
                chosen = (i, ks, ratio, check)
                break
            # Missed by (high - target): move down the path to the first schedule predicted to save that
            # much more (the prediction's error at this point, corrected by the measurement), at least one.
            need = path[i][1] - (ratio.high - target_ratio) * dense_ms
            nxt = next((j for j in range(i + 1, len(path)) if path[j][1] <= need), len(path) - 1)
            if nxt <= i:
                break  # nothing lower to try
            i = nxt
    feasible = chosen is not None
    if chosen is None:  # report the last measured schedule, marked not feasible
        chosen = (tried[-1]["path_index"], tuple(tried[-1]["k_schedule"]), None, tried[-1])
    i, k_sched, ratio, check = chosen
    pr = path[i][1] / dense_ms
    m_ats, m_dense = check["ats"], check["dense"]
    return TuneResult(
        backend=info["name"],
        batch=batch,
        blocks=tuple(blocks),
        k_schedule=tuple(k_sched),
        feasible=feasible,
        target_ratio=target_ratio,
        sweep_tokens=tuple(ns),
        sweep_ms=tuple(p50[n] for n in ns),
        fit_ms=tuple(float(v) for v in fit_arr),
        stack_depth=stack_depth,
        step_ends=tuple(ends),
        overhead_ms=overhead,
        overhead_ratio=(over.median, over.low, over.high),
        dense_sweep_ms=dense_ms,
        predicted_ms=pr * m_dense["p50_ms"],
        predicted_ratio=pr,
        measured_ms=m_ats,
        measured_dense_ms=m_dense,
        measured_ratio=check["ratio"],
        ratio_low=check["low"],
        ratio_high=check["high"],
        confidence=confidence,
        checks=tuple({k: v for k, v in c.items() if k not in ("ats", "dense")} for c in tried),
        sampler=str(info["sampler"]),
        ort_ops=info.get("ort_ops"),
    )


def _effective(cfg: ViTConfig, blocks: Sequence[int], sched: dict[int, int]) -> tuple[int, ...]:
    """K per block clamped to the slots that reach it (a K above them changes nothing)."""
    extra = cfg.num_prefix_tokens - 1
    n, out = cfg.num_tokens, {}
    for i in range(cfg.depth):
        if i in sched:
            k = min(sched[i], n - extra)
            out[i] = max(k, 2)
            n = block_output_slots(k, n, cfg.num_prefix_tokens)
    return tuple(out[b] for b in blocks)


def format_tune(res: TuneResult) -> str:
    """Human-readable summary of a tune-k run."""
    o_med, o_lo, o_hi = res.overhead_ratio
    ci = f"{res.confidence:.0%} interval"
    head = (
        f"tune-k on {res.backend}, batch {res.batch}: K schedule {list(res.k_schedule)} for blocks {list(res.blocks)}"
        if res.feasible
        else f"tune-k on {res.backend}, batch {res.batch}: not feasible at this batch (no schedule measured at or "
        f"below {res.target_ratio:g}x dense with {ci})"
    )
    lines = [
        head,
        f"  sampler: {res.sampler}",
        f"  steps (largest token count per plateau): {list(res.step_ends)}",
        f"  sampler overhead {res.overhead_ms:+.3f} ms per stage (K = n_ref vs dense: {o_med:.3f}x "
        f"[{o_lo:.3f}, {o_hi:.3f}]); dense p20 {res.dense_sweep_ms:.3f} ms in the sweep",
    ]
    for c in res.checks:
        verdict = "ok" if c["high"] <= res.target_ratio else "slower than the target"
        lines.append(
            f"  checked {c['k_schedule']}: predicted {c['predicted_ratio']:.3f}x, measured {c['ratio']:.3f}x "
            f"[{c['low']:.3f}, {c['high']:.3f}] ({ci}) -> {verdict}"
        )
    lines.append(
        f"  measured  {res.measured_ms['p50_ms']:.3f} ms vs dense {res.measured_dense_ms['p50_ms']:.3f} ms "
        f"(p50s; ratio {res.measured_ratio:.3f}x [{res.ratio_low:.3f}, {res.ratio_high:.3f}])"
    )
    return "\n".join(lines)
