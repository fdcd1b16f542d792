"""Train the demo model: a DeiT-Ti-shaped ViT, dense, on the procedural shapes (``shapes.py``).

Recipe (DeiT's, scaled down): AdamW (weight decay 0.05, none on biases, norms, tokens and pos_embed),
linear warm-up then cosine decay per phase, label smoothing 0.1, gradient clipping, timm's init
(truncated normal 0.02). No augmentation: every training step draws new images (sample index =
step x batch + j of seed ``TRAIN_SEED``), so the model never sees an image twice.

Two phases, as DeiT changes resolution: phase 1 at a low resolution (112 x 112 = 7 x 7 patches, about
4x cheaper per image than 224), then the position embedding is resized bicubically to the target grid
(14 x 14) and phase 2 fine-tunes at 224. Either phase may have 0 steps.

Deterministic given the seed on one device and thread count (``torch.use_deterministic_algorithms``);
checkpoints are timm-named safetensors (``load_checkpoint`` reads them) plus a ``state.pt`` with the
optimiser, so an interrupted run resumes where its last checkpoint left off.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..model.config import ViTConfig
from ..model.presets import deit_tiny_patch16_224
from .shapes import DEFAULT_SCALE, HELDOUT_SEED, NUM_CLASSES, TRAIN_SEED, ShapesDataset

__all__ = [
    "Phase",
    "TrainConfig",
    "TrainResult",
    "train",
    "resize_pos_embed",
    "model_config",
    "init_weights",
    "save_weights",
    "lr_at",
    "measure_throughput",
]


MONITOR_OFFSET = 10_000_000  # held-out indices used to watch training (final evaluation uses 0..)


@dataclass(frozen=True)
class Phase:
    img_size: int
    steps: int
    lr: float
    warmup: int
    # Object diameter range (fraction of the side) for this phase; None: TrainConfig.scale. Larger
    # objects early are a curriculum; the monitoring top-1 always uses TrainConfig.scale.
    scale: tuple[float, float] | None = None
    # ATS-aware fine-tuning: every other step (see ats_every) runs the model with ATS in the paper's
    # placement (blocks 3..11 of 12, K = token count, static shapes) on the classification loss, the steps
    # between run it dense as before. A ViT trained dense on these images concentrates its CLS attention
    # so sharply that ATS keeps ~10-20 tokens and loses the class; this teaches the same weights to
    # classify from the tokens ATS keeps while staying accurate dense.
    ats: bool = False
    # Attention guidance (ATS phases only, weight; 0: off): on every ATS step, each ATS block's
    # significance scores (the ones its sampler reads, r_j = sum_h A_h[CLS, j] * ||V_j||), normalised over
    # the block's valid patches, are pulled towards a target that puts 1 - TrainConfig.guide_background
    # evenly on the object's patches (the token-labelling mask: patches covered >= token_threshold by the
    # rendered object) and the rest evenly on the other valid patches, by a cross-entropy term averaged
    # over the ATS blocks. The sampler then spends most of its grid on the object: every object patch
    # carries several grid steps of mass, so ATS keeps the object and thins the background, which is what
    # the demo exists to show. The selection itself is not differentiable and is not changed; only the
    # weights learn.
    guide: float = 0.0
    # ATS phases: one step in ats_every runs through ATS (2: every other step, the default; 1: every
    # step, twice the ATS exposure per minute, with no dense step between to keep token labelling going).
    ats_every: int = 2

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.img_size < 1:
            raise ConfigError(f"phase image size {self.img_size} is not positive; use a multiple of the patch size 16")
        if self.steps < 0:
            raise ConfigError(f"phase steps {self.steps} is negative; use 0 or more (0: the phase trains nothing)")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"phase learning rate {self.lr} is not a number >= 0; use e.g. 5e-4")
        if self.warmup < 0:
            raise ConfigError(f"phase warm-up {self.warmup} is negative; use 0 or more steps")
        if self.scale is not None:
            _check_scale(self.scale, "phase scale SMIN:SMAX")
        if not (math.isfinite(self.guide) and self.guide >= 0):
            raise ConfigError(f"phase guide={self.guide} is not a weight >= 0; use e.g. guide=0.5 (0: off)")
        if self.ats_every < 1:
            raise ConfigError(f"phase ats_every must be at least 1, got {self.ats_every}; use ats=N with N >= 1")


def _check_scale(scale, what: str) -> None:
    """An object diameter range (fraction of the side): 0 < MIN <= MAX (the image size bounds MAX, see
    :func:`_max_scale`)."""
    from ..errors import ConfigError

    lo, hi = scale
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        lo_d, hi_d = DEFAULT_SCALE
        raise ConfigError(f"{what} {lo:g} {hi:g} is not a range 0 < MIN <= MAX; use e.g. {lo_d} {hi_d}")


def _max_scale(img_size: int) -> float:
    """Largest object diameter (fraction of the side, two decimals) whose bounding box (aspect up to 1.15,
    2 px margin: ``shapes._object_mask``) fits in an ``img_size`` image."""
    return math.floor(100 * (img_size // 2 - 2) / (img_size / 2 * 1.15)) / 100


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str, *, auto: bool = True) -> None:
    """Refuse a device string other than cpu, cuda, cuda:N (and auto where ``auto``) with one line."""
    from ..errors import ConfigError

    if not ((auto and device == "auto") or _DEVICE.fullmatch(device)):
        names = "auto, cpu, cuda or cuda:N" if auto else "cpu, cuda or cuda:N"
        raise ConfigError(f"--device {device!r} is not a device; use {names}")


# Share of the attention-guidance target spread evenly over the valid background patches. The authors'
# rule never keeps the lowest-scored patch, so a block whose kept set held the object alone would drop
# one object patch per ATS block (measured on the dense-trained model: recall 0.89 at block 4 falling
# to 0.54 at block 11, K' 18.6 -> 11.0). Background patches with a small even share keep a buffer of
# low-scored tokens that the rule drops instead.
GUIDE_BACKGROUND = 0.2


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in every checkpoint's metadata)."""

    phases: tuple[Phase, ...] = (
        Phase(img_size=112, steps=3000, lr=5e-4, warmup=200),
        Phase(img_size=224, steps=300, lr=1e-4, warmup=20),
    )
    batch_size: int = 32
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    seed: int = TRAIN_SEED
    data_seed: int = TRAIN_SEED
    scale: tuple[float, float] = DEFAULT_SCALE
    # Token labelling (as LV-ViT): an auxiliary linear head classifies every patch token as the object's
    # class (patch covered >= token_threshold by the object) or background, with loss weight
    # token_label. It gives the attention a dense signal where the CLS loss alone leaves a ViT trained
    # from scratch on a plateau at chance for tens of thousands of images. The head is dropped from the
    # saved weights (they keep timm's keys); 0 turns it off.
    token_label: float = 1.0
    token_threshold: float = 0.15
    # bf16 autocast (CPUs with AVX512-BF16/AMX and GPUs: about 3x faster than fp32 on this task's CPU);
    # "none" trains in fp32. Weights and optimiser state stay fp32 either way.
    amp: str = "bf16"
    # Exponential moving average of the weights (0: off); the EMA weights are what gets saved and monitored.
    ema: float = 0.0
    # Architecture overrides (the default is DeiT-Ti; tests shrink it).
    arch: dict = field(default_factory=dict)
    # Start from these weights (a safetensors file of this trainer or the shipped demo weights) instead
    # of timm's random init; the recipe records their sha256, not the path.
    init: str | None = None
    # Attention guidance's background share (see GUIDE_BACKGROUND; used by phases with guide > 0).
    guide_background: float = GUIDE_BACKGROUND
    # Bookkeeping, not part of the result:
    device: str = "cpu"
    threads: int | None = None
    out_dir: str = "runs/demo"
    ckpt_every_s: float = 300.0
    eval_every: int = 250
    eval_images: int = 200
    workers: int = 0  # data-generating processes (0: in the training process; use several on a GPU box)

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.amp not in ("none", "bf16"):
            raise ConfigError(f"--amp {self.amp!r} is unknown; use 'none' or 'bf16'")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema {self.ema} is outside [0, 1); use a decay such as 0.999, or 0 for no EMA")
        if not self.phases:
            raise ConfigError("no training phase: give at least one --phase (or --steps-low/--steps-high above 0)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} is not positive; use 1 or more images per step")
        if not (math.isfinite(self.token_label) and self.token_label >= 0):
            raise ConfigError(f"--token-label {self.token_label} is not a weight >= 0; use e.g. 1.0 (0: off)")
        if not 0 < self.token_threshold <= 1:
            raise ConfigError(f"token_threshold {self.token_threshold} is outside (0, 1]; use e.g. 0.15")
        if not 0 <= self.guide_background <= 1:
            raise ConfigError(f"--guide-background {self.guide_background} is outside [0, 1]; use e.g. 0.2")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ConfigError(f"min_lr {self.min_lr} is not a learning rate >= 0; use e.g. 1e-6")
        for name in ("weight_decay", "clip_grad"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} {v} is not a number >= 0; use 0 to turn it off")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing {self.label_smoothing} is outside [0, 1); use e.g. 0.1")
        _check_scale(self.scale, "--scale")
        check_device(self.device)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads} is not positive; use 1 or more, or leave it out")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} is negative; use 0 (no worker processes) or more")
        if math.isnan(self.ckpt_every_s) or self.ckpt_every_s < 0:
            raise ConfigError(f"--ckpt-every-s {self.ckpt_every_s} is not a number of seconds >= 0; use e.g. 300")
        if self.eval_every < 0:
            raise ConfigError(f"--eval-every {self.eval_every} is negative; use a number of steps, or 0 for no checks")
        if self.eval_images < 1:
            raise ConfigError(
                f"--eval-images {self.eval_images} is not positive; use 1 or more (--eval-every 0 turns the checks off)"
            )
        patch = int(self.arch.get("patch_size", ViTConfig.patch_size))
        for i, ph in enumerate(self.phases):
            if ph.img_size % patch:
                raise ConfigError(
                    f"phase {i}: image size {ph.img_size} is not a multiple of the patch size {patch}; "
                    f"use a multiple of {patch} such as {7 * patch} or {14 * patch}"
                )
            top = _max_scale(ph.img_size)
            for what, sc in (("scale SMIN:SMAX", ph.scale), ("--scale", self.scale)):
                if sc is not None and sc[1] > top:
                    raise ConfigError(
                        f"phase {i}: {what} maximum {sc[1]:g} does not fit a {ph.img_size} px image; "
                        f"use at most {top:g} (or a larger image size)"
                    )
            if ph.guide and not ph.ats:
                raise ConfigError(f"phase {i}: attention guidance needs an ATS phase (add :ats before :guide=W)")
            if ph.guide and self.token_label <= 0:
                raise ConfigError("attention guidance uses the token labels: keep --token-label above 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["phases"] = [asdict(p) for p in self.phases]
        return d

    def recipe(self) -> dict:
        """The fields that decide the weights: a resumed run must match these, not the bookkeeping."""
        d = self.to_dict()
        for k in ("device", "threads", "out_dir", "ckpt_every_s", "eval_every", "eval_images", "workers"):
            d.pop(k)
        init = d.pop("init")
        if init is not None:
            from ..artifacts import sha256_file

            d["init_sha256"] = sha256_file(init)
        return d


class _Batches:
    """Batch g of a phase = dataset items g*batch .. g*batch+batch-1: the same in any worker layout.

    Items are (images, labels, patch-token labels); the last is None without token labelling.
    """

    def __init__(
        self, ds: ShapesDataset, batch_size: int, first: int, end: int, patch: int | None, threshold: float
    ) -> None:
        self.ds, self.bs, self.first, self.end = ds, batch_size, first, end
        self.patch, self.threshold = patch, threshold

    def __len__(self) -> int:
        return self.end - self.first

    def __getitem__(self, i: int):
        start = (self.first + i) * self.bs
        if self.patch is None:
            return (*self.ds.batch(start, self.bs), None)
        return self.ds.batch_with_tokens(start, self.bs, self.patch, self.threshold)


def _batch_iter(
    ds: ShapesDataset,
    batch_size: int,
    first: int,
    end: int,
    workers: int,
    patch: int | None = None,
    threshold: float = 0.15,
):
    src = _Batches(ds, batch_size, first, end, patch, threshold)
    if workers <= 0:
        return (src[i] for i in range(len(src)))
    import torch

    loader = torch.utils.data.DataLoader(
        src, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=4, persistent_workers=False
    )
    return _tuple_batches(loader)


def _tuple_batches(loader):
    for x, y, t in loader:
        yield x.numpy(), y.numpy(), None if t is None else t.numpy()


@dataclass(frozen=True)
class TrainResult:
    final_weights: Path
    steps: int
    last_loss: float
    history: list[dict]


def width_arch(width: int | None) -> dict:
    """Architecture overrides for ``--width W`` (a multiple of 64): embed dim W in W // 64 heads of 64, the
    head count every command infers from an embed dim; the rest is DeiT-Ti's. ``None``: DeiT-Ti (192)."""
    from ..errors import ConfigError

    if width is None:
        return {}
    if width < 64 or width % 64:
        raise ConfigError(
            f"--width {width} does not split into heads of 64 (heads = width // 64); use 64, 128, 192 or 256"
        )
    return {} if width == 192 else {"embed_dim": int(width), "num_heads": width // 64}


def model_config(img_size: int, arch: dict | None = None) -> ViTConfig:
    return deit_tiny_patch16_224(num_classes=NUM_CLASSES, **{**(arch or {}), "img_size": img_size})


def init_weights(model) -> None:
    """timm's ViT init: truncated normal 0.02 on Linear weights and pos_embed, zero biases, tiny CLS."""
    from torch import nn

    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resize_pos_embed(pos_embed, old_grid: int, new_grid: int, num_prefix: int = 1):
    """[1, prefix + g*g, C] -> [1, prefix + G*G, C], patch part resized bicubically (as DeiT and timm do)."""
    import torch
    import torch.nn.functional as F

    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, c).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=new_grid < old_grid
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, c)
    return torch.cat([prefix, grid], dim=1)


