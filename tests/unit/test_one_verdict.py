"""One parity engine: export, parity, report and verify judge the same inputs alike, near-boundary rule included.

The candidate (ONNX Runtime, and a fake engine runner for verify) is made to disagree with PyTorch on one
image at one ATS block: its kept ids come out in another order and its logits move by 1. When PyTorch
flags that image's pick at that block as near-boundary (SPEC.md's latitude), every command passes (exit 0);
when the image has no flag, every command fails (exit 3). The flagged image is found in the reference's
own flags (a property of the inputs and weights), not chosen by the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ats_deploy.cli import app
from ats_deploy.runtime.ort_runner import OrtRunner

runner = CliRunner()
BATCH = 4


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny export (batch 4) whose 16 default inputs include near-boundary picks at its first ATS block."""
    out = tmp_path_factory.mktemp("verdict") / "out"
    from ats_deploy.exporters.export import export_model
    from ats_deploy.exporters.onnx import GraphOptions
    from ats_deploy.model.config import ViTConfig, resolve_ats
    from ats_deploy.model.default import default_checkpoint

    cfg = ViTConfig(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10)
    ck = default_checkpoint(seed=7, cfg=cfg)
    res = export_model(
        ck,
        resolve_ats(cfg, max_k=40),
        out,
        opts=GraphOptions(batch=BATCH),
        parity_count=16,
        source={"kind": "embedded", "seed": 7, "qk_gain": 1.5},
    )
    assert res.parity is not None and res.parity.passed
    return out


def _cases(export_dir):
    with np.load(export_dir / "reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    blocks = json.loads((export_dir / "manifest.json").read_text())["ats"]["blocks"]
    flags = np.stack([ref[f"near_boundary_{b}"] for b in blocks])  # [blocks, images]
    first = blocks[0]
    flagged = np.flatnonzero(flags[0])
    clean = np.flatnonzero(~flags.any(0))
    assert len(flagged) and len(clean), "the fixture's inputs must hold a near-boundary and a clean image"
    return ref["pixels"], first, {"near-boundary": int(flagged[0]), "clean": int(clean[0])}


@pytest.fixture()
def disagree_on(monkeypatch):
    """``disagree_on(pixels_row, block)``: ONNX Runtime now disagrees with PyTorch on that image at that block."""

    def install(row: np.ndarray, block: int) -> None:
        real = OrtRunner.infer

        def infer(self, feed):
            out = real(self, feed)
            key = f"tokens_{block}"
            if key not in out:  # the dense model of a report
                return out
            for i, x in enumerate(feed["pixels"]):
                if np.array_equal(x, row):
                    n = int(out[f"count_{block}"][i])
                    out[key][i, 1:n] = out[key][i, 1:n][::-1].copy()
                    out["logits"][i] += 1.0
            return out

        monkeypatch.setattr(OrtRunner, "infer", infer)

    return install


def _verdicts(export_dir, tmp_path) -> dict[str, int]:
    """Exit code of parity and report, and verify's verdict as the exit code the CLI would give."""
    from _helpers.trt_helpers import OrtEngine, fake_record

    from ats_deploy.exporters.trt import sha256_file
    from ats_deploy.runtime.verify import verify

    pixels, _, _ = _cases(export_dir)
    x = tmp_path / "x.npy"
    np.save(x, pixels)
    par = runner.invoke(app, ["parity", str(export_dir), "--inputs", str(x)])
    rep = runner.invoke(
        app,
        ["report", str(export_dir), "--inputs", str(x), "--batch", str(BATCH), "--reps", "1", "--warmup", "0"]
        + ["--no-plots", "-o", str(tmp_path / "r"), "--json"],
    )
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real engine")
    rec = fake_record(export_dir, engine={"sha256": sha256_file(plan)})
    (tmp_path / "model.plan.json").write_text(json.dumps(rec))
    ver = verify(plan, export_dir / "reference.npz", runner=OrtEngine(export_dir / "model.onnx", BATCH, (BATCH, BATCH)))
    return {"parity": par.exit_code, "report": rep.exit_code, "verify": 0 if ver.parity.passed else 3}


@pytest.mark.parametrize("case,expected", [("near-boundary", 0), ("clean", 3)])
def test_parity_report_verify_one_verdict(export_dir, tmp_path, disagree_on, case, expected):
    pixels, block, images = _cases(export_dir)
    disagree_on(pixels[images[case]], block)
    assert _verdicts(export_dir, tmp_path) == {"parity": expected, "report": expected, "verify": expected}


def test_batched_reference_differences_are_near_boundary_only():
    """What "batch-independent" promises: an image's selection never depends on the other images'
    content (same image, two different batch-mates: identical ids), and where batched float rounding does
    change a pick, the reference flags it near-boundary (so every parity check excuses it)."""
    from ats_deploy.model.config import ViTConfig, resolve_ats
    from ats_deploy.model.default import default_checkpoint
    from ats_deploy.reports.parity import compare_outputs, reference_outputs

    cfg = ViTConfig(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10)
    ck, ats = default_checkpoint(seed=7, cfg=cfg), resolve_ats(cfg)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 3, 64, 64)).astype(np.float32)
    other = x.copy()
    other[1:] = rng.standard_normal((15, 3, 64, 64)).astype(np.float32)  # new batch-mates for image 0
    a = reference_outputs(ck, ats, x, batch=16)
    b = reference_outputs(ck, ats, other, batch=16)
    for blk in ats.blocks:
        assert np.array_equal(a[f"tokens_{blk}"][0], b[f"tokens_{blk}"][0])
    singles = reference_outputs(ck, ats, x, batch=1)
    res = compare_outputs(singles, a, blocks=ats.blocks)
    assert res.passed, res.failures
