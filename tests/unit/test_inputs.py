"""Input specs: ``shapes:heldout:N`` / ``shapes:train:N`` and the default held-out inputs per model source."""

from __future__ import annotations

import numpy as np
import pytest

from ats_deploy.demo.shapes import HELDOUT_SEED, TRAIN_SEED, ShapesDataset
from ats_deploy.errors import InputError
from ats_deploy.inputs import Preprocess, default_inputs, load_inputs, random_inputs

PRE = Preprocess(size=32)


@pytest.mark.parametrize(("spec", "seed"), [("shapes:heldout:3", HELDOUT_SEED), ("shapes:train:3", TRAIN_SEED)])
def test_shapes_spec_gives_the_generated_images(spec, seed):
    x, names = load_inputs(spec, PRE)
    want, _ = ShapesDataset(seed, 3, 32).batch(0, 3)
    assert x.dtype == np.float32 and np.array_equal(x, want)
    assert names == [f"shapes:{spec.split(':')[1]}[{i}]" for i in range(3)]


def test_shapes_spec_defaults_to_heldout_and_honours_limit_and_paths():
    from pathlib import Path

    x, _ = load_inputs("shapes:5", PRE, limit=2)
    assert np.array_equal(x, ShapesDataset(HELDOUT_SEED, 2, 32).batch(0, 2)[0])
    x2, _ = load_inputs(Path("shapes:heldout:2"), PRE)  # typer hands the CLI value over as a Path
    assert np.array_equal(x, x2)


def test_shapes_spec_uses_the_graph_normalisation():
    pre = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, _ = load_inputs("shapes:heldout:1", pre)
    raw, _ = ShapesDataset(HELDOUT_SEED, 1, 32).raw(0)
    assert np.allclose(x[0], raw.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-5)


@pytest.mark.parametrize("spec", ["shapes:test:3", "shapes:heldout:0", "shapes:heldout:x", "shapes:a:b:3"])
def test_bad_shapes_specs_are_refused_with_the_fix(spec):
    with pytest.raises(InputError, match="shapes:heldout:N or shapes:train:N"):
        load_inputs(spec, PRE)


def test_default_inputs_are_heldout_shapes_for_the_demo_model_only():
    x, label = default_inputs({"kind": "demo"}, 2, PRE)
    assert np.array_equal(x, ShapesDataset(HELDOUT_SEED, 2, 32).batch(0, 2)[0]) and "held-out shapes" in label
    for source in (None, {"kind": "checkpoint", "path": "m.pt"}, {"kind": "embedded", "seed": 1}):
        x, label = default_inputs(source, 2, PRE, seed=4)
        assert np.array_equal(x, random_inputs(2, PRE, seed=4)) and "random" in label


def _npy_cases(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "z.npz", a=np.zeros(3))
    (tmp_path / "archive.npy").write_bytes((tmp_path / "z.npz").read_bytes())
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return {
        "empty.npy": "empty.npy is empty or truncated; save the array again with numpy.save",
        "archive.npy": "archive.npy is a .npz archive, not a .npy array; save one array with numpy.save",
        "objects.npy": "cannot read {d}/objects.npy as a .npy array (it holds pickled objects); "
        "save it with numpy.save",
    }


def test_unreadable_npy_inputs_are_one_line_errors(tmp_path):
    """An empty file (numpy raises EOFError, which the CLI framework turned into a bare 'Aborted!'), a .npz
    under a .npy name and a pickled object array each get their own line naming the fix."""
    for name, want in _npy_cases(tmp_path).items():
        with pytest.raises(InputError) as err:
            load_inputs(tmp_path / name, PRE)
        assert str(err.value).endswith(want.format(d=tmp_path)), str(err.value)


def test_unreadable_npy_input_through_the_cli_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from ats_deploy.cli import app

    _npy_cases(tmp_path)
    res = CliRunner().invoke(app, ["tokens", "--input", str(tmp_path / "empty.npy")])
    assert res.exit_code == 1 and "Aborted" not in res.output
    want = f"error: {tmp_path / 'empty.npy'} is empty or truncated; save the array again with numpy.save"
    assert res.output.strip() == want


def test_bad_reference_files_are_one_line_errors(tmp_path):
    from ats_deploy.runtime.verify import load_reference

    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "one.npy", np.zeros(3, np.float32))
    cases = {
        "empty.npz": "is empty or truncated; pass the reference.npz written by ats-deploy export",
        "one.npy": "is a single .npy array; pass the reference.npz written by ats-deploy export",
    }
    for name, want in cases.items():
        with pytest.raises(InputError) as err:
            load_reference(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name} {want}"
