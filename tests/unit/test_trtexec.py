"""trtexec's JSON outputs parsed into the latency report, and a clear refusal where trtexec is missing.

The sample files below follow the format TensorRT's trtexec writes (``samples/common/sampleReporting.cpp``:
``exportJSONTrace`` for ``--exportTimes``, ``Profiler::exportJSONProfile`` for ``--exportProfile``);
expected values are worked out by hand. A stand-in ``trtexec`` script that writes those files checks the
interleaved measurement end to end; real trtexec runs only on a TensorRT machine (tests/trt).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ats_deploy.errors import DependencyError, InputError
from ats_deploy.runtime import trtexec as tx

TIMES = [  # two iterations, as exportJSONTrace writes them (ms since the start of the run)
    {"startEnqMs": 10.0, "endEnqMs": 10.05, "startH2dMs": 10.05, "endH2dMs": 10.05, "startComputeMs": 10.05,
     "endComputeMs": 10.45, "startD2hMs": 10.45, "endD2hMs": 10.45, "h2dMs": 0, "computeMs": 0.4, "d2hMs": 0,
     "latencyMs": 0.4, "endToEndMs": 0.45},
    {"startEnqMs": 10.5, "endEnqMs": 10.55, "startH2dMs": 10.55, "endH2dMs": 10.55, "startComputeMs": 10.55,
     "endComputeMs": 11.05, "startD2hMs": 11.05, "endD2hMs": 11.05, "h2dMs": 0, "computeMs": 0.5, "d2hMs": 0,
     "latencyMs": 0.5, "endToEndMs": 0.55},
]  # fmt: skip
PROFILE = [
    {"count": 10},
    {"name": "patch_embed", "timeMs": 1.0, "averageMs": 0.1, "percentage": 25.0},
    {"name": "ats_sampler_1", "timeMs": 0.5, "averageMs": 0.05, "percentage": 12.5},
    {"name": "blocks.2.AdaptiveTokenSampler", "timeMs": 0.3, "averageMs": 0.03, "percentage": 7.5},
    {"name": "head", "timeMs": 2.2, "averageMs": 0.22, "percentage": 55.0},
]


def test_parse_times_takes_compute_ms_per_iteration(tmp_path):
    p = tmp_path / "times.json"
    p.write_text(json.dumps(TIMES))
    np.testing.assert_allclose(tx.parse_times(p), [0.4, 0.5])


def test_parse_profile_sums_the_plugin_layers(tmp_path):
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(PROFILE))
    prof = tx.parse_profile(p, plugin_layers=["ats_sampler_1"])
    assert prof["iterations"] == 10
    assert prof["plugin_layers"] == ["ats_sampler_1", "blocks.2.AdaptiveTokenSampler"]
    assert prof["plugin_ms"] == pytest.approx(0.08) and prof["total_ms"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("content", "fn"),
    [("not json", tx.parse_times), ("[]", tx.parse_times), ('[{"latency": 1}]', tx.parse_times),
     ('[{"name": "x"}]', tx.parse_profile), ('[{"count": 1}, {"name": "x"}]', tx.parse_profile)],
)  # fmt: skip
def test_malformed_files_are_one_line_input_errors(tmp_path, content, fn):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(InputError) as err:
        fn(p)
    assert "\n" not in str(err.value) and "trtexec" in str(err.value)


def test_command_has_the_reference_flags():
    cmd = tx.trtexec_command("trtexec", "m.plan", times_json="t.json", profile_json="p.json", plugin_lib="lib.so")
    for flag in ("--loadEngine=m.plan", "--useCudaGraph", "--noDataTransfers", "--useSpinWait",
                 "--exportTimes=t.json", "--exportProfile=p.json", "--separateProfileRun", "--staticPlugins=lib.so"):
        assert flag in cmd  # fmt: skip
    plain = tx.trtexec_command("trtexec", "m.plan", times_json="t.json", cuda_graph=False, shapes="pixels:4x3x32x32")
    assert "--useCudaGraph" not in plain and "--shapes=pixels:4x3x32x32" in plain and "--exportProfile" not in plain
    assert not any("Plugins=" in a for a in plain)  # no library: no plugin flag
    # a -DATS_SELF_REGISTER=OFF build registers through getCreators: trtexec must load it with --dynamicPlugins
    dyn = tx.trtexec_command("trtexec", "m.plan", times_json="t.json", plugin_lib="lib.so", plugin_dynamic=True)
    assert "--dynamicPlugins=lib.so" in dyn and not any(a.startswith("--staticPlugins") for a in dyn)


@pytest.fixture
def no_trtexec(monkeypatch, tmp_path):
    monkeypatch.delenv(tx.TRTEXEC_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.setattr(tx, "JETPACK_TRTEXEC", str(tmp_path / "absent" / "trtexec"))


def test_missing_trtexec_is_a_dependency_error_naming_the_fix(no_trtexec):
    with pytest.raises(DependencyError, match="trtexec not found.*TRTEXEC"):
        tx.find_trtexec()


def test_report_backend_tensorrt_refuses_without_trtexec(no_trtexec, tmp_path):
    from ats_deploy.cli import app

    res = CliRunner().invoke(app, ["report", str(tmp_path), "--backend", "tensorrt"])
    assert res.exit_code == 1
    assert "trtexec not found" in res.output and "Traceback" not in res.output


def test_report_plugin_lib_is_checked_before_anything_runs(tmp_path):
    """`report --plugin-lib` (the library the TensorRT ATS engines need) is refused on other backends and
    when the file is missing, in one line, before any manifest, engine or trtexec is looked at."""
    from ats_deploy.cli import app

    lib = tmp_path / "libats_sampler.so"
    lib.write_bytes(b"")
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--backend", "onnxruntime", "--plugin-lib", str(lib)])
    assert res.exit_code == 1 and "--plugin-lib is for --backend tensorrt" in res.output
    missing = tmp_path / "nope.so"
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--backend", "tensorrt", "--plugin-lib", str(missing)])
    assert res.exit_code == 1 and f"plugin library {missing} does not exist" in res.output
    assert len(res.output.strip().splitlines()) == 1


FAKE = """#!{python}
# Stand-in for trtexec: writes --exportTimes/--exportProfile files in trtexec's format and logs its calls.
import json, sys
args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in sys.argv[1:])
plan = args["loadEngine"]
with open({log!r}, "a") as fh:
    fh.write(plan + "\\n")
