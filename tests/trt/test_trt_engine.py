"""Real TensorRT on a real GPU with the C++ sampler plugin: build, run, verify (runs unchanged on a Jetson).

Skipped with a printed reason without ``import tensorrt``, a CUDA GPU or cuda-python. The plugin library is
$ATS_SAMPLER_PLUGIN, or built here with ``plugin_lib.build_plugin`` (skipped when nvcc/cmake/TensorRT headers
are missing). Engines of both ONNX forms, both shape modes and a dynamic batch must reproduce the PyTorch
outputs stored in reference.npz within the fp32 gates; the CUDA-graph path must equal plain enqueue.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _helpers.trt_helpers import require_tensorrt_gpu, tiny_export

from ats_deploy.exporters.trt import BuildSettings, build_engine

pytestmark = [pytest.mark.trt, pytest.mark.gpu]


@pytest.fixture(scope="module")
def trt():
    return require_tensorrt_gpu()


@pytest.fixture(scope="module")
def plugin_lib(trt, tmp_path_factory) -> Path:
    env = os.environ.get("ATS_SAMPLER_PLUGIN")
    if env:
        return Path(env)
    from ats_deploy.errors import DependencyError
    from ats_deploy.exporters.plugin_lib import build_plugin

    try:
        return build_plugin(build_dir=tmp_path_factory.mktemp("ats_sampler_build"))
    except DependencyError as exc:
        pytest.skip(f"cannot build the plugin library here ({exc}); set ATS_SAMPLER_PLUGIN")


@pytest.fixture(scope="module")
def exports(trt, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_exports")
    return {
        "static": tiny_export(root / "static", shape="static", batch=2, parity_count=8),
        "dynamic": tiny_export(root / "dynamic", shape="dynamic", batch=2, parity_count=8),
        "dynbatch": tiny_export(root / "dynbatch", shape="static", dynamic_batch=True, parity_count=8),
    }


def _build(export: Path, form: str, out: Path, plugin_lib: Path, **kw):
    settings = BuildSettings(backend="tensorrt", plugin_lib=plugin_lib if "plugin" in form else None, **kw)
    return build_engine(export / form, out / (form.replace(".onnx", "") + ".plan"), settings=settings, use_cache=False)


@pytest.mark.parametrize("form", ["model.onnx", "model.plugin.onnx"])
@pytest.mark.parametrize("case", ["static", "dynamic", "dynbatch"])
def test_engine_matches_pytorch(exports, plugin_lib, tmp_path, case, form):
    from ats_deploy.runtime.verify import verify

    res = _build(exports[case], form, tmp_path, plugin_lib, batch=(1, 4, 8) if case == "dynbatch" else None)
    rec = res.record
    assert rec["gpu"] is not None and rec["precision"] == "fp32"
    if "plugin" in form:
        assert rec["plugin"]["kind"] == "library" and len(rec["network"]["plugin_layers"]) == 3
    out = verify(res.plan, exports[case] / "reference.npz", plugin_lib=plugin_lib)
    assert out.parity.passed, out.parity.failures
    assert out.parity.kept_agreement == 1.0 and out.parity.top1_agreement == 1.0


def test_batch_sizes_share_one_runner_and_dynamic_batch(exports, plugin_lib, tmp_path):
    """One runner, batch sizes changing between calls (Polygraphy sets the shapes each call): every batch
    gives what that batch alone gives, in any order (the stale-state fault of a hand-written runner)."""
    from ats_deploy.runtime.trt_runner import TrtRunner

    res = _build(exports["dynbatch"], "model.plugin.onnx", tmp_path, plugin_lib, batch=(1, 4, 8))
    x = np.load(exports["dynbatch"] / "reference.npz")["pixels"]
    with TrtRunner(res.plan) as r:
        first = {b: r.infer({"pixels": x[:b]}) for b in (1, 3, 8)}
        for b in (8, 1, 3):
            again = r.infer({"pixels": x[:b]})
            assert again.keys() == first[b].keys()
            for k in again:
                np.testing.assert_array_equal(again[k], first[b][k])
        one = first[1]  # batch independence: image 0 alone == image 0 in a batch of 8
        np.testing.assert_allclose(one["logits"][0], first[8]["logits"][0], atol=1e-4)
        times = r.time_inference(x[:1], iterations=20, warmup=5)
        assert times.shape == (20,) and np.all(times > 0)


def test_dynamic_shape_engine_slices_to_the_batch_max(exports, plugin_lib, tmp_path):
    """Size-tensor outputs: tokens_<i> has s = max(count) columns, equal to the static engine's prefix."""
    from ats_deploy.runtime.trt_runner import TrtRunner

    dyn = _build(exports["dynamic"], "model.plugin.onnx", tmp_path / "d", plugin_lib)
    x = np.load(exports["dynamic"] / "reference.npz")["pixels"][:2]
    with TrtRunner(dyn.plan) as r:
        assert r.dynamic_outputs and not r.trtexec_run(2).cuda_graph
        out = r.infer({"pixels": x})
    for name, arr in out.items():
        if name.startswith("tokens_"):
            count = out[name.replace("tokens_", "count_")]
            assert arr.shape == (2, int(count.max()))
