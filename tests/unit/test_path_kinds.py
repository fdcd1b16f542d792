"""A path of the wrong kind (an export's manifest, a directory, an empty file, a damaged manifest) gets one
line saying what it is and what to pass, from every command that takes it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ats_deploy.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_ckpt):
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("kinds")
    ck = root / "tiny.safetensors"
    save_file(dict(tiny_ckpt.state_dict), str(ck))
    out = root / "exp"
    res = runner.invoke(
        app, ["export", str(ck), "--heads", "2", "--max-k", "20", "-o", str(out), "--parity-inputs", "2"]
        + ["--sampler", "plugin"],
    )
    assert res.exit_code == 0, res.output
    return out


def _one_line(res, text):
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) == 1 and text in res.output, res.output


def test_a_manifest_path_is_answered_with_its_directory(export_dir):
    man = export_dir / "manifest.json"
    for cmd in (["parity", str(man)], ["calibrate", str(man), "--data", "shapes:train:2"], ["report", str(man)]):
        _one_line(runner.invoke(app, cmd), f"{man} is the manifest; pass its export directory {export_dir} instead")


@pytest.mark.parametrize("drop", ["preprocessing", "model", "ats", "graph", "artifacts"])
def test_a_manifest_missing_a_section_is_one_line(export_dir, tmp_path, drop):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(export_dir, d)
    man = json.loads((d / "manifest.json").read_text())
    del man[drop]
    (d / "manifest.json").write_text(json.dumps(man))
    for cmd in (["parity", str(d)], ["tune-k", str(d)], ["calibrate", str(d), "--data", "shapes:train:2"]):
        _one_line(runner.invoke(app, cmd), f"manifest.json lacks {drop} (edited or truncated); re-run ats-deploy")


def test_build_names_what_it_was_given(export_dir, tmp_path):
    """These are refused before TensorRT is imported, so the lines are the same here and on a Jetson."""
    (tmp_path / "empty.onnx").write_bytes(b"")
    cases = {
        str(export_dir): f"{export_dir} is an export directory (written by ats-deploy export), not an exported ONNX "
        f"graph; pass one of its ONNX files, e.g. {export_dir / 'model.onnx'}",
        str(export_dir / "manifest.json"): "is a JSON file, not an exported ONNX graph",
        str(tmp_path / "empty.onnx"): "is an empty file, not an exported ONNX graph",
    }
    for path, text in cases.items():
        _one_line(runner.invoke(app, ["build", path]), text)


def test_verify_names_directories(export_dir, tmp_path):
    _one_line(
        runner.invoke(app, ["verify", str(export_dir), "--reference", str(export_dir / "reference.npz")]),
        f"{export_dir} is a directory, not a TensorRT engine; pass the .plan written by ats-deploy build",
    )
    from ats_deploy.errors import InputError
    from ats_deploy.runtime.verify import load_reference

    with pytest.raises(InputError, match="is a directory; pass the reference.npz file inside it"):
        load_reference(export_dir)


def test_parity_checks_the_plugin_form_when_asked(export_dir, tmp_path):
    """--form plugin runs model.plugin.onnx (sampler nodes expanded) instead of being ignored; an export
    without the plugin form is refused rather than silently checking model.onnx."""
    res = runner.invoke(app, ["parity", str(export_dir), "--form", "plugin", "--count", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["onnx"].endswith("model.plugin.onnx")
    res = runner.invoke(app, ["parity", str(export_dir), "--count", "2", "--json"])
    assert json.loads(res.stdout)["onnx"].endswith("model.onnx")
    import shutil

    d = tmp_path / "portable-only"
    shutil.copytree(export_dir, d)
    man = json.loads((d / "manifest.json").read_text())
    del man["artifacts"]["model.plugin.onnx"]
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "model.plugin.onnx").unlink()
    _one_line(
        runner.invoke(app, ["parity", str(d), "--form", "plugin"]),
        "has no plugin form (model.plugin.onnx); export with --sampler plugin or drop --form plugin",
    )


def test_build_output_and_plugin_library_are_checked_before_building(export_dir, tmp_path):
    """A wrong -o or a missing --plugin-lib is refused before TensorRT is imported (here: before the missing
    TensorRT is noticed), not after a build of minutes."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    onnx = str(export_dir / "model.onnx")
    _one_line(
        runner.invoke(app, ["build", onnx, "-o", str(afile / "x.plan")]),
        f"-o {afile / 'x.plan'} cannot be written: {afile} is a file, not a folder; choose another -o",
    )
    _one_line(
        runner.invoke(app, ["build", onnx, "-o", str(tmp_path)]),
        f"-o {tmp_path} is a directory; pass the engine file to write",
    )
    _one_line(
        runner.invoke(app, ["build", onnx, "--plugin-lib", str(tmp_path / "no.so")]),
        f"plugin library {tmp_path / 'no.so'} does not exist",
    )
    assert afile.read_text() == "keep"


def test_export_into_a_path_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile, afile / "sub"):
        _one_line(
            runner.invoke(app, ["export", "-o", str(out), "--parity-inputs", "0"]),
            f"output directory {out} cannot be made: {afile} is a file; choose another -o",
        )
    assert afile.read_text() == "keep"
