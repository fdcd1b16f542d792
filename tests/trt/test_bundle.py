"""The Jetson bundle (CPU, always): contents, checksums, README paths and README command lines.

Every path the README names must be in the unpacked bundle (or be made by an earlier README step), and every
``ats-deploy`` command line in it must parse: subcommands that exist in the CLI are checked with
``python -m ats_deploy.cli <subcommand> --help``; those not wired yet must be in PENDING with the options the
README uses declared in ``bundle.CLI_OPTIONS`` (the contract the CLI has to implement).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
from _helpers.trt_helpers import tiny_export

from ats_deploy.errors import ConfigError, ExportError, InputError
from ats_deploy.exporters.bundle import CLI_OPTIONS, PLUGIN_LIB, WHEEL_ENV, make_bundle

# Subcommands the README uses that cli.py may not have yet (to be wired; see the lead's CLI task).
PENDING: set[str] = set()


def _record(export, name: str) -> None:
    """Record ``name`` (a file put into the export by hand) in its manifest, as the export's own files are."""
    man = json.loads((export / "manifest.json").read_text())
    man["artifacts"][name] = {"sha256": hashlib.sha256((export / name).read_bytes()).hexdigest()}
    (export / "manifest.json").write_text(json.dumps(man, indent=2))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    export = tiny_export(
        tmp_path_factory.mktemp("export") / "export", shape="static", dynamic_batch=True, parity_count=2
    )
    # The bundle packs what the manifest lists; a scale file is shipped once it is recorded there.
    (export / "int8_scales.json").write_text('{"blocks.0.attn.qkv": 0.02}')
    _record(export, "int8_scales.json")
    return export


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, export_dir):
    root = tmp_path_factory.mktemp("bundle")
    export = export_dir
    res = make_bundle(export, root / "dist" / "ats-tiny.tar.gz")
    dest = root / "unpacked"
    with tarfile.open(res.path) as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    return res, dest / "ats-tiny", names


def _code_lines(readme: str) -> list[str]:
    blocks = re.findall(r"```\n(.*?)```", readme, flags=re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip()]