if "dynamicPlugins" in args or "staticPlugins" in args:
    with open({log!r} + ".plugins", "a") as fh:
        kind = "dynamic" if "dynamicPlugins" in args else "static"
        fh.write(" ".join([plan, kind, args[kind + "Plugins"]]) + "\\n")
ms = 0.3 if "ats" in plan else 0.6
n = int(args["iterations"])
json.dump([{{"computeMs": ms + i * 1e-3, "latencyMs": ms}} for i in range(n)], open(args["exportTimes"], "w"))
if "exportProfile" in args:
    layers = [{{"count": n}}, {{"name": "sampler", "timeMs": 0.1 * n, "averageMs": 0.1, "percentage": 30}},
              {{"name": "mlp", "timeMs": ms * n, "averageMs": ms, "percentage": 70}}]
    json.dump(layers, open(args["exportProfile"], "w"))
"""


def test_interleaved_measurement_with_a_stand_in_trtexec(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    exe = tmp_path / "trtexec"
    exe.write_text(FAKE.format(python=sys.executable, log=str(log)))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(tx.TRTEXEC_ENV, str(exe))
    runs = {"ats": tx.TrtexecRun(Path("ats.plan"), plugin_layers=("sampler",)), "dense": tx.TrtexecRun(Path("d.plan"))}
    out = tx.measure_interleaved(runs, rounds=3, iterations=4)
    assert log.read_text().split() == ["ats.plan", "d.plan", "d.plan", "ats.plan", "ats.plan", "d.plan"]
    assert len(out["ats"]["samples"]) == 12 and max(out["ats"]["samples"]) < min(out["dense"]["samples"])
    assert out["ats"]["profile"]["plugin_ms"] == pytest.approx(0.1)
    assert out["dense"]["profile"]["plugin_ms"] == 0.0
    assert not (tmp_path / "calls.log.plugins").exists()
    # plugin libraries reach trtexec with the flag their build needs
    runs = {
        "self": tx.TrtexecRun(Path("ats1.plan"), plugin_lib=Path("a.so")),
        "registry": tx.TrtexecRun(Path("ats2.plan"), plugin_lib=Path("b.so"), plugin_dynamic=True),
    }
    tx.measure_interleaved(runs, rounds=1, iterations=2)
    got = (tmp_path / "calls.log.plugins").read_text().splitlines()
    assert got == ["ats1.plan static a.so", "ats2.plan dynamic b.so"]


def test_a_failing_trtexec_is_one_line(tmp_path, monkeypatch):
    exe = tmp_path / "trtexec"
    exe.write_text("#!/bin/sh\necho '[E] Error[1]: engine deserialization failed' >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(tx.TRTEXEC_ENV, str(exe))
    with pytest.raises(DependencyError) as err:
        tx.measure_interleaved({"ats": tx.TrtexecRun(Path("x.plan"))}, rounds=1)
    assert "\n" not in str(err.value) and "deserialization failed" in str(err.value)
    assert os.environ[tx.TRTEXEC_ENV] == str(exe)
