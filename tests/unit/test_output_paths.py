"""Output paths and inputs of `ats-deploy bundle` and `ats-deploy plugin build` through the CLI, as a user types
them: a file where a folder is needed, an escaping --name, a malformed manifest. Each is one `error:` line on
stderr, exit 1, no traceback, and nothing written (the token-map --png cases are in test_tokenmap.py)."""

from __future__ import annotations

import json

import pytest
from _helpers.trt_helpers import tiny_export
from typer.testing import CliRunner

from ats_deploy.cli import app
from ats_deploy.exporters import plugin_lib


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export") / "export", parity_count=0)


def _one_error_line(res, *needles: str) -> str:
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("sub", ["b.tar.gz", "sub/b.tar.gz"])
def test_bundle_output_under_a_file(export, tmp_path, sub):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    res = CliRunner().invoke(app, ["bundle", str(export), "-o", str(afile / sub)])
    _one_error_line(res, "afile is a file, not a folder", "choose another path with -o")
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("name", ["../../evil", "/abs", ".."])
def test_bundle_name_that_escapes_the_archive(export, tmp_path, name):
    res = CliRunner().invoke(app, ["bundle", str(export), "-o", str(tmp_path / "b.tar.gz"), "--name", name])
    _one_error_line(res, "is not a plain folder name", "--name ats-bundle")
    assert list(tmp_path.iterdir()) == []


def test_bundle_manifest_that_is_a_list(export, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((export / "model.onnx").read_bytes())
    (bad / "manifest.json").write_text(json.dumps([1, 2]))
    res = CliRunner().invoke(app, ["bundle", str(bad), "-o", str(tmp_path / "b.tar.gz")])
    _one_error_line(res, "not an ats-deploy manifest", "re-run ats-deploy export")
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.mark.parametrize("sub", ["", "sub"])
def test_plugin_build_dir_under_a_file(tmp_path, monkeypatch, sub):
    ran: list = []
    monkeypatch.setattr(plugin_lib, "find_cmake", lambda: "cmake")
    monkeypatch.setattr(plugin_lib, "find_nvcc", lambda: "nvcc")
    monkeypatch.setattr(plugin_lib, "_run", lambda cmd, what: ran.append(cmd))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    build = afile / sub if sub else afile
    res = CliRunner().invoke(app, ["plugin", "build", "--kernel-only", "--build-dir", str(build)])
    _one_error_line(res, "afile is a file, not a folder", "--build-dir")
    assert ran == [] and afile.read_text() == "keep me"
