"""Writing into a directory that already holds an export: the result is the old set of files or the new
one, never a mix, and nothing of the old export survives that the new manifest does not list."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from ats_deploy import artifacts
from ats_deploy.artifacts import AtomicWriter
from ats_deploy.cli import app
from ats_deploy.errors import ExportError

runner = CliRunner()


@pytest.fixture()
def tiny_st(tmp_path, tiny_ckpt):
    from safetensors.numpy import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(dict(tiny_ckpt.state_dict), str(path))
    return path


def _export(ck, out, *extra):
    return runner.invoke(app, ["export", str(ck), "--heads", "2", "-o", str(out), "--parity-inputs", "2", *extra])


def test_reexport_removes_what_the_new_manifest_does_not_list(tiny_st, tmp_path):
    out = tmp_path / "out"
    res = _export(tiny_st, out, "--sampler", "plugin", "--precision", "fp16")
    assert res.exit_code == 0, res.output
    first = {p.name for p in out.iterdir()}
    assert {"model.plugin.onnx", "model.fp16.onnx", "model.plugin.fp16.onnx", "reference.npz"} <= first
    (out / "notes.txt").write_text("mine")  # not ours: never touched
    res = runner.invoke(app, ["export", str(tiny_st), "--heads", "2", "-o", str(out), "--parity-inputs", "0"])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["artifacts"]) == {"model.onnx"}
    assert {p.name for p in out.iterdir()} == {"model.onnx", "manifest.json", "notes.txt"}
    assert "note: removed model.fp16.onnx, model.plugin.fp16.onnx, model.plugin.onnx" in res.stderr


def test_int8_export_checks_the_calibration_data_before_replacing_anything(tiny_st, tmp_path):
    out = tmp_path / "out"
    assert _export(tiny_st, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    missing = tmp_path / "nope"
    res = _export(tiny_st, out, "--max-k", "20", "--precision", "int8", "--calib-data", str(missing))
    assert res.exit_code == 1
    assert res.output.strip().startswith(f"error: input {missing} does not exist;")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = _export(tiny_st, out, "--calib-data", str(missing))
    assert res.exit_code == 1 and "--calib-data is for --precision int8" in res.output


def _old_set(d):
    d.mkdir()
    for name in ("a.onnx", "b.json"):
        (d / name).write_text("old " + name)
    return {name: (d / name).read_text() for name in ("a.onnx", "b.json")}


def test_a_directory_in_the_way_changes_nothing(tmp_path):
    d = tmp_path / "exp"
    old = _old_set(d)
    (d / "c.json").mkdir()
    w = AtomicWriter(d)
    for name in ("a.onnx", "b.json", "c.json"):
        w.path(name).write_text("new")
    with pytest.raises(ExportError, match=r"c\.json is a directory where a file is to be written"):
        w.commit()
    assert {p.name for p in d.iterdir()} == {"a.onnx", "b.json", "c.json"}  # no temporary files left
    assert {n: (d / n).read_text() for n in old} == old


def test_a_rename_failing_midway_puts_the_old_files_back(tmp_path, monkeypatch):
    """Fault injection: the second rename into place fails (a full disk, a permission); the first new file
    is taken out again and every old file is back, including one the commit was to remove."""
    d = tmp_path / "exp"
    old = _old_set(d)
    (d / "stale.onnx").write_text("stale")
    w = AtomicWriter(d)
    for name in ("a.onnx", "b.json"):
        w.path(name).write_text("new")
    w.remove("stale.onnx")
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("b.json") and ".tmp-" in str(src):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", failing)
    with pytest.raises(ExportError, match=r"No space left on device.*nothing in .* was changed"):
        w.commit()
    assert {p.name for p in d.iterdir()} == {"a.onnx", "b.json", "stale.onnx"}
    assert {n: (d / n).read_text() for n in old} == old and (d / "stale.onnx").read_text() == "stale"


def test_a_commit_replaces_and_removes(tmp_path):
    d = tmp_path / "exp"
    _old_set(d)
    (d / "stale.onnx").write_text("stale")
    with AtomicWriter(d) as w:
        w.path("a.onnx").write_text("new")
        w.remove("stale.onnx")
    assert {p.name for p in d.iterdir()} == {"a.onnx", "b.json"}
    assert (d / "a.onnx").read_text() == "new" and (d / "b.json").read_text() == "old b.json"


def test_convert_never_writes_over_its_input_or_an_export_artifact(tiny_st, tmp_path):
    out = tmp_path / "exp"
    assert _export(tiny_st, out, "--sampler", "plugin").exit_code == 0
    plug = out / "model.plugin.onnx"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.onnx").write_bytes(b"")
    cases = [
        ([str(plug), "-o", str(plug)], f"error: -o {plug} is the input itself; write the portable form"),
        ([str(plug), "-o", str(out / "model.onnx")], f"error: -o {out / 'model.onnx'} is an artifact of the export"),
        ([str(plug), "-o", str(tmp_path / "adir")], f"error: -o {tmp_path / 'adir'} is a directory; pass the file"),
        ([str(tmp_path / "empty.onnx"), "-o", str(tmp_path / "x.onnx")], "holds no ONNX graph (empty or not an ONNX"),
    ]
    for args, msg in cases:
        res = runner.invoke(app, ["convert", *args])
        assert res.exit_code == 1 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert list((tmp_path / "adir").iterdir()) == [] and not (tmp_path / "x.onnx").exists()
    res = runner.invoke(app, ["convert", str(plug), "-o", str(out / "portable.onnx")])  # a new name: fine
    assert res.exit_code == 0 and (out / "portable.onnx").is_file()


def test_a_failing_int8_pass_leaves_the_previous_export_as_it_was(tiny_st, tmp_path):
    """The fp16/int8 passes run on a staged copy: too few calibration images fail the run after the export
    and fp16 pass succeeded, and OUT still holds the previous export, byte for byte, with nothing beside it."""
    import numpy as np

    out = tmp_path / "out"
    assert _export(tiny_st, out, "--sampler", "plugin").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    few = tmp_path / "few.npy"
    np.save(few, np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32))
    res = _export(tiny_st, out, "--max-k", "20", "--precision", "int8", "--calib-data", str(few))
    assert res.exit_code == 1 and "calibration image" in res.output, res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.npy", "out", "tiny.safetensors"]  # no staging left
    res = _export(tiny_st, out, "--max-k", "20", "--precision", "fp16")  # a pass that succeeds: promoted
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["artifacts"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert {"model.onnx", "model.fp16.onnx"} <= set(man["artifacts"]) and "model.plugin.onnx" not in man["artifacts"]
    assert "note: removed model.plugin.onnx" in res.stderr
