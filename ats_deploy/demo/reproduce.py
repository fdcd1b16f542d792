"""``ats-deploy demo reproduce``: the shipped demo weights' whole recipe in one command, checked against
what shipped.

The shipped weights came from three ``demo train`` runs, each started (``--init demo``) from the fp16 file
``demo ship`` wrote from the one before. :data:`SHIPPED_STAGES` holds those three commands as the model
card records them (a unit test keeps the two equal); :func:`reproduce` runs them in order in fresh
directories, ships every stage the way ``demo ship`` did (fp16 weights, evaluation, card) but into the run
directory, never over the package's weights, and compares the last stage's held-out accuracy with the
shipped ``eval.json`` (same seed, same images). :func:`estimate` predicts the wall time on this machine
from measured training speeds before anything long starts.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, GateFailed, InputError

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = [
    "SHIPPED_STAGES", "Stage", "StageReader", "compare_reports", "estimate", "render_estimate", "render_report",
    "reproduce",
]

BUDGET_MIN = 150.0  # the recipe's budget on a 2-core machine


@dataclass(frozen=True)
class Stage:
    """One ``demo train`` run of the recipe: its options without ``--out`` and ``--init`` (a stage after
    the first starts from the previous stage's shipped fp16 weights)."""

    name: str
    args: tuple[str, ...]


SHIPPED_STAGES: tuple[Stage, ...] = (
    Stage("stage1", (
        "--phase", "112:8000:1e-3:150", "--phase", "160:1000:4e-4:80", "--phase", "224:500:2e-4:40",
        "--phase", "224:240:1e-4:20:ats", "--phase", "224:400:1e-4:20:ats", "--batch-size", "64",
        "--threads", "2", "--eval-every", "500", "--eval-images", "500",
    )),
    Stage("stage2", (
        "--phase", "224:640:1.5e-4:30:ats:guide=1", "--phase", "224:700:6e-5:20:ats:guide=0.5",
        "--batch-size", "32", "--amp", "none", "--threads", "2", "--eval-every", "100", "--eval-images", "200",
    )),
    Stage("stage3", (
        "--phase", "224:240:3e-5:20:ats=1:guide=0.5", "--phase", "224:120:2e-5:10:ats:guide=0.5",
        "--batch-size", "64", "--threads", "2", "--eval-every", "1000", "--eval-images", "100",
    )),
)


def _with_amp(args: tuple[str, ...], amp: str | None) -> tuple[str, ...]:
    """``args`` with every ``--amp X`` replaced by ``--amp amp`` (None: unchanged)."""
    if amp is None:
        return args
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--amp":
            skip = True
            continue
        out.append(a)
    return (*out, "--amp", amp)


# How a stage's options become a TrainConfig: ``read_stage(stage, amp) -> (config, whether --amp was given)``.
# The CLI layer hands in ``demo train``'s own parser (:func:`ats_deploy.demo.cli.stage_config`); this module
# does not import the CLI (the CLI imports it), so nothing here parses options by hand.
StageReader = Callable[[Stage, "str | None"], "tuple[TrainConfig, bool]"]


def estimate(
    stages: tuple[Stage, ...] = SHIPPED_STAGES,
    *,
    read_stage: StageReader,
    amp: str | None = None,
    steps: int = 3,
    measure=None,
    render_speed=None,
    bf16_slowdown: float | None = None,
) -> list[dict]:
    """Predicted training minutes of every phase on this machine: its images over the training speed
    measured here (on the device ``demo train`` picks) at its resolution, batch size, width and precision
    (dense steps, ``steps`` of them after a warm-up) together with the speed of generating its images (the
    trainer does both, one after the other). Held-out checks and the ship evaluations come on top. A bf16
    phase on a CPU that emulates bf16 is not measured (one step would take minutes): its row says so and
    has no minutes."""
    from .train import BF16_EMULATED, _resolve_device, measure_throughput
    from .train import bf16_slowdown as _slowdown

    device = _resolve_device("auto")
    if device != "cpu":
        bf16_slowdown = 1.0  # GPUs run bf16 natively; the emulation check is the CPU's
    measure = measure or measure_throughput
    render_speed = render_speed or _render_speed
    speeds: dict[tuple, float] = {}
    rows = []
    for st in stages:
        cfg, _ = read_stage(st, amp)
        phases, bs, amp_used, threads, arch = cfg.phases, cfg.batch_size, cfg.amp, cfg.threads, cfg.arch
        for i, ph in enumerate(phases):
            row = {"stage": st.name, "phase": i, "img_size": ph.img_size, "steps": ph.steps, "batch_size": bs,
                   "images": ph.steps * bs, "amp": amp_used, "img_per_s": None, "minutes": None}
            if amp_used == "bf16":
                if bf16_slowdown is None:
                    bf16_slowdown = _slowdown()
                if bf16_slowdown > BF16_EMULATED:
                    row["note"] = f"bf16 emulated here ({bf16_slowdown:.0f}x slower than float32): not timed"
                    rows.append(row)
                    continue
            key = (ph.img_size, bs, amp_used, threads, json.dumps(arch, sort_keys=True))
            if key not in speeds:
                train_ips = float(measure(ph.img_size, batch_size=bs, steps=steps, threads=threads or None,
                                          amp=amp_used, arch=arch, device=device)["train_img_per_s"])
                speeds[key] = 1.0 / (1.0 / train_ips + 1.0 / float(render_speed(ph.img_size)))
            row["img_per_s"] = speeds[key]
            row["minutes"] = row["images"] / speeds[key] / 60.0
            rows.append(row)
    return rows


def _render_speed(img_size: int, count: int = 32) -> float:
    """Images/s of generating training batches (images, labels, patch-token labels) at ``img_size`` here,
    the way the trainer makes them."""
    from .shapes import ShapesDataset

    ds = ShapesDataset(0, 2**62, img_size)
    t0 = time.perf_counter()
    ds.batch_with_tokens(0, count, 16, 0.15)
    return count / (time.perf_counter() - t0)


def render_estimate(rows: list[dict], budget_min: float = BUDGET_MIN) -> str:
    lines = [f"{'stage':7s} {'phase':>5s} {'px':>4s} {'images':>9s} {'amp':>5s} {'img/s':>7s} {'minutes':>8s}"]
    for r in rows:
        ips = f"{r['img_per_s']:7.1f}" if r["img_per_s"] else f"{'-':>7s}"
        mins = f"{r['minutes']:8.1f}" if r["minutes"] is not None else f"{'-':>8s}"
        lines.append(f"{r['stage']:7s} {r['phase']:5d} {r['img_size']:4d} {r['images']:9,d} {r['amp']:>5s} {ips} "
                     f"{mins}  {r.get('note', '')}".rstrip())
    timed = [r["minutes"] for r in rows if r["minutes"] is not None]
    untimed = len(rows) - len(timed)
    total = sum(timed)
    if untimed:
        lines.append(f"training: {total:.1f} minutes for the timed phases; {untimed} phase(s) not timed "
                     "(bf16 emulated: pass --amp none for a float32 run, whose weights differ)")
    else:
        verdict = "within" if total <= budget_min else "over"
        lines.append(f"training: {total:.1f} minutes predicted ({verdict} the {budget_min:.0f}-minute budget); "
                     "held-out checks and the ship evaluations come on top")
    return "\n".join(lines)


@dataclass
class Comparison:
    setting: str
    shipped: float
    reproduced: float

    @property
    def delta(self) -> float:
        return self.reproduced - self.shipped


@dataclass
class ReproReport:
    out_dir: str
    stages: list[dict] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    tolerance: float = 1.0
    wall_s: float = 0.0
    amp: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(abs(c.delta) <= self.tolerance for c in self.comparisons)

    def to_dict(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "amp_override": self.amp,
            "wall_s": round(self.wall_s, 1),
            "stages": self.stages,
            "tolerance": self.tolerance,
            "comparisons": [{"setting": c.setting, "shipped": c.shipped, "reproduced": c.reproduced,
                             "delta": round(c.delta, 2)} for c in self.comparisons],
            "passed": self.passed,
        }


def compare_reports(shipped: dict, reproduced: dict, settings: tuple[str, ...] | None = None) -> list[Comparison]:
    """Top-1 of ``settings`` in two ``eval.json`` dicts (default: the reference's first two, dense and ATS in
    the paper's placement at K = token count); refuses reports of different images."""
    for k in ("images", "seed", "img_size"):
        if shipped.get(k) != reproduced.get(k):
            raise InputError(f"the reports differ in {k} ({shipped.get(k)} vs {reproduced.get(k)}); compare "
                             "evaluations of the same held-out images (same --images and seed)")
    a = {s["name"]: s for s in shipped["settings"]}
    b = {s["name"]: s for s in reproduced["settings"]}
    if settings is None:
        settings = tuple(s["name"] for s in shipped["settings"][:2])
    out = []
    for name in settings:
        if name not in a or name not in b:
            raise InputError(f"setting {name!r} is missing from an eval.json; evaluate with `demo eval` defaults")
        out.append(Comparison(name, float(a[name]["top1"]), float(b[name]["top1"])))
    return out


def _refuse_emulated_bf16(stages: tuple[Stage, ...], amp: str | None, read_stage: StageReader) -> None:
    """Refuse before anything runs what ``demo train`` would refuse in the middle: a stage without
    ``--amp`` whose precision is the default bf16, on a CPU that emulates bf16 (the test ``demo train``
    applies, :func:`ats_deploy.demo.train.default_amp_refusal`)."""
    from .train import _resolve_device, bf16_slowdown, default_amp_refusal

    if amp is not None:
        return
    if not any(cfg.amp == "bf16" and not given for cfg, given in (read_stage(st, None) for st in stages)):
        return
    refusal = default_amp_refusal(_resolve_device("auto"), bf16_slowdown())
    if refusal:
        raise ConfigError(refusal.replace("pass --amp none (float32", "pass --amp none (every stage in float32"))


def _run_stage(args: list[str]) -> None:
    """``demo train args`` in a child process (the very command a user would type), all its output on our
    stderr (fd 2), so ``reproduce --json`` keeps stdout for its one JSON document."""
    cmd = [sys.executable, "-m", "ats_deploy.cli", "demo", "train", *args]
    proc = subprocess.run(cmd, stdout=2)
    if proc.returncode != 0:
        raise ConfigError(f"`ats-deploy demo train {shlex.join(args)}` failed (exit {proc.returncode}); fix the "
                          "error it printed above and rerun: finished stages are kept, a stopped one resumes")


def reproduce(
    out_dir: str | Path,
    *,
    read_stage: StageReader,
    stages: tuple[Stage, ...] = SHIPPED_STAGES,
    images: int = 2000,
    stage_images: int = 200,
    tolerance: float = 1.0,
    amp: str | None = None,
    reference: str | Path | None = None,
    progress: bool = False,
) -> ReproReport:
    """Run ``stages`` in ``out_dir/<stage>/``, ship each into ``out_dir/<stage>/shipped/`` (its
    evaluation: ``stage_images`` held-out images; the last stage: ``images``), then compare the last one's
    dense and ATS K=197 top-1 with ``reference`` (default: the package's ``eval.json``). Writes
    ``out_dir/reproduce.json``; raises :class:`GateFailed` when a top-1 is off by more than ``tolerance``.
    A stage that finished in an earlier call is not run again (``demo train`` resumes a stopped one)."""
    from .card import ship_run
    from .weights import DEMO_WEIGHTS, sha256_of

    ref_path = Path(reference) if reference else DEMO_WEIGHTS.parent / "eval.json"
    if not ref_path.is_file():
        raise InputError(f"{ref_path} is missing; pass --reference an eval.json of the weights to reproduce")
    ref = json.loads(ref_path.read_text())
    if int(ref.get("images", 0)) != images:
        raise ConfigError(f"--images {images}: the reference was evaluated on {ref.get('images')} images; use "
                          f"--images {ref.get('images')} so both see the same held-out images")
    for st in stages:  # every stage's options are read (and refused) before the first one starts
        read_stage(st, amp)
    _refuse_emulated_bf16(stages, amp, read_stage)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; pass a run directory (new or existing)")
    out.mkdir(parents=True, exist_ok=True)
    rep = ReproReport(out_dir=str(out), tolerance=tolerance, amp=amp)
    t_all = time.monotonic()
    init: Path | None = None
    for i, st in enumerate(stages):
        run_dir = out / st.name
        shipped = run_dir / "shipped" / DEMO_WEIGHTS.name
        args = [*_with_amp(st.args, amp), "--out", str(run_dir)]
        if init is not None:
            args += ["--init", str(init)]
        command = f"ats-deploy demo train {shlex.join(args)}"
        last = i == len(stages) - 1
        t0 = time.monotonic()
        n_eval = images if last else stage_images
        init_sha = sha256_of(init) if init else None
        done_before = shipped.is_file() and (run_dir / "stage.json").is_file()
        if done_before:
            rec = json.loads((run_dir / "stage.json").read_text())
            # Another recipe, another start or another evaluation: run it again (demo train itself keeps
            # what matches and starts over otherwise).
            done_before = (rec.get("command"), rec.get("init_sha256"), rec.get("eval_images")) == (
                command, init_sha, n_eval)
        if not done_before:
            run_dir.mkdir(parents=True, exist_ok=True)
            _run_stage(args)
            t_train = time.monotonic() - t0
            ship_run(run_dir, command=command, dst=shipped, images=n_eval, progress=progress)
            rec = {"stage": st.name, "command": command, "init_sha256": init_sha, "eval_images": n_eval,
                   "train_s": round(t_train, 1), "wall_s": round(time.monotonic() - t0, 1),
                   "sha256": sha256_of(shipped)}
            (run_dir / "stage.json").write_text(json.dumps(rec, indent=2) + "\n")
        rep.stages.append({**rec, "ran_now": not done_before})
        init = shipped
    rep.wall_s = time.monotonic() - t_all
    if init is None:
        raise ConfigError("no stages to reproduce; a recipe has at least one stage")
    reproduced = json.loads((init.parent / "eval.json").read_text())
    rep.comparisons = compare_reports(ref, reproduced)
    (out / "reproduce.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    if not rep.passed:
        worst = max(rep.comparisons, key=lambda c: abs(c.delta))
        raise GateFailed(f"reproduction off: {worst.setting} top-1 {worst.reproduced:.2f}% against the shipped "
                         f"{worst.shipped:.2f}% ({worst.delta:+.2f}, tolerance {tolerance}); see {out}/reproduce.json")
    return rep


def render_report(rep: ReproReport) -> str:
    lines = [f"{'stage':7s} {'training min':>12s} {'stage min':>10s}  command"]
    for s in rep.stages:
        lines.append(f"{s['stage']:7s} {s['train_s'] / 60:12.1f} {s['wall_s'] / 60:10.1f}  {s['command']}")
    total = sum(s["wall_s"] for s in rep.stages)
    lines.append(f"total {total / 60:.1f} minutes (budget {BUDGET_MIN:.0f})")
    for c in rep.comparisons:
        lines.append(f"{c.setting:28s} shipped {c.shipped:6.2f}  reproduced {c.reproduced:6.2f}  ({c.delta:+.2f})")
    lines.append(f"{'within' if rep.passed else 'outside'} {rep.tolerance} point(s) of the shipped weights")
    return "\n".join(lines)
