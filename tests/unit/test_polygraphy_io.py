"""The export's parity data in Polygraphy's formats: NVIDIA's own ``polygraphy run`` accepts them and passes.

``parity_inputs.json`` / ``reference_outputs.json`` must hold exactly what ``reference.npz`` holds (the
PyTorch inputs and outputs), split into the engine's feeds, and ``polygraphy run model.onnx --onnxrt
--load-inputs ... --load-outputs ...`` (the portable form on ONNX Runtime: the same files the Jetson uses
with ``--trt``) must pass on them. A tampered logit must make Polygraphy fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polygraphy  # noqa: F401  a core dependency: a missing one is a broken install, not a skip
import pytest
from _helpers.trt_helpers import tiny_export

from ats_deploy.exporters.polygraphy_io import (
    INPUTS_FILE,
    OUTPUTS_FILE,
    polygraphy_command,
    read_parity_files,
    split_outputs,
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    # Dynamic shape mode: each feed's tokens_<i> is cut to that feed's own max count (the hard case).
    return tiny_export(tmp_path_factory.mktemp("pg_export"), shape="dynamic", batch=2, parity_count=4)


def test_files_hold_the_reference_npz_data_split_into_feeds(export_dir):
    man = json.loads((export_dir / "manifest.json").read_text())
    assert {INPUTS_FILE, OUTPUTS_FILE} <= set(man["artifacts"])
    feeds, expected = read_parity_files(export_dir)
    with np.load(export_dir / "reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    assert [f["pixels"].shape[0] for f in feeds] == [2, 2]
    np.testing.assert_array_equal(np.concatenate([f["pixels"] for f in feeds]), ref["pixels"])
    for i, part in enumerate(expected):
        rows = slice(2 * i, 2 * i + 2)
        np.testing.assert_array_equal(part["logits"], ref["logits"][rows])
        for key in [k for k in ref if k.startswith("count_")]:
            block = key[len("count_") :]
            width = int(ref[key][rows].max())
            np.testing.assert_array_equal(part[key], ref[key][rows])
            np.testing.assert_array_equal(part["tokens_" + block], ref["tokens_" + block][rows, :width])


def test_split_outputs_cuts_tokens_per_feed_by_hand():
    out = {"tokens_1": np.array([[0, 3, 0], [0, 2, 5], [0, 0, 0]]), "count_1": np.array([2, 3, 1])}
    a, b = split_outputs(out, [2, 1], dynamic_tokens=True)
    assert a["tokens_1"].tolist() == [[0, 3, 0], [0, 2, 5]] and b["tokens_1"].tolist() == [[0]]
    a, b = split_outputs(out, [2, 1], dynamic_tokens=False)
    assert b["tokens_1"].tolist() == [[0, 0, 0]]


def _polygraphy_cli() -> list[str]:
    exe = Path(sys.executable).with_name("polygraphy")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("polygraphy")
    if found is None:
        pytest.skip("the polygraphy command is not installed next to this Python or on PATH")
    return [found]


def test_polygraphy_run_onnxrt_passes_on_the_exports_own_files(export_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="polygraphy --onnxrt needs ONNX Runtime")
    line = polygraphy_command("model.onnx").split()
    assert line[:3] == ["polygraphy", "run", "model.onnx"] and "--onnxrt" in line
    proc = subprocess.run(
        _polygraphy_cli() + line[1:], cwd=export_dir, capture_output=True, text=True, timeout=600, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PASSED" in out, out[-3000:]
    summary = [ln for ln in out.splitlines() if "Accuracy Summary" in ln or "PASSED | Runtime" in ln]
    with capsys.disabled():
        print(f"\n{' '.join(line)}:\n  " + "\n  ".join(s.strip()[:120] for s in summary))


@pytest.mark.slow
def test_polygraphy_run_fails_on_a_tampered_reference(export_dir, tmp_path):
    """Control: the same command fails once a reference logit is moved past the tolerance."""
    pytest.importorskip("onnxruntime", reason="polygraphy --onnxrt needs ONNX Runtime")
    line = polygraphy_command("model.onnx").split()
    for name in ("model.onnx", INPUTS_FILE):
        shutil.copy(export_dir / name, tmp_path / name)
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(export_dir / OUTPUTS_FILE))
    first = results[0][1][0]
    logits = np.array(first["logits"])
    logits[0, 0] += 1e-2
    first["logits"] = logits
    results.save(str(tmp_path / OUTPUTS_FILE))
    proc = subprocess.run(
        _polygraphy_cli() + line[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr
