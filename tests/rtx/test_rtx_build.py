"""NVIDIA's own ONNX parser and builder (TensorRT-RTX, CPU only) accept our graphs, through build_engine.

The same function ``ats-deploy build`` calls builds fp32 engines from the portable and the plugin form, in
static and dynamic shape mode, with a static and a dynamic batch. For the plugin form the network must hold
one AdaptiveTokenSampler layer per ATS block with the contract's outputs (docs/ATS_RULE.md section 4). Plugin-form
parsing runs in the crash-guarded child process. Engines built here cannot run (no GPU; TensorRT-RTX does
not run on sm_90 either): running them is tests/trt's job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _helpers.trt_helpers import TINY_K, fake_record, require_rtx, tiny_export

from ats_deploy.errors import DependencyError, ExportError, InputError
from ats_deploy.exporters.trt import BuildSettings, build_engine, read_record

pytestmark = pytest.mark.rtx

ATS_BLOCKS = 3  # tiny model: ATS in blocks 1..3
CASES = [(shape, dyn) for shape in ("static", "dynamic") for dyn in (False, True)]


@pytest.fixture(scope="module")
def rtx():
    return require_rtx()


@pytest.fixture(scope="module")
def exports(rtx, tmp_path_factory):
    """One tiny export per (shape mode, dynamic batch)."""
    root = tmp_path_factory.mktemp("rtx_exports")
    return {
        (s, d): tiny_export(root / f"{s}_{'dyn' if d else 'b2'}", shape=s, dynamic_batch=d, batch=2) for s, d in CASES
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_cache")


@pytest.mark.parametrize("form", ["model.onnx", "model.plugin.onnx"])
@pytest.mark.parametrize(("shape", "dynamic_batch"), CASES)
def test_engine_builds(exports, cache, tmp_path, shape, dynamic_batch, form):
    src = exports[(shape, dynamic_batch)]
    settings = BuildSettings(backend="rtx", precision="fp32", batch=(1, 2, 4) if dynamic_batch else None)
    res = build_engine(src / form, tmp_path / "model.plan", settings=settings, cache_dir=cache)
    assert res.plan.stat().st_size > 10_000
    rec = read_record(res.plan)  # the sha256 in the record matches the written plan
    assert rec == json.loads(res.record_path.read_text())
    assert rec["backend"] == "rtx" and rec["precision"] == "fp32" and rec["gpu"] is None
    assert rec["onnx"]["sha256"] and rec["manifest"]["reference_sha256"]
    assert rec["settings"]["batch"] == ([1, 2, 4] if dynamic_batch else None)
    assert sorted(os.listdir(tmp_path)) == ["model.plan", "model.plan.json"]  # no temporary files left
    batch = -1 if dynamic_batch else 2
    outputs = {o["name"]: o for o in rec["network"]["outputs"]}
    assert outputs["logits"]["shape"] == [batch, 10]
    assert [o["dtype"] for n, o in outputs.items() if n.startswith("tokens_")] == ["int64"] * ATS_BLOCKS
    plugins = rec["network"]["plugin_layers"]
    if form == "model.onnx":
        assert plugins == [] and rec["plugin"] is None
        return
    assert rec["plugin"]["kind"] == "python" and len(plugins) == ATS_BLOCKS
    # No --plugin-lib: the Python stand-in was used, and both the output and the record say so.
    assert "stand-in" in rec["plugin"]["note"] and any("stand-in" in w for w in res.warnings)
    for layer in plugins:
        outs = layer["outputs"]
        if shape == "static":
            assert [(o["shape"], o["dtype"]) for o in outs] == [([batch, TINY_K], "int32"), ([batch], "int32")]
        else:  # [B, s] indices, [B] counts, 0-D int64 size tensor
            assert [(o["shape"], o["dtype"]) for o in outs] == [
                ([batch, -1], "int32"),
                ([batch], "int32"),
                ([], "int64"),
            ]


def test_cache_hits_and_rebuild_fields(exports, tmp_path):
    src = exports[("static", False)] / "model.onnx"
    cache = tmp_path / "cache"
    first = build_engine(src, tmp_path / "a.plan", settings=BuildSettings(backend="rtx"), cache_dir=cache)
    again = build_engine(
        src, tmp_path / "b.plan", settings=BuildSettings(backend="rtx", precision="fp32"), cache_dir=cache
    )
    assert not first.cached and again.cached  # precision None resolves to the ONNX's fp32: the same engine
    assert again.record["engine"]["sha256"] == first.record["engine"]["sha256"]
    assert (tmp_path / "b.plan").read_bytes() == (tmp_path / "a.plan").read_bytes()
    other = build_engine(
        src, tmp_path / "c.plan", settings=BuildSettings(backend="rtx", optimization_level=1), cache_dir=cache
    )
    assert not other.cached and other.record["cache_key"] != first.record["cache_key"]
    assert "optimization_level" in BuildSettings.REBUILD_FIELDS and "timing_cache" not in BuildSettings.REBUILD_FIELDS


def test_backend_from_environment(exports, tmp_path, monkeypatch):
    monkeypatch.setenv("ATS_DEPLOY_TENSORRT", "rtx")
    res = build_engine(exports[("static", False)] / "model.onnx", tmp_path / "m.plan", use_cache=False)
    assert res.record["backend"] == "rtx"


def test_plugin_parse_without_shim_is_an_error_not_an_abort(exports, tmp_path):
    """In-process parsing of plugin nodes without the shim must refuse, not let TensorRT-RTX abort us."""
    from ats_deploy.exporters.rtx_plugin import shim_active

    env_ok = shim_active()
    if env_ok:
        pytest.skip("this process already has libtensorrt_rtx.so on LD_LIBRARY_PATH")
    with pytest.raises(DependencyError, match="LD_LIBRARY_PATH"):
        build_engine(
            exports[("static", False)] / "model.plugin.onnx",
            tmp_path / "m.plan",
            settings=BuildSettings(backend="rtx"),
            use_cache=False,
            isolate=False,
        )


def test_shim_is_made_outside_the_repo_and_guards_a_child(tmp_path):
    from ats_deploy.exporters.rtx_plugin import RTX_LIBRARY, ensure_rtx_shim, guarded_env, rtx_library_path

    d = ensure_rtx_shim(tmp_path / "shim")
    assert (d / RTX_LIBRARY).resolve() == rtx_library_path().resolve()
    env = guarded_env(tmp_path / "shim")
    code = "from ats_deploy.exporters.rtx_plugin import shim_active; print(shim_active())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_missing_plugin_library_is_one_line(exports, tmp_path):
    with pytest.raises(DependencyError) as err:
        build_engine(
            exports[("static", False)] / "model.plugin.onnx",
            tmp_path / "m.plan",
            settings=BuildSettings(backend="rtx", plugin_lib=tmp_path / "libats_sampler.so"),
            use_cache=False,
        )
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)


def test_parse_error_is_one_line(exports, tmp_path):
    import onnx

    src = exports[("static", False)]
    model = onnx.load(str(src / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type = "NoSuchOp"
    (tmp_path / "manifest.json").write_text((src / "manifest.json").read_text())
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ExportError, match="could not parse bad.onnx") as err:
        build_engine(tmp_path / "bad.onnx", settings=BuildSettings(backend="rtx"), use_cache=False)
    assert "\n" not in str(err.value)


def test_verify_refuses_a_reference_from_another_model(exports, tmp_path):
    """A real record (RTX build) against the reference of a model with other classes: refused before running."""
    from ats_deploy.runtime.verify import verify

    res = build_engine(
        exports[("static", False)] / "model.onnx",
        tmp_path / "m.plan",
        settings=BuildSettings(backend="rtx"),
        use_cache=False,
    )
    other = tiny_export(tmp_path / "other", num_classes=7, seed=11, parity_count=2)
    with pytest.raises(InputError, match="another"):
        verify(res.plan, other / "reference.npz")
    assert fake_record(other)["onnx"]["sha256"] != res.record["onnx"]["sha256"]


def test_fp16_graph_is_labelled_fp16_and_refuses_fp32_label(exports, tmp_path):
    """Precision is the ONNX's: a float16 graph builds as fp16; asking it to be fp32 is a one-line error."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ats_deploy.errors import ConfigError
    from ats_deploy.exporters.trt import inspect_onnx

    w = numpy_helper.from_array(np.eye(4, dtype=np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "h.onnx"))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "ats-deploy/1", "artifacts": {}}))
    assert inspect_onnx(tmp_path / "h.onnx").precision == "fp16"
    with pytest.raises(ConfigError, match="fp16 graph"):
        build_engine(tmp_path / "h.onnx", settings=BuildSettings(backend="rtx", precision="fp32"))
    res = build_engine(tmp_path / "h.onnx", settings=BuildSettings(backend="rtx"), use_cache=False)
    assert res.record["precision"] == "fp16" and res.record["network"]["outputs"][0]["dtype"] == "half"


