"""ONNX Runtime backend (CPU here; CUDA/TensorRT execution providers where installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, DependencyError, InputError
from .base import Runner, check_pixels

__all__ = ["OrtRunner"]


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        providers: list[str] | None = None,
        threads: int = 0,
        spin: bool = True,
        custom_ops: str | Path | None = None,
    ) -> None:
        """``spin=False`` stops idle intra-op threads from spinning after a run: needed when several
        sessions are timed round-robin, or the idle ones steal the cores of the one being timed.
        ``custom_ops``: libats_sampler_ort.so, the sampler op of a plugin-form ONNX (default $ATS_ORT_OPS)."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DependencyError("ONNX Runtime is not installed; pip install onnxruntime") from exc
        from ..exporters.ort_op import ORT_OPS_ENV, ort_op_library

        opts = ort.SessionOptions()
        library = ort_op_library(custom_ops)
        if library is not None:
            opts.register_custom_ops_library(str(library))
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        src = model if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise InputError(f"ONNX file {model} does not exist; run ats-deploy export first")
        avail = ort.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(src, sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            if "AdaptiveTokenSampler" not in str(exc):
                raise
            if library is None:
                raise DependencyError(
                    "this ONNX holds the sampler as one ats::AdaptiveTokenSampler node (plugin form): ONNX Runtime "
                    f"runs it with libats_sampler_ort.so (build it with `ats-deploy plugin build-ort`, set "
                    f"{ORT_OPS_ENV} to its path), or use the portable model.onnx"
                ) from None
            why = str(exc).split("ats::AdaptiveTokenSampler: ", 1)[-1].strip().splitlines()[0]
            raise ConfigError(f"{library} refused the sampler node: {why}") from None
        self.custom_ops = library
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.channels, self.size = int(inp.shape[1]), int(inp.shape[2])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = check_pixels(feed["pixels"], channels=self.channels, size=self.size, batch=self.static_batch)
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs))


def run_batched(runner: Runner, x: np.ndarray, batch: int | None) -> dict[str, np.ndarray]:
    """Run ``x`` through ``runner`` in chunks of ``batch`` (the graph's static batch) and stack results.

    Per-block token arrays of different chunk lengths (dynamic shape mode) are padded with 0 to the
    longest chunk, which is how padding slots are defined anyway.
    """
    if batch is None or len(x) == batch:
        return runner.infer({"pixels": x})
    if len(x) % batch:
        raise InputError(
            f"{len(x)} inputs do not split into batches of {batch}; "
            f"pass a multiple of {batch} or re-export with --dynamic-batch"
        )
    parts = [runner.infer({"pixels": x[i : i + batch]}) for i in range(0, len(x), batch)]
    return stack_outputs(parts)


def stack_outputs(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key in parts[0]:
        arrs = [p[key] for p in parts]
        if arrs[0].ndim == 2 and key.startswith("tokens_"):
            width = max(a.shape[1] for a in arrs)
            arrs = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrs]
        out[key] = np.concatenate(arrs, axis=0)
    return out
