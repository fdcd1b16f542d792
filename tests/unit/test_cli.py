"""The command line: exit codes, --json output, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ats_deploy.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory, tiny_ckpt):
    path = tmp_path_factory.mktemp("ck") / "tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_pt):
    out = tmp_path_factory.mktemp("out")
    res = runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "--max-k", "40", "-o", str(out), "--batch", "4"])
    assert res.exit_code == 0, res.output
    return out


def _one_line_error(res, needle):
    """Exit 1 with one error line; besides it only progress lines (stderr, on a slow machine)."""
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not re.match(r"^[^:]+(: [^:]+)*: \d+/\d+ \(\d+%\), \d+ s$", ln)]
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], res.output
    assert "Traceback" not in res.output


def test_export_default_model_json(tmp_path):
    res = runner.invoke(app, ["export", "-o", str(tmp_path / "o"), "--json", "--parity-inputs", "2"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    man = data["manifest"]
    assert man["ats"]["blocks"] == list(range(3, 12)) and man["ats"]["k_schedule"] == [197] * 9
    assert man["ats"]["n_ref"] == 197 and man["graph"]["opset"] >= 17
    assert man["preprocessing"]["size"] == 224 and len(man["preprocessing"]["mean"]) == 3
    assert man["parity"]["passed"] and man["parity"]["top1_agreement"] == 1.0
    for name, meta in man["artifacts"].items():
        import hashlib

        assert hashlib.sha256((tmp_path / "o" / name).read_bytes()).hexdigest() == meta["sha256"]
    assert not list((tmp_path / "o").glob(".*tmp*")), "no temporary files left behind"
    # K = 197 static keeps every slot: export says once, on stderr, that this form cannot save time.
    assert res.stderr.count("hint: with --shape static and K >= 197 tokens") == 1


def test_static_hint_only_where_no_block_drops_a_slot(tiny_cfg):
    from ats_deploy.cli import static_hint
    from ats_deploy.model.config import ATSConfig, resolve_ats

    n = tiny_cfg.num_tokens
    assert static_hint(tiny_cfg, resolve_ats(tiny_cfg)) is not None  # K = n_ref >= n everywhere
    assert static_hint(tiny_cfg, resolve_ats(tiny_cfg, max_k=str(n))) is not None
    assert static_hint(tiny_cfg, resolve_ats(tiny_cfg, max_k=str(n - 1))) is None  # first ATS block drops one
    assert static_hint(tiny_cfg, resolve_ats(tiny_cfg, shape_mode="dynamic")) is None
    assert static_hint(tiny_cfg, ATSConfig()) is None  # dense


def test_export_human_output_and_manifest(exported):
    man = json.loads((exported / "manifest.json").read_text())
    assert man["model"]["architecture"]["embed_dim"] == 64
    assert man["ats"]["k_schedule"] == [40, 40, 40, 40]
    assert {"model.onnx", "reference.npz"} <= set(man["artifacts"])
    ref = np.load(exported / "reference.npz")
    assert ref["pixels"].shape[1:] == (3, 64, 64) and "tokens_2" in ref


def test_parity_command(exported, tmp_path):
    res = runner.invoke(app, ["parity", str(exported), "--json", "--count", "8"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["passed"] and data["logits_max_abs"] <= 1e-4 and data["kept_pairs"] == 8 * 4
    # .npy inputs
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32))
    res = runner.invoke(app, ["parity", str(exported), "--inputs", str(tmp_path / "x.npy")])
    assert res.exit_code == 0 and "PASS" in res.output


def test_parity_on_images(exported, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8)).save(folder / "grey.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)).save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"not an image")
    res = runner.invoke(app, ["parity", str(exported), "--inputs", str(folder), "--json"])
    _one_line_error(res, "broken.png")  # never a silent run on fewer inputs than the folder holds
    res = runner.invoke(app, ["parity", str(exported), "--inputs", str(folder), "--json", "--skip-unreadable"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 3  # the 3 readable ones (the last chunk of 4 padded, then trimmed)
    assert "skipped unreadable image" in res.stderr and "broken.png" in res.stderr


def test_parity_gate_fails_with_exit_3(exported, tmp_path):
    """A tampered graph (different weights) makes the gate fail: exit code 3."""
    import shutil

    import onnx

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    model = onnx.load(str(bad / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == "head.bias":
            arr = onnx.numpy_helper.to_array(init) + 1.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(bad / "model.onnx"))
    man = json.loads((bad / "manifest.json").read_text())
    from ats_deploy.exporters.export import sha256_file

    man["artifacts"]["model.onnx"]["sha256"] = sha256_file(bad / "model.onnx")
    (bad / "manifest.json").write_text(json.dumps(man))
    res = runner.invoke(app, ["parity", str(bad), "--count", "4"])
    assert res.exit_code == 3, res.output
    assert "FAIL" in res.output


def test_tokens_json(tiny_pt, tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = runner.invoke(
        app, ["tokens", str(tiny_pt), "--heads", "2", "--input", str(tmp_path / "x.npy"), "--json", "--max-k", "30"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["images"]) == 2 and data["ats_blocks"] == [2, 3, 4, 5]
    for img in data["images"]:
        assert len(img["logits"]) == 10
        prev = set(range(65))
        for b in ("2", "3", "4", "5"):
            ids = img["kept"][b]
            assert ids[0] == 0 and len(ids) <= 30 and set(ids) <= prev  # kept ids only shrink
            prev = set(ids)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["export", "missing.pt"], "does not exist"),
        (["export", "{pt}", "--heads", "2", "--max-k", "1"], "below 2"),
        (["export", "{pt}", "--heads", "2", "--max-k", "500"], "above the token count"),
        (["export", "{pt}", "--heads", "2", "--max-k", "10,20"], "one value or one per block"),
        (["export", "{pt}", "--heads", "2", "--ats-blocks", "7"], "out of range"),
        (["export", "{pt}", "--heads", "3"], "not divisible"),
        (["parity", "{tmp}"], "manifest.json"),
        (["parity", "{tmp}/nothere"], "does not exist"),
        (["parity", "{pt}"], "not an export directory"),
        (["calibrate", "{pt}", "--data", "{tmp}"], "export it first"),
        (["tune-k", "{tmp}/x.npy"], "not a checkpoint"),
        (["export", "{pt}", "--heads", "2", "--max-k", "abc"], "like 99"),
        (["tokens", "{pt}", "--heads", "2", "--input", "{tmp}/nan.npy"], "NaN"),
        (["convert", "{tmp}", "-o", "{tmp}/p.onnx"], "is a directory"),
        (["tokens", "{pt}", "--heads", "2", "--input", "{tmp}/x.npy"], "expected [N, 3, 64, 64]"),
        (["tokens", "{pt}", "--heads", "2", "--input", "{tmp}/empty"], "no readable image"),
        (["tokens", "{pt}", "--heads", "2", "--input", "{tmp}/ints.npy"], "dtype int64"),
        (["convert", "{tmp}/nothere.onnx", "-o", "{tmp}/p.onnx"], "does not exist"),
        (["build", "{tmp}/x.onnx", "--batch", "1,4"], "needs three values MIN,OPT,MAX"),
    ],
)
def test_bad_input_one_line(tiny_pt, tmp_path, args, needle):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((2, 3, 64, 64), np.int64))
    np.save(tmp_path / "nan.npy", np.full((1, 3, 64, 64), np.nan, np.float32))
    (tmp_path / "empty").mkdir()
    args = [a.format(pt=tiny_pt, tmp=tmp_path) for a in args]
    res = runner.invoke(app, args + ["-o", str(tmp_path / "o")] if args[0] == "export" else args)
    _one_line_error(res, needle)


def test_unwritable_output_keeps_nothing(tiny_pt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(blocker / "sub")])
    _one_line_error(res, f"output directory {blocker / 'sub'} cannot be made: {blocker} is a file; choose another -o")


def test_failed_export_keeps_previous_good_one(tiny_pt, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert (
        runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(out), "--parity-inputs", "1"]).exit_code
        == 0
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import ats_deploy.exporters.export as ex

    def boom(*a, **k):
        raise ex.ExportError("simulated failure while writing")

    monkeypatch.setattr(ex, "compare_outputs", boom)
    res = runner.invoke(
        app, ["export", str(tiny_pt), "--heads", "2", "--max-k", "20", "-o", str(out), "--parity-inputs", "1"]
    )
    _one_line_error(res, "simulated failure")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "old export intact, no temp files"


def test_import_and_help_stay_light():
    """`import ats_deploy`, `ats-deploy --help` and the on-device modules (build, verify, bundle) need
    neither torch, onnxruntime nor TensorRT at import time: a Jetson often has no torch."""
    code = (
        "import sys, ats_deploy, ats_deploy.cli\n"
        "import ats_deploy.exporters.trt, ats_deploy.runtime.trt_runner, ats_deploy.runtime.verify\n"
        "import ats_deploy.exporters.bundle, ats_deploy.exporters.onnx, ats_deploy.exporters.export\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(ats_deploy.cli.app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'matplotlib') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "ats-deploy" in res.output


def test_convert_plugin_form(tiny_pt, tmp_path):
    out = tmp_path / "o"
    res = runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(out), "--sampler", "plugin"])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["graph"]["sampler_forms"] == ["portable", "plugin"] and "model.plugin.onnx" in man["artifacts"]
    res = runner.invoke(app, ["convert", str(out / "model.plugin.onnx"), "-o", str(tmp_path / "p.onnx")])
    assert res.exit_code == 0, res.output
    from ats_deploy.runtime.ort_runner import OrtRunner

    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with OrtRunner(tmp_path / "p.onnx") as a, OrtRunner(out / "model.onnx") as b:
        got, want = a.infer({"pixels": x}), b.infer({"pixels": x})
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    _one_line_error(
        runner.invoke(app, ["convert", str(out / "model.onnx"), "-o", str(tmp_path / "q.onnx")]), "portable"
    )
    (tmp_path / "junk.onnx").write_bytes(b"garbage")
    _one_line_error(
        runner.invoke(app, ["convert", str(tmp_path / "junk.onnx"), "-o", str(tmp_path / "q.onnx")]),
        "not a readable ONNX",
    )


def test_report_and_tune_k_commands(exported, tmp_path):
    res = runner.invoke(
        app,
        ["report", str(exported), "--batch", "4", "--reps", "2", "--warmup", "0", "-o", str(tmp_path / "r"), "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert (tmp_path / "r" / "report.md").is_file() and (tmp_path / "r" / "report.json").is_file()
    assert json.loads((tmp_path / "r" / "report.json").read_text()) == data
    row = data["latency"][0]
    pr = row["ratio_paired"]
    assert pr["low"] <= pr["median"] <= pr["high"]
    # What ran: tiny model, 65 tokens, 6 blocks, ATS at 2..5 with K = 40 -> blocks 3, 4, 5 get 40 slots.
    assert row["slots_per_block"] == [65, 65, 65, 40, 40, 40]
    assert row["token_work_ratio"] == pytest.approx((3 * 65 + 3 * 40) / (6 * 65))
    share = row["ats_node_share"]
    assert 0 < share["overall"] < 1 and set(share["per_block"]) == {"2", "3", "4", "5"}
    assert "paired ratio [95% CI]" in (tmp_path / "r" / "report.md").read_text()
    # An impossible gate: ATS can never be 100x faster than dense -> exit 3, report still written.
    res = runner.invoke(
        app,
        ["report", str(exported), "--batch", "4", "--reps", "2", "--warmup", "0", "-o", str(tmp_path / "g")]
        + ["--max-slowdown", "0.01", "--no-plots"],
    )
    assert res.exit_code == 3, res.output
    assert (tmp_path / "g" / "report.json").is_file()
    res = runner.invoke(
        app, ["tune-k", str(exported), "--batch", "1", "--reps", "2", "--warmup", "0", "--step", "16", "--json"]
    )
    assert res.exit_code == 0, res.output
    tuned = json.loads(res.stdout)
    assert all(2 <= k <= 65 for k in tuned["k_schedule"]) and len(tuned["k_schedule"]) == 4


def test_export_precisions_and_calibrate(tiny_pt, tmp_path):
    """--precision fp16 adds the fp16 graphs; calibrate adds int8 ones; parity --precision reports them."""
    out = tmp_path / "o"
    res = runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(out), "--precision", "fp16", "--json"])
    assert res.exit_code == 0, res.output
    files = json.loads(res.stdout)["files"]
    assert {"model.onnx", "model.fp16.onnx"} <= set(files)
    man = json.loads((out / "manifest.json").read_text())
    assert "model.fp16.onnx" in man["artifacts"]
    _one_line_error(
        runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(out), "--precision", "int8"]),
        "--calib-data",
    )
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32))
    res = runner.invoke(
        app, ["calibrate", str(out), "--data", str(tmp_path / "calib.npy"), "--method", "max", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert (out / "model.int8.onnx").is_file()
    cal = json.loads(res.stdout)
    assert cal["output"] == str(out / "model.int8.onnx") and cal["cache_path"] == str(out / "calibration.json")
    assert cal["settings"]["method"] == "max" and cal["images"] == 8 and not cal["cache_hit"]
    cached = json.loads((out / "calibration.json").read_text())
    assert set(cal["amax"]) == set(cached["amax"])
    # Calibrating again on the same data and settings reads the cache instead.
    again = runner.invoke(app, ["calibrate", str(out), "--data", str(tmp_path / "calib.npy"), "--json"])
    again = json.loads(again.stdout)
    assert again["cache_hit"] and again["amax"] == cal["amax"]
    res = runner.invoke(app, ["parity", str(out), "--precision", "fp16", "--count", "4", "--json"])
    data = json.loads(res.stdout[: res.stdout.rindex("}") + 1])
    assert data["base"]["images"] == 4 and "logits_cosine_mean" in data
    # The seeded model is untrained, so either verdict can come out; the exit code must be the verdict's,
    # and the verdict the gates' (top-1 >= 99%, logits cosine mean >= 0.995) on the reported figures.
    fails = data["base"]["top1_agreement"] < 0.99 or data["logits_cosine_mean"] < 0.995
    assert data["passed"] is (not fails) and res.exit_code == (3 if fails else 0), res.output


def test_report_dynamic_says_what_ran(tiny_pt, tmp_path):
    """Dynamic shapes: the slots each block processed are what the batch really kept (its largest count)."""
    out = tmp_path / "dyn"
    args = ["export", str(tiny_pt), "--heads", "2", "--shape", "dynamic", "-o", str(out), "--batch", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        ["report", str(out), "--batch", "4", "--images", "4", "--reps", "2", "--warmup", "0", "--no-plots"]
        + ["-o", str(tmp_path / "r"), "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    row, counts = data["latency"][0], data["tokens"]["counts"]
    expected = [65.0, 65.0, 65.0] + [float(max(counts[str(b)])) for b in (2, 3, 4)]
    assert row["slots_per_block"] == expected
    assert row["token_work_ratio"] == pytest.approx(sum(expected) / (6 * 65))


def test_dense_export_single_step_int8_and_text_outputs(tiny_pt, tmp_path):
    """--ats-blocks none exports the dense model; export --precision int8 calibrates in the same run;
    calibrate and tokens print their human summaries (tokens' K' lines agree with its --json ids)."""
    dense = tmp_path / "dense"
    res = runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(dense), "--ats-blocks", "none"])
    assert res.exit_code == 0, res.output
    man = json.loads((dense / "manifest.json").read_text())
    assert man["ats"]["blocks"] == [] and man["ats"]["k_schedule"] == []
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32))
    out = tmp_path / "q"
    res = runner.invoke(
        app,
        ["export", str(tiny_pt), "--heads", "2", "-o", str(out), "--precision", "int8"]
        + ["--calib-data", str(tmp_path / "calib.npy"), "--json"],
    )
    assert res.exit_code == 0, res.output
    files = json.loads(res.stdout)["files"]
    assert {"model.onnx", "model.fp16.onnx", "model.int8.onnx"} <= set(files)
    assert "model.int8.onnx" in json.loads((out / "manifest.json").read_text())["artifacts"]
    res = runner.invoke(app, ["calibrate", str(out), "--data", str(tmp_path / "calib.npy")])
    assert res.exit_code == 0, res.output
    assert re.search(r"^calibrated \(max\) -> .*model\.int8\.onnx.* in ", res.stdout, re.M), res.stdout
    args = ["tokens", str(tiny_pt), "--heads", "2", "--max-k", "30"]
    as_json = json.loads(runner.invoke(app, args + ["--json"]).stdout)
    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    img = as_json["images"][0]
    assert text.stdout.splitlines()[0].startswith(f"{img['input']}: top-1 class {img['top1']}")
    for b, ids in img["kept"].items():
        assert re.search(rf"^  block {int(b):>2}: K'={len(ids) - 1:>3}  ", text.stdout, re.M), (b, text.stdout)
