"""The gates that decide PASS/FAIL, at their edges: thresholds met exactly, NaN, excused images, exit codes.

Expected values are worked out by hand from the constructed outputs (comments give the arithmetic).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from ats_deploy.cli import app
from ats_deploy.model.reference import NEAR_BOUNDARY
from ats_deploy.reports.parity import TOLERANCES, Tolerances, compare_outputs
from ats_deploy.runtime.trt_runner import check_engine_compat

runner = CliRunner()
BLOCKS = (2, 3)


def _outputs(n: int, *, near=None) -> dict[str, np.ndarray]:
    """n images, 4 classes (image i's top-1 is class i % 4), 2 ATS blocks keeping tokens [0, 1, 2]."""
    logits = np.zeros((n, 4), np.float32)
    logits[np.arange(n), np.arange(n) % 4] = 1.0
    out = {"logits": logits}
    for b in BLOCKS:
        out[f"tokens_{b}"] = np.tile(np.array([[0, 1, 2, 0]], np.int64), (n, 1))
        out[f"count_{b}"] = np.full(n, 3, np.int32)
        if near is not None:
            out[f"{NEAR_BOUNDARY}{b}"] = np.asarray(near, bool)
    return out


def _copy(d):
    return {k: v.copy() for k, v in d.items()}


def test_nan_logits_fail_the_gate():
    ref = _outputs(8)
    got = _copy(ref)
    got["logits"][3, 1] = np.nan
    res = compare_outputs(ref, got, blocks=BLOCKS)
    assert not res.passed and any(f.startswith("logits max abs error nan") for f in res.failures), res.failures


def test_kept_threshold_is_inclusive():
    """10 images x 2 blocks = 20 pairs; one differs -> agreement 19/20 = 0.95 exactly."""
    ref = _outputs(10)
    got = _copy(ref)
    got["tokens_3"][4, 1:3] = [2, 1]  # same set, other order: a mismatch (set and order must agree)
    at = compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(kept_min=0.95))
    assert at.kept_pairs == 20 and at.kept_mismatches == 1 and at.kept_agreement == pytest.approx(0.95)
    assert at.passed, at.failures
    above = compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(kept_min=0.951))
    assert [f for f in above.failures if f.startswith("kept-set agreement 95.00% < 95.10%")]


def test_top1_threshold_is_inclusive():
    """8 images, one top-1 flips -> agreement 7/8 = 0.875 exactly."""
    ref = _outputs(8)
    got = _copy(ref)
    got["logits"][5] = [0.0, 0.0, 0.0, 2.0]  # image 5's top-1 was class 1
    tol = dict(logits_atol=10.0)
    assert compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(top1_min=0.875, **tol)).passed
    res = compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(top1_min=0.876, **tol))
    assert [f for f in res.failures if f.startswith("top-1 agreement 87.50% < 87.60%")]


def test_excused_images_leave_their_pairs_out():
    """10 images, 2 blocks. Image 0 is near-boundary and differs in both blocks (excused: 2 mismatches);
    image 1 is not and differs in block 3. Judged: 9 images x 2 blocks = 18 pairs, 1 mismatch ->
    1 - 1/18 = 0.9444...; over all pairs it would be 1 - 3/20 = 0.85."""
    near = np.zeros(10, bool)
    near[0] = True
    ref = _outputs(10, near=near)
    got = _copy(ref)
    for b in BLOCKS:
        got[f"tokens_{b}"][0, 2] = 3
    got["tokens_3"][1, 2] = 3
    got["logits"][0] += 5.0  # the excused image's logits do not count either
    res = compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(kept_min=17 / 18))
    assert res.kept_pairs == 20 and res.kept_mismatches == 3 and res.kept_agreement == pytest.approx(0.85)
    assert res.excused_images == 1 and res.excused_mismatches == 2
    assert res.gated_kept_agreement == pytest.approx(17 / 18) and res.gated_logits_max_abs == 0.0
    assert res.passed, res.failures
    assert not compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(kept_min=0.945)).passed


def test_too_many_excused_images_cannot_pass():
    """5 of 8 images near-boundary (and differing): 3 judged, fewer than half -> a failure of its own."""
    near = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    ref = _outputs(8, near=near)
    got = _copy(ref)
    got["tokens_2"][near, 1] = 3
    res = compare_outputs(ref, got, blocks=BLOCKS)
    assert res.excused_images == 5
    assert [f for f in res.failures if f.startswith("only 3 of 8 images are free of near-boundary picks")]
    near[4] = False  # 4 of 8 judged: exactly half is enough
    got4 = _copy(_outputs(8, near=near))
    got4["tokens_2"][near, 1] = 3
    assert compare_outputs(_outputs(8, near=near), got4, blocks=BLOCKS).passed