@pytest.mark.slow
def test_deit_tiny_plugin_form_builds(rtx, tmp_path):
    """The embedded DeiT-Ti (197 tokens, ATS in blocks 3..11) as ats-deploy export writes it."""
    from ats_deploy.exporters.export import export_model
    from ats_deploy.exporters.onnx import GraphOptions
    from ats_deploy.model.config import resolve_ats
    from ats_deploy.model.default import default_checkpoint

    ck = default_checkpoint()
    ats = resolve_ats(ck.config, max_k=128)
    export_model(
        ck, ats, tmp_path, opts=GraphOptions(sampler="plugin"), parity_count=0, source={"kind": "embedded", "seed": 0}
    )
    res = build_engine(tmp_path / "model.plugin.onnx", settings=BuildSettings(backend="rtx"), use_cache=False)
    assert len(res.record["network"]["plugin_layers"]) == 9
    assert res.record["network"]["plugin_layers"][0]["outputs"][0]["shape"] == [1, 128]


@pytest.mark.parametrize("shape", ["static", "dynamic"])
def test_fp16_export_builds_strongly_typed(rtx, tmp_path, shape):
    """ats_deploy.calibration.fp16's graphs (score/CDF/sampler path fp32) build as fp16 engines, both forms."""
    from ats_deploy.calibration import fp16
    export = tiny_export(tmp_path / "export", shape=shape, dynamic_batch=True, parity_count=2)
    written = fp16.write_fp16(export)
    assert set(written) == {"model.fp16.onnx", "model.plugin.fp16.onnx"}
    for name in written:
        res = build_engine(export / name, settings=BuildSettings(backend="rtx", precision="fp16"), use_cache=False)
        rec = res.record
        assert rec["precision"] == "fp16" and rec["settings"]["precision"] == "fp16"
        assert {o["name"]: o["dtype"] for o in rec["network"]["outputs"]}["logits"] == "float"  # fp32 I/O kept
        if "plugin" in name:
            assert len(rec["network"]["plugin_layers"]) == ATS_BLOCKS
            assert [o["dtype"] for o in rec["network"]["plugin_layers"][0]["outputs"]][:2] == ["int32", "int32"]


