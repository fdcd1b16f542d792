"""``demo reproduce``: the recipe is the card's, stages chain through shipped fp16 files, the check gates."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from ats_deploy.demo.cli import stage_config
from ats_deploy.errors import ConfigError, GateFailed, InputError


def _card_commands() -> list[list[str]]:
    """The training commands on the shipped card, in the order the card lists them (first stage first),
    without --out and --init (the reproduction supplies both)."""
    from ats_deploy.demo.weights import DEMO_WEIGHTS

    text = (DEMO_WEIGHTS.parent / "MODEL_CARD.md").read_text()
    out = []
    for cmd in re.findall(r"^- Command: `(ats-deploy demo train [^`]*)`", text, flags=re.M):
        words = shlex.split(cmd)[3:]
        keep, skip = [], False
        for w in words:
            if skip:
                skip = False
            elif w in ("--out", "--init"):
                skip = True
            else:
                keep.append(w)
        out.append(keep)
    return out


def test_the_recipe_is_the_commands_the_shipped_card_records():
    from ats_deploy.demo.reproduce import SHIPPED_STAGES

    cards = _card_commands()
    assert len(cards) == 3  # first stage, earlier stage, last stage
    assert [list(st.args) for st in SHIPPED_STAGES] == cards


def _tiny(name: str, phase: str) -> object:
    from ats_deploy.demo.reproduce import Stage

    return Stage(name, ("--phase", phase, "--batch-size", "4", "--width", "64", "--amp", "none", "--threads", "1",
                        "--eval-every", "0"))


def test_estimate_adds_training_and_image_generation_per_phase_and_skips_emulated_bf16():
    from ats_deploy.demo.reproduce import Stage, estimate, render_estimate

    calls = []

    def measure(size, *, batch_size, steps, threads, amp, arch, device):
        calls.append((size, batch_size, amp, arch))
        return {"train_img_per_s": {32: 20.0, 48: 10.0}[size]}

    stages = (
        Stage("a", ("--phase", "32:10:1e-3:1", "--phase", "48:5:1e-3:1", "--phase", "32:20:1e-4:1",
                    "--batch-size", "4", "--amp", "none")),
        Stage("b", ("--phase", "32:6:1e-4:1", "--batch-size", "8", "--width", "64")),  # default amp: bf16
    )
    kw = dict(read_stage=stage_config, measure=measure, render_speed=lambda size: 80.0, bf16_slowdown=50.0)
    rows = estimate(stages, **kw)
    # 1 / (1/20 + 1/80) = 16 images/s at 32 px; 1 / (1/10 + 1/80) = 80/9 at 48 px.
    assert [r["minutes"] for r in rows[:3]] == pytest.approx([40 / 16 / 60, 20 / (80 / 9) / 60, 80 / 16 / 60])
    # One measurement per resolution, batch, precision and width.
    assert calls == [(32, 4, "none", {}), (48, 4, "none", {})]
    assert rows[3]["minutes"] is None and "emulated" in rows[3]["note"] and rows[3]["images"] == 48
    text = render_estimate(rows)
    assert "1 phase(s) not timed" in text and "--amp none" in text
    # With --amp none every stage is timed, in float32, and the total is judged against the budget.
    rows = estimate(stages, amp="none", **kw)
    assert rows[3]["amp"] == "none" and rows[3]["minutes"] == pytest.approx(48 / 16 / 60)
    assert calls[-1] == (32, 8, "none", {"embed_dim": 64, "num_heads": 1})  # stage b's own width
    assert f"{(40 + 80 + 48) / 16 / 60 + 20 / (80 / 9) / 60:.1f} minutes predicted (within" in render_estimate(rows)


def test_a_default_bf16_stage_is_refused_before_anything_runs_where_bf16_is_emulated(tmp_path, monkeypatch):
    import ats_deploy.demo.train as tr
    from ats_deploy.demo.reproduce import Stage, reproduce

    monkeypatch.setattr(tr, "bf16_slowdown", lambda *a, **k: 97.0)
    stage = Stage("s", ("--phase", "32:2:1e-3:1", "--batch-size", "4"))
    with pytest.raises(ConfigError, match=r"no native bf16.*--amp none \(every stage in float32"):
        reproduce(tmp_path / "r", read_stage=stage_config, stages=(stage,), images=2000)
    assert not (tmp_path / "r").exists()  # nothing started


def test_compare_refuses_reports_of_other_images():
    from ats_deploy.demo.reproduce import compare_reports

    a = {"images": 2000, "seed": 1, "img_size": 224, "settings": [{"name": "dense", "top1": 95.0}]}
    with pytest.raises(InputError, match="differ in images"):
        compare_reports(a, {**a, "images": 1000})
    with pytest.raises(InputError, match="missing"):
        compare_reports(a, {**a, "settings": []})


def test_stages_chain_through_shipped_fp16_weights_and_the_check_gates(tmp_path, capfd):
    """Two tiny stages: the second starts from the first one's shipped fp16 file (its log records that
    file's sha256, its card keeps the first stage's history); the final check passes within the tolerance
    and fails outside it; a finished reproduction is not trained again."""
    from ats_deploy.demo.card import read_run_log
    from ats_deploy.demo.evaluate import evaluate
    from ats_deploy.demo.reproduce import reproduce
    from ats_deploy.demo.weights import load_demo_checkpoint, sha256_of

    stages = (_tiny("one", "32:3:1e-3:1"), _tiny("two", "32:2:1e-4:1:ats"))
    out = tmp_path / "repro"
    shipped_last = out / "two" / "shipped" / "deit_tiny_shapes.safetensors"
    # The reference the test compares with: top-1 of the last stage's file measured here with evaluate()
    # (not with the reproduction's own report), shifted by known amounts.
    placeholder = {"images": 8, "seed": 1000003, "img_size": 32,
                   "settings": [{"name": "dense", "top1": 0.0}, {"name": "ATS blocks 3..11, K=5", "top1": 0.0}]}
    ref = tmp_path / "eval.json"
    ref.write_text(json.dumps(placeholder))
    try:
        reproduce(out, read_stage=stage_config, stages=stages, images=8, stage_images=4, reference=ref)
    except GateFailed:
        pass
    assert shipped_last.is_file()
    # The stages' output (demo train prints its weights' path on stdout) goes to stderr: stdout stays free
    # for `reproduce --json`.
    captured = capfd.readouterr()
    assert "final.safetensors" not in captured.out and "final.safetensors" in captured.err
    s1 = out / "one" / "shipped" / "deit_tiny_shapes.safetensors"
    assert read_run_log(out / "two").init_sha256 == sha256_of(s1)
    card2 = (out / "two" / "shipped" / "MODEL_CARD.md").read_text()
    assert "## Training, first stage" in card2 and "--phase 32:3:1e-3:1" in card2
    assert "(8 held-out images, seed 1000003, 32 px)" in card2

    mine = evaluate(load_demo_checkpoint(shipped_last), images=8, progress=False).to_dict()
    assert [s["name"] for s in mine["settings"][:2]] == ["dense", "ATS blocks 3..11, K=5"]
    log_before = (out / "two" / "train.log").read_text()
    for shift, ok in ((0.5, True), (-0.9, True), (1.5, False)):
        ref.write_text(json.dumps({**mine, "settings": [{**s, "top1": s["top1"] + shift} for s in mine["settings"]]}))
        if ok:
            rep = reproduce(out, read_stage=stage_config, stages=stages, images=8, stage_images=4, reference=ref)
            assert rep.passed and [round(c.delta, 6) for c in rep.comparisons] == [-shift, -shift]
            assert not any(s["ran_now"] for s in rep.stages)
        else:
            with pytest.raises(GateFailed, match=r"reproduction off: dense top-1 .* \(-1\.50, tolerance 1\.0\)"):
                reproduce(out, read_stage=stage_config, stages=stages, images=8, stage_images=4, reference=ref)
        assert json.loads((out / "reproduce.json").read_text())["passed"] is ok
    assert (out / "two" / "train.log").read_text() == log_before  # nothing trained again
    with pytest.raises(ConfigError, match="--images 8"):
        reproduce(out, read_stage=stage_config, stages=stages, images=9, stage_images=4, reference=ref)


def test_cli_names_a_missing_reference_and_a_mismatched_image_count_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from ats_deploy.cli import app

    missing = tmp_path / "nope.json"
    res = CliRunner().invoke(app, ["demo", "reproduce", "--out", str(tmp_path / "r"), "--reference", str(missing)])
    assert res.exit_code == 1 and f"{missing} is missing; pass --reference" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # The shipped reference: 2,000 images; another count is refused before anything is trained.
    res = CliRunner().invoke(app, ["demo", "reproduce", "--out", str(tmp_path / "r"), "--images", "500"])
    assert res.exit_code == 1 and "--images 500: the reference was evaluated on 2000 images" in res.output
    assert not (tmp_path / "r").exists()


def test_a_stage_is_read_by_demo_train_itself_defaults_and_refusals_included():
    from dataclasses import replace

    from ats_deploy.demo.reproduce import SHIPPED_STAGES, Stage
    from ats_deploy.demo.train import TrainConfig

    cfg, amp_given = stage_config(SHIPPED_STAGES[0])
    assert (len(cfg.phases), cfg.batch_size, cfg.threads, amp_given) == (5, 64, 2, False)
    assert cfg.amp == TrainConfig().amp == "bf16"  # no --amp: the trainer's default
    assert stage_config(SHIPPED_STAGES[1])[0].amp == "none" and stage_config(SHIPPED_STAGES[1])[1]
    assert stage_config(SHIPPED_STAGES[0], amp="none") == (replace(cfg, amp="none"), True)
    # --width as demo train reads it, not as a hand-written scanner would.
    assert stage_config(Stage("w", ("--phase", "32:1:1e-3:0", "--width", "128")))[0].arch == {
        "embed_dim": 128, "num_heads": 2}
    with pytest.raises(ConfigError, match=r"^bad: No such option: --bogus.*as `demo train` takes them$"):
        stage_config(Stage("bad", ("--bogus", "1")))


def test_a_bad_later_stage_is_refused_before_the_first_one_trains(tmp_path):
    from ats_deploy.demo.reproduce import Stage, reproduce

    stages = (_tiny("one", "32:1:1e-3:0"), Stage("two", ("--phase", "32:x:1e-3:0")))
    # --amp given: the bf16 check reads no stage, so only the up-front reading stops stage two.
    with pytest.raises(ConfigError, match=r"^two: --phase: .*112:6000:5e-4:300$"):
        reproduce(tmp_path / "r", read_stage=stage_config, stages=stages, images=2000, amp="none")
    assert not (tmp_path / "r").exists()
