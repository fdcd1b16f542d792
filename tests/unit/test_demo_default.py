"""The embedded default: the shipped demo weights when the package has them, the seeded DeiT-Ti otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ats_deploy.cli import app

runner = CliRunner()
TINY_ARCH = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def _tiny_weights(path, seed):
    import torch

    from ats_deploy.demo.train import init_weights, model_config, save_weights
    from ats_deploy.demo.weights import export_demo_weights
    from ats_deploy.model.vit import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(model_config(64, TINY_ARCH))
    init_weights(model)
    with torch.no_grad():  # sharper attention than the init's, so ATS keeps a varying number of tokens
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(20)
    src = save_weights(model, path.parent / f"train_{seed}.safetensors")
    return export_demo_weights(src, path)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    import ats_deploy.demo.weights as w

    path = tmp_path / "pkg" / "deit_tiny_shapes.safetensors"
    digest = _tiny_weights(path, seed=0)
    monkeypatch.setattr(w, "DEMO_WEIGHTS", path)
    return path, digest


def test_export_uses_the_shipped_demo_weights_and_heldout_images(tmp_path, shipped):
    from ats_deploy.inputs import Preprocess, load_inputs

    path, digest = shipped
    out = tmp_path / "o"
    res = runner.invoke(app, ["export", "-o", str(out), "--parity-inputs", "4", "--json"])
    assert res.exit_code == 0, res.output
    man = json.loads(res.stdout)["manifest"]
    assert man["model"]["source"] == {
        "kind": "demo",
        "name": man["model"]["source"]["name"],
        "file": path.name,
        "sha256": digest,
    }
    assert man["model"]["architecture"]["num_classes"] == 10 and man["preprocessing"]["size"] == 64
    with np.load(out / "reference.npz") as z:
        pixels = z["pixels"]
        assert any(k.startswith("near_boundary_") for k in z.files)
    want, _ = load_inputs("shapes:heldout:4", Preprocess.from_dict(man["preprocessing"]))
    assert np.array_equal(pixels, want)  # held-out generated images, not noise
    res = runner.invoke(app, ["parity", str(out), "--count", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert "held-out shapes" in json.loads(res.stdout)["inputs"]


def test_parity_refuses_an_export_of_other_demo_weights(tmp_path, shipped):
    path, _ = shipped
    out = tmp_path / "o"
    assert runner.invoke(app, ["export", "-o", str(out), "--parity-inputs", "0"]).exit_code == 0
    _tiny_weights(path, seed=1)  # the package now ships different weights
    res = runner.invoke(app, ["parity", str(out), "--count", "2"])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sha256 mismatch" in lines[0] and "re-run ats-deploy export" in lines[0]


def test_without_shipped_weights_the_default_is_the_seeded_deit_tiny(tmp_path, monkeypatch):
    import ats_deploy.demo.weights as w
    from ats_deploy.cli import _embedded_default
    from ats_deploy.model.default import DEFAULT_SEED

    monkeypatch.setattr(w, "DEMO_WEIGHTS", tmp_path / "absent.safetensors")
    ck, source = _embedded_default()
    assert source["kind"] == "embedded" and source["seed"] == DEFAULT_SEED
    assert ck.config.num_classes == 1000 and ck.config.embed_dim == 192