def test_bundle_contents_and_checksums(bundle):
    res, top, names = bundle
    assert all(n.startswith("ats-tiny/") for n in names)
    for need in (
        "model.onnx",
        "model.plugin.onnx",
        "manifest.json",
        "reference.npz",
        "int8_scales.json",
        "plugins/ats_sampler/CMakeLists.txt",
        "plugins/ats_sampler/atsSamplerPlugin.cpp",
        "README.md",
    ):
        assert (top / need).is_file(), need
    for line in (top / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((top / name).read_bytes()).hexdigest() == digest, name
    assert sorted(res.files) == sorted(n.removeprefix("ats-tiny/") for n in names if not n.endswith("/"))
    assert [p.name for p in res.path.parent.iterdir()] == ["ats-tiny.tar.gz"]  # no temporary left behind


def test_readme_paths_exist(bundle):
    _, top, _ = bundle
    readme = (top / "README.md").read_text()
    listed = re.findall(r"^- `([^`]+)`$", readme, flags=re.M)
    assert "model.plugin.onnx" in listed and "plugins/ats_sampler/CMakeLists.txt" in listed
    for rel in listed:
        assert (top / rel).exists(), rel
    made = {PLUGIN_LIB, "build/ats_sampler_dyn/libats_sampler.so"}  # produced by the README's own steps
    for line in _code_lines(readme):
        args = shlex.split(line)
        made |= {args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-o", "--build-dir", "-B")}
        for a in args:
            value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
            if re.search(r"\.(onnx|npz|plan|so)$", value) or value.startswith("plugins/"):
                assert (top / value).exists() or value in made, f"{value} in: {line}"


def test_readme_targets_both_jetpacks(bundle):
    readme = (bundle[1] / "README.md").read_text()
    for text in (
        "JetPack 6.1",
        "JetPack 7.x",
        "--cuda-arch 87",
        "--cuda-arch 110",
        "10.3",
        "--staticPlugins=",
        "--dynamicPlugins=",
        "--useCudaGraph",
        "--noDataTransfers",
        "--useSpinWait",
        "--percentile=50,90,99",
        "--shapes=pixels:1x3x32x32",
        "--batch 1,1,16",
        "--precision fp32",
        "~/ats-venv/bin/python -c 'import tensorrt",  # the venv's Python, whichever JetPack
        "~/ats-venv/bin/pip install onnxruntime",  # before polygraphy --onnxrt: not in the device install
        "'numpy<2'",
    ):
        assert text in readme, text
    assert "python3.10 -c" not in readme and "python3.12 -c" not in readme


def test_readme_command_lines_parse(bundle):
    readme = (bundle[1] / "README.md").read_text()
    commands = [shlex.split(ln) for ln in _code_lines(readme) if ln.startswith("ats-deploy ")]
    assert {" ".join(c[1:3]) if c[1] == "plugin" else c[1] for c in commands} >= {"plugin build", "build", "verify"}
    helps: dict[str, str | None] = {}
    for args in commands:
        sub = args[1:3] if args[1] == "plugin" else args[1:2]
        key = " ".join(sub)
        if key not in helps:
            proc = subprocess.run(
                [sys.executable, "-m", "ats_deploy.cli", *sub, "--help"], capture_output=True, text=True, check=False
            )
            helps[key] = proc.stdout if proc.returncode == 0 else None
        options = [a for a in args if a.startswith("-")]
        if helps[key] is None:  # not wired yet: must be a known pending command with declared options
            assert key in PENDING, f"README uses `ats-deploy {key}`, which the CLI lacks"
            assert set(options) <= set(CLI_OPTIONS[key]), (key, options)
        else:
            for opt in options:
                assert re.search(rf"(^|[\s,]){re.escape(opt)}([\s,=]|$)", helps[key], flags=re.M), (key, opt)


def test_bundle_refuses_a_folder_without_manifest(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="manifest.json"):
        make_bundle(tmp_path, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_bundle_file_follows_the_umask(bundle):
    """Others on a shared machine can read the bundle: the umask's mode, not mkstemp's 0600."""
    import os

    res, _, _ = bundle
    mask = os.umask(0o022)
    os.umask(mask)
    assert res.path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_bundle_carries_the_project_wheel_and_pins_each_jetpack(bundle):
    """The device installs ats-deploy from the wheel inside (it is not on any index), into a venv made from
    the JetPack's own Python: 3.10 on JetPack 6, 3.12 on JetPack 7."""
    import zipfile

    _, top, names = bundle
    wheels = sorted((top / "wheels").glob("ats_deploy-*-py3-none-any.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as z:
        files = set(z.namelist())
        assert {"ats_deploy/cli.py", "ats_deploy/runtime/trt_runner.py", "ats_deploy/runtime/verify.py"} <= files
        entry = next(n for n in files if n.endswith(".dist-info/entry_points.txt"))
        assert "ats-deploy = ats_deploy.cli:main" in z.read(entry).decode()
        meta = z.read(next(n for n in files if n.endswith(".dist-info/METADATA"))).decode()
        assert "Requires-Dist: polygraphy" in meta and not re.search(r"^Requires-Dist: torch\b(?!.*extra)", meta, re.M)
    readme = (top / "README.md").read_text()
    wheel = f"wheels/{wheels[0].name}"
    for py in ("3.10", "3.12"):
        assert f"python{py} -m venv --system-site-packages ~/ats-venv" in readme
    assert readme.count(f"~/ats-venv/bin/pip install {wheel}") == 2
    assert "pip install ats-deploy" not in readme


def test_bundle_wheel_from_the_environment(tmp_path, monkeypatch):
    from ats_deploy.exporters.bundle import WHEEL_ENV, project_wheel

    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "nope.whl"))
    with pytest.raises(InputError, match="is not a wheel file"):
        project_wheel(tmp_path)
    whl = tmp_path / "ats_deploy-9.9.9-py3-none-any.whl"
    whl.write_bytes(b"PK")
    monkeypatch.setenv(WHEEL_ENV, str(whl))
    assert project_wheel(tmp_path) == whl


def test_bundle_wheel_holds_the_source_package_and_nothing_stale(tmp_path, monkeypatch):
    """The wheel is built from a fresh copy: a file left in the tree's build/lib (setuptools reuses it, so a
    module deleted from the source used to keep shipping) is not in it, and every module of the source is."""
    import zipfile
    from pathlib import Path

    import ats_deploy
    from ats_deploy.exporters.bundle import WHEEL_ENV, project_wheel

    monkeypatch.delenv(WHEEL_ENV, raising=False)
    pkg = Path(ats_deploy.__file__).resolve().parent
    stale = pkg.parent / "build" / "lib" / "ats_deploy" / "_stale_probe_module.py"
    made = not stale.exists()
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("raise ImportError('deleted from the source')\n")
    try:
        whl = project_wheel(tmp_path)
    finally:
        if made:
            stale.unlink()
    with zipfile.ZipFile(whl) as z:
        shipped = {n for n in z.namelist() if n.startswith("ats_deploy/") and n.endswith(".py")}
    source = {f"ats_deploy/{p.relative_to(pkg).as_posix()}" for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    assert "ats_deploy/_stale_probe_module.py" not in shipped
    assert shipped == source


# Bad input: one-line errors, nothing written or left half-written (the bundle's own paths and inputs).


@pytest.fixture
def export(export_dir, tmp_path, monkeypatch):
    """A private copy of the tiny export, and a stand-in wheel (no pip build: these tests are about paths)."""
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    whl = tmp_path / "wheels" / "ats_deploy-0.0.0-py3-none-any.whl"
    whl.parent.mkdir()
    whl.write_bytes(b"PK\x05\x06" + bytes(18))
    monkeypatch.setenv(WHEEL_ENV, str(whl))
    return copy


def _chmod_binds(tmp) -> bool:
    """Whether file modes stop this process (not for root, unless run without CAP_DAC_OVERRIDE, e.g. under
    ``setpriv --bounding-set=-dac_override,-dac_read_search,-fowner``)."""
    probe = tmp / ".chmod-probe"
    probe.write_text("")
    probe.chmod(0)
    try:
        probe.read_text()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()


def _no_temporaries(root) -> None:
    left = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


@pytest.mark.parametrize("name", ["", ".", "..", "../../evil", "/abs", "a/b", "a\\b"])
def test_bundle_refuses_a_top_folder_name_that_escapes(export, tmp_path, name):
    dest = tmp_path / "b.tar.gz"
    with pytest.raises(ConfigError, match=r"--name .* is not a plain folder name.*pass e\.g\. --name") as info:
        make_bundle(export, dest, name=name)
    assert "\n" not in str(info.value)
    assert not dest.exists()


def test_bundle_default_top_folder_is_plain(export, tmp_path):
    res = make_bundle(export, tmp_path / "...tar.gz")  # stem "..": falls back to ats-bundle
    with tarfile.open(res.path) as tar:
        assert {n.split("/")[0] for n in tar.getnames()} == {"ats-bundle"}


@pytest.mark.parametrize("sub", ["b.tar.gz", "sub/b.tar.gz"])
def test_bundle_destination_under_a_file_is_one_line(export, tmp_path, sub):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(ExportError, match=r"afile is a file, not a folder\); choose another path with -o") as info:
        make_bundle(export, afile / sub)
    assert "\n" not in str(info.value)
    assert afile.read_text() == "keep me"
    _no_temporaries(tmp_path)


def test_bundle_destination_that_is_a_folder(export, tmp_path):
    (tmp_path / "dist").mkdir()
    with pytest.raises(ConfigError, match="is a folder; pass the archive's file name"):
        make_bundle(export, tmp_path / "dist")
    assert list((tmp_path / "dist").iterdir()) == []


def test_bundle_into_a_read_only_folder(export, tmp_path):
    if not _chmod_binds(tmp_path):
        pytest.skip("chmod does not bind this user (root): see the file-in-the-way test for the same path")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ExportError, match=r"cannot write .*b\.tar\.gz \(Permission denied\)"):
            make_bundle(export, ro / "b.tar.gz")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_bundle_failure_keeps_the_old_archive_and_leaves_nothing(export, tmp_path, monkeypatch):
    """A failure after the temporary archive exists (here: the wheel) removes it and the folders made for it,
    and leaves an archive already at -o as it was."""
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(InputError, match="is not a wheel file"):
        make_bundle(export, tmp_path / "new" / "deep" / "b.tar.gz")
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old.tar.gz"
    old.write_bytes(b"previous bundle")
    with pytest.raises(InputError, match="is not a wheel file"):
        make_bundle(export, old)
    assert old.read_bytes() == b"previous bundle"
    _no_temporaries(tmp_path)


def test_bundle_names_an_unreadable_artifact(export, tmp_path, monkeypatch):
    """An OSError reading an artifact (chmod 000, I/O error) is an InputError naming the file. Root ignores
    chmod, so the read itself is made to fail."""
    import ats_deploy.artifacts as artifacts

    real = artifacts.sha256_file

    def deny(path):
        if os.path.basename(path) == "model.onnx":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(artifacts, "sha256_file", deny)
    with pytest.raises(InputError, match=r"cannot read .*model\.onnx \(Permission denied\); make it readable") as info:
        make_bundle(export, tmp_path / "b.tar.gz")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b.tar.gz").exists()


def test_bundle_names_a_chmod_000_artifact(export, tmp_path):
    if not _chmod_binds(tmp_path):
        pytest.skip("chmod does not bind this user (root): see test_bundle_names_an_unreadable_artifact")
    (export / "model.onnx").chmod(0)
    with pytest.raises(InputError, match=r"cannot read .*model\.onnx"):
        make_bundle(export, tmp_path / "b.tar.gz")


def test_bundle_folder_where_an_artifact_should_be(export, tmp_path):
    (export / "reference.npz").unlink()
    (export / "reference.npz").mkdir()
    with pytest.raises(InputError, match="lacks reference.npz, which its manifest lists"):
        make_bundle(export, tmp_path / "b.tar.gz")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: [1, 2], "not an ats-deploy manifest"),
        (lambda m: {k: v for k, v in m.items() if k != "artifacts"}, "no artifact list|lacks artifacts"),
        (lambda m: {**m, "artifacts": ["model.onnx"]}, "no artifact list|lacks artifacts"),
        (
            lambda m: {**m, "artifacts": {**m["artifacts"], "model.onnx": "abc"}},
            "malformed artifact entry 'model.onnx'",
        ),
        (lambda m: {**m, "artifacts": {**m["artifacts"], "../x.onnx": {}}}, "malformed artifact entry '../x.onnx'"),
        (lambda m: {**m, "ats": [1]}, 'malformed "ats" entry|lacks ats'),
        (
            lambda m: {**m, "model": {"architecture": 3}},
            'malformed "model.architecture" entry|lacks model.architecture',
        ),
    ],
)
def test_bundle_refuses_a_malformed_manifest(export, tmp_path, edit, match):
    """read_manifest or the bundle's own checks (artifact entries) refuse it: either way one line."""
    man = export / "manifest.json"
    man.write_text(json.dumps(edit(json.loads(man.read_text()))))
    with pytest.raises(InputError, match=match) as info:
        make_bundle(export, tmp_path / "b.tar.gz")
    assert "\n" not in str(info.value) and "re-run ats-deploy export" in str(info.value)
    assert not (tmp_path / "b.tar.gz").exists()


def test_bundle_packs_only_what_the_manifest_lists(export, tmp_path, capsys):
    """Graphs, engines and side data an earlier export left in the folder are not packed; a warning names them."""
    shutil.copy(export / "model.onnx", export / "model.fp16.onnx")
    (export / "model.plan").write_bytes(b"engine")
    (export / "old_scales.json").write_text("{}")
    (export / "notes.txt").write_text("not a bundle file")
    res = make_bundle(export, tmp_path / "b.tar.gz")
    assert not {"model.fp16.onnx", "model.plan", "old_scales.json", "notes.txt"} & set(res.files)
    listed = set(json.loads((export / "manifest.json").read_text())["artifacts"])
    assert listed | {"manifest.json"} <= set(res.files)
    assert {f for f in res.files if "/" not in f} == listed | {"manifest.json", "README.md", "SHA256SUMS"}
    readme = tarfile.open(res.path).extractfile("b/README.md").read().decode()
    assert "model.fp16" not in readme
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: not packing model.fp16.onnx, model.plan, old_scales.json:")
