"""ats-deploy: ship Vision Transformers with Adaptive Token Sampling (ATS) to NVIDIA Jetson.

Importing the package is cheap: torch, onnxruntime, TensorRT and matplotlib are imported only by the
functions that need them, so the on-device commands run where torch is not installed.
"""

from __future__ import annotations

__version__ = "0.1.0"