@pytest.mark.parametrize("shape", ["static", "dynamic"])
def test_int8_export_builds_strongly_typed(rtx, tmp_path, shape):
    """The explicit Q/DQ graphs of ats_deploy.calibration.int8 build as int8 engines, both forms."""
    import numpy as np

    from ats_deploy.calibration.fp16 import write_fp16
    from ats_deploy.calibration.int8 import calibrate_export

    export = tiny_export(tmp_path / "export", shape=shape, dynamic_batch=True, parity_count=2)
    write_fp16(export)
    data = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    _, written = calibrate_export(export, data, method="max", progress=False)
    names = [n for n in written if n.endswith(".onnx")]
    assert set(names) == {"model.int8.onnx", "model.plugin.int8.onnx"}
    for name in names:
        res = build_engine(export / name, settings=BuildSettings(backend="rtx", precision="int8"), use_cache=False)
        assert res.record["precision"] == "int8"
        if "plugin" in name:
            assert len(res.record["network"]["plugin_layers"]) == ATS_BLOCKS


def test_cli_build_and_bundle(exports, tmp_path):
    """`ats-deploy build --backend rtx` and `ats-deploy bundle` through the CLI, as a user runs them."""
    from typer.testing import CliRunner

    from ats_deploy.cli import app

    export = exports[("dynamic", True)]
    cli = CliRunner()
    res = cli.invoke(
        app, ["build", str(export / "model.plugin.onnx"), "--backend", "rtx", "-o", str(tmp_path / "m.plan")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.plan").stat().st_size > 0
    assert read_record(tmp_path / "m.plan")["precision"] == "fp32"
    res = cli.invoke(app, ["build", str(export / "model.onnx"), "--backend", "rtx", "--precision", "fp16"])
    assert res.exit_code == 1 and "fp32" in res.output  # precision lives in the ONNX: a mismatch is refused
    res = cli.invoke(app, ["bundle", str(export), "-o", str(tmp_path / "b.tar.gz"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bytes"] == (tmp_path / "b.tar.gz").stat().st_size
