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
