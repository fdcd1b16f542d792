"""Bad input to ``demo train`` / ``demo eval`` / ``demo ship``: one line naming the problem and the fix, nothing
written or lost (the project's bad-input standard), through the CLI and through the Python API."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ats_deploy.cli import app
from ats_deploy.errors import ConfigError

TINY_ARCH = {"embed_dim": 32, "depth": 4, "num_heads": 2}
runner = CliRunner()


def _error_line(res) -> str:
    """The single ``error: ...`` line of a refused command (exit 1, no traceback)."""
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _train(tmp_path, *args):
    base = ["demo", "train", "--out", str(tmp_path / "run"), "--batch-size", "2", "--threads", "1", "--amp", "none"]
    return runner.invoke(app, [*base, *args])


# -- demo train: values the trainer cannot use or that mean nothing ----------------------------------------


@pytest.mark.parametrize(
    "phase,message",
    [
        ("0:2:1e-3:1", "--phase 0:2:1e-3:1: phase image size 0 is not positive; use a multiple of the patch size 16"),
        ("-112:2:1e-3:1", "--phase -112:2:1e-3:1: phase image size -112 is not positive; use a multiple of the patch"),
        ("112:2:-1:1", "--phase 112:2:-1:1: phase learning rate -1.0 is not a number >= 0; use e.g. 5e-4"),
        ("112:2:nan:1", "--phase 112:2:nan:1: phase learning rate nan is not a number >= 0; use e.g. 5e-4"),
        (
            "112:2:1e-3:1:0.5:0.1",
            "--phase 112:2:1e-3:1:0.5:0.1: phase scale SMIN:SMAX 0.5 0.1 is not a range 0 < MIN <= MAX; use e.g. 0.35",
        ),
        ("112:-5:1e-3:1", "--phase 112:-5:1e-3:1: phase steps -5 is negative; use 0 or more (0: the phase trains"),
        ("112:2:1e-3:-1", "--phase 112:2:1e-3:-1: phase warm-up -1 is negative; use 0 or more steps"),
        ("100:2:1e-3:1", "phase 0: image size 100 is not a multiple of the patch size 16; use a multiple of 16"),
        ("8:2:1e-3:1", "phase 0: image size 8 is not a multiple of the patch size 16; use a multiple of 16"),
        ("32:2:1e-3:1:0.2:0.9", "phase 0: scale SMIN:SMAX maximum 0.9 does not fit a 32 px image; use at most 0.76"),
        ("32:2:1e-3:1:ats:guide=-1", "--phase 32:2:1e-3:1:ats:guide=-1: phase guide=-1.0 is not a weight >= 0"),
    ],
)
def test_a_phase_out_of_range_is_one_line_and_writes_nothing(tmp_path, phase, message):
    line = _error_line(_train(tmp_path, f"--phase={phase}"))
    assert line.startswith("error: " + message), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ema", "1.5"], "--ema 1.5 is outside [0, 1); use a decay such as 0.999, or 0 for no EMA"),
        (["--device", "foo"], "--device 'foo' is not a device; use auto, cpu, cuda or cuda:N"),
        (["--eval-images", "0"], "--eval-images 0 is not positive; use 1 or more (--eval-every 0 turns the checks"),
        (["--token-label", "-1"], "--token-label -1.0 is not a weight >= 0; use e.g. 1.0 (0: off)"),
        (["--eval-every", "-1"], "--eval-every -1 is negative; use a number of steps, or 0 for no checks"),
        (["--scale", "0.5", "0.1"], "--scale 0.5 0.1 is not a range 0 < MIN <= MAX; use e.g. 0.35 0.55"),
        (["--scale", "0.3", "0.8"], "phase 0: --scale maximum 0.8 does not fit a 32 px image; use at most 0.76"),
        (["--ckpt-every-s", "-1"], "--ckpt-every-s -1.0 is not a number of seconds >= 0; use e.g. 300"),
    ],
)
def test_a_train_option_out_of_range_is_one_line_and_writes_nothing(tmp_path, args, message):
    line = _error_line(_train(tmp_path, "--phase", "32:2:1e-3:1", *args))
    assert line.startswith("error: " + message), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("width", ["100", "32", "0", "-64"])
def test_a_width_that_does_not_split_into_heads_of_64_is_one_line(tmp_path, width):
    line = _error_line(_train(tmp_path, "--phase", "32:2:1e-3:1", "--width", width))
    assert line.startswith(f"error: --width {width} does not split into heads of 64 (heads = width // 64)"), line
    assert not (tmp_path / "run").exists()


def test_width_sets_the_embed_dim_and_the_heads_every_command_infers_from_it():
    from ats_deploy.demo.cli import train_config
    from ats_deploy.demo.train import TrainConfig, model_config

    base = {k: None for k in ("steps_low", "steps_high", "img_low", "img_high", "lr", "lr_high", "warmup",
                              "warmup_high", "scale_low", "token_label", "batch_size", "amp", "ema", "scale",
                              "seed", "threads", "ckpt_every_s", "eval_every", "eval_images", "workers",
                              "guide_background", "init")}
    base.update(out="runs/x", phase=["32:2:1e-3:1"], device="cpu")
    cfg = train_config(**base, width=128)
    assert cfg.arch == {"embed_dim": 128, "num_heads": 2}
    vit = model_config(224, cfg.arch)
    assert (vit.embed_dim, vit.num_heads, vit.head_dim, vit.depth) == (128, 2, 64, 12)
    # 192 and no --width are DeiT-Ti itself: the same recipe as before the option existed.
    assert train_config(**base, width=192).recipe() == train_config(**base, width=None).recipe()
    assert train_config(**base, width=None).arch == TrainConfig().arch == {}


def test_the_two_phase_options_name_themselves_and_no_phase_at_all_is_refused(tmp_path):
    line = _error_line(_train(tmp_path, "--steps-low", "-5"))
    assert line.startswith("error: --img-low/--steps-low/--lr/--warmup/--scale-low: phase steps -5 is negative")
    line = _error_line(_train(tmp_path, "--lr-high", "-1"))
    assert line.startswith("error: --img-high/--steps-high/--lr-high/--warmup-high: phase learning rate -1.0")
    line = _error_line(_train(tmp_path, "--steps-low", "0", "--steps-high", "0"))
    assert line == "error: no training phase: give at least one --phase (or --steps-low/--steps-high above 0)"
    assert not (tmp_path / "run").exists()


def test_the_python_api_refuses_the_same_values_with_config_errors():
    from dataclasses import replace

    from ats_deploy.demo.train import Phase, TrainConfig

    ok = TrainConfig(phases=(Phase(32, 2, 1e-3, 1),), arch=TINY_ARCH)
    with pytest.raises(ConfigError, match=r"^phase steps -5 is negative"):
        Phase(112, -5, 1e-3, 1)
    with pytest.raises(ConfigError, match=r"^phase image size 0 is not positive"):
        Phase(0, 2, 1e-3, 1)
    with pytest.raises(ConfigError, match=r"^phase learning rate nan"):
        Phase(112, 2, float("nan"), 1)
    with pytest.raises(ConfigError, match=r"^phase warm-up -1 is negative"):
        Phase(112, 2, 1e-3, -1)
    with pytest.raises(ConfigError, match=r"^phase scale SMIN:SMAX 0.5 0.1 is not a range"):
        Phase(112, 2, 1e-3, 1, (0.5, 0.1))
    for field, value, start in [
        ("ema", 1.5, "--ema 1.5 is outside [0, 1)"),
        ("device", "foo", "--device 'foo' is not a device"),
        ("eval_images", 0, "--eval-images 0 is not positive"),
        ("token_label", -1.0, "--token-label -1.0 is not a weight >= 0"),
        ("eval_every", -1, "--eval-every -1 is negative"),
        ("scale", (0.5, 0.1), "--scale 0.5 0.1 is not a range"),
        ("amp", "fp16", "--amp 'fp16' is unknown; use 'none' or 'bf16'"),
        ("batch_size", 0, "--batch-size 0 is not positive"),
        ("phases", (), "no training phase"),
        ("phases", (Phase(40, 2, 1e-3, 1),), "phase 0: image size 40 is not a multiple of the patch size 16"),
    ]:
        with pytest.raises(ConfigError) as err:
            replace(ok, **{field: value})
        assert str(err.value).startswith(start) and "\n" not in str(err.value), (field, str(err.value))
    # The patch size is the architecture's: 40 is a multiple of a patch of 8.
    assert replace(ok, arch={**TINY_ARCH, "patch_size": 8}, phases=(Phase(40, 2, 1e-3, 1),)).phases[0].img_size == 40
    # Allowed edge values stay allowed: a 0-step phase, lr 0 (resizing --init weights), no warm-up, cuda:N.
    assert replace(ok, phases=(Phase(32, 0, 0.0, 0),), device="cuda:1", eval_every=0).device == "cuda:1"


def test_the_largest_allowed_object_fits_the_image():
    """_max_scale's bound is what the renderer can draw: the largest allowed diameter renders at each size."""
    from ats_deploy.demo.shapes import render
    from ats_deploy.demo.train import _max_scale

    for size in (16, 32, 112, 224):
        top = _max_scale(size)
        for i in range(40):
            assert render(1, i, size, scale=(top, top))[0].shape == (size, size, 3)


