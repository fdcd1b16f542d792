"""PyTorch on CUDA: the static-shape model replayed from a CUDA graph, in float16 autocast.

Why a CUDA graph: at batch 1 a ViT is launch-bound (docs/ATS_RULE.md section 5: ~0.4 ms whatever the token count on an
H100), so eager PyTorch measures Python and launch overhead, not the model. The static shape mode has
fixed shapes and no host synchronisation, so the whole forward (sampler included) is captured once and
replayed. The dynamic shape mode reads the batch's max count on the host (a sync and data-dependent
shapes): it cannot be captured and runs eagerly.

Latency harnesses call ``stage(x)`` once, then ``timed_step()`` (CUDA events around one replay, no host
copies); ``infer(feed)`` is the ordinary runner contract (copy in, replay, copy out).
torch is imported lazily; a missing GPU is a one-line :class:`DependencyError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import DependencyError, InputError
from ..model.checkpoints import LoadedCheckpoint
from ..model.config import ATSConfig
from .base import Runner, check_pixels

__all__ = ["CudaGraphCallable", "TorchCudaRunner", "require_cuda"]


def require_cuda(device: str = "cuda"):
    """The torch module, or a DependencyError saying why CUDA cannot be used."""
    try:
        import torch
    except ImportError as exc:
        raise DependencyError("PyTorch is not installed; pip install torch (a CUDA build) or use onnxruntime") from exc
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise DependencyError(
            f"CUDA is not available to PyTorch ({why}, torch {torch.__version__}); "
            "run on a GPU machine or use --backend onnxruntime"
        )
    return torch


class CudaGraphCallable:
    """``fn(*static_inputs)`` captured once into a CUDA graph; ``replay()`` reruns it on the same buffers.

    ``fn`` must have static shapes and no host synchronisation. Outputs are the tensors captured (they are
    overwritten by every replay: copy them if you keep them). With ``graph=False`` it calls ``fn`` eagerly
    with the same interface, for the dynamic shape mode and for comparisons.
    """

    def __init__(self, fn: Callable[..., Any], static_inputs: tuple, *, graph: bool = True, warmup: int = 3) -> None:
        torch = require_cuda()
        self._torch = torch
        self.fn = fn
        self.inputs = static_inputs
        self.graph = None
        self.outputs: Any = None
        if not graph:
            return
        # Warm up on a side stream (allocator, cuBLAS handles, lazy init) before capture, as PyTorch asks.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*static_inputs)
        torch.cuda.synchronize()

    def replay(self) -> Any:
        if self.graph is None:
            self.outputs = self.fn(*self.inputs)
        else:
            self.graph.replay()
        return self.outputs

    def timed_replay(self) -> float:
        """Milliseconds of one replay, from CUDA events on the current stream (no host copies)."""
        torch = self._torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.replay()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))


class TorchCudaRunner(Runner):
    """The PyTorch model on CUDA at a fixed batch: CUDA graph in static mode, fp16 autocast by default."""

    name = "torch-cuda"

    def __init__(
        self,
        ckpt: LoadedCheckpoint,
        ats: ATSConfig,
        *,
        batch: int,
        fp16: bool = True,
        cuda_graph: bool = True,
        device: str = "cuda",
    ) -> None:
        torch = require_cuda(device)
        from ..model import build_model

        if batch < 1:
            raise InputError(f"batch {batch} must be >= 1")
        self._torch = torch
        self.cfg = ckpt.config
        self.ats = ats
        self.batch = batch
        self.fp16 = fp16
        self.device = torch.device(device)
        self.model = build_model(ckpt, ats).to(self.device)
        self.uses_graph = bool(cuda_graph) and ats.shape_mode == "static"
        c = self.cfg
        self.static_x = torch.zeros(batch, c.in_chans, c.img_size, c.img_size, device=self.device)
        self._call = CudaGraphCallable(self._forward, (self.static_x,), graph=self.uses_graph)

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def _forward(self, x):
        torch = self._torch
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture.
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16, cache_enabled=False):
            out = self.model.forward_trace(x)
        return out.logits.float(), out.token_ids, out.counts

    def eager(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The same forward without the graph (for checks: replay must equal eager)."""
        torch = self._torch
        x = check_pixels(x, channels=self.cfg.in_chans, size=self.cfg.img_size)
        return self._to_numpy(self._forward(torch.from_numpy(x).to(self.device)))

    def stage(self, x: np.ndarray) -> None:
        """Copy a batch into the static input buffer (outside any timed region)."""
        x = check_pixels(x, channels=self.cfg.in_chans, size=self.cfg.img_size, batch=self.batch)
        self.static_x.copy_(self._torch.from_numpy(x))
        self._torch.cuda.synchronize()

    def timed_step(self) -> float:
        """One forward on the staged input, in ms from CUDA events (no host copies in the region)."""
        return self._call.timed_replay()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.stage(feed["pixels"])
        return self._to_numpy(self._call.replay())

    def _to_numpy(self, outs) -> dict[str, np.ndarray]:
        logits, ids, counts = outs
        res = {"logits": logits.cpu().numpy()}
        for blk, t, cnt in zip(self.ats.blocks, ids, counts):
            res[f"tokens_{blk}"] = t.cpu().numpy().astype(np.int64)
            res[f"count_{blk}"] = cnt.cpu().numpy().astype(np.int32)
        return res

    def close(self) -> None:
        self._call = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
        self._torch.cuda.empty_cache()
