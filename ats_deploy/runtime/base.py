"""The runner lifecycle shared by every backend (Polygraphy's habit: ``infer(feed) -> dict``)."""

from __future__ import annotations

import abc

import numpy as np

from ..errors import InputError

__all__ = ["Runner", "check_pixels"]


def check_pixels(x: np.ndarray, *, channels: int, size: int, batch: int | None = None) -> np.ndarray:
    """Validate an input batch: [B, C, H, W] floating point with the model's channels and size."""
    if not isinstance(x, np.ndarray):
        raise InputError(
            f"input is a {type(x).__name__}, not a NumPy array; pass float32 [B, {channels}, {size}, {size}]"
        )
    if x.ndim != 4 or x.shape[1:] != (channels, size, size):
        raise InputError(
            f"input shape {list(x.shape)} does not match [B, {channels}, {size}, {size}]; "
            "resize/transpose your data to NCHW at the model's size"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"input dtype {x.dtype} is not floating point; pass normalised float32 pixels")
    if batch is not None and x.shape[0] != batch:
        raise InputError(
            f"input batch {x.shape[0]} does not match the graph's static batch {batch}; "
            f"re-export with --batch {x.shape[0]} or --dynamic-batch"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


class Runner(abc.ABC):
    """A loaded model that runs feeds. Use as a context manager or call ``close()``."""

    name: str = "runner"

    @abc.abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name as NumPy arrays."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (sessions, contexts, device memory)."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