def test_a_cuda_device_the_machine_lacks_is_one_line(monkeypatch):
    import torch

    from ats_deploy.demo.train import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda:1 asked for, but torch sees no CUDA GPU; use --device cpu$"):
        _resolve_device("cuda:1")
    assert _resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^--device cuda:2: torch sees 2 CUDA GPU\(s\); use cuda:0..cuda:1 or cpu$"):
        _resolve_device("cuda:2")
    assert _resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"^--device 'auto' is not a device; use cpu, cuda or cuda:N$"):
        _resolve_device("auto", auto=False)


# -- demo train --out: not a writable directory --------------------------------------------------------------


def test_out_that_is_a_file_or_unwritable_is_one_line_and_the_file_is_kept(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    opts = ["--phase", "32:2:1e-3:1", "--amp", "none"]
    res = runner.invoke(app, ["demo", "train", "--out", str(afile), *opts])
    fix = "pass a run directory (new or existing)"
    assert _error_line(res) == f"error: --out {afile} is a file, not a directory; {fix}"
    assert afile.read_text() == "keep me"
    line = _error_line(runner.invoke(app, ["demo", "train", "--out", str(afile / "sub"), *opts]))
    fix = "pass a writable directory"
    assert line == f"error: --out {afile / 'sub'}: cannot write the run there (Not a directory); {fix}"
    # A folder the user may not write (simulated: the tests may run as root, who may write anywhere).
    from pathlib import Path

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    line = _error_line(runner.invoke(app, ["demo", "train", "--out", str(tmp_path / "ro"), *opts]))
    assert line == f"error: --out {tmp_path / 'ro'}: cannot write the run there (Permission denied); {fix}"


# -- demo eval ------------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_weights(tiny_ckpt, tmp_path):
    from ats_deploy.demo.train import save_weights
    from ats_deploy.model import build_model

    return save_weights(build_model(tiny_ckpt), tmp_path / "w.safetensors")


def test_eval_refuses_a_max_k_above_the_token_count_with_the_range(tiny_weights, tiny_ckpt):
    n_ref = tiny_ckpt.config.n_ref  # 64 patches + CLS = 65
    assert n_ref == 65
    line = _error_line(runner.invoke(app, ["demo", "eval", str(tiny_weights), "--images", "2", "--max-k", "500"]))
    assert line == "error: --max-k 500 is above the token count 65 of this model; use a value in 2..65"
    res = runner.invoke(app, ["demo", "eval", str(tiny_weights), "--images", "2", "--max-k", "65", "--json"])
    assert res.exit_code == 0, res.output
    assert [max(s["ats"]["k_schedule"], default=None) for s in json.loads(res.stdout)["settings"]] == [None, 65, 65]


def test_eval_refuses_an_unknown_or_missing_device(tiny_weights, tiny_ckpt, monkeypatch):
    import torch

    from ats_deploy.demo.evaluate import evaluate

    line = _error_line(runner.invoke(app, ["demo", "eval", str(tiny_weights), "--images", "2", "--device", "foo"]))
    assert line == "error: --device 'foo' is not a device; use cpu, cuda or cuda:N"
    with pytest.raises(ConfigError, match=r"^--device 'foo' is not a device"):
        evaluate(tiny_ckpt, images=2, device="foo", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error_line(runner.invoke(app, ["demo", "eval", str(tiny_weights), "--images", "2", "--device", "cuda"]))
    assert line == "error: --device cuda asked for, but torch sees no CUDA GPU; use --device cpu"


def test_eval_has_the_trust_pickle_option_its_refusal_suggests(tiny_ckpt, tmp_path):
    import torch

    from ats_deploy.model import build_model

    evil = tmp_path / "evil.pt"
    torch.save(build_model(tiny_ckpt), evil)  # a pickled nn.Module: unpickling runs code
    line = _error_line(runner.invoke(app, ["demo", "eval", str(evil), "--images", "2"]))
    assert "--trust-pickle" in line
    res = runner.invoke(app, ["demo", "eval", str(evil), "--images", "2", "--trust-pickle", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 2


# -- demo ship: nothing replaced until everything is ready ----------------------------------------------------


def _tiny_run(tmp_path, name, seed):
    from ats_deploy.demo.train import Phase, TrainConfig, train

    cfg = TrainConfig(
        phases=(Phase(img_size=32, steps=2, lr=1e-3, warmup=1),),
        batch_size=2,
        arch=TINY_ARCH,
        out_dir=str(tmp_path / name),
        eval_every=0,
        threads=1,
        amp="none",
        seed=seed,
    )
    return train(cfg, progress=False).final_weights.parent


def test_a_failed_or_interrupted_ship_leaves_the_old_weights_card_and_eval_intact(tmp_path, monkeypatch):
    import ats_deploy.demo.card as card_mod
    import ats_deploy.demo.evaluate as ev
    from ats_deploy.demo.card import ship_run
    from ats_deploy.demo.weights import load_demo_checkpoint, sha256_of

    dst = tmp_path / "ship" / "deit_tiny_shapes.safetensors"
    weights, card, report = ship_run(_tiny_run(tmp_path, "a", 1), command="a", dst=dst, images=4, progress=False)
    # The report is the evaluation of the very file shipped, named as it.
    assert report.source == f"demo weights {dst.name}"
    assert report.to_json() == ev.evaluate(load_demo_checkpoint(dst), images=4, progress=False).to_json()  # NaN-safe
    assert f"`{sha256_of(dst)}`" in card.read_text()
    trio = {p.name: p.read_bytes() for p in (dst, card, dst.parent / "eval.json")}
    run_b = _tiny_run(tmp_path, "b", 2)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    for target, name, fail in ((ev, "evaluate", interrupted), (card_mod, "render_card", broken)):
        with monkeypatch.context() as m:
            m.setattr(target, name, fail)
            with pytest.raises((KeyboardInterrupt, OSError)):
                ship_run(run_b, command="b", dst=dst, images=4, progress=False)
        assert {p.name: p.read_bytes() for p in (dst, card, dst.parent / "eval.json")} == trio, name
        assert sorted(p.name for p in dst.parent.iterdir()) == sorted(trio), name  # no temporary left behind
    # Unbroken, the second run replaces all three together.
    _, _, rep_b = ship_run(run_b, command="b", dst=dst, images=4, progress=False)
    assert dst.read_bytes() != trio[dst.name] and f"`{sha256_of(dst)}`" in card.read_text()
    assert (dst.parent / "eval.json").read_text() == rep_b.to_json() + "\n"
    assert sorted(p.name for p in dst.parent.iterdir()) == sorted(trio)
