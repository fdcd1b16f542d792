"""The device path's refusals, on any machine (no TensorRT, GPU or torch needed by the code under test).

Each bad input is one line of DependencyError/InputError/ConfigError naming the fix: TensorRT missing,
JetPack too old, plugin library missing, ONNX without manifest, corrupt plan, engine for another GPU or
TensorRT, reference from another model. Also: the device-path modules import neither torch nor tensorrt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers.trt_helpers import OrtEngine, fake_record, tiny_export

from ats_deploy.errors import ConfigError, DependencyError, InputError
from ats_deploy.exporters import trt as trt_build
from ats_deploy.exporters.trt import BuildSettings, build_engine, check_platform, read_record, record_path


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("errors_export"), parity_count=2)


@pytest.fixture
def fake_plan(export_dir, tmp_path) -> Path:
    """A plan file with a record describing it (as a build on a Jetson Orin would write)."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not really an engine, but the record's hash matches" * 100)
    rec = fake_record(export_dir, engine={"sha256": trt_build.sha256_file(plan)})
    record_path(plan).write_text(json.dumps({**rec}))
    return plan


def test_device_modules_import_neither_torch_nor_tensorrt():
    code = (
        "import sys\n"
        "import ats_deploy.exporters.trt, ats_deploy.exporters.rtx_plugin, ats_deploy.exporters.bundle\n"
        "import ats_deploy.runtime.trt_runner, ats_deploy.runtime.verify\n"
        "bad = [m for m in ('torch', 'tensorrt', 'tensorrt_rtx', 'onnxruntime', 'cuda') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_tensorrt_module_is_one_line(export_dir, monkeypatch):
    monkeypatch.setitem(trt_build.BACKEND_MODULES, "tensorrt", "tensorrt_does_not_exist")
    with pytest.raises(DependencyError) as err:
        build_engine(export_dir / "model.onnx", settings=BuildSettings(backend="tensorrt"), use_cache=False)
    assert "JetPack" in _one_line(err.value) and "pip install" in str(err.value)
    monkeypatch.setitem(trt_build.BACKEND_MODULES, "rtx", "tensorrt_rtx_does_not_exist")
    with pytest.raises(DependencyError, match="tensorrt-rtx-cu13"):
        trt_build.import_tensorrt("rtx")


def test_unknown_backend_is_a_config_error(monkeypatch):
    monkeypatch.setenv(trt_build.BACKEND_ENV, "onnxruntime")
    with pytest.raises(ConfigError, match="tensorrt or rtx"):
        trt_build.resolve_backend(None)
    assert trt_build.resolve_backend("RTX") == "rtx"


@pytest.mark.parametrize(
    ("version", "l4t", "jetpack"),
    [("8.5.2", (35, 4), "JetPack 5.x"), ("8.6.2", (36, 3), "JetPack 6.0"), ("10.1.0", (36, 3), "JetPack 6.0")],
)
def test_old_jetpack_is_refused_naming_the_fix(version, l4t, jetpack):
    with pytest.raises(DependencyError) as err:
        check_platform(version, l4t=l4t)
    assert jetpack in _one_line(err.value) and "JetPack 6.1" in str(err.value)


def test_supported_platforms_pass_and_old_desktop_tensorrt_is_refused():
    check_platform("10.3.0.30", l4t=(36, 4))  # JetPack 6.1/6.2
    check_platform("10.13.3", l4t=(38, 2))  # JetPack 7.x
    check_platform("10.1.0", l4t=None)  # a workstation: IPluginV3 exists from 10.0
    check_platform("1.7.1.116", backend="rtx")
    with pytest.raises(DependencyError, match=">= 10.0"):
        check_platform("8.6.1", l4t=None)


def test_tegra_release_parsing(tmp_path):
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    assert trt_build.read_tegra_release(f) == (36, 4)
    assert trt_build.read_tegra_release(tmp_path / "absent") is None


def test_plugin_library_missing_is_one_line(tmp_path):
    with pytest.raises(DependencyError) as err:
        trt_build.load_plugin_library(object(), tmp_path / "libats_sampler.so")  # type: ignore[arg-type]
    assert "ats-deploy plugin build" in _one_line(err.value)


def test_onnx_without_manifest_is_one_line(export_dir, tmp_path):
    (tmp_path / "model.onnx").write_bytes((export_dir / "model.onnx").read_bytes())
    with pytest.raises(InputError) as err:
        build_engine(tmp_path / "model.onnx", settings=BuildSettings(backend="rtx"))
    assert "manifest.json" in _one_line(err.value)


def test_onnx_changed_after_export_is_refused(export_dir, tmp_path):
    for name in ("model.onnx", "manifest.json"):
        (tmp_path / name).write_bytes((export_dir / name).read_bytes())
    with open(tmp_path / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="does not match its manifest"):
        build_engine(tmp_path / "model.onnx", settings=BuildSettings(backend="rtx"))


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        BuildSettings(batch=(4, 2, 8))
    with pytest.raises(ConfigError, match="precision"):
        BuildSettings(precision="bf16")  # type: ignore[arg-type]
    s = BuildSettings(batch=[1, 2, 4], plugin_lib="lib.so")  # type: ignore[arg-type]
    assert s.batch == (1, 2, 4) and isinstance(s.plugin_lib, Path)
    assert BuildSettings.from_dict(s.to_dict()) == s


def test_corrupt_plan_is_one_line(fake_plan):
    from ats_deploy.runtime.trt_runner import TrtRunner
    from ats_deploy.runtime.verify import verify

    assert read_record(fake_plan)["gpu"]["name"] == "Orin"
    with open(fake_plan, "r+b") as fh:
        fh.seek(10)
        fh.write(b"XX")
    for call in (lambda: read_record(fake_plan), lambda: TrtRunner(fake_plan), lambda: verify(fake_plan, "x.npz")):
        with pytest.raises(InputError) as err:
            call()
        assert "corrupt" in _one_line(err.value)


def test_plan_without_record_is_one_line(fake_plan):
    record_path(fake_plan).unlink()
    with pytest.raises(InputError, match="no build record"):
        read_record(fake_plan)


def test_engine_for_another_gpu_or_tensorrt_is_refused(export_dir):
    from ats_deploy.runtime.trt_runner import check_engine_compat

    rec = fake_record(export_dir)
    thor = {"name": "NVIDIA Thor", "compute_capability": "11.0"}
    orin = {"name": "Orin", "compute_capability": "8.7"}
    check_engine_compat(rec, backend="tensorrt", trt_version="10.3.0", gpu=orin)
    with pytest.raises(InputError, match="built for Orin") as err:
        check_engine_compat(rec, backend="tensorrt", trt_version="10.3.0", gpu=thor)
    _one_line(err.value)
    with pytest.raises(InputError, match="TensorRT 10.3.0 but this is TensorRT 10.13"):
        check_engine_compat(rec, backend="tensorrt", trt_version="10.13.0", gpu=orin)
    with pytest.raises(InputError, match="rtx"):
        check_engine_compat(rec, backend="rtx", trt_version="10.3.0", gpu=orin)
    with pytest.raises(InputError, match="without a GPU"):
        check_engine_compat({**rec, "gpu": None}, backend="tensorrt", trt_version="10.3.0", gpu=orin)


def test_reference_from_another_model_is_refused(export_dir, fake_plan, tmp_path):
    from ats_deploy.runtime.verify import check_reference, load_reference, verify

    rec = read_record(fake_plan)
    ours = export_dir / "reference.npz"
    check_reference(rec, load_reference(ours), ours)  # the export's own reference is accepted
    other = tiny_export(tmp_path / "other", num_classes=7, seed=11, parity_count=2)
    with pytest.raises(InputError, match="another export") as err:
        verify(fake_plan, other / "reference.npz")  # refused before TensorRT or CUDA is touched
    _one_line(err.value)
    # Without a manifest beside it, the arrays themselves give it away (7 classes, not 10).
    lone = tmp_path / "lone" / "reference.npz"
    lone.parent.mkdir()
    lone.write_bytes((other / "reference.npz").read_bytes())
    with pytest.raises(InputError, match="7 classes"):
        check_reference(rec, load_reference(lone), lone)
    # Same model, other input size: refused too.
    data = dict(np.load(ours))
    data["pixels"] = np.zeros((1, 3, 64, 64), np.float32)
    np.savez(tmp_path / "lone" / "resized.npz", **data)
    with pytest.raises(InputError, match="inputs"):
        check_reference(rec, load_reference(tmp_path / "lone" / "resized.npz"), tmp_path / "lone" / "resized.npz")


def test_reference_file_errors_are_one_line(tmp_path):
    from ats_deploy.runtime.verify import load_reference

    with pytest.raises(InputError, match="does not exist"):
        load_reference(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable"):
        load_reference(tmp_path / "bad.npz")


@pytest.mark.parametrize("path", [None, ""])
def test_missing_plugin_path_is_a_dependency_error_not_a_type_error(path):
    """A plugin-form engine whose record, --plugin-lib and $ATS_SAMPLER_PLUGIN all lack the library (a record
    written with the Python plugin path, or edited) used to reach Path(None) and raise a TypeError."""
    with pytest.raises(DependencyError) as err:
        trt_build.load_plugin_library(object(), path)  # refused before TensorRT is touched
    assert "--plugin-lib" in _one_line(err.value)


def _plan_with(fake_plan, **over):
    rec = json.loads(record_path(fake_plan).read_text())
    rec.update(over)
    record_path(fake_plan).write_text(json.dumps(rec))
    return fake_plan


def test_runner_refuses_a_plugin_engine_without_its_library(fake_plan, monkeypatch, tmp_path):
    """Checked before TensorRT is imported: one line with the fix, not a TypeError deep in a loader."""
    from ats_deploy.runtime.trt_runner import TrtRunner

    monkeypatch.delenv("ATS_SAMPLER_PLUGIN", raising=False)
    plan = _plan_with(fake_plan, plugin={"kind": "library", "path": None})
    with pytest.raises(InputError, match="needs the sampler plugin library and none was given") as err:
        TrtRunner(plan)
    _one_line(err.value)
    with pytest.raises(InputError, match="does not exist; build it with ats-deploy plugin build"):
        TrtRunner(plan, plugin_lib=tmp_path / "libats_sampler.so")


def test_runner_refuses_rtx_engines_with_the_way_out(fake_plan):
    from ats_deploy.errors import DependencyError
    from ats_deploy.runtime.trt_runner import TrtRunner

    plan = _plan_with(fake_plan, backend="rtx")
    with pytest.raises(DependencyError, match="build one on the device with ats-deploy build --backend tensorrt"):
        TrtRunner(plan)


def test_runner_close_is_safe_after_a_failed_init(fake_plan):
    """Nothing is held before Polygraphy activates the runner: close() after a refused engine is a no-op."""
    from ats_deploy.runtime.trt_runner import TrtRunner

    runner = TrtRunner.__new__(TrtRunner)
    with pytest.raises(InputError):
        TrtRunner.__init__(runner, _plan_with(fake_plan, plugin={"kind": "library", "path": None}))
    runner.close()
    runner.close()


def test_verify_on_the_cpu_chunks_by_the_engine_batch(tmp_path):
    """verify() through ONNX Runtime: a dynamic-batch engine gets chunks of its largest batch, a static one
    refuses a reference whose image count is not a multiple of its batch, and the verdict serialises."""
    from ats_deploy.runtime.verify import verify

    exp = tiny_export(tmp_path / "e", dynamic_batch=True, parity_count=6)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"stand-in plan bytes")
    record_path(plan).write_text(json.dumps(fake_record(exp, engine={"sha256": trt_build.sha256_file(plan)})))
    eng = OrtEngine(exp / "model.onnx", None, (1, 4))
    res = verify(plan, exp / "reference.npz", runner=eng)
    assert res.parity.passed and res.images == 6 and res.batches == 2 and eng.seen == [4, 2]
    d = res.to_dict()
    assert d["plan"] == str(plan) and d["batches"] == 2 and d["passed"] is True and d["images"] == 6
    with pytest.raises(InputError, match="holds 6 images, not a multiple of the engine's batch 4") as err:
        verify(plan, exp / "reference.npz", runner=OrtEngine(exp / "model.onnx", 4, (4, 4)))
    _one_line(err.value)


def test_reference_without_model_arrays_is_refused(tmp_path, export_dir, fake_plan):
    from ats_deploy.runtime.verify import check_reference, load_reference

    np.savez(tmp_path / "nologits.npz", pixels=np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(InputError, match="has no pixels/logits arrays"):
        load_reference(tmp_path / "nologits.npz")
    rec = read_record(fake_plan)
    data = dict(np.load(export_dir / "reference.npz"))
    lone = tmp_path / "lone"
    lone.mkdir()
    first = next(k for k in data if k.startswith("tokens_"))
    short = {k: v for k, v in data.items() if k != first}
    np.savez(lone / "short.npz", **short)
    with pytest.raises(InputError, match=f"lacks the engine outputs \\['{first}'\\]"):
        check_reference(rec, load_reference(lone / "short.npz"), lone / "short.npz")
    flat = dict(data, logits=data["logits"].reshape(-1))
    np.savez(lone / "flat.npz", **flat)
    with pytest.raises(InputError, match="logits has shape"):
        check_reference(rec, load_reference(lone / "flat.npz"), lone / "flat.npz")
    (lone / "manifest.json").write_text("{not json")  # an unreadable manifest beside it vouches for nothing
    np.savez(lone / "full.npz", **data)
    with pytest.raises(InputError, match="belongs to another export"):
        check_reference(rec, load_reference(lone / "full.npz"), lone / "full.npz")


def test_verify_command_verdicts_through_the_cli(tmp_path, monkeypatch):
    """`ats-deploy verify` end to end with TensorRT replaced by ONNX Runtime on the export's graph: PASS
    exits 0 (human and --json), a reference whose logits were changed exits 3 with the failed gate."""
    from typer.testing import CliRunner

    import ats_deploy.runtime.trt_runner as tr
    from ats_deploy.cli import app

    exp = tiny_export(tmp_path / "e", dynamic_batch=True, parity_count=4)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"stand-in plan bytes")
    record_path(plan).write_text(json.dumps(fake_record(exp, engine={"sha256": trt_build.sha256_file(plan)})))
    monkeypatch.setattr(tr, "TrtRunner", lambda plan, **kw: OrtEngine(exp / "model.onnx", None, (1, 4)))
    cli = CliRunner()
    res = cli.invoke(app, ["verify", str(plan), "--reference", str(exp / "reference.npz")])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output
    res = cli.invoke(app, ["verify", str(plan), "--reference", str(exp / "reference.npz"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["passed"] is True
    data = dict(np.load(exp / "reference.npz"))
    data["logits"] = data["logits"] + 1.0
    np.savez(exp / "changed.npz", **data)
    res = cli.invoke(app, ["verify", str(plan), "--reference", str(exp / "changed.npz")])
    assert res.exit_code == 3, res.output
    assert "verify gate failed: logits max abs error" in res.output


def test_reference_provenance_each_way_it_can_be_proven(export_dir, fake_plan, tmp_path):
    """A copied reference is ours when (a) the manifest beside it is byte-for-byte the engine's, or (b) that
    manifest lists the engine's ONNX; (c) neither: refused, pointing at the engine's export directory."""
    import shutil

    from ats_deploy.runtime.verify import check_reference, load_reference

    rec = read_record(fake_plan)
    data = dict(np.load(export_dir / "reference.npz"))
    data["logits"] = data["logits"] + 0.0  # same arrays, another file: the sha256 path does not apply
    man = json.loads((export_dir / "manifest.json").read_text())

    def place(name: str, manifest_text: str):
        d = tmp_path / name
        d.mkdir()
        np.savez(d / "reference.npz", **data)
        (d / "manifest.json").write_text(manifest_text)
        return d / "reference.npz"

    a = tmp_path / "a"
    a.mkdir()
    np.savez(a / "reference.npz", **data)
    shutil.copy(export_dir / "manifest.json", a / "manifest.json")  # (a) the very manifest: its sha matches
    rec_a = {**rec, "onnx": {**rec["onnx"], "sha256": "0" * 64}}  # ... and the ONNX sha does not help
    check_reference(rec_a, load_reference(a / "reference.npz"), a / "reference.npz")
    edited = {**man, "note": "same export, manifest re-saved"}  # (b) another file, listing the engine's ONNX
    ref_b = place("b", json.dumps(edited))
    check_reference(rec, load_reference(ref_b), ref_b)
    with pytest.raises(InputError, match="belongs to another export"):
        check_reference(rec_a, load_reference(ref_b), ref_b)  # (b) without the ONNX sha: not provable
    other = {**edited, "artifacts": {k: {"sha256": "f" * 64} for k in man["artifacts"]}}
    ref_c = place("c", json.dumps(other))
    with pytest.raises(InputError) as err:
        check_reference(rec, load_reference(ref_c), ref_c)
    assert f"use the reference.npz from {export_dir.resolve()}" in str(err.value)


class _Shifted(OrtEngine):
    """The export's graph with every logit moved by ``shift`` (an engine of lower precision, in effect)."""

    shift = 0.01

    def infer(self, feed):
        out = super().infer(feed)
        return {**out, "logits": out["logits"] + self.shift}


@pytest.mark.parametrize("precision,passed", [("fp16", True), ("fp32", False)])
def test_verify_judges_with_the_engines_precision(tmp_path, precision, passed):
    """Logits 0.01 off: within the fp16 gate (5e-2), outside the fp32 one (1e-4); the record says which."""
    from ats_deploy.runtime.verify import verify

    exp = tiny_export(tmp_path / "e", dynamic_batch=True, parity_count=4)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"stand-in plan bytes")
    rec = fake_record(exp, engine={"sha256": trt_build.sha256_file(plan)}, precision=precision)
    record_path(plan).write_text(json.dumps(rec))
    res = verify(plan, exp / "reference.npz", runner=_Shifted(exp / "model.onnx", None, (1, 4)))
    assert res.precision == precision and res.parity.tolerances.logits_atol == (5e-2 if precision == "fp16" else 1e-4)
    assert res.parity.passed is passed
