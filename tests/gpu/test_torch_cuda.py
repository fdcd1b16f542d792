"""The torch CUDA runner: CUDA-graph replay equals eager, and static and dynamic modes keep the same tokens.

Skipped with a printed reason where torch has no CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest

from ats_deploy.model.config import resolve_ats

pytestmark = pytest.mark.gpu


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    return None


@pytest.fixture(autouse=True)
def _needs_cuda():
    reason = _cuda_reason()
    if reason:
        print(f"skipping GPU test: {reason}")
        pytest.skip(reason)


def _kept(out: dict, blocks) -> list[list[tuple[int, ...]]]:
    return [
        [tuple(out[f"tokens_{b}"][i, : int(out[f"count_{b}"][i])].tolist()) for b in blocks]
        for i in range(len(out["logits"]))
    ]


@pytest.mark.parametrize("fp16", [False, True])
def test_graph_replay_equals_eager(tiny_ckpt, tiny_inputs, fp16):
    from ats_deploy.runtime.torch_cuda import TorchCudaRunner

    ats = resolve_ats(tiny_ckpt.config, max_k="33")
    x = tiny_inputs[:4]
    with TorchCudaRunner(tiny_ckpt, ats, batch=4, fp16=fp16) as r:
        assert r.uses_graph
        graph = r.infer({"pixels": x})
        again = r.infer({"pixels": x[::-1].copy()})  # replay really reads the new input
        eager = r.eager(x)
        ms = r.timed_step()
    assert ms > 0
    np.testing.assert_allclose(graph["logits"], eager["logits"], atol=1e-5 if not fp16 else 1e-3, rtol=0)
    for b in ats.blocks:
        np.testing.assert_array_equal(graph[f"count_{b}"], eager[f"count_{b}"])
        np.testing.assert_array_equal(graph[f"tokens_{b}"], eager[f"tokens_{b}"])
    assert _kept(again, ats.blocks) == _kept(graph, ats.blocks)[::-1]


def test_static_and_dynamic_keep_the_same_tokens(tiny_ckpt, tiny_inputs):
    from ats_deploy.runtime.torch_cuda import TorchCudaRunner
    from ats_deploy.runtime.torch_runner import TorchRunner

    cfg = tiny_ckpt.config
    static = resolve_ats(cfg, max_k="33")
    dynamic = resolve_ats(cfg, max_k="33", shape_mode="dynamic")
    x = tiny_inputs
    with TorchCudaRunner(tiny_ckpt, static, batch=len(x), fp16=False) as r:
        out_s = r.infer({"pixels": x})
    with TorchCudaRunner(tiny_ckpt, dynamic, batch=len(x), fp16=False) as r:
        assert not r.uses_graph  # the dynamic mode syncs on the host: eager
        out_d = r.infer({"pixels": x})
    assert _kept(out_s, static.blocks) == _kept(out_d, dynamic.blocks)
    np.testing.assert_allclose(out_s["logits"], out_d["logits"], atol=1e-4, rtol=0)
    with TorchRunner(tiny_ckpt, static) as cpu:
        ref = cpu.infer({"pixels": x})
    assert np.mean([a == b for a, b in zip(_kept(out_s, static.blocks), _kept(ref, static.blocks))]) >= 0.95


def test_report_on_cuda_uses_graphs_and_events(tiny_ckpt, tmp_path):
    from ats_deploy.exporters.export import export_model
    from ats_deploy.reports.latency import report

    export_model(
        tiny_ckpt,
        resolve_ats(tiny_ckpt.config, max_k="33"),
        tmp_path / "e",
        parity_count=2,
        source={"kind": "embedded", "seed": 7, "qk_gain": 1.5},
    )
    rep = report(tmp_path / "e", backend="torch", batches=(1, 8), reps=10, warmup=3, images=8, progress=False)
    be = rep.data["backend"]
    assert be["device"] == "cuda" and be["cuda_graphs"] and be["timer"].startswith("cuda-events")
    par = rep.data["parity"]  # fp16 on CUDA against fp32 on CPU: a near-boundary token may flip
    assert par["reference"].startswith("torch") and par["precision"] == "fp16" and par["kept_agreement"] >= 0.9