def _resized_state(model, new_cfg: ViTConfig) -> dict:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.cfg.grid, new_cfg.grid, new_cfg.num_prefix_tokens)
    return sd


class _Ema:
    """fp32 moving average of a model's floating-point state (timm's ModelEmaV2, without its warm-up)."""

    def __init__(self, model, decay: float, state: dict | None = None) -> None:
        self.decay = decay
        src = state if state is not None else model.state_dict()
        self.state = {k: v.detach().clone().float() for k, v in src.items()}

    def update(self, model) -> None:
        import torch

        with torch.no_grad():
            for k, v in model.state_dict().items():
                self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def model(self, like):
        """A copy of ``like`` carrying the averaged weights."""
        import copy

        m = copy.deepcopy(like)
        m.load_state_dict(self.state)
        return m


def lr_at(step: int, phase: Phase, min_lr: float) -> float:
    """Linear warm-up to ``phase.lr``, then cosine to ``min_lr`` at the end of the phase."""
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    t = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
    return min_lr + 0.5 * (phase.lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name in ("pos_embed", "cls_token", "dist_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_weights(model, path: str | Path, *, dtype: str = "float32", metadata: dict | None = None) -> Path:
    """timm-named safetensors of ``model`` (atomic: written to a temporary file, then renamed)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dt = {"float32": torch.float32, "float16": torch.float16}[dtype]
    sd = {k: v.detach().to("cpu", dt).contiguous() for k, v in model.state_dict().items()}
    metadata = {"num_heads": model.cfg.num_heads, "img_size": model.cfg.img_size, **(metadata or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)
    return path


def evaluate_dense(model, images: int, img_size: int, *, scale=DEFAULT_SCALE, batch: int = 50, device="cpu") -> float:
    """Top-1 (%) of ``model`` on ``images`` monitoring images at ``img_size``.

    They come from the held-out seed but from index ``MONITOR_OFFSET`` on, so the images of the final
    evaluation (indices 0..) stay untouched by anything done during training.
    """
    import torch

    ds = ShapesDataset(HELDOUT_SEED, images, img_size, scale=scale, offset=MONITOR_OFFSET)
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, images, batch):
            x, y = ds.batch(s, min(batch, images - s))
            pred = model(torch.from_numpy(x).to(device)).argmax(-1).cpu().numpy()
            correct += int((pred == y).sum())
    model.train(was_training)
    return 100.0 * correct / images


class _Log:
    """JSON lines to ``train.log`` and short human lines to stderr (a rich progress bar when a terminal)."""

    def __init__(self, path: Path) -> None:
        from rich.console import Console

        self.file = open(path, "a", buffering=1)
        self.console = Console(stderr=True)

    def __call__(self, **rec) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        self.file.write(json.dumps(rec) + "\n")
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "time")
        self.console.log(text)

    def close(self) -> None:
        self.file.close()


def _resumable(saved: dict | None, global_step: int, cfg: TrainConfig, recipe: dict | None = None) -> bool:
    """Whether a run saved with recipe ``saved`` at ``global_step`` can continue as ``cfg``: the same recipe,
    or the same recipe with more phases appended after the ones already finished. Training is
    deterministic and every phase starts from the previous phase's weights, so either way the result is
    the one a fresh run of ``cfg`` gives. ``recipe``: ``cfg.recipe()`` when the caller already has it."""
    if saved is None:
        return False
    new = recipe if recipe is not None else cfg.recipe()
    # Recipes saved before guide_background existed ran no guided phase: the share did not matter.
    if "guide_background" not in saved and not any(p.get("guide") for p in saved.get("phases", [])):
        saved = {**saved, "guide_background": new["guide_background"]}
    # Recipes saved before Phase.ats / guide / ats_every existed lack those keys: those phases ran dense,
    # unguided (and an ATS phase ran ATS every other step).
    old_phases = [{"ats": False, "guide": 0.0, "ats_every": 2, **p} for p in saved.get("phases", [])]
    if {**saved, "phases": old_phases} == new:
        return True
    new_phases = new["phases"]
    same_rest = {k: v for k, v in saved.items() if k != "phases"} == {k: v for k, v in new.items() if k != "phases"}
    finished = sum(p["steps"] for p in old_phases) == global_step
    return same_rest and finished and new_phases[: len(old_phases)] == old_phases


def _set_determinism(cfg: TrainConfig) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def _resolve_device(device: str, *, auto: bool = True) -> str:
    """``device`` checked (cpu, cuda, cuda:N; ``auto`` where allowed: cuda when torch sees a GPU, else cpu)."""
    import torch

    from ..errors import ConfigError

    check_device(device, auto=auto)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"--device {device}: torch sees {n} CUDA GPU(s); use cuda:0..cuda:{n - 1} or cpu")
    return device


def train(cfg: TrainConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """Run all phases; checkpoints and ``train.log`` go to ``cfg.out_dir``. Returns the final weights' path.

    Files: ``last.safetensors`` (latest weights, at the current phase's resolution), ``state.pt``
    (optimiser, step, for resuming), ``phase<i>_end.safetensors``, ``final.safetensors`` (fp32, at the
    last phase's resolution) and ``train.log`` (JSON lines: loss, lr, images/s, held-out top-1).
    """
    import torch
    import torch.nn.functional as F
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..model.vit import VisionTransformer

    cfg = replace(cfg, device=_resolve_device(cfg.device))
    if cfg.init and not Path(cfg.init).is_file():
        from ..errors import ConfigError

        raise ConfigError(f"--init {cfg.init}: no such file; pass a .safetensors file of `demo train` or 'demo'")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        from ..errors import ConfigError

        raise ConfigError(f"--out {out} is a file, not a directory; pass a run directory (new or existing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        log = _Log(out / "train.log")
    except OSError as exc:  # an existing file, a read-only or full disk, no permission
        from ..errors import ConfigError

        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"--out {out}: cannot write the run there ({why}); pass a writable directory") from None
    _set_determinism(cfg)
    meta = {"train_config": json.dumps(cfg.to_dict())}
    dev = torch.device(cfg.device)

    # Global step g runs over all phases; resume restores weights, optimiser and g.
    state_path = out / "state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=False) if resume and state_path.exists() else None
    # The recipe once, at the start: with --init it holds the starting weights' sha256 as they were when
    # the run began (the file may be replaced later, e.g. when the result is shipped over the demo
    # weights it started from), and every checkpoint must record that, not a later hash.
    recipe = cfg.recipe()
    if state is not None and not _resumable(state.get("recipe"), state.get("global_step", 0), cfg, recipe):
        state = None  # a different recipe: start over rather than mixing runs
    g0 = state["global_step"] if state else 0
    init_sha = {"init_sha256": recipe["init_sha256"]} if cfg.init else {}
    if state:
        log(event="resume", global_step=g0, config=json.dumps(cfg.to_dict()), argv=" ".join(sys.argv), **init_sha)
    else:
        log(
            event="start",
            config=json.dumps(cfg.to_dict()),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            argv=" ".join(sys.argv),
            **init_sha,
        )
    if cfg.amp == "bf16" and dev.type == "cpu":
        slow = bf16_slowdown()
        log(event="amp", amp=cfg.amp, bf16_slowdown=slow)
        if slow > BF16_SLOW:
            why = "no native bf16 units (AVX512-BF16 or AMX)" if slow > 10 else "native bf16, but slower here"
            log(
                event="warning",
                bf16_slowdown=slow,
                message=f"bf16 matrix products run {slow:.1f}x slower than float32 on this CPU ({why}); "
                "train with --amp none here (faster; its weights differ from a bf16 run's)",
            )

    # The token-labelling head lives across phases (it sees one token at a time: resolution-free).
    aux = torch.nn.Linear(model_config(cfg.phases[0].img_size, cfg.arch).embed_dim, NUM_CLASSES + 1)
    torch.nn.init.trunc_normal_(aux.weight, std=0.02)
    torch.nn.init.zeros_(aux.bias)
    aux = aux.to(dev).train()
    if state and "aux" in state:
        aux.load_state_dict(state["aux"])
    use_tokens = cfg.token_label > 0
    model = None
    ema: _Ema | None = None
    history: list[dict] = []
    loss_val = float("nan")
    g_start = 0
    for pi, phase in enumerate(cfg.phases):
        g_end = g_start + phase.steps
        vcfg = model_config(phase.img_size, cfg.arch)
        new = VisionTransformer(vcfg)
        if model is None:
            if cfg.init:
                _load_init(new, cfg.init)
            else:
                init_weights(new)
        else:
            new.load_state_dict(_resized_state(model, vcfg))
            if ema is not None:
                ema.state["pos_embed"] = resize_pos_embed(
                    ema.state["pos_embed"], model.cfg.grid, vcfg.grid, vcfg.num_prefix_tokens
                )
        model = new.to(dev).train()
        if cfg.ema and ema is None:
            ema = _Ema(model, cfg.ema)
        groups = _param_groups(model, cfg.weight_decay)
        if use_tokens:
            groups[0]["params"].append(aux.weight)
            groups[1]["params"].append(aux.bias)
        opt = torch.optim.AdamW(groups, lr=phase.lr, betas=(0.9, 0.999))
        if g_end <= g0:  # phase already done in a resumed run: only its weights matter
            if state and state["phase"] == pi:
                model.load_state_dict(state["model"])
                if ema is not None and state.get("ema") is not None:
                    ema = _Ema(model, cfg.ema, state["ema"])
            g_start = g_end
            continue
        if state and state["phase"] == pi:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            torch.set_rng_state(state["torch_rng"])
            if ema is not None and state.get("ema") is not None:
                ema = _Ema(model, cfg.ema, state["ema"])
        ds = ShapesDataset(cfg.data_seed, 2**62, phase.img_size, scale=phase.scale or cfg.scale)
        log(event="phase", phase=pi, img_size=phase.img_size, steps=phase.steps, tokens=vcfg.num_tokens)
        last_ckpt = time.monotonic()
        t_win, n_win, loss_win, guide_win = time.perf_counter(), 0, [], []
        prog = Progress(
            TextColumn(f"phase {pi} ({phase.img_size}px)"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            disable=not progress or not sys.stderr.isatty(),
            transient=False,
        )
        with prog:
            task = prog.add_task("train", total=phase.steps, completed=max(0, g0 - g_start), info="")
            first = max(g0, g_start)
            patch = vcfg.patch_size if use_tokens else None
            batches = _batch_iter(ds, cfg.batch_size, first, g_end, cfg.workers, patch, cfg.token_threshold)
            for g, (x, y, t) in zip(range(first, g_end), batches):
                step = g - g_start
                lr = lr_at(step, phase, cfg.min_lr)
                for grp in opt.param_groups:
                    grp["lr"] = lr
                x, y = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
                ats_step = phase.ats and step % phase.ats_every == phase.ats_every - 1
                guided = ats_step and phase.guide > 0
                recorded: list | None = [] if guided else None
                _set_ats(model, ats_step)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    feats, trace_ids, _ = model.forward_features(x, recorded)
                    logits = model.forward_head(feats)
                    tok = aux(feats[:, vcfg.num_prefix_tokens :]).flatten(0, 1) if use_tokens and not ats_step else None
                _set_ats(model, False)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if tok is not None:
                    tok_y = torch.from_numpy(t).to(dev).flatten()
                    loss = loss + cfg.token_label * F.cross_entropy(tok.float(), tok_y)
                if guided:
                    assert recorded is not None
                    obj = torch.from_numpy(t).to(dev) != NUM_CLASSES  # [B, patches] by original patch id
                    g_loss = guidance_loss(
                        recorded, trace_ids, obj, vcfg.num_prefix_tokens, background=cfg.guide_background
                    )
                    guide_win.append(float(g_loss.detach()))
                    loss = loss + phase.guide * g_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                if ema is not None:
                    ema.update(model)
                loss_val = float(loss.detach())
                if not math.isfinite(loss_val):
                    log(event="diverged", global_step=g + 1, loss=loss_val)
                    raise FloatingPointError(f"loss became {loss_val} at step {g + 1}; lower the learning rate")
                loss_win.append(loss_val)
                n_win += cfg.batch_size
                done = g + 1
                last_of_phase = done == g_end
                if done % 25 == 0 or last_of_phase:
                    ips = n_win / (time.perf_counter() - t_win)
                    rec = {
                        "event": "train",
                        "phase": pi,
                        "global_step": done,
                        "step": done - g_start,
                        "loss": float(np.mean(loss_win)),
                        "lr": lr,
                        "img_per_s": ips,
                        "img_size": phase.img_size,
                    }
                    if guide_win:
                        rec["guide_loss"] = float(np.mean(guide_win))
                    if cfg.eval_every and (done % cfg.eval_every == 0 or last_of_phase):
                        watched = _weights(model, ema)
                        rec["heldout_top1"] = evaluate_dense(
                            watched, cfg.eval_images, phase.img_size, scale=cfg.scale, device=cfg.device
                        )
                        if phase.ats:  # the same images through the paper's ATS placement
                            _set_ats(watched, True)
                            rec["heldout_top1_ats"] = evaluate_dense(
                                watched, cfg.eval_images, phase.img_size, scale=cfg.scale, device=cfg.device
                            )
                            _set_ats(watched, False)
                    history.append(rec)
                    log(**rec)
                    prog.update(task, info=f"loss {rec['loss']:.3f} {ips:.1f} img/s")
                    t_win, n_win, loss_win, guide_win = time.perf_counter(), 0, [], []
                prog.advance(task)
                if time.monotonic() - last_ckpt >= cfg.ckpt_every_s or last_of_phase:
                    save_weights(_weights(model, ema), out / "last.safetensors", metadata={**meta, "global_step": done})
                    torch.save(
                        {
                            "global_step": done,
                            "phase": pi,
                            "model": model.state_dict(),
                            "optim": opt.state_dict(),
                            "aux": aux.state_dict(),
                            "ema": None if ema is None else ema.state,
                            "torch_rng": torch.get_rng_state(),
                            "recipe": recipe,
                        },
                        out / "state.pt.tmp",
                    )
                    os.replace(out / "state.pt.tmp", state_path)
                    last_ckpt = time.monotonic()
        save_weights(_weights(model, ema), out / f"phase{pi}_end.safetensors", metadata={**meta, "global_step": g_end})
        g_start = g_end
    assert model is not None
    final = save_weights(_weights(model, ema), out / "final.safetensors", metadata={**meta, "global_step": g_start})
    log(event="done", global_step=g_start, weights=str(final))
    log.close()
    return TrainResult(final, g_start, loss_val, history)


BF16_SLOW = 1.0  # bf16 matrix products slower than float32 by more than this: --amp none is the faster choice
# Slower than this: the CPU has no bf16 units and emulates them (measured 40-66x and 450x on two AVX2-only AMD
# EPYCs); native bf16 measured between 0.3x and 2.2x. A bf16 run there takes days instead of hours.
BF16_EMULATED = 10.0


def default_amp_refusal(device: str, slowdown: float) -> str | None:
    """Why ``demo train`` without ``--amp`` must not start on ``device`` (the resolved one), or None.

    The default (bf16 autocast, the recipe's precision) is refused only on a CPU that emulates bf16:
    the run would take days. An explicit ``--amp bf16`` still runs there (with the trainer's warning)."""
    if device != "cpu" or slowdown <= BF16_EMULATED:
        return None
    return (
        f"this CPU has no native bf16: bf16 matrix products measured {slowdown:.0f}x slower than float32, so the "
        "default bf16 recipe would run for days here; pass --amp none (float32, whose weights differ from the "
        "bf16 recipe's) or --amp bf16 to run it anyway"
    )


def bf16_slowdown(size: int = 256, reps: int = 3) -> float:
    """Time of a bf16 matrix product over the float32 one on this CPU (best of ``reps``).

    Measured on 2-core machines: an AMD EPYC with AVX512-BF16 runs bf16 faster than float32 (a DeiT-Ti
    training step 3.4x); an AVX2-only AMD EPYC emulates it, 450x slower (0.3 against 136 GFLOP/s); an Intel
    Xeon with AVX512-BF16 runs it natively (oneDNN's avx512_core_bf16 kernels) yet at 82 against 182 GFLOP/s
    in float32 (1024 x 1024); training at 112 px ran 53 images/s in bf16 (a real run) against 65-67 in
    float32 (measured without data generation). The flag alone does not say which is faster, so the
    trainer measures.
    """
    import torch

    a = torch.randn(size, size)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x
        best = float("inf")
        # float32 is cheap (about 0.2 ms here): many tries, so one slow one (a context switch) cannot pass
        # for the float32 speed and hide an emulated bf16 (seen once: 49x measured as under 10x).
        for _ in range(max(reps, 20) if dt == torch.float32 else reps):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
        times[dt] = best
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def guidance_loss(recorded, trace_ids, obj, num_prefix: int = 1, *, background: float = GUIDE_BACKGROUND):
    """Attention-guidance loss (see :attr:`Phase.guide`), averaged over the ATS blocks of one forward pass.

    ``recorded``: per ATS block, its sampler input (scores [B, n] float32 in slot order, slot 0 = CLS;
    valid count [B]), as ``forward_features(x, sampler_inputs=...)`` records it, scores still attached to
    the graph. ``trace_ids``: per ATS block, the original token ids of its output slots (the input slots of
    the next one). ``obj``: [B, patches] bool, patch p (original order) belongs to the object. Per image and
    block: cross-entropy between the target and the scores normalised over the valid patches, where the
    target puts ``1 - background`` evenly on the object patches among the valid slots and ``background``
    evenly on the other valid patches (all of it on the object when there are none); images without an
    object patch there are skipped.
    """
    import torch

    b, n_in = recorded[0][0].shape[0], recorded[0][0].shape[1] + (num_prefix - 1)
    dev = obj.device
    obj_tok = torch.cat([torch.zeros(b, num_prefix, dtype=torch.bool, device=dev), obj], dim=1)
    ids_in = [torch.arange(n_in, device=dev).expand(b, n_in)] + list(trace_ids[:-1])
    terms = []
    for (scores, count), ids in zip(recorded, ids_in):
        if num_prefix > 1:  # the sampler does not see the distillation token (slot 1)
            ids = torch.cat([ids[:, :1], ids[:, num_prefix:]], dim=1)
        slots = torch.arange(scores.shape[1], device=dev)
        valid = (slots[None, :] >= 1) & (slots[None, :] < count[:, None])
        on_obj = torch.gather(obj_tok, 1, ids) & valid
        on_bg = valid & ~on_obj
        r = torch.where(valid, scores.float(), torch.zeros((), device=dev))
        logp = torch.log(r / r.sum(dim=1, keepdim=True).clamp_min(1e-12) + 1e-8)
        n_obj, n_bg = on_obj.sum(dim=1, keepdim=True), on_bg.sum(dim=1, keepdim=True)
        bg_share = torch.where(n_bg > 0, torch.full((), background, device=dev), torch.zeros((), device=dev))
        target = on_obj.float() * (1 - bg_share) / n_obj.clamp(min=1) + on_bg.float() * bg_share / n_bg.clamp(min=1)
        ce = -(target * logp).sum(dim=1)
        has = (n_obj[:, 0] > 0).float()
        terms.append((ce * has).sum() / has.sum().clamp(min=1.0))
    return torch.stack(terms).mean()


def _load_init(model, path: str) -> None:
    """Start ``model`` from the weights in ``path`` (position embedding resized to its grid)."""
    from safetensors.torch import load_file

    from ..errors import ConfigError

    try:
        sd = {k: v.float() for k, v in load_file(path).items()}
        pe = sd["pos_embed"]
        old_grid = int(round((pe.shape[1] - model.cfg.num_prefix_tokens) ** 0.5))
        sd["pos_embed"] = resize_pos_embed(pe, old_grid, model.cfg.grid, model.cfg.num_prefix_tokens)
        model.load_state_dict(sd)
    except Exception as exc:  # safetensors' header errors, missing keys, shape mismatches
        msg = str(exc).splitlines()[0][:200]
        raise ConfigError(f"--init {path}: not weights of this model ({msg}); pass weights of `demo train`") from None


def _weights(model, ema: _Ema | None):
    """The weights a run reports and saves: the EMA's when it keeps one."""
    return model if ema is None else ema.model(model)


def measure_throughput(
    img_size: int,
    *,
    batch_size: int = 32,
    steps: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    arch: dict | None = None,
    amp: str = "none",
) -> dict:
    """Training and inference images/s of the dense model at ``img_size`` (after one warm-up step);
    ``amp="bf16"`` runs under bf16 autocast as the trainer does."""
    import torch
    import torch.nn.functional as F

    from ..model.vit import VisionTransformer

    if threads:
        torch.set_num_threads(threads)
    model = VisionTransformer(model_config(img_size, arch)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    train_ips = batch_size * steps / (time.perf_counter() - t0)
    model.eval()
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                                enabled=amp == "bf16"):
        model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync(device)
        eval_ips = batch_size * steps / (time.perf_counter() - t0)
    return {
        "img_size": img_size,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "amp": amp,
        "train_img_per_s": train_ips,
        "eval_img_per_s": eval_ips,
    }


def _sync(device: str) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously: a timer must not stop before it)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _set_ats(model, on: bool) -> None:
    """Switch the paper's ATS placement on or off in ``model`` in place (same weights; training only).

    Dynamic shapes: each batch carries only as many slots as its largest K' (what the valid tokens see is
    the same as with static shapes, padding never reaches them), so ATS steps cost what ATS saves.
    """
    from ..model.config import ATSConfig, resolve_ats

    ats = resolve_ats(model.cfg, shape_mode="dynamic") if on else ATSConfig()
    model.ats = ats
    for i, blk in enumerate(model.blocks):
        blk.k_max = ats.k_for(i)


def _parse_phase(text: str) -> Phase:
    """``IMG:STEPS:LR:WARMUP[:SMIN:SMAX][:ats[=N][:guide=W]]`` -> Phase (argparse turns the ValueError of a
    malformed text into a usage error; a value out of range is a ConfigError naming the text)."""
    parts = text.split(":")
    guide, guided = 0.0, parts[-1].startswith("guide=")
    if guided:
        guide = float(parts[-1][len("guide=") :])
        parts = parts[:-1]
    ats, every = False, Phase.ats_every
    if parts[-1].split("=")[0] == "ats":
        n = parts[-1][len("ats=") :] if "=" in parts[-1] else str(every)
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"ats=N needs a whole number N >= 1 (one step in N runs ATS), got {text!r}")
        ats, every = True, int(n)
        parts = parts[:-1]
    elif guided:
        raise ValueError(f"guide=W needs an ATS phase (...:ats:guide=W), got {text!r}")
    if len(parts) not in (4, 6):
        raise ValueError(f"expected IMG:STEPS:LR:WARMUP[:SMIN:SMAX][:ats[=N][:guide=W]], got {text!r}")
    scale = (float(parts[4]), float(parts[5])) if len(parts) == 6 else None
    from ..errors import ConfigError

    try:
        return Phase(int(parts[0]), int(parts[1]), float(parts[2]), int(parts[3]), scale, ats, guide, every)
    except ConfigError as exc:  # a value out of range: name the --phase it came from
        raise ConfigError(f"--phase {text}: {exc}") from None


def _main(argv: list[str] | None = None) -> int:
    """``python -m ats_deploy.demo.train --out /tmp/ats_train/run --steps-low 3000 --steps-high 300``."""
    import argparse

    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--steps-low", type=int, default=d.phases[0].steps)
    p.add_argument("--steps-high", type=int, default=d.phases[1].steps)
    p.add_argument("--img-low", type=int, default=d.phases[0].img_size)
    p.add_argument("--img-high", type=int, default=d.phases[1].img_size)
    p.add_argument("--lr", type=float, default=d.phases[0].lr)
    p.add_argument("--lr-high", type=float, default=d.phases[1].lr)
    p.add_argument("--warmup", type=int, default=d.phases[0].warmup)
    p.add_argument("--warmup-high", type=int, default=d.phases[1].warmup)
    p.add_argument(
        "--scale-low",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="object diameter range of the low-resolution phase (curriculum); default: the data's",
    )
    p.add_argument(
        "--phase",
        action="append",
        type=_parse_phase,
        metavar="IMG:STEPS:LR:WARMUP[:SMIN:SMAX][:ats[=N][:guide=W]]",
        help="a training phase (repeat for several, in order); replaces the --*-low/--*-high options",
    )
    p.add_argument("--token-label", type=float, default=d.token_label, help="token-labelling loss weight (0: off)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--amp", choices=("bf16", "none"), default=d.amp, help="bf16 autocast or fp32 training")
    p.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the saved weights (0: off)")
    p.add_argument("--scale", type=float, nargs=2, default=d.scale, metavar=("MIN", "MAX"), help="object diameter")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ckpt-every-s", type=float, default=d.ckpt_every_s)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-images", type=int, default=d.eval_images)
    p.add_argument("--workers", type=int, default=0, help="data-generating processes (GPU boxes: 8-16)")
    p.add_argument("--init", default=None, help="start from these .safetensors weights")
    p.add_argument("--width", type=int, default=None, help="embed dim (heads = width // 64; default 192, DeiT-Ti)")
    p.add_argument("--no-resume", action="store_true")
    from ..errors import AtsDeployError

    try:
        return _run_main(p.parse_args(argv))
    except AtsDeployError as exc:  # bad input: one line (argparse's usage error), no traceback
        p.error(str(exc).splitlines()[0])


def _run_main(a) -> int:
    phases = tuple(
        ph
        for ph in (
            Phase(a.img_low, a.steps_low, a.lr, a.warmup, tuple(a.scale_low) if a.scale_low else None),
            Phase(a.img_high, a.steps_high, a.lr_high, a.warmup_high),
        )
        if ph.steps > 0
    )
    if a.phase:
        phases = tuple(a.phase)
    cfg = TrainConfig(
        phases=phases,
        token_label=a.token_label,
        batch_size=a.batch_size,
        amp=a.amp,
        ema=a.ema,
        scale=tuple(a.scale),
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        out_dir=a.out,
        ckpt_every_s=a.ckpt_every_s,
        eval_every=a.eval_every,
        eval_images=a.eval_images,
        workers=a.workers,
        init=a.init,
        arch=width_arch(a.width),
    )
    res = train(cfg, resume=not a.no_resume)
    print(res.final_weights)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
