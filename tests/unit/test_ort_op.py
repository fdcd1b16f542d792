"""The sampler as an ONNX Runtime custom op (``plugins/ats_sampler_ort``): built with CMake, loaded by a real
ONNX Runtime session, it equals the float32 NumPy reference bit for bit, and a plugin-form model run with it
keeps what the portable form keeps.

Building the op needs ONNX Runtime's C API header, which the onnxruntime wheel does not ship: the tests that
run it need ``ONNXRUNTIME_ROOT`` (an ONNX Runtime release, or any folder holding ``onnxruntime_c_api.h``) and
skip with that reason otherwise. Everything around the op (refusals, messages, the library lookup) is tested
without it.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from test_kernel_cpu import _cases, _scores

from ats_deploy.errors import ConfigError, DependencyError, InputError
from ats_deploy.model.reference import output_slots, select_reference


def _sampler_model(b: int, n: int, k: int, n_ref: int, *, mode: str = "static") -> bytes:
    """One plugin-form sampler node (the node `export --sampler plugin` writes) between graph inputs and outputs."""
    from ats_deploy.exporters.graph import FLOAT, INT32, GraphBuilder
    from ats_deploy.exporters.sampler import emit_plugin_sampler

    g = GraphBuilder("sampler", opset=17)
    scores, count = g.input("scores", FLOAT, [b, n]), g.input("count_in", INT32, [b])
    idx, cnt = emit_plugin_sampler(g, scores, count, k_max=k, n_ref=n_ref, mode=mode)
    g.op("Identity", idx, outputs=["indices"])
    g.op("Identity", cnt, outputs=["count_out"])
    g.output("indices", INT32, [b, output_slots(k, n) if mode == "static" else "s"])
    g.output("count_out", INT32, [b])
    return g.model(producer="test", version="0").SerializeToString()


@pytest.fixture(scope="module")
def ort_op(tmp_path_factory):
    root = os.environ.get("ONNXRUNTIME_ROOT")
    if not root:
        pytest.skip("ONNXRUNTIME_ROOT is not set: building the ONNX Runtime op needs onnxruntime_c_api.h, which the "
                    "onnxruntime wheel does not ship (set it to an ONNX Runtime release to run these tests)")
    from ats_deploy.exporters.ort_op import build_ort_op

    return build_ort_op(build_dir=tmp_path_factory.mktemp("ort_op"), onnxruntime_root=root)


def _session(model: bytes, library):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def test_the_op_equals_the_reference_bit_for_bit_on_the_kernel_sweep(ort_op, capsys):
    t0, cases = time.perf_counter(), 0
    for label, scores, count, k, n_ref in _cases(full=False):
        b, n = scores.shape
        sess = _session(_sampler_model(b, n, k, n_ref), ort_op)
        idx, cnt = sess.run(None, {"scores": scores, "count_in": count})
        want_idx, want_cnt = select_reference(scores, count, k_max=k, n_ref=n_ref, dtype=np.float32)
        assert idx.dtype == np.int32 and cnt.dtype == np.int32
        bad = np.flatnonzero((idx != want_idx).any(axis=1) | (cnt != want_cnt))
        assert bad.size == 0, f"{label}: image {bad[0]}: {idx[bad[0]].tolist()} vs {want_idx[bad[0]].tolist()}"
        cases += 1
    with capsys.disabled():
        print(f"\nONNX Runtime op: {cases} cases bit-exact in {time.perf_counter() - t0:.1f} s")
    assert cases >= 80


def test_the_op_keeps_the_hand_vectors(ort_op, vectors):
    for case in vectors["sampling"]:
        row = np.array([[0.0] + case["scores"]], np.float32)
        sess = _session(_sampler_model(1, row.shape[1], case["k"], case["n_ref"]), ort_op)
        idx, cnt = sess.run(None, {"scores": row, "count_in": np.array([row.shape[1]], np.int32)})
        assert idx[0, : cnt[0]].tolist() == [0] + case["expected_kept"] and not idx[0, cnt[0] :].any()


def test_batch_rows_are_independent(ort_op):
    scores, count = _scores("counts", 3, 197, np.random.default_rng(5))
    sess = _session(_sampler_model(3, 197, 108, 197), ort_op)
    idx, cnt = sess.run(None, {"scores": scores, "count_in": count})
    one = _session(_sampler_model(1, 197, 108, 197), ort_op)
    for i in range(3):
        a, c = one.run(None, {"scores": scores[i : i + 1], "count_in": count[i : i + 1]})
        assert np.array_equal(a[0], idx[i]) and c[0] == cnt[i]


def test_a_plugin_form_model_runs_in_onnx_runtime_and_keeps_what_the_portable_form_keeps(
    ort_op, tiny_cfg, tiny_ckpt, tiny_inputs
):
    from ats_deploy.exporters.onnx import GraphOptions, build_graph
    from ats_deploy.model.config import resolve_ats
    from ats_deploy.runtime.ort_runner import OrtRunner

    for max_k in (None, 33):
        ats = resolve_ats(tiny_cfg, max_k=max_k)
        opts = dict(batch=len(tiny_inputs))
        portable = build_graph(tiny_cfg, tiny_ckpt.state_dict, ats, GraphOptions(**opts)).SerializeToString()
        plugin = build_graph(tiny_cfg, tiny_ckpt.state_dict, ats, GraphOptions(**opts, sampler="plugin"))
        assert any(node.domain == "ats" for node in plugin.graph.node)
        want = OrtRunner(portable).infer({"pixels": tiny_inputs})
        got = OrtRunner(plugin.SerializeToString(), custom_ops=ort_op).infer({"pixels": tiny_inputs})
        for name in want:
            if name == "logits":
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
            else:  # token ids and counts: the same selection
                assert np.array_equal(got[name], want[name]), f"K={max_k}: {name}"


def test_a_dynamic_mode_node_is_refused_in_one_line_naming_the_portable_form(ort_op):
    from ats_deploy.runtime.ort_runner import OrtRunner

    with pytest.raises(ConfigError, match=r"refused the sampler node: the ONNX Runtime op runs static shape mode "
                                          r"only; for ONNX Runtime export --shape dynamic with --sampler portable$"):
        OrtRunner(_sampler_model(1, 9, 5, 9, mode="dynamic"), custom_ops=ort_op)


def test_a_plugin_form_model_without_the_op_names_how_to_build_it(monkeypatch):
    from ats_deploy.runtime.ort_runner import OrtRunner

    monkeypatch.delenv("ATS_ORT_OPS", raising=False)
    with pytest.raises(DependencyError, match=r"ats-deploy plugin build-ort.*ATS_ORT_OPS.*portable model\.onnx$"):
        OrtRunner(_sampler_model(1, 9, 5, 9))


def test_a_missing_library_is_one_line_naming_where_the_path_came_from(monkeypatch, tmp_path):
    from ats_deploy.runtime.ort_runner import OrtRunner

    monkeypatch.setenv("ATS_ORT_OPS", str(tmp_path / "nope.so"))
    with pytest.raises(InputError, match=r"^\$ATS_ORT_OPS .*nope\.so is not a file; build it with"):
        OrtRunner(_sampler_model(1, 9, 5, 9))
    with pytest.raises(InputError, match=r"^--ort-ops .*other\.so is not a file"):
        OrtRunner(_sampler_model(1, 9, 5, 9), custom_ops=tmp_path / "other.so")


def test_building_without_headers_says_where_to_get_them(monkeypatch, tmp_path):
    from ats_deploy.exporters.ort_op import build_ort_op

    monkeypatch.delenv("ONNXRUNTIME_ROOT", raising=False)
    with pytest.raises(DependencyError, match=r"--onnxruntime-root .*onnxruntime-linux-<arch>-<version>\.tgz"):
        build_ort_op(build_dir=tmp_path / "b")
    (tmp_path / "ort" / "include").mkdir(parents=True)
    with pytest.raises(DependencyError, match=r"^onnxruntime_c_api\.h not found under .*ort: pass --onnxruntime-root"):
        build_ort_op(build_dir=tmp_path / "b", onnxruntime_root=tmp_path / "ort")
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_the_shipped_sources_are_the_ones_the_wheel_packages():
    from pathlib import Path

    import tomllib

    from ats_deploy.exporters.ort_op import ORT_OP_SOURCES, ort_op_source_dir

    src = ort_op_source_dir()
    assert sorted(p.name for p in src.iterdir() if p.suffix in (".h", ".cpp", ".txt")) == sorted(ORT_OP_SOURCES)
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["ats_deploy"]
    assert "_plugin_src/ats_sampler_ort/*" in data
    text = (src / "atsSamplerOrtOp.cpp").read_text()
    from ats_deploy.exporters.plugin_lib import PLUGIN_NAME, PLUGIN_NAMESPACE

    assert f'kDomain = "{PLUGIN_NAMESPACE}"' in text and f'kOpName = "{PLUGIN_NAME}"' in text


def test_the_cli_build_refuses_a_root_without_the_header_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from ats_deploy.cli import app

    res = CliRunner().invoke(app, ["plugin", "build-ort", "--onnxruntime-root", str(tmp_path),
                                   "--build-dir", str(tmp_path / "b")])
    assert res.exit_code != 0 and res.output.count("\n") == 1
    assert res.output.startswith("error: onnxruntime_c_api.h not found under") and not (tmp_path / "b").exists()


def test_an_explicit_library_wins_over_the_environment(monkeypatch, tmp_path):
    from ats_deploy.exporters.ort_op import ort_op_library

    lib = tmp_path / "libats_sampler_ort.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("ATS_ORT_OPS", str(tmp_path / "elsewhere.so"))
    assert ort_op_library(lib) == lib
    monkeypatch.delenv("ATS_ORT_OPS")
    assert ort_op_library() is None


def test_source_lookup_prefers_the_checkout_and_names_what_is_missing(tmp_path, monkeypatch):
    from pathlib import Path

    from ats_deploy.errors import DependencyError
    from ats_deploy.exporters import plugin_lib

    repo = Path(__file__).parents[2]
    assert plugin_lib.source_dir("ats_sampler_ort", "x") == repo / "plugins" / "ats_sampler_ort"
    assert plugin_lib.plugin_source_dir() == repo / "plugins" / "ats_sampler"
    # A fake package tree: only the package-data copy exists, so it is the one found.
    pkg = tmp_path / "ats_deploy"
    (pkg / "exporters").mkdir(parents=True)
    (pkg / "_plugin_src" / "only_here").mkdir(parents=True)
    (pkg / "_plugin_src" / "only_here" / "CMakeLists.txt").write_text("")
    monkeypatch.setattr(plugin_lib, "__file__", str(pkg / "exporters" / "plugin_lib.py"))
    assert plugin_lib.source_dir("only_here", "x") == pkg / "_plugin_src" / "only_here"
    with pytest.raises(DependencyError) as err:
        plugin_lib.source_dir("ats_sampler_ort", "ONNX Runtime op sources")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("ONNX Runtime op sources not found") and "reinstall ats-deploy" in msg


# -- the op in the measuring commands (make_factory: report, tune-k) ------------------------------------------
def test_the_sampler_form_onnx_runtime_runs_follows_the_library_and_the_shape_mode(tiny_cfg):
    from ats_deploy.model.config import ATSConfig, resolve_ats
    from ats_deploy.reports.latency import ort_sampler_form

    static, dynamic = resolve_ats(tiny_cfg, max_k="33"), resolve_ats(tiny_cfg, max_k="33", shape_mode="dynamic")
    lib = "/some/libats_sampler_ort.so"
    assert ort_sampler_form(static, lib) == "plugin"
    assert ort_sampler_form(static, None) == "portable"
    assert ort_sampler_form(dynamic, lib) == "portable"  # the op serves static mode only
    assert ort_sampler_form(ATSConfig(), lib) == "portable"  # dense: no sampler at all


def test_without_the_op_the_measuring_commands_run_the_portable_form(tiny_ckpt, tiny_inputs, monkeypatch):
    from ats_deploy.model.config import resolve_ats
    from ats_deploy.reports.latency import make_factory

    monkeypatch.delenv("ATS_ORT_OPS", raising=False)
    factory, info = make_factory("onnxruntime", tiny_ckpt)
    assert info["sampler"] == "portable subgraph" and info["ort_ops"] is None
    runner = factory(resolve_ats(tiny_ckpt.config, max_k="33"), len(tiny_inputs))
    assert runner.custom_ops is None and "logits" in runner.infer({"pixels": tiny_inputs})


def test_the_op_library_is_refused_for_another_backend_in_one_line(tiny_ckpt, tmp_path):
    from ats_deploy.reports.latency import make_factory

    with pytest.raises(ConfigError, match=r"^--ort-ops is for --backend onnxruntime .*drop it$"):
        make_factory("torch", tiny_ckpt, ort_ops=tmp_path / "lib.so")


def test_the_factory_runs_static_ats_with_the_op_and_keeps_the_portable_selection(
    ort_op, tiny_ckpt, tiny_inputs, monkeypatch
):
    from ats_deploy.model.config import ATSConfig, resolve_ats
    from ats_deploy.reports import latency
    from ats_deploy.runtime.ort_runner import OrtRunner

    monkeypatch.delenv("ATS_ORT_OPS", raising=False)
    seen: list[bool] = []  # per runner built: does its graph hold the op's node?

    class Watch(OrtRunner):
        def __init__(self, model, **kw):
            import onnx

            proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
            seen.append(any(n.domain == "ats" for n in proto.graph.node))
            super().__init__(model, **kw)

    monkeypatch.setattr(latency, "OrtRunner", Watch)
    cfg, b = tiny_ckpt.config, len(tiny_inputs)
    with_op, info = latency.make_factory("onnxruntime", tiny_ckpt, ort_ops=ort_op)
    portable, _ = latency.make_factory("onnxruntime", tiny_ckpt)
    assert info["ort_ops"] == str(ort_op) and info["sampler"].startswith("one op per block")
    for ats in (resolve_ats(cfg), resolve_ats(cfg, max_k="33")):
        got = with_op(ats, b).infer({"pixels": tiny_inputs})
        want = portable(ats, b).infer({"pixels": tiny_inputs})
        assert seen[-2:] == [True, False], "static ATS with the op runs the plugin form, without it the portable"
        for name in want:
            if name == "logits":
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
            else:
                assert np.array_equal(got[name], want[name]), name
    with_op(resolve_ats(cfg, max_k="33", shape_mode="dynamic"), b)
    with_op(ATSConfig(), b)
    assert seen[-2:] == [False, False]  # dynamic shapes and dense keep standard ops


def test_report_and_tune_k_with_the_op_say_what_ran(ort_op, tiny_ckpt, tmp_path, monkeypatch):
    from ats_deploy.exporters.export import export_model
    from ats_deploy.exporters.onnx import GraphOptions
    from ats_deploy.model.config import resolve_ats
    from ats_deploy.reports.latency import report
    from ats_deploy.reports.render import render_markdown
    from ats_deploy.reports.tune import format_tune, tune_k

    monkeypatch.delenv("ATS_ORT_OPS", raising=False)
    fast = {"reps": 3, "warmup": 1, "progress": False}
    out = tmp_path / "export"
    export_model(tiny_ckpt, resolve_ats(tiny_ckpt.config, max_k="33"), out, opts=GraphOptions(sampler="plugin"),
                 parity_count=2, source={"kind": "embedded", "seed": 7, "qk_gain": 1.5})
    assert (out / "model.plugin.onnx").is_file()
    rep = report(out, backend="onnxruntime", batches=(1,), out=tmp_path / "rep", images=4, plots=False,
                 ort_ops=ort_op, **fast)
    be = rep.data["backend"]
    assert be["ort_ops"] == str(ort_op) and str(ort_op) in render_markdown(rep.data)
    share = rep.data["latency"][0]["ats_node_share"]
    assert 0 < share["overall"] < 1 and share["per_block"]  # the op's node is profiled under */ats/
    assert rep.data["parity"]["passed"]
    res = tune_k(tiny_ckpt, batch=1, step=16, stack_depth=1, check_reps=5, checks=1, ort_ops=ort_op, **fast)
    assert res.sampler == be["sampler"] and f"sampler: {be['sampler']}" in format_tune(res)
    assert res.ort_ops == str(ort_op)  # what the CLI decides its use: line on


def test_tune_k_and_report_take_the_library_on_the_command_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ats_deploy.cli import app

    monkeypatch.delenv("ATS_ORT_OPS", raising=False)
    for args in (["tune-k", "--backend", "torch"], ["tune-k"]):
        res = CliRunner().invoke(app, [*args, "--ort-ops", str(tmp_path / "missing.so")])
        assert res.exit_code != 0 and res.output.count("\n") == 1, res.output
        want = "--ort-ops is for --backend onnxruntime" if "torch" in args else "--ort-ops " + str(tmp_path)
        assert res.output.startswith(f"error: {want}"), res.output
    res = CliRunner().invoke(app, ["report", "--help"])
    assert "--ort-ops" in res.output
