"""One runner interface over PyTorch, ONNX Runtime and (on the device) TensorRT.

A runner maps a feed ``{"pixels": float32 [B, 3, H, W]}`` to a dict of NumPy outputs with the exported
graph's names (``logits``, ``tokens_<i>``, ``count_<i>``), so reports compare backends name by name.
Backends are imported lazily: importing this package needs neither torch nor onnxruntime.
"""

from __future__ import annotations

from .base import Runner

__all__ = ["Runner"]