def test_engine_compat_same_gpu_name_other_compute_capability():
    rec = {"backend": "tensorrt", "tensorrt_version": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"}}
    check_engine_compat(
        rec, backend="tensorrt", trt_version="10.3.0", gpu={"name": "Orin", "compute_capability": "8.7"}
    )
    from ats_deploy.errors import InputError

    with pytest.raises(InputError, match="compute capability 8.7"):
        check_engine_compat(
            rec, backend="tensorrt", trt_version="10.3.0", gpu={"name": "Orin", "compute_capability": "8.6"}
        )
    with pytest.raises(InputError, match="TensorRT 10.3.0 but this is TensorRT 10.3.1"):
        check_engine_compat(
            rec, backend="tensorrt", trt_version="10.3.1", gpu={"name": "Orin", "compute_capability": "8.7"}
        )


# -- exit codes ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory, tiny_ckpt):
    path = tmp_path_factory.mktemp("ck") / "tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in tiny_ckpt.state_dict.items()}}, path)
    return path


def test_export_exits_3_when_its_parity_gate_fails(tiny_pt, tmp_path, monkeypatch):
    """The real comparison runs; only the gate is set out of reach (top-1 agreement above 100%)."""
    out = tmp_path / "o"
    monkeypatch.setitem(TOLERANCES, "default", Tolerances(top1_min=1.01))
    monkeypatch.setitem(TOLERANCES, "fp32", Tolerances(top1_min=1.01))
    res = runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(out), "--parity-inputs", "4"])
    assert res.exit_code == 3, res.output
    assert "parity gate failed: top-1 agreement 100.00% < 101.00%" in res.output
    assert (out / "manifest.json").is_file()  # the export itself is kept, with its failed parity recorded
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] is False


def test_parity_precision_exits_3_on_a_damaged_fp16_graph(tiny_pt, tmp_path):
    out = tmp_path / "o"
    res = runner.invoke(app, ["export", str(tiny_pt), "--heads", "2", "-o", str(out), "--precision", "fp16"])
    assert res.exit_code == 0, res.output
    path = out / "model.fp16.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name.startswith("head.bias"):
            arr = onnx.numpy_helper.to_array(init)
            arr = arr + np.arange(arr.size, dtype=arr.dtype).reshape(arr.shape)  # shifts classes apart: top-1 moves
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    from ats_deploy.exporters.trt import sha256_file

    man = json.loads((out / "manifest.json").read_text())
    man["artifacts"]["model.fp16.onnx"]["sha256"] = sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(man))
    res = runner.invoke(app, ["parity", str(out), "--precision", "fp16", "--count", "8"])
    assert res.exit_code == 3, res.output
    assert "FAIL" in res.output


def test_installed_script_runs(tmp_path):
    """The console script pip installs (not only the in-process CLI): help, and a one-line error, exit 1."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("ats-deploy") or str(Path(sys.executable).with_name("ats-deploy"))
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "export" in res.stdout
    res = subprocess.run([exe, "parity", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert (
        res.returncode == 1 and res.stderr.strip().startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    )


def test_every_image_excused_reports_no_judged_logits_error():
    """4 images, all near-boundary and all differing: nothing is judged, so the gated logits error is 0.0
    (no judged image), not some placeholder, and the only failure is the judged-count rule."""
    near = np.ones(4, bool)
    ref = _outputs(4, near=near)
    got = _copy(ref)
    got["tokens_2"][:, 1] = 3
    got["logits"] += 5.0
    res = compare_outputs(ref, got, blocks=BLOCKS)
    assert res.excused_images == 4 and res.gated_logits_max_abs == 0.0
    assert res.logits_max_abs == pytest.approx(5.0)
    assert len(res.failures) == 1 and res.failures[0].startswith("only 0 of 4 images"), res.failures


def test_run_chunks_batch_zero_or_none_means_all_at_once():
    from ats_deploy.reports.parity import run_chunks

    class Recorder:
        def __init__(self):
            self.sizes = []

        def infer(self, feed):
            self.sizes.append(len(feed["pixels"]))
            return {"logits": feed["pixels"].reshape(len(feed["pixels"]), -1)[:, :2].copy()}

    x = np.arange(5 * 3 * 2 * 2, dtype=np.float32).reshape(5, 3, 2, 2)
    for batch, sizes in ((None, [5]), (0, [5]), (-1, [5]), (2, [2, 2, 2])):
        r = Recorder()
        out = run_chunks(r, x, batch)
        assert r.sizes == sizes, batch
        np.testing.assert_array_equal(out["logits"], x.reshape(5, -1)[:, :2])  # padding trimmed back


def test_k_prime_counts_one_prefix_token_by_default():
    """count 3 = CLS + 2 kept patches: K' is 2 with the default single prefix token (a distilled model
    passes prefix_tokens=2 and gets 1)."""
    ref = _outputs(4)
    res = compare_outputs(ref, ref, blocks=BLOCKS)
    assert [(s.block, s.kept_mean, s.kept_min, s.kept_max) for s in res.blocks] == [(2, 2.0, 2, 2), (3, 2.0, 2, 2)]
    assert compare_outputs(ref, ref, blocks=BLOCKS, prefix_tokens=2).blocks[0].kept_max == 1


def test_logits_tolerance_is_inclusive():
    """Every logit off by 0.5 (exact in float32) against logits_atol 0.5: at the bound, a pass."""
    ref = _outputs(4)
    got = _copy(ref)
    got["logits"] = got["logits"] + np.float32(0.5)
    assert compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(logits_atol=0.5)).passed
    assert not compare_outputs(ref, got, blocks=BLOCKS, tolerances=Tolerances(logits_atol=0.4999)).passed


def test_unknown_precision_gets_the_fp32_gates_and_the_report_reads_as_lines():
    from ats_deploy.reports.parity import format_parity, tolerances_for

    assert tolerances_for("bf16") == TOLERANCES["default"] == tolerances_for(None)
    assert tolerances_for("int8") == TOLERANCES["int8"]
    res = compare_outputs(_outputs(4), _outputs(4), blocks=BLOCKS)
    text = format_parity(res)
    assert text.splitlines()[0] == "parity: 4 images, PASS" and "XX" not in text
    assert format_parity(res, title="fp16").startswith("fp16: 4 images, PASS")
