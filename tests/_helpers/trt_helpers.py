"""Shared helpers of the TensorRT / TensorRT-RTX / bundle tests: tiny exports and skip reasons.

Imported as ``_helpers.trt_helpers`` (pytest puts ``tests/`` on sys.path: it has no ``__init__.py``).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

# 32x32 images, patch 8 -> 16 patches + CLS = 17 tokens; 4 blocks, ATS in 1..3 with K = 12 < 17 so the
# static slot count K_out really shrinks. Engines of this model build in about two seconds on a CPU.
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
TINY_K = 12


def tiny_export(
    out: Path,
    *,
    shape: str = "static",
    dynamic_batch: bool = False,
    batch: int = 1,
    seed: int = 3,
    num_classes: int = 10,
    parity_count: int = 4,
) -> Path:
    """``ats-deploy export --sampler plugin`` of a tiny seeded ViT into ``out`` (both ONNX forms)."""
    from ats_deploy.exporters.export import export_model
    from ats_deploy.exporters.onnx import GraphOptions
    from ats_deploy.model.config import ViTConfig, resolve_ats
    from ats_deploy.model.default import default_checkpoint

    cfg = ViTConfig(**{**TINY, "num_classes": num_classes})
    ck = default_checkpoint(seed=seed, cfg=cfg)
    ats = resolve_ats(cfg, max_k=TINY_K, shape_mode=shape)
    opts = GraphOptions(batch=batch, dynamic_batch=dynamic_batch, sampler="plugin")
    res = export_model(
        ck, ats, out, opts=opts, parity_count=parity_count, source={"kind": "embedded", "seed": seed, "name": "tiny"}
    )
    assert res.parity is None or res.parity.passed, res.parity
    return Path(out)


def require_rtx():
    """The tensorrt_rtx module, or a skip with the reason printed (``-ra``)."""
    try:
        return importlib.import_module("tensorrt_rtx")
    except ImportError as exc:
        pytest.skip(f"TensorRT-RTX not importable ({exc}); pip install tensorrt-rtx-cu13 to run these tests")


def require_tensorrt_gpu():
    """Real TensorRT and a CUDA GPU, or a skip with the reason printed."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        pytest.skip(f"NVIDIA TensorRT not importable ({exc}); run on a Jetson (JetPack 6.1+) or a TensorRT machine")
    from ats_deploy.exporters.trt import gpu_info

    if gpu_info() is None:
        pytest.skip("no CUDA GPU visible (libcuda could not open device 0)")
    try:
        importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        try:
            importlib.import_module("cuda.cudart")
        except ImportError:
            pytest.skip("cuda-python not installed; pip install cuda-python")
    return trt


def fake_record(export_dir: Path, onnx_name: str = "model.onnx", **over) -> dict:
    """A build record as build_engine would write it for ``export_dir`` (for CPU-only checks of the readers)."""
    import numpy as np

    from ats_deploy.exporters.trt import RECORD_FORMAT, _manifest_facts, _onnx_digest, inspect_onnx

    onnx_path = export_dir / onnx_name
    facts = inspect_onnx(onnx_path)
    man = json.loads((export_dir / "manifest.json").read_text())
    with np.load(export_dir / "reference.npz") as z:
        outs = [{"name": k, "shape": [-1, *z[k].shape[1:]], "dtype": str(z[k].dtype)} for k in z.files if k != "pixels"]
    rec = {
        "format": RECORD_FORMAT,
        "backend": "tensorrt",
        "tensorrt_version": "10.3.0",
        "gpu": {"name": "Orin", "compute_capability": "8.7"},
        "precision": facts.precision,
        "onnx": {"name": onnx_name, "sha256": _onnx_digest(onnx_path), "input": {"shape": list(facts.input_shape)}},
        "manifest": _manifest_facts(onnx_path, export_dir / "manifest.json", man),
        "network": {"outputs": outs, "plugin_layers": []},
        "plugin": None,
    }
    rec.update(over)
    return rec


class OrtEngine:
    """A runner with the TensorRT engine's interface (``infer``, ``static_batch``, ``batch_range``) over the
    export's ONNX in ONNX Runtime: the real comparison runs on the CPU, only TensorRT is replaced.
    ``seen`` records the batch sizes it was given."""

    def __init__(self, onnx_path, static_batch: int | None, batch_range: tuple[int, int]):
        from ats_deploy.runtime.ort_runner import OrtRunner

        self._ort = OrtRunner(onnx_path)
        self.static_batch, self.batch_range = static_batch, batch_range
        self.seen: list[int] = []

    def infer(self, feed):
        self.seen.append(len(feed["pixels"]))
        return self._ort.infer(feed)

    def close(self):
        self._ort.close()
